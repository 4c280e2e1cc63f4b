"""The `blit` command: parse arguments, call the library API, render events, exit with its code.

Thin by design: every decision lives in api/transfer; this module turns flags into Options and a
Summary into text, JSON lines or a live bar. Heavy modules (trio, rich.progress, the engine) are
imported inside the commands so that `blit --help` stays fast.

This module must not contain transfer logic or read environment variables for configuration.
"""
# No `from __future__ import annotations` here: typer evaluates string annotations with eval()
# on every start (about 10 ms for the option lists); real annotations cost almost nothing.

import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Optional

import typer

from . import entry as _entry
from .entry import EXIT_INTERRUPTED

if TYPE_CHECKING:
    from .report import Failure, Summary

app = typer.Typer(
    add_completion=False,
    rich_markup_mode=None,
    pretty_exceptions_enable=False,
    no_args_is_help=True,
    context_settings={"help_option_names": ["-h", "--help"]},
    help="Fast, exact file transfer: copy, mirror and move, locally or through a blit daemon.",
)


RUN_ENDED = False
"""A transfer command has its exit code and nothing left to clean up: the console script may end
the process at once (blit.entry)."""


def _err(msg: str) -> None:
    sys.stderr.write(f"blit: error: {shown(msg)}\n")  # one line, names escaped as -v shows them
    sys.stderr.flush()


def _write(text: str) -> bool:
    """Write to stdout; False once it is closed (a broken pipe: `blit copy -v ... | head`), and
    from then on what is still buffered goes to /dev/null (also after a terminal hung up)."""
    if _entry.STDOUT_CLOSED:  # `>&-`: as a pipe closed before the first line
        return False
    try:
        sys.stdout.write(text)
        return True
    except BrokenPipeError:
        _silence_stdout()
        return False
    except OSError:  # EIO: the terminal hung up; its SIGHUP ends the run as an interrupt
        _silence_stdout()
        return True


_END_MARK: int | None = None
"""stdout's console mark when the run's summary was about to go out (`_ending`): the bytes of
its lines (None: no console, or the run did not get there)."""


def _out(text: str) -> None:
    """A line of a run that goes on: a closed stdout ends the run with one line on stderr, like
    an interrupt, instead of a traceback. (The run's last line uses `_write`: the work is done,
    so a closed stdout only loses the line; lines lost after the work was done fail the run at
    its end, `_lines_lost`.)"""
    if not _write(text):
        from .errors import OutputClosed

        raise OutputClosed("standard output was closed (broken pipe); stopped, run the same command again to finish")


def _ending() -> None:
    """The run's work is done and its summary comes next: what stdout accepted until now are
    its lines (`-v`, `--json` events), which `_lines_lost` checks."""
    global _END_MARK
    from . import console

    _END_MARK = console.stdout_mark()


def _lines_lost(operation: str) -> bool:
    """After a run whose work is done: whether `-v` lines or `--json` events it wrote never
    reached stdout's reader, who went while they waited in the console's queue (`cp -v` then
    fails with "write error"). Says so in one line."""
    from . import console

    if not _END_MARK or not console.stdout_lost(_END_MARK):
        return False
    _err(f"standard output was closed (broken pipe) before the run's last lines were written; the {operation} itself completed")
    return True


def _flush() -> None:
    try:
        sys.stdout.flush()
    except OSError:
        _silence_stdout()


def _silence_stdout() -> None:
    """Point stdout's fd at /dev/null so no later flush (ours or the interpreter's at exit)
    fails again."""
    from .console import to_null

    to_null(sys.stdout.fileno())


_CONTROL = {c: f"\\#{c:03o}" for c in [*range(32), 127]}
_CONTROL.update({0xDC00 + b: f"\\#{b:03o}" for b in range(128, 256)})  # a byte that is not UTF-8


def shown(path: str) -> str:
    """A path on one line: control characters (a newline in a name) and bytes that are not
    UTF-8 (held as surrogate escapes) as rsync prints them, backslash, #, then three octal
    digits (`a\\#012b`, `caf\\#351`); a backslash that a name already has in
    front of `#` and three digits is itself escaped (`\\#134`), as rsync does, so the two never
    read alike."""
    if "\\#" in path:
        import re

        path = re.sub(r"\\(?=#[0-9]{3})", r"\\#134", path)
    return path.translate(_CONTROL) if not path.isprintable() else path


def _human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def _count(n: int, noun: str) -> str:
    return f"{n:,} {noun}" + ("" if n == 1 else "s")


