"""The loop both orchestrators share: watch, batch events, reconcile the services they touched."""

from __future__ import annotations

import asyncio
import logging
import time
from collections import defaultdict
from collections.abc import Callable, Coroutine, Hashable
from typing import Any, TypeVar

from shoal.manager.orchestrator.common import (
    ENDED_BY_ITSELF,
    RUNNING,
    TaskWaiters,
    commit_chunks,
    created_key,
    drain_events,
    is_live_service,
    node_lost,
    restart_delay,
    shut_down,
)
from shoal.manager.orchestrator.restart import DEFAULT_OLD_TASK_TIMEOUT, DelayedStart, RestartSupervisor
from shoal.manager.orchestrator.update import US, UpdateSupervisor, update_state
from shoal.manager.pacing import Pacer
from shoal.manager.store import Store, Tx
from shoal.proto import objects_pb2, types_pb2, watch_pb2

log = logging.getLogger("shoal.orchestrator")

WE = watch_pb2.WatchEvent
K = TypeVar("K", bound=Hashable)


class OrchestratorBase:
    """Subclasses say which services are theirs and how to reconcile one."""

    name = "orchestrator"

    def __init__(self, store: Store, debounce: float = 0.02, old_task_timeout: float = DEFAULT_OLD_TASK_TIMEOUT):
        self.store = store
        self.debounce = debounce
        self.pacer = Pacer(debounce)
        self.old_task_timeout = old_task_timeout
        self.waiters = TaskWaiters()
        self._dirty: set[str] = set()
        self._tg: asyncio.TaskGroup | None = None
        self.restarts: RestartSupervisor
        self.updates: UpdateSupervisor
        self.reconciles = 0  # for tests and logs
        self.retry = 1.0  # seconds before a failed reconcile (e.g. no quorum) is tried again
        self._queue: asyncio.Queue[Any] | None = None
        self.idle = asyncio.Event()
        self._later: dict[str, float] = {}  # service id -> when a deferred reconcile is due

    # ---- subclass hooks ----------------------------------------------------------------------
    def owns(self, svc: objects_pb2.Service) -> bool:
        raise NotImplementedError

    def service_to_reconcile(self, service_id: str) -> objects_pb2.Service | None:
        """The service to reconcile: live (not removed or being removed) and ours; else None, and a
        rolling update of it stops."""
        svc = self.store.sm.get("service", service_id)
        if not is_live_service(svc) or not self.owns(svc):
            self.updates.cancel(service_id)
            return None
        return svc

    async def reconcile(self, service_id: str) -> None:
        raise NotImplementedError

    def on_node_event(self, ev: watch_pb2.WatchEvent, node: objects_pb2.Node, old: objects_pb2.Node | None) -> None:
        raise NotImplementedError

    # ---- loop --------------------------------------------------------------------------------
    def _spawn(self, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        assert self._tg is not None
        return self._tg.create_task(coro)

    async def run(self) -> None:
        log.info("%s started", self.name)
        # Unfiltered: a filtered watch copies every event of every transaction; other kinds are ignored.
        with self.store.watch() as w:
            self._queue = w.queue
            async with asyncio.TaskGroup() as tg:
                self._tg = tg
                self.restarts = RestartSupervisor(self.store, self.waiters, self._spawn, self.old_task_timeout)
                self.updates = UpdateSupervisor(self.store, self.restarts, self.waiters, self._spawn)
                try:
                    self._startup()
                    while True:
                        with self.pacer.timing():
                            await self._reconcile_dirty()
                        self.idle.set()
                        ok = await drain_events(w.queue, self._on_message, self.pacer.pause())
                        self.idle.clear()
                        if not ok:
                            break
                finally:
                    self.updates.cancel_all()
                    self.restarts.cancel_all()
                    log.info("%s stopped", self.name)

    def _startup(self) -> None:
        sm = self.store.sm
        now = time.time()
        for svc in sm.list("service"):
            if svc.pending_delete or not self.owns(svc):
                continue
            self._dirty.add(svc.id)
            # Replacements that were waiting (restart delay, old task stopping) when the last leader stopped.
            tasks = sm.tasks_by_service(svc.id)
            for t in tasks:
                if t.desired_state < RUNNING and t.status.state <= RUNNING and t.desired_state != types_pb2.NEW:
                    created = t.meta.created_at.seconds + t.meta.created_at.nanos / 1e9
                    remaining = max(0.0, created + restart_delay(t.spec) - now)
                    old = next(
                        (
                            o
                            for o in tasks
                            if o.id != t.id
                            and (o.node_id == t.node_id if not t.slot else o.slot == t.slot)
                            and o.desired_state > RUNNING
                            and types_pb2.ASSIGNED <= o.status.state <= RUNNING
                        ),
                        None,
                    )
                    self.restarts.delay_start(DelayedStart(t.id, remaining, old, wait_stop=old is not None))

    async def _reconcile_dirty(self) -> None:
        while self._dirty:
            sid = self._dirty.pop()
            try:
                self.reconciles += 1
                await self.reconcile(sid)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("%s: reconcile of service %s failed; retrying in %.0f s", self.name, sid, self.retry)
                self._spawn(self._retry_later(sid))

    def replace_when_due(self, t: objects_pb2.Task) -> bool:
        """Whether an ended task may be replaced now. A replacement that ended before it was ever
        released to run (rejected or failed while its restart delay ran: a bad image, a registry
        that is down) is itself replaced only once that delay is over, as in Docker -- not as fast as
        the node rejects it. Otherwise a reconcile of its service is scheduled for when it is due."""
        if t.desired_state != types_pb2.READY:
            return True
        created = t.meta.created_at.seconds + t.meta.created_at.nanos / 1e9
        wait = created + restart_delay(t.spec) - time.time()
        if wait <= 0:
            return True
        due = time.monotonic() + wait
        if self._later.get(t.service_id, float("inf")) > due:
            self._later[t.service_id] = due
            self._spawn(self._reconcile_at(t.service_id, due))
        return False

    async def _reconcile_at(self, service_id: str, due: float) -> None:
        await asyncio.sleep(max(0.0, due - time.monotonic()))
        if self._later.get(service_id) == due:
            del self._later[service_id]
        self._dirty.add(service_id)
        if self._queue is not None:
            self._queue.put_nowait(watch_pb2.WatchMessage())  # wake the loop

    async def _retry_later(self, service_id: str) -> None:
        await asyncio.sleep(self.retry)
        self._dirty.add(service_id)
        if self._queue is not None:
            self._queue.put_nowait(watch_pb2.WatchMessage())  # wake the loop

    def _on_message(self, msg: watch_pb2.WatchMessage) -> None:
        for ev in msg.events:
            self.waiters.notify_event(ev)
            kind = ev.object.WhichOneof("object")
            obj = getattr(ev.object, kind)
            old = getattr(ev.old_object, kind) if ev.HasField("old_object") else None
            if kind == "service":
                if ev.action == WE.DELETE or obj.pending_delete:
                    self.updates.cancel(obj.id)
                    self.restarts.forget_service(obj.id)
                    self._dirty.discard(obj.id)
                elif self.owns(obj):
                    self._dirty.add(obj.id)
            elif kind == "task":
                self.updates.on_task(obj)
                if ev.action == WE.CREATE:
                    continue
                if ev.action == WE.DELETE or old is None:
                    self._dirty.add(obj.service_id)
                elif (
                    old.desired_state != obj.desired_state
                    or (obj.status.state > RUNNING and old.status.state != obj.status.state)
                    # an assignment (a fleet's thousands) changes nothing to reconcile, unless its
                    # node was lost meanwhile
                    or (old.node_id != obj.node_id
                        and (old.node_id or node_lost(self.store.sm.get("node", obj.node_id))))
                ):
                    self._dirty.add(obj.service_id)
            elif kind == "node":
                self.on_node_event(ev, obj, old)

    # ---- helpers for subclasses --------------------------------------------------------------
    def services_on_node(self, node_id: str) -> set[str]:
        return {t.service_id for t in self.store.sm.tasks_by_node(node_id)}

    def live_tasks(
        self,
        svc: objects_pb2.Service,
        tasks: list[objects_pb2.Task],
        key: Callable[[objects_pb2.Task], K],
        ended_counts: Callable[[K, list[objects_pb2.Task], objects_pb2.Task], bool],
    ) -> dict[K, list[objects_pb2.Task]]:
        """The places (`key` of a task: a slot, a node) that count as filled, with their tasks: those
        that should run; else the latest task when it ended by itself and stays ended (no restart
        due by the policy, no rollback under way) and `ended_counts(place, its tasks, latest)`."""
        by_key: dict[K, list[objects_pb2.Task]] = defaultdict(list)
        for t in tasks:
            by_key[key(t)].append(t)
        rollback = update_state(svc) == US.ROLLBACK_STARTED
        live: dict[K, list[objects_pb2.Task]] = {}
        for k, ts in by_key.items():
            runnable = [t for t in ts if t.desired_state <= RUNNING]
            if runnable:
                live[k] = runnable
                continue
            latest = max(ts, key=created_key)
            if (
                ended_counts(k, ts, latest)
                and latest.status.state in ENDED_BY_ITSELF
                and not rollback
                and not self.restarts.should_restart(latest, svc)
            ):
                live[k] = [latest]
        return live

    async def shutdown_and_restart(
        self, svc: objects_pb2.Service, restart_ids: list[str], shutdown_ids: list[str]
    ) -> objects_pb2.Service | None:
        """Restart ended tasks (by policy) and shut down tasks that must go; the service as it is
        then (read again when anything was written), or None when it is no longer live."""
        if not restart_ids and not shutdown_ids:
            return svc
        plans: list[DelayedStart | None] = []

        def restart_one(tid: str) -> Callable[[Tx], None]:
            return lambda tx: plans.append(self.restarts.restart(tx, svc, tid))

        def shutdown_one(tid: str) -> Callable[[Tx], None]:
            return lambda tx: shut_down(tx, tid)

        builders = [restart_one(t) for t in restart_ids] + [shutdown_one(t) for t in shutdown_ids]
        await commit_chunks(self.store, builders, f"restart tasks of service {svc.id}")
        for tid in shutdown_ids:
            self.restarts.cancel(tid)
            log.info("%s: task %s of service %s shut down (node lost or unfit), replacing it", self.name, tid, svc.id)
        self.restarts.after_commit(plans)
        cur = self.store.sm.get("service", svc.id)
        return cur if is_live_service(cur) else None

    async def wait_idle(self) -> None:
        """For tests: until the loop has handled everything queued so far."""
        await self.idle.wait()
