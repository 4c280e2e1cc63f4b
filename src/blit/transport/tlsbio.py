"""TLS over a plain blocking socket, with the records kept in memory (`ssl.SSLObject` + two
`ssl.MemoryBIO`s).

An `ssl.SSLSocket` makes one write() per 16 KiB record and two read()s per record: 2 GiB is
~400k syscalls. Here OpenSSL only encrypts into and decrypts from memory; the caller moves the
ciphertext through its own socket in pieces as large as it likes (the data plane: hundreds of
KiB per send, what the socket holds per recv), with the socket's own timeouts and errors.

`handshake` runs over the socket directly, bounded by its Python-level timeout (`settimeout`),
and raises OSError / ssl.SSLError as `SSLSocket` would. After it, the records are moved through
the same calls as a sealed stream's (`seal.SealedChannel`, which a daemon or client of sealed
streams uses instead): `write`/`space`+`wrote`, `take`, `sent` to send; `recv_space`+`received`,
`open_into` to receive.

This module must not open connections, set timeouts, or check certificates (the caller pins the
peer's certificate, `peer_certificate`).
"""

from __future__ import annotations

import socket
import ssl
from typing import cast

from .buffers import anonymous

HANDSHAKE_READ = 64 << 10
"""Bytes asked of the socket per read while handshaking (the rest stays fed)."""
BUFFER = 1 << 20
"""A file's bytes are read, and the socket's ciphertext received, this much at a time."""


def _closed() -> ssl.SSLZeroReturnError:
    return ssl.SSLZeroReturnError(ssl.SSL_ERROR_ZERO_RETURN, "TLS connection closed by the peer")


class TLSBio:
    """One TLS connection's state; the ciphertext travels through the caller's socket."""

    __slots__ = ("obj", "_in", "_out", "_read", "_recv")

    def __init__(self, ctx: ssl.SSLContext, *, server_side: bool) -> None:
        self._in = ssl.MemoryBIO()
        self._out = ssl.MemoryBIO()
        self.obj = ctx.wrap_bio(self._in, self._out, server_side=server_side)
        self._read: memoryview | None = None
        """Where a file's bytes are read before they are sealed (made at the first)."""
        self._recv: memoryview | None = None
        """Where ciphertext lands from the socket before it is fed (made at the first)."""

    # --- the blocking exchanges before a stream is handed over -----------------------------------
    def handshake(self, sock: socket.socket) -> None:
        """Run the handshake over `sock`. Raises ssl.SSLError, OSError (TimeoutError included),
        or ConnectionError when the peer closes."""
        while True:
            try:
                self.obj.do_handshake()
                break
            except ssl.SSLWantReadError:
                self._send_sealed(sock)
                self._recv_some(sock)
        self._send_sealed(sock)  # the last flight (client Finished, server session tickets)

    def peer_certificate(self) -> bytes | None:
        """The peer's certificate (DER), None if it sent none."""
        return self.obj.getpeercert(binary_form=True) or None

    def _send_sealed(self, sock: socket.socket) -> None:
        if self._out.pending:
            sock.sendall(self._out.read())

    def _recv_some(self, sock: socket.socket) -> None:
        data = sock.recv(HANDSHAKE_READ)
        if not data:
            raise ConnectionError("the peer closed the connection during the TLS handshake")
        self._in.write(data)

    # --- bulk: the caller moves the ciphertext ---------------------------------------------------
    def write(self, data: bytes | bytearray | memoryview) -> None:
        """Encrypt `data` (whole records, kept until `take`)."""
        self.obj.write(data)

    def write_parts(self, parts: list[bytes]) -> None:
        self.obj.write(b"".join(parts))  # one write: whole records, not one per part

    def space(self, most: int) -> memoryview:
        """Room for up to `most` bytes to be sealed (a file's, read in place); `wrote(n)`
        seals what was put there."""
        if self._read is None:
            self._read = memoryview(anonymous(BUFFER))
        return self._read[: min(most, BUFFER)]

    def wrote(self, n: int) -> None:
        assert self._read is not None
        self.obj.write(self._read[:n])

    @property
    def pending(self) -> int:
        """Ciphertext waiting to be sent."""
        return self._out.pending

    def take(self) -> memoryview:
        """The ciphertext waiting to be sent (taken: `sent` has nothing to do)."""
        return memoryview(self._out.read())

    def sent(self) -> None:
        pass

    @property
    def held(self) -> int:
        """Ciphertext fed and not yet decrypted (part of a record)."""
        return self._in.pending

    def recv_space(self) -> memoryview:
        """Where the next ciphertext from the socket goes (`received(n)` feeds it)."""
        if self._recv is None:
            self._recv = memoryview(anonymous(BUFFER))
        return self._recv

    def received(self, n: int) -> None:
        assert self._recv is not None
        self._in.write(self._recv[:n])

    def open_into(self, view: memoryview) -> int:
        """Decrypt what was fed into `view`, as far as it fits; 0 when a whole record more is
        needed (feed more). Raises ssl.SSLZeroReturnError when the peer closed the session
        (close_notify), ssl.SSLError for a record that does not decrypt."""
        read = self.obj.read
        size = len(view)
        got = 0
        while got < size:
            try:
                n = cast(int, read(size - got, view[got:]))  # with a buffer, read() returns a count
            except ssl.SSLWantReadError:
                break
            if not n:  # a clean close_notify reads as 0 bytes
                if got:
                    break
                raise _closed()
            got += n
        return got
