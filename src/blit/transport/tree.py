"""Tree transfers over a daemon session: the source side (manifests, file data) and the
destination side (plan with the engine's planner, land with the engine's atomic writer).

docs/protocol.md §4 is the design. The destination side (`DestTree`) runs on the daemon for a
push and on the client for a pull; the source side (`SourceTree`) the other way round. Both are
plain blocking code around the engine's `fsops` and `plan.plan_dir`, called from worker threads
(one hop per directory; data-stream threads call `DestTree.open` / `SourceTree.open` per file).
`push_tree` and `pull_tree` are the client's drivers.

This module must not parse bytes (protocol.py) or own sockets (data.py, control.py).
"""

from __future__ import annotations

import errno
import logging
import os
import stat
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, cast

import trio

from .. import fsops
from ..filters import Filters
from ..fsops import Meta
from ..plan import Compare, Op, plan_dir, up_to_date
from . import data, protocol
from .protocol import (
    DirManifest,
    DirPlanned,
    Need,
    PathFailure,
    SrcEntry,
    SubDir,
    TreeDone,
)

log = logging.getLogger("blit.tree")

FATAL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS})
WALK_CONCURRENCY = 8
"""Directories in flight at once in a client's walk (requests pipelined on the session)."""
MAX_QUEUED_FILES = 20_000
"""A pushing client stops walking ahead while this many files wait for a data stream."""
MANIFEST_CHUNK = 50_000


def _msg(exc: OSError) -> str:
    return exc.strerror or str(exc)


def _join(a: str, b: str) -> str:
    return f"{a}/{b}" if a else b


def _b(s: str) -> bytes:
    return os.fsencode(s)


def _s(b: bytes) -> str:
    return os.fsdecode(b)


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
    return [(n, v) for n, v in x] if x else None


def entry_of(name: str, st: os.stat_result | Meta, target: bytes | None, xattrs: dict[str, bytes] | None) -> Entry:
    # Manifest layout: name, the Meta fields in order (read back with Meta._make(entry[1:12])),
    # symlink target, xattrs.
    return [
        _b(name),
        *fsops.meta_of(st),
        target,
        [[k, v] for k, v in sorted(xattrs.items())] if xattrs else None,
    ]


def _xattr_path(dir_fd: int, name: str) -> str:
    return f"/proc/self/fd/{dir_fd}/{name}"


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
# Source side


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
        self.files: dict[int, tuple[str, str]] = {}  # id -> (rel, name)
        self._lock = threading.Lock()
        self.dirs = _DirFds(root_fd, open_dir)

    def close(self) -> None:
        self.dirs.close()
        try:
            os.close(self.root_fd)
        except OSError:
            pass

    def scan(self, rel: str) -> DirManifest:
        """Worker thread: the manifest of directory `rel` (names, lstat, link targets, xattrs)."""
        try:
            dfd = self.open_dir(self.root_fd, rel)
        except OSError as exc:
            return DirManifest(entries=[], incomplete=True, failures=[PathFailure(path=_b(rel or "."), op="open", message=_msg(exc))])
        try:
            try:
                entries, errs = fsops.scan(dfd)
            except OSError as exc:
                return DirManifest(entries=[], incomplete=True, failures=[PathFailure(path=_b(rel or "."), op="scan", message=_msg(exc))])
            failures = [PathFailure(path=_b(_join(rel, n)), op="stat", message=_msg(e)) for n, e in errs]
            base = None if self.base is None else (f"{self.base}/{rel}" if rel else self.base)
            xattrs = _read_xattrs(dfd, [n for n, _ in entries], base)
            out = []
            for name, st in entries:
                target = None
                if stat.S_ISLNK(st.st_mode):
                    try:
                        target = os.readlink(_b(name), dir_fd=dfd)
                    except OSError as exc:
                        failures.append(PathFailure(path=_b(_join(rel, name)), op="readlink", message=_msg(exc)))
                        continue
                out.append(entry_of(name, st, target, xattrs.get(name)))
            try:
                own = os.fstat(dfd)
                dir_entry = entry_of(".", own, None, dict(fsops.get_xattrs(dfd)) or None)
            except OSError:
                dir_entry = None
            return DirManifest(
                entries=cast("list[SrcEntry]", out),
                incomplete=bool(errs) or len(out) != len(entries),
                failures=failures,
                dir_entry=cast("SrcEntry | None", dir_entry),
            )
        finally:
            os.close(dfd)

    def register(self, rel: str, needs: list[Need]) -> list[int]:
        with self._lock:
            for n in needs:
                self.files[n.id] = (rel, _s(n.name))
        return [n.id for n in needs]

    def open(self, file_id: int) -> data.SourceFile:
        """Data-stream thread: open a file to send (never following a link)."""
        with self._lock:
            rel, name = self.files.pop(file_id)
        dfd = self.dirs.acquire(rel)
        try:
            fd = os.open(name, fsops.O_SRC | os.O_NONBLOCK, dir_fd=dfd)
        finally:
            self.dirs.release(rel)
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise OSError(errno.EINVAL, "no longer a regular file")
            os.set_blocking(fd, True)
            extents = fsops.data_extents(fd, st.st_size) if fsops.is_sparse(fsops.meta_of(st)) else None
        except BaseException:
            os.close(fd)
            raise
        return SrcFile(fd, st.st_size, extents)


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

    @property
    def mirror(self) -> bool:
        return self.operation == "mirror"


