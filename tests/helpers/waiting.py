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
from dataclasses import dataclass
from typing import Any

Retry = tuple[type[BaseException], ...]


@dataclass
class _Retried:
    """An exception of ``retry_on``: not yet, and the last value seen."""

    error: BaseException

    def __repr__(self) -> str:
        return repr(self.error)


def _held(value: object) -> bool:
    return bool(value) and not isinstance(value, _Retried)


class _Deadline:
    def __init__(self, what: str, timeout: float) -> None:
        self.what, self.timeout = what, timeout
        self.end = time.monotonic() + timeout

    def check(self, last: object) -> None:
        """Raise the AssertionError naming ``what`` once the timeout has passed."""
        if time.monotonic() > self.end:
            raise AssertionError(f"gave up after {self.timeout:g} s waiting for {self.what} (last: {last!r})")


def _attempt(predicate: Callable[[], Any], retry_on: Retry) -> Any:
    try:
        return predicate()
    except retry_on as e:
        return _Retried(e)


async def _attempt_async(predicate: Callable[[], Any], retry_on: Retry) -> Any:
    try:
        got = predicate()
        return await got if inspect.isawaitable(got) else got
    except retry_on as e:
        return _Retried(e)


def wait_for(predicate: Callable[[], Any], what: str = "condition", timeout: float = 30.0, *,
             interval: float = 0.05, retry_on: Retry = ()) -> Any:
    """Block until ``predicate()`` is truthy and return its value (see the module docstring)."""
    deadline = _Deadline(what, timeout)
    while not _held(last := _attempt(predicate, retry_on)):
        deadline.check(last)
        time.sleep(interval)
    return last


async def wait_for_async(predicate: Callable[[], Any], what: str = "condition", timeout: float = 30.0, *,
                         interval: float = 0.05, retry_on: Retry = ()) -> Any:
    """``wait_for`` on the running event loop: sleeps with ``asyncio.sleep``; an awaitable result is awaited."""
    deadline = _Deadline(what, timeout)
    while not _held(last := await _attempt_async(predicate, retry_on)):
        deadline.check(last)
        await asyncio.sleep(interval)
    return last
