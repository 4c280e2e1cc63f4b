"""The loopback TCP limit, as iperf3 measures it on this machine during the bench run.

``measure(duration_s)`` runs ``iperf3 -s -B 127.0.0.1 -p PORT -1`` (one test, then it exits)
and ``iperf3 -c 127.0.0.1 -p PORT -t SECONDS -J`` against it, and returns the receiver's rate.
With ``nbytes`` instead of a duration (smoke runs) the client sends that many bytes (``-n``).
iperf3 is a prerequisite the bench does not install (``apt-get install -y iperf3``); without it
the result says so and the targets that need it are not judged.

This module must not know about workloads; it only measures the link.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass

from bench.daemons import HOST, free_port

CONNECT_RETRY_S = 5.0


@dataclass
class Link:
    bits_per_second: float | None
    command: str
    note: str = ""

    @property
    def bytes_per_second(self) -> float | None:
        return None if self.bits_per_second is None else self.bits_per_second / 8

    def describe(self) -> str:
        if self.bits_per_second is None:
            return f"not measured: {self.note}"
        return (f"{self.bits_per_second / 1e9:.1f} Gbit/s ({self.bits_per_second / 8e9:.2f} GB/s)"
                f", `{self.command}`" + (f"; {self.note}" if self.note else ""))

    def to_json(self) -> dict[str, object]:
        return {"bits_per_second": self.bits_per_second, "command": self.command,
                "note": self.note}


def measure(duration_s: int = 3, nbytes: str | None = None) -> Link:
    """One iperf3 test on 127.0.0.1 (a free port); never raises for a missing or failing iperf3."""
    exe = shutil.which("iperf3")
    what = ["-n", nbytes] if nbytes else ["-t", str(duration_s)]
    shown = f"iperf3 -c {HOST} {' '.join(what)}"
    if exe is None:
        return Link(None, shown, "iperf3 not installed (apt-get install -y iperf3)")
    port = free_port()
    server = subprocess.Popen([exe, "-s", "-B", HOST, "-p", str(port), "-1"],
                              stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + CONNECT_RETRY_S
        while True:
            out = subprocess.run([exe, "-c", HOST, "-p", str(port), *what, "-J"],
                                 capture_output=True, text=True,
                                 timeout=duration_s + 30)
            try:
                doc = json.loads(out.stdout)
            except ValueError:
                doc = {"error": (out.stderr or out.stdout).strip()[-300:]}
            if "error" not in doc and out.returncode == 0:
                bps = float(doc["end"]["sum_received"]["bits_per_second"])
                return Link(bps, shown, "")
            refused = "refused" in str(doc.get("error", ""))
            if not refused or time.monotonic() > deadline or server.poll() is not None:
                return Link(None, shown, f"iperf3 failed: {doc.get('error', out.returncode)}")
            time.sleep(0.05)
    except (subprocess.TimeoutExpired, OSError, KeyError, TypeError) as exc:
        return Link(None, shown, f"iperf3 failed: {exc.__class__.__name__}: {exc}")
    finally:
        if server.poll() is None:
            server.send_signal(signal.SIGTERM)
            try:
                server.wait(5)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()
