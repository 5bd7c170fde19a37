"""The scheduler alone on a LocalStore: filters, spread, preferences, batching, pending reasons."""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from collections.abc import AsyncIterator

import pytest
from helpers.aio import run_bounded as run
from orchestrator_sim import GB, node

from shoal.manager.scheduler import Scheduler, parse_constraints
from shoal.manager.store import LocalStore, new_id
from shoal.proto import objects_pb2, types_pb2


def pending_task(
    service_id: str,
    slot: int = 1,
    constraints: list[str] | None = None,
    spread: list[str] | None = None,
    mem_gb: float = 0,
    cpus: float = 0,
    generic: dict[str, int] | None = None,
    host_port: int = 0,
    max_replicas: int = 0,
    node_id: str = "",
    networks: list[str] | None = None,
    platforms: list[tuple[str, str]] | None = None,
    spec_version: int = 1,
) -> objects_pb2.Task:
    t = objects_pb2.Task(id=new_id(), service_id=service_id, slot=slot, node_id=node_id, spec_version=spec_version)
    t.annotations.name = f"{service_id}.{slot}.{t.id}"
    t.desired_state = types_pb2.RUNNING
    t.status.state = types_pb2.PENDING
    t.spec.container.image = "busybox"
    t.spec.placement.constraints.extend(constraints or [])
    for s in spread or []:
        t.spec.placement.preferences.add(spread_descriptor=s)
    t.spec.placement.max_replicas = max_replicas
    for os_, arch in platforms or []:
        t.spec.placement.platforms.add(os=os_, architecture=arch)
    r = t.spec.resources.reservations
    r.memory_bytes = int(mem_gb * GB)
    r.nano_cpus = int(cpus * 1e9)
    for k, v in (generic or {}).items():
        r.generic.add(kind=k, value=v)
    if host_port:
        t.endpoint.ports.add(target_port=80, published_port=host_port, publish_mode=types_pb2.PortConfig.HOST)
    for n in networks or []:
        t.spec.networks.add(target=n)
    return t


@contextlib.asynccontextmanager
async def scheduler(store: LocalStore) -> AsyncIterator[Scheduler]:
    s = Scheduler(store, debounce=0.005, max_delay=0.05)
    task = asyncio.create_task(s.run())
    try:
        await asyncio.sleep(0)
        yield s
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def add_nodes(store: LocalStore, nodes: list[objects_pb2.Node]) -> list[objects_pb2.Node]:
    def fn(tx):
        return [tx.create(n) for n in nodes]

    return await store.update(fn)


async def add_tasks(store: LocalStore, tasks: list[objects_pb2.Task]) -> None:
    await store.update(lambda tx: [tx.create(t) for t in tasks])


async def settled(store: LocalStore, s: Scheduler, tasks: list[objects_pb2.Task]) -> list[objects_pb2.Task]:
    """Until every given task is assigned or carries a pending reason."""
    for _ in range(2000):
        cur = [store.get("task", t.id) for t in tasks]
        if all(c.status.state == types_pb2.ASSIGNED or c.status.message.startswith("no suitable") for c in cur):
            await asyncio.sleep(0.02)
            return [store.get("task", t.id) for t in tasks]
        await asyncio.sleep(0.005)
    raise AssertionError("scheduler did not decide every task")


def per_node(tasks: list[objects_pb2.Task]) -> Counter[str]:
    return Counter(t.node_id for t in tasks if t.status.state == types_pb2.ASSIGNED)


def test_spread_evenly_and_fewest_tasks_overall() -> None:
    async def main() -> None:
        st = LocalStore()
        nodes = await add_nodes(st, [node(f"n{i}") for i in range(4)])
        async with scheduler(st) as s:
            # Another service already has 3 tasks on n0: the first new task avoids n0.
            others = [pending_task("other", i, node_id=nodes[0].id) for i in range(3)]
            await add_tasks(st, others)
            await settled(st, s, others)
            one = [pending_task("web", 1)]
            await add_tasks(st, one)
            got = await settled(st, s, one)
            assert got[0].node_id != nodes[0].id
            more = [pending_task("web", i) for i in range(2, 10)]
            await add_tasks(st, more)
            got = await settled(st, s, one + more)
            counts = per_node(got)
            assert sum(counts.values()) == 9 and max(counts.values()) - min(counts.values()) <= 1, counts
            t = got[0]
            assert t.status.message == "scheduler assigned task to node"

    run(main())