def summary_line(s: "Summary") -> str:
    if s.strategy == "rename":  # a local move within one filesystem: mv's one rename(2)
        return f"moved {s.source} to {s.destination} with one rename in {s.duration_s:.2f} s"
    verb = {"copy": "copied", "mirror": "copied", "move": "moved"}[s.operation]
    head = "dry run: would have " + verb if s.dry_run else verb
    parts = [f"{head} {_count(s.files_copied, 'file')} ({_human_bytes(s.bytes_copied)})"]
    if s.links_created:
        parts.append(_count(s.links_created, "link"))
    if s.operation == "mirror":
        parts.append(f"deleted {s.files_deleted:,}")
    if s.operation == "move" and not s.dry_run:  # up-to-date sources go too; failed ones stay
        parts.append(f"removed {s.files_removed:,} from the source")
    parts.append(f"skipped {s.files_skipped:,}")
    if s.failures:
        parts.append(f"{len(s.failures):,} failed")
    line = ", ".join(parts) + f" in {s.duration_s:.2f} s"
    return line


def _stopping() -> bool:
    """A signal asked the run to stop: no more `-v` lines or progress events (on a terminal
    slower than the run they would go out before its last lines, and take their place)."""
    from . import console

    return console.was_interrupted()


async def _room() -> None:
    """Progress.room: wait while a reader of the output is far behind (blit.console), sleeping
    on Trio, not blocking its thread (a remote run's keepalive goes on)."""
    from . import console

    if console.behind():
        import trio

        while console.behind():
            await trio.sleep(0.05)


class TextProgress:
    """Default output: per-file failures on stderr, actions with -v or --dry-run, one summary line.

    With --progress on a terminal, a rich bar is drawn on stderr; lines for the same terminal
    are then printed above it, unwrapped (rich would cut them at its width), and lines for a
    pipe or file go there directly. The bar is taken down (and the cursor shown) however the
    run ends: `stop`."""

    def __init__(self, verbose: bool, quiet: bool, dry_run: bool, bar: bool) -> None:
        self.verbose = (verbose or dry_run) and not quiet
        self.quiet = quiet
        self.bar = None
        self.summary: Any = None  # the run's, from start()
        self.task: Any = None
        if bar and sys.stderr.isatty():  # a bar redrawn in a log file is noise (rich left a newline)
            from rich.progress import (
                BarColumn,
                DownloadColumn,
                Progress,
                TextColumn,
                TimeRemainingColumn,
                TransferSpeedColumn,
            )

            self.bar = Progress(
                TextColumn("{task.fields[files]:>9,} files"),
                BarColumn(),
                DownloadColumn(binary_units=True),
                TransferSpeedColumn(),
                TimeRemainingColumn(),
                transient=True,
                console=__import__("rich.console", fromlist=["Console"]).Console(stderr=True),
                redirect_stdout=False,  # -v lines belong on stdout (a pipe, a file), not the bar's stderr
                redirect_stderr=False,
            )

    def _above_bar(self, text: str, stream: Any) -> bool:
        """Print `text` above a live bar when `stream` is a terminal (the bar's own); False when
        there is no bar or `stream` goes elsewhere."""
        bar = self.bar
        if bar is None or not bar.live.is_started or not stream.isatty():
            return False
        bar.console.print(text, soft_wrap=True, markup=False, highlight=False, emoji=False)
        return True

    def stderr(self, line: str) -> None:
        """One line on stderr (above the bar while it is drawn)."""
        if not self._above_bar(line, sys.stderr):
            sys.stderr.write(line + "\n")
            sys.stderr.flush()

    def stop(self) -> None:
        """Take the bar down (idempotent): before the last lines of any ending."""
        if self.bar is not None and self.bar.live.is_started:
            self.bar.stop()

    def start(self, summary: "Summary") -> None:
        self.summary = summary
        if self.bar is not None:
            self.bar.start()
            self.task = self.bar.add_task("copy", total=None, files=0)

    def update(self, files: int, nbytes: int, elapsed: float) -> None:
        if self.bar is not None and self.task is not None:
            self.bar.update(self.task, completed=nbytes, files=files)

    def totals(self, files: int | None, nbytes: int) -> None:
        """The bytes the run will have copied: the bar fills and shows an ETA from here on."""
        if self.bar is not None and self.task is not None:
            self.bar.update(self.task, total=max(nbytes, 1))

    async def room(self) -> None:
        await _room()

    def action(self, action: str, path: str) -> None:
        if self.verbose and not _stopping():
            line = f"{action} {shown(path)}"
            if not self._above_bar(line, sys.stdout):
                _out(line + "\n")

    def error(self, failure: "Failure") -> None:
        self.stderr(f"blit: {shown(failure.path)}: {failure.op}: {failure.message}")

    def finish(self, summary: "Summary") -> None:
        _ending()
        self.stop()
        if summary.deletions_skipped:
            sys.stderr.write(f"blit: mirror {summary.deletions_skipped}\n")
        if summary.fatal:
            return
        if not self.quiet:
            _write(summary_line(summary) + "\n")
        _flush()


