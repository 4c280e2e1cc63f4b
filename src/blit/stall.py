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
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Any, TypeVar

import trio

from .errors import StallError

T = TypeVar("T")


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


async def run_stoppable(fn: Callable[..., T], *args: Any, stop: Callable[[], None], limiter: trio.CapacityLimiter | None = None) -> T:
    """`fn(*args)` in a worker thread that may not be abandoned (it holds file descriptors the
    caller closes afterwards: a thread left behind could act on a reused number), but that
    must end soon when the caller is cancelled (Ctrl-C, a client gone): `stop()` then asks it
    to (it sets a flag `fn` checks between steps), the wait goes on until `fn` returns, and
    the cancellation is raised then. A mirror's deletions run this way."""
    async with trio.open_nursery() as nursery:

        async def on_cancel() -> None:
            try:
                await trio.sleep_forever()
            finally:
                if not finished:
                    stop()

        finished = False
        error: BaseException | None = None
        nursery.start_soon(on_cancel)
        with trio.CancelScope(shield=True):
            try:
                result = await trio.to_thread.run_sync(fn, *args, limiter=limiter)
            except BaseException as exc:  # raised as it is, not inside the nursery's group
                error = exc
            finally:
                finished = True
        nursery.cancel_scope.cancel()
    if error is not None:
        raise error
    return result
