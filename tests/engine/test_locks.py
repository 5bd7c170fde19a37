"""KeyedLocks: calls about one key wait for each other, calls about others do not, and a key's lock
is dropped once nobody holds it or waits for it."""

from __future__ import annotations

import asyncio
from collections import defaultdict

from helpers.aio import run

from shoal.agent.engine.locks import KeyedLocks


def test_one_key_at_a_time_other_keys_meanwhile_and_nothing_left_behind() -> None:
    async def main() -> None:
        locks = KeyedLocks()
        order: list[str] = []
        inside: dict[str, int] = defaultdict(int)
        most: dict[str, int] = defaultdict(int)

        async def use(key: str, name: str) -> None:
            async with locks.hold(key):
                inside[key] += 1
                most[key] = max(most[key], inside[key])
                order.append(f"{name}+")
                await asyncio.sleep(0.01)
                order.append(f"{name}-")
                inside[key] -= 1

        async with asyncio.TaskGroup() as tg:
            for i in range(3):
                tg.create_task(use("a", f"a{i}"))
            tg.create_task(use("b", "b0"))
            await asyncio.sleep(0.005)
            assert len(locks) == 2  # one lock per key while in use
        assert most == {"a": 1, "b": 1}, most
        assert order.index("b0+") < order.index("a0-")  # b did not wait for a
        assert order[order.index("a0+") + 1:].index("a0-") < order[order.index("a0+") + 1:].index("a1+")
        assert len(locks) == 0

        # a holder that fails still lets the next one in, and leaves nothing behind
        async def fail() -> None:
            async with locks.hold("c"):
                raise RuntimeError("boom")

        results = await asyncio.gather(fail(), use("c", "c1"), return_exceptions=True)
        assert isinstance(results[0], RuntimeError) and results[1] is None
        assert len(locks) == 0

    run(main())
