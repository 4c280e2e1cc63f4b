"""Endpoints: what `SRC`, `DST` and `HOST` mean on the command line. Pure parsing, no I/O.

    /abs/path, rel/path, ./name:x, ../x   local paths (kept exactly, trailing slash included)
    host:/module/path                     module `module` on host, default port
    host:port:/module/path                the same on another port
    [v6addr]:/module/path                 IPv6 literal, default port
    [v6addr]:port:/module/path            IPv6 literal and port
    host://path  host:port://path         the daemon's root export (module "")
    user@host:/module/path, user@[v6]:port:/module/path, user@host://path
                                          the same, authenticating as `user` (--secrets-file)

A text is local when it starts with "/", "./" or "../", or when it has no ":" before its first
"/". The trailing slash is kept: it carries rsync's meaning ("the contents of").

This module must not resolve names, touch the filesystem or import trio.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

from .errors import ConfigError

DEFAULT_PORT = 9031
"""The daemon's default control port (its data port defaults to the next one)."""

_MODULE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,254}$")
_USER = r"[A-Za-z0-9_][A-Za-z0-9._-]{0,254}"
USER_NAME = re.compile(rf"^{_USER}$")
"""A user name (`user@host:...` here, `auth_users` in the daemon's config)."""
_USER_RE = re.compile(rf"^({_USER})@")
HOST_NAME = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9._-]{0,252}[A-Za-z0-9])?$")
"""A host name as typed in an endpoint (`peer_pull_from` in the daemon's config too)."""


def contents_form(path: str | bytes) -> bool:
    """rsync's "the contents of": a trailing slash, or a last component `.` or `..` (`SRC/.`,
    `.`: that directory's entries, never the directory itself under its own name)."""
    p = os.fsencode(path)
    if p.endswith(b"/"):
        return True
    return p.rpartition(b"/")[2] in (b".", b"..")


@dataclass(frozen=True, slots=True)
class LocalEndpoint:
    path: str
    """The path exactly as given (trailing slash kept)."""

    @property
    def trailing_slash(self) -> bool:
        """The contents form (contents_form): a trailing slash, `/.` or `/..`."""
        return contents_form(self.path)

    def __str__(self) -> str:
        return self.path


@dataclass(frozen=True, slots=True)
class HostSpec:
    """A daemon address: host name or IP literal (without brackets) and port."""

    host: str
    port: int = DEFAULT_PORT

    @property
    def is_ipv6(self) -> bool:
        return ":" in self.host

    def __str__(self) -> str:
        host = f"[{self.host}]" if self.is_ipv6 else self.host
        return host if self.port == DEFAULT_PORT else f"{host}:{self.port}"

    @property
    def netloc(self) -> str:
        """host:port always (the key pinned TLS certificates are stored under)."""
        host = f"[{self.host}]" if self.is_ipv6 else self.host
        return f"{host}:{self.port}"


@dataclass(frozen=True, slots=True)
class RemoteEndpoint:
    host: HostSpec
    module: str
    """The module name; "" is the daemon's root export (`host://path`)."""
    path: str
    """The path inside the module, relative, without a leading "/", trailing slash kept
    ("" is the module's top)."""
    user: str | None = None
    """`user@host:...`: authenticate as this user (None: no authentication)."""

    @property
    def trailing_slash(self) -> bool:
        """The contents form (contents_form): a trailing slash, `/.` or `/..`."""
        return contents_form(self.path)

    @property
    def is_root_export(self) -> bool:
        return self.module == ""

    @property
    def path_bytes(self) -> bytes:
        """The path as the bytes that travel on the wire (surrogate escapes undone)."""
        return self.path.encode("utf-8", "surrogateescape")

    def __str__(self) -> str:
        who = f"{self.user}@" if self.user else ""
        if self.is_root_export:
            return f"{who}{self.host}://{self.path}"
        return f"{who}{self.host}:/{self.module}" + (f"/{self.path}" if self.path else "")


Endpoint = LocalEndpoint | RemoteEndpoint


def is_local(text: str) -> bool:
    """Whether `text` names a local path under the rules in the module docstring."""
    if text.startswith(("/", "./", "../")) or text in (".", ".."):
        return True
    colon = text.find(":")
    if colon < 0:
        return True
    slash = text.find("/")
    return 0 <= slash < colon


def parse_endpoint(text: str) -> LocalEndpoint | RemoteEndpoint:
    """Parse a transfer endpoint.

    Raises:
        ConfigError: empty text, a NUL byte, a malformed host or port, no module, or a module
            path that is not absolute. The message quotes the text and names the problem.
    """
    if not text:
        raise ConfigError("empty path")
    if "\0" in text:
        raise ConfigError(f"endpoint {text!r} contains a NUL byte")
    if is_local(text):
        return LocalEndpoint(text)
    m = _USER_RE.match(text)
    user = m.group(1) if m else None
    host, rest = _split_host(text[m.end() :] if m else text)
    if rest.startswith("//"):
        path = rest[2:]
        _check_path(text, path)
        return RemoteEndpoint(host, "", path.lstrip("/"), user)
    if not rest.startswith("/"):
        raise ConfigError(
            f"malformed endpoint {text!r}: the path after {text[: len(text) - len(rest)]!r} must "
            f"start with '/' (host:/module/path); for a local file with ':' in its name write ./{text}"
        )
    module, _, path = rest[1:].partition("/")
    if not module:
        raise ConfigError(f"malformed endpoint {text!r}: no module named (host:/module/path)")
    if not _MODULE_RE.match(module):
        raise ConfigError(f"malformed endpoint {text!r}: {module!r} is not a valid module name")
    _check_path(text, path)
    return RemoteEndpoint(host, module, path.lstrip("/"), user)  # rsync: mod//x is mod/x


