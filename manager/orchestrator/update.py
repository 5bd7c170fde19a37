"""Rolling updates and rollbacks of a service's tasks.

`UpdateSupervisor.update(service, slots)` is called by an orchestrator at every reconcile with the
service's live slots; when some slot holds a task of another template (or more than one task), an
`Updater` walks the dirty slots with `parallelism` workers (0 = all at once), waiting `delay` after
each slot. Order stop-first shuts the old task down and starts the new one once the old has stopped;
start-first starts the new one and shuts the old down once the new one runs. A new task that fails
within the monitor period (default 5 s) after it started counts as a failure; once
failures / dirty slots > max_failure_ratio, the failure action applies: pause (update_status PAUSED),
continue, or rollback (spec := previous_spec, update_status ROLLBACK_STARTED, then the rollback
config drives the walk back). A rollback is never rolled back: it pauses (ROLLBACK_PAUSED). After the
last slot the update is watched for one more monitor period and then marked COMPLETED (or
ROLLBACK_COMPLETED), as `docker service inspect` shows it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

from shoal.manager.orchestrator.common import (
    ENDED_BY_ITSELF,
    RUNNING,
    TaskWaiters,
    commit,
    copy_service,
    copy_task,
    is_global,
    is_task_dirty,
    monitor_period,
    new_task,
    seconds,
    shut_down,
    update_config,
)
from shoal.manager.orchestrator.restart import DelayedStart, RestartSupervisor
from shoal.manager.store import Store, Tx
from shoal.proto import objects_pb2, types_pb2

log = logging.getLogger("shoal.orchestrator.update")

US = types_pb2.UpdateStatus
IN_PROGRESS = (US.UPDATING, US.ROLLBACK_STARTED)
PAUSED_STATES = (US.PAUSED, US.ROLLBACK_PAUSED)


@dataclass
class Slot:
    """One replicated slot (`slot` > 0) or one node of a global service (`node_id`), with its live tasks."""

    slot: int
    node_id: str
    tasks: list[objects_pb2.Task]


def update_state(svc: objects_pb2.Service) -> int:
    return svc.update_status.state if svc.HasField("update_status") else US.UNKNOWN


def slot_dirty(svc: objects_pb2.Service, s: Slot, sm: Any = None) -> bool:
    return len(s.tasks) > 1 or (len(s.tasks) == 1 and is_task_dirty(svc, s.tasks[0], sm))


class UpdateSupervisor:
    def __init__(
        self,
        store: Store,
        restarts: RestartSupervisor,
        waiters: TaskWaiters,
        spawn: Callable[[Coroutine[Any, Any, None]], asyncio.Task[None]],
    ) -> None:
        self.store = store
        self.restarts = restarts
        self.waiters = waiters
        self.spawn = spawn
        self._updates: dict[str, tuple[Updater, asyncio.Task[None]]] = {}

    def update(self, svc: objects_pb2.Service, slots: list[Slot]) -> None:
        cur = self._updates.get(svc.id)
        if cur is not None and not cur[1].done():
            if cur[0].svc.spec_version == svc.spec_version and cur[0].svc.spec == svc.spec:
                return  # already working towards this spec
            cur[1].cancel()
            del self._updates[svc.id]
        state = update_state(svc)
        if state in PAUSED_STATES:
            return
        if state not in IN_PROGRESS and not any(slot_dirty(svc, s, self.store.sm) for s in slots):
            return
        up = Updater(self.store, self.restarts, self.waiters, copy_service(svc))
        self._updates[svc.id] = (up, self.spawn(up.run(slots)))

    def on_task(self, task: objects_pb2.Task) -> None:
        cur = self._updates.get(task.service_id)
        if cur is not None:
            cur[0].on_task(task)

    def cancel(self, service_id: str) -> None:
        cur = self._updates.pop(service_id, None)
        if cur is not None:
            cur[1].cancel()

    def cancel_all(self) -> None:
        for _, t in self._updates.values():
            t.cancel()
        self._updates.clear()

    def running(self, service_id: str) -> bool:
        cur = self._updates.get(service_id)
        return cur is not None and not cur[1].done()


class Updater:
    def __init__(self, store: Store, restarts: RestartSupervisor, waiters: TaskWaiters, svc: objects_pb2.Service):
        self.store = store
        self.restarts = restarts
        self.waiters = waiters
        self.svc = svc
        self.glob = is_global(svc)
        self.rollback = update_state(svc) == US.ROLLBACK_STARTED
        self.cfg = update_config(svc, self.rollback)
        self.monitor = monitor_period(self.cfg)
        self._updated: dict[str, float] = {}  # task id -> time it reached RUNNING (0 = not yet)
        # slot (or node id, for global services) -> ids of the service's tasks there; kept up to date
        # from task events so a slot's step does not scan every task of the service.
        self._index: dict[int | str, set[str]] | None = None
        self._failed: set[str] = set()
        self._dirty_count = 0
        self._stop = asyncio.Event()

    # ---- failure monitoring ------------------------------------------------------------------
    def on_task(self, t: objects_pb2.Task) -> None:
        if self._index is not None:
            self._index.setdefault(t.node_id if self.glob else t.slot, set()).add(t.id)
        # Only a task that ended by itself counts; one shut down on purpose (drain, node lost) does not.
        if t.id not in self._updated or t.id in self._failed or t.status.state not in ENDED_BY_ITSELF:
            return
        started = self._updated[t.id]
        if started and time.monotonic() - started > self.monitor:
            return
        self._failed.add(t.id)
        if self.cfg.failure_action == types_pb2.UpdateConfig.CONTINUE or self._stop.is_set():
            return
        if len(self._failed) / max(1, self._dirty_count) > self.cfg.max_failure_ratio:
            self._stop.set()
            self._failed_task = t.id

    # ---- the walk ----------------------------------------------------------------------------
    async def run(self, slots: list[Slot]) -> None:
        svc = self.svc
        try:
            state = update_state(svc)
            if state in PAUSED_STATES:
                return
            dirty = [s for s in slots if slot_dirty(svc, s, self.store.sm)]
            if not dirty:
                if state in IN_PROGRESS:
                    await self._finish()
                return
            self._dirty_count = len(dirty)
            if state not in IN_PROGRESS:
                await self._set_status(US.UPDATING, "update in progress", started=True)
            log.info(
                "%s of service %s (%s) started: %d slots, parallelism %d, order %s",
                "rollback" if self.rollback else "update", svc.id, svc.spec.annotations.name, len(dirty),
                self.cfg.parallelism, types_pb2.UpdateConfig.Order.Name(self.cfg.order),
            )
            queue: asyncio.Queue[Slot] = asyncio.Queue()
            for s in dirty:
                queue.put_nowait(s)
            workers = [asyncio.ensure_future(self._worker(queue)) for _ in range(self.cfg.parallelism or len(dirty))]
            stop = asyncio.ensure_future(self._stop.wait())
            try:
                await asyncio.wait([*workers, stop], return_when=asyncio.FIRST_COMPLETED)
                while not self._stop.is_set() and not all(w.done() for w in workers):
                    await asyncio.wait([*workers, stop], return_when=asyncio.FIRST_COMPLETED)
                if not self._stop.is_set():
                    # Watch the last tasks for one more monitor period.
                    try:
                        async with asyncio.timeout(self.monitor):
                            await self._stop.wait()
                    except TimeoutError:
                        pass
            finally:
                for w in workers:
                    w.cancel()
                stop.cancel()
                for w in workers:
                    if w.done() and not w.cancelled() and w.exception() is not None:
                        log.error("update worker of service %s failed: %r", svc.id, w.exception())
            if self._stop.is_set():
                await self._failure_action()
            else:
                await self._finish()
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("update of service %s failed", svc.id)

    async def _worker(self, queue: asyncio.Queue[Slot]) -> None:
        delay = seconds(self.cfg.delay)
        while not queue.empty() and not self._stop.is_set():
            s = queue.get_nowait()
            try:
                await self._update_slot(s)
            except asyncio.CancelledError:
                raise
            except Exception:  # e.g. no quorum: the next reconcile starts a new update for what is left
                log.exception("service %s: update of slot %s failed", self.svc.id, s.slot or s.node_id)
            if delay > 0 and not queue.empty():
                await asyncio.sleep(delay)

    def _current(self, s: Slot) -> list[objects_pb2.Task]:
        """The slot's live tasks now (the orchestrator may have restarted or removed some meanwhile)."""
        if self._index is None:
            self._index = {}
            for t in self.store.sm.tasks_by_service(self.svc.id):
                self._index.setdefault(t.node_id if self.glob else t.slot, set()).add(t.id)
        ids = self._index.get(s.node_id if self.glob else s.slot, set())
        mine = []
        for tid in list(ids):
            t = self.store.get("task", tid)
            if t is None:
                ids.discard(tid)
            elif (t.node_id == s.node_id) if self.glob else (t.slot == s.slot):
                mine.append(t)
        live = [t for t in mine if t.desired_state <= RUNNING]
        if live:
            return live
        # A slot whose only task ended and is not restarted by policy is still updated (SwarmKit).
        ids = {t.id for t in s.tasks if t.desired_state > RUNNING}
        return [t for t in mine if t.id in ids]

    async def _update_slot(self, s: Slot) -> None:
        svc = self.svc
        tasks = self._current(s)
        if not tasks:
            return
        sm = self.store.sm
        clean_running = next((t for t in tasks if not is_task_dirty(svc, t, sm) and t.desired_state == RUNNING), None)
        clean_ready = next((t for t in tasks if not is_task_dirty(svc, t, sm) and t.desired_state < RUNNING), None)
        keep = clean_running or clean_ready
        if keep is not None:
            others = [t for t in tasks if t.id != keep.id]
            old = await self._shutdown(others)
            if keep.desired_state < RUNNING:
                await asyncio.shield(self.restarts.delay_start(DelayedStart(keep.id, 0.0, old, wait_stop=old is not None)))
            return
        start_first = self.cfg.order == types_pb2.UpdateConfig.START_FIRST
        repl = new_task(
            svc,
            slot=0 if self.glob else s.slot,
            node_id=s.node_id if self.glob else "",
            desired=RUNNING if start_first else types_pb2.READY,
        )
        self._updated[repl.id] = 0.0
        old_ids = [t.id for t in tasks]

        def create(tx: Tx) -> objects_pb2.Task | None:
            if tx.get("service", svc.id) is None:
                return None
            tx.create(copy_task(repl))
            if start_first:
                return None
            return self._shutdown_in(tx, old_ids)

        try:
            old = await commit(self.store, create, f"update task of service {svc.id}")
        except Exception:
            log.exception("update of slot %s of service %s failed", s.slot or s.node_id, svc.id)
            return
        if self.store.get("task", repl.id) is None:
            return
        log.info(
            "service %s: slot %s updated, new task %s replaces %s",
            svc.id, s.slot or s.node_id, repl.id, ",".join(old_ids),
        )
        if not start_first:
            await asyncio.shield(self.restarts.delay_start(DelayedStart(repl.id, 0.0, old, wait_stop=old is not None)))
        # Until it runs or ended -- or was shut down by someone else (its node was lost, the slot removed).
        got = await self.waiters.wait(
            self.store, "task", repl.id, lambda t: t.status.state >= RUNNING or t.desired_state > RUNNING
        )
        if got is None or got.status.state < RUNNING:
            return
        if got.status.state == RUNNING:
            self._updated[repl.id] = time.monotonic()
        if got.status.state > RUNNING:
            self.on_task(got)
        if start_first and got.status.state == RUNNING:
            await self._shutdown(tasks)

    @staticmethod
    def _shutdown_in(tx: Tx, ids: list[str]) -> objects_pb2.Task | None:
        last = None
        for tid in ids:
            t = shut_down(tx, tid)
            if t is not None:
                last = t
        return last

    async def _shutdown(self, tasks: list[objects_pb2.Task]) -> objects_pb2.Task | None:
        if not tasks:
            return None
        ids = [t.id for t in tasks]
        return await commit(self.store, lambda tx: self._shutdown_in(tx, ids), f"shut down old tasks {ids}")

    # ---- status ------------------------------------------------------------------------------
    async def _set_status(self, state: int, message: str, started: bool = False, completed: bool = False) -> None:
        sid = self.svc.id

        def fn(tx: Tx) -> None:
            cur = tx.get("service", sid)
            if cur is None or cur.spec_version != self.svc.spec_version:
                return  # the service changed since this update started; the new one owns the status
            s = copy_service(cur)
            s.update_status.state = state  # type: ignore[assignment]
            s.update_status.message = message
            if started:
                s.update_status.started_at.GetCurrentTime()
                s.update_status.ClearField("completed_at")
            if completed:
                s.update_status.completed_at.GetCurrentTime()
            tx.update(s)

        await commit(self.store, fn, f"update status of service {sid}")
        log.info("service %s update status %s: %s", sid, US.State.Name(state), message)

    async def _finish(self) -> None:
        if self.rollback or update_state(self.store.get("service", self.svc.id) or self.svc) == US.ROLLBACK_STARTED:
            await self._set_status(US.ROLLBACK_COMPLETED, "rollback completed", completed=True)
        else:
            await self._set_status(US.COMPLETED, "update completed", completed=True)

    async def _failure_action(self) -> None:
        tid = getattr(self, "_failed_task", "?")
        action = self.cfg.failure_action
        if action == types_pb2.UpdateConfig.ROLLBACK and not self.rollback:
            sid = self.svc.id
            msg = f"update rolled back due to failure or early termination of task {tid}"

            def fn(tx: Tx) -> None:
                cur = tx.get("service", sid)
                if cur is None or cur.spec_version != self.svc.spec_version:
                    return
                s = copy_service(cur)
                if not cur.HasField("previous_spec"):
                    s.update_status.state = US.PAUSED
                    s.update_status.message = (
                        f"update paused due to failure of task {tid}; cannot roll back: the service has no previous spec"
                    )
                    tx.update(s)
                    return
                s.spec.CopyFrom(cur.previous_spec)
                s.spec_version = cur.previous_spec_version
                s.ClearField("previous_spec")
                s.previous_spec_version = 0
                s.update_status.state = US.ROLLBACK_STARTED
                s.update_status.message = msg
                tx.update(s)

            await commit(self.store, fn, f"roll back service {sid}")
            log.info("service %s: %s", sid, msg)
            return
        if self.rollback:
            await self._set_status(
                US.ROLLBACK_PAUSED, f"rollback paused due to failure or early termination of task {tid}"
            )
        else:
            await self._set_status(US.PAUSED, f"update paused due to failure or early termination of task {tid}")
