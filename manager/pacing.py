"""`Pacer`: how long a leader's control loop (orchestrators, task reaper, allocator, scheduler) pauses
between two passes over the store; `start_paced`: the loops of a new leader start one after
another by the same rule."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Coroutine, Iterable, Iterator
from typing import Any


class Pacer:
    """The pause of a control loop between two passes: its `debounce`, or as long as its last pass
    took (up to MAX_PAUSE s) when that was longer. A pass that reads the whole store (every task of a
    large service, every task of the cluster) then takes at most about half of the manager's event
    loop while events keep coming (a fleet's status reports, nodes going down), leaving the other
    half to the sessions and heartbeats it serves; a small cluster's passes take milliseconds and
    keep the debounce."""

    MAX_PAUSE = 2.0

    def __init__(self, debounce: float) -> None:
        self.debounce = debounce
        self.last = 0.0

    @contextlib.contextmanager
    def timing(self) -> Iterator[None]:
        """Times one pass."""
        t0 = time.monotonic()
        try:
            yield
        finally:
            self.last = time.monotonic() - t0

    def pause(self) -> float:
        return max(self.debounce, min(self.MAX_PAUSE, self.last))


async def start_paced(tg: asyncio.TaskGroup, coros: Iterable[tuple[str, Coroutine[Any, Any, Any]]]) -> None:
    """Start each named coroutine as a task of `tg`, in order, the next one after a pause as long as
    the first step of the one before took (up to `Pacer.MAX_PAUSE`): a new leader's loops each begin
    with a pass over the whole store (at 20,000 tasks, a second or more of the event loop), and the
    sessions and heartbeats of a fleet reconnecting to it get their share in between. Loops whose
    first step takes milliseconds start as good as at once."""
    for name, coro in coros:
        t0 = time.monotonic()
        tg.create_task(coro, name=name)
        await asyncio.sleep(0)  # it runs up to its first wait
        await asyncio.sleep(min(Pacer.MAX_PAUSE, time.monotonic() - t0))
