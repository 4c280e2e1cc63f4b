"""The control plane's I/O shell: HTTP/2 over a trio stream, for the daemon and for the client.

One `H2Connection` class serves both roles (HTTP/2 is symmetric). Each connection runs three
tasks: a reader (bytes -> h2 events -> per-stream queues), a writer (the only task that writes to
the socket, so a cancelled handler can never cut a frame in half), and, on the client, a PING
keepalive that notices a frozen daemon (nothing received for the request timeout) or, on the
daemon, a watchdog that closes idle connections and those of clients silent past the limit
they were told (R53). A stalled daemon is reported as `daemon HOST:PORT stopped responding:
...` (`daemon_stalled`); a daemon's stated reason for ending the session as `daemon HOST:PORT
ended the session: ...` (`ended_by_daemon`). Handlers and callers see `H2Stream`s: read the peer's
headers and body chunks (with flow-control backpressure), send headers and data (waiting for the
peer's window).

Why our own server and client instead of hypercorn + httpx: docs/decisions-remote.md (measured in
STACK-NOTES §1: 4x the request rate, settable windows and frames, no 1,000-request or 5 s idle
cut-offs, full duplex, and certificate pinning before the first request byte).

Limits: a stream's window is 1 MiB unless its handler widens it (the data fallback does), the
connection window (64 MiB) exceeds the sum of the stream windows (so one stream can never starve
another of connection credit), at most 32 concurrent streams, 16 KiB of headers, writes buffered
up to 4 MiB before a sender waits. Every wait has a timeout.

Importing it changes one thing outside it, process-wide: a hyperframe DATA frame's repr shows
its length instead of its payload (R43: h2 formats every received frame for a no-op log).

This module must not know the blit messages beyond `protocol.py`'s constants: it moves bytes.
"""

from __future__ import annotations

import logging
import math
import ssl
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.frame_buffer
import h2.settings
import hyperframe.frame
import trio

from ..errors import CertificateMismatchError, ConnectError, FatalError, RemoteProtocolError, StallError, TransportError, leaves
from . import protocol, tls

log = logging.getLogger("blit.control")


def _data_body_repr(self: hyperframe.frame.DataFrame) -> str:
    return f"<{len(self.data)} bytes>"


# h2 formats every frame it receives, eagerly, for a trace log nobody reads
# (`logger.trace("Received frame: %s", repr(frame))` in H2Connection._receive_frame), and a DATA
# frame's repr copies and hex-encodes its whole payload before cutting it to 10 bytes: 0.3 GB/s,
# about 7 s of CPU per 2 GiB carried over HTTP/2 (measured; docs/decisions.md R43). A DATA
# frame's repr here is its length.
hyperframe.frame.DataFrame._body_repr = _data_body_repr  # type: ignore[method-assign,assignment]

STREAM_WINDOW = 1 << 20
DATA_STREAM_WINDOW = 8 << 20
CONNECTION_WINDOW = 64 << 20
MAX_FRAME = 1 << 20
MAX_CONCURRENT_STREAMS = 32
MAX_HEADER_LIST = 16 << 10
MAX_HEADER_BLOCK = 4 * MAX_HEADER_LIST
"""Bytes of an encoded header block (HEADERS and its CONTINUATIONs) kept before it is decoded
(and held to MAX_HEADER_LIST): h2 itself keeps up to 64 CONTINUATION frames of MAX_FRAME, 64 MiB a
connection for as long as the peer likes. Room for Huffman codes longer than their text."""
READ_SIZE = 256 << 10
HIGH_WATER = 4 << 20
WRITE_TIMEOUT = 60.0
"""A peer that reads nothing of what we send for this long is declared stalled."""
WRITE_PIECE = 256 << 10
"""The writer's unit of progress (each piece has WRITE_TIMEOUT to go out)."""
OVERSLEPT = 5.0
"""A timer task that wakes this many seconds after it asked to: this process was stopped (or
the machine slept), so a peer's silence over that time is not the peer's."""
GOAWAY_TEXT = 200
"""Bytes of a GOAWAY's debug data sent or shown (why the peer ended the connection)."""

Headers = list[tuple[bytes, bytes]]


class StreamClosed(Exception):
    """The stream was reset by the peer or the connection went away.

    Internal to the transport: callers in `transport/` map it to TransportError (client) or end
    the handler (daemon); it never reaches users.
    """


