"""Property: whatever the nodes and pending tasks, the scheduler never overcommits a node, never breaks a
constraint, max-replicas or host-port rule, and leaves a task pending only when no node can take it."""

from __future__ import annotations

import asyncio
from collections import Counter, defaultdict

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from orchestrator_sim import node
from test_scheduler import add_nodes, add_tasks, pending_task, scheduler, settled

from shoal.manager.orchestrator.common import node_fits_spec
from shoal.manager.store import LocalStore
from shoal.proto import objects_pb2, types_pb2

NODE = st.fixed_dictionaries(
    {
        "zone": st.sampled_from(["a", "b", ""]),
        "cpus": st.integers(1, 4),
        "mem": st.integers(1, 4),
        "state": st.sampled_from([types_pb2.NodeStatus.READY] * 4 + [types_pb2.NodeStatus.DOWN]),
        "avail": st.sampled_from([types_pb2.ACTIVE] * 4 + [types_pb2.DRAIN, types_pb2.PAUSE]),
    }
)
GROUP = st.fixed_dictionaries(
    {
        "count": st.integers(1, 8),
        "cpus": st.sampled_from([0, 0.5, 1]),
        "mem": st.sampled_from([0, 0.5, 1, 2]),
        "constraint": st.sampled_from([None, "node.labels.zone==a", "node.labels.zone!=b"]),
        "spread": st.booleans(),
        "max_replicas": st.integers(0, 2),
        "port": st.sampled_from([0, 0, 8080]),
    }
)


def node_fits_now(t: objects_pb2.Task, n: objects_pb2.Node, held: list[objects_pb2.Task]) -> bool:
    if n.status.state != types_pb2.NodeStatus.READY or n.spec.availability != types_pb2.ACTIVE:
        return False
    if not node_fits_spec(t.spec, n):
        return False
    r = t.spec.resources.reservations
    cpu = sum(h.spec.resources.reservations.nano_cpus for h in held)
    mem = sum(h.spec.resources.reservations.memory_bytes for h in held)
    if cpu + r.nano_cpus > n.description.resources.nano_cpus or mem + r.memory_bytes > n.description.resources.memory_bytes:
        return False
    mr = t.spec.placement.max_replicas
    if mr and sum(1 for h in held if h.service_id == t.service_id) >= mr:
        return False
    ports = {p.published_port for p in t.endpoint.ports}
    return not any(p.published_port in ports for h in held for p in h.endpoint.ports)


async def scenario(nodes_in: list[dict], groups: list[dict], finish: int) -> None:
    st_ = LocalStore()
    nodes = await add_nodes(
        st_,
        [
            node(f"n{i}", labels={"zone": d["zone"]} if d["zone"] else {}, cpus=d["cpus"], mem_gb=d["mem"],
                 state=d["state"], availability=d["avail"])
            for i, d in enumerate(nodes_in)
        ],
    )
    async with scheduler(st_) as s:
        tasks = []
        for gi, g in enumerate(groups):
            tasks += [
                pending_task(
                    f"svc{gi}", i + 1, cpus=g["cpus"], mem_gb=g["mem"],
                    constraints=[g["constraint"]] if g["constraint"] else [],
                    spread=["node.labels.zone"] if g["spread"] else [], max_replicas=g["max_replicas"],
                    host_port=g["port"],
                )
                for i in range(g["count"])
            ]
        await add_tasks(st_, tasks)
        got = await settled(st_, s, tasks)
        # Some tasks end: their room is given to pending ones.
        ended = [t for t in got if t.status.state == types_pb2.ASSIGNED][:finish]

        def end(tx):
            for t in ended:
                c = objects_pb2.Task()
                c.CopyFrom(tx.get("task", t.id))
                c.status.state = types_pb2.COMPLETE
                tx.update(c)

        if ended:
            await st_.update(end)
            await asyncio.sleep(0.05)
            while not s.idle.is_set():
                await asyncio.sleep(0.005)
            got = await settled(st_, s, [t for t in tasks if t.id not in {e.id for e in ended}])

        held: dict[str, list[objects_pb2.Task]] = defaultdict(list)
        for t in got:
            if t.status.state == types_pb2.ASSIGNED:
                held[t.node_id].append(t)
        by_id = {n.id: n for n in nodes}
        for nid, ts in held.items():
            n = by_id[nid]
            assert n.status.state == types_pb2.NodeStatus.READY and n.spec.availability == types_pb2.ACTIVE
            assert sum(t.spec.resources.reservations.nano_cpus for t in ts) <= n.description.resources.nano_cpus
            assert sum(t.spec.resources.reservations.memory_bytes for t in ts) <= n.description.resources.memory_bytes
            for t in ts:
                assert node_fits_spec(t.spec, n)
            per_svc = Counter(t.service_id for t in ts)
            for t in ts:
                mr = t.spec.placement.max_replicas
                assert not mr or per_svc[t.service_id] <= mr
            ports = [p.published_port for t in ts for p in t.endpoint.ports]
            assert len(ports) == len(set(ports))
        for t in got:
            if t.status.state == types_pb2.PENDING:
                assert t.status.message.startswith("no suitable node (")
                assert not any(node_fits_now(t, n, held[n.id]) for n in nodes), t.status.message


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(nodes=st.lists(NODE, min_size=0, max_size=6), groups=st.lists(GROUP, min_size=1, max_size=4),
       finish=st.integers(0, 3))
def test_scheduler_respects_every_filter(nodes: list[dict], groups: list[dict], finish: int) -> None:
    async def bounded() -> None:
        async with asyncio.timeout(60):
            await scenario(nodes, groups, finish)

    asyncio.run(bounded())
