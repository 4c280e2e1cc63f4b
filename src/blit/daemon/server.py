"""The daemon's listeners and lifetimes: control connections (HTTP/2), data streams (raw TCP),
mDNS, and a clean stop.

    serve()                                  one nursery for the daemon's life
    ├── control listener(s) -> handle_control: TLS handshake, H2Connection, one Session
    │       ├── per request: unary handler (CBOR in, CBOR out), or the HTTP/2 data fallback
    │       └── remote to remote jobs (relay.py): this daemon pulling from a peer daemon
    ├── data listener(s)    -> handle_data: its first byte awaited in Trio, handshake + token
    │                          in a worker thread, then the stream's worker thread, owned by
    │                          its Transfer (connections not yet proved: _Oldest, R57)
    └── mDNS advertisement (zeroconf on its own thread)

Stopping = cancelling serve(): every connection task is cancelled, every stream worker is kicked
(its socket shut down, so it aborts its open files, which leaves no temporary file), and each
control connection gets a GOAWAY on the way out.

This module must not interpret messages (handlers.py) or frames (transport/data.py).
"""

from __future__ import annotations

import logging
import math
import os
import socket
import ssl
import time
from dataclasses import dataclass
from typing import Any

import h2.errors
import trio

from ..errors import ConfigFileError, MessageTooLarge, RemoteProtocolError
from ..transport import control, data, protocol
from ..transport import tls as tls_mod
from ..transport.protocol import AdmitStatus, ErrorCode, Refused
from . import handlers
from .config import DaemonConfig, unmapped

log = logging.getLogger("blit.daemon")

HELLO_TIMEOUT = 10.0
"""A control connection must complete TLS and say hello within this many seconds."""
IDLE_TIMEOUT = 600.0
"""A control connection with no open stream and no frame for this long is closed (clients ping)."""
IDLE_EVICT = 10.0
"""A session idle this long (no request, no transfer or job of its own) may be ended to make room
for a new connection when the daemon is full and no connection is still without its hello."""
UNPROVEN_GRACE = 1.0
"""A control connection without its hello is ended to make room only once it has had this
long (a TLS handshake and hello take milliseconds on a LAN)."""
UNPROVEN_PER_ADDRESS = 16
"""Control connections without their hello from one address: beyond this, its own oldest that
has had UNPROVEN_GRACE goes (a flood from one address ends its own connections, not other
clients')."""
PENDING_DATA = 1024
"""Data connections that have sent nothing yet, at most; the oldest goes for a new one."""


class _Oldest:
    """Connections that have not yet proved themselves (before the control plane's hello;
    before the data port's admission), oldest first, each with the way to end it, its address
    and when it came. A full daemon ends the oldest to make room for a newcomer rather than
    refusing it (QA: 300 idle connections to the control port refused every client; 1,500 to
    the data port made transfers time out), but never one younger than the `min_age` asked (a
    real client in its TLS handshake: 40 clients arriving at once ended each other's, QA)."""

    def __init__(self) -> None:
        self._ends: dict[int, tuple[Any, Any, float]] = {}  # key -> (end, address, since); insertion order is age
        self._next = 0

    def __len__(self) -> int:
        return len(self._ends)

    def add(self, end: Any, addr: Any = None) -> int:
        self._next += 1
        self._ends[self._next] = (end, addr, trio.current_time())
        return self._next

    def remove(self, key: int) -> None:
        self._ends.pop(key, None)

    def count(self, addr: Any) -> int:
        return sum(1 for _end, a, _since in self._ends.values() if a == addr)

    def evict(self, *, addr: Any = None, min_age: float = 0.0) -> bool:
        """End the oldest (from `addr`, if given) that has waited `min_age`; False if none."""
        now = trio.current_time()
        for key, (end, a, since) in self._ends.items():
            if addr is not None and a != addr:
                continue
            if now - since < min_age:
                return False  # the rest are younger
            del self._ends[key]
            end()
            return True
        return False


