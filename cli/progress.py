"""Waiting for a service change to converge, like the docker CLI's progress loop, following the Watch stream.

A create/update/scale/rollback has converged when, for the service's current spec version, every
replica slot (replicated) or every node with a task (global) has a RUNNING task whose desired state
is RUNNING, and no task of the service is still running past its desired state (scale down). A
removal has converged when no task of the service is still live on a ready node. Tasks on nodes
that are not READY are ignored, as docker ignores tasks on down nodes.

The wait ends early, successfully, when no node is READY and ACTIVE: nothing can run the tasks yet,
so the store having the change is all there is to wait for. It fails clearly when the service's
update pauses (or its rollback pauses), when up-to-date tasks keep failing (as many failed or
rejected tasks as desired replicas, at least 3, while none runs; or three times that many: the last
error is shown), when every waiting task has had no suitable node for 10 s, and at the timeout.

What the wait sees comes from `ServiceView`: one fresh read (GetService, ListTasks, ListNodes), then
the Watch stream's events (services, tasks, nodes) applied on top of it, and the rules checked again
after each change (and at least every TICK seconds, for the timers). How no change is missed:

- The stream is opened before the read; an event older than the copy held (by `meta.version`, the
  store's commit counter) is dropped, so events that overlap the read do no harm.
- The manager registers the subscription only when the call reaches it, so a change between the read
  and that moment could be in neither. Until the stream has delivered its first message the read is
  therefore repeated every TICK seconds, and once more when the first message comes: from then on
  every change is in the stream.
- When the stream breaks after it has delivered (the manager restarts or is replaced, a connection
  drops) a new stream is opened and everything is read fresh again, as at the start.
- When the stream cannot be had at all (it fails before its first message: a manager without the Watch
  API answers UNIMPLEMENTED), the view falls back to reading every `interval` (200 ms) as swarmctl did
  before.

An RPC error of a fresh read is a CliError, as it always was: a wait ends when its manager cannot be read.
"""

from __future__ import annotations

import queue
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import IO, Any

import grpc

from shoal.cli.client import Client
from shoal.cli.errors import CliError
from shoal.cli.output import state_name
from shoal.proto import control_pb2, objects_pb2, types_pb2, watch_pb2, watch_pb2_grpc

POLL_INTERVAL = 0.2  # seconds between reads when the Watch stream cannot be had
TICK = 1.0  # seconds a wait goes at most without checking its timers (and re-reading, until the stream is live)
WATCH_KINDS = ("service", "task", "node")
NO_TASKS_GRACE = 5.0
NO_TASKS_TIMEOUT = 15.0  # seconds without any up-to-date task of a replicated service: no orchestrator
UNPLACEABLE_GRACE = 10.0  # seconds every waiting task has had no suitable node: reported as a failure
NO_SUITABLE_NODE = "no suitable node"  # seconds without any up-to-date task before a global service counts as placed nowhere
RUNNING = types_pb2.RUNNING
FAILED_STATES = (types_pb2.FAILED, types_pb2.REJECTED)


@dataclass
class Snapshot:
    """One poll's view of the cluster, as far as the wait needs it."""

    service: objects_pb2.Service | None
    tasks: list[objects_pb2.Task]
    nodes: list[objects_pb2.Node]
    ready_nodes: set[str] = field(default_factory=set)
    active_ready: int = 0

    def __post_init__(self) -> None:
        self.ready_nodes = {n.id for n in self.nodes if n.status.state == types_pb2.NodeStatus.READY}
        self.active_ready = sum(1 for n in self.nodes if n.id in self.ready_nodes
                                and n.spec.availability == types_pb2.ACTIVE)


def up_to_date(task: objects_pb2.Task, svc: objects_pb2.Service) -> bool:
    """Made from the service's current task template and endpoint (the orchestrator's notion of a task that
    is not dirty): a scale changes the spec version but leaves the running tasks current."""
    if task.spec_version and task.spec_version == svc.spec_version:
        return True
    return task.spec == svc.spec.task and task.endpoint.spec == svc.spec.endpoint


def _pick(current: objects_pb2.Task | None, task: objects_pb2.Task) -> bool:
    """Docker's choice of the task that represents a slot: lowest desired state, then highest state."""
    if current is None:
        return True
    if task.desired_state != current.desired_state:
        return task.desired_state < current.desired_state
    return task.status.state > current.status.state


