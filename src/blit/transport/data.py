"""The data plane: one-time stream tokens, raw TCP data streams, and the HTTP/2 fallback.

A transfer's files travel as data frames (`protocol.FrameType`) on one or more streams. Raw
streams are connected by the client to the daemon's data port and admitted by a one-time token
(`GrantTable`: 192-bit secret, constant-time compare, single use, short expiry). The frames on a
raw stream are moved by ONE worker thread per stream, entered once per stream (STACK-NOTES §2):
the sender uses `os.sendfile` (plain TCP); the receiver `splice`s socket -> pipe -> file. Small
files go header + data + END in one `sendmsg`. No thread hop per chunk. With TLS on, a stream is
the same blocking socket carrying sealed records (`seal`, decisions R67: AES-128-GCM keyed from
the token's secret): the sender `preadv`s the file straight into a record, seals it in place and
sends 256 KiB at a time; the receiver reads what the socket holds into the record buffer, opens
the whole records into its frame buffer and writes a buffer-full per `pwrite` (the path that
also serves where splice is not supported). A client before sealed streams still gets a TLS
session per stream (`tlsbio`, records sealed and opened through memory BIOs).

When the data port cannot be reached (or `--force-h2-data`), the same frames travel in the body
of an HTTP/2 stream (`POST /blit/data`, token in a header); those loops run in trio and hop to a
thread once per file open and per multi-MiB batch of writes.

Files are named by the small integer ids the control plane agreed on; what a file id means, and
how a file is opened or landed, is the caller's business (`FileSource`, `FileSink`).

Stall detection: every blocking socket wait in a worker thread is bounded by the stall timeout,
through the kernel's socket timeouts, TLS or not (a network stall raises `StallError` in the
thread); a trio-side watchdog also checks each stream's progress (frames, file bytes, and bytes
through the socket, so a slow link inside a 16 MiB frame is not a stall; a stuck disk is), and
kicks the thread (socket shutdown) on cancellation or stall; a thread still stuck after that is
stuck on this machine (`StallError.local`). Senders send NOOP heartbeats while they wait for
work, so an idle stream is not a stalled one.

This module must not decide what to transfer or where files land.
"""

from __future__ import annotations

import collections
import errno
import hmac
import logging
import math
import mmap
import os
import secrets
import socket
import ssl
import struct
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NoReturn, Protocol, TypeVar

import trio

from ..errors import FATAL_ERRNOS, ConnectError, FatalError, RemoteProtocolError, StallError, TokenRefused, TransportError
from ..fsops import CHANGED_SIZE
from . import protocol
from .buffers import anonymous
from .protocol import FRAME_SIZE, AdmitStatus, ErrorCode, FrameType, Refused, pack_frame
from .tlsbio import TLSBio

if TYPE_CHECKING:  # seal.py imports `cryptography` (~50 ms): only once a sealed stream opens
    from .seal import SealedChannel

    Records = SealedChannel | TLSBio
    """A stream's records, sealed and opened in memory: both have the same calls (seal.py)."""

log = logging.getLogger("blit.data")

DEFAULT_STALL = 60.0
"""Seconds without progress after which a data stream is declared stalled."""
HEARTBEAT = 5.0
"""A sender with nothing to send emits a NOOP this often."""
TAKE = 64
"""File ids a sender takes from the queue at a time (one `frame_small` call for the small ones)."""
TOKEN_TTL = 30.0
"""Seconds a granted token stays valid."""
ADMIT_TIMEOUT = 10.0
FRAME_CHUNK = 16 << 20
"""Largest DATA frame a raw sender emits (one sendfile call range)."""
SMALL_FILE = 256 << 10
"""Files up to this size go header + data + END in one sendmsg."""
LAND_BATCH = 256
"""Most whole small files a receiver lands in one call (those already in its buffer)."""
PIPE_SIZE = 1 << 20
RECV_BUFFER = 1 << 20
"""The receiver's read buffer: many small frames per recv()."""


SPLICE_MIN = 256 << 10
"""Payload rests at least this large are spliced; smaller ones go through the buffer."""
BATCH_BYTES = 256 << 10
"""Small files are gathered into one sendmsg() up to this many bytes (or IOV_BATCH buffers)."""
IOV_BATCH = 512
SEND_PIECE = 256 << 10
"""Largest send() call (cleartext or TLS ciphertext): a sender counts its progress this often."""
SEND_WAIT = 1.0
"""A blocked send wakes this often to check for the stall timeout (see StreamIO)."""
READ_CHUNK = 1 << 20
"""Bytes of a file read, sealed and sent at a time when sendfile cannot be used (TLS)."""
LOWAT = 256 << 10
"""TLS receiver inside a large payload: the socket wakes it once this much ciphertext is
queued (SO_RCVLOWAT), not at every arrival: on loopback each wake-up pulled the receiver onto
the sender's CPU (2 GiB pull 3.24 s -> 2.28 s, decisions.md R34)."""
LOWAT_MIN = 64 << 10
"""Needs smaller than this (small files, frame headers) wait for the first byte, as before."""
LOWAT_SLOW = 1.0
"""A receive that waited this long for its low mark turns the mark off for the stream (a slow
link: the receiver wakes at every arrival again)."""
H2_CHUNK = 4 << 20
"""Bytes read per thread hop by the HTTP/2 fallback sender."""
H2_WRITE_BATCH = 8 << 20
"""Bytes the HTTP/2 fallback receiver gathers before it hops to a thread to write them."""

SPLIT_MIN = 64 << 20
"""A file at least this large, and not sparse, goes in parts over the transfer's raw streams at
once (one part each, FRAME_CHUNK-aligned) when the receiver takes parts (FEATURE_SPLIT): each
stream's thread reads, seals, sends and on the other side receives, opens and writes its part,
so a large file uses as many cores on each end as there are streams (decisions R71)."""
MOST_PARTS = 4
"""Most parts this sender splits a file into (at most one per stream granted; a receiver takes
up to protocol.MAX_PARTS)."""

SHRANK = CHANGED_SIZE
"""The reason a file is aborted when it holds fewer bytes than announced."""

T = TypeVar("T")


# =================================================================================================
# Tokens


@dataclass(slots=True)
class _Grant:
    secret: bytes
    expires: float
    owner: Any


class GrantTable:
    """The daemon's outstanding data-stream tokens.

    A token is `id (8 bytes) || secret (24 bytes)`: the id finds the grant, the secret is compared
    with `hmac.compare_digest`. A grant is removed when its right secret is presented, so a token
    is never accepted twice; a wrong secret leaves it alone. Thread-safe; uses the monotonic clock.
    """

    def __init__(self, ttl: float = TOKEN_TTL, clock: Callable[[], float] = time.monotonic) -> None:
        self.ttl = ttl
        self._clock = clock
        self._grants: dict[bytes, _Grant] = {}
        self._lock = threading.Lock()

    def issue(self, owner: Any) -> bytes:
        tid = secrets.token_bytes(protocol.TOKEN_ID_BYTES)
        secret = secrets.token_bytes(protocol.TOKEN_SECRET_BYTES)
        with self._lock:
            self._purge()
            self._grants[tid] = _Grant(secret, self._clock() + self.ttl, owner)
        return tid + secret

    def secret(self, tid: bytes) -> bytes | None:
        """The secret of the outstanding, unexpired grant `tid` (a sealed stream derives its keys
        from it and must prove it before `redeem`), else None. Nothing is spent."""
        with self._lock:
            grant = self._grants.get(tid)
        if grant is None or self._clock() > grant.expires:
            return None
        return grant.secret

    def redeem(self, token: bytes) -> Any:
        """The owner of a valid token, consuming it.

        Raises:
            Refused(BAD_TOKEN): unknown, already used, wrong secret, or expired.
        """
        if len(token) != protocol.TOKEN_BYTES:
            raise Refused(ErrorCode.BAD_TOKEN, "malformed data token")
        tid, secret = token[: protocol.TOKEN_ID_BYTES], token[protocol.TOKEN_ID_BYTES :]
        with self._lock:
            grant = self._grants.get(tid)
            expected = grant.secret if grant is not None else bytes(protocol.TOKEN_SECRET_BYTES)
            # The secret first (constant time), then spend: knowing a token's id is not enough
            # to burn someone else's token.
            if not hmac.compare_digest(expected, secret) or grant is None:
                raise Refused(ErrorCode.BAD_TOKEN, "unknown or already used data token")
            del self._grants[tid]
        if self._clock() > grant.expires:
            raise Refused(ErrorCode.BAD_TOKEN, "data token expired")
        return grant.owner

    def revoke(self, owner: Any) -> int:
        """Drop every grant of `owner` (its transfer ended); returns how many."""
        with self._lock:
            dead = [tid for tid, g in self._grants.items() if g.owner is owner]
            for tid in dead:
                del self._grants[tid]
        return len(dead)

    def outstanding(self, owner: Any) -> int:
        now = self._clock()
        with self._lock:
            return sum(1 for g in self._grants.values() if g.owner is owner and g.expires >= now)

    def _purge(self) -> None:
        now = self._clock()
        for tid in [t for t, g in self._grants.items() if g.expires < now]:
            del self._grants[tid]


# =================================================================================================
# What a stream moves: the caller's files


class SourceFile(Protocol):
    fd: int
    size: int
    extents: list[tuple[int, int]] | None
    """(offset, length) data regions of a sparse file, or None for the whole file."""

    def close(self) -> None: ...