class H2Stream:
    """One request/response exchange on an `H2Connection`."""

    def __init__(self, conn: H2Connection, stream_id: int) -> None:
        self._conn = conn
        self.id = stream_id
        self.headers: Headers | None = None
        self.headers_received = trio.Event()
        self._chunks: deque[tuple[bytes, int]] = deque()
        self._ended = False
        self._local_ended = False
        self._reset: int | None = None
        self._changed = trio.Event()
        self.cancel_scope: trio.CancelScope | None = None

    # --- internal, called by the connection's reader -------------------------------------------
    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    def _on_data(self, data: bytes, flow_len: int) -> None:
        self._chunks.append((data, flow_len))
        self._notify()

    def _on_end(self) -> None:
        self._ended = True
        self._notify()

    def _on_reset(self, code: int) -> None:
        self._reset = code
        self._notify()
        if self.cancel_scope is not None:
            self.cancel_scope.cancel()

    # --- reading --------------------------------------------------------------------------------
    def header(self, name: bytes) -> bytes | None:
        for k, v in self.headers or ():
            if k == name:
                return v
        return None

    @property
    def ended(self) -> bool:
        return self._ended and not self._chunks

    async def receive_chunk(self) -> bytes | None:
        """The next piece of the peer's body, or None at its end.

        Raises:
            StreamClosed: the peer reset the stream or the connection closed.
        """
        while True:
            if self._chunks:
                data, flow_len = self._chunks.popleft()
                self._conn._acknowledge(self.id, flow_len)
                return data
            if self._ended:  # whole: a reset after it (a refusal's NO_ERROR, RFC 9113 §8.1) takes nothing away
                return None
            if self._reset is not None:
                raise StreamClosed(f"stream reset by the peer (code {self._reset})")
            if self._conn.closed:
                raise StreamClosed(self._conn.close_reason or "connection closed")
            await self._changed.wait()

    async def read_body(self, limit: int, stall: float = math.inf) -> bytes:
        """The whole body, refusing more than `limit` bytes; `stall`: seconds without a byte of
        it after which the peer is taken to have stopped sending (a body left unfinished held
        its buffer for as long as the connection lived).

        Raises:
            RemoteProtocolError(413): the body is larger than `limit`.
            RemoteProtocolError(408): nothing of it came for `stall` seconds.
        """
        parts: list[bytes] = []
        size = 0
        while True:
            with trio.move_on_after(stall) as waited:
                chunk = await self.receive_chunk()
            if waited.cancelled_caught:
                if await self._conn.ended_for_silence():
                    raise StreamClosed(self._conn.close_reason or "connection closed")
                raise RemoteProtocolError(f"the request body stopped coming for {stall:g} s", 408)
            if chunk is None:
                return b"".join(parts)
            size += len(chunk)
            if size > limit:
                raise RemoteProtocolError(f"body above the limit of {limit} bytes", 413)
            parts.append(chunk)

    # --- writing --------------------------------------------------------------------------------
    async def send_headers(self, headers: Headers, *, end: bool = False) -> None:
        self._conn._check_open()
        if self._reset is not None:  # the peer abandoned it while we worked on the answer
            raise StreamClosed(f"stream reset by the peer (code {self._reset})")
        try:
            self._conn._h2.send_headers(self.id, headers, end_stream=end)
        except (h2.exceptions.StreamClosedError, h2.exceptions.StreamIDTooLowError):
            raise StreamClosed("stream closed") from None
        self._local_ended = end
        self._conn._wake()

    async def send_data(self, data: bytes | memoryview, *, end: bool = False) -> None:
        await self._conn._send_data(self, data, end)

    async def end(self) -> None:
        await self._conn._send_data(self, b"", True)

    def reset(self, code: int = h2.errors.ErrorCodes.CANCEL) -> None:
        """Abandon the stream (RST_STREAM); never raises."""
        if self._conn.closed:
            return
        try:
            self._conn._h2.reset_stream(self.id, code)
        except h2.exceptions.H2Error:
            return
        self._conn._wake()

    def widen_window(self, size: int) -> None:
        """Let the peer send up to `size` bytes ahead on this stream (bulk data)."""
        extra = size - STREAM_WINDOW
        if extra > 0 and not self._conn.closed:
            try:
                self._conn._h2.increment_flow_control_window(extra, stream_id=self.id)
            except h2.exceptions.H2Error:
                return
            self._conn._wake()


Handler = Callable[[H2Stream], Awaitable[None]]


class _BoundedFrameBuffer(h2.frame_buffer.FrameBuffer):
    """h2's frame buffer, refusing a header block that grows past MAX_HEADER_BLOCK before its
    END_HEADERS (ProtocolError: the connection ends with PROTOCOL_ERROR), and checking each
    frame's length against the connection's limit as it is when the frame is read: h2 copies
    the limit into the buffer once per chunk received, before it reads the SETTINGS ACK that
    raises it, so an ACK and a large frame in one read ended the connection (FRAME_SIZE_ERROR)."""

    conn: h2.connection.H2Connection

    @property
    def max_frame_size(self) -> int:
        return self.conn.max_inbound_frame_size

    @max_frame_size.setter
    def max_frame_size(self, value: int) -> None:
        pass  # h2's copy: the property reads the connection instead

    def _update_header_buffer(self, f: Any) -> Any:
        if isinstance(f, (hyperframe.frame.HeadersFrame, hyperframe.frame.ContinuationFrame)) and (
            self._headers_buffer or "END_HEADERS" not in f.flags
        ):
            if sum(len(x.data) for x in self._headers_buffer) + len(f.data) > MAX_HEADER_BLOCK:
                raise h2.exceptions.ProtocolError("header block larger than the daemon takes")
        return super()._update_header_buffer(f)


