"""Fixtures for the remote tests: module trees, an in-process daemon, a real `blit daemon`
process, and raw HTTP/2 access for hostile-peer tests. Network: 127.0.0.1 only."""

from __future__ import annotations

import contextlib
import functools
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio

SRC = Path(__file__).resolve().parents[2] / "src"
if str(SRC) not in sys.path:
    sys.path.insert(0, str(SRC))

from blit.daemon import ServeInfo, load_config, serve  # noqa: E402
from blit.endpoint import HostSpec  # noqa: E402
from blit.transport import client as client_mod  # noqa: E402
from blit.transport import control  # noqa: E402
from blit.transport import protocol as _protocol  # noqa: E402

# In tests, everything we send is checked with the receiving side's rules (our bugs surface as
# LocalProtocolError); production skips that (protocol.VALIDATE_OUTGOING).
_protocol.VALIDATE_OUTGOING = True


@dataclass
class Daemon:
    info: ServeInfo
    config_path: Path
    known_hosts: Path
    tls: bool
    modules: dict[str, Path]

    @property
    def host(self) -> HostSpec:
        return HostSpec("127.0.0.1", self.info.port)

    def session(self, *, force_h2_data: bool = False, timeouts: client_mod.Timeouts | None = None):
        return client_mod.open_session(
            self.host,
            tls_enabled=self.tls,
            known_hosts=self.known_hosts,
            force_h2_data=force_h2_data,
            timeouts=timeouts,
        )


def write_config(
    tmp: Path,
    *,
    tls: bool = True,
    force_h2_data: bool = False,
    extra: str = "",
    peer_pull: bool = False,
    module_extra: dict[str, str] | None = None,
    bind: str = "127.0.0.1",
) -> tuple[Path, dict[str, Path]]:
    """Modules data (read-write; `peer_pull`: may pull from other daemons), ro (read-only) and
    other (read-write, never allowed to pull from other daemons). `extra`: more [daemon] lines;
    `module_extra`: more lines per module name (access rules); `bind`: a loopback address."""
    more = module_extra or {}
    mods = {"data": tmp / "mod_data", "ro": tmp / "mod_ro", "other": tmp / "mod_other"}
    for p in mods.values():
        p.mkdir(exist_ok=True)
    cfg = tmp / "blitd.toml"
    cfg.write_text(
        f"""
[daemon]
bind = "{bind}"
port = 0
mdns = false
tls = {str(tls).lower()}
force_h2_data = {str(force_h2_data).lower()}
state_dir = "{tmp / 'state'}"
{extra}

[[module]]
name = "data"
path = "{mods['data']}"
comment = "read-write test module"
allow_peer_pull = {str(peer_pull).lower()}
{more.get("data", "")}

[[module]]
name = "ro"
path = "{mods['ro']}"
read_only = true
comment = "read-only module"
{more.get("ro", "")}

[[module]]
name = "other"
path = "{mods['other']}"
{more.get("other", "")}
"""
    )
    return cfg, mods


@pytest.fixture(params=[True, False], ids=["tls", "cleartext"])
def tls_mode(request: pytest.FixtureRequest) -> bool:
    return bool(request.param)


async def start_daemon(
    nursery: trio.Nursery,
    tmp: Path,
    *,
    tls: bool = True,
    force_h2_data: bool = False,
    peer_pull: bool = False,
    extra: str = "",
    module_extra: dict[str, str] | None = None,
    **kw,
) -> Daemon:
    tmp.mkdir(parents=True, exist_ok=True)
    cfg_path, mods = write_config(
        tmp, tls=tls, force_h2_data=force_h2_data, peer_pull=peer_pull, extra=extra, module_extra=module_extra
    )
    cfg = load_config(cfg_path)
    info = await nursery.start(functools.partial(serve, cfg, **kw))
    return Daemon(info, cfg_path, tmp / "known_hosts", tls, mods)


@pytest.fixture
async def daemon(nursery: trio.Nursery, tmp_path: Path) -> Daemon:
    """An in-process daemon with TLS on 127.0.0.1 (short stall and token lifetimes)."""
    return await start_daemon(nursery, tmp_path, tls=True, stall=10.0)


@pytest.fixture
async def daemon_any_tls(nursery: trio.Nursery, tmp_path: Path, tls_mode: bool) -> Daemon:
    return await start_daemon(nursery, tmp_path, tls=tls_mode, stall=10.0)


