"""The `blit` console script: start the prefetch (blit.prefetch) before the heavy imports, hand
over to the typer CLI, and end the process as soon as a transfer command has its exit code. It must
stay this small: everything it imports delays every command.

The garbage collector is off while the CLI imports (tens of thousands of long-lived objects,
no garbage cycles), then what exists is frozen (gc.freeze: never scanned again) and the
collector is back on: the collections that the later imports (trio, the engine) and the run
trigger scan only what came after. About 7 ms of CPU of a remote run. The youngest generation
then holds 20,000 objects instead of 700 (GC_THRESHOLD).

Ending a transfer command with os._exit (after flushing stdout, stderr and the log handlers)
skips the interpreter's teardown, which frees every object of the ~330 modules a remote run
imports one by one: 20-40 ms of a 0.25 s run, with nothing left to do (the run's files are
closed and its temporary names removed before the command returns). Any other command, an
unexpected exception or a failed flush (a closed pipe) takes Python's normal exit.
"""

from __future__ import annotations

import sys


GC_THRESHOLD = (20_000, 10, 10)
"""The collector's generation thresholds for every command. A transfer allocates a few
short-lived tuples per file; with Python's default (700 allocations) a 100,000-file push made
the daemon run 676 young, 61 middle and 5 full collections, 0.13 s of its 2.7 s of CPU."""


EXIT_INTERRUPTED = 130
"""Exit code of an interrupted run (SIGINT, SIGTERM or SIGHUP), here and in the CLI (docs/cli.md)."""


def _interrupted_early(signum: int, frame: object) -> None:
    """SIGINT, SIGTERM or SIGHUP before a command's own handling starts (imports, argument parsing):
    nothing has been written yet, so the process ends at once. A KeyboardInterrupt raised in
    the middle of an import left tracebacks, a wrong exit code, and now and then a process
    stuck for good on the import lock (QA pass: 3 of 80 Ctrl-C in the first 0.15 s)."""
    import os

    if "--json" in sys.argv[2:] and sys.argv[1:2] in (["copy"], ["mirror"], ["move"]):
        # --json: the last line is always a summary (cli.json_summary's shape)
        os.write(1, b'{"event": "summary", "fatal": "interrupted", "exit_code": 130}\n')
    os.write(2, b"blit: interrupted\n")
    os._exit(EXIT_INTERRUPTED)


STOP_PENDING = 0
"""SIGTERM or SIGHUP that came after `early_signals(False)` and before the run's own handling
began (trio's start-up): the run stops as soon as it looks (cli._run's `main`)."""


def _stop_pending(signum: int, frame: object) -> None:
    global STOP_PENDING
    STOP_PENDING = signum


def early_signals(on: bool) -> None:
    """Install (`on`) or take back the early handlers. A command that writes takes them back
    just before its own handling begins (cli._run, before trio.run: trio guards against
    KeyboardInterrupt only if SIGINT has Python's default handler then). SIGTERM and SIGHUP
    are then recorded (STOP_PENDING) until the run's handling replaces that: with their default
    action, one in those milliseconds killed the process silently (exit -15, CI)."""
    import signal

    signal.signal(signal.SIGINT, _interrupted_early if on else signal.default_int_handler)
    signal.signal(signal.SIGTERM, _interrupted_early if on else _stop_pending)
    signal.signal(signal.SIGHUP, _interrupted_early if on else _stop_pending)


STDOUT_CLOSED = False
"""The caller closed stdout (`blit copy -v ... >&-`): a line for it is a closed pipe's (cli._write)."""


def _std_fds() -> None:
    """Standard fds the caller closed (`>&-`) get /dev/null, so that no file the run opens takes
    their number (a line for stdout would land in it), and Python's None streams become
    streams on them (a traceback from the first line written)."""
    import os

    global STDOUT_CLOSED
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            null = os.open(os.devnull, os.O_RDWR)
            if null != fd:
                os.dup2(null, fd)
                os.close(null)
            if fd == 1:
                STDOUT_CLOSED = True
    if sys.stdout is None:
        sys.stdout = open(1, "w", closefd=False)  # noqa: SIM115
    if sys.stderr is None:
        sys.stderr = open(2, "w", closefd=False)  # noqa: SIM115


def main() -> None:
    import gc

    _std_fds()
    early_signals(True)
    gc.disable()
    from . import prefetch

    prefetch.start(sys.argv[1:])
    from . import cli

    gc.freeze()
    gc.set_threshold(*GC_THRESHOLD)
    gc.enable()
    try:
        cli.main()
    except SystemExit as exc:
        if cli.RUN_ENDED and isinstance(exc.code, int):
            _exit_now(exc.code)
        raise


def _exit_now(code: int) -> None:
    """os._exit(code) once everything written is out; returns if it cannot be flushed."""
    import os

    try:
        if "logging" in sys.modules:
            sys.modules["logging"].shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        if "blit.console" in sys.modules:  # what a run's output queued (cli._run)
            sys.modules["blit.console"].drain()
    except BaseException:
        return
    os._exit(code)
