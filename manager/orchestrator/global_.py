"""Global services: one task on every eligible node."""

from __future__ import annotations

import logging
from collections.abc import Callable

from shoal.manager.orchestrator.base import WE, OrchestratorBase
from shoal.manager.orchestrator.common import (
    RUNNING,
    commit_chunks,
    is_global,
    new_task,
    node_fits_spec,
    node_ready_active,
)
from shoal.manager.orchestrator.update import Slot
from shoal.manager.store import Tx
from shoal.proto import objects_pb2, types_pb2, watch_pb2

log = logging.getLogger("shoal.orchestrator.global")


def keeps_tasks(svc: objects_pb2.Service, node: objects_pb2.Node | None) -> bool:
    """A node may keep its task of the service: it exists, is not down or drained, and fits the placement."""
    return (
        node is not None
        and node.status.state != types_pb2.NodeStatus.DOWN
        and node.spec.availability != types_pb2.DRAIN
        and node_fits_spec(svc.spec.task, node)
    )


def gets_task(svc: objects_pb2.Service, node: objects_pb2.Node | None) -> bool:
    """A node gets a new task of the service: it is ready, active and fits the placement."""
    return node_ready_active(node) and node_fits_spec(svc.spec.task, node)  # type: ignore[arg-type]


class GlobalOrchestrator(OrchestratorBase):
    """Leader loop. `GlobalOrchestrator(store)`; `await run()` until cancelled.

    Follows nodes joining (a task on each new ready, active node that fits the constraints), leaving,
    going down, being drained or relabelled (their tasks are shut down), restarts ended tasks on the
    same node by the restart policy, and rolls updates node by node.
    """

    name = "global orchestrator"

    def owns(self, svc: objects_pb2.Service) -> bool:
        return is_global(svc)

    def on_node_event(self, ev: watch_pb2.WatchEvent, node: objects_pb2.Node, old: objects_pb2.Node | None) -> None:
        if ev.action == WE.UPDATE and old is not None:
            if (
                old.status.state == node.status.state
                and old.spec == node.spec
                and old.description == node.description
                and old.role == node.role
            ):
                return
        for svc in self.store.sm.list("service"):
            if is_global(svc) and not svc.pending_delete:
                self._dirty.add(svc.id)

    async def reconcile(self, service_id: str) -> None:
        sm = self.store.sm
        svc = self.service_to_reconcile(service_id)
        if svc is None:
            return
        nodes = {n.id: n for n in sm.list("node")}
        tasks = sm.tasks_by_service(service_id)

        restart_ids, gone_ids = [], []
        for t in tasks:
            if t.desired_state > RUNNING:
                continue
            if not keeps_tasks(svc, nodes.get(t.node_id)):
                gone_ids.append(t.id)
            elif t.status.state > RUNNING:
                if self.replace_when_due(t):
                    restart_ids.append(t.id)
        svc = await self.shutdown_and_restart(svc, restart_ids, gone_ids)
        if svc is None:
            return
        tasks = sm.tasks_by_service(service_id)

        live = self.live_tasks(
            svc, tasks, lambda t: t.node_id,
            lambda node_id, ts, latest: latest.desired_state != types_pb2.REMOVE
            and keeps_tasks(svc, nodes.get(node_id)),
        )

        builders: list[Callable[[Tx], None]] = []
        added = []
        for node in nodes.values():
            if node.id not in live and gets_task(svc, node):
                builders.append(self._create(svc, node.id))
                added.append(node.id)
        if builders:
            log.info("service %s (%s): adding tasks on nodes %s", svc.id, svc.spec.annotations.name, ",".join(added))
            await commit_chunks(self.store, builders, f"global service {svc.id}", chunk=1000)

        self.updates.update(svc, [Slot(0, nid, ts) for nid, ts in sorted(live.items())])

    @staticmethod
    def _create(svc: objects_pb2.Service, node_id: str) -> Callable[[Tx], None]:
        def fn(tx: Tx) -> None:
            if tx.get("service", svc.id) is None:
                return
            tx.create(new_task(svc, node_id=node_id))

        return fn
