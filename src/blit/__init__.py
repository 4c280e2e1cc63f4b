"""Blit: fast, exact file transfer for Trio applications and the command line.

    import blit, trio
    summary = trio.run(blit.copy, "src/", "dst/")

The public API is re-exported here; everything else is private to the package.
"""

from __future__ import annotations

TYPE_CHECKING = False  # not `from typing import ...`: worker processes start faster without it

__version__ = "0.1.0"

from .errors import (
    BlitError as BlitError,
    ConfigError as ConfigError,
    ConnectError as ConnectError,
    FatalError as FatalError,
    FileError as FileError,
    ProtocolError as ProtocolError,
    RemoteError as RemoteError,
    StallError as StallError,
    TransportError as TransportError,
    UsageError as UsageError,
)

if TYPE_CHECKING:
    from .api import Options as Options, copy as copy, mirror as mirror, move as move
    from .plan import Compare as Compare
    from .report import Summary as Summary
    from .stall import Timeouts as Timeouts

_LAZY = {
    "copy": "api",
    "mirror": "api",
    "move": "api",
    "Options": "api",
    "Compare": "plan",
    "Summary": "report",
    "Timeouts": "stall",
}


def __getattr__(name: str) -> object:
    # Lazy so that `blit --help` does not import trio.
    mod = _LAZY.get(name)
    if mod is None:
        raise AttributeError(name)
    import importlib

    return getattr(importlib.import_module(f".{mod}", __name__), name)


__all__ = [
    "BlitError",
    "Compare",
    "ConfigError",
    "ConnectError",
    "FatalError",
    "FileError",
    "Options",
    "ProtocolError",
    "RemoteError",
    "StallError",
    "Summary",
    "Timeouts",
    "TransportError",
    "UsageError",
    "__version__",
    "copy",
    "mirror",
    "move",
]
