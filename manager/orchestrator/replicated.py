"""Replicated services: exactly `replicas` live slots, each holding one task of the current spec."""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Callable

from shoal.manager.orchestrator.base import WE, OrchestratorBase
from shoal.manager.orchestrator.common import (
    RUNNING,
    commit_chunks,
    copy_task,
    is_replicated,
    new_task,
    node_lost,
)
from shoal.manager.orchestrator.update import Slot
from shoal.manager.store import Tx
from shoal.proto import objects_pb2, types_pb2, watch_pb2

log = logging.getLogger("shoal.orchestrator.replicated")


class ReplicatedOrchestrator(OrchestratorBase):
    """Leader loop. `ReplicatedOrchestrator(store)`; `await run()` until cancelled.

    Per service: restarts tasks that ended (restart policy), replaces tasks of nodes that went down,
    were drained or removed (at once), fills missing slots with new tasks (lowest free slot numbers
    first), removes surplus slots on scale-down (tasks not running first, then the nth task on the
    busiest node, then the highest slot number; their tasks get desired_state REMOVE), and hands
    slots of an old template to the rolling updater.
    """

    name = "replicated orchestrator"

    def owns(self, svc: objects_pb2.Service) -> bool:
        return is_replicated(svc)

    def on_node_event(self, ev: watch_pb2.WatchEvent, node: objects_pb2.Node, old: objects_pb2.Node | None) -> None:
        if (
            ev.action == WE.DELETE
            or old is None
            or old.status.state != node.status.state
            or old.spec.availability != node.spec.availability
        ):
            self._dirty.update(self.services_on_node(node.id))

    def live_slots(self, svc: objects_pb2.Service, tasks: list[objects_pb2.Task]) -> dict[int, list[objects_pb2.Task]]:
        """Slots that count as filled: a task that should run, or a last task that ended and stays ended."""
        return self.live_tasks(
            svc, tasks, lambda t: t.slot,
            lambda slot, ts, latest: not any(t.desired_state == types_pb2.REMOVE for t in ts),
        )

    async def reconcile(self, service_id: str) -> None:
        sm = self.store.sm
        svc = self.service_to_reconcile(service_id)
        if svc is None:
            return
        tasks = sm.tasks_by_service(service_id)

        # 1. Tasks that ended (restart policy) and tasks whose node is gone, down or drained (at once).
        restart_ids, lost_ids = [], []
        for t in tasks:
            if t.desired_state > RUNNING:
                continue
            if t.status.state > RUNNING:
                if self.replace_when_due(t):
                    restart_ids.append(t.id)
            elif t.node_id and node_lost(sm.get("node", t.node_id)):
                lost_ids.append(t.id)
        svc = await self.shutdown_and_restart(svc, restart_ids, lost_ids)
        if svc is None:
            return
        tasks = sm.tasks_by_service(service_id)

        # 2. Scale.
        want = svc.spec.replicated.replicas
        live = self.live_slots(svc, tasks)
        builders: list[Callable[[Tx], None]] = []
        if len(live) < want:
            missing = want - len(live)
            slot, new_slots = 1, []
            while len(new_slots) < missing:
                if slot not in live:
                    new_slots.append(slot)
                slot += 1
            for s in new_slots:
                builders.append(self._create(svc, s))
            log.info("service %s (%s): %d of %d slots live, adding slots %s",
                     svc.id, svc.spec.annotations.name, len(live), want, _fmt(new_slots))
        elif len(live) > want:
            remove = self._choose_removals(live, len(live) - want)
            gone = set(remove)
            for t in tasks:
                if t.slot in gone and t.desired_state < types_pb2.REMOVE:
                    builders.append(self._set_desired(t.id, types_pb2.REMOVE))
            for s in remove:
                del live[s]
            log.info("service %s (%s): scaling down to %d, removing slots %s",
                     svc.id, svc.spec.annotations.name, want, _fmt(sorted(remove)))
        if builders:
            await commit_chunks(self.store, builders, f"scale service {svc.id}", chunk=1000)

        # 3. Rolling update of slots holding another template.
        self.updates.update(svc, [Slot(s, "", ts) for s, ts in sorted(live.items())])

    def _choose_removals(self, live: dict[int, list[objects_pb2.Task]], n: int) -> list[int]:
        per_node: dict[str, list[int]] = defaultdict(list)
        for slot, ts in live.items():
            per_node[ts[0].node_id].append(slot)
        index: dict[int, int] = {}
        for node_id, slots in per_node.items():
            for i, s in enumerate(sorted(slots)):
                index[s] = i if node_id else 1 << 30
        def key(s: int) -> tuple[int, int, int]:
            running = any(t.status.state == RUNNING for t in live[s])
            return (1 if running else 0, -index[s], -s)
        return sorted(live, key=key)[:n]

    def _create(self, svc: objects_pb2.Service, slot: int) -> Callable[[Tx], None]:
        def fn(tx: Tx) -> None:
            if tx.get("service", svc.id) is None:
                return
            tx.create(new_task(svc, slot=slot))
        return fn

    @staticmethod
    def _set_desired(tid: str, state: int) -> Callable[[Tx], None]:
        def fn(tx: Tx) -> None:
            t = tx.get("task", tid)
            if t is None or t.desired_state >= state:
                return
            t = copy_task(t)
            t.desired_state = state  # type: ignore[assignment]
            tx.update(t)
        return fn


def _fmt(slots: list[int]) -> str:
    if len(slots) <= 10:
        return ",".join(map(str, slots))
    return f"{slots[0]}..{slots[-1]} ({len(slots)})"
