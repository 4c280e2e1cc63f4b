"""Daemon configuration: file + flags, precedence, and errors naming the line and the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from blit.daemon.config import DaemonConfig, load_config
from blit.errors import ConfigError


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "blitd.toml"
    p.write_text(text)
    return p


def test_defaults_without_a_file() -> None:
    cfg = load_config(None)
    assert cfg == DaemonConfig()
    assert cfg.port == 9031 and cfg.effective_data_port == 9032
    assert cfg.tls and cfg.mdns and not cfg.force_h2_data and cfg.modules == ()


def test_full_file(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "root").mkdir()
    cfg = load_config(
        write(
            tmp_path,
            """
[daemon]
bind = "127.0.0.1"
port = 7000
data_port = 7100
root = "root"
root_read_only = true
mdns = false
mdns_name = "box"
mdns_interfaces = ["127.0.0.1"]
force_h2_data = true
tls = false
state_dir = "st"

[[module]]
name = "a"
path = "a"
read_only = true
comment = "the a"

[[module]]
name = "b"
path = "a"
allow_peer_pull = true
""",
        )
    )
    assert cfg.bind == "127.0.0.1" and cfg.port == 7000 and cfg.effective_data_port == 7100
    assert cfg.root == tmp_path / "root" and cfg.root_read_only
    assert not cfg.mdns and cfg.mdns_name == "box" and cfg.mdns_interfaces == ("127.0.0.1",)
    assert cfg.force_h2_data and not cfg.tls and cfg.state_dir == tmp_path / "st"
    m, b = cfg.modules
    assert (m.name, m.path, m.read_only, m.comment, m.allow_peer_pull) == ("a", tmp_path / "a", True, "the a", False)
    assert (b.name, b.read_only, b.allow_peer_pull) == ("b", False, True)
    assert not cfg.root_allow_peer_pull


def test_peer_pull_from_is_addresses_networks_and_names(tmp_path: Path) -> None:
    """Absent: any host (None); given: networks (host bits dropped) and names (lower case,
    without a trailing dot), for a module and for the root export."""
    cfg = load_config(
        write(
            tmp_path,
            """
[daemon]
root = "."
root_allow_peer_pull = true
root_peer_pull_from = ["::1"]

[[module]]
name = "a"
path = "."
allow_peer_pull = true
peer_pull_from = ["192.0.2.9/24", "NAS.example.", "127.0.0.1"]

