"""Module credentials and address rules (SPEC "Security"): a real `blit daemon` and the real
`blit` client on 127.0.0.1. Right secret: push and pull work; wrong secret, unknown user, no
secret: one clear line and nothing written; answers cannot be replayed in another session; the
secret never crosses the wire; hosts_allow / hosts_deny; config errors name the line and key."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from blit.daemon.config import load_config
from blit.errors import ConfigError
from blit.transport import protocol

from .conftest import Daemon, DaemonProcess, blit_cmd, h2_post, raw_h2, run_daemon_process, start_daemon

SECRET = "s3cret-alice-b7f1e2"
BOB_SECRET = "bob-secret-99c4"

MODULE_RULES = {
    "data": 'auth_users = ["alice", "bob"]',
    "ro": 'hosts_allow = ["::1", "127.0.0.0/8"]\nhosts_deny = ["0.0.0.0/0"]',
    "other": 'hosts_allow = ["127.0.0.2", "fd00::/8"]',
}


def daemon_secrets(tmp: Path) -> Path:
    tmp.mkdir(parents=True, exist_ok=True)
    p = tmp / "daemon-secrets"
    p.write_text(f"# users\nalice:{SECRET}\nbob: {BOB_SECRET}\n")
    p.chmod(0o600)
    return p


def client_secrets(tmp: Path, text: str, mode: int = 0o600) -> Path:
    p = tmp / "client-secrets"
    p.write_text(text)
    p.chmod(mode)
    return p


@pytest.fixture(params=[True, False], ids=["tls", "cleartext"])
def auth_daemon(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[DaemonProcess]:
    tls = bool(request.param)
    secrets = daemon_secrets(tmp_path / "d")
    with run_daemon_process(
        tmp_path / "d", tls=tls, extra=f'secrets_file = "{secrets}"', module_extra=MODULE_RULES,
        args=() if tls else ("--no-tls",),
    ) as d:
        d.tls = tls  # type: ignore[attr-defined]
        yield d


def blit(d: DaemonProcess, *args: str) -> subprocess.CompletedProcess[str]:
    tls_args = () if getattr(d, "tls", True) else ("--no-tls",)
    argv = [*blit_cmd(), *args[:1], *tls_args, *args[1:]]
    return subprocess.run(argv, env=d.env, capture_output=True, text=True, timeout=120)


def errors(r: subprocess.CompletedProcess[str]) -> list[str]:
    return [ln for ln in r.stderr.splitlines() if ln.startswith("blit:") and not ln.startswith("blit: pinned the TLS certificate of")]


def make_tree(root: Path) -> dict[str, bytes]:
    files = {"a.txt": b"alpha\n", "sub/b.bin": os.urandom(200_000), "sub/deeper/c": b""}
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return files


def tree_of(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def test_right_secret_pushes_and_pulls(auth_daemon: DaemonProcess, tmp_path: Path) -> None:
    d = auth_daemon
    files = make_tree(tmp_path / "src")
    creds = client_secrets(tmp_path, f"alice@127.0.0.1:data {SECRET}\n")
    r = blit(d, "copy", f"{tmp_path / 'src'}/", f"alice@127.0.0.1:{d.port}:/data/in", "--secrets-file", str(creds))
    assert r.returncode == 0, r.stderr
    assert tree_of(d.modules["data"] / "in") == files
    r = blit(d, "copy", f"alice@127.0.0.1:{d.port}:/data/in/", str(tmp_path / "back"), "--secrets-file", str(creds))
    assert r.returncode == 0, r.stderr
    assert tree_of(tmp_path / "back") == files
    # A file holding only the secret serves any endpoint; bob's own secret works for bob.
    bare = client_secrets(tmp_path, f"{BOB_SECRET}\n")
    r = blit(d, "list", f"bob@127.0.0.1:{d.port}:/data/in", "--secrets-file", str(bare))
    assert r.returncode == 0, r.stderr
    assert "a.txt" in r.stdout


@pytest.mark.parametrize(
    "user, line",
    [("alice", "alice@127.0.0.1:data not-the-secret"), ("mallory", f"mallory@127.0.0.1:data {SECRET}")],
    ids=["wrong-secret", "unknown-user"],
)
def test_wrong_credentials_fail_alike_and_write_nothing(auth_daemon: DaemonProcess, tmp_path: Path, user: str, line: str) -> None:
    d = auth_daemon
    make_tree(tmp_path / "src")
    creds = client_secrets(tmp_path, line + "\n")
    r = blit(d, "copy", f"{tmp_path / 'src'}/", f"{user}@127.0.0.1:{d.port}:/data/in", "--secrets-file", str(creds))
    assert r.returncode == 1, r.stderr
    assert errors(r) == ["blit: error: authentication failed for module 'data'"]
    assert os.listdir(d.modules["data"]) == []
    (d.modules["data"] / "kept").write_text("module file")
    r = blit(d, "copy", f"{user}@127.0.0.1:{d.port}:/data/kept", str(tmp_path / "out"), "--secrets-file", str(creds))
    assert r.returncode == 1 and errors(r) == ["blit: error: authentication failed for module 'data'"]
    assert not (tmp_path / "out").exists()


def test_missing_credentials(auth_daemon: DaemonProcess, tmp_path: Path) -> None:
    d = auth_daemon
    make_tree(tmp_path / "src")
    (d.modules["data"] / "kept").write_text("module file")
    for args in (
        ("copy", f"{tmp_path / 'src'}/", f"127.0.0.1:{d.port}:/data/in"),
        ("copy", f"127.0.0.1:{d.port}:/data/kept", str(tmp_path / "out")),
        ("list", f"127.0.0.1:{d.port}:/data"),
    ):
        r = blit(d, *args)
        assert r.returncode == 1, r.stderr
        assert errors(r) == ["blit: error: module 'data' requires a user and secret (see --secrets-file)"]
    # A user without --secrets-file: usage, exit 2; a file without a line for this endpoint: a
    # bad config file, exit 1.
    r = blit(d, "copy", f"{tmp_path / 'src'}/", f"alice@127.0.0.1:{d.port}:/data/in")
    assert r.returncode == 2
    assert errors(r) == [f"blit: error: alice@127.0.0.1:/data names user 'alice': give the secret with --secrets-file FILE"]
    creds = client_secrets(tmp_path, f"alice@example.org:data {SECRET}\n")
    r = blit(d, "copy", f"{tmp_path / 'src'}/", f"alice@127.0.0.1:{d.port}:/data/in", "--secrets-file", str(creds))
    assert r.returncode == 1
    assert errors(r) == [
        f"blit: error: the secrets file {creds} has no line for alice@127.0.0.1:data (and no line with a secret alone)"
    ]
    assert os.listdir(d.modules["data"]) == ["kept"] and not (tmp_path / "out").exists()


def test_client_refuses_a_secrets_file_others_can_read(auth_daemon: DaemonProcess, tmp_path: Path) -> None:
    d = auth_daemon
    make_tree(tmp_path / "src")
    creds = client_secrets(tmp_path, f"alice@127.0.0.1:data {SECRET}\n", mode=0o644)
    r = blit(d, "copy", f"{tmp_path / 'src'}/", f"alice@127.0.0.1:{d.port}:/data/in", "--secrets-file", str(creds))
    assert r.returncode == 1
    assert errors(r) == [
        f"blit: error: the secrets file {creds} is accessible by group or others (mode 0644): run chmod 600 on it"
    ]
    assert os.listdir(d.modules["data"]) == []


def test_address_rules(auth_daemon: DaemonProcess, tmp_path: Path) -> None:
    d = auth_daemon
    make_tree(tmp_path / "src")
    # other: hosts_allow = 127.0.0.2 only -> 127.0.0.1 is denied, and the daemon goes on serving.
    r = blit(d, "copy", f"{tmp_path / 'src'}/", f"127.0.0.1:{d.port}:/other/in")
    assert r.returncode == 1
    assert errors(r) == ["blit: error: access to module 'other' denied for 127.0.0.1"]
    assert os.listdir(d.modules["other"]) == []
    # ro: allowed by the CIDR 127.0.0.0/8 before hosts_deny 0.0.0.0/0 is looked at (rsync's order).
    (d.modules["ro"] / "f").write_text("readable")
    r = blit(d, "copy", f"127.0.0.1:{d.port}:/ro/f", str(tmp_path / "f"))
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "f").read_text() == "readable"
    # The module list hides what this address may not use.
    r = blit(d, "list", f"127.0.0.1:{d.port}")
    assert r.returncode == 0, r.stderr
    names = [ln.split()[0] for ln in r.stdout.splitlines()]
    assert names == ["data", "ro"]
    # So does the list an unknown module's message gives (it named `other` too).
    r = blit(d, "list", f"127.0.0.1:{d.port}:/nosuch")
    assert r.returncode == 1
    assert errors(r) == ["blit: error: unknown module 'nosuch' (modules: data, ro)"], r.stderr


def test_daemon_refuses_to_start_on_bad_access_config(tmp_path: Path) -> None:
    secrets = daemon_secrets(tmp_path / "d")
    secrets.chmod(0o640)
    from .conftest import subprocess_env, write_config

    cfg, _ = write_config(tmp_path / "d", extra=f'secrets_file = "{secrets}"', module_extra=MODULE_RULES)
    r = subprocess.run([*blit_cmd(), "daemon", "--config", str(cfg)], env=subprocess_env(tmp_path), capture_output=True, text=True, timeout=60)
    assert r.returncode == 1
    line = next(i for i, t in enumerate(cfg.read_text().splitlines(), 1) if t.startswith("secrets_file"))
    assert r.stderr.strip().splitlines()[-1] == (
        f"blit: error: config file {cfg}, line {line}: [daemon] secrets_file: the secrets file {secrets}"
        " is accessible by group or others (mode 0640): run chmod 600 on it"
    )


@pytest.mark.parametrize(
    "daemon_extra, module_line, fragments",
    [
        ("", 'hosts_allow = ["10.0.0.0/33"]', ["[[module]] #1 hosts_allow", "'10.0.0.0/33' is not an IP address or CIDR network"]),
        ("", 'hosts_deny = ["nas.example.org"]', ["[[module]] #1 hosts_deny", "host names are not supported"]),
        ("", 'hosts_deny = ["fe80::/129"]', ["[[module]] #1 hosts_deny", "'fe80::/129'"]),
        ("", 'auth_users = ["alice"]', ["[[module]] #1 auth_users", "needs a secrets_file"]),
        ("SECRETS", 'auth_users = ["carol"]', ["[[module]] #1 auth_users", "user 'carol' has no line in the secrets file"]),
        ("SECRETS", 'auth_users = ["a b"]', ["[[module]] #1 auth_users", "'a b' is not a valid user name"]),
        ("", 'secrets_file = "missing"', ["[[module]] #1 secrets_file", "cannot read the secrets file", "No such file"]),
        ("", "auth_user = []", ["[[module]] #1 auth_user", "unknown key"]),
        ('root_hosts_allow = ["x"]', "", ["[daemon] root_hosts_allow", "'x' is not an IP address"]),
    ],
)
def test_access_config_errors_name_line_and_key(tmp_path: Path, daemon_extra: str, module_line: str, fragments: list[str]) -> None:
    secrets = daemon_secrets(tmp_path)
    (tmp_path / "m").mkdir()
    text = f"""[daemon]
