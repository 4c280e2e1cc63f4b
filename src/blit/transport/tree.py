"""Tree transfers over a daemon session: the source side (manifests, file data) and the
destination side (plan with the engine's planner, land with the engine's atomic writer).

docs/protocol.md §4 is the design. The destination side (`DestTree`) runs on the daemon for a
push and on the client for a pull; the source side (`SourceTree`) the other way round. Both are
plain blocking code around the engine's `fsops` and `plan.plan_dir`, called from worker threads
(one hop per directory; data-stream threads call `DestTree.open` / `SourceTree.open` per file).
`push_tree` and `pull_tree` are the client's drivers. --checksum: the destination side lists
equal-size files, both sides hash them in worker threads (batches), the destination settles
them. Move: the destination side logs what landed (`LandedLog`), the source side removes it
(`SourceTree.remove`) in pages after a syncfs, directories last. -v / --dry-run: the
destination side logs what it changes (`ActionLog`, the local engine's names and paths); the
drivers hand it to the caller's `actions` (pull: the local log; push: tree/actions pages).
A full or read-only destination (`DestTree.fatal`) ends the run as it ends a local one
(decisions R30): the daemon refuses the push's next request, `pull_tree` raises FatalError.

This module must not parse bytes (protocol.py) or own sockets (data.py, control.py).
"""

from __future__ import annotations

import errno
import functools
import itertools
import mmap
import logging
import os
import stat
import struct
import sys
import dataclasses
import threading
import time
from array import array
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable, Collection
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Literal, cast

import trio

from .. import ffi, fsops
from ..errors import FATAL_ERRNOS, MessageTooLarge, RemoteError, StallError, TransportError
from ..ffi import scan as cscan
from ..filters import Filters
from ..fsops import Meta
from ..plan import CREATES, Compare, Op, plan_dir, up_to_date
from ..report import nothing_deleted
from ..stall import run_stoppable
from . import data, protocol
from .protocol import (
    DigestsChecked,
    DirManifest,
    DirPlanned,
    ErrorCode,
    FileHash,
    Need,
    PathFailure,
    Refused,
    RemoveGroup,
    SameDir,
    SrcEntry,
    SubDir,
    TreeDone,
)

log = logging.getLogger("blit.tree")

_C_LAND = cscan.HAVE_CMPDIR
"""DestTree.land_many lands plain small files in C (scan.land_columns) when the C module is built."""
_LAND_REPLACE, _LAND_INHERIT_GID = cscan.LAND_REPLACE, cscan.LAND_INHERIT_GID
_HIDE = _C_LAND and os.name == "posix"
"""DestTree makes new directories under a temporary name and fills them with direct creates
(decisions R41): only with the C module (its direct landing and rename) and flock."""
HIDE_FILE_MAX = 1 << 20
"""A new directory holding a file larger than this is moved into place at once: a large file
takes long to land, and the small ones beside it should not wait for it to be seen."""
_BUSY_WAIT = 2.0
"""DestTree.close: how long it waits for direct landings in flight before it moves the hidden
directories into place (a landing stuck longer leaves them to the next run's cleanup)."""

WALK_CONCURRENCY = 8
"""Directories in flight at once in a client's walk (requests pipelined on the session)."""
MAX_QUEUED_FILES = 20_000
"""A pushing client stops walking ahead while this many files wait for a data stream; a pulling
client while this many files it asked for have not landed; a push's destination daemon plans
no more while this many files it needs have not landed (handlers._plan_behind_landing).
Without it, a tree of millions of small or empty files, whose data lags its listing, was held
in memory nearly whole (a 1,000,000-file pull: 412 MiB)."""
MAX_PARTED = 16
"""Directories whose manifest parts a pull's source keeps waiting at once (SourceTree.scan_part)."""
_ENTRY_BYTES = 96
"""An entry's size in a manifest, besides its name, link target and xattrs (for the parts)."""
_HASH = "hash"  # _hardlink's answer: the group's first member waits for its hash
LANDED_PAGE = 20_000
"""Move: most source entries in one tree/landed or tree/remove page."""
LANDED_PAGE_BYTES = 2 << 20
LANDED_DRAIN = 50_000
"""Move: the client collects confirmations (and removes sources) every this many entries walked,
so neither side holds more than about this many unconfirmed entries."""
HASH_BATCH_BYTES = 256 << 20
"""--checksum: most file bytes hashed per request (a request must answer within its timeout)."""
HASH_BATCH_FILES = 5_000
HASH_RATE = 4 << 20
"""Bytes per second a peer is assumed to hash at least: a hash request's timeout grows with it.
Low: a USB disk or a busy NAS reads at 10-30 MB/s, and at 50 MiB/s assumed every --checksum of
a large file on such a disk failed with "stopped responding" (QA). A frozen daemon is still
noticed within a minute by the keepalive (nothing received at all); a daemon whose disk hangs
mid-hash is noticed only after this (a 1 GiB batch: about 5 minutes)."""
HASH_CALLS = 2
"""--checksum requests in flight per transfer (the daemon serves 4 requests per session at once:
hashing never takes them all)."""
BEHIND_POLL = 0.01
"""Seconds between looks at `_walk`'s `behind` while the walk waits for the data."""


def _msg(exc: OSError) -> str:
    return exc.strerror or str(exc)


_NOT_REGULAR = "no longer a regular file"
"""Why a file planned as regular is not sent (something else took its name)."""
_SRC_FLAGS = fsops.O_SRC | os.O_NONBLOCK
"""How a file to send is opened: never through a link; O_NONBLOCK so that a FIFO put in its
place cannot block the open (reads of a regular file ignore it)."""


def _rel_of(entry: tuple[int, str, bytes]) -> str:
    return entry[1]


def _join(a: str, b: str) -> str:
    return f"{a}/{b}" if a else b


def _b(s: str) -> bytes:
    return os.fsencode(s)


_FS = (sys.getfilesystemencoding(), sys.getfilesystemencodeerrors())


def _s(b: bytes) -> str:
    """os.fsdecode of a name: a quarter of its cost, which is per entry (200,000 in a directory)."""
    return b.decode(*_FS) if type(b) is bytes else os.fsdecode(b)


# Manifest entries travel and are handled as raw arrays (protocol.SrcEntry is RAW):
#   [name, mode, size, mtime_ns, atime_ns, uid, gid, ino, dev, nlink, rdev, blocks, target, xattrs]
# fields 1..11 in fsops.Meta order; target: bytes | None; xattrs: [[name, value], ...] | None.
Entry = list[Any]  # a raw SrcEntry


def meta_of_entry(e: Entry) -> Meta:
    return Meta._make(e[1:12])


def _target(e: Entry) -> bytes | None:
    return e[12] if len(e) > 12 else None


def _xattrs(e: Entry) -> list[tuple[str, bytes]] | None:
    x = e[13] if len(e) > 13 else None
    return [(protocol.as_text(n), v) for n, v in x] if x else None


def entry_of(name: str, st: os.stat_result | Meta, target: bytes | None, xattrs: dict[str, bytes] | None) -> Entry:
    # Manifest layout: name, the Meta fields in order (read back with Meta._make(entry[1:12])),
    # symlink target, xattrs.
    return [
        _b(name),
        *fsops.meta_of(st),
        target,
        [[protocol.text_or_bytes(k), v] for k, v in sorted(xattrs.items())] if xattrs else None,
    ]


def _xattr_path(dir_fd: int, name: str) -> str:
    return f"/proc/self/fd/{dir_fd}/{name}"


def _entry_bytes(name: bytes, target: bytes | None, xattrs: dict[str, bytes] | None) -> int:
    """About what one manifest entry weighs on the wire (a part is cut at PART_BYTES)."""
    return _ENTRY_BYTES + len(name) + (len(target) if target else 0) + (sum(len(k) + len(v) + 8 for k, v in xattrs.items()) if xattrs else 0)


def _link_target(dfd: int, rel: str, name: str, st: os.stat_result, failures: list[PathFailure]) -> bytes | None | Literal[False]:
    """A scanned entry's symlink target (None: not a symlink); False, with the failure noted,
    when the link could not be read (the entry is left out)."""
    if not stat.S_ISLNK(st.st_mode):
        return None
    try:
        return os.readlink(_b(name), dir_fd=dfd)
    except OSError as exc:
        failures.append(PathFailure(path=_b(_join(rel, name)), op="readlink", message=_msg(exc)))
        return False


def _dir_entry(dfd: int) -> Entry | None:
    """A scanned directory's own entry (its manifest's dir_entry); None if it cannot be read
    or its times cannot be kept (check_times: the destination keeps its own, as for a local run
    whose top directory is not all read)."""
    try:
        st = os.fstat(dfd)
        fsops.check_times(st)
        return entry_of(".", st, None, dict(fsops.get_xattrs(dfd)) or None)
    except OSError:
        return None


def _read_xattrs(dir_fd: int, names: list[str], base: str | None) -> dict[str, dict[str, bytes]]:
    """The xattrs of the entries of one directory that have any (one listxattr each, by absolute
    path when `base` is known, which is cheaper than through /proc/self/fd)."""
    out: dict[str, dict[str, bytes]] = {}
    try:
        have = fsops.have_xattrs(dir_fd, names, base, False)
    except OSError:
        return out
    for name, h in zip(names, have):
        if h:
            try:
                x = fsops.xattrs_at(dir_fd, name)
            except OSError:
                continue
            if x:
                out[name] = x
    return out


# =================================================================================================
# Move: confirmations of landed source entries


class LandedLog:
    """Move: source entries now at the destination, waiting to be removed at the source.

    Kept packed per source directory (about 20 bytes + the name each) until taken in pages.
    Members of hard-link groups wait until `end()`: removing one earlier would change the link
    count the source reports for members not scanned yet. Directories are added at the end,
    deepest first, and come after every file. Above `cap` bytes nothing more is kept: those
    sources stay where they are and `dropped` counts them (a peer that never collects its
    confirmations cannot grow the daemon). Thread-safe.
    """

    REC = struct.Struct("<QqQH")  # size, mtime_ns, inode, name length; then the name

    def __init__(self, cap: int = 64 << 20) -> None:
        self.cap = cap
        self.with_ino = False
        """The pages name each entry's inode (the peer announced FEATURE_LANDED_INO)."""
        self._lock = threading.Lock()
        self._files: dict[str, bytearray] = {}
        self._deferred: dict[str, bytearray] = {}
        self._dirs: deque[tuple[str, str]] = deque()
        self.nbytes = 0
        self.count = 0
        self.dropped = 0

    def __len__(self) -> int:
        with self._lock:
            return self.count + len(self._dirs)

    def add(self, rel: str, name: str, m: Meta) -> None:
        nb = _b(name)
        rec = self.REC.pack(m.st_size, m.st_mtime_ns, m.st_ino, len(nb)) + nb
        with self._lock:
            if self.nbytes + len(rec) > self.cap:
                self.dropped += 1
                return
            target = self._deferred if m.st_nlink > 1 else self._files
            buf = target.get(rel)
            if buf is None:
                buf = target[rel] = bytearray()
            buf += rec
            self.nbytes += len(rec)
            self.count += 1

    def end(self, dirs: list[str]) -> None:
        """The transfer is over: hard-link members become available, then `dirs` (source
        directory paths, deepest first) to remove once empty."""
        with self._lock:
            for rel, buf in self._deferred.items():
                self._files.setdefault(rel, bytearray()).extend(buf)
            self._deferred.clear()
            for d in dirs:
                parent, _, name = d.rpartition("/")
                self._dirs.append((parent, name))

    def clear(self) -> None:
        with self._lock:
            self._files.clear()
            self._deferred.clear()
            self._dirs.clear()
            self.nbytes = self.count = 0

    def take(self) -> list[RemoveGroup]:
        """The next page (at most LANDED_PAGE entries): files first (grouped by directory), then
        directories, deepest first."""
        max_entries, max_bytes = LANDED_PAGE, LANDED_PAGE_BYTES
        groups: list[RemoveGroup] = []
        n = size = 0
        rec = self.REC
        with_ino = self.with_ino
        with self._lock:
            while self._files and n < max_entries and size < max_bytes:
                rel = next(iter(self._files))
                buf = self._files[rel]
                files: list[protocol.Landed] = []
                pos = 0
                while pos < len(buf) and n < max_entries and size < max_bytes:
                    fsize, mtime, ino, ln = rec.unpack_from(buf, pos)
                    pos += rec.size
                    files.append(protocol.Landed(name=bytes(buf[pos : pos + ln]), size=fsize, mtime_ns=mtime, ino=ino if with_ino else None))
                    pos += ln
                    n += 1
                    size += ln + 34
                if pos >= len(buf):
                    del self._files[rel]
                else:
                    del buf[:pos]
                self.nbytes -= pos
                self.count -= len(files)
                size += len(rel) + 8
                groups.append(RemoveGroup(rel=_b(rel), files=files, dirs=[]))
            while not self._files and self._dirs and n < max_entries and size < max_bytes:
                parent = self._dirs[0][0]
                names: list[bytes] = []
                while self._dirs and self._dirs[0][0] == parent and n < max_entries:
                    names.append(_b(self._dirs.popleft()[1]))
                    n += 1
                    size += len(names[-1]) + 8
                size += len(parent) + 8
                groups.append(RemoveGroup(rel=_b(parent), files=[], dirs=names))
        return groups


def check_groups(groups: list[RemoveGroup]) -> None:
    """Every path and name of removal groups stays below the source base.

    Raises:
        Refused(PATH_REFUSED): '..', an absolute path, NUL, or a name with '/'.
    """
    for g in groups:
        protocol.split_path(g.rel)
        for f in g.files:
            protocol.check_name(f.name)
        for d in g.dirs:
            protocol.check_name(d)


def page_size(groups: list[RemoveGroup]) -> int:
    return sum(len(g.files) + len(g.dirs) for g in groups)


# =================================================================================================
# -v / --dry-run: what the destination side changed (decisions R23)

_ACTION_CODE = {a: i for i, a in enumerate(protocol.ACTION_NAMES)}


class ActionLog:
    """The entries a destination side changed (a dry run: would change), as (action, path)
    records packed in order until taken in pages (`take`). Above `cap` bytes nothing more is
    kept and `dropped` counts what was not (a peer that never collects cannot grow the daemon;
    a client that does collects while the walk goes on, so the log holds about one directory
    and the files in flight). Thread-safe."""

    REC = struct.Struct("<BI")  # action code, path length; then the path

    def __init__(self, cap: int = 64 << 20) -> None:
        self.cap = cap
        self._lock = threading.Lock()
        self._buf = bytearray()
        self._pos = 0
        self.count = 0
        self.dropped = 0

    def __len__(self) -> int:
        return self.count

    def add(self, action: str, path: str) -> None:
        nb = _b(path)
        rec = self.REC.pack(_ACTION_CODE[action], len(nb)) + nb
        with self._lock:
            if len(self._buf) - self._pos + len(rec) > self.cap:
                self.dropped += 1
                return
            self._buf += rec
            self.count += 1

    def take(self) -> list[protocol.Action]:
        """The next page, oldest first: at most ACTION_PAGE actions, about ACTION_PAGE_BYTES."""
        out: list[protocol.Action] = []
        names = protocol.ACTION_NAMES
        rec = self.REC
        with self._lock:
            buf, pos, size = self._buf, self._pos, 0
            while pos < len(buf) and len(out) < protocol.ACTION_PAGE and size < protocol.ACTION_PAGE_BYTES:
                code, ln = rec.unpack_from(buf, pos)
                pos += rec.size
                out.append(protocol.Action(action=names[code], path=bytes(buf[pos : pos + ln])))
                pos += ln
                size += ln + 8
            if pos >= len(buf):
                buf.clear()
                pos = 0
            elif pos >= 1 << 20:
                del buf[:pos]
                pos = 0
            self._pos = pos
            self.count -= len(out)
        return out


def emit_actions(page: list[protocol.Action], emit: Callable[[str, str], None]) -> None:
    """Hand a page of actions to `emit(action, path)` (a Progress's `action`), paths as the
    local engine gives them (fsdecode).

    Raises:
        RemoteProtocolError: an action name no blit sends.
    """
    for a in page:
        if a.action not in _ACTION_CODE:
            from ..errors import RemoteProtocolError

            raise RemoteProtocolError(f"unknown action {a.action[:32]!r} from the daemon")
        emit(a.action, _s(a.path))


# =================================================================================================
# Source side


class _BatchBudget:
    """What a batch of directories' manifests (FEATURE_DIR_BATCH) holds so far: full at
    protocol.BATCH_ENTRIES entries or half of MAX_MESSAGE (one more part still fits)."""

    def __init__(self) -> None:
        self.count = self.nbytes = 0

    def full(self, m: DirManifest) -> bool:
        """Add manifest `m`; True once the batch is full."""
        self.count += len(m.entries)
        for e in cast("list[Entry]", m.entries):
            self.nbytes += _ENTRY_BYTES + len(e[0]) + len(e[12] or b"") + sum(len(k) + len(v) + 8 for k, v in e[13] or ())
        if m.packed is not None:
            self.count += protocol.packed_count(m.packed)
            self.nbytes += len(m.packed)
        return self.count >= protocol.BATCH_ENTRIES or self.nbytes >= protocol.MAX_MESSAGE // 2


