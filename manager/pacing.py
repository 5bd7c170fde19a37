"""`Pacer`: how long a leader's control loop (orchestrators, task reaper, allocator, scheduler) pauses
between two passes over the store."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator


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
