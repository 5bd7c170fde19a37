"""`Pacer`: a control loop pauses its debounce after a quick pass, as long as the pass took after a
slow one (the loop's share of the event loop stays about half), and never more than MAX_PAUSE."""

from __future__ import annotations

import asyncio
import time

import pytest
from helpers.aio import aiotest

from shoal.manager.pacing import Pacer, start_paced


def test_pause_follows_the_last_pass() -> None:
    p = Pacer(0.02)
    assert p.pause() == 0.02
    with p.timing():
        pass
    assert p.pause() == 0.02
    with p.timing():
        time.sleep(0.1)
    assert 0.1 <= p.pause() <= Pacer.MAX_PAUSE
    p.last = 30.0  # a pass of half a minute: the pause is capped
    assert p.pause() == Pacer.MAX_PAUSE
    with pytest.raises(RuntimeError), p.timing():  # a failed pass is timed too
        p.last = 0.0
        time.sleep(0.05)
        raise RuntimeError
    assert p.pause() >= 0.05


@aiotest
async def test_loops_start_one_after_another_with_a_pause_as_long_as_the_first_step() -> None:
    """A loop whose first step holds the event loop 0.3 s: the next starts ~0.3 s after that step
    ended, and the event loop serves others (a ticker) meanwhile; quick loops follow at once."""
    started: dict[str, float] = {}
    ended: dict[str, float] = {}
    ticks: list[float] = []

    async def loop(name: str, first_step: float) -> None:
        started[name] = time.monotonic()
        time.sleep(first_step)  # a first pass over the whole store, without a wait
        ended[name] = time.monotonic()
        await asyncio.Event().wait()

    async def ticker() -> None:
        while True:
            ticks.append(time.monotonic())
            await asyncio.sleep(0.01)

    async def main() -> None:
        async with asyncio.TaskGroup() as tg:
            tg.create_task(ticker())
            await start_paced(tg, [("slow", loop("slow", 0.3)), ("quick", loop("quick", 0.0)),
                                   ("last", loop("last", 0.0))])
            raise asyncio.CancelledError  # ends the group: every loop is cancelled

    with pytest.raises(asyncio.CancelledError):
        await main()
    assert list(started) == ["slow", "quick", "last"]
    assert started["quick"] - ended["slow"] >= 0.28
    assert sum(ended["slow"] < t < started["quick"] for t in ticks) >= 10  # the event loop served others
    assert started["last"] - started["quick"] < 0.1