@dataclass
class _Pending:
    dst_rel: str
    dname: str
    meta: Meta
    xattrs: list[tuple[str, bytes]] | None
    replace: bool
    link_key: tuple[int, int] | None = None
    inherit_gid: bool = True


@dataclass
class _DirNode:
    meta: Meta | None
    dst_meta: Meta | None
    new: bool
    xattrs: list[tuple[str, bytes]] | None
    changed: bool = False
    inherit_gid: bool = True
    """The directory may hand new files another group (setgid, or not known): chown always."""


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

    def acquire(self, rel: str) -> int:
        with self._lock:
            slot = self._fds.get(rel)
            if slot is not None:
                slot[1] += 1
                self._idle.pop(rel, None)
                return slot[0]
        fd = self.open_dir(self.root_fd, rel)
        with self._lock:
            slot = self._fds.get(rel)
            if slot is not None:  # raced: keep the first
                os.close(fd)
                slot[1] += 1
                self._idle.pop(rel, None)
                return slot[0]
            self._fds[rel] = [fd, 1]
            return fd

    def release(self, rel: str) -> None:
        close: list[int] = []
        with self._lock:
            slot = self._fds[rel]
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
            for fd, _users in self._fds.values():
                try:
                    os.close(fd)
                except OSError:
                    pass
            self._fds.clear()
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
        self.dirs = _DirFds(root_fd, open_dir)
        self._lock = threading.Lock()
        self._next_id = 1
        self.pending: dict[int, _Pending] = {}
        self._open: dict[int, _Pending] = {}  # being landed, for failure reports
        self.nodes: dict[str, _DirNode] = {}
        self.deletions: list[tuple[str, list[tuple[str, bool]]]] = []
        self.incomplete: list[str] = []
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

    def close(self) -> None:
        self.dirs.close()
        try:
            os.close(self.root_fd)
        except OSError:
            pass

    def _fail(self, path: str, op: str, message: str) -> None:
        with self._lock:
            self.failures.append((path, op, message))

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
    ) -> DirPlanned:
        """Worker thread: plan one directory and do what needs no data."""
        spec = self.spec
        prefix = rel + "/" if rel else ""
        dprefix = dst_rel + "/" if dst_rel else ""
        failures: list[PathFailure] = []
        if incomplete:
            with self._lock:
                self.incomplete.append(rel or ".")
        src: list[tuple[str, Meta]] = []
        by_name: dict[str, Entry] = {}
        check = protocol.check_name
        for e in manifest:
            check(e[0])
            name = _s(e[0])
            by_name[name] = e
            src.append((name, Meta._make(e[1:12])))
        src.sort()
        with self._lock:
            self.entries_seen += len(src)
            if dst_rel not in self.nodes:
                # The top directory: its metadata is the source directory's when its contents
                # are transferred (`SRC/`), nobody's when SRC itself lands inside it.
                if dir_entry is not None and only is None:
                    self.nodes[dst_rel] = _DirNode(meta_of_entry(dir_entry), None, dst_new, _xattrs(dir_entry))
                else:
                    self.nodes[dst_rel] = _DirNode(None, None, dst_new, None)
        dry = spec.dry_run
        dfd = -1
        dst: dict[str, Any] | None = None
        keep: set[str] = set()
        if not (dry and dst_new):
            try:
                dfd = self.dirs.acquire(dst_rel)
            except OSError as exc:
                failures.append(PathFailure(path=_b(dst_rel or "."), op="open destination", message=_msg(exc)))
                if exc.errno in FATAL_ERRNOS:
                    self.fatal = _msg(exc)
                with self._lock:
                    self.incomplete.append(rel or ".")
                return DirPlanned(subdirs=[], need=[], failures=failures)
        try:
            if dfd >= 0 and not dst_new:
                try:
                    dents, derrs = fsops.scan(dfd)
                except OSError as exc:
                    failures.append(PathFailure(path=_b(dst_rel or "."), op="scan destination", message=_msg(exc)))
                    with self._lock:
                        self.incomplete.append(rel or ".")
                    return DirPlanned(subdirs=[], need=[], failures=failures)
                dst = {}
                for dname, dm in dents:
                    if fsops.is_tmp_name(dname) and not dry:
                        try:
                            os.unlink(dname, dir_fd=dfd)
                        except OSError:
                            pass
                        continue
                    dst[dname] = dm
                keep.update(n for n, _ in derrs)
            p = plan_dir(rel, src, dst, compare=spec.compare, filters=spec.filters, mirror=spec.mirror, only=only, keep=frozenset(keep))
            if p.extras:
                with self._lock:
                    self.deletions.append((dst_rel, p.extras))
            return self._execute(rel, dst_rel, prefix, dprefix, p, dfd, by_name, failures)
        finally:
            if dfd >= 0:
                self.dirs.release(dst_rel)

    def _execute(self, rel: str, dst_rel: str, prefix: str, dprefix: str, p: Any, dfd: int, by_name: dict[str, Entry], failures: list[PathFailure]) -> DirPlanned:
        spec = self.spec
        dry = spec.dry_run
        subdirs: list[SubDir] = []
        need: list[Need] = []
        blocked: set[str] = set()
        changed = False
        for dname, d_is_dir in p.conflicts:
            if dry:
                continue
            try:
                if d_is_dir and not spec.mirror:
                    os.rmdir(dname, dir_fd=dfd)
                else:
                    fsops.remove_tree(dfd, dname)
                changed = True
            except OSError as exc:
                blocked.add(dname)
                why = "directory not empty (mirror replaces it)" if exc.errno == errno.ENOTEMPTY else _msg(exc)
                failures.append(PathFailure(path=_b(dprefix + dname), op="replace", message=why))
        for it in p.items:
            name, dname, m, d = it.name, it.dst_name, it.src, it.dst
            if dname in blocked:
                continue
            e = by_name[name]
            xattrs = _xattrs(e)
            op = it.op
            try:
                if op is Op.SUBDIR:
                    if not dry:
                        self._sync_xattrs(dfd, dname, xattrs)
                    with self._lock:
                        self.nodes[_join(dst_rel, dname)] = _DirNode(
                            m, fsops.meta_of(d) if d is not None else None, False, xattrs, inherit_gid=bool(d.st_mode & stat.S_ISGID)
                        )
                    subdirs.append(SubDir(name=_b(name), dname=_b(dname), new=False))
                elif op is Op.MKDIR:
                    if not dry:
                        fsops.make_dir(dfd, dname)
                        changed = True
                    with self._lock:
                        self.dirs_created += 1
                        # Ours, 0o700 until finalised: it hands out no group of its own.
                        self.nodes[_join(dst_rel, dname)] = _DirNode(m, None, True, xattrs, inherit_gid=False)
                    subdirs.append(SubDir(name=_b(name), dname=_b(dname), new=True))
                elif op is Op.HARDLINK:
                    fid = self._hardlink(dst_rel, dname, m, d, xattrs, dfd, prefix + name)
                    if fid is not None:
                        need.append(Need(id=fid, name=_b(name)))
                elif op in (Op.SAME, Op.HASH):
                    # HASH (--checksum) needs both contents; until the hash exchange exists the
                    # file is re-sent when sizes match (correct, not minimal).
                    if op is Op.HASH:
                        need.append(Need(id=self._register(dst_rel, dname, m, xattrs, d is not None), name=_b(name)))
                        continue
                    with self._lock:
                        self.files_skipped += 1
                    if d is not None and not dry:
                        acl = self._sync_xattrs(dfd, dname, xattrs)
                        fsops.fix_meta(dfd, dname, m, fsops.meta_of(d), acl)
                elif op is Op.COPY:
                    if dry:
                        with self._lock:
                            self.files_copied += 1
                            self.bytes_copied += m.st_size
                        continue
                    need.append(Need(id=self._register(dst_rel, dname, m, xattrs, d is not None), name=_b(name)))
                elif op is Op.SYMLINK:
                    target = _target(e) or b""
                    if d is not None and stat.S_ISLNK(d.st_mode) and os.readlink(_b(dname), dir_fd=dfd) == target:
                        with self._lock:
                            self.files_skipped += 1
                        if not dry and d.st_mtime_ns != m.st_mtime_ns:
                            fsops.fix_meta(dfd, dname, m, fsops.meta_of(d))
                    else:
                        if not dry:
                            fsops.make_symlink(_s(target), dfd, dname, m, d is not None)
                            changed = True
                        with self._lock:
                            self.links_created += 1
                elif op is Op.SPECIAL:
                    kind = stat.S_IFMT(m.st_mode)
                    if kind in (stat.S_IFCHR, stat.S_IFBLK) and not fsops.IS_ROOT:
                        failures.append(PathFailure(path=_b(prefix + name), op="skipped", message="device nodes are recreated only as root"))
                        continue
                    if d is not None and stat.S_IFMT(d.st_mode) == kind and d.st_rdev == m.st_rdev:
                        with self._lock:
                            self.files_skipped += 1
                        if not dry:
                            fsops.fix_meta(dfd, dname, m, fsops.meta_of(d))
                    else:
                        if not dry:
                            fsops.make_special(dfd, dname, m, d is not None)
                            changed = True
                        with self._lock:
                            self.links_created += 1
            except OSError as exc:
                if exc.errno in FATAL_ERRNOS:
                    self.fatal = f"{_msg(exc)} (writing {dprefix + dname})"
                failures.append(PathFailure(path=_b(prefix + name), op=op.name.lower(), message=_msg(exc)))
        if changed:
            with self._lock:
                node = self.nodes.get(dst_rel)
                if node is not None:
                    node.changed = True
        with self._lock:
            for f in failures:
                self.failures.append((_s(f.path), f.op, f.message))
        return DirPlanned(subdirs=subdirs, need=need, failures=failures)

    def _register(self, dst_rel: str, dname: str, m: Meta, xattrs: list[tuple[str, bytes]] | None, replace: bool, link_key: tuple[int, int] | None = None) -> int:
        with self._lock:
            fid = self._next_id
            self._next_id += 1
            node = self.nodes.get(dst_rel)
            inherit = node.inherit_gid if node is not None else True
            self.pending[fid] = _Pending(dst_rel, dname, m, xattrs, replace, link_key, inherit)
        return fid

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
        current = fsops.xattrs_at(dfd, dname)
        wanted = dict(want or [])
        if current == wanted:
            return False
        for n, v in wanted.items():
            if current.get(n) != v:
                try:
                    os.setxattr(path, n, v, follow_symlinks=False)
                except OSError as exc:
                    if not (n.startswith(("security.", "trusted.", "system.")) and exc.errno in (errno.EPERM, errno.EACCES, errno.ENOTSUP)):
                        raise
        for n in current.keys() - wanted.keys():
            try:
                os.removexattr(path, n, follow_symlinks=False)
            except OSError as exc:
                if not (n.startswith(("security.", "trusted.", "system.")) and exc.errno in (errno.EPERM, errno.EACCES, errno.ENOTSUP, errno.ENODATA)):
                    raise
        return True

    # --- hard links -------------------------------------------------------------------------------
    def _hardlink(self, dst_rel: str, dname: str, m: Meta, d: Any, xattrs: list[tuple[str, bytes]] | None, dfd: int, path: str) -> int | None:
        """One member of a source hard-link group: the first needs its data (or is up to date),
        the others are linked to it once it has landed. Returns a file id when data is needed."""
        key = (m.st_dev, m.st_ino)
        with self._lock:
            group = self.links.get(key)
            if group is None:
                op = Op.COPY if d is None else up_to_date(m, fsops.meta_of(d), self.spec.compare)
                if op is Op.SAME and d is not None:
                    self.links[key] = ("landed", dst_rel, dname, d.st_ino)
                    self.files_skipped += 1
                    first = None
                else:
                    self.links[key] = ("waiting", [])
                    first = True
            elif group[0] == "waiting":
                group[1].append((dst_rel, dname, d.st_ino if d is not None else None))
                return None
            else:
                first = False
        if first is None:
            if not self.spec.dry_run:
                fsops.fix_meta(dfd, dname, m, fsops.meta_of(d))
            return None
        if first:
            if self.spec.dry_run:
                with self._lock:
                    self.files_copied += 1
                    self.bytes_copied += m.st_size
                    self.links[key] = ("landed", dst_rel, dname, -1)
                return None
            return self._register(dst_rel, dname, m, xattrs, d is not None, key)
        assert group is not None
        _, frel, fname, fino = group
        self._link_to(frel, fname, fino, dst_rel, dname, d.st_ino if d is not None else None, path)
        return None

    def _link_to(self, frel: str, fname: str, fino: int, dst_rel: str, dname: str, d_ino: int | None, path: str) -> None:
        if d_ino is not None and d_ino == fino:
            with self._lock:
                self.files_skipped += 1
            return
        if self.spec.dry_run:
            with self._lock:
                self.links_created += 1
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
            self._fail(path, "link", _msg(exc))
            return
        with self._lock:
            self.links_created += 1

    def _landed(self, p: _Pending) -> None:
        if p.link_key is None:
            return
        with self._lock:
            group = self.links.get(p.link_key)
            try:
                dfd = self.dirs.acquire(p.dst_rel)
                try:
                    ino = os.stat(p.dname, dir_fd=dfd, follow_symlinks=False).st_ino
                finally:
                    self.dirs.release(p.dst_rel)
            except OSError:
                ino = -1
            self.links[p.link_key] = ("landed", p.dst_rel, p.dname, ino)
        waiters = group[1] if group and group[0] == "waiting" else []
        for wrel, wname, wino in waiters:
            self._link_to(p.dst_rel, p.dname, ino, wrel, wname, wino, _join(wrel, wname))

    # --- landing files (data-stream threads) ------------------------------------------------------
    def failed(self, file_id: int, message: str) -> None:
        """A file did not land (data-stream thread); report it under its path."""
        with self._lock:
            p = self.pending.pop(file_id, None) or self._open.pop(file_id, None)
        if p is not None:
            self._fail(_join(p.dst_rel, p.dname), "copy", message)

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
        """Worker thread: directory metadata bottom-up, then mirror deletions."""
        with self._lock:
            missing = list(self.pending.items())
            self.pending.clear()
        for _fid, p in missing:
            self._fail(_join(p.dst_rel, p.dname), "copy", "the data never arrived")
        if not self.spec.dry_run:
            for rel in sorted(self.nodes, key=lambda r: (-r.count("/") if r else 1, r)):
                node = self.nodes[rel]
                if node.meta is None:
                    continue
                if not (node.new or node.changed or node.dst_meta is None or _dir_differs(node.meta, node.dst_meta)):
                    continue
                try:
                    fd = self.dirs.open_dir(self.root_fd, rel)
                    try:
                        fsops.set_dir_meta(fd, node.meta, node.xattrs if node.new else None)
                    finally:
                        os.close(fd)
                except OSError as exc:
                    self._fail(rel or ".", "directory metadata", _msg(exc))
        if not self.deletions:
            return
        if self.incomplete or not source_complete:
            n = sum(len(x) for _, x in self.deletions)
            k = len(self.incomplete) or 1
            self.deletions_skipped = (
                f"deleted nothing: {k} source director{'y' if k == 1 else 'ies'} could not be read "
                f"completely ({n} destination entr{'y' if n == 1 else 'ies'} kept)"
            )
            return
        if self.spec.dry_run:
            self.files_deleted += sum(len(x) for _, x in self.deletions)
            return
        for dst_rel, extras in self.deletions:
            try:
                fd = self.dirs.open_dir(self.root_fd, dst_rel)
            except OSError as exc:
                self._fail(dst_rel or ".", "delete", _msg(exc))
                continue
            try:
                for name, _is_dir in extras:
                    try:
                        n, _kept = fsops.remove_extra(fd, name, _join(dst_rel, name), self.spec.filters)
                        self.files_deleted += n
                    except OSError as exc:
                        self._fail(_join(dst_rel, name), "delete", _msg(exc))
            finally:
                os.close(fd)
        # Deletions changed directory mtimes: put back those of directories that had extras.
        for dst_rel, _extras in self.deletions:
            dnode = self.nodes.get(dst_rel)
            if dnode is not None and dnode.meta is not None:
                try:
                    fd = self.dirs.open_dir(self.root_fd, dst_rel)
                    try:
                        os.utime(fd, ns=(dnode.meta.st_atime_ns, dnode.meta.st_mtime_ns))
                    finally:
                        os.close(fd)
                except OSError:
                    pass

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


