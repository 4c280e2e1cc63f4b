"""Sealed data streams (the default with TLS, decisions R67): what crosses the data port is
AES-128-GCM records keyed by the token's secret, which itself never crosses it. Seen through a
recording proxy: no byte of a file and no byte of the secret on the wire, both ways. A record
altered on the way fails the stream and lands nothing; an opening replayed on a new connection
is refused; a data port that does not hold the key is refused before a file is sent; a daemon
with TLS refuses cleartext streams; and the previous form, a TLS session per stream, is still
admitted."""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import trio

from blit.errors import ConnectError
from blit.transport import data, protocol as p, tls
from blit.transport.client import LocalSink

from .conftest import Daemon, start_daemon
from .oneshot import OneConnection

MiB = 1 << 20
MARK = b"BLIT-PLAINTEXT-MARK-0123456789ab"


class _Proxy(OneConnection):
    """One TCP connection relayed to 127.0.0.1:`port`, both directions recorded; `alter(n,
    chunk)` may change a chunk going to the daemon (`n`: bytes relayed before it)."""

    def __init__(self, port: int, alter: Callable[[int, bytes], bytes] | None = None) -> None:
        self.target = port
        self.alter = alter
        self.up = bytearray()  # client -> daemon
        self.down = bytearray()  # daemon -> client
        super().__init__()

    def serve(self, client: socket.socket) -> None:
        daemon = socket.create_connection(("127.0.0.1", self.target), timeout=20)
        pumps = [
            threading.Thread(target=self._pump, args=(client, daemon, self.up, True), daemon=True),
            threading.Thread(target=self._pump, args=(daemon, client, self.down, False), daemon=True),
        ]
        for t in pumps:
            t.start()
        for t in pumps:
            t.join(30)
        daemon.close()

    def _pump(self, src: socket.socket, dst: socket.socket, log: bytearray, up: bool) -> None:
        try:
            while chunk := src.recv(1 << 16):
                if up and self.alter is not None:
                    chunk = self.alter(len(log), chunk)
                log += chunk
                dst.sendall(chunk)
        except OSError:
            pass
        for s in (dst, src):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass



