"""Run one command and measure it: wall time, peak RSS, time to first byte, exit status.

The command is started through a small launcher (``_spawn.py``: a bare ``python -I -S`` that
forks, execs and reaps it) in a new session. What is measured, exactly:
- ``wall_s``: from the launcher's fork to its ``wait4`` returning, on CLOCK_MONOTONIC
  (``time.perf_counter``). Start-up of the command itself (for blit: the interpreter and its
  imports) is included, as a user sees it; the launcher's own start-up is not.
- ``maxrss_kib``: ``ru_maxrss`` from the launcher's ``wait4`` on the command: the largest
  resident set of the command or of any descendant it reaped (Linux keeps the max, not the
  sum). For the tar pipe (bash) that is the larger tar; for a tool with worker processes that
  it reaps, its largest process. A process that forks and execs keeps its parent's resident
  size in ``ru_maxrss``, which is why the launcher exists: the command inherits the launcher's
  few MiB (``rss_floor_kib()``, reported) instead of the bench's tens of MiB.
- ``tree_rss_kib``: the peak of the *sum* of RSS over every live process of the command's
  session (the launcher excluded), sampled from /proc every 50 ms. Every descendant counts
  unless it starts its own session. Sampling can miss short peaks, and pages shared between
  processes count once per process.
- ``peak_rss_kib`` = max(maxrss_kib, tree_rss_kib): the figure the report shows.
- ``ttfb_s``: from the launcher's fork to the first complete regular file in the destination
  (watch.py), both on CLOCK_MONOTONIC.
- ``cpu_s``: user + system time of the command and the descendants it reaped (``wait4``).
- With a ``server`` (a daemon's pid, the leader of its own session; remote workloads):
  ``server_rss_kib``, the peak of the summed RSS of the server's session sampled like the
  command's (for the blit daemon, one process that lives across runs, this includes its
  resident size before the run), and ``server_cpu_s``, the growth of the server's
  utime + stime + cutime + cstime (/proc/PID/stat) over the run. The server's forked children
  (rsync's per-connection processes) count once they are reaped, so after the command exits
  the bench waits (up to 5 s) for the server's session to be back to the server alone.

The command's stdin is /dev/null and its stdout/stderr go to anonymous temporary files (the
tail of stderr is kept for the report when the command fails).

This module must not know about workloads or trees.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench import watch

SAMPLE_INTERVAL_S = 0.05
LAUNCHER = str(Path(__file__).resolve().parent / "_spawn.py")
_PAGE_KIB = os.sysconf("SC_PAGE_SIZE") // 1024


@dataclass
class Sample:
    """One timed run of one command."""

    wall_s: float
    exit_code: int
    maxrss_kib: int
    tree_rss_kib: int
    ttfb_s: float | None = None
    stderr_tail: str = ""
    notes: list[str] = field(default_factory=list)
    cpu_s: float | None = None
    server_rss_kib: int | None = None
    server_cpu_s: float | None = None

    @property
    def peak_rss_kib(self) -> int:
        return max(self.maxrss_kib, self.tree_rss_kib)

    def to_json(self) -> dict[str, object]:
        return {
            "wall_s": round(self.wall_s, 6),
            "exit_code": self.exit_code,
            "maxrss_kib": self.maxrss_kib,
            "tree_rss_kib": self.tree_rss_kib,
            "peak_rss_kib": self.peak_rss_kib,
            "ttfb_s": None if self.ttfb_s is None else round(self.ttfb_s, 6),
            "cpu_s": None if self.cpu_s is None else round(self.cpu_s, 6),
            "server_rss_kib": self.server_rss_kib,
            "server_cpu_s": None if self.server_cpu_s is None else round(self.server_cpu_s, 6),
            "notes": self.notes,
        }


class _RssSampler(threading.Thread):
    """Samples the summed RSS of every process in one session (and optionally a server's
    session, separately) until stopped."""

    def __init__(self, sid: int, server_sid: int | None = None) -> None:
        super().__init__(name="bench-rss", daemon=True)
        self.sid = sid  # the launcher: its pid is the session id, and it is not counted
        self.server_sid = server_sid
        self.peak_kib = 0
        self.server_peak_kib = 0
        self._stop_evt = threading.Event()

    def run(self) -> None:
        while True:
            sums = sessions_rss_kib({self.sid, self.server_sid} - {None}, exclude=self.sid)
            self.peak_kib = max(self.peak_kib, sums.get(self.sid, 0))
            if self.server_sid is not None:
                self.server_peak_kib = max(self.server_peak_kib, sums.get(self.server_sid, 0))
            if self._stop_evt.wait(SAMPLE_INTERVAL_S):
                return

    def stop(self) -> None:
        self._stop_evt.set()
        self.join(timeout=5)


def session_rss_kib(sid: int, exclude: int = -1) -> int:
    """Sum of RSS (KiB) over the live processes whose session id is ``sid``, but ``exclude``."""
    return sessions_rss_kib({sid}, exclude).get(sid, 0)


def sessions_rss_kib(sids: set[int], exclude: int = -1) -> dict[int, int]:
    """Sum of RSS (KiB) per session id in ``sids`` over the live processes, but ``exclude``."""
    totals: dict[int, int] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == exclude:
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                raw = f.read()
        except OSError:
            continue
        fields = raw[raw.rfind(b")") + 2 :].split()
        # fields[0] is field 3 (state) of proc(5): session is field 6, rss field 24.
        if len(fields) > 21 and int(fields[3]) in sids:
            sid = int(fields[3])
            totals[sid] = totals.get(sid, 0) + int(fields[21]) * _PAGE_KIB
    return totals


def session_pids(sid: int) -> list[int]:
    """The live processes (not threads) whose session id is ``sid``."""
    pids = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                raw = f.read()
        except OSError:
            continue
        fields = raw[raw.rfind(b")") + 2 :].split()
        if len(fields) > 3 and int(fields[3]) == sid:
            pids.append(int(name))
    return pids


_TICK_S = 1 / os.sysconf("SC_CLK_TCK")


def process_cpu_s(pid: int) -> float | None:
    """utime + stime + cutime + cstime of ``pid`` in seconds, or None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read()
    except OSError:
        return None
    fields = raw[raw.rfind(b")") + 2 :].split()
    # fields[0] is field 3 of proc(5): utime..cstime are fields 14-17.
    return sum(int(x) for x in fields[11:15]) * _TICK_S


