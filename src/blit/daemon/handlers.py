"""One function per control request: a decoded message in, a reply message out.

Also the daemon-side objects those requests act on: `DaemonState` (config, modules, grants,
limits), `Session` (one control connection) and `Transfer` (one push or pull with its data
streams). Every filesystem call goes through `contain` in a worker thread, one hop per request.

This module must not own sockets or listeners (server.py does) and must not parse bytes
(protocol.py does). Refusals are `protocol.Refused`, turned into `Error` replies by server.py.
"""

from __future__ import annotations

import errno
import hmac
import ipaddress
import itertools
import logging
import math
import os
import secrets
import stat
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

from .. import fsops
from ..stall import StallGuard, run_stoppable
from ..transport import data, protocol
from ..transport.protocol import ErrorCode, Refused
from ..transport.tree import BEHIND_POLL, MAX_QUEUED_FILES, DestTree, SourceTree, SrcFile
from . import contain
from .config import Access, Address, DaemonConfig, ModuleConfig, PeerHosts, unmapped

log = logging.getLogger("blit.daemon")

MAX_TRANSFERS_PER_SESSION = 8
MAX_FILES_PER_TRANSFER = 10_000_000
MAX_AUTH_FAILURES = 3
"""Failed `auth` answers one session may give; later ones fail without being checked."""
AUTH_FAILURE_DELAY = 0.3
"""Seconds a failed `auth` waits before its answer (with the limit above: against guessing)."""


ADMISSIONS = 64
"""Data connections admitted (TLS handshake and hello) at a time; each has data.ADMIT_TIMEOUT
for the whole of it."""


@dataclass
class DaemonState:
    """Everything the handlers of all sessions share."""

    config: DaemonConfig
    software: str
    data_port: int | None = None
    fingerprint: str | None = None
    grants: data.GrantTable = field(default_factory=data.GrantTable)
    stream_limiter: trio.CapacityLimiter = field(default_factory=lambda: trio.CapacityLimiter(512))
    admit_limiter: trio.CapacityLimiter = field(default_factory=lambda: trio.CapacityLimiter(ADMISSIONS))
    """Data connections in their handshake (TLS and hello) at once: their own threads, so that
    connections that never finish one cannot take the admitted streams' workers."""
    fs_limiter: trio.CapacityLimiter = field(default_factory=lambda: trio.CapacityLimiter(16))
    stall: float = data.DEFAULT_STALL
    sessions: int = 0
    shutting_down: bool = False
    _ids: Any = field(default_factory=lambda: itertools.count(1))

    def export(self, name: str, addr: Address | None = None, client: Address | None = None) -> tuple[Path, bool, Access]:
        """(root path, read_only, access rules) of a module, "" being the root export. Only
        `Session.module` may hand a module to a request: it applies the access rules.

        Raises:
            Refused(UNKNOWN_MODULE): no such module (its name is in the message, with the
                modules a client at `addr`, and `client` when given, may use: those `modules`
                lists it).
        """
        if name == "":
            if self.config.root is None:
                raise Refused(ErrorCode.UNKNOWN_MODULE, "this daemon has no root export (host://path)")
            return self.config.root, self.config.root_read_only, self.config.root_access
        m: ModuleConfig | None = self.config.module(name)
        if m is None:
            known = ", ".join(x.name for x in self.config.modules if x.access.allows(addr) and (client is None or x.access.allows(client))) or "none"
            raise Refused(ErrorCode.UNKNOWN_MODULE, f"unknown module {name!r} (modules: {known})")
        return m.path, m.read_only, m.access

    def next_id(self) -> int:
        return int(next(self._ids))

    def admits(self, addr: Address | None) -> bool:
        """Whether any export's address rules admit a client at `addr` (one that none admits
        can list no module and use none)."""
        cfg = self.config
        if cfg.root is not None and cfg.root_access.allows(addr):
            return True
        return any(m.access.allows(addr) for m in cfg.modules)

    def peer_pull_allowed(self, name: str) -> bool:
        """Whether the config lets clients make this module pull from other daemons."""
        if name == "":
            return self.config.root_allow_peer_pull
        m = self.config.module(name)
        return m is not None and m.allow_peer_pull

    def peer_hosts(self, name: str) -> PeerHosts | None:
        """The hosts a module may pull from (`peer_pull_from`); None: any host."""
        if name == "":
            return self.config.root_peer_pull_from
        m = self.config.module(name)
        return m.peer_pull_from if m is not None else None


# =================================================================================================
# Files of a transfer


_IN_TREE = [b"(tree)"]
"""ModuleSource.paths of a file registered by directory: opened by the tree's SourceTree."""


class ModuleSource:
    """Pull: files of a transfer, opened below the transfer root without following links.

    For a tree pull (`tree` set), files are opened by the tree's SourceTree, which keeps the
    transfer's directories open (containment-walked once per directory, not once per file)."""

    def __init__(self, root: Path, base: list[bytes]) -> None:
        self.root = root
        self.base = base
        self.paths: dict[int, list[bytes]] = {}
        self.tree: Any = None  # transport.tree.SourceTree of a tree pull

    def add(self, file_id: int, parts: list[bytes]) -> None:
        self.paths[file_id] = parts
        if self.tree is not None and parts:
            rel = b"/".join(parts[:-1])
            self.tree.register(os.fsdecode(rel), [protocol.Need(id=file_id, name=parts[-1])])

    def add_dir(self, parts: list[bytes], ids: Sequence[int], names: list[bytes]) -> None:
        """A tree pull: files `names` of directory `parts`, by id (checked by the caller)."""
        self.paths.update(dict.fromkeys(ids, _IN_TREE))
        self.tree.register_names(os.fsdecode(b"/".join(parts)), ids, names)

    def frame_small(self, ids: list[int]) -> Any:
        """A tree pull: the small plain files among `ids` read and framed in C, one call per
        directory (SourceTree.frame_small, data.send_loop). None otherwise (each file opened)."""
        tree = self.tree
        if tree is None or not all(map(self.paths.__getitem__, ids)):
            return None
        return tree.frame_small(ids)

    def open(self, file_id: int) -> SrcFile:
        parts = self.paths[file_id]
        if self.tree is not None and parts:
            return self.tree.open(file_id)  # type: ignore[no-any-return]
        try:
            root_fd = contain.open_root(self.root)
            try:
                fd = contain.open_file(root_fd, self.base + parts)
            finally:
                os.close(root_fd)
        except Refused as exc:
            raise OSError(errno.EACCES, exc.message) from None
        try:
            st = os.fstat(fd)
            extents = None
            from ..fsops import data_extents, is_sparse

            if is_sparse(st):
                extents = data_extents(fd, st.st_size)
        except BaseException:
            os.close(fd)
            raise
        return SrcFile(fd, st.st_size, extents)