class H2Connection:
    """HTTP/2 over a trio stream, for either role. Use `run()` in a nursery for its lifetime."""

    def __init__(
        self,
        stream: trio.abc.Stream,
        *,
        client_side: bool,
        idle_timeout: float = math.inf,
        max_concurrent_streams: int = MAX_CONCURRENT_STREAMS,
    ) -> None:
        self._stream = stream
        self.client_side = client_side
        config = h2.config.H2Configuration(
            client_side=client_side,
            header_encoding=None,
            validate_inbound_headers=True,
            validate_outbound_headers=True,
        )
        self._h2 = h2.connection.H2Connection(config)
        self._h2.incoming_buffer.__class__ = _BoundedFrameBuffer
        self._h2.incoming_buffer.conn = self._h2  # type: ignore[attr-defined]
        self._max_streams = max_concurrent_streams
        self._idle_timeout = idle_timeout
        self._streams: dict[int, H2Stream] = {}
        self._wake_event = trio.Event()
        self._window_event = trio.Event()
        self._drain_event = trio.Event()
        self._queued = 0
        self.closed = False
        self.close_reason: str | None = None
        self.peer_reason: str | None = None
        """Why the peer ended the connection, in its words (a GOAWAY's debug data), if it said."""
        self._closed_event = trio.Event()
        self._flushed = trio.Event()
        self._last_activity = trio.current_time()
        self._ping_acked = trio.Event()
        self._silence_limit = math.inf
        self._silence_reason = ""
        self._watch_changed = trio.Event()
        self.ping_interval = math.inf
        """keepalive(): seconds between PINGs (end_when_silent's peer asks for more of them)."""
        self._stream_slots = trio.Semaphore(max_concurrent_streams)
        self.bytes_received = 0

    # --- lifecycle ------------------------------------------------------------------------------
    def start(self) -> None:
        """Queue the connection preface and our settings (the gotcha of STACK-NOTES §1.8: settings
        are sent with update_settings after initiate_connection, so h2 raises its own limits only
        once the peer acknowledges them)."""
        self._h2.initiate_connection()
        s = h2.settings.SettingCodes
        settings: dict[h2.settings.SettingCodes | int, int] = {
            s.INITIAL_WINDOW_SIZE: STREAM_WINDOW,
            s.MAX_FRAME_SIZE: MAX_FRAME,
            s.MAX_CONCURRENT_STREAMS: self._max_streams,
            s.MAX_HEADER_LIST_SIZE: MAX_HEADER_LIST,
        }
        if self.client_side:
            settings[s.ENABLE_PUSH] = 0
        self._h2.update_settings(settings)
        self._h2.increment_flow_control_window(CONNECTION_WINDOW - 65535)
        self._wake()

    async def run(self, handler: Handler | None = None, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Read and write until the connection ends. A server passes `handler`, run once per
        request in a task of its own (cancelled if the peer resets the stream)."""
        self.start()
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                nursery.start_soon(self._writer)
                if math.isfinite(self._idle_timeout):
                    nursery.start_soon(self._idle_watchdog)
                task_status.started()
                await self._reader(nursery, handler)
                # Reader done: the peer closed; let the writer flush what is left, briefly.
                with trio.move_on_after(1):
                    await self._wait_flushed()
                nursery.cancel_scope.cancel()
        finally:
            self._mark_closed(self.close_reason or "connection closed")
            with trio.CancelScope(shield=True), trio.move_on_after(0.5):
                try:
                    await self._stream.aclose()
                except (trio.BrokenResourceError, trio.ClosedResourceError, OSError, ssl.SSLError):
                    pass

    async def close(self, code: int = h2.errors.ErrorCodes.NO_ERROR, *, grace: float = 1.0, why: str = "") -> None:
        """Send GOAWAY (its debug data: `why`, for the peer to show), give the writer `grace`
        seconds to flush it, and stop."""
        if not self.closed:
            try:
                self._h2.close_connection(error_code=code, additional_data=why.encode()[:GOAWAY_TEXT] or None)
            except h2.exceptions.H2Error:
                pass
            self._wake()
            with trio.move_on_after(grace):
                await self._wait_flushed()
        self._mark_closed("closed locally")
        if hasattr(self, "_nursery"):
            self._nursery.cancel_scope.cancel()

    def end_when_silent(self, limit: float, why: str) -> None:
        """Server: end the connection, open streams or not, once nothing at all (not even a
        PING) came from the peer for `limit` seconds; the GOAWAY says `why`. For a peer that
        promised to ping within it (protocol.FEATURE_SILENCE)."""
        self._silence_limit = limit
        self._silence_reason = why
        self._watch_changed.set()

    async def ended_for_silence(self) -> bool:
        """Server: a request's body stopped coming; True if the peer as a whole went silent (it
        missed a PING it promised, end_when_silent) and the connection is now ended for that,
        as the watchdog would end it at its silence limit. So a frozen client hears why its
        session ended, not that one body stopped: both timers run out at the same time, and
        which answer it read first was a race (CI)."""
        if self.closed or not math.isfinite(self._silence_limit):
            return self.closed
        if trio.current_time() - self._last_activity < self._silence_limit / 2:
            return False  # it still pings: only this body stopped
        last = self._last_activity
        with trio.move_on_at(last + self._silence_limit):
            await self.wait_closed()
        if self._last_activity == last and not self.closed:
            await self._end_silent()
        return self.closed

    async def _end_silent(self) -> None:
        log.info("closing a connection: %s", self._silence_reason)
        await self.close(why=self._silence_reason)

    async def _idle_watchdog(self) -> None:
        # Not a timeout around receive_some: cancelling a read can break an SSLStream.
        late = 0.0
        while not self.closed:
            if late > OVERSLEPT:
                # This process was stopped (SIGSTOP, a suspend): the peer's silence is ours, and
                # what it sent meanwhile waits to be read. Judge again once the reader had a turn.
                late = await self._nap(0.5)
                continue
            now = trio.current_time()
            idle_for = now - self._last_activity
            if idle_for >= self._silence_limit:
                await self._end_silent()
                return
            if idle_for >= self._idle_timeout and not self._streams:
                log.info("closing a connection idle for %.0f s", idle_for)
                await self.close()
                return
            late = await self._nap(min(max(1.0, self._idle_timeout - idle_for), max(0.05, self._silence_limit - idle_for)))

    async def _nap(self, wait: float) -> float:
        """The timer of the watchdog (daemon) or the keepalive (client): sleep `wait` s, or
        less if the limits changed (end_when_silent, ping_within). Returns how late it woke (0
        when woken early): long late means this process was stopped (OVERSLEPT)."""
        due = self.timer_due = trio.current_time() + wait
        with trio.move_on_after(wait):
            await self._watch_changed.wait()
            self._watch_changed = trio.Event()
            return 0.0
        late = trio.current_time() - due
        self.stopped_for = max(self.stopped_for, late)
        return late

    def _mark_closed(self, reason: str) -> None:
        if self.closed:
            return
        self.closed = True
        self.close_reason = reason
        self._closed_event.set()
        for st in list(self._streams.values()):
            st._notify()
            if st.cancel_scope is not None:
                st.cancel_scope.cancel()
        self._window_event.set()
        self._drain_event.set()
        self._wake_event.set()
        self._flushed.set()
        self._ping_acked.set()

    async def wait_closed(self) -> None:
        await self._closed_event.wait()

    def _check_open(self) -> None:
        if self.closed:
            raise StreamClosed(self.close_reason or "connection closed")

    # --- writer ---------------------------------------------------------------------------------
    def _wake(self) -> None:
        self._wake_event.set()

    async def _writer(self) -> None:
        while True:
            self._wake_event = trio.Event()
            data = self._h2.data_to_send()
            if data:
                try:
                    # Piece by piece, each with the timeout: a slow link that keeps taking bytes
                    # is progress, a peer that takes none for WRITE_TIMEOUT is stalled.
                    view = memoryview(data)
                    while view:
                        with trio.fail_after(WRITE_TIMEOUT):
                            await self._stream.send_all(view[:WRITE_PIECE])
                        view = view[WRITE_PIECE:]
                except trio.TooSlowError:
                    self._mark_closed(f"the peer read nothing for {WRITE_TIMEOUT:g} s")
                    self._nursery.cancel_scope.cancel()
                    return
                except (trio.BrokenResourceError, trio.ClosedResourceError, OSError, ssl.SSLError) as exc:
                    self._mark_closed(f"connection lost while sending: {_why(exc)}")
                    self._nursery.cancel_scope.cancel()
                    return
                self._queued = max(0, self._queued - len(data))
                self._drain_event.set()
                self._drain_event = trio.Event()
                continue
            self._flushed.set()
            if self.closed:
                return
            await self._wake_event.wait()

    async def _wait_flushed(self) -> None:
        """Wait until the writer has sent everything queued so far (or the connection closed)."""
        self._flushed = trio.Event()
        self._wake()
        await self._flushed.wait()

    async def _send_data(self, st: H2Stream, data: bytes | memoryview, end: bool) -> None:
        view = memoryview(data)
        while True:
            self._check_open()
            if st._reset is not None:
                raise StreamClosed(f"stream reset by the peer (code {st._reset})")
            if not view:
                if end:
                    self._h2.end_stream(st.id)
                    st._local_ended = True
                    self._wake()
                return
            while self._queued > HIGH_WATER and not self.closed:
                await self._drain_event.wait()
            try:
                window = self._h2.local_flow_control_window(st.id)
            except h2.exceptions.StreamClosedError:
                raise StreamClosed("stream closed") from None
            size = min(window, self._h2.max_outbound_frame_size, len(view))
            if size <= 0:
                event = self._window_event
                with trio.move_on_after(WRITE_TIMEOUT) as cs:
                    await event.wait()
                if cs.cancelled_caught:
                    raise StallError(f"stream {st.id}: the peer opened no window", WRITE_TIMEOUT)
                continue
            chunk = bytes(view[:size])
            view = view[size:]
            try:
                self._h2.send_data(st.id, chunk, end_stream=end and not view)
            except h2.exceptions.StreamClosedError:  # the peer answered early and closed it
                raise StreamClosed("stream closed") from None
            self._queued += size
            self._wake()
            if end and not view:
                st._local_ended = True
                return

    def _acknowledge(self, stream_id: int, flow_len: int) -> None:
        if flow_len and not self.closed:
            try:
                self._h2.acknowledge_received_data(flow_len, stream_id)
            except h2.exceptions.H2Error:
                return
            self._wake()

    # --- reader ---------------------------------------------------------------------------------
    async def _reader(self, nursery: trio.Nursery, handler: Handler | None) -> None:
        while not self.closed:
            try:
                data = await self._stream.receive_some(READ_SIZE)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError, ssl.SSLError) as exc:
                self._mark_closed(f"connection lost: {_why(exc)}")
                return
            if not data:
                self._mark_closed("the peer closed the connection")
                return
            self.bytes_received += len(data)
            self._last_activity = trio.current_time()
            try:
                events = self._h2.receive_data(data)
            except h2.exceptions.ProtocolError as exc:
                log.info("HTTP/2 protocol error from the peer: %s", exc)
                self._wake()  # h2 queued a GOAWAY
                with trio.move_on_after(0.5):
                    await self._wait_flushed()
                self._mark_closed(f"HTTP/2 protocol error: {exc}")
                return
            for ev in events:
                self._dispatch(ev, nursery, handler)
            self._wake()

    def _dispatch(self, ev: h2.events.Event, nursery: trio.Nursery, handler: Handler | None) -> None:
        if isinstance(ev, h2.events.RequestReceived):
            if handler is None or ev.stream_id is None:
                self._h2.reset_stream(ev.stream_id, h2.errors.ErrorCodes.REFUSED_STREAM)
                return
            st = H2Stream(self, ev.stream_id)
            st.headers = list(ev.headers or [])
            st.headers_received.set()
            self._streams[ev.stream_id] = st
            if ev.stream_ended is not None:
                st._on_end()
            nursery.start_soon(self._run_handler, handler, st)
        elif isinstance(ev, h2.events.ResponseReceived):
            st2 = self._streams.get(ev.stream_id or 0)
            if st2 is not None:
                st2.headers = list(ev.headers or [])
                st2.headers_received.set()
                if ev.stream_ended is not None:
                    st2._on_end()
        elif isinstance(ev, h2.events.DataReceived):
            sid = ev.stream_id or 0
            st3 = self._streams.get(sid)
            flow = ev.flow_controlled_length or 0
            if st3 is None:
                self._acknowledge(sid, flow)
            else:
                st3._on_data(ev.data or b"", flow)
                if ev.stream_ended is not None:
                    st3._on_end()
        elif isinstance(ev, h2.events.StreamEnded):
            st4 = self._streams.get(ev.stream_id or 0)
            if st4 is not None:
                st4._on_end()
        elif isinstance(ev, h2.events.StreamReset):
            st5 = self._streams.get(ev.stream_id or 0)
            if st5 is not None:
                st5._on_reset(int(ev.error_code or 0))
            self._window_event.set()
            self._window_event = trio.Event()
        elif isinstance(ev, (h2.events.WindowUpdated, h2.events.RemoteSettingsChanged)):
            self._window_event.set()
            self._window_event = trio.Event()
        elif isinstance(ev, h2.events.PingAckReceived):
            self._ping_acked.set()
        elif isinstance(ev, h2.events.ConnectionTerminated):
            why = (ev.additional_data or b"")[:GOAWAY_TEXT].decode("utf-8", "replace")
            why = "".join(c if c.isprintable() else "?" for c in why)
            if why:
                self.peer_reason = why
            self._mark_closed(f"the peer ended the connection: {why}" if why else f"the peer ended the connection (GOAWAY, code {ev.error_code})")
        # TrailersReceived, SettingsAcknowledged, PingReceived (h2 answers it), PriorityUpdated,
        # UnknownFrameReceived: nothing to do.

    async def _run_handler(self, handler: Handler, st: H2Stream) -> None:
        try:
            with trio.CancelScope() as scope:
                st.cancel_scope = scope
                if st._reset is not None or self.closed:
                    return
                await handler(st)
        except StreamClosed:
            pass
        except Exception:
            log.exception("handler for stream %d failed", st.id)
            st.reset(h2.errors.ErrorCodes.INTERNAL_ERROR)
        finally:
            self._streams.pop(st.id, None)
            if not (st._local_ended and st._ended) and st._reset is None:
                st.reset(h2.errors.ErrorCodes.NO_ERROR if st._local_ended else h2.errors.ErrorCodes.CANCEL)
            # Give back the connection credit of anything the handler did not read.
            while st._chunks:
                _data, flow = st._chunks.popleft()
                self._acknowledge(st.id, flow)

    # --- client side ----------------------------------------------------------------------------
    @asynccontextmanager
    async def open_stream(self, headers: Headers, *, end: bool = False) -> AsyncIterator[H2Stream]:
        """Start a request; the stream is reset if the block exits before both sides ended."""
        async with self._stream_slots:
            self._check_open()
            sid = self._h2.get_next_available_stream_id()
            st = H2Stream(self, sid)
            self._streams[sid] = st
            try:
                self._h2.send_headers(sid, headers, end_stream=end)
                st._local_ended = end
                self._wake()
                yield st
            finally:
                self._streams.pop(sid, None)
                if not (st._local_ended and st._ended) and st._reset is None:
                    st.reset()
                while st._chunks:
                    _d, flow = st._chunks.popleft()
                    self._acknowledge(sid, flow)

    async def wait_response(self, st: H2Stream, timeout: float) -> None:
        with trio.move_on_after(timeout) as cs:
            while st.headers is None:
                if st._reset is not None:
                    raise StreamClosed(f"stream reset by the peer (code {st._reset})")
                if self.closed:
                    raise StreamClosed(self.close_reason or "connection closed")
                await st._changed.wait()
        if cs.cancelled_caught:
            raise StallError("control request", timeout)

    async def keepalive(self, interval: float, timeout: float) -> None:
        """Ping the peer every `interval` s; a peer from which nothing at all (not even a PING
        ack) arrived for `timeout` s closes the connection, and its waiting requests fail with
        StallError. Measured from the last byte received, so a peer that froze is noticed
        `timeout` s after its last word, whatever the ping phase."""
        last_ping = -math.inf
        self.ping_interval = interval
        late = 0.0
        while not self.closed:
            now = trio.current_time()
            if late > OVERSLEPT:
                # This process was stopped (SIGSTOP, a suspend): the silence is ours, not the
                # daemon's. What it sent meanwhile (a GOAWAY saying why it ended the session)
                # waits to be read: the daemon gets a fresh `timeout` from now.
                self._last_activity = max(self._last_activity, now)
            silent = now - self._last_activity
            if silent >= timeout:
                self.stalled = True
                self.stalled_for = timeout
                self._mark_closed(f"the daemon answered nothing for {timeout:g} s")
                return
            if now - last_ping >= self.ping_interval:
                try:
                    self._h2.ping(b"blitping")
                except h2.exceptions.H2Error:
                    return
                self._wake()
                last_ping = now
            late = await self._nap(min(self.ping_interval - (now - last_ping), timeout - silent))

    def ping_within(self, seconds: float, limit: float) -> None:
        """Client: ping at least every `seconds` from now on, the daemon's silence limit being
        `limit`."""
        self.silence_limit = limit
        if seconds < self.ping_interval:
            self.ping_interval = seconds
            self._watch_changed.set()

    stalled = False
    stalled_for = 0.0
    stopped_for = 0.0
    """_nap: the longest its timer woke late (this process stopped, or very busy)."""
    timer_due = math.inf
    """_nap: when the timer is due (a timer long overdue: this process was stopped)."""
    silence_limit = math.inf
    """Client: the daemon's silence limit (HelloReply.silence_ms), once known."""


