"""Rolling updates and rollbacks on a simulated cluster."""

from __future__ import annotations

import asyncio
import time

from helpers.aio import run_bounded as run
from orchestrator_sim import Sim, dur, service_spec

from shoal.proto import types_pb2

UC = types_pb2.UpdateConfig


def set_image(image: str):
    return lambda s: s.task.container.__setattr__("image", image)


def test_update_parallelism_2_with_delay() -> None:
    async def main() -> None:
        sim = Sim()
        await sim.add_nodes(3)
        cfg = UC(parallelism=2, delay=dur(0.2), monitor=dur(0.05))
        async with sim.running():
            svc = await sim.create_service(service_spec("web", replicas=6, update=cfg))
            await sim.until(lambda: len(sim.live(svc.id)) == 6)
            started: dict[str, float] = {}
            max_down = 0

            def observe(s: Sim) -> None:
                nonlocal max_down
                for t in s.tasks(svc.id):
                    if t.spec.container.image == "busybox:2" and t.id not in started:
                        started[t.id] = time.monotonic()
                old_stopping = [
                    t for t in s.tasks(svc.id)
                    if t.spec.container.image == "busybox:1" and t.desired_state > types_pb2.RUNNING
                    and t.status.state <= types_pb2.RUNNING
                ]
                new_not_running = [
                    t for t in s.tasks(svc.id)
                    if t.spec.container.image == "busybox:2" and t.status.state < types_pb2.RUNNING
                ]
                max_down = max(max_down, len(old_stopping), len(new_not_running))

            sim.observers.append(observe)
            await sim.update_service(svc.id, set_image("busybox:2"))
            await sim.until(lambda: sim.update_state(svc.id) == "UPDATING", what="updating")
            await sim.until(lambda: sim.update_state(svc.id) == "COMPLETED", what="completed")
            assert sim.service(svc.id).update_status.message == "update completed"
            live = sim.live(svc.id)
            assert len(live) == 6 and all(t.spec.container.image == "busybox:2" for t in live)
            assert all(t.spec_version == 2 for t in live)
            assert max_down <= 2, max_down
            # Three batches of two, at least the delay apart.
            times = sorted(started.values())
            assert len(times) == 6
            batches = [times[0]]
            for t in times[1:]:
                if t - batches[-1] >= 0.15:
                    batches.append(t)
            assert len(batches) == 3, times
            sim.check_slots()

    run(main())


def test_update_failure_pauses() -> None:
    async def main() -> None:
        sim = Sim()
        await sim.add_nodes(2)
        sim.fail_images.add("bad:1")
        cfg = UC(parallelism=1, monitor=dur(1), failure_action=UC.PAUSE)
        async with sim.running():
            svc = await sim.create_service(service_spec("web", replicas=3, update=cfg))
            await sim.until(lambda: len(sim.live(svc.id)) == 3)
            await sim.update_service(svc.id, set_image("bad:1"))
            await sim.until(lambda: sim.update_state(svc.id) == "PAUSED", what="paused")
            msg = sim.service(svc.id).update_status.message
            assert msg.startswith("update paused due to failure or early termination of task "), msg
            await asyncio.sleep(0.3)
            # One slot was tried (its task keeps restarting by its policy); the other two still run the old image.
            old = [t for t in sim.live(svc.id) if t.spec.container.image == "busybox:1"]
            assert len(old) == 2, sim.dump()

    run(main())


def test_update_failure_rolls_back() -> None:
    async def main() -> None:
        sim = Sim()
        await sim.add_nodes(3)
        sim.fail_images.add("bad:1")
        cfg = UC(parallelism=2, monitor=dur(1), failure_action=UC.ROLLBACK)
        async with sim.running():
            svc = await sim.create_service(service_spec("web", replicas=4, update=cfg))
            await sim.until(lambda: len(sim.live(svc.id)) == 4)
            await sim.update_service(svc.id, set_image("bad:1"))
            await sim.until(lambda: sim.update_state(svc.id) == "ROLLBACK_COMPLETED", what="rolled back")
            s = sim.service(svc.id)
            assert s.spec.task.container.image == "busybox:1" and s.spec_version == 1
            assert s.update_status.message == "rollback completed"
            await sim.until(lambda: len(sim.live(svc.id)) == 4)
            assert all(t.spec.container.image == "busybox:1" for t in sim.live(svc.id))
            sim.check_slots()

    run(main())


