"""Remote copy/mirror/move: resolve the endpoints with rsync's trailing-slash rules, then push,
pull or relay (remote to remote).

`remote_transfer()` is what `api.transfer` calls when an endpoint is remote. The rules are the
local ones (`api.resolve`), with a remote side looked at through `stat` on its daemon (which
never follows a symlink, so a remote symlink is never a directory). `resolve()` applies them to
any two `Side`s: local and remote here, and on a daemon asked to pull from another daemon
(daemon/relay.py), that daemon's own module and the source daemon:

| SRC | DST | transfer |
|---|---|---|
| `dir/` (or a module's top) | missing or directory | contents of dir into DST (created if missing) |
| `dir` | existing directory | dir lands as `DST/dir` |
| `dir` | missing | dir lands as DST |
| `file` | existing directory | `DST/file` |
| `file` | anything else | DST (`DST/` naming a non-directory: refused) |

Move removes a source entry only once the destination side confirmed it landed and synced it
(docs/protocol.md §4); between two daemons that side is B, whose pull from A is a pull move.
Progress goes to the caller's Progress at most 10 times a second.

Remote to remote (`relay()`): the client opens a session with the destination daemon B only and
sends `peer/pull`; B checks its config's consent, connects to the source daemon A as an ordinary
pull client, resolves, pulls, and the client polls `peer/wait` for progress and the tally.

This module must not print; it returns a Summary or raises from blit.errors.
"""

from __future__ import annotations

import dataclasses
import errno
import os
import stat
import time
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Callable
from typing import Any

from ..endpoint import LocalEndpoint, RemoteEndpoint, contents_form, parse_endpoint
from ..errors import UsageError
from ..plan import Compare
from ..report import Failure, Summary, finish_command
from . import protocol
from .tree import TopJob, TreeSpec


@dataclass
class Resolved:
    """Where a transfer goes once the trailing-slash rules are applied."""

    src_base: bytes
    """The source directory the transfer is rooted at (local absolute, or module-relative)."""
    dst_base: bytes
    """The destination directory it lands in (the same kinds)."""
    top: TopJob
    create_dst: bool = False
    """`dst_base` does not exist yet: create it (`mkdir -p`) before the transfer."""
    as_new: bool = False
    """A directory lands as a DST that does not exist yet (report.Summary.finish_with)."""


class Side:
    """One endpoint as the rules see it: its path, a way to look at paths on its side, and a way
    to split a path into (parent, name). Subclasses: LocalSide, RemoteSide, and the daemon's
    own module (daemon/relay.py) for remote to remote."""

    label: str
    """The endpoint as the user wrote it (error messages)."""
    path: bytes
    trailing_slash: bool
    at_top: bool = False
    """The path is a module's top: transferred as its contents even without a trailing slash."""
    overlap_lookups: bool = False
    """`kind` waits on a peer: `resolve` asks for a destination and its parent at once when it
    may need both (one round trip instead of two)."""
    ident: tuple[int, int] | None = None
    """The directory at `path` by (device, inode), once `kind` looked at it (a daemon says it
    with FEATURE_NEST): a destination on its machine must not lie inside it (R52)."""
    up: list[int] = []
    """A daemon's directory at `path`: its ancestors' (device, inode) pairs, flat (it says them
    with FEATURE_HOLD): a mirror's destination on its machine must not be one of them (R59)."""

    async def kind(self, path: bytes, follow: bool) -> str | None:
        """"dir", "link" (a symlink a daemon does not follow), "other", or None when missing;
        OSError for anything else."""
        raise NotImplementedError

    def split(self, path: bytes) -> tuple[bytes, bytes]:
        raise NotImplementedError


class LocalSide(Side):
    def __init__(self, ep: LocalEndpoint) -> None:
        from .. import fsops

        self.label = ep.path
        try:
            self.path = fsops.kernel_abspath(os.fsencode(ep.path))
        except OSError as exc:  # a `..` after a missing name or a file: no path, as the kernel says
            raise UsageError(f"{ep.path}: no such path ({exc.strerror})") from None
        self.trailing_slash = ep.trailing_slash

    async def kind(self, path: bytes, follow: bool) -> str | None:
        try:
            st = os.stat(path) if follow else os.lstat(path)
        except FileNotFoundError:
            return None
        if not stat.S_ISDIR(st.st_mode):
            return "other"
        if path == self.path:
            self.ident = (st.st_dev, st.st_ino)
        return "dir"

    def split(self, path: bytes) -> tuple[bytes, bytes]:
        return os.path.dirname(path), os.path.basename(path)


