"""Measure the remote plane against a real `blit daemon` process (not a test; run by hand).

    python tests/remote/measure.py [--size-mib 1024] [--requests 2000]

Control request latency (sequential `stat`), and one file pulled and pushed over one raw data
stream and over forced HTTP/2, with TLS on and off. Data lives in /dev/shm and is removed after.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import trio  # noqa: E402

from blit.endpoint import HostSpec  # noqa: E402
from blit.transport import data, protocol as p  # noqa: E402
from blit.transport.client import LocalSink, LocalSource, open_session  # noqa: E402
from tests.remote.conftest import run_daemon_process  # noqa: E402
from blit.transport import protocol as _p  # noqa: E402

_p.VALIDATE_OUTGOING = False

MiB = 1 << 20


def make(path: Path, size: int) -> None:
    block = os.urandom(8 * MiB)
    with open(path, "wb") as f:
        left = size
        while left:
            n = min(left, len(block))
            f.write(block[:n])
            left -= n


async def latency(host: HostSpec, known: Path, tls: bool, n: int) -> tuple[float, float]:
    async with open_session(host, tls_enabled=tls, known_hosts=known) as s:
        for _ in range(50):
            await s.stat("data", b"")
        times = []
        for _ in range(n):
            t0 = time.perf_counter()
            await s.stat("data", b"")
            times.append(time.perf_counter() - t0)
    times.sort()
    return statistics.median(times) * 1e3, times[int(len(times) * 0.99)] * 1e3


async def pull(host: HostSpec, known: Path, tls: bool, h2: bool, out: Path, size: int) -> float:
    async with open_session(host, tls_enabled=tls, known_hosts=known, force_h2_data=h2) as s:
        async with s.transfer("data", b"", "pull") as t:
            await t.send_files([p.FileRef(id=1, path=b"big.bin")], last=True)
            t0 = time.perf_counter()
            await t.run_receivers(LocalSink({1: (out, None, None)}))
            el = time.perf_counter() - t0
            await t.finish()
    return size / MiB / el


async def push(host: HostSpec, known: Path, tls: bool, h2: bool, src: Path, size: int) -> float:
    async with open_session(host, tls_enabled=tls, known_hosts=known, force_h2_data=h2) as s:
        async with s.transfer("data", b"", "push") as t:
            await t.expect_files([p.FileOffer(id=1, path=b"pushed.bin", size=size, mtime_ns=0, mode=0o644)])
            jobs = data.JobQueue()
            jobs.put_many([1])
            jobs.close()
            t0 = time.perf_counter()
            await t.run_senders(LocalSource({1: src}), jobs)
            await t.finish()
            el = time.perf_counter() - t0
    return size / MiB / el


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size-mib", type=int, default=1024)
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    size = args.size_mib * MiB
    base = Path(tempfile.mkdtemp(prefix="blit-measure-", dir="/dev/shm"))
    try:
        for tls in (False, True):
            tmp = base / ("tls" if tls else "clear")
            tmp.mkdir()
            with run_daemon_process(tmp, tls=tls) as d:
                host = HostSpec("127.0.0.1", d.port)
                known = tmp / "kh"
                med, p99 = trio.run(latency, host, known, tls, args.requests)
                print(f"TLS={tls}: control request (stat) median {med:.3f} ms, p99 {p99:.3f} ms")
                make(d.modules["data"] / "big.bin", size)
                src = tmp / "src.bin"
                shutil.copyfile(d.modules["data"] / "big.bin", src)
                for h2 in (False, True):
                    pulls, pushes = [], []
                    for _ in range(args.runs):
                        out = tmp / "out.bin"
                        pulls.append(trio.run(pull, host, known, tls, h2, out, size))
                        out.unlink()
                        pushes.append(trio.run(push, host, known, tls, h2, src, size))
                        (d.modules["data"] / "pushed.bin").unlink()
                    print(
                        f"TLS={tls} {'h2 ' if h2 else 'raw'}: {args.size_mib} MiB pull median {statistics.median(pulls):.0f} MiB/s "
                        f"(best {max(pulls):.0f}), push median {statistics.median(pushes):.0f} MiB/s (best {max(pushes):.0f})"
                    )
    finally:
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
