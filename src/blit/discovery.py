"""mDNS: the daemon advertises `_blit._tcp.local.`; `blit scan` browses for it.

zeroconf is asyncio-based; under trio its sync `Zeroconf` runs its own loop on its own thread
(STACK-NOTES §6). Its blocking calls (construct, register_service, get_service_info, close) go
through `trio.to_thread.run_sync`; browse callbacks come back with `TrioToken.run_sync_soon`
(non-blocking: `trio.from_thread.run_sync` would block zeroconf's loop). zeroconf costs 75 ms to
import, so it is imported inside these functions only.

TXT record: v (protocol version), tls (1/0), modules (comma-separated, cut to fit 255 bytes).

This module must not decide anything about transfers.
"""

from __future__ import annotations

import logging
import socket
from dataclasses import dataclass, field
from typing import Any

import trio

from .transport.protocol import PROTOCOL_VERSION

log = logging.getLogger("blit.discovery")

SERVICE_TYPE = "_blit._tcp.local."


@dataclass(frozen=True)
class Advertisement:
    name: str
    port: int
    modules: list[str] = field(default_factory=list)
    tls: bool = True


@dataclass(frozen=True)
class Service:
    """A daemon found by `browse()`."""

    name: str
    addresses: list[str]
    port: int
    version: int | None
    tls: bool
    modules: list[str]

    @property
    def host(self) -> str:
        return self.addresses[0] if self.addresses else ""


def _txt(ad: Advertisement) -> dict[str, str]:
    mods = ""
    for m in ad.modules:
        nxt = f"{mods},{m}" if mods else m
        if len(nxt) > 240:
            break
        mods = nxt
    return {"v": str(PROTOCOL_VERSION), "tls": "1" if ad.tls else "0", "modules": mods}


def _local_addresses(interfaces: list[str] | None) -> list[str]:
    if interfaces:
        return [a for a in interfaces if not a.isdigit()]
    try:
        import ifaddr

        out = []
        for adapter in ifaddr.get_adapters():
            for ip in adapter.ips:
                if isinstance(ip.ip, str) and not ip.ip.startswith("127."):
                    out.append(ip.ip)
        return out or ["127.0.0.1"]
    except Exception:
        return ["127.0.0.1"]


def _zeroconf(interfaces: list[str] | None) -> Any:
    import zeroconf

    if interfaces:
        return zeroconf.Zeroconf(interfaces=interfaces)
    return zeroconf.Zeroconf()


async def advertise(ad: Advertisement, interfaces: list[str] | None = None) -> None:
    """Advertise the daemon until cancelled; failures are logged, never fatal to the daemon."""
    import zeroconf

    label = ad.name.replace(".", "-")[:60] or "blit"
    info = zeroconf.ServiceInfo(
        SERVICE_TYPE,
        f"{label}.{SERVICE_TYPE}",
        port=ad.port,
        properties=_txt(ad),
        server=f"{socket.gethostname().split('.')[0]}.local.",
        parsed_addresses=_local_addresses(interfaces),
    )
    try:
        zc = await trio.to_thread.run_sync(_zeroconf, interfaces)
    except Exception as exc:
        log.warning("mDNS disabled: %s", exc)
        return
    try:
        try:
            await trio.to_thread.run_sync(lambda: zc.register_service(info, allow_name_change=True))
        except Exception as exc:
            log.warning("mDNS advertisement failed: %s", exc)
            await trio.sleep_forever()
        log.info("advertising %s on mDNS", info.name)
        await trio.sleep_forever()
    finally:
        with trio.CancelScope(shield=True), trio.move_on_after(3):
            await trio.to_thread.run_sync(_close, zc, info, abandon_on_cancel=True)


def _close(zc: Any, info: Any) -> None:
    try:
        zc.unregister_service(info)
    except Exception:
        pass
    zc.close()


async def browse(duration: float = 3.0, interfaces: list[str] | None = None) -> list[Service]:
    """Daemons that answer within `duration` seconds, sorted by name."""
    import zeroconf

    token = trio.lowlevel.current_trio_token()
    send, receive = trio.open_memory_channel[tuple[str, Any]](1000)

    def on_change(zeroconf: Any, service_type: str, name: str, state_change: Any) -> None:
        try:
            token.run_sync_soon(send.send_nowait, (name, state_change))
        except (trio.RunFinishedError, trio.WouldBlock):
            pass

    zc = await trio.to_thread.run_sync(_zeroconf, interfaces)
    browser = None
    try:
        browser = await trio.to_thread.run_sync(
            lambda: zeroconf.ServiceBrowser(zc, SERVICE_TYPE, handlers=[on_change])
        )
        names: dict[str, bool] = {}
        with trio.move_on_after(duration):
            async for name, change in receive:
                names[name] = change is not zeroconf.ServiceStateChange.Removed
        found = []
        for name, present in sorted(names.items()):
            if not present:
                continue
            info = await trio.to_thread.run_sync(zc.get_service_info, SERVICE_TYPE, name, 3000)
            if info is None:
                continue
            props = {
                (k.decode() if isinstance(k, bytes) else k): (v.decode() if isinstance(v, bytes) else v)
                for k, v in (info.properties or {}).items()
            }
            version = props.get("v")
            found.append(
                Service(
                    name=name.removesuffix("." + SERVICE_TYPE),
                    addresses=list(info.parsed_addresses()),
                    port=int(info.port or 0),
                    version=int(version) if version and version.isdigit() else None,
                    tls=props.get("tls") != "0",
                    modules=[m for m in (props.get("modules") or "").split(",") if m],
                )
            )
        return found
    finally:
        with trio.CancelScope(shield=True):
            if browser is not None:
                await trio.to_thread.run_sync(browser.cancel)
            await trio.to_thread.run_sync(zc.close)
