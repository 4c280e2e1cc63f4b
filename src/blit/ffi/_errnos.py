"""Errno policy shared by every ffi backend: which failures mean "take the slower path".

It must not make system calls of its own except the F_GETFL look-ups that tell a bad file
descriptor from a filesystem that reports EBADF, and it must not import cffi or typing: every
backend imports it at start-up.

The rule behind both sets: answer "unsupported" (False, or "fall back") whenever a plain byte copy
of the same two descriptors may still succeed, and raise whenever it certainly cannot (the
descriptor is closed or opened the wrong way, the source is a directory, the disk is full or
failing, the destination is on a read-only filesystem). A wrong "unsupported" costs one more
attempt that then reports the real error with its path; a wrong raise loses a file that could
have been copied.
"""

from __future__ import annotations

import errno
import os
import sys

# ioctl(FICLONE) failures that mean "this pair of files cannot share extents", measured on XFS,
# btrfs, ext4 and tmpfs (kernel 6.18) and read from ioctl_ficlone(2):
#   EOPNOTSUPP  the filesystem has no reflink (ext4, tmpfs, XFS without reflink=1, NFS < 4.2).
#               ENOTSUP is the same number on Linux; both are listed for other libcs.
#   EXDEV       the two files are on different filesystems, or dst is a pipe, socket or device.
#   EINVAL      special files, unaligned or overlapping ranges (src and dst the same inode),
#               or a filesystem that rejects the request shape.
#   ENOTTY      the ioctl is unknown there (pre-4.5 kernels, some FUSE and overlay setups).
#   ENOSYS      a seccomp filter or an emulator refuses ioctl outright.
#   ETXTBSY     one file is an active swap file: reading the source may still work.
#   EPERM       dst inode is immutable, or a security module refused the clone; the byte copy
#               then reports the real error with its path.
#   EACCES      a security module (SELinux ioctl allow-lists) denied the ioctl but may allow write.
# EBADF is decided per call by reflink_failed(): see there.
REFLINK_UNSUPPORTED_ERRNOS: frozenset[int] = frozenset(
    {
        errno.EOPNOTSUPP,
        errno.ENOTSUP,
        errno.EXDEV,
        errno.EINVAL,
        errno.ENOTTY,
        errno.ENOSYS,
        errno.ETXTBSY,
        errno.EPERM,
        errno.EACCES,
    }
)

# copy_file_range failures after which a read()/write() loop over the same descriptors may still
# work: ENOSYS (kernel < 4.5, seccomp), EXDEV (different filesystems, refused since 5.19 unless
# the filesystem handles it: /dev/shm <-> ext4 gives EXDEV here), EINVAL (pipes, devices, procfs
# and sysfs), EOPNOTSUPP/ENOTSUP (the filesystem declines), ETXTBSY (a swap file), and
# EPERM/EACCES (a security module). Not listed, because a byte copy would fail the same way:
# EBADF, EISDIR, EIO, ENOSPC, EDQUOT, EFBIG, EOVERFLOW, EROFS.
COPY_FALLBACK_ERRNOS: frozenset[int] = frozenset(
    {
        errno.ENOSYS,
        errno.EXDEV,
        errno.EINVAL,
        errno.EOPNOTSUPP,
        errno.ENOTSUP,
        errno.ETXTBSY,
        errno.EPERM,
        errno.EACCES,
    }
)

_O_ACCMODE = 3  # os has no O_ACCMODE; the value is 3 on every POSIX system Python runs on


def error(err: int, filename: str | bytes | None = None) -> OSError:
    """Build the ``OSError`` subclass the stdlib would raise for ``err`` (FileExistsError, ...)."""
    if filename is None:
        return OSError(err, os.strerror(err))
    return OSError(err, os.strerror(err), filename)


def _fds_fit_for_clone(src_fd: int, dst_fd: int) -> bool:
    """Whether src is open for reading and dst for writing (so EBADF blames the filesystem)."""
    if sys.platform == "win32":
        return False  # no FICLONE there; keeps type checkers off the POSIX-only calls below
    import fcntl  # not at module level: Windows has no fcntl, and only this rare path needs it

    o_path = getattr(os, "O_PATH", 0)
    try:
        src_flags = fcntl.fcntl(src_fd, fcntl.F_GETFL)
        dst_flags = fcntl.fcntl(dst_fd, fcntl.F_GETFL)
    except OSError:
        return False  # closed or never opened
    if (src_flags | dst_flags) & o_path:
        return False
    if src_flags & _O_ACCMODE == os.O_WRONLY:
        return False
    return dst_flags & _O_ACCMODE != os.O_RDONLY


def reflink_failed(err: int, src_fd: int, dst_fd: int) -> bool:
    """Turn a failed FICLONE into the answer ``reflink()`` gives: False, or raise.

    Args:
        err: the errno the ioctl failed with.
        src_fd: the source descriptor passed to the ioctl.
        dst_fd: the destination descriptor passed to the ioctl.

    Returns:
        False when the filesystem cannot clone this pair and a byte copy may still work.

    Raises:
        OSError: for every other errno. EBADF is raised only when a descriptor is really unusable
            (closed, ``O_PATH``, src write-only, dst read-only). ioctl_ficlone(2) also lists EBADF
            for "the filesystem does not support reflink" and the kernel returns it for an
            ``O_APPEND`` destination; with both descriptors usable that is the answer False.
    """
    if err in REFLINK_UNSUPPORTED_ERRNOS:
        return False
    if err == errno.EBADF and _fds_fit_for_clone(src_fd, dst_fd):
        return False
    raise error(err)
