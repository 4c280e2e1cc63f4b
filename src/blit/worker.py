"""Execute one directory of a local transfer: scan both sides, plan, land what is small.

`Worker.run(job)` is plain blocking code. The coordinator (transfer.py) calls it in a worker
thread for small runs and, for large trees, in worker processes (see process_main, framed
pickles on stdin/stdout) so that the per-file Python path runs on every core. Large files, hard
links and directory metadata go back to the coordinator, which owns everything global.

This module must not import trio, print, or decide anything global (hard-link groups, deletions,
directory finalisation); it reports, the coordinator decides.
"""

from __future__ import annotations

import os
import pickle
import signal
import stat
import struct
import sys
import time
from dataclasses import dataclass, field
TYPE_CHECKING = False  # not `import typing`: it costs start-up time in every process
if TYPE_CHECKING:
    from typing import Any

from . import ffi, fsops, prefetch
from .errors import FATAL_ERRNOS
from .ffi import scan
from .filters import Filters
from .fsops import Meta, meta_of
from .plan import CREATES, Compare, Op, plan_dir



@dataclass(slots=True)
class RunSpec:
    """Everything a worker needs to know about the run; sent once to each worker process."""

    src_root: bytes
    dst_root: bytes
    mirror: bool = False
    move: bool = False
    compare: Compare = Compare.SIZE_MTIME
    filters: Filters = field(default_factory=lambda: Filters([]))
    dry_run: bool = False
    record_actions: bool = False
    big: int = 4 << 20  # regular files above this go to the coordinator's chunked copier


@dataclass(slots=True)
class DirJob:
    rel: str  # source directory, relative to src_root ("" = the root)
    dst_rel: str  # destination directory, relative to dst_root
    dst_new: bool  # the destination directory was just created (or is missing under dry-run)
    only: dict[str, str] | None = None  # transfer just these names (top entry), renamed
    # New files may get a group other than ours (setgid destination directory, or unknown).
    inherit_gid: bool = True
    # The directory the run lands in, by (device, inode), once the top job has it: a source
    # directory that is it (the destination is a bind mount of one inside the source) is not
    # copied into itself (R52).
    dst_top: tuple[int, int] | None = None


@dataclass(slots=True)
class DirResult:
    rel: str
    dst_rel: str
    scan_error: tuple[str, str] | None = None  # (op, message): the source dir could not be read
    fatal: str | None = None  # the destination is full or read-only: stop the run
    incomplete: bool = False  # some source entries could not be stat'ed
    dst_top: tuple[int, int] | None = None  # the top job found the directory the run lands in
    dst_unread: bool = False  # the destination directory could not be opened or scanned
    # name, dname, source meta, destination is new, destination meta (None when new)
    subdirs: list[tuple[str, str, Meta, bool, Meta | None]] = field(default_factory=list)
    big: list[tuple[str, str, Meta, bool]] = field(default_factory=list)  # name, dname, meta, replace
    links: list[tuple[str, str, Meta, Meta | None]] = field(default_factory=list)
    extras: list[tuple[str, bool]] = field(default_factory=list)
    failures: list[tuple[str, str, str]] = field(default_factory=list)  # path, op, message
    actions: list[tuple[str, str]] = field(default_factory=list)  # action, path
    files_copied: int = 0
    bytes_copied: int = 0
    files_skipped: int = 0
    dirs_created: int = 0
    links_created: int = 0
    entries_seen: int = 0
    files_removed: int = 0  # move: source entries removed
    files_deleted: int = 0  # destination entries removed to make way for one of another kind
    changed: bool = False  # something in the destination directory was created/replaced/removed
    acl_inherited: bool = False  # the destination directory has a default ACL (fsops.has_default_acl)
    c_seconds: float = 0.0  # thread CPU spent in C calls that release the GIL (blit.ffi.scan)
    prefetched: bool = False  # compared before the run started (blit.prefetch): not a cost sample
    cpu_seconds: float = 0.0  # thread CPU of the whole job (set by the thread executor)


class StopFlag:
    """Set from outside (coordinator or signal handler); checked between files."""

    __slots__ = ("is_set",)

    def __init__(self) -> None:
        self.is_set = False


class Stopped(Exception):
    """The run is being interrupted; the worker returns what it has."""


def _msg(exc: OSError) -> str:
    return exc.strerror or str(exc)