class _Sink:
    __slots__ = ("landing", "name", "offer", "fd")

    def __init__(self, landing: Any, name: bytes, offer: protocol.FileOffer) -> None:
        self.landing = landing
        self.name = name
        self.offer = offer
        self.fd = landing.fd

    def commit(self, size: int) -> None:
        from ..fsops import Meta

        o = self.offer
        meta = Meta(
            stat.S_IFREG | o.mode,  # st_mode
            size,  # st_size
            o.mtime_ns,  # st_mtime_ns
            o.mtime_ns,  # st_atime_ns
            os.geteuid(),  # st_uid
            os.getegid(),  # st_gid
            0,  # st_ino
            0,  # st_dev
            1,  # st_nlink
            0,  # st_rdev
            0,  # st_blocks
        )
        dir_fd = self.landing.dir_fd
        try:
            self.landing.finish_meta(meta, None, os.fsdecode(self.name))
            self.landing.commit(os.fsdecode(self.name), True)
        finally:
            os.close(dir_fd)

    def abort(self) -> None:
        dir_fd = self.landing.dir_fd
        try:
            self.landing.abort()
        finally:
            try:
                os.close(dir_fd)
            except OSError:
                pass


class ModuleSink:
    """Push: lands offered files below the transfer root, atomically (fsops.Landing)."""

    def __init__(self, root: Path, base: list[bytes]) -> None:
        self.root = root
        self.base = base
        self.offers: dict[int, protocol.FileOffer] = {}

    def open(self, file_id: int) -> _Sink:
        offer = self.offers[file_id]  # KeyError: never announced -> protocol error
        from ..fsops import Landing

        parts = protocol.split_path(offer.path) if offer.path else []
        if not parts:
            raise OSError(errno.EISDIR, "no file name")
        try:
            root_fd = contain.open_root(self.root)
            try:
                dir_fd = contain.walk_dir(root_fd, self.base + parts[:-1])
            finally:
                os.close(root_fd)
        except Refused as exc:
            raise OSError(errno.EACCES, exc.message) from None
        try:
            landing = Landing(dir_fd)
        except BaseException:
            os.close(dir_fd)
            raise
        return _Sink(landing, parts[-1], offer)


# =================================================================================================
# Transfers


class Transfer:
    """One push or pull of a session, with its granted data streams."""

    def __init__(self, state: DaemonState, session: Session, tid: int, msg: protocol.OpenTransfer, root: Path) -> None:
        self.state = state
        self.session = session
        self.id = tid
        self.direction = msg.direction
        self.module = msg.module
        self.base = protocol.split_path(msg.path)
        self.jobs = data.JobQueue(split=msg.streams if session.split else 1)
        self.source = ModuleSource(root, self.base)
        self.sink = ModuleSink(root, self.base)
        self.h2_data = msg.h2_data
        self.granted = msg.streams
        self.attached = 0
        self.finished_streams = 0
        self.stats: list[data.StreamStats] = []
        self.errors: list[str] = []
        self.scopes: set[trio.CancelScope] = set()
        self.changed = trio.Event()
        self.closed = False
        self.planning = trio.Lock()
        """Push: one plan at a time (_plan_behind_landing)."""
        self.tree_dest: Any = None  # transport.tree.DestTree (push of a tree)
        self.tree_src: Any = None  # transport.tree.SourceTree (pull of a tree)
        self.actions: Any = None  # transport.tree.ActionLog (push with report_actions)
        self.move = getattr(msg, "operation", "copy") == "move" and not getattr(msg, "dry_run", False)
        self.finished = False  # a move's tree/finish came: only removal requests are left
        self.prefetching = False
        """Push: the top destination directory is being listed ahead (`prefetch`): the trees
        stay open until that thread is done."""

    @property
    def daemon_sends(self) -> bool:
        return self.direction == "pull"

    def _notify(self) -> None:
        self.changed.set()
        self.changed = trio.Event()

    async def run_stream(self, carrier: str, io: data.StreamIO | None = None, st: Any = None) -> None:
        """Drive one admitted data stream until its DONE (or failure, or the session's end)."""
        n = len(self.stats) + 1
        stats = data.StreamStats(what=f"data stream {n} of transfer {self.id}")
        self.stats.append(stats)
        scope = None
        try:
            with trio.CancelScope() as scope:
                self.scopes.add(scope)
                if carrier == "raw":
                    assert io is not None
                    if self.daemon_sends:
                        fn = lambda: data.send_loop(io, self.source, self.jobs, stats)  # noqa: E731
                    else:
                        fn = lambda: data.receive_loop(io, self.sink, stats)  # noqa: E731
                    await data.run_worker(
                        fn, io=io, stats=stats, stall=self.state.stall, limiter=self.state.stream_limiter
                    )
                else:
                    if self.daemon_sends:
                        loop = data.h2_send_loop(st, self.source, self.jobs, stats, limiter=self.state.fs_limiter)
                    else:
                        loop = data.h2_receive_loop(st, self.sink, stats, limiter=self.state.fs_limiter)
                    with StallGuard(stats.what, self.state.stall) as guard:
                        stats.on_progress = guard.progress
                        await loop
        except Exception as exc:
            log.info("transfer %d: %s failed: %s", self.id, stats.what, exc)
            self.errors.append(f"{stats.what}: {exc}")
        finally:
            if scope is not None:
                self.scopes.discard(scope)
            self.stream_done()

    def stream_done(self) -> None:
        """One attached stream is over (counted in `attached` when it was admitted)."""
        self.finished_streams += 1
        self._notify()
        if self.closed and self._idle():
            self._close_trees()

    def _idle(self) -> bool:
        """No worker thread of this transfer uses its trees any more."""
        return self.finished_streams >= self.attached and not self.prefetching

    async def prefetch(self) -> None:
        """Push: list the top destination directory while the client still lists its source
        (tree.DestTree.prefetch, R72)."""
        dest = self.tree_dest
        if dest is None or self.closed:
            return
        self.prefetching = True
        try:
            await trio.to_thread.run_sync(dest.prefetch, "", limiter=self.state.fs_limiter)
        finally:
            self.prefetching = False
            if self.closed and self._idle():
                self._close_trees()

    async def drain(self) -> None:
        """The client says no more streams or files: revoke unused grants, end the send queue,
        and wait (at most FINISH_TIMEOUT) for the attached streams to end with DONE."""
        self.state.grants.revoke(self)
        if self.daemon_sends:
            try:
                self.jobs.close()
            except RuntimeError:
                pass
        with trio.move_on_after(FINISH_TIMEOUT):
            while self.finished_streams < self.attached:
                await self.changed.wait()

    def cancel(self) -> None:
        """End the transfer: its streams are cancelled, and its trees closed once no stream's
        worker thread can use them any more (now, or when the last stream ends: closing their
        directory fds under a thread still landing a file made its rename fail, leaving a
        temporary behind, or could land it through a number another session reopened)."""
        if self.tree_dest is not None:
            self.tree_dest.stop()  # at once: plans still queued make nothing more (tree.DestTree.plan)
        self.end_streams()
        if self._idle():
            self._close_trees()

    def _close_trees(self) -> None:
        for tree in (self.tree_dest, self.tree_src):
            if tree is not None:
                tree.close()
        self.tree_dest = self.tree_src = None

    def end_streams(self) -> None:
        """No more data: grants revoked, streams cancelled (the trees stay open)."""
        self.closed = True
        self.state.grants.revoke(self)
        try:
            self.jobs.close()
        except RuntimeError:
            pass
        for scope in list(self.scopes):
            scope.cancel()
        self._notify()

    def result(self) -> protocol.TransferDone:
        failures: dict[int, str] = {}
        for s in self.stats:
            for fid, msg in s.failures:
                failures.setdefault(fid, msg)
        return protocol.TransferDone(
            files=sum(s.files for s in self.stats),
            nbytes=sum(s.bytes for s in self.stats),
            failures=[protocol.FileFailure(id=k, message=v) for k, v in sorted(failures.items())],
        )


