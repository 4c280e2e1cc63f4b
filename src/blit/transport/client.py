"""The client side of a daemon session: requests, transfers and their data streams.

    async with open_session(HostSpec("nas"), tls=True) as s:
        mods = await s.modules()
        async with s.transfer("photos", b"2024", "pull", streams=2) as t:
            await t.send_files([FileRef(id=1, path=b"a.jpg")], last=True)
            await t.run_receivers(LocalSink(...))
            done = await t.finish()

Raw data streams are tried first; a data port that cannot be reached (refused, filtered, timed
out) makes that stream fall back to HTTP/2 on the control connection with the same token, since
an unsent token is still valid. `force_h2_data=True` goes to HTTP/2 directly.

This module must not plan transfers (the engine does); it moves messages and files.
"""

from __future__ import annotations

import logging
import os
import socket
import stat
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

from ..endpoint import HostSpec
from ..errors import RemoteError, StallError, TokenRefused, TransportError
from . import control, data, protocol, tls

log = logging.getLogger("blit.client")

DATA_CONNECT_TIMEOUT = 5.0


@dataclass
class Timeouts:
    connect: float = 10.0
    request: float = 60.0
    stall: float = data.DEFAULT_STALL


class RemoteSession:
    """One control connection to a daemon (say hello done)."""

    def __init__(self, client: control.ControlClient, host: HostSpec, *, tls_enabled: bool, force_h2_data: bool, timeouts: Timeouts) -> None:
        self.client = client
        self.host = host
        self.tls_enabled = tls_enabled
        self.force_h2_data = force_h2_data
        self.timeouts = timeouts
        self.stream_limiter = trio.CapacityLimiter(64)
        self.fs_limiter = trio.CapacityLimiter(8)
        self.acting_for = ""
        """A daemon pulling for a client (remote to remote): that client's address, which the
        source daemon checks its module's rules against too (Stat.client, OpenTree.client)."""

    @property
    def peer(self) -> protocol.HelloReply:
        assert self.client.peer is not None
        return self.client.peer

    async def call(self, msg: protocol.Message) -> Any:
        return await self.client.call(msg)

    def daemon_stalled(self, what: str, seconds: float) -> StallError:
        """The one-line error for a daemon that stopped making progress."""
        return control.daemon_stalled(self.client.authority, what, seconds)

    async def authenticate(self, module: str, user: str, secret: bytes) -> None:
        """Challenge-response for a module (docs/protocol.md §1): the secret never travels, only
        an HMAC of this session's fresh nonce. Raises RemoteError("auth-failed") when refused."""
        from ..errors import RemoteProtocolError

        challenge: protocol.AuthNonce = await self.call(protocol.AuthChallenge())
        if len(challenge.nonce) != protocol.AUTH_NONCE_BYTES:
            raise RemoteProtocolError(f"the daemon's challenge is {len(challenge.nonce)} bytes, not {protocol.AUTH_NONCE_BYTES}")
        mac = protocol.auth_mac(secret, challenge.nonce, user, module)
        await self.call(protocol.Auth(module=module, user=user, mac=mac))

    async def modules(self) -> protocol.ModuleList:
        reply: protocol.ModuleList = await self.call(protocol.ListModules())
        return reply

    async def list_dir(self, module: str, path: bytes, *, page: int = 10_000) -> list[protocol.Entry]:
        out: list[protocol.Entry] = []
        after: bytes | None = None
        while True:
            reply: protocol.DirListing = await self.call(protocol.ListDir(module=module, path=path, after=after, limit=page))
            out.extend(reply.entries)
            if not reply.more or not reply.entries:
                return out
            after = reply.entries[-1].name

    async def stat(self, module: str, path: bytes) -> protocol.Entry | None:
        return (await self.stat_reply(module, path)).entry

    async def stat_reply(self, module: str, path: bytes, *, read: bool = False) -> protocol.StatReply:
        """The entry and, for a directory (FEATURE_NEST), its (device, inode); `read`
        (FEATURE_STAT_READ): and why the daemon cannot read it as a source root, if it cannot."""
        client = self.acting_for if protocol.FEATURE_CLIENT_STAT in self.peer.features else ""
        read = read and protocol.FEATURE_STAT_READ in self.peer.features
        reply: protocol.StatReply = await self.call(protocol.Stat(module=module, path=path, client=client, read=read))
        return reply

    @asynccontextmanager
    async def transfer(self, module: str, path: bytes, direction: str, *, streams: int = 1) -> AsyncIterator[RemoteTransfer]:
        opened: protocol.TransferOpened = await self.call(
            protocol.OpenTransfer(module=module, path=path, direction=direction, streams=streams, h2_data=self.force_h2_data)
        )
        t = RemoteTransfer(self, opened, direction)
        yield t