# --- a real `blit daemon` process ---------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class DaemonProcess:
    proc: subprocess.Popen[bytes]
    port: int
    data_port: int
    config_path: Path
    modules: dict[str, Path]
    env: dict[str, str]
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def blit_cmd() -> list[str]:
    """The real `blit` command (cli.py registers the remote commands); `blit.cli_remote` alone
    when the main CLI does not have them."""
    try:
        from blit import cli

        names = {c.name for c in cli.app.registered_commands}
        if {"daemon", "list", "scan"} <= names:
            return [sys.executable, "-m", "blit"]
    except Exception:
        pass
    return [sys.executable, "-m", "blit.cli_remote"]


def subprocess_env(tmp: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(SRC) + os.pathsep + env.get("PYTHONPATH", "")
    env["HOME"] = str(tmp / "home")  # the client's known_hosts lands under the test's tmp dir
    env.pop("XDG_DATA_HOME", None)
    return env


@contextlib.contextmanager
def run_daemon_process(
    tmp: Path,
    *,
    tls: bool = True,
    args: tuple[str, ...] = (),
    peer_pull: bool = False,
    prefix: tuple[str, ...] = (),
    extra: str = "",
    module_extra: dict[str, str] | None = None,
    bind: str = "127.0.0.1",
) -> Iterator[DaemonProcess]:
    """`prefix`: a command the daemon runs under (e.g. setpriv to drop privileges); `extra`,
    `module_extra`: more config lines (write_config); `bind`: the loopback address it listens on."""
    tmp.mkdir(parents=True, exist_ok=True)
    port = _free_port()
    data_port = _free_port()
    while data_port == port:  # two asks of the kernel may get the same free port
        data_port = _free_port()
    cfg, mods = write_config(
        tmp, tls=tls, extra=f"data_port = {data_port}\n{extra}", peer_pull=peer_pull, module_extra=module_extra, bind=bind
    )
    env = subprocess_env(tmp)
    log_path = tmp / "daemon.log"
    with open(log_path, "wb") as logf:
        proc = subprocess.Popen(
            [*prefix, *blit_cmd(), "daemon", "--config", str(cfg), "--port", str(port), *args],
            stdout=logf,
            stderr=subprocess.STDOUT,
            env=env,
        )
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"daemon exited early:\n{log_path.read_text()}")
            try:
                with socket.create_connection((bind, port), timeout=0.2):
                    break
            except OSError:
                time.sleep(0.05)
        else:
            raise RuntimeError("daemon did not start")
        yield DaemonProcess(proc, port, data_port, cfg, mods, env, log_path)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            proc.wait(5)


@pytest.fixture
def daemon_process(tmp_path: Path) -> Iterator[DaemonProcess]:
    with run_daemon_process(tmp_path) as d:
        yield d


# --- raw HTTP/2 access (hostile peers) ----------------------------------------------------------


@contextlib.asynccontextmanager
async def raw_h2(d: Daemon) -> AsyncIterator[control.H2Connection]:
    """An HTTP/2 connection to the daemon with no hello sent (TLS without pin checks)."""
    tcp = await trio.open_tcp_stream("127.0.0.1", d.info.port)
    stream: trio.abc.Stream = tcp
    if d.tls:
        from blit.transport import tls

        stream = trio.SSLStream(tcp, tls.client_context(), server_hostname=None)
        await stream.do_handshake()
    conn = control.H2Connection(stream, client_side=True)
    async with trio.open_nursery() as n:
        await n.start(conn.run)
        try:
            yield conn
        finally:
            await conn.close(grace=0.2)
            n.cancel_scope.cancel()


async def h2_post(conn: control.H2Connection, path: str, body: bytes, headers: list[tuple[bytes, bytes]] | None = None) -> tuple[int, bytes]:
    hdrs = control._request_headers("127.0.0.1", path, headers or [])
    async with conn.open_stream(hdrs) as st:
        if body:
            try:
                await st.send_data(body, end=True)
            except control.StreamClosed:
                pass
        else:
            await st.end()
        await conn.wait_response(st, 10)
        status = int(st.header(b":status") or 0)
        reply = await st.read_body(1 << 24)
        return status, reply
