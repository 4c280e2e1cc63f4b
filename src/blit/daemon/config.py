"""The daemon's configuration: TOML file + command-line flags -> one frozen `DaemonConfig`.

Precedence: a command-line flag beats the file, which beats the built-in default. No environment
variable is read. Every problem is a `ConfigFileError` (exit 1) naming the file, the line and the key at fault.
The accepted keys are written down in `schemas/daemon-config.md`.

This module must not open sockets or start anything; it only reads the file and checks paths.
"""

from __future__ import annotations

import ipaddress
import os
import re
import socket
import tomllib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Union

from ..endpoint import DEFAULT_PORT, HOST_NAME, USER_NAME
from ..errors import ConfigError, ConfigFileError

_MODULE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,254}$")

Network = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]
Address = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]


@dataclass(frozen=True, slots=True)
class Access:
    """Who may use an export: client addresses (rsyncd.conf's `hosts allow` / `hosts deny`) and
    users with a secret (`auth users` / `secrets file`). The default lets everyone in."""

    auth_users: tuple[str, ...] = ()
    """Empty: no authentication. Otherwise a session must `auth` as one of these users."""
    secrets: tuple[tuple[str, bytes], ...] = ()
    """(user, secret) of every auth user, read from the secrets file at start."""
    hosts_allow: tuple[Network, ...] = ()
    hosts_deny: tuple[Network, ...] = ()

    @property
    def needs_auth(self) -> bool:
        return bool(self.auth_users)

    def secret_of(self, user: str) -> bytes | None:
        for name, secret in self.secrets:
            if name == user:
                return secret
        return None

    def allows(self, addr: Address | None) -> bool:
        """rsync's rule: a match in hosts_allow admits, then a match in hosts_deny refuses; an
        address matching neither is refused only when hosts_allow alone is given."""
        if not self.hosts_allow and not self.hosts_deny:
            return True
        if addr is None:
            return False
        addr = unmapped(addr)
        if any(addr in n for n in self.hosts_allow):
            return True
        if any(addr in n for n in self.hosts_deny):
            return False
        return not (self.hosts_allow and not self.hosts_deny)


def unmapped(addr: Address) -> Address:
    """IPv4-mapped IPv6 addresses (`::ffff:a.b.c.d`) are matched, and shown, as IPv4."""
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    return addr


def _unmapped_net(net: Network) -> Network:
    """A rule written as IPv4-mapped IPv6 (`::ffff:127.0.0.0/104`) as the IPv4 network it
    names: addresses are matched unmapped (`unmapped`), so such a rule never matched, and a
    deny rule written so admitted everyone."""
    if isinstance(net, ipaddress.IPv6Network) and net.prefixlen >= 96:
        mapped = net.network_address.ipv4_mapped
        if mapped is not None:
            return ipaddress.ip_network(f"{mapped}/{net.prefixlen - 96}")
    return net


@dataclass(frozen=True, slots=True)
class PeerHosts:
    """`peer_pull_from`: the hosts an export may pull from in remote to remote transfers
    (decisions R35). An address must be in one of `networks` or be an address of one of
    `names` (resolved by the caller when a pull starts, not at daemon start)."""

    networks: tuple[Network, ...] = ()
    names: tuple[str, ...] = ()
    """Lower case, without a trailing dot."""

    def outside(self, addrs: list[Address], named: set[Address]) -> list[Address]:
        """The addresses of `addrs` this list does not admit; `named`: the addresses the
        `names` resolve to now."""
        known = {unmapped(x) for x in named}
        return [a for a in addrs if unmapped(a) not in known and not any(unmapped(a) in n for n in self.networks)]


@dataclass(frozen=True, slots=True)
class ModuleConfig:
    name: str
    path: Path
    read_only: bool = False
    comment: str = ""
    allow_peer_pull: bool = False
    """Remote to remote: clients may ask this daemon to pull from another daemon into here."""
    peer_pull_from: PeerHosts | None = None
    """The hosts it may pull from; None: any host (a warning at start, decisions R35)."""
    access: Access = Access()


