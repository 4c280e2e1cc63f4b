"""Pure planning: for one directory, what to copy, skip, link, create and delete. No I/O.

`plan_dir` compares the source listing of a directory with the destination's (either may come
from the local disk or from a peer's manifest) and sorts every name into an action. Decisions
that need the content (checksums, symlink targets) are marked for the executor to settle.

This module must not touch the filesystem, import trio, or hold state between calls.
"""

from __future__ import annotations

import stat
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import IntEnum

from .filters import Filters
from .fsops import IS_ROOT, Meta


class Compare(IntEnum):
    """How an existing regular file is judged up to date."""

    SIZE_MTIME = 0  # default: size and mtime (ns) match
    CHECKSUM = 1  # equal sizes are compared by content hash
    SIZE_ONLY = 2
    ALWAYS = 3  # --ignore-times: copy every file


class Op(IntEnum):
    SUBDIR = 0  # source dir, destination dir exists: descend
    MKDIR = 1  # source dir, nothing (or a non-dir, which is replaced) at the destination
    COPY = 2  # regular file to copy
    SAME = 3  # regular file up to date; metadata may need fixing
    HASH = 4  # equal sizes under --checksum: hash both to decide
    SYMLINK = 5  # symlink; executor compares targets when the destination is a symlink too
    SPECIAL = 6  # fifo, socket, device
    HARDLINK = 7  # non-directory with nlink > 1: settled globally by the coordinator


_DEVICES = frozenset({stat.S_IFCHR, stat.S_IFBLK})
CREATES = frozenset({Op.MKDIR, Op.COPY, Op.HASH, Op.SPECIAL, Op.HARDLINK})
"""Ops that may create an entry in the destination directory (which then inherits its default
ACL, if it has one: fsops.has_default_acl)."""


@dataclass(slots=True)
class Item:
    op: Op
    name: str
    src: Meta
    dst: Meta | None  # the destination entry of that name, if any
    dst_name: str  # usually == name; differs only for the renamed top entry


@dataclass(slots=True)
class DirPlan:
    items: list[Item] = field(default_factory=list)
    # Destination names to delete (mirror only): (name, is_dir).
    extras: list[tuple[str, bool]] = field(default_factory=list)
    # Destination entries in the way of a source entry of another kind: removed before landing.
    conflicts: list[tuple[str, bool]] = field(default_factory=list)

    def writes(self) -> bool:
        """Will this directory's job create, replace or remove entries in the destination directory?"""
        return bool(self.conflicts or self.extras) or any(it.op not in (Op.SUBDIR, Op.SAME, Op.HASH) for it in self.items)


def up_to_date(src: Meta, dst: Meta, compare: Compare, granularity: Callable[[], int] | None = None) -> Op:
    if not stat.S_ISREG(dst.st_mode) or compare is Compare.ALWAYS:
        return Op.COPY
    if src.st_size != dst.st_size:
        return Op.COPY
    if compare is Compare.SIZE_ONLY:
        return Op.SAME
    if compare is Compare.CHECKSUM:
        return Op.HASH
    return Op.SAME if same_mtime(src.st_mtime_ns, dst.st_mtime_ns, granularity) else Op.COPY


def same_mtime(src_ns: int, dst_ns: int, granularity: Callable[[], int] | None) -> bool:
    """Equal to the precision the destination keeps (SPEC: "mtime to the precision both
    filesystems keep"): exactly, or, where the destination's time could be the source's cut
    to a coarser step, that step of its filesystem (`granularity()`, in ns, asked only then:
    a file system that keeps whole seconds re-copied every file on every run)."""
    if src_ns == dst_ns:
        return True
    if granularity is None or dst_ns % 1000 or dst_ns > src_ns:
        return False
    g = granularity()
    return g > 1 and dst_ns % g == 0 and src_ns - src_ns % g == dst_ns


def plan_dir(
    rel: str,
    src: list[tuple[str, Meta]],
    dst: dict[str, Meta] | None,
    *,
    compare: Compare,
    filters: Filters,
    mirror: bool,
    only: dict[str, str] | None = None,
    keep: frozenset[str] = frozenset(),
    granularity: Callable[[], int] | None = None,
) -> DirPlan:
    """Sort one directory's entries into actions.

    Args:
        rel: the directory's path relative to the transfer root ("" for the root), for filters.
        src: the source entries (name, Meta).
        dst: the destination entries by name, or None when the destination directory is new.
        only: when set, transfer just these source names, each to the destination name given
            (the top entry of `blit copy SRC DST`); no extras are considered.
        keep: destination names never to delete (sources that vanished or failed to stat).
        granularity: the destination filesystem's time step in ns (asked only when a file's
            time could be its source's cut to a coarser step: same_mtime).
    """
    plan = DirPlan()
    items = plan.items
    prefix = rel + "/" if rel else ""
    seen: set[str] = set()
    fa = filters.active
    dget = dst.get if dst else None
    S_IFMT, IFDIR, IFREG, IFLNK = stat.S_IFMT, stat.S_IFDIR, stat.S_IFREG, stat.S_IFLNK
    fast = compare is Compare.SIZE_MTIME
    for name, m in src:
        if only is not None:
            if name not in only:
                continue
            dname = only[name]
        else:
            dname = name
        kind = S_IFMT(m.st_mode)
        if fa and filters.excluded(prefix + name, name, kind == IFDIR):
            continue
        seen.add(dname)
        d = dget(dname) if dget is not None else None
        if d is not None and (kind == IFDIR) != (S_IFMT(d.st_mode) == IFDIR):
            plan.conflicts.append((dname, kind != IFDIR))
            d = None
        if kind == IFREG:
            if m.st_nlink > 1:
                op = Op.HARDLINK
            elif d is None or d.st_nlink > 1:
                # A destination file with other names is replaced, never changed in place: its
                # mode and owner set in place reached every name of it (through a daemon, one
                # outside the module), and the source's file has no other names.
                op = Op.COPY
            elif fast and S_IFMT(d.st_mode) == IFREG:  # the common case, inline
                if m.st_size == d.st_size and (m.st_mtime_ns == d.st_mtime_ns or same_mtime(m.st_mtime_ns, d.st_mtime_ns, granularity)):
                    op = Op.SAME
                else:
                    op = Op.COPY
            else:
                op = up_to_date(m, d, compare, granularity)
        elif kind == IFDIR:
            op = Op.SUBDIR if d is not None else Op.MKDIR
        elif m.st_nlink > 1 and (IS_ROOT or kind not in _DEVICES):
            op = Op.HARDLINK  # a symlink, FIFO, socket or device with other names: linked as files are
            # (a device only as root: otherwise each name is skipped, as a device of one name is)
        elif kind == IFLNK:
            op = Op.SYMLINK
        else:
            op = Op.SPECIAL
        items.append(Item(op, name, m, d, dname))
    if mirror and only is None and dst:
        for dname, d in dst.items():
            if dname in seen or dname in keep:
                continue
            d_is_dir = stat.S_ISDIR(d.st_mode)
            if fa and filters.excluded(prefix + dname, dname, d_is_dir):
                continue
            plan.extras.append((dname, d_is_dir))
    return plan
