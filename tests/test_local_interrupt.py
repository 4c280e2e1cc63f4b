"""Interrupted runs: kill -9 never leaves a partial file under a real name; SIGINT and SIGTERM
stop within about a second with exit code 130 and no temporary files; a rerun converges.

The source (~215 MiB in files of 1-20 MiB plus 3,000 small files) takes a couple of seconds to
copy, and each interruption is timed by watching the bytes land in the destination, so that it
hits the middle of the run rather than a moment picked by the clock.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import stat
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from helpers import (
    BLIT,
    BLIT_ENV,
    MiB,
    Snapshot,
    assert_same_tree,
    describe_output,
    extra_entries,
    files_equal_to_source,
    make_bulk_tree,
    rmtree,
    run_blit,
    snapshot,
    walk,
    write_file,
)

pytestmark = [pytest.mark.usefixtures("blit_exe"), pytest.mark.slow]


@pytest.fixture(scope="module")
def big_src(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, Snapshot, int]]:
    root = tmp_path_factory.mktemp("interrupt")
    src = root / "src"
    rng = random.Random(7)
    total, i = 0, 0
    while total < 200 * MiB:
        n = rng.randint(1, 20) * MiB + rng.randint(0, 4095)
        write_file(src / f"big{i % 3}" / f"f{i:02d}.bin", os.urandom(n))
        total, i = total + n, i + 1
    for j in range(3000):
        n = rng.randint(0, 8192)
        write_file(src / "small" / f"d{j % 50:02d}" / f"s{j:04d}", os.urandom(n))
        total += n
    os.symlink("big0", src / "link_to_big0")
    yield src, snapshot(src), total
    rmtree(root)


def _landed(dst: Path) -> int:
    """Bytes in regular files under dst (temporary files included); 0 if dst is not there yet."""
    try:
        return sum(st.st_size for _, st in walk(dst) if stat.S_ISREG(st.st_mode))
    except FileNotFoundError:
        return 0


def _start(src: Path, dst: Path, *flags: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [BLIT, "copy", *flags, f"{src}/", str(dst)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        env=BLIT_ENV,
    )


def _step_until(proc: subprocess.Popen[bytes], reached: Callable[[], bool], what: str,
                timeout: float = 60) -> None:
    """Let blit run in short slices until `reached()` holds, and leave it stopped (SIGSTOP).

    blit is stopped while `reached` looks, so it cannot race past the mark during the look (a
    walk of 3,000 files takes longer than the last 15% of the copy). The caller signals the
    stopped process: SIGKILL acts at once; `_signal` resumes it for the signals a stopped
    process holds pending.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        proc.send_signal(signal.SIGSTOP)
        if not _stopped(proc):  # it ended meanwhile (a SIGSTOP sent during its exit does nothing)
            out, err = proc.communicate()
            pytest.fail(
                f"blit exited ({proc.returncode}) before {what}: the tree is too small to "
                f"interrupt on this machine\nstdout: {out[-2000:]!r}\nstderr: {err[-2000:]!r}"
            )
        if reached():
            return
        proc.send_signal(signal.SIGCONT)
        time.sleep(0.003)
    proc.kill()
    proc.wait()
    pytest.fail(f"not {what} within {timeout} s")


def _stopped(proc: subprocess.Popen[bytes]) -> bool:
    """Wait until the SIGSTOP just sent has stopped `proc` (True) or it has ended (False). A
    process in its exit when the signal came is not stopped by it: looking at the destination
    then (`reached`) raced the end of the run, and a SIGKILL after the look found it exited 0
    (CI, at 85%)."""
    stat_path = Path(f"/proc/{proc.pid}/stat")
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        try:
            state = stat_path.read_text().rsplit(")", 1)[1].split()[0]
        except (FileNotFoundError, ProcessLookupError):
            return False
        if state in ("T", "t"):
            return True
        time.sleep(0.0005)
    raise AssertionError(f"blit (pid {proc.pid}) neither stopped nor ended within 10 s of SIGSTOP")


def _run_until(proc: subprocess.Popen[bytes], dst: Path, nbytes: int) -> None:
    """Run blit until at least nbytes landed in dst (dst exists, for nbytes 0); leave it stopped."""
    if nbytes == 0:
        _step_until(proc, dst.exists, "the destination was created")
    else:
        _step_until(proc, lambda: _landed(dst) >= nbytes, f"{nbytes} bytes landed")


