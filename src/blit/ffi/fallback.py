"""The ffi interface built from the standard library only: used where cffi or libc is missing.

It must not import cffi, and it must not make a caller branch on the platform: every function
exists everywhere and either works, answers "unsupported" the documented way, or raises OSError.
``fcntl`` is imported only where it exists (not on Windows).

What each function becomes here:

* ``copy_file_range``: ``os.copy_file_range`` (Linux). Elsewhere a read/write of at most
  ``EMULATED_CHUNK`` bytes per call, which callers see as an ordinary short copy.
* ``reflink``: ``fcntl.ioctl(dst, FICLONE, src)`` on Linux; False elsewhere.
* ``syncfs``: ``os.sync()`` (every filesystem, slower than syncfs but as safe); ``os.fsync(fd)``
  where there is no ``os.sync`` (Windows).
* ``link_fd``: ``os.link("/proc/self/fd/N", ...)`` on Linux (the stdlib cannot pass
  AT_EMPTY_PATH); EOPNOTSUPP elsewhere, where O_TMPFILE does not exist either.
"""

from __future__ import annotations

import errno
import os
import sys

from blit.ffi._errnos import error, reflink_failed

BACKEND = "fallback"

_IS_LINUX = sys.platform == "linux"  # "linux2" ended with Python 3.3

#: True when copy_file_range is the kernel's in-place copy rather than a read/write emulation.
HAVE_COPY_FILE_RANGE = hasattr(os, "copy_file_range")
#: True when reflink() can ever answer True here (the FICLONE ioctl exists).
HAVE_REFLINK = _IS_LINUX

#: Largest copy one emulated copy_file_range call makes; callers loop, as with the syscall.
EMULATED_CHUNK = 8 << 20

FICLONE = 0x40049409  # _IOW(0x94, 9, int); Python 3.11 has no fcntl.FICLONE


def _pread(fd: int, count: int, offset: int | None) -> bytes:
    if offset is None:
        return os.read(fd, count)
    if sys.platform != "win32" and hasattr(os, "pread"):
        return os.pread(fd, count, offset)
    # Windows: no pread in 3.11. Move the position and put it back, as copy_file_range promises
    # that an explicit offset leaves the file position alone. Not safe against other threads
    # using the same descriptor at the same time.
    saved = os.lseek(fd, 0, os.SEEK_CUR)
    try:
        os.lseek(fd, offset, os.SEEK_SET)
        return os.read(fd, count)
    finally:
        os.lseek(fd, saved, os.SEEK_SET)


def _pwrite_all(fd: int, data: bytes, offset: int | None) -> None:
    view = memoryview(data)
    if offset is None:
        while view:
            view = view[os.write(fd, view) :]
        return
    if sys.platform != "win32" and hasattr(os, "pwrite"):
        while view:
            done = os.pwrite(fd, view, offset)
            view = view[done:]
            offset += done
        return
    saved = os.lseek(fd, 0, os.SEEK_CUR)
    try:
        os.lseek(fd, offset, os.SEEK_SET)
        while view:
            view = view[os.write(fd, view) :]
    finally:
        os.lseek(fd, saved, os.SEEK_SET)


def copy_file_range(
    src_fd: int,
    dst_fd: int,
    count: int,
    src_off: int | None = None,
    dst_off: int | None = None,
) -> int:
    """Copy up to ``count`` bytes from ``src_fd`` to ``dst_fd``; see ``blit.ffi.copy_file_range``.

    Returns:
        The number of bytes copied, 0 at end of file.

    Raises:
        ValueError: ``count`` is negative.
        OSError: the copy failed; ``COPY_FALLBACK_ERRNOS`` lists the errnos after which a plain
            read/write loop may still work.
    """
    if count < 0:
        raise ValueError("negative count")
    if sys.platform == "linux" and HAVE_COPY_FILE_RANGE:
        return os.copy_file_range(src_fd, dst_fd, count, src_off, dst_off)
    if count == 0:
        return 0
    data = _pread(src_fd, min(count, EMULATED_CHUNK), src_off)
    # Write all of it: the source position (or the caller's offset arithmetic) already moved by
    # len(data), so a short write here would lose bytes.
    _pwrite_all(dst_fd, data, dst_off)
    return len(data)


def reflink(src_fd: int, dst_fd: int) -> bool:
    """Make ``dst_fd`` share ``src_fd``'s extents (FICLONE); see ``blit.ffi.reflink``."""
    if sys.platform != "linux" or not HAVE_REFLINK:
        return False
    import fcntl

    while True:
        try:
            fcntl.ioctl(dst_fd, FICLONE, src_fd)
        except InterruptedError:
            continue
        except OSError as exc:
            if exc.errno is None:
                raise
            return reflink_failed(exc.errno, src_fd, dst_fd)
        return True


def syncfs(fd: int) -> None:
    """Flush the filesystem that holds ``fd`` (here: all of them); see ``blit.ffi.syncfs``."""
    if hasattr(os, "sync"):
        os.fstat(fd)  # the real syncfs fails with EBADF on a bad descriptor; so must this
        os.sync()
    else:
        os.fsync(fd)


def link_fd(fd: int, dst_dir_fd: int, name: str | bytes) -> None:
    """Name the O_TMPFILE file ``fd`` as ``name`` in ``dst_dir_fd``; see ``blit.ffi.link_fd``."""
    if not _IS_LINUX:
        raise error(errno.EOPNOTSUPP, name)
    link_fd_via_proc(fd, dst_dir_fd, name)


def link_fd_via_proc(fd: int, dst_dir_fd: int, name: str | bytes) -> None:
    """The unprivileged O_TMPFILE link from open(2): linkat(AT_FDCWD, "/proc/self/fd/N", ...).

    Needs /proc mounted. Raises FileExistsError if ``name`` exists, and ENOENT if the file was
    opened with ``O_TMPFILE | O_EXCL`` (never linkable).
    """
    src: str | bytes = f"/proc/self/fd/{fd}"
    if isinstance(name, bytes):
        src = os.fsencode(src)
    os.link(src, name, dst_dir_fd=dst_dir_fd, follow_symlinks=True)