class SourceTree:
    """Reads a source tree below `root_fd`: per-directory manifests, and files by id.

    `open_dir(root_fd, rel)` opens a directory (the daemon passes a containment walk that refuses
    symlinks; the client uses fsops.open_rel).
    """

    def __init__(self, root_fd: int, open_dir: Callable[[int, str], int] = fsops.open_rel, base_path: bytes | None = None) -> None:
        """`base_path`: the root's absolute path, when paths may be used (the client; never on
        the daemon, whose every lookup goes through fds)."""
        self.root_fd = root_fd
        self.open_dir = open_dir
        self.base = os.fsdecode(base_path) if base_path is not None else None
        self.files: dict[int, tuple[str, bytes]] = {}  # id -> (rel, name)
        self._large: set[int] = set()
        """Ids `frame_small` handed back (not small and plain): `open` sends them."""
        self._parted: dict[str, tuple[list[DirManifest], int]] = {}
        """Pull, FEATURE_PARTS: directories whose later manifest parts wait (scan_part)."""
        self._lock = threading.Lock()
        self.dirs = _DirFds(root_fd, open_dir)
        self.stopped = False

    def stop(self) -> None:
        """Any thread: a hashing thread stops at its next read (InterruptedError)."""
        self.stopped = True

    def close(self) -> None:
        self.stopped = True  # a hashing thread left behind stops at its next read
        self.dirs.close()
        try:
            os.close(self.root_fd)
        except OSError:
            pass

    def scan(self, rel: str, pack: bool = False, names: Collection[str] | None = None) -> DirManifest:
        """Worker thread: the manifest of directory `rel` (names, lstat, link targets, xattrs)
        in one message, whatever its size (a peer without protocol.FEATURE_PARTS); `pack`:
        entries without a link target or xattrs go packed (protocol.FEATURE_PACKED); `names`:
        only these entries (`SRC`: its parent, where nothing else is part of the run)."""
        return self.scan_parts(rel, pack, split=False, names=names)[0]

    def scan_parts(self, rel: str, pack: bool = False, split: bool = True, names: Collection[str] | None = None) -> list[DirManifest]:
        """Worker thread: `scan`, in parts of at most protocol.PART_ENTRIES entries and about
        protocol.PART_BYTES each (FEATURE_PARTS), in scan order; every part but the last says
        `more`. Failures travel with the first part; `incomplete` is the directory's."""
        try:
            dfd = self.open_dir(self.root_fd, rel)
        except OSError as exc:
            return [DirManifest(entries=[], incomplete=True, failures=[PathFailure(path=_b(rel or "."), op="open", message=_msg(exc))])]
        try:
            base = None if self.base is None else (f"{self.base}/{rel}" if rel else self.base)
            fast = cscan.scan_packed(dfd) if pack and names is None else None
            if fast is not None:
                got = self._scan_packed(rel, dfd, base, *fast, split=split)
                if got is not None:
                    return got
            try:
                entries, errs = fsops.scan(dfd, source=True) if names is None else fsops.scan_names(dfd, names, source=True)
            except OSError as exc:
                return [DirManifest(entries=[], incomplete=True, failures=[PathFailure(path=_b(rel or "."), op="scan", message=_msg(exc))])]
            failures = [PathFailure(path=_b(_join(rel, n)), op="stat", message=_msg(e)) for n, e in errs]
            xattrs = _read_xattrs(dfd, [n for n, _ in entries], base)
            # Each part: (entries, packed names, packed stats); a new one starts when the
            # current one is full (split only).
            parts: list[tuple[list[Any], list[bytes], list[os.stat_result]]] = [([], [], [])]
            count = nbytes = total = 0
            limit_n = protocol.PART_ENTRIES if split else -1
            for name, st in entries:
                x = xattrs.get(name)
                target = _link_target(dfd, rel, name, st, failures)
                if target is False:
                    continue
                bname = _b(name)
                size = _entry_bytes(bname, target, x)
                if count == limit_n or (split and count and nbytes + size > protocol.PART_BYTES):
                    parts.append(([], [], []))
                    count = nbytes = 0
                out, plain_names, plain = parts[-1]
                count += 1
                nbytes += size
                total += 1
                if target is None and pack and not x:
                    plain_names.append(bname)
                    plain.append(st)
                else:
                    out.append(entry_of(name, st, target, x))
            dir_entry = _dir_entry(dfd)
            incomplete = bool(errs) or total != len(entries)
            return [
                DirManifest(
                    entries=cast("list[SrcEntry]", out),
                    incomplete=incomplete,
                    failures=failures if i == 0 else [],
                    dir_entry=cast("SrcEntry | None", dir_entry),
                    packed=protocol.pack_entries(plain_names, plain) if pack else None,
                    more=i < len(parts) - 1,
                )
                for i, (out, plain_names, plain) in enumerate(parts)
            ]
        finally:
            os.close(dfd)

    def _scan_packed(
        self, rel: str, dfd: int, base: str | None, packed: bytes, n: int, others: list[bytes], split: bool = True
    ) -> list[DirManifest] | None:
        """`scan_parts` for a directory scan.scan_packed answered: its plain entries packed in
        C (cut into parts as `scan_parts` cuts them, R72), the others (symlinks, xattr carriers,
        entries that vanished) as the Python scan makes them, in the first part. None when they
        would not fit (the caller scans in Python)."""
        failures: list[PathFailure] = []
        out: list[Any] = []
        size = 0
        if others:
            found: list[tuple[str, os.stat_result]] = []
            for bname in others:
                name = _s(bname)
                try:
                    st = os.stat(bname, dir_fd=dfd, follow_symlinks=False)
                    fsops.check_times(st)
                    found.append((name, st))
                except OSError as exc:
                    failures.append(PathFailure(path=_b(_join(rel, name)), op="stat", message=_msg(exc)))
            xattrs = _read_xattrs(dfd, [name for name, _ in found], base)
            for name, st in found:
                target = _link_target(dfd, rel, name, st, failures)
                if target is not False:
                    x = xattrs.get(name)
                    out.append(entry_of(name, st, target, x))
                    size += _entry_bytes(_b(name), target, x)
        if len(out) > protocol.PART_ENTRIES // 2 or size > protocol.PART_BYTES // 2:
            return None
        if split:
            blobs = protocol.split_packed(packed, protocol.PART_ENTRIES, protocol.PART_BYTES, _ENTRY_BYTES, (len(out), size))
        elif n + len(out) > protocol.PART_ENTRIES or len(packed) + size > protocol.PART_BYTES:
            return None
        else:
            blobs = [packed]
        dir_entry = cast("SrcEntry | None", _dir_entry(dfd))
        return [
            DirManifest(
                entries=cast("list[SrcEntry]", out if i == 0 else []),
                incomplete=bool(failures),
                failures=failures if i == 0 else [],
                dir_entry=dir_entry,
                packed=blob,
                more=i < len(blobs) - 1,
            )
            for i, blob in enumerate(blobs)
        ]

    def scan_part(self, rel: str, part: int, pack: bool) -> DirManifest:
        """Worker thread (the daemon, pull): part `part` of directory `rel`'s manifest. Part 0
        scans; the parts after it wait here until asked for, in order (a directory at a time
        per request in flight, at most MAX_PARTED directories)."""
        if part == 0:
            parts = self.scan_parts(rel, pack)
            if len(parts) > 1:
                with self._lock:
                    if len(self._parted) >= MAX_PARTED and rel not in self._parted:
                        raise Refused(ErrorCode.BUSY, f"more than {MAX_PARTED} directories sent in parts at once")
                    self._parted[rel] = (parts, 1)
            return parts[0]
        with self._lock:
            got = self._parted.get(rel)
            if got is None or got[1] != part:
                raise Refused(ErrorCode.BAD_REQUEST, f"tree/scan: part {part} of {rel or '.'!r} was not offered next")
            parts, _ = got
            if part == len(parts) - 1:
                del self._parted[rel]
            else:
                self._parted[rel] = (parts, part + 1)
        return parts[part]

    def scan_many(self, rels: list[str], pack: bool) -> list[DirManifest]:
        """Worker thread (the daemon, pull, tree/scans): part 0 of these directories' manifests
        (as `scan_part`), in order, up to the one that brings the answer to
        protocol.BATCH_ENTRIES entries or half of MAX_MESSAGE (so one more part of at most
        PART_BYTES still fits); always at least one."""
        out: list[DirManifest] = []
        budget = _BatchBudget()
        for rel in rels:
            m = self.scan_part(rel, 0, pack)
            out.append(m)
            if budget.full(m):
                break
        return out

    def check_have(self, dirs: list[tuple[str, bytes]], flags: int) -> list[SameDir]:
        """Worker thread (the daemon, pull, tree/have): per (rel, digest) the destination
        holds, whether source directory `rel` has the same digest (scan.digest_dir with the
        destination's `flags`), and then its subdirectories. Once the subdirectories answered
        reach protocol.BATCH_ENTRIES, the rest answer not equal (their manifests are asked
        for), so the answer stays well below MAX_MESSAGE."""
        out: list[SameDir] = []
        room = protocol.BATCH_ENTRIES
        for rel, digest in dirs:
            got: Digest | None = None
            if room > 0:
                try:
                    dfd = self.open_dir(self.root_fd, rel)
                except OSError:
                    pass  # its tree/scan reports why
                else:
                    try:
                        got = cscan.digest_dir(dfd, flags & cscan.DIGEST_OWNER)
                    finally:
                        os.close(dfd)
            if got is None or got[0] != digest or len(got[3]) > room:
                out.append(SameDir(equal=False, subdirs=[]))
                continue
            room -= len(got[3]) + 1
            out.append(SameDir(equal=True, subdirs=cast("list[SrcEntry]", [[name, *m, None, None] for name, m in got[3]])))
        return out

    def scan_batch(self, rels: list[str], pack: bool) -> list[list[DirManifest]]:
        """Worker thread (push, tree/dirs): `scan_parts` of these directories, in order, up to
        the one that fills a batch (as `scan_many`); always at least one."""
        out: list[list[DirManifest]] = []
        budget = _BatchBudget()
        for rel in rels:
            parts = self.scan_parts(rel, pack)
            out.append(parts)
            if len(parts) > 1 or budget.full(parts[0]):
                break
        return out

    def hashes(self, rel: str, names: list[bytes]) -> tuple[list[FileHash], list[PathFailure]]:
        """Worker thread, --checksum: xxh3-128 of these files of directory `rel` (a null digest
        for a file that cannot be read: the destination then asks for it, and its send fails)."""
        out: list[FileHash] = []
        failures: list[PathFailure] = []
        try:
            dfd = self.dirs.acquire(rel)
        except OSError as exc:
            return [FileHash(name=n, digest=None) for n in names], [PathFailure(path=_b(rel or "."), op="checksum", message=_msg(exc))]
        try:
            stop = lambda: self.stopped  # noqa: E731
            for n in names:
                try:
                    digest: bytes | None = fsops.file_hash(dfd, _s(n), stop)
                except InterruptedError:
                    raise
                except OSError as exc:
                    digest = None
                    failures.append(PathFailure(path=_b(_join(rel, _s(n))), op="checksum", message=_msg(exc)))
                out.append(FileHash(name=n, digest=digest))
        finally:
            self.dirs.release(rel)
        return out, failures

    def remove(self, groups: list[RemoveGroup]) -> tuple[int, list[PathFailure]]:
        """Worker thread, move: unlink the landed source entries of each group (only if they are
        still what was copied: same size and mtime, not a directory, and the same inode when the
        confirmation names it), then remove the group's
        directories that are now empty. Returns (entries removed, failures). The caller has
        checked the groups (check_groups)."""
        removed = 0
        failures: list[PathFailure] = []
        for g in groups:
            rel = "/".join(_s(p) for p in protocol.split_path(g.rel))
            try:
                dfd = self.open_dir(self.root_fd, rel)
            except OSError as exc:
                for f in g.files:
                    failures.append(PathFailure(path=_b(_join(rel, _s(f.name))), op="remove source", message=_msg(exc)))
                continue
            try:
                for f in g.files:
                    try:
                        st = os.stat(f.name, dir_fd=dfd, follow_symlinks=False)
                        if stat.S_ISDIR(st.st_mode) or st.st_size != f.size or st.st_mtime_ns != f.mtime_ns or f.ino not in (None, st.st_ino):
                            failures.append(PathFailure(path=_b(_join(rel, _s(f.name))), op="remove source", message="changed since it was copied; kept"))
                            continue
                        os.unlink(f.name, dir_fd=dfd)
                        removed += 1
                    except FileNotFoundError:
                        pass  # gone already: nothing to remove
                    except OSError as exc:
                        failures.append(PathFailure(path=_b(_join(rel, _s(f.name))), op="remove source", message=_msg(exc)))
                for d in g.dirs:
                    try:
                        os.rmdir(d, dir_fd=dfd)
                    except OSError as exc:
                        # Leftovers (failed, excluded or new entries) keep a directory, as locally.
                        if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOENT, errno.ENOTDIR):
                            failures.append(PathFailure(path=_b(_join(rel, _s(d))), op="remove source", message=_msg(exc)))
            finally:
                os.close(dfd)
        return removed, failures

    def register(self, rel: str, needs: list[Need]) -> list[int]:
        with self._lock:
            for n in needs:
                self.files[n.id] = (rel, n.name)
        return [n.id for n in needs]

    def register_names(self, rel: str, ids: Any, names: list[bytes]) -> bool:
        """Files `names` of directory `rel` under `ids` (the same order, no id twice), to be
        opened by id. False, and nothing registered, if one of the ids is already waiting."""
        with self._lock:
            if not self.files.keys().isdisjoint(ids):
                return False
            self.files.update(zip(ids, zip(itertools.repeat(rel), names)))
        return True

    def open(self, file_id: int) -> data.SourceFile:
        """Data-stream thread: open a file to send (never following a link)."""
        with self._lock:
            rel, name = self.files.pop(file_id)
            self._large.discard(file_id)
        fd = os.open(name, _SRC_FLAGS, dir_fd=self.dirs.held(rel))
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise OSError(errno.EINVAL, _NOT_REGULAR)
            extents = fsops.data_extents(fd, st.st_size) if fsops.is_sparse(st) else None
        except BaseException:
            os.close(fd)
            raise
        return SrcFile(fd, st.st_size, extents)

    def frame_small(self, ids: list[int]) -> data.Framed | None:
        """Data-stream thread: the small plain files among `ids` read and framed in C, one call
        per directory (scan.frame_small); the others stay registered for `open`. None without
        the C module."""
        if not _C_LAND:
            return None
        out = data.Framed()
        with self._lock:
            large = self._large
            if large:  # handed back by an earlier batch: not opened again here
                out.rest = [i for i in ids if i in large]
                ids = [i for i in ids if i not in large]
            entries = [(i, *self.files.pop(i)) for i in ids]
        for rel, run in itertools.groupby(entries, key=_rel_of):
            group = list(run)
            try:
                dfd = self.dirs.held(rel)
            except OSError as exc:
                out.failed += [(fid, _msg(exc)) for fid, _, _ in group]
                continue
            parts, nbytes, frames, status = cscan.frame_small(dfd, [n for _, _, n in group], [fid for fid, _, _ in group], _SRC_FLAGS, data.SMALL_FILE)
            out.parts += parts
            out.nbytes += nbytes
            out.frames += frames
            if not any(status):  # all FRAMED (0): the usual answer
                out.files += len(status)
                continue
            for (fid, _, name), st in zip(group, status):
                if st == cscan.FRAMED:
                    out.files += 1
                elif st == cscan.CALLER:
                    out.rest.append(fid)
                    with self._lock:
                        self.files[fid] = (rel, name)
                        self._large.add(fid)
                else:
                    out.failed.append((fid, data.SHRANK if st == cscan.CHANGED else _NOT_REGULAR if st == cscan.NOT_REGULAR else os.strerror(-st)))
        return out


class SrcFile:
    """An open source file of a transfer: fd, size, and data extents when sparse."""

    __slots__ = ("fd", "size", "extents")

    def __init__(self, fd: int, size: int, extents: list[tuple[int, int]] | None) -> None:
        self.fd = fd
        self.size = size
        self.extents = extents

    def close(self) -> None:
        os.close(self.fd)


# =================================================================================================
# Destination side


@dataclass
class TreeSpec:
    operation: str = "copy"
    compare: Compare = Compare.SIZE_MTIME
    filters: Filters = field(default_factory=lambda: Filters([]))
    dry_run: bool = False
    report_actions: bool = False
    """-v / --dry-run: the destination side logs what it changes (DestTree.actions)."""

    @property
    def mirror(self) -> bool:
        return self.operation == "mirror"


def digests_apply(spec: TreeSpec) -> bool:
    """Whether directory digests may stand in for manifests (decisions R18): copy or mirror by
    size and mtime (or size), without filters or dry run, with the C module on this side."""
    return (
        cscan.HAVE_CMPDIR
        and spec.operation in ("copy", "mirror")
        and not spec.dry_run
        and spec.compare in (Compare.SIZE_MTIME, Compare.SIZE_ONLY)
        and not spec.filters.active
    )


Digest = tuple[bytes, int, int, list[tuple[bytes, Meta]]]
"""scan.digest_dir's answer: (digest, entries, entries that are not directories, subdirs)."""


def _dest_scan(dfd: int) -> tuple[list[tuple[str, Any]], list[tuple[str, OSError]], set[str] | None]:
    """A destination directory's listing as fsops.scan gives it (entries, errors), and the names
    of the entries known to carry no xattr: scanned in C when it can (scan.scan_packed; its
    symlinks, xattr carriers, temporaries and vanished entries by fsops.scan_names), else by
    fsops.scan, and then None (R72). Raises OSError when the directory cannot be read."""
    got = cscan.scan_packed(dfd, keep_tmp=True)
    if got is None:
        slow, errs = fsops.scan(dfd)
        return slow, errs, None
    packed, _n, others = got
    bnames, cols = protocol.unpack_columns(packed, cscan.SCAN_MAX)
    enc, how = _FS
    names = [b.decode(enc, how) for b in bnames]
    dents: list[tuple[str, Any]] = list(zip(names, map(_new_meta, zip(*cols))))
    more, derrs = fsops.scan_names(dfd, map(_s, others))
    return dents + more, derrs, set(names)  # the plain entries first (DestTree._plan counts on it)


_new_meta = functools.partial(tuple.__new__, Meta)
"""A Meta of an 11-tuple (the columns of a packed listing), without Meta._make's length check."""


def dir_digests(root_fd: int, open_dir: Callable[[int, str], int], rels: list[str], flags: int) -> list[Digest | None]:
    """Worker thread: the digests of these directories (None: no shortcut for that one; a
    directory that cannot be opened too, its full visit reports why)."""
    out: list[Digest | None] = []
    for rel in rels:
        try:
            dfd = open_dir(root_fd, rel)
        except OSError:
            out.append(None)
            continue
        try:
            out.append(cscan.digest_dir(dfd, flags))
        finally:
            os.close(dfd)
    return out


@dataclass(slots=True)
class _Pending:
    dst_rel: str
    dname: str
    meta: Meta
    xattrs: list[tuple[str, bytes]] | None
    replace: bool
    link_key: tuple[int, int] | None = None
    inherit_gid: bool = True
    rel: str = ""  # the source directory and name (move: what to remove once landed)
    name: str = ""
    acl: bool = False  # its directory has a default ACL: drop what the new file inherits


@dataclass
class _Parted:
    """A destination directory being planned in parts (DestTree.plan, FEATURE_PARTS)."""

    rel: str  # its source directory
    next: int = 0  # the part expected next
    dst: dict[str, Any] | None = None  # its listing, scanned for part 0
    keep: set[str] = field(default_factory=set)
    acl: bool = False
    bare: set[str] | None = None  # its entries the scan found without xattrs (_dest_scan)
    seen: set[str] = field(default_factory=set)  # source names of the parts so far
    failed: bool = False  # part 0 could not open or scan it: the rest are answered with nothing


