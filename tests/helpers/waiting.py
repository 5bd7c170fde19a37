"""Polling until a condition holds: the one waiting helper of the tests (sync and async flavours).

Both take the same arguments, ``(predicate, what, timeout, *, interval, retry_on)``:

- ``predicate()`` is called every ``interval`` seconds until it returns something truthy, which is
  returned; ``wait_for_async`` also awaits it when it returns an awaitable.
- After ``timeout`` seconds an ``AssertionError`` names ``what``, the timeout and the last value seen.
- An exception of a type in ``retry_on`` counts as "not yet" (and is the last value); any other
  exception propagates at once.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Callable
from typing import Any

Retry = tuple[type[BaseException], ...]


def _gave_up(what: str, timeout: float, last: object) -> AssertionError:
    return AssertionError(f"gave up after {timeout:g} s waiting for {what} (last: {last!r})")


def wait_for(predicate: Callable[[], Any], what: str = "condition", timeout: float = 30.0, *,
             interval: float = 0.05, retry_on: Retry = ()) -> Any:
    """Block until ``predicate()`` is truthy and return its value (see the module docstring)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            last = predicate()
            if last:
                return last
        except retry_on as e:
            last = e
        if time.monotonic() > deadline:
            raise _gave_up(what, timeout, last)
        time.sleep(interval)


async def wait_for_async(predicate: Callable[[], Any], what: str = "condition", timeout: float = 30.0, *,
                         interval: float = 0.05, retry_on: Retry = ()) -> Any:
    """``wait_for`` on the running event loop: sleeps with ``asyncio.sleep``; an awaitable result is awaited."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            last = predicate()
            if inspect.isawaitable(last):
                last = await last
            if last:
                return last
        except retry_on as e:
            last = e
        if time.monotonic() > deadline:
            raise _gave_up(what, timeout, last)
        await asyncio.sleep(interval)
