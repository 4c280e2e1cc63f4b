"""Linux system calls through cffi ABI mode: copy_file_range, FICLONE, syncfs, linkat.

It must not parse C at import time or need a compiler: the declarations come pre-parsed from the
generated ``_linux_cffi.py`` (regenerate it with ``_build_linux.py``), and the library is glibc or
musl itself via ``ffi.dlopen(None)``. It must not import ``typing`` at run time (8 ms): the
``Protocol`` that types the library exists only for type checkers. It must not retry, log or
fall back on its own except where documented: EINTR is retried (PEP 475, as ``os`` does), a
libc without one of the symbols gets the stdlib version of that one function, and ``link_fd``
picks its method once per process.

Every C failure becomes ``OSError(ffi.errno, os.strerror(ffi.errno))``; cffi saves errno right
after the call, per thread, and releases the GIL during it, so these calls suit worker threads.

``copy_file_range`` is the exception that goes through ``os.copy_file_range``: the stdlib
wrapper makes the same system call ~1.1 us cheaper (measured; see its docstring). The binding,
``copy_file_range_cffi``, is kept, tested, and used where CPython lacks the stdlib one.
"""

from __future__ import annotations

import errno
import os

from blit.ffi import _errnos, fallback
from blit.ffi._linux_cffi import ffi

TYPE_CHECKING = False  # not typing.TYPE_CHECKING: importing typing costs ~8 ms
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Protocol

    from cffi import FFI

    class _LibC(Protocol):
        """The libc functions declared in ``_build_linux.CDEF``, one stub each (trio's pattern)."""

        def copy_file_range(
            self,
            fd_in: int,
            off_in: FFI.CData,
            fd_out: int,
            off_out: FFI.CData,
            len: int,
            flags: int,
            /,
        ) -> int: ...

        def ioctl(self, fd: int, request: int, arg: FFI.CData, /) -> int: ...

        def syncfs(self, fd: int, /) -> int: ...

        def linkat(
            self, olddirfd: int, oldpath: bytes, newdirfd: int, newpath: bytes, flags: int, /
        ) -> int: ...

    _libc: _LibC
else:
    _libc = ffi.dlopen(None)

BACKEND = "linux-cffi"

FICLONE = 0x40049409  # _IOW(0x94, 9, int)
AT_EMPTY_PATH = 0x1000

_NULL = ffi.NULL


def _has(name: str) -> bool:
    # A declared function missing from this libc (glibc < 2.27 lacks copy_file_range) only
    # fails when first looked up.
    try:
        getattr(_libc, name)
    except AttributeError:
        return False
    return True


_HAVE_CFFI_COPY_FILE_RANGE = _has("copy_file_range")
#: True: copy_file_range is the kernel's in-place copy (False only with a libc that lacks it).
HAVE_COPY_FILE_RANGE = hasattr(os, "copy_file_range") or _HAVE_CFFI_COPY_FILE_RANGE
#: True: reflink() can answer True on a filesystem that supports FICLONE (XFS, btrfs, bcachefs...).
HAVE_REFLINK = _has("ioctl")
_HAVE_SYNCFS = _has("syncfs")
_HAVE_LINKAT = _has("linkat")


def copy_file_range(
    src_fd: int,
    dst_fd: int,
    count: int,
    src_off: int | None = None,
    dst_off: int | None = None,
) -> int:
    """Copy up to ``count`` bytes from ``src_fd`` to ``dst_fd`` inside the kernel.

    This one goes through ``os.copy_file_range``: the same system call with the same errors,
    measured at 0.4 us per call against 1.5 us for the cffi binding (libffi's call and two
    ``loff_t`` allocations), which is 40% of a 4 KiB copy on tmpfs. ``copy_file_range_cffi`` is
    the binding; it stands in when CPython was built without ``os.copy_file_range``.

    Args:
        src_fd: open for reading.
        dst_fd: open for writing, not ``O_APPEND``.
        count: most bytes to copy; the kernel may copy fewer, so loop.
        src_off: read from here and leave the file position alone; None reads from (and
            advances) the file position.
        dst_off: the same for the destination.

    Returns:
        Bytes copied; 0 at end of file. 0 before the expected size can also mean a procfs or
        sysfs file the kernel cannot copy this way: fall back to read/write then.

    Raises:
        ValueError: ``count`` is negative.
        OverflowError: an offset does not fit in 64 bits.
        OSError: with the kernel's errno. ``blit.ffi.COPY_FALLBACK_ERRNOS`` lists those after
            which read/write may still work (EXDEV across filesystems is the common one).
    """
    if _os_copy_file_range is not None:
        return _os_copy_file_range(src_fd, dst_fd, count, src_off, dst_off)
    return copy_file_range_cffi(src_fd, dst_fd, count, src_off, dst_off)