@dataclass
class _HashItem:
    """--checksum: an existing destination file of the same size, waiting for the source's hash."""

    name: str
    dname: str
    meta: Meta
    dst: Meta
    xattrs: list[tuple[str, bytes]] | None
    link_key: tuple[int, int] | None = None


@dataclass
class _DirNode:
    meta: Meta | None
    dst_meta: Meta | None
    new: bool
    xattrs: list[tuple[str, bytes]] | None
    changed: bool = False
    inherit_gid: bool = True
    """The directory may hand new files another group (setgid, or not known): chown always."""
    src_rel: str = ""
    """The source directory (move removes it at the end when empty); "" for the top."""
    waiting: int = 0
    """While hidden (DestTree._hidden, R41): files registered in it that have neither landed nor failed."""
    planned: bool = False
    """While hidden: its own manifest was planned (it moves into place once `waiting` is 0)."""
    big: bool = False
    """While hidden: a file larger than HIDE_FILE_MAX lands in it (it moves at once)."""


class _Held(threading.local):
    rel: str | None = None
    fd: int = -1
    forgotten: int = 0


class _DirFds:
    """Open destination directories, shared by the planner and the stream threads: a small LRU
    of idle fds, and a count of users so an fd in use is never closed."""

    def __init__(self, root_fd: int, open_dir: Callable[[int, str], int], keep: int = 64) -> None:
        self.root_fd = root_fd
        self.open_dir = open_dir
        self.keep = keep
        self._lock = threading.Lock()
        self._fds: dict[str, list[int]] = {}  # rel -> [fd, users]
        self._idle: OrderedDict[str, None] = OrderedDict()
        self._gone: list[int] = []  # forgotten while in use
        self.forgotten = 0
        """How many times `forget` ran: a thread's held fd from before is acquired again."""
        self._held = _Held()
        self.opened_up: set[str] = set()
        """Directories of ours that refused us (mode 000) and were given u+rwx to be opened
        (fsops.open_dst_dir): their mode comes back when they are finalised."""

    def held(self, rel: str) -> int:
        """The fd of `rel`, kept acquired by the calling thread until it asks for another
        directory: a data-stream thread's files come directory by directory, so this is one
        acquire per directory, not per file (closed with the others by `close`)."""
        h = self._held
        if h.rel != rel or h.forgotten != self.forgotten:
            if h.rel is not None:
                self.release(h.rel, h.fd)
                h.rel = None
            h.forgotten = self.forgotten
            h.fd = self.acquire(rel)
            h.rel = rel
        return h.fd

    def acquire(self, rel: str) -> int:
        with self._lock:
            slot = self._fds.get(rel)
            if slot is not None:
                slot[1] += 1
                self._idle.pop(rel, None)
                return slot[0]
        fd, opened_up = fsops.open_dst_dir(self.open_dir, self.root_fd, rel)
        with self._lock:
            if opened_up:
                self.opened_up.add(rel)
            slot = self._fds.get(rel)
            if slot is not None:  # raced: keep the first
                os.close(fd)
                slot[1] += 1
                self._idle.pop(rel, None)
                return slot[0]
            self._fds[rel] = [fd, 1]
            return fd

    def pin(self, rel: str, fd: int) -> None:
        """Take `fd` as the open directory `rel`, with one user until `release(rel)` (a hidden
        new directory: DestTree never opens it by path while it is hidden)."""
        with self._lock:
            assert rel not in self._fds
            self._fds[rel] = [fd, 1]

    def forget(self, rels: list[str]) -> None:
        """Directories `rels` are no longer where their fds point (merged into a directory made
        meanwhile under their name and removed, R55): the next acquire opens them by path.
        Idle fds close now, those still in use at `close`."""
        close: list[int] = []
        with self._lock:
            self.forgotten += 1
            for rel in rels:
                slot = self._fds.pop(rel, None)
                self._idle.pop(rel, None)
                if slot is not None:
                    (self._gone if slot[1] else close).append(slot[0])
        for fd in close:
            os.close(fd)

    def fd_of(self, rel: str) -> int:
        """The fd open for `rel` (-1 if none), for a `release` that must not count against a
        slot opened again after `forget`."""
        with self._lock:
            slot = self._fds.get(rel)
            return -1 if slot is None else slot[0]

    def release(self, rel: str, fd: int = -1) -> None:
        """One user less of `rel`'s fd (`fd`: only if that is still the one open for `rel`;
        after `forget` the fd a user held is not)."""
        close: list[int] = []
        with self._lock:
            slot = self._fds.get(rel)
            if slot is None or (fd >= 0 and slot[0] != fd):  # forgotten while in use: closed by close()
                return
            slot[1] -= 1
            if slot[1] == 0:
                self._idle[rel] = None
                while len(self._idle) > self.keep:
                    old, _ = self._idle.popitem(last=False)
                    close.append(self._fds.pop(old)[0])
        for fd in close:
            os.close(fd)

    def close(self) -> None:
        with self._lock:
            for fd in [*(slot[0] for slot in self._fds.values()), *self._gone]:
                try:
                    os.close(fd)
                except OSError:
                    pass
            self._fds.clear()
            self._gone.clear()
            self._idle.clear()