@dataclass
class Progress:
    running: int
    desired: int
    slots: list[tuple[str, objects_pb2.Task]]
    stopping: int


def measure(svc: objects_pb2.Service, snap: Snapshot) -> Progress:
    visible = [t for t in snap.tasks if not t.node_id or t.node_id in snap.ready_nodes]
    current = [t for t in visible if up_to_date(t, svc)]
    chosen: dict[Any, objects_pb2.Task] = {}
    glob = svc.spec.WhichOneof("mode") == "global"
    for t in current:
        key = t.node_id if glob else t.slot
        if glob and not t.node_id:
            continue
        if _pick(chosen.get(key), t):
            chosen[key] = t
    if glob:
        desired = sum(1 for t in chosen.values() if t.desired_state <= RUNNING)
        keys = sorted(chosen)
        slots = [(k[:12], chosen[k]) for k in keys]
    else:
        desired = svc.spec.replicated.replicas
        slots = [(f"{k}/{desired}", chosen[k]) for k in sorted(chosen) if k <= desired]
    running = sum(1 for _, t in slots if t.status.state == RUNNING and t.desired_state <= RUNNING)
    stopping = sum(1 for t in visible if t.desired_state > RUNNING and t.status.state == RUNNING and t.node_id)
    return Progress(running, desired, slots, stopping)


@dataclass
class _StreamEnd:
    """Put on a stream's queue when it ends: `code` is the gRPC status (None: it ended cleanly)."""

    code: grpc.StatusCode | None


class ServiceView:
    """One service, its tasks and the nodes, kept current for a wait (see the module docstring for how
    the read and the Watch stream combine). Use as a context manager; `snapshot()` is the current view,
    `wait()` returns after a change or TICK seconds (`interval` seconds and a fresh read when polling)."""

    def __init__(self, client: Client, service_id: str, with_service: bool = True,
                 interval: float = POLL_INTERVAL) -> None:
        self.client = client
        self.service_id = service_id
        self.with_service = with_service
        self.interval = interval
        self.polling = False
        self._service: objects_pb2.Service | None = None
        self._tasks: dict[str, objects_pb2.Task] = {}
        self._nodes: dict[str, objects_pb2.Node] = {}
        self._call: Any = None
        self._queue: queue.Queue[watch_pb2.WatchMessage | _StreamEnd] = queue.Queue()
        self._live = False  # the current stream has delivered a message: every change since is in it
        self._stale = True  # a fresh read is due before the next snapshot

    def __enter__(self) -> ServiceView:
        self._subscribe()
        return self

    def __exit__(self, *exc: object) -> None:
        self._cancel()

    def snapshot(self) -> Snapshot:
        if self._stale:
            self._read()
        return Snapshot(self._service, list(self._tasks.values()), list(self._nodes.values()))

    def wait(self) -> None:
        if self.polling:
            time.sleep(self.interval)
            self._stale = True
            return
        try:
            item = self._queue.get(timeout=TICK)
        except queue.Empty:
            self._stale = self._stale or not self._live
            return
        while True:
            self._take(item)
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return

    def _take(self, item: watch_pb2.WatchMessage | _StreamEnd) -> None:
        if isinstance(item, _StreamEnd):
            if self._live:  # it worked and broke: subscribe again, read again
                self._subscribe()
            else:  # no stream to be had here: poll as before
                self._cancel()
                self.polling = True
            self._stale = True
            return
        if not self._live:
            self._live = True
            self._stale = True  # the read before the subscription was live may have missed a change
        for ev in item.events:
            self._apply(ev)

    def _apply(self, ev: watch_pb2.WatchEvent) -> None:
        kind = ev.object.WhichOneof("object")
        if kind == "task":
            task = ev.object.task
            if task.service_id == self.service_id:
                self._put(self._tasks, task, ev.action)
        elif kind == "node":
            self._put(self._nodes, ev.object.node, ev.action)
        elif kind == "service" and self.with_service and ev.object.service.id == self.service_id:
            if ev.action == watch_pb2.WatchEvent.DELETE:
                self._stale = True  # the fresh read says what a wait on a removed service says
            elif self._service is None or ev.object.service.meta.version >= self._service.meta.version:
                self._service = ev.object.service

    @staticmethod
    def _put(table: dict[str, Any], obj: Any, action: int) -> None:
        held = table.get(obj.id)
        if held is not None and obj.meta.version < held.meta.version:
            return  # older than what the read gave
        if action == watch_pb2.WatchEvent.DELETE:
            table.pop(obj.id, None)
        else:
            table[obj.id] = obj

    def _read(self) -> None:
        if self.with_service:
            self._service = self.client.call(
                "GetService", control_pb2.GetServiceRequest(service_id=self.service_id)).service
        tasks = self.client.call("ListTasks", control_pb2.ListTasksRequest(
            filters=control_pb2.ListFilters(service_ids=[self.service_id]))).tasks
        nodes = self.client.call("ListNodes", control_pb2.ListNodesRequest()).nodes
        self._tasks = {t.id: t for t in tasks}
        self._nodes = {n.id: n for n in nodes}
        self._stale = False

    def _subscribe(self) -> None:
        self._cancel()
        self._queue = queue.Queue()
        self._live = False
        self._stale = True
        stub = watch_pb2_grpc.WatchStub(self.client.channel)
        self._call = stub.Watch(watch_pb2.WatchRequest(kinds=list(WATCH_KINDS)))
        threading.Thread(target=_pump, args=(self._call, self._queue), name="swarmctl-watch", daemon=True).start()

    def _cancel(self) -> None:
        if self._call is not None:
            self._call.cancel()
            self._call = None


