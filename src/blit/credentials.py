"""Secrets files: reading one safely (both ends), and the client's choice of user and secret.

    read_private_file(path)      the bytes of a file only its owner can read (rsync's strict
                                 modes): refused when group or others have any access
    self_or_root()               the owners a daemon's private file may have
    client_credentials(ep, file) (user, secret) for a remote endpoint written user@host:...

The client's `--secrets-file` has one entry per line (docs/cli.md "Authentication"):

    alice@nas:photos   s3cret        user@host:module, then the secret
    alice@nas://       other         the root export of nas (host://path)
    s3cret                           a line that is only a secret: for every other endpoint

Blank lines and lines starting with '#' are skipped; the secret is the rest of the line with
surrounding blanks removed. A line is a key line when it has a blank and its first word is
shaped `user@host:...` (then it must be a valid key); any other line is a secret alone, '@',
':' and blanks included, except one that starts with the endpoint's own `user@host` and goes
on: a key whose module was left out, refused. No message quotes a line's text (it may hold a
secret): messages name the file and the line. The user always comes from the endpoint (`alice@nas:/photos/x`); no
environment variable is read. This module must not talk to the network.
"""

from __future__ import annotations

import os
import re
import stat
from pathlib import Path

from .errors import ConfigFileError, UsageError

