"""TLS over a plain blocking socket, with the records kept in memory (`ssl.SSLObject` + two
`ssl.MemoryBIO`s).

An `ssl.SSLSocket` makes one write() per 16 KiB record and two read()s per record: 2 GiB is
~400k syscalls. Here OpenSSL only encrypts into and decrypts from memory; the caller moves the
ciphertext through its own socket in pieces as large as it likes (the data plane: hundreds of
KiB per send, what the socket holds per recv), with the socket's own timeouts and errors.

`handshake`, `sendall` and `recv` are for the short exchanges before a stream is handed over
(the handshake, the data hello and the admission answer): they use the socket directly, bounded
by its Python-level timeout (`settimeout`), and raise OSError / ssl.SSLError as `SSLSocket`
would.

This module must not open connections, set timeouts, or check certificates (the caller pins the
peer's certificate, `peer_certificate`).
"""

from __future__ import annotations

import socket
import ssl
from typing import cast

HANDSHAKE_READ = 64 << 10
"""Bytes asked of the socket per read while handshaking or admitting (the rest stays fed)."""


def _closed() -> ssl.SSLZeroReturnError:
    return ssl.SSLZeroReturnError(ssl.SSL_ERROR_ZERO_RETURN, "TLS connection closed by the peer")


class TLSBio:
    """One TLS connection's state; the ciphertext travels through the caller's socket."""

    __slots__ = ("obj", "_in", "_out")

    def __init__(self, ctx: ssl.SSLContext, *, server_side: bool) -> None:
        self._in = ssl.MemoryBIO()
        self._out = ssl.MemoryBIO()
        self.obj = ctx.wrap_bio(self._in, self._out, server_side=server_side)

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

    def sendall(self, sock: socket.socket, data: bytes) -> None:
        self.seal(data)
        self._send_sealed(sock)

    def recv(self, sock: socket.socket, n: int) -> bytes:
        """Up to `n` plaintext bytes (at least one); b"" when the peer closed. Plaintext past
        `n` stays here for the next call (or the stream)."""
        while True:
            try:
                return self.obj.read(n)
            except ssl.SSLWantReadError:
                if not self._recv_some(sock, eof_ok=True):
                    return b""
            except ssl.SSLZeroReturnError:
                return b""

    def _send_sealed(self, sock: socket.socket) -> None:
        if self._out.pending:
            sock.sendall(self._out.read())

    def _recv_some(self, sock: socket.socket, *, eof_ok: bool = False) -> bool:
        data = sock.recv(HANDSHAKE_READ)
        if not data:
            if eof_ok:
                return False
            raise ConnectionError("the peer closed the connection during the TLS handshake")
        self._in.write(data)
        return True

    # --- bulk: the caller moves the ciphertext ---------------------------------------------------
    def seal(self, data: bytes | bytearray | memoryview) -> None:
        """Encrypt `data` (whole records, kept until `sealed` takes them)."""
        self.obj.write(data)

    @property
    def sealed_bytes(self) -> int:
        """Ciphertext waiting to be sent."""
        return self._out.pending

    def sealed(self, n: int = -1) -> bytes:
        """Take up to `n` bytes (all by default) of the ciphertext waiting to be sent."""
        return self._out.read(n)

    @property
    def fed_bytes(self) -> int:
        """Ciphertext fed and not yet decrypted (part of a record)."""
        return self._in.pending

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        """Ciphertext received from the peer."""
        self._in.write(data)

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