port = 0
{daemon_extra.replace("SECRETS", f'secrets_file = "{secrets}"')}

[[module]]
name = "m"
path = "m"
{module_line}
"""
    cfg = tmp_path / "blitd.toml"
    cfg.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(cfg)
    msg = str(info.value)
    key = fragments[0].split()[-1]
    line = next(i for i, t in enumerate(text.splitlines(), 1) if t.startswith(key))
    assert f", line {line}: " in msg, msg
    for f in fragments:
        assert f in msg, msg


def test_secrets_file_lines_are_checked(tmp_path: Path) -> None:
    secrets = tmp_path / "s"
    secrets.write_text("alice:x\nno separator here\n")
    secrets.chmod(0o600)
    (tmp_path / "m").mkdir()
    cfg = tmp_path / "blitd.toml"
    cfg.write_text(f'[daemon]\nsecrets_file = "{secrets}"\n[[module]]\nname = "m"\npath = "m"\n')
    with pytest.raises(ConfigError, match=rf"line 2: \[daemon\] secrets_file: the secrets file {secrets}, line 2: expected user:secret"):
        load_config(cfg)


@pytest.mark.parametrize("line", ["alice@127.0.0.1:/priv wonderland", "alice@127.0.0.1:9031:priv wonderland"])
def test_a_mistyped_client_secrets_key_is_named_not_taken_for_the_default_secret(tmp_path: Path, line: str) -> None:
    """A key written as the endpoint is (a '/', a port) became the secret for every daemon,
    and the run failed with a bare 'authentication failed'. The message names the line, never
    its text (which may be a secret: QA pass 5, F6)."""
    from blit.credentials import parse_client_secrets
    from blit.errors import ConfigFileError

    with pytest.raises(ConfigFileError, match=r"line 2: its first word looks like a user@host:module key but is not one") as exc:
        parse_client_secrets(f"# mine\n{line}\n".encode(), tmp_path / "s")
    assert "wonderland" not in str(exc.value) and "alice@127" not in str(exc.value)
    assert parse_client_secrets(b"just-a-secret\n", tmp_path / "s") == ({}, b"just-a-secret")
    for text, problem in ((b"a@h:m Qx1\na@H:m Qy2\n", "line 2: the same key as line 1"),
                          (b"P@ss Qx1\nP@ss Qy2\n", "line 2: a second line with a secret alone \\(the first: line 1\\)")):  # fmt: skip
        with pytest.raises(ConfigFileError, match=problem) as exc:
            parse_client_secrets(text, tmp_path / "s")
        assert not any(w in str(exc.value) for w in ("Qx1", "Qy2", "P@ss")), exc.value


def test_a_key_line_without_its_module_is_named_not_taken_for_the_secret(tmp_path: Path) -> None:
    """QA pass 7: `alice@nas s3cret` (the module left out) was a secret alone, the whole line,
    and the run failed as a wrong secret. A secret alone that starts with this endpoint's own
    user@host and goes on is refused, naming the line and the key to write; one that merely
    starts with some x@y ('P@ssw0rd 2024', bob's line for alice) is still a secret."""
    from blit.credentials import client_credentials
    from blit.errors import ConfigFileError

    secrets = tmp_path / "s"
    for text, host in ((b"# mine\nalice@nas s3cret\n", "nas"), (b"# mine\nalice@NAS   s3cret\n", "nas")):
        secrets.write_bytes(text)
        secrets.chmod(0o600)
        shown = "alice@nas"  # (alice@[::1] s3cret: the line above's refusal, its ':' inside)
        with pytest.raises(ConfigFileError, match=rf"line 2: it starts with {re.escape(shown)} but names no module; write the key as {re.escape(shown)}:MODULE") as exc:
            client_credentials("alice", host, "photos", secrets)
        assert "s3cret" not in str(exc.value)
    for text, want in ((b"P@ssw0rd 2024\n", b"P@ssw0rd 2024"), (b"bob@nas s3cret\n", b"bob@nas s3cret"), (b"alice@nas:photos x\nalice@nas s3cret\n", b"x")):
        secrets.write_bytes(text)
        assert client_credentials("alice", "nas", "photos", secrets) == ("alice", want), text


AT_SECRETS = {"alice": "P@ssw0rd 2024", "bob": "me@home:Zebra42"}


def test_a_secret_alone_may_hold_at_signs_colons_and_blanks(tmp_path: Path) -> None:
    """QA pass 5, F6: docs/cli.md allows "a line that is only the secret", but one holding '@'
    was refused ('P@ssw0rd 2024': "P@ssw0rd is not a user@host:module key"; 'me@home:Zebra42':
    "has no secret after it"), and the message printed the secret."""
    secrets = tmp_path / "d" / "daemon-secrets"
    secrets.parent.mkdir()
    secrets.write_text("".join(f"{u}:{s}\n" for u, s in AT_SECRETS.items()))
    secrets.chmod(0o600)
    with run_daemon_process(tmp_path / "d", extra=f'secrets_file = "{secrets}"', module_extra={"data": 'auth_users = ["alice", "bob"]'}) as d:
        (d.modules["data"] / "seen").write_text("x")
        for user, secret in AT_SECRETS.items():
            creds = client_secrets(tmp_path, f"# {user}\n{secret}\n")
            r = blit(d, "list", f"{user}@127.0.0.1:{d.port}:/data", "--secrets-file", str(creds))
            assert r.returncode == 0 and "seen" in r.stdout, r.stderr
            creds.write_text("Zebra42\n")  # a wrong secret alone: refused, and nothing quotes the file
            r = blit(d, "list", f"{user}@127.0.0.1:{d.port}:/data", "--secrets-file", str(creds))
            assert r.returncode == 1 and errors(r) == ["blit: error: authentication failed for module 'data'"], r.stderr


def test_secrets_files_reached_through_a_symlink_are_read_and_checked_at_their_target(tmp_path: Path) -> None:
    """QA pass 5, F8: a secrets file behind a symlink (Kubernetes secret volumes, dotfile
    managers) was refused on both ends with "Too many levels of symbolic links". rsync follows
    it; so does blit, and the mode and owner checks are the target's (a link is 0777)."""
    real = tmp_path / "real"
    real.mkdir()
    (real / "daemon.secrets").write_text(f"alice:{SECRET}\n")
    (real / "client.secrets").write_text(f"{SECRET}\n")
    for f in real.iterdir():
        f.chmod(0o600)
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "daemon.secrets").symlink_to("../real/daemon.secrets")
    link = tmp_path / "client.secrets"
    link.symlink_to("real/client.secrets")
    with run_daemon_process(tmp_path / "d", extra=f'secrets_file = "{tmp_path / "d" / "daemon.secrets"}"',
                            module_extra={"data": 'auth_users = ["alice"]'}) as d:  # fmt: skip
        r = blit(d, "list", f"alice@127.0.0.1:{d.port}:/data", "--secrets-file", str(link))
        assert r.returncode == 0, r.stderr
        (real / "client.secrets").chmod(0o644)
        r = blit(d, "list", f"alice@127.0.0.1:{d.port}:/data", "--secrets-file", str(link))
        assert r.returncode == 1
        assert errors(r) == [f"blit: error: the secrets file {link} is accessible by group or others (mode 0644): run chmod 600 on it"]
    (real / "daemon.secrets").chmod(0o640)
    with pytest.raises(ConfigError, match=r"secrets file .*daemon\.secrets is accessible by group or others \(mode 0640\)"):
        load_config(d.config_path)