class _Sessions:
    """Sessions past their hello, each with the way to end its connection."""

    def __init__(self) -> None:
        self._all: dict[int, tuple[handlers.Session, Any]] = {}

    def add(self, key: int, session: handlers.Session, end: Any) -> None:
        self._all[key] = (session, end)

    def remove(self, key: int) -> None:
        self._all.pop(key, None)

    def evict_unadmitted(self, state: handlers.DaemonState) -> handlers.Session | None:
        """End the oldest session from an address no export admits (it can use nothing here,
        and held a slot a client could use: QA, 8 of them shut out the one allowed client of a
        daemon of 8 slots, as rsync's per-module rules would not); the session, or None."""
        for key, (session, end) in self._all.items():
            if not state.admits(session.addr):
                del self._all[key]
                end()
                return session
        return None

    def evict_idle(self) -> handlers.Session | None:
        """End the session idle longest, if one has been for IDLE_EVICT with nothing of its own
        running; the session, or None."""
        now = trio.current_time()
        best: tuple[float, int] | None = None
        for key, (session, _end) in self._all.items():
            if session.active or session.transfers or session.jobs or now - session.last_request < IDLE_EVICT:
                continue
            if best is None or session.last_request < best[0]:
                best = (session.last_request, key)
        if best is None:
            return None
        session, end = self._all.pop(best[1])
        end()
        return session


class _Budget:
    """Lines about connections that never became sessions or streams (refused, timed out, ended
    for room): at most LINES per PERIOD seconds go to the log, the rest are counted and named in
    one line when the next period begins (QA: a flood of idle connections wrote 13 MB of log in
    minutes, a line each)."""

    LINES = 20
    PERIOD = 10.0

    def __init__(self) -> None:
        self.start = -math.inf
        self.logged = 0
        self.dropped = 0

    def __call__(self, level: int, msg: str, *args: object) -> None:
        now = time.monotonic()
        if now - self.start >= self.PERIOD:
            if self.dropped:
                log.log(level, "%d more lines about connections not logged in %g s", self.dropped, self.PERIOD)
            self.start, self.logged, self.dropped = now, 0, 0
        if self.logged < self.LINES:
            self.logged += 1
            log.log(level, msg, *args)
        else:
            self.dropped += 1


_conn_log = _Budget()


def _shut(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)  # a thread blocked on it wakes and closes it
    except OSError:
        pass


@dataclass(frozen=True)
class ServeInfo:
    """What `serve()` reports through task_status once it accepts connections."""

    host: str
    port: int
    data_port: int | None
    tls: bool
    fingerprint: str | None


def _software() -> str:
    try:
        from .. import __version__

        return f"blitd {__version__}"
    except Exception:
        return "blitd"