def _written(pid: int) -> int:
    """Bytes the process wrote (write, pwrite, copy_file_range: /proc/PID/io's wchar)."""
    for line in Path(f"/proc/{pid}/io").read_text().splitlines():
        if line.startswith("wchar:"):
            return int(line.split()[1])
    raise AssertionError(f"no wchar in /proc/{pid}/io")


def _assert_no_partial_file(src_snap: Snapshot, dst: Path) -> Snapshot:
    dst_snap = snapshot(dst) if dst.exists() else {}
    bad = files_equal_to_source(src_snap, dst_snap)
    assert not bad, "partial files under real names:\n" + "\n".join(bad[:20])
    return dst_snap


def _rerun_converges(src: Path, src_snap: Snapshot, dst: Path) -> None:
    proc = run_blit("copy", f"{src}/", dst, timeout=300)
    assert proc.returncode == 0, describe_output(proc)
    assert_same_tree(src_snap, snapshot(dst))


def _signal(proc: subprocess.Popen[bytes], sig: signal.Signals) -> float:
    """Send `sig` to blit; the seconds it took to exit (fails after 10 s)."""
    t0 = time.monotonic()
    proc.send_signal(sig)
    proc.send_signal(signal.SIGCONT)
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        pytest.fail(f"blit still running 10 s after {sig.name}")
    return time.monotonic() - t0


def _finish(proc: subprocess.Popen[bytes]) -> tuple[bytes, bytes]:
    """Kill blit if it still runs; its stdout and stderr."""
    if proc.poll() is None:
        proc.kill()
    return proc.communicate()


def _assert_stopped(proc: subprocess.Popen[bytes], out: bytes, err: bytes, sig: signal.Signals, stopped_in: float) -> None:
    shown = f"stdout: {out[-2000:]!r}\nstderr: {err[-2000:]!r}"
    assert proc.returncode == 130, f"exit code {proc.returncode} after {sig.name}\n{shown}"
    assert stopped_in < 1.5, f"took {stopped_in:.2f} s to stop after {sig.name}"


def _assert_clean_and_rerun(src: Path, src_snap: Snapshot, dst: Path, sig: signal.Signals) -> None:
    """No partial file and nothing extra in `dst`; a rerun completes the copy."""
    dst_snap = _assert_no_partial_file(src_snap, dst)
    leftovers = extra_entries(src_snap, dst_snap)
    assert not leftovers, f"left behind after {sig.name}: {leftovers[:10]}"
    _rerun_converges(src, src_snap, dst)
    rmtree(dst)


@pytest.mark.parametrize("fraction", [0.0, 0.05, 0.3, 0.6, 0.75])
def test_kill_9_leaves_no_partial_file_and_a_rerun_completes(
    big_src: tuple[Path, Snapshot, int], tmp_path: Path, fraction: float
) -> None:
    # (The last mark leaves a quarter to do: the last big files each go in one copy_file_range
    # of up to 20 MiB, which no SIGSTOP splits; from 85% the copy was complete twice in CI.)
    src, src_snap, total = big_src
    dst = tmp_path / "dst"
    proc = _start(src, dst)
    try:
        _run_until(proc, dst, int(total * fraction))
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
    finally:
        _finish(proc)
    assert proc.returncode == -signal.SIGKILL
    dst_snap = _assert_no_partial_file(src_snap, dst)
    complete = [p for p, e in dst_snap.items() if e.kind == "file" and p in src_snap]
    if fraction >= 0.3:
        assert len(complete) < sum(1 for e in src_snap.values() if e.kind == "file"), (
            "the copy was already complete when killed: nothing was tested"
        )
    _rerun_converges(src, src_snap, dst)
    rmtree(dst)


def test_repeated_kills_then_a_rerun_completes(
    big_src: tuple[Path, Snapshot, int], tmp_path: Path
) -> None:
    """Each run resumes the previous one's leftovers; none of them may corrupt a file."""
    src, src_snap, total = big_src
    dst = tmp_path / "dst"
    for fraction in (0.2, 0.45, 0.7):
        proc = _start(src, dst)
        try:
            _run_until(proc, dst, int(total * fraction))
            proc.kill()
            proc.wait(timeout=10)
        finally:
            _finish(proc)
        _assert_no_partial_file(src_snap, dst)
    _rerun_converges(src, src_snap, dst)
    rmtree(dst)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