def test_spread_over_label_with_uneven_groups() -> None:
    async def main() -> None:
        st = LocalStore()
        a = await add_nodes(st, [node("a1", labels={"zone": "a"})])
        b = await add_nodes(st, [node(f"b{i}", labels={"zone": "b"}) for i in range(3)])
        nolabel = await add_nodes(st, [node(f"x{i}") for i in range(2)])
        async with scheduler(st) as s:
            tasks = [pending_task("web", i, spread=["node.labels.zone"]) for i in range(1, 10)]
            await add_tasks(st, tasks)
            got = await settled(st, s, tasks)
            counts = per_node(got)
            zone = {n.id: "a" for n in a} | {n.id: "b" for n in b} | {n.id: "" for n in nolabel}
            by_zone = Counter()
            for nid, c in counts.items():
                by_zone[zone[nid]] += c
            # Three groups (a, b, no label) get 3 tasks each, whatever their sizes.
            assert by_zone == Counter({"a": 3, "b": 3, "": 3}), by_zone
            assert counts[a[0].id] == 3
            assert sorted(counts[n.id] for n in b) == [1, 1, 1]

    run(main())


def test_two_level_preferences() -> None:
    async def main() -> None:
        st = LocalStore()
        nodes = []
        for dc in ("east", "west"):
            for rack in ("r1", "r2"):
                for i in range(2 if dc == "east" else 1):
                    nodes.append(node(f"{dc}-{rack}-{i}", labels={"dc": dc, "rack": rack}))
        nodes = await add_nodes(st, nodes)
        async with scheduler(st) as s:
            tasks = [pending_task("web", i, spread=["node.labels.dc", "node.labels.rack"]) for i in range(1, 9)]
            await add_tasks(st, tasks)
            got = await settled(st, s, tasks)
            labels = {n.id: (n.spec.annotations.labels["dc"], n.spec.annotations.labels["rack"]) for n in nodes}
            by = Counter(labels[t.node_id] for t in got)
            assert by == Counter({("east", "r1"): 2, ("east", "r2"): 2, ("west", "r1"): 2, ("west", "r2"): 2}), by

    run(main())


def test_resources_and_pending_reason_text() -> None:
    async def main() -> None:
        st = LocalStore()
        await add_nodes(st, [node(f"a{i}", labels={"zone": "a"}, mem_gb=8) for i in range(2)])
        b = await add_nodes(st, [node(f"b{i}", labels={"zone": "b"}, mem_gb=2) for i in range(3)])
        async with scheduler(st) as s:
            tasks = [pending_task("db", 1, constraints=["node.labels.zone==b"], mem_gb=4)]
            await add_tasks(st, tasks)
            got = await settled(st, s, tasks)
            assert got[0].status.state == types_pb2.PENDING
            assert got[0].status.message == (
                "no suitable node (insufficient memory on 3 nodes; constraint node.labels.zone==b not met on 2 nodes)"
            )
            # Placed as soon as a node fits.
            def grow(tx):
                n = objects_pb2.Node()
                n.CopyFrom(tx.get("node", b[1].id))
                n.description.resources.memory_bytes = 16 * GB
                tx.update(n)

            await st.update(grow)
            for _ in range(400):
                if st.get("task", tasks[0].id).status.state == types_pb2.ASSIGNED:
                    break
                await asyncio.sleep(0.005)
            assert st.get("task", tasks[0].id).node_id == b[1].id

    run(main())


def test_resources_fill_up_and_free_again() -> None:
    async def main() -> None:
        st = LocalStore()
        await add_nodes(st, [node(f"n{i}", cpus=2, mem_gb=4) for i in range(2)])
        async with scheduler(st) as s:
            tasks = [pending_task("w", i, cpus=1, mem_gb=1) for i in range(1, 6)]
            await add_tasks(st, tasks)
            got = await settled(st, s, tasks)
            assert sum(per_node(got).values()) == 4
            left = [t for t in got if t.status.state == types_pb2.PENDING]
            assert len(left) == 1 and left[0].status.message == "no suitable node (insufficient cpu on 2 nodes)"
            # One running task ends: its reservation is free again and the pending task is placed.
            done = next(t for t in got if t.status.state == types_pb2.ASSIGNED)

            def finish(tx):
                t = objects_pb2.Task()
                t.CopyFrom(tx.get("task", done.id))
                t.status.state = types_pb2.COMPLETE
                tx.update(t)

            await st.update(finish)
            for _ in range(400):
                if st.get("task", left[0].id).status.state == types_pb2.ASSIGNED:
                    break
                await asyncio.sleep(0.005)
            assert st.get("task", left[0].id).node_id == done.node_id

    run(main())