class JsonProgress:
    """--json: newline-delimited events on stdout (schemas/events.schema.json)."""

    def __init__(self, operation: str) -> None:
        import json  # only --json runs pay for it

        self._dumps = json.dumps
        self.operation = operation
        self.last = 0.0
        self.finished = False  # the summary went out (a fatal error after it adds none)
        self.files_total: int | None = None
        self.bytes_total: int | None = None
        self.summary: Any = None  # the run's, from start()

    def _emit(self, obj: dict[str, object]) -> None:
        _out(self._dumps(obj) + "\n")

    def start(self, summary: "Summary") -> None:
        self.summary = summary
        self._emit(
            {
                "event": "start",
                "operation": summary.operation,
                "source": summary.source,
                "destination": summary.destination,
                "dry_run": summary.dry_run,
            }
        )

    def update(self, files: int, nbytes: int, elapsed: float) -> None:
        if elapsed - self.last >= 0.1 and not _stopping():
            self.last = elapsed
            self._emit(
                {
                    "event": "progress",
                    "files_done": files,
                    "bytes_done": nbytes,
                    "files_total": self.files_total,
                    "bytes_total": self.bytes_total,
                    "elapsed_s": round(elapsed, 3),
                }
            )

    def totals(self, files: int | None, nbytes: int) -> None:
        self.files_total, self.bytes_total = files, nbytes

    async def room(self) -> None:
        await _room()

    def action(self, action: str, path: str) -> None:
        if not _stopping():
            self._emit({"event": "action", "action": action, "path": path})

    def error(self, failure: "Failure") -> None:
        self._emit({"event": "error", **failure.as_dict()})

    def finish(self, summary: "Summary") -> None:
        _ending()
        _write(self._dumps(summary.as_dict()) + "\n")
        _flush()
        self.finished = True


