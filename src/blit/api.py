"""The library API for Trio applications: `await blit.copy(src, dst)`, `mirror`, `move`.

Resolves the two endpoints with rsync's trailing-slash rules, refuses bad input before anything
is changed (missing source, source equals destination, destination inside the source), then
hands the run to transfer.LocalTransfer (or, for remote endpoints, the remote client). Each
engine is imported when a run needs it: a remote run never loads the local one, nor a local run
the remote one.

This module never prints and never exits; it returns a Summary or raises from blit.errors.
"""

from __future__ import annotations

import math
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from .endpoint import contents_form
from .errors import FatalError, UsageError
from .plan import Compare
from .report import NullProgress, Progress, Summary, finish_command
from .stall import Timeouts

if TYPE_CHECKING:
    from .transfer import Node
    from .worker import DirJob

Operation = Literal["copy", "mirror", "move"]
PathArg = str | bytes | os.PathLike[str] | os.PathLike[bytes]
"""A path as the library takes it (returned as str, surrogateescape)."""


@dataclass
class Options:
    """What a transfer may be asked; the CLI fills it from flags. No speed knobs: the planner decides."""

    dry_run: bool = False
    compare: Compare = Compare.SIZE_MTIME
    # Ordered filter rules: (include?, glob).
    filters: list[tuple[bool, str]] = field(default_factory=list)
    record_actions: bool = False
    timeouts: Timeouts = field(default_factory=Timeouts)
    # Remote endpoints only: TLS on both planes (pinned on first use), or cleartext when the
    # daemon runs with --no-tls; force_h2_data carries file data over HTTP/2 (for testing).
    tls: bool = True
    force_h2_data: bool = False
    # Remote endpoints written user@host:...: the file holding that user's secret (docs/cli.md).
    secrets_file: Path | None = None


async def copy(src: PathArg, dst: PathArg, options: Options | None = None, progress: Progress | None = None) -> Summary:
    """Copy SRC to DST (rsync -a semantics, atomic writes). Returns the Summary.

    Raises:
        UsageError: bad input; nothing was changed.
        FatalError: the run could not go on (unreadable source root, full disk).
    """
    return await transfer("copy", src, dst, options, progress)


async def mirror(src: PathArg, dst: PathArg, options: Options | None = None, progress: Progress | None = None) -> Summary:
    """Make DST identical to SRC: copy, then delete DST entries absent from SRC (within the filters).

    Deletes nothing when any part of SRC could not be read (Summary.deletions_skipped says why).
    """
    return await transfer("mirror", src, dst, options, progress)


async def move(src: PathArg, dst: PathArg, options: Options | None = None, progress: Progress | None = None) -> Summary:
    """Copy SRC to DST, make sure the data is on disk, then remove each source entry that landed."""
    return await transfer("move", src, dst, options, progress)


def _path_arg(what: str, p: object) -> str:
    """A library caller's path: str, bytes or os.PathLike (a pathlib.Path), as a str."""
    if isinstance(p, (str, bytes, os.PathLike)):
        return os.fsdecode(os.fspath(p))
    raise UsageError(f"the {what} must be a path (str, bytes or os.PathLike), not {type(p).__name__}")


def _checked_options(options: object) -> Options:
    """A library caller's Options, each field of the type it must be (a wrong one was ignored
    silently: `compare="checksum"` compared by size and time, QA); a Compare may be given by
    name ("checksum"). Raises UsageError naming the field."""
    if options is None:
        return Options()
    if not isinstance(options, Options):
        raise UsageError(f"options must be a blit.Options, not {type(options).__name__}")
    compare = options.compare
    if isinstance(compare, str) and not isinstance(compare, Compare):  # as the CLI's flags say it too
        compare = _COMPARE_NAMES.get(compare.lower().replace("_", "-"))
    if not isinstance(compare, Compare):
        names = ", ".join(sorted(_COMPARE_NAMES))
        raise UsageError(f"options.compare must be a blit.Compare ({names}), not {options.compare!r}")
    filters = options.filters
    if not isinstance(filters, list) or not all(
        isinstance(f, tuple) and len(f) == 2 and isinstance(f[0], bool) and isinstance(f[1], str) for f in filters
    ):
        raise UsageError("options.filters must be a list of (include: bool, pattern: str) pairs")
    for name in ("dry_run", "record_actions", "tls", "force_h2_data"):
        if not isinstance(getattr(options, name), bool):
            raise UsageError(f"options.{name} must be True or False, not {getattr(options, name)!r}")
    if not isinstance(options.timeouts, Timeouts):
        raise UsageError(f"options.timeouts must be a blit.Timeouts, not {type(options.timeouts).__name__}")
    stall = options.timeouts.stall
    if isinstance(stall, bool) or not isinstance(stall, (int, float)) or not 0 < stall <= math.inf or stall != stall:
        raise UsageError(f"options.timeouts.stall must be a number of seconds above 0, not {stall!r}")
    secrets = options.secrets_file
    if secrets is not None and not isinstance(secrets, (str, bytes, os.PathLike)):
        raise UsageError(f"options.secrets_file must be a path, not {type(secrets).__name__}")
    if compare is not options.compare or (secrets is not None and not isinstance(secrets, Path)):
        from dataclasses import replace

        options = replace(options, compare=compare, secrets_file=None if secrets is None else Path(os.fsdecode(secrets)))
    return options