# =================================================================================================
# Sessions


class Session:
    """One control connection: its protocol state, its transfers, and the request handlers."""

    def __init__(self, state: DaemonState, peer: str, addr: Any = None) -> None:
        self.state = state
        self.peer = peer
        self.addr = addr
        """The client's IP address (ipaddress), for the modules' hosts_allow / hosts_deny."""
        self.nonce: bytes | None = None
        """The challenge the next `auth` answers (spent by it, whatever the outcome)."""
        self.authenticated: dict[str, str] = {}
        """module -> user, for the modules this session has authenticated to."""
        self.auth_failures = 0
        self.proto = protocol.ServerSession(software=state.software)
        self.transfers: dict[int, Transfer] = {}
        self.ready = trio.Event()
        self.last_request = trio.current_time()
        """When its latest request began or ended (server._Sessions: an idle one may make room)."""
        self.active = 0
        """Requests being answered now."""
        self.request_slots = trio.Semaphore(4)
        self.nursery: trio.Nursery | None = None
        """The connection's nursery (server.py): remote to remote jobs run in it and end with it."""
        self.jobs: dict[int, Any] = {}  # relay.PeerJob by id
        self.packed = False
        """The client speaks protocol.FEATURE_PACKED: manifests we send are packed."""
        self.need_packed = False
        """The client speaks protocol.FEATURE_NEED_PACKED: DirPlanned names its files packed."""
        self.parts = False
        """The client speaks protocol.FEATURE_PARTS: a large directory's manifest goes in parts."""
        self.dir_batch = False
        """The client speaks protocol.FEATURE_DIR_BATCH (with FEATURE_PARTS): tree/scans, tree/dirs."""
        self.pull_digest = False
        """The client speaks protocol.FEATURE_PULL_DIGEST: tree/have."""
        self.machine = False
        """The client speaks protocol.FEATURE_MACHINE: a pull's tree/open names this machine."""
        self.nest = False
        """The client speaks protocol.FEATURE_NEST: a directory's stat names its identity."""
        self.hold = False
        """The client speaks protocol.FEATURE_HOLD: a directory's stat names its ancestors'."""
        self.landed_ino = False
        """The client speaks protocol.FEATURE_LANDED_INO: a push move's confirmations name inodes."""
        self.split = False
        """The client speaks protocol.FEATURE_SPLIT: a pull sends its large files in parts."""
        self.silence: float | None = None
        """The client speaks protocol.FEATURE_SILENCE: it pings, and the connection ends when
        nothing came from it for this many seconds (the stall timeout; server.py applies it)."""

    async def dispatch(self, msg: protocol.Message) -> protocol.Message:
        handler = _HANDLERS.get(type(msg))
        if handler is None:  # pragma: no cover - protocol.OPERATIONS and _HANDLERS agree
            raise Refused(ErrorCode.UNKNOWN_OP, type(msg).__name__)
        reply: protocol.Message = await handler(self, msg)
        return reply

    def close(self) -> None:
        self.proto.close()
        for t in list(self.transfers.values()):
            t.cancel()
        self.transfers.clear()

    def module(self, name: str, client: Address | None = None) -> tuple[Path, bool]:
        """(root path, read_only) of a module for this session: the one door every request
        goes through to a module (list, stat, transfers, tree transfers, removals, peer pulls).
        `client`: the address of the client a pulling daemon acts for (OpenTree.client), which
        the module's address rules must admit too.

        Raises:
            Refused: UNKNOWN_MODULE; ACCESS_DENIED when the module's address rules refuse this
                client (or `client`); AUTH_REQUIRED when the module needs `auth` and this
                session has not.
        """
        root, read_only, access = self.state.export(name, self.addr, client)
        self.check_address(name, access)
        if client is not None:
            self.check_address(name, access, client)
        if access.needs_auth and name not in self.authenticated:
            raise Refused(ErrorCode.AUTH_REQUIRED, f"{_export_name(name)} requires a user and secret (see --secrets-file)")
        return root, read_only

    def check_address(self, name: str, access: Access, addr: Any = None) -> None:
        addr = self.addr if addr is None else addr
        if not access.allows(addr):
            shown = unmapped(addr) if addr is not None else addr
            raise Refused(ErrorCode.ACCESS_DENIED, f"access to {_export_name(name)} denied for {shown}")

    def may_list(self, name: str, access: Access) -> bool:
        """`modules` hides the modules this client's address may not use (as rsync does)."""
        return access.allows(self.addr)

    def transfer(self, tid: int) -> Transfer:
        t = self.transfers.get(tid)
        if t is None:
            raise Refused(ErrorCode.UNKNOWN_TRANSFER, f"no transfer {tid} in this session")
        return t

    def dest_tree(self, tid: int, what: str) -> DestTree:
        """Push tree transfer `tid` and its destination side, while it runs (else Refused)."""
        t = self.transfer(tid)
        if t.tree_dest is None or t.finished:
            raise Refused(ErrorCode.BAD_REQUEST, f"{what} is for push tree transfers")
        dest: DestTree = t.tree_dest
        if dest.fatal is not None:  # the destination is full or read-only: the run ends (R30)
            raise Refused(ErrorCode.IO_ERROR, dest.fatal)
        return dest

    def src_tree(self, tid: int, what: str) -> SourceTree:
        """Pull tree transfer `tid` and its source side, while it runs (else Refused)."""
        t = self.transfer(tid)
        if t.tree_src is None or t.finished:
            raise Refused(ErrorCode.BAD_REQUEST, f"{what} is for pull tree transfers")
        src: SourceTree = t.tree_src
        return src

    async def fs(self, fn: Any, *args: Any, stop: Any = None) -> Any:
        """`fn(*args)` in a worker thread; an OSError is the request's IO_ERROR. `stop`: the
        thread may not be abandoned, and if the request is cancelled (its client went away)
        `stop()` asks `fn` to end soon (stall.run_stoppable)."""
        try:
            if stop is not None:
                return await run_stoppable(fn, *args, stop=stop, limiter=self.state.fs_limiter)
            return await trio.to_thread.run_sync(fn, *args, limiter=self.state.fs_limiter)
        except OSError as exc:
            raise Refused(ErrorCode.IO_ERROR, exc.strerror or str(exc)) from None


