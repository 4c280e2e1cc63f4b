"""Time to first byte: notice the first complete regular file landing in a destination tree.

An inotify watcher (ctypes, Linux only) is armed on the destination's parent before the timed
command starts. It follows the destination as it appears, adds watches recursively as
directories are created, and scans each new directory once after watching it (so entries made
before the watch existed are not missed). A candidate is any non-directory named by
IN_CREATE (O_TMPFILE + linkat, mknod, hard links), IN_MOVED_TO (temporary name renamed into
place, as rsync and blit do) or IN_CLOSE_WRITE (written in place, as cp and tar do). It counts
as landed when it is a regular file whose size equals that of the same relative path in the
source; a temporary name has no counterpart in the source and never counts.

The recorded instant is when the watcher read the event (or found the file in a scan), an
upper bound on the real landing by well under a millisecond. After the first hit the inotify
descriptor is closed, so the watcher costs nothing for the rest of the run.

This module must not start or time processes; measure.py does that.
"""

from __future__ import annotations

import ctypes
import errno
import os
import select
import stat
import struct
import threading
import time

IN_CLOSE_WRITE = 0x00000008
IN_MOVED_TO = 0x00000080
IN_CREATE = 0x00000100
IN_Q_OVERFLOW = 0x00004000
IN_IGNORED = 0x00008000
IN_ONLYDIR = 0x01000000
IN_ISDIR = 0x40000000
IN_NONBLOCK = os.O_NONBLOCK
IN_CLOEXEC = os.O_CLOEXEC

_EVENT = struct.Struct("iIII")
_PARENT_MASK = IN_CREATE | IN_MOVED_TO | IN_ONLYDIR
_TREE_MASK = IN_CREATE | IN_MOVED_TO | IN_CLOSE_WRITE | IN_ONLYDIR

_libc: ctypes.CDLL | None = None


def _lib() -> ctypes.CDLL:
    global _libc
    if _libc is None:
        lib = ctypes.CDLL(None, use_errno=True)
        lib.inotify_init1.argtypes = [ctypes.c_int]
        lib.inotify_init1.restype = ctypes.c_int
        lib.inotify_add_watch.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32]
        lib.inotify_add_watch.restype = ctypes.c_int
        _libc = lib
    return _libc


def available() -> bool:
    """True when inotify can be used here."""
    try:
        lib = _lib()
    except OSError:
        return False
    fd = lib.inotify_init1(IN_NONBLOCK | IN_CLOEXEC)
    if fd < 0:
        return False
    os.close(fd)
    return True


