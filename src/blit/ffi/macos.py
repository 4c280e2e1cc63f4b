"""macOS system calls through cffi ABI mode: APFS clones (fclonefileat) and fcopyfile.

It must not be imported by ``blit.ffi`` anywhere but macOS, must not load libSystem or parse C at
import (that happens on the first call that needs it), and must not make callers branch: the
shared interface is here too, with the macOS gaps filled the documented way.

UNTESTED: written against Apple's man pages (clonefile(2), copyfile(3)) without a Mac. The Linux
test suite only checks that ``CDEF`` parses. Run tests/test_ffi.py on macOS before relying on it.
It uses in-line ABI mode (pycparser at first use, ~20-50 ms once); move it to a generated
out-of-line module like ``_linux_cffi.py`` once it can be tested.

What the shared interface becomes here:

* ``copy_file_range``: pread/write emulation from ``fallback`` (``HAVE_COPY_FILE_RANGE`` False).
* ``reflink``: always False (``HAVE_REFLINK`` False): APFS clones only into a *new* name, never
  into an open descriptor. Use ``clone_at(src_fd, dst_dir_fd, name)`` before creating dst.
* ``syncfs``: ``sync()`` then ``fcntl(fd, F_FULLFSYNC)``, which also asks the drive to empty its
  write cache (plain sync(2) on macOS may return before the data is on disk).
* ``link_fd``: EOPNOTSUPP; macOS has no O_TMPFILE.
"""

from __future__ import annotations

import errno
import os

from blit.ffi import _errnos, fallback

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Protocol

    from cffi import FFI

    class _LibSystem(Protocol):
        def fclonefileat(self, srcfd: int, dst_dirfd: int, dst: bytes, flags: int, /) -> int: ...

        def fcopyfile(self, from_fd: int, to_fd: int, state: FFI.CData, flags: int, /) -> int: ...


BACKEND = "macos-cffi"
HAVE_COPY_FILE_RANGE = False
HAVE_REFLINK = False

CDEF = """
int fclonefileat(int srcfd, int dst_dirfd, const char *dst, uint32_t flags);
int fcopyfile(int from_fd, int to_fd, void *state, uint32_t flags);
"""

CLONE_NOFOLLOW = 0x0001
CLONE_NOOWNERCOPY = 0x0002
COPYFILE_DATA = 1 << 3
F_FULLFSYNC = 51

# fclonefileat errnos meaning "not here, copy the bytes instead" (clonefile(2)): ENOTSUP the
# volume is not APFS, EXDEV src and dst are on different volumes.
_CLONE_UNSUPPORTED = frozenset({errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV})

_state: tuple[FFI, _LibSystem] | None = None


def _ffi() -> tuple[FFI, _LibSystem]:
    global _state
    if _state is None:
        import cffi

        ffi = cffi.FFI()
        ffi.cdef(CDEF)
        lib: _LibSystem = ffi.dlopen(None)  # typed by the Protocol
        _state = (ffi, lib)
    return _state


copy_file_range = fallback.copy_file_range


def reflink(src_fd: int, dst_fd: int) -> bool:
    """Always False on macOS: APFS cannot clone into an existing file. See ``clone_at``."""
    return False


def clone_at(src_fd: int, dst_dir_fd: int, name: str | bytes, *, flags: int = 0) -> bool:
    """Create ``name`` in ``dst_dir_fd`` as an APFS clone of ``src_fd`` (``fclonefileat``).

    The clone also gets src's mode, owner (unless ``CLONE_NOOWNERCOPY``), times and xattrs.

    Returns:
        True if cloned; False if the volume cannot clone (ENOTSUP) or the two are on different
        volumes (EXDEV): then create ``name`` and copy bytes.

    Raises:
        FileExistsError: ``name`` exists (clones never replace).
        OSError: anything else.
    """
    ffi, lib = _ffi()
    if lib.fclonefileat(src_fd, dst_dir_fd, os.fsencode(name), flags) == 0:
        return True
    err = ffi.errno
    if err in _CLONE_UNSUPPORTED:
        return False
    raise _errnos.error(err, name)


def fcopy(src_fd: int, dst_fd: int, *, flags: int = COPYFILE_DATA) -> None:
    """Copy the data of ``src_fd`` into ``dst_fd`` with ``fcopyfile(3)`` (one call, whole file).

    Raises:
        OSError: with fcopyfile's errno.
    """
    ffi, lib = _ffi()
    if lib.fcopyfile(src_fd, dst_fd, ffi.NULL, flags) != 0:
        raise _errnos.error(ffi.errno)


def syncfs(fd: int) -> None:
    """Flush the volume that holds ``fd``: ``sync()`` plus ``F_FULLFSYNC`` on ``fd``."""
    import fcntl

    os.fstat(fd)  # EBADF first, as the Linux syncfs would
    os.sync()
    try:
        fcntl.fcntl(fd, F_FULLFSYNC)
    except OSError as exc:
        if exc.errno not in (errno.ENOTSUP, errno.EINVAL, errno.ENOTTY):  # not every fs has it
            raise


def link_fd(fd: int, dst_dir_fd: int, name: str | bytes) -> None:
    """Always EOPNOTSUPP: macOS has no O_TMPFILE, so there is nothing to name."""
    raise _errnos.error(errno.EOPNOTSUPP, name)