def _export_name(name: str) -> str:
    return f"module {name!r}" if name else "the root export"


async def handle_auth_challenge(s: Session, msg: protocol.AuthChallenge) -> protocol.AuthNonce:
    s.nonce = secrets.token_bytes(protocol.AUTH_NONCE_BYTES)
    return protocol.AuthNonce(nonce=s.nonce)


_DUMMY_SECRET = secrets.token_bytes(32)


async def handle_auth(s: Session, msg: protocol.Auth) -> protocol.Ack:
    """Check an answer to this session's challenge. Every failure gets the same message after
    the same delay (an unknown user costs the same HMAC as a wrong secret); the nonce is spent
    either way, so an answer cannot be replayed, in this session or another."""
    _root, _ro, access = s.state.export(msg.module, s.addr)
    s.check_address(msg.module, access)
    nonce, s.nonce = s.nonce, None
    if not access.needs_auth:
        return protocol.Ack()  # nothing to prove (rsync accepts any user on such a module)
    failed = Refused(ErrorCode.AUTH_FAILED, f"authentication failed for {_export_name(msg.module)}")
    if s.auth_failures >= MAX_AUTH_FAILURES:
        raise Refused(ErrorCode.AUTH_FAILED, f"authentication failed for {_export_name(msg.module)} (too many attempts in this session)")
    if nonce is None:
        raise Refused(ErrorCode.NO_SESSION, "auth needs a fresh auth/challenge first")
    known = access.secret_of(msg.user) if msg.user in access.auth_users else None
    expected = protocol.auth_mac(known if known is not None else _DUMMY_SECRET, nonce, msg.user, msg.module)
    if known is None or not hmac.compare_digest(expected, msg.mac):
        s.auth_failures += 1
        log.warning("%s: authentication as %r for %s failed", s.peer, msg.user, _export_name(msg.module))
        await trio.sleep(AUTH_FAILURE_DELAY)
        raise failed
    s.authenticated[msg.module] = msg.user
    log.info("%s: authenticated as %r for %s", s.peer, msg.user, _export_name(msg.module))
    return protocol.Ack()


async def handle_hello(s: Session, msg: protocol.Hello) -> protocol.HelloReply:
    s.ready.set()
    granted = _features(msg.features)
    s.packed = protocol.FEATURE_PACKED in granted
    s.need_packed = protocol.FEATURE_NEED_PACKED in granted
    s.parts = protocol.FEATURE_PARTS in granted
    s.dir_batch = protocol.FEATURE_DIR_BATCH in granted
    s.pull_digest = protocol.FEATURE_PULL_DIGEST in granted
    s.machine = protocol.FEATURE_MACHINE in granted
    s.nest = protocol.FEATURE_NEST in granted
    s.landed_ino = protocol.FEATURE_LANDED_INO in granted
    s.split = protocol.FEATURE_SPLIT in granted
    s.hold = protocol.FEATURE_HOLD in granted
    if protocol.FEATURE_SILENCE in granted and math.isfinite(s.state.stall):
        s.silence = s.state.stall
    log.info("session from %s (%s)", s.peer, msg.software)
    return protocol.HelloReply(
        protocol=protocol.PROTOCOL_VERSION,
        software=s.state.software,
        name=s.state.config.instance_name[:255],
        data_port=None if s.state.config.force_h2_data else s.state.data_port,
        max_message=protocol.MAX_MESSAGE,
        features=granted,
        silence_ms=round(s.silence * 1000) if s.silence is not None else 0,
    )


def _features(asked: list[str]) -> list[str]:
    """The hello features this daemon answers with: those it shares with the client, and
    whether it preserves owners (the digests of a push must cover them)."""
    from .. import fsops
    from ..ffi import scan

    out = [f for f in (protocol.FEATURE_PACKED, protocol.FEATURE_SEND_DIRS, protocol.FEATURE_ACTIONS, protocol.FEATURE_NEED_PACKED, protocol.FEATURE_PARTS, protocol.FEATURE_CLIENT, protocol.FEATURE_CLIENT_STAT, protocol.FEATURE_STAT_READ, protocol.FEATURE_MACHINE, protocol.FEATURE_NEST, protocol.FEATURE_HOLD, protocol.FEATURE_SILENCE, protocol.FEATURE_LANDED_INO, protocol.FEATURE_SPLIT) if f in asked]
    if protocol.FEATURE_SEALED in asked:
        from ..transport import seal

        if seal.AVAILABLE:  # a `cryptography` that seals in place
            out.append(protocol.FEATURE_SEALED)
    if protocol.FEATURE_DIR_BATCH in asked and protocol.FEATURE_PARTS in asked:
        out.append(protocol.FEATURE_DIR_BATCH)
    if protocol.FEATURE_DIR_DIGEST in asked and scan.HAVE_CMPDIR:
        out += [protocol.FEATURE_DIR_DIGEST] + ([protocol.FEATURE_OWNERS] if fsops.IS_ROOT else [])
    if protocol.FEATURE_PULL_DIGEST in asked and scan.HAVE_CMPDIR:
        out.append(protocol.FEATURE_PULL_DIGEST)
    return out