def parse_host(text: str) -> HostSpec:
    """Parse a bare daemon address: host, host:port, [v6], [v6]:port, or an IPv6 literal.

    Raises:
        ConfigError: malformed host or port.
    """
    if not text:
        raise ConfigError("empty host")
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise ConfigError(f"malformed host {text!r}: missing ']'")
        addr = text[1:end]
        after = text[end + 1 :]
        _check_v6(text, addr)
        if not after:
            return HostSpec(addr)
        if not after.startswith(":"):
            raise ConfigError(f"malformed host {text!r}: expected ':port' after ']'")
        return HostSpec(addr, _port(text, after[1:]))
    if text.count(":") > 1:
        _check_v6(text, text)
        return HostSpec(text)
    name, sep, port = text.partition(":")
    _check_hostname(text, name)
    return HostSpec(name, _port(text, port) if sep else DEFAULT_PORT)


def parse_listing_target(text: str) -> HostSpec | RemoteEndpoint:
    """What `blit list` accepts: a bare host (modules) or a remote endpoint (entries).

    `host:/` is taken as the bare host; a `user@` before a bare host is dropped (listing the
    modules needs no authentication).
    """
    m = _USER_RE.match(text)
    if m and not ("/" in text and not text.endswith(":/")):
        text = text[m.end() :]
    if text.endswith(":/") and not text.endswith("::/"):
        return parse_host(text[:-2])
    if "/" in text and not text.startswith(("/", "./", "../")):
        ep = parse_endpoint(text)
        if isinstance(ep, RemoteEndpoint):
            return ep
    if text.startswith(("/", "./", "../")):
        raise ConfigError(f"{text!r} is a local path; blit list takes HOST or HOST:/module/path")
    return parse_host(text)


def _split_host(text: str) -> tuple[HostSpec, str]:
    """Split `host[:port]:rest` or `[v6][:port]:rest`; returns the host and rest (after ':')."""
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise ConfigError(f"malformed endpoint {text!r}: missing ']'")
        addr = text[1:end]
        _check_v6(text, addr)
        after = text[end + 1 :]
        if not after.startswith(":"):
            raise ConfigError(f"malformed endpoint {text!r}: expected ':' after ']'")
        after = after[1:]
        if after.startswith("/"):
            return HostSpec(addr), after
        port, sep, rest = after.partition(":")
        if not sep:
            raise ConfigError(f"malformed endpoint {text!r}: expected ':/module/path' after the port")
        return HostSpec(addr, _port(text, port)), rest
    name, _, after = text.partition(":")
    _check_hostname(text, name)
    if after.startswith("/") or not after:
        return HostSpec(name), after
    port, sep, rest = after.partition(":")
    if sep and port.isdigit():
        return HostSpec(name, _port(text, port)), rest
    if port.isdigit() and not sep:
        raise ConfigError(f"malformed endpoint {text!r}: expected ':/module/path' after the port")
    return HostSpec(name), after


def _port(text: str, port: str) -> int:
    if not port.isdigit() or not port.isascii():
        raise ConfigError(f"malformed endpoint {text!r}: port {port!r} is not a number")
    value = int(port)
    if not 1 <= value <= 65535:
        raise ConfigError(f"malformed endpoint {text!r}: port {value} is out of range (1-65535)")
    return value


def _check_hostname(text: str, name: str) -> None:
    if not name:
        raise ConfigError(f"malformed endpoint {text!r}: no host name")
    if not HOST_NAME.match(name):
        raise ConfigError(f"malformed endpoint {text!r}: {name!r} is not a valid host name")


def _check_v6(text: str, addr: str) -> None:
    import ipaddress

    try:
        ipaddress.IPv6Address(addr.split("%", 1)[0])
    except ValueError:
        raise ConfigError(f"malformed endpoint {text!r}: {addr!r} is not an IPv6 address") from None


def _check_path(text: str, path: str) -> None:
    parts = path.split("/")
    if ".." in parts:
        raise ConfigError(f"malformed endpoint {text!r}: '..' is not allowed in a remote path")
    for part in parts:  # protocol.MAX_NAME: what a daemon accepts (and Linux names hold)
        if len(part.encode("utf-8", "surrogateescape")) > 255:
            raise ConfigError(f"malformed endpoint {_cut(text)!r}: a name in the path is longer than 255 bytes")


def _cut(text: str, most: int = 80) -> str:
    return text if len(text) <= most else text[:most] + "..."
