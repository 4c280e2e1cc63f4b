"""TLS data streams (the default): large random and sparse files land byte-identical both ways, a
stream whose peer vanishes mid-file fails that file and leaves nothing behind, and a data port
that presents another certificate than the daemon's is refused before the token is sent."""

from __future__ import annotations

import os
import socket
import ssl
import subprocess
import time
from pathlib import Path

import pytest
import trio

from blit.errors import ConnectError
from blit.transport import data, protocol as p, tls
from blit.transport.client import LocalSink
from blit.transport.remote import remote_transfer
from blit.transport.tlsbio import TLSBio

from .conftest import DaemonProcess, blit_cmd, run_daemon_process, start_daemon
from .oneshot import OneConnection
from .treeutil import sparse_ok

MiB = 1 << 20


def _random_file(path: Path, size: int) -> None:
    with open(path, "wb") as f:
        while size:
            n = min(size, 4 * MiB)
            f.write(os.urandom(n))
            size -= n


def _sparse_file(path: Path) -> None:
    """40 MiB with two random islands at odd offsets (not on a TLS record or MiB boundary) and a
    trailing hole."""
    with open(path, "wb") as f:
        f.truncate(40 * MiB)
        f.seek(MiB + 3)
        f.write(os.urandom(100_000))
        f.seek(17 * MiB + 12_345)
        f.write(os.urandom(3 * MiB + 7))


def _tree(root: Path) -> None:
    root.mkdir(parents=True, exist_ok=True)
    _random_file(root / "big.bin", 64 * MiB + 12_345)
    _sparse_file(root / "sparse.img")
    for i in range(20):  # small files: the batched path on the same streams
        (root / f"small{i:02d}").write_bytes(os.urandom(i * 997))


def _same_bytes(a: Path, b: Path) -> bool:
    with open(a, "rb") as fa, open(b, "rb") as fb:
        while True:
            x, y = fa.read(8 * MiB), fb.read(8 * MiB)
            if x != y:
                return False
            if not x:
                return True


@pytest.mark.parametrize("direction", ["push", "pull"])
async def test_large_and_sparse_files_land_identical_over_tls(nursery: trio.Nursery, tmp_path: Path, direction: str) -> None:
    d = await start_daemon(nursery, tmp_path, tls=True)
    src = tmp_path / "src" if direction == "push" else d.modules["data"] / "t"
    dst = d.modules["data"] / "t" if direction == "push" else tmp_path / "out"
    await trio.to_thread.run_sync(_tree, src)
    url = f"127.0.0.1:{d.info.port}:/data/t/"
    a, b = (f"{src}/", url) if direction == "push" else (url, f"{dst}/")
    summary = await remote_transfer("copy", a, b, known_hosts=d.known_hosts)
    assert summary.failures == [] and summary.files_copied == 22
    assert summary.strategy.startswith(f"{direction}:tcp:")  # raw streams, not the HTTP/2 fallback
    assert sorted(os.listdir(dst)) == sorted(os.listdir(src))
    for name in os.listdir(src):
        assert await trio.to_thread.run_sync(_same_bytes, src / name, dst / name), name
    assert sparse_ok(dst / "sparse.img")