class DestTree:
    """Plans source manifests against a destination tree below `root_fd` and lands files.

    `plan(...)` (worker thread, one per directory) does what needs no data at once and returns
    the names it needs; `open(id)` (a data stream's thread) lands one of them; `finish(...)`
    applies directory metadata bottom-up and, for mirror, deletes extras once the whole source
    was read. Thread-safe.
    """

    def __init__(self, root_fd: int, spec: TreeSpec, open_dir: Callable[[int, str], int] = fsops.open_rel) -> None:
        self.root_fd = root_fd
        self.spec = spec
        self._open_base = open_dir
        self.dirs = _DirFds(root_fd, self._open_dir)
        # New directories stay under a temporary name until their files have landed (R41):
        # destination rel -> that name; the lock orders opens by path against the renames.
        self._hidden: dict[str, str] = {}
        self._others_tmp: list[tuple[str, str]] = []
        """(directory, name) of temporaries another live run held when a scan met them
        (fsops.without_tmp): `finish` removes those whose run died meanwhile (_sweep)."""
        self._hide_lock = threading.RLock()
        self._prefetched: dict[str, Future[Any]] = {}
        """Destination directories listed ahead of their plan (`prefetch`), by rel."""
        self._hiding = _HIDE and not spec.dry_run and spec.operation != "move"
        # ... but the run's first new directory is made in place: its files are the first to
        # come and are seen as each lands (perceived latency, SPEC).
        self._made_one = False
        self._direct_busy = 0  # land_many calls landing into hidden directories right now
        self._lock = threading.Lock()
        self._next_id = 1
        self.pending: dict[int, _Pending] = {}
        self._open: dict[int, _Pending] = {}  # being landed, for failure reports
        self._parted: dict[str, _Parted] = {}  # directories planned in parts, by destination rel
        self.nodes: dict[str, _DirNode] = {}
        self.deletions: list[tuple[str, list[tuple[str, bool]]]] = []
        self.incomplete: list[str] = []
        self.unlanded: set[str] = set()  # new directories that never moved into place (reported)
        self.unplanned = 0  # of `incomplete`: directories this side could not open or scan
        self.links: dict[tuple[int, int], Any] = {}  # source (dev, ino) -> landed (rel, name, ino) | waiters list
        self.failures: list[tuple[str, str, str]] = []
        self.files_copied = 0
        self.bytes_copied = 0
        self.files_skipped = 0
        self.dirs_created = 0
        self.links_created = 0
        self.entries_seen = 0
        self.files_deleted = 0
        self.fatal: str | None = None
        self.deletions_skipped: str | None = None
        # --checksum: source rel -> (destination rel, items by source name) awaiting hashes
        self.hashing: dict[str, tuple[str, dict[str, _HashItem]]] = {}
        # move: what landed, for the source side to remove (None unless a real move)
        self.landed: LandedLog | None = LandedLog() if spec.operation == "move" and not spec.dry_run else None
        self._settles = (
            cscan.HAVE_CMPDIR
            and self.landed is None
            and spec.compare in (Compare.SIZE_MTIME, Compare.SIZE_ONLY)
            and not spec.filters.active
        )
        """Whether _plan may settle up-to-date files in bulk (_settle_same): a move logs each one
        (LandedLog), and filters or another comparison decide per entry."""
        # -v / --dry-run: what changed here (None unless asked for)
        self.actions: ActionLog | None = ActionLog() if spec.report_actions else None
        self.stopped = False
        self.bytes_needed = 0
        """Bytes of the files registered to receive data so far (progress totals)."""
        self.big_needed = 0
        """Files asked for that a sender may split (data.SPLIT_MIN): each wants another stream."""
        self.same_machine = False
        """The source is on this machine (FEATURE_MACHINE): an up-to-date entry may be the
        source itself, reached by another path (`_record_same`)."""
        self._root_dev = os.fstat(root_fd).st_dev if root_fd >= 0 else -1
        self._top: tuple[int, int] | None = None
        """The directory the transfer lands in, by (device, inode), once the top job has it: a
        source directory from this machine that is it is not copied into itself (R52)."""

    def _act(self, action: str, path: str) -> None:
        if self.actions is not None:
            self.actions.add(action, path)

    def _stop(self) -> bool:
        return self.stopped

    def stop(self) -> None:
        """Any thread: `finish` leaves the deletions it has not made yet (the run was
        interrupted, or its client went away)."""
        self.stopped = True

    def _changed(self, dst_rel: str) -> None:
        """Under the lock: an entry of dst_rel was created or replaced, so `finish` puts the
        directory's mtime back (whatever else the plan found in it)."""
        node = self.nodes.get(dst_rel)
        if node is not None:
            node.changed = True

    def _record(self, rel: str, name: str, m: Meta) -> None:
        """Move: source entry rel/name is now at the destination."""
        if self.landed is not None:
            self.landed.add(rel, name, m)

    def _is_source(self, n: _DirNode) -> bool:
        """Move: destination directory `n` is its source directory by another path (R51): the
        source must not remove it, even empty."""
        return self.same_machine and fsops.same_inode(n.meta, n.dst_meta)

    def _record_same(self, rel: str, name: str, m: Meta, dev: int, ino: int, path: str) -> None:
        """Move: an up-to-date entry (at destination device `dev`, inode `ino`) is at the
        destination, unless it is the source itself (a move would remove the only copy: a
        module that is the client's own directory, a bind mount); that one stays, a failure."""
        if self.landed is None:
            return
        if self.same_machine and (m.st_dev, m.st_ino) == (dev, ino):
            self._fail(path, "remove source", fsops.SAME_FILE)
            return
        self.landed.add(rel, name, m)

    def close(self) -> None:
        with self._lock:
            self.stopped = True
        self._reveal_all()
        self.dirs.close()
        try:
            os.close(self.root_fd)
        except OSError:
            pass

    # --- hidden new directories (R41) -----------------------------------------------------------
    def _open_dir(self, root_fd: int, rel: str) -> int:
        """open_dir through the temporary names of hidden directories on the path."""
        if not self._hidden:
            return self._open_base(root_fd, rel)
        with self._hide_lock:
            hidden = self._hidden
            parts = rel.split("/")
            at = ""
            for i, part in enumerate(parts):
                at = _join(at, part)
                h = hidden.get(at)
                if h is not None:
                    parts[i] = h
            return self._open_base(root_fd, "/".join(parts))

    def _new_dir(self, dfd: int, dst_rel: str, dname: str, acl: bool, node: _DirNode) -> None:
        """Create new directory dname in dfd (unless a dry run), hidden under a temporary name
        while the run may hide (R41), and record its node."""
        rel = _join(dst_rel, dname)
        hidden = None
        if not self.spec.dry_run:
            if self._hiding and self._made_one:
                try:
                    hidden = fsops.make_hidden_dir(dfd, acl)
                except OSError:  # (no flock here, say): made as before, and any error is its own
                    pass
            if hidden is None:
                self._made_one = True  # (after a failure too: the next ones are hidden, not tried in place again)
                try:
                    fsops.make_dir(dfd, dname, acl)
                except FileExistsError:
                    # Made meanwhile by another writer (another run into the same place): taken
                    # as it is, as mkdir -p would; what lands in it replaces names it holds.
                    if not stat.S_ISDIR(os.stat(dname, dir_fd=dfd, follow_symlinks=False).st_mode):
                        raise
        with self._hide_lock:
            if hidden is not None:
                # The fd holding its flock serves as its open directory until it is in place.
                self.dirs.pin(rel, hidden[1])
                self._hidden[rel] = hidden[0]
            with self._lock:
                self.dirs_created += 1
                self.nodes[rel] = node
        if hidden is not None and not self._hiding:  # the end (_reveal_all) began meanwhile
            self._reveal(rel)

    def _after_plan(self, dst_rel: str, whole: bool) -> None:
        """Its manifest planned (`whole`: in one part, as planned; else at part 0 or failed):
        a hidden directory with nothing more to wait for, one in parts, or one with a large
        file moves into place now."""
        with self._lock:
            node = self.nodes.get(dst_rel)
            if node is None or dst_rel not in self._hidden or node.planned:
                return
            node.planned = True
            if whole and not node.big and node.waiting:
                return
        self._reveal(dst_rel)

    def _settled(self, ps: list[_Pending]) -> list[str]:
        """Under the lock: files of `ps` landed or failed; the hidden directories now complete."""
        done: list[str] = []
        nodes, hidden = self.nodes, self._hidden
        for p in ps:
            node = nodes.get(p.dst_rel)
            if node is not None and p.dst_rel in hidden:
                node.waiting -= 1
                if node.waiting == 0 and node.planned:
                    done.append(p.dst_rel)
        return done

    def _reveal(self, rel: str) -> None:
        """Move hidden directory `rel` into place (never over an entry that took its name: ours
        merges into a directory there (_merge); anything else stays, what landed in the hidden
        one is removed and the directory reported)."""
        with self._hide_lock:
            with self._lock:  # (what _settled and _after_plan look at)
                tmp = self._hidden.pop(rel, None)
            if tmp is None:
                return
            pin = self.dirs.fd_of(rel)
            parent, _, name = rel.rpartition("/")
            try:
                pfd = self.dirs.acquire(parent)
                try:
                    cscan.rename_noreplace(pfd, _b(tmp), pfd, _b(name))
                except OSError as exc:
                    if exc.errno == errno.EEXIST and self.stopped and _is_dir(pfd, name):
                        # Cut short, and a newer run's directory has the name: ours is stale.
                        _keeping_times(pfd, lambda: fsops.remove_tree(pfd, tmp))
                        return
                    if exc.errno == errno.EEXIST and self._merge(pfd, tmp, name, rel):
                        return
                    files, nbytes, dirs, links = fsops.tally_tree(pfd, tmp)
                    try:
                        fsops.remove_tree(pfd, tmp)
                        removed = " (what landed in it was removed)"
                        with self._lock:  # the summary counts what is there, not what was removed
                            self.files_copied -= files
                            self.bytes_copied -= nbytes
                            self.dirs_created -= dirs
                            self.links_created -= links
                    except OSError:
                        removed = ""
                    self._unlanded(rel, f"{_msg(exc)}: the new directory could not be moved into place{removed}")
                finally:
                    self.dirs.release(parent)
            except OSError as exc:
                self._unlanded(rel, f"{_msg(exc)}: the new directory could not be moved into place")
            finally:
                self.dirs.release(rel, pin)  # its pin (_new_dir)

    def _unlanded(self, rel: str, message: str) -> None:
        """New directory `rel` did not move into place: reported once (its metadata and what
        was below it are not tried on whatever has the name)."""
        with self._lock:
            self.unlanded.add(rel)
        self._fail(rel, "mkdir", message)

    def _merge(self, pfd: int, tmp: str, name: str, rel: str) -> bool:
        """Under the hide lock, while the run goes on or at its finish: a directory took `name`
        while ours filled under `tmp` (the run before this one, cut short, still moving its own
        into place; another run into the same place; any writer). Ours merges into it, and
        theirs stays where it is: whoever made it keeps every fd it holds on it, and what they
        land there goes on landing. Each entry of ours moves in; a directory both have merges
        the same way; another name both have is ours (this run's copy of the source, which it
        would have replaced had it been there when the run planned); a directory against
        anything else stays theirs and is reported. Then ours is removed and the fds of what
        was removed are forgotten. False, with nothing changed, when `name` is no directory,
        or while something of ours in place below `rel` still has files to land (a directory
        moved into place early: parts, a large file)."""
        if not _is_dir(pfd, name) or (self._hiding and self._busy_below(rel)):
            return False
        problems: list[tuple[str, str]] = []
        merged = [rel]
        ours = self.dirs.acquire(rel)  # its pin: our directory
        try:
            _merge_into_named(ours, pfd, name, rel, problems, merged)
        except OSError as exc:
            problems.append((rel, f"{_msg(exc)}: the new directory could not be merged with the one made meanwhile under its name"))
        finally:
            self.dirs.release(rel, ours)
        for path, message in problems:
            self._fail(path, "merge", message)
            with self._lock:
                self.unlanded.add(path)
        try:
            fsops.remove_tree(pfd, tmp)
        except OSError:
            pass
        self.dirs.forget(merged)  # ours are gone: the next use of these opens theirs by path
        return True

    def _sweep(self) -> None:
        """The end of a run that goes on to its finish: temporaries another run held when our
        scans met them, and that nobody holds now (that run died, a client killed while we
        ran), are removed, the times of their directory kept (no next run is left to)."""
        with self._lock:
            found, self._others_tmp = self._others_tmp, []
        for rel, name in found:
            try:
                fd = self.dirs.acquire(rel)
            except OSError:
                continue
            try:
                m = os.stat(name, dir_fd=fd, follow_symlinks=False)
                if stat.S_ISDIR(m.st_mode) or stat.S_ISREG(m.st_mode):
                    _keeping_times(fd, lambda: fsops.remove_stale(fd, name, stat.S_ISDIR(m.st_mode)))
                else:  # a link or special still there since our scan: no live run is renaming it
                    _keeping_times(fd, lambda: os.unlink(name, dir_fd=fd))
            except OSError:
                pass
            finally:
                self.dirs.release(rel)

    def _busy_below(self, rel: str) -> bool:
        """Under the hide lock, while the run goes on: a directory of ours at or below `rel`,
        not inside a hidden one (those move whole), still has files to land or its manifest
        to plan."""
        hidden = self._hidden
        with self._lock:
            for r, node in self.nodes.items():
                if r != rel and not r.startswith(rel + "/"):
                    continue
                if node.waiting <= 0 and node.planned:
                    continue
                up = r
                while up != rel and up not in hidden:
                    up = up.rpartition("/")[0]
                if up == rel:
                    return True
        return False

    def _reveal_all(self) -> None:
        """The end (finish or close): nothing more is hidden; once the direct landings in flight
        are over (at most _BUSY_WAIT), every hidden directory moves into place, outermost first."""
        with self._hide_lock, self._lock:
            self._hiding = False
        if not self._hidden:
            return
        deadline = time.monotonic() + _BUSY_WAIT
        while self._direct_busy and time.monotonic() < deadline:
            time.sleep(0.001)
        if self._direct_busy:
            log.warning("%d landings still running: new directories left under temporary names", self._direct_busy)
            return
        with self._hide_lock:
            rels = sorted(self._hidden, key=lambda r: r.count("/"))
        for rel in rels:
            self._reveal(rel)

    def _fail(self, path: str, op: str, message: str) -> None:
        with self._lock:
            self.failures.append((path, op, message))

    def _note_fatal(self, err: int | None, message: str, path: str) -> bool:
        """A write here failed with `err`: a full or read-only destination (FATAL_ERRNOS) ends
        the run, as it ends a local one; the first such failure is the run's reason. True if
        it was one. Callers: the daemon refuses the transfer's next request with `fatal`
        (Session.dest_tree, tree/finish); pull_tree raises FatalError."""
        if err not in FATAL_ERRNOS:
            return False
        with self._lock:
            if self.fatal is None:
                self.fatal = f"{message} (writing {path or '.'})"
        return True

    # --- planning one directory -----------------------------------------------------------------
    def plan(
        self,
        rel: str,
        dst_rel: str,
        dst_new: bool,
        only: dict[str, str] | None,
        manifest: list[Entry],
        incomplete: bool,
        dir_entry: Entry | None = None,
        part: int = 0,
        more: bool = False,
    ) -> DirPlanned:
        """Worker thread: plan one directory and do what needs no data. A directory too large
        for one message comes in parts (protocol.FEATURE_PARTS), in order: `part` from 0,
        `more` on all but the last. The destination is scanned once, for part 0; mirror's
        extras and the source's `incomplete` are settled with the last part. A hidden new
        directory (R41) stays hidden only when it came whole and its files are small."""
        if self.stopped:
            # Its client went (or was interrupted): nothing more is made for it. A cancelled
            # session's queued plans made every special file and link they named, racing the
            # rerun that was already filling the same directories (QA).
            return DirPlanned(subdirs=[], need=[])
        whole = False
        try:
            planned = self._plan(rel, dst_rel, dst_new, only, manifest, incomplete, dir_entry, part, more)
            whole = part == 0 and not more
            return planned
        finally:
            if self._hidden:
                self._after_plan(dst_rel, whole)

    def plan_many(self, jobs: list[tuple[str, str, bool, list[Entry], bool, Entry | None]]) -> list[DirPlanned]:
        """Worker thread (push, tree/dirs): `plan` each whole directory (rel, dst_rel, dst_new,
        manifest, incomplete, dir_entry), in order."""
        return [self.plan(rel, dst_rel, new, None, entries, incomplete, dir_entry) for rel, dst_rel, new, entries, incomplete, dir_entry in jobs]

    def _plan(
        self,
        rel: str,
        dst_rel: str,
        dst_new: bool,
        only: dict[str, str] | None,
        manifest: list[Entry],
        incomplete: bool,
        dir_entry: Entry | None,
        part: int,
        more: bool,
    ) -> DirPlanned:
        spec = self.spec
        prefix = rel + "/" if rel else ""
        dprefix = dst_rel + "/" if dst_rel else ""
        failures: list[PathFailure] = []
        src: list[tuple[str, Meta]] = []
        by_name: dict[str, Entry] = {}
        check = protocol.check_name
        # A new directory (whole, no filters): its plain files (regular, one link, no xattrs)
        # can only be copies, registered straight from the manifest; plan_dir sorts the rest.
        plain: list[tuple[str, Meta, None, bool, str]] | None = (
            [] if dst_new and not spec.dry_run and only is None and not spec.filters.active and not part and not more else None
        )
        plain_names: list[bytes] = []
        make = Meta._make
        for e in manifest:
            bname = e[0]
            check(bname)
            name = _s(bname)
            m = make(e[1:12])
            if plain is not None and e[1] & 0o170000 == 0o100000 and e[9] == 1 and not (len(e) > 13 and e[13]):
                plain.append((name, m, None, False, name))
                plain_names.append(bname)
                continue
            by_name[name] = e
            src.append((name, m))
        src.sort()
        parted = self._part(rel, dst_rel, part, more)
        if incomplete and not more and not (parted is not None and parted.failed):
            with self._lock:
                self.incomplete.append(rel or ".")
        top = False
        with self._lock:
            self.entries_seen += len(src) + len(plain_names)
            if dst_rel not in self.nodes:
                top = True
                # The top directory: its metadata is the source directory's when its contents
                # are transferred (`SRC/`), nobody's when SRC itself lands inside it.
                if dir_entry is not None and only is None:
                    self.nodes[dst_rel] = _DirNode(meta_of_entry(dir_entry), None, dst_new, _xattrs(dir_entry), src_rel=rel)
                else:
                    self.nodes[dst_rel] = _DirNode(None, None, dst_new, None, src_rel=rel)
        if parted is not None and parted.failed:
            return DirPlanned(subdirs=[], need=[])  # part 0 could not use the destination
        dry = spec.dry_run
        dfd = -1
        dst: dict[str, Any] | None = None
        keep: set[str] = set()
        if not (dry and dst_new):
            try:
                dfd = self.dirs.acquire(dst_rel)
            except OSError as exc:
                failures.append(PathFailure(path=_b(dst_rel or "."), op="open destination", message=_msg(exc)))
                self._note_fatal(exc.errno, _msg(exc), dst_rel)
                return self._unplanned(rel, parted, failures)
            if dst_rel in self.dirs.opened_up:
                with self._lock:
                    self.nodes[dst_rel].changed = True
            if top and not dry:  # whether it hands new entries its group (setgid)
                gid_bit = bool(os.fstat(dfd).st_mode & stat.S_ISGID)
                with self._lock:
                    self.nodes[dst_rel].inherit_gid = gid_bit
            if not dst_rel and only is None and self._top is None and not dry:  # `SRC/ DST`: lands in the root
                st = os.fstat(dfd)
                self._top = (st.st_dev, st.st_ino)
        hit: list[str] = []
        if self.same_machine and self._top is not None:  # the destination, by another path (R52)
            hit = fsops.into_itself(src, self._top)
            for n in hit:
                failures.append(PathFailure(path=_b(prefix + n), op="copy", message=fsops.INTO_ITSELF))
            if hit:
                src = [(n, m) for n, m in src if n not in hit]
        try:
            acl: bool | None = None
            bare: set[str] | None = None
            if parted is not None and part:
                dst, keep, acl, bare = parted.dst, parted.keep, parted.acl, parted.bare
            elif dfd >= 0 and not dst_new:
                try:
                    dents, derrs, bare = self._scanned(dst_rel, part) or _dest_scan(dfd)
                except OSError as exc:
                    failures.append(PathFailure(path=_b(dst_rel or "."), op="scan destination", message=_msg(exc)))
                    return self._unplanned(rel, parted, failures)
                others: list[str] = []
                clean = len(bare) if bare is not None else 0  # _dest_scan's first, never temporaries
                dst = dict(dents[:clean]) if clean else {}
                dst.update(fsops.without_tmp(dfd, dents[clean:], dry, others))
                if others:  # another live run's: removed at our end if that run died meanwhile
                    with self._lock:
                        self._others_tmp += ((dst_rel, n) for n in others)
                keep.update(n for n, _ in derrs)
                if len(dst) < len(dents) and not dry:  # stale temporaries went: the directory's mtime moved
                    with self._lock:
                        self.nodes[dst_rel].changed = True
            settled = self._settle_same(dfd, src, by_name, dst, bare) if dst and only is None and self._settles else 0
            if settled:
                src = [x for x in src if x[0] in by_name]  # what _settle_same left to plan
            p = plan_dir(
                # A source directory not read at all (incomplete, nothing listed) has no extras
                # to count in "N destination entries kept": a local run does not plan it.
                rel, src, dst, compare=spec.compare, filters=spec.filters, mirror=spec.mirror and not more and not (incomplete and not manifest), only=only,
                keep=frozenset((keep | parted.seen if parted is not None and not more else keep) | set(hit)),  # earlier parts' names are no extras
                granularity=(lambda: fsops.time_granularity(dfd)) if dfd >= 0 else None,
            )
            if parted is not None and more:
                parted.seen.update(by_name)
            if acl is None:
                # Entries created under a default ACL inherit it (and a mode shaped by it):
                # dropped. (A directory in parts: looked up once, for all of them.)
                creates = parted is not None or bool(plain) or any(it.op in CREATES for it in p.items)
                acl = not dry and dfd >= 0 and fsops.creates_under_acl(dfd, dst_new, creates)
                if parted is not None:
                    parted.dst, parted.keep, parted.acl, parted.bare = dst, keep, acl, bare
            if p.extras:
                with self._lock:
                    self.deletions.append((dst_rel, p.extras))
            if dfd >= 0 and not dst_new and not dry and not fsops.IS_ROOT and p.writes() and fsops.open_up(dfd):
                with self._lock:  # a read-only directory of ours: its mode comes back when finalised
                    self.nodes[dst_rel].changed = True
            return self._execute(rel, dst_rel, prefix, dprefix, p, dfd, by_name, failures, acl, plain, plain_names, settled)
        finally:
            if dfd >= 0:
                self.dirs.release(dst_rel)

    def prefetch(self, dst_rel: str) -> None:
        """Worker thread: list existing destination directory `dst_rel` (`_dest_scan`) ahead
        of its plan, which then takes this listing (R72): the top of a transfer, listed while the
        source side still lists its own (both took 0.6-0.8 s for 200,000 entries, one after the
        other). A failure here leaves the plan to list it, and to say why. The caller keeps the
        tree open until this returns."""
        fut: Future[Any] = Future()
        with self._lock:
            if self.stopped or dst_rel in self._prefetched:
                return
            self._prefetched[dst_rel] = fut
        got = None
        try:
            dfd = self.dirs.acquire(dst_rel)
            try:
                got = _dest_scan(dfd)
            finally:
                self.dirs.release(dst_rel)
        except Exception:  # noqa: BLE001 - the plan lists it again, and reports what fails
            pass
        finally:
            fut.set_result(got)

    def _scanned(self, dst_rel: str, part: int) -> Any:
        """The `prefetch` listing of `dst_rel` for its first part (waiting for it if it is
        still being made), or None."""
        if part:
            return None
        with self._lock:
            fut = self._prefetched.pop(dst_rel, None)
        return None if fut is None else fut.result()

    def _settle_same(
        self, dfd: int, src: list[tuple[str, Meta]], by_name: dict[str, Entry], dst: dict[str, Any], bare: set[str] | None
    ) -> int:
        """The up-to-date files of one directory (part), settled in bulk (decisions R72): a
        regular file of one name on both sides, without xattrs on either, whose size, mtime,
        mode bits (and owner, as root) are the source's, is one plan_dir calls SAME and _same
        leaves as it is. Those leave `by_name` and `dst` (so no mirror takes one for an
        extra) and are counted as skipped; returns how many. `bare`: the destination's entries
        its scan found without xattrs (_dest_scan); None, their xattrs are looked at in one C
        call for the directory, where _same makes a listxattr through /proc per file."""
        root = fsops.IS_ROOT
        get = dst.get
        cand: list[str] = []
        for name, m in src:
            d = get(name)
            if (
                d is not None
                and m.st_mode == d.st_mode
                and m.st_size == d.st_size
                and m.st_mtime_ns == d.st_mtime_ns
                and m.st_nlink == 1
                and d.st_nlink == 1
                and m.st_mode & 0o170000 == 0o100000
                and (not root or (m.st_uid == d.st_uid and m.st_gid == d.st_gid))
            ):
                e = by_name[name]
                if not (len(e) > 13 and e[13]) and (bare is None or name in bare):
                    cand.append(name)
        if not cand:
            return 0
        flags = bytes(len(cand)) if bare is not None else cscan.xattr_flags(dfd, [_b(n) for n in cand])
        if flags is None:
            return 0
        n = 0
        for name, f in zip(cand, flags):
            if not f:
                del by_name[name], dst[name]
                n += 1
        with self._lock:
            self.files_skipped += n
        return n

    def _part(self, rel: str, dst_rel: str, part: int, more: bool) -> _Parted | None:
        """The state of a directory planned in parts (None for one in a single message):
        started by part 0, checked to come in order, dropped with the last part."""
        if not part and not more:
            return None
        with self._lock:
            st = self._parted.get(dst_rel)
            if part == 0:
                if st is not None:
                    raise Refused(ErrorCode.BAD_REQUEST, f"directory {dst_rel or '.'!r} is already being planned in parts")
                st = self._parted[dst_rel] = _Parted(rel)
            elif st is None or st.next != part or st.rel != rel:
                raise Refused(ErrorCode.BAD_REQUEST, f"part {part} of directory {rel or '.'!r} out of order")
            st.next = part + 1
            if not more:
                del self._parted[dst_rel]
        return st

    def _unplanned(self, rel: str, parted: _Parted | None, failures: list[PathFailure]) -> DirPlanned:
        """The destination directory could not be opened or scanned (`failures` say so, one
        line each in the run's failures): its source is incomplete (nothing will be deleted),
        and the later parts of it are answered with nothing."""
        if parted is not None:
            parted.failed = True
        with self._lock:
            self.incomplete.append(rel or ".")
            self.unplanned += 1
            self.failures += ((_s(f.path), f.op, f.message) for f in failures)
        return DirPlanned(subdirs=[], need=[], failures=failures)

    def check_digests(self, dirs: list[tuple[str, str, bytes, list[Entry]]]) -> DigestsChecked:
        """Worker thread, push: compare source directory digests with this side's. An equal one
        is done (every entry up to date, no extras, nothing to fix): its subdirectories are
        recorded for the end as a tree/dir would. Anything else answers False: send it in full."""
        if not digests_apply(self.spec):
            return DigestsChecked(equal=[False] * len(dirs))
        flags = cscan.DIGEST_OWNER if fsops.IS_ROOT else 0
        equal: list[bool] = []
        settled = 0
        for rel, dst_rel, digest, subdirs in dirs:
            with self._lock:
                node = self.nodes.get(dst_rel)
            if node is None or node.new:
                equal.append(False)  # only directories a parent's plan recorded, never the top
                continue
            try:
                dfd = self.dirs.acquire(dst_rel)
            except OSError:
                equal.append(False)  # its tree/dir reports why
                continue
            try:
                got = cscan.digest_dir(dfd, flags)
            finally:
                self.dirs.release(dst_rel)
            if got is None or got[0] != digest or not self._same_dir(rel, dst_rel, got, subdirs):
                equal.append(False)
                continue
            settled += got[2]
            equal.append(True)
        return DigestsChecked(equal=equal, settled=settled)

    def _same_dir(self, rel: str, dst_rel: str, got: Digest, subdirs: list[Entry]) -> bool:
        """A directory whose digest equals its source's (`got`: ours) is done: its entries
        count as seen and its files as up to date, and its subdirectories are recorded for the
        end as a plan records them (the source's `subdirs` entries, our lstat). False, and
        nothing recorded, when the subdirectories' names differ from ours."""
        if [n for n, _ in got[3]] != [e[0] for e in subdirs]:
            return False
        with self._lock:
            self.entries_seen += got[1]
            self.files_skipped += got[2]
            for e, (name, d) in zip(subdirs, got[3]):
                sname = _s(name)
                self.nodes[_join(dst_rel, sname)] = _DirNode(
                    meta_of_entry(e), d, False, None, inherit_gid=bool(d.st_mode & stat.S_ISGID), src_rel=_join(rel, sname)
                )
        return True

    def have_digests(self, dst_rels: list[str], flags: int) -> list[Digest | None]:
        """Worker thread, pull (FEATURE_PULL_DIGEST): the digests of these existing destination
        directories, for tree/have (None: no shortcut for that one; its manifest is asked for).
        Only directories a parent's plan recorded as there already, never the top."""
        if not digests_apply(self.spec):
            return [None] * len(dst_rels)
        out: list[Digest | None] = []
        for dst_rel in dst_rels:
            with self._lock:
                node = self.nodes.get(dst_rel)
            if node is None or node.new or not dst_rel:
                out.append(None)
                continue
            try:
                dfd = self.dirs.acquire(dst_rel)
            except OSError:
                out.append(None)  # its manifest's plan reports why
                continue
            try:
                out.append(cscan.digest_dir(dfd, flags))
            finally:
                self.dirs.release(dst_rel)
        return out

    def settle_have(self, jobs: list[tuple[str, str, Digest, SameDir]]) -> list[bool]:
        """Worker thread, pull: tree/have's answers for (rel, dst_rel, our digest, answer): an
        equal directory is done (`_same_dir`); True for those."""
        out = []
        for rel, dst_rel, got, answer in jobs:
            for e in answer.subdirs:
                protocol.check_name(e[0])  # type: ignore[index]  # RAW: decoded as its CBOR array
            out.append(answer.equal and self._same_dir(rel, dst_rel, got, cast("list[Entry]", answer.subdirs)))
        return out

    def _execute(
        self,
        rel: str,
        dst_rel: str,
        prefix: str,
        dprefix: str,
        p: Any,
        dfd: int,
        by_name: dict[str, Entry],
        failures: list[PathFailure],
        acl: bool,
        plain: list[tuple[str, Meta, None, bool, str]] | None = None,
        plain_names: list[bytes] | None = None,
        settled: int = 0,
    ) -> DirPlanned:
        """Do what the plan `p` of one directory needs no data for; `acl`: the directory has a
        default ACL, which what is created in it must drop. `plain`: copies into a new
        directory that bypassed plan_dir (their manifest names in `plain_names`); `settled`: its
        files _settle_same took (counted with the ones settled here)."""
        spec = self.spec
        dry = spec.dry_run
        subdirs: list[SubDir] = []
        need_ids: array[int] = array("I")
        need_names: list[bytes] = []
        hash_names: list[bytes] = []
        blocked: set[str] = set()
        changed = False
        copies: list[tuple[str, Meta, list[tuple[str, bytes]] | None, bool, str]] = []
        copy_names: list[bytes] = plain_names or []  # the need list's names of `copies`, after the others'
        with self._lock:
            pnode = self.nodes.get(dst_rel)
        parent_inherit = pnode.inherit_gid if pnode is not None else True
        if plain:
            copies += plain
        for dname, d_is_dir in p.conflicts:
            gone: list[str] = []
            try:
                n = fsops.make_way(dfd, dname, prefix + dname, d_is_dir, spec.mirror, spec.filters, dry, gone)
                changed |= not dry
            except OSError as exc:
                n = getattr(exc, "removed", 0)
                changed |= not dry and bool(gone)
                blocked.add(dname)
                failures.append(PathFailure(path=_b(dprefix + dname), op="replace", message=_msg(exc)))
            for sub in gone:
                self._act("delete", fsops.below(dprefix + dname, sub))
            if n:
                with self._lock:
                    self.files_deleted += n
        for it in p.items:
            name, dname, m, d = it.name, it.dst_name, it.src, it.dst
            if dname in blocked:
                continue
            e = by_name[name]
            xattrs = _xattrs(e)
            op = it.op
            if self.same_machine and op in _DATA_OPS and fsops.same_inode(m, d):
                op = Op.SAME  # the source itself by another path (R51): nothing to copy, and a move keeps it
            try:
                if op is Op.SUBDIR:
                    if not dry:
                        self._sync_xattrs(dfd, dname, xattrs)
                        if not dst_rel and self._top is None and d is not None:  # the top entry of `SRC DST`
                            self._top = (d.st_dev, d.st_ino)
                    with self._lock:
                        self.nodes[_join(dst_rel, dname)] = _DirNode(
                            m, fsops.meta_of(d) if d is not None else None, False, xattrs,
                            inherit_gid=bool(d.st_mode & stat.S_ISGID), src_rel=_join(rel, name),
                        )
                    subdirs.append(SubDir(name=_b(name), dname=_b(dname), new=False))
                elif op is Op.MKDIR:
                    # mkdir in a setgid directory makes a setgid directory of its group: ours hands
                    # out what its parent hands out until it is finalised (after its files).
                    node = _DirNode(m, None, True, xattrs, inherit_gid=parent_inherit, src_rel=_join(rel, name))
                    self._new_dir(dfd, dst_rel, dname, acl, node)
                    changed = not dry
                    if not dst_rel and self._top is None and not dry:  # the top entry of `SRC DST`
                        st = os.stat(dname, dir_fd=dfd, follow_symlinks=False)
                        self._top = (st.st_dev, st.st_ino)
                    self._act("mkdir", prefix + name)
                    subdirs.append(SubDir(name=_b(name), dname=_b(dname), new=True))
                elif op is Op.HARDLINK:
                    if m.st_mode & 0o170000 != 0o100000:  # a symlink, FIFO, socket or device: no data
                        self._other_link(rel, name, dst_rel, dname, m, d, xattrs, dfd, prefix + name, acl, _target(e))
                        settled += 1
                        continue
                    fid = self._hardlink(rel, name, dst_rel, dname, m, d, xattrs, dfd, prefix + name, acl)
                    if fid == _HASH:
                        hash_names.append(_b(name))
                    elif isinstance(fid, int):
                        need_ids.append(fid)
                        need_names.append(_b(name))
                    else:
                        settled += 1
                elif op is Op.HASH:
                    # --checksum, equal sizes: the source's hash decides (tree/hashes, tree/hash).
                    self._await_hash(rel, dst_rel, _HashItem(name, dname, m, fsops.meta_of(d), xattrs))
                    hash_names.append(_b(name))
                elif op is Op.SAME:
                    self._same(rel, dfd, name, dname, m, d, xattrs)
                    settled += 1
                elif op is Op.COPY:
                    if dry:
                        with self._lock:
                            self.files_copied += 1
                            self.bytes_copied += m.st_size
                        self._act("copy", prefix + name)
                        settled += 1
                        continue
                    copies.append((dname, m, xattrs, d is not None, name))
                    copy_names.append(e[0])
                elif op is Op.SYMLINK:
                    target = _target(e) or b""
                    if d is not None and stat.S_ISLNK(d.st_mode) and os.readlink(_b(dname), dir_fd=dfd) == target:
                        with self._lock:
                            self.files_skipped += 1
                        if not dry:
                            self._sync_xattrs(dfd, dname, xattrs)
                            fsops.fix_meta(dfd, dname, m, fsops.meta_of(d))
                        self._record_same(rel, name, m, d.st_dev, d.st_ino, prefix + name)
                    else:
                        if not dry:
                            fsops.make_symlink(_s(target), dfd, dname, m, d is not None, dict(xattrs) if xattrs else None)
                            changed = True
                        self._act("symlink", prefix + name)
                        with self._lock:
                            self.links_created += 1
                        self._record(rel, name, m)
                    settled += 1
                elif op is Op.SPECIAL:
                    kind = stat.S_IFMT(m.st_mode)
                    if kind in (stat.S_IFCHR, stat.S_IFBLK) and not fsops.IS_ROOT:
                        failures.append(PathFailure(path=_b(prefix + name), op="skipped", message="device nodes are recreated only as root"))
                        continue
                    if d is not None and stat.S_IFMT(d.st_mode) == kind and d.st_rdev == m.st_rdev:
                        with self._lock:
                            self.files_skipped += 1
                        if not dry:
                            # ACLs first: setting one rewrites the group bits.
                            fsops.fix_meta(dfd, dname, m, fsops.meta_of(d), self._sync_xattrs(dfd, dname, xattrs))
                        self._record_same(rel, name, m, d.st_dev, d.st_ino, prefix + name)
                    else:
                        if not dry:
                            fsops.make_special(dfd, dname, m, d is not None, acl, dict(xattrs) if xattrs else None)
                            changed = True
                        self._act("special", prefix + name)
                        with self._lock:
                            self.links_created += 1
                        self._record(rel, name, m)
                    settled += 1
            except OSError as exc:
                self._note_fatal(exc.errno, _msg(exc), dprefix + dname)
                failures.append(PathFailure(path=_b(prefix + name), op=op.name.lower(), message=_msg(exc)))
        with self._lock:
            if copies:  # registered together: one lock, one id range
                need_ids.extend(self._register_many(dst_rel, copies, rel, acl))
                need_names += copy_names
            if changed:
                self._changed(dst_rel)
            for f in failures:
                self.failures.append((_s(f.path), f.op, f.message))
        return DirPlanned(
            subdirs=subdirs, need=[], packed_need=protocol.pack_needs(need_ids, need_names), failures=failures, hash=hash_names, settled=settled
        )

    def _same(self, rel: str, dfd: int, name: str, dname: str, m: Meta, d: Any, xattrs: list[tuple[str, bytes]] | None) -> None:
        """An up-to-date file: its metadata and xattrs are made the source's."""
        with self._lock:
            self.files_skipped += 1
        if d is not None and not self.spec.dry_run:
            acl = self._sync_xattrs(dfd, dname, xattrs)
            fsops.fix_meta(dfd, dname, m, fsops.meta_of(d), acl)
        if d is not None:
            self._record_same(rel, name, m, d.st_dev, d.st_ino, _join(rel, name))
        else:
            self._record(rel, name, m)

    def _register(
        self,
        dst_rel: str,
        dname: str,
        m: Meta,
        xattrs: list[tuple[str, bytes]] | None,
        replace: bool,
        link_key: tuple[int, int] | None = None,
        *,
        rel: str = "",
        name: str = "",
        acl: bool = False,
    ) -> int:
        with self._lock:
            return self._register_many(dst_rel, [(dname, m, xattrs, replace, name)], rel, acl, link_key).start

    def _register_many(
        self, dst_rel: str, files: list[tuple[str, Meta, list[tuple[str, bytes]] | None, bool, str]], rel: str, acl: bool, link_key: tuple[int, int] | None = None
    ) -> range:
        """Under the lock: files (dname, meta, xattrs, replace, source name) of one directory
        await their data; returns their ids."""
        first = self._next_id
        end = self._next_id = first + len(files)
        sizes = [f[1][1] for f in files]  # st_size
        self.bytes_needed += sum(sizes)
        if sizes and max(sizes) >= data.SPLIT_MIN:
            self.big_needed += sum(1 for n in sizes if n >= data.SPLIT_MIN)
        node = self.nodes.get(dst_rel)
        inherit = node.inherit_gid if node is not None else True
        self.pending.update(
            zip(range(first, end), [_Pending(dst_rel, dname, m, xattrs, replace, link_key, inherit, rel, name, acl) for dname, m, xattrs, replace, name in files])
        )
        if node is not None and dst_rel in self._hidden:
            node.waiting += len(files)
            node.big = node.big or max(sizes, default=0) > HIDE_FILE_MAX
        return range(first, end)

    # --- --checksum ---------------------------------------------------------------------------------
    def _await_hash(self, rel: str, dst_rel: str, item: _HashItem) -> None:
        with self._lock:
            entry = self.hashing.get(rel)
            if entry is None:
                entry = self.hashing[rel] = (dst_rel, {})
            entry[1][item.name] = item

    def dest_hashes(self, rel: str, names: list[bytes]) -> dict[bytes, bytes | None]:
        """Worker thread (read only: may be abandoned): xxh3-128 of the destination copies of
        these source names of directory `rel` that wait for a hash."""
        with self._lock:
            entry = self.hashing.get(rel)
            if entry is None:
                return {}
            dst_rel, items = entry
            todo = [(n, items[_s(n)].dname) for n in names if _s(n) in items]
        out: dict[bytes, bytes | None] = {}
        try:
            dfd = self.dirs.acquire(dst_rel)
        except OSError:
            return {n: None for n, _ in todo}
        try:
            for n, dname in todo:
                try:
                    out[n] = fsops.file_hash(dfd, dname, self._stop)
                except InterruptedError:
                    raise
                except OSError:
                    out[n] = None
        finally:
            self.dirs.release(dst_rel)
        return out

    def settle_hashes(self, rel: str, hashes: list[FileHash], dst: dict[bytes, bytes | None] | None = None) -> DirPlanned:
        """Worker thread: the source's hashes of files that wait for one. Equal content: the file
        is up to date (metadata fixed, nothing sent); otherwise it is needed after all. `dst`:
        the destination's hashes when already computed (dest_hashes)."""
        if dst is None:
            dst = self.dest_hashes(rel, [h.name for h in hashes])
        with self._lock:
            entry = self.hashing.get(rel)
            if entry is None:
                return DirPlanned(subdirs=[], need=[])
            dst_rel, items = entry
            batch = [(items.pop(_s(h.name)), h.digest) for h in hashes if _s(h.name) in items]
            if not items:
                del self.hashing[rel]
        need_ids: array[int] = array("I")
        need_names: list[bytes] = []
        failures: list[PathFailure] = []
        settled = 0
        dry = self.spec.dry_run
        prefix = rel + "/" if rel else ""
        try:
            dfd = self.dirs.acquire(dst_rel)
        except OSError as exc:
            for it, _ in batch:
                self._fail(prefix + it.name, "checksum", _msg(exc))
                self._group_failed(it.link_key, prefix + it.name)
            return DirPlanned(subdirs=[], need=[], failures=[PathFailure(path=_b(prefix + it.name), op="checksum", message=_msg(exc)) for it, _ in batch])
        try:
            acl: bool | None = None  # whether dst_rel has a default ACL, looked up once if needed
            for it, digest in batch:
                try:
                    mine = dst.get(_b(it.name))
                    if digest is not None and mine is not None and digest == mine:
                        self._same(rel, dfd, it.name, it.dname, it.meta, it.dst, it.xattrs)
                        settled += 1
                        if it.link_key is not None:
                            self._group_landed(it.link_key, dst_rel, it.dname, it.dst.st_ino)
                    elif dry:
                        with self._lock:
                            self.files_copied += 1
                            self.bytes_copied += it.meta.st_size
                        self._act("copy", prefix + it.name)
                        settled += 1
                        if it.link_key is not None:
                            self._group_landed(it.link_key, dst_rel, it.dname, -1)
                    else:
                        if acl is None:
                            acl = fsops.has_default_acl(dfd)
                        fid = self._register(dst_rel, it.dname, it.meta, it.xattrs, True, it.link_key, rel=rel, name=it.name, acl=acl)
                        need_ids.append(fid)
                        need_names.append(_b(it.name))
                except OSError as exc:
                    self._note_fatal(exc.errno, _msg(exc), _join(dst_rel, it.dname))
                    failures.append(PathFailure(path=_b(prefix + it.name), op="checksum", message=_msg(exc)))
                    self._group_failed(it.link_key, prefix + it.name)
        finally:
            self.dirs.release(dst_rel)
        with self._lock:
            for f in failures:
                self.failures.append((_s(f.path), f.op, f.message))
        return DirPlanned(subdirs=[], need=[], packed_need=protocol.pack_needs(need_ids, need_names), failures=failures, settled=settled)

    def _sync_xattrs(self, dfd: int, dname: str, want: list[tuple[str, bytes]] | None) -> bool:
        """Make an existing entry's xattrs those of the source manifest; True if any changed."""
        path = _xattr_path(dfd, dname)
        try:
            have_any = bool(os.listxattr(path, follow_symlinks=False))
        except OSError as exc:
            if exc.errno in (errno.ENOTSUP, errno.EOPNOTSUPP, errno.EPERM, errno.EACCES):
                return False
            raise
        if not want and not have_any:
            return False
        return fsops.replace_xattrs(dfd, dname, fsops.xattrs_at(dfd, dname), dict(want or []))

    # --- hard links -------------------------------------------------------------------------------
    def _hardlink(
        self, rel: str, name: str, dst_rel: str, dname: str, m: Meta, d: Any, xattrs: list[tuple[str, bytes]] | None, dfd: int, path: str,
        acl: bool = False,
    ) -> int | str | None:  # fmt: skip
        """One member of a source hard-link group: the first needs its data (or is up to date,
        or waits for its hash under --checksum: returns _HASH), the others are linked to it once
        it has landed. Returns a file id when data is needed."""
        key = (m.st_dev, m.st_ino)
        src = (rel, name, m)
        with self._lock:
            group = self.links.get(key)
            if group is None:
                op = Op.COPY if d is None else up_to_date(m, fsops.meta_of(d), self.spec.compare, lambda: fsops.time_granularity(dfd))
                if op is Op.SAME and d is not None:
                    self.links[key] = ("landed", dst_rel, dname, d.st_ino)
                    first = None
                else:
                    self.links[key] = ("waiting", [])
                    first = op is not Op.HASH or d is None
                    if not first:
                        dst_meta = fsops.meta_of(d)
            elif group[0] == "waiting":
                group[1].append((dst_rel, dname, d.st_ino if d is not None else None, path, src))
                return None
            else:
                first = False
                group_landed = group
        if first is None:
            self._same(rel, dfd, name, dname, m, d, xattrs)
            return None
        if first is False and group is None:
            self._await_hash(rel, dst_rel, _HashItem(name, dname, m, dst_meta, xattrs, key))
            return _HASH
        if first:
            if self.spec.dry_run:
                with self._lock:
                    self.files_copied += 1
                    self.bytes_copied += m.st_size
                    self.links[key] = ("landed", dst_rel, dname, -1)
                self._act("copy", path)
                return None
            return self._register(dst_rel, dname, m, xattrs, d is not None, key, rel=rel, name=name, acl=acl)
        _, frel, fname, fino = group_landed
        self._link_to(frel, fname, fino, dst_rel, dname, d.st_ino if d is not None else None, path, src)
        return None

    def _other_link(
        self, rel: str, name: str, dst_rel: str, dname: str, m: Meta, d: Any, xattrs: list[tuple[str, bytes]] | None, dfd: int, path: str,
        acl: bool, target: bytes | None,
    ) -> None:  # fmt: skip
        """One member of a hard-linked symlink, FIFO, socket or device group: the first is made
        here at once (there is no data to wait for), the others are linked to it."""
        key = (m.st_dev, m.st_ino)
        src = (rel, name, m)
        d_ino = d.st_ino if d is not None else None
        with self._lock:
            group = self.links.get(key)
            if group is None:
                self.links[key] = ("waiting", [])
            elif group[0] == "waiting":  # another thread is making its first
                group[1].append((dst_rel, dname, d_ino, path, src))
                return
        if group is not None:
            _, frel, fname, fino = group
            self._link_to(frel, fname, fino, dst_rel, dname, d_ino, path, src)
            return
        dry = self.spec.dry_run
        try:
            link_target = _s(target or b"") if stat.S_ISLNK(m.st_mode) else None
            act = fsops.land_other(dfd, dname, m, d, link_target, dict(xattrs or ()), acl, dry)
            ino = d_ino if act is None else -1 if dry else os.stat(dname, dir_fd=dfd, follow_symlinks=False).st_ino
        except OSError:
            self._group_failed(key, path)
            raise
        if act is None:
            with self._lock:
                self.files_skipped += 1
            self._record_same(rel, name, m, d.st_dev, d.st_ino, path)
        else:
            with self._lock:
                self.links_created += 1
                if not dry:
                    self._changed(dst_rel)
            self._act(act, path)
            self._record(rel, name, m)
        assert ino is not None
        self._group_landed(key, dst_rel, dname, ino)

    def _link_to(
        self, frel: str, fname: str, fino: int, dst_rel: str, dname: str, d_ino: int | None, path: str, src: tuple[str, str, Meta] | None = None
    ) -> None:
        if d_ino is not None and d_ino == fino:
            with self._lock:
                self.files_skipped += 1
            if src is not None:
                self._record_same(*src, self._root_dev, d_ino, path)
            return
        if self.spec.dry_run:
            with self._lock:
                self.links_created += 1
            self._act("link", path)
            return
        try:
            ffd = self.dirs.acquire(frel)
            try:
                dfd = self.dirs.acquire(dst_rel)
                try:
                    fsops.make_hardlink(dfd, dname, ffd, fname, d_ino is not None)
                finally:
                    self.dirs.release(dst_rel)
            finally:
                self.dirs.release(frel)
        except OSError as exc:
            self._note_fatal(exc.errno, _msg(exc), _join(dst_rel, dname))
            self._fail(path, "link", _msg(exc))
            return
        with self._lock:
            self.links_created += 1
            self._changed(dst_rel)
        self._act("link", path)
        if src is not None:
            self._record(*src)

    def _landed(self, p: _Pending) -> None:
        assert p.link_key is not None
        try:
            dfd = self.dirs.acquire(p.dst_rel)
            try:
                ino = os.stat(p.dname, dir_fd=dfd, follow_symlinks=False).st_ino
            finally:
                self.dirs.release(p.dst_rel)
        except OSError:
            ino = -1
        self._group_landed(p.link_key, p.dst_rel, p.dname, ino)

    def _group_landed(self, key: tuple[int, int], dst_rel: str, dname: str, ino: int) -> None:
        """The first member of a hard-link group is at the destination: link the waiting ones."""
        with self._lock:
            group = self.links.get(key)
            self.links[key] = ("landed", dst_rel, dname, ino)
        waiters = group[1] if group and group[0] == "waiting" else []
        for wrel, wname, wino, wpath, wsrc in waiters:
            self._link_to(dst_rel, dname, ino, wrel, wname, wino, wpath, wsrc)

    def _group_failed(self, key: tuple[int, int] | None, first: str) -> None:
        """The first member of a hard-link group did not land. The members waiting to be linked
        to it cannot land either (the source sends a group's data once, for its first member):
        each is reported. A member planned after this starts the group again (its data is asked
        for), as rsync -aH makes the next member the group's first."""
        if key is None:
            return
        with self._lock:
            group = self.links.get(key)
            if group is None or group[0] != "waiting":
                return
            del self.links[key]
        for _wrel, _wname, _wino, wpath, _wsrc in group[1]:
            self._fail(wpath, "link", f"the first of its hard links, {first}, did not land")

    # --- landing files (data-stream threads) ------------------------------------------------------
    def failed(self, file_id: int, message: str, err: int = 0) -> None:
        """A file did not land (data-stream thread); report it under its path. `err`: the
        errno of a failure here (a full destination ends the run)."""
        with self._lock:
            p = self.pending.pop(file_id, None) or self._open.pop(file_id, None)
            done = self._settled([p]) if p is not None and self._hidden else []
        for rel in done:
            self._reveal(rel)
        if p is not None:
            self._note_fatal(err, message, _join(p.dst_rel, p.dname))
            self._fail(_join(p.dst_rel, p.dname), "copy", message)
            self._group_failed(p.link_key, _join(p.rel, p.name))

    def land_many(self, batch: list[tuple[int, int, int]], buf: bytearray | mmap.mmap) -> list[tuple[int, OSError]]:
        """Data-stream thread: land whole small files whose contents lie in `buf` (file id,
        offset, length each) in one step each (what `open` + write + commit do, without their
        objects): one C call per run of plain files of one directory (scan.land_columns),
        fsops.land_data for one with xattrs or under a default ACL, or without the C module.
        Hard-link groups and LandedLog are kept as `commit` keeps them. Returns the files that
        did not land with their error (nothing is left behind; `failed` then reports each).

        Raises:
            KeyError: a file id never announced (or twice in `batch`): nothing was landed.
        """
        with self._lock:
            pend = self.pending
            ps: list[_Pending] = []
            try:
                for fid, _, _ in batch:
                    ps.append(pend.pop(fid))
            except KeyError:
                for (fid, _, _), p in zip(batch, ps):
                    pend[fid] = p
                raise
            hiding = self._hiding and bool(self._hidden)
            if hiding:
                self._direct_busy += 1
        try:
            return self._land_many(batch, buf, ps, hiding)
        finally:
            if hiding:
                with self._lock:
                    self._direct_busy -= 1

    def _land_many(self, batch: list[tuple[int, int, int]], buf: bytearray | mmap.mmap, ps: list[_Pending], hiding: bool) -> list[tuple[int, OSError]]:
        failed: list[tuple[int, OSError]] = []  # (index in batch, error)
        i, n = 0, len(batch)
        while i < n:
            rel = ps[i].dst_rel
            j = i + 1
            while j < n and ps[j].dst_rel == rel:
                j += 1
            try:
                dfd = self.dirs.held(rel)
            except OSError as exc:
                failed += ((k, exc) for k in range(i, j))
                i = j
                continue
            landed: list[_Pending] = []
            nbytes = 0
            c_idx: list[int] = []
            c_names: list[str] = []
            c_ints: list[int] = []
            c_offs: list[int] = []
            c_flags: list[int] = []
            for k in range(i, j):
                p = ps[k]
                _, at, size = batch[k]
                if p.xattrs is None and not p.acl and _C_LAND:
                    m = p.meta
                    c_idx.append(k)
                    c_names.append(p.dname)
                    c_ints += (0, m[0], size, m[3], m[2], m[4], m[5])  # scan.land_columns' order
                    c_offs.append(at)
                    c_flags.append((_LAND_REPLACE if p.replace else 0) | (_LAND_INHERIT_GID if p.inherit_gid else 0))
                    continue
                try:
                    fsops.land_data(dfd, p.dname, memoryview(buf)[at : at + size], p.meta, p.xattrs, p.replace, p.inherit_gid, p.acl)
                except OSError as exc:
                    failed.append((k, exc))
                    continue
                landed.append(p)
                nbytes += size
            if c_idx:
                # In a hidden directory (R41) a file is created under its own name: nobody sees
                # it before the directory moves into place, which waits for these files.
                direct = hiding and rel in self._hidden
                res = cscan.land_columns(dfd, buf, _b("\0".join(c_names)), c_ints, c_offs, c_flags, direct)
                if any(res):
                    for k, r in zip(c_idx, res):
                        if r:
                            failed.append((k, OSError(-r, os.strerror(-r))))
                        else:
                            landed.append(ps[k])
                            nbytes += batch[k][2]
                else:
                    landed += [ps[k] for k in c_idx]
                    nbytes += sum(c_ints[2::7])
            if landed:
                self._done_group(rel, landed, nbytes)
            i = j
        if failed:
            with self._lock:
                for k, _ in failed:
                    self._open[batch[k][0]] = ps[k]  # for `failed`
        return [(batch[k][0], exc) for k, exc in failed]

    def _done(self, p: _Pending, size: int) -> None:
        self._done_group(p.dst_rel, [p], size)

    def _done_group(self, dst_rel: str, files: list[_Pending], nbytes: int) -> None:
        """Files of one destination directory landed (`nbytes` in all): count them, mark the
        directory changed, log them for a move, link the rest of their hard-link groups."""
        done: list[str] = []
        with self._lock:
            self.files_copied += len(files)
            self.bytes_copied += nbytes
            self._changed(dst_rel)
            if self._hidden:
                node = self.nodes.get(dst_rel)
                if node is not None and dst_rel in self._hidden:
                    node.waiting -= len(files)
                    if node.waiting == 0 and node.planned:
                        done.append(dst_rel)
        for rel in done:
            self._reveal(rel)
        if self.actions is not None or self.landed is not None:
            for p in files:
                self._act("copy", _join(p.rel, p.name))
                if self.landed is not None:
                    self.landed.add(p.rel, p.name, p.meta)
        for p in files:
            if p.link_key is not None:
                self._landed(p)

    def open(self, file_id: int) -> data.SinkFile:
        with self._lock:
            p = self.pending.pop(file_id)  # KeyError: never announced
            self._open[file_id] = p
        dfd = self.dirs.acquire(p.dst_rel)
        try:
            landing = fsops.Landing(dfd, stat.S_IMODE(p.meta.st_mode))
        except BaseException:
            self.dirs.release(p.dst_rel)
            raise
        return _DestFile(self, file_id, p, landing)

    def orphans(self) -> int:
        """Files planned whose data never came (their stream failed)."""
        with self._lock:
            return len(self.pending)

    # --- the end ----------------------------------------------------------------------------------
    def finish(self, source_complete: bool) -> None:
        """Worker thread: directory metadata bottom-up, then mirror deletions. After a fatal
        failure (`fatal`) nothing more is changed: the run stops there, as a local one does.
        Hidden new directories (R41) move into place first, whatever happened."""
        self._reveal_all()
        if self.fatal is not None:
            return
        self._sweep()
        with self._lock:
            missing = list(self.pending.items())
            self.pending.clear()
            unhashed = [(rel, it) for rel, (_d, items) in self.hashing.items() for it in items.values()]
            self.hashing.clear()
        for _fid, p in missing:
            self._fail(_join(p.dst_rel, p.dname), "copy", "the data never arrived")
            self._group_failed(p.link_key, _join(p.rel, p.name))
        for rel, it in unhashed:
            self._fail(_join(rel, it.name), "checksum", "the source's checksum never arrived")
            self._group_failed(it.link_key, _join(rel, it.name))
        kept: set[str] = set()  # move: directories whose metadata failed keep their source
        # A directory whose contents did not all come (its source could not be read whole, or
        # it could not be opened here) keeps its metadata: one made here stays 0o700, so a mode
        # that locks the source does not lock the rerun out (as locally, transfer.py).
        unread = set(self.incomplete)
        if not self.spec.dry_run:
            for rel in sorted(self.nodes, key=lambda r: (-r.count("/") if r else 1, r)):
                node = self.nodes[rel]
                if node.meta is None or (node.src_rel or ".") in unread:
                    continue
                if self.unlanded and _within(rel, self.unlanded):
                    kept.add(rel)  # never in place (reported): its source stays
                    continue
                top = not rel  # an existing top directory (`SRC/ DST/`): no parent's plan syncs its xattrs
                if not (top or node.new or node.changed or node.dst_meta is None or _dir_differs(node.meta, node.dst_meta)):
                    continue
                try:
                    fd = self.dirs.open_dir(self.root_fd, rel)
                    try:
                        if top and not node.new:
                            self._sync_xattrs(fd, ".", node.xattrs)
                        fsops.set_dir_meta(fd, node.meta, node.xattrs if node.new else None)
                    finally:
                        os.close(fd)
                except OSError as exc:
                    self._fail(rel or ".", "directory metadata", _msg(exc))
                    kept.add(rel)
        if self.landed is not None:
            self._end_move(kept)
        if not self.deletions:
            return
        if self.incomplete or not source_complete:
            # Counted as the deletion would have counted them: every entry below an extra directory.
            n = sum(
                fsops.count_extras(self.root_fd, dst_rel, [name for name, _ in extras], self.spec.filters, self.dirs.open_dir)
                for dst_rel, extras in self.deletions
            )
            k = len(self.incomplete) - self.unplanned  # source directories not read whole
            if not k and not self.unplanned:
                k = 1  # the source's walk itself stopped short (source_complete)
            # self.unplanned (one that vanished meanwhile, say): not the source's fault
            self.deletions_skipped = nothing_deleted(k, self.unplanned, n)
            return
        if self.spec.dry_run:
            for dst_rel, extras in self.deletions:
                names = [name for name, _ in extras]
                gone: list[str] = []
                self.files_deleted += fsops.count_extras(self.root_fd, dst_rel, names, self.spec.filters, self.dirs.open_dir, gone)
                for path in gone:
                    self._act("delete", path)
            return
        for dst_rel, extras in self.deletions:
            if self.stopped:  # `stop` (the client went, Ctrl-C): what is left stays
                return
            try:
                fd = self.dirs.open_dir(self.root_fd, dst_rel)
            except OSError as exc:
                self._fail(dst_rel or ".", "delete", _msg(exc))
                continue
            try:
                for name, _is_dir in extras:
                    path = _join(dst_rel, name)
                    subs: list[str] = []
                    stuck: list[tuple[str, str]] = []  # entries below it that would not go
                    try:
                        # A read-only directory of ours (0555) is opened up, its mode put back
                        # below with its mtime (as locally).
                        self.files_deleted += fsops.remove_extra_opening(fd, name, path, self.spec.filters, subs, self._stop, stuck)
                    except InterruptedError as exc:  # stopped: what went is named below
                        self.files_deleted += fsops.removed_below(exc)
                    except OSError as exc:
                        self.files_deleted += fsops.removed_below(exc)
                        self._fail(path, "delete", _msg(exc))
                    for where, why in stuck:
                        self._fail(where, "delete", why)
                    for sub in subs:
                        self._act("delete", fsops.below(path, sub))
                    if self.stopped:
                        break
            finally:
                os.close(fd)
        # Deletions changed directory mtimes: put back those of directories that had extras
        # (as a local run does; one whose metadata failed above is not named twice).
        for dst_rel, _extras in self.deletions:
            dnode = self.nodes.get(dst_rel)
            if dnode is not None and dnode.meta is not None and dst_rel not in kept:
                try:
                    fd = self.dirs.open_dir(self.root_fd, dst_rel)
                    try:
                        fsops.set_dir_meta(fd, dnode.meta, None)
                    finally:
                        os.close(fd)
                except OSError as exc:
                    self._fail(dst_rel or ".", "directory metadata", _msg(exc))

    def _end_move(self, kept: set[str]) -> None:
        """Move: every entry has landed; the source directories follow (deepest first, once
        empty), then the destination filesystem is flushed before anything is confirmed."""
        assert self.landed is not None
        dirs = [(n.src_rel, rel) for rel, n in self.nodes.items() if n.src_rel and rel not in kept and not self._is_source(n)]
        dirs.sort(key=lambda x: (-x[0].count("/"), x[0]))
        self.landed.end([d for d, _ in dirs])
        try:
            ffi.syncfs(self.root_fd)
        except OSError as exc:
            self.landed.clear()
            self._fail(".", "sync", f"{_msg(exc)}: no source entry was removed")
        if self.landed.dropped:
            self._fail(".", "remove source", f"{self.landed.dropped} entries kept at the source: too many confirmations were waiting")

    def sync_landed(self) -> tuple[list[RemoveGroup], list[PathFailure]]:
        """Worker thread, move, during the transfer: the next page of landed entries, after a
        syncfs of the destination (what is taken had landed before it)."""
        assert self.landed is not None
        page = self.landed.take()
        if not page:
            return [], []
        try:
            ffi.syncfs(self.root_fd)
        except OSError as exc:
            n = page_size(page)
            return [], [PathFailure(path=b".", op="sync", message=f"{_msg(exc)}: {n} source entries kept")]
        return page, []

    def result(self) -> TreeDone:
        return TreeDone(
            files_copied=self.files_copied,
            bytes_copied=self.bytes_copied,
            files_skipped=self.files_skipped,
            dirs_created=self.dirs_created,
            links_created=self.links_created,
            files_deleted=self.files_deleted,
            entries_seen=self.entries_seen,
            failures=[PathFailure(path=_b(p), op=o, message=m[: protocol.MAX_TEXT]) for p, o, m in self.failures[: protocol.MAX_LIST]],
            deletions_skipped=self.deletions_skipped,
        )


