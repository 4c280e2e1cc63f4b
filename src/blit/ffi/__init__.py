"""Fast file-copy system calls behind one interface: the backend is picked per platform at import.

It must not make its callers branch on the platform or on the backend: every name below exists
everywhere, and a missing fast path shows as ``HAVE_* = False``, a False from ``reflink`` or an
``OSError`` whose errno is in ``COPY_FALLBACK_ERRNOS``. It must not import another platform's
module (``windows`` and ``macos`` load only there), cffi's parser, or ``typing``: importing it
takes about a millisecond. It does no I/O of its own and nothing async: these are blocking calls,
meant for worker threads.

Backends, by ``BACKEND``:

* ``"linux-cffi"`` (``blit.ffi.linux``): cffi ABI mode over libc, out-of-line (pre-parsed);
  its copy_file_range uses ``os.copy_file_range``, which is cheaper per call than the binding.
* ``"macos-cffi"`` (``blit.ffi.macos``) and ``"windows-cffi"`` (``blit.ffi.windows``): untested.
* ``"fallback"`` (``blit.ffi.fallback``): the standard library only, used when the platform's
  backend cannot load (no cffi, no libc) and on other platforms.

Interface:

* ``copy_file_range(src_fd, dst_fd, count, src_off=None, dst_off=None) -> int``: bytes copied,
  0 at EOF; offsets None use and advance the file positions; OSError on failure.
* ``reflink(src_fd, dst_fd) -> bool``: FICLONE; False when this pair cannot be cloned.
* ``syncfs(fd) -> None``: flush the filesystem that holds ``fd``.
* ``link_fd(fd, dst_dir_fd, name) -> None``: name an ``O_TMPFILE`` descriptor; FileExistsError
  if the name exists.
* ``HAVE_COPY_FILE_RANGE``, ``HAVE_REFLINK``, ``BACKEND``, and the errno sets
  ``COPY_FALLBACK_ERRNOS`` and ``REFLINK_UNSUPPORTED_ERRNOS``.
"""

from __future__ import annotations

import sys

from blit.ffi._errnos import COPY_FALLBACK_ERRNOS, REFLINK_UNSUPPORTED_ERRNOS

# ImportError: cffi (its _cffi_backend) is missing, or no backend for this platform.
# OSError: ffi.dlopen found no C library. Either way the stdlib version takes over.
try:
    if sys.platform.startswith("linux"):
        from blit.ffi.linux import BACKEND, HAVE_COPY_FILE_RANGE, HAVE_REFLINK, copy_file_range, link_fd, reflink, syncfs
    elif sys.platform == "darwin":
        from blit.ffi.macos import BACKEND, HAVE_COPY_FILE_RANGE, HAVE_REFLINK, copy_file_range, link_fd, reflink, syncfs
    elif sys.platform == "win32":
        from blit.ffi.windows import BACKEND, HAVE_COPY_FILE_RANGE, HAVE_REFLINK, copy_file_range, link_fd, reflink, syncfs
    else:
        raise ImportError(f"no ffi backend for {sys.platform}")
except (ImportError, OSError):
    from blit.ffi.fallback import BACKEND, HAVE_COPY_FILE_RANGE, HAVE_REFLINK, copy_file_range, link_fd, reflink, syncfs

__all__ = [
    "BACKEND",
    "COPY_FALLBACK_ERRNOS",
    "HAVE_COPY_FILE_RANGE",
    "HAVE_REFLINK",
    "REFLINK_UNSUPPORTED_ERRNOS",
    "copy_file_range",
    "link_fd",
    "reflink",
    "syncfs",
]
