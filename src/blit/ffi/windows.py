"""Windows file copy through cffi ABI mode: kernel32 ``CopyFileExW``, typed as trio types kernel32.

It must not be imported by ``blit.ffi`` anywhere but Windows, must not load kernel32 or parse C
at import (that happens on the first ``copy_file_ex``), and must not make callers branch: the
shared interface is here too, with the Windows gaps filled the documented way.

UNTESTED: written from the Win32 documentation and trio's ``_windows_cffi.py`` without a Windows
machine. The Linux test suite only checks that ``CDEF`` parses (with DWORD and BOOL spelled
out). Run tests/test_ffi.py on Windows before relying on it. It uses in-line ABI mode (pycparser
on first use, ~20-50 ms once); move it to a generated out-of-line module like ``_linux_cffi.py``
once it can be tested. From Python 3.12, ``shutil.copy2`` already calls ``CopyFile2``.

What the shared interface becomes here:

* ``copy_file_range``: read/write emulation from ``fallback`` (``HAVE_COPY_FILE_RANGE`` False).
  Windows has no descriptor-level kernel copy; whole files go through ``copy_file_ex(paths)``.
* ``reflink``: always False (``HAVE_REFLINK`` False). ReFS block cloning
  (FSCTL_DUPLICATE_EXTENTS_TO_FILE) is not done.
* ``syncfs``: ``os.fsync(fd)`` (FlushFileBuffers on that file; flushing a whole volume needs
  administrator rights).
* ``link_fd``: EOPNOTSUPP; Windows has no O_TMPFILE.

Call ``copy_file_ex`` from a worker thread (``trio.to_thread.run_sync``); its progress callback
runs on that thread.
"""

from __future__ import annotations

import errno
import os

from blit.ffi import _errnos, fallback

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import NoReturn, Protocol

    from cffi import FFI

    class _Kernel32(Protocol):
        """kernel32 functions in ``CDEF``, one stub each (trio's ``_windows_cffi._Kernel32``)."""

        def CopyFileExW(  # noqa: N802 (the Win32 name)
            self,
            existing_file_name: str,
            new_file_name: str,
            progress_routine: object,  # ffi.NULL or an ffi.callback
            data: FFI.CData,
            cancel: FFI.CData,
            copy_flags: int,
            /,
        ) -> int: ...


BACKEND = "windows-cffi"
HAVE_COPY_FILE_RANGE = False
HAVE_REFLINK = False

# DWORD and BOOL are cffi built-ins on Windows only; tests on Linux typedef them before parsing.
CDEF = """
typedef DWORD (__stdcall *BLIT_PROGRESS_ROUTINE)(
    int64_t TotalFileSize, int64_t TotalBytesTransferred, int64_t StreamSize,
    int64_t StreamBytesTransferred, DWORD dwStreamNumber, DWORD dwCallbackReason,
    void *hSourceFile, void *hDestinationFile, void *lpData);
BOOL __stdcall CopyFileExW(const wchar_t *lpExistingFileName, const wchar_t *lpNewFileName,
                           BLIT_PROGRESS_ROUTINE lpProgressRoutine, void *lpData,
                           BOOL *pbCancel, DWORD dwCopyFlags);
"""

COPY_FILE_FAIL_IF_EXISTS = 0x00000001
COPY_FILE_RESTARTABLE = 0x00000002
COPY_FILE_ALLOW_DECRYPTED_DESTINATION = 0x00000008
COPY_FILE_COPY_SYMLINK = 0x00000800
COPY_FILE_NO_BUFFERING = 0x00001000
PROGRESS_CONTINUE = 0
PROGRESS_CANCEL = 1

_state: tuple[FFI, _Kernel32] | None = None


def _ffi() -> tuple[FFI, _Kernel32]:
    global _state
    if _state is None:
        import cffi

        ffi = cffi.FFI()
        ffi.cdef(CDEF)
        # dlopen(None) does not work on Windows with Python 3 (cffi docs): name the DLL.
        kernel32: _Kernel32 = ffi.dlopen("kernel32.dll")
        _state = (ffi, kernel32)
    return _state


def raise_winerror(
    winerror: int | None = None,
    *,
    filename: str | None = None,
    filename2: str | None = None,
) -> NoReturn:
    """Raise the ``OSError`` for a Win32 error, as trio's ``raise_winerror`` does.

    ``OSError(0, msg, filename, winerror, filename2)``: Python maps ``winerror`` to the errno and
    the subclass (ERROR_FILE_EXISTS becomes FileExistsError).
    """
    ffi, _ = _ffi()
    if winerror is None:
        err = ffi.getwinerror()  # type: ignore[attr-defined,unused-ignore]
        if err is None:
            raise RuntimeError("No error set?")
        winerror, msg = err
    else:
        err = ffi.getwinerror(winerror)  # type: ignore[attr-defined,unused-ignore]
        if err is None:
            raise RuntimeError("No error set?")
        _, msg = err
    raise OSError(0, msg, filename, winerror, filename2)


def copy_file_ex(
    src: str,
    dst: str,
    *,
    flags: int = COPY_FILE_FAIL_IF_EXISTS,
    progress: Callable[[int, int], bool] | None = None,
) -> None:
    """Copy the file ``src`` to ``dst`` with ``CopyFileExW`` (data, attributes, alternate streams).

    Args:
        src: the existing file.
        dst: the new file; with the default flags it must not exist.
        flags: ``COPY_FILE_*`` bits.
        progress: called as ``progress(done, total)`` on the copying thread after each chunk;
            return False to cancel the copy (it then fails with ERROR_REQUEST_ABORTED).

    Raises:
        OSError: from ``raise_winerror``; FileExistsError when dst exists.
    """
    ffi, kernel32 = _ffi()
    callback: object = ffi.NULL
    raised: list[BaseException] = []
    if progress is not None:
        report = progress

        def _routine(
            total: int,
            done: int,
            _ssize: int,
            _sdone: int,
            _stream: int,
            _reason: int,
            _hsrc: object,
            _hdst: object,
            _data: object,
        ) -> int:
            try:
                return PROGRESS_CONTINUE if report(done, total) else PROGRESS_CANCEL
            except BaseException as exc:  # cannot cross the C frame: cancel, re-raise below
                raised.append(exc)
                return PROGRESS_CANCEL

        # Held in a local for the whole call: cffi frees the closure with this object.
        callback = ffi.callback("BLIT_PROGRESS_ROUTINE", _routine)
    ok = kernel32.CopyFileExW(src, dst, callback, ffi.NULL, ffi.NULL, flags)
    if raised:
        raise raised[0]
    if not ok:
        raise_winerror(filename=src, filename2=dst)


copy_file_range = fallback.copy_file_range


def reflink(src_fd: int, dst_fd: int) -> bool:
    """Always False on Windows (ReFS block cloning is not implemented)."""
    return False


def syncfs(fd: int) -> None:
    """Flush ``fd``'s file (``os.fsync``); a volume-wide flush needs administrator rights."""
    os.fsync(fd)


def link_fd(fd: int, dst_dir_fd: int, name: str | bytes) -> None:
    """Always EOPNOTSUPP: Windows has no O_TMPFILE, so there is nothing to name."""
    raise _errnos.error(errno.EOPNOTSUPP, name)