MAX_SECRETS_FILE = 1 << 20
# A first word shaped user@host:..., followed by more words: a key line (docs/cli.md). A line
# of one word is always a secret alone, whatever it holds ('me@home:Zebra42').
_KEYISH = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]*@[^:\s]*:")
_KEY = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]*@(\[[0-9A-Fa-f:.%]+\]|[A-Za-z0-9._-]+):(//|[A-Za-z0-9][A-Za-z0-9._-]*)$")


def self_or_root() -> tuple[int, ...]:
    """The owners a daemon's private file may have: this process's user, or root (whoever
    owns the file could replace it)."""
    return tuple(dict.fromkeys((os.geteuid(), 0)))


def read_private_file(path: Path, what: str, *, owners: tuple[int, ...] | None = None) -> bytes:
    """The content of a secrets file, refusing one that group or others may access. A symlink is
    followed, as rsync does (Kubernetes secret volumes, dotfile managers): the checks apply to
    the file it leads to, as opened (fstat), not to the link.

    Args:
        what: how messages name the file ("the secrets file").
        owners: uids allowed to own it (None: any).

    Raises:
        ConfigFileError: unreadable, not a regular file, too permissive, wrong owner, too large.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError as exc:
        raise ConfigFileError(f"cannot read {what} {path}: {exc.strerror or exc}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ConfigFileError(f"{what} {path} is not a regular file")
        if st.st_mode & 0o077:
            raise ConfigFileError(
                f"{what} {path} is accessible by group or others (mode {stat.S_IMODE(st.st_mode):04o}):"
                f" run chmod 600 on it"
            )
        if owners is not None and st.st_uid not in owners:
            raise ConfigFileError(f"{what} {path} belongs to uid {st.st_uid}, not to uid {' or '.join(map(str, owners))}")
        if st.st_size > MAX_SECRETS_FILE:
            raise ConfigFileError(f"{what} {path} is larger than {MAX_SECRETS_FILE} bytes")
        chunks = []
        while True:
            b = os.read(fd, 65536)
            if not b:
                break
            chunks.append(b)
        return b"".join(chunks)
    except OSError as exc:
        raise ConfigFileError(f"cannot read {what} {path}: {exc.strerror or exc}") from None
    finally:
        os.close(fd)


def entry_key(user: str, host: str, module: str) -> str:
    """How the client's secrets file names an endpoint: user@host:module, user@host:// for the
    root export; host as written, IPv6 literals in brackets, lower case."""
    shown = f"[{host}]" if ":" in host else host
    return f"{user}@{shown.lower()}:" + (module if module else "//")


def parse_client_secrets(raw: bytes, path: Path) -> tuple[dict[str, bytes], bytes | None]:
    """(secret by entry key, default secret) of a client secrets file.

    Raises:
        ConfigFileError: a malformed line (its number named), two default lines, a key twice.
    """
    keyed: dict[str, bytes] = {}
    lines: dict[str, int] = {}
    default: bytes | None = None
    default_line = 0
    for n, line in enumerate(raw.split(b"\n"), 1):
        text = line.strip()
        if not text or text.startswith(b"#"):
            continue
        words = text.split(None, 1)
        key = words[0].decode("utf-8", "surrogateescape")
        if len(words) == 2 and _KEY.match(key):
            k_user, _, k_where = key.partition("@")
            if k_where.endswith("://"):
                k_host, k_module = k_where[:-3], "//"
            else:
                k_host, _, k_module = k_where.rpartition(":")
            norm = f"{k_user}@{k_host.lower()}:{k_module}"
            if norm in keyed:
                raise ConfigFileError(f"the secrets file {path}, line {n}: the same key as line {lines[norm]}")
            keyed[norm] = words[1].strip()
            lines[norm] = n
            continue
        if len(words) == 2 and _KEYISH.match(key):
            # A key mistyped (a port, a '/'): never a secret for every daemon. The line may hold
            # a secret, so the message names the line, never its text.
            raise ConfigFileError(
                f"the secrets file {path}, line {n}: its first word looks like a user@host:module key but"
                " is not one (no port, no '/': alice@nas:photos, alice@nas:// for the root export);"
                " a secret alone that starts so must follow a key instead"
            )
        if default is not None:
            raise ConfigFileError(f"the secrets file {path}, line {n}: a second line with a secret alone (the first: line {default_line})")
        default, default_line = text, n
    return keyed, default


def _check_not_a_bare_key(raw: bytes, secret: bytes, user: str, host: str, path: Path) -> None:
    """The secret alone about to be used starts with this endpoint's own `user@host` and goes on:
    a key line whose module was left out (`alice@nas s3cret`), not a secret. Taken as one, it
    failed as a wrong secret (QA pass 7). A secret alone that merely starts with some `x@y`
    (`P@ssw0rd 2024`) is left as it is."""
    words = secret.split(None, 1)
    first = words[0].decode("utf-8", "surrogateescape")
    k_user, at, k_host = first.partition("@")
    if len(words) < 2 or not at or k_user != user or k_host.strip("[]").lower() != host.lower():
        return
    n = next((i for i, line in enumerate(raw.split(b"\n"), 1) if line.strip() == secret), 0)
    shown = f"{user}@" + (f"[{host}]" if ":" in host else host)
    raise ConfigFileError(
        f"the secrets file {path}, line {n}: it starts with {shown} but names no module; write the key"
        f" as {shown}:MODULE (or {shown}:// for the root export), then the secret"
    )


def client_credentials(user: str | None, host: str, module: str, secrets_file: Path | None) -> tuple[str, bytes] | None:
    """The (user, secret) to authenticate with, or None when the endpoint names no user (then
    a protected module refuses with "requires a user and secret").

    Raises:
        UsageError: a user but no --secrets-file. ConfigFileError: no entry for the endpoint, or a bad file.
    """
    if user is None:
        return None
    where = f"{user}@" + (f"[{host}]" if ":" in host else host) + (f":/{module}" if module else "://")
    if secrets_file is None:
        raise UsageError(f"{where} names user {user!r}: give the secret with --secrets-file FILE")
    raw = read_private_file(secrets_file, "the secrets file")
    keyed, default = parse_client_secrets(raw, secrets_file)
    secret = keyed.get(entry_key(user, host, module), default)
    if secret is not None and secret is default:
        _check_not_a_bare_key(raw, secret, user, host, secrets_file)
    if secret is None:
        raise ConfigFileError(
            f"the secrets file {secrets_file} has no line for {entry_key(user, host, module)} (and no line with a secret alone)"
        )
    return user, secret


__all__ = ["read_private_file", "self_or_root", "parse_client_secrets", "client_credentials", "entry_key"]
