"""What a run reports: the Summary, per-file failures, the Progress interface, exit codes.

Renderers (plain text, JSON lines, rich bar) live in the CLI; the engine only calls a Progress
(local runs and remote ones alike, through `tick`). This module must not print or do I/O.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

TICK = 0.1
"""Seconds between progress updates: at most 10 a second."""


def nothing_deleted(source_dirs: int, dest_dirs: int, kept: int) -> str:
    """Why a mirror deleted nothing (Summary.deletions_skipped), local and remote alike:
    `source_dirs` source directories not read whole, `dest_dirs` destination directories that
    could not be opened or scanned (either may hide entries that are no extras), `kept`
    destination entries that would have gone."""
    why = []
    if source_dirs:
        why.append(f"{source_dirs} source director{'y' if source_dirs == 1 else 'ies'} could not be read completely")
    if dest_dirs:
        why.append(f"{dest_dirs} destination director{'y' if dest_dirs == 1 else 'ies'} could not be read")
    return f"deleted nothing: {' and '.join(why)} ({kept} destination entr{'y' if kept == 1 else 'ies'} kept)"


@dataclass(slots=True)
class Failure:
    path: str
    op: str
    message: str

    def as_dict(self) -> dict[str, str]:
        return {"path": self.path, "op": self.op, "message": self.message}


@dataclass(slots=True)
class Summary:
    """The outcome of a transfer. `exit_code` follows docs/cli.md."""

    operation: str = "copy"
    source: str = ""
    destination: str = ""
    dry_run: bool = False
    files_copied: int = 0
    bytes_copied: int = 0
    files_deleted: int = 0
    files_skipped: int = 0
    dirs_created: int = 0
    links_created: int = 0
    files_removed: int = 0  # move: source entries removed
    entries_seen: int = 0
    failures: list[Failure] = field(default_factory=list)
    deletions_skipped: str | None = None  # why mirror deleted nothing
    fatal: str | None = None
    strategy: str = ""
    duration_s: float = 0.0
    predicted_s: float | None = None
    fatal_code: int = 1
    """The exit code of a fatal run: 1, or 2 when a remote run's request was refused as bad usage."""
    counts_known: bool = True
    """False when a run stopped by a fatal error cannot vouch for its counts (a push or a remote
    to remote run: the destination daemon held them); the JSON summary then leaves them out."""
    finish_with: str | None = None
    """Set when a directory SRC lands as a DST this run creates (`blit copy dir new`): once DST
    exists the same command would copy into DST/SRC, so a run that stops early names the
    command that finishes it (`blit copy dir/ new/`). Not part of the JSON summary."""

    @property
    def exit_code(self) -> int:
        if self.fatal:
            return self.fatal_code
        if self.failures or self.deletions_skipped:
            return 3
        return 0

    def as_dict(self) -> dict[str, object]:
        out = self._as_dict()
        if not self.counts_known:
            for key in _COUNTS:
                del out[key]
        return out

    def _as_dict(self) -> dict[str, object]:
        return {
            "event": "summary",
            "operation": self.operation,
            "source": self.source,
            "destination": self.destination,
            "files_copied": self.files_copied,
            "bytes_copied": self.bytes_copied,
            "files_deleted": self.files_deleted,
            "files_skipped": self.files_skipped,
            "dirs_created": self.dirs_created,
            "links_created": self.links_created,
            "files_removed": self.files_removed,
            "entries_seen": self.entries_seen,
            "failures": [f.as_dict() for f in self.failures],
            "deletions_skipped": self.deletions_skipped,
            "fatal": self.fatal,
            "strategy": self.strategy,
            "duration_s": round(self.duration_s, 6),
            "predicted_s": self.predicted_s,
            "dry_run": self.dry_run,
            "exit_code": self.exit_code,
        }


_COUNTS = ("files_copied", "bytes_copied", "files_deleted", "files_skipped", "dirs_created",
           "links_created", "files_removed", "entries_seen")


class Progress(Protocol):
    """Receives a run's events. Called from the Trio thread only; must not block."""

    def start(self, summary: Summary) -> None: ...
    def update(self, files: int, nbytes: int, elapsed: float) -> None: ...
    # Optional: `totals(files, nbytes)`, called once when the run knows how many entries it
    # will have handled (None when it cannot say: a remote run) and how many bytes it will have
    # copied in all (once every directory is planned), before the updates that follow.
    # Optional: `async room()`, awaited by a remote run after each page of actions: returns
    # once the output can take more (its reader is not far behind), so that the lines wait
    # without the Trio thread waiting (the session's keepalive goes on).
    def action(self, action: str, path: str) -> None: ...
    def error(self, failure: Failure) -> None: ...
    def finish(self, summary: Summary) -> None: ...


class NullProgress:
    def start(self, summary: Summary) -> None:
        pass

    def update(self, files: int, nbytes: int, elapsed: float) -> None:
        pass

    def action(self, action: str, path: str) -> None:
        pass

    def error(self, failure: Failure) -> None:
        pass

    def finish(self, summary: Summary) -> None:
        pass


async def tick(
    progress: Progress, counts: Callable[[], tuple[int, int]], t0: float, totals: Callable[[], tuple[int | None, int] | None] | None = None
) -> None:
    """Report `counts()` (files done, bytes done) to `progress` every TICK seconds while they
    change, until cancelled (run it beside the transfer in a nursery), and `totals()` once it
    is known (progress.totals, if it has it). Trio."""
    import time

    import trio

    last = (-1, -1)
    told = getattr(progress, "totals", None) is None or totals is None
    while True:
        await trio.sleep(TICK)
        if not told:
            assert totals is not None
            known = totals()
            if known is not None:
                told = True
                progress.totals(*known)  # type: ignore[attr-defined]
        cur = counts()
        if cur != last:
            last = cur
            progress.update(cur[0], cur[1], time.perf_counter() - t0)


def finish_command(operation: str, src: str, dst: str) -> str:
    """The command that lands a directory SRC's contents in DST, quoted for a shell."""
    import shlex

    return f"blit {operation} {shlex.quote(src.rstrip('/') + '/')} {shlex.quote(dst.rstrip('/') + '/')}"

