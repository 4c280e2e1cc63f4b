"""blit.console, the writer threads behind stdout and stderr during a run: a reader that stops
reading never makes a write wait (up to the cap), a signal drops the backlog and lets the
run's last lines out first, a pipe never gets a line cut in two, and the daemon's log drops
(and counts) what nobody reads instead of waiting. Real pipes; the run-level behaviour is in
test_local_interrupt.py and the stall tests."""

from __future__ import annotations

import fcntl
import os
import threading
import time
from collections.abc import Iterator

import pytest

from blit import console


@pytest.fixture
def pipe() -> Iterator[tuple[int, int, list[console._Writer]]]:
    """(read end, write end, writers made on it): the read end closes first (a writer blocked
    on the pipe gets EPIPE and points the write end at /dev/null), the write end once the
    writers are idle, so no fd number they hold is reused under them."""
    r, w = os.pipe()
    fcntl.fcntl(r, fcntl.F_SETFL, fcntl.fcntl(r, fcntl.F_GETFL) | os.O_NONBLOCK)
    writers: list[console._Writer] = []
    yield r, w, writers
    os.close(r)
    for writer in writers:
        writer.interrupted = True
        writer.drain()
    time.sleep(0.1)
    os.close(w)


def _read_all(r: int, settle: float = 0.3) -> bytes:
    """What the pipe holds and what comes within `settle` s of quiet."""
    out = bytearray()
    quiet = time.monotonic() + settle
    while time.monotonic() < quiet:
        try:
            chunk = os.read(r, 1 << 16)
        except BlockingIOError:
            time.sleep(0.01)
            continue
        if not chunk:
            break
        out += chunk
        quiet = time.monotonic() + settle
    return bytes(out)


def _line(i: int) -> bytes:
    return b"copy some/long/path/of/a/file/number/%08d\n" % i


def test_a_signal_drops_the_backlog_and_the_last_lines_get_out_whole(pipe: tuple[int, int, list[console._Writer]], monkeypatch: pytest.MonkeyPatch) -> None:
    """Nobody reads; 2 MiB of lines queue behind a full pipe without a write waiting. A signal
    comes; the run's last line is written after it. The reader that comes back gets whole
    lines only (the pipe takes pieces of at most PIPE_BUF, ending at a line's end), then the
    last line; the backlog is gone."""
    r, w, writers = pipe
    writer = console._Writer(w, drop=False)
    writers.append(writer)
    t0 = time.monotonic()
    n = 2_000_000 // len(_line(0))
    for i in range(n):
        writer.put(_line(i))
    assert time.monotonic() - t0 < 5, "a write waited for the reader"
    writer.interrupted = True
    writer.put(b"blit: error: interrupted\n")
    got = _read_all(r)
    lines = got.split(b"\n")
    assert lines[-1] == b"" and lines[-2] == b"blit: error: interrupted", got[-200:]
    body = lines[:-2]
    assert body and all(line == _line(i)[:-1] for i, line in enumerate(body)), "a line was cut or reordered"
    assert len(body) < n // 4, f"{len(body)} of {n} backlog lines were still written after the signal"


def test_the_daemons_log_drops_and_counts_what_nobody_reads(pipe: tuple[int, int, list[console._Writer]], monkeypatch: pytest.MonkeyPatch) -> None:
    """drop=True (the daemon): past the cap a write returns at once, the line dropped; once the
    reader catches up, a line says how many went."""
    r, w, writers = pipe
    monkeypatch.setattr(console, "CAP", 256 << 10)
    writer = console._Writer(w, drop=True)
    writers.append(writer)
    n = 20_000  # about 1 MiB: far past the pipe and the cap
    done = threading.Event()

    def flood() -> None:
        for i in range(n):
            writer.put(_line(i))
        done.set()

    threading.Thread(target=flood, daemon=True).start()
    assert done.wait(5), "a log write waited for its reader"
    got = _read_all(r)
    lines = got.decode().splitlines()
    assert lines[-1].startswith("blit: ") and lines[-1].endswith(" lines of output were dropped: nobody read them"), lines[-3:]
    dropped = int(lines[-1].split()[1])
    assert len(lines) - 1 + dropped == n
    assert dropped > 0


def test_a_writer_past_the_cap_waits_until_a_signal(pipe: tuple[int, int, list[console._Writer]], monkeypatch: pytest.MonkeyPatch) -> None:
    """drop=False (a run): past CAP the writer is `behind` (a remote run's next page of actions
    waits, Progress.room) but a write does not wait yet: a page under way must never block the
    Trio thread (a push lost its session so, QA); past BLOCK_AT a write waits for the reader,
    as rsync does, and a signal ends the wait at once."""
    r, w, writers = pipe
    monkeypatch.setattr(console, "CAP", 128 << 10)
    monkeypatch.setattr(console, "BLOCK_AT", 512 << 10)
    writer = console._Writer(w, drop=False)
    writers.append(writer)
    t0 = time.monotonic()
    for i in range((300 << 10) // len(_line(0))):  # 300 KiB: past CAP and the pipe, below BLOCK_AT
        writer.put(_line(i))
    assert time.monotonic() - t0 < 1 and writer.behind(), "between CAP and BLOCK_AT"
    done = threading.Event()

    def flood() -> None:
        for i in range(20_000):
            writer.put(_line(i))
        done.set()

    threading.Thread(target=flood, daemon=True).start()
    assert not done.wait(1), "writes past BLOCK_AT did not wait for the reader"
    writer.interrupted = True
    assert done.wait(1), "a signal did not end the wait"


def test_a_signal_never_cuts_a_line_longer_than_a_pipe_write(pipe: tuple[int, int, list[console._Writer]]) -> None:
    """--json lines can be longer than PIPE_BUF (a path of control characters, a summary with
    many failures): written in pieces, a line the pipe cut off mid-way is finished after a
    signal before the backlog is dropped (it was left cut, the next line glued to it, QA)."""
    r, w, writers = pipe
    writer = console._Writer(w, drop=False)
    writers.append(writer)
    long_lines = [(b"%05d" % i) + b"x" * 9_995 + b"\n" for i in range(40)]
    for line in long_lines:
        writer.put(line)
    time.sleep(0.3)  # the pipe (64 KiB) is full in the middle of the 7th line
    writer.interrupted = True
    writer.put(b"the end\n")
    got = _read_all(r)
    lines = got.split(b"\n")
    assert lines[-2:] == [b"the end", b""], got[-100:]
    assert all(line + b"\n" in long_lines for line in lines[:-2]), [len(line) for line in lines[:-2]]
