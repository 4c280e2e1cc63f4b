"""The remote commands of `blit`: `daemon`, `scan` and `list`.

`register(app)` adds them to the main typer app (cli.py calls it). The commands only collect
arguments and call one private `_run_*` function; trio, h2, cbor2 and zeroconf are imported
inside those, so `blit --help` stays light. `python -m blit.cli_remote ...` runs them alone.

This module must not hold protocol or daemon logic.
"""
# No `from __future__ import annotations` here: typer evaluates string annotations with eval()
# on every start (about 10 ms for the option lists); real annotations cost almost nothing.

import sys
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from .errors import BlitError


def _fail(exc: BlitError) -> typer.Exit:
    from .cli import shown

    typer.echo(f"blit: error: {shown(str(exc))}", err=True)  # one line, names escaped as -v shows them
    return typer.Exit(code=exc.exit_code)


def _need_stdout(what: str) -> None:
    """A command whose output is the point (`scan`, `list`) refuses a stdout the caller closed
    (`>&-`, reopened on /dev/null by entry._std_fds): ls says "write error" and exits 2; this
    says so before asking anyone anything, exit 1."""
    from . import entry
    from .errors import OutputClosed

    if entry.STDOUT_CLOSED:
        raise _fail(OutputClosed(f"standard output is closed: nowhere to write {what}"))


def _blit_error(exc: BaseException) -> BlitError | None:
    """The BlitError in `exc`, unwrapping trio's exception groups; None if there is none."""
    if isinstance(exc, BlitError):
        return exc
    if isinstance(exc, BaseExceptionGroup):
        for sub in exc.exceptions:
            found = _blit_error(sub)
            if found is not None:
                return found
    return None


def _setup_logging(verbose: int, *, daemon: bool) -> None:
    import logging

    level = logging.DEBUG if verbose > 1 else logging.INFO if (verbose or daemon) else logging.WARNING
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        logging.Formatter("%(asctime)s %(name)s %(levelname)s: %(message)s" if daemon else "blit: %(message)s")
    )
    root = logging.getLogger("blit")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False


def register(app: typer.Typer) -> None:
    """Add `daemon`, `scan` and `list` to `app`."""

    @app.command("daemon")
    def daemon(
        config: Annotated[Optional[Path], typer.Option("--config", help="TOML config file ([daemon], [[module]]).")] = None,
        root: Annotated[Optional[Path], typer.Option("--root", help="Export DIR as the root (host://path).")] = None,
        bind: Annotated[Optional[str], typer.Option("--bind", help="Address to listen on (default: all).")] = None,
        port: Annotated[Optional[int], typer.Option("--port", help="Control port (default 9031; data port +1).", min=0, max=65535)] = None,
        no_mdns: Annotated[bool, typer.Option("--no-mdns", help="Do not advertise on mDNS.")] = False,
        force_h2_data: Annotated[
            bool, typer.Option("--force-h2-data", help="Carry all data over HTTP/2 (testing).")
        ] = False,
        no_tls: Annotated[
            bool, typer.Option("--no-tls", help="Serve without TLS (tests and benchmarks on trusted links only).")
        ] = False,
        verbose: Annotated[int, typer.Option("--verbose", "-v", count=True, help="More log output.")] = 0,
    ) -> None:
        """Run the blit daemon in the foreground until SIGINT, SIGTERM or SIGHUP."""
        _run_daemon(
            config,
            root=root,
            bind=bind,
            port=port,
            mdns=False if no_mdns else None,
            force_h2_data=True if force_h2_data else None,
            tls=False if no_tls else None,
            verbose=verbose,
        )

    @app.command("scan")
    def scan(
        wait: Annotated[float, typer.Option("--wait", help="Seconds to listen for answers.")] = 3.0,
        json_out: Annotated[bool, typer.Option("--json", help="One JSON object per daemon.")] = False,
    ) -> None:
        """Find blit daemons on the local network (mDNS)."""
        _need_stdout("the daemons found")
        _run_scan(wait, json_out)

    @app.command("list")
    def list_(
        target: Annotated[str, typer.Argument(help="HOST (its modules) or HOST:/module/path (entries).")],
        json_out: Annotated[bool, typer.Option("--json", help="One JSON object per line.")] = False,
        no_tls: Annotated[bool, typer.Option("--no-tls", help="The daemon runs without TLS.")] = False,
        secrets_file: Annotated[
            Optional[Path], typer.Option("--secrets-file", help="user@HOST:/module: the file with the user's secret.", metavar="FILE")
        ] = None,
        verbose: Annotated[int, typer.Option("--verbose", "-v", count=True)] = 0,
    ) -> None:
        """List a daemon's modules, or the entries of a remote directory."""
        _need_stdout("the listing")
        _run_list(target, json_out=json_out, tls_enabled=not no_tls, verbose=verbose, secrets_file=secrets_file)


# =================================================================================================