def test_manual_rollback() -> None:
    async def main() -> None:
        sim = Sim()
        await sim.add_nodes(2)
        async with sim.running():
            svc = await sim.create_service(service_spec("web", replicas=2))
            await sim.until(lambda: len(sim.live(svc.id)) == 2)
            await sim.update_service(svc.id, set_image("busybox:2"))
            await sim.until(lambda: sim.update_state(svc.id) == "COMPLETED")
            await sim.rollback_service(svc.id)
            await sim.until(lambda: sim.update_state(svc.id) == "ROLLBACK_COMPLETED")
            assert sorted(t.spec.container.image for t in sim.live(svc.id)) == ["busybox:1", "busybox:1"]

    run(main())


def test_start_first_order() -> None:
    async def main() -> None:
        sim = Sim()
        await sim.add_nodes(2)
        cfg = UC(parallelism=1, monitor=dur(0.05), order=UC.START_FIRST)
        async with sim.running():
            svc = await sim.create_service(service_spec("web", replicas=2, update=cfg))
            await sim.until(lambda: len(sim.live(svc.id)) == 2)
            overlap = False
            min_live = 2

            def observe(s: Sim) -> None:
                nonlocal overlap, min_live
                live = s.live(svc.id)
                min_live = min(min_live, len(live))
                slots = [t.slot for t in live]
                if len(slots) != len(set(slots)):
                    overlap = True

            sim.observers.append(observe)
            await sim.update_service(svc.id, set_image("busybox:2"))
            await sim.until(lambda: sim.update_state(svc.id) == "COMPLETED")
            # The new task ran next to the old one of its slot; service never dropped below 2.
            assert overlap
            assert min_live == 2
            await sim.until(lambda: len(sim.live(svc.id)) == 2)
            assert all(t.spec.container.image == "busybox:2" for t in sim.live(svc.id))

    run(main())


def test_force_update_replaces_tasks_and_parallelism_0() -> None:
    async def main() -> None:
        sim = Sim()
        await sim.add_nodes(2)
        async with sim.running():
            svc = await sim.create_service(service_spec("web", replicas=4, update=UC(parallelism=0, monitor=dur(0.05))))
            await sim.until(lambda: len(sim.live(svc.id)) == 4)
            before = {t.id for t in sim.live(svc.id)}
            await sim.update_service(svc.id, lambda s: s.task.__setattr__("force_update", 1))
            await sim.until(lambda: sim.update_state(svc.id) == "COMPLETED")
            await sim.until(lambda: len(sim.live(svc.id)) == 4)
            assert not before & {t.id for t in sim.live(svc.id)}

    run(main())


def test_scale_only_does_not_update_tasks() -> None:
    async def main() -> None:
        sim = Sim()
        await sim.add_nodes(2)
        async with sim.running():
            svc = await sim.create_service(service_spec("web", replicas=2))
            await sim.until(lambda: len(sim.live(svc.id)) == 2)
            before = {t.id for t in sim.live(svc.id)}
            await sim.scale(svc.id, 3)
            await sim.until(lambda: len(sim.live(svc.id)) == 3)
            await sim.settle()
            assert before <= {t.id for t in sim.live(svc.id)}
            assert not sim.service(svc.id).HasField("update_status")

    run(main())


def test_placement_only_change_replaces_only_tasks_that_no_longer_fit() -> None:
    async def main() -> None:
        sim = Sim()
        await sim.add_node("a1", labels={"zone": "a"})
        await sim.add_node("a2", labels={"zone": "a"})
        b = await sim.add_node("b1", labels={"zone": "b"})
        async with sim.running():
            svc = await sim.create_service(service_spec("web", replicas=3))
            await sim.until(lambda: len(sim.live(svc.id)) == 3)
            before = {t.id: t.node_id for t in sim.live(svc.id)}
            await sim.update_service(svc.id, lambda s: s.task.placement.constraints.append("node.labels.zone==a"))
            await sim.until(lambda: sim.update_state(svc.id) == "COMPLETED")
            await sim.until(lambda: len(sim.live(svc.id)) == 3)
            after = {t.id: t.node_id for t in sim.live(svc.id)}
            assert b.id not in after.values()
            # Tasks on zone a nodes were kept; only the one on b was replaced.
            kept = {tid for tid, nid in before.items() if nid != b.id}
            assert kept <= set(after), (before, after)
            assert len(set(after) - set(before)) == 1

    run(main())