class RemoteSide(Side):
    """A module path on a daemon, looked at with `stat` (which never follows a symlink)."""

    overlap_lookups = True

    def __init__(self, session: Any, module: str, path: bytes, label: str, *, source: bool = False) -> None:
        self.session = session
        self.module = module
        self.label = label
        self.path = path
        self.source = source  # a pull's: the daemon says whether it can read it (`unreadable`)
        self.unreadable = ""
        self.trailing_slash = contents_form(path)
        try:
            self.at_top = not protocol.split_path(path)
        except protocol.Refused as exc:  # what the daemon would refuse: one line, nothing sent
            raise UsageError(f"{label}: {exc.message}") from None

    async def kind(self, path: bytes, follow: bool) -> str | None:
        reply = await _rstat(self.session, self.module, path, read=self.source and path == self.path)
        if reply is None:
            return None
        if path == self.path:
            self.unreadable = reply.unreadable
        if path == self.path and len(reply.source_dir) == 2:
            self.ident = (reply.source_dir[0], reply.source_dir[1])
            self.up = reply.source_up
        return side_kind(reply.entry)

    def split(self, path: bytes) -> tuple[bytes, bytes]:
        return split_remote(path)

    def check_readable(self) -> None:
        """A source the daemon said it cannot read (`unreadable`, R69) ends the run before
        anything is made, as a local run's does (api.check_source_readable)."""
        if self.unreadable:
            from ..errors import FatalError

            raise FatalError(f"cannot read source {self.label}: {self.unreadable}")


def remote_side(session: Any, ep: RemoteEndpoint, *, source: bool = False) -> RemoteSide:
    return RemoteSide(session, ep.module, ep.path_bytes, str(ep), source=source)


async def _rstat(session: Any, module: str, path: bytes, *, read: bool = False) -> protocol.StatReply | None:
    """stat on the daemon (`read`: and whether it can read the entry as a source root); None
    also when a parent is missing. NotADirectoryError when a parent is not a directory (as
    os.stat says it)."""
    from ..errors import RemoteError

    try:
        reply: protocol.StatReply = await session.stat_reply(module, path, read=read)
        return reply
    except RemoteError as exc:
        if exc.code == "not-found":
            return None
        if exc.code == "not-a-directory":
            raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR)) from None
        raise


def split_remote(path: bytes) -> tuple[bytes, bytes]:
    """(parent, name) of a module-relative path; ("", "") for the module's top."""
    parts = protocol.split_path(path)
    if not parts:
        return b"", b""
    return b"/".join(parts[:-1]), parts[-1]