def _merge_into(ours: int, theirs: int, rel: str, problems: list[tuple[str, str]], merged: list[str]) -> None:
    """Move each entry of directory `ours` into `theirs` (DestTree._merge). A name both have:
    directories merge the same way, depth first (their paths added to `merged`); other
    entries are replaced by ours; a directory against anything else stays theirs, reported in
    `problems` as (path, message), as is whatever could not move."""
    for name in sorted(os.listdir(ours)):
        path = _join(rel, name)
        try:
            cscan.rename_noreplace(ours, _b(name), theirs, _b(name))
            continue
        except FileExistsError:
            pass
        except OSError as exc:
            problems.append((path, f"{_msg(exc)}: could not be moved into the directory made meanwhile under its parent's name"))
            continue
        try:
            mine, other = _is_dir(ours, name), _is_dir(theirs, name)
            if mine and other:
                merged.append(path)
                o = os.open(name, fsops.O_DIR, dir_fd=ours)
                try:
                    _merge_into_named(o, theirs, name, path, problems, merged)
                finally:
                    os.close(o)
            elif mine or other:
                what = "a directory" if other else "an entry that is not a directory"
                problems.append((path, f"File exists: {what} took its name meanwhile (kept; this run's was not)"))
            else:
                os.rename(name, name, src_dir_fd=ours, dst_dir_fd=theirs)
        except OSError as exc:
            problems.append((path, f"{_msg(exc)}: could not be moved into the directory made meanwhile under its parent's name"))