class FileSource(Protocol):
    def open(self, file_id: int) -> SourceFile:
        """Open file `file_id` for sending (worker thread). Raises OSError (reported per file)."""
        ...

    # Optional: `frame_small(ids) -> Framed | None` reads the small plain files among `ids` into
    # ready frames in one step (worker thread); the rest are then sent through `open`.


@dataclass(slots=True)
class Framed:
    """What a source's `frame_small` made of a batch of file ids."""

    parts: list[bytes] = field(default_factory=list)
    """The frames of the files read (DATA, payload, END each), ready to send."""
    files: int = 0
    nbytes: int = 0
    """Payload bytes in `parts`."""
    frames: int = 0
    rest: list[int] = field(default_factory=list)
    """Ids to send through `open` (large or sparse files)."""
    failed: list[tuple[int, str]] = field(default_factory=list)
    """(id, reason) of files that could not be read: each gets an ABORT frame."""


class SinkFile(Protocol):
    fd: int

    def commit(self, size: int) -> None:
        """The data is complete: give the file its name and metadata (worker thread)."""
        ...

    def abort(self) -> None:
        """Drop the file; leave nothing behind. Never raises."""
        ...


class FileSink(Protocol):
    def open(self, file_id: int) -> SinkFile:
        """Start landing `file_id` (worker thread). Raises OSError (reported per file), or
        KeyError when `file_id` was never announced (a protocol error: the stream is dropped)."""
        ...

    # Optional: `failed(file_id, message, err)` is called (worker thread) for every file that
    # did not land, with the reason and the errno of a local failure (0 for the sender's), when
    # the sink defines it.
    # Optional: `land_many(batch, buf)` lands whole files whose data is all in memory, each in
    # one step (small files: their DATA frame and END are in the receive buffer; `batch` holds
    # file id, offset in `buf` and length each); it returns the (file id, OSError) of those
    # that did not land, and raises KeyError (nothing landed) for an id never announced.


@dataclass
class StreamStats:
    """Progress of one stream, written by its worker, read by trio (plain ints: no lock needed)."""

    what: str = "data stream"
    files: int = 0
    bytes: int = 0
    frames: int = 0
    failures: list[tuple[int, str]] = field(default_factory=list)
    done: bool = False
    on_progress: Callable[[], None] | None = None
    """Called by the trio-side (HTTP/2) loops on each frame, e.g. `StallGuard.progress`; never
    called from a worker thread (those are watched through `progress_mark` instead)."""

    def progress_mark(self) -> tuple[int, int]:
        return (self.frames, self.bytes)

    def tick(self, frames: int = 1, nbytes: int = 0) -> None:
        self.frames += frames
        self.bytes += nbytes
        if self.on_progress is not None:
            self.on_progress()


class _SharedSource:
    """A source file sent in parts by several streams: closed when the last part is sent."""

    __slots__ = ("file", "_refs", "_lock", "_failed")

    def __init__(self, f: SourceFile, refs: int) -> None:
        self.file = f
        self._refs = refs
        self._lock = threading.Lock()
        self._failed = False

    def first_failure(self) -> bool:
        """True for the first part that fails (the file's failure is counted once)."""
        with self._lock:
            first, self._failed = not self._failed, True
        return first

    def release(self) -> None:
        with self._lock:
            self._refs -= 1
            last = self._refs == 0
        if last:
            self.file.close()


@dataclass(slots=True)
class _Part:
    """One part of a file sent in parts: bytes [start, end) of `source`, part `index` of `total`."""

    file_id: int
    source: _SharedSource
    start: int
    end: int
    index: int
    total: int