def _run(
    operation: str,
    src: str,
    dst: str,
    *,
    dry_run: bool,
    checksum: bool,
    size_only: bool,
    ignore_times: bool,
    filters: list[tuple[bool, str]],
    progress: bool,
    as_json: bool,
    verbose: bool,
    quiet: bool,
    tls: bool = True,
    force_h2_data: bool = False,
    secrets_file: Path | None = None,
) -> int:
    import signal

    import trio

    from . import api
    from .errors import BlitError, leaves
    from .plan import Compare

    from .endpoint import is_local

    # A daemon-only flag on a local run would change nothing: likely a remote endpoint mistyped.
    # (The API takes one Options for either kind of run and leaves them be.)
    daemon_only = [f for f, on in (("--no-tls", not tls), ("--force-h2-data", force_h2_data), ("--secrets-file", secrets_file is not None)) if on]
    for clash, message in (
        (sum((checksum, size_only, ignore_times)) > 1, "--checksum, --size-only and --ignore-times exclude each other"),
        (quiet and verbose, "--quiet and --verbose exclude each other"),
        (bool(daemon_only) and is_local(src) and is_local(dst),
         f"{daemon_only[0] if daemon_only else ''} is for a transfer through a daemon (HOST:/module/path); {src} and {dst} are both local"),
    ):
        if clash:
            _err(message)
            if as_json:
                _json_summary(message, 2)
            return 2
    compare = (
        Compare.CHECKSUM
        if checksum
        else Compare.SIZE_ONLY
        if size_only
        else Compare.ALWAYS
        if ignore_times
        else Compare.SIZE_MTIME
    )
    opts = api.Options(
        dry_run=dry_run,
        compare=compare,
        filters=filters,
        record_actions=verbose or dry_run,
        tls=tls,
        force_h2_data=force_h2_data,
        secrets_file=secrets_file,
    )
    rep: object = JsonProgress(operation) if as_json else TextProgress(verbose, quiet, dry_run, progress)
    outcome: dict[str, object] = {}

    _log_to(rep.stderr if isinstance(rep, TextProgress) else None)

    from . import console

    async def main() -> None:
        # SIGHUP (the terminal closed, an ssh session dropped) stops the run as Ctrl-C does, as
        # rsync's: cleaned up, exit 130; it used to kill the process where it stood.
        stops = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
        with trio.open_signal_receiver(*stops) as signals:
            console.on_signals(stops)
            if _entry.STOP_PENDING:  # it came while trio started: stop before the run begins
                outcome["interrupted"] = True
                return
            async with trio.open_nursery() as nursery:

                async def watch() -> None:
                    async for _ in signals:
                        outcome["interrupted"] = True
                        nursery.cancel_scope.cancel()
                        return

                nursery.start_soon(watch)
                try:
                    outcome["summary"] = await api.transfer(operation, src, dst, opts, rep)  # type: ignore[arg-type]
                finally:
                    nursery.cancel_scope.cancel()

    def failed(exc: BlitError) -> int:
        """One error line; with --json the summary still comes last."""
        _err(str(exc))
        if as_json and not getattr(rep, "finished", False):
            _json_summary(str(exc), exc.exit_code)
        return exc.exit_code

    from .entry import early_signals

    console.install()  # no write waits for a reader on the Trio thread
    early_signals(False)  # from here on a signal stops the run as `main` says
    try:
        try:
            trio.run(main)
        finally:  # the bar goes (the cursor shown) before any last line, however the run ended
            if isinstance(rep, TextProgress):
                rep.stop()
            # The run is over: a signal now only ends the wait for a reader of its last lines
            # (the exit code stays the run's; SIGTERM and SIGHUP killed it mid-wait).
            for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
                signal.signal(signum, lambda sig, frame: console.interrupted())
    except BlitError as exc:
        return failed(exc)
    except BaseExceptionGroup as eg:
        blit_errors = [e for e in leaves(eg) if isinstance(e, BlitError)]
        if blit_errors:
            return failed(blit_errors[0])
        raise
    except KeyboardInterrupt:
        outcome["interrupted"] = True
    started = getattr(rep, "summary", None)
    finish_with = started.finish_with if started is not None else None
    if outcome.get("interrupted") and "summary" not in outcome:
        if finish_with:  # `blit copy dir new`: run again, it would land in new/dir
            _err(f"interrupted; temporary files removed, finish with: {finish_with}")
        else:
            _err("interrupted; temporary files removed, run the same command again to finish")
        if as_json and not getattr(rep, "finished", False):
            _json_summary("interrupted", EXIT_INTERRUPTED)
        return EXIT_INTERRUPTED
    summary = outcome["summary"]
    if finish_with and summary.exit_code == 3:  # type: ignore[attr-defined]
        sys.stderr.write(f"blit: {dst} was made by this run: finish with {finish_with} (run as it was, the command would copy into a new directory inside it)\n")
    if summary.exit_code == 0 and _lines_lost(operation):  # type: ignore[attr-defined]
        return 1
    return summary.exit_code  # type: ignore[attr-defined,no-any-return]


def _json_summary(message: str, code: int) -> None:
    """--json: the last line is always a summary, also of a run that never began or ended."""
    import json

    _write(json.dumps({"event": "summary", "fatal": message, "exit_code": code}) + "\n")