def _merge_into_named(ours: int, parent: int, name: str, rel: str, problems: list[tuple[str, str]], merged: list[str]) -> None:
    """_merge_into the directory `name` of `parent`."""
    theirs = os.open(name, fsops.O_DIR, dir_fd=parent)
    try:
        _merge_into(ours, theirs, rel, problems, merged)
    finally:
        os.close(theirs)


def _within(rel: str, roots: set[str]) -> bool:
    """`rel` is one of `roots` or below one."""
    while rel:
        if rel in roots:
            return True
        rel = rel.rpartition("/")[0]
    return False


def _is_dir(dir_fd: int, name: str) -> bool:
    """`name` in `dir_fd` is a directory (not through a link); False if it cannot be looked at."""
    try:
        return stat.S_ISDIR(os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode)
    except OSError:
        return False


def _keeping_times(dir_fd: int, change: Callable[[], object]) -> None:
    """Run `change` (a removal inside directory `dir_fd`) and put the directory's times back:
    removing a stale temporary is no change the directory's metadata should show."""
    st = os.fstat(dir_fd)
    try:
        change()
    finally:
        try:
            os.utime(dir_fd, ns=(st.st_atime_ns, st.st_mtime_ns))
        except OSError:
            pass


def _dir_differs(m: Meta, d: Meta) -> bool:
    return (
        d.st_mtime_ns != m.st_mtime_ns
        or stat.S_IMODE(d.st_mode) != stat.S_IMODE(m.st_mode)
        or (fsops.IS_ROOT and (d.st_uid != m.st_uid or d.st_gid != m.st_gid))
    )


class _DestFile:
    __slots__ = ("tree", "p", "landing", "fd", "fid", "held")

    def __init__(self, tree: DestTree, fid: int, p: _Pending, landing: Any) -> None:
        self.tree = tree
        self.fid = fid
        self.p = p
        self.landing = landing
        self.fd = landing.fd
        self.held = True  # this file holds a reference to its directory's fd

    def _release(self) -> None:
        """Drop the directory reference, once: a second release would let the fd be closed (and
        its number reused) while another file of that directory still lands through it."""
        if self.held:
            self.held = False
            self.tree.dirs.release(self.p.dst_rel)

    def commit(self, size: int) -> None:
        p = self.p
        try:
            self.landing.finish_meta(p.meta, p.xattrs, p.dname, p.inherit_gid, p.acl)
            self.landing.commit(p.dname, p.replace)
        except BaseException:
            self.landing.abort()
            raise
        finally:
            self._release()
        with self.tree._lock:
            self.tree._open.pop(self.fid, None)
        self.tree._done(p, size)

    def abort(self) -> None:
        """Drop the file (after a failed commit too: the caller aborts whatever did not land)."""
        try:
            if self.held:
                self.landing.abort()
        finally:
            self._release()


# =================================================================================================
# Client drivers


@dataclass
class TopJob:
    """The first directory job of a tree transfer (api.resolve's result, in wire form)."""

    rel: str = ""
    dst_rel: str = ""
    dst_new: bool = False
    only: dict[str, str] | None = None


