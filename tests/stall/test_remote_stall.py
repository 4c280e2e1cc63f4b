"""Stall injection on remote transfers: a frozen daemon, a daemon stopped by a signal, a control
request that is never answered, a data stream that freezes or crawls, a receiving disk that
hangs and a sending client that freezes. Each case asserts what the user sees (exit code, the
one-line message, how long it took) and what lands (no partial file under a real name, no
temporary, a rerun converges). Network: 127.0.0.1 and 127.0.0.2 only; every case is bounded in
time and stops its processes and proxies itself."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import threading
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio

from blit.daemon import handlers
from blit.errors import ConnectError, RemoteError, StallError
from blit.transport import protocol, tree
from blit.transport.client import Timeouts
from blit.transport.remote import remote_transfer
from remote.conftest import Daemon, blit_cmd, run_daemon_process, start_daemon
from remote.treeutil import assert_same_tree

MiB = 1 << 20
PROXY_HOST = "127.0.0.2"  # the proxy's address: a client told to use it sends everything through it


# =================================================================================================
# Helpers


def _big_file(path: Path, size: int) -> bytes:
    """A file of `size` bytes that does not compress or dedupe; returns its content's first MiB."""
    block = os.urandom(MiB)
    with open(path, "wb") as f:
        for i in range(size // MiB):
            f.write(i.to_bytes(8, "little") + block[8:])
    return block


def _small_tree(root: Path, dirs: int = 3, files: int = 10, size: int = 50_000) -> None:
    for d in range(dirs):
        p = root / f"d{d}"
        p.mkdir(parents=True, exist_ok=True)
        for f in range(files):
            (p / f"f{f}").write_bytes(os.urandom(size))


def _rchar(pid: int) -> int:
    """Bytes a process has read so far (read, pread, sendfile all count)."""
    for line in Path(f"/proc/{pid}/io").read_text().splitlines():
        if line.startswith("rchar:"):
            return int(line.split()[1])
    raise AssertionError("no rchar")


def _temporaries(root: Path) -> list[str]:
    """`.blit-*` names anywhere below root."""
    return [os.path.join(d, n) for d, dirs, files in os.walk(root) for n in dirs + files if n.startswith(".blit-")]


def _open_unlinked_under(root: Path, pid: int | str = "self") -> list[str]:
    """Files of process `pid` that are open, unlinked and below root: O_TMPFILE landings."""
    out = []
    prefix = str(root) + "/"
    fd_dir = f"/proc/{pid}/fd"
    for fd in os.listdir(fd_dir):
        try:
            target = os.readlink(f"{fd_dir}/{fd}")
        except OSError:
            continue
        if target.startswith(prefix) and target.endswith(" (deleted)"):
            out.append(target)
    return out


def _assert_nothing_half_written(dst: Path, src: Path) -> None:
    """Every file under a real name below dst is complete (equal to its source); no temporaries."""
    assert _temporaries(dst) == []
    for d, _dirs, files in os.walk(dst):
        for n in files:
            rel = os.path.relpath(os.path.join(d, n), dst)
            assert (dst / rel).read_bytes() == (src / rel).read_bytes(), f"{rel} is half-written"


async def _wait_until(cond, timeout: float, what: str) -> None:  # type: ignore[no-untyped-def]
    with trio.move_on_after(timeout):
        while not cond():
            await trio.sleep(0.05)
        return
    raise AssertionError(f"not within {timeout} s: {what}")


def _error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("blit: error:")]


@dataclass
class Cli:
    proc: subprocess.Popen[bytes]
    out: Path
    err: Path

    def stderr(self) -> str:
        return self.err.read_text(errors="replace")


@contextlib.contextmanager
def cli(env: dict[str, str], tmp: Path, name: str, *args: str) -> Iterator[Cli]:
    """A `blit` command in a process of its own (killed on the way out if still running)."""
    out, err = tmp / f"{name}.out", tmp / f"{name}.err"
    with open(out, "wb") as o, open(err, "wb") as e:
        proc = subprocess.Popen([*blit_cmd(), *args], env=env, stdout=o, stderr=e)
    try:
        yield Cli(proc, out, err)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)


def _wait_reading(proc: subprocess.Popen[bytes], reader_pid: int, nbytes: int, timeout: float = 30) -> None:
    """Wait until `reader_pid` has read `nbytes` more than now (the transfer is mid-flight)."""
    base = _rchar(reader_pid)
    deadline = time.monotonic() + timeout
    while _rchar(reader_pid) - base < nbytes:
        if proc.poll() is not None:
            pytest.fail(f"the transfer ended (exit {proc.returncode}) before it could be stopped mid-flight")
        assert time.monotonic() < deadline, "the transfer did not start"
        time.sleep(0.002)