async def resolve(src: Side, dst: Side) -> Resolved:
    """rsync's trailing-slash rules (the table in the module docstring), for any two sides.

    Raises:
        UsageError: missing source, `file/`, a directory onto a non-directory, a destination
            that goes through a file. Nothing is changed on either side.
    """
    try:
        skind = await src.kind(src.path, src.trailing_slash)
    except OSError as exc:
        raise UsageError(f"cannot read source {src.label}: {exc.strerror}") from None
    if skind is None:
        raise UsageError(f"source does not exist: {src.label}")
    src_is_dir = skind == "dir"
    if src.trailing_slash and not src_is_dir:
        raise UsageError(f"source is {not_dir(skind)}: {src.label}")

    async def dst_kind(path: bytes) -> str | None:
        try:
            return await dst.kind(path, True)
        except NotADirectoryError:
            raise UsageError(f"destination path goes through a file: {dst.label}") from None
        except OSError as exc:
            raise UsageError(f"cannot read destination {dst.label}: {exc.strerror}") from None

    contents = src_is_dir and (src.trailing_slash or src.at_top)
    # DST's parent is needed when DST is not a directory: a remote DST's parent is looked up
    # at the same time (one round trip, not two). Each lookup keeps its result or exception;
    # the parent's counts only if it is needed.
    early: dict[str, Any] = {}

    async def lookup(key: str, path: bytes) -> None:
        try:
            early[key] = await dst_kind(path)
        except Exception as exc:
            early[key + " failed"] = exc

    if dst.overlap_lookups and not contents and not dst.trailing_slash and dst.split(dst.path)[1]:
        import trio

        async with trio.open_nursery() as nursery:
            nursery.start_soon(lookup, "parent", dst.split(dst.path)[0])
            await lookup("dst", dst.path)
        if "dst failed" in early:
            raise early["dst failed"]
        dkind: str | None = early["dst"]
    else:
        dkind = await dst_kind(dst.path)
    if contents:
        if dkind is not None and dkind != "dir":
            raise UsageError(f"destination exists and is {not_dir(dkind)}: {dst.label}")
        return Resolved(src.path, dst.path, TopJob(dst_new=dkind is None), create_dst=dkind is None)
    src_base, name = src.split(src.path)
    if dkind == "dir":
        base, dname, create = dst.path, name, False
    elif dkind is None and dst.trailing_slash:
        base, dname, create = dst.path, name, True
    else:
        if dkind is not None and src_is_dir:
            raise UsageError(f"cannot overwrite non-directory {dst.label} with directory {src.label}")
        if dkind is not None and dst.trailing_slash:  # cp and rsync: "Not a directory"
            raise UsageError(f"destination is {not_dir(dkind)}: {dst.label}")
        base, dname = dst.split(dst.path)
        if not dname:
            raise UsageError(f"destination {dst.label} names no file")
        if "parent failed" in early:
            raise early["parent failed"]
        parent = early["parent"] if "parent" in early else await dst_kind(base)
        if parent is not None and parent != "dir":
            raise UsageError(f"destination path goes through a file: {dst.label}")
        create = parent is None
    # A base created for this run is empty: the top job need not scan it (and a dry run, which
    # creates nothing, need not open it).
    top = TopJob(dst_new=create, only={os.fsdecode(name): os.fsdecode(dname)})
    return Resolved(src_base, base, top, create_dst=create, as_new=src_is_dir and dkind is None and not dst.trailing_slash)


def nesting_check(src: Side, dst_base: bytes, top: TopJob, dst_label: str, mirror: bool = False) -> Callable[[], None] | None:
    """For pull_tree: the check that a pull's destination (`dst_base`, a path on this machine,
    and the top job's name in it) is not the source directory by another path, nor inside it,
    nor (`mirror`) a directory that holds it, once the source's daemon proves to be on this
    machine (R52, R59). None for a file's pull."""
    ident = src.ident
    if ident is None:
        return None
    from ..api import holding, refuse_nesting

    target = os.path.join(dst_base, os.fsencode(next(iter(top.only.values())))) if top.only else dst_base
    up = src.up if mirror else []

    def check() -> None:
        from .. import fsops

        refuse_nesting(target, ident, src.label, dst_label)
        if up and fsops.holds(target, up):
            raise UsageError(holding(src.label, dst_label))

    return check


def side_kind(entry: protocol.Entry | None) -> str | None:
    """A daemon's entry as `Side.kind` says it."""
    if entry is None:
        return None
    return "dir" if entry.kind == "dir" else "link" if entry.kind == "symlink" else "other"


def not_dir(kind: str) -> str:
    """What a `kind` other than "dir" is, for a message where a directory was needed."""
    if kind == "link":
        return "a symbolic link, which a daemon never follows, not a directory"
    return "not a directory"


def _fatal_summary(summary: Summary, exc: BaseException, stage: str, counters: Any, progress: Any, t0: float) -> None:
    """A remote run that a BlitError stopped after it started: its summary goes out now, with
    the error and, as far as this side can vouch for them, its counts: a pull's landed here
    (but a move's, whose removals the daemon made); a push's or a relay's were the destination
    daemon's, so they are left out. Any other exception (an interrupt) is left to the caller."""
    from ..errors import BlitError, leaves

    errors = [e for e in leaves(exc) if isinstance(e, BlitError)] if isinstance(exc, BaseExceptionGroup) else [exc]
    if progress is None or not errors or not isinstance(errors[0], BlitError):
        return
    summary.fatal = str(errors[0])
    summary.fatal_code = errors[0].exit_code
    if stage == "pull" and summary.operation != "move":
        if counters.dest is not None:
            _summarize(summary, counters.dest.result(), progress)
    elif stage:  # a push, a relay, a pull's move
        summary.counts_known = False
    summary.duration_s = time.perf_counter() - t0
    progress.finish(summary)


