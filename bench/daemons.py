"""The daemons the remote workloads talk to: two ``blit daemon`` processes and an rsync daemon.

For one work root, ``session(root)`` starts, on 127.0.0.1 and free ports:

- ``blit daemon`` with TLS (the default), ``--no-mdns``;
- ``blit daemon --no-tls``, ``--no-mdns`` (the ``blit-notls`` variant);
- ``rsync --daemon --no-detach --config=FILE``;

each exporting one writable module ``mod`` whose path is the work root itself, so any tree the
bench makes there is reachable as ``/mod/<path under the root>`` (blit) or
``rsync://127.0.0.1:PORT/mod/<path>`` (rsync). Their configs, logs and state live in
``ROOT/daemons``; blit's client pins the daemon's certificate in ``ROOT/home`` (the client runs
with ``HOME`` pointing there: its known-hosts file is under the user data directory, and the
bench must never touch the real one).

Each daemon runs in its own session (so a Ctrl-C in the terminal reaches only the bench, which
stops them) with PR_SET_PDEATHSIG, so they end even if the bench is killed outright. They are
stopped (SIGTERM to the process group, then SIGKILL) when the session ends, also on errors and
interrupts; the work root, module trees included, is removed by the runner afterwards.

This module must not time anything or build the measured command lines (tools.py does).
"""

from __future__ import annotations

import ctypes
import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field

MODULE = "mod"
HOST = "127.0.0.1"
START_TIMEOUT_S = 30.0

_PR_SET_PDEATHSIG = 1


# Held (blocked) while a daemon is spawned and registered, and while it is stopped: a Ctrl-C or
# SIGTERM landing between fork and registration would otherwise leave a daemon nobody stops.
_HELD = {signal.SIGINT, signal.SIGTERM, signal.SIGHUP}


def _child_setup() -> None:  # runs in the child between fork and exec
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _HELD)  # the mask survives exec
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        pass


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


class DaemonError(Exception):
    """A daemon did not start; the message carries the tail of its log."""


@dataclass
class Daemon:
    key: str  # the tool key that talks to it: blit, blit-notls, rsync
    proc: subprocess.Popen[bytes]
    port: int
    log_path: str

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log_tail(self, n: int = 2000) -> str:
        try:
            with open(self.log_path, "rb") as f:
                return f.read()[-n:].decode("utf-8", "replace").strip()
        except OSError:
            return ""

    def stop(self) -> None:
        """SIGTERM to the daemon's process group, SIGKILL after 5 s; reaps it. Ctrl-C and
        SIGTERM to the bench are held meanwhile (delivered afterwards)."""
        old = signal.pthread_sigmask(signal.SIG_BLOCK, _HELD)
        try:
            self._stop()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, old)

    def _stop(self) -> None:
        for sig, wait_s in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
            if self.proc.poll() is not None:
                break
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                self.proc.wait(wait_s)
            except subprocess.TimeoutExpired:
                continue
        # rsync's connection children share the group; they are gone with it
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


@dataclass
class Daemons:
    """The running daemons of one work root, and how to address a path under that root."""

    root: str
    env: dict[str, str]  # the environment for blit client commands (HOME in the work root)
    daemons: dict[str, Daemon] = field(default_factory=dict)

    def url(self, key: str, path: str) -> str:
        """``path`` (under the root) as the endpoint tool ``key`` uses, keeping a trailing /."""
        rel = os.path.relpath(path.rstrip("/"), self.root)
        if rel.startswith(".."):
            raise ValueError(f"{path} is not under the module root {self.root}")
        tail = "/" if path.endswith("/") else ""
        port = self.daemons[key].port
        if key == "rsync":
            return f"rsync://{HOST}:{port}/{MODULE}/{rel}{tail}"
        return f"{HOST}:{port}:/{MODULE}/{rel}{tail}"

    def pid(self, key: str) -> int:
        return self.daemons[key].pid

    def check_alive(self) -> None:
        for d in self.daemons.values():
            if d.proc.poll() is not None:
                raise DaemonError(f"the {d.key} daemon exited (status {d.proc.returncode}):\n"
                                  f"{d.log_tail()}")