def _run_daemon(config: Path | None, *, verbose: int, **overrides: Any) -> None:
    from . import console

    console.install(drop=True)  # a log nobody reads never stops the daemon: lines dropped, counted
    _setup_logging(verbose, daemon=True)
    from .daemon.config import load_config

    try:
        cfg = load_config(config, **overrides)
    except BlitError as exc:
        raise _fail(exc) from None
    import gc
    import logging
    import os
    import signal
    import threading

    import trio

    from .daemon import serve

    log = logging.getLogger("blit.daemon")

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            # SIGHUP (its terminal closed) stops it cleanly too, rather than killing it mid-write.
            stops = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
            # What the receiver puts back when it ends, and gets the signals it has not handed
            # out: ignored, since the daemon is stopping by then (entry.py's start-up handler
            # would end it at once with exit 130, before the clean stop; CI saw a SIGTERM and a
            # second stop signal after a SIGSTOP do that).
            for stop in stops:
                signal.signal(stop, signal.SIG_IGN)
            with trio.open_signal_receiver(*stops) as signals:
                console.on_signals(stops)
                await nursery.start(serve, cfg)
                gc.freeze()  # what start-up built lives as long as the daemon: never scanned again
                async for signum in signals:
                    log.info("%s received: stopping", signal.Signals(signum).name)
                    # Belt and braces: a clean stop takes well under a second; never hang.
                    def force_exit() -> None:
                        log.error("forced exit after 4.5 s")
                        console.drain()
                        os._exit(1)

                    timer = threading.Timer(4.5, force_exit)
                    timer.daemon = True
                    timer.start()
                    nursery.cancel_scope.cancel()
                    break

    try:
        trio.run(main)
    except BaseException as exc:
        err = _blit_error(exc)
        if err is None:
            raise
        raise _fail(err) from None
    log.info("stopped")


def _run_scan(wait: float, json_out: bool) -> None:
    import trio

    from . import discovery

    found = trio.run(discovery.browse, wait)
    if json_out:
        import json

        for s in found:
            typer.echo(
                json.dumps(
                    {
                        "name": s.name,
                        "addresses": s.addresses,
                        "port": s.port,
                        "version": s.version,
                        "tls": s.tls,
                        "modules": s.modules,
                    }
                )
            )
        return
    if not found:
        typer.echo("no blit daemon answered", err=True)
        return
    for s in found:
        addr = f"[{s.host}]" if ":" in s.host else s.host
        typer.echo(f"{s.name}\t{addr}:{s.port}\tv{s.version}\t{'tls' if s.tls else 'no-tls'}\t{','.join(s.modules)}")


def _run_list(target: str, *, json_out: bool, tls_enabled: bool, verbose: int, secrets_file: Path | None = None) -> None:
    _setup_logging(verbose, daemon=False)
    from .credentials import client_credentials
    from .endpoint import HostSpec, parse_listing_target

    try:
        what = parse_listing_target(target)
        creds = None if isinstance(what, HostSpec) else client_credentials(what.user, what.host.host, what.module, secrets_file)
    except BlitError as exc:
        raise _fail(exc) from None
    import trio

    from .transport.client import open_session

    async def main() -> list[dict[str, Any]]:
        host = what if isinstance(what, HostSpec) else what.host
        async with open_session(host, tls_enabled=tls_enabled) as s:
            if isinstance(what, HostSpec):
                mods = await s.modules()
                rows: list[dict[str, Any]] = []
                if mods.root:
                    rows.append({"module": "", "comment": "(root export: host://path)", "read_only": mods.root_read_only})
                rows += [{"module": m.name, "comment": m.comment, "read_only": m.read_only} for m in mods.modules]
                return rows
            if creds is not None:
                await s.authenticate(what.module, *creds)
            path = what.path_bytes
            entry = await s.stat(what.module, path)
            if entry is None:
                from .errors import RemoteError

                raise RemoteError("not-found", f"{what}: no such file or directory")
            if what.trailing_slash and entry.kind != "dir":  # as a transfer's `SRC/` (and ls)
                from .errors import UsageError
                from .transport.remote import not_dir, side_kind

                raise UsageError(f"{what} is {not_dir(side_kind(entry) or 'other')}")
            if entry.kind == "dir":
                entries = await s.list_dir(what.module, path)
            else:
                entries = [entry]
            return [
                {
                    "name": e.name.decode("utf-8", "surrogateescape"),
                    "kind": e.kind,
                    "size": e.size,
                    "mtime_ns": e.mtime_ns,
                    "mode": e.mode,
                    **({"target": e.target.decode("utf-8", "surrogateescape")} if e.target is not None else {}),
                }
                for e in entries
            ]

    try:
        rows = trio.run(main)
    except BaseException as exc:
        err = _blit_error(exc)
        if err is None:
            raise
        raise _fail(err) from None
    if json_out:
        import json

        for r in rows:
            typer.echo(json.dumps(r))
        return
    if isinstance(what, HostSpec):
        width = max((len(r["module"]) for r in rows), default=0)
        for r in rows:
            name = r["module"] or "/"
            flag = " (read-only)" if r["read_only"] else ""
            typer.echo(f"{name:<{width}}  {r['comment']}{flag}".rstrip())
        return
    import stat as stat_mod
    import time

    from .cli import shown

    def text(name: str) -> str:  # control characters and bytes that are not UTF-8: \#NNN, as -v shows them
        return shown(name)

    for r in rows:
        mode = stat_mod.filemode(r["mode"])
        when = time.strftime("%Y-%m-%d %H:%M", time.localtime(r["mtime_ns"] / 1e9))
        suffix = f" -> {text(r['target'])}" if "target" in r else ""
        typer.echo(f"{mode} {r['size']:>14,} {when} {text(r['name'])}{suffix}")


def main() -> None:
    app = typer.Typer(add_completion=False, rich_markup_mode=None, pretty_exceptions_enable=False)
    register(app)
    app()


if __name__ == "__main__":
    main()