def _dir_differs(m: Meta, d: Meta) -> bool:
    return (
        d.st_mtime_ns != m.st_mtime_ns
        or stat.S_IMODE(d.st_mode) != stat.S_IMODE(m.st_mode)
        or (fsops.IS_ROOT and (d.st_uid != m.st_uid or d.st_gid != m.st_gid))
    )


class _DestFile:
    __slots__ = ("tree", "p", "landing", "fd", "fid")

    def __init__(self, tree: DestTree, fid: int, p: _Pending, landing: Any) -> None:
        self.tree = tree
        self.fid = fid
        self.p = p
        self.landing = landing
        self.fd = landing.fd

    def commit(self, size: int) -> None:
        p = self.p
        try:
            self.landing.finish_meta(p.meta, p.xattrs, p.dname, p.inherit_gid)
            self.landing.commit(p.dname, p.replace)
        except BaseException:
            self.landing.abort()
            raise
        finally:
            self.tree.dirs.release(p.dst_rel)
        t = self.tree
        with t._lock:
            t._open.pop(self.fid, None)
            t.files_copied += 1
            t.bytes_copied += size
            node = t.nodes.get(p.dst_rel)
            if node is not None:
                node.changed = True
        t._landed(p)

    def abort(self) -> None:
        try:
            self.landing.abort()
        finally:
            self.tree.dirs.release(self.p.dst_rel)