def _payload(size: int) -> bytes:
    return (MARK * (size // len(MARK) + 1))[:size]


def _admit(port: int, token: bytes, *, sealed: bool = True, d: Daemon | None = None) -> data.StreamIO:
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    if sealed:
        return data.admit_client(sock, token, tls_ctx=None, fingerprint=None, sealed=True)
    assert d is not None
    return data.admit_client(sock, token, tls_ctx=tls.client_context(), fingerprint=d.info.fingerprint)


def _push_file(io: data.StreamIO, payload: bytes) -> None:
    """File 1 in one DATA frame, its END, and the stream's DONE."""
    try:
        io.send_all(p.pack_frame(p.FrameType.DATA, 1, 0, len(payload)), more=True)
        io.send_all(payload)
        io.send_all(p.pack_frame(p.FrameType.END, 1, len(payload)))
        io.send_all(p.pack_frame(p.FrameType.DONE))
    finally:
        io.close()


async def _open_push(s, size: int) -> p.TransferOpened:
    opened: p.TransferOpened = await s.call(p.OpenTransfer(module="data", path=b"dst", direction="push", streams=1))
    await s.call(p.ExpectFiles(transfer=opened.transfer, files=[p.FileOffer(id=1, path=b"f", size=size, mtime_ns=0, mode=0o644)]))
    return opened


async def test_a_push_shows_no_plaintext_and_no_secret_on_the_wire(nursery: trio.Nursery, tmp_path: Path) -> None:
    d = await start_daemon(nursery, tmp_path, tls=True, stall=10)
    (d.modules["data"] / "dst").mkdir()
    payload = _payload(3 * MiB + 12_345)
    async with d.session() as s:
        assert p.FEATURE_SEALED in s.peer.features
        opened = await _open_push(s, len(payload))
        token = opened.tokens[0]
        proxy = _Proxy(opened.data_port)
        try:
            await trio.to_thread.run_sync(lambda: _push_file(_admit(proxy.port, token), payload))
            with trio.fail_after(20):
                done = await s.call(p.FinishTransfer(transfer=opened.transfer))
        finally:
            await trio.to_thread.run_sync(proxy.close)
    assert done.failures == [] and done.files == 1
    assert (d.modules["data"] / "dst" / "f").read_bytes() == payload
    wire = bytes(proxy.up) + bytes(proxy.down)
    assert len(proxy.up) > len(payload)  # it all went through the proxy
    assert MARK[:16] not in wire
    assert token[p.TOKEN_ID_BYTES :] not in wire and token[p.TOKEN_ID_BYTES : p.TOKEN_ID_BYTES + 8] not in wire
    # In the clear: the hello (magic, version, the sealed flag, the token's id) and the answer.
    assert p.unpack_data_hello(bytes(proxy.up[: p.DATA_HELLO.size])) == (token[: p.TOKEN_ID_BYTES] + bytes(p.TOKEN_SECRET_BYTES), True)


async def test_a_pull_shows_no_plaintext_on_the_wire(nursery: trio.Nursery, tmp_path: Path) -> None:
    """The client's own path (RemoteTransfer.run_receivers), pointed at the proxy."""
    d = await start_daemon(nursery, tmp_path, tls=True, stall=10)
    payload = _payload(5 * MiB + 7)
    (d.modules["data"] / "x").write_bytes(payload)
    out = tmp_path / "x.out"
    async with d.session() as s:
        async with s.transfer("data", b"", "pull") as t:
            proxy = _Proxy(t.data_port)
            try:
                t.data_port = proxy.port
                await t.send_files([p.FileRef(id=1, path=b"x")], last=True)
                await t.run_receivers(LocalSink({1: (out, None, None)}))
            finally:
                await trio.to_thread.run_sync(proxy.close)
            assert t.carriers == ["raw"]
            secret = t.tokens[0][p.TOKEN_ID_BYTES :]
    assert out.read_bytes() == payload
    wire = bytes(proxy.up) + bytes(proxy.down)
    assert len(proxy.down) > len(payload)
    assert MARK[:16] not in wire
    assert secret not in wire


async def test_a_record_altered_on_the_way_fails_the_stream_and_lands_nothing(nursery: trio.Nursery, tmp_path: Path) -> None:
    d = await start_daemon(nursery, tmp_path, tls=True, stall=10)
    (d.modules["data"] / "dst").mkdir()
    payload = _payload(8 * MiB)

    def flip(before: int, chunk: bytes) -> bytes:
        at = 2 * MiB + 77 - before  # one bit of a record in the middle of the file
        if 0 <= at < len(chunk):
            return chunk[:at] + bytes([chunk[at] ^ 0x10]) + chunk[at + 1 :]
        return chunk

    async with d.session() as s:
        opened = await _open_push(s, len(payload))
        proxy = _Proxy(opened.data_port, alter=flip)
        try:

            def push() -> None:
                try:
                    _push_file(_admit(proxy.port, opened.tokens[0]), payload)
                except (OSError, data.TransportError):
                    pass  # the daemon ends the stream at the altered record

            await trio.to_thread.run_sync(push)
            with trio.fail_after(20):
                done = await s.call(p.FinishTransfer(transfer=opened.transfer))
        finally:
            await trio.to_thread.run_sync(proxy.close)
        assert (await s.modules()).modules  # the session goes on
    assert done.files == 0
    ((fid, message),) = [(f.id, f.message) for f in done.failures]
    assert fid == 1 and "did not authenticate" in message
    assert os.listdir(d.modules["data"] / "dst") == []


async def test_an_opening_replayed_on_a_new_connection_is_refused(nursery: trio.Nursery, tmp_path: Path) -> None:
    d = await start_daemon(nursery, tmp_path, tls=True, stall=10)
    (d.modules["data"] / "dst").mkdir()
    payload = _payload(100_000)
    async with d.session() as s:
        opened = await _open_push(s, len(payload))
        proxy = _Proxy(opened.data_port)
        try:
            await trio.to_thread.run_sync(lambda: _push_file(_admit(proxy.port, opened.tokens[0]), payload))
        finally:
            await trio.to_thread.run_sync(proxy.close)
        opening = bytes(proxy.up[: p.DATA_HELLO.size + 4 + p.DATA_HELLO.size + 16])  # hello + its sealed copy

        def replay() -> tuple[int, bytes]:
            with socket.create_connection(("127.0.0.1", opened.data_port), timeout=5) as sock:
                sock.sendall(opening)
                head = sock.recv(p.ADMIT.size, socket.MSG_WAITALL)
                status, n = p.ADMIT.unpack(head)
                return status, sock.recv(n, socket.MSG_WAITALL)

        status, message = await trio.to_thread.run_sync(replay)
        with trio.fail_after(20):
            done = await s.call(p.FinishTransfer(transfer=opened.transfer))
    assert status == p.AdmitStatus.BAD_TOKEN and b"data token" in message
    assert done.failures == [] and done.files == 1
    assert (d.modules["data"] / "dst" / "f").read_bytes() == payload


class _Impostor(OneConnection):
    """A data port that answers "admitted" in the clear without the key, then a record it
    cannot have sealed; records what it is sent."""

    def __init__(self) -> None:
        self.received = b""
        super().__init__(timeout=10)

    def serve(self, conn: socket.socket) -> None:
        conn.settimeout(5)
        try:
            self.received = conn.recv(p.DATA_HELLO.size, socket.MSG_WAITALL)
            conn.sendall(p.pack_admit(p.AdmitStatus.OK) + (p.DATA_HELLO.size + 16).to_bytes(4, "big") + os.urandom(p.DATA_HELLO.size + 16))
            while chunk := conn.recv(65536):
                self.received += chunk
        except OSError:
            pass


async def test_a_data_port_without_the_key_is_refused_before_a_byte_of_a_file(nursery: trio.Nursery, tmp_path: Path) -> None:
    d = await start_daemon(nursery, tmp_path, tls=True)
    (d.modules["data"] / "dst").mkdir()
    impostor = _Impostor()
    try:
        async with d.session() as s:
            opened = await _open_push(s, 10)
            with pytest.raises(ConnectError, match="does not hold the transfer's key"):
                await trio.to_thread.run_sync(lambda: _admit(impostor.port, opened.tokens[0]))
    finally:
        await trio.to_thread.run_sync(impostor.close)
    secret = opened.tokens[0][p.TOKEN_ID_BYTES :]
    assert impostor.received.startswith(p.DATA_MAGIC) and secret not in impostor.received
    assert len(impostor.received) == p.DATA_HELLO.size + 4 + p.DATA_HELLO.size + 16  # the hello and its sealed copy, no more


async def test_a_tls_daemon_refuses_a_cleartext_stream_and_the_token_stays_good(nursery: trio.Nursery, tmp_path: Path) -> None:
    d = await start_daemon(nursery, tmp_path, tls=True, stall=10)
    (d.modules["data"] / "dst").mkdir()
    payload = _payload(200_000)
    async with d.session() as s:
        opened = await _open_push(s, len(payload))

        def cleartext() -> None:
            sock = socket.create_connection(("127.0.0.1", opened.data_port), timeout=5)
            data.admit_client(sock, opened.tokens[0], tls_ctx=None, fingerprint=None, sealed=False)

        with pytest.raises(ConnectError, match="cleartext stream is refused"):
            await trio.to_thread.run_sync(cleartext)
        # The previous form, a TLS session per stream (a client before FEATURE_SEALED), is admitted.
        await trio.to_thread.run_sync(lambda: _push_file(_admit(opened.data_port, opened.tokens[0], sealed=False, d=d), payload))
        with trio.fail_after(20):
            done = await s.call(p.FinishTransfer(transfer=opened.transfer))
    assert done.failures == [] and done.files == 1
    assert (d.modules["data"] / "dst" / "f").read_bytes() == payload


async def test_a_daemon_without_tls_refuses_a_sealed_stream(nursery: trio.Nursery, tmp_path: Path) -> None:
    d = await start_daemon(nursery, tmp_path, tls=False, stall=10)
    (d.modules["data"] / "dst").mkdir()
    async with d.session() as s:
        assert p.FEATURE_SEALED in s.peer.features  # the feature names what the port takes with TLS on
        opened = await _open_push(s, 10)
        with pytest.raises(ConnectError, match="sealed data stream needs a daemon with TLS"):
            await trio.to_thread.run_sync(lambda: _admit(opened.data_port, opened.tokens[0]))


def _rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


def test_openings_that_name_a_live_token_without_its_secret_cost_the_daemon_nothing(tmp_path: Path) -> None:
    """Anyone who sees a data port's traffic learns a live token's id. 300 connections naming it
    and holding back their proof, then 300 with a proof that does not open: the daemon's memory
    stays where it was, each is refused, and the token stays good. Before, each built the
    stream's 1.6 MiB of buffers before the proof came: 400 took a daemon from 62 to 472 MB, and
    it kept them (QA pass 8)."""
    from blit.endpoint import HostSpec
    from blit.transport.client import open_session

    from .conftest import run_daemon_process

    with run_daemon_process(tmp_path) as d:
        (d.modules["data"] / "dst").mkdir()

        async def main() -> None:
            async with open_session(HostSpec("127.0.0.1", d.port), known_hosts=tmp_path / "kh") as s:
                opened = await _open_push(s, 1000)
                hello = p.pack_data_hello(opened.tokens[0], sealed=True)
                forged = hello + (len(hello) + 16).to_bytes(4, "big") + os.urandom(len(hello) + 16)

                def knock(n: int) -> list[int]:
                    statuses = []
                    for _ in range(n):
                        with socket.create_connection(("127.0.0.1", opened.data_port), timeout=10) as sock:
                            sock.sendall(forged)
                            statuses.append(p.ADMIT.unpack(sock.recv(p.ADMIT.size, socket.MSG_WAITALL))[0])
                    return statuses

                def hold(n: int) -> int:
                    """n connections that send the hello alone, all open at once: the daemon's
                    growth meanwhile (KiB)."""
                    socks = []
                    try:
                        for _ in range(n):
                            sock = socket.create_connection(("127.0.0.1", opened.data_port), timeout=10)
                            socks.append(sock)
                            sock.sendall(hello)
                        time.sleep(1)
                        return _rss_kib(d.proc.pid) - before
                    finally:
                        for sock in socks:
                            sock.close()

                await trio.to_thread.run_sync(knock, 5)  # the daemon's first admissions warm up
                before = _rss_kib(d.proc.pid)
                held = await trio.to_thread.run_sync(hold, 300)
                async with trio.open_nursery() as n:  # four at once, as an attacker would
                    for _ in range(4):
                        n.start_soon(trio.to_thread.run_sync, lambda: results.extend(knock(75)))
                grown = _rss_kib(d.proc.pid) - before
                assert held < 40 * 1024, f"the daemon grew by {held} KiB while 300 openings waited"
                assert results == [p.AdmitStatus.BAD_TOKEN] * 300
                assert grown < 40 * 1024, f"the daemon grew by {grown} KiB"
                # The token was not spent: its own client still gets in.
                await trio.to_thread.run_sync(lambda: _push_file(_admit(opened.data_port, opened.tokens[0]), b"x" * 1000))
                with trio.fail_after(20):
                    done = await s.call(p.FinishTransfer(transfer=opened.transfer))
                assert done.failures == [] and done.files == 1

        results: list[int] = []
        trio.run(main)


class _Trickle(OneConnection):
    """A data port that admits in the clear, then sends a byte of a record every 0.5 s."""

    def serve(self, conn: socket.socket) -> None:
        conn.settimeout(5)
        try:
            conn.recv(4096)
            conn.sendall(p.pack_admit(p.AdmitStatus.OK))
            for b in (33).to_bytes(4, "big") + bytes(33):
                conn.sendall(bytes([b]))
                time.sleep(0.5)
        except OSError:
            pass


def test_a_data_port_that_trickles_its_answer_is_given_up_on_at_the_admission_deadline() -> None:
    """Each read's own timeout never fired: a byte every 0.5 s held the client for ever (QA
    pass 8: killed at 240 s). Admission has one deadline for all its reads."""
    trickle = _Trickle()
    t0 = time.monotonic()
    try:
        with pytest.raises(ConnectError, match="timed out"):
            sock = socket.create_connection(("127.0.0.1", trickle.port), timeout=5)
            data.admit_client(sock, bytes(32), tls_ctx=None, fingerprint=None, sealed=True, timeout=2)
    finally:
        trickle.close()
    assert time.monotonic() - t0 < 4


async def test_without_a_cryptography_that_seals_in_place_streams_are_tls_sessions(
    nursery: trio.Nursery, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """cryptography before 47 has no encrypt_into: with it every TLS transfer failed (a client's
    traceback, a daemon's dropped streams; QA pass 8). Neither end then offers sealed streams,
    and a stream is a TLS session as before R67."""
    from blit.transport import seal
    from blit.transport.remote import remote_transfer

    monkeypatch.setattr(seal, "AVAILABLE", False)
    d = await start_daemon(nursery, tmp_path, tls=True, stall=10)
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_bytes(_payload(300_000))
    async with d.session() as s:
        assert p.FEATURE_SEALED not in s.peer.features
    summary = await remote_transfer("copy", f"{src}/", f"127.0.0.1:{d.info.port}:/data/t/", known_hosts=d.known_hosts)
    assert summary.failures == [] and summary.files_copied == 1 and summary.strategy.startswith("push:tcp:")
    assert (d.modules["data"] / "t" / "f").read_bytes() == (src / "f").read_bytes()
