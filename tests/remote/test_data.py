"""The data plane: token admission, raw and HTTP/2 streams moving files byte-exact, failures per
file, and the stall watchdog."""

from __future__ import annotations

import hashlib
import os
import socket
import time
from pathlib import Path

import pytest
import trio

from blit.errors import ConnectError, RemoteError, StallError
from blit.transport import data, protocol as p
from blit.transport.client import LocalSink, LocalSource
from blit.transport.protocol import ErrorCode, Refused

from .conftest import Daemon, start_daemon

MiB = 1 << 20


# --- tokens ------------------------------------------------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_tokens_are_single_use_and_secret_checked() -> None:
    table = data.GrantTable(ttl=30)
    owner = object()
    tok = table.issue(owner)
    assert len(tok) == 32 and table.outstanding(owner) == 1
    assert table.redeem(tok) is owner
    with pytest.raises(Refused, match="already used") as info:
        table.redeem(tok)
    assert info.value.code is ErrorCode.BAD_TOKEN
    tok2 = table.issue(owner)
    for wrong in (tok2[:8] + bytes(24), tok2[:8] + tok2[8:-1] + bytes([tok2[-1] ^ 1])):
        with pytest.raises(Refused, match="unknown or already used"):
            table.redeem(wrong)
    # Knowing the id is not enough to spend the token: its owner still can, once.
    assert table.outstanding(owner) == 1
    assert table.redeem(tok2) is owner
    with pytest.raises(Refused, match="already used"):
        table.redeem(tok2)
    with pytest.raises(Refused, match="unknown"):  # an unknown id with the dummy's all-zero secret
        table.redeem(bytes(8) + bytes(24))
    with pytest.raises(Refused, match="malformed"):
        table.redeem(b"short")


def test_tokens_expire() -> None:
    clock = FakeClock()
    table = data.GrantTable(ttl=5, clock=clock)
    owner = object()
    tok = table.issue(owner)
    clock.now += 6
    with pytest.raises(Refused, match="expired"):
        table.redeem(tok)


def test_tokens_carry_at_least_128_random_bits() -> None:
    table = data.GrantTable()
    toks = {table.issue(None) for _ in range(1000)}
    assert len(toks) == 1000
    assert p.TOKEN_SECRET_BYTES * 8 >= 128


def test_revoke_drops_an_owners_grants() -> None:
    table = data.GrantTable()
    a, b = object(), object()
    ta = table.issue(a)
    table.issue(b)
    assert table.revoke(a) == 1
    with pytest.raises(Refused):
        table.redeem(ta)
    assert table.outstanding(b) == 1


# --- admission on the wire -------------------------------------------------------------------


def _admit(d: Daemon, token: bytes) -> None:
    from blit.transport import tls

    sock = socket.create_connection(("127.0.0.1", d.info.data_port), timeout=5)
    io = data.admit_client(sock, token, tls_ctx=tls.client_context() if d.tls else None, fingerprint=d.info.fingerprint)
    io.close()


async def _open_transfer(s, direction: str = "pull") -> p.TransferOpened:
    return await s.call(p.OpenTransfer(module="data", path=b"", direction=direction, streams=2))


async def test_wrong_reused_and_expired_tokens_are_refused(nursery: trio.Nursery, tmp_path: Path, tls_mode: bool) -> None:
    d = await start_daemon(nursery, tmp_path, tls=tls_mode, token_ttl=0.5)
    async with d.session() as s:
        opened = await _open_transfer(s)
        good, other = opened.tokens
        bad = good[:8] + bytes(24)
        with pytest.raises(ConnectError, match="refused by the daemon: unknown or already used"):
            await trio.to_thread.run_sync(_admit, d, bad)
        # A wrong secret does not spend the token: its owner is still admitted with it, once.
        await trio.to_thread.run_sync(_admit, d, good)
        with pytest.raises(ConnectError, match="unknown or already used"):
            await trio.to_thread.run_sync(_admit, d, good)
        await trio.sleep(0.8)
        with pytest.raises(ConnectError, match="expired"):
            await trio.to_thread.run_sync(_admit, d, other)
        # The daemon keeps serving.
        assert (await s.modules()).modules


