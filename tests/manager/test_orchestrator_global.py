"""Global services and the constraint enforcer on a simulated cluster."""

from __future__ import annotations

from helpers.aio import run_bounded as run
from orchestrator_sim import Sim, service_spec

from shoal.proto import types_pb2


def test_global_on_5_nodes_with_1_drained() -> None:
    async def main() -> None:
        sim = Sim()
        nodes = await sim.add_nodes(4)
        drained = await sim.add_node("drained", availability=types_pb2.DRAIN)
        async with sim.running():
            svc = await sim.create_service(service_spec("agent", replicas=None))
            await sim.until(lambda: len(sim.live(svc.id)) == 4)
            await sim.settle()
            tasks = sim.tasks(svc.id)
            assert len(tasks) == 4 and {t.node_id for t in tasks} == {n.id for n in nodes}
            t = tasks[0]
            assert t.slot == 0 and t.annotations.name == f"agent.{t.node_id}.{t.id}"

            # Undrain: it gets a task. A new node joins: it gets one too.
            await sim.set_availability(drained.id, types_pb2.ACTIVE)
            late = await sim.add_node("late")
            await sim.until(lambda: len(sim.live(svc.id)) == 6, what="6 global tasks")
            # Drain again: its task goes, and is not replaced elsewhere.
            await sim.set_availability(late.id, types_pb2.DRAIN)
            await sim.until(lambda: len(sim.live(svc.id)) == 5, what="drained node's task stopped")
            await sim.settle()
            assert late.id not in {t.node_id for t in sim.live(svc.id)}
            assert len({t.node_id for t in sim.live(svc.id)}) == 5

            # Node down: its task is shut down; back up: a new task there.
            await sim.set_node_state(nodes[0].id, types_pb2.NodeStatus.DOWN)
            await sim.until(lambda: len(sim.live(svc.id)) == 4)
            await sim.set_node_state(nodes[0].id, types_pb2.NodeStatus.READY)
            await sim.until(lambda: len(sim.live(svc.id)) == 5, what="task back on the recovered node")
            # A node removed from the cluster loses its task.
            await sim.store.update(lambda tx: tx.delete(tx.get("node", nodes[1].id)))
            await sim.until(lambda: len(sim.live(svc.id)) == 4)
            await sim.settle()
            assert all(t.node_id != nodes[1].id for t in sim.tasks(svc.id) if t.desired_state <= types_pb2.RUNNING)

    run(main())


def test_global_constraints_follow_labels() -> None:
    async def main() -> None:
        sim = Sim()
        a = await sim.add_node("a", labels={"zone": "a"})
        b = await sim.add_node("b", labels={"zone": "b"})
        async with sim.running():
            svc = await sim.create_service(service_spec("za", replicas=None, constraints=["node.labels.zone==a"]))
            await sim.until(lambda: len(sim.live(svc.id)) == 1)
            assert sim.live(svc.id)[0].node_id == a.id

            await sim.change_node(b.id, lambda n: n.spec.annotations.labels.__setitem__("zone", "a"))
            await sim.until(lambda: len(sim.live(svc.id)) == 2, what="relabelled node gets a task")
            await sim.change_node(a.id, lambda n: n.spec.annotations.labels.__setitem__("zone", "c"))
            await sim.until(lambda: {t.node_id for t in sim.live(svc.id)} == {b.id}, what="task leaves relabelled node")

    run(main())


def test_global_update_and_restart_on_same_node() -> None:
    async def main() -> None:
        sim = Sim()
        nodes = await sim.add_nodes(3)
        async with sim.running():
            svc = await sim.create_service(service_spec("g", replicas=None, image="crash:1"))
            await sim.until(lambda: len(sim.live(svc.id)) == 3)
            sim.crash_images.add("crash:1")
            await sim.until(lambda: len([t for t in sim.tasks(svc.id) if t.status.state == types_pb2.FAILED]) >= 3)
            sim.crash_images.clear()
            await sim.until(lambda: len(sim.live(svc.id)) == 3)
            by_node = {n.id: [t for t in sim.tasks(svc.id) if t.node_id == n.id] for n in nodes}
            assert all(len(ts) >= 1 for ts in by_node.values())

            await sim.update_service(svc.id, lambda s: s.task.container.__setattr__("image", "busybox:2"))
            await sim.until(lambda: sim.update_state(svc.id) == "COMPLETED")
            await sim.until(lambda: len(sim.live(svc.id)) == 3)
            assert all(t.spec.container.image == "busybox:2" for t in sim.live(svc.id))
            assert {t.node_id for t in sim.live(svc.id)} == {n.id for n in nodes}

    run(main())


def test_constraint_enforcer_after_label_change() -> None:
    async def main() -> None:
        sim = Sim()
        a = await sim.add_node("a", labels={"disk": "ssd"})
        b = await sim.add_node("b", labels={"disk": "ssd"})
        c = await sim.add_node("c", labels={"disk": "hdd"})
        async with sim.running():
            svc = await sim.create_service(service_spec("db", replicas=2, constraints=["node.labels.disk==ssd"]))
            await sim.until(lambda: len(sim.live(svc.id)) == 2)
            assert {t.node_id for t in sim.live(svc.id)} == {a.id, b.id}

            await sim.change_node(c.id, lambda n: n.spec.annotations.labels.__setitem__("disk", "ssd"))
            await sim.change_node(a.id, lambda n: n.spec.annotations.labels.__setitem__("disk", "hdd"))
            await sim.until(
                lambda: len(sim.live(svc.id)) == 2 and {t.node_id for t in sim.live(svc.id)} == {b.id, c.id},
                what="task moved off the relabelled node",
            )
            moved = [t for t in sim.tasks(svc.id) if t.node_id == a.id]
            assert moved and all(t.desired_state == types_pb2.SHUTDOWN for t in moved)
            sim.check_slots()

    run(main())


def test_constraint_enforcer_role_and_resources() -> None:
    async def main() -> None:
        sim = Sim()
        m = await sim.add_node("m", role=types_pb2.MANAGER, mem_gb=4)
        w = await sim.add_node("w", mem_gb=4)
        async with sim.running():
            mgr = await sim.create_service(service_spec("mgr", replicas=1, constraints=["node.role==manager"]))
            big = await sim.create_service(service_spec("big", replicas=2, mem_gb=1.5, constraints=["node.role==worker"]))
            await sim.until(lambda: len(sim.live(mgr.id)) == 1 and len(sim.live(big.id)) == 2)
            assert sim.live(mgr.id)[0].node_id == m.id
            # Demoted: the manager-only task cannot stay nor go anywhere else.
            await sim.change_node(m.id, lambda n: n.__setattr__("role", types_pb2.WORKER))
            await sim.until(lambda: not sim.live(mgr.id))
            await sim.settle()
            pending = [t for t in sim.tasks(mgr.id) if t.status.state == types_pb2.PENDING]
            assert len(pending) == 1
            assert pending[0].status.message == "no suitable node (constraint node.role==manager not met on 2 nodes)"
            # The worker's memory shrinks below what its two tasks reserve: one of them moves.
            await sim.change_node(w.id, lambda n: n.description.resources.__setattr__("memory_bytes", 2 << 30))
            await sim.until(lambda: len(sim.live(big.id)) == 2 and len({t.node_id for t in sim.live(big.id)}) == 2,
                            what="one big task moved to the demoted node")

    run(main())