def _summarize(summary: Summary, done: protocol.TreeDone, progress: Any) -> None:
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


RELAY_POLL = 5.0
"""Remote to remote: the longest the client lets one `peer/wait` poll last (seconds)."""


async def relay(
    session: Any,
    src: RemoteEndpoint,
    dst: RemoteEndpoint,
    spec: TreeSpec,
    streams: int,
    *,
    tls_enabled: bool,
    progress: Any = None,
) -> tuple[protocol.TreeDone, str]:
    """Remote to remote: ask the destination daemon (the session's) to pull `src` from its
    daemon, then poll until the job ends. Returns B's tally and how its data came ("tcp"/"h2").

    Each poll is answered within min(RELAY_POLL, request timeout / 4), so no request waits
    longer than the request timeout for as long as B is alive; closing the session cancels
    B's pull. With spec.report_actions (and a B that speaks FEATURE_ACTIONS), B's actions come
    with the polls and go to `progress.action`.

    Raises:
        RemoteError: B refused (unknown module, read-only, no consent) or A refused.
        UsageError: the trailing-slash rules refused the pair (missing source, ...).
        TransportError: B could not reach or use A.
    """
    from .tree import emit_actions

    report = spec.report_actions and progress is not None and protocol.FEATURE_ACTIONS in session.peer.features
    started: protocol.PeerStarted = await session.call(
        protocol.PeerPull(
            module=dst.module,
            path=dst.path_bytes,
            peer=protocol.Peer(host=src.host.host, port=src.host.port, module=src.module, path=src.path_bytes, tls=tls_enabled),
            operation=spec.operation,
            compare=int(spec.compare),
            filters=protocol.wire_rules(spec.filters.rules),
            dry_run=spec.dry_run,
            streams=streams,
            h2_data=session.force_h2_data,
            report_actions=report,
        )
    )
    wait_ms = int(min(RELAY_POLL, session.timeouts.request / 4) * 1000)
    t0 = time.perf_counter()
    while True:
        status: protocol.PeerStatus = await session.call(protocol.PeerWait(job=started.job, wait_ms=wait_ms))
        if progress is not None:
            if report:
                emit_actions(status.actions, progress.action)
                room = getattr(progress, "room", None)
                if room is not None:
                    await room()
            progress.update(status.files_copied, status.bytes_copied, time.perf_counter() - t0)
        if status.done:
            break
    if status.error is not None:
        from ..errors import RemoteError, TransportError

        code, message = status.error.error, status.error.message
        if code == protocol.ErrorCode.BAD_REQUEST.value:
            raise UsageError(message)
        if code == protocol.ErrorCode.PEER_FAILED.value:
            raise TransportError(f"{dst.host} could not reach {src.host}: {message}")
        raise RemoteError(code, message)
    assert status.result is not None
    result = status.result
    if status.actions_dropped:
        from .tree import actions_dropped_failure

        result = dataclasses.replace(result, failures=[*result.failures, actions_dropped_failure(status.actions_dropped)])
    return result, status.carrier or "tcp"


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
    secrets_file: Path | None = None,
    record_actions: bool = False,
) -> Summary:
    """Copy, mirror or move between a local path and a daemon (either direction) or between two
    daemons (the destination daemon pulls from the source daemon; the client relays).
    `record_actions` (-v, --dry-run): every entry the destination side changes goes to
    `progress.action`, as in a local run (from a daemon only if it speaks FEATURE_ACTIONS).

    Raises:
        UsageError: bad endpoints, missing source.
        ConnectError, RemoteError, TransportError: a daemon could not be used (remote to
            remote: B refused, or B could not reach or use A).
    """
    import trio

    from ..credentials import client_credentials
    from ..filters import Filters
    from ..report import NullProgress, tick
    from .client import Timeouts, open_session
    from ..api import check_source_readable
    from .tree import DestTree, TreeCounters, pull_tree, push_tree

    compiled = Filters.from_args(filters or [])  # a bad pattern stops the run before anything else
    s_ep, d_ep = parse_endpoint(src), parse_endpoint(dst)
    if not isinstance(s_ep, RemoteEndpoint) and not isinstance(d_ep, RemoteEndpoint):
        raise UsageError("remote_transfer needs a remote endpoint")
    # The session is with the destination daemon when both ends are remote (it does the work).
    remote = d_ep if isinstance(d_ep, RemoteEndpoint) else s_ep
    assert isinstance(remote, RemoteEndpoint)
    if remote is d_ep and isinstance(s_ep, RemoteEndpoint) and s_ep.user is not None:
        raise UsageError(
            f"{s_ep}: remote to remote cannot authenticate to the source daemon (the destination "
            "daemon pulls and holds no secret); copy through this machine instead"
        )
    creds = await trio.to_thread.run_sync(
        client_credentials, remote.user, remote.host.host, remote.module, secrets_file
    )
    summary = Summary(operation=operation, source=src, destination=dst, dry_run=dry_run)
    if progress is not None:
        progress.start(summary)
    report = record_actions and progress is not None
    spec = TreeSpec(
        operation=operation, compare=compare, filters=compiled, dry_run=dry_run, report_actions=report
    )
    actions = progress.action if report else None
    room = getattr(progress, "room", None) if report else None
    t0 = time.perf_counter()
    counters = TreeCounters()
    stage = ""  # the transfer under way, once it is: "push", "pull" or "relay"
    try:
        async with open_session(
            remote.host, tls_enabled=tls_enabled, known_hosts=known_hosts, force_h2_data=force_h2_data, timeouts=timeouts or Timeouts()
        ) as session, trio.open_nursery() as nursery:
            if creds is not None:
                await session.authenticate(remote.module, *creds)
            if isinstance(s_ep, RemoteEndpoint) and isinstance(d_ep, RemoteEndpoint):
                direction = stage = "relay"  # progress: relay() reports each poll's counters
                done, carriers = await relay(session, s_ep, d_ep, spec, streams, tls_enabled=tls_enabled, progress=progress)
            else:
                if progress is not None and not isinstance(progress, NullProgress):
                    counters.want_totals = True
                    nursery.start_soon(tick, progress, counters.snapshot, t0, counters.totals)
                if isinstance(d_ep, RemoteEndpoint):
                    assert isinstance(s_ep, LocalEndpoint)
                    direction = "push"
                    local = LocalSide(s_ep)
                    r = await resolve(local, remote_side(session, d_ep))
                    if r.as_new and not dry_run:
                        summary.finish_with = finish_command(operation, src, dst)
                    await trio.to_thread.run_sync(check_source_readable, local.path, local.trailing_slash, local.label)
                    up = None
                    if operation == "mirror" and local.ident is not None:  # R59: only a mirror deletes
                        from .. import fsops

                        up = (await trio.to_thread.run_sync(fsops.ancestors, local.path))[: protocol.MAX_UP]
                    stage = "push"
                    done = await push_tree(
                        session, r.src_base, d_ep.module, r.dst_base, r.top, spec, streams, create_base=r.create_dst, counters=counters,
                        actions=actions, actions_room=room, source_dir=local.ident, source_up=up,
                    )
                else:
                    assert isinstance(s_ep, RemoteEndpoint) and isinstance(d_ep, LocalEndpoint)
                    direction = "pull"
                    rside = remote_side(session, s_ep, source=True)
                    r = await resolve(rside, LocalSide(d_ep))
                    rside.check_readable()
                    if r.as_new and not dry_run:
                        summary.finish_with = finish_command(operation, src, dst)
                    # A missing local destination is made once the daemon accepted the transfer (a
                    # refused move leaves nothing behind); a dry run makes nothing and opens nothing
                    # (the top job is new, see resolve).
                    dest = DestTree(-1, spec) if r.create_dst and dry_run else None
                    stage = "pull"
                    done = await pull_tree(
                        session, s_ep.module, r.src_base, r.dst_base, r.top, spec, streams,
                        create_root=r.create_dst and not dry_run, counters=counters, dest=dest, actions=actions, actions_room=room,
                        refuse_nesting=nesting_check(rside, r.dst_base, r.top, d_ep.path, mirror=operation == "mirror"),
                    )
                nursery.cancel_scope.cancel()  # the ticker
                carriers = "h2" if session.force_h2_data or session.peer.data_port is None else "tcp"
    except BaseException as exc:
        _fatal_summary(summary, exc, stage, counters, progress, t0)
        raise
    _summarize(summary, done, progress)
    summary.strategy = f"{direction}:{carriers}:{streams}"
    summary.duration_s = time.perf_counter() - t0
    if progress is not None:
        progress.finish(summary)
    return summary