def _log_to(line: Callable[[str], None] | None) -> None:
    """What blit's modules log during a transfer (warnings: a certificate pinned on first use)
    becomes `blit: message` lines on stderr, through `line` (above a progress bar) if given."""
    import logging

    class Handler(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            text = f"blit: {record.getMessage()}"
            if line is not None:
                line(text)
            else:
                sys.stderr.write(text + "\n")

    root = logging.getLogger("blit")
    root.handlers[:] = [Handler(logging.WARNING)]
    root.propagate = False


def _filters_in_order(ctx: typer.Context) -> list[tuple[bool, str]]:
    """--include/--exclude keep their relative order from the command line."""
    out: list[tuple[bool, str]] = []
    argv = sys.argv[1:]
    i = 0
    while i < len(argv):
        a = argv[i]
        for flag, inc in (("--exclude", False), ("--include", True)):
            if a == flag and i + 1 < len(argv):
                out.append((inc, argv[i + 1]))
                i += 1
            elif a.startswith(flag + "="):
                out.append((inc, a[len(flag) + 1 :]))
        i += 1
    return out


def _transfer_command(operation: str, doc: str):  # type: ignore[no-untyped-def]
    def command(
        ctx: typer.Context,
        src: Annotated[str, typer.Argument(help="Source path (trailing / = its contents).")],
        dst: Annotated[str, typer.Argument(help="Destination path.")],
        dry_run: Annotated[bool, typer.Option("--dry-run", "-n", help="Change nothing; list what would be done.")] = False,
        checksum: Annotated[bool, typer.Option("--checksum", "-c", help="Compare equal-size files by content hash.")] = False,
        size_only: Annotated[bool, typer.Option("--size-only", help="Skip files whose size matches.")] = False,
        ignore_times: Annotated[bool, typer.Option("--ignore-times", "-I", help="Copy every file.")] = False,
        exclude: Annotated[Optional[list[str]], typer.Option("--exclude", help="Leave out entries matching GLOB (repeatable).", metavar="GLOB")] = None,
        include: Annotated[Optional[list[str]], typer.Option("--include", help="Keep entries matching GLOB (repeatable; first match wins).", metavar="GLOB")] = None,
        progress: Annotated[bool, typer.Option("--progress", help="Live progress bar on stderr.")] = False,
        as_json: Annotated[bool, typer.Option("--json", help="Newline-delimited JSON events on stdout.")] = False,
        verbose: Annotated[bool, typer.Option("--verbose", "-v", help="One line per entry changed.")] = False,
        quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Print nothing on success.")] = False,
        no_tls: Annotated[bool, typer.Option("--no-tls", help="Remote: talk cleartext to a daemon run with --no-tls.")] = False,
        force_h2_data: Annotated[bool, typer.Option("--force-h2-data", help="Remote: carry file data over HTTP/2 (testing).")] = False,
        secrets_file: Annotated[Optional[Path], typer.Option("--secrets-file", help="Remote, user@host:...: the file with the user's secret (mode 600).", metavar="FILE")] = None,
    ) -> None:
        filters = _filters_in_order(ctx)
        if len(filters) != len(exclude or []) + len(include or []):
            filters = [(False, p) for p in exclude or []] + [(True, p) for p in include or []]
        code = _run(
            operation,
            src,
            dst,
            dry_run=dry_run,
            checksum=checksum,
            size_only=size_only,
            ignore_times=ignore_times,
            filters=filters,
            progress=progress,
            as_json=as_json,
            verbose=verbose,
            quiet=quiet,
            tls=not no_tls,
            force_h2_data=force_h2_data,
            secrets_file=secrets_file,
        )
        global RUN_ENDED
        RUN_ENDED = True
        raise typer.Exit(code)

    command.__doc__ = doc
    command.__name__ = operation
    return command


app.command("copy")(_transfer_command("copy", "Copy SRC to DST (rsync -a semantics; atomic writes)."))
app.command("mirror")(
    _transfer_command("mirror", "Make DST identical to SRC: copy, then delete DST entries absent from SRC.")
)
app.command("move")(
    _transfer_command("move", "Copy SRC to DST, confirm the data landed, then remove the source entries.")
)


def _version_callback(value: bool) -> None:
    if value:
        from . import __version__

        print(f"blit {__version__}")
        raise typer.Exit(0)


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version_callback, is_eager=True, help="Print the version.")
    ] = False,
) -> None:
    """Fast, exact file transfer: copy, mirror and move, locally or through a blit daemon."""


try:  # the daemon, scan and list commands (they import their heavy modules lazily)
    from .cli_remote import register as _register_remote
except ImportError:  # pragma: no cover - during development of the remote side
    pass
else:
    _register_remote(app)


def _app_for(argv: list[str]) -> typer.Typer:
    """The app to run for `argv`: for `blit NAME ...` a copy of `app` holding only command NAME
    (typer makes a click command of every registered command at each start, reading its
    signature and options: about 2 ms a command), else `app` itself."""
    for info in app.registered_commands:
        if argv and info.name == argv[0]:
            import copy

            one = copy.copy(app)
            one.registered_commands = [info]
            return one
    return app


def main() -> None:
    """Entry point: click's usage errors become one line and exit 2, like every other error."""
    from typer import exceptions as typer_exc
    from typer._click import exceptions as click_exc  # typer vendors click (pinned <0.29)

    try:
        code = _app_for(sys.argv[1:])(standalone_mode=False)
    except click_exc.UsageError as exc:
        if exc.format_message().startswith("Usage:"):  # `blit` alone: the help, as usage
            sys.stderr.write(exc.format_message() + "\n")
            raise SystemExit(2) from None
        hint = f" (see '{exc.ctx.command_path} --help')" if exc.ctx is not None else ""
        _err(exc.format_message() + hint)
        argv = sys.argv[1:]
        if argv and argv[0] in ("copy", "mirror", "move") and "--json" in argv:
            _json_summary(exc.format_message(), 2)  # also of a command line the parser refused
            _flush()
        raise SystemExit(2) from None
    except typer_exc.Abort:
        raise SystemExit(EXIT_INTERRUPTED) from None
    except click_exc.ClickException as exc:
        _err(exc.format_message())
        raise SystemExit(exc.exit_code) from None
    except BrokenPipeError:  # a listing piped into `head`: its reader has what it wanted
        _silence_stdout()
        raise SystemExit(1) from None
    raise SystemExit(code if isinstance(code, int) else 0)
