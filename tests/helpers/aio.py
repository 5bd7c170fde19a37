"""Running a coroutine from a synchronous test."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

T = TypeVar("T")

#: The bound of the manager's control-loop tests (orchestrators, scheduler, key manager): a loop that
#: never converges fails the test with a TimeoutError instead of waiting for pytest-timeout.
LOOP_BOUND = 60.0


def run(coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
    """``asyncio.run(coro)`` on a fresh loop; with ``timeout`` (seconds), cancel it then and raise TimeoutError."""
    if timeout is None:
        return asyncio.run(coro)

    async def bounded() -> T:
        async with asyncio.timeout(timeout):
            return await coro

    return asyncio.run(bounded())


def run_bounded(coro: Coroutine[Any, Any, T]) -> T:
    """``run(coro, timeout=LOOP_BOUND)``."""
    return run(coro, LOOP_BOUND)


def aiotest(fn: Callable[..., Coroutine[Any, Any, T]]) -> Callable[..., T]:
    """Decorator: the async test function runs on a fresh event loop (no pytest plugin needed)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> T:
        return asyncio.run(fn(*args, **kwargs))

    return wrapper


async def cancel_and_wait(*tasks: asyncio.Task[Any]) -> None:
    """Cancel `tasks` and wait until each has ended (a CancelledError of theirs is expected)."""
    for t in tasks:
        t.cancel()
    for t in tasks:
        try:
            await t
        except asyncio.CancelledError:
            pass