class FirstFileWatcher:
    """Watches ``dst`` (which may not exist yet) for the first complete file from ``src``.

    Use: ``w = FirstFileWatcher(src, dst); w.arm()`` before starting the command, then
    ``w.finish()`` after it exits; ``w.landed_at`` is a ``time.perf_counter()`` instant or None.
    """

    def __init__(self, src: str | bytes, dst: str | bytes) -> None:
        self._src = os.fsencode(src).rstrip(b"/") or b"/"
        self._dst = os.fsencode(dst).rstrip(b"/") or b"/"
        self._parent, self._name = os.path.split(self._dst)
        self._fd = -1
        self._parent_wd = -1
        self._wds: dict[int, bytes] = {}  # watch descriptor -> dir path relative to dst
        self._stop_r, self._stop_w = -1, -1
        self._thread: threading.Thread | None = None
        self._done = threading.Event()
        self.landed_at: float | None = None
        self.landed_path: bytes | None = None
        self.overflowed = False
        self.error: str | None = None

    # -- setup and teardown -------------------------------------------------------------

    def arm(self) -> None:
        """Add the first watches and start the reader thread; call before the command starts."""
        lib = _lib()
        self._fd = lib.inotify_init1(IN_NONBLOCK | IN_CLOEXEC)
        if self._fd < 0:
            err = ctypes.get_errno()
            raise OSError(err, f"inotify_init1: {os.strerror(err)}")
        self._parent_wd = self._add_watch(self._parent, _PARENT_MASK)
        if os.path.isdir(self._dst):
            self._watch_existing(b"")
        self._stop_r, self._stop_w = os.pipe2(os.O_CLOEXEC)
        self._thread = threading.Thread(target=self._run, name="bench-ttfb", daemon=True)
        self._thread.start()

    def finish(self) -> None:
        """Drain pending events, stop the thread and release the descriptors."""
        if self._thread is not None:
            os.write(self._stop_w, b"x")
            self._thread.join(timeout=10)
            self._thread = None
        self._close()
        for fd in (self._stop_r, self._stop_w):
            if fd >= 0:
                os.close(fd)
        self._stop_r = self._stop_w = -1

    def _close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)  # drops every watch at once
            self._fd = -1

    # -- watches --------------------------------------------------------------------------

    def _add_watch(self, path: bytes, mask: int) -> int:
        wd: int = _lib().inotify_add_watch(self._fd, path, mask)
        if wd < 0:
            err = ctypes.get_errno()
            raise OSError(err, f"inotify_add_watch: {os.strerror(err)}", path)
        return wd

    def _abs(self, rel: bytes) -> bytes:
        return self._dst + b"/" + rel if rel else self._dst

    def _watch_existing(self, rel: bytes) -> None:
        """Watch a tree that exists before the run (mirror cases); its files are not candidates."""
        self._wds[self._add_watch(self._abs(rel), _TREE_MASK)] = rel
        with os.scandir(self._abs(rel)) as it:
            subdirs = [e.name for e in it if e.is_dir(follow_symlinks=False)]
        for name in subdirs:
            self._watch_existing(rel + b"/" + name if rel else name)

    def _add_tree(self, rel: bytes) -> None:
        """Watch dst/rel, then scan it: files already there are checked, subdirectories followed."""
        if self.landed_at is not None:
            return
        try:
            wd = self._add_watch(self._abs(rel), _TREE_MASK)
        except OSError as exc:
            if exc.errno in (errno.ENOENT, errno.ENOTDIR):
                return  # vanished or replaced: nothing to follow
            raise
        self._wds[wd] = rel
        try:
            with os.scandir(self._abs(rel)) as it:
                entries = [(e.name, e.is_dir(follow_symlinks=False)) for e in it]
        except (FileNotFoundError, NotADirectoryError):
            return
        for name, is_dir in entries:
            child = rel + b"/" + name if rel else name
            if is_dir:
                self._add_tree(child)
            else:
                self._check(child)
            if self.landed_at is not None:
                return

    def _check(self, rel: bytes) -> None:
        try:
            d = os.lstat(self._abs(rel))
            s = os.lstat(self._src + b"/" + rel)
        except OSError:
            return
        if stat.S_ISREG(d.st_mode) and stat.S_ISREG(s.st_mode) and d.st_size == s.st_size:
            self.landed_at = time.perf_counter()
            self.landed_path = rel

    # -- reader thread --------------------------------------------------------------------

    def _run(self) -> None:
        try:
            self._loop()
        except Exception as exc:  # reported next to the sample, never fatal to the run
            self.error = f"{type(exc).__name__}: {exc}"
        finally:
            self._close()

    def _loop(self) -> None:
        poller = select.poll()
        poller.register(self._fd, select.POLLIN)
        poller.register(self._stop_r, select.POLLIN)
        stopping = False
        while self.landed_at is None:
            ready = dict(poller.poll(None if not stopping else 0))
            if self._fd in ready:
                try:
                    buf = os.read(self._fd, 1 << 16)
                except BlockingIOError:
                    buf = b""
                if buf:
                    self._handle(buf)
                    continue
            if self._stop_r in ready or stopping:
                if stopping:
                    return
                stopping = True  # one more non-blocking pass to drain what is queued

    def _handle(self, buf: bytes) -> None:
        off = 0
        while off < len(buf) and self.landed_at is None:
            wd, mask, _cookie, length = _EVENT.unpack_from(buf, off)
            off += _EVENT.size
            name = buf[off : off + length].rstrip(b"\0")
            off += length
            if mask & IN_Q_OVERFLOW:
                self.overflowed = True
                if os.path.isdir(self._dst):
                    self._add_tree(b"")  # rescan everything (watches are idempotent)
                continue
            if mask & IN_IGNORED:
                self._wds.pop(wd, None)
                continue
            if wd == self._parent_wd:
                if name == self._name and mask & IN_ISDIR:
                    self._add_tree(b"")
                continue
            rel_dir = self._wds.get(wd)
            if rel_dir is None:
                continue
            rel = rel_dir + b"/" + name if rel_dir else name
            if mask & IN_ISDIR:
                if mask & (IN_CREATE | IN_MOVED_TO):
                    self._add_tree(rel)
            else:
                self._check(rel)