class Worker:
    """Runs directory jobs for one RunSpec; keeps the two root directories open."""

    def __init__(self, spec: RunSpec, stop: StopFlag | None = None, own_cwd: bool = False) -> None:
        """own_cwd: this process runs nothing else, so the worker may fchdir (cheaper lookups)."""
        self.spec = spec
        self.own_cwd = own_cwd
        self.src_base = os.fsdecode(spec.src_root)
        self.dst_base = os.fsdecode(spec.dst_root)
        self.stop = stop or StopFlag()
        # The C comparer answers for plain size+mtime runs; filters, --checksum and move need
        # every entry in Python.
        self.fast = scan.HAVE_CMPDIR and not spec.move and spec.compare is Compare.SIZE_MTIME and not spec.filters.active
        self.src_root_fd = fsops.open_root(spec.src_root)
        try:
            self.dst_root_fd = fsops.open_root(spec.dst_root)
        except BaseException:
            os.close(self.src_root_fd)
            raise

    def close(self) -> None:
        for fd in (self.src_root_fd, self.dst_root_fd):
            try:
                os.close(fd)
            except OSError:
                pass

    # ----------------------------------------------------------------------------------------

    def run(self, job: DirJob) -> DirResult:
        res = DirResult(job.rel, job.dst_rel)
        spec = self.spec
        try:
            sfd = fsops.open_rel(self.src_root_fd, job.rel)
        except OSError as exc:
            res.scan_error = ("open", _msg(exc))
            return res
        dfd = -1
        if not job.rel and job.only is None and not self.spec.dry_run and job.dst_top is None:
            st = os.fstat(self.dst_root_fd)  # the contents land in the destination root itself
            res.dst_top = (st.st_dev, st.st_ino)
        try:
            if self.fast and not job.dst_new and job.only is None:
                dfd = self._try_fast(job, sfd, res)
                if dfd < -1:  # answered
                    return res
            try:
                if job.only is None:
                    entries, errs = fsops.scan(sfd, source=True)
                else:  # `SRC`: its parent's other entries are no part of the run
                    entries, errs = fsops.scan_names(sfd, job.only, source=True)
            except OSError as exc:
                res.scan_error = ("scan", _msg(exc))
                return res
            prefix = job.rel + "/" if job.rel else ""
            keep: set[str] = set()
            for name, err in errs:
                res.incomplete = True
                keep.add(name)
                res.failures.append((prefix + name, "stat", _msg(err)))
            res.entries_seen = len(entries)
            dst: dict[str, Any] | None = None  # Meta or os.stat_result (same field names)
            if not (spec.dry_run and job.dst_new):
                if dfd < 0:
                    try:
                        dfd, opened_up = fsops.open_dst_dir(fsops.open_rel, self.dst_root_fd, job.dst_rel)
                        res.changed |= opened_up
                    except OSError as exc:
                        if exc.errno in FATAL_ERRNOS:
                            res.fatal = f"{_msg(exc)} (writing {job.dst_rel or '.'})"
                        else:
                            res.failures.append((job.dst_rel or ".", "open destination", _msg(exc)))
                        res.dst_unread = True
                        return res
                if not job.dst_new:
                    try:
                        dents, derrs = fsops.scan(dfd)
                    except OSError as exc:
                        res.failures.append((job.dst_rel or ".", "scan destination", _msg(exc)))
                        res.dst_unread = True
                        return res
                    dst = fsops.without_tmp(dfd, dents, spec.dry_run)
                    # Stale temporaries went: the directory's mtime moved (QA: it kept the
                    # time of the removal until the next run).
                    res.changed |= len(dst) < len(dents) and not spec.dry_run
                    for dname, _ in derrs:
                        keep.add(dname)
            self._plan_and_execute(job, entries, dst, frozenset(keep), sfd, dfd, res)
        except Stopped:
            pass
        finally:
            os.close(sfd)
            if dfd >= 0:
                os.close(dfd)
        return res

    def _try_fast(self, job: DirJob, sfd: int, res: DirResult) -> int:
        """The C comparer (blit.ffi.scan): clean up-to-date files are counted, not listed, and
        only the rest is planned. Returns -2 when the directory is done (its fd closed), else the
        open destination fd (or -1) for the ordinary path to continue with."""
        try:
            dfd = fsops.open_rel(self.dst_root_fd, job.dst_rel)
        except OSError:
            return -1  # the ordinary path reports it
        got = prefetch.take(_join(self.src_base, job.rel), _join(self.dst_base, job.dst_rel)) if prefetch.ACTIVE else None
        res.prefetched = got is not None
        if got is None:
            t = time.thread_time()
            got = scan.cmpdir(sfd, dfd, scan.CMP_FLAGS)
            res.c_seconds += time.thread_time() - t
        if got is None:
            return dfd
        clean, total, dst_count, present, others = got
        dst = {n: d for n, _, d in others if d is not None}
        keep: frozenset[str] = frozenset()
        if dst_count != present:  # extras or temporaries at the destination
            try:
                extra = _dest_only(sfd, dfd)
                if len(extra) != dst_count - present:
                    return dfd  # either side changed since the comparison: list both in full
                dents, derrs = fsops.scan_names(dfd, extra)
            except OSError:
                return dfd  # the ordinary path reports it
            kept = fsops.without_tmp(dfd, dents, self.spec.dry_run)
            res.changed |= len(kept) < len(dents) and not self.spec.dry_run  # temporaries went
            dst.update(kept)
            keep = frozenset(n for n, _ in derrs)
        res.entries_seen = total
        res.files_skipped += clean
        try:
            if others or dst:  # _plan_and_execute sorts the entries
                self._plan_and_execute(job, [(n, m) for n, m, _ in others], dst, keep, sfd, dfd, res)
        finally:
            os.close(dfd)
        return -2

    def _plan_and_execute(
        self,
        job: DirJob,
        entries: list[tuple[str, Any]],  # Meta or os.stat_result
        dst: dict[str, Any] | None,
        keep: frozenset[str],
        sfd: int,
        dfd: int,
        res: DirResult,
    ) -> None:
        spec = self.spec
        top = res.dst_top or job.dst_top
        if top is not None:
            entries, keep = self._not_into_itself(job, top, entries, keep, res)
        entries.sort()
        plan = plan_dir(
            job.rel,
            entries,
            dst,
            compare=spec.compare,
            filters=spec.filters,
            mirror=spec.mirror,
            only=job.only,
            keep=keep,
            granularity=(lambda: fsops.time_granularity(dfd)) if dfd >= 0 else None,
        )
        res.extras = plan.extras
        if dfd >= 0 and not job.dst_new and not spec.dry_run and not fsops.IS_ROOT and plan.writes():
            _open_up(dfd, res)
        self._execute(job, plan, sfd, dfd, res)

    def _not_into_itself(
        self, job: DirJob, top: tuple[int, int], entries: list[tuple[str, Any]], keep: frozenset[str], res: DirResult
    ) -> tuple[list[tuple[str, Any]], frozenset[str]]:
        """Leave out a source directory that is the destination the run lands in (reached by
        another path: the destination is a bind mount of a directory inside the source); one
        failure, as cp's "cannot copy a directory into itself". Without it the copy nests
        until the disk is full. Its destination counterpart is kept from a mirror's deletion."""
        hit = fsops.into_itself(entries, top)
        if not hit:
            return entries, keep
        prefix = job.rel + "/" if job.rel else ""
        for name in hit:
            res.failures.append((prefix + name, "copy", fsops.INTO_ITSELF))
        return [e for e in entries if e[0] not in hit], keep | frozenset(hit)

    def _execute(self, job: DirJob, plan, sfd: int, dfd: int, res: DirResult) -> None:  # type: ignore[no-untyped-def]
        spec = self.spec
        dry = spec.dry_run
        rec = spec.record_actions
        prefix = job.rel + "/" if job.rel else ""
        dprefix = job.dst_rel + "/" if job.dst_rel else ""
        stop = self.stop
        blocked: set[str] = set()
        landed: list[str] = []  # move: source names whose data is now at the destination
        same: list[tuple[str, str, Meta, Meta]] = []  # up-to-date files: check xattrs, metadata
        # Plain new small files, copied in C one batch at a time (blit.ffi.scan.copy_new).
        batch: list[tuple[str, Meta]] = []
        batch_bytes = 0
        # Entries created under a default ACL take an ACL (and their mode) from it: each is fixed
        # by the Python path.
        acl = not dry and dfd >= 0 and fsops.creates_under_acl(dfd, job.dst_new, any(it.op in CREATES for it in plan.items))
        res.acl_inherited = acl
        ccopy = scan.HAVE_CMPDIR and not dry and not acl

        for dname, d_is_dir in plan.conflicts:
            gone: list[str] = []
            try:
                res.files_deleted += fsops.make_way(dfd, dname, prefix + dname, d_is_dir, spec.mirror, spec.filters, dry, gone)
                res.changed |= not dry
            except OSError as exc:
                res.files_deleted += getattr(exc, "removed", 0)
                res.changed |= not dry and bool(gone)
                blocked.add(dname)
                res.failures.append((dprefix + dname, "replace", _msg(exc)))
            if rec:
                res.actions += (("delete", fsops.below(dprefix + dname, sub)) for sub in gone)

        for it in plan.items:
            if stop.is_set:
                raise Stopped
            name, dname, m, d = it.name, it.dst_name, it.src, it.dst
            if dname in blocked:
                continue
            path = prefix + name
            op = it.op
            try:
                if op is Op.MKDIR and not dry:
                    try:
                        fsops.make_dir(dfd, dname, acl)
                    except FileExistsError:
                        # Another program made it since the scan (an app's mkdir -p, another
                        # run): merged into as an existing directory, as rsync does (QA).
                        d = os.stat(dname, dir_fd=dfd, follow_symlinks=False)
                        if not stat.S_ISDIR(d.st_mode):
                            raise
                        op = Op.SUBDIR
                    else:
                        res.changed = True
                        if job.only is not None:
                            st = os.stat(dname, dir_fd=dfd, follow_symlinks=False)
                            res.dst_top = (st.st_dev, st.st_ino)
                if op is Op.SUBDIR:
                    if not dry:
                        fsops.sync_xattrs(sfd, name, dfd, dname)
                    if job.only is not None and d is not None:
                        res.dst_top = (d.st_dev, d.st_ino)
                    res.subdirs.append((name, dname, meta_of(m), False, meta_of(d) if d is not None else None))
                elif op is Op.MKDIR:
                    if rec:  # a real run lists what it did, once done
                        res.actions.append(("mkdir", path))
                    res.dirs_created += 1
                    res.subdirs.append((name, dname, meta_of(m), True, None))
                elif op is Op.HARDLINK:
                    res.links.append((name, dname, meta_of(m), meta_of(d) if d is not None else None))
                elif op is Op.SAME or op is Op.HASH:
                    if op is Op.HASH and fsops.file_hash(sfd, name) != fsops.file_hash(dfd, dname):
                        op = Op.COPY
                    else:
                        res.files_skipped += 1
                        if d is not None and not dry:
                            same.append((name, dname, m, d))
                        _landed(res, landed, name, path, m, d, spec.move)
                if op is Op.COPY:
                    if m.st_size > spec.big and not dry:
                        res.big.append((name, dname, meta_of(m), d is not None))
                        continue
                    if ccopy and d is None and name == dname and m.st_nlink == 1 and not fsops.is_sparse(m):
                        batch.append((name, m))
                        batch_bytes += m.st_size
                        if len(batch) >= _BATCH_FILES or batch_bytes >= _BATCH_BYTES:
                            self._copy_batch(job, sfd, dfd, batch, res, landed)
                            batch, batch_bytes = [], 0
                        continue
                    if not dry:
                        res.bytes_copied += fsops.copy_small(
                            sfd, name, dfd, dname, m, d is not None, job.inherit_gid, acl
                        )
                        res.changed = True
                    else:
                        res.bytes_copied += m.st_size
                    if rec:
                        res.actions.append(("copy", path))
                    res.files_copied += 1
                    landed.append(name)
                elif op is Op.SYMLINK:
                    target = os.readlink(name, dir_fd=sfd)
                    if d is not None and stat.S_ISLNK(d.st_mode) and os.readlink(dname, dir_fd=dfd) == target:
                        res.files_skipped += 1
                        if not dry:
                            fsops.sync_xattrs(sfd, name, dfd, dname)
                            fsops.fix_meta(dfd, dname, m, d)
                        _landed(res, landed, name, path, m, d, spec.move)
                    else:
                        if not dry:
                            fsops.make_symlink(target, dfd, dname, m, d is not None, fsops.xattrs_at(sfd, name) or None)
                            res.changed = True
                        if rec:
                            res.actions.append(("symlink", path))
                        res.links_created += 1
                        landed.append(name)
                elif op is Op.SPECIAL:
                    kind = stat.S_IFMT(m.st_mode)
                    if kind in (stat.S_IFCHR, stat.S_IFBLK) and not fsops.IS_ROOT:
                        res.failures.append((path, "skipped", "device nodes are recreated only as root"))
                        continue
                    if d is not None and stat.S_IFMT(d.st_mode) == kind and d.st_rdev == m.st_rdev:
                        res.files_skipped += 1
                        if not dry:
                            # ACLs first: setting one rewrites the group bits.
                            fsops.fix_meta(dfd, dname, m, d, fsops.sync_xattrs(sfd, name, dfd, dname))
                        _landed(res, landed, name, path, m, d, spec.move)
                    else:
                        if not dry:
                            xattrs = fsops.xattrs_at(sfd, name)
                            fsops.make_special(dfd, dname, m, d is not None, acl, xattrs)
                            res.changed = True
                        if rec:
                            res.actions.append(("special", path))
                        res.links_created += 1
                        landed.append(name)
            except OSError as exc:
                _failed(res, path, dprefix + dname, _op_name(op), exc)

        if batch:
            self._copy_batch(job, sfd, dfd, batch, res, landed)
        if same:
            unsettled = self._settle_same(job, sfd, dfd, same, res)
            if unsettled and spec.move:  # its metadata did not land: the source keeps it
                landed = [n for n in landed if n not in unsettled]
        if spec.move and landed and not dry:
            listed = {it.name: it.src for it in plan.items}
            self._remove_sources(sfd, dfd, prefix, [(n, listed[n]) for n in landed], res)

    def _copy_batch(
        self, job: DirJob, sfd: int, dfd: int, batch: list[tuple[str, Meta]], res: DirResult, landed: list[str]
    ) -> None:
        """Copy plain new files in one C call; report each result as copy_small's would be."""
        if self.stop.is_set:
            raise Stopped
        prefix = job.rel + "/" if job.rel else ""
        dprefix = job.dst_rel + "/" if job.dst_rel else ""
        t = time.thread_time()
        results = scan.copy_new(sfd, dfd, [(os.fsencode(n), m) for n, m in batch], job.inherit_gid)
        res.c_seconds += time.thread_time() - t
        for (name, m), r in zip(batch, results):
            try:
                if r == scan.PYTHON:
                    r = fsops.copy_small(sfd, name, dfd, name, m, False, job.inherit_gid)
                elif r < 0:
                    if r == scan.NOT_DONE:
                        continue
                    raise OSError(-r, os.strerror(-r))
            except OSError as exc:
                _failed(res, prefix + name, dprefix + name, "copy", exc)
                continue
            res.bytes_copied += r
            res.files_copied += 1
            res.changed = True
            landed.append(name)
            if self.spec.record_actions:
                res.actions.append(("copy", prefix + name))

    def _settle_same(
        self, job: DirJob, sfd: int, dfd: int, same: list[tuple[str, str, Meta, Meta]], res: DirResult
    ) -> set[str]:
        """Up-to-date files keep their content, but xattrs/ACLs, mode, owner and times must match:
        one listxattr per side per file (batched per directory), full compare only where any.
        Returns the names whose metadata could not be brought in line (each a failure)."""
        prefix = job.rel + "/" if job.rel else ""
        try:
            src_x = fsops.have_xattrs(sfd, [s[0] for s in same], _join(self.src_base, job.rel), self.own_cwd)
            dst_x = fsops.have_xattrs(dfd, [s[1] for s in same], _join(self.dst_base, job.dst_rel), self.own_cwd)
        except OSError as exc:
            res.failures.append((prefix or ".", "xattrs", _msg(exc)))
            return {s[0] for s in same}
        unsettled: set[str] = set()
        for (name, dname, m, d), sx, dx in zip(same, src_x, dst_x):
            try:
                # xattrs/ACLs first: setting an ACL rewrites the group bits.
                acl = (sx or dx) and fsops.sync_xattrs(sfd, name, dfd, dname)
                fsops.fix_meta(dfd, dname, m, d, bool(acl))
            except OSError as exc:
                res.failures.append((prefix + name, "metadata", _msg(exc)))
                unsettled.add(name)
        return unsettled

    def _remove_sources(self, sfd: int, dfd: int, prefix: str, entries: list[tuple[str, Meta]], res: DirResult) -> None:
        """Move: the data is at the destination; flush it to disk, then drop the sources that
        are still what was listed (one written to or replaced since stays, a failure)."""
        try:
            ffi.syncfs(dfd)
        except OSError as exc:
            res.failures.append((prefix or ".", "sync", _msg(exc)))
            return
        for name, m in entries:
            try:
                fsops.unlink_unchanged(sfd, name, m)
                res.files_removed += 1
            except OSError as exc:
                res.failures.append((prefix + name, "remove source", _msg(exc)))


