"""Compile ``blit.ffi._scan``, the C directory comparer and digester (``_scan.c``), small-file
copier (``_copy.c``), small-file framer (``_frame.c``) and CBOR container counter (``_cbor.c``),
one translation unit, with cffi's API mode.

Called at build time by ``hatch_build.py`` (wheel and editable installs) and by hand with
``python src/blit/ffi/_build_scan.py``; it writes the extension next to this file. It must not be
imported at run time: ``blit.ffi.scan`` loads the compiled module, or runs without it when the
build had no C compiler.
"""

from __future__ import annotations

import pathlib
import shutil
import tempfile

HERE = pathlib.Path(__file__).resolve().parent
MODULE = "blit.ffi._scan"

CDEF = """
int blit_version(void);
int blit_cmpdir(int sfd, int dfd, int flags, int64_t *rec, int rec_cap, char *names,
                int64_t names_cap, int64_t *counts);
int blit_digest_dir(int dfd, int flags, char *out, int64_t out_cap, int64_t *sub, int sub_cap,
                    char *names, int64_t names_cap, int64_t *counts);
void blit_set_xattr_mode(int mode);
int blit_xattr_flags(int dfd, const char *names, int64_t n, unsigned char *out);
int blit_copy_new(int sfd, int dfd, int n, const int64_t *in, const char *names, int64_t *out,
                  int flags, int umask_bits, char *buf, int64_t cap);
void blit_land_many(int dfd, int n, const int64_t *in, const char *names, const char *data,
                    const int64_t *data_off, const int64_t *flags, int common, int64_t *out,
                    int umask_bits);
void blit_set_copy_modes(int tmpfile, int link);
int blit_rename_noreplace(int odfd, const char *old, int ndfd, const char *new_);
int blit_open_dir_beneath(int dfd, const char *path);
int blit_frame_small(int dfd, int n, const char *names, const int64_t *ids, int oflags,
                     int64_t max, char *out, int64_t cap, int64_t *status, int64_t *counts);
int blit_scan_packed(int dfd, int flags, int64_t max_entries, char **out_p, char **others_p,
                     int64_t *counts);
void blit_free(void *p);
int64_t blit_cbor_containers(const char *body, int64_t len, int64_t limit);
"""
SOURCES = ("_scan.c", "_copy.c", "_frame.c", "_cbor.c")


def build(out_dir: pathlib.Path = HERE) -> pathlib.Path:
    """Compile and copy the extension into ``out_dir``; returns its path. Raises on failure."""
    import cffi

    ffibuilder = cffi.FFI()
    ffibuilder.cdef(CDEF)
    source = "\n".join((HERE / name).read_text() for name in SOURCES)
    ffibuilder.set_source(MODULE, source, extra_compile_args=["-O2"])
    with tempfile.TemporaryDirectory(prefix="blit-cffi-") as tmp:
        built = pathlib.Path(ffibuilder.compile(tmpdir=tmp, verbose=False))
        for old in out_dir.glob("_scan.*.so"):
            old.unlink()
        target = out_dir / built.name
        shutil.copyfile(built, target)
    return target


if __name__ == "__main__":
    print(f"wrote {build()}")
