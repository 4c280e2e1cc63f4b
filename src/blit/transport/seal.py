"""Sealed data streams: AES-128-GCM records keyed through the TLS control plane (decisions R67).

A data token is `id || secret` (`data.GrantTable`); the client receives it in a control reply,
inside the control plane's TLS session with the pinned daemon. A sealed stream never sends the
secret: the client's hello names the token's id in the clear, and both ends derive the stream's
keys from the secret with HKDF-SHA256 (salt: the id), one key and one IV per direction. Every
byte after the hello travels in records:

    u32 length (ciphertext + 16-byte tag, big-endian) || AES-128-GCM(ciphertext) || tag

with the length as associated data and the nonce `iv XOR record number` (TLS 1.3's rule), so
a record altered, dropped, replayed or moved between streams or directions fails to open. A
record holds at most MAX_RECORD plaintext bytes. The token is single use, so no key ever
seals two streams.

Why not TLS on the data port (it was, R19/R39): Python's `ssl` is the system OpenSSL (3.0
here), whose AES-GCM ran at 4.5 GB/s, while `cryptography`'s own OpenSSL seals at 11 GB/s on
the same core; and `ssl.SSLObject` copies every byte into and out of its memory BIOs. Here a
record is sealed and opened in place in the caller's buffers.

`SealedChannel` is pure computation over buffers: it must not touch sockets, clocks or
files (the data plane's `StreamIO` moves its bytes), and it never logs key material.
"""

from __future__ import annotations

import struct

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from ..errors import RemoteProtocolError
from .buffers import anonymous

HEAD = struct.Struct("!I")
"""A record's header: the length of its ciphertext and tag."""
TAG = 16
MAX_RECORD = 256 << 10
"""Most plaintext bytes in one record (a receiver holds a whole record before opening it)."""
KEY_BYTES = 16
IV_BYTES = 12
INFO = b"blit sealed data stream v1"
AVAILABLE = hasattr(AESGCM, "encrypt_into") and hasattr(AESGCM, "decrypt_into")
"""This `cryptography` seals in place (47 and later): without it, neither end offers sealed
streams and a TLS session per stream is used, as before R67."""

_IN_SIZE = 4 * (MAX_RECORD + TAG + HEAD.size)
_IN_ROOM = 64 << 10
"""The receive space offered is at least this (the unopened tail moves to the front first)."""
_OUT_SIZE = 2 * (MAX_RECORD + TAG + HEAD.size)


def opening_proves(token_id: bytes, secret: bytes, record: bytes, hello: bytes) -> bool:
    """Whether `record` (the first from the client, read whole: length, ciphertext, tag) opens
    under the stream's keys and repeats `hello`: checked before a channel's buffers exist, so a
    connection that names a live token id without its secret costs nothing."""
    if len(record) != HEAD.size + len(hello) + TAG or HEAD.unpack_from(record)[0] != len(hello) + TAG:
        return False
    key, iv, _, _ = derive(token_id, secret)
    try:
        plain = AESGCM(key).decrypt(SealedChannel._nonce(int.from_bytes(iv, "big"), 0), record[HEAD.size :], record[: HEAD.size])
    except InvalidTag:
        return False
    return plain == hello


def derive(token_id: bytes, secret: bytes) -> tuple[bytes, bytes, bytes, bytes]:
    """(client-to-daemon key, its IV, daemon-to-client key, its IV) of the stream `id || secret`
    admits."""
    okm = HKDF(algorithm=hashes.SHA256(), length=2 * (KEY_BYTES + IV_BYTES), salt=token_id, info=INFO).derive(secret)
    k1, i1 = okm[:KEY_BYTES], okm[KEY_BYTES : KEY_BYTES + IV_BYTES]
    rest = okm[KEY_BYTES + IV_BYTES :]
    return k1, i1, rest[:KEY_BYTES], rest[KEY_BYTES:]