class RemoteTransfer:
    """One transfer's data streams. With `lazy`, the first stream connects at once and stream k
    (k >= 2) only once the caller has queued k files (`files_queued`): a stream beyond the number
    of files would carry nothing and cost a connection and a TLS handshake on both sides (a
    one-file run had its second handshake on its critical path). A token never used is revoked
    by the daemon at finish, as the protocol always allowed."""

    def __init__(self, session: RemoteSession, opened: protocol.TransferOpened, direction: str, *, lazy: bool = False) -> None:
        self.session = session
        self.id = opened.transfer
        self.tokens = list(opened.tokens)
        self.data_port = opened.data_port
        self.direction = direction
        self.stats: list[data.StreamStats] = []
        self.carriers: list[str] = []
        self._wanted = 1 if lazy else len(self.tokens)  # streams that may connect
        ttl = opened.expires_ms / 1000
        self._expires = trio.current_time() + ttl - min(1.0, ttl / 4)
        """When a stream not yet opened is no longer worth opening: its token expires about then
        (the daemon's clock started a moment before ours; the margin covers that)."""
        self._no_more = False
        self._wanted_changed = trio.Event()

    def files_queued(self, total: int) -> None:
        """The transfer has `total` files to carry so far (lazy streams: as many may connect)."""
        if total > self._wanted:
            self._wanted = total
            self._wanted_changed.set()
            self._wanted_changed = trio.Event()

    def no_more_files(self) -> None:
        """Every file is queued: lazy streams not yet wanted will not connect."""
        self._no_more = True
        self._wanted_changed.set()

    async def _stream_wanted(self, i: int) -> bool:
        while i >= self._wanted:
            if self._no_more:
                return False
            await self._wanted_changed.wait()
        return True

    async def send_files(self, files: Sequence[protocol.FileRef], *, last: bool = False) -> None:
        await self.session.call(protocol.SendFiles(transfer=self.id, files=list(files), last=last))

    async def expect_files(self, files: Sequence[protocol.FileOffer]) -> None:
        await self.session.call(protocol.ExpectFiles(transfer=self.id, files=list(files)))

    async def finish(self) -> protocol.TransferDone:
        reply: protocol.TransferDone = await self.session.call(protocol.FinishTransfer(transfer=self.id))
        return reply

    async def run_receivers(self, sink: data.FileSink) -> None:
        """Pull: receive on every granted stream until each says DONE."""
        await self._run_all(lambda stats: ("recv", sink, stats))

    async def run_senders(self, source: data.FileSource, jobs: data.JobQueue) -> None:
        """Push: send the queued files on every granted stream, then DONE on each."""
        await self._run_all(lambda stats: ("send", (source, jobs), stats))

    async def _run_all(self, make: Callable[[data.StreamStats], tuple[str, Any, data.StreamStats]]) -> None:
        errors: list[BaseException] = []

        async def one(i: int, token: bytes) -> None:
            if not await self._stream_wanted(i):
                return
            if i and trio.current_time() >= self._expires:
                # Its token has expired (a long --checksum phase, a client stopped a while):
                # the streams already open carry the transfer. Over HTTP/2 a refused stream
                # had already taken files from the queue, which then never went ("the data
                # never arrived": the daemon's refusal comes after the first data).
                log.info("data stream %d of transfer %d not opened: its token has expired", i + 1, self.id)
                return
            stats = data.StreamStats(what=f"data stream {i + 1} of transfer {self.id}")
            self.stats.append(stats)
            try:
                await self._run_stream(token, *make(stats))
            except TokenRefused as exc:
                if i == 0:
                    errors.append(exc)
                    return
                # A stream opened late (once files queued up for it) whose token expired
                # meanwhile (a long --checksum phase, a client stopped for a while): the
                # streams already open carry the transfer (QA: such runs failed, exit 1,
                # with every file landed).
                log.info("%s not opened: %s", stats.what, exc)
            except StallError as exc:
                errors.append(exc if exc.local else self.session.daemon_stalled(f"no progress on data stream {i + 1}", exc.seconds))
            except TransportError as exc:
                errors.append(exc)

        async with trio.open_nursery() as nursery:
            for i, token in enumerate(self.tokens):
                nursery.start_soon(one, i, token)
        if errors:
            raise errors[0]

    async def _run_stream(self, token: bytes, kind: str, arg: Any, stats: data.StreamStats) -> None:
        s = self.session
        io: data.StreamIO | None = None
        if self.data_port is not None and not s.force_h2_data:
            io = await data.run_sync_owned(lambda: self._connect_raw(token), data.StreamIO.close)
        if io is not None:
            self.carriers.append("raw")
            try:
                if kind == "send":
                    source, jobs = arg
                    fn: Callable[[], None] = lambda: data.send_loop(io, source, jobs, stats)  # noqa: E731
                else:
                    fn = lambda: data.receive_loop(io, arg, stats)  # noqa: E731
                await data.run_worker(fn, io=io, stats=stats, stall=s.timeouts.stall, limiter=s.stream_limiter)
            finally:
                io.close()
            return
        self.carriers.append("h2")
        from ..stall import StallGuard

        try:
            async with s.client.data_stream(token) as st:
                with StallGuard(stats.what, s.timeouts.stall) as guard:
                    stats.on_progress = guard.progress
                    if kind == "send":
                        source, jobs = arg
                        try:
                            await data.h2_send_loop(st, source, jobs, stats, limiter=s.fs_limiter)
                        except control.StreamClosed:
                            # The daemon refused the stream (an expired token) and reset it
                            # (NO_ERROR: an early answer) while we sent: its answer says why.
                            status = st.header(b":status") if st.headers is not None else None
                            if status is None or status == b"200":
                                raise
                            self._refused(stats, status, await st.read_body(protocol.MAX_MESSAGE))
                        await s.client.conn.wait_response(st, s.timeouts.stall)
                        status = st.header(b":status")
                        body = await st.read_body(protocol.MAX_MESSAGE)
                        if status != b"200":
                            self._refused(stats, status, body)
                    else:
                        await s.client.conn.wait_response(st, s.timeouts.stall)
                        status = st.header(b":status")
                        if status != b"200":
                            self._refused(stats, status, await st.read_body(protocol.MAX_MESSAGE))
                        await data.h2_receive_loop(st, arg, stats, limiter=s.fs_limiter)
        except control.StreamClosed as exc:
            raise TransportError(f"{stats.what}: {exc}") from None

    def _refused(self, stats: data.StreamStats, status: bytes | None, body: bytes) -> None:
        """An HTTP/2 data stream's answer other than 200: the daemon's refusal, raised. A refused
        token is TokenRefused, as on the raw data port (data.admit_client)."""
        try:
            self.session.client.session.reply(protocol.FinishTransfer, int(status or 0), body)
        except RemoteError as exc:
            if exc.code == protocol.ErrorCode.BAD_TOKEN.value:
                raise TokenRefused(f"{stats.what}: refused by the daemon: {exc.message}") from None
            raise

    def _connect_raw(self, token: bytes) -> data.StreamIO | None:
        """Worker thread: a raw stream, or None if the data port cannot be reached (the token
        was not sent, so the HTTP/2 fallback can still use it)."""
        s = self.session
        host, port = s.host.host, self.data_port
        assert port is not None
        try:
            # The address the control connection reached: no second lookup of the name.
            sock = socket.create_connection((s.client.address or host, port), timeout=DATA_CONNECT_TIMEOUT)
        except OSError as exc:
            log.warning("data port %s:%d unreachable (%s): falling back to HTTP/2", host, port, exc.strerror or exc)
            return None
        sealed = s.tls_enabled and protocol.FEATURE_SEALED in s.peer.features
        if sealed:  # seal.py imports `cryptography`: only for a stream that may use it
            from .seal import AVAILABLE  # a `cryptography` that seals in place

            sealed = AVAILABLE
        return data.admit_client(
            sock,
            token,
            tls_ctx=tls.client_context() if s.tls_enabled and not sealed else None,
            fingerprint=s.client.fingerprint,
            sealed=sealed,
            stall=s.timeouts.stall,
            what=f"data stream to {host}:{port}",
        )