def _narrowed(manifest: DirManifest, only: dict[str, str]) -> DirManifest:
    """Pull of `SRC`: the daemon lists SRC's parent whole; only the named entries, their
    failures and their incompleteness are the run's (QA: a sibling whose time blit cannot keep
    failed the run and stopped mirror's deletions)."""
    entries = [e for e in cast("list[Entry]", manifest.entries) if _s(e[0]) in only]
    failures = [f for f in manifest.failures if _s(f.path.rpartition(b"/")[2]) in only]
    return dataclasses.replace(manifest, entries=cast("list[SrcEntry]", entries), failures=failures, incomplete=bool(failures), packed=None)


def _only_wire(only: dict[str, str] | None) -> list[protocol.Rename] | None:
    if only is None:
        return None
    return [protocol.Rename(name=_b(k), dname=_b(v)) for k, v in only.items()]


Job = tuple[str, str, bool, "dict[str, str] | None"]
"""A directory job of a walk: (rel, dst_rel, dst_new, only)."""
DIGEST_GROUP = 16
"""Push with digests: existing directories summarised per walk job (one thread hop each side)."""
DIGEST_ENTRIES = 50_000
"""... and at most this many entries per tree/digests request (the daemon answers in time)."""


async def _walk(
    top: TopJob,
    visit: Callable[[str, str, bool, dict[str, str] | None], Any],
    group: Callable[[list[Job]], Any] | None = None,
    many: Callable[[list[Job]], Awaitable[list[list[tuple[str, str, bool]] | None]]] | None = None,
    behind: Callable[[], bool] | None = None,
) -> None:
    """Depth-first over directories, WALK_CONCURRENCY jobs at a time; `visit` returns the subdirs
    [(name, dname, new)] to descend into (decided by the destination side). `group`, when given,
    takes up to DIGEST_GROUP existing directories below the top at once (digests: push
    tree/digests, pull tree/have) and returns (jobs to descend into, jobs to visit in full).
    `many` visits up to protocol.BATCH_DIRS directories below the top at once (pull:
    tree/scans; push: new directories, tree/dirs) and returns each one's subdirs, or None for
    one it did not get to (visited again later). While `behind()` says the data is far behind
    the walk (a pull: MAX_QUEUED_FILES asked for and not landed), no new job starts, so the
    walk's memory stays bounded on any tree. The first error cancels the rest of the walk and is
    raised alone."""
    stack: list[tuple[Job, bool]] = [((top.rel, top.dst_rel, top.dst_new, top.only), True)]  # (job, full)
    active = 0
    changed = trio.Event()
    errors: list[BaseException] = []

    async def run(jobs: list[Job], full: bool | None) -> None:
        """`full`: True, visit jobs[0]; False, digests for `group`; None, `many`."""
        nonlocal active, changed
        try:
            if full is not False:
                if full is None:
                    assert many is not None
                    results = await many(jobs)
                else:
                    results = [await visit(*jobs[0])]
                stack.extend((j, False) for j, r in zip(reversed(jobs), reversed(results)) if r is None)
                for j, r in zip(reversed(jobs), reversed(results)):
                    for name, dname, new in reversed(r or ()):
                        stack.append(((_join(j[0], name), _join(j[1], dname), new, None), False))
            else:
                assert group is not None
                children, again = await group(jobs)
                stack.extend((j, False) for j in reversed(children))
                stack.extend((j, True) for j in reversed(again))
        except Exception as exc:
            errors.append(exc)
            nursery.cancel_scope.cancel()
        finally:
            active -= 1
            changed.set()
            changed = trio.Event()

    batches = 0
    async with trio.open_nursery() as nursery:
        while (stack or active) and not errors:
            if stack and behind is not None and behind():
                with trio.move_on_after(BEHIND_POLL):  # landing threads: no event to wait on
                    await changed.wait()
                continue
            while stack and active < WALK_CONCURRENCY and not errors:
                active += 1
                job, full = stack.pop()
                if many is not None and not full and (group is None or job[2]):
                    batch = [job]
                    # The first batches small (1, 2, 4, ...): the data starts while later
                    # directories are still listed and planned.
                    limit = min(protocol.BATCH_DIRS, 1 << batches)
                    batches += 1
                    while len(batch) < limit and stack and not stack[-1][1] and (group is None or stack[-1][0][2]):
                        batch.append(stack.pop()[0])
                    nursery.start_soon(run, batch, True if len(batch) == 1 else None)
                    continue
                if full or group is None or job[2]:
                    nursery.start_soon(run, [job], True)
                    continue
                batch = [job]
                while len(batch) < DIGEST_GROUP and stack and not stack[-1][1] and not stack[-1][0][2]:
                    batch.append(stack.pop()[0])
                nursery.start_soon(run, batch, False)
            await changed.wait()
    if errors:
        raise errors[0]


@dataclass
class TreeCounters:
    """Live counts of a tree transfer for progress reports, read by the caller's ticker (trio
    side; the counters are plain ints written by stream threads)."""

    streams: list[data.StreamStats] = field(default_factory=list)
    settled: int = 0  # push: entries the daemon settled without data
    dest: DestTree | None = None  # pull: the local destination side
    want_totals: bool = False
    """Someone shows progress: a push adds up the bytes the daemon asks for (`needed`)."""
    needed: int = 0
    """Push: bytes of the files the daemon asked for so far (their sizes in the manifest)."""
    planned: bool = False
    """Every directory is planned: the bytes to move are known (`totals`)."""

    def totals(self) -> tuple[None, int] | None:
        """(None, bytes the data streams will have moved) once every directory is planned: for
        an ETA. Entries are not counted ahead (hard-link members still waiting, hashes...)."""
        if not self.planned:
            return None
        return None, self.dest.bytes_needed if self.dest is not None else self.needed

    def snapshot(self) -> tuple[int, int]:
        """(files done, bytes moved so far)."""
        nbytes = sum(s.bytes for s in self.streams)
        d = self.dest
        if d is not None:
            return d.files_copied + d.files_skipped + d.links_created, nbytes
        return self.settled + sum(s.files for s in self.streams), nbytes


_DATA_OPS = frozenset((Op.COPY, Op.HASH, Op.HARDLINK))
"""What lands data in place of an existing destination entry (DestTree._execute, R51)."""


def _sizes(msg: protocol.TreeDir) -> dict[bytes, int]:
    """The sizes of the entries of a directory part, by name (its packed entries too)."""
    sizes = {e[0]: e[2] for e in cast("list[Entry]", msg.entries)}
    if msg.packed is not None:
        sizes.update((e[0], e[2]) for e in protocol.unpack_entries(msg.packed))
    return sizes


def _needed_bytes(msg: protocol.TreeDir, planned: DirPlanned) -> int:
    """Push: the bytes of the files of `msg` the daemon asked for in `planned` (their sizes)."""
    sizes = _sizes(msg)
    names = [n.name for n in planned.need]
    if planned.packed_need is not None:
        names += protocol.unpack_needs(planned.packed_need)[1]
    return sum(sizes.get(n, 0) for n in names)


def actions_dropped_failure(n: int) -> PathFailure:
    """The failure a run reports when the destination could not keep `n` of its actions."""
    return PathFailure(path=b".", op="list actions", message=f"{n} changes were not listed: the destination's list of them was full")


def _hash_batches(names: list[bytes], sizes: dict[bytes, int]) -> list[tuple[list[bytes], int]]:
    """--checksum names in batches of at most HASH_BATCH_BYTES / HASH_BATCH_FILES (a larger
    file alone), each with its byte count."""
    out: list[tuple[list[bytes], int]] = []
    cur: list[bytes] = []
    nbytes = 0
    for n in names:
        size = sizes.get(n, 0)
        if cur and (nbytes + size > HASH_BATCH_BYTES or len(cur) >= HASH_BATCH_FILES):
            out.append((cur, nbytes))
            cur, nbytes = [], 0
        cur.append(n)
        nbytes += size
    if cur:
        out.append((cur, nbytes))
    return out


async def _call_long(session: Any, msg: protocol.Message, nbytes: int) -> Any:
    """A request whose answer takes the daemon time proportional to `nbytes` (hashing): its
    timeout grows with them (a dead daemon is still noticed by the keepalive)."""
    return await session.client.call(msg, timeout=session.timeouts.request + nbytes / HASH_RATE)


async def push_tree(
    session: Any,
    local_root: bytes,
    module: str,
    remote_base: bytes,
    top: TopJob,
    spec: TreeSpec,
    streams: int = 2,
    *,
    create_base: bool = False,
    counters: TreeCounters | None = None,
    actions: Callable[[str, str], None] | None = None,
    actions_room: Callable[[], Awaitable[None]] | None = None,
    source_dir: tuple[int, int] | None = None,
    source_up: list[int] | None = None,
) -> TreeDone:
    """Push a local tree (source) to a daemon module directory (destination); `create_base`
    asks the daemon to `mkdir -p` the base first. Move: the sources the daemon confirms
    (tree/landed, synced) are removed as the confirmations come, emptied directories last.
    `actions(action, path)` gets what the daemon changes (tree/actions pages, collected while
    the transfer runs), if the daemon speaks FEATURE_ACTIONS; an older one gives none.
    `await actions_room()` after each page: a Progress's `room` (the next page waits while
    the output's reader is far behind; the run, its pings included, goes on).
    `source_dir`: the source directory's (device, inode), a directory's push: a daemon on this
    machine refuses a destination inside it (FEATURE_NEST); `source_up`: its ancestors'
    (fsops.ancestors), a mirror's: such a daemon refuses a destination that holds it
    (FEATURE_HOLD).

    Returns the daemon's tally (with the local removal count and failures for a move).
    Raises UsageError when the daemon refuses the request as such (a destination inside the
    source), TransportError / RemoteError when the session fails.
    """
    from ..errors import RemoteError, UsageError
    from .control import collapse_groups

    report = actions is not None and protocol.FEATURE_ACTIONS in session.peer.features
    nest = protocol.FEATURE_NEST in session.peer.features and source_dir is not None
    try:
        opened: protocol.TransferOpened = await session.call(protocol.OpenTree(
            module=module,
            path=remote_base,
            direction="push",
            operation=spec.operation,
            compare=int(spec.compare),
            filters=protocol.wire_rules(spec.filters.rules),
            dry_run=spec.dry_run,
            streams=streams,
            h2_data=session.force_h2_data,
            create_base=create_base,
            report_actions=report,
            machine=fsops.machine_id() if protocol.FEATURE_MACHINE in session.peer.features else b"",
            source_dir=list(source_dir) if nest and source_dir is not None else [],
            source_name=_b(next(iter(top.only.values()))) if nest and top.only else b"",
            source_up=source_up if nest and source_up and protocol.FEATURE_HOLD in session.peer.features else [],
        ))
    except RemoteError as exc:
        if exc.code == protocol.ErrorCode.BAD_REQUEST.value:  # the request, not the session
            raise UsageError(exc.message) from None
        raise
    from .client import RemoteTransfer

    t = RemoteTransfer(session, opened, "push", lazy=True)
    counters = counters if counters is not None else TreeCounters()
    counters.streams = t.stats
    root_fd = await trio.to_thread.run_sync(fsops.open_root, local_root)
    source = SourceTree(root_fd, base_path=local_root)
    jobs = data.JobQueue(split=len(opened.tokens) if protocol.FEATURE_SPLIT in session.peer.features else 1)
    complete = True
    move = spec.operation == "move" and not spec.dry_run
    hash_slots = trio.Semaphore(HASH_CALLS)
    drain_lock = trio.Lock()
    walked = 0  # move: entries sent since confirmations were last collected
    removed = 0
    local_failures: list[PathFailure] = []  # source entries not read; move: sources kept
    finished = trio.Event()
    queued = 0  # files put in `jobs` so far (RemoteTransfer.files_queued)
    trio_token = trio.lowlevel.current_trio_token()

    def split() -> None:  # a stream's thread split a file: it wants another stream
        trio_token.run_sync_soon(lambda: t.files_queued(queued + 1))

    jobs.on_split = split

    async def poll_actions() -> None:
        """Report the daemon's actions page by page until it says the transfer is over."""
        assert actions is not None
        while True:
            page: protocol.ActionPage = await session.call(protocol.TreeActions(transfer=t.id))
            emit_actions(page.actions, actions)
            if actions_room is not None:
                await actions_room()
            if not page.more:
                if page.dropped:
                    local_failures.append(actions_dropped_failure(page.dropped))
                return
            if not page.actions:
                with trio.move_on_after(protocol.ACTION_POLL):
                    await finished.wait()

    def queue(rel: str, planned: DirPlanned) -> None:
        nonlocal queued
        counters.settled += planned.settled
        if planned.need:
            jobs.put_many(source.register(rel, planned.need))
            queued += len(planned.need)
        if planned.packed_need is not None:
            ids, names = protocol.unpack_needs(planned.packed_need)
            if not source.register_names(rel, ids, names):
                from ..errors import RemoteProtocolError

                raise RemoteProtocolError("DirPlanned.packed_need: a file id the daemon had already asked for")
            jobs.put_many(ids)
            queued += len(ids)
        t.files_queued(queued)

    async def checksums(rel: str, names: list[bytes], sizes: dict[bytes, int]) -> None:
        for batch, nbytes in _hash_batches(names, sizes):
            hashes, _failures = await trio.to_thread.run_sync(source.hashes, rel, batch, abandon_on_cancel=True)
            async with hash_slots:
                extra: DirPlanned = await _call_long(session, protocol.TreeHashes(transfer=t.id, rel=_b(rel), hashes=hashes), nbytes)
            queue(rel, extra)

    async def collect(final: bool) -> None:
        """Move: take the daemon's confirmations and remove those sources (final: all of them,
        after tree/finish; otherwise what is ready now)."""
        nonlocal removed
        async with drain_lock:
            while True:
                page: protocol.LandedPage = await session.call(protocol.TreeLanded(transfer=t.id))
                local_failures.extend(page.failures)
                if page.groups:
                    try:
                        check_groups(page.groups)
                    except protocol.Refused as exc:
                        from ..errors import RemoteProtocolError

                        raise RemoteProtocolError(f"the daemon confirmed an impossible path: {exc.message}") from None
                    n, failures = await trio.to_thread.run_sync(source.remove, page.groups)
                    removed += n
                    local_failures.extend(failures)
                if not page.more or (not final and page_size(page.groups) < LANDED_PAGE):
                    return

    async def visit(
        rel: str, dst_rel: str, dst_new: bool, only: dict[str, str] | None, parts: list[DirManifest] | None = None
    ) -> list[tuple[str, str, bool]]:
        """One source directory (its `parts` when already scanned), part by part."""
        if parts is None:
            if only is None and parts_ok:
                parts = await trio.to_thread.run_sync(source.scan_parts, rel, packed)
            else:  # `SRC` (its parent, only that name), or a daemon without FEATURE_PARTS
                parts = [await trio.to_thread.run_sync(source.scan, rel, packed and only is None, only)]
        subdirs: list[tuple[str, str, bool]] = []
        for i, manifest in enumerate(parts):
            subdirs += await visit_part(rel, dst_rel, dst_new, only, manifest, i)
        return subdirs

    def tree_dir(rel: str, dst_rel: str, dst_new: bool, only: dict[str, str] | None, manifest: DirManifest, part: int) -> protocol.TreeDir:
        """One part of a directory's manifest as its TreeDir (noting what this side could not read)."""
        nonlocal complete
        if manifest.incomplete:
            complete = False
        local_failures.extend(manifest.failures)  # what this side could not read
        entries = cast("list[Entry]", manifest.entries)  # (`SRC`: scanned for its name alone)
        return protocol.TreeDir(
            transfer=t.id,
            rel=_b(rel),
            dst_rel=_b(dst_rel),
            dst_new=dst_new,
            only=_only_wire(only),
            entries=cast("list[SrcEntry]", entries),
            incomplete=manifest.incomplete,
            dir_entry=manifest.dir_entry,
            packed=manifest.packed,
            part=part,
            more=manifest.more,
        )

    async def visit_many(jobs: list[Job]) -> list[list[tuple[str, str, bool]] | None]:
        """FEATURE_DIR_BATCH: new directories scanned in one thread hop and planned in one
        tree/dirs; one in parts goes alone, part by part; None for those left for later."""
        scanned = await trio.to_thread.run_sync(source.scan_batch, [j[0] for j in jobs], packed)
        whole = [(j, parts[0]) for j, parts in zip(jobs, scanned) if len(parts) == 1]
        got: dict[str, list[tuple[str, str, bool]]] = {}
        if whole:
            msgs = [tree_dir(j[0], j[1], j[2], None, m, 0) for j, m in whole]
            try:
                reply: protocol.DirsPlanned = await session.call(protocol.TreeDirs(transfer=t.id, dirs=msgs))
            except MessageTooLarge as exc:
                raise MessageTooLarge(f"directories from {whole[0][0][0] or '.'!r} are too large to send: {exc}") from None
            if len(reply.planned) != len(msgs):
                from ..errors import RemoteProtocolError

                raise RemoteProtocolError(f"tree/dirs: {len(reply.planned)} plans for {len(msgs)} directories")
            for (j, _), msg, planned in zip(whole, msgs, reply.planned):
                got[j[0]] = await settle(j[0], msg, planned)
        for j, parts in zip(jobs, scanned):
            if len(parts) > 1:
                got[j[0]] = await visit(*j, parts)
        return [got.get(j[0]) for j in jobs]

    async def visit_part(rel: str, dst_rel: str, dst_new: bool, only: dict[str, str] | None, manifest: DirManifest, part: int) -> list[tuple[str, str, bool]]:
        msg = tree_dir(rel, dst_rel, dst_new, only, manifest, part)
        try:
            planned: DirPlanned = await session.call(msg)
        except MessageTooLarge as exc:
            raise MessageTooLarge(f"directory {rel or '.'!r} is too large to send: {exc}") from None
        return await settle(rel, msg, planned)

    async def settle(rel: str, msg: protocol.TreeDir, planned: DirPlanned) -> list[tuple[str, str, bool]]:
        """The daemon planned the directory part `msg`: queue its files, settle --checksum,
        keep the queue bounded, collect a move's confirmations; returns its subdirs."""
        nonlocal walked
        entries = cast("list[Entry]", msg.entries)
        queue(rel, planned)
        if queued == 1 and jobs.splits and _needed_bytes(msg, planned) >= data.SPLIT_MIN:
            t.files_queued(2)  # one file so far, which the stream taking it will split
        if counters.want_totals and (planned.need or planned.packed_need is not None):
            counters.needed += _needed_bytes(msg, planned)
        if planned.hash:
            await checksums(rel, planned.hash, _sizes(msg))
        while len(jobs) > MAX_QUEUED_FILES:
            await trio.sleep(0.05)
        if move:
            walked += len(entries) + (protocol.packed_count(msg.packed) if msg.packed is not None else 0)
            if walked >= LANDED_DRAIN and not drain_lock.locked():
                walked = 0
                await collect(False)
        return [(_s(sd.name), _s(sd.dname), sd.new) for sd in planned.subdirs]

    peer_features = session.peer.features
    packed = protocol.FEATURE_PACKED in peer_features
    parts_ok = protocol.FEATURE_PARTS in peer_features
    use_digests = protocol.FEATURE_DIR_DIGEST in peer_features and digests_apply(spec)
    digest_flags = cscan.DIGEST_OWNER if protocol.FEATURE_OWNERS in peer_features else 0

    async def group(batch: list[Job]) -> tuple[list[Job], list[Job]]:
        """Existing directories: send digests; descend into the equal ones, list the others."""
        got = await trio.to_thread.run_sync(dir_digests, source.root_fd, source.open_dir, [j[0] for j in batch], digest_flags)
        children: list[Job] = []
        again = [j for j, g in zip(batch, got) if g is None]
        todo = [(j, g) for j, g in zip(batch, got) if g is not None]
        while todo:
            part: list[Any] = []
            n = 0
            while todo and (not part or n + todo[0][1][1] <= DIGEST_ENTRIES):
                part.append(todo.pop(0))
                n += part[-1][1][1]
            checked: DigestsChecked = await session.call(
                protocol.TreeDigests(
                    transfer=t.id,
                    dirs=[
                        protocol.DirDigest(
                            rel=_b(j[0]), dst_rel=_b(j[1]), digest=g[0],
                            subdirs=cast("list[SrcEntry]", [[name, *m, None, None] for name, m in g[3]]),
                        )
                        for j, g in part
                    ],
                )
            )
            if len(checked.equal) != len(part):
                from ..errors import RemoteProtocolError

                raise RemoteProtocolError(f"tree/digests: {len(checked.equal)} answers for {len(part)} directories")
            counters.settled += checked.settled
            for (j, g), ok in zip(part, checked.equal):
                if ok:
                    children.extend((_join(j[0], _s(name)), _join(j[1], _s(name)), False, None) for name, _m in g[3])
                else:
                    again.append(j)
        return children, again

    async def run() -> TreeDone:
        async with trio.open_nursery() as reporter:
            if report:
                reporter.start_soon(poll_actions)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(t.run_senders, source, jobs)
                try:
                    batch = parts_ok and protocol.FEATURE_DIR_BATCH in peer_features
                    await _walk(top, visit, group if use_digests else None, visit_many if batch else None)
                    counters.planned = True
                finally:
                    jobs.close()
                    t.no_more_files()
            done: TreeDone = await session.call(protocol.TreeFinish(transfer=t.id, source_complete=complete))
            finished.set()  # the reporter collects the last pages, then ends
        return done

    try:
        try:
            with collapse_groups():
                done = await run()
        except TransportError as exc:
            if isinstance(exc, StallError):
                raise
            why = await _why_stopped(session, t.id)
            if why is not None:
                raise why from None
            raise
        if move:
            await collect(True)
            done = dataclasses.replace(done, files_removed=removed)
        if local_failures:
            done = dataclasses.replace(done, failures=[*done.failures, *local_failures])
        return done
    finally:
        source.close()


