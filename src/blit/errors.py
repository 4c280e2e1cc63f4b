"""The exception tree: every error blit raises on purpose.

Each class says whose fault it is. Nothing here does I/O.

    BlitError                      every error blit raises on purpose
    ├── ConfigError                bad arguments or endpoint (the user's fault) -> exit 2
    │   ├── UsageError             the command line is wrong (same exit code, kept for clarity)
    │   └── ConfigFileError        a bad config, secrets or state file -> exit 1 (SPEC: "bad config")
    ├── FatalError                 the run cannot go on (unreadable source root, full disk) -> exit 1
    │   └── OutputClosed           standard output was closed under a run (`blit copy -v ... | head`)
    ├── FileError                  one path failed: .path, .op, __cause__ = OSError; kept in Summary.failures
    ├── TransportError             the network or the peer -> exit 1
    │   ├── ConnectError           the daemon could not be reached
    │   │   ├── CertificateMismatchError  the daemon's TLS certificate is not the one pinned
    │   │   └── TokenRefused       the daemon refused a data stream's token (expired, used)
    │   ├── IncompatiblePeerError  the peer speaks another protocol version: .local_version, .peer_version
    │   ├── StallError             no progress for the stall timeout: .what, .seconds (also a TimeoutError)
    │   └── ProtocolError          .code = wire error code
    │       ├── LocalProtocolError   we broke the protocol: a blit bug
    │       │   └── MessageTooLarge  a message we would send is above the size limit (a huge listing)
    │       └── RemoteProtocolError  the peer broke it
    └── RemoteError                the daemon refused: .code, .message (unknown module, read-only, denied)

`trio.Cancelled` and `KeyboardInterrupt` are never caught by handlers of these. `leaves`
lists what a nursery's ExceptionGroup holds. `FATAL_ERRNOS` are the errnos that end a run.
"""

from __future__ import annotations

import errno

FATAL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS})
"""A write that fails with one of these means the destination can take nothing more (full, over
quota, read-only): the run stops there with exit 1, in every topology (decisions.md R30)."""


class BlitError(Exception):
    """Base of every error blit raises on purpose."""

    exit_code = 1


class ConfigError(BlitError):
    """Bad arguments, endpoint or configuration: the user's to fix."""

    exit_code = 2


class ConfigFileError(ConfigError):
    """A config, secrets or state file is wrong or unreadable (SPEC's exit codes: a fatal error)."""

    exit_code = 1


class UsageError(ConfigError):
    """The command line is wrong (source equals destination, destination inside source...)."""


class FatalError(BlitError):
    """The run cannot go on: nothing, or not everything, was done."""

    exit_code = 1


class OutputClosed(FatalError):
    """Standard output was closed (a broken pipe) while the run still had lines to write: the run
    stops as an interrupt does, its temporary files removed; a rerun finishes it."""


class FileError(BlitError):
    """One path failed; the run goes on and the failure is reported in the summary.

    Attributes:
        path: the path, relative to the transfer root where possible (str, surrogateescape).
        op: what was being done ("read", "write", "stat", "delete", ...).
        message: a one-line human description.
    """

    def __init__(self, path: str, op: str, message: str) -> None:
        super().__init__(f"{path}: {op}: {message}")
        self.path = path
        self.op = op
        self.message = message


class TransportError(BlitError):
    """The network or the peer failed."""


class ConnectError(TransportError):
    """The daemon could not be reached."""


class TokenRefused(ConnectError):
    """The daemon refused a data stream's one-time token (expired, already used, revoked). A
    stream opened late (the planner opens them as files queue up) does without; the first
    stream's refusal fails the run."""


class CertificateMismatchError(ConnectError):
    """The daemon presented a TLS certificate other than the one pinned on first use.

    Attributes:
        host: "host:port" as pinned.
        expected, actual: the certificate fingerprints ("sha256:<hex>").
    """

    def __init__(self, message: str, host: str, expected: str, actual: str) -> None:
        super().__init__(message)
        self.host = host
        self.expected = expected
        self.actual = actual


class IncompatiblePeerError(TransportError):
    """The peer speaks another protocol version; the message names both.

    Attributes:
        local_version: ours. peer_version: theirs, when known.
    """

    def __init__(self, message: str, local_version: int, peer_version: int | None) -> None:
        super().__init__(message)
        self.local_version = local_version
        self.peer_version = peer_version


class StallError(TransportError, TimeoutError):
    """An operation made no progress for `seconds`.

    Attributes:
        what: what stalled ("copy of big.iso", "data stream 2", "daemon nas:9031", ...).
        seconds: the stall timeout that expired.
        local: True when a file operation on this machine hung (not the network or the peer).
    """

    def __init__(self, what: str, seconds: float, *, message: str | None = None, local: bool = False) -> None:
        super().__init__(message or f"{what}: no progress for {seconds:g} s")
        self.what = what
        self.seconds = seconds
        self.local = local


class ProtocolError(TransportError):
    """A protocol rule was broken; `code` is the wire error code."""

    code = 1

    def __init__(self, message: str, code: int | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code


class LocalProtocolError(ProtocolError):
    """We broke the protocol: a blit bug."""


class MessageTooLarge(LocalProtocolError):
    """A message we would send is above the protocol's size limit (a directory too large to
    list in one message): refused before it is sent."""


class RemoteProtocolError(ProtocolError):
    """The peer broke the protocol."""


class RemoteError(BlitError):
    """The daemon refused the request (unknown module, read-only module, access denied)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def leaves(exc: BaseException) -> list[BaseException]:
    """The exceptions inside `exc`, a (nested) ExceptionGroup from trio's nurseries, in order;
    [exc] for a plain exception."""
    if not isinstance(exc, BaseExceptionGroup):
        return [exc]
    return [leaf for sub in exc.exceptions for leaf in leaves(sub)]


__all__ = [
    "BlitError",
    "ConfigError",
    "UsageError",
    "FatalError",
    "OutputClosed",
    "FileError",
    "TransportError",
    "ConnectError",
    "TokenRefused",
    "CertificateMismatchError",
    "IncompatiblePeerError",
    "StallError",
    "ProtocolError",
    "LocalProtocolError",
    "RemoteProtocolError",
    "RemoteError",
    "leaves",
    "FATAL_ERRNOS",
]