@pytest.mark.parametrize("ending", ["tcp-close", "close-notify", "sealed-close"])
async def test_a_tls_stream_cut_mid_file_fails_the_file_and_leaves_nothing(nursery: trio.Nursery, tmp_path: Path, ending: str) -> None:
    """The client sends 2 MiB of an 8 MiB file, then its stream ends (a plain TCP close, or a
    TLS close_notify first; or a sealed stream's plain close): the daemon reports the file as
    failed because the peer closed the stream, and lands nothing."""
    d = await start_daemon(nursery, tmp_path, tls=True, stall=10)
    (d.modules["data"] / "dst").mkdir()
    async with d.session() as s:
        opened = await s.call(p.OpenTransfer(module="data", path=b"dst", direction="push", streams=1))
        await s.call(p.ExpectFiles(transfer=opened.transfer, files=[p.FileOffer(id=1, path=b"f", size=8 * MiB, mtime_ns=0, mode=0o644)]))

        def send_part_then_end() -> None:
            sock = socket.create_connection(("127.0.0.1", opened.data_port), timeout=5)
            sealed = ending == "sealed-close"
            io = data.admit_client(sock, opened.tokens[0], tls_ctx=None if sealed else tls.client_context(), fingerprint=d.info.fingerprint, sealed=sealed)
            try:
                io.send_all(p.pack_frame(p.FrameType.DATA, 1, 0, 8 * MiB), more=True)
                io.send_all(os.urandom(2 * MiB))
                if ending == "close-notify":
                    assert isinstance(io.records, TLSBio)
                    try:
                        io.records.obj.unwrap()  # queues close_notify; the daemon's answer is not awaited
                    except ssl.SSLWantReadError:
                        pass
                    io.sock.sendall(io.records.take())
            finally:
                io.close()

        await trio.to_thread.run_sync(send_part_then_end)
        with trio.fail_after(10):
            done = await s.call(p.FinishTransfer(transfer=opened.transfer))
        assert done.files == 0
        ((fid, message),) = [(f.id, f.message) for f in done.failures]
        assert fid == 1 and "the peer closed the stream" in message
        assert (await s.modules()).modules  # the session goes on
    assert os.listdir(d.modules["data"] / "dst") == []