# copy_new batches: few enough files that Ctrl-C stays prompt, few enough bytes per call.
_BATCH_FILES = 64
_BATCH_BYTES = 4 << 20


def _landed(res: DirResult, landed: list[str], name: str, path: str, m: Any, d: Any, move: bool) -> None:
    """An up-to-date entry is at the destination: a move removes its source, unless the
    destination entry IS the source (the same inode reached by another path: removing it would
    remove the only copy; rsync skips it too)."""
    if move and fsops.same_inode(m, d):
        res.failures.append((path, "remove source", fsops.SAME_FILE))
        return
    landed.append(name)


def _failed(res: DirResult, path: str, dpath: str, op: str, exc: OSError) -> None:
    """Report a failed entry; a full or read-only destination stops the run."""
    if exc.errno in FATAL_ERRNOS:  # one line, naming the file, as push and pull say it
        res.fatal = f"{_msg(exc)} (writing {dpath})"
        raise Stopped from None
    res.failures.append((path, op, _msg(exc)))


def _open_up(dfd: int, res: DirResult) -> None:
    """A read-only destination directory of ours (kept from an earlier run): writable for this
    job (fsops.open_up); the coordinator restores its mode when the directory is finalised."""
    if fsops.open_up(dfd):
        res.changed = True


def _dest_only(sfd: int, dfd: int) -> list[str]:
    """The names of directory `dfd` that `sfd` does not hold (a source's temporaries are no
    source entries): a mirror's extras and stale temporaries, for a directory the C comparer
    answered otherwise (R72: a directory with extras was listed and planned whole in Python,
    2.2x rsync for 100,000 deletions). Raises OSError."""
    src = set(os.listdir(sfd))
    return [n for n in os.listdir(dfd) if n not in src or fsops.is_tmp_name(n)]