@asynccontextmanager
async def open_session(
    host: HostSpec,
    *,
    tls_enabled: bool = True,
    known_hosts: Path | None = None,
    force_h2_data: bool = False,
    timeouts: Timeouts | None = None,
    addresses: Sequence[str] | None = None,
) -> AsyncIterator[RemoteSession]:
    """Connect, pin/check the certificate, say hello. `addresses`: connect to these IP
    addresses of `host` rather than looking it up (control.connect_control).

    Raises:
        ConnectError, CertificateMismatchError, IncompatiblePeerError, RemoteError.
    """
    timeouts = timeouts or Timeouts()
    async with control.connect_control(
        host.host,
        host.port,
        tls_enabled=tls_enabled,
        known_hosts=known_hosts,
        connect_timeout=timeouts.connect,
        request_timeout=timeouts.request,
        addresses=addresses,
    ) as client:
        yield RemoteSession(client, host, tls_enabled=tls_enabled, force_h2_data=force_h2_data, timeouts=timeouts)


# =================================================================================================
# Plain local files for the client side (phase 1: single files by path; the engine's per-directory
# writer replaces LocalSink for tree transfers)


class _LocalSrc:
    __slots__ = ("fd", "size", "extents")

    def __init__(self, fd: int, size: int) -> None:
        self.fd = fd
        self.size = size
        self.extents: list[tuple[int, int]] | None = None

    def close(self) -> None:
        os.close(self.fd)