async def test_a_non_blit_peer_on_the_data_port_is_dropped(daemon: Daemon) -> None:
    def poke() -> bytes:
        with socket.create_connection(("127.0.0.1", daemon.info.data_port), timeout=15) as sock:
            sock.sendall(b"\x16\x03\x01" + os.urandom(200) if not daemon.tls else b"x" * 44)
            try:
                return sock.recv(100)
            except OSError:
                return b""

    await trio.to_thread.run_sync(poke)
    async with daemon.session() as s:
        assert (await s.modules()).modules


async def test_h2_data_tokens_are_checked_too(nursery: trio.Nursery, tmp_path: Path) -> None:
    from .conftest import h2_post, raw_h2

    d = await start_daemon(nursery, tmp_path, tls=True, force_h2_data=True)
    async with raw_h2(d) as conn:
        await h2_post(conn, "/blit/hello", p.encode(p.Hello(protocol=1, software="t")))
        status, body = await h2_post(conn, p.DATA_PATH, b"", [(p.TOKEN_HEADER, b"00" * 32)])
        assert status == 403 and p.decode(p.Error, body).error == "bad-token"
        status, body = await h2_post(conn, p.DATA_PATH, b"", [(p.TOKEN_HEADER, b"zz")])
        assert status == 403


# --- moving files ----------------------------------------------------------------------------


