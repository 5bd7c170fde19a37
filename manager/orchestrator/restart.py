"""Restart supervisor: replaces tasks that ended, following the service's restart policy.

A task that failed or completed while it should run gets desired_state SHUTDOWN and, when the policy
says so (condition any|on-failure|none, max attempts within a window), a replacement in the same slot
(or on the same node, for global services). The replacement is created with desired_state READY --
the scheduler places it and the agent may prepare it -- and is moved to RUNNING once the restart
delay (default 5 s) has passed and the old task has stopped (or its node is down, or a timeout).
Restart history is kept in memory per slot and forgotten when the task template changes, as in
SwarmKit.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

from shoal.manager.orchestrator.common import (
    RUNNING,
    TaskWaiters,
    commit,
    copy_task,
    is_global,
    new_task,
    restart_delay,
    seconds,
    shut_down,
    task_timestamp,
)
from shoal.manager.store import Store, Tx
from shoal.proto import objects_pb2, types_pb2

log = logging.getLogger("shoal.orchestrator.restart")

DEFAULT_OLD_TASK_TIMEOUT = 60.0


@dataclass
class _History:
    spec_version: int
    total: int = 0
    times: deque[float] = field(default_factory=deque)


@dataclass
class DelayedStart:
    """What to do after a replacement task is committed: start it after `delay`, maybe waiting for `old`."""

    new_task_id: str
    delay: float
    old: objects_pb2.Task | None = None
    wait_stop: bool = False
    # Set for restarts (not updates): counted in the slot's restart history once committed.
    restarted: objects_pb2.Task | None = None
    glob: bool = False


class RestartSupervisor:
    def __init__(
        self,
        store: Store,
        waiters: TaskWaiters,
        spawn: Callable[[Coroutine[Any, Any, None]], asyncio.Task[None]],
        old_task_timeout: float = DEFAULT_OLD_TASK_TIMEOUT,
    ) -> None:
        self.store = store
        self.waiters = waiters
        self.spawn = spawn
        self.old_task_timeout = old_task_timeout
        self._history: dict[tuple[str, int, str], _History] = {}
        self._delays: dict[str, asyncio.Task[None]] = {}

    # ---- policy ------------------------------------------------------------------------------
    @staticmethod
    def _key(t: objects_pb2.Task, glob: bool) -> tuple[str, int, str]:
        return (t.service_id, t.slot, t.node_id if glob else "")

    def should_restart(self, t: objects_pb2.Task, svc: objects_pb2.Service) -> bool:
        """Whether the policy allows another restart of the task's slot after `t` ended."""
        pol = t.spec.restart
        if pol.condition == types_pb2.RestartPolicy.NONE:
            return False
        if pol.condition == types_pb2.RestartPolicy.ON_FAILURE and t.status.state == types_pb2.COMPLETE:
            return False
        if pol.max_attempts == 0:
            return True
        hist = self._history.get(self._key(t, is_global(svc)))
        if hist is None or hist.spec_version != t.spec_version:
            return True
        window = seconds(pol.window)
        if window <= 0:
            return hist.total < pol.max_attempts
        ended = task_timestamp(t)
        recent = sum(1 for ts in hist.times if ended - window < ts <= ended + 0.001)
        # Restarts made after this task ended (it is an old one) do not count against it.
        return recent < pol.max_attempts

    def _record(self, t: objects_pb2.Task, glob: bool) -> None:
        pol = t.spec.restart
        if pol.max_attempts == 0:
            return
        key = self._key(t, glob)
        hist = self._history.get(key)
        if hist is None or hist.spec_version != t.spec_version:
            hist = self._history[key] = _History(spec_version=t.spec_version)
        hist.total += 1
        window = seconds(pol.window)
        if window > 0:
            now = time.time()
            hist.times.append(now)
            while hist.times and hist.times[0] < now - 2 * window:
                hist.times.popleft()

    def forget_service(self, service_id: str) -> None:
        for k in [k for k in self._history if k[0] == service_id]:
            del self._history[k]

    # ---- restarts ----------------------------------------------------------------------------
    def restart(self, tx: Tx, svc: objects_pb2.Service, task_id: str) -> DelayedStart | None:
        """In a transaction: shut the ended task down and, if the policy allows, create its replacement."""
        cur = tx.get("task", task_id)  # as it was before this transaction shut it down
        if shut_down(tx, task_id) is None:
            return None
        if not self.should_restart(cur, svc):
            log.info(
                "task %s of service %s ended (%s), not restarted by its policy",
                cur.id, svc.id, types_pb2.TaskState.Name(cur.status.state),
            )
            return None
        glob = is_global(svc)
        repl = new_task(svc, slot=0 if glob else cur.slot, node_id=cur.node_id if glob else "", desired=types_pb2.READY)
        tx.create(repl)
        node = tx.get("node", cur.node_id) if cur.node_id else None
        drained = node is not None and node.spec.availability == types_pb2.DRAIN
        delay = 0.0 if drained else restart_delay(cur.spec)
        wait_stop = types_pb2.ASSIGNED <= cur.status.state <= RUNNING and not (
            node is None or node.status.state == types_pb2.NodeStatus.DOWN
        )
        log.info(
            "task %s of service %s ended (%s): restarting as %s in slot %s after %.3fs",
            cur.id, svc.id, types_pb2.TaskState.Name(cur.status.state), repl.id, repl.slot or repl.node_id, delay,
        )
        return DelayedStart(repl.id, delay, cur, wait_stop, restarted=repl, glob=glob)

    def after_commit(self, plans: list[DelayedStart | None]) -> None:
        """Start the timers of committed replacements (plans of rolled-back attempts are skipped)."""
        for p in plans:
            if p is None or self.store.get("task", p.new_task_id) is None:
                continue
            if p.restarted is not None:
                self._record(p.restarted, p.glob)
            self.delay_start(p)

    def delay_start(self, p: DelayedStart) -> asyncio.Task[None]:
        prev = self._delays.pop(p.new_task_id, None)
        if prev is not None:
            prev.cancel()
        task = self.spawn(self._delayed_start(p))
        self._delays[p.new_task_id] = task
        return task

    async def _delayed_start(self, p: DelayedStart) -> None:
        try:
            if p.delay > 0:
                await asyncio.sleep(p.delay)
            if p.wait_stop and p.old is not None and types_pb2.ASSIGNED <= p.old.status.state <= RUNNING:
                await self._wait_stopped(p.old)

            def start_now(tx: Tx) -> None:
                t = tx.get("task", p.new_task_id)
                if t is None or t.desired_state >= RUNNING:
                    return
                t = copy_task(t)
                t.desired_state = RUNNING
                tx.update(t)

            await commit(self.store, start_now, f"start task {p.new_task_id}")
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("delayed start of task %s failed", p.new_task_id)
        finally:
            if self._delays.get(p.new_task_id) is asyncio.current_task():
                del self._delays[p.new_task_id]

    async def _wait_stopped(self, old: objects_pb2.Task) -> None:
        """Until the old task stopped, its node went down or away, or the timeout passed."""
        waits = [
            asyncio.ensure_future(
                self.waiters.wait(self.store, "task", old.id, _stopped, self.old_task_timeout)
            )
        ]
        if old.node_id:
            waits.append(
                asyncio.ensure_future(
                    self.waiters.wait(
                        self.store, "node", old.node_id,
                        lambda n: n.status.state == types_pb2.NodeStatus.DOWN, self.old_task_timeout,
                    )
                )
            )
        try:
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waits:
                w.cancel()

    def cancel(self, task_id: str) -> None:
        t = self._delays.pop(task_id, None)
        if t is not None:
            t.cancel()

    def cancel_all(self) -> None:
        for t in self._delays.values():
            t.cancel()
        self._delays.clear()

    def pending_starts(self) -> set[str]:
        return set(self._delays)


def _stopped(t: objects_pb2.Task) -> bool:
    """Nothing runs for the task any more: it ended, or no agent ever got it."""
    return t.status.state > RUNNING or t.status.state < types_pb2.ASSIGNED or not t.node_id