def _wait_listening(d: Daemon) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if d.proc.poll() is not None:
            raise DaemonError(f"the {d.key} daemon exited at start (status "
                              f"{d.proc.returncode}):\n{d.log_tail()}")
        try:
            with socket.create_connection((HOST, d.port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise DaemonError(f"the {d.key} daemon did not listen on {HOST}:{d.port} within "
                      f"{START_TIMEOUT_S:.0f} s:\n{d.log_tail()}")


def _spawn(stack: ExitStack, key: str, argv: list[str], log_path: str, env: dict[str, str],
           port: int) -> Daemon:
    """Start one daemon and register its stop on ``stack``, with Ctrl-C and SIGTERM held from
    before the fork until the stop is registered (delivered afterwards, so the stop runs)."""
    old = signal.pthread_sigmask(signal.SIG_BLOCK, _HELD)
    try:
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log,
                                    stderr=subprocess.STDOUT, env=env, start_new_session=True,
                                    preexec_fn=_child_setup)
        d = Daemon(key, proc, port, log_path)
        stack.callback(d.stop)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)
    return d


def _blit_config(root: str, state: str, tls: bool, port: int, data_port: int) -> str:
    return (f'[daemon]\nbind = "{HOST}"\nport = {port}\ndata_port = {data_port}\n'
            f'mdns = false\ntls = {str(tls).lower()}\nstate_dir = "{state}"\n\n'
            f'[[module]]\nname = "{MODULE}"\npath = "{root}"\n'
            'comment = "bench work root"\n')


def _rsync_config(root: str, work: str) -> str:
    # As the bench's user (root in CI): keep owners like blit does, no chroot, no name or DNS
    # lookups, symlinks untouched.
    return (f"use chroot = no\nmunge symlinks = no\nnumeric ids = yes\nreverse lookup = no\n"
            f"uid = {os.getuid()}\ngid = {os.getgid()}\nmax connections = 0\n"
            f"lock file = {work}/rsyncd.lock\nlog file = {work}/rsyncd.log\n\n"
            f"[{MODULE}]\npath = {root}\nread only = no\ncomment = bench work root\n")


@contextmanager
def session(root: str, blit: str, keys: tuple[str, ...] = ("blit", "blit-notls", "rsync")
            ) -> Iterator[Daemons]:
    """Start the daemons for ``keys`` exporting ``root``; stop them when the block ends. The
    blit daemons are left out when ``blit`` is not an executable (blit's rows say missing).

    Raises:
        DaemonError: a daemon exited at start or did not listen in time.
    """
    work = os.path.join(root, "daemons")
    home = os.path.join(root, "home")
    os.makedirs(work, exist_ok=True)
    os.makedirs(home, exist_ok=True)
    env = dict(os.environ)
    env["HOME"] = home
    env.pop("XDG_DATA_HOME", None)
    ds = Daemons(root, env)
    if not (os.path.isfile(blit) and os.access(blit, os.X_OK)):
        keys = tuple(k for k in keys if k == "rsync")
    with ExitStack() as stack:
        for key in keys:
            port = free_port()
            if key == "rsync":
                cfg = os.path.join(work, "rsyncd.conf")
                with open(cfg, "w") as f:
                    f.write(_rsync_config(root, work))
                argv = ["rsync", "--daemon", "--no-detach", f"--config={cfg}",
                        f"--address={HOST}", f"--port={port}"]
            else:
                tls = key == "blit"
                cfg = os.path.join(work, f"{key}.toml")
                with open(cfg, "w") as f:
                    f.write(_blit_config(root, os.path.join(work, f"{key}-state"), tls, port,
                                         free_port()))
                argv = [blit, "daemon", "--config", cfg, "--no-mdns"]
                if not tls:
                    argv.append("--no-tls")
            d = _spawn(stack, key, argv, os.path.join(work, f"{key}.out"), env, port)
            ds.daemons[key] = d
        for d in ds.daemons.values():
            _wait_listening(d)
        yield ds
