"""Replicated services on simulated nodes: scaling, restarts, node loss, drain, removal, history."""

from __future__ import annotations

import asyncio

from helpers.aio import run_bounded as run
from orchestrator_sim import Sim, dur, service_spec

from shoal.proto import types_pb2


def test_scale_3_10_2() -> None:
    async def main() -> None:
        sim = Sim()
        await sim.add_nodes(4)
        async with sim.running():
            svc = await sim.create_service(service_spec("web", replicas=3))
            await sim.until(lambda: len(sim.live(svc.id)) == 3, what="3 running")
            tasks = sim.tasks(svc.id)
            assert sorted(t.slot for t in tasks) == [1, 2, 3]
            t = tasks[0]
            assert t.annotations.name == f"web.{t.slot}.{t.id}"
            assert t.service_annotations.name == "web" and t.spec_version == 1
            assert t.spec.container.image == "busybox:1"

            await sim.scale(svc.id, 10)
            await sim.until(lambda: len(sim.live(svc.id)) == 10, what="10 running")
            assert sorted(t.slot for t in sim.live(svc.id)) == list(range(1, 11))
            per_node = sim.running_per_node(svc.id)
            assert max(per_node.values()) - min(per_node.values()) <= 1, per_node

            await sim.scale(svc.id, 2)
            await sim.until(lambda: len(sim.live(svc.id)) == 2, what="2 running")
            await sim.settle()
            live = sim.live(svc.id)
            assert len(live) == 2 and len({t.node_id for t in live}) == 2
            # Scaled-down tasks are stopped and then deleted by the reaper.
            assert all(t.desired_state <= types_pb2.RUNNING for t in sim.tasks(svc.id)), sim.dump()
            sim.check_slots()

    run(main())


def test_restart_on_failure_then_history_limit() -> None:
    async def main() -> None:
        sim = Sim()
        await sim.add_nodes(2)
        async with sim.running():
            svc = await sim.create_service(service_spec("crashy", replicas=1, image="crash:1"))
            sim.crash_images.add("crash:1")
            # Every task crashes right after starting: the slot is restarted again and again,
            # and the reaper keeps only 5 dead tasks of it.
            await sim.until(lambda: len([t for t in sim.tasks(svc.id) if t.status.state == types_pb2.FAILED]) >= 5)
            await asyncio.sleep(0.2)
            sim.crash_images.clear()
            await sim.until(lambda: len(sim.live(svc.id)) == 1)
            await sim.settle()
            dead = [t for t in sim.tasks(svc.id) if t.status.state > types_pb2.RUNNING]
            assert 1 <= len(dead) <= 5, sim.dump()
            assert {t.slot for t in sim.tasks(svc.id)} == {1}

    run(main())


def test_restart_max_attempts_within_window() -> None:
    async def main() -> None:
        sim = Sim()
        await sim.add_nodes(2)
        sim.fail_images.add("bad:1")
        policy = types_pb2.RestartPolicy(
            condition=types_pb2.RestartPolicy.ON_FAILURE, delay=dur(0.01), max_attempts=2, window=dur(30)
        )
        async with sim.running():
            svc = await sim.create_service(service_spec("flaky", replicas=1, image="bad:1", restart=policy))
            await sim.settle(quiet=0.3)
            tasks = sim.tasks(svc.id)
            # The first task and two restarts; then the policy says stop.
            assert len(tasks) == 3, sim.dump()
            assert all(t.status.state == types_pb2.FAILED for t in tasks)
            assert all(t.desired_state == types_pb2.SHUTDOWN for t in tasks)
            # A new template resets the count (and the slot is updated although its task ended).
            await sim.update_service(svc.id, lambda s: s.task.container.__setattr__("image", "good:1"))
            await sim.until(lambda: len(sim.live(svc.id)) == 1)

    run(main())