async def serve(config: DaemonConfig, *, task_status: Any = trio.TASK_STATUS_IGNORED, stall: float | None = None, token_ttl: float | None = None) -> None:
    """Run the daemon until cancelled.

    Args:
        config: the checked configuration.
        stall: override of the data-stream stall timeout (tests).
        token_ttl: override of the data-token lifetime (tests).
    """
    state = handlers.DaemonState(config=config, software=_software())
    if stall is not None:
        state.stall = stall
    if token_ttl is not None:
        state.grants = data.GrantTable(ttl=token_ttl)
    ssl_ctx: ssl.SSLContext | None = None
    data_ctx: ssl.SSLContext | None = None
    if config.tls:
        state_dir = config.state_dir or tls_mod.default_state_dir()
        cert, key = await trio.to_thread.run_sync(tls_mod.ensure_certificate, state_dir)
        from ..transport import seal  # noqa: F401  (sealed data streams: imported now, not on the first one)

        try:
            ssl_ctx = tls_mod.server_context(cert, key)
            data_ctx = tls_mod.data_server_context(cert, key)
            state.fingerprint = tls_mod.fingerprint_of_file(cert)
        except (ssl.SSLError, ValueError, UnicodeDecodeError) as exc:  # a mangled or mismatched pair
            raise ConfigFileError(
                f"the daemon's certificate {cert} or key {key} cannot be used ({getattr(exc, 'reason', None) or exc}); "
                "remove both to have new ones made (clients will then refuse the new certificate until they drop their pin)"
            ) from None
        except OSError as exc:  # checked by ensure_certificate; changed since (a race)
            raise ConfigFileError(f"cannot read the daemon's TLS certificate {cert} or key {key}: {exc.strerror or exc}") from None
    host = None if config.bind in ("", "*") else config.bind
    try:
        control_listeners = await trio.open_tcp_listeners(config.port, host=host)
    except OSError as exc:  # the machine's state (port taken, address not here): exit 1, not usage
        from ..errors import FatalError

        raise FatalError(f"cannot listen on {config.bind or '*'}:{config.port}: {exc.strerror or exc}") from None
    port = control_listeners[0].socket.getsockname()[1]
    data_listeners: list[trio.SocketListener] = []
    if not config.force_h2_data:
        want = config.effective_data_port
        try:
            data_listeners = await trio.open_tcp_listeners(want, host=host)
        except OSError as exc:
            from ..errors import FatalError

            for lst in control_listeners:
                await lst.aclose()
            raise FatalError(f"cannot listen for data on {config.bind or '*'}:{want}: {exc.strerror or exc}") from None
        state.data_port = data_listeners[0].socket.getsockname()[1]
    connections = trio.CapacityLimiter(config.max_connections)
    unproven = _Oldest()  # control connections before their hello
    proven = _Sessions()  # and after it
    data_idle, data_admitting = _Oldest(), _Oldest()  # data connections before their first byte; in a thread
    async with trio.open_nursery() as nursery:
        nursery.start_soon(
            trio.serve_listeners,
            lambda stream: _guarded(_handle_control, state, ssl_ctx, connections, unproven, proven, stream),
            control_listeners,
        )
        if data_listeners:
            nursery.start_soon(
                trio.serve_listeners,
                lambda stream: _guarded(_handle_data, state, data_ctx, data_idle, data_admitting, stream),
                data_listeners,
            )
        if config.mdns:
            from .. import discovery

            nursery.start_soon(
                discovery.advertise,
                discovery.Advertisement(
                    name=config.instance_name,
                    port=port,
                    modules=[m.name for m in config.modules],
                    tls=config.tls,
                ),
                list(config.mdns_interfaces) or None,
            )
        log.info(
            "listening on %s:%d (data %s, TLS %s)",
            config.bind or "*",
            port,
            state.data_port if state.data_port is not None else "over HTTP/2 only",
            "on, certificate " + state.fingerprint if state.fingerprint else "off",
        )
        for inner, outer, looser in _overlaps(config):
            log.warning(
                "%s lies inside %s, which is %s: what %s guards is reachable through %s without it",
                inner, outer, looser, inner, outer,
            )  # fmt: skip
        for export, setting in _peer_pull_anywhere(config):
            log.warning(
                "%s accepts remote to remote transfers from any host: any client that reaches this"
                " daemon can make it connect to any host and port it can reach (set %s to the hosts"
                " it may pull from)",
                export,
                setting,
            )
        task_status.started(
            ServeInfo(
                host=config.bind or "*",
                port=port,
                data_port=state.data_port,
                tls=config.tls,
                fingerprint=state.fingerprint,
            )
        )
        try:
            await trio.sleep_forever()
        finally:
            state.shutting_down = True
            log.info("shutting down")


async def _guarded(fn: Any, *args: Any) -> None:
    """A connection handler must never take the daemon down: log what escapes and drop it."""
    try:
        with control.collapse_groups():
            await fn(*args)
    except Exception:
        log.exception("connection handler failed")


def _peer(stream: trio.SocketStream) -> str:
    try:
        addr = stream.socket.getpeername()
        return f"{addr[0]}:{addr[1]}"
    except OSError:
        return "?"


def _peer_ip(stream: trio.SocketStream) -> Any:
    """The client's address (ipaddress; IPv4-mapped IPv6 unwrapped), or None if unknown (then
    every module with address rules refuses it)."""
    import ipaddress

    try:
        return unmapped(ipaddress.ip_address(str(stream.socket.getpeername()[0]).split("%", 1)[0]))
    except (OSError, ValueError, IndexError):
        return None


async def _handle_control(
    state: handlers.DaemonState,
    ssl_ctx: ssl.SSLContext | None,
    connections: trio.CapacityLimiter,
    unproven: _Oldest,
    proven: _Sessions,
    tcp: trio.SocketStream,
) -> None:
    peer = _peer(tcp)
    addr = _peer_ip(tcp)
    # One address with many connections still without their hello ends its own oldest.
    own = addr is not None and unproven.count(addr) >= UNPROVEN_PER_ADDRESS and unproven.evict(addr=addr, min_age=UNPROVEN_GRACE)
    try:
        connections.acquire_nowait()
    except trio.WouldBlock:
        # Full: the oldest connection still without its hello after UNPROVEN_GRACE makes room,
        # if there is one; else, for a newcomer some export admits, a session from an address
        # none admits; else a session idle for IDLE_EVICT with nothing running (one that said
        # hello and parked); else the newcomer is refused (the client says: busy).
        got = False
        room = own or unproven.evict(min_age=UNPROVEN_GRACE)
        if room:
            _conn_log(logging.INFO, "closed the oldest connection without a hello to make room for %s", peer)
        else:
            useless = proven.evict_unadmitted(state) if state.admits(addr) else None
            idle = proven.evict_idle() if useless is None else None
            if useless is not None:
                _conn_log(logging.INFO, "ending %s, which no export admits, to make room for %s", useless.peer, peer)
                room = True
            elif idle is not None:
                _conn_log(logging.INFO, "ending %s, idle for %.0f s, to make room for %s", idle.peer, trio.current_time() - idle.last_request, peer)
                room = True
        if room:
            with trio.move_on_after(2.0):
                await connections.acquire()
                got = True
        if not got:
            _conn_log(logging.WARNING, "refusing %s: too many connections", peer)
            await tcp.aclose()
            return
    scope = trio.CancelScope()
    key = unproven.add(scope.cancel, addr)
    try:
        with scope:
            await _control_connection(state, ssl_ctx, unproven, proven, scope, key, peer, addr, tcp)
        if scope.cancelled_caught:
            await trio.aclose_forcefully(tcp)
    finally:
        unproven.remove(key)
        proven.remove(key)
        connections.release()


