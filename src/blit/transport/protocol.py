"""Sans-IO control protocol: message types, CBOR codec with validation, session states, data frames.

Bytes in, messages out; messages in, bytes out. The control plane is HTTP/2: every request is a
`POST /blit/<op>` whose body is one CBOR map (the request message) and whose response body is one
CBOR map (the reply, or an `Error` with a non-200 status). `schemas/control.cddl` is the written
contract; `tests/remote/test_protocol.py` checks this module against it.

The data plane carries files as a sequence of frames (`FrameHeader`, 24 bytes, then a payload)
either on a raw TCP stream admitted by a one-time token (`DataHello`), or in the body of an
HTTP/2 stream when the data port cannot be reached. The same frames flow on both carriers.

This module must not import trio, h2 or socket, and must not do I/O: the shells in `control.py`,
`data.py` and `blit.daemon` own sockets, locks and timeouts.
"""

from __future__ import annotations

import dataclasses
import enum
import itertools
import os
import struct
import sys
import typing
from array import array
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar, Union

import cbor2

from ..errors import (
    IncompatiblePeerError,
    LocalProtocolError,
    MessageTooLarge,
    RemoteError,
    RemoteProtocolError,
)

PROTOCOL_VERSION = 1
"""Bumped on any incompatible change of a message, a frame or a rule in this module."""

# --- limits (the daemon enforces them on everything a peer sends) --------------------------------
MAX_MESSAGE = 8 << 20
"""Largest control body in bytes (request or reply). Manifests are split to stay below it."""
MAX_UP = 2 * 1024
"""Most integers in a source_up list: the (device, inode) of 1,024 ancestors."""
MAX_HELLO = 64 << 10
"""Largest body before a connection's hello (a hello is a few hundred bytes): what a peer that
has not said who it is may make the daemon decode (8 MiB of empty CBOR maps decode to ~600 MiB)."""
MAX_DEPTH = 8
"""Deepest CBOR nesting a message may use."""
MAX_CONTAINERS = 1 << 20
"""Most maps, arrays and tags in one body. Each decodes to a Python object of ~60 bytes from a
byte of CBOR: 8 MiB of empty maps decode to ~600 MiB. The largest real messages hold a few
hundred thousand (a manifest part of 50,000 entries with their xattrs)."""
_COUNT_FROM = 64 << 10  # a smaller body cannot hold MAX_CONTAINERS: not counted
MAX_PATH = 64 << 10
"""Longest relative path: blit lands trees deeper than PATH_MAX (every syscall is dir-fd relative)."""
MAX_TARGET = 4096
"""Longest symlink target (the kernel's own limit)."""
MAX_NAME = 255
MAX_TEXT = 4096
MAX_LIST = 100_000
MAX_PARTS = 1 << 20
"""Most parts of one directory's manifest (FEATURE_PARTS)."""
PART_ENTRIES = 50_000
PART_BYTES = 4 << 20
"""A manifest part holds at most PART_ENTRIES entries and about PART_BYTES of names, link
targets and xattrs (half the message limit: the encoding adds its overhead)."""
BATCH_DIRS = 64
"""Most directories in one tree/scans or tree/dirs (FEATURE_DIR_BATCH)."""
BATCH_ENTRIES = 8192
"""A tree/scans answer or a tree/dirs request stops adding directories once it holds this many
entries (or half of MAX_MESSAGE)."""
MAX_STREAMS = 16
"""Most data streams one transfer may ask for."""
TOKEN_ID_BYTES = 8
TOKEN_SECRET_BYTES = 24
TOKEN_BYTES = TOKEN_ID_BYTES + TOKEN_SECRET_BYTES
"""A data token: a public id (to find the grant) and a 192-bit secret (compared in constant time)."""

AUTH_NONCE_BYTES = 32
"""The daemon's challenge: 256 random bits per `auth/challenge`, spent by the next `auth`."""
AUTH_MAC_BYTES = 32
"""HMAC-SHA256."""

CONTENT_TYPE = b"application/cbor"
PATH_PREFIX = "/blit/"
DATA_PATH = "/blit/data"
"""The HTTP/2 path that carries data frames when the raw data port cannot be used."""
TOKEN_HEADER = b"blit-token"


class ErrorCode(str, enum.Enum):
    """Wire error codes carried in `Error.error`, with the HTTP status they travel with."""

    BAD_REQUEST = "bad-request"  # malformed CBOR, wrong field, value out of range
    TOO_LARGE = "too-large"  # body above MAX_MESSAGE
    UNKNOWN_OP = "unknown-op"
    NO_SESSION = "no-session"  # a request before a successful hello, or hello twice
    VERSION = "version-mismatch"
    UNKNOWN_MODULE = "unknown-module"
    NOT_FOUND = "not-found"
    NOT_A_DIRECTORY = "not-a-directory"
    PATH_REFUSED = "path-refused"  # '..', absolute, NUL, or a symlink on the way
    READ_ONLY = "read-only"
    BAD_TOKEN = "bad-token"
    UNKNOWN_TRANSFER = "unknown-transfer"
    BUSY = "busy"  # too many sessions or transfers
    IO_ERROR = "io-error"
    SHUTTING_DOWN = "shutting-down"
    INTERNAL = "internal"
    NOT_ALLOWED = "not-allowed"  # the daemon's config does not allow this (remote to remote)
    PEER_FAILED = "peer-failed"  # the daemon could not reach or use the peer daemon
    AUTH_REQUIRED = "auth-required"  # the module needs `auth` first (user + secret)
    AUTH_FAILED = "auth-failed"  # wrong user or secret (never says which), or too many tries
    ACCESS_DENIED = "access-denied"  # the module's hosts_allow / hosts_deny refuse this address

    @property
    def status(self) -> int:
        return _STATUS.get(self, 400)


_STATUS = {
    ErrorCode.TOO_LARGE: 413,
    ErrorCode.UNKNOWN_OP: 404,
    ErrorCode.NOT_FOUND: 404,
    ErrorCode.UNKNOWN_MODULE: 404,
    ErrorCode.UNKNOWN_TRANSFER: 404,
    ErrorCode.READ_ONLY: 403,
    ErrorCode.PATH_REFUSED: 403,
    ErrorCode.BAD_TOKEN: 403,
    ErrorCode.NO_SESSION: 409,
    ErrorCode.VERSION: 426,
    ErrorCode.BUSY: 503,
    ErrorCode.SHUTTING_DOWN: 503,
    ErrorCode.IO_ERROR: 500,
    ErrorCode.INTERNAL: 500,
    ErrorCode.NOT_ALLOWED: 403,
    ErrorCode.PEER_FAILED: 502,
    ErrorCode.AUTH_REQUIRED: 401,
    ErrorCode.AUTH_FAILED: 403,
    ErrorCode.ACCESS_DENIED: 403,
}