_COMPARE_NAMES = {
    "size-mtime": Compare.SIZE_MTIME,
    "checksum": Compare.CHECKSUM,
    "size-only": Compare.SIZE_ONLY,
    "ignore-times": Compare.ALWAYS,
    "always": Compare.ALWAYS,
}
"""Compare modes by name (a library caller's `compare="checksum"`): the enum's names and the
CLI's flags (`--size-only`, `--ignore-times`)."""


@dataclass
class _Resolved:
    src_base: bytes  # the directory jobs are relative to, on each side
    dst_base: bytes
    job: DirJob
    node: Node
    make_dst: bytes | None  # a destination directory to create (mkdir -p) before the run
    rename_ok: bool  # move may be a single rename(2)
    target: bytes  # what lands, for messages
    as_new: bool = False  # a directory lands as a DST that does not exist yet (Summary.finish_with)


def _lstat(p: bytes, what: str | None = None) -> os.stat_result | None:
    """lstat, None for a name that is not there. Raises UsageError (`what`: the words before
    the reason) when it cannot be looked at (a parent we may not search: a traceback, QA)."""
    try:
        return os.lstat(p)
    except FileNotFoundError:
        return None
    except NotADirectoryError:
        return None
    except OSError as exc:
        raise UsageError(f"{what or f'cannot reach {os.fsdecode(p)}'}: {exc.strerror}") from None


def _real(p: bytes) -> bytes:
    return os.path.realpath(p)


def _inside(child: bytes, parent: bytes) -> bool:
    parent = parent.rstrip(b"/") + b"/"
    return child.startswith(parent)


def resolve(src: str, dst: str, operation: Operation) -> _Resolved:
    """Apply rsync's trailing-slash rules; raise UsageError for bad input (nothing is changed)."""
    from . import fsops
    from .transfer import Node
    from .worker import DirJob

    if not src:
        raise UsageError("empty source path")
    if not dst:
        raise UsageError("empty destination path")
    bsrc, bdst = os.fsencode(src), os.fsencode(dst)
    if b"\0" in bsrc or b"\0" in bdst:
        raise UsageError("paths may not contain NUL")
    src_slash = contents_form(bsrc)  # `SRC/`, `SRC/.`, `.`: its contents
    dst_slash = contents_form(bdst)  # `DST/`, `DST/.`: a directory
    try:
        src_abs = fsops.kernel_abspath(bsrc)
    except OSError as exc:  # a `..` after a missing name or a file: no path, as the kernel says
        raise UsageError(f"source does not exist: {src} ({exc.strerror})") from None
    try:
        dst_abs = fsops.kernel_abspath(bdst)
    except OSError as exc:
        raise UsageError(f"destination path cannot be reached: {dst} ({exc.strerror})") from None
    sst = _lstat(src_abs, f"cannot read source {src}")
    if sst is None:
        raise UsageError(f"source does not exist: {src}")
    if src_slash or (stat.S_ISLNK(sst.st_mode) and src_slash):
        try:
            sst = os.stat(src_abs)
        except OSError as exc:
            raise UsageError(f"cannot read source {src}: {exc.strerror}") from None
    src_is_dir = stat.S_ISDIR(sst.st_mode)
    if src_slash and not src_is_dir:
        raise UsageError(f"source is not a directory: {src}")
    _check_readable(src_abs, sst, src)

    try:
        dst_st: os.stat_result | None = os.stat(dst_abs)  # follows: a symlink to a dir is a dir
    except FileNotFoundError:
        dst_st = None
        if src_is_dir and not dst_slash and _lstat(dst_abs) is not None:
            # A dangling symlink: cp and rsync refuse to put a directory in its place.
            raise UsageError(f"cannot overwrite non-directory {dst} with directory {src} (a symlink to nothing)") from None
    except NotADirectoryError:
        raise UsageError(f"destination path goes through a file: {dst}") from None
    except PermissionError as exc:
        raise FatalError(f"cannot reach destination {dst}: {exc.strerror}") from None
    dst_is_dir = dst_st is not None and stat.S_ISDIR(dst_st.st_mode)

    make_dst: bytes | None = None
    if src_is_dir and src_slash:
        # Contents of SRC into DST.
        if dst_st is not None and not dst_is_dir:
            raise UsageError(f"destination exists and is not a directory: {dst}")
        src_base, dst_base = src_abs, dst_abs
        if dst_st is None:
            make_dst = dst_abs
        target = dst_abs
        meta = fsops.meta_of(sst)
        dmeta = fsops.meta_of(dst_st) if dst_st is not None else None
        node = Node(None, "", "", meta, dmeta, dst_st is None, own=True)
        job = DirJob("", "", dst_st is None)
        rename_ok = False
    else:
        name = os.path.basename(src_abs)
        src_base = os.path.dirname(src_abs)
        if dst_is_dir:
            dst_base, dname = dst_abs, name
        elif dst_st is None and dst_slash:
            dst_base, dname = dst_abs, name
            make_dst = dst_abs
        else:
            if dst_st is not None and src_is_dir:
                raise UsageError(f"cannot overwrite non-directory {dst} with directory {src}")
            if dst_st is not None and dst_slash:  # cp and rsync: "Not a directory"
                raise UsageError(f"destination is not a directory: {dst}")
            dst_base, dname = os.path.dirname(dst_abs), os.path.basename(dst_abs)
            if not os.path.isdir(dst_base):
                make_dst = dst_base
        target = os.path.join(dst_base, dname)
        node = Node(None, "", "", None, None, False, own=False)
        job = DirJob("", "", False, only={os.fsdecode(name): os.fsdecode(dname)})
        rename_ok = _lstat(target) is None
    # Same / nested checks on the real paths.
    real_src = _real(src_abs)
    real_target = _real(target)
    if real_src == real_target:
        raise UsageError(f"source and destination are the same: {src} and {dst}")
    if src_is_dir and _inside(real_target, real_src):
        raise UsageError(f"destination {dst} is inside the source {src}")
    if not src_is_dir and dst_st is not None and not dst_is_dir:
        if (sst.st_dev, sst.st_ino) == (dst_st.st_dev, dst_st.st_ino):
            raise UsageError(f"source and destination are the same file: {src} and {dst}")
    if make_dst is not None and _inside(_real(make_dst), real_src) and src_is_dir:
        raise UsageError(f"destination {dst} is inside the source {src}")
    if src_is_dir:  # the same checks by identity: another path to the source (a bind mount)
        refuse_nesting(target, (sst.st_dev, sst.st_ino), src, dst)
        if operation == "mirror":
            refuse_holding(src_abs, target, src, dst)
    as_new = src_is_dir and not src_slash and dst_st is None and not dst_slash
    return _Resolved(src_base, dst_base, job, node, make_dst, rename_ok, target, as_new)


