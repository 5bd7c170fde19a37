"""Property: after any sequence of scale / update / node down, up, drain events, the orchestrators
converge to exactly the desired tasks, and no slot ever has two tasks running at once."""

from __future__ import annotations

import asyncio

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from orchestrator_sim import Sim, service_spec

from shoal.proto import types_pb2

OPS = st.one_of(
    st.tuples(st.just("scale"), st.integers(0, 7)),
    st.tuples(st.just("update"), st.just(0)),
    st.tuples(st.just("down"), st.integers(1, 3)),
    st.tuples(st.just("up"), st.integers(1, 3)),
    st.tuples(st.just("drain"), st.integers(1, 3)),
    st.tuples(st.just("activate"), st.integers(1, 3)),
    st.tuples(st.just("crash"), st.just(0)),
)


async def scenario(
    replicas: int, parallelism: int, ops: list[tuple[str, int]], start_first: bool = False
) -> None:
    sim = Sim()
    nodes = await sim.add_nodes(4)  # node 0 always stays up and active
    if not start_first:  # start-first runs two tasks of a slot for a moment, by design
        sim.observers.append(lambda s: s.check_slots())
    update = types_pb2.UpdateConfig(parallelism=parallelism)
    update.monitor.FromMilliseconds(20)
    # Crashes during an update would pause it (failure action pause): tested on their own elsewhere.
    update.failure_action = types_pb2.UpdateConfig.CONTINUE
    if start_first:
        update.order = types_pb2.UpdateConfig.START_FIRST
    async with sim.running():
        svc = await sim.create_service(service_spec("p", replicas=replicas, update=update))
        glob = await sim.create_service(service_spec("g", replicas=None, update=update))
        want, image = replicas, 1
        for op, arg in ops:
            if op == "scale":
                want = arg
                await sim.scale(svc.id, arg)
            elif op == "update":
                image += 1
                for sid in (svc.id, glob.id):
                    await sim.update_service(sid, lambda s, i=image: s.task.container.__setattr__("image", f"busybox:{i}"))
            elif op == "down":
                await sim.set_node_state(nodes[arg].id, types_pb2.NodeStatus.DOWN)
            elif op == "up":
                await sim.set_node_state(nodes[arg].id, types_pb2.NodeStatus.READY)
            elif op == "drain":
                await sim.set_availability(nodes[arg].id, types_pb2.DRAIN)
            elif op == "activate":
                await sim.set_availability(nodes[arg].id, types_pb2.ACTIVE)
            elif op == "crash":  # the running tasks crash for a moment (restarted by policy)
                sim.crash_images.add(f"busybox:{image}")
                await asyncio.sleep(0.03)
                sim.crash_images.clear()
            await asyncio.sleep(0.01)
        await sim.settle(quiet=0.12, timeout=20)

        usable = {
            n.id for n in sim.store.sm.list("node")
            if n.status.state == types_pb2.NodeStatus.READY and n.spec.availability == types_pb2.ACTIVE
        }
        glive = sim.live(glob.id)
        assert sorted(t.node_id for t in glive) == sorted(usable), sim.dump()
        assert all(t.spec.container.image == f"busybox:{image}" for t in glive), sim.dump()
        assert all(t.node_id in usable for t in sim.tasks(glob.id) if t.desired_state <= types_pb2.RUNNING), sim.dump()

        live = sim.live(svc.id)
        assert len(live) == want, sim.dump()
        assert len({t.slot for t in live}) == want, sim.dump()
        assert all(t.spec.container.image == f"busybox:{image}" for t in live), sim.dump()
        should_run = [t for t in sim.tasks(svc.id) if t.desired_state <= types_pb2.RUNNING]
        assert len(should_run) == want, sim.dump()
        for t in should_run:
            n = sim.store.get("node", t.node_id)
            assert n.status.state == types_pb2.NodeStatus.READY and n.spec.availability == types_pb2.ACTIVE
        # Completed, or never needed (the update came before any task of the old spec existed).
        assert sim.update_state(svc.id) in ("COMPLETED", "UNKNOWN"), sim.dump()
        sim.check_slots()


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(replicas=st.integers(0, 6), parallelism=st.integers(0, 2), ops=st.lists(OPS, max_size=6), start_first=st.booleans())
def test_orchestrator_converges(replicas: int, parallelism: int, ops: list[tuple[str, int]], start_first: bool) -> None:
    async def bounded() -> None:
        async with asyncio.timeout(60):
            await scenario(replicas, parallelism, ops, start_first)

    asyncio.run(bounded())