@dataclass
class LocalSource:
    """Files to push, by id -> local path."""

    paths: dict[int, Path] = field(default_factory=dict)

    def open(self, file_id: int) -> _LocalSrc:
        fd = os.open(self.paths[file_id], os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            os.close(fd)
            raise OSError(21, "not a regular file")
        src = _LocalSrc(fd, st.st_size)
        from ..fsops import data_extents, is_sparse

        if is_sparse(st):
            src.extents = data_extents(fd, st.st_size)
        return src


class _LocalDst:
    __slots__ = ("landing", "name", "fd", "mtime_ns", "mode")

    def __init__(self, landing: Any, name: str, mtime_ns: int | None, mode: int | None) -> None:
        self.landing = landing
        self.name = name
        self.fd = landing.fd
        self.mtime_ns = mtime_ns
        self.mode = mode

    def commit(self, size: int) -> None:
        try:
            if self.mode is not None:
                os.fchmod(self.fd, self.mode)
            if self.mtime_ns is not None:
                os.utime(self.fd, ns=(self.mtime_ns, self.mtime_ns))
            self.landing.commit(self.name, True)
        finally:
            os.close(self.landing.dir_fd)

    def abort(self) -> None:
        try:
            self.landing.abort()
        finally:
            os.close(self.landing.dir_fd)


@dataclass
class LocalSink:
    """Files to pull, by id -> (local destination path, mtime_ns or None, mode or None)."""

    targets: dict[int, tuple[Path, int | None, int | None]] = field(default_factory=dict)

    def open(self, file_id: int) -> _LocalDst:
        from ..fsops import Landing

        path, mtime_ns, mode = self.targets[file_id]
        dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            landing = Landing(dir_fd)
        except BaseException:
            os.close(dir_fd)
            raise
        return _LocalDst(landing, path.name, mtime_ns, mode)


__all__ = [
    "Timeouts",
    "RemoteSession",
    "RemoteTransfer",
    "open_session",
    "LocalSource",
    "LocalSink",
]