def test_restart_condition_none_and_on_failure_complete() -> None:
    async def main() -> None:
        sim = Sim()
        await sim.add_nodes(1)
        sim.fail_images.add("bad:1")
        async with sim.running():
            none = types_pb2.RestartPolicy(condition=types_pb2.RestartPolicy.NONE)
            svc = await sim.create_service(service_spec("once", replicas=2, image="bad:1", restart=none))
            await sim.settle(quiet=0.3)
            assert len(sim.tasks(svc.id)) == 2, sim.dump()
            assert all(t.status.state == types_pb2.FAILED for t in sim.tasks(svc.id))

    run(main())


def test_restart_delay_keeps_replacement_ready() -> None:
    async def main() -> None:
        sim = Sim()
        await sim.add_nodes(1)
        slow = types_pb2.RestartPolicy(delay=dur(0.6))
        async with sim.running():
            svc = await sim.create_service(service_spec("slow", replicas=1, image="crash:1", restart=slow))
            await sim.until(lambda: len(sim.live(svc.id)) == 1)
            sim.crash_images.add("crash:1")
            await sim.until(lambda: len(sim.tasks(svc.id)) == 2, what="replacement created")
            sim.crash_images.clear()
            new = [t for t in sim.tasks(svc.id) if t.desired_state <= types_pb2.RUNNING]
            assert len(new) == 1 and new[0].desired_state == types_pb2.READY and new[0].slot == 1
            await sim.until(lambda: len(sim.live(svc.id)) == 1, what="replacement running after the delay")

    run(main())


def test_node_down_replaced_at_once_and_drain() -> None:
    async def main() -> None:
        sim = Sim()
        nodes = await sim.add_nodes(3)
        slow = types_pb2.RestartPolicy(delay=dur(30))  # node loss does not wait for the restart delay
        async with sim.running():
            svc = await sim.create_service(service_spec("web", replicas=3, restart=slow))
            await sim.until(lambda: len(sim.live(svc.id)) == 3)
            await sim.set_node_state(nodes[0].id, types_pb2.NodeStatus.DOWN)
            await sim.until(lambda: len(sim.live(svc.id)) == 3, what="replaced after node down")
            assert all(t.node_id != nodes[0].id for t in sim.live(svc.id))
            await sim.set_availability(nodes[1].id, types_pb2.DRAIN)
            await sim.until(
                lambda: len(sim.live(svc.id)) == 3 and all(t.node_id == nodes[2].id for t in sim.live(svc.id)),
                what="drained",
            )
            sim.check_slots()
            assert sorted(t.slot for t in sim.live(svc.id)) == [1, 2, 3]

    run(main())


def test_max_replicas_per_node_and_pending_reason() -> None:
    async def main() -> None:
        sim = Sim()
        await sim.add_nodes(2)
        async with sim.running():
            svc = await sim.create_service(service_spec("capped", replicas=5, max_replicas=2))
            await sim.until(lambda: len(sim.live(svc.id)) == 4)
            await sim.settle()
            pending = [t for t in sim.tasks(svc.id) if t.status.state == types_pb2.PENDING]
            assert len(pending) == 1
            assert pending[0].status.message == "no suitable node (max replicas per node (2) reached on 2 nodes)"
            await sim.add_node("n9")
            await sim.until(lambda: len(sim.live(svc.id)) == 5, what="placed once a node fits")
            assert max(sim.running_per_node(svc.id).values()) == 2

    run(main())


def test_service_removal_deletes_tasks() -> None:
    async def main() -> None:
        sim = Sim()
        nodes = await sim.add_nodes(2)
        async with sim.running():
            svc = await sim.create_service(service_spec("gone", replicas=4))
            await sim.until(lambda: len(sim.live(svc.id)) == 4)
            await sim.set_node_state(nodes[1].id, types_pb2.NodeStatus.DOWN)
            await sim.remove_service(svc.id)
            await sim.until(lambda: not sim.tasks(svc.id), what="all tasks deleted")

    run(main())