# =================================================================================================
# The client


@contextmanager
def collapse_groups() -> Iterator[None]:
    """Re-raise the single real exception of a nursery's ExceptionGroup unwrapped, so callers of
    our context managers see `RemoteError`, not a group. Several FatalErrors are one: tasks
    that each noticed the destination fill up (a pull's receive loops and its watcher, R40);
    the first is raised. Other groups of several errors, or of cancellations only, pass through
    unchanged."""
    try:
        yield
    except BaseExceptionGroup as group:
        real = [e for e in leaves(group) if not isinstance(e, trio.Cancelled)]
        if len(real) == 1 or (real and all(isinstance(e, FatalError) for e in real)):
            raise real[0] from None
        raise


def _request_headers(authority: str, path: str, extra: Headers = ()) -> Headers:  # type: ignore[assignment]
    return [
        (b":method", b"POST"),
        (b":scheme", b"https"),
        (b":authority", authority.encode()),
        (b":path", path.encode()),
        (b"content-type", protocol.CONTENT_TYPE),
        *extra,
    ]


class ControlClient:
    """A session with one daemon over one HTTP/2 connection. Use `connect_control()`."""

    def __init__(self, conn: H2Connection, authority: str, request_timeout: float, fingerprint: str | None) -> None:
        self.conn = conn
        self.authority = authority
        self.request_timeout = request_timeout
        self.fingerprint = fingerprint
        self.address: str | None = None
        """The IP address the connection reached (data streams go there, not to a new lookup)."""
        self.session = protocol.ClientSession(software=_software())
        self.peer: protocol.HelloReply | None = None

    async def call(self, msg: protocol.Message, *, timeout: float | None = None) -> Any:
        """Send one request and return its reply message.

        Raises:
            RemoteError: the daemon refused. StallError: no answer in time.
            TransportError: the connection failed.
        """
        path, body = self.session.request(msg)
        op = path.removeprefix(protocol.PATH_PREFIX)
        timeout = self.request_timeout if timeout is None else timeout
        continued = CONTINUED[0]
        try:
            with trio.move_on_after(timeout) as cs:
                async with self.conn.open_stream(_request_headers(self.authority, path)) as st:
                    await st.send_data(body, end=True)
                    await self.conn.wait_response(st, math.inf)
                    status = int((st.header(b":status") or b"0").decode() or 0)
                    reply = await st.read_body(protocol.MAX_MESSAGE)
            if cs.cancelled_caught:
                late = trio.current_time() - cs.deadline
                if stopped_meanwhile(late, continued):
                    raise await self._stopped_during(op, timeout, late) from None
                raise daemon_stalled(self.authority, f"no answer to {op}", timeout)
        except StreamClosed as exc:
            if self.conn.stalled:
                raise daemon_stalled(self.authority, "nothing received", self.conn.stalled_for) from None
            raise TransportError(f"{op} to {self.authority}: {exc}") from None
        if status == 408:
            # The daemon's wait for the body ran out: if this process was stopped meanwhile, its
            # wait for a silent client did too, and that is what happened (CI: the 408 came
            # before the GOAWAY).
            ended = await self.ended_by_daemon(wait=1.0)
            if ended is not None:
                raise ended
        return self.session.reply(type(msg), status, reply)

    async def _stopped_during(self, op: str, timeout: float, late: float) -> TransportError:
        """The error of a request whose `timeout` ran out while this process was stopped
        (SIGSTOP, a suspend), `late` s past its deadline (the stop was at least that long):
        not the daemon's silence. If the daemon ended the session meanwhile (a client stopped
        before its hello: the daemon's hello timeout), its GOAWAY says why."""
        ended = await self.ended_by_daemon(wait=1.0, stopped=late)
        if ended is not None:
            if self.conn.peer_reason is None:  # its reason did not get through; the stop says it
                return ended
            return TransportError(f"{ended} (this process was stopped meanwhile)")
        return TransportError(
            f"{op} to {self.authority}: no answer read: this process was stopped while it waited "
            f"for one (it waits {timeout:g} s)"
        )

    async def ended_by_daemon(self, wait: float, stopped: float = 0.0) -> TransportError | None:
        """The daemon ended this session and said why (at most `wait` s for its GOAWAY to be
        read), or this process was stopped (at least `stopped` s, if the caller knows) for
        longer than the daemon's silence limit: "daemon HOST:PORT ended the session: WHY".
        None otherwise."""
        if self.conn.peer_reason is None and wait > 0:
            with trio.move_on_after(wait):
                await self.conn.wait_closed()
        if self.conn.peer_reason is not None:
            return TransportError(f"daemon {self.authority} ended the session: {self.conn.peer_reason}")
        stopped = max(stopped, self.conn.stopped_for, trio.current_time() - self.conn.timer_due)
        if stopped >= self.conn.silence_limit:
            # Its GOAWAY did not get through (a full pipe of data over HTTP/2), but this process
            # was stopped for longer than the daemon waits for a silent client.
            return TransportError(
                f"daemon {self.authority} ended the session: this process was stopped for "
                f"{stopped:.0f} s, longer than the daemon waits for a silent client "
                f"({self.conn.silence_limit:g} s)"
            )
        return None

    @asynccontextmanager
    async def data_stream(self, token: bytes) -> AsyncIterator[H2Stream]:
        """An HTTP/2 stream carrying data frames (the fallback), admitted by `token`."""
        headers = _request_headers(self.authority, protocol.DATA_PATH, [(protocol.TOKEN_HEADER, token.hex().encode())])
        async with self.conn.open_stream(headers) as st:
            st.widen_window(DATA_STREAM_WINDOW)
            yield st