class JobQueue:
    """File ids waiting to be sent, shared by a transfer's sender streams (thread-safe); and the
    parts of large files waiting for a raw stream (`split`: the receiver takes parts)."""

    EMPTY = -1

    def __init__(self, *, split: int = 1) -> None:
        """`split`: most parts a large file is sent in (the streams granted, when the receiver
        takes parts; 1: never)."""
        self._q: collections.deque[int] = collections.deque()
        self._cv = threading.Condition()
        self._closed = False
        self._parts: collections.deque[_Part] = collections.deque()
        self._split = min(split, MOST_PARTS)
        self.on_split: Callable[[], None] | None = None
        """Called (in the stream's thread) when a file is split: a transfer that connects its
        streams as work comes may want another now."""
        self._raw = 0
        """Raw send loops running (they alone take parts)."""

    @property
    def splits(self) -> bool:
        """Large files may go in parts."""
        return self._split > 1

    def parts_for(self, size: int) -> int:
        """In how many parts to send a file of `size` bytes (1: whole)."""
        if self._split < 2 or size < SPLIT_MIN:
            return 1
        return max(1, min(self._split, size // FRAME_CHUNK))

    def put_parts(self, parts: list[_Part]) -> None:
        with self._cv:
            self._parts.extend(parts)
            self._cv.notify_all()

    def join_raw(self) -> None:
        with self._cv:
            self._raw += 1

    def leave_raw(self) -> None:
        """A raw send loop ended; the last one releases the parts no stream will send (it ends
        normally only once there are none). A loop that ends while another splits a file
        leaves the parts to that one."""
        with self._cv:
            self._raw -= 1
            left = list(self._parts) if not self._raw else []
            if left:
                self._parts.clear()
        for part in left:
            part.source.release()

    def get_work(self, timeout: float, most: int) -> _Part | list[int] | None:
        """A raw send loop's next work: a part waiting, else as `get_many`."""
        with self._cv:
            return self._take(timeout, most, True)

    def put_many(self, ids: Iterable[int]) -> None:
        with self._cv:
            if self._closed:
                raise RuntimeError("queue closed")
            self._q.extend(ids)
            self._cv.notify_all()

    def put_front(self, ids: list[int]) -> None:
        """Give back ids taken but not sent, ahead of the rest (closed or not)."""
        with self._cv:
            self._q.extendleft(reversed(ids))
            self._cv.notify_all()

    def close(self) -> None:
        """No more jobs: senders finish once the queue is drained."""
        with self._cv:
            self._closed = True
            self._cv.notify_all()

    def get(self, timeout: float) -> int | None:
        """The next file id; None when closed and drained; EMPTY after `timeout` s of nothing."""
        ids = self.get_many(timeout, 1)
        return None if ids is None else ids[0] if ids else self.EMPTY

    def get_many(self, timeout: float, most: int) -> list[int] | None:
        """Up to `most` file ids in queue order; None when closed and drained; [] after
        `timeout` s of nothing."""
        with self._cv:
            got = self._take(timeout, most, False)
        assert not isinstance(got, _Part)
        return got

    def _take(self, timeout: float, most: int, parts: bool) -> _Part | list[int] | None:
        """(Holding the lock.) `parts`: a raw loop's call (get_work)."""
        q, pq = self._q, self._parts
        end = time.monotonic() + timeout
        while True:
            if parts and pq:
                return pq.popleft()
            if q:
                return [q.popleft() for _ in range(min(most, len(q)))]
            if self._closed:
                return None
            left = end - time.monotonic()
            if left <= 0:
                return []
            self._cv.wait(left)

    def __len__(self) -> int:
        return len(self._q)


# =================================================================================================
# Blocking socket I/O for one worker thread


class StreamIO:
    """A connected data socket, driven by one worker thread at a time.

    The socket is blocking with its timeouts in the kernel (SO_RCVTIMEO, SO_SNDTIMEO), which
    also bound splice and sendfile: a receive fails after `stall` seconds without a byte; a send
    wakes every SEND_WAIT to check that some bytes went out in the last `stall` seconds (the
    kernel's send timeout is a budget for the whole call, so a call that straddles the moment
    the peer stopped would return its few bytes only after the timeout). A sealed stream
    (`seal.SealedChannel`) or a TLS one (`tlsbio.TLSBio`) is the same socket, its records
    sealed and opened in memory, so its ciphertext goes through the same calls, in large
    pieces. `kick()` (any thread) shuts the socket down to unblock the worker.
    """

    def __init__(
        self, sock: socket.socket, *, records: Records | None = None, what: str, stall: float = DEFAULT_STALL
    ) -> None:
        self.sock = sock
        self.what = what
        self.stall = stall
        self.records = records
        """The stream's records: sealed (seal.SealedChannel), or the older TLS session
        (tlsbio.TLSBio: a daemon before FEATURE_SEALED, or its client), with the same calls
        either way; None: cleartext."""
        plain = records is None
        self.fd = sock.fileno()
        self._kicked = False
        self.moved = 0
        """Bytes through the socket so far (worker thread writes, the watchdog reads): progress
        inside a frame, so a slow link moving a 16 MiB frame for minutes is not a stall."""
        # Blocking, with the timeouts in the kernel: recv, send, splice and sendfile then block
        # without a poll() per chunk and fail with EAGAIN after the timeout.
        sock.setblocking(True)
        if math.isfinite(stall):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, _timeval(stall))
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, _timeval(min(stall, SEND_WAIT)))
        self._pipe: tuple[int, int] | None = None
        self._splice_ok = hasattr(os, "splice") and plain
        self._sendfile_ok = hasattr(os, "sendfile") and plain
        self._rbuf = anonymous(RECV_BUFFER)
        self._rview = memoryview(self._rbuf)
        self._rpos = self._rend = 0
        self._fview: memoryview | None = None
        """The reused buffer a file is read into when it cannot be sent with sendfile."""
        self._lowat = 1 if not plain and hasattr(socket, "SO_RCVLOWAT") else 0
        """The socket's SO_RCVLOWAT (TLS or sealed, see LOWAT); 0: not used."""

    # --- lifecycle ----------------------------------------------------------------------------
    def kick(self) -> None:
        """Unblock the worker (from any thread): its next wait fails. The stream is dead: its
        close will be abortive (RST), so the peer learns at once instead of probing a zero
        window until its own stall timeout."""
        self._kicked = True
        try:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def close(self) -> None:
        if self._pipe is not None:
            for fd in self._pipe:
                try:
                    os.close(fd)
                except OSError:
                    pass
            self._pipe = None
        try:
            self.sock.close()
        except OSError:
            pass

    # --- waiting -------------------------------------------------------------------------------
    def _wait(self) -> NoReturn:
        """EAGAIN on a blocking socket: its kernel timeout (the stall timeout) expired."""
        raise StallError(self.what, self.stall)

    def _closed(self) -> TransportError:
        if self._kicked:
            return TransportError(f"{self.what}: stopped")
        return TransportError(f"{self.what}: the peer closed the stream")

    def _failed(self, exc: OSError) -> TransportError:
        """What a failed socket call raises."""
        if self._kicked:
            return self._closed()
        if self.records is not None and exc.errno in (errno.EPIPE, errno.ECONNRESET):
            return self._closed()
        return TransportError(f"{self.what}: {exc.strerror or exc}")

    def _blocked(self, since: float) -> None:
        """A send-side call moved nothing for SEND_WAIT: a stall once nothing went out for
        `stall` seconds (`since`: when the last bytes went)."""
        if time.monotonic() - since >= self.stall:
            self._wait()

    def _call(self, fn: Callable[..., T], *args: Any) -> T:
        """One receive-side socket call, its failures turned into the stream's errors."""
        try:
            return fn(*args)
        except BlockingIOError:
            self._wait()
        except OSError as exc:
            raise self._failed(exc) from None

    def _open_records(self, records: Records, view: memoryview) -> int:
        """Open the records received into `view`; 0 when the socket must be read."""
        try:
            return records.open_into(view)
        except ssl.SSLZeroReturnError:  # close_notify: the peer ended the TLS session
            raise self._closed() from None
        except (ssl.SSLError, RemoteProtocolError) as exc:  # a record that does not open
            if self._kicked:
                raise self._closed() from None
            raise TransportError(f"{self.what}: {exc}") from None

    # --- receiving -------------------------------------------------------------------------------
    def recv_into(self, view: memoryview) -> int:
        """Receive some bytes from the socket into `view` (ciphertext, on a TLS stream); raises
        at end of stream."""
        if self._kicked:  # stopped: what the socket still holds is not landed (a prompt Ctrl-C)
            raise self._closed()
        n = self._call(self.sock.recv_into, view)
        if n == 0:
            raise self._closed()
        self.moved += n
        return n

    # The receive side reads through a buffer: one recv() brings in as many small frames as the
    # socket holds (a 4 KiB file is a header, its data and an END: three reads unbuffered).
    # Large payloads bypass it: what is buffered is written out, the rest is spliced directly.

    def _fill(self, want: int = 1) -> None:
        """Read until at least `want` (at most the buffer's size) unread bytes are buffered,
        taking what the socket has each time: a TLS stream decrypts all it received that fits."""
        if self._rpos:
            left = self._rend - self._rpos
            self._rbuf.move(0, self._rpos, left)  # memmove: the ranges may overlap
            self._rpos, self._rend = 0, left
        want = min(want, len(self._rbuf))
        records = self.records
        if records is None:
            while self._rend < want:
                self._rend += self.recv_into(self._rview[self._rend :])
            return
        while True:
            self._rend += self._open_records(records, self._rview[self._rend :])
            if self._rend >= want:
                return
            if self._lowat and self._mark(want - self._rend - records.held) > 1:
                self._recv_marked(records)
            else:
                records.received(self.recv_into(records.recv_space()))

    def _mark(self, need: int) -> int:
        """TLS: the socket's low mark for the next receive, `need`: bytes the peer must still
        send (what the payload holds past the ciphertext already fed). A large need waits until
        LOWAT of it is queued; as the mark never exceeds the need, it never waits for bytes that
        will not come. Small files and headers wait for the first byte, as before."""
        lowat = min(need, LOWAT) if need >= LOWAT_MIN else 1
        if lowat != self._lowat:
            self._set_lowat(lowat)
        return lowat

    def _recv_marked(self, records: Records) -> None:
        """TLS or sealed: receive ciphertext under a low mark above 1. A link too slow for it (a
        wait of LOWAT_SLOW, the socket's timeout meanwhile) turns the mark off for good; the
        stall timeout then runs as usual, from the last bytes received."""
        t0 = time.monotonic()
        try:
            n = self.recv_into(records.recv_space())
        except StallError:  # nothing within LOWAT_SLOW: the mark's timeout, not a stall
            n = 0
        if not n or time.monotonic() - t0 >= LOWAT_SLOW:
            self._set_lowat(1)
            self._lowat = 0  # off for good
        if n:
            records.received(n)

    def _set_lowat(self, lowat: int) -> None:
        """SO_RCVLOWAT, and while it is above 1 a receive timeout of LOWAT_SLOW."""
        sock = self.sock
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, lowat)
        if (lowat > 1) != (self._lowat > 1):
            timeo = min(self.stall, LOWAT_SLOW) if lowat > 1 else (self.stall if math.isfinite(self.stall) else 0.0)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, _timeval(timeo))
        self._lowat = lowat

    def recv_exact(self, n: int) -> bytes:
        if self._rend - self._rpos < n:
            if n > len(self._rbuf):
                raise TransportError(f"{self.what}: frame larger than the buffer")
            self._fill(n)
        out = bytes(self._rview[self._rpos : self._rpos + n])
        self._rpos += n
        return out

    def recv_to_fd(self, fd: int, offset: int, length: int) -> OSError | None:
        """Move `length` payload bytes into file `fd` at `offset` (fd -1 discards them).

        The payload is always consumed whole, so the framing stays intact. Returns the OSError of
        a failed write into the file (the rest was discarded), else None. Socket failures raise.
        """
        error: OSError | None = None
        # First what is already buffered.
        have = min(self._rend - self._rpos, length)
        if have:
            error = self._take_to_fd(fd, offset, have)
            if error is not None:
                fd = -1
            offset += have
            length -= have
        if not length:
            return error
        # The buffer is empty now: a large rest goes socket -> pipe -> file.
        if fd >= 0 and self._splice_ok and length >= SPLICE_MIN:
            try:
                self._splice_to(fd, offset, length)
                return None
            except _SpliceUnsupported as exc:
                self._splice_ok = False
                offset += exc.done
                length -= exc.done
            except _WriteFailed as exc:
                error, fd = exc.error, -1
                offset += exc.done
                length -= exc.done
        # Small rests (and no splice, TLS): through the buffer, one write per buffer-full; the
        # last read may also catch the next frames.
        while length:
            self._fill(length)
            take = min(self._rend - self._rpos, length)
            failed = self._take_to_fd(fd, offset, take)
            if failed is not None:
                error, fd = failed, -1
            offset += take
            length -= take
        return error

    def _take_to_fd(self, fd: int, offset: int, n: int) -> OSError | None:
        """Consume `n` buffered bytes, writing them into `fd` at `offset` (fd -1 discards them);
        returns the OSError of a failed write."""
        error: OSError | None = None
        if fd >= 0:
            try:
                _pwrite_all(fd, self._rview[self._rpos : self._rpos + n], offset)
            except OSError as exc:
                error = exc
        self._rpos += n
        return error

    def _splice_to(self, fd: int, offset: int, length: int) -> None:
        if self._pipe is None:
            r, w = os.pipe2(os.O_CLOEXEC)
            try:
                import fcntl

                fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, PIPE_SIZE)
            except OSError:
                pass
            self._pipe = (r, w)
        r, w = self._pipe
        done = 0
        flags = os.SPLICE_F_MOVE
        while done < length:
            if self._kicked:
                raise self._closed()
            try:
                n = os.splice(self.fd, w, min(length - done, PIPE_SIZE), flags=flags)
            except BlockingIOError:
                self._wait()
                continue
            except OSError as exc:
                if exc.errno in (errno.EINVAL, errno.ENOSYS) and done == 0:
                    raise _SpliceUnsupported(0) from None
                raise self._failed(exc) from None
            if n == 0:
                raise self._closed()
            self.moved += n
            moved = 0
            while moved < n:
                try:
                    m = os.splice(r, fd, n - moved, offset_dst=offset + done + moved, flags=os.SPLICE_F_MOVE)
                except OSError as exc:
                    if exc.errno in (errno.EINVAL, errno.ENOSYS) and done == 0 and moved == 0:
                        # This filesystem cannot splice: write these n bytes from the pipe by hand.
                        try:
                            self._pipe_to_file(fd, offset, n)
                        except OSError as wexc:
                            raise _WriteFailed(n, wexc) from None
                        raise _SpliceUnsupported(n) from None
                    self._pipe_to_file(-1, 0, n - moved)  # drop what is left in the pipe
                    raise _WriteFailed(done + n, exc) from None
                moved += m
            done += n

    def _pipe_to_file(self, fd: int, offset: int, n: int) -> None:
        assert self._pipe is not None
        error: OSError | None = None
        while n:
            data = os.read(self._pipe[0], n)
            if fd >= 0 and error is None:
                try:
                    _pwrite_all(fd, memoryview(data), offset)
                except OSError as exc:
                    error = exc
            offset += len(data)
            n -= len(data)
        if error is not None:
            raise error

    # --- sending -------------------------------------------------------------------------------
    def send_all(self, data: bytes | memoryview, *, more: bool = False) -> None:
        """Send `data`; `more`: more follows at once (a frame header before its payload), so it
        may wait to go out with it."""
        if self.records is not None:
            self.records.write(data)
            if not more or self.records.pending >= SEND_PIECE:
                self._send_sealed(self.records)
            return
        self._send_view(memoryview(data), socket.MSG_MORE if more and hasattr(socket, "MSG_MORE") else 0)

    def _send_view(self, view: memoryview, flags: int = 0) -> None:
        """send() by hand, at most SEND_PIECE per call: progress is counted as it goes."""
        since = time.monotonic()
        while view:
            try:
                n = self.sock.send(view[:SEND_PIECE], flags)
            except BlockingIOError:
                self._blocked(since)
                continue
            except OSError as exc:
                raise self._failed(exc) from None
            since = time.monotonic()
            self.moved += n
            view = view[n:]

    def _send_sealed(self, records: Records) -> None:
        """Send the ciphertext waiting in memory."""
        view = records.take()
        if view:
            self._send_view(view)
        records.sent()

    def send_parts(self, parts: list[bytes]) -> None:
        """Several buffers in one sendmsg where possible (small files)."""
        if self.records is not None:
            self.records.write_parts(parts)
            self._send_sealed(self.records)
            return
        since = time.monotonic()
        while True:
            try:
                n = self.sock.sendmsg(parts)
                break
            except BlockingIOError:
                self._blocked(since)
            except OSError as exc:
                raise self._failed(exc) from None
        self.moved += n
        if n < sum(len(p) for p in parts):
            self.send_all(b"".join(parts)[n:])

    def send_file_range(self, fd: int, offset: int, length: int) -> int:
        """Send `length` bytes of `fd` from `offset`; returns how many the file had (fewer if it
        shrank: the caller pads and aborts the file)."""
        done = 0
        if self._sendfile_ok:
            since = time.monotonic()
            while done < length:
                try:
                    n = os.sendfile(self.fd, fd, offset + done, length - done)
                except BlockingIOError:
                    self._blocked(since)
                    continue
                except OSError as exc:
                    if exc.errno in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP) and done == 0:
                        self._sendfile_ok = False
                        break
                    if self._kicked:
                        raise self._closed() from None
                    if exc.errno in (errno.EPIPE, errno.ECONNRESET):
                        raise TransportError(f"{self.what}: {exc.strerror}") from None
                    raise
                if n == 0:
                    return done
                since = time.monotonic()
                self.moved += n
                done += n
            if done == length:
                return done
        records = self.records
        if records is not None:  # read where it is sealed (a sealed stream: the record itself)
            while done < length:
                n = os.preadv(fd, [records.space(length - done)], offset + done)
                if not n:
                    return done
                records.wrote(n)
                done += n
                if records.pending >= SEND_PIECE:
                    self._send_sealed(records)
            return done
        # No sendfile: a buffer-full per read.
        if self._fview is None:
            self._fview = memoryview(anonymous(READ_CHUNK))
        buf = self._fview
        while done < length:
            n = os.preadv(fd, [buf[: min(length - done, len(buf))]], offset + done)
            if not n:
                return done
            self.send_all(buf[:n])
            done += n
        return done