def test_generic_resources_ports_platform_network_and_node_filters() -> None:
    async def main() -> None:
        st = LocalStore()
        gpu = node("gpu", engine_labels={"gen": "2"}, arch="aarch64")
        gpu.description.resources.generic.add(kind="gpu", value=1)
        nodes = await add_nodes(st, [gpu, node("plain"), node("down", state=types_pb2.NodeStatus.DOWN),
                                     node("drained", availability=types_pb2.DRAIN)])
        async with scheduler(st) as s:
            g = [pending_task("ml", i, generic={"gpu": 1}) for i in (1, 2)]
            await add_tasks(st, g)
            got = await settled(st, s, g)
            assert sorted(t.status.state for t in got) == [types_pb2.PENDING, types_pb2.ASSIGNED]
            placed = next(t for t in got if t.status.state == types_pb2.ASSIGNED)
            assert placed.node_id == nodes[0].id and placed.assigned_generic_resources[0].kind == "gpu"
            waiting = next(t for t in got if t.status.state == types_pb2.PENDING)
            assert waiting.status.message == (
                "no suitable node (insufficient generic resource gpu on 2 nodes; "
                "node not ready on 1 node; node drained on 1 node)"
            )

            ports = [pending_task("web", i, host_port=8080) for i in (1, 2, 3)]
            await add_tasks(st, ports)
            got = await settled(st, s, ports)
            assert len(per_node(got)) == 2 and sum(per_node(got).values()) == 2
            waiting = next(t for t in got if t.status.state == types_pb2.PENDING)
            assert "host port 8080/tcp already in use on 2 nodes" in waiting.status.message

            arm = [pending_task("arm", 1, platforms=[("linux", "arm64")]),
                   pending_task("eng", 1, constraints=["engine.labels.gen==2", "node.hostname!=plain"])]
            await add_tasks(st, arm)
            got = await settled(st, s, arm)
            assert [t.node_id for t in got] == [nodes[0].id, nodes[0].id]

            net = [pending_task("netted", 1, networks=["nonexistent"])]
            await add_tasks(st, net)
            got = await settled(st, s, net)
            assert got[0].status.message.startswith("no suitable node (network not available on 2 nodes")

    run(main())


def test_encrypted_network_only_on_nodes_with_ipsec() -> None:
    async def main() -> None:
        st = LocalStore()
        secure = objects_pb2.Network(id=new_id())
        secure.spec.annotations.name = "secure"
        secure.spec.driver_config.options["encrypted"] = ""
        plain = objects_pb2.Network(id=new_id())
        plain.spec.annotations.name = "plain"
        await st.update(lambda tx: [tx.create(secure), tx.create(plain)])
        capable = node("capable")
        capable.description.capabilities.append("ipsec-esp")
        nodes = await add_nodes(st, [node("old1"), node("old2"), capable,
                                     node("down", state=types_pb2.NodeStatus.DOWN)])
        async with scheduler(st) as s:
            enc = [pending_task("enc", i, networks=[secure.id]) for i in (1, 2, 3)]
            other = [pending_task("other", i, networks=[plain.id]) for i in (1, 2, 3)]
            await add_tasks(st, enc + other)
            got = await settled(st, s, enc + other)
            assert {t.node_id for t in got[:3]} == {nodes[2].id}
            assert len({t.node_id for t in got[3:]}) == 3  # a plain network needs nothing of the node

            # No ready node can: the task waits, and says why.
            await st.update(lambda tx: tx.delete(st.get("node", nodes[2].id)))
            late = [pending_task("late", 1, networks=[secure.id])]
            await add_tasks(st, late)
            [t] = await settled(st, s, late)
            assert t.status.state == types_pb2.PENDING
            assert t.status.message == (
                "no suitable node (encrypted network secure needs IPsec ESP with AES-GCM in the node's kernel "
                "(CONFIG_INET_ESP, CONFIG_CRYPTO_GCM) on 2 nodes; node not ready on 1 node)"
            )
            # A node that gains the capability (its agent reconnects with a newer kernel) takes it.
            n = objects_pb2.Node()
            n.CopyFrom(st.get("node", nodes[0].id))
            n.description.capabilities.append("ipsec-esp")
            await st.update(lambda tx: tx.update(n))
            for _ in range(400):
                if st.get("task", t.id).status.state == types_pb2.ASSIGNED:
                    break
                await asyncio.sleep(0.01)
            assert st.get("task", t.id).node_id == nodes[0].id

    run(main())