@pytest.mark.parametrize("fraction", [0.0, 0.25, 0.6])
def test_sigint_and_sigterm_stop_within_a_second_and_clean_up(
    big_src: tuple[Path, Snapshot, int], tmp_path: Path, sig: signal.Signals, fraction: float
) -> None:
    src, src_snap, total = big_src
    dst = tmp_path / "dst"
    proc = _start(src, dst)
    try:
        _run_until(proc, dst, int(total * fraction))
        stopped_in = _signal(proc, sig)
    finally:
        out, err = _finish(proc)
    _assert_stopped(proc, out, err, sig, stopped_in)
    _assert_clean_and_rerun(src, src_snap, dst, sig)


def _on_a_terminal(src: Path, dst: Path, flags: tuple[str, ...]) -> tuple[subprocess.Popen[bytes], int]:
    """`blit copy FLAGS SRC/ DST` with a terminal of its own (a new session, the pty its
    controlling terminal) on stdin, stdout and stderr: (process, the terminal's master end)."""
    import fcntl
    import termios

    master, slave = os.openpty()

    def own_terminal() -> None:
        os.setsid()
        fcntl.ioctl(0, termios.TIOCSCTTY, 0)

    try:
        proc = subprocess.Popen(
            [BLIT, "copy", *flags, f"{src}/", str(dst)], stdin=slave, stdout=slave, stderr=slave, env=BLIT_ENV, preexec_fn=own_terminal
        )
    except BaseException:
        os.close(master)
        raise
    finally:
        os.close(slave)
    return proc, master


@pytest.mark.parametrize("flags", [(), ("--progress",), ("-v",)], ids=["plain", "progress", "verbose"])
def test_a_terminal_that_hangs_up_stops_the_run_cleanly(big_src: tuple[Path, Snapshot, int], tmp_path: Path, flags: tuple[str, ...]) -> None:
    """The run's terminal goes away (an ssh session drops: SIGHUP, then EIO on every write to
    it): the run stops as on Ctrl-C, exit 130, no temporary, and a rerun converges. It used to
    die where it stood (SIGHUP's default action), and with SIGHUP handled the failed write of
    its last line made it exit 1."""
    src, src_snap, total = big_src
    dst = tmp_path / "dst"
    proc, master = _on_a_terminal(src, dst, flags)
    os.set_blocking(master, False)

    def landed_enough() -> bool:
        with contextlib.suppress(BlockingIOError):
            while os.read(master, 1 << 16):  # the terminal's reader: -v lines must not fill it
                pass
        return _landed(dst) >= int(total * 0.3)

    try:
        _step_until(proc, landed_enough, "30% landed")
        t0 = time.monotonic()
        os.close(master)  # the hangup: the kernel sends SIGHUP to the terminal's session
        master = -1
        proc.send_signal(signal.SIGCONT)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pytest.fail("blit still running 10 s after its terminal hung up")
        stopped_in = time.monotonic() - t0
    finally:
        if master >= 0:
            os.close(master)
        _finish(proc)
    assert proc.returncode == 130, f"exit code {proc.returncode} after the hangup"
    assert stopped_in < 1.5, f"took {stopped_in:.2f} s to stop after the hangup"
    _assert_clean_and_rerun(src, src_snap, dst, signal.SIGHUP)


