"""seal.SealedChannel on its own: what one end seals the other opens byte for byte, however
the writes and the socket's reads are cut; a record altered, replayed, reflected back to its
sender, sealed under another token, or with a malformed length does not open."""

from __future__ import annotations

import os
import random

import pytest

from blit.errors import RemoteProtocolError
from blit.transport.seal import HEAD, MAX_RECORD, TAG, SealedChannel

TID, SECRET = bytes(range(8)), bytes(range(100, 124))


def _pair(tid: bytes = TID, secret: bytes = SECRET) -> tuple[SealedChannel, SealedChannel]:
    return SealedChannel(tid, secret, client_side=True), SealedChannel(tid, secret, client_side=False)


def _deliver(dst: SealedChannel, wire: bytes) -> None:
    space = dst.recv_space()
    assert len(space) >= len(wire)
    space[: len(wire)] = wire
    dst.received(len(wire))


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_what_is_sealed_opens_identical_however_it_is_cut(seed: int) -> None:
    rnd = random.Random(seed)
    client, daemon = _pair()
    sent, wire = bytearray(), bytearray()
    for _ in range(120):
        data = rnd.randbytes(rnd.choice([0, 1, 24, 4096, 100_000, MAX_RECORD, MAX_RECORD + 1, 1 << 20, 3 << 20]))
        if rnd.random() < 0.5:
            client.write(data)
        else:  # filled in place, as a pread does, in pieces
            view = memoryview(data)
            while view:
                space = client.space(len(view))
                n = rnd.randint(1, len(space))
                space[:n] = view[:n]
                client.wrote(n)
                view = view[n:]
        sent += data
        if rnd.random() < 0.3:
            wire += client.take()
            client.sent()
    wire += client.take()
    client.sent()
    assert sent[:65536] not in wire and len(wire) > len(sent)
    got, pos = bytearray(), 0
    out = memoryview(bytearray(1 << 20))
    while pos < len(wire):
        space = daemon.recv_space()
        n = min(len(space), rnd.randint(1, 700_000), len(wire) - pos)
        space[:n] = wire[pos : pos + n]
        daemon.received(n)
        pos += n
        while k := daemon.open_into(out[: rnd.randint(1, len(out))]):
            got += out[:k]
    assert bytes(got) == bytes(sent) and daemon.held == 0


def _one_record(text: bytes) -> bytearray:
    client, _ = _pair()
    client.write(text)
    return bytearray(client.take())


def test_an_altered_record_does_not_open() -> None:
    for at in (3, HEAD.size, HEAD.size + 5, -1):  # the length, the ciphertext, the tag
        wire = _one_record(b"hello world")
        wire[at] ^= 1
        _, daemon = _pair()
        _deliver(daemon, bytes(wire) + bytes(64))  # a length one more still finds its bytes
        with pytest.raises(RemoteProtocolError, match="did not authenticate"):
            daemon.open_into(memoryview(bytearray(100)))


def test_a_replayed_a_reflected_and_a_foreign_record_do_not_open() -> None:
    client, daemon = _pair()
    client.write(b"abc")
    record = bytes(client.take())
    client.sent()
    _deliver(daemon, record + record)  # the same record twice: the second is out of sequence
    out = memoryview(bytearray(100))
    with pytest.raises(RemoteProtocolError):
        daemon.open_into(out)
    _deliver(client, record)  # back to its sender: the other direction's key
    with pytest.raises(RemoteProtocolError):
        client.open_into(out)
    _, other = _pair(secret=bytes(24))  # another token's stream
    _deliver(other, record)
    with pytest.raises(RemoteProtocolError):
        other.open_into(out)


def test_a_malformed_length_is_refused_before_waiting_for_it() -> None:
    _, daemon = _pair()
    _deliver(daemon, HEAD.pack(MAX_RECORD + TAG + 1))
    with pytest.raises(RemoteProtocolError, match="malformed sealed record"):
        daemon.open_into(memoryview(bytearray(10)))
    _, daemon = _pair()
    _deliver(daemon, HEAD.pack(TAG - 1))
    with pytest.raises(RemoteProtocolError, match="malformed sealed record"):
        daemon.open_into(memoryview(bytearray(10)))


def test_the_two_directions_and_two_tokens_have_different_keys() -> None:
    a = _one_record(b"x" * 64)
    b = _one_record(b"x" * 64)
    assert a == b  # deterministic for one token and direction
    daemon_side = SealedChannel(TID, SECRET, client_side=False)
    daemon_side.write(b"x" * 64)
    assert bytes(daemon_side.take()) != bytes(a)
    other = SealedChannel(TID, os.urandom(24), client_side=True)
    other.write(b"x" * 64)
    assert bytes(other.take()) != bytes(a)