def test_preassigned_global_task_checked_on_its_node() -> None:
    async def main() -> None:
        st = LocalStore()
        small, big = await add_nodes(st, [node("small", mem_gb=1), node("big", mem_gb=8)])
        async with scheduler(st) as s:
            tasks = [pending_task("g", 0, node_id=small.id, mem_gb=2), pending_task("g", 0, node_id=big.id, mem_gb=2)]
            await add_tasks(st, tasks)
            got = await settled(st, s, tasks)
            assert got[0].status.state == types_pb2.PENDING and got[0].node_id == small.id
            assert got[0].status.message == "no suitable node (insufficient memory on 1 node)"
            assert got[1].status.state == types_pb2.ASSIGNED and got[1].node_id == big.id

    run(main())


def test_no_nodes_message_and_batching_in_one_transaction() -> None:
    async def main() -> None:
        st = LocalStore()
        async with scheduler(st) as s:
            one = [pending_task("lonely", 1)]
            await add_tasks(st, one)
            got = await settled(st, s, one)
            assert got[0].status.message == "no suitable node (no nodes in the cluster)"
            await add_nodes(st, [node(f"n{i}") for i in range(10)])
            tasks = [pending_task("many", i) for i in range(1, 501)]
            await add_tasks(st, tasks)
            v = st.sm.version
            got = await settled(st, s, tasks + one)
            assert all(t.status.state == types_pb2.ASSIGNED for t in got)
            # 501 assignments decided together and committed in one transaction.
            assert st.sm.version - v == 1, st.sm.version - v
            assert set(per_node(got).values()) == {50, 51}

    run(main())


def test_parse_constraints_errors() -> None:
    cs = parse_constraints(["node.labels.zone==a", "Node.Role != manager", "engine.labels.os==linux"])
    assert [str(c) for c in cs] == ["node.labels.zone==a", "node.role!=manager", "engine.labels.os==linux"]
    with pytest.raises(ValueError, match="has no == or != operator"):
        parse_constraints(["node.labels.zone=a"])
    with pytest.raises(ValueError, match="unknown key"):
        parse_constraints(["node.colour==red"])
    with pytest.raises(ValueError, match="node.role can only be manager or worker"):
        parse_constraints(["node.role==boss"])


def test_concurrent_writer_conflict_drops_only_that_assignment() -> None:
    """Between the scheduler's decision and its commit another writer changes one task: the batch is
    refused (version check), the other assignments are committed one by one, the changed task's
    is not sent at all (it could only be refused: a round trip each, 1,000 of them at 2,000 nodes
    after a pass whose answer was lost), and the scheduler's counts follow the store."""

    class RacingStore(LocalStore):
        victim: str = ""
        singles: list[str] = []

        async def propose(self, txn):
            if len(txn.actions) == 1 and txn.actions[0].object.task.status.state == types_pb2.ASSIGNED:
                self.singles.append(txn.actions[0].object.task.id)
            if self.victim and any(a.object.task.status.state == types_pb2.ASSIGNED for a in txn.actions):
                t = objects_pb2.Task()
                t.CopyFrom(self.sm.get("task", self.victim))
                t.desired_state = types_pb2.SHUTDOWN
                self.victim = ""
                await super().propose(type(txn)(actions=[_update(t)], timestamp_unix_nano=txn.timestamp_unix_nano))
            return await super().propose(txn)

    def _update(t):
        from shoal.proto import store_pb2

        a = store_pb2.StoreAction(kind=store_pb2.StoreAction.UPDATE)
        a.object.task.CopyFrom(t)
        return a

    async def main() -> None:
        st = RacingStore()
        nodes = await add_nodes(st, [node("n0"), node("n1")])
        async with scheduler(st) as s:
            tasks = [pending_task("web", i) for i in range(1, 5)]
            st.victim = tasks[0].id
            await add_tasks(st, tasks)
            for _ in range(400):
                if sum(st.get("task", t.id).status.state == types_pb2.ASSIGNED for t in tasks) == 3:
                    break
                await asyncio.sleep(0.005)
            got = [st.get("task", t.id) for t in tasks]
            assert got[0].status.state == types_pb2.PENDING and got[0].desired_state == types_pb2.SHUTDOWN
            assert all(t.status.state == types_pb2.ASSIGNED for t in got[1:])
            assert sorted(st.singles) == sorted(t.id for t in tasks[1:]), st.singles  # not the victim's
            counts = per_node(got)
            # One more task goes to the node with fewer tasks: the dropped assignment was not counted.
            more = [pending_task("web", 9)]
            await add_tasks(st, more)
            last = (await settled(st, s, more))[0]
            low = min(nodes, key=lambda n: counts[n.id])
            assert last.node_id == low.id, (counts, last.node_id)

    run(main())