async def handle_modules(s: Session, msg: protocol.ListModules) -> protocol.ModuleList:
    cfg = s.state.config
    return protocol.ModuleList(
        modules=[
            protocol.ModuleInfo(name=m.name, comment=m.comment, read_only=m.read_only)
            for m in cfg.modules
            if s.may_list(m.name, m.access)
        ],
        root=cfg.root is not None and s.may_list("", cfg.root_access),
        root_read_only=cfg.root_read_only,
    )


async def handle_list(s: Session, msg: protocol.ListDir) -> protocol.DirListing:
    root, _ro = s.module(msg.module)
    protocol.split_path(msg.path)  # refuse before touching the disk
    entries, more = await s.fs(contain.list_dir, root, msg.path, msg.after, msg.limit)
    return protocol.DirListing(entries=entries, more=more)


async def handle_stat(s: Session, msg: protocol.Stat) -> protocol.StatReply:
    root, _ro = s.module(msg.module, _client_of(msg.client))
    protocol.split_path(msg.path)
    entry, ident = await s.fs(contain.stat_path, root, msg.path)
    is_dir = entry is not None and entry.kind == "dir"
    up: list[int] = []
    if s.hold and is_dir:
        up = (await s.fs(fsops.ancestors, os.path.join(os.fsencode(root), *protocol.split_path(msg.path))))[: protocol.MAX_UP]
    unreadable = await s.fs(contain.unreadable, root, msg.path) if msg.read and entry is not None else ""
    return protocol.StatReply(entry=entry, source_dir=list(ident) if s.nest and is_dir else [], source_up=up, unreadable=unreadable)


def _client_of(text: str) -> Address | None:
    """The address a pulling daemon acts for (OpenTree.client, Stat.client), which a module's
    address rules must admit too; None when the request names none."""
    if not text:
        return None
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        raise Refused(ErrorCode.BAD_REQUEST, f"client: {text!r} is not an IP address") from None


async def handle_open_transfer(s: Session, msg: protocol.OpenTransfer) -> protocol.TransferOpened:
    if s.state.shutting_down:
        raise Refused(ErrorCode.SHUTTING_DOWN, "the daemon is shutting down")
    if msg.direction not in ("push", "pull"):
        raise Refused(ErrorCode.BAD_REQUEST, f"direction must be push or pull, not {msg.direction!r}")
    root, read_only = s.module(msg.module)
    if msg.direction == "push" and read_only:
        name = f"module {msg.module!r}" if msg.module else "the root export"
        raise Refused(ErrorCode.READ_ONLY, f"{name} is read-only")
    if len(s.transfers) >= MAX_TRANSFERS_PER_SESSION:
        raise Refused(ErrorCode.BUSY, f"at most {MAX_TRANSFERS_PER_SESSION} transfers per session")
    base = protocol.split_path(msg.path)

    def check_base() -> None:
        root_fd = contain.open_root(root)
        try:
            os.close(contain.walk_dir(root_fd, base))
        finally:
            os.close(root_fd)

    await s.fs(check_base)
    tid = s.state.next_id()
    t = Transfer(s.state, s, tid, msg, root)
    s.transfers[tid] = t
    h2_only = msg.h2_data or s.state.config.force_h2_data or s.state.data_port is None
    tokens = [s.state.grants.issue(t) for _ in range(msg.streams)]
    return protocol.TransferOpened(
        transfer=tid,
        data_port=None if h2_only else s.state.data_port,
        tokens=tokens,
        expires_ms=int(s.state.grants.ttl * 1000),
    )


async def handle_send_files(s: Session, msg: protocol.SendFiles) -> protocol.Ack:
    t = s.transfer(msg.transfer)
    if not t.daemon_sends:
        raise Refused(ErrorCode.BAD_REQUEST, "send is for pull transfers")
    if len(t.source.paths) + len(msg.files) > MAX_FILES_PER_TRANSFER:
        raise Refused(ErrorCode.BUSY, "too many files in one transfer")
    ids: list[int] = []
    for f in msg.files:
        if f.id in t.source.paths:
            raise Refused(ErrorCode.BAD_REQUEST, f"file id {f.id} used twice")
        t.source.add(f.id, protocol.split_path(f.path))
        ids.append(f.id)
    for g in msg.dirs or ():
        if t.tree_src is None:
            raise Refused(ErrorCode.BAD_REQUEST, "transfer/send by directory is for tree pulls")
        parts, gids, names = protocol.unpack_file_group(g)
        if len(t.source.paths) + len(gids) > MAX_FILES_PER_TRANSFER:
            raise Refused(ErrorCode.BUSY, "too many files in one transfer")
        if not t.source.paths.keys().isdisjoint(gids):
            raise Refused(ErrorCode.BAD_REQUEST, "a file id used twice")
        t.source.add_dir(parts, gids, names)
        ids.extend(gids)
    try:
        t.jobs.put_many(ids)
        if msg.last:
            t.jobs.close()
    except RuntimeError:
        raise Refused(ErrorCode.BAD_REQUEST, "the transfer's file list was already closed") from None
    return protocol.Ack()


async def handle_expect_files(s: Session, msg: protocol.ExpectFiles) -> protocol.Ack:
    t = s.transfer(msg.transfer)
    if t.daemon_sends:
        raise Refused(ErrorCode.BAD_REQUEST, "expect is for push transfers")
    if len(t.sink.offers) + len(msg.files) > MAX_FILES_PER_TRANSFER:
        raise Refused(ErrorCode.BUSY, "too many files in one transfer")
    for f in msg.files:
        parts = protocol.split_path(f.path)
        if not parts:
            raise Refused(ErrorCode.PATH_REFUSED, "a file needs a name")
        if f.id in t.sink.offers:
            raise Refused(ErrorCode.BAD_REQUEST, f"file id {f.id} used twice")
        t.sink.offers[f.id] = f
    return protocol.Ack()


FINISH_TIMEOUT = 30.0


async def handle_finish(s: Session, msg: protocol.FinishTransfer) -> protocol.TransferDone:
    t = s.transfer(msg.transfer)
    # Streams never connected will not come now; the ones attached end with DONE.
    await t.drain()
    t.cancel()
    del s.transfers[t.id]
    result = t.result()
    if t.errors and not result.failures:
        raise Refused(ErrorCode.IO_ERROR, "; ".join(t.errors)[: protocol.MAX_TEXT])
    return result


# =================================================================================================
# Tree transfers (docs/protocol.md §4)


