"""One C call per directory pair: which source entries are plain up-to-date files, and the
stat results of everything else; and one C call per batch of small new files to copy them
(``blit.ffi._scan``, built from ``_scan.c`` and ``_copy.c`` at install).

The no-change mirror spends its time on four syscalls per file (an lstat and a listxattr on each
side) and on the Python around them; the C loop does the same syscalls with the GIL released, so
worker threads run in parallel and clean files never become Python objects.

It must not decide more than "this regular file is up to date with nothing to fix": everything
else goes back to the planner. ``cmpdir`` returns None whenever the fast path cannot answer
(no compiled module, a full buffer, an entry that vanished, any unexpected errno), and the
caller then uses the ordinary scan.

``digest_dir`` is the remote transfers' counterpart (docs/decisions.md R18): one directory's
canonical listing, hashed, so two sides can tell "identical" with 16 bytes; it returns None
whenever the directory cannot take that shortcut, and the caller sends the full manifest.

``copy_new`` lands plain new files exactly as ``fsops.copy_small`` does and must not take more:
files with xattrs, and a name that appears at the destination meanwhile, come back to the caller
as ``PYTHON``; sparse files, hard links and replacements are never sent.

``land_columns`` is the remote destination's counterpart (docs/decisions.md R20, R33): small
files whose data is in memory, landed as ``fsops.Landing`` would (xattrs excepted: never sent
here).

``frame_small`` is the remote sender's (R28): a directory's small files read into data-stream
frames in one call; whatever is not a small plain file goes back to the caller.

``scan_packed`` is the remote sender's scan (R37): a directory's plain entries (no symlink, no
xattr) as a packed manifest in one call; the others go back to the caller by name.
"""

from __future__ import annotations

import errno
import hashlib
import os
import struct
import threading
from typing import Any

from blit.fsops import IS_ROOT, UMASK, Meta

try:
    from blit.ffi._scan import ffi as _ffi
    from blit.ffi._scan import lib as _lib

    HAVE_CMPDIR = _lib.blit_version() == 18  # a stale build of an older _scan.c is not used
    _from_buffer = _ffi.from_buffer
except ImportError:  # built without a C compiler: the pure-Python path does everything
    HAVE_CMPDIR = False

CHECK_OWNER = 1
CHECK_XATTRS = 2
KEEP_TMP = 4
# What a transfer compares on up-to-date files: xattrs always, owners when we can set them.
CMP_FLAGS = CHECK_XATTRS | (CHECK_OWNER if IS_ROOT else 0)
_FIELDS = 25
_SIDE = "QqqqQQQQQQq"  # mode size mtime atime uid gid ino dev nlink rdev blocks
_REC = struct.Struct("<QQ" + _SIDE + "q" + _SIDE)
_REC_CAP = 4096
_NAMES_CAP = 256 << 10
DIGEST_OWNER = 1
"""digest_dir: owners count (the destination preserves them: its daemon runs as root)."""
DIGEST_VERSION = 1
"""The record layout of blit_digest_dir; both sides must use the same (hello feature)."""
_OUT_CAP = 4 << 20
_SUB_FIELDS = 13
_SUB = struct.Struct("<QQ" + _SIDE)


class _Buffers(threading.local):
    def __init__(self) -> None:
        self.rec = _ffi.new("int64_t[]", _REC_CAP * _FIELDS)
        self.names = _ffi.new("char[]", _NAMES_CAP)
        self.counts = _ffi.new("int64_t[4]")
        self.out: Any = None  # digest_dir's record buffer, allocated on first use


_bufs: _Buffers | None = None

# copy_new: per-file results other than bytes copied and -errno.
PYTHON = -100000  # copy this one in Python (it has xattrs, or its name appeared meanwhile)
NOT_DONE = -100001  # not attempted: an earlier file of the batch hit a full/read-only destination
_CC_FIELDS = 7
_CC_ROOT = 1
_CC_INHERIT_GID = 2
_CC_REPLACE = 4
_CC_DIRECT = 16  # blit_land_many: create under the real name in a hidden directory (R41)
_CC_BUF = 1 << 20


class _CopyBuffer(threading.local):
    def __init__(self) -> None:
        self.buf = _ffi.new("char[]", _CC_BUF)