def refuse_nesting(target: bytes, source_dir: tuple[int, int], src: str, dst: str) -> None:
    """Refuse a directory copy whose destination `target` (a path on this machine) is the
    source directory `source_dir` (device, inode) or lies inside it, whatever path leads
    there (a bind mount): the copy would chase its own output. Also for a pull, whose source
    is on a daemon on this machine (transport.tree.pull_tree).

    Raises:
        UsageError: the same directory, or inside it.
    """
    from . import fsops

    found = fsops.reaches(target, source_dir)
    if found == "same":
        raise UsageError(f"source and destination are the same directory: {src} and {dst}")
    if found == "inside":
        raise UsageError(f"destination {dst} is inside the source {src}")


def refuse_holding(source: bytes, target: bytes, src: str, dst: str) -> None:
    """Refuse a mirror whose destination directory `target` holds the source directory (`cd
    dir/sub && blit mirror . ..`): the source would be an extra there, and deleted. By identity,
    as refuse_nesting (a bind mount is another path to the same directory).

    Raises:
        UsageError: the source lies inside the destination.
    """
    from . import fsops

    if fsops.holds(target, fsops.ancestors(source)):  # (a symlink to a directory is that directory, as DST)
        raise UsageError(holding(src, dst))


def holding(src: str, dst: str) -> str:
    return f"the source {src} is inside the destination {dst}: the mirror would delete it"


def check_source_readable(path: bytes, trailing_slash: bool, shown: str) -> None:
    """A push's local source (remote.py) must be readable as a local run's is (`_check_readable`).
    A source that vanished meanwhile is left to the transfer to report."""
    try:
        st = os.stat(path) if trailing_slash else os.lstat(path)
    except FileNotFoundError:
        return
    except OSError as exc:
        raise FatalError(f"cannot read source {shown}: {exc.strerror}") from None
    _check_readable(path, st, shown)


def _check_readable(path: bytes, st: os.stat_result, shown: str) -> None:
    """The source root must be readable, or nothing is done at all (exit 1)."""
    from . import fsops

    why = fsops.source_unreadable(path, st.st_mode, follow=True)
    if why:
        raise FatalError(f"cannot read source {shown}: {why}")