async def _why_stopped(session: Any, transfer: int) -> RemoteError | None:
    """A push whose data stream broke: the daemon ends the streams of a transfer whose
    destination filled up (or turned read-only) at once, and its answer to tree/finish says so
    (io-error, R30). That answer, or None when it gives no such reason."""
    with trio.move_on_after(WHY_STOPPED_TIMEOUT):
        try:
            await session.call(protocol.TreeFinish(transfer=transfer, source_complete=False))
        except RemoteError as exc:
            if exc.code == protocol.ErrorCode.IO_ERROR.value:
                return exc
        except TransportError:
            pass
    return None


WHY_STOPPED_TIMEOUT = 35.0
"""How long a push whose stream broke waits for the daemon's reason: its tree/finish waits up
to 30 s (handlers.FINISH_TIMEOUT) for the transfer's other streams to end."""


async def pull_tree(
    session: Any,
    module: str,
    remote_base: bytes,
    local_root: bytes | None,
    top: TopJob,
    spec: TreeSpec,
    streams: int = 2,
    *,
    create_root: bool = False,
    counters: TreeCounters | None = None,
    dest: DestTree | None = None,
    open_dest: Callable[[], Awaitable[DestTree]] | None = None,
    actions: Callable[[str, str], None] | None = None,
    actions_room: Callable[[], Awaitable[None]] | None = None,
    for_client: str = "",
    refuse_nesting: Callable[[], None] | None = None,
) -> TreeDone:
    """Pull a daemon module directory (source) into a local tree (destination): `local_root`, or
    `dest` when the caller made the DestTree (a dry run into a missing directory), or the one
    `await open_dest()` makes once the daemon has accepted the transfer (a daemon pulling from
    a peer into its module, with its containment walk: a refused move creates nothing). The
    DestTree is closed on return either way. `create_root` makes the local root (and its
    parents) once the daemon has accepted the transfer. Move: what landed here is synced, then
    removed on the daemon (tree/remove), emptied directories last. `actions(action, path)` gets what the local
    DestTree changes (spec.report_actions makes it keep them) while the transfer runs, with
    `await actions_room()` after each page (as push_tree).
    `for_client`: a daemon pulling for a remote to remote transfer names its client's address,
    which the source daemon checks too (FEATURE_CLIENT). `refuse_nesting()` runs (in a
    thread) when the daemon turns out to be on this machine, before anything is made here: it
    raises UsageError when the destination lies in the source by another path (R52).

    Raises:
        FatalError: the local root cannot be created. TransportError / RemoteError.
        UsageError: from `refuse_nesting`.
    """
    from .client import RemoteTransfer
    from .control import collapse_groups

    try:
        opened: protocol.TransferOpened = await session.call(
            protocol.OpenTree(
                module=module,
                path=remote_base,
                direction="pull",
                operation=spec.operation,
                compare=int(spec.compare),
                filters=[],
                dry_run=spec.dry_run,
                streams=streams,
                h2_data=session.force_h2_data,
                client=for_client if protocol.FEATURE_CLIENT in session.peer.features else "",
            )
        )
        same_machine = fsops.this_machine(opened.machine)
        if same_machine and refuse_nesting is not None:
            await trio.to_thread.run_sync(refuse_nesting)
        if dest is None and open_dest is not None:
            dest = await open_dest()
        if dest is None:
            assert local_root is not None
            root = local_root
            if create_root:
                try:
                    await trio.to_thread.run_sync(lambda: os.makedirs(root, exist_ok=True))
                except OSError as exc:
                    from ..errors import FatalError

                    raise FatalError(f"cannot create destination {_s(root)}: {_msg(exc)}") from None
            dest = DestTree(await trio.to_thread.run_sync(fsops.open_root, root), spec)
        dest.same_machine = same_machine
    except BaseException:
        if dest is not None:
            dest.close()
        raise
    t = RemoteTransfer(session, opened, "pull", lazy=True)
    by_dir = protocol.FEATURE_SEND_DIRS in session.peer.features
    sink: DestTree = dest
    if sink.landed is not None:
        sink.landed.with_ino = protocol.FEATURE_LANDED_INO in session.peer.features
    if counters is not None:
        counters.streams = t.stats
        counters.dest = sink
    complete = True
    hash_slots = trio.Semaphore(HASH_CALLS)
    drain_lock = trio.Lock()
    removed = 0
    finished = trio.Event()
    asked = 0  # files asked of the daemon so far (RemoteTransfer.files_queued)

    def stop_if_fatal() -> None:
        """The destination is full or read-only (DestTree.fatal): the run ends, exit 1, as a
        local run's does (R30)."""
        if sink.fatal is not None:
            from ..errors import FatalError

            raise FatalError(sink.fatal)

    async def receive() -> None:
        """The data streams until DONE. A landing that fails with FATAL_ERRNOS ends its stream
        at once (data.receive_loop, R40); the watcher ends the run within 0.1 s of any other
        fatal failure the DestTree records meanwhile (a hard-link member that cannot be linked).
        The rest of the data is not waited for."""
        async with trio.open_nursery() as n:

            async def watch() -> None:
                while True:
                    await trio.sleep(0.1)
                    stop_if_fatal()

            n.start_soon(watch)
            await t.run_receivers(sink)
            n.cancel_scope.cancel()

    async def pass_actions() -> None:
        """Hand what the DestTree logged to `actions`, until it is finished and all went."""
        log = sink.actions
        assert log is not None and actions is not None
        while True:
            page = log.take()
            emit_actions(page, actions)
            if page:
                await (actions_room() if actions_room is not None else trio.sleep(0))
            elif finished.is_set():
                return
            else:
                with trio.move_on_after(protocol.ACTION_POLL):
                    await finished.wait()

    async def checksums(rel: str, names: list[bytes], sizes: dict[bytes, int]) -> list[protocol.NeedGroup]:
        need: list[protocol.NeedGroup] = []
        for batch, nbytes in _hash_batches(names, sizes):
            got: dict[str, Any] = {}

            async def remote_side() -> None:
                async with hash_slots:
                    got["src"] = await _call_long(session, protocol.TreeHash(transfer=t.id, rel=_b(rel), names=batch), nbytes)

            async with trio.open_nursery() as n:  # both sides hash at once
                n.start_soon(remote_side)
                mine = await trio.to_thread.run_sync(sink.dest_hashes, rel, batch, abandon_on_cancel=True)
            # Unreadable sources come back without a digest: they are asked for, and their send
            # fails with the reason (reported once, then).
            extra = await trio.to_thread.run_sync(sink.settle_hashes, rel, got["src"].hashes, mine)
            if extra.packed_need is not None:
                need.append(extra.packed_need)
        return need

    async def give_back(final: bool) -> None:
        """Move: sync what landed here, then have the daemon remove those sources."""
        nonlocal removed
        assert sink.landed is not None
        async with drain_lock:
            while True:
                page, failures = await trio.to_thread.run_sync(sink.sync_landed) if not final else (sink.landed.take(), [])
                for f in failures:
                    sink._fail(_s(f.path), f.op, f.message)
                last = final and not len(sink.landed)
                if page or last:
                    done: protocol.TreeRemoved = await session.call(protocol.TreeRemove(transfer=t.id, groups=page, last=last))
                    removed += done.removed
                    for f in done.failures:
                        sink._fail(_s(f.path), f.op, f.message)
                if last or (not final and page_size(page) < LANDED_PAGE):
                    return

    async def visit(
        rel: str,
        dst_rel: str,
        dst_new: bool,
        only: dict[str, str] | None,
        manifest: DirManifest | None = None,
        groups: list[protocol.FileGroup] | None = None,
    ) -> list[tuple[str, str, bool]]:
        """One source directory: its manifest part by part (FEATURE_PARTS; part 0 is `manifest`
        when tree/scans brought it), each planned here and its files asked for before the next
        part is fetched (into `groups` when given: the caller asks for the last part's)."""
        subdirs: list[tuple[str, str, bool]] = []
        part = 0
        while True:
            if manifest is None:
                manifest = await session.call(protocol.TreeScan(transfer=t.id, rel=_b(rel), part=part))
            subdirs += await visit_part(rel, dst_rel, dst_new, only, manifest, part, groups)
            if not manifest.more:
                return subdirs
            if groups is not None:
                await ask(groups)
            await catch_up()  # a directory of millions: its parts no further ahead of the data
            part += 1
            manifest = None

    async def visit_many(jobs: list[Job]) -> list[list[tuple[str, str, bool]] | None]:
        """FEATURE_DIR_BATCH: several directories' manifests in one tree/scans, their files asked
        for in one transfer/send; None for those the daemon left for another request."""
        got: protocol.DirManifests = await session.call(protocol.TreeScans(transfer=t.id, rels=[_b(j[0]) for j in jobs]))
        if not 0 < len(got.manifests) <= len(jobs):
            from ..errors import RemoteProtocolError

            raise RemoteProtocolError(f"tree/scans: {len(got.manifests)} manifests for {len(jobs)} directories")
        out: list[list[tuple[str, str, bool]] | None] = []
        groups: list[protocol.FileGroup] = []
        for job, manifest in zip(jobs, got.manifests):
            if behind():  # a batch of large directories: planned no further ahead of the data
                await ask(groups)
                await catch_up()
            out.append(await visit(*job, manifest, groups))
        await ask(groups)
        return out + [None] * (len(jobs) - len(out))

    use_have = protocol.FEATURE_PULL_DIGEST in session.peer.features and digests_apply(spec)
    have_flags = cscan.DIGEST_OWNER if fsops.IS_ROOT else 0

    async def have(batch: list[Job]) -> tuple[list[Job], list[Job]]:
        """FEATURE_PULL_DIGEST (R72): existing directories offered as digests; descend into the
        equal ones, ask for the others' manifests."""
        got = await trio.to_thread.run_sync(sink.have_digests, [j[1] for j in batch], have_flags)
        children: list[Job] = []
        again = [j for j, g in zip(batch, got) if g is None]
        todo = [(j, g) for j, g in zip(batch, got) if g is not None]
        while todo:
            part: list[tuple[Job, Digest]] = []
            n = 0
            while todo and (not part or n + todo[0][1][1] <= DIGEST_ENTRIES):
                part.append(todo.pop(0))
                n += part[-1][1][1]
            reply: protocol.HaveChecked = await session.call(
                protocol.TreeHave(transfer=t.id, flags=have_flags, dirs=[protocol.DirHave(rel=_b(j[0]), digest=g[0]) for j, g in part])
            )
            if len(reply.dirs) != len(part):
                from ..errors import RemoteProtocolError

                raise RemoteProtocolError(f"tree/have: {len(reply.dirs)} answers for {len(part)} directories")
            equal = await trio.to_thread.run_sync(sink.settle_have, [(j[0], j[1], g, a) for (j, g), a in zip(part, reply.dirs)])
            for (j, g), ok in zip(part, equal):
                if ok:
                    children.extend((_join(j[0], _s(name)), _join(j[1], _s(name)), False, None) for name, _m in g[3])
                else:
                    again.append(j)
        return children, again

    def behind() -> bool:
        """More files asked for and not landed than a walk may run ahead (MAX_QUEUED_FILES)."""
        return len(sink.pending) > MAX_QUEUED_FILES

    async def catch_up() -> None:
        """Wait until the data is no longer behind (every file waited for was asked for)."""
        while behind():
            stop_if_fatal()
            await trio.sleep(BEHIND_POLL)

    async def ask(groups: list[protocol.FileGroup]) -> None:
        """Ask the daemon for the files of `groups` (and empty it)."""
        if groups:
            await session.call(protocol.SendFiles(transfer=t.id, files=[], dirs=list(groups)))
            groups.clear()

    async def visit_part(
        rel: str, dst_rel: str, dst_new: bool, only: dict[str, str] | None, manifest: DirManifest, part: int, groups: list[protocol.FileGroup] | None = None
    ) -> list[tuple[str, str, bool]]:
        """One part of one directory's manifest: planned here, its files asked for (by_dir:
        added to `groups` when given, for the caller to ask for)."""
        nonlocal complete, asked
        if only is not None:
            manifest = _narrowed(manifest, only)
        if manifest.incomplete:
            complete = False
        for f in manifest.failures:
            sink._fail(_s(f.path), f.op, f.message)
        entries = cast("list[Entry]", manifest.entries)
        planned = await trio.to_thread.run_sync(
            sink.plan, rel, dst_rel, dst_new, only, entries, manifest.incomplete, cast("Entry | None", manifest.dir_entry), part, manifest.more
        )
        stop_if_fatal()
        # Our DestTree names the files it needs packed (packed_need): they go on as they are.
        need = [planned.packed_need] if planned.packed_need is not None else []
        if planned.hash:
            need += await checksums(rel, planned.hash, {e[0]: e[2] for e in entries})
        if need and by_dir:
            group = protocol.FileGroup(rel=_b(rel), ids=b"".join(g.ids for g in need), names=b"".join(g.names for g in need))
            if groups is not None:
                groups.append(group)
            else:
                await session.call(protocol.SendFiles(transfer=t.id, files=[], dirs=[group]))
            asked += len(group.ids) // 4  # u32 ids (protocol.pack_needs)
        elif need:
            refs = []
            for g in need:
                ids, names = protocol.unpack_needs(g)
                refs += [protocol.FileRef(id=i, path=_b(_join(rel, _s(n)))) for i, n in zip(ids, names)]
            await session.call(protocol.SendFiles(transfer=t.id, files=refs))
            asked += len(refs)
        t.files_queued(asked + sink.big_needed)  # a file the daemon will split wants another stream
        if sink.landed is not None and len(sink.landed) >= LANDED_DRAIN and not drain_lock.locked():
            await give_back(False)
        return [(_s(sd.name), _s(sd.dname), sd.new) for sd in planned.subdirs]

    try:
        with collapse_groups():
            async with trio.open_nursery() as reporter:
                if actions is not None and sink.actions is not None:
                    reporter.start_soon(pass_actions)
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(receive)
                    if not top.dst_new and top.only is None:
                        # Listed here while the daemon lists the source (R72).
                        nursery.start_soon(functools.partial(trio.to_thread.run_sync, sink.prefetch, top.dst_rel))
                    scans = by_dir and protocol.FEATURE_DIR_BATCH in session.peer.features
                    # Listed no further ahead of the data than a push is (MAX_QUEUED_FILES).
                    await _walk(top, visit, have if use_have else None, visit_many if scans else None, behind)
                    if counters is not None:
                        counters.planned = True
                    # No more files: the daemon's senders end with DONE. (Not on a failed walk: the
                    # receivers are cancelled then, and a frozen daemon would not answer anyway.)
                    await session.call(protocol.SendFiles(transfer=t.id, files=[], last=True))
                    t.no_more_files()
                stop_if_fatal()
                remote = await session.call(protocol.TreeFinish(transfer=t.id, source_complete=complete))
                for f in remote.failures:
                    sink._fail(_s(f.path), f.op, f.message)
                await run_stoppable(sink.finish, complete, stop=sink.stop)  # Ctrl-C stops its deletions
                finished.set()
        if actions is not None and sink.actions is not None and sink.actions.dropped:
            f = actions_dropped_failure(sink.actions.dropped)
            sink._fail(_s(f.path), f.op, f.message)
        if sink.landed is not None:
            await give_back(True)
        return dataclasses.replace(sink.result(), files_removed=removed)
    finally:
        sink.close()