_copy_buf: _CopyBuffer | None = None


def _buffers() -> _Buffers | None:
    """This module's per-thread buffers, or None without the compiled module."""
    global _bufs
    if not HAVE_CMPDIR:
        return None
    if _bufs is None:
        _bufs = _Buffers()
    return _bufs


def cmpdir(sfd: int, dfd: int, flags: int) -> tuple[int, int, int, int, list[tuple[str, Meta, Meta | None]]] | None:
    """Compare directory `sfd` with `dfd`.

    Returns (clean, source entries, destination entries, source names present at the
    destination, others), where `others` lists (name, source Meta, destination Meta or None) for
    every entry that is not a clean up-to-date regular file, in directory order; or None when
    the caller must scan in Python.
    """
    b = _buffers()
    if b is None:
        return None
    n = _lib.blit_cmpdir(sfd, dfd, flags, b.rec, _REC_CAP, b.names, _NAMES_CAP, b.counts)
    if n < 0:
        return None
    names = _ffi.buffer(b.names)
    others: list[tuple[str, Meta, Meta | None]] = []
    if n:
        fsdecode = os.fsdecode
        for r in _REC.iter_unpack(_ffi.buffer(b.rec, n * _FIELDS * 8)):
            off, ln = r[0], r[1]
            others.append((fsdecode(names[off : off + ln]), Meta(*r[2:13]), Meta(*r[14:25]) if r[13] else None))
    c = b.counts
    return c[0], c[1], c[2], c[3], others