@pytest.mark.parametrize("form", ["sealed", "tls"])
async def test_a_tls_file_trickling_slower_than_the_low_mark_lands(nursery: trio.Nursery, tmp_path: Path, form: str) -> None:
    """A receiver inside a large TLS payload waits for data.LOWAT bytes at a time (fewer
    wake-ups); a link too slow to bring them within the stall timeout must not be taken for a
    stall: 160 KiB sent 16 KiB every 0.3 s (3 s in all, the daemon's stall timeout 2 s) land
    whole."""
    d = await start_daemon(nursery, tmp_path, tls=True, stall=2)
    (d.modules["data"] / "dst").mkdir()
    size, piece = 160 << 10, 16 << 10
    assert data.LOWAT_MIN <= size and 2 < (size // piece) * 0.3
    payload = os.urandom(size)
    async with d.session() as s:
        opened = await s.call(p.OpenTransfer(module="data", path=b"dst", direction="push", streams=1))
        await s.call(p.ExpectFiles(transfer=opened.transfer, files=[p.FileOffer(id=1, path=b"f", size=size, mtime_ns=0, mode=0o644)]))

        def trickle() -> None:
            sock = socket.create_connection(("127.0.0.1", opened.data_port), timeout=5)
            sealed = form == "sealed"
            io = data.admit_client(sock, opened.tokens[0], tls_ctx=None if sealed else tls.client_context(), fingerprint=d.info.fingerprint, sealed=sealed)
            try:
                io.send_all(p.pack_frame(p.FrameType.DATA, 1, 0, size), more=True)
                for at in range(0, size, piece):
                    io.send_all(payload[at : at + piece])
                    time.sleep(0.3)
                io.send_all(p.pack_frame(p.FrameType.END, 1, size, 0))
                io.send_all(p.pack_frame(p.FrameType.DONE))
            finally:
                io.close()

        await trio.to_thread.run_sync(trickle)
        with trio.fail_after(10):
            done = await s.call(p.FinishTransfer(transfer=opened.transfer))
        assert done.failures == [] and done.files == 1
    assert (d.modules["data"] / "dst" / "f").read_bytes() == payload


class _ImpostorTLS(OneConnection):
    """A TLS server on 127.0.0.1 with its own certificate; records what it is sent."""

    def __init__(self, tmp: Path) -> None:
        cert_pem, key_pem = tls.make_self_signed("impostor")
        (tmp / "imp.crt").write_bytes(cert_pem)
        (tmp / "imp.key").write_bytes(key_pem)
        self.ctx = tls.server_context(tmp / "imp.crt", tmp / "imp.key")
        self.received = b""
        self.handshakes = 0
        super().__init__(timeout=10)

    def serve(self, conn: socket.socket) -> None:
        try:
            conn.settimeout(5)
            with self.ctx.wrap_socket(conn, server_side=True) as tconn:
                self.handshakes += 1
                while chunk := tconn.recv(65536):
                    self.received += chunk
        except (OSError, ssl.SSLError):
            pass


@pytest.mark.parametrize("form", ["sealed", "tls"])
async def test_a_data_port_with_another_certificate_is_refused(nursery: trio.Nursery, tmp_path: Path, form: str) -> None:
    """A TLS server with its own certificate at the data port. Sealed (the client's default
    since R67): it cannot make sense of the hello and the stream fails; the secret was never
    sent. A TLS session per stream (the form before R67): refused after the handshake, before
    the token is sent."""
    d = await start_daemon(nursery, tmp_path, tls=True)
    (d.modules["data"] / "x").write_bytes(b"payload" * 1000)
    out = tmp_path / "x.out"
    impostor = _ImpostorTLS(tmp_path)
    try:
        async with d.session() as s:
            async with s.transfer("data", b"", "pull") as t:
                if form == "sealed":
                    t.data_port = impostor.port  # the control plane is the daemon's; this port is not
                    await t.send_files([p.FileRef(id=1, path=b"x")], last=True)
                    with pytest.raises(ConnectError, match="data stream to 127.0.0.1"):
                        await t.run_receivers(LocalSink({1: (out, None, None)}))
                else:

                    def legacy() -> None:
                        sock = socket.create_connection(("127.0.0.1", impostor.port), timeout=10)
                        data.admit_client(sock, t.tokens[0], tls_ctx=tls.client_context(), fingerprint=d.info.fingerprint)

                    with pytest.raises(ConnectError, match="presented another certificate than the daemon"):
                        await trio.to_thread.run_sync(legacy)
    finally:
        await trio.to_thread.run_sync(impostor.close)
    assert impostor.handshakes == (1 if form == "tls" else 0)  # reached; refused after the handshake
    assert impostor.received == b""  # the token never went to it
    assert not out.exists()


async def test_the_data_port_speaks_tls12_with_ecdhe_and_aes128_gcm(nursery: trio.Nursery, tmp_path: Path) -> None:
    """Data streams use the cheaper AEAD (decisions.md R39) with forward secrecy, and the
    certificate is the control plane's."""
    d = await start_daemon(nursery, tmp_path, tls=True)
    port = d.info.data_port
    assert port is not None

    def handshake() -> tuple[str | None, str, bytes | None]:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
            with tls.client_context().wrap_socket(raw) as s:
                cipher = s.cipher()
                assert cipher is not None
                return s.version(), cipher[0], s.getpeercert(binary_form=True)

    version, cipher, der = await trio.to_thread.run_sync(handshake)
    assert version == "TLSv1.2"
    assert cipher == "ECDHE-ECDSA-AES128-GCM-SHA256"
    assert der is not None and tls.fingerprint(der) == d.info.fingerprint


def test_a_known_hosts_file_that_is_mangled_is_one_line_never_a_new_pin(tmp_path: Path) -> None:
    """Bytes that are not UTF-8 gave a traceback; a truncated line (no fingerprint) made the
    host unknown, so whatever certificate it showed next was pinned; a pin in capitals was
    reported as changed."""
    from blit.errors import ConfigFileError
    from blit.transport.tls import KnownHosts

    fp = "sha256:" + "ab" * 32
    kh = tmp_path / "known_hosts"
    for text, problem in (
        (b"127.0.0.1:1 " + fp.encode() + b"\n\xff\xfe junk\n", "line 2: bytes that are not UTF-8"),
        (b"127.0.0.1:1\n", "line 1: not a 'host:port sha256:<64 hex digits>' line"),
        (b"# pins\n127.0.0.1:1 sha256:abc\n", "line 2: not a 'host:port"),
    ):
        kh.write_bytes(text)
        with pytest.raises(ConfigFileError, match=problem):
            KnownHosts(kh).check("127.0.0.1:1", fp)
        assert kh.read_bytes() == text  # nothing pinned
    kh.write_text("127.0.0.1:1 " + fp.upper().replace("SHA256", "SHA256") + "\n")
    assert KnownHosts(kh).check("127.0.0.1:1", fp) is True


def _list(d: DaemonProcess, host: str, port: int) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*blit_cmd(), "list", f"{host}:{port}:/data"], env=d.env, capture_output=True, text=True, timeout=60)


