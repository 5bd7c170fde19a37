"""The agent's heartbeat deadline (agent.HEARTBEAT_TIMEOUT periods) against the real dispatcher, whose
Heartbeat answers are delayed as a busy leader's are: an answer slower than the old 1.5 periods but
within the dispatcher's own grace keeps the session (and the node READY); an answer that never comes
within 3 periods ends it, and the agent opens a new one. Real engine (runc under conmon). Needs root."""

from __future__ import annotations

import asyncio
import contextlib
import logging

import pytest
from agent_helpers import add_node, manager_side, new_engine, run, wait_for

from shoal.agent import agent as agent_mod
from shoal.agent.agent import Agent
from shoal.manager.dispatcher import Dispatcher
from shoal.proto import objects_pb2, types_pb2

pytestmark = pytest.mark.integration

PERIOD = 1.0  # s, the cluster's heartbeat period: the dispatcher's grace is 2.8 s


def test_a_slow_heartbeat_answer_keeps_the_session_a_lost_one_ends_it(engine_root, registry, tmp_path,
                                                                    caplog, monkeypatch) -> None:
    delay = [0.0]
    answer = Dispatcher.Heartbeat

    async def busy_heartbeat(self, request, context):  # noqa: ANN001, ANN202 - the dispatcher's own
        await asyncio.sleep(delay[0])  # a leader whose loop is busy: the answer comes late
        return await answer(self, request, context)

    monkeypatch.setattr(Dispatcher, "Heartbeat", busy_heartbeat)  # before the server binds it

    async def main() -> None:
        async with manager_side() as (st, _disp, _broker, addr):
            def period(tx):  # noqa: ANN001, ANN202
                c = objects_pb2.Cluster()
                c.CopyFrom(tx.get("cluster", st.cluster().id))
                c.spec.dispatcher.heartbeat_period.FromNanoseconds(int(PERIOD * 1e9))
                tx.update(c)

            await st.update(period)
            await add_node(st, "n1", hostname="node-1")
            engine = new_engine(engine_root, registry)
            agent = Agent("n1", tmp_path, [addr], None, engine, hostname="node-1")
            runner = asyncio.create_task(agent.run())
            try:
                await wait_for(lambda: agent.session_id != "", what="a session")
                first = agent.session_id
                # 1.8 s: past the old deadline (1.5 periods, less the period's jitter), within the
                # dispatcher's grace (2.8 s) and the agent's 3 periods
                delay[0] = 1.8 * PERIOD
                await asyncio.sleep(7)
                assert agent.session_id == first
                node = st.get("node", "n1")
                assert node.status.state == types_pb2.NodeStatus.READY
                assert not [r for r in caplog.records if "session ended" in r.getMessage()]

                delay[0] = 30.0  # no answer: the agent gives up after 3 periods and opens another
                await wait_for(lambda: agent.session_id not in ("", first), what="a new session", timeout=20)
                ended = [r.getMessage() for r in caplog.records if "session ended" in r.getMessage()]
                assert ended and "DEADLINE_EXCEEDED" in ended[0], ended
            finally:
                runner.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await runner
                await engine.close()

    assert agent_mod.HEARTBEAT_TIMEOUT == 3.0
    with caplog.at_level(logging.INFO, logger="shoal.agent"):
        run(main())
