"""The blit daemon: serves modules over the HTTP/2 control plane and raw TCP data streams.

    async with trio.open_nursery() as nursery:
        info = await nursery.start(blit.daemon.serve, load_config(path))

`serve()` is what `blit daemon` runs and what tests start in-process; it reports a `ServeInfo`
(ports, TLS fingerprint) through task_status once it accepts connections, and stops cleanly when
cancelled.
"""

from __future__ import annotations

from .config import DaemonConfig as DaemonConfig
from .config import ModuleConfig as ModuleConfig
from .config import load_config as load_config
from .server import ServeInfo as ServeInfo
from .server import serve as serve

__all__ = ["serve", "ServeInfo", "DaemonConfig", "ModuleConfig", "load_config"]
