"""Constraint enforcer: shuts down tasks a node no longer fits (labels, role, platform, resources)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from shoal.manager.orchestrator.common import RUNNING, commit_chunks, copy_task, created_key, node_fits_spec
from shoal.manager.store import Store, Tx
from shoal.proto import objects_pb2, types_pb2, watch_pb2

log = logging.getLogger("shoal.orchestrator.constraints")

WE = watch_pb2.WatchEvent

FIRST_PASS_CHUNK = 100  # nodes checked in the first pass between two yields of the event loop


class ConstraintEnforcer:
    """Leader loop. `ConstraintEnforcer(store)`; `await run()` until cancelled.

    When a node changes so that a task placed on it no longer satisfies its placement constraints
    (node labels, engine labels, role, hostname, platform) or the node's resources no longer cover the
    reservations of its tasks, those tasks get desired_state SHUTDOWN; their orchestrator replaces
    them and the scheduler places the replacements on nodes that fit. Drained nodes are left to the
    orchestrators.
    """

    def __init__(self, store: Store) -> None:
        self.store = store
        self.idle = asyncio.Event()

    async def run(self) -> None:
        log.info("constraint enforcer started")
        with self.store.watch(["node"]) as w:
            for i, node_id in enumerate([n.id for n in self.store.sm.list("node")], 1):
                if i % FIRST_PASS_CHUNK == 0:
                    await asyncio.sleep(0)  # a fleet's sessions and heartbeats in between
                node = self.store.sm.get("node", node_id)  # as it is now
                if node is not None:
                    await self._enforce(node)
            while True:
                self.idle.set()
                msg = await w.queue.get()
                self.idle.clear()
                if msg is None:
                    return
                for ev in msg.events:
                    node = ev.object.node
                    if ev.action == WE.DELETE:
                        continue
                    if ev.action == WE.UPDATE:
                        old = ev.old_object.node
                        if old.spec == node.spec and old.description == node.description and old.role == node.role:
                            continue
                    try:
                        await self._enforce(node)
                    except asyncio.CancelledError:
                        raise
                    except Exception:
                        log.exception("constraint check of node %s failed", node.id)

    def violations(self, node: objects_pb2.Node) -> list[tuple[objects_pb2.Task, str]]:
        tasks = [
            t
            for t in self.store.sm.tasks_by_node(node.id)
            if t.desired_state <= RUNNING and types_pb2.ASSIGNED <= t.status.state <= RUNNING
        ]
        out: list[tuple[objects_pb2.Task, str]] = []
        keep = []
        for t in tasks:
            if not node_fits_spec(t.spec, node):
                out.append((t, "placement constraints no longer met"))
            else:
                keep.append(t)
        res = node.description.resources
        if res.nano_cpus or res.memory_bytes:
            cpu = sum(t.spec.resources.reservations.nano_cpus for t in keep)
            mem = sum(t.spec.resources.reservations.memory_bytes for t in keep)
            over = (res.nano_cpus and cpu > res.nano_cpus) or (res.memory_bytes and mem > res.memory_bytes)
            for t in sorted(keep, key=created_key, reverse=True) if over else ():  # newest go first
                over_cpu = res.nano_cpus and cpu > res.nano_cpus
                over_mem = res.memory_bytes and mem > res.memory_bytes
                if not (over_cpu or over_mem):
                    break
                r = t.spec.resources.reservations
                if not (r.nano_cpus or r.memory_bytes):
                    continue
                out.append((t, "node resources no longer cover its reservation"))
                cpu -= r.nano_cpus
                mem -= r.memory_bytes
        return out

    async def _enforce(self, node: objects_pb2.Node) -> None:
        bad = self.violations(node)
        if not bad:
            return
        builders: list[Callable[[Tx], None]] = []
        for t, why in bad:
            log.info("task %s of service %s on node %s shut down: %s", t.id, t.service_id, node.id, why)
            builders.append(_shutdown(t.id, node.id))
        await commit_chunks(self.store, builders, f"constraint enforcement on node {node.id}")

    async def wait_idle(self) -> None:
        await self.idle.wait()


def _shutdown(tid: str, node_id: str) -> Callable[[Tx], None]:
    def fn(tx: Tx) -> None:
        t = tx.get("task", tid)
        if t is None or t.node_id != node_id or t.desired_state > RUNNING:
            return
        t = copy_task(t)
        t.desired_state = types_pb2.SHUTDOWN
        tx.update(t)

    return fn