def make_file(path: Path, size: int, *, seed: int = 1) -> str:
    h = hashlib.sha256()
    block = hashlib.sha256(str(seed).encode()).digest() * (MiB // 32)
    with open(path, "wb") as f:
        left = size
        i = 0
        while left:
            chunk = block[: min(left, len(block))]
            chunk = i.to_bytes(8, "little") + chunk[8:] if len(chunk) >= 8 else chunk
            f.write(chunk)
            h.update(chunk)
            left -= len(chunk)
            i += 1
    return h.hexdigest()


def digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(8 * MiB):
            h.update(chunk)
    return h.hexdigest()


@pytest.mark.parametrize("force_h2", [False, True], ids=["raw", "h2"])
async def test_pull_100_mib_byte_exact(daemon_any_tls: Daemon, tmp_path: Path, force_h2: bool) -> None:
    d = daemon_any_tls
    src = d.modules["data"] / "big.bin"
    want = await trio.to_thread.run_sync(make_file, src, 100 * MiB)
    os.utime(src, ns=(1_600_000_000_123_456_789, 1_600_000_000_123_456_789))
    out = tmp_path / "out"
    out.mkdir()
    async with d.session(force_h2_data=force_h2) as s:
        async with s.transfer("data", b"", "pull", streams=1) as t:
            await t.send_files([p.FileRef(id=1, path=b"big.bin")], last=True)
            t0 = time.perf_counter()
            await t.run_receivers(LocalSink({1: (out / "big.bin", 1_600_000_000_123_456_789, 0o640)}))
            elapsed = time.perf_counter() - t0
            done = await t.finish()
    assert t.carriers == (["h2"] if force_h2 else ["raw"])
    assert done.files == 1 and done.nbytes == 100 * MiB and not done.failures
    assert await trio.to_thread.run_sync(digest, out / "big.bin") == want
    st = os.stat(out / "big.bin")
    assert st.st_mtime_ns == 1_600_000_000_123_456_789 and st.st_mode & 0o777 == 0o640
    print(f"pull 100 MiB {'h2' if force_h2 else 'raw'} tls={d.tls}: {100 / elapsed:.0f} MiB/s")


@pytest.mark.parametrize("force_h2", [False, True], ids=["raw", "h2"])
async def test_push_100_mib_byte_exact(daemon_any_tls: Daemon, tmp_path: Path, force_h2: bool) -> None:
    d = daemon_any_tls
    src = tmp_path / "big.bin"
    want = await trio.to_thread.run_sync(lambda: make_file(src, 100 * MiB, seed=2))
    (d.modules["data"] / "dst").mkdir()
    async with d.session(force_h2_data=force_h2) as s:
        async with s.transfer("data", b"dst", "push", streams=1) as t:
            await t.expect_files([p.FileOffer(id=7, path=b"big.bin", size=100 * MiB, mtime_ns=1_500_000_000_000_000_000, mode=0o600)])
            jobs = data.JobQueue()
            jobs.put_many([7])
            jobs.close()
            t0 = time.perf_counter()
            await t.run_senders(LocalSource({7: src}), jobs)
            done = await t.finish()
            elapsed = time.perf_counter() - t0
    assert done.files == 1 and done.nbytes == 100 * MiB and not done.failures, done
    landed = d.modules["data"] / "dst" / "big.bin"
    assert await trio.to_thread.run_sync(digest, landed) == want
    assert os.stat(landed).st_mtime_ns == 1_500_000_000_000_000_000
    assert sorted(os.listdir(d.modules["data"] / "dst")) == ["big.bin"]  # no temporary left
    print(f"push 100 MiB {'h2' if force_h2 else 'raw'} tls={d.tls}: {100 / elapsed:.0f} MiB/s")


@pytest.mark.parametrize("force_h2", [False, True], ids=["raw", "h2"])
async def test_many_files_over_several_streams_with_per_file_failures(daemon: Daemon, tmp_path: Path, force_h2: bool) -> None:
    d = daemon
    mod = d.modules["data"]
    (mod / "dir").mkdir()
    sizes = {}
    for i in range(300):
        size = (i * 7919) % (3 * 300_000)  # 0 .. ~900 KB: both small-file and sendfile paths
        name = f"f{i:03d}"
        (mod / "dir" / name).write_bytes(os.urandom(size))
        sizes[i] = size
    os.symlink("/etc/passwd", mod / "dir" / "evil")
    (mod / "dir" / "sparse").touch()
    with open(mod / "dir" / "sparse", "r+b") as f:
        f.truncate(8 * MiB)
        f.seek(3 * MiB)
        f.write(b"island")
    out = tmp_path / "out"
    out.mkdir()
    sink = LocalSink({i: (out / f"f{i:03d}", None, None) for i in sizes})
    sink.targets[1000] = (out / "evil", None, None)
    sink.targets[1001] = (out / "missing", None, None)
    sink.targets[1002] = (out / "sparse", None, None)
    refs = [p.FileRef(id=i, path=f"f{i:03d}".encode()) for i in sizes]
    refs += [p.FileRef(id=1000, path=b"evil"), p.FileRef(id=1001, path=b"missing"), p.FileRef(id=1002, path=b"sparse")]
    async with d.session(force_h2_data=force_h2) as s:
        async with s.transfer("data", b"dir", "pull", streams=3) as t:
            await t.send_files(refs[:150])
            await t.send_files(refs[150:], last=True)
            await t.run_receivers(sink)
            done = await t.finish()
    assert len(t.carriers) == 3
    assert {f.id for f in done.failures} == {1000, 1001}
    for i, size in sizes.items():
        assert (out / f"f{i:03d}").read_bytes() == (mod / "dir" / f"f{i:03d}").read_bytes()
    assert not (out / "evil").exists() and not (out / "missing").exists()
    sparse = out / "sparse"
    assert sparse.stat().st_size == 8 * MiB
    assert sparse.read_bytes()[3 * MiB : 3 * MiB + 6] == b"island"
    if not force_h2:
        assert sparse.stat().st_blocks * 512 < 2 * MiB  # holes kept
    assert sorted(os.listdir(out)) == sorted([f"f{i:03d}" for i in sizes] + ["sparse"])


async def test_unreachable_data_port_falls_back_to_http2(nursery: trio.Nursery, tmp_path: Path) -> None:
    d = await start_daemon(nursery, tmp_path, tls=True)
    (d.modules["data"] / "x").write_bytes(b"payload" * 1000)
    out = tmp_path / "x.out"
    async with d.session() as s:
        async with s.transfer("data", b"", "pull") as t:
            with socket.socket() as closed:
                closed.bind(("127.0.0.1", 0))
                t.data_port = closed.getsockname()[1]  # nothing listens there
            await t.send_files([p.FileRef(id=1, path=b"x")], last=True)
            await t.run_receivers(LocalSink({1: (out, None, None)}))
            done = await t.finish()
    assert t.carriers == ["h2"]
    assert done.files == 1 and out.read_bytes() == b"payload" * 1000


async def test_forced_h2_daemon_grants_no_data_port(nursery: trio.Nursery, tmp_path: Path) -> None:
    d = await start_daemon(nursery, tmp_path, tls=False, force_h2_data=True)
    assert d.info.data_port is None
    async with d.session() as s:
        assert s.peer.data_port is None
        opened = await _open_transfer(s)
        assert opened.data_port is None


async def test_a_stalled_sender_is_detected(nursery: trio.Nursery, tmp_path: Path) -> None:
    """A daemon-side receiver whose client stops sending mid-frame gives up after the stall
    timeout, and the partial file is not left behind."""
    d = await start_daemon(nursery, tmp_path, tls=False, stall=1.0)
    (d.modules["data"] / "dst").mkdir()
    async with d.session() as s:
        opened = await s.call(p.OpenTransfer(module="data", path=b"dst", direction="push", streams=1))
        await s.call(p.ExpectFiles(transfer=opened.transfer, files=[p.FileOffer(id=1, path=b"f", size=10, mtime_ns=0, mode=0o644)]))

        def stall_mid_frame() -> socket.socket:
            sock = socket.create_connection(("127.0.0.1", opened.data_port), timeout=5)
            io = data.admit_client(sock, opened.tokens[0], tls_ctx=None, fingerprint=None)
            io.sock.setblocking(True)
            io.sock.sendall(p.pack_frame(p.FrameType.DATA, 1, 0, 10) + b"abc")  # 7 bytes never come
            return io.sock

        sock = await trio.to_thread.run_sync(stall_mid_frame)
        try:
            t0 = trio.current_time()
            done = await s.call(p.FinishTransfer(transfer=opened.transfer))  # waits for the stream
            waited = trio.current_time() - t0
        finally:
            sock.close()
        assert done.files == 0
        ((fid, message),) = [(f.id, f.message) for f in done.failures]
        assert fid == 1 and "no progress for 1 s" in message
        assert (await s.modules()).modules  # the session goes on
    assert waited < 8
    assert os.listdir(d.modules["data"] / "dst") == []


async def test_run_worker_raises_stall_error_for_a_stuck_thread() -> None:
    import threading

    release = threading.Event()
    stats = data.StreamStats(what="stuck disk")
    with pytest.raises(StallError) as info:
        await data.run_worker(lambda: release.wait(5), kick=release.set, stats=stats, stall=0.5)
    assert info.value.what == "stuck disk" and info.value.seconds == 0.5


async def test_run_worker_is_cancelled_promptly() -> None:
    import threading

    release = threading.Event()
    stats = data.StreamStats()
    t0 = trio.current_time()

    def work() -> None:
        release.wait(10)
        raise data.TransportError("kicked")

    with trio.move_on_after(0.3):
        await data.run_worker(work, kick=release.set, stats=stats, stall=60)
    assert trio.current_time() - t0 < 2


def test_a_stopped_stream_lands_nothing_more_of_what_its_socket_holds() -> None:
    """Ctrl-C (or the session's end) kicks a receiving stream: what the socket still holds is
    not landed. It used to go on landing what it could still read, small files landing after the
    user asked to stop (in a real pull 2,000-5,000 of them, 0.4-0.6 s)."""
    landed: list[int] = []

    class Sink:
        def open(self, file_id: int) -> data.SinkFile:
            raise KeyError(file_id)

        def land_many(self, batch: list[tuple[int, int, int]], buf: object) -> list[object]:
            landed.extend(fid for fid, _pos, _len in batch)
            return []

    with socket.create_server(("127.0.0.1", 0)) as server:
        b = socket.create_connection(server.getsockname())
        a, _ = server.accept()
    try:
        b.setblocking(False)
        content = b"x" * 4096
        queued = 0
        for fid in range(1, 100_000):
            frames = p.FRAME.pack(p.FrameType.DATA, 0, 0, fid, 0, len(content)) + content + p.FRAME.pack(p.FrameType.END, 0, 0, fid, len(content), 0)
            try:
                sent = b.send(frames)
            except BlockingIOError:
                break
            if sent < len(frames):  # the buffers are full
                break
            queued += 1
        assert queued > 100, "the socket holds many files"
        io = data.StreamIO(a, what="data stream", stall=5)
        io.kick()
        with pytest.raises(data.TransportError, match="stopped"):
            data.receive_loop(io, Sink(), data.StreamStats())
        assert landed == []
    finally:
        a.close()
        b.close()