@dataclass(frozen=True, slots=True)
class DaemonConfig:
    bind: str = ""
    """Address to listen on; "" (or "*") is every interface, IPv4 and IPv6."""
    port: int = DEFAULT_PORT
    """Control (HTTP/2) port; 0 picks a free one (tests)."""
    data_port: int | None = None
    """Raw data-stream port; None: port + 1, or a free one when port is 0."""
    root: Path | None = None
    """The root export (`host://path`), or None for none."""
    root_read_only: bool = False
    root_allow_peer_pull: bool = False
    """The root export's `allow_peer_pull` (remote to remote transfers into it)."""
    root_peer_pull_from: PeerHosts | None = None
    """The root export's `peer_pull_from`."""
    root_access: Access = Access()
    """The root export's root_auth_users, root_hosts_allow, root_hosts_deny."""
    mdns: bool = True
    mdns_name: str = ""
    """The advertised instance name; "" is the host name."""
    mdns_interfaces: tuple[str, ...] = ()
    """Addresses zeroconf listens on; empty: zeroconf's default choice."""
    force_h2_data: bool = False
    """Never grant raw data streams: all data goes over HTTP/2 (tests, restrictive firewalls)."""
    tls: bool = True
    """TLS on both planes with a self-signed certificate (clients pin it on first use)."""
    state_dir: Path | None = None
    """Where the certificate and key live; None: the user data dir (platformdirs) + /daemon."""
    max_connections: int = 256
    modules: tuple[ModuleConfig, ...] = field(default=())

    @property
    def effective_data_port(self) -> int:
        if self.data_port is not None:
            return self.data_port
        return 0 if self.port == 0 else (self.port + 1 if self.port < 65535 else 0)

    @property
    def instance_name(self) -> str:
        return self.mdns_name or socket.gethostname()

    def module(self, name: str) -> ModuleConfig | None:
        for m in self.modules:
            if m.name == name:
                return m
        return None


# key -> (type, checker); types are the TOML types accepted.
_DAEMON_KEYS: dict[str, type | tuple[type, ...]] = {
    "bind": str,
    "port": int,
    "data_port": int,
    "root": str,
    "root_read_only": bool,
    "root_allow_peer_pull": bool,
    "root_peer_pull_from": list,
    "mdns": bool,
    "mdns_name": str,
    "mdns_interfaces": list,
    "force_h2_data": bool,
    "tls": bool,
    "state_dir": str,
    "max_connections": int,
    "secrets_file": str,
    "root_auth_users": list,
    "root_hosts_allow": list,
    "root_hosts_deny": list,
}
_MODULE_KEYS: dict[str, type] = {
    "name": str,
    "path": str,
    "read_only": bool,
    "comment": str,
    "allow_peer_pull": bool,
    "peer_pull_from": list,
    "auth_users": list,
    "secrets_file": str,
    "hosts_allow": list,
    "hosts_deny": list,
}
_ACCESS_KEYS = ("auth_users", "hosts_allow", "hosts_deny")
_PEER_PULL_READ_ONLY = "a read-only export cannot receive pulls from other daemons (drop {ro} or this key)"
_TYPE_NAMES = {str: "a string", int: "an integer", bool: "true or false", list: "an array"}


def load_config(path: Path | None = None, **overrides: Any) -> DaemonConfig:
    """Read the TOML file (if any), apply the command-line overrides, check everything.

    Args:
        path: the config file, or None for defaults only.
        overrides: DaemonConfig fields given on the command line; None values are ignored
            (the flag was not given).

    Raises:
        ConfigFileError: unreadable or malformed file, unknown or mistyped key, bad value, missing
            module or root directory.
    """
    cfg = DaemonConfig()
    if path is not None:
        cfg = _parse_file(path)
    given = {k: v for k, v in overrides.items() if v is not None}
    unknown = set(given) - set(DaemonConfig.__dataclass_fields__)
    if unknown:
        raise TypeError(f"unknown override(s) {sorted(unknown)}")  # a bug in the caller
    if "root" in given:
        given["root"] = Path(given["root"])
    cfg = replace(cfg, **given)
    _check(cfg, path, set(given))
    return cfg


