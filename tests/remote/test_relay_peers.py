"""`peer_pull_from` (decisions R35): the hosts a consenting daemon B may pull from, checked on
every address B would connect to before it connects. Real `blit daemon` processes on 127.0.0.1
and 127.0.0.2 (both loopback), the real `blit` command."""

from __future__ import annotations

import ipaddress
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from blit.daemon.config import PeerHosts

from .conftest import DaemonProcess, blit_cmd, run_daemon_process, subprocess_env, write_config
from .test_relay_process import blit, stderr_lines
from .treeutil import assert_same_tree, make_full_tree, snapshot

ALLOWED, FORBIDDEN = "127.0.0.1", "127.0.0.2"


def ep(d: DaemonProcess, host: str, path: str) -> str:
    return f"{host}:{d.port}:/{path}"


@pytest.fixture
def peers(tmp_path: Path) -> Iterator[tuple[DaemonProcess, DaemonProcess, DaemonProcess]]:
    """A1 on 127.0.0.1 and A2 on 127.0.0.2, each with the same tree in data/src; B consents
    with a list in every form: data by address, other by name, the root export by network."""
    root = tmp_path / "B" / "root"
    root.mkdir(parents=True)
    with (
        run_daemon_process(tmp_path / "A1") as a1,
        run_daemon_process(tmp_path / "A2", bind=FORBIDDEN) as a2,
        run_daemon_process(
            tmp_path / "B",
            peer_pull=True,
            module_extra={
                "data": f'peer_pull_from = ["{ALLOWED}"]',
                "other": 'allow_peer_pull = true\npeer_pull_from = ["nas.invalid", "LOCALHOST."]',
            },
            extra=f'root = "{root}"\nroot_allow_peer_pull = true\nroot_peer_pull_from = ["127.0.0.0/31"]',
        ) as b,
    ):
        make_full_tree(a1.modules["data"] / "src")
        make_full_tree(a2.modules["data"] / "src")
        yield a1, a2, b


def refusal(a: DaemonProcess, export: str, key: str) -> str:
    return f"blit: error: {export} may not pull from {FORBIDDEN}:{a.port}: {FORBIDDEN} is not in {key} (the daemon's config)"


def test_a_listed_peer_is_pulled_from_and_any_other_is_refused_before_b_connects(
    peers: tuple[DaemonProcess, DaemonProcess, DaemonProcess],
) -> None:
    a1, a2, b = peers
    broot = b.config_path.parent / "root"
    dests = [  # (B endpoint, where it lands, the export, the key it names)
        (f"{ALLOWED}:{b.port}:/data/dst", b.modules["data"] / "dst", "module 'data'", "its peer_pull_from"),
        (f"{ALLOWED}:{b.port}:/other/dst", b.modules["other"] / "dst", "module 'other'", "its peer_pull_from"),
        (f"{ALLOWED}:{b.port}://dst", broot / "dst", "the root export", "root_peer_pull_from"),
    ]
    for dst, landed, export, key in dests:
        before = {p: snapshot(p) for p in (*b.modules.values(), broot)}
        a2_tree = snapshot(a2.modules["data"])
        for op in ("copy", "mirror", "move"):
            r = blit(b, op, ep(a2, FORBIDDEN, "data/src/"), dst)
            assert (r.returncode, stderr_lines(r), r.stdout) == (1, [refusal(a2, export, key)], ""), r.stderr
        assert {p: snapshot(p) for p in before} == before  # nothing written on B
        assert snapshot(a2.modules["data"]) == a2_tree  # nor removed from A2
        # B keeps serving: the allowed peer's tree lands, identical.
        r = blit(b, "copy", ep(a1, ALLOWED, "data/src/"), dst)
        assert r.returncode == 0, r.stderr
        assert_same_tree(a1.modules["data"] / "src", landed)
    assert "session from" not in a2.log()  # B never connected to the forbidden peer
    assert "from any host" not in b.log()  # every consenting export has a list: no warning


