"""StallGuard: a cancel scope whose deadline moves forward on every unit of progress.

    with StallGuard("copy of big.iso", seconds=60) as guard:
        while ...:
            await trio.to_thread.run_sync(copy_chunk, abandon_on_cancel=True)
            guard.progress()

If `seconds` pass without `progress()`, the body is cancelled and StallError is raised, just as
`trio.fail_after` raises TooSlowError. A worker thread cannot be cancelled: with
`abandon_on_cancel=True` the task gives up on it (the thread stays stuck on the hung syscall and
its result is dropped); that is the price of not hanging forever.

This module must not do I/O.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from types import TracebackType

import trio

from .errors import StallError


@dataclass(frozen=True)
class Timeouts:
    """stall: seconds without progress before a file operation is reported as stalled."""

    stall: float = 60.0


class StallGuard:
    def __init__(self, what: str, seconds: float) -> None:
        self.what = what
        self.seconds = seconds
        self._scope = trio.CancelScope()

    def progress(self) -> None:
        self._scope.deadline = trio.current_time() + self.seconds

    def __enter__(self) -> StallGuard:
        self._scope.__enter__()
        if math.isfinite(self.seconds):
            self.progress()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool:
        handled = self._scope.__exit__(exc_type, exc, tb)
        if self._scope.cancelled_caught:
            raise StallError(self.what, self.seconds)
        return bool(handled)