class Proxy:
    """Forwards 127.0.0.2:PORT to 127.0.0.1:PORT for a daemon's control and data ports, so a
    client pointed at 127.0.0.2 sends everything through it. Control bytes always pass; data
    connections can be frozen after `freeze_after` bytes each (the proxy stops reading and
    writing, holding both sockets open: a frozen path) or slowed to `rate` bytes/s."""

    def __init__(
        self, control_port: int, data_port: int, *, freeze_after: int | None = None, rate: float | None = None, hold_first: bool = False,
        connect_first: bool = False,
    ) -> None:  # fmt: skip
        self.ports = (control_port, data_port)
        self.data_port = data_port
        self.freeze_after = freeze_after
        self.rate = rate
        self.frozen = 0
        self.hold_first = hold_first
        """The first control connection's first bytes from the client wait for `release`."""
        self.connect_first = connect_first
        """With hold_first: the daemon's side of that connection is opened at once (the daemon
        sees a connection whose first bytes, the hello in cleartext, have not come)."""
        self.held = False
        self.release = trio.Event()
        self.connections = 0

    async def serve(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:  # type: ignore[no-untyped-def]
        listeners = []
        for port in self.ports:
            listeners += await trio.open_tcp_listeners(port, host=PROXY_HOST)
        async with trio.open_nursery() as n:
            for lst in listeners:
                n.start_soon(trio.serve_listeners, self._handle, [lst])
            task_status.started()

    async def _handle(self, down: trio.SocketStream) -> None:
        port = down.socket.getsockname()[1]
        is_data = port == self.data_port
        moved = [0]
        if not is_data:
            self.connections += 1
            if self.hold_first and self.connections == 1:
                early = await trio.open_tcp_stream("127.0.0.1", port) if self.connect_first else None
                first = await down.receive_some(65536)
                self.held = True
                await self.release.wait()
                up = early or await trio.open_tcp_stream("127.0.0.1", port)
                try:
                    await up.send_all(first)
                except (trio.BrokenResourceError, OSError):  # the daemon closed it meanwhile
                    await down.aclose()
                    await up.aclose()
                    return
                async with down, up, trio.open_nursery() as n:
                    n.start_soon(self._pump, down, up, is_data, moved)
                    n.start_soon(self._pump, up, down, is_data, moved)
                return
        try:
            up = await trio.open_tcp_stream("127.0.0.1", port)
        except OSError:
            await down.aclose()
            return
        async with down, up, trio.open_nursery() as n:
            n.start_soon(self._pump, down, up, is_data, moved)
            n.start_soon(self._pump, up, down, is_data, moved)

    async def _pump(self, a: trio.SocketStream, b: trio.SocketStream, is_data: bool, moved: list[int]) -> None:
        try:
            while True:
                chunk = await a.receive_some(16384 if is_data and self.rate else 65536)
                if not chunk:
                    await b.send_eof()
                    return
                if is_data and self.freeze_after is not None and moved[0] + len(chunk) > self.freeze_after:
                    self.frozen += 1
                    await trio.sleep_forever()
                moved[0] += len(chunk)
                if is_data and self.rate:
                    await trio.sleep(len(chunk) / self.rate)
                await b.send_all(chunk)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass


@contextlib.asynccontextmanager
async def proxied(d: Daemon, **kw: float | bool) -> AsyncIterator[Proxy]:
    proxy = Proxy(d.info.port, d.info.data_port or 0, **kw)  # type: ignore[arg-type]
    async with trio.open_nursery() as n:
        await n.start(proxy.serve)
        try:
            yield proxy
        finally:
            n.cancel_scope.cancel()


async def _daemon(nursery: trio.Nursery, tmp: Path, stall: float) -> Daemon:
    return await start_daemon(nursery, tmp, tls=True, stall=stall)


async def _daemon_for_cli(nursery: trio.Nursery, tmp: Path, stall: float) -> tuple[Daemon, dict[str, str]]:
    """A daemon here, and the environment of a `blit` process that talks to it (its home)."""
    from remote.conftest import subprocess_env

    d = await _daemon(nursery, tmp, stall=stall)
    (tmp / "home").mkdir()
    return d, subprocess_env(tmp)


# =================================================================================================
# A client stopped while it connects


async def test_a_client_stopped_during_its_tls_handshake_connects_again(nursery: trio.Nursery, tmp_path: Path) -> None:
    """`blit list` stopped (SIGSTOP, as Ctrl-Z) in the middle of its TLS handshake for longer
    than the 10 s handshake timeout, then continued: the timer ran out across the stop (and the
    daemon gave up on the half-made connection meanwhile), which it reported as `TLS handshake
    with HOST:PORT timed out`, exit 1. Now it connects again and lists, exit 0."""
    d, env = await _daemon_for_cli(nursery, tmp_path, stall=10.0)
    async with proxied(d, hold_first=True) as proxy:
        with cli(env, tmp_path, "list", "list", f"{PROXY_HOST}:{d.info.port}") as c:
            await _wait_until(lambda: proxy.held, 30, "the client's first handshake bytes")
            os.kill(c.proc.pid, signal.SIGSTOP)
            try:
                proxy.release.set()  # the daemon answers while the client is stopped
                await trio.sleep(11.5)
            finally:
                os.kill(c.proc.pid, signal.SIGCONT)
            await _wait_until(lambda: c.proc.poll() is not None, 30, "the list to end")
            assert c.proc.returncode == 0, c.stderr()
            assert c.out.read_text().split()[0] == "data", c.out.read_text()
            assert proxy.connections == 2


async def test_a_client_stopped_during_its_hello_at_a_full_daemon_says_it_again(nursery: trio.Nursery, tmp_path: Path) -> None:
    """`blit list` stopped while its hello is under way, at a daemon full of connections without
    a hello: the daemon ends the client's (the oldest, R57) to make room; continued, the client
    said `did not complete the hello: ... the peer closed the connection`, exit 1 (QA). Now it
    connects once more and lists, exit 0."""
    from remote.conftest import subprocess_env

    d = await start_daemon(nursery, tmp_path, tls=False, stall=10.0, extra="max_connections = 2")
    (tmp_path / "home").mkdir()
    env = subprocess_env(tmp_path)
    async with proxied(d, hold_first=True, connect_first=True) as proxy:
        with cli(env, tmp_path, "list", "list", "--no-tls", f"{PROXY_HOST}:{d.info.port}") as c:
            await _wait_until(lambda: proxy.held, 30, "the client's hello")
            os.kill(c.proc.pid, signal.SIGSTOP)
            idle = []
            try:
                idle.append(await trio.open_tcp_stream("127.0.0.1", d.info.port))  # the daemon is full
                await trio.sleep(1.2)
                idle.append(await trio.open_tcp_stream("127.0.0.1", d.info.port))  # the client's goes for it
                await trio.sleep(0.5)
                proxy.release.set()
                await trio.sleep(1.2)  # the idle ones are old enough to go for the client's second try
            finally:
                os.kill(c.proc.pid, signal.SIGCONT)
            await _wait_until(lambda: c.proc.poll() is not None, 30, "the list to end")
            for st in idle:
                await st.aclose()
            assert c.proc.returncode == 0, c.stderr()
            assert c.out.read_text().split()[0] == "data", c.out.read_text()
            assert proxy.connections == 2


# =================================================================================================
# A frozen daemon process (SIGSTOP), at the real default timeouts


def test_a_frozen_daemon_ends_push_and_pull_within_a_minute(tmp_path: Path) -> None:
    """SIGSTOP of the daemon mid-push and mid-pull: each `blit copy` exits 1 within about a minute
    (the 60 s stall timeout) with one line saying which daemon stopped responding and what
    stalled; the pull's destination holds no partial file and no temporary; once the daemon
    runs again it stops cleanly and the push's module holds nothing half-written either. Both
    run at once, so the case costs one stall timeout."""
    a, b = tmp_path / "a", tmp_path / "b"
    for t in (a, b):
        (t / "home").mkdir(parents=True)
    src = a / "src"
    src.mkdir()
    size = 512 * MiB
    with contextlib.ExitStack() as stack:
        da = stack.enter_context(run_daemon_process(a))
        db = stack.enter_context(run_daemon_process(b))
        for big in (src / "big.bin", db.modules["data"] / "big.bin", da.modules["data"] / "big.bin"):
            stack.callback(big.unlink, missing_ok=True)  # 512 MiB each: gone also on failure
        _big_file(src / "big.bin", size)
        _small_tree(src, dirs=2, files=5)
        _big_file(db.modules["data"] / "big.bin", size)
        _small_tree(db.modules["data"], dirs=2, files=5)
        out = b / "out"
        push = stack.enter_context(cli(da.env, a, "push", "copy", f"{src}/", f"127.0.0.1:{da.port}:/data/"))
        _wait_reading(push.proc, push.proc.pid, 128 * MiB)
        da.proc.send_signal(signal.SIGSTOP)
        stopped = {"push": time.monotonic()}
        pull_base = _rchar(db.proc.pid)
        pull = stack.enter_context(cli(db.env, b, "pull", "copy", f"127.0.0.1:{db.port}:/data/", f"{out}/"))
        while _rchar(db.proc.pid) - pull_base < 128 * MiB:  # the daemon's sendfile reads the source
            if pull.proc.poll() is not None:
                pytest.fail(f"the pull ended (exit {pull.proc.returncode}) before it could be stopped mid-flight")
            time.sleep(0.002)
        db.proc.send_signal(signal.SIGSTOP)
        stopped["pull"] = time.monotonic()
        try:
            took = {}
            for name, c in (("push", push), ("pull", pull)):
                rc = c.proc.wait(100)
                took[name] = time.monotonic() - stopped[name]
                assert rc == 1, (name, c.stderr())
                lines = _error_lines(c.stderr())
                port = da.port if name == "push" else db.port
                assert len(lines) == 1, (name, c.stderr())
                assert lines[0].startswith(f"blit: error: daemon 127.0.0.1:{port} stopped responding: "), lines
                assert lines[0].endswith(" for 60 s"), lines
                print(f"{name}: {lines[0]!r} after {took[name]:.1f} s")
                assert 50 < took[name] < 75, (name, took[name])
            # The pull's destination: nothing half-written, no temporary.
            assert not (out / "big.bin").exists()
            _assert_nothing_half_written(out, db.modules["data"])
        finally:
            da.proc.send_signal(signal.SIGCONT)
            db.proc.send_signal(signal.SIGCONT)
        # The daemons run again and stop cleanly; the push left nothing half-written.
        for d in (da, db):
            d.proc.send_signal(signal.SIGTERM)
            t0 = time.monotonic()
            assert d.proc.wait(10) == 0, d.log()
            assert time.monotonic() - t0 < 5
        assert not (da.modules["data"] / "big.bin").exists()
        _assert_nothing_half_written(da.modules["data"], src)


# =================================================================================================
# The daemon stopped by a signal mid-push


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_daemon_stopped_mid_push_leaves_nothing_and_a_rerun_converges(tmp_path: Path, sig: signal.Signals) -> None:
    (tmp_path / "home").mkdir()
    src = tmp_path / "src"
    src.mkdir()
    _big_file(src / "big.bin", 256 * MiB)
    _small_tree(src)
    try:
        _stop_mid_push_and_rerun(tmp_path, src, sig)
    finally:
        (src / "big.bin").unlink()
        (tmp_path / "mod_data" / "big.bin").unlink(missing_ok=True)


def _stop_mid_push_and_rerun(tmp_path: Path, src: Path, sig: signal.Signals) -> None:
    with run_daemon_process(tmp_path) as d:
        dst = d.modules["data"]
        with cli(d.env, tmp_path, "push", "copy", f"{src}/", f"127.0.0.1:{d.port}:/data/") as c:
            _wait_reading(c.proc, c.proc.pid, 64 * MiB)
            d.proc.send_signal(sig)
            t0 = time.monotonic()
            rc = d.proc.wait(10)
            assert time.monotonic() - t0 < 5, d.log()
            assert rc == 0, d.log()
            assert c.proc.wait(30) == 1, c.stderr()
            assert len(_error_lines(c.stderr())) == 1, c.stderr()
        assert not (dst / "big.bin").exists()
        _assert_nothing_half_written(dst, src)
    with run_daemon_process(tmp_path) as d:
        with cli(d.env, tmp_path, "rerun", "copy", f"{src}/", f"127.0.0.1:{d.port}:/data/") as c:
            assert c.proc.wait(60) == 0, c.stderr()
        assert_same_tree(src, d.modules["data"])


# =================================================================================================
# A control exchange that is never answered


@pytest.mark.parametrize(("direction", "op"), [("push", protocol.TreeDir), ("pull", protocol.TreeScan)])
async def test_an_unanswered_request_fails_within_the_request_timeout(
    nursery: trio.Nursery, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, direction: str, op: type
) -> None:
    d = await _daemon(nursery, tmp_path, stall=10)
    src = tmp_path / "src"
    _small_tree(src)
    if direction == "pull":
        _small_tree(d.modules["data"])
    entered = trio.Event()

    async def frozen(s: handlers.Session, msg: protocol.Message) -> protocol.Message:
        entered.set()
        await trio.sleep_forever()
        raise AssertionError

    monkeypatch.setitem(handlers._HANDLERS, op, frozen)
    url = f"127.0.0.1:{d.info.port}:/data/"
    a, b = (f"{src}/", url) if direction == "push" else (url, f"{tmp_path / 'out'}/")
    t0 = trio.current_time()
    with trio.fail_after(10), pytest.raises(StallError) as caught:
        await remote_transfer("copy", a, b, known_hosts=d.known_hosts, timeouts=Timeouts(request=1.5))
    took = trio.current_time() - t0
    assert entered.is_set()
    name = op.__name__  # TreeDir -> tree/dir
    assert str(caught.value) == (
        f"daemon 127.0.0.1:{d.info.port} stopped responding: no answer to tree/{name[4:].lower()} for 1.5 s"
    )
    assert 1.5 <= took < 5
    # The daemon is unharmed: another session is served at once.
    async with d.session() as s:
        assert [m.name for m in (await s.modules()).modules] == ["data", "ro", "other"]
    if direction == "push":
        assert list(d.modules["data"].iterdir()) == []


@pytest.mark.parametrize("tls", [True, False], ids=["tls", "cleartext"])
async def test_a_server_that_accepts_and_says_nothing_fails_the_connect(nursery: trio.Nursery, tmp_path: Path, tls: bool) -> None:
    """A hostile or hung server: TCP accepted, then silence (no TLS handshake, no hello)."""
    held: list[trio.SocketStream] = []

    async def mute(stream: trio.SocketStream) -> None:
        held.append(stream)
        await trio.sleep_forever()

    (listener,) = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listener.socket.getsockname()[1]
    nursery.start_soon(trio.serve_listeners, mute, [listener])
    t0 = trio.current_time()
    with trio.fail_after(10), pytest.raises(ConnectError) as caught:
        await remote_transfer(
            "copy", f"127.0.0.1:{port}:/data/", str(tmp_path / "out"),
            tls_enabled=tls, known_hosts=tmp_path / "kh", timeouts=Timeouts(connect=1),
        )
    assert trio.current_time() - t0 < 3
    msg = str(caught.value)
    assert f"127.0.0.1:{port}" in msg and ("timed out" in msg or "did not complete the hello" in msg), msg
    assert not (tmp_path / "out").exists()


# =================================================================================================
# A data stream that freezes or crawls (a proxy between the client and the daemon)


@pytest.mark.parametrize("direction", ["push", "pull"])
async def test_a_frozen_data_stream_is_reported_and_nothing_is_half_written(nursery: trio.Nursery, tmp_path: Path, direction: str) -> None:
    d = await _daemon(nursery, tmp_path, stall=1.5)
    src = tmp_path / "src" if direction == "push" else d.modules["data"]
    dst = d.modules["data"] if direction == "push" else tmp_path / "out"
    src.mkdir(exist_ok=True)
    _big_file(src / "big.bin", 32 * MiB)
    _small_tree(src)
    url = f"{PROXY_HOST}:{d.info.port}:/data/"
    a, b = (f"{src}/", url) if direction == "push" else (url, f"{dst}/")
    async with proxied(d, freeze_after=2 * MiB) as proxy:
        t0 = trio.current_time()
        with trio.fail_after(15), pytest.raises(StallError) as caught:
            await remote_transfer("copy", a, b, known_hosts=d.known_hosts, timeouts=Timeouts(stall=1.5))
        took = trio.current_time() - t0
        assert proxy.frozen >= 1
        assert str(caught.value).startswith(f"daemon {PROXY_HOST}:{d.info.port} stopped responding: no progress on data stream ")
        assert str(caught.value).endswith(" for 1.5 s")
        assert took < 8
    # Both sides dropped their landings: no O_TMPFILE left open, no temporary, no partial file.
    await _wait_until(lambda: not _open_unlinked_under(dst), 5, "the landings were aborted")
    assert not (dst / "big.bin").exists()
    _assert_nothing_half_written(dst, src)


@pytest.mark.parametrize("direction", ["push", "pull"])
async def test_a_slow_data_stream_is_not_a_stall(nursery: trio.Nursery, tmp_path: Path, direction: str) -> None:
    """1 MiB/s on a link with a 1 s stall timeout: a 3 MiB file is one frame that takes 3 s,
    and it lands, because bytes keep moving."""
    d = await _daemon(nursery, tmp_path, stall=1)
    src = tmp_path / "src" if direction == "push" else d.modules["data"]
    dst = d.modules["data"] if direction == "push" else tmp_path / "out"
    src.mkdir(exist_ok=True)
    (src / "slow.bin").write_bytes(os.urandom(3 * MiB))
    url = f"{PROXY_HOST}:{d.info.port}:/data/"
    a, b = (f"{src}/", url) if direction == "push" else (url, f"{dst}/")
    async with proxied(d, rate=1 * MiB):
        t0 = trio.current_time()
        with trio.fail_after(20):
            summary = await remote_transfer("copy", a, b, known_hosts=d.known_hosts, timeouts=Timeouts(stall=1))
        took = trio.current_time() - t0
    assert summary.failures == [] and summary.files_copied == 1
    assert took > 2.5  # it really went through the slow link
    assert (dst / "slow.bin").read_bytes() == (src / "slow.bin").read_bytes()


# =================================================================================================
# A receiving disk that hangs, a sending client that freezes


async def test_a_hung_receiving_disk_is_reported_as_a_local_stall(nursery: trio.Nursery, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Pull: landing one file hangs on this machine (a dead NFS mount): the stream is given up
    on after the stall timeout, the message says the local side hung, files that landed are
    complete, and the hung landing is dropped once its syscall returns."""
    d = await _daemon(nursery, tmp_path, stall=10)
    src = d.modules["data"]
    _big_file(src / "big.bin", 8 * MiB)
    _small_tree(src, dirs=1, files=5)
    dst = tmp_path / "out"
    release = threading.Event()
    real_open = tree.DestTree.open

    def hanging_open(self: tree.DestTree, file_id: int):  # type: ignore[no-untyped-def]
        f = real_open(self, file_id)  # the landing exists (O_TMPFILE) ...
        if f.p.dname == "big.bin":
            release.wait(30)  # ... and its first write never returns
        return f

    monkeypatch.setattr(tree.DestTree, "open", hanging_open)
    try:
        t0 = trio.current_time()
        with trio.fail_after(15), pytest.raises(StallError) as caught:
            await remote_transfer("copy", f"127.0.0.1:{d.info.port}:/data/", f"{dst}/", known_hosts=d.known_hosts, timeouts=Timeouts(stall=1))
        took = trio.current_time() - t0
    finally:
        release.set()
    assert caught.value.local
    assert "a file operation on this machine hung (no progress for 1 s)" in str(caught.value)
    assert took < 8
    await _wait_until(lambda: not _open_unlinked_under(dst), 5, "the hung landing was dropped")
    assert not (dst / "big.bin").exists()
    _assert_nothing_half_written(dst, src)


async def test_a_hung_disk_on_the_destination_daemon_of_a_relay_is_named(nursery: trio.Nursery, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Remote to remote: B pulls from A and landing one file hangs on B's disk. B gives up on
    the stream after its stall timeout; the client's one error says B's disk hung (not that B
    could not reach A) within a bounded time; what landed on B is complete."""
    a = await start_daemon(nursery, tmp_path / "A", tls=True, stall=1)
    b = await start_daemon(nursery, tmp_path / "B", tls=True, stall=1, peer_pull=True)
    src = a.modules["data"]
    _big_file(src / "big.bin", 8 * MiB)
    _small_tree(src, dirs=1, files=5)
    dst = b.modules["data"] / "out"
    release = threading.Event()
    real_open = tree.DestTree.open

    def hanging_open(self: tree.DestTree, file_id: int):  # type: ignore[no-untyped-def]
        f = real_open(self, file_id)
        if f.p.dname == "big.bin":
            release.wait(30)  # B's disk: the first write never returns
        return f

    monkeypatch.setattr(tree.DestTree, "open", hanging_open)
    try:
        t0 = trio.current_time()
        with trio.fail_after(20), pytest.raises(RemoteError) as caught:
            await remote_transfer("copy", f"127.0.0.1:{a.info.port}:/data/", f"127.0.0.1:{b.info.port}:/data/out/",
                                  known_hosts=tmp_path / "client_known_hosts")  # fmt: skip
        took = trio.current_time() - t0
    finally:
        release.set()
    assert str(caught.value) == "a file operation on the destination daemon hung (no progress for 1 s)", str(caught.value)
    assert took < 10
    await _wait_until(lambda: not _open_unlinked_under(dst), 5, "the hung landing was dropped")
    assert not (dst / "big.bin").exists()
    _assert_nothing_half_written(dst, src)


async def test_a_frozen_sending_client_is_dropped_and_others_are_served(nursery: trio.Nursery, tmp_path: Path) -> None:
    """SIGSTOP of a pushing `blit` process: the daemon gives up on its stream after its stall
    timeout, drops the landing (no temporary, no partial file), and serves another client
    meanwhile."""
    d, env = await _daemon_for_cli(nursery, tmp_path, stall=2)
    src = tmp_path / "src"
    src.mkdir()
    _big_file(src / "big.bin", 400 * MiB)
    other = tmp_path / "other"
    _small_tree(other)
    dst = d.modules["data"]
    try:
        with cli(env, tmp_path, "push", "copy", f"{src}/", f"127.0.0.1:{d.info.port}:/data/first/") as c:
            base = _rchar(c.proc.pid)
            with trio.fail_after(30):
                while _rchar(c.proc.pid) - base < 64 * MiB:
                    if c.proc.poll() is not None:
                        pytest.fail(f"the push ended (exit {c.proc.returncode}) before it could be frozen:\n{c.stderr()}")
                    await trio.sleep(0.002)
            c.proc.send_signal(signal.SIGSTOP)
            try:
                # The daemon is still serving: a second client pushes a tree meanwhile.
                with trio.fail_after(20):
                    summary = await remote_transfer("copy", f"{other}/", f"127.0.0.1:{d.info.port}:/data/second/", known_hosts=d.known_hosts)
                assert summary.failures == []
                assert_same_tree(other, dst / "second")
                # Within its stall timeout (and a little), the daemon dropped the frozen landing.
                await _wait_until(lambda: not _open_unlinked_under(dst), 6, "the daemon dropped the frozen client's landing")
                assert not (dst / "first" / "big.bin").exists()
                assert _temporaries(dst) == []
            finally:
                c.proc.send_signal(signal.SIGCONT)
            # Resumed, the client finds its stream dropped: it fails with one line, exit 1. (Waited
            # for without blocking: the daemon runs in this process's trio loop.)
            await _wait_until(lambda: c.proc.poll() is not None, 30, "the resumed client exited")
            assert c.proc.returncode == 1, c.stderr()
            assert len(_error_lines(c.stderr())) == 1, c.stderr()
        assert not (dst / "first" / "big.bin").exists()
        assert _temporaries(dst) == []
    finally:
        (src / "big.bin").unlink()



async def test_an_interrupted_push_lands_nothing_more_once_its_client_is_gone(nursery: trio.Nursery, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Ctrl-C of a push of many tiny files onto a slow disk: the daemon stops landing at once
    when the client goes. It went on landing the frames its receive buffer (1 MiB: ~20,000 tiny
    files) still held, for seconds after `blit` had said it stopped (QA: 2,601 -> 3,000 files)."""
    d, env = await _daemon_for_cli(nursery, tmp_path, stall=10)
    src = tmp_path / "src"
    for i in range(10):
        (src / f"d{i}").mkdir(parents=True)
        for j in range(300):
            (src / f"d{i}" / f"f{j}").write_bytes(b"%d" % j)
    calls: list[float] = []
    real = tree.DestTree.land_many

    def slow_disk(self: tree.DestTree, batch: list[tuple[int, int, int]], buf: bytearray) -> list[tuple[int, OSError]]:
        calls.append(time.monotonic())
        time.sleep(0.0006 * len(batch))  # ~0.6 ms a file: 3,000 files take ~2 s
        return real(self, batch, buf)

    monkeypatch.setattr(tree.DestTree, "land_many", slow_disk)
    dst = d.modules["data"] / "out"
    with cli(env, tmp_path, "push", "copy", f"{src}/", f"127.0.0.1:{d.info.port}:/data/out/") as c:
        await _wait_until(lambda: len(calls) >= 2, 30, "files landing")
        c.proc.send_signal(signal.SIGINT)
        await _wait_until(lambda: c.proc.poll() is not None, 10, "the interrupted client exited")
        gone = time.monotonic()
        assert c.proc.returncode == 130, c.stderr()
    await trio.sleep(2.5)
    late = [round(t - gone, 2) for t in calls if t > gone + 0.25]  # a batch begun before may end
    assert not late, f"{len(late)} batches landed after the client had gone, up to {late[-1]} s later"
    landed = sum(1 for p in dst.rglob("f*") if p.is_file())
    assert 0 < landed < 3000
    await _wait_until(lambda: not _temporaries(dst), 5, "no temporary left")


def _fds_under(root: Path) -> list[str]:
    """Open files and directories of this process (the daemon's) below or at root."""
    out = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target == str(root) or target.startswith(str(root) + "/"):
            out.append(target)
    return out


@pytest.mark.parametrize("direction,h2", [("push", False), ("pull", False), ("push", True), ("pull", True)], ids=["push", "pull", "push-h2", "pull-h2"])
async def test_a_frozen_client_of_many_small_files_loses_its_session_after_the_stall_time(
    nursery: trio.Nursery, tmp_path: Path, direction: str, h2: bool
) -> None:
    """SIGSTOP of a `blit` process mid-way through many small files: nothing more comes from it
    (no PING either), so once the daemon's stall time has passed the daemon ends its session:
    its transfer is cancelled, the directories it held open are closed and (push) its hidden new
    directories move into place with the files that landed, all complete; before, they stayed
    until the 600 s idle timeout. Resumed, the client fails with one line saying why."""
    stall = 3.0
    d, env = await _daemon_for_cli(nursery, tmp_path, stall=stall)
    module = d.modules["data"]
    src = tmp_path / "src" if direction == "push" else module / "tree"
    for i in range(40):
        p = src / f"d{i:02}"
        p.mkdir(parents=True)
        for j in range(400):
            (p / f"f{j}").write_bytes(os.urandom(4096))
    if direction == "push":
        args, dst, held = (f"{src}/", f"127.0.0.1:{d.info.port}:/data/first/"), module / "first", module
    else:
        args, dst, held = (f"127.0.0.1:{d.info.port}:/data/tree/", f"{tmp_path / 'got'}/"), tmp_path / "got", module
    with cli(env, tmp_path, direction, "copy", *(["--force-h2-data"] if h2 else []), *args) as c:
        reader = c.proc.pid if direction == "push" else os.getpid()
        base = _rchar(reader)
        with trio.fail_after(30):
            while _rchar(reader) - base < 8 * MiB:
                if c.proc.poll() is not None:
                    pytest.fail(f"the {direction} ended (exit {c.proc.returncode}) before it could be frozen:\n{c.stderr()}")
                await trio.sleep(0.002)
        c.proc.send_signal(signal.SIGSTOP)
        try:
            stopped = time.monotonic()
            assert _fds_under(held), "the daemon holds the transfer's directories while the client runs"
            await _wait_until(lambda: not _fds_under(held) and not _temporaries(module), stall + 5, "the daemon ended the frozen session")
            assert time.monotonic() - stopped >= stall - 0.5, "the session ended before the stall time"
            if direction == "push":
                _assert_nothing_half_written(dst, src)
            await trio.sleep(max(0.0, stopped + stall + 1 - time.monotonic()))  # stopped well past the limit
        finally:
            c.proc.send_signal(signal.SIGCONT)
        await _wait_until(lambda: c.proc.poll() is not None, 30, "the resumed client exited")
        assert c.proc.returncode == 1, c.stderr()
        lines = _error_lines(c.stderr())
        assert len(lines) == 1, c.stderr()
        # The daemon's GOAWAY says why; where it does not get through first (a pipe full of
        # data ahead of it, a stream's reset read before it), the client knows it was stopped
        # past the daemon's limit.
        assert f"ended the session: nothing came from this client for {stall:g} s" in lines[0] or (
            f"longer than the daemon waits for a silent client ({stall:g} s)" in lines[0]
        ), lines[0]
    # A rerun converges.
    summary = await remote_transfer("copy", *args, known_hosts=d.known_hosts)
    assert summary.failures == []
    assert_same_tree(src, dst)
    assert _temporaries(dst) == [] and _temporaries(module) == []


@pytest.mark.parametrize("direction", ["push", "pull"])
async def test_a_client_gone_mid_checksum_stops_the_daemons_hashing(
    nursery: trio.Nursery, tmp_path: Path, direction: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """--checksum on a slow disk: the daemon hashes a batch of large files for minutes. A client
    that goes away meanwhile (killed; or dropped for silence, R53) left that thread running to
    its end: the session, its directory fds held (93 s in a QA run), a daemon SIGTERM ending in
    a forced exit, and the file settled by name afterwards, over what another run had put
    there. The hash now stops at its next read, and the session with it."""
    import threading

    from blit import fsops

    real = fsops.file_hash
    hashing = threading.Event()

    def slow_hash(dir_fd: int, name: str, stop=None):  # type: ignore[no-untyped-def]
        hashing.set()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:  # a disk at a few MB/s
            if stop is not None and stop():
                raise InterruptedError(4, "stopped")
            time.sleep(0.02)
        return real(dir_fd, name, stop)

    d, env = await _daemon_for_cli(nursery, tmp_path, stall=10)
    module = d.modules["data"]
    here = tmp_path / "local"
    src, dst = (here, module / "ck") if direction == "push" else (module / "ck", here)
    for root, mtime in ((src, 1_600_000_000), (dst, 1_500_000_000)):
        root.mkdir()
        (root / "f.bin").write_bytes(b"x" * (1 << 20))
        os.utime(root / "f.bin", (mtime, mtime))
    remote = f"127.0.0.1:{d.info.port}:/data/ck/"
    args = (f"{src}/", remote) if direction == "push" else (remote, f"{dst}/")
    monkeypatch.setattr(fsops, "file_hash", slow_hash)  # the daemon's hashing (this process)
    with cli(env, tmp_path, direction, "mirror", "--checksum", *args) as c:
        await _wait_until(hashing.is_set, 20, "the daemon hashes")
        c.proc.kill()
        c.proc.wait(5)
    gone = time.monotonic()
    await _wait_until(lambda: not _fds_under(module), 5, "the daemon let go of the module")
    assert time.monotonic() - gone < 5
    # Nothing is settled later: the destination keeps its own metadata.
    await trio.sleep(0.5)
    assert os.stat(dst / "f.bin").st_mtime == 1_500_000_000


@pytest.mark.parametrize("direction", ["push", "pull"])
async def test_a_stdout_nobody_reads_does_not_stop_a_remote_run(nursery: trio.Nursery, tmp_path: Path, direction: str) -> None:
    """`blit copy -v` into a pipe whose reader has stopped reading (QA F5): the client wrote its
    lines on the Trio thread, so once the pipe was full the run stood still, sent nothing, and
    the daemon ended its session at its stall time. Now the tree lands while nobody reads, and
    the reader that comes back gets every line, the summary last; exit 0."""
    stall = 3.0
    d, env = await _daemon_for_cli(nursery, tmp_path, stall=stall)
    module = d.modules["data"]
    src = tmp_path / "src" if direction == "push" else module / "tree"
    names = set()
    for i in range(20):
        p = src / f"d{i:02}"
        p.mkdir(parents=True)
        names.add(f"d{i:02}")
        for j in range(400):
            (p / f"f{j}").write_bytes(b"%d" % j)
            names.add(f"d{i:02}/f{j}")
    if direction == "push":
        args, dst = (f"{src}/", f"127.0.0.1:{d.info.port}:/data/first/"), module / "first"
    else:
        args, dst = (f"127.0.0.1:{d.info.port}:/data/tree/", f"{tmp_path / 'got'}/"), tmp_path / "got"
    r, w = os.pipe()  # 64 KiB: 8,400 lines are about 100 KiB
    err = tmp_path / "err"
    try:
        with open(err, "wb") as e:
            proc = subprocess.Popen([*blit_cmd(), "copy", "-v", *args], env=env, stdout=w, stderr=e, stdin=subprocess.DEVNULL)
        os.close(w)
        w = -1
        try:
            # The whole tree lands, and the run outlives the daemon's stall time, unread.
            with trio.fail_after(60):
                while not dst.exists() or sum(len(fs) + len(ds) for _, ds, fs in os.walk(dst)) < len(names):
                    assert proc.poll() is None, f"exit {proc.returncode} with the output unread:\n{err.read_text()}"
                    await trio.sleep(0.05)
            await trio.sleep(stall + 1)
            assert proc.poll() is None, f"exit {proc.returncode} with the output unread:\n{err.read_text()}"
            with os.fdopen(r, "rb") as reader:
                r = -1
                out = await trio.to_thread.run_sync(reader.read)
            await _wait_until(lambda: proc.poll() is not None, 30, "the client exited once read")
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(5)
    finally:
        for fd in (r, w):
            if fd >= 0:
                os.close(fd)
    assert proc.returncode == 0, err.read_text()
    lines = out.decode().splitlines()
    assert lines[-1].startswith("copied 8,000 files"), lines[-3:]
    paths = [line.split(" ", 1)[1] for line in lines[:-1]]
    assert sorted(paths) == sorted(names)
    assert_same_tree(src, dst)


@pytest.mark.parametrize("direction", ["push", "pull"])
async def test_actions_that_wait_for_their_reader_do_not_silence_the_session(nursery: trio.Nursery, tmp_path: Path, direction: str) -> None:
    """-v lines whose reader fell far behind (blit.console past its cap) used to block the Trio
    thread in the write: no PING went out, and once the daemon's silence limit passed it ended
    the session ('nothing came from this client', QA). A remote run now awaits the Progress's
    `room()` between pages of actions instead: here it holds them for twice the daemon's
    stall time; the session lives, the run succeeds and every action arrives once released."""
    from blit.report import NullProgress

    stall = 3.0
    d = await _daemon(nursery, tmp_path, stall=stall)
    module = d.modules["data"]
    src = tmp_path / "src" if direction == "push" else module / "tree"
    names = set()
    for i in range(10):
        for j in range(300):
            (src / f"d{i}").mkdir(parents=True, exist_ok=True)
            (src / f"d{i}" / f"f{j}").write_bytes(b"x")
            names.add(f"d{i}/f{j}")
        names.add(f"d{i}")
    released = trio.Event()
    waits = 0

    class Reader(NullProgress):
        got: list[str] = []

        def action(self, action: str, path: str) -> None:
            self.got.append(path)

        async def room(self) -> None:
            nonlocal waits
            waits += 1
            await released.wait()

    async def release_later() -> None:
        await trio.sleep(2 * stall)
        released.set()

    nursery.start_soon(release_later)
    if direction == "push":
        args, dst = (f"{src}/", f"127.0.0.1:{d.info.port}:/data/first/"), module / "first"
    else:
        args, dst = (f"127.0.0.1:{d.info.port}:/data/tree/", f"{tmp_path / 'got'}/"), tmp_path / "got"
    reader = Reader()
    t0 = trio.current_time()
    with trio.fail_after(60):
        summary = await remote_transfer("copy", *args, known_hosts=d.known_hosts, progress=reader, record_actions=True)
    assert summary.failures == [] and summary.exit_code == 0
    assert waits >= 1 and trio.current_time() - t0 >= 2 * stall - 0.5, "the actions never waited for their reader"
    assert sorted(reader.got) == sorted(names)
    assert_same_tree(src, Path(dst))