def test_a_name_in_the_list_admits_what_it_resolves_to(peers: tuple[DaemonProcess, DaemonProcess, DaemonProcess]) -> None:
    """`other` lists "LOCALHOST." (and a name that does not resolve): A1 named by the client as
    localhost is reached through the addresses B checked."""
    a1, _a2, b = peers
    r = blit(b, "copy", ep(a1, "localhost", "data/src/"), f"{ALLOWED}:{b.port}:/other/byname")
    assert r.returncode == 0, r.stderr
    assert_same_tree(a1.modules["data"] / "src", b.modules["other"] / "byname")
    # The name's addresses admit nothing else: data lists 127.0.0.1 only, the name localhost is
    # allowed there only through its addresses; an address outside is refused as above.
    r = blit(b, "copy", ep(a1, "localhost", "data/src/"), f"{ALLOWED}:{b.port}:/data/byname")
    addrs = {ai[4][0] for ai in socket.getaddrinfo("localhost", a1.port, type=socket.SOCK_STREAM)}
    if addrs == {ALLOWED}:
        assert r.returncode == 0, r.stderr
        assert_same_tree(a1.modules["data"] / "src", b.modules["data"] / "byname")
    else:  # localhost also has ::1 here: not every address is in data's list
        assert r.returncode == 1 and "may not pull from localhost" in r.stderr, r.stderr


def test_every_address_must_be_in_the_list() -> None:
    """A name resolving to an allowed and a forbidden address is refused (the forbidden one is
    named); IPv4-mapped IPv6 addresses count as IPv4; names admit what they resolve to."""
    rule = PeerHosts(networks=(ipaddress.ip_network("127.0.0.1"), ipaddress.ip_network("fd00::/8")), names=("nas",))
    ip = ipaddress.ip_address
    assert rule.outside([ip("127.0.0.1"), ip("127.0.0.2")], set()) == [ip("127.0.0.2")]
    assert rule.outside([ip("::ffff:127.0.0.1"), ip("fd00::5")], set()) == []
    assert rule.outside([ip("192.0.2.7"), ip("127.0.0.1")], {ip("192.0.2.7")}) == []


def test_without_a_list_any_host_is_allowed_with_a_warning_at_start(tmp_path: Path) -> None:
    """The default (no peer_pull_from) is as before R35: any host, and the log says so."""
    with run_daemon_process(tmp_path / "A2", bind=FORBIDDEN) as a2, run_daemon_process(tmp_path / "B", peer_pull=True) as b:
        make_full_tree(a2.modules["data"] / "src")
        assert (
            "module 'data' accepts remote to remote transfers from any host: any client that reaches this daemon"
            " can make it connect to any host and port it can reach (set peer_pull_from in its [[module]] table"
            " to the hosts it may pull from)"
        ) in b.log()
        r = blit(b, "copy", ep(a2, FORBIDDEN, "data/src/"), f"{ALLOWED}:{b.port}:/data/dst")
        assert r.returncode == 0, r.stderr
        assert_same_tree(a2.modules["data"] / "src", b.modules["data"] / "dst")


@pytest.mark.parametrize(
    ("extra", "module_line", "key", "problem"),
    [
        ("", 'peer_pull_from = ["10.0.0.0/33"]', "[[module]] #1 peer_pull_from",
         "'10.0.0.0/33' is not an IP address, CIDR network or host name"),
        ("", 'peer_pull_from = ["300.1.2.3"]', "[[module]] #1 peer_pull_from",
         "'300.1.2.3' is not an IP address, CIDR network or host name"),
        ("", "peer_pull_from = [1]", "[[module]] #1 peer_pull_from",
         "must be an array of addresses, CIDR networks or host names (strings)"),
        ("", "peer_pull_from = []", "[[module]] #1 peer_pull_from",
         "is empty: list the hosts this export may pull from (without the key: any host)"),
        ('root_peer_pull_from = ["nas example"]', "", "[daemon] root_peer_pull_from",
         "'nas example' is not an IP address, CIDR network or host name"),
    ],
)
def test_a_malformed_list_refuses_start_with_line_and_key(
    tmp_path: Path, extra: str, module_line: str, key: str, problem: str
) -> None:
    cfg, _ = write_config(tmp_path, extra=extra, peer_pull=True, module_extra={"data": module_line})
    r = subprocess.run([*blit_cmd(), "daemon", "--config", str(cfg)], env=subprocess_env(tmp_path), capture_output=True, text=True, timeout=60)
    assert r.returncode == 1  # a bad config file (ConfigFileError)
    bad = (module_line or extra).split(" =")[0]
    line = next(i for i, t in enumerate(cfg.read_text().splitlines(), 1) if t.startswith(bad))
    assert r.stderr.strip().splitlines()[-1] == f"blit: error: config file {cfg}, line {line}: {key}: {problem}"
