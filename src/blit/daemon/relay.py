"""Remote to remote on the destination daemon: a client asks this daemon (B) to pull a tree from
another daemon (A) into one of B's modules (docs/protocol.md §4 "Remote to remote").

    peer/pull   module, read-only, consent (allow_peer_pull), paths, filters -> PeerStarted{job};
                the job runs in the session's nursery
    the job     resolve A's name once; with peer_pull_from, every address must be in it
                (decisions R35); open_session(A) on those very addresses (no second lookup),
                A's certificate pinned in B's own known_hosts (state dir) under A's name
                -> transport.remote.resolve(): stat on A, contained stat on B
                -> transport.tree.pull_tree: once A accepted the transfer, mkdir -p the base
                   inside the module (no link followed) and a DestTree rooted at the base's fd,
                   every directory opened by the containment walk
    peer/wait   long poll: progress so far; once over, the tally or the error (job forgotten)

B is an ordinary pull client of A: the same client code as `blit copy A:/m/x here`; a move is a
pull move (B syncs what landed, then A removes those sources: tree/remove). A client
that goes away closes its session, whose nursery cancels the job, which closes B's session with
A (A cancels its side). This module must not own listeners or parse bytes.
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import os
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

from ..endpoint import HostSpec, RemoteEndpoint, parse_host
from ..errors import ConfigError, ConnectError, FatalError, RemoteError, StallError, TransportError, UsageError
from ..transport import protocol
from ..transport import tls as tls_mod
from ..transport.protocol import ErrorCode, Refused
from ..transport.remote import RemoteSide, Resolved, nesting_check, resolve, side_kind
from . import contain

log = logging.getLogger("blit.daemon")

MAX_JOBS_PER_SESSION = 2


def known_hosts_of(state: Any) -> Path:
    """B's own pins of the daemons it pulls from: known_hosts in the daemon's state dir."""
    return (state.config.state_dir or tls_mod.default_state_dir()) / tls_mod.KNOWN_HOSTS


class ModuleSide(RemoteSide):
    """The destination as B sees it: its own module, looked at with the containment walk."""

    def __init__(self, root: Path, module: str, path: bytes, limiter: trio.CapacityLimiter) -> None:
        super().__init__(None, module, path, contain.label(module, path))
        self.root = root
        self.limiter = limiter

    async def kind(self, path: bytes, follow: bool) -> str | None:
        try:
            entry, _ident = await trio.to_thread.run_sync(contain.stat_path, self.root, path, limiter=self.limiter)
        except Refused as exc:
            if exc.code == ErrorCode.NOT_FOUND:
                return None
            if exc.code == ErrorCode.NOT_A_DIRECTORY:  # as RemoteSide says it (_rstat)
                raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR)) from None
            raise
        return side_kind(entry)


async def peer_addresses(host: HostSpec) -> list[str]:
    """The addresses a connection to `host` would try (getaddrinfo for TCP, in its order).

    Raises:
        ConnectError: the name does not resolve (the line an unreachable daemon gets).
    """
    try:
        infos = await trio.socket.getaddrinfo(host.host, host.port, type=socket.SOCK_STREAM)
    except OSError as exc:  # socket.gaierror
        raise ConnectError(f"cannot reach the daemon at {host.netloc}: {exc.strerror or exc}") from None
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


@dataclass
class PeerJob:
    """One pull from a peer daemon, started by `peer/pull` and watched by `peer/wait`."""

    id: int
    msg: protocol.PeerPull
    root: Path
    state: Any  # handlers.DaemonState
    finished: trio.Event = field(default_factory=trio.Event)
    dest: Any = None  # transport.tree.DestTree once the pull runs (live counters)
    result: protocol.TreeDone | None = None
    error: protocol.Error | None = None
    carrier: str | None = None
    client: str = ""  # the address of the client that asked (A checks it too: OpenTree.client)

    @property
    def source(self) -> str:
        p = self.msg.peer
        return str(RemoteEndpoint(HostSpec(p.host, p.port), p.module, p.path.decode("utf-8", "surrogateescape")))

    @property
    def actions(self) -> Any:
        """report_actions: the DestTree's ActionLog once the pull runs (else None)."""
        return self.dest.actions if self.dest is not None else None

    def status(self) -> protocol.PeerStatus:
        """Progress; with report_actions the next page of actions, and not `done` until the last
        page went (the job is forgotten once done)."""
        d = self.dest
        log = self.actions
        page = log.take() if log is not None else []
        done = self.finished.is_set() and (log is None or len(log) == 0)
        return protocol.PeerStatus(
            done=done,
            files_copied=d.files_copied if d is not None else 0,
            bytes_copied=d.bytes_copied if d is not None else 0,
            entries_seen=d.entries_seen if d is not None else 0,
            result=self.result if done else None,
            error=self.error if done else None,
            carrier=self.carrier,
            actions=page,
            actions_dropped=log.dropped if done and log is not None else 0,
        )

    def _fail(self, code: ErrorCode | str, message: str) -> None:
        code = code.value if isinstance(code, ErrorCode) else code
        self.error = protocol.Error(error=code[:64], message=message[: protocol.MAX_TEXT])
        log.info("peer pull %d from %s failed: %s: %s", self.id, self.source, code, message)

    async def run(self) -> None:
        """The job's task: never raises (but Cancelled); the outcome is in result / error."""
        try:
            await self._pull()
            log.info("peer pull %d from %s done: %d files", self.id, self.source, self.result.files_copied if self.result else 0)
        except Refused as exc:
            self._fail(exc.code, exc.message)
        except UsageError as exc:
            self._fail(ErrorCode.BAD_REQUEST, str(exc))
        except RemoteError as exc:  # only A answers RemoteErrors here
            a = HostSpec(self.msg.peer.host, self.msg.peer.port)
            if exc.code == ErrorCode.AUTH_REQUIRED.value:  # B holds no secret for A (R17)
                name = f"module {self.msg.peer.module!r}" if self.msg.peer.module else "the root export"
                self._fail(
                    ErrorCode.NOT_ALLOWED,
                    f"the source daemon {a} requires authentication for {name}: remote to remote"
                    " cannot pull from a protected module (copy through this machine instead)",
                )
            else:
                self._fail(exc.code, f"the source daemon {a} refused: {exc.message}")
        except TransportError as exc:
            if isinstance(exc, StallError) and exc.local:  # B's own disk hung, not the link to A
                self._fail(ErrorCode.IO_ERROR, f"a file operation on the destination daemon hung (no progress for {exc.seconds:g} s)")
                return
            why = str(exc)  # the client says "B could not reach A: ..." around it
            redundant = f"cannot reach the daemon at {HostSpec(self.msg.peer.host, self.msg.peer.port).netloc}: "
            self._fail(ErrorCode.PEER_FAILED, why.removeprefix(redundant))
        except (ConfigError, FatalError, OSError) as exc:  # B's own known_hosts, B's disk (full: R30)
            self._fail(ErrorCode.IO_ERROR, str(exc))
        except Exception as exc:
            log.exception("peer pull %d failed", self.id)
            self._fail(ErrorCode.INTERNAL, f"internal error: {type(exc).__name__}")
        finally:
            self.finished.set()

    async def _pull(self) -> None:
        from ..filters import Filters
        from ..plan import Compare
        from ..transport.client import Timeouts, open_session
        from ..transport.tree import DestTree, TreeSpec, pull_tree
        from .handlers import _make_base, contained_open_dir

        msg, peer, state = self.msg, self.msg.peer, self.state
        spec = TreeSpec(
            operation=msg.operation,
            compare=Compare(msg.compare),
            filters=Filters.from_args(protocol.rule_args(msg.filters)),
            dry_run=msg.dry_run,
            report_actions=msg.report_actions,
        )
        host = HostSpec(peer.host, peer.port)
        addresses = await peer_addresses(host)
        await self._refuse_peer(host, addresses)
        async with open_session(
            host,
            addresses=addresses,
            tls_enabled=peer.tls,
            known_hosts=known_hosts_of(state),
            force_h2_data=msg.h2_data,
            timeouts=Timeouts(stall=state.stall),
        ) as a:
            a.acting_for = self.client
            src = RemoteSide(a, peer.module, peer.path, self.source, source=True)
            r = await resolve(src, ModuleSide(self.root, msg.module, msg.path, state.fs_limiter))
            src.check_readable()  # as a client's pull: before anything is made here
            await self._refuse_overlap(a, r)

            def open_base() -> int:
                parts = protocol.split_path(r.dst_base)
                if r.create_dst:
                    if msg.dry_run:
                        return -1  # nothing to open: the top job is new (remote.resolve)
                    _make_base(self.root, parts, contain.label(msg.module, msg.path))
                root_fd = contain.open_root(self.root)
                try:
                    return contain.walk_dir(root_fd, parts)
                finally:
                    os.close(root_fd)

            async def open_dest() -> DestTree:
                """Once A accepted the transfer (a refused move leaves nothing on B)."""
                base_fd = await trio.to_thread.run_sync(open_base, limiter=state.fs_limiter)
                dest = self.dest = DestTree(base_fd, spec, open_dir=contained_open_dir)
                return dest

            self.carrier = "h2" if a.force_h2_data or a.peer.data_port is None else "tcp"
            target = os.path.join(os.fsencode(self.root), *protocol.split_path(r.dst_base))
            self.result = await pull_tree(
                a, peer.module, r.src_base, None, r.top, spec, msg.streams, open_dest=open_dest, for_client=self.client,
                refuse_nesting=nesting_check(src, target, r.top, contain.label(msg.module, msg.path), mirror=spec.operation == "mirror"),
            )

    async def _refuse_peer(self, host: HostSpec, addresses: list[str]) -> None:
        """With `peer_pull_from`, refuse A unless every address B would connect to is in it
        (a name resolving to an allowed and a forbidden address cannot reach the latter).
        Names in the list are resolved now; one that does not resolve admits nothing."""
        rule = self.state.peer_hosts(self.msg.module)
        if rule is None:
            return
        addrs = [ipaddress.ip_address(a) for a in addresses]
        bad = rule.outside(addrs, set())
        if bad and rule.names:
            named: set[Any] = set()
            given = host.host.lower().removesuffix(".")
            for name in rule.names:
                if name == given:
                    named.update(addrs)  # the very lookup B connects with
                    continue
                try:
                    named.update(ipaddress.ip_address(a) for a in await peer_addresses(HostSpec(name, host.port)))
                except ConnectError as exc:
                    log.info("peer_pull_from: %s", exc)
            bad = rule.outside(addrs, named)
        if bad:
            m = self.msg.module
            name, key = (f"module {m!r}", "its peer_pull_from") if m else ("the root export", "root_peer_pull_from")
            raise Refused(
                ErrorCode.NOT_ALLOWED,
                f"{name} may not pull from {host}: {', '.join(map(str, bad))} {'is' if len(bad) == 1 else 'are'}"
                f" not in {key} (the daemon's config)",
            )

    async def _refuse_overlap(self, a: Any, r: Resolved) -> None:
        """When A is this very daemon, the destination must not be the source or inside it
        (the pull would chase its own output), as for a local copy."""
        state, peer = self.state, self.msg.peer
        mine, theirs = state.fingerprint, a.client.fingerprint
        if mine is not None and theirs is not None:
            same = mine == theirs
        else:
            same = a.peer.name == state.config.instance_name and a.peer.data_port == state.data_port
        if not same:
            return
        try:
            src_root = state.export(peer.module)[0]  # a path to compare, not an access
        except Refused:
            return
        from ..api import _inside

        def where(root: Path, base: bytes, name: str | None) -> bytes:
            parts = protocol.split_path(base) + ([os.fsencode(name)] if name else [])
            return os.path.realpath(os.path.join(os.fsencode(root), *parts))

        only = r.top.only
        name, dname = next(iter(only.items())) if only else (None, None)
        s_abs, d_abs = where(src_root, r.src_base, name), where(self.root, r.dst_base, dname)
        if s_abs == d_abs:
            raise UsageError(f"source and destination are the same: {self.source}")
        if _inside(d_abs, s_abs):
            raise UsageError(f"destination {contain.label(self.msg.module, self.msg.path)} is inside the source {self.source}")


