"""Generate ``_linux_cffi.py``, the pre-parsed cffi declarations used by ``linux.py``.

Run by hand when ``CDEF`` changes (``python src/blit/ffi/_build_linux.py``) and commit the output.
It must not be run at install or import time, and it must not compile anything: this is cffi's
out-of-line ABI mode (``set_source(..., None)``), so the result is a small pure-Python module and
installing blit needs no C compiler. Importing the generated module skips pycparser, which would
cost ~50 ms per process in in-line ABI mode (STACK-NOTES §3).
"""

from __future__ import annotations

import pathlib

import cffi

# glibc >= 2.27 exports all four. Keep the types exact: ioctl is variadic, so callers must cast
# its third argument (ffi.cast("int", fd)), and loff_t is 64-bit on every Linux ABI.
CDEF = """
typedef int64_t loff_t;

ssize_t copy_file_range(int fd_in, loff_t *off_in, int fd_out, loff_t *off_out,
                        size_t len, unsigned int flags);
int ioctl(int fd, unsigned long request, ...);
int syncfs(int fd);
int linkat(int olddirfd, const char *oldpath, int newdirfd, const char *newpath, int flags);
"""

MODULE = "blit.ffi._linux_cffi"
TARGET = pathlib.Path(__file__).with_name("_linux_cffi.py")


def build(target: pathlib.Path = TARGET) -> None:
    """Write the generated module to ``target`` (tests write a copy and compare)."""
    ffibuilder = cffi.FFI()
    ffibuilder.cdef(CDEF)
    ffibuilder.set_source(MODULE, None)
    ffibuilder.emit_python_code(str(target))


def main() -> None:
    build()
    print(f"wrote {TARGET}")


if __name__ == "__main__":
    main()