[[module]]
name = "b"
path = "."
allow_peer_pull = true
""",
        )
    )
    a, b = cfg.modules
    assert a.peer_pull_from is not None and b.peer_pull_from is None
    assert [str(n) for n in a.peer_pull_from.networks] == ["192.0.2.0/24", "127.0.0.1/32"]
    assert a.peer_pull_from.names == ("nas.example",)
    assert cfg.root_peer_pull_from is not None and [str(n) for n in cfg.root_peer_pull_from.networks] == ["::1/128"]


def test_flags_override_the_file(tmp_path: Path) -> None:
    p = write(tmp_path, '[daemon]\nport = 7000\nmdns = true\nbind = "0.0.0.0"\n')
    cfg = load_config(p, port=8000, mdns=False, bind=None, root=str(tmp_path))
    assert cfg.port == 8000 and not cfg.mdns and cfg.bind == "0.0.0.0" and cfg.root == tmp_path


def test_port_zero_means_free_ports() -> None:
    assert load_config(None, port=0).effective_data_port == 0


@pytest.mark.parametrize(
    ("text", "fragments"),
    [
        ("[daemon]\nport = \n", ["line 2", "blitd.toml"]),
        ("[daemon]\nbind = '127.0.0.1'\nprot = 5\n", ["line 3", "prot", "unknown key"]),
        ("[daemon]\n\nport = 'x'\n", ["line 3", "port", "must be an integer"]),
        ("[daemon]\nport = 70000\n", ["line 2", "port", "out of range"]),
        ("[daemon]\nmdns = 1\n", ["line 2", "mdns", "true or false"]),
        ("[daemon]\nmdns_interfaces = [1]\n", ["line 2", "mdns_interfaces"]),
        ("[demon]\nport = 1\n", ["line 1", "unknown section"]),
        ("[[module]]\nname = 'a'\n", ["line 1", "missing key 'path'"]),
        ("[[module]]\nname = 'a'\npath = '.'\n[[module]]\nname = 'b'\npath = '.'\nread_only = 'yes'\n",
         ["line 7", "#2", "read_only"]),
        ("[[module]]\nname = 'a b'\npath = '.'\n", ["line 2", "not a valid module name"]),
        ("[[module]]\nname = 'a'\npath = '.'\n[[module]]\nname = 'a'\npath = '.'\n", ["line 5", "defined twice"]),
        ("[[module]]\nname = 'a'\npath = 'missing'\n", ["line 3", "[[module]] #1 path", "module 'a'", "not a directory"]),
        ("[daemon]\nroot = 'missing'\n", ["line 2", "[daemon] root", "not a directory"]),
        ("[module]\nname = 'a'\n", ["[[module]]"]),
        ("[[module]]\nname = 'a'\npath = '.'\nallow_peer_pull = 1\n", ["line 4", "allow_peer_pull", "true or false"]),
        ("[[module]]\nname = 'a'\npath = '.'\n[[module]]\nname = 'b'\npath = '.'\nread_only = true\nallow_peer_pull = true\n",
         ["line 8", "[[module]] #2 allow_peer_pull", "read-only", "drop read_only"]),
        ("[[module]]\nname = 'a'\npath = '.'\nallow_peer_pull = true\npeer_pull_from = ['a', 'b/c']\n",
         ["line 5", "[[module]] #1 peer_pull_from", "'b/c' is not an IP address, CIDR network or host name"]),
        ("[daemon]\nroot = '.'\nroot_peer_pull_from = '10.0.0.1'\n", ["line 3", "[daemon] root_peer_pull_from", "must be an array"]),
        ("[daemon]\nroot = '.'\nroot_read_only = true\nroot_allow_peer_pull = true\n",
         ["line 4", "[daemon] root_allow_peer_pull", "read-only", "drop root_read_only"]),
        # "" exported the config file's directory (its secrets file with it)
        ("[[module]]\nname = 'e'\npath = ''\n", ["line 3", "[[module]] #1 path", "must not be empty"]),
        ("[daemon]\nroot = ' '\n", ["line 2", "[daemon] root", "must not be empty"]),
        ("module = [1, 2]\n", ["[[module]] #1", "must be a table"]),  # a traceback before
    ],
)
def test_malformed_files_name_line_and_key(tmp_path: Path, text: str, fragments: list[str]) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, text))
    for f in fragments:
        assert f in str(info.value), str(info.value)


def test_unreadable_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "nope.toml")


def test_no_environment_variable_is_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BLIT_PORT", "1234")
    monkeypatch.setenv("BLIT_DAEMON_PORT", "1234")
    assert load_config(None).port == 9031


def test_ipv4_mapped_rules_match_ipv4_clients(tmp_path: Path) -> None:
    """Addresses are matched unmapped, so a rule written as IPv4-mapped IPv6 never matched: a
    deny rule so written admitted everyone, an allow rule refused its own address."""
    import ipaddress

    (tmp_path / "m").mkdir()
    cfg = load_config(write(tmp_path, (
        "[[module]]\nname = 'deny'\npath = 'm'\nhosts_deny = ['::ffff:127.0.0.0/104']\n"
        "[[module]]\nname = 'allow'\npath = 'm'\nhosts_allow = ['::ffff:127.0.0.2']\n"
    )))  # fmt: skip
    deny, allow = (cfg.module(n).access for n in ("deny", "allow"))  # type: ignore[union-attr]
    for text in ("127.0.0.1", "::ffff:127.0.0.1"):
        assert not deny.allows(ipaddress.ip_address(text)), text
    assert deny.allows(ipaddress.ip_address("10.0.0.1"))
    assert allow.allows(ipaddress.ip_address("127.0.0.2"))
    assert not allow.allows(ipaddress.ip_address("127.0.0.3"))



def test_an_export_inside_a_looser_one_is_named_at_start(tmp_path: Path) -> None:
    """A read-only module, or one with address rules, inside the (writable, open) root export
    is reachable through the root with the root's rules: the daemon says so at start (it was
    silent). Modules side by side, or an inner one that is no stricter, are not named."""
    from blit.daemon.server import _overlaps

    for d in ("srv/ro", "srv/lan", "srv/plain", "side", "wide/narrow", "mal/ali"):
        (tmp_path / d).mkdir(parents=True)
    secrets = tmp_path / "secrets"
    secrets.write_text("alice:a\nmallory:m\n")
    secrets.chmod(0o600)
    cfg = load_config(write(tmp_path, (
        "[daemon]\nroot = 'srv'\n"
        "[[module]]\nname = 'ro'\npath = 'srv/ro'\nread_only = true\n"
        "[[module]]\nname = 'lan'\npath = 'srv/lan'\nhosts_allow = ['10.0.0.0/8']\n"
        "[[module]]\nname = 'plain'\npath = 'srv/plain'\n"
        "[[module]]\nname = 'side'\npath = 'side'\nread_only = true\n"
        # QA: an outer export with other address rules, or other users, was not named
        "[[module]]\nname = 'wide'\npath = 'wide'\nhosts_allow = ['0.0.0.0/0']\n"
        "[[module]]\nname = 'narrow'\npath = 'wide/narrow'\nhosts_allow = ['127.0.0.1']\n"
        f"[[module]]\nname = 'mal'\npath = 'mal'\nauth_users = ['mallory']\nsecrets_file = '{secrets}'\n"
        f"[[module]]\nname = 'ali'\npath = 'mal/ali'\nauth_users = ['alice']\nsecrets_file = '{secrets}'\n"
    )))  # fmt: skip
    assert sorted(_overlaps(cfg)) == [
        ("module 'ali'", "module 'mal'", "open to other users"),
        ("module 'lan'", "the root export", "open to any address"),
        ("module 'narrow'", "module 'wide'", "under other address rules"),
        ("module 'ro'", "the root export", "writable"),
    ]


def test_a_flag_is_named_as_the_flag_not_as_the_file(tmp_path: Path) -> None:
    """`--root /nonexistent` was reported as the config file's root."""
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, "[daemon]\nport = 1\n"), root=tmp_path / "nonexistent")
    assert str(info.value).startswith("--root: root ") and "blitd.toml" not in str(info.value), str(info.value)

