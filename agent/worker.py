"""The worker: reconciles the tasks assigned to this node with the containers the engine runs.

It takes the dispatcher's assignments (`apply`: the complete set, or changes to it): tasks, the
secrets and configs they need, and encrypted networks' keys (handed to the node's networking). Each
assigned task gets a `shoal.agent.controller.TaskController`, which walks it through the agent's
states (`shoal.agent.taskstate`) and reports every status change through `report(task_id, status)`.

The container id is the task id and its labels carry the task, service and node ids, so a new
worker (after an agent restart) re-adopts the containers that still run, reports their state, and
stops and removes those whose task is no longer assigned. Containers of finished tasks stay (for
`task logs`) until their task is removed.

With a `LocalState` (`shoal.agent.localstate`), the worker keeps its assignments on disk as they
change (tasks with their last reported status, encrypted networks' keys sealed) and `start()`
resumes, before any manager answers, the task of every container it finds that was assigned: its
controller re-adopts the container, watches it and reports what happens once a session is up. Tasks
with no container wait for a manager (their secrets' data is never on disk). The first complete
assignment set from a dispatcher is the authority: what it does not list is stopped and removed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Callable, Coroutine, Iterable
from typing import Any

from shoal.agent.controller import NetworkHooks, TaskController, one_line
from shoal.agent.engine import ContainerState
from shoal.agent.executor import LABEL_NODE_ID, LABEL_TASK_ID, ContainerEngine, EngineAdapter
from shoal.agent.localstate import LocalState
from shoal.proto import dispatcher_pb2, objects_pb2, types_pb2

log = logging.getLogger("shoal.worker")

# Docker's defaultGossipConvergeDelay: a deactivated endpoint reaches every node well within it
# (gossip rounds of 0.2 s, then the node's VIP/DNS reconcile).
GOSSIP_CONVERGE_DELAY = 2.0


class Worker:
    """Assigned tasks → task controllers. `report(task_id, status)` receives every status change."""

    def __init__(
        self,
        engine: ContainerEngine | EngineAdapter,
        node_id: str,
        report: Callable[[str, types_pb2.TaskStatus], None],
        *,
        network: NetworkHooks | None = None,
        hostname: str = "",
        converge_delay: float = GOSSIP_CONVERGE_DELAY,
        state: LocalState | None = None,
    ) -> None:
        """`converge_delay`: seconds between taking a serving task out of its service's load balancing
        and stopping its container, for the other nodes to hear of it. `state`: where assignments are
        kept for the next run (None: nowhere)."""
        self.state = state
        self.converge_delay = converge_delay
        self.engine = engine if isinstance(engine, EngineAdapter) else EngineAdapter(engine)
        self.hostname = hostname or socket.gethostname()  # for {{.Node.Hostname}} templates
        # Hear health changes from the engine (its monitors call this on the event loop).
        raw = self.engine.engine
        self.health_events = hasattr(raw, "on_health_change")
        if self.health_events:
            previous = raw.on_health_change

            def on_health(cid: str, status: str) -> None:
                if previous is not None:
                    previous(cid, status)
                self._health_changed(cid, status)

            raw.on_health_change = on_health
        self.node_id = node_id
        self._report = report
        self.network = network
        self.tasks: dict[str, objects_pb2.Task] = {}
        self.secrets: dict[str, objects_pb2.Secret] = {}
        self.configs: dict[str, objects_pb2.Config] = {}
        self.network_keys: dict[str, list[types_pb2.EncryptionKey]] = {}  # encrypted network -> its keys
        self._reported: dict[str, types_pb2.TaskStatus] = {}  # task id -> the last status reported
        self.controllers: dict[str, TaskController] = {}
        self._runners: set[asyncio.Task[None]] = set()
        self._adoptable: dict[str, ContainerState] | None = None  # task id -> container info, until first COMPLETE set
        self._have_full_set = False
        self.changed = asyncio.Event()  # set on every assignment change (log followers watch it)

    def report_status(self, task_id: str, status: types_pb2.TaskStatus) -> None:
        """A task's new status, from its controller."""
        if task_id in self.tasks:
            self._reported[task_id] = status
            self._persist(task_id)
        self._report(task_id, status)

    def _persist(self, tid: str) -> None:
        """The task's record on disk: as assigned, with the newest status this agent reported."""
        t = self.tasks.get(tid)
        if self.state is None or t is None:
            return
        st = self._reported.get(tid)
        if st is not None and st.state >= t.status.state:
            rec = objects_pb2.Task()
            rec.CopyFrom(t)
            rec.status.CopyFrom(st)
            t = rec
        self.state.tasks.put(tid, t)

    async def start(self) -> None:
        """Find this node's existing containers (after an agent restart) for adoption, and resume at
        once the assigned tasks among them (with a `LocalState`)."""
        found: dict[str, ContainerState] = {}
        for info in await self.engine.list():
            labels = dict(info.labels or {})
            tid = labels.get(LABEL_TASK_ID)
            if tid and labels.get(LABEL_NODE_ID, self.node_id) == self.node_id:
                found[tid] = info
        self._adoptable = found
        resumed = 0
        if self.state is not None:
            self.network_keys = self.state.network_keys()
            if self.network is not None and self.network_keys:
                self.network.set_all_network_keys(self.network_keys)
            for tid, task in self.state.tasks.items():
                if tid in found and task.id == tid and task.node_id == self.node_id:
                    self._reported[tid] = task.status
                    self._set_task(task)
                    resumed += 1
        log.info("worker started node=%s existing_containers=%d resumed=%d", self.node_id, len(found), resumed)

    async def close(self) -> None:
        """Stop driving tasks (containers keep running; a new worker re-adopts them)."""
        for r in list(self._runners):
            r.cancel()
        for r in list(self._runners):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await r
        self.controllers.clear()

    # ---- assignments ------------------------------------------------------------------------------
    def apply(self, msg: dispatcher_pb2.AssignmentsMessage) -> None:
        if msg.type == dispatcher_pb2.AssignmentsMessage.COMPLETE:
            tasks, secrets, configs, keys = {}, {}, {}, {}
            for ch in msg.changes:
                item = ch.assignment.WhichOneof("item")
                obj = getattr(ch.assignment, item)
                if item == "network_keys":
                    keys[obj.network_id] = list(obj.keys)
                    continue
                {"task": tasks, "secret": secrets, "config": configs}[item][obj.id] = obj
            self._set_network_keys(keys)
            self.assign(tasks.values(), secrets.values(), configs.values())
        else:
            self.update(msg.changes)

    def assign(
        self,
        tasks: Iterable[objects_pb2.Task],
        secrets: Iterable[objects_pb2.Secret] = (),
        configs: Iterable[objects_pb2.Config] = (),
    ) -> None:
        """The complete assignment set: anything not in it is no longer assigned."""
        self.secrets = {s.id: s for s in secrets}
        self.configs = {c.id: c for c in configs}
        new = {t.id: t for t in tasks}
        if self.state is not None:
            for tid in set(self.state.tasks.keys()) - set(new):
                self.state.tasks.delete(tid)
        for tid in list(self.tasks):
            if tid not in new:
                self._drop(tid)
        for t in new.values():
            self._set_task(t)
        if not self._have_full_set:
            self._have_full_set = True
            for tid, info in (self._adoptable or {}).items():
                if tid not in new:
                    self._spawn(self._reap_orphan(tid, info), f"orphan-{tid}")
            self._adoptable = {}
        self.changed.set()
        self.changed = asyncio.Event()

    def update(self, changes: Iterable[dispatcher_pb2.AssignmentChange]) -> None:
        keys = dict(self.network_keys)
        for ch in changes:
            item = ch.assignment.WhichOneof("item")
            obj = getattr(ch.assignment, item)
            remove = ch.action == dispatcher_pb2.AssignmentChange.REMOVE
            if item == "task":
                self._drop(obj.id) if remove else self._set_task(obj)
            elif item == "network_keys":
                if remove:
                    keys.pop(obj.network_id, None)
                else:
                    keys[obj.network_id] = list(obj.keys)
            else:
                table = self.secrets if item == "secret" else self.configs
                if remove:
                    table.pop(obj.id, None)
                else:
                    table[obj.id] = obj
        if keys != self.network_keys:
            self._set_network_keys(keys)
        self.changed.set()
        self.changed = asyncio.Event()

    def _set_network_keys(self, keys: dict[str, list[types_pb2.EncryptionKey]]) -> None:
        """All the encrypted networks' keys: to the networking (before any task is prepared with them)
        and to disk."""
        if self.network is not None:
            self.network.set_all_network_keys(keys)
        if self.state is not None and keys != self.network_keys:
            self.state.save_network_keys(keys)
        self.network_keys = keys

    def _set_task(self, t: objects_pb2.Task) -> None:
        self.tasks[t.id] = t
        self._persist(t.id)
        ctl = self.controllers.get(t.id)
        if ctl is not None:
            ctl.update(t)
            return
        adopted = (self._adoptable or {}).pop(t.id, None) if self._adoptable else None
        ctl = TaskController(self, t, adopted)
        self.controllers[t.id] = ctl
        self._spawn(self._run_controller(ctl), f"task-{t.id}")

    def _health_changed(self, cid: str, status: str) -> None:
        ctl = self.controllers.get(cid)
        if ctl is not None:
            log.info("container health task=%s health=%s", cid, status)
            ctl.health_changed.set()

    def _drop(self, tid: str) -> None:
        self.tasks.pop(tid, None)
        self._reported.pop(tid, None)
        if self.state is not None:
            self.state.tasks.delete(tid)
        ctl = self.controllers.get(tid)
        if ctl is not None:
            ctl.drop()

    async def _run_controller(self, ctl: TaskController) -> None:
        try:
            await ctl.run()
        finally:
            if self.controllers.get(ctl.id) is ctl and ctl.dropped:
                del self.controllers[ctl.id]

    async def _reap_orphan(self, tid: str, info: ContainerState) -> None:
        log.info("container of unassigned task stopped and removed task=%s", tid)
        try:
            if info.status in ("running", "created"):
                await self.engine.stop(info.id, None)
            await self.engine.remove(info.id)
        except Exception as e:
            log.warning("removing orphan container failed task=%s err=%s", tid, one_line(e))
        if self.network is not None:
            try:
                await self.network.release(tid)
            except Exception as e:
                log.warning("releasing orphan's network failed task=%s err=%s", tid, one_line(e))

    def _spawn(self, coro: Coroutine[Any, Any, None], name: str) -> None:
        r = asyncio.get_running_loop().create_task(coro, name=name)
        self._runners.add(r)
        r.add_done_callback(self._runners.discard)

    # ---- for logs and tests --------------------------------------------------------------------------
    def task_ids(self) -> list[str]:
        return list(self.tasks)

    async def wait_idle(self) -> None:
        """Wait until every dropped task's controller has finished (for tests and shutdown)."""
        while self._runners:
            pending = [r for r in self._runners if not r.done()]
            dropped = [c for c in self.controllers.values() if c.dropped]
            if not dropped and all(not r.get_name().startswith("orphan-") for r in pending):
                return
            await asyncio.sleep(0.02)