def test_pending_delete_service() -> None:
    async def main() -> None:
        sim = Sim()
        await sim.add_nodes(1)
        async with sim.running():
            svc = await sim.create_service(service_spec("later", replicas=2))
            await sim.until(lambda: len(sim.live(svc.id)) == 2)

            def mark(tx):
                s = type(svc)()
                s.CopyFrom(tx.get("service", svc.id))
                s.pending_delete = True
                tx.update(s)

            await sim.store.update(mark)
            await sim.until(lambda: sim.store.get("service", svc.id) is None, what="service deleted")
            assert not sim.tasks(svc.id)

    run(main())


def test_history_retention_limit_from_cluster() -> None:
    async def main() -> None:
        sim = Sim()
        await sim.add_nodes(1)
        from shoal.proto import objects_pb2

        cluster = objects_pb2.Cluster()
        cluster.spec.annotations.name = "default"
        cluster.spec.orchestration.task_history_retention_limit = 2
        await sim.store.update(lambda tx: tx.create(cluster))
        async with sim.running():
            svc = await sim.create_service(service_spec("h", replicas=1))
            await sim.until(lambda: len(sim.live(svc.id)) == 1)
            for i in range(5):
                await sim.update_service(svc.id, lambda s, i=i: s.task.container.__setattr__("image", f"busybox:{i + 2}"))
                await sim.until(lambda i=i: any(
                    t.spec.container.image == f"busybox:{i + 2}" for t in sim.live(svc.id)))
            await sim.settle()
            tasks = sim.tasks(svc.id)
            dead = [t for t in tasks if t.status.state > types_pb2.RUNNING]
            assert len(dead) == 2 and len(tasks) == 3, sim.dump()

    run(main())


def test_restart_window_counts_only_recent_restarts() -> None:
    """max_attempts within a window: restarts older than the window no longer count."""
    import time as _time

    from shoal.manager.orchestrator.common import TaskWaiters
    from shoal.manager.orchestrator.restart import RestartSupervisor
    from shoal.manager.store import LocalStore
    from shoal.proto import objects_pb2

    rs = RestartSupervisor(LocalStore(), TaskWaiters(), spawn=lambda c: c.close())  # type: ignore[arg-type,return-value]
    svc = objects_pb2.Service(id="s")
    svc.spec.replicated.replicas = 1
    t = objects_pb2.Task(id="t", service_id="s", slot=1, spec_version=1)
    t.spec.restart.CopyFrom(types_pb2.RestartPolicy(max_attempts=2, window=dur(10)))
    t.status.state = types_pb2.FAILED
    now = _time.time()
    t.status.timestamp.FromNanoseconds(int(now * 1e9))
    assert rs.should_restart(t, svc)
    rs._record(t, False)
    rs._record(t, False)
    assert not rs.should_restart(t, svc)  # two restarts within the last 10 s
    # The same failure seen 20 s later: both restarts fell out of the window.
    t.status.timestamp.FromNanoseconds(int((now + 20) * 1e9))
    assert rs.should_restart(t, svc)
    # Another template starts a fresh count.
    t.status.timestamp.FromNanoseconds(int(now * 1e9))
    t.spec_version = 2
    assert rs.should_restart(t, svc)
    # on-failure does not restart a task that completed; none never restarts.
    t.spec.restart.condition = types_pb2.RestartPolicy.ON_FAILURE
    t.status.state = types_pb2.COMPLETE
    assert not rs.should_restart(t, svc)
    t.spec.restart.condition = types_pb2.RestartPolicy.NONE
    t.status.state = types_pb2.FAILED
    assert not rs.should_restart(t, svc)