def _pump(call: Any, q: queue.Queue[watch_pb2.WatchMessage | _StreamEnd]) -> None:
    """A stream's messages onto its queue, then how it ended (a cancelled stream's queue is dropped)."""
    try:
        for msg in call:
            q.put(msg)
        q.put(_StreamEnd(None))
    except grpc.RpcError as e:
        q.put(_StreamEnd(e.code()))


class Waiter:
    def __init__(self, client: Client, out: IO[str] | None = None, timeout: float = 300.0,
                 interval: float = POLL_INTERVAL, clock: Callable[[], float] = time.monotonic) -> None:
        self.client = client
        self.out = out or sys.stdout
        self.timeout = timeout
        self.interval = interval
        self.clock = clock
        self._last = ""
        self._tty = bool(getattr(self.out, "isatty", lambda: False)())
        self._open = False  # a progress line is on the terminal without its newline yet

    def _say(self, line: str, progress: bool = False) -> None:
        """Print a line once; on a terminal, progress lines replace each other in place."""
        if line == self._last:
            return
        self._last = line
        if self._tty and progress:
            self.out.write("\r\033[K" + line)
            self._open = True
        else:
            self._end_line()
            self.out.write(line + "\n")
        self.out.flush()

    def _end_line(self) -> None:
        if self._open:
            self.out.write("\n")
            self.out.flush()
            self._open = False

    def converge(self, service_id: str, name: str) -> None:
        try:
            with ServiceView(self.client, service_id, interval=self.interval) as view:
                self._converge(view, name)
        finally:
            self._end_line()

    def removed(self, service_id: str, name: str) -> None:
        try:
            with ServiceView(self.client, service_id, with_service=False, interval=self.interval) as view:
                self._removed(view, name)
        finally:
            self._end_line()

    def _converge(self, view: ServiceView, name: str) -> None:
        start = self.clock()
        failed: dict[str, str] = {}
        said_rollback = False
        unplaceable_since: float | None = None
        earlier: set[str] | None = None
        some_ran = False
        while True:
            snap = view.snapshot()
            svc = snap.service
            assert svc is not None
            if snap.active_ready == 0:
                self._say(f"{name}: stored; no node is ready and active to run its tasks yet, so there is nothing "
                          "more to wait for")
                return
            us = svc.update_status
            if us.state in (types_pb2.UpdateStatus.PAUSED, types_pb2.UpdateStatus.ROLLBACK_PAUSED):
                what = "update" if us.state == types_pb2.UpdateStatus.PAUSED else "rollback"
                raise CliError(f"service {name} {what} paused: {us.message or 'tasks failed'}")
            if us.state == types_pb2.UpdateStatus.ROLLBACK_STARTED and not said_rollback:
                self._say(f"rollback: {us.message or 'rolling back'}")
                said_rollback = True
            prog = measure(svc, snap)
            if earlier is None:  # failures from before this change do not count against it
                earlier = {t.id for t in snap.tasks if t.status.state in FAILED_STATES}
            for t in snap.tasks:
                if up_to_date(t, svc) and t.status.state in FAILED_STATES and t.id not in earlier:
                    failed[t.id] = t.status.err or t.status.message or state_name(t.status.state).lower()
            detail = ", ".join(f"{k}: {_task_state(t)}" for k, t in prog.slots[:10])
            line = f"overall progress: {prog.running} out of {prog.desired} tasks"
            if prog.stopping:
                line += f", {prog.stopping} stopping"
            self._say(line + (f" [{detail}]" if detail else ""), progress=True)
            elapsed = self.clock() - start
            if prog.running == prog.desired and not prog.stopping:
                if prog.desired or svc.spec.WhichOneof("mode") != "global" or elapsed >= NO_TASKS_GRACE:
                    note = "" if prog.desired or not _is_global(svc) else " (no node runs a task of it)"
                    self._say(f"verify: Service {name} converged{note}")
                    return
            if prog.desired and not any(up_to_date(t, svc) for t in snap.tasks) and elapsed >= NO_TASKS_TIMEOUT:
                raise CliError(f"no task of service {name} was created within {NO_TASKS_TIMEOUT:g}s: is a leader "
                               "running the orchestrator? (swarmctl info shows the leader)")
            waiting = [t for _, t in prog.slots if t.status.state < RUNNING and t.desired_state <= RUNNING]
            if waiting and all(t.status.message.startswith(NO_SUITABLE_NODE) for t in waiting):
                unplaceable_since = unplaceable_since if unplaceable_since is not None else self.clock()
                if self.clock() - unplaceable_since >= UNPLACEABLE_GRACE:
                    raise CliError(
                        f"service {name} cannot be placed: {waiting[-1].status.message}; its tasks stay pending "
                        f"until a node fits (swarmctl service ps {name})")
            else:
                unplaceable_since = None
            if any(t.status.state == RUNNING for _, t in prog.slots):
                some_ran = True
            if (len(failed) >= max(3, prog.desired) and not some_ran) or len(failed) >= max(6, 3 * prog.desired):
                last = list(failed.values())[-1]
                raise CliError(f"service {name} is not converging: {len(failed)} tasks failed or were rejected; "
                               f"last error: {last}")
            if elapsed >= self.timeout:
                raise CliError(f"service {name} did not converge within {self.timeout:g}s: {prog.running} of "
                               f"{prog.desired} tasks running{_why(snap.tasks, svc, failed)}")
            view.wait()

    def _removed(self, view: ServiceView, name: str) -> None:
        start = self.clock()
        while True:
            snap = view.snapshot()
            if snap.active_ready == 0 and not snap.ready_nodes:
                return
            live = [t for t in snap.tasks if t.node_id in snap.ready_nodes
                    and types_pb2.ASSIGNED <= t.status.state <= RUNNING]
            if not live:
                if self._last:
                    self._say(f"{name}: all tasks stopped")
                return
            self._say(f"{name}: waiting for {len(live)} task{'s' if len(live) > 1 else ''} to stop", progress=True)
            if self.clock() - start >= self.timeout:
                raise CliError(f"service {name} was removed, but {len(live)} of its tasks were still running after "
                               f"{self.timeout:g}s")
            view.wait()


def _is_global(svc: objects_pb2.Service) -> bool:
    return svc.spec.WhichOneof("mode") == "global"


def _task_state(t: objects_pb2.Task) -> str:
    if t.status.err:
        return f"{state_name(t.status.state).lower()} ({t.status.err})"
    if t.status.message.startswith(NO_SUITABLE_NODE):
        return f"{state_name(t.status.state).lower()} ({t.status.message})"
    return state_name(t.status.state).lower()


def _why(tasks: list[objects_pb2.Task], svc: objects_pb2.Service, failed: dict[str, str]) -> str:
    if failed:
        return f"; last error: {list(failed.values())[-1]}"
    msgs = [t.status.err or t.status.message for t in tasks
            if up_to_date(t, svc) and t.status.state < RUNNING and (t.status.err or t.status.message)]
    if msgs:
        return f"; a waiting task says: {msgs[-1]}"
    if not tasks:
        return "; no task was created (is a leader running the orchestrator?)"
    return ""
