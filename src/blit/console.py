"""Standard output and standard error written by threads of their own, so the Trio thread
never waits for whoever reads them.

`blit copy -v ... | pager` whose pager stops reading, a terminal stopped with Ctrl-S, a
daemon's log piped into a program that hangs: a write to a full pipe blocks, and a write made
on the Trio thread stopped the whole run there: Ctrl-C and SIGTERM were not acted on until the
reader went on, and a push stopped sending its keepalive. `install()` replaces sys.stdout and
sys.stderr with `Stream`s that queue their text for a writer thread per file (one for both
when they are the same file, `2>&1`, so their lines keep their order; stderr never waits
behind a stdout nobody reads). Past CAP bytes queued a remote run waits for room between
pages of actions (`behind`), and the daemon drops and counts; past BLOCK_AT a write itself
waits (the run follows a reader that is slower than the run, as rsync's does), but never after
`interrupted()`: at a signal the backlog is dropped and what the run writes after it (its last
lines) goes out first.

Errors are the writer's: a reader that closed its end (EPIPE) makes stdout's next `write`
raise BrokenPipeError, as the real stream's would have (cli._out ends the run on it); a
terminal that hung up (EIO) or any other error points the fd at /dev/null and the text is
lost, not the run.

This module must not import trio or the engine: it is pure threading and os.write.
"""

from __future__ import annotations

import atexit
import errno
import os
import select
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

CAP = 16 << 20
"""Bytes queued for one file beyond which a remote run's next page of actions waits for the
reader (`behind`, Progress.room), and the daemon's log drops lines (about 200,000 `-v`
lines)."""

BLOCK_AT = 2 * CAP
"""Bytes queued beyond which a write itself waits for the reader (a local run): above CAP by
more than a page of actions (protocol.ACTION_PAGE_BYTES of paths, as JSON lines), so that a
remote run that waited for room never blocks its Trio thread within a page."""

AFTER_INTERRUPT = 0.5
"""Seconds the exit after a signal still gives a reader to take the last lines."""

_WAIT = 0.05
"""Seconds between checks for a signal while a write or flush waits for the reader."""

_PIECE = select.PIPE_BUF
"""Largest single write: a pipe takes up to PIPE_BUF bytes whole or not at all, so a reader
that stops never leaves a line cut in two (pieces end at a line's end where they can)."""


class _Writer:
    """The queue of one file (stdout and stderr share one when they are the same file: `2>&1`)
    and its thread.

    A signal (`interrupted`) drops the backlog queued until then, once: what the run writes
    after it (its last error lines, the --json summary, the progress bar's removal and the
    cursor shown again) goes out next, not after megabytes of `-v` lines the terminal has not
    shown yet. With `drop`, a write beyond CAP is dropped and counted instead of waiting (the
    daemon's log: a log nobody reads must not stop the daemon); a line saying how many went
    follows once the reader catches up."""

    def __init__(self, fd: int, *, drop: bool) -> None:
        self.fd = fd
        self._drop = drop
        self._dropped = 0
        self._cond = threading.Condition(threading.Lock())
        self._items: deque[bytes] = deque()
        self._queued = 0  # bytes in _items and in the write under way
        self._sleeping = False
        self._purged = False
        self.broken = False  # the reader closed its end
        self.accepted = 0  # bytes ever queued (put), and of them written whole to the fd
        self.written = 0
        self.interrupted = False  # set from a signal handler: no lock, read by the waits
        self._thread = threading.Thread(target=self._run, name=f"blit-console-{fd}", daemon=True)
        self._thread.start()

    def put(self, data: bytes) -> None:
        with self._cond:
            self._purge_once()
            while self._queued > (CAP if self._drop else BLOCK_AT) and not self.interrupted:
                if self._drop:
                    self._dropped += 1
                    return
                self._cond.wait(_WAIT)
            self._purge_once()
            self._items.append(data)
            self._queued += len(data)
            self.accepted += len(data)
            if self._sleeping:
                self._cond.notify()

    def behind(self) -> bool:
        return self._queued > CAP and not self.interrupted

    def _purge_once(self) -> None:
        """After a signal, once: drop the backlog (the lock held)."""
        if self.interrupted and not self._purged:
            self._purged = True
            self._drop_queued()

    def _drop_queued(self) -> None:
        """Drop what waits in the queue (the lock held)."""
        self._queued -= sum(len(d) for d in self._items)
        self._items.clear()

    def drain(self) -> None:
        """Return once everything queued is written (after a signal, Ctrl-C during the wait
        included: at most AFTER_INTERRUPT seconds from then, the rest is dropped)."""
        deadline: float | None = None
        with self._cond:
            while self._queued:
                if self.interrupted:
                    self._purge_once()
                    now = time.monotonic()
                    if deadline is None:
                        deadline = now + AFTER_INTERRUPT
                    elif now >= deadline:  # dropped; a write under way may still finish
                        self._drop_queued()
                        return
                try:
                    self._cond.wait(_WAIT)
                except KeyboardInterrupt:  # after the run (Python's handler): stop waiting
                    self.interrupted = True

    def _run(self) -> None:
        cond = self._cond
        while True:
            with cond:
                self._purge_once()
                while not self._items:
                    if self._dropped and self._queued < CAP // 2:
                        note = f"blit: {self._dropped} lines of output were dropped: nobody read them\n".encode()
                        self._dropped = 0
                        self._items.append(note)
                        self._queued += len(note)
                        break
                    self._sleeping = True
                    cond.notify_all()  # a drain waiting for the end
                    cond.wait()
                    self._sleeping = False
                    self._purge_once()
                batch = b"".join(self._items)  # everything queued: one piece after another
                self._items.clear()
                purged = self._purged
            self._write(batch, purged)
            with cond:
                self._queued -= len(batch)
                cond.notify_all()

    def _write(self, data: bytes, purged: bool) -> None:
        """Write `data` in pieces; stop early (the rest dropped) at a signal that came after
        the batch was taken, or at an error."""
        if self.broken:
            return
        view = memoryview(data)
        done = 0
        while done < len(data):
            if self.interrupted and not purged and (done == 0 or data[done - 1] == 0x0A):
                return  # the backlog of before the signal: dropped (at a line's end)
            end = min(len(data), done + _PIECE)
            if end < len(data):
                cut = data.rfind(b"\n", done, end)
                if cut >= done:
                    end = cut + 1
            try:
                n = os.write(self.fd, view[done:end])
            except InterruptedError:
                continue
            except OSError as exc:
                if exc.errno == errno.EPIPE:
                    self.broken = True
                to_null(self.fd)
                return
            done += n
            self.written += n