def _known_hosts(d: DaemonProcess) -> Path:
    return Path(d.env["HOME"]) / ".local/share/blit/known_hosts"


def test_a_pin_after_a_last_line_without_its_newline_starts_a_line_of_its_own(tmp_path: Path) -> None:
    """QA pass 5, F4: a known_hosts whose last line had no newline (a hand edit) got the next
    pin glued onto it, and from then on every connection failed on that line."""
    with run_daemon_process(tmp_path / "d") as d:
        assert _list(d, "127.0.0.1", d.port).returncode == 0
        kh = _known_hosts(d)
        first = kh.read_text()
        kh.write_text(first.rstrip("\n"))
        r = _list(d, "localhost", d.port)
        assert r.returncode == 0 and "pinned the TLS certificate of localhost" in r.stderr, r.stderr
        lines = kh.read_text().splitlines()
        assert kh.read_text().endswith("\n") and lines[0] == first.rstrip("\n") and lines[1].startswith(f"localhost:{d.port} sha256:"), lines
        r = _list(d, "127.0.0.1", d.port)
        assert r.returncode == 0 and "pinned" not in r.stderr, r.stderr


def test_a_pin_holds_for_every_spelling_of_its_host(tmp_path: Path) -> None:
    """QA pass 5, F5: pins were keyed by the host as typed, so after a certificate change
    127.1, 127.000.000.001, LOCALHOST, [0:0:0:0:0:0:0:1] (...) were each "pinned on first use"
    again and the new certificate was taken. IP literals are keyed by the address the connect
    reaches, names in lower case; lines already in the file are read the same way."""
    other = "sha256:" + "0" * 64
    with run_daemon_process(tmp_path / "v4") as d4, run_daemon_process(tmp_path / "v6", bind="::1") as d6:
        kh = _known_hosts(d4)
        kh.parent.mkdir(parents=True)
        pins = f"127.0.0.1:{d4.port} {other}\nlocalhost:{d4.port} {other}\n[::1]:{d6.port} {other}\n"
        kh.write_text(pins)
        for host, port in (("127.1", d4.port), ("127.000.000.001", d4.port), ("[::ffff:127.0.0.1]", d4.port),
                           ("LOCALHOST", d4.port), ("[0:0:0:0:0:0:0:1]", d6.port), ("[::0:1]", d6.port), ("[::1%1]", d6.port)):  # fmt: skip
            r = _list(d4, host, port)
            assert r.returncode == 1 and "has changed" in r.stderr and "pinned the TLS" not in r.stderr, (host, r.stderr)
            assert kh.read_text() == pins
        # Lines written under another spelling (by an older blit) still hold, for the right certificate.
        real4 = tls.fingerprint_of_file(tmp_path / "v4/state/cert.pem")
        real6 = tls.fingerprint_of_file(tmp_path / "v6/state/cert.pem")
        pins = f"127.1:{d4.port} {real4}\nLocalHost:{d4.port} {real4}\n[0::1]:{d6.port} {real6}\n"
        kh.write_text(pins)
        for host, port in (("127.0.0.1", d4.port), ("localhost", d4.port), ("[::1]", d6.port)):
            r = _list(d4, host, port)
            assert r.returncode == 0 and "pinned" not in r.stderr, (host, r.stderr)
        assert kh.read_text() == pins
        # A first use is written in the one spelling.
        kh.unlink()
        assert _list(d4, "127.000.000.001", d4.port).returncode == 0
        assert _list(d4, "[0:0:0:0:0:0:0:1]", d6.port).returncode == 0
        assert kh.read_text() == f"127.0.0.1:{d4.port} {real4}\n[::1]:{d6.port} {real6}\n"