def _server_settled(pid: int, timeout_s: float = 5.0) -> None:
    """Wait until the server's session holds the server alone (its children reaped)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if [p for p in session_pids(pid) if p != pid] == []:
            return
        time.sleep(0.01)


# The process being measured, so that an interrupt can end it (see kill_current()).
_current: subprocess.Popen[bytes] | None = None


def kill_current() -> None:
    """Terminate the process group of the command being measured, if any (used on Ctrl-C)."""
    proc = _current
    if proc is None or proc.returncode is not None:
        return
    for sig, wait_s in ((signal.SIGTERM, 2.0), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            try:
                pid, _status = os.waitpid(proc.pid, os.WNOHANG)
            except ChildProcessError:
                return
            if pid:
                proc.returncode = -sig
                return
            time.sleep(0.02)


def run(
    argv: list[str],
    *,
    ttfb_src: str | None = None,
    ttfb_dst: str | None = None,
    cwd: str | None = None,
    env: dict[str, str] | None = None,
    server: int | None = None,
) -> Sample:
    """Run ``argv`` through the launcher in a new session, wait for it, and measure it.

    Args:
        argv: the command; no shell unless argv itself runs one.
        ttfb_src, ttfb_dst: when both are given, time to first byte is measured on ``ttfb_dst``
            (whose parent must exist), comparing candidates with ``ttfb_src``.
        cwd: working directory of the command.
        env: its environment (default: the bench's).
        server: pid of a daemon (a session leader) the command talks to; its RSS and CPU time
            over the run are measured too.
    """
    global _current
    watcher = None
    if ttfb_src is not None and ttfb_dst is not None:
        watcher = watch.FirstFileWatcher(ttfb_src, ttfb_dst)
        watcher.arm()
    rfd, wfd = os.pipe2(os.O_CLOEXEC)
    try:
        with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
            server_cpu0 = process_cpu_s(server) if server is not None else None
            h0 = time.perf_counter()
            try:
                proc = subprocess.Popen(
                    [sys.executable, "-I", "-S", LAUNCHER, str(wfd), *argv],
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=err,
                    cwd=cwd,
                    env=env,
                    start_new_session=True,
                    pass_fds=(wfd,),
                )
            except BaseException:
                if watcher is not None:
                    watcher.finish()
                raise
            os.close(wfd)
            wfd = -1
            _current = proc
            sampler = _RssSampler(proc.pid, server)
            sampler.start()
            try:
                _pid, status, _usage = os.wait4(proc.pid, 0)
                h1 = time.perf_counter()
                proc.returncode = os.waitstatus_to_exitcode(status)
            finally:
                sampler.stop()
                if watcher is not None:
                    watcher.finish()
                if proc.returncode is None:
                    kill_current()
                _current = None
            server_cpu = None
            if server is not None and server_cpu0 is not None:
                _server_settled(server)
                cpu1 = process_cpu_s(server)
                server_cpu = None if cpu1 is None else cpu1 - server_cpu0
            report = os.read(rfd, 4096).decode().split()
            err.seek(0)
            tail = err.read()[-2000:].decode("utf-8", "replace").strip()
    finally:
        os.close(rfd)
        if wfd >= 0:
            os.close(wfd)
    cpu: float | None = None
    if len(report) == 5:
        maxrss, t0, t1, code = int(report[0]), float(report[1]), float(report[2]), int(report[3])
        cpu = float(report[4])
    else:  # the launcher died: fall back on what the bench saw
        maxrss, t0, t1, code = 0, h0, h1, proc.returncode or 1
        tail += "\n(bench launcher reported nothing)"
    sample = Sample(
        wall_s=t1 - t0,
        exit_code=code,
        maxrss_kib=maxrss,
        tree_rss_kib=sampler.peak_kib,
        stderr_tail=tail,
        cpu_s=cpu,
        server_rss_kib=sampler.server_peak_kib if server is not None else None,
        server_cpu_s=server_cpu,
    )
    if watcher is not None:
        if watcher.landed_at is not None:
            # The watcher reads its events after the fact: one read after the command's exit
            # (a fast `cp -a`) is still a file that landed before it (CI saw 11.7 ms of 10.3).
            sample.ttfb_s = min(max(0.0, watcher.landed_at - t0), sample.wall_s)
        if watcher.overflowed:
            sample.notes.append("inotify queue overflowed: TTFB may be late")
        if watcher.error:
            sample.notes.append(f"TTFB watcher failed: {watcher.error}")
    return sample


_floor: int | None = None


def rss_floor_kib() -> int:
    """``ru_maxrss`` of ``true`` run through the launcher: what any command reports at least."""
    global _floor
    if _floor is None:
        _floor = min(run(["true"]).maxrss_kib for _ in range(3))
    return _floor