# --- the protocol itself, on raw HTTP/2 (an in-process daemon) ---------------------------------


async def auth_daemon_inproc(nursery, tmp: Path) -> Daemon:  # type: ignore[no-untyped-def]
    secrets = daemon_secrets(tmp)
    return await start_daemon(
        nursery, tmp, tls=False, stall=10.0, extra=f'secrets_file = "{secrets}"', module_extra=MODULE_RULES
    )


async def call(conn, op: str, msg: protocol.Message) -> tuple[int, object]:  # type: ignore[no-untyped-def]
    status, body = await h2_post(conn, "/blit/" + op, protocol.encode(msg))
    reply_cls = protocol.OPERATIONS[op].reply if status == 200 else protocol.Error
    return status, protocol.decode(reply_cls, body)


async def hello(conn) -> None:  # type: ignore[no-untyped-def]
    status, _ = await call(conn, "hello", protocol.Hello(protocol=protocol.PROTOCOL_VERSION, software="test"))
    assert status == 200


async def test_every_module_operation_needs_auth_and_answers_do_not_replay(nursery, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    d = await auth_daemon_inproc(nursery, tmp_path)
    (d.modules["data"] / "f").write_text("x")
    guarded = [
        ("list", protocol.ListDir(module="data", path=b"")),
        ("stat", protocol.Stat(module="data", path=b"f")),
        ("transfer/open", protocol.OpenTransfer(module="data", path=b"", direction="pull", streams=1)),
        ("tree/open", protocol.OpenTree(module="data", path=b"", direction="push", operation="copy", compare=0, streams=1)),
        (
            "peer/pull",
            protocol.PeerPull(
                module="data", path=b"x", peer=protocol.Peer(host="127.0.0.1", port=d.info.port, module="ro", path=b"", tls=False),
                operation="copy", compare=0, filters=[], dry_run=False, streams=1, h2_data=False,
            ),
        ),
    ]
    async with raw_h2(d) as conn:
        await hello(conn)
        for op, msg in guarded:
            status, err = await call(conn, op, msg)
            assert (status, err) == (401, protocol.Error(error="auth-required", message="module 'data' requires a user and secret (see --secrets-file)")), op
        _, challenge = await call(conn, "auth/challenge", protocol.AuthChallenge())
        nonce = challenge.nonce  # type: ignore[attr-defined]
        assert len(nonce) == 32
        answer = protocol.Auth(module="data", user="alice", mac=protocol.auth_mac(SECRET.encode(), nonce, "alice", "data"))
        assert (await call(conn, "auth", answer))[0] == 200
        status, reply = await call(conn, "stat", protocol.Stat(module="data", path=b"f"))
        assert status == 200 and reply.entry.size == 1  # type: ignore[attr-defined]
        # The same answer again in this session: its nonce is spent.
        status, err = await call(conn, "auth", answer)
        assert status == 409 and err.error == "no-session"  # type: ignore[attr-defined]
    # In another session (its own nonce), the recorded answer is refused and nothing is granted.
    async with raw_h2(d) as conn:
        await hello(conn)
        _, challenge2 = await call(conn, "auth/challenge", protocol.AuthChallenge())
        assert challenge2.nonce != nonce  # type: ignore[attr-defined]
        status, err = await call(conn, "auth", answer)
        assert (status, err) == (403, protocol.Error(error="auth-failed", message="authentication failed for module 'data'"))
        status, _ = await call(conn, "list", protocol.ListDir(module="data", path=b""))
        assert status == 401
        # Attempts are limited per session: after 3 failures even the right answer fails.
        for _ in range(2):
            await call(conn, "auth/challenge", protocol.AuthChallenge())
            await call(conn, "auth", answer)
        _, c = await call(conn, "auth/challenge", protocol.AuthChallenge())
        right = protocol.Auth(module="data", user="alice", mac=protocol.auth_mac(SECRET.encode(), c.nonce, "alice", "data"))  # type: ignore[attr-defined]
        status, err = await call(conn, "auth", right)
        assert status == 403 and "too many attempts" in err.message  # type: ignore[attr-defined]


# --- the secret never crosses the wire --------------------------------------------------------


class Recorder:
    """A TCP proxy on 127.0.0.1 that forwards to `target` and keeps every byte both ways."""

    def __init__(self, target: int) -> None:
        self.target = target
        self.captured = bytearray()
        self.lock = threading.Lock()
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.threads: list[threading.Thread] = []
        self.socks: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.target))
            self.socks += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                t = threading.Thread(target=self._pump, args=(a, b), daemon=True)
                t.start()
                self.threads.append(t)

    def _pump(self, a: socket.socket, b: socket.socket) -> None:
        try:
            while chunk := a.recv(65536):
                with self.lock:
                    self.captured += chunk
                b.sendall(chunk)
        except OSError:
            pass
        finally:
            try:
                b.shutdown(socket.SHUT_WR)
            except OSError:
                pass

    def close(self) -> None:
        self.listener.close()
        for s in self.socks:
            s.close()
        for t in self.threads:
            t.join(5)