def contained_open_dir(root_fd: int, rel: str) -> int:
    """`open_dir` for the tree code on the daemon: the containment walk, as OSErrors. The tree
    code names the directory in its failure lines, so the reason is the kernel's alone
    (`locked: open: Permission denied`, as a local run says), or the walk's for a link."""
    try:
        return contain.walk_dir(root_fd, protocol.split_path(os.fsencode(rel)))
    except Refused as exc:
        cause = exc.__cause__
        if exc.code in (ErrorCode.IO_ERROR, ErrorCode.NOT_FOUND) and isinstance(cause, OSError) and cause.strerror:
            raise OSError(cause.errno, cause.strerror) from None
        code = errno.ENOENT if exc.code is ErrorCode.NOT_FOUND else errno.ENOTDIR if exc.code is ErrorCode.NOT_A_DIRECTORY else errno.EACCES
        raise OSError(code, exc.message) from None


def _make_base(root: Path, base: list[bytes], label: str) -> None:
    """mkdir -p below the module root, refusing links on the way (containment).

    Raises:
        Refused: IO_ERROR `cannot create destination LABEL: REASON` (the label as the user
            wrote the path: contain.label); the walk's refusals.
    """
    fd = contain.open_root(root)
    try:
        for part in base:
            try:
                os.mkdir(part, 0o777, dir_fd=fd)
            except FileExistsError:
                pass
            except OSError as exc:
                raise Refused(ErrorCode.IO_ERROR, f"cannot create destination {label}: {exc.strerror}") from None
            nfd = contain.walk_dir(fd, [part])
            os.close(fd)
            fd = nfd
    finally:
        os.close(fd)


def _walk_existing(root_fd: int, base: list[bytes]) -> int:
    """Dry run of `_make_base`: open `base` if it exists, -1 if some part of it is missing (the
    rest would be created); links and files on the way are refused as the real run refuses them."""
    try:
        return contain.walk_dir(root_fd, base)
    except Refused as exc:
        if exc.code is ErrorCode.NOT_FOUND:
            return -1
        raise


async def handle_open_tree(s: Session, msg: protocol.OpenTree) -> protocol.TransferOpened:
    from ..plan import Compare
    from ..transport import tree

    if s.state.shutting_down:
        raise Refused(ErrorCode.SHUTTING_DOWN, "the daemon is shutting down")
    if msg.direction not in ("push", "pull") or msg.operation not in ("copy", "mirror", "move"):
        raise Refused(ErrorCode.BAD_REQUEST, "direction must be push or pull; operation copy, mirror or move")
    root, read_only = s.module(msg.module, _client_of(msg.client))
    if read_only and (msg.direction == "push" or msg.operation == "move"):
        name = f"module {msg.module!r}" if msg.module else "the root export"
        why = ": a move from it would remove its files (copy instead)" if msg.direction == "pull" else ""
        raise Refused(ErrorCode.READ_ONLY, f"{name} is read-only{why}")
    if len(s.transfers) >= MAX_TRANSFERS_PER_SESSION:
        raise Refused(ErrorCode.BUSY, f"at most {MAX_TRANSFERS_PER_SESSION} transfers per session")
    if msg.report_actions and msg.direction != "push":
        raise Refused(ErrorCode.BAD_REQUEST, "report_actions is for push (a pulling client lists its own actions)")
    base = protocol.split_path(msg.path)
    from ..errors import UsageError
    from ..filters import Filters

    try:
        filters = Filters.from_args(protocol.rule_args(msg.filters))
    except UsageError as exc:  # names the pattern and what is wrong with it
        raise Refused(ErrorCode.BAD_REQUEST, str(exc)) from None

    def open_base() -> int:
        """The base directory's fd; -1 for a dry-run push into a base that does not exist yet
        (it would be created: nothing to open, every directory below it is new)."""
        create = msg.create_base and msg.direction == "push"
        if msg.direction == "push" and len(msg.source_dir) == 2 and fsops.this_machine(msg.machine):
            _refuse_nesting(root, base, msg)
            if msg.operation == "mirror" and msg.source_up:
                _refuse_holding(root, base, msg)
        if create and not msg.dry_run:
            _make_base(root, base, contain.label(msg.module, msg.path))
        root_fd = contain.open_root(root)
        try:
            if create and msg.dry_run:
                return _walk_existing(root_fd, base)
            return contain.walk_dir(root_fd, base)
        finally:
            os.close(root_fd)

    base_fd = await s.fs(open_base)
    tid = s.state.next_id()
    t = Transfer(s.state, s, tid, msg, root)  # type: ignore[arg-type]
    if msg.direction == "push":
        spec = tree.TreeSpec(
            operation=msg.operation, compare=Compare(msg.compare), filters=filters, dry_run=msg.dry_run, report_actions=msg.report_actions
        )
        t.tree_dest = tree.DestTree(base_fd, spec, open_dir=contained_open_dir)
        t.tree_dest.same_machine = fsops.this_machine(msg.machine)
        if t.tree_dest.landed is not None:
            t.tree_dest.landed.with_ino = s.landed_ino
        t.sink = t.tree_dest
        t.actions = t.tree_dest.actions
        if base_fd >= 0 and not msg.create_base and s.nursery is not None:
            s.nursery.start_soon(t.prefetch)
    else:
        t.tree_src = tree.SourceTree(base_fd, open_dir=contained_open_dir)
        t.source.tree = t.tree_src
    s.transfers[tid] = t
    h2_only = msg.h2_data or s.state.config.force_h2_data or s.state.data_port is None
    tokens = [s.state.grants.issue(t) for _ in range(msg.streams)]
    return protocol.TransferOpened(
        transfer=tid,
        data_port=None if h2_only else s.state.data_port,
        tokens=tokens,
        expires_ms=int(s.state.grants.ttl * 1000),
        machine=fsops.machine_id() if msg.direction == "pull" and s.machine else b"",
    )


def _refuse_nesting(root: Path, base: list[bytes], msg: protocol.OpenTree) -> None:
    """A push from this machine (FEATURE_NEST) into its own source directory, by another path
    (the module is a bind mount of it, or inside it): refused before anything is made, as a
    local copy is (api.refuse_nesting); it would chase its own output."""
    dev, ino = msg.source_dir
    if msg.source_name:
        protocol.check_name(msg.source_name)
    target = os.path.join(os.fsencode(root), *base, *([msg.source_name] if msg.source_name else []))
    found = fsops.reaches(target, (dev, ino))
    if found is None:
        return
    where = contain.label(msg.module, os.path.join(msg.path, msg.source_name) if msg.source_name else msg.path)
    if found == "same":
        raise Refused(ErrorCode.BAD_REQUEST, f"source and destination are the same directory: {where} is the source by another path")
    raise Refused(ErrorCode.BAD_REQUEST, f"destination {where} is inside the source (by another path to it)")