def test_new_leader_resumes_delayed_restart() -> None:
    """The orchestrator loop is cancelled (leadership lost) during a restart delay; the next one starts the task."""
    async def main() -> None:
        sim = Sim()
        await sim.add_nodes(2)
        slow = types_pb2.RestartPolicy(delay=dur(0.4))
        async with sim.running():
            svc = await sim.create_service(service_spec("web", replicas=2, image="crash:1", restart=slow))
            await sim.until(lambda: len(sim.live(svc.id)) == 2)
            sim.crash_images.add("crash:1")
            await sim.until(lambda: sum(t.desired_state == types_pb2.READY for t in sim.tasks(svc.id)) == 2)
            sim.crash_images.clear()
            # Leadership lost: the loop and its timers are cancelled.
            old = sim.loops["replicated"]
            runner = next(t for t in asyncio.all_tasks() if t.get_name() == "replicated")
            runner.cancel()
            await asyncio.gather(runner, return_exceptions=True)
            assert not old.restarts.pending_starts() or all(
                t.done() for t in old.restarts._delays.values()
            )
            from shoal.manager.orchestrator import ReplicatedOrchestrator

            new = ReplicatedOrchestrator(sim.store, debounce=0.005)
            task = asyncio.create_task(new.run())
            try:
                await sim.until(lambda: len(sim.live(svc.id)) == 2, what="restarts resumed by the new leader")
                await sim.settle()
                assert len([t for t in sim.tasks(svc.id) if t.desired_state <= types_pb2.RUNNING]) == 2
            finally:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)

    run(main())


def test_node_removed_tasks_replaced_and_orphans_count_as_history() -> None:
    async def main() -> None:
        sim = Sim()
        nodes = await sim.add_nodes(2)
        from shoal.proto import objects_pb2

        cluster = objects_pb2.Cluster()
        cluster.spec.annotations.name = "default"
        cluster.spec.orchestration.task_history_retention_limit = 1
        await sim.store.update(lambda tx: tx.create(cluster))
        async with sim.running():
            svc = await sim.create_service(service_spec("web", replicas=2, image="crash:1"))
            await sim.until(lambda: len(sim.live(svc.id)) == 2)
            slot = next(t.slot for t in sim.live(svc.id) if t.node_id == nodes[0].id)
            # The slot on n0 crashes once (one dead task), then n0 is removed from the cluster: its
            # running task can never report again and counts as dead history of the slot too.
            sim.crash_images.add("crash:1")
            await sim.until(lambda: any(t.status.state == types_pb2.FAILED for t in sim.tasks(svc.id)))
            sim.crash_images.clear()
            await sim.until(lambda: len(sim.live(svc.id)) == 2)
            await sim.store.update(lambda tx: tx.delete(tx.get("node", nodes[0].id)))
            await sim.until(lambda: len(sim.live(svc.id)) == 2 and all(
                t.node_id == nodes[1].id for t in sim.live(svc.id)), what="replaced on the remaining node")
            await sim.settle()
            for s in {t.slot for t in sim.tasks(svc.id)}:
                dead = [t for t in sim.tasks(svc.id) if t.slot == s and t.desired_state > types_pb2.RUNNING]
                assert len(dead) <= 1, sim.dump()
            assert slot in {t.slot for t in sim.live(svc.id)}

    run(main())


def test_rejected_replacements_come_one_restart_delay_apart() -> None:
    """A replacement rejected while it waits out its restart delay (a bad image) is itself replaced
    only once that delay is over, as in Docker: not as fast as the node rejects it."""

    async def main() -> None:
        sim = Sim()
        await sim.add_nodes(1)
        sim.reject_images.add("nosuch:1")
        policy = types_pb2.RestartPolicy(condition=types_pb2.RestartPolicy.ANY, delay=dur(0.3))
        async with sim.running():
            svc = await sim.create_service(service_spec("bad", replicas=1, image="nosuch:1", restart=policy))
            await sim.until(lambda: len(sim.tasks(svc.id)) >= 4, what="three replacements")
            tasks = sorted(sim.tasks(svc.id), key=lambda t: t.meta.created_at.ToNanoseconds())
            created = [t.meta.created_at.ToNanoseconds() / 1e9 for t in tasks]
            assert all(t.status.state == types_pb2.REJECTED for t in tasks[:3]), sim.dump()
            # the first replacement comes at once (with a delayed start); each later one a delay apart
            gaps = [b - a for a, b in zip(created[1:], created[2:], strict=False)]
            assert gaps and all(g >= 0.29 for g in gaps), (gaps, sim.dump())
            sim.check_slots()

    run(main())
