"""Remote copy/mirror/move: resolve the endpoints with rsync's trailing-slash rules, then push or pull.

`remote_transfer()` is what `api.transfer` calls when an endpoint is remote. The rules are the
local ones (`api.resolve`), with the remote side looked at through `stat` on the daemon (which
never follows a symlink, so a remote symlink is never a directory):

| SRC | DST | transfer |
|---|---|---|
| `dir/` (or a module's top) | missing or directory | contents of dir into DST (created if missing) |
| `dir` | existing directory | dir lands as `DST/dir` |
| `dir` | missing | dir lands as DST |
| `file` | existing directory | `DST/file` |
| `file` | anything else | DST |

Move removes a source entry only once the destination side confirmed it landed and synced it
(docs/protocol.md §4). Progress goes to the caller's Progress at most 10 times a second.

This module must not print; it returns a Summary or raises from blit.errors.
"""

from __future__ import annotations

import os
import stat
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..endpoint import LocalEndpoint, RemoteEndpoint, parse_endpoint
from ..errors import UsageError
from ..plan import Compare
from ..report import Failure, Summary
from . import protocol
from .tree import TopJob, TreeSpec


@dataclass
class Plan:
    """A resolved remote transfer."""

    direction: str  # push or pull
    local_root: bytes
    module: str
    remote_base: bytes
    top: TopJob
    create_remote_base: bool = False
    create_local_root: bool = False


async def _rstat(session: Any, module: str, path: bytes) -> protocol.Entry | None:
    """stat on the daemon; None also when a parent is missing."""
    from ..errors import RemoteError

    try:
        entry: protocol.Entry | None = await session.stat(module, path)
        return entry
    except RemoteError as exc:
        if exc.code in ("not-found", "not-a-directory"):
            return None
        raise


def _split(path: bytes) -> tuple[bytes, bytes]:
    parts = protocol.split_path(path)
    if not parts:
        return b"", b""
    return b"/".join(parts[:-1]), parts[-1]


async def resolve_push(session: Any, src: LocalEndpoint, dst: RemoteEndpoint) -> Plan:
    bsrc = os.fsencode(src.path)
    src_abs = os.path.abspath(bsrc)
    try:
        sst = os.lstat(src_abs)
        if src.trailing_slash:
            sst = os.stat(src_abs)
    except FileNotFoundError:
        raise UsageError(f"source does not exist: {src.path}") from None
    except OSError as exc:
        raise UsageError(f"cannot read source {src.path}: {exc.strerror}") from None
    src_is_dir = stat.S_ISDIR(sst.st_mode)
    if src.trailing_slash and not src_is_dir:
        raise UsageError(f"source is not a directory: {src.path}")
    dpath = dst.path_bytes
    dentry = await _rstat(session, dst.module, dpath)
    dst_is_dir = dentry is not None and dentry.kind == "dir"
    if src_is_dir and src.trailing_slash:
        if dentry is not None and not dst_is_dir:
            raise UsageError(f"destination exists and is not a directory: {dst}")
        return Plan("push", src_abs, dst.module, dpath, TopJob(dst_new=dentry is None), create_remote_base=dentry is None)
    name = os.path.basename(src_abs)
    local_root = os.path.dirname(src_abs)
    if dst_is_dir:
        base, dname, create = dpath, name, False
    elif dentry is None and dst.trailing_slash:
        base, dname, create = dpath, name, True
    else:
        if dentry is not None and src_is_dir:
            raise UsageError(f"cannot overwrite non-directory {dst} with directory {src.path}")
        base, dname = _split(dpath)
        if not dname:
            raise UsageError(f"destination {dst} names no file")
        parent = await _rstat(session, dst.module, base)
        create = parent is None
        if parent is not None and parent.kind != "dir":
            raise UsageError(f"destination path goes through a file: {dst}")
    top = TopJob(only={os.fsdecode(name): os.fsdecode(dname)})
    return Plan("push", local_root, dst.module, base, top, create_remote_base=create)