class SealedChannel:
    """Both directions of one sealed stream.

    Sending: `write` (copies) or `space` + `wrote` (the caller fills the record in place, as a
    pread does) add plaintext to the open record; `take` seals it and gives every sealed byte
    waiting, and `sent` drops them once the socket took them. Receiving: the caller reads the
    socket into `recv_space` and reports it with `received`; `open_into` opens the whole
    records received into the caller's buffer.
    """

    __slots__ = ("_seal", "_siv", "_sseq", "_open", "_riv", "_rseq", "_out", "_oview", "_oend", "_rec", "_in", "_iview", "_istart", "_iend", "_spill", "_spos", "_spillbuf")

    def __init__(self, token_id: bytes, secret: bytes, *, client_side: bool, opened: int = 0) -> None:
        """`opened`: records of the peer's already opened (`opening_proves`)."""
        c_key, c_iv, d_key, d_iv = derive(token_id, secret)
        send_key, send_iv, recv_key, recv_iv = (c_key, c_iv, d_key, d_iv) if client_side else (d_key, d_iv, c_key, c_iv)
        self._seal = AESGCM(send_key)
        self._siv = int.from_bytes(send_iv, "big")
        self._sseq = 0
        self._open = AESGCM(recv_key)
        self._riv = int.from_bytes(recv_iv, "big")
        self._rseq = opened
        self._out = anonymous(_OUT_SIZE)
        self._oview = memoryview(self._out)
        self._oend = 0
        """Bytes waiting in `_out`: sealed records, then the open record (header room + plaintext)."""
        self._rec = -1
        """Where the open record starts in `_out` (its header); -1: none."""
        self._in = anonymous(_IN_SIZE)
        self._iview = memoryview(self._in)
        self._istart = self._iend = 0
        self._spill: memoryview | None = None
        """A record opened that did not fit the caller's buffer: its plaintext, served from `_spos`."""
        self._spos = 0
        self._spillbuf: memoryview | None = None

    # --- sending ---------------------------------------------------------------------------------
    @property
    def pending(self) -> int:
        """Bytes waiting to be sent (the open record counted as it will be)."""
        return self._oend + (TAG if self._rec >= 0 else 0)

    def space(self, most: int) -> memoryview:
        """Room for up to `most` (> 0) plaintext bytes at the end of the open record (one is
        started if needed); `wrote(n)` reports what was put there."""
        if self._rec < 0 or self._oend - self._rec - HEAD.size >= MAX_RECORD:
            self._start()
        room = MAX_RECORD - (self._oend - self._rec - HEAD.size)
        return self._oview[self._oend : self._oend + min(room, most)]

    def wrote(self, n: int) -> None:
        self._oend += n
        if self._oend - self._rec - HEAD.size >= MAX_RECORD:
            self._close()

    def write(self, data: bytes | bytearray | memoryview) -> None:
        """Add `data` to the open record (more records as it fills)."""
        view = memoryview(data).cast("B")
        while view:
            dst = self.space(len(view))
            n = len(dst)
            dst[:] = view[:n]
            self.wrote(n)
            view = view[n:]

    def write_parts(self, parts: list[bytes]) -> None:
        for p in parts:
            self.write(p)

    def take(self) -> memoryview:
        """Seal the open record; every sealed byte not yet sent (valid until `sent`)."""
        if self._rec >= 0:
            self._close()
        return self._oview[: self._oend]

    def sent(self) -> None:
        """What `take` gave went out."""
        self._oend = 0

    def _start(self) -> None:
        if self._rec >= 0:
            self._close()
        need = self._oend + HEAD.size + MAX_RECORD + TAG
        if need > len(self._out):  # more than a send's worth waiting: a new, larger buffer
            out = anonymous(max(need, 2 * len(self._out)))
            out[: self._oend] = self._oview[: self._oend]
            self._out, self._oview = out, memoryview(out)
        self._rec = self._oend
        self._oend += HEAD.size

    def _close(self) -> None:
        rec = self._rec
        self._rec = -1
        start = rec + HEAD.size
        n = self._oend - start
        if not n:
            self._oend = rec
            return
        HEAD.pack_into(self._out, rec, n + TAG)
        view = self._oview
        self._seal.encrypt_into(self._nonce(self._siv, self._sseq), view[start : start + n], view[rec:start], view[start : start + n + TAG])
        self._sseq += 1
        self._oend = start + n + TAG

    @staticmethod
    def _nonce(iv: int, seq: int) -> bytes:
        return (iv ^ seq).to_bytes(IV_BYTES, "big")

    # --- receiving -------------------------------------------------------------------------------
    @property
    def held(self) -> int:
        """Bytes received and not yet given out: unopened ciphertext and opened plaintext left."""
        spilled = len(self._spill) - self._spos if self._spill is not None else 0
        return self._iend - self._istart + spilled

    def recv_space(self) -> memoryview:
        """Where the next bytes from the socket go (`received(n)` reports them)."""
        if self._istart == self._iend:
            self._istart = self._iend = 0
        elif len(self._in) - self._iend < _IN_ROOM:
            left = self._iend - self._istart
            self._in.move(0, self._istart, left)  # memmove: the ranges may overlap
            self._istart, self._iend = 0, left
        return self._iview[self._iend :]

    def received(self, n: int) -> None:
        self._iend += n

    def open_into(self, view: memoryview) -> int:
        """Open the whole records received into `view`, as far as it holds (the record that
        does not fit is opened aside and given in pieces, here and in the next calls); 0 when
        more must be received.

        Raises:
            RemoteProtocolError: a record that does not open (altered, out of order, from
                another key: the peer or someone on the path broke the stream), or a
                malformed length.
        """
        got = 0
        size = len(view)
        if self._spill is not None:
            got = self._serve_spill(view)
            if self._spill is not None:
                return got
        buf, iview = self._in, self._iview
        while got < size:
            start = self._istart
            avail = self._iend - start
            if avail < HEAD.size:
                return got
            (clen,) = HEAD.unpack_from(buf, start)
            if clen < TAG or clen > MAX_RECORD + TAG:
                raise RemoteProtocolError(f"malformed sealed record (length {clen})")
            if avail < HEAD.size + clen:
                return got
            plain = clen - TAG
            body = iview[start + HEAD.size : start + HEAD.size + clen]
            head = iview[start : start + HEAD.size]
            if plain <= size - got:
                self._decrypt(body, head, view[got : got + plain])
                got += plain
                self._istart = start + HEAD.size + clen
                continue
            if self._spillbuf is None:
                self._spillbuf = memoryview(anonymous(MAX_RECORD))
            spill = self._spillbuf[:plain]
            self._decrypt(body, head, spill)
            self._istart = start + HEAD.size + clen
            self._spill, self._spos = spill, 0
            return got + self._serve_spill(view[got:])
        return got

    def _decrypt(self, body: memoryview, head: memoryview, dst: memoryview) -> None:
        try:
            self._open.decrypt_into(self._nonce(self._riv, self._rseq), body, head, dst)
        except InvalidTag:
            raise RemoteProtocolError("a sealed record did not authenticate (altered, reordered or from another stream)") from None
        self._rseq += 1

    def _serve_spill(self, view: memoryview) -> int:
        spill = self._spill
        assert spill is not None
        n = min(len(view), len(spill) - self._spos)
        view[:n] = spill[self._spos : self._spos + n]
        self._spos += n
        if self._spos == len(spill):
            self._spill = None
        return n