def _join(base: str, rel: str) -> str:
    return f"{base.rstrip('/')}/{rel}" if rel else base


def _op_name(op: Op) -> str:
    return {
        Op.MKDIR: "mkdir",
        Op.COPY: "copy",
        Op.SAME: "metadata",
        Op.HASH: "checksum",
        Op.SYMLINK: "symlink",
        Op.SPECIAL: "mknod",
    }.get(op, "copy")


# --------------------------------------------------------------------------------------------
# Worker process: `python -c 'from blit.worker import process_main; process_main()'`. Frames: 4-byte big-endian length + pickle.

_HDR = struct.Struct(">I")


def read_frame(fd: int) -> bytes | None:
    hdr = _read_exact(fd, 4)
    if hdr is None:
        return None
    (n,) = _HDR.unpack(hdr)
    body = _read_exact(fd, n)
    if body is None:
        raise EOFError("truncated frame")
    return body


def _read_exact(fd: int, n: int) -> bytes | None:
    parts = []
    while n:
        b = os.read(fd, n)
        if not b:
            return None
        parts.append(b)
        n -= len(b)
    return b"".join(parts)


def frame(obj: object) -> bytes:
    body = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    return _HDR.pack(len(body)) + body


def process_main() -> None:
    """Entry point of a worker process (classes must pickle as blit.worker.*, not __main__)."""
    stop = StopFlag()

    def _on_term(signum: int, frame_: object) -> None:
        stop.is_set = True

    # Ctrl-C reaches the whole process group: the coordinator decides, the worker finishes the
    # file in hand and returns. SIGTERM from the coordinator stops it between files.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _on_term)
    inp, out = sys.stdin.fileno(), sys.stdout.fileno()
    spec_bytes = read_frame(inp)
    if spec_bytes is None:
        return
    spec: RunSpec = pickle.loads(spec_bytes)
    worker = Worker(spec, stop, own_cwd=True)
    os.write(out, frame("ready"))
    try:
        while not stop.is_set:
            data = read_frame(inp)
            if data is None:
                break
            job: DirJob = pickle.loads(data)
            try:
                result = worker.run(job)
            except Exception as exc:  # a bug: report it for this directory, keep serving
                result = DirResult(job.rel, job.dst_rel, scan_error=("internal error", repr(exc)))
            fsops.write_all(out, frame(result))
    finally:
        worker.close()