CONTINUED = [0]
"""How many times this process was continued (SIGCONT after SIGSTOP or Ctrl-Z): a request
whose timer ran out across a change of it was stopped, not left unanswered (watch_continue)."""


def stopped_meanwhile(late: float, continued: int) -> bool:
    """This process was stopped while a timer ran: it woke `late` s past its deadline by more
    than OVERSLEPT, or a SIGCONT came since CONTINUED read `continued`."""
    return late > OVERSLEPT or CONTINUED[0] != continued


def watch_continue() -> None:
    """Count SIGCONTs in CONTINUED (once; the main thread; a handler someone else installed
    is left alone). A stop longer than a request's timeout may end less than OVERSLEPT past
    its deadline (a client stopped 12 s at its 10 s hello)."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGCONT) is not signal.SIG_DFL:
        return

    def continued(signum: int, frame: Any) -> None:
        CONTINUED[0] += 1

    signal.signal(signal.SIGCONT, continued)


def daemon_stalled(authority: str, what: str, seconds: float) -> StallError:
    """The one-line error for a daemon that stopped making progress:
    "daemon HOST:PORT stopped responding: WHAT for N s"."""
    return StallError(f"daemon {authority}", seconds, message=f"daemon {authority} stopped responding: {what} for {seconds:g} s")


def _software() -> str:
    try:
        from .. import __version__

        return f"blit {__version__}"
    except Exception:
        return "blit"


async def _connect_first(addresses: Sequence[str], port: int, stagger: float = 0.25) -> trio.SocketStream:
    """TCP to the first of `addresses` (IP literals: no lookup) that answers; the next attempt
    starts when the previous one failed or after `stagger` seconds (trio's happy eyeballs).

    Raises:
        OSError: every attempt failed (the first one's error).
    """
    won: list[trio.SocketStream] = []
    errors: list[OSError] = []

    async def attempt(addr: str, failed: trio.Event) -> None:
        try:
            stream = await trio.open_tcp_stream(addr, port)
        except OSError as exc:
            errors.append(exc)
            failed.set()
            return
        if won:
            stream.socket.close()
            return
        won.append(stream)
        nursery.cancel_scope.cancel()

    async with trio.open_nursery() as nursery:
        for addr in addresses:
            failed = trio.Event()
            nursery.start_soon(attempt, addr, failed)
            with trio.move_on_after(stagger):
                await failed.wait()
    if won:
        return won[0]
    raise errors[0]


async def _close_quietly(stream: trio.abc.AsyncResource) -> None:
    """Close `stream` on the way out of a failure (shielded, at most 0.5 s, errors ignored)."""
    with trio.CancelScope(shield=True), trio.move_on_after(0.5):
        try:
            await stream.aclose()
        except Exception:
            pass


class _TimedOut(ConnectError):
    """A connect or TLS handshake that ran out of time, its timer `late` s past its deadline
    when it woke (connect_control may try again)."""

    def __init__(self, message: str, late: float) -> None:
        super().__init__(message)
        self.late = late


async def _open_transport(
    host: str,
    port: int,
    netloc: str,
    *,
    tls_enabled: bool,
    known_hosts: Path | None,
    connect_timeout: float,
    addresses: Sequence[str] | None,
) -> tuple[trio.abc.Stream, str, str | None]:
    """TCP to the daemon and, with TLS, the handshake and the pin check: (stream, the daemon's
    address, the certificate's fingerprint or None). Closes what it opened if it fails.

    Raises:
        ConnectError (_TimedOut when a timer ran out), CertificateMismatchError.
    """
    tcp: trio.SocketStream | None = None
    try:
        with trio.move_on_after(connect_timeout) as cs:
            tcp = await (_connect_first(addresses, port) if addresses else trio.open_tcp_stream(host, port))
        if tcp is None:
            late = trio.current_time() - cs.deadline
            raise _TimedOut(f"cannot reach the daemon at {netloc}: no answer in {connect_timeout:g} s", late)
    except OSError as exc:
        # trio's "all attempts to connect ... failed" carries the real reasons as its cause.
        cause = exc.__cause__
        if isinstance(cause, BaseExceptionGroup) and cause.exceptions:
            cause = cause.exceptions[0]
        why = exc.strerror or getattr(cause, "strerror", None) or exc
        raise ConnectError(f"cannot reach the daemon at {netloc}: {why}") from None
    stream: trio.abc.Stream = tcp
    fp: str | None = None
    try:
        try:
            address = str(tcp.socket.getpeername()[0])
        except OSError:  # the peer accepted and closed at once (a daemon at its connection limit)
            raise ConnectError(f"the daemon at {netloc} closed the connection at once (it may be busy: too many connections)") from None
        if tls_enabled:
            ssl_stream = trio.SSLStream(tcp, tls.client_context(), server_hostname=None)
            try:
                with trio.move_on_after(connect_timeout) as cs:
                    await ssl_stream.do_handshake()
                if cs.cancelled_caught:
                    raise _TimedOut(f"TLS handshake with {netloc} timed out", trio.current_time() - cs.deadline)
            except (trio.BrokenResourceError, ssl.SSLError, OSError) as exc:
                cause = exc.__cause__ or exc
                if "EOF" in str(cause) or isinstance(cause, ConnectionResetError):  # closed before a word: at its limit, or cleartext
                    raise ConnectError(
                        f"the daemon at {netloc} closed the connection during the TLS handshake: it may "
                        f"be busy (too many connections), or running without TLS (then pass --no-tls)"
                    ) from None
                raise ConnectError(
                    f"TLS handshake with {netloc} failed ({cause}); is the daemon running without "
                    f"TLS (then pass --no-tls)?"
                ) from None
            der = ssl_stream.getpeercert(binary_form=True)
            if not der:
                raise ConnectError(f"{netloc} presented no certificate")
            fp = tls.fingerprint(der)
            pins = tls.KnownHosts(known_hosts or tls.default_known_hosts())
            if not pins.check(netloc, fp):
                log.warning("pinned the TLS certificate of %s (%s) on first use", netloc, fp)
            if ssl_stream.selected_alpn_protocol() != tls.ALPN:
                raise ConnectError(f"{netloc} does not speak HTTP/2 over TLS (ALPN)")
            stream = ssl_stream
    except BaseException:
        await _close_quietly(stream)
        raise
    return stream, address, fp


@asynccontextmanager
async def connect_control(
    host: str,
    port: int,
    *,
    tls_enabled: bool = True,
    known_hosts: Path | None = None,
    connect_timeout: float = 10.0,
    request_timeout: float = 60.0,
    keepalive: float = 10.0,
    addresses: Sequence[str] | None = None,
) -> AsyncIterator[ControlClient]:
    """Connect to a daemon, check its certificate pin, say hello, and yield the session.
    `addresses`: the IP addresses of `host` to try, in order, instead of looking the name up
    (a caller that checked them, decisions R35); pins and messages still name `host`.

    Raises:
        ConnectError: unreachable, TLS failure, or refused at hello.
        CertificateMismatchError: the certificate differs from the pinned one.
        IncompatiblePeerError: the daemon speaks another protocol version.
    """
    netloc = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    watch_continue()
    for attempt in (1, 2):
        continued = CONTINUED[0]
        try:
            stream, address, fp = await _open_transport(
                host, port, netloc, tls_enabled=tls_enabled, known_hosts=known_hosts,
                connect_timeout=connect_timeout, addresses=addresses,
            )
        except ConnectError as exc:
            # Stopped (SIGSTOP, Ctrl-Z) while it connected: its timer ran out across the stop,
            # or the daemon let the half-made connection go meanwhile; not the daemon's fault.
            # Once more, from the start.
            late = exc.late if isinstance(exc, _TimedOut) else 0.0
            if attempt == 2 or isinstance(exc, CertificateMismatchError) or not stopped_meanwhile(late, continued):
                raise
            log.debug("connecting to %s again: this process was stopped while it connected", netloc)
            continue
        try:
            async with _session(stream, netloc, address, fp, tls_enabled, connect_timeout, request_timeout, keepalive, attempt, continued) as client:
                yield client
            return
        except _HelloAgain:
            log.debug("saying hello to %s again: this process was stopped while it did", netloc)


class _HelloAgain(Exception):
    """The daemon closed a connection whose hello was under way while this process was stopped
    (a full daemon ends the oldest connections without a hello, decisions R57): once more."""


@asynccontextmanager
async def _session(
    stream: trio.abc.Stream, netloc: str, address: str, fp: str | None, tls_enabled: bool, connect_timeout: float,
    request_timeout: float, keepalive: float, attempt: int, continued: int,
) -> AsyncIterator[ControlClient]:
    """The HTTP/2 connection over `stream` and its hello (connect_control)."""
    try:
        conn = H2Connection(stream, client_side=True)
        with collapse_groups():
            async with trio.open_nursery() as nursery:
                await nursery.start(conn.run)
                if keepalive:
                    nursery.start_soon(conn.keepalive, keepalive, max(request_timeout, keepalive * 2))
                client = ControlClient(conn, netloc, request_timeout, fp)
                client.address = address
                try:
                    try:
                        hello_reply = await client.call(client.session.hello(), timeout=connect_timeout)
                    except TransportError as exc:
                        if isinstance(exc, (StallError,)) or "closed" in str(exc) or "lost" in str(exc):
                            if attempt == 1 and not isinstance(exc, StallError) and stopped_meanwhile(0.0, continued):
                                raise _HelloAgain() from None
                            hint = (
                                " (the daemon may expect TLS: drop --no-tls; or it may be busy: too many connections)"
                                if not tls_enabled
                                else " (it may be busy: too many connections)"
                            )
                            raise ConnectError(f"the daemon at {netloc} did not complete the hello: {exc}{hint}") from None
                        raise
                    client.peer = hello_reply
                    if hello_reply.silence_ms and keepalive:  # R53: the daemon ends a silent session
                        limit = hello_reply.silence_ms / 1000
                        conn.ping_within(limit / protocol.SILENCE_PINGS, limit)
                    try:
                        yield client
                    except BaseException as exc:
                        # A stream or request broke: if the daemon ended the session and said
                        # why (a GOAWAY read just after), that is the run's error.
                        real = [e for e in leaves(exc) if not isinstance(e, trio.Cancelled)]
                        if real and all(isinstance(e, TransportError) for e in real):
                            ended = await client.ended_by_daemon(wait=0.5)
                            if ended is not None:
                                raise ended from None
                        raise
                finally:
                    with trio.CancelScope(shield=True):
                        await conn.close(grace=0.5)
                    nursery.cancel_scope.cancel()
    except BaseException:
        await _close_quietly(stream)
        raise


def _why(exc: BaseException) -> str:
    """What broke a connection, in words: trio's errors often carry none of their own (a peer
    that died resets the connection), their cause does."""
    text = str(exc) or str(exc.__cause__ or exc.__context__ or "")
    return text or "the peer reset the connection"