@pytest.mark.parametrize("flags", [("-v",), ("-v", "--progress")], ids=["verbose", "verbose-progress"])
def test_ctrl_c_on_a_terminal_slower_than_the_run_shows_its_message_last(
    big_src: tuple[Path, Snapshot, int], bulk_src: tuple[Path, Snapshot, int], tmp_path: Path, flags: tuple[str, ...]
) -> None:
    """stdout and stderr are one terminal that shows lines slower than the run makes them: at
    Ctrl-C the `-v` lines not shown yet are dropped and the interrupt message comes next, the
    last line, whole; with --progress the cursor is shown again. The message was lost behind
    the backlog, the last line cut, the cursor left hidden (QA)."""
    import threading

    src, src_snap, total = bulk_src
    dst = tmp_path / "dst"
    proc, master = _on_a_terminal(src, dst, flags)
    shown = bytearray()
    gone = threading.Event()

    def terminal() -> None:  # about 200 KB/s: slower than the run makes its lines
        while not gone.is_set():
            try:
                chunk = os.read(master, 1024)
            except OSError:
                return
            if not chunk:
                return
            shown.extend(chunk)
            time.sleep(0.005)

    reader = threading.Thread(target=terminal, daemon=True)
    reader.start()
    try:
        _step_until(proc, lambda: _landed(dst) >= total // 3, "a third landed")
        os.write(master, b"\x03")  # Ctrl-C, through the terminal
        proc.send_signal(signal.SIGCONT)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pytest.fail("blit still running 10 s after Ctrl-C")
        reader.join(timeout=10)
    finally:
        gone.set()
        os.close(master)
        _finish(proc)
    assert proc.returncode == 130, bytes(shown[-500:])
    text = bytes(shown).replace(b"\r", b"")
    last = [ln for ln in text.split(b"\n") if ln.strip()][-1]
    assert last.endswith(b"blit: error: interrupted; temporary files removed, run the same command again to finish"), text[-500:]
    if "--progress" in flags:
        assert text.count(b"\x1b[?25l") == text.count(b"\x1b[?25h") >= 1, "the cursor was left hidden"
    _assert_clean_and_rerun(src, src_snap, dst, signal.SIGINT)


def test_a_closed_stdout_is_a_closed_pipe(bulk_src: tuple[Path, Snapshot, int], tmp_path: Path) -> None:
    """`blit copy ... >&-`: Python has no sys.stdout, and the first line written was a
    traceback (exit 1 after a complete copy). Now the run that only loses its summary keeps its
    exit code; one with -v stops as on a closed pipe, with one line; no file the run opened took
    fd 1."""
    src, src_snap, _total = bulk_src
    dst = tmp_path / "dst"
    closed = ["bash", "-c", 'exec "$0" "$@" >&-', BLIT]
    proc = subprocess.run([*closed, "copy", f"{src}/", str(dst)], capture_output=False, stderr=subprocess.PIPE, env=BLIT_ENV, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == b""
    assert_same_tree(src_snap, snapshot(dst))
    rmtree(dst)
    proc = subprocess.run([*closed, "copy", "-v", f"{src}/", str(dst)], stderr=subprocess.PIPE, env=BLIT_ENV, timeout=300)
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.decode().splitlines() == [
        "blit: error: standard output was closed (broken pipe); stopped, run the same command again to finish"
    ]
    if dst.exists():
        _assert_no_partial_file(src_snap, dst)
        rmtree(dst)


def test_an_interrupted_json_run_still_ends_with_its_summary(big_src: tuple[Path, Snapshot, int], tmp_path: Path) -> None:
    """--json: the last line is always the summary, with the process's exit code (130)."""
    import json

    src, _snap, total = big_src
    dst = tmp_path / "dst"
    proc = _start(src, dst, "--json")
    try:
        _run_until(proc, dst, int(total * 0.25))
        _signal(proc, signal.SIGINT)
    finally:
        out, _err = _finish(proc)
    assert proc.returncode == 130
    last = json.loads(out.decode().splitlines()[-1])
    assert last == {"event": "summary", "fatal": "interrupted", "exit_code": 130}


# --- The same with worker processes (many small files in many directories) -----------------


@pytest.fixture(scope="module")
def bulk_src(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, Snapshot, int]]:
    root = tmp_path_factory.mktemp("interrupt_bulk")
    src = make_bulk_tree(root / "src", files=30_000, dirs=300, xattrs=True)
    for i in range(2):
        write_file(src / f"big/f{i}.bin", os.urandom(8 * MiB))
    yield src, snapshot(src), _landed(src)
    rmtree(root)


def _children(pid: int) -> list[int]:
    out = []
    for p in os.listdir("/proc"):
        if p.isdigit():
            try:
                fields = Path(f"/proc/{p}/stat").read_bytes().rsplit(b")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                out.append(int(p))
    return out


def _alive(pids: list[int]) -> list[int]:
    alive = []
    for p in pids:
        try:
            state = Path(f"/proc/{p}/stat").read_bytes().rsplit(b")", 1)[1].split()[0]
        except OSError:
            continue
        if state != b"Z":
            alive.append(p)
    return alive


def _run_until_workers(proc: subprocess.Popen[bytes], dst: Path, timeout: float = 60) -> list[int]:
    """Wait until blit has worker processes and they have been at work for 0.2 s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail("blit finished without starting worker processes: this tree no longer "
                        "reaches the process mode; give it more small files")  # fmt: skip
        workers = _children(proc.pid)
        if workers:
            time.sleep(0.2)
            if proc.poll() is None:
                return workers
        time.sleep(0.005)
    pytest.fail(f"no worker processes within {timeout} s")


def _listing(dst: Path) -> dict[bytes, tuple[int, int]]:
    return {p: (st.st_size, st.st_mtime_ns) for p, st in walk(dst)}


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_interrupt_stops_worker_processes_too(
    bulk_src: tuple[Path, Snapshot, int], tmp_path: Path, sig: signal.Signals
) -> None:
    src, src_snap, total = bulk_src
    dst = tmp_path / "dst"
    proc = _start(src, dst)
    try:
        workers = _run_until_workers(proc, dst)
        stopped_in = _signal(proc, sig)
    finally:
        out, err = _finish(proc)
    _assert_stopped(proc, out, err, sig, stopped_in)
    assert not _alive(workers), f"worker processes {_alive(workers)} outlived blit"
    _assert_clean_and_rerun(src, src_snap, dst, sig)


def test_kill_9_stops_every_write_and_a_rerun_completes(
    bulk_src: tuple[Path, Snapshot, int], tmp_path: Path
) -> None:
    """After kill -9 of blit, nothing goes on writing into the destination (no orphan worker)."""
    src, src_snap, total = bulk_src
    dst = tmp_path / "dst"
    proc = _start(src, dst)
    try:
        workers = _run_until_workers(proc, dst)
        proc.kill()
        proc.wait(timeout=10)
    finally:
        _finish(proc)
    time.sleep(0.5)
    first = _listing(dst)
    time.sleep(1.5)
    second = _listing(dst)
    try:
        assert first == second, (
            f"the destination still changed 0.5-2 s after kill -9 ({len(second) - len(first)} "
            f"new entries): worker processes {_alive(workers)} went on without blit"
        )
        assert not _alive(workers), f"worker processes {_alive(workers)} outlived blit"
    finally:
        for p in _alive(workers):
            os.kill(p, signal.SIGKILL)
    _assert_no_partial_file(src_snap, dst)
    _rerun_converges(src, src_snap, dst)
    rmtree(dst)


# --- Interrupted mirror over a stale destination ---------------------------------------------


def _stale_copy(src: Path, dst: Path) -> Snapshot:
    """dst: a copy of src with a third of the big files changed (same size, older mtime) and
    extras; returns its snapshot."""
    proc = run_blit("copy", f"{src}/", dst, timeout=300)
    assert proc.returncode == 0, describe_output(proc)
    for i, (rel, st) in enumerate(sorted(walk(dst))):
        if stat.S_ISREG(st.st_mode) and st.st_size > MiB and i % 3 == 0:
            p = os.path.join(os.fsencode(dst), rel)
            with open(p, "r+b") as f:
                f.seek(st.st_size // 2)
                f.write(b"STALE")
            os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns - 10**9))
    for j in range(200):
        write_file(dst / "small" / f"d{j % 50:02d}" / f"extra{j}", b"extra" * j)
    return snapshot(dst)


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT], ids=["SIGKILL", "SIGINT"])
def test_interrupted_mirror_leaves_old_or_new_files_and_a_rerun_converges(
    big_src: tuple[Path, Snapshot, int], tmp_path: Path, sig: signal.Signals
) -> None:
    src, src_snap, total = big_src
    dst = tmp_path / "dst"
    stale = _stale_copy(src, dst)
    proc = subprocess.Popen([BLIT, "mirror", "--ignore-times", f"{src}/", str(dst)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            stdin=subprocess.DEVNULL, env=BLIT_ENV)  # fmt: skip
    try:
        # --ignore-times rewrites every file: stop it a third of the way through
        _step_until(proc, lambda: _written(proc.pid) >= total // 3, "a third was rewritten")
        proc.send_signal(sig)
        proc.send_signal(signal.SIGCONT)
        proc.wait(timeout=10)
    finally:
        out, err = _finish(proc)
    if sig == signal.SIGINT:
        assert proc.returncode == 130, (proc.returncode, err[-2000:])
    after = snapshot(dst)
    mixed = [p for p, e in after.items() if e.kind == "file" and p in src_snap
             and e.sha256 not in (src_snap[p].sha256, stale[p].sha256 if p in stale else None)]  # fmt: skip
    assert not mixed, f"files that are neither the old nor the new version: {mixed[:10]}"
    if sig == signal.SIGINT:
        leftovers = [p for p in extra_entries(src_snap, after) if p not in stale]
        assert not leftovers, f"temporary files left after SIGINT: {leftovers[:10]}"
    proc2 = run_blit("mirror", f"{src}/", dst, timeout=300)
    assert proc2.returncode == 0, describe_output(proc2)
    assert_same_tree(src_snap, snapshot(dst))
    rmtree(dst)


# --- A closed stdout (`blit copy -v ... | head`) -----------------------------------------------


@pytest.mark.parametrize("tree", ["big", "bulk"])
@pytest.mark.parametrize("output", ["-v", "--json"])
def test_closed_stdout_stops_the_run_with_one_line_and_a_rerun_completes(
    big_src: tuple[Path, Snapshot, int], bulk_src: tuple[Path, Snapshot, int], tmp_path: Path,
    tree: str, output: str,
) -> None:
    """stdout is a pipe whose reader is already gone, as under `| head` once head has its lines:
    the first flush fails. The run stops like an interrupt, says so in one line (no traceback),
    exits 1, leaves no partial or temporary file, and a rerun completes the copy."""
    src, src_snap, _ = big_src if tree == "big" else bulk_src
    dst = tmp_path / "dst"
    r, w = os.pipe()
    os.close(r)
    try:
        proc = subprocess.run([BLIT, "copy", output, f"{src}/", str(dst)], stdout=w, stderr=subprocess.PIPE,
                              stdin=subprocess.DEVNULL, env=BLIT_ENV, timeout=120)  # fmt: skip
    finally:
        os.close(w)
    err = proc.stderr.decode(errors="backslashreplace")
    assert proc.returncode == 1, err
    assert err.splitlines() == ["blit: error: standard output was closed (broken pipe); stopped, "
                                "run the same command again to finish"], err  # fmt: skip
    dst_snap = _assert_no_partial_file(src_snap, dst)
    assert not extra_entries(src_snap, dst_snap), extra_entries(src_snap, dst_snap)[:10]
    assert len(dst_snap) < len(src_snap), "the run finished before its output failed: no stop was tested"
    _rerun_converges(src, src_snap, dst)
    rmtree(dst)


@pytest.mark.parametrize("output", ["-v", "--json"])
def test_lines_lost_after_the_work_is_done_still_fail_the_run(tmp_path: Path, output: str) -> None:
    """The same closed pipe, closed only once the copy is complete: the run's lines wait in the
    console's queue behind a full pipe, then the reader goes. They were lost silently and the
    run exited 0 (a fast remote run raced this way in CI); like `cp -v`, a run whose lines were
    lost fails: exit 1 and one line that says the copy itself completed."""
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    for i in range(20):
        (src / f"f{i:02d}").write_bytes(b"x" * i)
    r, w = os.pipe()
    try:
        os.set_blocking(w, False)
        with contextlib.suppress(BlockingIOError):
            while True:
                os.write(w, b"\n" * 4096)  # full: the run's first write waits for a reader
        os.set_blocking(w, True)
        proc = subprocess.Popen([BLIT, "copy", output, f"{src}/", str(dst)], stdout=w, stderr=subprocess.PIPE,
                                stdin=subprocess.DEVNULL, env=BLIT_ENV)  # fmt: skip
        os.close(w)
        w = -1
        deadline = time.monotonic() + 60
        while not (dst.is_dir() and sorted(p.name for p in dst.iterdir()) == sorted(p.name for p in src.iterdir())):
            assert proc.poll() is None and time.monotonic() < deadline, "the run ended or stalled before its copy was complete"
            time.sleep(0.05)
        time.sleep(0.5)  # its work done: it waits to hand over its lines
        assert proc.poll() is None, "the run ended although nobody had read its lines"
    finally:
        os.close(r)
        if w >= 0:
            os.close(w)
    _out, err_b = proc.communicate(timeout=60)
    err = err_b.decode(errors="backslashreplace")
    assert proc.returncode == 1, err
    assert err.splitlines() == ["blit: error: standard output was closed (broken pipe) before the run's last lines were "
                                "written; the copy itself completed"], err  # fmt: skip
    assert_same_tree(snapshot(src), snapshot(dst))


# --- A stdout nobody reads (`blit copy -v ... | pager` whose pager stopped reading) ------------


def _verbose_into_a_pipe(src: Path, dst: Path) -> tuple[subprocess.Popen[bytes], int]:
    """`blit copy -v SRC/ DST` with stdout into a pipe nobody reads yet: (process, read end)."""
    r, w = os.pipe()
    try:
        proc = subprocess.Popen([BLIT, "copy", "-v", f"{src}/", str(dst)], stdout=w, stderr=subprocess.PIPE,
                                stdin=subprocess.DEVNULL, env=BLIT_ENV)  # fmt: skip
    except BaseException:
        os.close(r)
        raise
    finally:
        os.close(w)
    return proc, r


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_stdout_nobody_reads_neither_holds_the_run_nor_its_interrupt(
    bulk_src: tuple[Path, Snapshot, int], tmp_path: Path, sig: signal.Signals
) -> None:
    """-v lines into a pipe whose reader has stopped reading. They were written on the run's
    own thread: once the pipe was full (64 KiB, about 3,000 lines) the run stood there, and
    Ctrl-C or SIGTERM did nothing until the reader went on (QA F5). Now the run goes on past
    what the pipe holds, and a signal stops it within a second: exit 130, no temporary, and
    a rerun converges."""
    src, src_snap, total = bulk_src
    dst = tmp_path / "dst"
    proc, r = _verbose_into_a_pipe(src, dst)
    try:
        try:
            _run_until(proc, dst, total // 2)  # 15,000 lines and more: far beyond the pipe's 64 KiB
            stopped_in = _signal(proc, sig)
        finally:
            _out, err = _finish(proc)
    finally:
        os.close(r)
    _assert_stopped(proc, b"", err, sig, stopped_in)
    # stderr (a pipe read to the end) does not wait behind the stdout nobody reads: the line
    # saying what happened gets out (it was dropped with the stdout backlog, QA).
    assert err.decode().splitlines() == ["blit: error: interrupted; temporary files removed, run the same command again to finish"], err
    _assert_clean_and_rerun(src, src_snap, dst, sig)


def test_a_reader_that_pauses_still_gets_every_line_in_order(bulk_src: tuple[Path, Snapshot, int], tmp_path: Path) -> None:
    """The reader of -v reads nothing until the whole tree has landed (the run does not wait for
    it), then reads: every entry's line is there, once, and the summary is the last line; the
    exit code is 0."""
    src, src_snap, _total = bulk_src
    dst = tmp_path / "dst"
    proc, r = _verbose_into_a_pipe(src, dst)
    try:
        try:
            deadline = time.monotonic() + 120
            while not dst.exists() or len(_listing(dst)) < len(src_snap) - 1:
                assert proc.poll() is None, "blit exited with its output unread"
                assert time.monotonic() < deadline, "the tree did not land while the reader paused"
                time.sleep(0.05)
            with os.fdopen(r, "rb") as reader:
                r = -1
                out = reader.read()
            proc.wait(timeout=30)
        finally:
            _o, err = _finish(proc)
    finally:
        if r >= 0:
            os.close(r)
    assert proc.returncode == 0, err
    lines = out.decode().splitlines()
    assert lines[-1].startswith("copied "), lines[-3:]
    paths = [line.split(" ", 1)[1] for line in lines[:-1]]
    assert len(paths) == len(set(paths)) == len(src_snap) - 1, (len(paths), len(set(paths)), len(src_snap))
    assert set(paths) == {p.decode() for p in src_snap if p not in (b"", b".")}
    assert_same_tree(src_snap, snapshot(dst))
    rmtree(dst)


def _catches_sigterm(pid: int) -> bool:
    """Whether the process has a handler for SIGTERM yet (blit's entry installs one first)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            caught = next(int(ln.split()[1], 16) for ln in f if ln.startswith("SigCgt:"))
    except (OSError, StopIteration):
        return False
    return bool(caught & (1 << (signal.SIGTERM - 1)))


def test_a_signal_during_start_up_ends_the_run_at_once_with_one_line(tmp_path: Path) -> None:
    """Ctrl-C or SIGTERM while blit imports and parses its arguments (before the run has its
    own handling): exit 130 and `blit: interrupted`, never a traceback, a wrong exit code or a
    process stuck on the import lock (3 of 80 hung before). Signals come once blit's entry has
    its handler in place, at random moments of the next 0.3 s; nothing lands half-done."""
    src = tmp_path / "src"
    for d in range(4):
        (src / f"d{d}").mkdir(parents=True)
        for f in range(200):
            (src / f"d{d}" / f"f{f}").write_bytes(b"x" * 100)
    rnd = random.Random(7)
    codes = []
    for trial in range(24):
        dst = tmp_path / f"dst{trial}"
        dst.mkdir()  # an existing destination: the prefetch runs during the imports
        proc = subprocess.Popen([BLIT, "copy", "--json", f"{src}/", str(dst)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=BLIT_ENV)
        deadline = time.monotonic() + 10
        while not _catches_sigterm(proc.pid) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.001)
        time.sleep(rnd.uniform(0, 0.3))
        proc.send_signal(signal.SIGINT if trial % 2 else signal.SIGTERM)
        try:
            out, err = proc.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            raise AssertionError(f"trial {trial}: still running 10 s after the signal") from None
        codes.append(proc.returncode)
        assert proc.returncode in (0, 130), (trial, proc.returncode, err.decode())
        assert b"Traceback" not in err, err.decode()
        last = json.loads(out.decode().splitlines()[-1])
        assert last["event"] == "summary" and last["exit_code"] == proc.returncode, out.decode()
        if proc.returncode == 130:
            # before the run: `blit: interrupted`; once it began, the run's own line
            assert err.decode().splitlines()[-1].startswith(("blit: interrupted", "blit: error: interrupted")), err.decode()
            assert not [p for p in dst.rglob("*") if p.is_file() and p.stat().st_size != 100], "a half-written file"
    assert codes.count(130) >= 6, codes


def test_relinking_a_name_that_already_is_that_link_leaves_no_temporary(tmp_path: Path) -> None:
    """A hard link made over a name that became the same link meanwhile (another run's, or the
    daemon still landing for a client that went): rename(2) of the temporary over it did
    nothing, so the temporary stayed in the group, run after run (QA: a push move rerun at once
    after an interrupted one left 1,010-6,000 `.blit-*.tmp` FIFOs linked into groups)."""
    from blit import fsops

    os.mkfifo(tmp_path / "f")
    os.link(tmp_path / "f", tmp_path / "g")
    dfd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fsops.make_hardlink(dfd, "g", dfd, "f", True)
    finally:
        os.close(dfd)
    assert sorted(os.listdir(tmp_path)) == ["f", "g"]
    assert os.stat(tmp_path / "f").st_nlink == 2


def test_a_fresh_link_or_fifo_temporary_is_left_to_the_run_renaming_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A scan meets another live run's temporary FIFO or symlink (made, not yet renamed into
    place; it cannot be locked as a file's can): it is left alone and named as held, where it
    was removed under the other run, whose rename then failed (QA: two pushes of hard-linked
    FIFOs at once, exit 3 with `No such file or directory`). One older than STALE_OTHER is a
    dead run's and goes."""
    from blit import fsops

    fifo, link = fsops.new_tmp_name(), fsops.new_tmp_name()
    os.mkfifo(tmp_path / fifo)
    os.symlink("x", tmp_path / link)
    (tmp_path / "real").write_text("r")
    dfd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        entries, _ = fsops.scan(dfd)
        held: list[str] = []
        assert list(fsops.without_tmp(dfd, entries, False, held)) == ["real"]
        assert sorted(held) == sorted([fifo, link])
        assert sorted(os.listdir(tmp_path)) == sorted([fifo, link, "real"])
        later = time.time() + fsops.STALE_OTHER + 1
        monkeypatch.setattr(fsops.time, "time", lambda: later)
        held.clear()
        assert list(fsops.without_tmp(dfd, entries, False, held)) == ["real"]
        assert held == [] and os.listdir(tmp_path) == ["real"]
    finally:
        os.close(dfd)


def test_a_local_rerun_removes_a_dead_move_s_fresh_temporaries(tmp_path: Path) -> None:
    """A local run (which has no end-of-run sweep) removes temporary FIFOs and symlinks at once,
    however young: after a killed local move its rerun left them for good, the source emptied
    and no later run looking at that directory again (QA)."""
    src, dst = tmp_path / "src", tmp_path / "dst"
    (src / "d").mkdir(parents=True)
    os.mkfifo(src / "d" / "p")
    os.link(src / "d" / "p", src / "d" / "q")
    (dst / "d").mkdir(parents=True)
    from blit import fsops

    os.mkfifo(dst / "d" / fsops.new_tmp_name())
    os.symlink("x", dst / "d" / fsops.new_tmp_name())
    run_blit("move", f"{src}/", f"{dst}/", check=0)
    assert sorted(os.listdir(dst / "d")) == ["p", "q"]
    assert os.stat(dst / "d" / "p").st_ino == os.stat(dst / "d" / "q").st_ino