def _refuse_holding(root: Path, base: list[bytes], msg: protocol.OpenTree) -> None:
    """A mirror push from this machine (FEATURE_HOLD) into a directory that holds its source:
    the source would be an extra there, and deleted (R59)."""
    target = os.path.join(os.fsencode(root), *base, *([msg.source_name] if msg.source_name else []))
    if fsops.holds(target, msg.source_up):
        where = contain.label(msg.module, os.path.join(msg.path, msg.source_name) if msg.source_name else msg.path)
        raise Refused(ErrorCode.BAD_REQUEST, f"the source is inside the destination {where} (by another path to it): the mirror would delete it")


def _rel(b: bytes) -> str:
    return "/".join(os.fsdecode(p) for p in protocol.split_path(b))


async def _plan_behind_landing(s: Session, tid: int, dest: DestTree, fn: Any, *args: Any) -> Any:
    """Push: `fn(*args)` (a plan) in a worker thread once at most MAX_QUEUED_FILES files the
    destination needs have not landed, one plan of the transfer at a time (two requests must
    not both see room and both plan). A tree of millions of empty files, whose END frames
    outrun their landing, was otherwise planned nearly whole before it landed (a
    1,000,000-file push: 373 MiB here). Waits only while data can still land: not once every
    stream attached has ended, nor after a fatal failure or the transfer's end."""
    t = s.transfer(tid)
    async with t.planning:
        while len(dest.pending) > MAX_QUEUED_FILES and dest.fatal is None and not t.closed and not dest.stopped:
            if t.attached and t.finished_streams >= t.attached:
                break
            await trio.sleep(BEHIND_POLL)
        return await s.fs(fn, *args)


async def handle_tree_dir(s: Session, msg: protocol.TreeDir) -> protocol.DirPlanned:
    dest = s.dest_tree(msg.transfer, "tree/dir")
    only = None
    if msg.only is not None:
        only = {}
        for r in msg.only:
            protocol.check_name(r.name)
            protocol.check_name(r.dname)
            only[os.fsdecode(r.name)] = os.fsdecode(r.dname)
    reply: protocol.DirPlanned = await _plan_behind_landing(
        s, msg.transfer, dest, dest.plan, _rel(msg.rel), _rel(msg.dst_rel), msg.dst_new, only, msg.entries, msg.incomplete, msg.dir_entry, msg.part, msg.more
    )
    return reply if s.need_packed else protocol.with_need_list(reply)


def _check_batch(s: Session, op: str, n: int) -> None:
    """tree/dirs and tree/scans: the session negotiated FEATURE_DIR_BATCH, and the batch holds
    at least one directory."""
    if not s.dir_batch:
        raise Refused(ErrorCode.BAD_REQUEST, f"{op} needs the hello feature {protocol.FEATURE_DIR_BATCH}")
    if not n:
        raise Refused(ErrorCode.BAD_REQUEST, f"{op}: no directory in the batch")


async def handle_tree_dirs(s: Session, msg: protocol.TreeDirs) -> protocol.DirsPlanned:
    """Push, FEATURE_DIR_BATCH: several whole directories planned in one thread hop."""
    dest = s.dest_tree(msg.transfer, "tree/dirs")
    _check_batch(s, "tree/dirs", len(msg.dirs))
    for d in msg.dirs:
        if d.only is not None or d.part or d.more:
            raise Refused(ErrorCode.BAD_REQUEST, "tree/dirs: a directory with `only` or in parts goes alone (tree/dir)")
    jobs = [(_rel(d.rel), _rel(d.dst_rel), d.dst_new, d.entries, d.incomplete, d.dir_entry) for d in msg.dirs]
    planned: list[protocol.DirPlanned] = await _plan_behind_landing(s, msg.transfer, dest, dest.plan_many, jobs)
    return protocol.DirsPlanned(planned=planned if s.need_packed else [protocol.with_need_list(p) for p in planned])


async def handle_tree_digests(s: Session, msg: protocol.TreeDigests) -> protocol.DigestsChecked:
    """Push: compare directory digests with the destination's; equal ones are done."""
    dest = s.dest_tree(msg.transfer, "tree/digests")
    for d in msg.dirs:
        for e in d.subdirs:
            protocol.check_name(e[0])  # type: ignore[index]  # RAW: decoded as its CBOR array
    dirs = [(_rel(d.rel), _rel(d.dst_rel), d.digest, d.subdirs) for d in msg.dirs]
    reply: protocol.DigestsChecked = await s.fs(dest.check_digests, dirs)
    return reply


async def handle_tree_have(s: Session, msg: protocol.TreeHave) -> protocol.HaveChecked:
    """Pull, FEATURE_PULL_DIGEST: which of the client's directory digests equal the source's."""
    src = s.src_tree(msg.transfer, "tree/have")
    if not s.pull_digest:
        raise Refused(ErrorCode.BAD_REQUEST, "tree/have needs the hello feature " + protocol.FEATURE_PULL_DIGEST)
    answers: list[protocol.SameDir] = await s.fs(src.check_have, [(_rel(d.rel), d.digest) for d in msg.dirs], msg.flags)
    return protocol.HaveChecked(dirs=answers)


async def handle_tree_scan(s: Session, msg: protocol.TreeScan) -> protocol.DirManifest:
    src = s.src_tree(msg.transfer, "tree/scan")
    if s.parts:
        reply: protocol.DirManifest = await s.fs(src.scan_part, _rel(msg.rel), msg.part, s.packed)
    elif msg.part:
        raise Refused(ErrorCode.BAD_REQUEST, "tree/scan: parts need the hello feature " + protocol.FEATURE_PARTS)
    else:
        reply = await s.fs(src.scan, _rel(msg.rel), s.packed)
    return reply


async def handle_tree_scans(s: Session, msg: protocol.TreeScans) -> protocol.DirManifests:
    """Pull, FEATURE_DIR_BATCH: part 0 of several directories' manifests in one thread hop."""
    src = s.src_tree(msg.transfer, "tree/scans")
    _check_batch(s, "tree/scans", len(msg.rels))
    manifests: list[protocol.DirManifest] = await s.fs(src.scan_many, [_rel(r) for r in msg.rels], s.packed)
    return protocol.DirManifests(manifests=manifests)


async def handle_tree_hashes(s: Session, msg: protocol.TreeHashes) -> protocol.DirPlanned:
    """Push, --checksum: compare the source's hashes with the destination copies."""
    dest = s.dest_tree(msg.transfer, "tree/hashes")
    for h in msg.hashes:
        protocol.check_name(h.name)
    # Stoppable: a batch of large files hashes for minutes, and a thread that could not be
    # stopped held the session open after its client went (its fds, a forced daemon exit),
    # then settled the files by name long after another run had replaced them.
    reply: protocol.DirPlanned = await s.fs(dest.settle_hashes, _rel(msg.rel), msg.hashes, stop=dest.stop)
    return reply if s.need_packed else protocol.with_need_list(reply)