async def _control_connection(
    state: handlers.DaemonState,
    ssl_ctx: ssl.SSLContext | None,
    unproven: _Oldest,
    proven: _Sessions,
    scope: trio.CancelScope,
    key: int,
    peer: str,
    addr: Any,
    tcp: trio.SocketStream,
) -> None:
    stream: trio.abc.Stream = tcp
    if ssl_ctx is not None:
        ssl_stream = trio.SSLStream(tcp, ssl_ctx, server_side=True)
        try:
            with trio.fail_after(HELLO_TIMEOUT):
                await ssl_stream.do_handshake()
        except (trio.TooSlowError, trio.BrokenResourceError, ssl.SSLError, OSError) as exc:
            _conn_log(logging.INFO, "TLS handshake with %s failed: %s", peer, exc.__cause__ or exc)
            await trio.aclose_forcefully(tcp)
            return
        stream = ssl_stream
    conn = control.H2Connection(stream, client_side=False, idle_timeout=IDLE_TIMEOUT)
    session = handlers.Session(state, peer, addr)
    state.sessions += 1
    try:
        async with trio.open_nursery() as nursery:

            async def hello_deadline() -> None:
                with trio.move_on_after(HELLO_TIMEOUT) as cs:
                    await session.ready.wait()
                    unproven.remove(key)  # proved itself: ended to make room only once idle (_Sessions)
                    proven.add(key, session, scope.cancel)
                if cs.cancelled_caught:
                    _conn_log(logging.INFO, "closing %s: no hello in %g s", peer, HELLO_TIMEOUT)
                    await conn.close(h2.errors.ErrorCodes.PROTOCOL_ERROR, why=f"no hello within {HELLO_TIMEOUT:g} s")
                elif session.silence is not None:  # a client that pings (R53)
                    conn.end_when_silent(session.silence, f"nothing came from this client for {session.silence:g} s (was it stopped?)")

            nursery.start_soon(hello_deadline)
            session.nursery = nursery  # remote to remote jobs: cancelled when the connection ends
            await conn.run(lambda st: _handle_stream(session, st))
            nursery.cancel_scope.cancel()
    finally:
        state.sessions -= 1
        session.close()


_OK_HEADERS = [(b":status", b"200"), (b"content-type", protocol.CONTENT_TYPE)]


async def _reply_error(st: control.H2Stream, code: ErrorCode, message: str) -> None:
    body = protocol.error_body(code, message)
    await st.send_headers([(b":status", str(code.status).encode()), (b"content-type", protocol.CONTENT_TYPE)])
    await st.send_data(body, end=True)


async def _handle_stream(session: handlers.Session, st: control.H2Stream) -> None:
    session.last_request = trio.current_time()
    session.active += 1
    try:
        await _serve_stream(session, st)
    finally:
        session.active -= 1
        session.last_request = trio.current_time()


