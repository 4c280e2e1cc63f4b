"""Standard output and standard error written by one thread, so the Trio thread never waits
for whoever reads them.

`blit copy -v ... | pager` whose pager stops reading, a terminal stopped with Ctrl-S, a
daemon's log piped into a program that hangs: a write to a full pipe blocks, and a write made
on the Trio thread stopped the whole run there: Ctrl-C and SIGTERM were not acted on until the
reader went on, and a push stopped sending its keepalive. `install()` replaces sys.stdout and
sys.stderr with `Stream`s that queue their text for one writer thread; lines keep their order
across both streams (`2>&1` into one pipe reads as before). The queue holds up to CAP bytes;
beyond that a write waits for room (the run follows a reader that is slower than the run, as
rsync's does), but never after `interrupted()`: a run told to stop by a signal stops, what the
reader has not taken is dropped.

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
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

CAP = 16 << 20
"""Bytes queued before a write waits for the reader (about 200,000 `-v` lines)."""

AFTER_INTERRUPT = 0.5
"""Seconds a flush after a signal still gives the reader to take what is queued."""

_WAIT = 0.05
"""Seconds between checks for a signal while a write or flush waits for the reader."""


class _Writer:
    """The queue and its thread (one per process, started by the first `Stream`)."""

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._items: deque[tuple[int, bytes]] = deque()
        self._queued = 0  # bytes in _items and in the write under way
        self._sleeping = False
        self.broken: set[int] = set()  # fds whose reader closed its end
        self.interrupted = False  # set from a signal handler: no lock, read by the waits
        self._thread = threading.Thread(target=self._run, name="blit-console", daemon=True)
        self._thread.start()

    def put(self, fd: int, data: bytes) -> None:
        with self._cond:
            while self._queued > CAP and not self.interrupted:
                self._cond.wait(_WAIT)
            self._items.append((fd, data))
            self._queued += len(data)
            if self._sleeping:
                self._cond.notify()

    def drain(self) -> None:
        """Return once everything queued is written (after a signal, Ctrl-C during the wait
        included: at most AFTER_INTERRUPT seconds from then, the rest is dropped)."""
        deadline: float | None = None
        with self._cond:
            while self._queued:
                if self.interrupted:
                    now = time.monotonic()
                    if deadline is None:
                        deadline = now + AFTER_INTERRUPT
                    elif now >= deadline:  # dropped; a write under way may still finish
                        self._queued -= sum(len(d) for _, d in self._items)
                        self._items.clear()
                        return
                try:
                    self._cond.wait(_WAIT)
                except KeyboardInterrupt:  # after the run (Python's handler): stop waiting
                    self.interrupted = True

    def _run(self) -> None:
        cond = self._cond
        while True:
            with cond:
                while not self._items:
                    self._sleeping = True
                    cond.notify_all()  # a drain waiting for the end
                    cond.wait()
                    self._sleeping = False
                batch = list(self._items)  # everything queued: one write per run of one fd
                self._items.clear()
            size = 0
            start = 0
            for i in range(1, len(batch) + 1):
                if i == len(batch) or batch[i][0] != batch[start][0]:
                    data = b"".join(d for _, d in batch[start:i])
                    self._write(batch[start][0], data)
                    size += len(data)
                    start = i
            with cond:
                self._queued -= size
                cond.notify_all()

    def _write(self, fd: int, data: bytes) -> None:
        if fd in self.broken:
            return
        view = memoryview(data)
        while view:
            try:
                n = os.write(fd, view)
            except InterruptedError:
                continue
            except OSError as exc:
                if exc.errno == errno.EPIPE:
                    self.broken.add(fd)
                _to_null(fd)
                return
            view = view[n:]


def _to_null(fd: int) -> None:
    """Point `fd` at /dev/null, so that no later write to it (ours, the interpreter's at exit,
    a library's) fails again."""
    null = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(null, fd)
    finally:
        os.close(null)


_writer: _Writer | None = None


class Stream:
    """A text stream (what sys.stdout and sys.stderr are during a run) whose writes go to the
    writer thread. Attributes it does not have come from the stream it stands for (isatty,
    fileno, encoding: rich and logging ask)."""

    def __init__(self, stream: Any, writer: _Writer, *, tell_broken: bool) -> None:
        self._stream = stream
        self._tell_broken = tell_broken
        self._fd = stream.fileno()
        self._encoding = getattr(stream, "encoding", None) or "utf-8"
        self._errors = getattr(stream, "errors", None) or "strict"
        self._writer = writer

    def write(self, text: str | bytes) -> int:
        """Queue `text` (bytes too: click's echo hands some). Raises BrokenPipeError once the
        reader has closed its end, if the stream tells (stdout; what goes to a closed stderr
        is dropped)."""
        if self._tell_broken and self._fd in self._writer.broken:
            raise BrokenPipeError(errno.EPIPE, "Broken pipe")
        if text:
            data = text.encode(self._encoding, self._errors) if isinstance(text, str) else bytes(text)
            self._writer.put(self._fd, data)
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


def install() -> None:
    """sys.stdout and sys.stderr become `Stream`s (idempotent). What the real streams hold
    already is written first. Streams without a file descriptor (a test's in-memory capture)
    are left as they are."""
    global _writer
    if isinstance(sys.stdout, Stream) and isinstance(sys.stderr, Stream):
        return
    try:
        sys.stdout.fileno(), sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):  # io.UnsupportedOperation is both of the last two
        return
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except OSError:
            _to_null(stream.fileno())
    if _writer is None:
        _writer = _Writer()
        atexit.register(drain)
    if not isinstance(sys.stdout, Stream):
        sys.stdout = Stream(sys.stdout, _writer, tell_broken=True)
    if not isinstance(sys.stderr, Stream):
        sys.stderr = Stream(sys.stderr, _writer, tell_broken=False)


def drain() -> None:
    """Wait until the reader has taken what the streams queued (bounded after a signal); at
    exit (registered with atexit, and called before os._exit)."""
    if _writer is not None:
        _writer.drain()


def interrupted() -> None:
    """A signal asked the run to stop: no write or flush waits for the reader any more (beyond
    AFTER_INTERRUPT). Safe in a signal handler (one attribute store)."""
    if _writer is not None:
        _writer.interrupted = True


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