async def start(s: Any, msg: protocol.PeerPull) -> protocol.PeerStarted:
    """`peer/pull`: refuse at once what B's config or the request does not allow; else start."""
    state = s.state
    if state.shutting_down:
        raise Refused(ErrorCode.SHUTTING_DOWN, "the daemon is shutting down")
    if msg.operation not in ("copy", "mirror", "move"):
        raise Refused(ErrorCode.BAD_REQUEST, "operation must be copy, mirror or move")
    root, read_only = s.module(msg.module)
    name = f"module {msg.module!r}" if msg.module else "the root export"
    if read_only:
        raise Refused(ErrorCode.READ_ONLY, f"{name} is read-only")
    if not state.peer_pull_allowed(msg.module):
        key = "allow_peer_pull = true in that [[module]] table" if msg.module else "root_allow_peer_pull = true in [daemon]"
        raise Refused(
            ErrorCode.NOT_ALLOWED,
            f"{name} does not accept remote to remote transfers (the daemon's config needs {key})",
        )
    protocol.split_path(msg.path)
    protocol.split_path(msg.peer.path)
    try:
        parse_host(f"[{msg.peer.host}]:{msg.peer.port}" if ":" in msg.peer.host else f"{msg.peer.host}:{msg.peer.port}")
    except ConfigError as exc:
        raise Refused(ErrorCode.BAD_REQUEST, f"source daemon: {exc}") from None
    from ..filters import Filters

    try:
        Filters.from_args(protocol.rule_args(msg.filters))
    except UsageError as exc:  # names the pattern and what is wrong with it
        raise Refused(ErrorCode.BAD_REQUEST, str(exc)) from None
    if len(s.jobs) >= MAX_JOBS_PER_SESSION:
        raise Refused(ErrorCode.BUSY, f"at most {MAX_JOBS_PER_SESSION} remote to remote transfers per session")
    job = PeerJob(state.next_id(), msg, root, state, client=str(s.addr) if s.addr is not None else "")  # (unmapped: server._peer_ip)
    s.jobs[job.id] = job
    log.info("peer pull %d: %s -> %s", job.id, job.source, contain.label(msg.module, msg.path))
    s.nursery.start_soon(job.run)
    return protocol.PeerStarted(job=job.id)


async def wait(s: Any, msg: protocol.PeerWait) -> protocol.PeerStatus:
    """`peer/wait`: answer when the job ends or after `wait_ms`; a final answer forgets the job."""
    job: PeerJob | None = s.jobs.get(msg.job)
    if job is None:
        raise Refused(ErrorCode.UNKNOWN_TRANSFER, f"no remote to remote job {msg.job} in this session")
    with trio.move_on_after(msg.wait_ms / 1000):
        if job.msg.report_actions:
            # Answer as soon as there is something to list (the client takes it page by page).
            while not job.finished.is_set() and not (job.actions is not None and len(job.actions)):
                with trio.move_on_after(protocol.ACTION_POLL):
                    await job.finished.wait()
        else:
            await job.finished.wait()
    status = job.status()
    if status.done:
        s.jobs.pop(job.id, None)
    return status


__all__ = ["PeerJob", "ModuleSide", "start", "wait", "known_hosts_of", "peer_addresses", "MAX_JOBS_PER_SESSION"]