class Refused(Exception):
    """Raised by daemon-side code to answer a request with an `Error` (not an exception of the
    public tree: it never leaves the daemon; the client turns the reply into `RemoteError`)."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


# =================================================================================================
# Messages
#
# Frozen keyword-only dataclasses (`message_class`). A field's Python type is its wire type: int (a CBOR integer in
# the signed/unsigned 64-bit range, never a bool), bool, str, bytes, None, list[T], a nested
# message (a CBOR map, or an array of its fields in order when the class sets ARRAY = True), or a
# union of those. `field(metadata={"max": n})` overrides the default length limit of a str, bytes
# or list field; {"min": a, "max": b} on an int bounds its value.


def _lim(max: int | None = None, min: int | None = None, omit: bool = False) -> dict[str, int]:
    """Field metadata: length or value bounds; `omit`: a map field left out of the encoded map
    while it holds its default (a field added later, which an older peer would refuse as
    unknown: it is only ever set towards a peer that announced the hello feature for it)."""
    out: dict[str, int] = {}
    if omit:
        out["omit"] = 1
    if max is not None:
        out["max"] = max
    if min is not None:
        out["min"] = min
    return out


class Message:
    """Base of every control message: a frozen, keyword-only, slotted dataclass made by
    `@message_class` (what `@dataclass(frozen=True, kw_only=True, slots=True)` makes, built
    for a fast import). Equality, hashing and repr are these shared methods over `_FIELDS`."""

    __slots__ = ()
    ARRAY: ClassVar[bool] = False
    RAW: ClassVar[bool] = False
    _FIELDS: ClassVar[tuple[str, ...]] = ()

    def __init__(self, **kwargs: Any) -> None:
        # The first instance of a class compiles its own __init__, which replaces this one.
        _compile_init(type(self))(self, **kwargs)

    def __setattr__(self, name: str, value: Any) -> None:
        raise dataclasses.FrozenInstanceError(f"cannot assign to field {name!r}")

    def __delattr__(self, name: str) -> None:
        raise dataclasses.FrozenInstanceError(f"cannot delete field {name!r}")

    def __repr__(self) -> str:
        inner = ", ".join(f"{n}={getattr(self, n)!r}" for n in self._FIELDS)
        return f"{type(self).__qualname__}({inner})"

    def __eq__(self, other: object) -> bool:
        if type(other) is not type(self):
            return NotImplemented
        return self._values() == other._values()

    def __hash__(self) -> int:
        return hash(self._values())

    def _values(self) -> tuple[Any, ...]:
        return tuple([getattr(self, n) for n in self._FIELDS])


_C = TypeVar("_C", bound=type[Message])


@typing.dataclass_transform(kw_only_default=True, frozen_default=True, field_specifiers=(field,))
def message_class(cls: _C) -> _C:
    """Make `cls` a message: a dataclass with no generated methods but the fields' bookkeeping
    (dataclasses.fields and replace work). `dataclass(frozen=True)` would compile six methods per
    class, about 0.4 ms each class (25 ms of every remote run's start for this module); here
    Message has the shared ones and each class compiles its __init__ when first used."""
    if not cls.__doc__:
        cls.__doc__ = cls.__name__  # else dataclass asks inspect for a signature (slow)
    cls = dataclass(kw_only=True, slots=True, init=False, repr=False, eq=False)(cls)  # type: ignore[assignment]
    cls._FIELDS = tuple(f.name for f in dataclasses.fields(cls))  # type: ignore[arg-type]
    return cls


def _compile_init(cls: type[Message]) -> Callable[..., None]:
    """The keyword-only __init__ dataclass would have made (defaults, default factories, fields
    set past the frozen __setattr__), installed on `cls`."""
    env: dict[str, Any] = {"_set": object.__setattr__, "_NOARG": dataclasses.MISSING}
    params, body = [], []
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        if f.default_factory is not dataclasses.MISSING:
            env[f"_f_{f.name}"] = f.default_factory
            params.append(f"{f.name}=_NOARG")
            body.append(f"    _set(self, {f.name!r}, _f_{f.name}() if {f.name} is _NOARG else {f.name})")
            continue
        if f.default is not dataclasses.MISSING:
            env[f"_d_{f.name}"] = f.default
            params.append(f"{f.name}=_d_{f.name}")
        else:
            params.append(f.name)
        body.append(f"    _set(self, {f.name!r}, {f.name})")
    star = ", *, " if params else ""
    src = f"def __init__(self{star}{', '.join(params)}):\n" + ("\n".join(body) or "    pass")
    exec(compile(src, f"<{cls.__name__}.__init__>", "exec"), env)
    init: Callable[..., None] = env["__init__"]
    init.__qualname__ = f"{cls.__qualname__}.__init__"
    cls.__init__ = init  # type: ignore[method-assign]
    return init


@message_class
class Error(Message):
    """A refusal: the reply to any request that failed. Sent with a non-200 status."""

    error: str = field(metadata=_lim(64))
    message: str = field(metadata=_lim(MAX_TEXT))


@message_class
class Ack(Message):
    """An empty success reply."""


@message_class
class Hello(Message):
    """Opens the session; must be the first request on a connection."""

    protocol: int = field(metadata=_lim(min=0, max=1 << 32))
    software: str = field(metadata=_lim(128))
    features: list[str] = field(default_factory=list, metadata=_lim(64))


@message_class
class HelloReply(Message):
    protocol: int = field(metadata=_lim(min=0, max=1 << 32))
    software: str = field(metadata=_lim(128))
    name: str = field(metadata=_lim(255))
    data_port: int | None = field(metadata=_lim(min=0, max=65535))
    """The raw data port, or None when the daemon only carries data over HTTP/2."""
    max_message: int = field(metadata=_lim(min=0, max=1 << 40))
    features: list[str] = field(default_factory=list, metadata=_lim(64))
    silence_ms: int = field(default=0, metadata=_lim(min=0, max=1 << 32, omit=True))
    """Feature FEATURE_SILENCE: the daemon ends a session from which nothing at all (not even a
    PING) came for this many milliseconds; the client pings well within it. 0: no such limit."""


@message_class
class AuthChallenge(Message):
    """Ask for a fresh nonce; the next `auth` of this session spends it (docs/protocol.md §1)."""


@message_class
class AuthNonce(Message):
    nonce: bytes = field(metadata=_lim(AUTH_NONCE_BYTES))
    """AUTH_NONCE_BYTES random bytes, new for each challenge."""


@message_class
class Auth(Message):
    """Prove knowledge of `user`'s secret for `module`: mac = auth_mac(secret, nonce, user, module)."""

    module: str = field(metadata=_lim(MAX_NAME))
    user: str = field(metadata=_lim(MAX_NAME))
    mac: bytes = field(metadata=_lim(AUTH_MAC_BYTES))


@message_class
class ListModules(Message):
    pass


@message_class
class ModuleInfo(Message):
    name: str = field(metadata=_lim(MAX_NAME))
    comment: str = field(metadata=_lim(MAX_TEXT))
    read_only: bool


@message_class
class ModuleList(Message):
    modules: list[ModuleInfo] = field(metadata=_lim(10_000))
    root: bool
    """Whether the daemon exports its root (`host://path`), module name ""."""
    root_read_only: bool


@message_class
class Entry(Message):
    """One directory entry as seen on the daemon (lstat; symlinks are never followed)."""

    ARRAY: ClassVar[bool] = True
    name: bytes = field(metadata=_lim(MAX_NAME))
    kind: str = field(metadata=_lim(16))
    """One of ENTRY_KINDS."""
    size: int = field(metadata=_lim(min=0, max=1 << 63))
    mtime_ns: int = field(metadata=_lim(min=-(1 << 63), max=(1 << 63) - 1))
    mode: int = field(metadata=_lim(min=0, max=(1 << 32) - 1))
    target: bytes | None = field(default=None, metadata=_lim(MAX_TARGET))
    """The link text of a symlink."""


ENTRY_KINDS = ("file", "dir", "symlink", "fifo", "socket", "char", "block", "other")


@message_class
class ListDir(Message):
    """List a directory of a module; names sorted by bytes; paged with `after`."""

    module: str = field(metadata=_lim(MAX_NAME))
    path: bytes = field(metadata=_lim(MAX_PATH))
    after: bytes | None = field(default=None, metadata=_lim(MAX_NAME))
    limit: int = field(default=10_000, metadata=_lim(min=1, max=MAX_LIST))


@message_class
class DirListing(Message):
    entries: list[Entry] = field(metadata=_lim(MAX_LIST))
    more: bool


@message_class
class Stat(Message):
    module: str = field(metadata=_lim(MAX_NAME))
    path: bytes = field(metadata=_lim(MAX_PATH))
    client: str = field(default="", metadata=_lim(64, omit=True))
    """Feature FEATURE_CLIENT_STAT: as OpenTree.client, the address of the client a pulling
    daemon stats for; the module's address rules must admit it too (QA: without it a client
    refused by a module learnt through another daemon which of its paths exist)."""
    read: bool = field(default=False, metadata=_lim(omit=True))
    """Feature FEATURE_STAT_READ: also say whether the entry can be read as a transfer's source
    root (StatReply.unreadable): a pull's client then refuses an unreadable source before
    anything is made, as a local run and a push do."""


@message_class
class StatReply(Message):
    entry: Entry | None
    """None when nothing exists at the path (its parent does)."""
    source_dir: list[int] = field(default_factory=list, metadata=_lim(2, omit=True))
    """Feature FEATURE_NEST: a directory's (device, inode), with which a destination on the
    same machine refuses to land inside it."""
    source_up: list[int] = field(default_factory=list, metadata=_lim(MAX_UP, omit=True))
    """Feature FEATURE_HOLD: a directory's ancestors' (device, inode) pairs, flat, its parent's
    first, up to `/`: a mirror on the same machine refuses a destination that holds it."""
    unreadable: str = field(default="", metadata=_lim(256, omit=True))
    """Feature FEATURE_STAT_READ, asked with Stat.read: why the daemon cannot read the entry
    as a source root (strerror: a directory it cannot open or search, a file it cannot open);
    empty when it can."""


@message_class
class OpenTransfer(Message):
    """Start a transfer rooted at module/path and ask for data streams.

    `direction` is seen from the client: "push" sends files to the daemon, "pull" receives.
    """

    module: str = field(metadata=_lim(MAX_NAME))
    path: bytes = field(metadata=_lim(MAX_PATH))
    direction: str = field(metadata=_lim(8))
    streams: int = field(metadata=_lim(min=1, max=MAX_STREAMS))
    h2_data: bool = False
    """Carry the data over this HTTP/2 connection instead of raw TCP streams."""


@message_class
class TransferOpened(Message):
    transfer: int = field(metadata=_lim(min=0, max=(1 << 63) - 1))
    data_port: int | None = field(metadata=_lim(min=0, max=65535))
    """Where to open the raw streams; None: use `POST /blit/data` on this connection."""
    tokens: list[bytes] = field(metadata=_lim(MAX_STREAMS))
    expires_ms: int = field(metadata=_lim(min=0, max=1 << 32))
    machine: bytes = field(default=b"", metadata=_lim(64, omit=True))
    """Feature FEATURE_MACHINE, tree/open of a pull: the source's (this daemon's) machine."""


@message_class
class FileRef(Message):
    """A file to send (pull): its id in this transfer and its path below the transfer root."""

    ARRAY: ClassVar[bool] = True
    id: int = field(metadata=_lim(min=0, max=(1 << 32) - 1))
    path: bytes = field(metadata=_lim(MAX_PATH))


@message_class
class FileOffer(Message):
    """A file the client will send (push), with the metadata the daemon lands it with."""

    ARRAY: ClassVar[bool] = True
    id: int = field(metadata=_lim(min=0, max=(1 << 32) - 1))
    path: bytes = field(metadata=_lim(MAX_PATH))
    size: int = field(metadata=_lim(min=0, max=1 << 63))
    mtime_ns: int = field(metadata=_lim(min=-(1 << 63), max=(1 << 63) - 1))
    mode: int = field(metadata=_lim(min=0, max=0o7777))


@message_class
class FileGroup(Message):
    """Hello feature FEATURE_SEND_DIRS: files of one directory to send (a tree pull): the
    directory below the transfer root, the ids (u32 little-endian each) and the names (each
    followed by a NUL), in the same order (`pack_names`, `unpack_file_group`)."""

    ARRAY: ClassVar[bool] = True
    rel: bytes = field(metadata=_lim(MAX_PATH))
    ids: bytes = field(metadata=_lim(4 * MAX_LIST))
    names: bytes = field(metadata=_lim(MAX_MESSAGE))


@message_class
class SendFiles(Message):
    """Pull: queue these files on the transfer's streams; `last` ends the streams afterwards."""

    transfer: int = field(metadata=_lim(min=0, max=(1 << 63) - 1))
    files: list[FileRef] = field(metadata=_lim(MAX_LIST))
    last: bool = False
    dirs: list[FileGroup] | None = field(default=None, metadata=_lim(MAX_LIST))
    """FEATURE_SEND_DIRS: files named by directory (after those of `files`)."""


@message_class
class ExpectFiles(Message):
    """Push: the daemon will receive these files on the transfer's streams."""

    transfer: int = field(metadata=_lim(min=0, max=(1 << 63) - 1))
    files: list[FileOffer] = field(metadata=_lim(MAX_LIST))


@message_class
class FinishTransfer(Message):
    """End the transfer once the client's side of the data is done; the reply tallies it."""

    transfer: int = field(metadata=_lim(min=0, max=(1 << 63) - 1))


@message_class
class FileFailure(Message):
    ARRAY: ClassVar[bool] = True
    id: int = field(metadata=_lim(min=0, max=(1 << 32) - 1))
    message: str = field(metadata=_lim(MAX_TEXT))


@message_class
class TransferDone(Message):
    files: int = field(metadata=_lim(min=0, max=1 << 63))
    nbytes: int = field(metadata=_lim(min=0, max=1 << 63))
    failures: list[FileFailure] = field(metadata=_lim(MAX_LIST))


# --- version 2 design, first part: tree transfers (docs/protocol.md §4) ---------------------


@message_class
class XAttr(Message):
    """[name, value]; RAW like SrcEntry (travels inside it). The name is a text string, or a
    byte string when it is not UTF-8 (Linux allows any bytes but NUL)."""

    ARRAY: ClassVar[bool] = True
    RAW: ClassVar[bool] = True
    name: str | bytes = field(metadata=_lim(255))
    value: bytes = field(metadata=_lim(65536))


@message_class
class SrcEntry(Message):
    """One source directory entry in a manifest: the lstat fields a destination plans with.

    RAW: decoded as its validated CBOR array, not as an object (a manifest has up to 100,000 of
    them); fields 1..11 are in `fsops.Meta` order, so `Meta._make(entry[1:12])`. The encoder takes
    either a SrcEntry or such a list.
    """

    ARRAY: ClassVar[bool] = True
    RAW: ClassVar[bool] = True
    name: bytes = field(metadata=_lim(MAX_NAME))
    mode: int = field(metadata=_lim(min=0, max=(1 << 32) - 1))
    size: int = field(metadata=_lim(min=0, max=1 << 63))
    mtime_ns: int = field(metadata=_lim(min=-(1 << 63), max=(1 << 63) - 1))
    atime_ns: int = field(metadata=_lim(min=-(1 << 63), max=(1 << 63) - 1))
    uid: int = field(metadata=_lim(min=0, max=(1 << 32) - 1))
    gid: int = field(metadata=_lim(min=0, max=(1 << 32) - 1))
    ino: int = field(metadata=_lim(min=0, max=(1 << 64) - 1))
    dev: int = field(metadata=_lim(min=0, max=(1 << 64) - 1))
    nlink: int = field(metadata=_lim(min=0, max=(1 << 32) - 1))
    rdev: int = field(metadata=_lim(min=0, max=(1 << 64) - 1))
    blocks: int = field(metadata=_lim(min=0, max=1 << 63))
    target: bytes | None = field(default=None, metadata=_lim(MAX_TARGET))
    xattrs: list[XAttr] | None = field(default=None, metadata=_lim(1024))


@message_class
class FilterRule(Message):
    """A pattern is a text string, or a byte string when it is not UTF-8 (names are bytes, and
    so may a pattern be: `--exclude $'\\xff*'`; decisions R46)."""

    ARRAY: ClassVar[bool] = True
    include: bool
    pattern: str | bytes = field(metadata=_lim(MAX_TEXT))


def text_or_bytes(text: str) -> str | bytes:
    """A str from the file system or the command line (undecodable bytes as surrogates, PEP
    383) as a field typed `str | bytes` carries it: text, or its bytes when they are not UTF-8
    (a CBOR text string must be). `as_text` reverses it."""
    try:
        text.encode()
        return text
    except UnicodeEncodeError:
        return os.fsencode(text)


def as_text(value: str | bytes) -> str:
    """What `text_or_bytes` made, as the str it came from."""
    return value if type(value) is str else os.fsdecode(value)


def wire_rules(rules: typing.Iterable[Any]) -> list[FilterRule]:
    """filters.Filters' rules (each with .include and .pattern) as messages carry them."""
    return [FilterRule(include=r.include, pattern=text_or_bytes(r.pattern)) for r in rules]


def rule_args(rules: list[FilterRule]) -> list[tuple[bool, str]]:
    """Received rules as filters.Filters.from_args takes them."""
    return [(r.include, as_text(r.pattern)) for r in rules]


@message_class
class Rename(Message):
    ARRAY: ClassVar[bool] = True
    name: bytes = field(metadata=_lim(MAX_NAME))
    dname: bytes = field(metadata=_lim(MAX_NAME))


@message_class
class OpenTree(Message):
    """Start a tree transfer between base directories (docs/protocol.md §4)."""

    module: str = field(metadata=_lim(MAX_NAME))
    path: bytes = field(metadata=_lim(MAX_PATH))
    """The daemon-side base directory, relative to the module."""
    direction: str = field(metadata=_lim(8))
    operation: str = field(metadata=_lim(8))
    """copy, mirror or move."""
    compare: int = field(metadata=_lim(min=0, max=3))
    """plan.Compare: 0 size+mtime, 1 checksum, 2 size only, 3 always."""
    filters: list[FilterRule] = field(default_factory=list, metadata=_lim(1000))
    dry_run: bool = False
    streams: int = field(default=1, metadata=_lim(min=1, max=MAX_STREAMS))
    h2_data: bool = False
    create_base: bool = False
    """Push: create the base directory (and missing parents) first, like `mkdir -p`."""
    report_actions: bool = field(default=False, metadata=_lim(omit=True))
    """Push (feature FEATURE_ACTIONS): keep what the daemon changes for tree/actions."""
    client: str = field(default="", metadata=_lim(64, omit=True))
    """Feature FEATURE_CLIENT: a daemon pulling for a remote to remote transfer names the
    address of the client that asked it; the source daemon applies its module's address rules
    to that address too (it saw only the pulling daemon's)."""
    machine: bytes = field(default=b"", metadata=_lim(64, omit=True))
    """Feature FEATURE_MACHINE, push: the source's machine (fsops.machine_id)."""
    source_dir: list[int] = field(default_factory=list, metadata=_lim(2, omit=True))
    """Feature FEATURE_NEST, push of a directory: its (device, inode) on the client. A daemon on
    the same machine refuses a destination (`path`, or `source_name` in it) that is the source
    directory or inside it, by any path."""
    source_name: bytes = field(default=b"", metadata=_lim(MAX_NAME, omit=True))
    """Feature FEATURE_NEST: the name the source directory lands as in `path`; empty when its
    contents land in `path` itself."""
    source_up: list[int] = field(default_factory=list, metadata=_lim(MAX_UP, omit=True))
    """Feature FEATURE_HOLD, mirror push of a directory: its ancestors' (device, inode) pairs,
    flat (StatReply.source_up). A daemon on the same machine refuses a destination that is one
    of them: the source would be an extra there, and deleted (R59)."""


FEATURE_CLIENT = "client-addr-1"
"""Hello feature: tree/open may carry `client` (OpenTree.client)."""
FEATURE_CLIENT_STAT = "client-stat-1"
"""Hello feature: stat may carry `client` (Stat.client)."""
FEATURE_STAT_READ = "stat-read-1"
"""Hello feature: stat may ask whether the entry can be read as a source root (Stat.read,
StatReply.unreadable)."""
FEATURE_MACHINE = "machine-1"
"""Hello feature: tree/open names the source's machine (OpenTree.machine on a push,
TransferOpened.machine on a pull), so that a destination on the same machine can tell an
up-to-date entry that IS its source (the same inode by another path: a module that is the
client's own directory) from a copy, and a move keeps it (decisions R51)."""
FEATURE_NEST = "nest-1"
"""Hello feature: a directory's stat reply carries its (device, inode) and a push's tree/open
its source directory's (StatReply.source_dir, OpenTree.source_dir), so that a destination on
the source's machine refuses a copy into the source by another path, a bind mount (R52)."""
FEATURE_HOLD = "hold-1"
"""Hello feature: a directory's stat reply and a mirror push's tree/open carry its ancestors'
(device, inode) (StatReply.source_up, OpenTree.source_up), so that a mirror on the source's
machine refuses a destination that holds the source (R59)."""
FEATURE_LANDED_INO = "landed-ino-1"
"""Hello feature: the peer reads Landed.ino (a move's confirmations name the source's inode, and
its remover keeps a file whose inode is another)."""
FEATURE_SEALED = "sealed-data-1"
"""Hello feature: the daemon's data port takes sealed streams (HELLO_SEALED, transport/seal.py):
AES-128-GCM records keyed by the token's secret, instead of a TLS session per stream
(decisions R67). The client uses them when the control plane is TLS."""
FEATURE_SPLIT = "split-files-1"
"""Hello feature: the peer receives a large file in parts over several raw data streams at once
(FRAME_PART frames; decisions R71). A sender splits a file only for a peer that announced it."""
FEATURE_SILENCE = "silence-1"
"""Hello feature: the client pings at least every HelloReply.silence_ms / SILENCE_PINGS, and the
daemon ends a session silent for silence_ms (a frozen or vanished client: its transfers are
cancelled, their trees closed, rather than kept until the idle timeout; decisions R53)."""
SILENCE_PINGS = 4
"""Pings a client of FEATURE_SILENCE sends within the daemon's silence limit."""


@message_class
class TreeDir(Message):
    """Push: one source directory's manifest; the daemon plans it against its destination."""

    transfer: int = field(metadata=_lim(min=0, max=(1 << 63) - 1))
    rel: bytes = field(metadata=_lim(MAX_PATH))
    dst_rel: bytes = field(metadata=_lim(MAX_PATH))
    dst_new: bool
    only: list[Rename] | None = field(default=None, metadata=_lim(16))
    entries: list[SrcEntry] = field(metadata=_lim(MAX_LIST))
    incomplete: bool = False
    dir_entry: SrcEntry | None = None
    """The directory's own lstat (its metadata lands on the destination directory at the end)."""
    packed: bytes | None = field(default=None, metadata=_lim(MAX_MESSAGE))
    """Hello feature FEATURE_PACKED: the entries without a link target or xattrs, packed
    (`pack_entries`); `decode` moves them into `entries`."""
    part: int = field(default=0, metadata=_lim(min=0, max=MAX_PARTS - 1, omit=True))
    """Hello feature FEATURE_PARTS: a directory too large for one message goes in parts, in
    order, each answered before the next is sent; this is part number `part` (from 0)."""
    more: bool = field(default=False, metadata=_lim(omit=True))
    """FEATURE_PARTS: more parts of this directory follow."""


@message_class
class SubDir(Message):
    ARRAY: ClassVar[bool] = True
    name: bytes = field(metadata=_lim(MAX_NAME))
    dname: bytes = field(metadata=_lim(MAX_NAME))
    new: bool


@message_class
class Need(Message):
    ARRAY: ClassVar[bool] = True
    id: int = field(metadata=_lim(min=0, max=(1 << 32) - 1))
    name: bytes = field(metadata=_lim(MAX_NAME))


@message_class
class PathFailure(Message):
    ARRAY: ClassVar[bool] = True
    path: bytes = field(metadata=_lim(MAX_PATH))
    op: str = field(metadata=_lim(64))
    message: str = field(metadata=_lim(MAX_TEXT))


@message_class
class NeedGroup(Message):
    """Hello feature FEATURE_NEED_PACKED: the files of one DirPlanned to send, packed as a
    FileGroup is: the ids (u32 little-endian each) and the names (each followed by a NUL), in
    the same order (`pack_needs`, `unpack_needs`)."""

    ARRAY: ClassVar[bool] = True
    ids: bytes = field(metadata=_lim(4 * MAX_LIST))
    names: bytes = field(metadata=_lim(MAX_MESSAGE))


@message_class
class DirPlanned(Message):
    subdirs: list[SubDir] = field(metadata=_lim(MAX_LIST))
    need: list[Need] = field(metadata=_lim(MAX_LIST))
    """The files to send, one Need each (the form of a peer without FEATURE_NEED_PACKED)."""
    packed_need: NeedGroup | None = None
    """FEATURE_NEED_PACKED: the files to send (after those of `need`), packed. `DestTree` always
    answers in this form; the daemon turns it into `need` for a client without the feature
    (`with_need_list`)."""
    failures: list[PathFailure] = field(default_factory=list, metadata=_lim(MAX_LIST))
    hash: list[bytes] = field(default_factory=list, metadata=_lim(MAX_LIST))
    """--checksum: source names of equal size whose content hash decides (answer with tree/hashes)."""
    settled: int = field(default=0, metadata=_lim(min=0, max=1 << 63))
    """Entries done in place without data (up to date, links, specials): for progress."""


# --- directory digests (docs/protocol.md §4, decisions R18): hello feature FEATURE_DIR_DIGEST ------
FEATURE_DIR_DIGEST = "dir-digest-1"
"""Hello feature: both sides compute `blit.ffi.scan.digest_dir` (record layout version 1) and
speak tree/digests. A client sends it; a daemon that knows it answers with it."""
FEATURE_PACKED = "packed-manifest-1"
"""Hello feature: manifests (TreeDir, DirManifest) carry their plain entries packed (`packed`,
`pack_entries`) instead of one CBOR array each. A client sends it; a daemon that knows it
answers with it; either side then sends packed manifests and accepts both forms."""
FEATURE_SEND_DIRS = "send-dirs-1"
"""Hello feature: a tree pull's transfer/send names its files by directory (SendFiles.dirs)
instead of one path each. Negotiated as FEATURE_PACKED."""
FEATURE_NEED_PACKED = "need-packed-1"
"""Hello feature: a push's DirPlanned names the files to send packed (`packed_need`, one
NeedGroup) instead of one Need array each. Negotiated as FEATURE_PACKED."""
FEATURE_PARTS = "manifest-parts-1"
"""Hello feature: a directory's manifest too large for one message goes in parts (TreeDir
`part`/`more` for push, TreeScan `part` / DirManifest `more` for pull), each at most
PART_ENTRIES entries and about PART_BYTES."""
FEATURE_DIR_BATCH = "dir-batch-1"
"""Hello feature: a tree pull asks for several directories' manifests in one tree/scans, and a
tree push sends several new directories' manifests in one tree/dirs (decisions R42). Needs
FEATURE_PARTS; negotiated as FEATURE_PACKED."""
FEATURE_OWNERS = "owners"
"""HelloReply feature: this daemon, as a destination, preserves owners (runs as root): a push's
digests must cover uid/gid."""
FEATURE_PULL_DIGEST = "pull-digest-1"
"""Hello feature: a pull's destination (the client) offers its existing directories as digests
(tree/have, decisions R72) before asking for their manifests; the daemon says which equal its
source directories'. A client sends it; a daemon that knows it (and has the C module) answers
with it."""


@message_class
class DirDigest(Message):
    """One source directory summarised: the digest of its listing and its subdirectories'
    lstat (what the destination records for their metadata at the end)."""

    ARRAY: ClassVar[bool] = True
    rel: bytes = field(metadata=_lim(MAX_PATH))
    dst_rel: bytes = field(metadata=_lim(MAX_PATH))
    digest: bytes = field(metadata=_lim(16))
    subdirs: list[SrcEntry] = field(metadata=_lim(MAX_LIST))


@message_class
class TreeDigests(Message):
    """Push: directories the destination may find identical to its own (no entries sent)."""

    transfer: int = field(metadata=_lim(min=0, max=(1 << 63) - 1))
    dirs: list[DirDigest] = field(metadata=_lim(1000))


@message_class
class DigestsChecked(Message):
    """Per directory, in order: True when the destination's digest is equal (nothing to do in
    it: the walk descends into its subdirectories), False to send its manifest (tree/dir)."""

    equal: list[bool] = field(metadata=_lim(1000))
    settled: int = field(default=0, metadata=_lim(min=0, max=1 << 63))
    """Entries found up to date in the equal directories (for progress)."""


@message_class
class DirHave(Message):
    """Pull: one existing destination directory, summarised (scan.digest_dir), by the source
    directory it mirrors."""

    ARRAY: ClassVar[bool] = True
    rel: bytes = field(metadata=_lim(MAX_PATH))
    digest: bytes = field(metadata=_lim(16))


@message_class
class TreeHave(Message):
    """Pull, FEATURE_PULL_DIGEST: directories the destination already holds."""

    transfer: int = field(metadata=_lim(min=0, max=(1 << 63) - 1))
    flags: int = field(metadata=_lim(min=0, max=1))
    """The digests' flags (scan.DIGEST_OWNER: the client preserves owners, they are covered)."""
    dirs: list[DirHave] = field(metadata=_lim(1000))


@message_class
class SameDir(Message):
    """One answer of tree/have: `equal`, and then the source directory's subdirectories (the
    metadata the destination gives them at the end), in name order."""

    ARRAY: ClassVar[bool] = True
    equal: bool
    subdirs: list[SrcEntry] = field(metadata=_lim(MAX_LIST))


@message_class
class HaveChecked(Message):
    """Per directory of tree/have, in order: equal (nothing to do in it: the walk descends into
    its subdirectories), or not (ask for its manifest)."""

    dirs: list[SameDir] = field(metadata=_lim(1000))


@message_class
class TreeScan(Message):
    """Pull: the manifest of one source directory."""

    transfer: int = field(metadata=_lim(min=0, max=(1 << 63) - 1))
    rel: bytes = field(metadata=_lim(MAX_PATH))
    part: int = field(default=0, metadata=_lim(min=0, max=MAX_PARTS - 1, omit=True))
    """FEATURE_PARTS: the part of the manifest wanted (from 0; the next only once the previous
    said `more`)."""


@message_class
class DirManifest(Message):
    entries: list[SrcEntry] = field(metadata=_lim(MAX_LIST))
    incomplete: bool
    failures: list[PathFailure] = field(default_factory=list, metadata=_lim(MAX_LIST))
    dir_entry: SrcEntry | None = None
    packed: bytes | None = field(default=None, metadata=_lim(MAX_MESSAGE))
    """As TreeDir.packed."""
    more: bool = field(default=False, metadata=_lim(omit=True))
    """FEATURE_PARTS: the directory has more parts (ask with TreeScan.part)."""


@message_class
class TreeScans(Message):
    """Pull, FEATURE_DIR_BATCH: part 0 of several source directories' manifests, in order. The
    daemon answers a prefix of `rels` (at least one; it stops once BATCH_ENTRIES entries or
    about PART_BYTES are in): the client asks again for the rest."""

    transfer: int = field(metadata=_lim(min=0, max=(1 << 63) - 1))
    rels: list[bytes] = field(metadata=_lim(BATCH_DIRS))


@message_class
class DirManifests(Message):
    manifests: list[DirManifest] = field(metadata=_lim(BATCH_DIRS))
    """Part 0 of the first len(manifests) directories asked for; one that says `more`
    continues with TreeScan part 1."""


@message_class
class TreeDirs(Message):
    """Push, FEATURE_DIR_BATCH: several whole directories' manifests (each a TreeDir of one
    part, without `only`), planned in order as tree/dir plans each."""

    transfer: int = field(metadata=_lim(min=0, max=(1 << 63) - 1))
    dirs: list[TreeDir] = field(metadata=_lim(BATCH_DIRS))


@message_class
class DirsPlanned(Message):
    planned: list[DirPlanned] = field(metadata=_lim(BATCH_DIRS))
    """One per directory of the TreeDirs, in its order."""


@message_class
class TreeFinish(Message):
    transfer: int = field(metadata=_lim(min=0, max=(1 << 63) - 1))
    source_complete: bool = True


@message_class
class TreeDone(Message):
    files_copied: int = field(metadata=_lim(min=0, max=1 << 63))
    bytes_copied: int = field(metadata=_lim(min=0, max=1 << 63))
    files_skipped: int = field(metadata=_lim(min=0, max=1 << 63))
    dirs_created: int = field(metadata=_lim(min=0, max=1 << 63))
    links_created: int = field(metadata=_lim(min=0, max=1 << 63))
    files_deleted: int = field(metadata=_lim(min=0, max=1 << 63))
    entries_seen: int = field(metadata=_lim(min=0, max=1 << 63))
    failures: list[PathFailure] = field(metadata=_lim(MAX_LIST))
    deletions_skipped: str | None = field(default=None, metadata=_lim(MAX_TEXT))
    files_removed: int = field(default=0, metadata=_lim(min=0, max=1 << 63))
    """Move: source entries removed (the client fills it in for a push)."""


# --- --checksum and move for tree transfers (docs/protocol.md §4) ------------------------------


@message_class
class FileHash(Message):
    """[name, xxh3-128 of the content], or a null digest when the file could not be read."""

    ARRAY: ClassVar[bool] = True
    name: bytes = field(metadata=_lim(MAX_NAME))
    digest: bytes | None = field(metadata=_lim(16))


@message_class
class TreeHashes(Message):
    """Push, --checksum: the source's hashes of names a DirPlanned listed under `hash`; the
    daemon compares them with its copies and answers with the files to send after all."""

    transfer: int = field(metadata=_lim(min=0, max=(1 << 63) - 1))
    rel: bytes = field(metadata=_lim(MAX_PATH))
    hashes: list[FileHash] = field(metadata=_lim(MAX_LIST))


@message_class
class TreeHash(Message):
    """Pull, --checksum: hash these source files of directory `rel` on the daemon."""

    transfer: int = field(metadata=_lim(min=0, max=(1 << 63) - 1))
    rel: bytes = field(metadata=_lim(MAX_PATH))
    names: list[bytes] = field(metadata=_lim(MAX_LIST))


@message_class
class HashList(Message):
    hashes: list[FileHash] = field(metadata=_lim(MAX_LIST))
    failures: list[PathFailure] = field(default_factory=list, metadata=_lim(MAX_LIST))


@message_class
class Landed(Message):
    """A source entry now safely at the destination: [name, size, mtime_ns, ino] as the source's
    manifest had them (the remover keeps an entry that changed since). `ino` (FEATURE_LANDED_INO,
    only towards a peer that announced it): also kept when another file took its name, whatever
    its size and mtime."""

    ARRAY: ClassVar[bool] = True
    name: bytes = field(metadata=_lim(MAX_NAME))
    size: int = field(metadata=_lim(min=0, max=1 << 63))
    mtime_ns: int = field(metadata=_lim(min=-(1 << 63), max=(1 << 63) - 1))
    ino: int | None = field(default=None, metadata=_lim(min=0, max=(1 << 64) - 1))


@message_class
class RemoveGroup(Message):
    """Move: in source directory `rel`, unlink `files`, then remove the directories `dirs` that
    are empty. Groups are applied in order (a page ends with directories, deepest first)."""

    ARRAY: ClassVar[bool] = True
    rel: bytes = field(metadata=_lim(MAX_PATH))
    files: list[Landed] = field(metadata=_lim(MAX_LIST))
    dirs: list[bytes] = field(metadata=_lim(MAX_LIST))


@message_class
class TreeLanded(Message):
    """Push move: the next page of source entries the daemon has landed and synced."""

    transfer: int = field(metadata=_lim(min=0, max=(1 << 63) - 1))


@message_class
class LandedPage(Message):
    groups: list[RemoveGroup] = field(metadata=_lim(MAX_LIST))
    more: bool
    """True: ask again (the transfer is still running, or more pages wait)."""
    failures: list[PathFailure] = field(default_factory=list, metadata=_lim(MAX_LIST))


@message_class
class TreeRemove(Message):
    """Pull move: the client has landed and synced these source entries; the daemon removes
    them. `last` ends the transfer."""

    transfer: int = field(metadata=_lim(min=0, max=(1 << 63) - 1))
    groups: list[RemoveGroup] = field(metadata=_lim(MAX_LIST))
    last: bool = False


@message_class
class TreeRemoved(Message):
    removed: int = field(metadata=_lim(min=0, max=1 << 63))
    failures: list[PathFailure] = field(default_factory=list, metadata=_lim(MAX_LIST))


# --- what the destination changed, for -v / --dry-run (docs/protocol.md §4, decisions R23) -------
FEATURE_ACTIONS = "actions-1"
"""Hello feature: the daemon keeps, when asked (OpenTree / PeerPull `report_actions`), one record
per entry it changes as a destination, and hands them out in pages (tree/actions, PeerStatus)."""
ACTION_NAMES = ("copy", "mkdir", "symlink", "link", "delete", "special")
"""The actions, as the local engine reports them (schemas/events.schema.json)."""
ACTION_PAGE = 20_000
"""Most actions in one page."""
ACTION_PAGE_BYTES = 2 << 20
"""... and about this many bytes of paths (one more path may cross it: a page stays < 8 MiB)."""
ACTION_POLL = 0.1
"""Seconds between looks for new actions while none wait: the client between empty
tree/actions pages, the daemon inside a peer/wait."""


@message_class
class Action(Message):
    """[action, path]: one entry changed (a dry run: that would be), path as the local engine
    prints it (relative to the source base; a deletion's relative to the destination base)."""

    ARRAY: ClassVar[bool] = True
    action: str = field(metadata=_lim(16))
    path: bytes = field(metadata=_lim(MAX_PATH))


@message_class
class TreeActions(Message):
    """Push with report_actions: the next page of what the daemon changed."""

    transfer: int = field(metadata=_lim(min=0, max=(1 << 63) - 1))


@message_class
class ActionPage(Message):
    actions: list[Action] = field(metadata=_lim(ACTION_PAGE))
    more: bool
    """True: ask again (the transfer goes on, or more wait). False after tree/finish once all
    were sent: the transfer is over (a move's goes on with tree/landed)."""
    dropped: int = field(default=0, metadata=_lim(min=0, max=1 << 63))
    """With more=false: actions the daemon could not keep (its list was full)."""


# --- remote to remote (docs/protocol.md §4 "Remote to remote") ----------------------------------


@message_class
class Peer(Message):
    """The source daemon A that the daemon receiving `PeerPull` pulls from, as the client named
    it (the host is resolved by the pulling daemon)."""

    host: str = field(metadata=_lim(255))
    port: int = field(metadata=_lim(min=1, max=65535))
    module: str = field(metadata=_lim(MAX_NAME))
    path: bytes = field(metadata=_lim(MAX_PATH))
    """As typed: a trailing "/" means "the contents of"."""
    tls: bool = True


@message_class
class PeerPull(Message):
    """Ask this daemon (B) to pull `peer` into module/path; answered at once with a job id."""

    module: str = field(metadata=_lim(MAX_NAME))
    path: bytes = field(metadata=_lim(MAX_PATH))
    """The destination as typed (trailing "/" kept): B applies the trailing-slash rules."""
    peer: Peer
    operation: str = field(metadata=_lim(8))
    """"copy", "mirror" or "move" (B's pull is a pull move: A removes what landed on B)."""
    compare: int = field(metadata=_lim(min=0, max=3))
    filters: list[FilterRule] = field(default_factory=list, metadata=_lim(1000))
    dry_run: bool = False
    streams: int = field(default=1, metadata=_lim(min=1, max=MAX_STREAMS))
    h2_data: bool = False
    report_actions: bool = field(default=False, metadata=_lim(omit=True))
    """Feature FEATURE_ACTIONS: PeerStatus carries what the job changes (`actions`)."""


@message_class
class PeerStarted(Message):
    job: int = field(metadata=_lim(min=0, max=(1 << 63) - 1))


@message_class
class PeerWait(Message):
    """Long poll: answered when the job ends or after `wait_ms`, whichever comes first."""

    job: int = field(metadata=_lim(min=0, max=(1 << 63) - 1))
    wait_ms: int = field(metadata=_lim(min=0, max=30_000))


@message_class
class PeerStatus(Message):
    """A job's progress; once `done`, its `result` or its `error` (and the job is forgotten)."""

    done: bool
    files_copied: int = field(metadata=_lim(min=0, max=1 << 63))
    bytes_copied: int = field(metadata=_lim(min=0, max=1 << 63))
    entries_seen: int = field(metadata=_lim(min=0, max=1 << 63))
    result: TreeDone | None = None
    error: Error | None = None
    carrier: str | None = field(default=None, metadata=_lim(8))
    """How B's data came from A: "tcp" or "h2"."""
    actions: list[Action] = field(default_factory=list, metadata=_lim(ACTION_PAGE, omit=True))
    """report_actions: the next page of what the job changed (`done` waits until all were sent)."""
    actions_dropped: int = field(default=0, metadata=_lim(min=0, max=1 << 63, omit=True))


M = TypeVar("M", bound=Message)


@dataclass(frozen=True, slots=True)
class Operation:
    """One request type: its path name, request message and reply message."""

    name: str
    request: type[Message]
    reply: type[Message]


OPERATIONS: dict[str, Operation] = {
    op.name: op
    for op in (
        Operation("hello", Hello, HelloReply),
        Operation("auth/challenge", AuthChallenge, AuthNonce),
        Operation("auth", Auth, Ack),
        Operation("modules", ListModules, ModuleList),
        Operation("list", ListDir, DirListing),
        Operation("stat", Stat, StatReply),
        Operation("transfer/open", OpenTransfer, TransferOpened),
        Operation("transfer/send", SendFiles, Ack),
        Operation("transfer/expect", ExpectFiles, Ack),
        Operation("transfer/finish", FinishTransfer, TransferDone),
        Operation("tree/open", OpenTree, TransferOpened),
        Operation("tree/dir", TreeDir, DirPlanned),
        Operation("tree/scan", TreeScan, DirManifest),
        Operation("tree/scans", TreeScans, DirManifests),
        Operation("tree/dirs", TreeDirs, DirsPlanned),
        Operation("tree/finish", TreeFinish, TreeDone),
        Operation("tree/hashes", TreeHashes, DirPlanned),
        Operation("tree/digests", TreeDigests, DigestsChecked),
        Operation("tree/have", TreeHave, HaveChecked),
        Operation("tree/hash", TreeHash, HashList),
        Operation("tree/landed", TreeLanded, LandedPage),
        Operation("tree/remove", TreeRemove, TreeRemoved),
        Operation("tree/actions", TreeActions, ActionPage),
        Operation("peer/pull", PeerPull, PeerStarted),
        Operation("peer/wait", PeerWait, PeerStatus),
    )
}
OP_OF: dict[type[Message], Operation] = {op.request: op for op in OPERATIONS.values()}


# =================================================================================================
# Codec


@dataclass(frozen=True, slots=True)
class _FieldSpec:
    name: str
    tp: Any
    meta: dict[str, int]
    required: bool


_SPECS: dict[type[Message], tuple[_FieldSpec, ...]] = {}
_HINTS: dict[str, Any] = {}


def _hint(annotation: Any) -> Any:
    """A field's type from its annotation, a string here (`from __future__ import annotations`):
    what typing.get_type_hints gives, each distinct text evaluated once per process (the same few
    texts recur across the messages; get_type_hints evaluated them all, class by class)."""
    if not isinstance(annotation, str):
        return annotation
    tp = _HINTS.get(annotation)
    if tp is None:
        tp = eval(annotation, globals())  # our own module's annotations only
        _HINTS[annotation] = tp = type(None) if tp is None else tp
    return tp


def _specs(cls: type[Message]) -> tuple[_FieldSpec, ...]:
    specs = _SPECS.get(cls)
    if specs is None:
        specs = tuple(
            _FieldSpec(
                f.name,
                _hint(f.type),
                dict(f.metadata),
                f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING,
            )
            for f in dataclasses.fields(cls)  # type: ignore[arg-type]
        )
        _SPECS[cls] = specs
    return specs


class _Invalid(Exception):
    pass


def _convert(value: Any, tp: Any, meta: dict[str, int], where: str) -> Any:
    """Check a decoded CBOR value against a field type; returns the Python value."""
    origin = typing.get_origin(tp)
    if origin is Union or origin is getattr(__import__("types"), "UnionType", None):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg, meta, where)
            except _Invalid as exc:
                errors.append(str(exc))
        raise _Invalid(errors[0] if len(errors) == 1 else f"{where}: unexpected value")
    if origin is list:
        if not isinstance(value, list):
            raise _Invalid(f"{where}: expected an array")
        limit = meta.get("max", MAX_LIST)
        if len(value) > limit:
            raise _Invalid(f"{where}: more than {limit} items")
        (item_tp,) = typing.get_args(tp)
        return [_convert(v, item_tp, {}, f"{where}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if type(value) is not bool:
            raise _Invalid(f"{where}: expected a boolean")
        return value
    if tp is int:
        if type(value) is not int:
            raise _Invalid(f"{where}: expected an integer")
        lo = meta.get("min", -(1 << 63))
        hi = meta.get("max", (1 << 64) - 1)
        if not lo <= value <= hi:
            raise _Invalid(f"{where}: {value} out of range [{lo}, {hi}]")
        return value
    if tp is str:
        if type(value) is not str:
            raise _Invalid(f"{where}: expected a text string")
        limit = meta.get("max", MAX_TEXT)
        if len(value) > limit:
            raise _Invalid(f"{where}: longer than {limit}")
        return value
    if tp is bytes:
        if type(value) is not bytes:
            raise _Invalid(f"{where}: expected a byte string")
        limit = meta.get("max", MAX_PATH)
        if len(value) > limit:
            raise _Invalid(f"{where}: longer than {limit} bytes")
        return value
    if tp is type(None):
        if value is not None:
            raise _Invalid(f"{where}: expected null")
        return None
    if isinstance(tp, type) and issubclass(tp, Message):
        return _from_wire(tp, value, where)
    raise TypeError(f"unsupported field type {tp!r}")  # a bug in this module


def _from_wire(cls: type[M], obj: Any, where: str) -> M:
    specs = _specs(cls)
    kwargs: dict[str, Any] = {}
    if cls.ARRAY:
        if not isinstance(obj, list):
            raise _Invalid(f"{where}: expected an array")
        required = sum(1 for s in specs if s.required)
        if not required <= len(obj) <= len(specs):
            raise _Invalid(f"{where}: expected {required} to {len(specs)} items, got {len(obj)}")
        for spec, value in zip(specs, obj):
            kwargs[spec.name] = _convert(value, spec.tp, spec.meta, f"{where}.{spec.name}")
    else:
        if not isinstance(obj, dict):
            raise _Invalid(f"{where}: expected a map")
        known = {s.name for s in specs}
        for key in obj:
            if key not in known:
                raise _Invalid(f"{where}: unknown field {key!r}")
        for spec in specs:
            if spec.name in obj:
                kwargs[spec.name] = _convert(obj[spec.name], spec.tp, spec.meta, f"{where}.{spec.name}")
            elif spec.required:
                raise _Invalid(f"{where}: missing field {spec.name!r}")
    return cls(**kwargs)


def _to_wire(msg: Message) -> Any:
    return _encoder(type(msg))(msg)


# --- compiled codecs ---------------------------------------------------------------------------
# The generic functions above walk type hints per value: fine for messages, too slow for
# manifests of 100,000 entries (~90 µs per entry). Each class gets a decoder and an encoder
# generated once from the same type hints; a decoder that rejects a value hands over to the
# generic path, which raises the precise message.

_DECODERS: dict[type[Message], Any] = {}
_ENCODERS: dict[type[Message], Any] = {}


def _check_expr(tp: Any, meta: dict[str, int], v: str, env: dict[str, Any]) -> str | None:
    """A Python expression true when `v` is a valid plain value of `tp`; None for messages and
    lists of messages (converted, not just checked)."""
    origin = typing.get_origin(tp)
    if origin is Union or origin is getattr(__import__("types"), "UnionType", None):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        none = f"{v} is None or " if len(args) < len(typing.get_args(tp)) else ""
        if len(args) != 1:  # plain types only (str | bytes): any of them
            if not all(a in (bool, int, str, bytes) for a in args):
                raise TypeError(f"unsupported union {tp!r}")
            return "(" + none + " or ".join(str(_check_expr(a, meta, v, env)) for a in args) + ")"
        inner = _check_expr(args[0], meta, v, env)
        return None if inner is None else f"({none}{inner})"
    if origin is list:
        (item,) = typing.get_args(tp)
        limit = meta.get("max", MAX_LIST)
        if isinstance(item, type) and issubclass(item, Message):
            return None
        inner = _check_expr(item, {}, "_x", env)
        return f"(type({v}) is list and len({v}) <= {limit} and all({inner} for _x in {v}))"
    if tp is bool:
        return f"(type({v}) is bool)"
    if tp is int:
        lo = meta.get("min", -(1 << 63))
        hi = meta.get("max", (1 << 64) - 1)
        return f"(type({v}) is int and {lo} <= {v} <= {hi})"
    if tp is str:
        return f"(type({v}) is str and len({v}) <= {meta.get('max', MAX_TEXT)})"
    if tp is bytes:
        return f"(type({v}) is bytes and len({v}) <= {meta.get('max', MAX_PATH)})"
    if isinstance(tp, type) and issubclass(tp, Message):
        return None
    raise TypeError(f"unsupported field type {tp!r}")


def _convert_expr(tp: Any, meta: dict[str, int], v: str, env: dict[str, Any]) -> str:
    """An expression converting a checked-or-not `v` to the field value (raising _Invalid)."""
    check = _check_expr(tp, meta, v, env)
    if check is not None:
        return f"({v} if {check} else _bad())"
    origin = typing.get_origin(tp)
    optional = False
    if origin is Union or origin is getattr(__import__("types"), "UnionType", None):
        optional = True
        (tp,) = [a for a in typing.get_args(tp) if a is not type(None)]
        origin = typing.get_origin(tp)
    if origin is list:
        (item,) = typing.get_args(tp)
        name = f"_dec_{item.__name__}"
        env[name] = _decoder(item)
        limit = meta.get("max", MAX_LIST)
        expr = f"([{name}(_x) for _x in {v}] if type({v}) is list and len({v}) <= {limit} else _bad())"
    else:
        name = f"_dec_{tp.__name__}"
        env[name] = _decoder(tp)
        expr = f"{name}({v})"
    return f"(None if {v} is None else {expr})" if optional else expr


def _bad() -> Any:
    raise _Invalid("invalid")


def _decoder(cls: type[M]) -> Any:
    dec = _DECODERS.get(cls)
    if dec is not None:
        return dec
    # Registered before compiling so self-references resolve (none today).
    _DECODERS[cls] = lambda obj: _DECODERS[cls](obj)
    specs = _specs(cls)
    env: dict[str, Any] = {"_cls": cls, "_bad": _bad, "_Invalid": _Invalid, "_MISSING": object()}
    lines = [f"def _decode(obj):"]
    args = []
    if cls.ARRAY:
        required = sum(1 for sp in specs if sp.required)
        lines.append(f"    if type(obj) is not list or not {required} <= len(obj) <= {len(specs)}: _bad()")
        lines.append("    n = len(obj)")
        for i, sp in enumerate(specs):
            if i < required:
                lines.append(f"    v{i} = obj[{i}]")
                lines.append(f"    a{i} = {_convert_expr(sp.tp, sp.meta, f'v{i}', env)}")
                args.append(f"{sp.name}=a{i}")
            else:
                lines.append(f"    if n > {i}:")
                lines.append(f"        v{i} = obj[{i}]")
                lines.append(f"        kw[{sp.name!r}] = {_convert_expr(sp.tp, sp.meta, f'v{i}', env)}")
        lines.insert(1, "    kw = {}")
    else:
        names = {sp.name for sp in specs}
        env["_names"] = frozenset(names)
        lines.append("    if type(obj) is not dict or not _names.issuperset(obj): _bad()")
        lines.append("    kw = {}")
        for i, sp in enumerate(specs):
            lines.append(f"    v{i} = obj.get({sp.name!r}, _MISSING)")
            if sp.required:
                lines.append(f"    if v{i} is _MISSING: _bad()")
                lines.append(f"    kw[{sp.name!r}] = {_convert_expr(sp.tp, sp.meta, f'v{i}', env)}")
            else:
                lines.append(f"    if v{i} is not _MISSING:")
                lines.append(f"        kw[{sp.name!r}] = {_convert_expr(sp.tp, sp.meta, f'v{i}', env)}")
    call = ", ".join(args)
    if cls.RAW:
        # Checked field by field above; the array itself is the value (nested RAW lists too).
        lines.append("    return obj")
    else:
        lines.append(f"    return _cls({call}{', ' if call else ''}**kw)")
    exec(compile("\n".join(lines), f"<decoder {cls.__name__}>", "exec"), env)
    dec = env["_decode"]
    _DECODERS[cls] = dec
    return dec


def _encoder(cls: type[Message]) -> Any:
    enc = _ENCODERS.get(cls)
    if enc is not None:
        return enc
    specs = _specs(cls)
    env: dict[str, Any] = {}
    parts = []
    for sp in specs:
        tp = sp.tp
        origin = typing.get_origin(tp)
        optional = False
        if origin is Union or origin is getattr(__import__("types"), "UnionType", None):
            args = [a for a in typing.get_args(tp) if a is not type(None)]
            optional = len(args) < len(typing.get_args(tp))
            tp = args[0] if len(args) == 1 else object  # a union of plain types goes as it is
            origin = typing.get_origin(tp)
        v = f"m.{sp.name}"
        if origin is list and isinstance(typing.get_args(tp)[0], type) and issubclass(typing.get_args(tp)[0], Message):
            item = typing.get_args(tp)[0]
            env[f"_enc_{item.__name__}"] = _encoder(item)
            expr = f"[_enc_{item.__name__}(_x) for _x in {v}]"
        elif isinstance(tp, type) and issubclass(tp, Message):
            env[f"_enc_{tp.__name__}"] = _encoder(tp)
            expr = f"_enc_{tp.__name__}({v})"
        else:
            expr = v
        if optional and expr != v:
            expr = f"(None if {v} is None else {expr})"
        # When a map leaves the field out: an optional field at None (an older peer may not know
        # a newer one), an `omit` field at its default (see _lim).
        cond = None
        if sp.meta.get("omit"):
            f = next(f for f in dataclasses.fields(cls) if f.name == sp.name)  # type: ignore[arg-type]
            env[f"_default_{sp.name}"] = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            cond = f"{v} != _default_{sp.name}"
        elif optional and not sp.required:
            cond = f"{v} is not None"
        parts.append((sp, expr, cond))
    if cls.ARRAY:
        required = sum(1 for sp in specs if sp.required)
        body = ["def _encode(m):"]
        if cls.RAW:
            body.append("    if type(m) is list: return m")
        body.append(f"    out = [{', '.join(e for _, e, _c in parts)}]")
        # Trailing optional fields left at None are dropped (the decoder fills the defaults).
        body.append(f"    while len(out) > {required} and out[-1] is None: out.pop()")
        body.append("    return out")
    else:
        body = ["def _encode(m):", "    out = {" + ", ".join(f"{sp.name!r}: {e}" for sp, e, c in parts if c is None) + "}"]
        body += [f"    if {c}: out[{sp.name!r}] = {e}" for sp, e, c in parts if c is not None]
        body.append("    return out")
    exec(compile("\n".join(body), f"<encoder {cls.__name__}>", "exec"), env)
    enc = env["_encode"]
    _ENCODERS[cls] = enc
    return enc


VALIDATE_OUTGOING = False
"""Check every message we send with the receiving side's rules (tests turn this on: our own bugs
then surface as LocalProtocolError). Off in production: it doubles the cost of big manifests."""


def encode(msg: Message) -> bytes:
    """A message as its CBOR body. Raises MessageTooLarge above MAX_MESSAGE, LocalProtocolError
    if it breaks its own limits otherwise."""
    wire = _to_wire(msg)
    if VALIDATE_OUTGOING:
        try:
            _from_wire(type(msg), wire, type(msg).__name__)
        except _Invalid as exc:
            raise LocalProtocolError(f"refusing to send an invalid message: {exc}") from None
    body = cbor2.dumps(wire)
    if len(body) > MAX_MESSAGE:
        raise MessageTooLarge(f"{type(msg).__name__} is {len(body)} bytes, above {MAX_MESSAGE}")
    return body


def decode(cls: type[M], body: bytes, *, max_size: int = MAX_MESSAGE) -> M:
    """Parse and validate a CBOR body as message `cls`.

    Raises:
        RemoteProtocolError: the body is too large, not CBOR, or not a valid `cls`
            (code 413 for size, 400 otherwise).
    """
    if len(body) > max_size:
        raise RemoteProtocolError(f"message of {len(body)} bytes is above the limit of {max_size}", 413)
    if len(body) > _COUNT_FROM and _too_many_containers(body):
        raise RemoteProtocolError(f"message holds more than {MAX_CONTAINERS} maps, arrays and tags", 413)
    try:
        obj = cbor2.loads(
            body,
            max_depth=MAX_DEPTH,
            allow_duplicate_keys=False,
            strict_hashable_types=True,
        )
    except Exception as exc:  # cbor2 raises CBORDecodeError, ValueError, OverflowError, ...
        raise RemoteProtocolError(f"malformed CBOR: {exc}", 400) from None
    try:
        try:
            msg = _decoder(cls)(obj)
        except (_Invalid, TypeError, ValueError):
            # The fast path said no: the generic one says why (or, if it accepts, wins).
            msg = _from_wire(cls, obj, cls.__name__)
        if cls in _UNPACK and msg.packed is not None:
            msg = _unpacked(msg)
        elif cls is DirManifests:
            msg = dataclasses.replace(msg, manifests=[_unpacked(m) if m.packed is not None else m for m in msg.manifests])
        elif cls is TreeDirs:
            msg = dataclasses.replace(msg, dirs=[_unpacked(d) if d.packed is not None else d for d in msg.dirs])
        return msg  # type: ignore[no-any-return]
    except _Invalid as exc:
        raise RemoteProtocolError(f"invalid {cls.__name__}: {exc}", 400) from None
    except RecursionError:
        raise RemoteProtocolError(f"invalid {cls.__name__}: nested too deeply", 400) from None


def _too_many_containers(body: bytes) -> bool:
    """Whether `body` holds more than MAX_CONTAINERS maps, arrays and tags (counted in C; without
    the C module nothing is counted and cbor2 decodes what it is given)."""
    from blit.ffi import scan  # noqa: PLC0415 (only bodies above _COUNT_FROM need it)

    return scan.HAVE_CMPDIR and scan.cbor_containers(body, MAX_CONTAINERS) == -1


def error_body(code: ErrorCode, message: str) -> bytes:
    return encode(Error(error=code.value, message=message[:MAX_TEXT]))


# =================================================================================================
# Paths


def auth_mac(secret: bytes, nonce: bytes, user: str, module: str) -> bytes:
    """The answer to a challenge: HMAC-SHA256 keyed by the secret over a domain tag and the
    length-prefixed nonce, user and module, so an answer is good for one nonce (one session,
    one attempt), one user and one module only. The secret itself never travels."""
    import hashlib
    import hmac

    msg = bytearray(b"blit-auth-1")
    for part in (nonce, user.encode("utf-8"), module.encode("utf-8")):
        msg += struct.pack("!H", len(part)) + part
    return hmac.new(secret, bytes(msg), hashlib.sha256).digest()


def _quoted(path: bytes, most: int = 200) -> str:
    """A path for a message: its text (bytes that are not UTF-8 as \\x escapes), quoted, cut
    to `most` characters."""
    text = path.decode("utf-8", "backslashreplace")
    return repr(text if len(text) <= most else text[:most] + "...")


def split_path(path: bytes) -> list[bytes]:
    """The components of a module-relative path, refusing anything that could leave the module.

    "" and "." components are dropped ("a//b/./c" is a/b/c); a trailing "/" is fine.

    Raises:
        Refused(PATH_REFUSED): NUL, an absolute path, a ".." component, an over-long path or name.
    """
    if b"\0" in path:
        raise Refused(ErrorCode.PATH_REFUSED, f"path {_quoted(path)} contains a NUL byte")
    if path.startswith(b"/"):
        raise Refused(ErrorCode.PATH_REFUSED, f"path {_quoted(path)} is absolute; paths are relative to the module")
    if len(path) > MAX_PATH:
        raise Refused(ErrorCode.PATH_REFUSED, f"path is longer than {MAX_PATH} bytes")
    parts = []
    for part in path.split(b"/"):
        if part in (b"", b"."):
            continue
        if part == b"..":
            raise Refused(ErrorCode.PATH_REFUSED, f"path {_quoted(path)} contains '..'")
        if len(part) > MAX_NAME:
            raise Refused(ErrorCode.PATH_REFUSED, f"a name in {_quoted(path, 60)} is longer than {MAX_NAME} bytes")
        parts.append(part)
    return parts


def check_name(name: bytes) -> None:
    """A single directory-entry name as it travels in manifests: no '/', NUL, '.', '..' or ''."""
    if not name or name in (b".", b"..") or b"/" in name or b"\0" in name or len(name) > MAX_NAME:
        raise Refused(ErrorCode.PATH_REFUSED, f"invalid entry name {name!r}")


# =================================================================================================
# Packed manifests (hello feature FEATURE_PACKED; docs/protocol.md §4, decisions R21)
#
# count (u32), then one little-endian column per lstat field in fsops.Meta order (count values
# each), then the names, each followed by a NUL. 72 bytes per entry plus its name.

_PACK_COLUMNS = (
    ("I", 4),  # mode
    ("q", 8),  # size (>= 0)
    ("q", 8),  # mtime_ns
    ("q", 8),  # atime_ns
    ("I", 4),  # uid
    ("I", 4),  # gid
    ("Q", 8),  # ino
    ("Q", 8),  # dev
    ("I", 4),  # nlink
    ("Q", 8),  # rdev
    ("q", 8),  # blocks (>= 0)
)
_PACK_FIXED = sum(w for _, w in _PACK_COLUMNS)
_PACK_ATTRS = ("st_mode", "st_size", "st_mtime_ns", "st_atime_ns", "st_uid", "st_gid", "st_ino", "st_dev", "st_nlink", "st_rdev", "st_blocks")
_SWAP = sys.byteorder != "little"
assert all(array(c).itemsize == w for c, w in _PACK_COLUMNS)


def pack_entries(names: list[bytes], stats: list[Any]) -> bytes:
    """Entries (names and stat results or fsops.Meta, in the same order) as a packed manifest.
    Raises OverflowError for a value out of its column's range (never from a real lstat)."""
    parts = [len(names).to_bytes(4, "little")]
    for (code, _w), attr in zip(_PACK_COLUMNS, _PACK_ATTRS):
        col = array(code, [getattr(st, attr) for st in stats])
        if _SWAP:
            col.byteswap()
        parts.append(col.tobytes())
    parts.append(pack_names(names))
    return b"".join(parts)


def pack_names(names: list[bytes]) -> bytes:
    """Names, each followed by a NUL (the names part of packed manifests and FileGroups)."""
    return b"\0".join(names) + b"\0" if names else b""


def _unpack_names(tail: bytes, n: int, what: str) -> list[bytes]:
    """Exactly `n` NUL-terminated names, each a valid entry name (check_name's rules, checked
    for the whole list at once). Raises _Invalid."""
    names = tail.split(b"\0")
    if len(names) != n + 1 or names.pop():
        raise _Invalid(f"{what}: names do not match the count")
    if n and (b"/" in tail or min(map(len, names)) == 0 or max(map(len, names)) > MAX_NAME or names.count(b".") or names.count(b"..")):
        bad = next(x for x in names if not x or x in (b".", b"..") or b"/" in x or len(x) > MAX_NAME)
        raise _Invalid(f"{what}: invalid entry name {bad!r}")
    return names


def _unpack_ids_names(ids_blob: bytes, names_blob: bytes, what: str) -> tuple["array[int]", list[bytes]]:
    """u32 little-endian ids, no id twice, and as many NUL-terminated names (`_unpack_names`'s
    rules). Raises _Invalid."""
    if len(ids_blob) % 4:
        raise _Invalid(f"{what}: ids not a multiple of 4 bytes")
    ids = array("I")
    ids.frombytes(ids_blob)
    if _SWAP:
        ids.byteswap()
    if len(set(ids)) != len(ids):
        raise _Invalid(f"{what}: a file id twice")
    return ids, _unpack_names(names_blob, len(ids), what)


def unpack_file_group(g: FileGroup) -> tuple[list[bytes], "array[int]", list[bytes]]:
    """A FileGroup's directory (split_path), ids (no id twice) and names, checked.

    Raises:
        Refused: PATH_REFUSED for the directory, BAD_REQUEST for ids or names.
    """
    parts = split_path(g.rel)
    try:
        ids, names = _unpack_ids_names(g.ids, g.names, "transfer/send")
    except _Invalid as exc:
        raise Refused(ErrorCode.BAD_REQUEST, str(exc)) from None
    return parts, ids, names


def pack_needs(ids: "array[int]", names: list[bytes]) -> NeedGroup | None:
    """Files to send (ids and names in the same order) as a NeedGroup; None when there are none."""
    if not ids:
        return None
    if _SWAP:
        ids = array("I", ids)
        ids.byteswap()
    return NeedGroup(ids=ids.tobytes(), names=pack_names(names))


def unpack_needs(g: NeedGroup) -> tuple["array[int]", list[bytes]]:
    """A NeedGroup's ids and names, checked as a whole: as many names as ids, each a valid
    entry name (`check_name`'s rules), no id twice. (Ids are u32 by their layout; whether one
    is already waiting is for the caller, who holds the list.)

    Raises:
        RemoteProtocolError: anything else (the peer that sent it broke the protocol).
    """
    try:
        return _unpack_ids_names(g.ids, g.names, "DirPlanned.packed_need")
    except _Invalid as exc:
        raise RemoteProtocolError(f"invalid {exc}", 400) from None


def with_need_list(planned: DirPlanned) -> DirPlanned:
    """`planned` with its packed needs as Need arrays (for a peer without FEATURE_NEED_PACKED)."""
    g = planned.packed_need
    if g is None:
        return planned
    ids, names = _unpack_ids_names(g.ids, g.names, "DirPlanned.packed_need")
    need = [*planned.need, *(Need(id=i, name=n) for i, n in zip(ids, names))]
    return dataclasses.replace(planned, need=need, packed_need=None)


def packed_count(blob: bytes) -> int:
    """The number of entries of a packed manifest we made."""
    return int.from_bytes(blob[:4], "little")


def split_packed(blob: bytes, max_entries: int, max_bytes: int, entry_bytes: int, first: tuple[int, int] = (0, 0)) -> list[bytes]:
    """A packed manifest we made, cut into consecutive packed manifests of at most `max_entries`
    entries and about `max_bytes` each, an entry weighing `entry_bytes` plus its name's length
    (as a manifest part is cut); the first of them already holds `first` (entries, bytes)."""
    n = packed_count(blob)
    end = 4 + n * _PACK_FIXED
    lens = [len(x) for x in blob[end:].split(b"\0")[:-1]]
    cuts: list[int] = []
    count, nbytes = first
    for i, ln in enumerate(lens):
        size = entry_bytes + ln
        if count and (count >= max_entries or nbytes + size > max_bytes):
            cuts.append(i)
            count = nbytes = 0
        count += 1
        nbytes += size
    if not cuts:
        return [blob]
    name_at = list(itertools.accumulate((ln + 1 for ln in lens), initial=0))
    out = []
    for a, b in zip([0, *cuts], [*cuts, n]):
        parts = [(b - a).to_bytes(4, "little")]
        pos = 4
        for _code, w in _PACK_COLUMNS:
            parts.append(blob[pos + a * w : pos + b * w])
            pos += n * w
        parts.append(blob[end + name_at[a] : end + name_at[b]])
        out.append(b"".join(parts))
    return out


def unpack_entries(blob: bytes, limit: int = MAX_LIST) -> list[tuple[Any, ...]]:
    """A packed manifest as raw entries: (name, mode, size, mtime_ns, atime_ns, uid, gid, ino,
    dev, nlink, rdev, blocks) tuples, read as SrcEntry arrays are (`Meta._make(e[1:12])`).

    Every field is checked as a SrcEntry's is: the count (at most `limit`), the layout, sizes
    and blocks >= 0, and each name (1-255 bytes, no '/' or NUL, not '.' or '..').

    Raises:
        _Invalid: anything else (decode answers it as a malformed message).
    """
    names, cols = unpack_columns(blob, limit)
    return list(zip(names, *cols))


def unpack_columns(blob: bytes, limit: int = MAX_LIST) -> tuple[list[bytes], list["array[int]"]]:
    """`unpack_entries` as its names and its columns (one array per lstat field, in fsops.Meta
    order), checked the same way. Raises _Invalid."""
    if len(blob) < 4:
        raise _Invalid("packed: shorter than its count")
    n = int.from_bytes(blob[:4], "little")
    if n > limit:
        raise _Invalid(f"packed: more than {limit} entries")
    end = 4 + n * _PACK_FIXED
    if len(blob) < end:
        raise _Invalid("packed: shorter than its columns")
    view = memoryview(blob)
    cols = []
    pos = 4
    for code, w in _PACK_COLUMNS:
        col = array(code)
        col.frombytes(view[pos : pos + n * w])
        if _SWAP:
            col.byteswap()
        cols.append(col)
        pos += n * w
    if not n:
        if len(blob) != end:
            raise _Invalid("packed: names without entries")
        return [], cols
    names = _unpack_names(blob[end:], n, "packed")
    if min(cols[1]) < 0 or min(cols[10]) < 0:
        raise _Invalid("packed: negative size or blocks")
    return names, cols


_UNPACK = frozenset({TreeDir, DirManifest})


def _unpacked(msg: Any) -> Any:
    """A TreeDir or DirManifest with its packed entries moved into `entries`."""
    entries = msg.entries + unpack_entries(msg.packed, MAX_LIST - len(msg.entries))
    return dataclasses.replace(msg, entries=entries, packed=None)


# =================================================================================================
# Session state (daemon side), as data: which requests each state accepts and where they lead.


class SessionState(enum.Enum):
    AWAIT_HELLO = "await-hello"
    READY = "ready"
    CLOSED = "closed"


SESSION_TRANSITIONS: dict[SessionState, dict[str, SessionState]] = {
    SessionState.AWAIT_HELLO: {"hello": SessionState.READY},
    SessionState.READY: {name: SessionState.READY for name in OPERATIONS if name != "hello"},
    SessionState.CLOSED: {},
}


class ServerSession:
    """The daemon's view of one control connection: decodes requests, enforces the state table,
    negotiates the version. No I/O: `control.py`/`daemon.server` feed it and send what it says."""

    def __init__(self, *, software: str, max_message: int = MAX_MESSAGE) -> None:
        self.state = SessionState.AWAIT_HELLO
        self.software = software
        self.max_message = max_message
        self.peer_software: str | None = None

    @property
    def body_limit(self) -> int:
        """The largest request body accepted now: MAX_HELLO until the hello, then max_message."""
        return min(MAX_HELLO, self.max_message) if self.state is SessionState.AWAIT_HELLO else self.max_message

    def receive_request(self, path: str, body: bytes) -> Message:
        """Decode the request at `path` ("/blit/<op>") for the current state.

        Raises:
            Refused: unknown op, op not allowed now, version mismatch, or a malformed body.
        """
        if not path.startswith(PATH_PREFIX):
            raise Refused(ErrorCode.UNKNOWN_OP, f"unknown path {path!r}")
        name = path[len(PATH_PREFIX) :]
        op = OPERATIONS.get(name)
        if op is None:
            raise Refused(ErrorCode.UNKNOWN_OP, f"unknown operation {name!r}")
        nxt = SESSION_TRANSITIONS[self.state].get(name)
        if nxt is None:
            if self.state is SessionState.AWAIT_HELLO:
                raise Refused(ErrorCode.NO_SESSION, "the first request on a connection must be hello")
            if self.state is SessionState.CLOSED:
                raise Refused(ErrorCode.SHUTTING_DOWN, "the session is closed")
            raise Refused(ErrorCode.NO_SESSION, f"{name} is not allowed now")
        try:
            msg = decode(op.request, body, max_size=self.body_limit)
        except RemoteProtocolError as exc:
            raise Refused(ErrorCode.TOO_LARGE if exc.code == 413 else ErrorCode.BAD_REQUEST, str(exc)) from None
        if isinstance(msg, Hello):
            if msg.protocol != PROTOCOL_VERSION:
                raise Refused(
                    ErrorCode.VERSION,
                    f"protocol version mismatch: the daemon ({self.software}) speaks blit protocol "
                    f"{PROTOCOL_VERSION}, the client ({msg.software}) speaks {msg.protocol}",
                )
            self.peer_software = msg.software
        self.state = nxt
        return msg

    def close(self) -> None:
        self.state = SessionState.CLOSED


class ClientSession:
    """The client's view: encodes requests and interprets replies. No I/O."""

    def __init__(self, *, software: str) -> None:
        self.software = software
        self.state = SessionState.AWAIT_HELLO
        self.peer: HelloReply | None = None

    def hello(self) -> Hello:
        return Hello(protocol=PROTOCOL_VERSION, software=self.software, features=[FEATURE_DIR_DIGEST, FEATURE_PACKED, FEATURE_SEND_DIRS, FEATURE_ACTIONS, FEATURE_NEED_PACKED, FEATURE_PARTS, FEATURE_DIR_BATCH, FEATURE_CLIENT, FEATURE_CLIENT_STAT, FEATURE_STAT_READ, FEATURE_MACHINE, FEATURE_NEST, FEATURE_HOLD, FEATURE_SILENCE, FEATURE_SEALED, FEATURE_LANDED_INO, FEATURE_SPLIT, FEATURE_PULL_DIGEST])

    def request(self, msg: Message) -> tuple[str, bytes]:
        """(path, body) for a request message."""
        op = OP_OF.get(type(msg))
        if op is None:
            raise LocalProtocolError(f"{type(msg).__name__} is not a request")
        if self.state is not SessionState.READY and op.name != "hello":
            raise LocalProtocolError(f"{op.name} before hello")
        return PATH_PREFIX + op.name, encode(msg)

    def reply(self, request: type[Message], status: int, body: bytes) -> Message:
        """Decode the reply to a request; an error status raises.

        Raises:
            RemoteError: the daemon refused (its code and message).
            IncompatiblePeerError: the versions differ (either side noticed).
            RemoteProtocolError: the reply is malformed.
        """
        op = OP_OF[request]
        if status != 200:
            err = decode(Error, body)
            if err.error == ErrorCode.VERSION.value:
                raise IncompatiblePeerError(err.message, local_version=PROTOCOL_VERSION, peer_version=None)
            raise RemoteError(err.error, err.message)
        msg = decode(op.reply, body)
        if isinstance(msg, HelloReply):
            if msg.protocol != PROTOCOL_VERSION:
                raise IncompatiblePeerError(
                    f"protocol version mismatch: this client ({self.software}) speaks blit protocol "
                    f"{PROTOCOL_VERSION}, the daemon ({msg.software}) speaks {msg.protocol}",
                    local_version=PROTOCOL_VERSION,
                    peer_version=msg.protocol,
                )
            self.peer = msg
            self.state = SessionState.READY
        return msg


# =================================================================================================
# Data plane: stream admission and frames


DATA_MAGIC = b"BLITDATA"
DATA_HELLO = struct.Struct("!8sHH32s")
"""Sent first by the client on a raw data stream: magic, protocol version, flags, token."""
HELLO_SEALED = 1
"""DATA_HELLO flag (FEATURE_SEALED): a sealed stream (transport/seal.py). The token field holds
the token's id, then zeros: the secret never crosses the data port; the hello follows again in
the stream's first sealed record, which proves the client holds it."""
SEALED_ADMITTED = b"BLITDATA admitted"
"""On a sealed stream, the daemon's first sealed record, after its cleartext ADMIT answer OK:
proof that the daemon holds the token's secret too."""
ADMIT = struct.Struct("!BH")
"""The daemon's answer: status (0 = admitted), length of a UTF-8 message that follows."""


class AdmitStatus(enum.IntEnum):
    OK = 0
    BAD_HELLO = 1
    VERSION = 2
    BAD_TOKEN = 3
    BUSY = 4


def pack_data_hello(token: bytes, *, sealed: bool = False) -> bytes:
    if len(token) != TOKEN_BYTES:
        raise LocalProtocolError("bad token length")
    if sealed:
        return DATA_HELLO.pack(DATA_MAGIC, PROTOCOL_VERSION, HELLO_SEALED, token[:TOKEN_ID_BYTES] + bytes(TOKEN_SECRET_BYTES))
    return DATA_HELLO.pack(DATA_MAGIC, PROTOCOL_VERSION, 0, token)


def unpack_data_hello(data: bytes) -> tuple[bytes, bool]:
    """The token field of a data-stream hello, and whether the stream is sealed (the field then
    holds the token's id, then zeros).

    Raises:
        Refused(BAD_REQUEST): not a blit data hello; Refused(VERSION): another protocol version.
    """
    if len(data) != DATA_HELLO.size:
        raise Refused(ErrorCode.BAD_REQUEST, "short data hello")
    magic, version, flags, token = DATA_HELLO.unpack(data)
    if magic != DATA_MAGIC:
        raise Refused(ErrorCode.BAD_REQUEST, "not a blit data stream")
    if version != PROTOCOL_VERSION:
        raise Refused(
            ErrorCode.VERSION,
            f"data stream protocol version mismatch: the daemon speaks {PROTOCOL_VERSION}, "
            f"the client speaks {version}",
        )
    if flags & ~HELLO_SEALED:
        raise Refused(ErrorCode.BAD_REQUEST, f"unknown data hello flags {flags:#x}")
    return bytes(token), bool(flags & HELLO_SEALED)


def pack_admit(status: AdmitStatus, message: str = "") -> bytes:
    raw = message.encode()[:1024]
    return ADMIT.pack(status, len(raw)) + raw


class FrameType(enum.IntEnum):
    DATA = 1
    """`length` bytes of file `file_id` at `offset`."""
    END = 2
    """File `file_id` is complete; `offset` is its final size (holes up to it are kept)."""
    ABORT = 3
    """File `file_id` failed on the sender; the payload is a UTF-8 reason. Discard what came."""
    DONE = 4
    """No more files on this stream."""
    NOOP = 5
    """Heartbeat: the sender is alive but has nothing to send yet."""


_FRAME_TYPES = {t.value: t for t in FrameType}
FRAME = struct.Struct("!BBHIQQ")
"""type u8, flags u8, reserved u16, file_id u32, offset u64, length u64 (payload bytes)."""
FRAME_PART = 1
"""Flag (FEATURE_SPLIT): a DATA, END or ABORT frame of one part of a file sent in parts, one
part per stream; `reserved` holds how many parts the file has (2..MAX_PARTS). A part is its DATA
frames, then an END (`offset`: the file's size) or an ABORT: the file is complete once every
part has ended, and fails if any part aborts or its stream breaks."""
MAX_PARTS = 16
FRAME_SIZE = FRAME.size
MAX_ABORT_TEXT = 4096
MAX_OFFSET = (1 << 63) - 1


@dataclass(frozen=True, slots=True)
class FrameHeader:
    type: FrameType
    file_id: int
    offset: int
    length: int


def pack_frame(kind: FrameType, file_id: int = 0, offset: int = 0, length: int = 0, flags: int = 0, parts: int = 0) -> bytes:
    """A frame header; `flags` FRAME_PART with `parts`, the file's number of parts."""
    return FRAME.pack(kind, flags, parts, file_id, offset, length)


def unpack_frame(data: bytes | bytearray | memoryview) -> FrameHeader:
    """Parse and check a frame header.

    Raises:
        RemoteProtocolError: unknown type, or sizes no sender would use.
    """
    kind, _flags, _reserved, file_id, offset, length = FRAME.unpack(data)
    ftype = _FRAME_TYPES.get(kind)
    if ftype is None:
        raise RemoteProtocolError(f"unknown data frame type {kind}")
    if offset > MAX_OFFSET or length > MAX_OFFSET or offset + length > MAX_OFFSET:
        raise RemoteProtocolError("data frame beyond the largest file size")
    if ftype is FrameType.END and length not in (0, 16):
        raise RemoteProtocolError("END frame with an unexpected payload")
    if ftype is FrameType.ABORT and length > MAX_ABORT_TEXT:
        raise RemoteProtocolError("ABORT frame reason too long")
    if ftype in (FrameType.DONE, FrameType.NOOP) and length:
        raise RemoteProtocolError(f"{ftype.name} frame with a payload")
    return FrameHeader(ftype, file_id, offset, length)


@dataclass(frozen=True, slots=True)
class FramePayload:
    """A piece of the payload of the last header: bytes at `offset` (file offset for DATA)."""

    header: FrameHeader
    offset: int
    data: bytes


@dataclass(frozen=True, slots=True)
class FrameComplete:
    """The whole payload of `header` has been delivered (ABORT carries its text in `data`)."""

    header: FrameHeader
    data: bytes = b""


FrameEvent = Union[FrameHeader, FramePayload, FrameComplete]


class FrameParser:
    """Incremental parser of a data-frame byte stream, for carriers that deliver arbitrary chunks
    (the HTTP/2 fallback). Raw TCP streams read headers and payloads directly instead.

    `feed(chunk)` returns events: a `FrameHeader`, then `FramePayload` pieces of a DATA frame
    (without copying more than slicing), then `FrameComplete`.
    """

    def __init__(self) -> None:
        self._buf = bytearray()
        self._header: FrameHeader | None = None
        self._remaining = 0
        self._pos = 0  # file offset of the next DATA payload byte
        self._text = bytearray()

    @property
    def idle(self) -> bool:
        """True between frames (a clean place for the stream to end)."""
        return self._header is None and not self._buf

    def feed(self, chunk: bytes) -> list[FrameEvent]:
        events: list[FrameEvent] = []
        view = memoryview(chunk)
        while view:
            if self._header is None:
                need = FRAME_SIZE - len(self._buf)
                self._buf += view[:need]
                view = view[need:]
                if len(self._buf) < FRAME_SIZE:
                    break
                header = unpack_frame(bytes(self._buf))
                self._buf.clear()
                events.append(header)
                if header.length == 0:
                    events.append(FrameComplete(header))
                    continue
                self._header = header
                self._remaining = header.length
                self._pos = header.offset
                continue
            take = min(self._remaining, len(view))
            piece = view[:take]
            view = view[take:]
            self._remaining -= take
            if self._header.type is FrameType.DATA:
                events.append(FramePayload(self._header, self._pos, bytes(piece)))
                self._pos += take
            else:
                self._text += piece
            if self._remaining == 0:
                events.append(FrameComplete(self._header, bytes(self._text)))
                self._text.clear()
                self._header = None
        return events


__all__ = [
    "PROTOCOL_VERSION",
    "MAX_MESSAGE",
    "ErrorCode",
    "Refused",
    "Message",
    "Error",
    "Ack",
    "Hello",
    "HelloReply",
    "AuthChallenge",
    "AuthNonce",
    "Auth",
    "auth_mac",
    "AUTH_NONCE_BYTES",
    "AUTH_MAC_BYTES",
    "ListModules",
    "ModuleInfo",
    "ModuleList",
    "Entry",
    "ENTRY_KINDS",
    "ListDir",
    "DirListing",
    "Stat",
    "StatReply",
    "OpenTransfer",
    "TransferOpened",
    "FileRef",
    "FileGroup",
    "FileOffer",
    "SendFiles",
    "ExpectFiles",
    "FinishTransfer",
    "FileFailure",
    "TransferDone",
    "XAttr",
    "SrcEntry",
    "FilterRule",
    "Rename",
    "OpenTree",
    "TreeDir",
    "SubDir",
    "Need",
    "NeedGroup",
    "FEATURE_NEED_PACKED",
    "FEATURE_PARTS",
    "PathFailure",
    "DirPlanned",
    "TreeScan",
    "DirManifest",
    "TreeScans",
    "DirManifests",
    "TreeDirs",
    "DirsPlanned",
    "FEATURE_DIR_BATCH",
    "BATCH_DIRS",
    "BATCH_ENTRIES",
    "TreeFinish",
    "TreeDone",
    "FileHash",
    "TreeHashes",
    "TreeHash",
    "HashList",
    "Landed",
    "RemoveGroup",
    "TreeLanded",
    "LandedPage",
    "TreeRemove",
    "TreeRemoved",
    "FEATURE_ACTIONS",
    "FEATURE_CLIENT",
    "FEATURE_CLIENT_STAT",
    "FEATURE_STAT_READ",
    "FEATURE_NEST",
    "FEATURE_HOLD",
    "FEATURE_LANDED_INO",
    "FEATURE_SEALED",
    "FEATURE_SILENCE",
    "FEATURE_SPLIT",
    "FEATURE_PULL_DIGEST",
    "DirHave",
    "TreeHave",
    "SameDir",
    "HaveChecked",
    "FRAME_PART",
    "HELLO_SEALED",
    "SEALED_ADMITTED",
    "SILENCE_PINGS",
    "ACTION_NAMES",
    "Action",
    "TreeActions",
    "ActionPage",
    "Operation",
    "OPERATIONS",
    "encode",
    "decode",
    "error_body",
    "split_path",
    "check_name",
    "SessionState",
    "ServerSession",
    "ClientSession",
    "FrameType",
    "FrameHeader",
    "FramePayload",
    "FrameComplete",
    "FrameParser",
    "pack_frame",
    "unpack_frame",
    "pack_data_hello",
    "unpack_data_hello",
    "pack_admit",
    "AdmitStatus",
]