# None when CPython was built against a libc without it.
_os_copy_file_range: Callable[[int, int, int, int | None, int | None], int] | None = getattr(
    os, "copy_file_range", None
)


def copy_file_range_cffi(
    src_fd: int,
    dst_fd: int,
    count: int,
    src_off: int | None = None,
    dst_off: int | None = None,
) -> int:
    """The cffi binding of copy_file_range(2): same contract as ``copy_file_range``.

    A libc without the symbol (glibc < 2.27) gets the stdlib read/write emulation instead.
    """
    if count < 0:
        raise ValueError("negative count")
    if not _HAVE_CFFI_COPY_FILE_RANGE:
        return fallback.copy_file_range(src_fd, dst_fd, count, src_off, dst_off)
    off_in = _NULL if src_off is None else ffi.new("loff_t *", src_off)
    off_out = _NULL if dst_off is None else ffi.new("loff_t *", dst_off)
    while True:
        done = _libc.copy_file_range(src_fd, off_in, dst_fd, off_out, count, 0)
        if done >= 0:
            return done
        err = ffi.errno
        if err != errno.EINTR:
            raise _errnos.error(err)


def reflink(src_fd: int, dst_fd: int) -> bool:
    """Make ``dst_fd`` share all of ``src_fd``'s data blocks (``ioctl(dst, FICLONE, src)``).

    On success dst has src's size and content and no data was copied; neither file position
    moves. Both must be regular files on the same filesystem.

    Returns:
        True if cloned. False if this filesystem or this pair cannot be cloned and a byte copy
        may still work (ext4, tmpfs, different filesystems, ...): ``_errnos`` lists the errnos.

    Raises:
        OSError: a descriptor is unusable (EBADF), src is a directory (EISDIR), or the clone
            failed for a reason a byte copy would hit too (EIO, ENOSPC, EROFS, ...).
    """
    if not HAVE_REFLINK:
        return False
    src = ffi.cast("int", src_fd)  # ioctl is variadic: the argument needs an explicit C type
    while True:
        if _libc.ioctl(dst_fd, FICLONE, src) == 0:
            return True
        err = ffi.errno
        if err != errno.EINTR:
            return _errnos.reflink_failed(err, src_fd, dst_fd)


def syncfs(fd: int) -> None:
    """Write back everything dirty on the filesystem that holds ``fd`` and wait for it.

    Raises:
        OSError: EBADF for a bad descriptor; since Linux 5.8 also a writeback error (EIO,
            ENOSPC, EDQUOT) seen on that filesystem since ``fd`` was opened.
    """
    if not _HAVE_SYNCFS:
        fallback.syncfs(fd)
        return
    if _libc.syncfs(fd) != 0:
        raise _errnos.error(ffi.errno)


# How link_fd names a file, decided by the first call that succeeds: "empty_path" (linkat with
# AT_EMPTY_PATH: root, CAP_DAC_READ_SEARCH, or since Linux 6.10 the process that opened the
# file) or "proc" (linkat through /proc/self/fd, which any user may do but which needs /proc).
_link_method: str | None = None


def link_fd(fd: int, dst_dir_fd: int, name: str | bytes) -> None:
    """Give the ``O_TMPFILE`` file ``fd`` the name ``name`` inside the directory ``dst_dir_fd``.

    Tries ``linkat(fd, "", dst_dir_fd, name, AT_EMPTY_PATH)``. The kernel answers ENOENT when
    the caller may not use AT_EMPTY_PATH; then ``os.link("/proc/self/fd/N", name,
    dst_dir_fd=..., follow_symlinks=True)`` is used, and for the rest of the process if it
    worked. A later ENOENT from AT_EMPTY_PATH still gets one /proc attempt, since permission
    can depend on who opened the descriptor.

    Args:
        fd: a descriptor from ``os.open(dir, os.O_TMPFILE | os.O_WRONLY)`` (not ``O_EXCL``).
        dst_dir_fd: a directory descriptor on the same filesystem.
        name: the new name, relative to ``dst_dir_fd``.

    Raises:
        FileExistsError: ``name`` exists (linkat never replaces).
        OSError: anything else: EXDEV across filesystems, ENOENT if ``fd`` cannot be linked.
    """
    global _link_method
    if _link_method != "proc" and _HAVE_LINKAT:
        bname = os.fsencode(name)
        if _libc.linkat(fd, b"", dst_dir_fd, bname, AT_EMPTY_PATH) == 0:
            _link_method = "empty_path"
            return
        err = ffi.errno
        if err != errno.ENOENT:
            raise _errnos.error(err, name)
    fallback.link_fd_via_proc(fd, dst_dir_fd, name)
    if _link_method is None:
        _link_method = "proc"
