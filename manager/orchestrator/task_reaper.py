"""Task reaper: deletes dead tasks beyond the history limit, and tasks of removed services once stopped."""

from __future__ import annotations

import asyncio
import logging
from collections import defaultdict
from collections.abc import Callable

from shoal.manager.orchestrator.common import (
    RUNNING,
    commit_chunks,
    copy_task,
    created_key,
    drain_events,
    history_limit,
)
from shoal.manager.pacing import Pacer
from shoal.manager.store import Store, Tx
from shoal.proto import objects_pb2, types_pb2, watch_pb2

log = logging.getLogger("shoal.orchestrator.reaper")

WE = watch_pb2.WatchEvent


def is_dead(t: objects_pb2.Task) -> bool:
    """Stopped for good, or told to stop before any agent got it."""
    return t.status.state > RUNNING or (t.desired_state > RUNNING and t.status.state < types_pb2.ASSIGNED)


def history_key(t: objects_pb2.Task) -> tuple[str, int, str]:
    return (t.service_id, t.slot, "" if t.slot else t.node_id)


class TaskReaper:
    """Leader loop. `TaskReaper(store)`; `await run()` until cancelled.

    - keeps at most the cluster's task_history_retention_limit (default 5; < 0 keeps all) dead tasks
      per slot (per node for global services), deleting the oldest;
    - deletes tasks with desired_state REMOVE once they stopped, were never assigned, or their node
      is down or gone; tasks whose service no longer exists get desired_state REMOVE first;
    - deletes a service marked pending_delete once it has no task left.
    """

    def __init__(self, store: Store, debounce: float = 0.05) -> None:
        self.store = store
        self.debounce = debounce
        self.pacer = Pacer(debounce)
        self._keys: set[tuple[str, int, str]] = set()
        self._remove_candidates: set[str] = set()
        self._services: set[str] = set()
        self._full = True
        self.idle = asyncio.Event()

    async def run(self) -> None:
        log.info("task reaper started")
        # Unfiltered: a filtered watch copies every event of every transaction; other kinds are ignored.
        with self.store.watch() as w:
            while True:
                try:
                    with self.pacer.timing():
                        await self.tick()
                except asyncio.CancelledError:
                    raise
                except Exception:
                    log.exception("task reaper pass failed; retrying in 1 s")
                    self._full = True
                    asyncio.get_running_loop().call_later(1.0, w.queue.put_nowait, watch_pb2.WatchMessage())
                self.idle.set()
                ok = await drain_events(w.queue, self._on_message, self.pacer.pause())
                self.idle.clear()
                if not ok:
                    return

    def _on_message(self, msg: watch_pb2.WatchMessage) -> None:
        for ev in msg.events:
            kind = ev.object.WhichOneof("object")
            obj = getattr(ev.object, kind)
            if kind == "task":
                if ev.action == WE.DELETE:
                    self._services.add(obj.service_id)
                    continue
                if obj.desired_state == types_pb2.REMOVE:
                    self._remove_candidates.add(obj.id)
                if is_dead(obj):
                    self._keys.add(history_key(obj))
            elif kind == "service":
                if ev.action == WE.DELETE or obj.pending_delete:
                    self._services.add(obj.id)
            elif kind == "node":
                if ev.action == WE.DELETE or obj.status.state == types_pb2.NodeStatus.DOWN:
                    for t in self.store.sm.tasks_by_node(obj.id):
                        if t.desired_state == types_pb2.REMOVE:
                            self._remove_candidates.add(t.id)
                        elif ev.action == WE.DELETE:
                            self._keys.add(history_key(t))
            elif kind == "cluster":
                self._full = True

    async def tick(self) -> None:
        sm = self.store.sm
        limit = history_limit(self.store)
        builders: list[Callable[[Tx], None]] = []
        if self._full:
            self._full = False
            all_tasks = sm.list("task")
            self._keys = {history_key(t) for t in all_tasks if is_dead(t) or _orphaned(sm, t)}
            self._remove_candidates = {t.id for t in all_tasks if t.desired_state == types_pb2.REMOVE}
            self._services = {t.service_id for t in all_tasks} | {s.id for s in sm.list("service") if s.pending_delete}
        keys, self._keys = self._keys, set()
        cands, self._remove_candidates = self._remove_candidates, set()
        services, self._services = self._services, set()

        # Tasks of services that are gone.
        for sid in services:
            svc = sm.get("service", sid)
            tasks = sm.tasks_by_service(sid)
            if svc is None or svc.pending_delete:
                for t in tasks:
                    if t.desired_state < types_pb2.REMOVE:
                        builders.append(_set_remove(t.id))
                    cands.add(t.id)
                if svc is not None and not tasks:
                    builders.append(_delete_service(sid))

        # Tasks told to go away.
        for tid in cands:
            t = sm.get("task", tid)
            if t is None:
                continue
            if t.desired_state == types_pb2.REMOVE or sm.get("service", t.service_id) is None:
                if _removable(sm, t):
                    builders.append(_delete(tid))

        # History per slot.
        if limit >= 0 and keys:
            by_key: dict[tuple[str, int, str], list[objects_pb2.Task]] = defaultdict(list)
            for sid in {k[0] for k in keys}:
                for t in sm.tasks_by_service(sid):
                    k = history_key(t)
                    if k in keys and t.desired_state != types_pb2.REMOVE and (is_dead(t) or _orphaned(sm, t)):
                        by_key[k].append(t)
            for dead in by_key.values():
                if len(dead) > limit:
                    dead.sort(key=created_key)
                    for t in dead[: len(dead) - limit]:
                        builders.append(_delete(t.id))
        if builders:
            log.info("task reaper: %d changes", len(builders))
            await commit_chunks(self.store, builders, "task reaper", chunk=1000)
            # Deleting the last tasks of a pending-delete service lets the service go next pass.
            self._services |= {s.id for s in sm.list("service") if s.pending_delete}

    async def wait_idle(self) -> None:
        await self.idle.wait()


def _orphaned(sm: object, t: objects_pb2.Task) -> bool:
    """Told to stop on a node that was removed from the cluster: nobody will ever report it stopped."""
    return t.desired_state > RUNNING and bool(t.node_id) and sm.get("node", t.node_id) is None  # type: ignore[attr-defined]


def _removable(sm: object, t: objects_pb2.Task) -> bool:
    if is_dead(t) or t.status.state < types_pb2.ASSIGNED or not t.node_id:
        return True
    node = sm.get("node", t.node_id)  # type: ignore[attr-defined]
    return node is None or node.status.state == types_pb2.NodeStatus.DOWN


def _delete(tid: str) -> Callable[[Tx], None]:
    def fn(tx: Tx) -> None:
        t = tx.get("task", tid)
        if t is not None:
            tx.delete(t)

    return fn


def _set_remove(tid: str) -> Callable[[Tx], None]:
    def fn(tx: Tx) -> None:
        t = tx.get("task", tid)
        if t is None or t.desired_state >= types_pb2.REMOVE:
            return
        t = copy_task(t)
        t.desired_state = types_pb2.REMOVE
        tx.update(t)

    return fn


def _delete_service(sid: str) -> Callable[[Tx], None]:
    def fn(tx: Tx) -> None:
        s = tx.get("service", sid)
        if s is not None and s.pending_delete and not tx.sm.tasks_by_service(sid):
            tx.delete(s)

    return fn