def _timeval(seconds: float) -> bytes:
    return struct.pack("ll", int(seconds), int((seconds % 1) * 1e6))


class _SpliceUnsupported(Exception):
    def __init__(self, done: int) -> None:
        self.done = done


class _WriteFailed(Exception):
    def __init__(self, done: int, error: OSError) -> None:
        self.done = done
        self.error = error


def _pwrite_all(fd: int, view: memoryview, offset: int) -> None:
    while view:
        n = os.pwrite(fd, view, offset)
        view = view[n:]
        offset += n


# =================================================================================================
# Frame loops on a raw stream (one worker thread each)


def send_loop(io: StreamIO, source: FileSource, jobs: JobQueue, stats: StreamStats) -> None:
    """Send queued files as frames until the queue is closed and drained, then DONE. Small
    files are gathered and sent several per sendmsg(); a source with `frame_small` reads them
    TAKE at a time in one call."""
    batch = _Batch(io, stats)
    frame_small = getattr(source, "frame_small", None)
    jobs.join_raw()
    try:
        while True:
            work = jobs.get_work(0, TAKE)
            if work == []:
                batch.flush()  # nothing more right now: what we hold goes out
                work = jobs.get_work(HEARTBEAT, TAKE)
            if work is None:
                batch.add([pack_frame(FrameType.DONE)], 0)
                batch.flush()
                stats.done = True
                return
            if not work:
                io.send_all(pack_frame(FrameType.NOOP))
                stats.frames += 1
                continue
            if isinstance(work, _Part):
                batch.flush()
                _send_part(io, work, stats)
                continue
            _send_ids(io, source, jobs, stats, batch, frame_small, work)
    finally:
        jobs.leave_raw()


def _send_ids(io: StreamIO, source: FileSource, jobs: JobQueue, stats: StreamStats, batch: "_Batch", frame_small: Any, ids: list[int]) -> None:
    """Send the file ids a raw loop took: small ones framed together, a large one alone."""
    framed = frame_small(ids) if frame_small is not None else None
    if framed is not None:
        if framed.parts:
            batch.add(framed.parts, framed.nbytes, frames=framed.frames)
            stats.files += framed.files
        if framed.failed:
            batch.flush()
            for file_id, why in framed.failed:
                _send_abort(io, file_id, why, stats)
        ids = framed.rest
        if len(ids) > 1:  # large files: one now, the others to whichever stream comes first
            jobs.put_front(ids[1:])
            ids = ids[:1]
    for file_id in ids:
        _send_one(io, source, file_id, stats, batch, jobs)


class _Batch:
    """Frames of small files waiting to go out together."""

    def __init__(self, io: StreamIO, stats: StreamStats) -> None:
        self.io = io
        self.stats = stats
        self.parts: list[bytes] = []
        self.size = 0

    def add(self, parts: list[bytes], nbytes: int, wire: int = -1, frames: int = -1) -> None:
        """`wire`: the parts' total length when the caller knows it; `frames`: how many frames
        they hold (by default one per part)."""
        self.parts.extend(parts)
        self.size += wire if wire >= 0 else sum(len(p) for p in parts)
        self.stats.frames += frames if frames >= 0 else len(parts)
        self.stats.bytes += nbytes
        if self.size >= BATCH_BYTES or len(self.parts) >= IOV_BATCH:
            self.flush()

    def flush(self) -> None:
        if self.parts:
            self.io.send_parts(self.parts)
            self.parts = []
            self.size = 0