async def resolve_pull(session: Any, src: RemoteEndpoint, dst: LocalEndpoint) -> Plan:
    spath = src.path_bytes
    sentry = await _rstat(session, src.module, spath)
    if sentry is None:
        raise UsageError(f"source does not exist: {src}")
    src_is_dir = sentry.kind == "dir"
    contents = src.trailing_slash or not protocol.split_path(spath)  # a module's top: its contents
    if src.trailing_slash and not src_is_dir:
        raise UsageError(f"source is not a directory: {src}")
    bdst = os.fsencode(dst.path)
    dst_abs = os.path.abspath(bdst)
    try:
        dst_st: os.stat_result | None = os.stat(dst_abs)
    except FileNotFoundError:
        dst_st = None
    except NotADirectoryError:
        raise UsageError(f"destination path goes through a file: {dst.path}") from None
    dst_is_dir = dst_st is not None and stat.S_ISDIR(dst_st.st_mode)
    if src_is_dir and contents:
        if dst_st is not None and not dst_is_dir:
            raise UsageError(f"destination exists and is not a directory: {dst.path}")
        return Plan("pull", dst_abs, src.module, spath, TopJob(dst_new=dst_st is None), create_local_root=dst_st is None)
    base, name = _split(spath)
    if dst_is_dir:
        root, dname, create = dst_abs, name, False
    elif dst_st is None and dst.trailing_slash:
        root, dname, create = dst_abs, name, True
    else:
        if dst_st is not None and src_is_dir:
            raise UsageError(f"cannot overwrite non-directory {dst.path} with directory {src}")
        root, dname = os.path.dirname(dst_abs), os.path.basename(dst_abs)
        create = not os.path.isdir(root)
    top = TopJob(only={os.fsdecode(name): os.fsdecode(dname)})
    return Plan("pull", root, src.module, base, top, create_local_root=create)


async def remote_transfer(
    operation: str,
    src: str,
    dst: str,
    *,
    dry_run: bool = False,
    compare: Compare = Compare.SIZE_MTIME,
    filters: list[tuple[bool, str]] | None = None,
    progress: Any = None,
    tls_enabled: bool = True,
    known_hosts: Path | None = None,
    force_h2_data: bool = False,
    timeouts: Any = None,
    streams: int = 2,
) -> Summary:
    """Copy, mirror or move between a local path and a daemon (either direction).

    Raises:
        UsageError: bad endpoints, missing source, remote-to-remote (not yet).
        ConnectError, RemoteError, TransportError: the daemon could not be used.
    """
    import trio

    from ..filters import Filters
    from .client import Timeouts, open_session
    from ..report import NullProgress, tick
    from .tree import TreeCounters, pull_tree, push_tree

    s_ep, d_ep = parse_endpoint(src), parse_endpoint(dst)
    if isinstance(s_ep, RemoteEndpoint) and isinstance(d_ep, RemoteEndpoint):
        raise UsageError("remote to remote transfers are not supported yet (docs/protocol.md §4)")
    if not isinstance(s_ep, RemoteEndpoint) and not isinstance(d_ep, RemoteEndpoint):
        raise UsageError("remote_transfer needs a remote endpoint")
    remote = s_ep if isinstance(s_ep, RemoteEndpoint) else d_ep
    assert isinstance(remote, RemoteEndpoint)
    summary = Summary(operation=operation, source=src, destination=dst, dry_run=dry_run)
    if progress is not None:
        progress.start(summary)
    spec = TreeSpec(operation=operation, compare=compare, filters=Filters.from_args(filters or []), dry_run=dry_run)
    t0 = time.perf_counter()
    counters = TreeCounters()
    async with open_session(
        remote.host, tls_enabled=tls_enabled, known_hosts=known_hosts, force_h2_data=force_h2_data, timeouts=timeouts or Timeouts()
    ) as session, trio.open_nursery() as nursery:
        if progress is not None and not isinstance(progress, NullProgress):
            nursery.start_soon(tick, progress, counters.snapshot, t0)
        if isinstance(d_ep, RemoteEndpoint):
            assert isinstance(s_ep, LocalEndpoint)
            plan = await resolve_push(session, s_ep, d_ep)
            done = await push_tree(
                session, plan.local_root, plan.module, plan.remote_base, plan.top, spec, streams,
                create_base=plan.create_remote_base, counters=counters,
            )
        else:
            assert isinstance(s_ep, RemoteEndpoint) and isinstance(d_ep, LocalEndpoint)
            plan = await resolve_pull(session, s_ep, d_ep)
            done = await pull_tree(
                session, plan.module, plan.remote_base, plan.local_root, plan.top, spec, streams,
                create_root=plan.create_local_root and not dry_run, counters=counters,
            )
        nursery.cancel_scope.cancel()  # the ticker
        carriers = "h2" if session.force_h2_data or session.peer.data_port is None else "tcp"
    summary.files_copied = done.files_copied
    summary.bytes_copied = done.bytes_copied
    summary.files_skipped = done.files_skipped
    summary.dirs_created = done.dirs_created
    summary.links_created = done.links_created
    summary.files_deleted = done.files_deleted
    summary.entries_seen = done.entries_seen
    summary.files_removed = done.files_removed
    summary.deletions_skipped = done.deletions_skipped
    for f in done.failures:
        failure = Failure(os.fsdecode(f.path), f.op, f.message)
        summary.failures.append(failure)
        if progress is not None:
            progress.error(failure)
    summary.strategy = f"{plan.direction}:{carriers}:{streams}"
    summary.duration_s = time.perf_counter() - t0
    if progress is not None:
        progress.finish(summary)
    return summary