# =================================================================================================
# Client drivers


@dataclass
class TopJob:
    """The first directory job of a tree transfer (api.resolve's result, in wire form)."""

    rel: str = ""
    dst_rel: str = ""
    dst_new: bool = False
    only: dict[str, str] | None = None


def _only_wire(only: dict[str, str] | None) -> list[protocol.Rename] | None:
    if only is None:
        return None
    return [protocol.Rename(name=_b(k), dname=_b(v)) for k, v in only.items()]


async def _walk(top: TopJob, visit: Callable[[str, str, bool, dict[str, str] | None], Any]) -> None:
    """Depth-first over directories, WALK_CONCURRENCY at a time; `visit` returns the subdirs
    [(name, dname, new)] to descend into (decided by the destination side). The first error
    cancels the rest of the walk and is raised alone."""
    stack: list[tuple[str, str, bool, dict[str, str] | None]] = [(top.rel, top.dst_rel, top.dst_new, top.only)]
    active = 0
    changed = trio.Event()
    errors: list[BaseException] = []

    async def run(job: tuple[str, str, bool, dict[str, str] | None]) -> None:
        nonlocal active, changed
        try:
            subdirs = await visit(*job)
            rel, dst_rel = job[0], job[1]
            for name, dname, new in reversed(subdirs):
                stack.append((_join(rel, name), _join(dst_rel, dname), new, None))
        except Exception as exc:
            errors.append(exc)
            nursery.cancel_scope.cancel()
        finally:
            active -= 1
            changed.set()
            changed = trio.Event()

    async with trio.open_nursery() as nursery:
        while (stack or active) and not errors:
            while stack and active < WALK_CONCURRENCY and not errors:
                active += 1
                nursery.start_soon(run, stack.pop())
            await changed.wait()
    if errors:
        raise errors[0]


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
) -> TreeDone:
    """Push a local tree (source) to a daemon module directory (destination); `create_base`
    asks the daemon to `mkdir -p` the base first.

    Returns the daemon's tally. Raises TransportError / RemoteError when the session fails.
    """
    from .control import collapse_groups

    opened: protocol.TransferOpened = await session.call(
        protocol.OpenTree(
            module=module,
            path=remote_base,
            direction="push",
            operation=spec.operation,
            compare=int(spec.compare),
            filters=[protocol.FilterRule(include=r.include, pattern=r.pattern) for r in spec.filters.rules],
            dry_run=spec.dry_run,
            streams=streams,
            h2_data=session.force_h2_data,
            create_base=create_base,
        )
    )
    from .client import RemoteTransfer

    t = RemoteTransfer(session, opened, "push")
    root_fd = await trio.to_thread.run_sync(fsops.open_root, local_root)
    source = SourceTree(root_fd, base_path=local_root)
    jobs = data.JobQueue()
    complete = True
    queued_room = trio.Semaphore(1)

    async def visit(rel: str, dst_rel: str, dst_new: bool, only: dict[str, str] | None) -> list[tuple[str, str, bool]]:
        nonlocal complete
        manifest = await trio.to_thread.run_sync(source.scan, rel)
        if manifest.incomplete:
            complete = False
        entries = cast("list[Entry]", manifest.entries)
        if only is not None:
            entries = [e for e in entries if _s(e[0]) in only]
        planned: DirPlanned = await session.call(
            protocol.TreeDir(
                transfer=t.id,
                rel=_b(rel),
                dst_rel=_b(dst_rel),
                dst_new=dst_new,
                only=_only_wire(only),
                entries=cast("list[SrcEntry]", entries),
                incomplete=manifest.incomplete,
                dir_entry=manifest.dir_entry,
            )
        )
        if planned.need:
            jobs.put_many(source.register(rel, planned.need))
            while len(jobs) > MAX_QUEUED_FILES:
                await trio.sleep(0.05)
        return [(_s(sd.name), _s(sd.dname), sd.new) for sd in planned.subdirs]

    try:
        with collapse_groups():
            async with trio.open_nursery() as nursery:
                nursery.start_soon(t.run_senders, source, jobs)
                try:
                    await _walk(top, visit)
                finally:
                    jobs.close()
        done: TreeDone = await session.call(protocol.TreeFinish(transfer=t.id, source_complete=complete))
        return done
    finally:
        source.close()
        del queued_room