def test_the_secret_never_crosses_the_wire(tmp_path: Path) -> None:
    secrets = daemon_secrets(tmp_path / "d")
    with run_daemon_process(
        tmp_path / "d", tls=False, args=("--no-tls",), extra=f'secrets_file = "{secrets}"', module_extra=MODULE_RULES
    ) as d:
        proxy = Recorder(d.port)
        try:
            payload = b"clear payload " + os.urandom(8).hex().encode()
            (tmp_path / "f").write_bytes(payload)
            creds = client_secrets(tmp_path, f"alice@127.0.0.1:data {SECRET}\n")
            r = subprocess.run(
                [*blit_cmd(), "copy", "--no-tls", "--force-h2-data", str(tmp_path / "f"),
                 f"alice@127.0.0.1:{proxy.port}:/data/f", "--secrets-file", str(creds)],
                env=d.env, capture_output=True, text=True, timeout=60,
            )
            assert r.returncode == 0, r.stderr
            assert (d.modules["data"] / "f").read_bytes() == payload
        finally:
            proxy.close()
        wire = bytes(proxy.captured)
        assert payload in wire and b"alice" in wire  # the capture saw the session in the clear
        assert SECRET.encode() not in wire


# --- remote to remote ----------------------------------------------------------------------------


async def test_remote_to_remote_with_protected_modules(nursery, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from blit.errors import RemoteError, UsageError
    from blit.transport.remote import remote_transfer

    a = await auth_daemon_inproc(nursery, tmp_path / "A")
    b_secrets = daemon_secrets(tmp_path / "B")
    b = await start_daemon(
        nursery, tmp_path / "B", tls=False, stall=10.0, peer_pull=True,
        extra=f'secrets_file = "{b_secrets}"', module_extra=MODULE_RULES,
    )
    (a.modules["ro"] / "f").write_text("from A")
    (a.modules["data"] / "g").write_text("protected on A")
    creds = client_secrets(tmp_path, f"alice@127.0.0.1:data {SECRET}\n")

    async def run(src: str, dst: str, op: str = "copy") -> object:
        return await remote_transfer(op, src, dst, tls_enabled=False, secrets_file=creds)

    # Into B's protected module: the client authenticates to B; A's open module is the source.
    s = await run(f"127.0.0.1:{a.info.port}:/ro/f", f"alice@127.0.0.1:{b.info.port}:/data/f")
    assert s.exit_code == 0  # type: ignore[attr-defined]
    assert (b.modules["data"] / "f").read_text() == "from A"
    # Without credentials for B: refused by B, nothing written.
    with pytest.raises(RemoteError, match=r"^module 'data' requires a user and secret \(see --secrets-file\)$"):
        await run(f"127.0.0.1:{a.info.port}:/ro/f", f"127.0.0.1:{b.info.port}:/data/f2")
    # From A's protected module: B holds no secret, so it is refused, and a user@ on the source
    # is a usage error before anything is sent.
    for op in ("copy", "move"):
        with pytest.raises(RemoteError, match="requires authentication for module 'data': remote to remote cannot pull"):
            await run(f"127.0.0.1:{a.info.port}:/data/g", f"alice@127.0.0.1:{b.info.port}:/data/g", op)
    assert (a.modules["data"] / "g").read_text() == "protected on A"
    with pytest.raises(UsageError, match="cannot authenticate to the source daemon"):
        await run(f"alice@127.0.0.1:{a.info.port}:/data/g", f"alice@127.0.0.1:{b.info.port}:/data/g")
    assert sorted(os.listdir(b.modules["data"])) == ["f"]