def _makedirs(path: bytes) -> None:
    try:
        os.makedirs(path, exist_ok=True)
    except FileExistsError:
        if os.path.islink(path):  # cp: "Not a directory"; rsync: "File exists"
            raise UsageError(f"destination is a symbolic link to nothing, not a directory: {os.fsdecode(path)}") from None
        raise UsageError(f"destination path goes through a file: {os.fsdecode(path)}") from None
    except NotADirectoryError:
        raise UsageError(f"destination path goes through a file: {os.fsdecode(path)}") from None
    except OSError as exc:
        raise FatalError(f"cannot create destination {os.fsdecode(path)}: {exc.strerror}") from None


async def transfer(
    operation: Operation,
    src: PathArg,
    dst: PathArg,
    options: Options | None = None,
    progress: Progress | None = None,
) -> Summary:
    import trio

    src, dst = _path_arg("source", src), _path_arg("destination", dst)
    opts = _checked_options(options)
    if progress is not None and not all(callable(getattr(progress, m, None)) for m in ("start", "update", "action", "error", "finish")):
        raise UsageError(f"progress must be a blit.Progress (start, update, action, error, finish), not {type(progress).__name__}")
    progress = progress or NullProgress()
    from .endpoint import is_local

    if not (is_local(src) and is_local(dst)):
        from .transport.client import Timeouts as NetTimeouts
        from .transport.remote import remote_transfer

        remote: Summary = await remote_transfer(
            operation,
            src,
            dst,
            dry_run=opts.dry_run,
            compare=opts.compare,
            filters=opts.filters,
            progress=progress,
            tls_enabled=opts.tls,
            force_h2_data=opts.force_h2_data,
            known_hosts=None,
            timeouts=NetTimeouts(stall=opts.timeouts.stall),
            secrets_file=opts.secrets_file,
            record_actions=opts.record_actions or opts.dry_run,
        )
        return remote
    from .filters import Filters
    from .transfer import LocalTransfer, Planner
    from .worker import RunSpec

    summary = Summary(operation=operation, source=src, destination=dst, dry_run=opts.dry_run)
    filters = Filters.from_args(opts.filters)
    r = await trio.to_thread.run_sync(resolve, src, dst, operation)
    if r.as_new and not opts.dry_run:
        summary.finish_with = finish_command(operation, src, dst)
    progress.start(summary)
    if (
        operation == "move"
        and r.rename_ok
        and not opts.filters
        and not opts.dry_run
        and await trio.to_thread.run_sync(_try_rename, r)
    ):
        summary.strategy = "rename"
        summary.files_copied = 1
        summary.files_removed = 1
        progress.finish(summary)
        return summary
    if r.make_dst is not None and not opts.dry_run:
        await trio.to_thread.run_sync(_makedirs, r.make_dst)
    dst_base = r.dst_base
    if opts.dry_run and not os.path.isdir(dst_base):
        # Nothing exists yet: plan against an empty destination.
        r.job.dst_new = True
        dst_base = b"/"
    spec = RunSpec(
        src_root=r.src_base,
        dst_root=dst_base,
        mirror=operation == "mirror",
        move=operation == "move",
        compare=opts.compare,
        filters=filters,
        dry_run=opts.dry_run,
        record_actions=opts.record_actions or opts.dry_run,
    )
    try:
        run = LocalTransfer(spec, summary, progress, opts.timeouts, Planner())
    except OSError as exc:
        raise FatalError(f"cannot open {os.fsdecode(exc.filename or r.src_base)}: {exc.strerror}") from None
    if not opts.dry_run:  # whether the top directory hands new files its group (setgid)
        r.job.inherit_gid = bool(os.fstat(run.worker.dst_root_fd).st_mode & stat.S_ISGID)
    try:
        await run.run(r.job, r.node)
    except FatalError as exc:
        summary.fatal = summary.fatal or str(exc)
        progress.finish(summary)
        raise
    progress.finish(summary)
    return summary


_AT_FDCWD = -100  # Linux: the *at() calls' "relative to the working directory" (the paths are absolute)


def _try_rename(r: _Resolved) -> bool:
    """Move within one filesystem onto a free name: one rename(2), as mv does."""
    assert r.job.only is not None
    (name, dname), = r.job.only.items()
    src = os.path.join(r.src_base, os.fsencode(name))
    try:
        if r.make_dst is not None:
            _makedirs(r.make_dst)
        if os.lstat(src).st_dev != os.stat(r.dst_base).st_dev:
            return False
        if _lstat(r.target) is not None:
            return False
        from .ffi import scan as cscan

        if cscan.HAVE_CMPDIR:  # renameat2(RENAME_NOREPLACE): a name taken meanwhile stays
            cscan.rename_noreplace(_AT_FDCWD, src, _AT_FDCWD, r.target)
        else:
            os.rename(src, r.target)
        return True
    except OSError:
        return False