async def _serve_stream(session: handlers.Session, st: control.H2Stream) -> None:
    method = st.header(b":method")
    path = (st.header(b":path") or b"").decode("ascii", "replace")
    if method != b"POST":
        await _reply_error(st, ErrorCode.BAD_REQUEST, "only POST is used")
        return
    if path == protocol.DATA_PATH:
        await _handle_h2_data(session, st)
        return
    async with session.request_slots:
        try:
            try:
                body = await st.read_body(session.proto.body_limit, stall=session.state.stall)
            except RemoteProtocolError as exc:
                raise Refused(ErrorCode.TOO_LARGE if exc.code == 413 else ErrorCode.BAD_REQUEST, str(exc)) from None
            msg = session.proto.receive_request(path, body)
            reply = await session.dispatch(msg)
            try:
                out = protocol.encode(reply)
            except MessageTooLarge as exc:  # a huge listing
                where = getattr(msg, "rel", None)
                what = f"{path} of {os.fsdecode(where)!r}" if where else path
                raise Refused(ErrorCode.TOO_LARGE, f"the answer to {what} is too large: {exc} (a directory this large is not supported yet)") from None
        except Refused as exc:
            log.info("%s %s refused: %s: %s", session.peer, path, exc.code.value, exc.message)
            await _reply_error(st, exc.code, exc.message)
            return
        except control.StreamClosed:
            raise
        except Exception as exc:
            log.exception("%s %s failed", session.peer, path)
            await _reply_error(st, ErrorCode.INTERNAL, f"internal error: {type(exc).__name__}")
            return
    await st.send_headers(_OK_HEADERS)
    await st.send_data(out, end=True)


async def _handle_h2_data(session: handlers.Session, st: control.H2Stream) -> None:
    """The HTTP/2 fallback: a data stream admitted by its token, on this session only."""
    raw = st.header(protocol.TOKEN_HEADER) or b""
    try:
        if session.proto.state is not protocol.SessionState.READY:
            raise Refused(ErrorCode.NO_SESSION, "hello first")
        try:
            token = bytes.fromhex(raw.decode("ascii"))
        except (ValueError, UnicodeDecodeError):
            raise Refused(ErrorCode.BAD_TOKEN, "malformed data token") from None
        transfer = session.state.grants.redeem(token)
        if transfer.session is not session or transfer.closed:
            raise Refused(ErrorCode.BAD_TOKEN, "the data token belongs to another session")
    except Refused as exc:
        log.info("%s: data stream refused: %s", session.peer, exc.message)
        await _reply_error(st, exc.code, exc.message)
        return
    transfer.attached += 1
    st.widen_window(control.DATA_STREAM_WINDOW)
    await st.send_headers(_OK_HEADERS)
    await transfer.run_stream("h2", st=st)
    if not transfer.daemon_sends:
        await st.end()


def _overlaps(config: DaemonConfig) -> list[tuple[str, str, str]]:
    """(inner export, outer export, how the outer is looser) of every export whose directory
    lies inside another's that guards it less or otherwise: writable around a read-only one,
    without the credentials it asks or open to other users, without its address rules or with
    other ones. Each export's rules hold for its own name only (as
    rsyncd's modules), so the inner one's files are reachable through the outer with the
    outer's rules: the daemon says so at start (a QA pass found it silent)."""
    exports = [("the root export", config.root, config.root_read_only, config.root_access)] if config.root is not None else []
    exports += [(f"module {m.name!r}", m.path, m.read_only, m.access) for m in config.modules]
    real = [(name, os.path.realpath(path), ro, acc) for name, path, ro, acc in exports]
    out = []
    for iname, ipath, iro, iacc in real:
        for oname, opath, oro, oacc in real:
            if oname == iname or not (ipath + "/").startswith(opath.rstrip("/") + "/"):
                continue
            looser = [
                what
                for what, yes in (
                    ("writable", iro and not oro),
                    ("open without credentials", iacc.needs_auth and not oacc.needs_auth),
                    ("open to other users", iacc.needs_auth and oacc.needs_auth and bool(set(oacc.auth_users) - set(iacc.auth_users))),
                    ("open to any address", bool(iacc.hosts_allow or iacc.hosts_deny) and not (oacc.hosts_allow or oacc.hosts_deny)),
                    (  # not proved looser (address sets), but other rules: QA found 0.0.0.0/0 around 127.0.0.1 silent
                        "under other address rules",
                        bool(iacc.hosts_allow or iacc.hosts_deny)
                        and bool(oacc.hosts_allow or oacc.hosts_deny)
                        and (set(oacc.hosts_allow), set(oacc.hosts_deny)) != (set(iacc.hosts_allow), set(iacc.hosts_deny)),
                    ),
                )
                if yes
            ]
            if looser:
                out.append((iname, oname, " and ".join(looser)))
    return out


def _peer_pull_anywhere(config: DaemonConfig) -> list[tuple[str, str]]:
    """(export, key) of every export that consents to remote to remote pulls without a
    `peer_pull_from` list (decisions R35: allowed, as before, with a warning at start)."""
    out = []
    if config.root is not None and config.root_allow_peer_pull and config.root_peer_pull_from is None:
        out.append(("the root export", "root_peer_pull_from in [daemon]"))
    for m in config.modules:
        if m.allow_peer_pull and m.peer_pull_from is None:
            out.append((f"module {m.name!r}", "peer_pull_from in its [[module]] table"))
    return out