def to_null(fd: int) -> None:
    """Point `fd` at /dev/null, so that no later write to it (ours, the interpreter's at exit,
    a library's) fails again."""
    null = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(null, fd)
    finally:
        os.close(null)


_writers: list[_Writer] = []


class Stream:
    """A text stream (what sys.stdout and sys.stderr are during a run) whose writes go to the
    writer thread. Attributes it does not have come from the stream it stands for (isatty,
    fileno, encoding: rich and logging ask)."""

    def __init__(self, stream: Any, writer: _Writer, *, tell_broken: bool) -> None:
        self._stream = stream
        self._tell_broken = tell_broken
        self._encoding = getattr(stream, "encoding", None) or "utf-8"
        self._errors = getattr(stream, "errors", None) or "strict"
        self._writer = writer

    def write(self, text: str | bytes) -> int:
        """Queue `text` (bytes too: click's echo hands some). Raises BrokenPipeError once the
        reader has closed its end, if the stream tells (stdout; what goes to a closed stderr
        is dropped)."""
        if self._tell_broken and self._writer.broken:
            raise BrokenPipeError(errno.EPIPE, "Broken pipe")
        if text:
            data = text.encode(self._encoding, self._errors) if isinstance(text, str) else bytes(text)
            self._writer.put(data)
        return len(text)

    @property
    def buffer(self) -> Stream:
        """The binary side is the same queue (a write to sys.stdout.buffer keeps its place)."""
        return self

    def flush(self) -> None:
        """Nothing to do: what was written is queued and goes out in order. (A flush that
        waited for the reader would block the Trio thread: rich and logging flush after every
        line.) `drain()` waits, at exit."""

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


def install(*, drop: bool = False) -> None:
    """sys.stdout and sys.stderr become `Stream`s (idempotent), each with a writer thread of
    its own, or one shared when both are the same file (the order of their lines kept). What
    the real streams hold already is written first. `drop`: beyond CAP, lines are dropped and
    counted, never waited for (the daemon). Streams without a file descriptor (a test's
    in-memory capture) are left as they are."""
    if isinstance(sys.stdout, Stream) and isinstance(sys.stderr, Stream):
        return
    try:
        out_fd, err_fd = sys.stdout.fileno(), sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):  # io.UnsupportedOperation is both of the last two
        return
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except OSError:
            to_null(stream.fileno())
    if not _writers:
        atexit.register(drain)
    out = _Writer(out_fd, drop=drop)
    err = out if _same_file(out_fd, err_fd) else _Writer(err_fd, drop=drop)
    _writers[:] = [out] if err is out else [out, err]
    sys.stdout = Stream(sys.stdout, out, tell_broken=True)
    sys.stderr = Stream(sys.stderr, err, tell_broken=False)


def _same_file(a: int, b: int) -> bool:
    try:
        sa, sb = os.fstat(a), os.fstat(b)
    except OSError:
        return False
    return (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino)


def behind() -> bool:
    """Whether a reader is more than CAP behind (a write would wait): for a run that can wait
    elsewhere (cli's Progress.room)."""
    return any(w.behind() for w in _writers)


def drain() -> None:
    """Wait until the readers have taken what the streams queued (bounded after a signal); at
    exit (registered with atexit, and called before os._exit)."""
    for w in list(_writers):
        w.drain()


def stdout_mark() -> int | None:
    """How many bytes stdout has accepted so far (None when it is not a `Stream`): a mark for
    `stdout_lost`."""
    out = sys.stdout
    return out._writer.accepted if isinstance(out, Stream) else None


def stdout_lost(mark: int) -> bool:
    """Whether any of stdout's first `mark` bytes never reached its reader, who closed its end
    (EPIPE): waits until the queue is written or given up (as `drain`)."""
    out = sys.stdout
    if not isinstance(out, Stream):
        return False
    w = out._writer
    w.drain()
    return w.broken and w.written < mark


def was_interrupted() -> bool:
    """Whether a signal asked the run to stop (its `-v` lines and progress events end there)."""
    return any(w.interrupted for w in _writers)


def interrupted() -> None:
    """A signal asked the run to stop: the backlog queued until now is dropped, and no write or
    flush waits for a reader any more (beyond AFTER_INTERRUPT at exit). Safe in a signal
    handler (attribute stores)."""
    for w in _writers:
        w.interrupted = True


def on_signals(signals: tuple[int, ...]) -> None:
    """The handlers now installed for `signals` (trio.open_signal_receiver's, which puts back
    what was there before when it ends) first call `interrupted()`: a write waiting for a
    reader that stopped reading gives up, and the Trio thread gets to act on the signal."""
    import signal

    for signum in signals:
        current = signal.getsignal(signum)
        if callable(current):

            def handler(sig: int, frame: Any, then: Callable[[int, Any], Any] = current) -> None:
                interrupted()
                then(sig, frame)

            signal.signal(signum, handler)