def _parse_file(path: Path) -> DaemonConfig:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigFileError(f"cannot read config file {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise ConfigFileError(f"config file {path} is not UTF-8") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        # tomllib's message ends with "(at line L, column C)".
        raise ConfigFileError(f"config file {path}: {exc}") from None

    def fail(section: str, key: str | None, index: int | None, problem: str) -> ConfigFileError:
        line = _line_of(text, section, key, index)
        where = f"{path}" + (f", line {line}" if line else "")
        what = f"[{section}]" if index is None else f"[[{section}]] #{index + 1}"
        if key:
            what += f" {key}"
        return ConfigFileError(f"config file {where}: {what}: {problem}")

    for top in data:
        if top not in ("daemon", "module"):
            raise fail(top, None, None, "unknown section (expected [daemon] and [[module]])")
    daemon = data.get("daemon", {})
    if not isinstance(daemon, dict):
        raise fail("daemon", None, None, "must be a table")
    values: dict[str, Any] = {}
    for key, value in daemon.items():
        want = _DAEMON_KEYS.get(key)
        if want is None:
            raise fail("daemon", key, None, f"unknown key (known: {', '.join(sorted(_DAEMON_KEYS))})")
        if not _is(value, want):
            raise fail("daemon", key, None, f"must be {_TYPE_NAMES[want]}")  # type: ignore[index]
        if key == "mdns_interfaces":
            if not all(isinstance(v, str) for v in value):
                raise fail("daemon", key, None, "must be an array of address strings")
            value = tuple(value)
        elif key in ("root", "state_dir"):
            if not value.strip():  # "" resolved to the config file's own directory
                raise fail("daemon", key, None, "must not be empty")
            value = _resolve(path, value)
        elif key == "root_peer_pull_from":
            value = _peer_hosts(value, lambda problem: fail("daemon", key, None, problem))
        elif key.removeprefix("root_") in _ACCESS_KEYS or key == "secrets_file":
            continue  # read below, together (the secrets file serves the root and the modules)
        elif key in ("port", "data_port") and not 0 <= value <= 65535:
            raise fail("daemon", key, None, f"{value} is out of range (0-65535)")
        elif key == "max_connections" and not 1 <= value <= 100_000:
            raise fail("daemon", key, None, f"{value} is out of range (1-100000)")
        values[key] = value
    if values.get("root_allow_peer_pull") and values.get("root_read_only"):
        raise fail("daemon", "root_allow_peer_pull", None, _PEER_PULL_READ_ONLY.format(ro="root_read_only"))
    secrets_cache: dict[Path, dict[str, bytes]] = {}
    default_secrets: tuple[str, Path] | None = None
    if "secrets_file" in daemon:
        default_secrets = ("daemon", _resolve(path, daemon["secrets_file"]))
        _read_secrets(default_secrets[1], secrets_cache, lambda p: fail("daemon", "secrets_file", None, p))
    values["root_access"] = _access(
        {k.removeprefix("root_"): v for k, v in daemon.items() if k.startswith("root_")},
        None,
        default_secrets,
        secrets_cache,
        lambda key, problem: fail("daemon", "root_" + key, None, problem),
        path,
    )
    modules = data.get("module", [])
    if not isinstance(modules, list):
        raise fail("module", None, None, "must be an array of tables: write [[module]]")
    mods: list[ModuleConfig] = []
    seen: set[str] = set()
    for i, table in enumerate(modules):
        if not isinstance(table, dict):
            raise fail("module", None, i, "must be a table: write [[module]] with its keys")
        for key, value in table.items():
            want = _MODULE_KEYS.get(key)
            if want is None:
                raise fail("module", key, i, f"unknown key (known: {', '.join(sorted(_MODULE_KEYS))})")
            if not _is(value, want):
                raise fail("module", key, i, f"must be {_TYPE_NAMES[want]}")
        for key in ("name", "path"):
            if key not in table:
                raise fail("module", None, i, f"missing key {key!r}")
        if not table["path"].strip():  # "" resolved to the config file's own directory
            raise fail("module", "path", i, "must not be empty")
        name = table["name"]
        if not _MODULE_NAME.match(name):
            raise fail("module", "name", i, f"{name!r} is not a valid module name (letters, digits, '.', '_', '-')")
        if name in seen:
            raise fail("module", "name", i, f"module {name!r} is defined twice")
        seen.add(name)
        if table.get("allow_peer_pull") and table.get("read_only"):
            raise fail("module", "allow_peer_pull", i, _PEER_PULL_READ_ONLY.format(ro="read_only"))
        mods.append(
            ModuleConfig(
                name=name,
                path=_resolve(path, table["path"]),
                read_only=table.get("read_only", False),
                comment=table.get("comment", ""),
                allow_peer_pull=table.get("allow_peer_pull", False),
                peer_pull_from=(
                    _peer_hosts(table["peer_pull_from"], lambda problem, i=i: fail("module", "peer_pull_from", i, problem))
                    if "peer_pull_from" in table
                    else None
                ),
                access=_access(
                    table,
                    table.get("secrets_file"),
                    default_secrets,
                    secrets_cache,
                    lambda key, problem, i=i: fail("module", key, i, problem),
                    path,
                ),
            )
        )
    values["modules"] = tuple(mods)
    return DaemonConfig(**values)


def _access(
    table: dict[str, Any],
    own_secrets: str | None,
    default_secrets: tuple[str, Path] | None,
    cache: dict[Path, dict[str, bytes]],
    fail: Any,
    config_path: Path,
) -> Access:
    """An export's Access from its table (keys without the root_ prefix); `fail(key, problem)`
    makes the ConfigError naming the line and key."""
    nets: dict[str, tuple[Network, ...]] = {}
    for key in ("hosts_allow", "hosts_deny"):
        nets[key] = _hosts(table.get(key, []), lambda problem, key=key: fail(key, problem), names=False)[0]
    users = table.get("auth_users", [])
    for u in users:
        if not isinstance(u, str) or not USER_NAME.match(u):
            raise fail("auth_users", f"{u!r} is not a valid user name (letters, digits, '.', '_', '-')")
    secrets: list[tuple[str, bytes]] = []
    if users:
        if own_secrets is not None:
            file = _resolve(config_path, own_secrets)
            known = _read_secrets(file, cache, lambda p: fail("secrets_file", p))
        elif default_secrets is not None:
            file = default_secrets[1]
            known = cache[file]
        else:
            raise fail("auth_users", "needs a secrets_file (in this table, or in [daemon] for every export)")
        for u in dict.fromkeys(users):
            if u not in known:
                raise fail("auth_users", f"user {u!r} has no line in the secrets file {file}")
            secrets.append((u, known[u]))
    elif own_secrets is not None:
        _read_secrets(_resolve(config_path, own_secrets), cache, lambda p: fail("secrets_file", p))
    return Access(
        auth_users=tuple(dict.fromkeys(users)),
        secrets=tuple(secrets),
        hosts_allow=nets["hosts_allow"],
        hosts_deny=nets["hosts_deny"],
    )


def _hosts(items: list[Any], fail: Any, *, names: bool) -> tuple[tuple[Network, ...], tuple[str, ...]]:
    """(networks, host names) of a hosts_allow / hosts_deny / peer_pull_from array: addresses
    or CIDR networks (host bits ignored), and with `names` host names; `fail(problem)` makes
    the ConfigError naming the line and key."""
    what = "addresses, CIDR networks or host names" if names else "addresses or CIDR networks"
    nets: list[Network] = []
    hostnames: list[str] = []
    for item in items:
        if not isinstance(item, str):
            raise fail(f"must be an array of {what} (strings)")
        text = item.strip()
        try:
            nets.append(_unmapped_net(ipaddress.ip_network(text, strict=False)))
            continue
        except ValueError:
            pass
        name = text.lower().removesuffix(".")
        # All-digit labels would be a mistyped address (300.1.2.3), not a name.
        if names and HOST_NAME.match(name) and not all(label.isdigit() for label in name.split(".")):
            hostnames.append(name)
        elif names:
            raise fail(f"{item!r} is not an IP address, CIDR network or host name")
        else:
            raise fail(f"{item!r} is not an IP address or CIDR network (host names are not supported)")
    return tuple(nets), tuple(dict.fromkeys(hostnames))


def _peer_hosts(items: list[Any], fail: Any) -> PeerHosts:
    """`peer_pull_from` / `root_peer_pull_from`: a non-empty array (drop the key for any host)."""
    if not items:
        raise fail("is empty: list the hosts this export may pull from (without the key: any host)")
    nets, names = _hosts(items, fail, names=True)
    return PeerHosts(networks=nets, names=names)


def _read_secrets(file: Path, cache: dict[Path, dict[str, bytes]], fail: Any) -> dict[str, bytes]:
    """`user:secret` lines (blank lines and `#` comments skipped; blanks around the secret
    dropped). Like rsync's strict modes, the file must not be accessible by group or others and
    must belong to the daemon's user or root."""
    if file in cache:
        return cache[file]
    from ..credentials import read_private_file, self_or_root

    try:
        raw = read_private_file(file, "the secrets file", owners=self_or_root())
    except ConfigError as exc:
        raise fail(str(exc)) from None
    out: dict[str, bytes] = {}
    for n, line in enumerate(raw.split(b"\n"), 1):
        line = line.rstrip(b"\r")
        if not line.strip() or line.lstrip().startswith(b"#"):
            continue
        user, sep, secret = line.partition(b":")
        name = user.strip().decode("utf-8", "replace")
        secret = secret.strip()
        if not sep or not secret or not USER_NAME.match(name):
            raise fail(f"the secrets file {file}, line {n}: expected user:secret")
        if name in out:
            raise fail(f"the secrets file {file}, line {n}: user {name!r} appears twice")
        out[name] = secret
    cache[file] = out
    return out


def _is(value: Any, want: type | tuple[type, ...]) -> bool:
    if want is int:
        return type(value) is int
    return isinstance(value, want)


def _resolve(config_path: Path, value: str) -> Path:
    """Relative paths in the file are relative to the file's directory."""
    p = Path(os.path.expanduser(value))
    return p if p.is_absolute() else (config_path.parent / p)


def _check(cfg: DaemonConfig, path: Path | None, flags: set[str]) -> None:
    """What needs the whole configuration (file and `flags`, the keys given on the command
    line): a value from a flag is named as the flag, one from the file with its line."""
    def where(key: str, section: str = "daemon", index: int | None = None) -> str:
        """Who gave the value at fault (asked only on a failure: the file is read again then)."""
        if key in flags and section == "daemon":
            return f"--{key.replace('_', '-')}: "
        if path is None:
            return ""
        try:
            line = _line_of(path.read_text(encoding="utf-8"), section, key, index)
        except (OSError, UnicodeDecodeError):
            line = None
        what = f"[{section}]" if index is None else f"[[{section}]] #{index + 1}"
        return f"config file {path}" + (f", line {line}" if line else "") + f": {what} {key}: "

    if not 0 <= cfg.port <= 65535:
        raise ConfigFileError(f"port {cfg.port} is out of range (0-65535)")
    if cfg.data_port is not None and not 0 <= cfg.data_port <= 65535:
        raise ConfigFileError(f"data port {cfg.data_port} is out of range (0-65535)")
    if cfg.data_port and cfg.data_port == cfg.port:
        raise ConfigFileError(f"{where('data_port')}data_port must differ from port ({cfg.port})")
    if cfg.root is not None and not cfg.root.is_dir():
        raise ConfigFileError(f"{where('root')}root {str(cfg.root)!r} is not a directory")
    for i, m in enumerate(cfg.modules):
        if not m.path.is_dir():
            raise ConfigFileError(f"{where('path', 'module', i)}module {m.name!r}: path {str(m.path)!r} is not a directory")


def _line_of(text: str, section: str, key: str | None, index: int | None) -> int | None:
    """The line of `key` in the `index`-th [section] / [[section]] table (1-based), if found."""
    current: str | None = None
    count = -1
    header_line = None
    key_re = re.compile(rf"^\s*(?:{re.escape(key)}|\"{re.escape(key)}\")\s*=") if key else None
    for n, line in enumerate(text.splitlines(), 1):
        stripped = line.strip()
        m = re.match(r"^\[\[?\s*([A-Za-z0-9_.-]+)\s*\]\]?", stripped)
        if m:
            current = m.group(1)
            if current == section:
                count += 1
                if index is None or count == index:
                    header_line = n
                    if key_re is None:
                        return n
            continue
        if current == section and (index is None or count == index) and key_re and key_re.match(line):
            return n
    return header_line