async def handle_tree_hash(s: Session, msg: protocol.TreeHash) -> protocol.HashList:
    """Pull, --checksum: hash source files (a file that is not regular or not readable gets a
    null digest and a failure)."""
    src = s.src_tree(msg.transfer, "tree/hash")
    for n in msg.names:
        protocol.check_name(n)
    hashes, failures = await s.fs(src.hashes, _rel(msg.rel), msg.names, stop=src.stop)  # as tree/hashes
    return protocol.HashList(hashes=hashes, failures=failures)


def _move_done(s: Session, t: Transfer) -> None:
    t.cancel()
    s.transfers.pop(t.id, None)


async def handle_tree_landed(s: Session, msg: protocol.TreeLanded) -> protocol.LandedPage:
    """Push move: the next page of source entries landed and synced here; the client removes
    them. Before tree/finish a page is synced first; after it, finish has synced everything."""
    t = s.transfer(msg.transfer)
    dest = t.tree_dest
    if dest is None or dest.landed is None:
        raise Refused(ErrorCode.BAD_REQUEST, "tree/landed is for push move transfers")
    if t.finished:
        page, failures = dest.landed.take(), []
    else:
        page, failures = await s.fs(dest.sync_landed)
    more = not t.finished or len(dest.landed) > 0
    if not more:
        _move_done(s, t)
    return protocol.LandedPage(groups=page, more=more, failures=failures)


async def handle_tree_remove(s: Session, msg: protocol.TreeRemove) -> protocol.TreeRemoved:
    """Pull move: the client has landed and synced these; remove them from the module (inside
    it, never through a link), then the directories left empty."""
    from ..transport.tree import check_groups

    t = s.transfer(msg.transfer)
    if t.tree_src is None or not t.move:
        raise Refused(ErrorCode.BAD_REQUEST, "tree/remove is for pull move transfers")
    _root, read_only = s.module(t.module)
    if read_only:
        raise Refused(ErrorCode.READ_ONLY, f"module {t.module!r} is read-only" if t.module else "the root export is read-only")
    check_groups(msg.groups)
    removed, failures = await s.fs(t.tree_src.remove, msg.groups)
    if msg.last:
        if not t.finished:
            raise Refused(ErrorCode.BAD_REQUEST, "tree/remove last before tree/finish")
        _move_done(s, t)
    return protocol.TreeRemoved(removed=removed, failures=failures[: protocol.MAX_LIST])


async def handle_tree_actions(s: Session, msg: protocol.TreeActions) -> protocol.ActionPage:
    """Push with report_actions: the next page of what this side changed. After tree/finish,
    the page that empties the log ends the transfer (a move's ends with tree/landed)."""
    t = s.transfer(msg.transfer)
    if t.actions is None:
        raise Refused(ErrorCode.BAD_REQUEST, "tree/actions needs a push opened with report_actions")
    page = t.actions.take()
    more = not t.finished or len(t.actions) > 0
    if not more and not t.move:
        s.transfers.pop(t.id, None)
    return protocol.ActionPage(actions=page, more=more, dropped=0 if more else t.actions.dropped)


async def handle_tree_finish(s: Session, msg: protocol.TreeFinish) -> protocol.TreeDone:
    t = s.transfer(msg.transfer)
    if t.finished:
        raise Refused(ErrorCode.BAD_REQUEST, "the transfer is already finished")
    await t.drain()
    try:
        if t.tree_dest is not None:
            dest = t.tree_dest
            for e in t.errors:
                dest._fail(".", "data stream", e)
            # A client that goes away stops the deletions (they went on to the end).
            await s.fs(dest.finish, msg.source_complete, stop=dest.stop)
            if dest.fatal is not None:  # full or read-only: finish changed nothing more (R30)
                raise Refused(ErrorCode.IO_ERROR, dest.fatal)
            return dest.result()  # type: ignore[no-any-return]
        if t.errors:
            raise Refused(ErrorCode.IO_ERROR, "; ".join(t.errors)[: protocol.MAX_TEXT])
        return protocol.TreeDone(
            files_copied=sum(x.files for x in t.stats),
            bytes_copied=sum(x.bytes for x in t.stats),
            files_skipped=0,
            dirs_created=0,
            links_created=0,
            files_deleted=0,
            entries_seen=0,
            failures=[],
        )
    finally:
        if t.move:
            # Removal follows: tree/landed pages (push) or tree/remove (pull) end the transfer.
            t.finished = True
            t.end_streams()
        elif t.actions is not None:
            # The last tree/actions pages end it (the log outlives the closed tree).
            t.finished = True
            t.cancel()
        else:
            t.cancel()
            s.transfers.pop(t.id, None)


async def handle_peer_pull(s: Session, msg: protocol.PeerPull) -> protocol.PeerStarted:
    from . import relay

    return await relay.start(s, msg)


async def handle_peer_wait(s: Session, msg: protocol.PeerWait) -> protocol.PeerStatus:
    from . import relay

    return await relay.wait(s, msg)


_HANDLERS: dict[type[protocol.Message], Any] = {
    protocol.Hello: handle_hello,
    protocol.AuthChallenge: handle_auth_challenge,
    protocol.Auth: handle_auth,
    protocol.ListModules: handle_modules,
    protocol.ListDir: handle_list,
    protocol.Stat: handle_stat,
    protocol.OpenTransfer: handle_open_transfer,
    protocol.SendFiles: handle_send_files,
    protocol.ExpectFiles: handle_expect_files,
    protocol.FinishTransfer: handle_finish,
    protocol.OpenTree: handle_open_tree,
    protocol.TreeDir: handle_tree_dir,
    protocol.TreeDigests: handle_tree_digests,
    protocol.TreeHave: handle_tree_have,
    protocol.TreeScan: handle_tree_scan,
    protocol.TreeScans: handle_tree_scans,
    protocol.TreeDirs: handle_tree_dirs,
    protocol.TreeFinish: handle_tree_finish,
    protocol.TreeHashes: handle_tree_hashes,
    protocol.TreeHash: handle_tree_hash,
    protocol.TreeLanded: handle_tree_landed,
    protocol.TreeRemove: handle_tree_remove,
    protocol.TreeActions: handle_tree_actions,
    protocol.PeerPull: handle_peer_pull,
    protocol.PeerWait: handle_peer_wait,
}