def digest_dir(dfd: int, flags: int) -> tuple[bytes, int, int, list[tuple[bytes, Meta]]] | None:
    """The digest of directory `dfd` for the remote shortcut.

    Returns (16-byte digest, entries, entries that are not directories, subdirectories as
    (name, Meta) in name order), or None when the directory cannot take the shortcut (an entry
    with xattrs, a hard link, a temporary, a device or socket), on any error, or without the C
    module: the caller then lists it in full.
    """
    b = _buffers()
    if b is None:
        return None
    if b.out is None:
        b.out = _ffi.new("char[]", _OUT_CAP)
    c = b.counts
    n = _lib.blit_digest_dir(dfd, flags, b.out, _OUT_CAP, b.rec, _REC_CAP * _FIELDS // _SUB_FIELDS, b.names, _NAMES_CAP, c)
    if n < 0 or c[2]:
        return None
    h = hashlib.blake2b(_ffi.buffer(b.out, c[0]), digest_size=16, person=b"blit-dir-%d-%d" % (DIGEST_VERSION, flags))
    subdirs: list[tuple[bytes, Meta]] = []
    if n:
        names = _ffi.buffer(b.names)
        for r in _SUB.iter_unpack(_ffi.buffer(b.rec, n * _SUB_FIELDS * 8)):
            subdirs.append((names[r[0] : r[0] + r[1]], Meta(*r[2:13])))
    return h.digest(), c[1], c[3], subdirs


def xattr_flags(dfd: int, names: list[bytes]) -> bytes | None:
    """Per entry of directory `dfd` named in `names`: 0 it carries no xattr (or its filesystem
    keeps none), 1 it carries some, 2 unknown (a failure: the caller's per-entry path decides).
    One call for a directory's names (decisions R72). None without the C module."""
    if not HAVE_CMPDIR:
        return None
    out = _ffi.new("unsigned char[]", len(names) or 1)
    if _lib.blit_xattr_flags(dfd, b"\0".join(names) + b"\0", len(names), out) < 0:
        return None
    flags: bytes = _ffi.buffer(out, len(names))[:]
    return flags


def copy_new(sfd: int, dfd: int, batch: list[tuple[bytes, Meta]], inherit_gid: bool) -> list[int]:
    """Copy new regular files (no destination entry, nlink 1, not sparse) of directory `sfd` to
    the same names in `dfd`, in one C call; `batch` holds (name, source Meta). Returns one result
    per file: bytes copied, -errno (nothing was left at the destination), PYTHON or NOT_DONE."""
    global _copy_buf
    b = _copy_buf
    if b is None:
        b = _copy_buf = _CopyBuffer()
    ints: list[int] = []
    off = 0
    for name, m in batch:
        ints += (off, m.st_mode, m.st_size, m.st_atime_ns, m.st_mtime_ns, m.st_uid, m.st_gid)
        off += len(name) + 1
    names = b"\0".join([n for n, _ in batch]) + b"\0"
    n = len(batch)
    out = _ffi.new("int64_t[]", n)
    flags = (_CC_ROOT if IS_ROOT else 0) | (_CC_INHERIT_GID if inherit_gid else 0)
    _lib.blit_copy_new(sfd, dfd, n, _ffi.new("int64_t[]", ints), names, out, flags, UMASK, b.buf, _CC_BUF)
    return _ffi.unpack(out, n)  # type: ignore[no-any-return]


# land_columns: per-file flags.
LAND_INHERIT_GID = _CC_INHERIT_GID  # the directory may give new files another group: chown
LAND_REPLACE = _CC_REPLACE  # an entry of that name may exist: replaced through a temporary name


def land_columns(dfd: int, buf: Any, names: bytes, ints: list[int], offs: list[int], flags: list[int], direct: bool = False) -> list[int]:
    """Land small regular files without xattrs into directory `dfd` in one C call (the GIL
    released once): each created unnamed, written, owner (root), mode, times, linked (an
    existing entry replaced through a temporary name). `names`: the files' names in order,
    joined by NULs; `ints`: seven values for each file, one after another (0, mode,
    size, atime_ns, mtime_ns, uid, gid: the C side's BLIT_CC_FIELDS, its name offset unused);
    `offs`: where each file's content starts in `buf` (its length is its size); `flags`:
    LAND_REPLACE and LAND_INHERIT_GID for each. `direct`: `dfd` is a hidden new directory
    nobody else writes to (DestTree, R41): each file is created under its real name, with no
    temporary and no link. Returns 0 or -errno per file (nothing is left behind for a failed
    one); every file is attempted. Only with HAVE_CMPDIR."""
    n = len(offs)
    out = _ffi.new("int64_t[]", n)
    common = (_CC_ROOT if IS_ROOT else 0) | (_CC_DIRECT if direct else 0)
    _lib.blit_land_many(dfd, n, _ffi.new("int64_t[]", ints), names + b"\0", _from_buffer(buf), _ffi.new("int64_t[]", offs), _ffi.new("int64_t[]", flags), common, out, UMASK)
    return _ffi.unpack(out, n)  # type: ignore[no-any-return]


# frame_small: per-file results besides -errno.
FRAMED = 0  # its frames are in the output
CALLER = 1  # not a small plain file (larger than the limit, or sparse): the caller sends it
CHANGED = 2  # it held another number of bytes than its fstat said
NOT_REGULAR = 3  # not a regular file (something else took its name)
_FR_BUF = 2 << 20
_FR_LIMIT = 1 << 20


class _FrameBuffer(threading.local):
    def __init__(self) -> None:
        self.out = _ffi.new("char[]", _FR_BUF)
        self.counts = _ffi.new("int64_t[4]")


_frame_buf: _FrameBuffer | None = None


def frame_small(dfd: int, names: list[bytes], ids: list[int], oflags: int, limit: int) -> tuple[list[bytes], int, int, list[int]]:
    """Read files `names` of directory `dfd` (opened with `oflags`) into data-stream frames under
    `ids` (protocol.FRAME: DATA, payload, END; END alone for an empty file), in as few C calls as
    the buffer allows. Returns the frames (one bytes per call), their payload bytes, their
    number, and one result per file: FRAMED, CALLER, CHANGED, NOT_REGULAR or -errno. `limit`:
    the largest file framed here (at most 1 MiB: one such file and its frames must fit the
    buffer, or no call could make progress). Only with HAVE_CMPDIR."""
    if limit > _FR_LIMIT:
        raise ValueError(f"frame_small: limit {limit} above {_FR_LIMIT}")
    global _frame_buf
    b = _frame_buf
    if b is None:
        b = _frame_buf = _FrameBuffer()
    n = len(names)
    blob = _ffi.from_buffer(b"\0".join(names) + b"\0")
    c_ids = _ffi.new("int64_t[]", ids)
    status = _ffi.new("int64_t[]", n)
    parts: list[bytes] = []
    nbytes = frames = done = at = 0
    counts = b.counts
    while done < n:
        done += _lib.blit_frame_small(dfd, n - done, blob + at, c_ids + done, oflags, limit, b.out, _FR_BUF, status + done, counts)
        at += counts[3]
        if counts[0]:
            parts.append(_ffi.buffer(b.out, counts[0])[:])
            nbytes += counts[1]
            frames += counts[2]
    return parts, nbytes, frames, _ffi.unpack(status, n)


def rename_noreplace(old_dir_fd: int, old: bytes, new_dir_fd: int, new: bytes) -> None:
    """Rename `old` to `new` unless `new` exists (renameat2 RENAME_NOREPLACE; a check first
    where the filesystem lacks it). Raises OSError (FileExistsError when `new` exists). Only
    with HAVE_CMPDIR."""
    r = _lib.blit_rename_noreplace(old_dir_fd, old, new_dir_fd, new)
    if r:
        raise OSError(-r, os.strerror(-r), os.fsdecode(new))


def cbor_containers(body: bytes, limit: int) -> int:
    """The maps, arrays and tags in CBOR `body` (its first item), counted without decoding it:
    -1 as soon as there are more than `limit`, -2 when the walk cannot tell (the decoder then
    says what is wrong). Only with HAVE_CMPDIR."""
    return int(_lib.blit_cbor_containers(body, len(body), limit))


def open_dir_beneath(dfd: int, path: bytes) -> int:
    """Open directory `path` below `dfd`, following no symlink in any component (openat2
    RESOLVE_NO_SYMLINKS | RESOLVE_BENEATH). Returns the fd, or -1 where openat2 is missing (the
    caller walks the components). Raises OSError (ELOOP for a symlink on the way). Only with
    HAVE_CMPDIR."""
    r = _lib.blit_open_dir_beneath(dfd, path)
    if r >= 0:
        return int(r)
    if r == -errno.ENOSYS:
        return -1
    raise OSError(-r, os.strerror(-r), os.fsdecode(path))


def set_copy_modes(tmpfile: int, link: int) -> None:
    """Tests: tmpfile -1 forces named temporaries (1 = O_TMPFILE); link 2 forces the
    /proc/self/fd link, 1 linkat AT_EMPTY_PATH, 0 = decide on the first link."""
    if HAVE_CMPDIR:
        _lib.blit_set_copy_modes(tmpfile, link)


def set_xattr_mode(mode: int) -> None:
    """Tests: 1 = listxattrat, -1 = the private-cwd fallback of older kernels, 0 = probe."""
    if HAVE_CMPDIR:
        _lib.blit_set_xattr_mode(mode)


SCAN_MAX = 4_000_000
"""scan_packed: most entries of one directory (a larger one is scanned in Python)."""


class _ScanOut(threading.local):
    def __init__(self) -> None:
        self.out = _ffi.new("char *[1]")
        self.others = _ffi.new("char *[1]")
        self.counts = _ffi.new("int64_t[4]")


_scan_out: _ScanOut | None = None


def scan_packed(dfd: int, keep_tmp: bool = False) -> tuple[bytes, int, list[bytes]] | None:
    """Directory `dfd`'s plain entries (neither symlinks nor carrying xattrs) as a packed
    manifest (protocol.pack_entries' bytes) and their count, and the names of the others, for
    the caller's per-entry path (which also meets the ones that vanished). One pass in C, for a
    directory of any size up to SCAN_MAX entries. Temporaries (.blit-*.tmp) are left out, or
    (`keep_tmp`: a destination's scan) among the others. None when the caller must scan in
    Python: no compiled module, a larger directory, or a failure (the Python scan then reports
    it)."""
    global _scan_out
    if not HAVE_CMPDIR:
        return None
    if _scan_out is None:
        _scan_out = _ScanOut()
    b = _scan_out
    r = _lib.blit_scan_packed(dfd, CHECK_XATTRS | (KEEP_TMP if keep_tmp else 0), SCAN_MAX, b.out, b.others, b.counts)
    out, others_p = b.out[0], b.others[0]
    try:
        if r < 0:
            return None
        c = b.counts
        others = _ffi.buffer(others_p, c[2])[:].split(b"\0")[:-1] if c[3] else []
        return _ffi.buffer(out, c[0])[:], c[1], others
    finally:
        _lib.blit_free(out)
        _lib.blit_free(others_p)