async def _handle_data(
    state: handlers.DaemonState, ssl_ctx: ssl.SSLContext | None, idle: _Oldest, admitting: _Oldest, tcp: trio.SocketStream
) -> None:
    """A raw data stream: handshake and token check, then the transfer's worker owns it."""
    peer = _peer(tcp)
    addr = _peer_ip(tcp)
    # One deadline for the whole admission (its first byte, waiting for a turn, TLS, hello): a
    # client that sends a byte now and then passed every per-read timeout and kept a worker
    # for ever (530 of them stopped every transfer). Its socket is shut down, which ends the
    # thread. A connection waits for its first byte here, holding no thread (at most
    # PENDING_DATA of them); one that has sent something takes an admission thread, and when
    # all are taken the one that has held its thread longest is ended (_Oldest).
    raw: socket.socket | None = None
    with trio.move_on_after(data.ADMIT_TIMEOUT) as deadline:
        if len(idle) >= PENDING_DATA:
            idle.evict()
        wait = trio.CancelScope()
        key = idle.add(wait.cancel)
        try:
            with wait:
                await trio.lowlevel.wait_readable(tcp.socket)
        finally:
            idle.remove(key)
        if wait.cancelled_caught:
            await trio.aclose_forcefully(tcp)
            return
        raw = socket.socket(fileno=tcp.socket.detach())
        if state.admit_limiter.available_tokens == 0:
            admitting.evict()
        sock = raw
        key = admitting.add(lambda: _shut(sock))
        try:
            got = await data.run_sync_owned(
                lambda: data.accept_handshake(sock, ssl_ctx, state.grants.secret), lambda r: r[0].close(), limiter=state.admit_limiter
            )
        except (OSError, ssl.SSLError, ConnectionError) as exc:
            _conn_log(logging.INFO, "data connection from %s failed before admission: %s", peer, exc)
            return
        finally:
            admitting.remove(key)
    if deadline.cancelled_caught:
        _conn_log(logging.INFO, "data connection from %s: no admission within %g s", peer, data.ADMIT_TIMEOUT)
        if raw is not None:
            _shut(raw)  # the abandoned thread's read fails; it closes the socket
        else:
            await trio.aclose_forcefully(tcp)
        return
    assert got is not None
    link: data.Link | None
    link, token = got
    try:
        if isinstance(token, Refused):
            status = {ErrorCode.VERSION: AdmitStatus.VERSION, ErrorCode.BAD_TOKEN: AdmitStatus.BAD_TOKEN}.get(token.code, AdmitStatus.BAD_HELLO)
            _conn_log(logging.INFO, "data stream from %s refused: %s", peer, token.message)
            await trio.to_thread.run_sync(_answer_quietly, link, status, token.message)
            return
        try:
            transfer = state.grants.redeem(token)
            if transfer.closed:
                raise Refused(ErrorCode.BAD_TOKEN, "the transfer is over")
            # The token ties the stream to its session (which passed the module's checks); the
            # stream's own address must pass the module's address rules too.
            transfer.session.check_address(transfer.module, state.export(transfer.module)[2], addr)
        except Refused as exc:
            _conn_log(logging.INFO, "data stream from %s refused: %s", peer, exc.message)
            await trio.to_thread.run_sync(_answer_quietly, link, AdmitStatus.BAD_TOKEN, exc.message)
            return
        # Counted before the client hears "admitted", so a finish request that follows at once
        # waits for this stream.
        transfer.attached += 1
        try:
            await trio.to_thread.run_sync(data.answer_admission, link, AdmitStatus.OK, "")
        except (OSError, ssl.SSLError):
            transfer.stream_done()
            return
        io = link.stream(what="data stream", stall=state.stall)
        link = None  # owned by io now
        try:
            await transfer.run_stream("raw", io=io)
        finally:
            io.close()
    finally:
        if link is not None:
            link.close()


def _answer_quietly(link: data.Link, status: AdmitStatus, message: str) -> None:
    try:
        link.sock.settimeout(2)
        data.answer_admission(link, status, message)
    except (OSError, ssl.SSLError):
        pass


__all__ = ["serve", "ServeInfo", "HELLO_TIMEOUT", "IDLE_TIMEOUT"]