async def pull_tree(session: Any, module: str, remote_base: bytes, local_root: bytes, top: TopJob, spec: TreeSpec, streams: int = 2) -> TreeDone:
    """Pull a daemon module directory (source) into a local tree (destination)."""
    from .client import RemoteTransfer
    from .control import collapse_groups

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
        )
    )
    t = RemoteTransfer(session, opened, "pull")
    root_fd = await trio.to_thread.run_sync(fsops.open_root, local_root)
    dest = DestTree(root_fd, spec)
    complete = True

    async def visit(rel: str, dst_rel: str, dst_new: bool, only: dict[str, str] | None) -> list[tuple[str, str, bool]]:
        nonlocal complete
        manifest: DirManifest = await session.call(protocol.TreeScan(transfer=t.id, rel=_b(rel)))
        if manifest.incomplete:
            complete = False
        for f in manifest.failures:
            dest._fail(_s(f.path), f.op, f.message)
        entries = cast("list[Entry]", manifest.entries)
        if only is not None:
            entries = [e for e in entries if _s(e[0]) in only]
        planned = await trio.to_thread.run_sync(
            dest.plan, rel, dst_rel, dst_new, only, entries, manifest.incomplete, cast("Entry | None", manifest.dir_entry)
        )
        if planned.need:
            await session.call(
                protocol.SendFiles(transfer=t.id, files=[protocol.FileRef(id=n.id, path=_b(_join(rel, _s(n.name)))) for n in planned.need])
            )
        return [(_s(sd.name), _s(sd.dname), sd.new) for sd in planned.subdirs]

    try:
        with collapse_groups():
            async with trio.open_nursery() as nursery:
                nursery.start_soon(t.run_receivers, dest)
                await _walk(top, visit)
                # No more files: the daemon's senders end with DONE. (Not on a failed walk: the
                # receivers are cancelled then, and a frozen daemon would not answer anyway.)
                await session.call(protocol.SendFiles(transfer=t.id, files=[], last=True))
        remote = await session.call(protocol.TreeFinish(transfer=t.id, source_complete=complete))
        for f in remote.failures:
            dest._fail(_s(f.path), f.op, f.message)
        await trio.to_thread.run_sync(dest.finish, complete)
        return dest.result()
    finally:
        dest.close()