def _send_one(io: StreamIO, source: FileSource, file_id: int, stats: StreamStats, batch: _Batch, jobs: JobQueue | None = None) -> None:
    try:
        f = source.open(file_id)
    except OSError as exc:
        batch.flush()
        _send_abort(io, file_id, _reason(exc), stats)
        return
    n_parts = jobs.parts_for(f.size) if jobs is not None and f.extents is None else 1
    if n_parts > 1:  # in parts: this stream sends the first, the others whichever comes first
        batch.flush()
        shared = _SharedSource(f, n_parts)
        step = -(-f.size // n_parts // FRAME_CHUNK) * FRAME_CHUNK
        parts = [_Part(file_id, shared, i * step, min(f.size, (i + 1) * step), i, n_parts) for i in range(n_parts)]
        assert jobs is not None and parts[-1].end == f.size and all(p.start < p.end for p in parts)
        jobs.put_parts(parts[1:])
        if jobs.on_split is not None:
            jobs.on_split()
        _send_part(io, parts[0], stats)
        return
    try:
        size = f.size
        if f.extents is None and size <= SMALL_FILE:
            data = os.pread(f.fd, size + 1, 0) if size else b""
            if len(data) != size:
                batch.flush()
                _send_abort(io, file_id, SHRANK, stats)
                return
            if size:
                batch.add([pack_frame(FrameType.DATA, file_id, 0, size), data, pack_frame(FrameType.END, file_id, size)], size, size + 2 * FRAME_SIZE)
            else:
                batch.add([pack_frame(FrameType.END, file_id, 0)], 0, FRAME_SIZE)
            stats.files += 1
            return
        batch.flush()
        if not _send_frames(io, f.fd, file_id, _chunks(f, FRAME_CHUNK), stats):
            _send_abort(io, file_id, SHRANK, stats)
            return
        io.send_all(pack_frame(FrameType.END, file_id, size))
        stats.frames += 1
        stats.files += 1
    except TransportError:  # the stream (StallError is also an OSError: not a read failure)
        raise
    except OSError as exc:
        raise _read_failed(stats, file_id, exc) from exc
    finally:
        f.close()


def _send_frames(io: StreamIO, fd: int, file_id: int, pieces: Iterable[tuple[int, int]], stats: StreamStats, flags: int = 0, parts: int = 0) -> bool:
    """A DATA frame for each (offset, length) of `pieces`, its bytes from `fd`; False once the
    file turns out shorter (it shrank under us): that frame is padded with zeros, so the framing
    stays whole, and the caller aborts the file."""
    for offset, n in pieces:
        io.send_all(pack_frame(FrameType.DATA, file_id, offset, n, flags, parts), more=True)
        got = io.send_file_range(fd, offset, n)
        stats.frames += 1
        stats.bytes += got
        if got < n:
            _send_zeros(io, n - got)
            return False
    return True


def _read_failed(stats: StreamStats, file_id: int, exc: OSError) -> TransportError:
    """Reading the source failed mid-file (EIO...): the stream's error."""
    return TransportError(f"{stats.what}: reading file {file_id} failed: {_reason(exc)}")


def _send_part(io: StreamIO, part: _Part, stats: StreamStats) -> None:
    """Send one part of a file sent in parts (FRAME_PART frames), then release its source."""
    fid, total, f = part.file_id, part.total, part.source.file
    try:
        if not _send_frames(io, f.fd, fid, _chunks(f, FRAME_CHUNK, [(part.start, part.end - part.start)]), stats, protocol.FRAME_PART, total):
            io.send_all(_abort_frame(fid, SHRANK, protocol.FRAME_PART, total))
            stats.frames += 1
            if part.source.first_failure():
                stats.failures.append((fid, SHRANK))
            return
        io.send_all(pack_frame(FrameType.END, fid, f.size, 0, protocol.FRAME_PART, total))
        stats.frames += 1
        if part.index == 0:
            stats.files += 1
    except TransportError:
        raise
    except OSError as exc:
        raise _read_failed(stats, fid, exc) from exc
    finally:
        part.source.release()


def _chunks(f: SourceFile, chunk: int, ranges: list[tuple[int, int]] | None = None) -> Iterable[tuple[int, int]]:
    """(offset, length) pieces of at most `chunk` bytes covering `ranges` (offset, length), by
    default the file's data regions."""
    for offset, length in ranges or (f.extents if f.extents is not None else [(0, f.size)]):
        end = offset + length
        while offset < end:
            n = min(chunk, end - offset)
            yield offset, n
            offset += n


def _send_zeros(io: StreamIO, n: int) -> None:
    zeros = bytes(min(n, 1 << 20))
    while n:
        k = min(n, len(zeros))
        io.send_all(zeros[:k])
        n -= k


def _send_abort(io: StreamIO, file_id: int, reason: str, stats: StreamStats) -> None:
    io.send_all(_abort_frame(file_id, reason))
    stats.frames += 1
    stats.failures.append((file_id, reason))


def _abort_frame(file_id: int, reason: str, flags: int = 0, parts: int = 0) -> bytes:
    """The ABORT frame of `file_id` (or of one of its parts), with its reason (cut to the
    protocol's limit)."""
    text = reason.encode("utf-8", "replace")[: protocol.MAX_ABORT_TEXT]
    return pack_frame(FrameType.ABORT, file_id, 0, len(text), flags, parts) + text


def _reason(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__


class _PartFile:
    """A file received in parts (FRAME_PART) by several streams of one sink."""

    __slots__ = ("file", "total", "left", "holders", "failed", "fatal", "end")

    def __init__(self, total: int) -> None:
        self.file: SinkFile | None = None
        self.total = total
        self.left = total
        """Parts not ended yet (END or ABORT, or their stream broke)."""
        self.holders = 0
        """Streams in the middle of a part (writing into `file`)."""
        self.failed: str | None = None
        self.fatal: str | None = None
        """A write failed with FATAL_ERRNOS (the destination is full): every stream writing a
        part stops at its next frame, as the one that met it (R40)."""
        self.end = 0


class _Parts:
    """The files one sink receives in parts, shared by its receive loops (a registry per sink:
    the loops of a transfer share nothing else)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.files: dict[int, _PartFile] = {}
        self.broken = False
        """A stream of this sink broke: parts that have not begun will never come."""


_PARTS_LOCK = threading.Lock()


def _parts_of(sink: Any) -> _Parts:
    """The sink's registry of files in parts, kept on the sink (it lives as long as the
    transfer; a sink may be a dataclass, which is not hashable)."""
    with _PARTS_LOCK:
        reg: _Parts | None = getattr(sink, "_blit_parts", None)
        if reg is None:
            reg = _Parts()
            setattr(sink, "_blit_parts", reg)  # noqa: B010
        return reg


class _Landing:
    """Receiver-side bookkeeping shared by both carriers: which files are open, which failed."""

    def __init__(self, sink: FileSink, stats: StreamStats) -> None:
        self.sink = sink
        self.stats = stats
        self.open: dict[int, SinkFile | None] = {}  # None: failed, discard its payload
        self.ends: dict[int, int] = {}  # highest byte written per open file
        self._failed_hook = getattr(sink, "failed", None)
        self.many_hook = getattr(sink, "land_many", None)
        self.stop: str | None = None
        """Set when a write failed with FATAL_ERRNOS: the destination takes nothing more, so the
        receive loops end the stream (FatalError) instead of reading the rest of what the sender
        has (a pushed 100 GiB file into a full disk stops within a frame, not at its end)."""
        self._parts: _Parts | None = None
        self._held: set[int] = set()
        """Files of which this stream is in the middle of a part."""

    def wrote_to(self, file_id: int, end: int) -> None:
        if end > self.ends.get(file_id, 0):
            self.ends[file_id] = end

    def _failure(self, file_id: int, message: str, err: int = 0) -> None:
        self.stats.failures.append((file_id, message))
        if self._failed_hook is not None:
            self._failed_hook(file_id, message, err)
        if err in FATAL_ERRNOS and self.stop is None:
            # The sink's own wording (DestTree.fatal names the path), else the bare reason.
            self.stop = getattr(self.sink, "fatal", None) or message

    def check(self) -> None:
        """Raise FatalError once the destination took a fatal failure (`stop`)."""
        if self.stop is not None:
            raise FatalError(self.stop)

    def target(self, file_id: int) -> int:
        """The fd to write `file_id`'s data to, or -1 to discard it."""
        if file_id not in self.open:
            try:
                self.open[file_id] = self.sink.open(file_id)
            except KeyError:
                raise RemoteProtocolError(f"data for file {file_id}, which was never announced") from None
            except OSError as exc:
                self.open[file_id] = None
                self._failure(file_id, _reason(exc), exc.errno or 0)
        f = self.open[file_id]
        return f.fd if f is not None else -1

    def wrote(self, file_id: int, exc: OSError) -> None:
        """A write into `file_id` failed: drop the file, discard the rest of it."""
        f = self.open.get(file_id)
        if f is not None:
            f.abort()
        self.open[file_id] = None
        self._failure(file_id, _reason(exc), exc.errno or 0)

    def end(self, file_id: int, size: int) -> None:
        self.target(file_id)
        f = self.open.pop(file_id)
        if f is not None:
            self._commit(file_id, f, self.ends.pop(file_id, 0), size)

    def _commit(self, file_id: int, f: SinkFile, written_to: int, size: int) -> None:
        """Land `f` at `size`, truncated to it when what was written ends elsewhere (a trailing
        hole, or a file that shrank); a failure aborts it."""
        try:
            if written_to != size:
                os.ftruncate(f.fd, size)
            f.commit(size)
        except OSError as exc:
            f.abort()
            self._failure(file_id, _reason(exc), exc.errno or 0)
            return
        self.stats.files += 1

    def land_many(self, batch: list[tuple[int, int, int]], buf: bytearray | mmap.mmap) -> None:
        """Several whole small files (file id, offset and length of the content in `buf`)
        through the sink's `land_many`."""
        try:
            failed = self.many_hook(batch, buf)  # type: ignore[misc]
        except KeyError:
            raise RemoteProtocolError("data for a file which was never announced") from None
        for fid, exc in failed:
            self._failure(fid, _reason(exc), exc.errno or 0)
        self.stats.files += len(batch) - len(failed)

    def abort(self, file_id: int, reason: str) -> None:
        f = self.open.pop(file_id, None)
        if f is not None:
            f.abort()
        self._failure(file_id, reason or "failed on the sender")

    def close(self, why: str = "") -> None:
        """Abort everything still open (the stream ended early)."""
        for fid, f in list(self.open.items()):
            if f is not None:
                f.abort()
                self._failure(fid, why or "the data stream ended before the file was complete")
        self.open.clear()
        if self._parts is not None and (why or self._held):
            self._break_parts(why or "the data stream ended before the file was complete")

    # --- files in parts (FRAME_PART) -------------------------------------------------------------
    def part_target(self, file_id: int, total: int) -> int:
        """The fd to write a part of `file_id` into (-1: the file failed, discard)."""
        reg = self._parts
        if reg is None:
            reg = self._parts = _parts_of(self.sink)
        if not 2 <= total <= protocol.MAX_PARTS:
            raise RemoteProtocolError(f"file {file_id} in {total} parts")
        error: OSError | None = None
        with reg.lock:
            pf = reg.files.get(file_id)
            if pf is None:
                pf = reg.files[file_id] = _PartFile(total)
                try:
                    pf.file = self.sink.open(file_id)
                except KeyError:
                    raise RemoteProtocolError(f"data for file {file_id}, which was never announced") from None
                except OSError as exc:
                    error = exc
                    pf.failed = _reason(exc)
            elif pf.total != total or not pf.left:
                raise RemoteProtocolError(f"file {file_id}: parts that do not agree")
            if file_id not in self._held:  # a part begins on this stream
                self._held.add(file_id)
                pf.holders += 1
            fd = pf.file.fd if pf.file is not None and pf.failed is None else -1
            fatal = pf.fatal
        if error is not None:
            self._failure(file_id, _reason(error), error.errno or 0)
        if fatal is not None and self.stop is None:
            self.stop = fatal
        return fd

    def part_wrote(self, file_id: int, end: int, exc: OSError | None) -> None:
        """A part's DATA frame up to `end` was written (or its write failed: `exc`)."""
        assert self._parts is not None
        with self._parts.lock:
            pf = self._parts.files[file_id]
            pf.end = max(pf.end, end)
            first = exc is not None and pf.failed is None
            if first:
                pf.failed = _reason(exc)  # type: ignore[arg-type]
        if first:
            self._failure(file_id, _reason(exc), exc.errno or 0)  # type: ignore[arg-type, union-attr]
            if self.stop is not None:  # the destination is full: the other parts' streams stop too
                with self._parts.lock:
                    pf.fatal = self.stop

    def part_end(self, file_id: int, size: int, reason: str | None = None) -> None:
        """This stream's part of `file_id` ended: whole (END, the file's `size`), or aborted by
        the sender (`reason`). The last part to end commits the file, or aborts it."""
        reg = self._parts
        if reg is None or file_id not in self._held:
            raise RemoteProtocolError(f"the end of a part of file {file_id}, which had no data")
        with reg.lock:
            self._held.discard(file_id)
            pf = reg.files[file_id]
            pf.holders -= 1
            pf.left -= 1
            newly = None
            if reason is not None and pf.failed is None:
                newly = pf.failed = reason or "failed on the sender"
            done, cut = self._part_done(reg, file_id, pf)
        for why in (newly, cut):
            if why is not None:
                self._failure(file_id, why)
        if done:
            self._finish_part_file(file_id, pf, size)

    @staticmethod
    def _part_done(reg: _Parts, file_id: int, pf: _PartFile) -> tuple[bool, str | None]:
        """(Holding the lock.) Whether `pf` is over, taken out of the registry if so: every part
        ended, or no stream is in it and a broken stream means the rest will never come (then
        also the failure this sets, if it is the file's first)."""
        if pf.left and not (reg.broken and not pf.holders):
            return False, None
        del reg.files[file_id]
        cut = None
        if pf.left:
            pf.left = 0
            if pf.failed is None:
                cut = pf.failed = "the data stream ended before the file was complete"
        return True, cut

    def _finish_part_file(self, file_id: int, pf: _PartFile, size: int) -> None:
        f = pf.file
        if f is None:
            return
        if pf.failed is not None:
            f.abort()
            return
        self._commit(file_id, f, pf.end, size)

    def _break_parts(self, why: str) -> None:
        """This stream broke: its parts fail, and files no stream is in are over."""
        reg = self._parts
        assert reg is not None
        over: list[tuple[int, _PartFile]] = []
        failed: list[tuple[int, str]] = []
        with reg.lock:
            reg.broken = True
            for fid in self._held:
                pf = reg.files[fid]
                pf.holders -= 1
                pf.left -= 1
                if pf.failed is None:
                    pf.failed = why
                    failed.append((fid, why))
            self._held.clear()
            for fid, pf in list(reg.files.items()):
                done, cut = self._part_done(reg, fid, pf)
                if done:
                    over.append((fid, pf))
                if cut is not None:
                    failed.append((fid, cut))
        for fid, text in failed:
            self._failure(fid, text)
        for fid, pf in over:
            self._finish_part_file(fid, pf, pf.end)


def _land_batch(io: StreamIO, landing: _Landing, stats: StreamStats, batch: list[tuple[int, int, int]], end: int) -> int:
    """`batch` holds one whole small file (id, offset in the buffer, length) ending at `end`:
    add the whole small files (DATA at 0, payload, END; or a lone END: an empty file) that
    follow it in the buffer, up to LAND_BATCH, land them in one call and return where the
    buffer's unread frames start."""
    rbuf, rend = io._rbuf, io._rend
    unpack_from = protocol.FRAME.unpack_from
    is_open = landing.open.__contains__
    append = batch.append
    frames = nbytes = 0
    room = LAND_BATCH - len(batch)
    while room and rend - end >= FRAME_SIZE:
        kind, _f, _r, fid, offset, length = unpack_from(rbuf, end)
        if kind == _DATA and not offset and length <= SMALL_FILE and rend - end >= length + 2 * FRAME_SIZE:
            pos = end + FRAME_SIZE
            k2, _f, _r, fid2, size, len2 = unpack_from(rbuf, pos + length)
            if k2 != _END or fid2 != fid or size != length or len2 or is_open(fid):
                break
            end = pos + length + FRAME_SIZE
            frames += 2
            nbytes += length
        elif kind == _END and not offset and not length and not is_open(fid):
            pos = end = end + FRAME_SIZE
            frames += 1
        else:
            break
        append((fid, pos, length))
        room -= 1
    stats.frames += frames
    stats.bytes += nbytes
    landing.land_many(batch, rbuf)
    return end


_DATA, _END = int(FrameType.DATA), int(FrameType.END)


def _receive_part(io: StreamIO, landing: _Landing, stats: StreamStats, kind: int, flags: int, parts: int, fid: int, offset: int, length: int) -> None:
    """A frame of a file sent in parts (FRAME_PART)."""
    if flags != protocol.FRAME_PART:
        raise RemoteProtocolError(f"data frame with unknown flags {flags:#x}")
    if kind == _DATA:
        fd = landing.part_target(fid, parts)
        if landing.stop is not None:  # another part met a full destination
            landing.check()
        write_error = io.recv_to_fd(fd, offset, length)
        landing.part_wrote(fid, offset + length, write_error)
        stats.bytes += length
    elif kind == _END:
        if length:
            raise RemoteProtocolError("END frame of a part with a payload")
        landing.part_end(fid, offset)
    elif kind == int(FrameType.ABORT):
        if length > protocol.MAX_ABORT_TEXT:
            raise RemoteProtocolError("ABORT frame reason too long")
        text = io.recv_exact(length).decode("utf-8", "replace") if length else ""
        landing.part_end(fid, 0, text)
    else:
        raise RemoteProtocolError(f"frame type {kind} of a part")


def receive_loop(io: StreamIO, sink: FileSink, stats: StreamStats) -> None:
    """Receive frames and land files until DONE. On any error, files still open are aborted.

    The hot loop of small-file transfers: headers are parsed in place from the read buffer,
    with the checks of `protocol.unpack_frame` inlined. A small file (one DATA frame at offset
    0, then its END) is read whole into the buffer and goes to the sink's `land_many`, with the
    whole small files that follow it in the buffer.
    """
    landing = _Landing(sink, stats)
    whole = landing.many_hook is not None
    is_open = landing.open.__contains__
    unpack_from = protocol.FRAME.unpack_from
    DATA, END, ABORT, DONE, NOOP = (int(t) for t in (FrameType.DATA, FrameType.END, FrameType.ABORT, FrameType.DONE, FrameType.NOOP))
    limit = protocol.MAX_OFFSET
    try:
        while True:
            if landing.stop is not None:
                landing.check()
            if io._kicked:  # stopped: the frames still buffered are not landed either (QA: a
                raise io._closed()  # 1 MiB buffer of tiny files kept landing for seconds)
            if io._rend - io._rpos < FRAME_SIZE:
                io._fill(FRAME_SIZE)
            kind, flags, parts, fid, offset, length = unpack_from(io._rbuf, io._rpos)
            io._rpos += FRAME_SIZE
            stats.frames += 1
            if offset > limit or length > limit or offset + length > limit:
                raise RemoteProtocolError("data frame beyond the largest file size")
            if flags:
                _receive_part(io, landing, stats, kind, flags, parts, fid, offset, length)
                continue
            if kind == DATA:
                if whole and offset == 0 and length <= SMALL_FILE and not is_open(fid):
                    # A small file comes whole (DATA, payload, END in one sendmsg): buffer it all.
                    if io._rend - io._rpos < length + FRAME_SIZE:
                        io._fill(length + FRAME_SIZE)
                    pos = io._rpos
                    k2, _f, _r, fid2, size, len2 = unpack_from(io._rbuf, pos + length)
                    if k2 == END and fid2 == fid and size == length and not len2:
                        end = pos + length + FRAME_SIZE
                        stats.frames += 1
                        stats.bytes += length
                        io._rpos = _land_batch(io, landing, stats, [(fid, pos, length)], end)
                        continue
                fd = landing.target(fid)
                write_error = io.recv_to_fd(fd, offset, length)
                landing.wrote_to(fid, offset + length)
                if write_error is not None:  # the disk side (full, EIO): drop this file only
                    landing.wrote(fid, write_error)
                stats.bytes += length
            elif kind == END:
                if length not in (0, 16):
                    raise RemoteProtocolError("END frame with an unexpected payload")
                if length:
                    io.recv_exact(length)  # digest: reserved, not checked yet
                if whole and offset == 0 and not is_open(fid):  # an empty file
                    io._rpos = _land_batch(io, landing, stats, [(fid, io._rpos, 0)], io._rpos)
                    continue
                landing.end(fid, offset)
            elif kind == ABORT:
                if length > protocol.MAX_ABORT_TEXT:
                    raise RemoteProtocolError("ABORT frame reason too long")
                text = io.recv_exact(length).decode("utf-8", "replace") if length else ""
                landing.abort(fid, text)
            elif kind == DONE:
                if length:
                    raise RemoteProtocolError("DONE frame with a payload")
                stats.done = True
                return
            elif kind == NOOP:
                if length:
                    raise RemoteProtocolError("NOOP frame with a payload")
            else:
                raise RemoteProtocolError(f"unknown data frame type {kind}")
    except Exception as exc:
        landing.close(f"data stream failed: {exc}")
        raise
    finally:
        landing.close()


# =================================================================================================
# Running a stream's worker thread from trio


async def run_worker(
    fn: Callable[[], T],
    *,
    kick: Callable[[], None] | None = None,
    io: StreamIO | None = None,
    stats: StreamStats,
    stall: float = DEFAULT_STALL,
    limiter: trio.CapacityLimiter | None = None,
    grace: float = 2.0,
) -> T:
    """Run a stream's blocking loop in one worker thread, with cancellation and a stall watchdog.

    Cancellation: when the surrounding scope is cancelled, `kick()` shuts the socket so the thread
    returns promptly (its loop aborts the files it had open); a thread that does not return
    within `grace` seconds (a hung disk) is abandoned. A stream whose `stats` (and the bytes
    through `io`'s socket, `io.kick` being the default `kick`) do not move for `stall` seconds is
    kicked the same way and StallError is raised: `.local` is set when the thread was then stuck
    on this machine (a hung disk), not on the network or the peer.
    """
    finished = stalled = cancelled = False
    shield = trio.CancelScope(shield=True)
    if kick is None:
        assert io is not None
        kick = io.kick
    do_kick = kick

    def mark() -> tuple[int, int, int]:
        frames, nbytes = stats.progress_mark()
        return frames, nbytes, io.moved if io is not None else 0

    def stop() -> None:
        if not finished:
            do_kick()
            shield.deadline = min(shield.deadline, trio.current_time() + grace)

    async def watchdog() -> None:
        nonlocal stalled, cancelled
        try:
            last = mark()
            last_t = trio.current_time()
            period = min(stall / 4, 5.0) if math.isfinite(stall) else math.inf
            while True:
                await trio.sleep(period)
                now_mark = mark()
                now = trio.current_time()
                if now_mark != last:
                    last, last_t = now_mark, now
                elif now - last_t >= stall:
                    stalled = True
                    stop()
                    return
        except trio.Cancelled:
            if not finished:
                cancelled = True
                stop()
            raise

    error: BaseException | None = None
    result: Any = None
    async with trio.open_nursery() as nursery:
        nursery.start_soon(watchdog)
        try:
            with shield:
                result = await trio.to_thread.run_sync(fn, abandon_on_cancel=True, limiter=limiter)
        except Exception as exc:  # raised in the thread; decided below, outside the nursery
            error = exc
        finally:
            finished = True
            nursery.cancel_scope.cancel()
    if stalled:
        if shield.cancelled_caught:
            raise StallError(
                stats.what, stall, local=True,
                message=f"{stats.what}: a file operation on this machine hung (no progress for {stall:g} s)",
            ) from None
        raise StallError(stats.what, stall) from None
    if cancelled:
        await trio.lowlevel.checkpoint()  # delivers the outer cancellation
    if shield.cancelled_caught:
        raise TransportError(f"{stats.what}: abandoned a worker thread stuck for {grace:g} s")
    if error is not None:
        raise error
    return result  # type: ignore[no-any-return]


async def run_sync_owned(fn: Callable[[], T | None], close: Callable[[T], None], *, limiter: trio.CapacityLimiter | None = None) -> T | None:
    """Run `fn` (which opens a resource) in a thread that may be abandoned on cancellation; a
    resource the abandoned thread still produces is closed, never leaked."""
    lock = threading.Lock()
    state: dict[str, Any] = {"gone": False, "result": None}

    def work() -> T | None:
        result = fn()
        with lock:
            if state["gone"]:
                if result is not None:
                    close(result)
                return None
            state["result"] = result
        return result

    try:
        return await trio.to_thread.run_sync(work, abandon_on_cancel=True, limiter=limiter)
    except BaseException:
        with lock:
            state["gone"] = True
            leftover = state["result"]
        if leftover is not None:
            close(leftover)
        raise


# =================================================================================================
# Opening and admitting raw streams


@dataclass(slots=True)
class Link:
    """A data connection during admission: the socket (Python-level timeout) and its session:
    `sealed` (seal.py), `tls` (a TLS session: a daemon or client before FEATURE_SEALED), or
    neither (cleartext). Its methods raise OSError / ssl.SSLError / RemoteProtocolError (a sealed
    record that does not open)."""

    sock: socket.socket
    tls: TLSBio | None = None
    sealed: SealedChannel | None = None
    deadline: float = math.inf
    """time.monotonic() by which every read must be done (a peer that trickles a byte now and
    then passes each read's own timeout)."""

    def _left(self) -> None:
        """Each read gets what is left of the deadline as its timeout."""
        if self.deadline != math.inf:
            left = self.deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("timed out")
            self.sock.settimeout(left)

    @property
    def records(self) -> Records | None:
        return self.sealed if self.sealed is not None else self.tls

    def sendall(self, data: bytes) -> None:
        records = self.records
        if records is None:
            self.sock.sendall(data)
            return
        records.write(data)
        self.sock.sendall(records.take())
        records.sent()

    def recv_exact(self, n: int) -> bytes:
        records = self.records
        if records is not None:
            return self._open_exact(records, n)
        buf = bytearray()
        while len(buf) < n:
            self._left()
            chunk = self.sock.recv(n - len(buf))
            if not chunk:
                raise ConnectionError("the peer closed the data stream")
            buf += chunk
        return bytes(buf)

    def recv_plain(self, n: int) -> bytes:
        """`n` cleartext bytes, read exactly (nothing past them is taken from the socket)."""
        return Link(self.sock, deadline=self.deadline).recv_exact(n)

    def _open_exact(self, records: Records, n: int) -> bytes:
        out = memoryview(bytearray(n))
        got = 0
        while got < n:
            try:
                k = records.open_into(out[got:])
            except ssl.SSLZeroReturnError:  # close_notify
                raise ConnectionError("the peer closed the data stream") from None
            if k:
                got += k
                continue
            self._left()
            r = self.sock.recv_into(records.recv_space())
            if not r:
                raise ConnectionError("the peer closed the data stream")
            records.received(r)
        return bytes(out)

    def close(self) -> None:
        self.sock.close()

    def stream(self, *, what: str, stall: float) -> StreamIO:
        """The admitted stream (it owns the socket from now on)."""
        return StreamIO(self.sock, records=self.records, what=what, stall=stall)


def _start_tls(sock: socket.socket, tls_ctx: ssl.SSLContext | None, *, server_side: bool) -> Link:
    if tls_ctx is None:
        return Link(sock)
    session = TLSBio(tls_ctx, server_side=server_side)
    session.handshake(sock)
    return Link(sock, session)


def admit_client(
    sock: socket.socket,
    token: bytes,
    *,
    tls_ctx: ssl.SSLContext | None,
    fingerprint: str | None,
    sealed: bool = False,
    timeout: float = ADMIT_TIMEOUT,
    stall: float = DEFAULT_STALL,
    what: str = "data stream",
) -> StreamIO:
    """Client side, worker thread: the hello with the token, then the daemon's answer. Takes
    ownership of `sock`. `sealed` (FEATURE_SEALED, a TLS control plane): the hello names the
    token's id and its sealed copy proves the secret; the daemon's admission is proved by its
    first sealed record. Otherwise with `tls_ctx`: a TLS session whose certificate must be the
    control plane's.

    Raises:
        ConnectError: refused by the daemon, TLS failure, another certificate, or a daemon that
            does not hold the token's secret.
    """
    from . import tls as tls_mod

    try:
        sock.settimeout(timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        deadline = time.monotonic() + timeout
        if sealed:
            from .seal import SealedChannel

            channel = SealedChannel(token[: protocol.TOKEN_ID_BYTES], token[protocol.TOKEN_ID_BYTES :], client_side=True)
            link = Link(sock, sealed=channel, deadline=deadline)
            hello = protocol.pack_data_hello(token, sealed=True)
            channel.write(hello)  # the proof: the hello again, sealed
            sock.sendall(hello + channel.take())
            channel.sent()
        else:
            link = _start_tls(sock, tls_ctx, server_side=False)
            link.deadline = deadline
            if link.tls is not None:
                der = link.tls.peer_certificate()
                if not der or tls_mod.fingerprint(der) != fingerprint:
                    raise ConnectError(f"{what}: the data port presented another certificate than the daemon")
            link.sendall(protocol.pack_data_hello(token))
        read = link.recv_plain if sealed else link.recv_exact
        status, n = protocol.ADMIT.unpack(read(protocol.ADMIT.size))
        message = read(n).decode("utf-8", "replace") if n else ""
        if status != AdmitStatus.OK:
            try:
                name = AdmitStatus(status).name
            except ValueError:
                name = str(status)
            err = TokenRefused if status == AdmitStatus.BAD_TOKEN else ConnectError
            raise err(f"{what}: refused by the daemon: {message or name}")
        if sealed:
            try:
                proof = link.recv_exact(len(protocol.SEALED_ADMITTED))
            except RemoteProtocolError:  # the answer did not open (seal.py)
                proof = b""
            if not hmac.compare_digest(proof, protocol.SEALED_ADMITTED):
                raise ConnectError(f"{what}: the data port does not hold the transfer's key (not the daemon of the control connection)")
    except (OSError, ssl.SSLError) as exc:
        sock.close()
        raise ConnectError(f"{what}: {exc}") from None
    except BaseException:
        sock.close()
        raise
    return link.stream(what=what, stall=stall)


def accept_handshake(
    sock: socket.socket,
    tls_ctx: ssl.SSLContext | None,
    secret_of: Callable[[bytes], bytes | None] = lambda tid: None,
    timeout: float = ADMIT_TIMEOUT,
) -> tuple[Link, bytes | Refused]:
    """Daemon side, worker thread: the client's hello (after a TLS handshake if its first byte
    starts one).

    A daemon with TLS (`tls_ctx`) takes a TLS session or a sealed stream, never cleartext: a
    sealed hello names its token's id, `secret_of(id)` gives the secret of an outstanding grant
    (None: unknown or expired; the grant is not spent here), and the stream's first sealed
    record must open under its keys and repeat the hello. Returns the connection and the whole
    token (to redeem), or the refusal to answer with (not a blit data hello, another version, a
    stream that is not what this daemon takes, an unknown token, a failed proof). On a
    connection failure the socket is closed and OSError / ssl.SSLError raised.
    """
    try:
        sock.settimeout(timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        link: Link | None = None
        if tls_ctx is not None:
            first = sock.recv(1, socket.MSG_PEEK)
            if not first:
                raise ConnectionError("the peer closed the data stream")
            if first[0] == _TLS_HANDSHAKE:
                link = _start_tls(sock, tls_ctx, server_side=True)
        if link is None:
            link = Link(sock)
        hello = link.recv_exact(protocol.DATA_HELLO.size)
    except BaseException:
        sock.close()
        raise
    try:
        token, sealed = protocol.unpack_data_hello(hello)
    except Refused as exc:
        return link, exc
    if sealed and (tls_ctx is None or link.tls is not None):
        return link, Refused(ErrorCode.BAD_REQUEST, "a sealed data stream needs a daemon with TLS, outside a TLS session")
    if not sealed and tls_ctx is not None and link.tls is None:
        return link, Refused(ErrorCode.BAD_REQUEST, "this daemon's data streams are encrypted (TLS on): a cleartext stream is refused")
    if not sealed:
        return link, token
    from . import seal

    tid = token[: protocol.TOKEN_ID_BYTES]
    secret = secret_of(tid) if seal.AVAILABLE else None
    if secret is None:
        return link, Refused(ErrorCode.BAD_TOKEN, "unknown, expired or already used data token")
    try:  # the proof, read whole and opened before the stream's buffers are made
        record = link.recv_exact(seal.HEAD.size + len(hello) + seal.TAG)
    except BaseException:
        sock.close()
        raise
    if not seal.opening_proves(tid, secret, record, hello):
        return link, Refused(ErrorCode.BAD_TOKEN, "the data stream did not prove its token")
    link.sealed = seal.SealedChannel(tid, secret, client_side=False, opened=1)
    return link, tid + secret


_TLS_HANDSHAKE = 0x16
"""The first byte of a TLS ClientHello record (content type handshake)."""


def answer_admission(link: Link, status: AdmitStatus, message: str = "") -> None:
    """The daemon's answer: on a sealed stream in the clear (a refusal may come before any key
    is known), then, once admitted, the first sealed record (SEALED_ADMITTED)."""
    raw = protocol.pack_admit(status, message)
    if link.sealed is None:
        link.sendall(raw)
        return
    link.sock.sendall(raw)
    if status == AdmitStatus.OK:
        link.sendall(protocol.SEALED_ADMITTED)


# =================================================================================================
# The HTTP/2 fallback carrier (trio side)


class _H2Like(Protocol):
    async def send_data(self, data: bytes | memoryview, *, end: bool = False) -> None: ...
    async def receive_chunk(self) -> bytes | None: ...


def _open_and_read(source: FileSource, jobs: JobQueue, timeout: float) -> tuple[int | None, Any, bytes | str]:
    """Worker thread: the next job, its file, and its first chunk (or the error text)."""
    file_id = jobs.get(timeout)
    if file_id is None or file_id == JobQueue.EMPTY:
        return file_id, None, b""
    try:
        f = source.open(file_id)
    except OSError as exc:
        return file_id, None, _reason(exc)
    return file_id, f, b""


async def h2_send_loop(
    st: _H2Like,
    source: FileSource,
    jobs: JobQueue,
    stats: StreamStats,
    *,
    limiter: trio.CapacityLimiter | None = None,
) -> None:
    """The fallback sender: frames over an HTTP/2 stream, one thread hop per file open and per
    H2_CHUNK of file data."""
    def close_file(got: tuple[int | None, Any, bytes | str]) -> None:
        if got[1] is not None:
            got[1].close()

    while True:
        # Owned: a cancelled wait (Ctrl-C, the client gone) must not drop a file the thread
        # opened meanwhile (a daemon leaked 2 fds per interrupted HTTP/2 pull, QA).
        got = await run_sync_owned(lambda: _open_and_read(source, jobs, HEARTBEAT), close_file, limiter=limiter)
        assert got is not None
        file_id, f, err = got
        if file_id is None:
            await st.send_data(pack_frame(FrameType.DONE), end=True)
            stats.tick()
            stats.done = True
            return
        if file_id == JobQueue.EMPTY:
            await st.send_data(pack_frame(FrameType.NOOP))
            stats.tick()
            continue
        if f is None:
            await st.send_data(_abort_frame(file_id, str(err)))
            stats.failures.append((file_id, str(err)))
            continue
        try:
            ok = True
            for offset, n in _chunks(f, H2_CHUNK):
                data = await trio.to_thread.run_sync(os.pread, f.fd, n, offset, limiter=limiter)
                if len(data) < n:
                    ok = False
                    break
                await st.send_data(pack_frame(FrameType.DATA, file_id, offset, n) + data)
                stats.tick(1, n)
            if ok:
                await st.send_data(pack_frame(FrameType.END, file_id, f.size))
                stats.tick()
                stats.files += 1
            else:
                await st.send_data(_abort_frame(file_id, SHRANK))
                stats.failures.append((file_id, SHRANK))
        finally:
            f.close()  # not a thread hop: a cancelled one never closed it


def _apply_events(landing: _Landing, events: list[protocol.FrameEvent]) -> bool:
    """Worker thread: land a batch of parsed frame events; True once DONE was seen."""
    for ev in events:
        if isinstance(ev, protocol.FramePayload):
            fd = landing.target(ev.header.file_id)
            landing.wrote_to(ev.header.file_id, ev.offset + len(ev.data))
            if fd >= 0:
                try:
                    _pwrite_all(fd, memoryview(ev.data), ev.offset)
                except OSError as exc:
                    landing.wrote(ev.header.file_id, exc)
        elif isinstance(ev, protocol.FrameComplete):
            h = ev.header
            if h.type is FrameType.END:
                landing.end(h.file_id, h.offset)
            elif h.type is FrameType.ABORT:
                landing.abort(h.file_id, ev.data.decode("utf-8", "replace"))
            elif h.type is FrameType.DONE:
                return True
    return False


async def h2_receive_loop(
    st: _H2Like,
    sink: FileSink,
    stats: StreamStats,
    *,
    limiter: trio.CapacityLimiter | None = None,
) -> None:
    """The fallback receiver: parse frames from HTTP/2 chunks; land them in batches."""
    parser = protocol.FrameParser()
    landing = _Landing(sink, stats)
    pending: list[protocol.FrameEvent] = []
    pending_bytes = 0
    done = False
    try:
        while not done:
            chunk = await st.receive_chunk()
            if chunk is None:
                raise RemoteProtocolError(f"{stats.what}: the stream ended before DONE")
            for ev in parser.feed(chunk):
                if isinstance(ev, protocol.FrameHeader):
                    stats.tick()
                    continue
                if isinstance(ev, protocol.FramePayload):
                    pending_bytes += len(ev.data)
                    stats.tick(0, len(ev.data))
                pending.append(ev)
                if isinstance(ev, protocol.FrameComplete) and ev.header.type is FrameType.DONE:
                    done = True
            if pending and (done or pending_bytes >= H2_WRITE_BATCH or len(pending) >= 4096 or _quiet(st)):
                batch, pending, pending_bytes = pending, [], 0
                if await trio.to_thread.run_sync(_apply_events, landing, batch, limiter=limiter):
                    done = True
                landing.check()
        stats.done = True
    except Exception as exc:
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(landing.close, f"data stream failed: {exc}", limiter=limiter)
        raise
    finally:
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(landing.close, limiter=limiter)


def _quiet(st: Any) -> bool:
    """No more chunks queued right now on the HTTP/2 stream (flush what we have)."""
    return not getattr(st, "_chunks", True)
