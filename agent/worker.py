"""The worker: reconciles the tasks assigned to this node with the containers the engine runs.

One `TaskController` per assigned task walks it through the agent's states, as Docker Swarm does:

    ASSIGNED → ACCEPTED → PREPARING (pull image, network attachments, create) → READY
             → STARTING → RUNNING → COMPLETE (exit 0) / FAILED (non-zero exit, unhealthy, start error)

A failure before STARTING (unknown image, unreachable registry, bad credentials, invalid spec) is
REJECTED. A desired state past RUNNING stops the container (its grace period) and reports SHUTDOWN;
desired REMOVE, or the task leaving the assignment set, also removes the container. Containers of
finished tasks stay (for `task logs`) until their task is removed.

The container id is the task id and its labels carry the task, service and node ids, so a new
worker (after an agent restart) re-adopts the containers that still run, reports their state, and
stops and removes those whose task is no longer assigned.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Protocol

from shoal.agent.engine import NetworkSetup
from shoal.agent.templates import expand_task
from shoal.proto import dispatcher_pb2, objects_pb2, types_pb2

log = logging.getLogger("shoal.worker")

LABEL_TASK_ID = "com.docker.swarm.task.id"
LABEL_TASK_NAME = "com.docker.swarm.task.name"
LABEL_SERVICE_ID = "com.docker.swarm.service.id"
LABEL_SERVICE_NAME = "com.docker.swarm.service.name"
LABEL_NODE_ID = "com.docker.swarm.node.id"
HEALTH_POLL = 0.5

S = types_pb2
INTERRUPTED = object()


class NetworkHooks(Protocol):
    """Where the node's networking plugs in (`shoal.agent.network.NetworkAgent`, wired by swarmd).

    `prepare(task)` runs before the container is created (its netns, interfaces on each of
    `task.networks`, endpoint records, DNS) and returns what the container joins: an object with
    `netns_path`, `resolv_conf` and optionally `extra_hosts`. It must be idempotent: it is called
    again for a container re-adopted after an agent restart. `release(task_id)` runs after the
    container is removed, after a failed create, and for an orphan container removed at restart.

    A task serves its service (VIP backend, service name in DNS, ingress routing) only between
    `activate(task_id)` -- once it runs, and is healthy if it has a health check -- and
    `deactivate(task_id)` -- before it is stopped or when it turns unhealthy -- so a rolling update
    never sends a client to a container that does not listen yet or is on its way out."""

    async def prepare(self, task: objects_pb2.Task, *, active: bool = True) -> NetworkSetup: ...

    async def activate(self, task_id: str) -> None: ...

    async def deactivate(self, task_id: str) -> None: ...

    async def release(self, task_id: str) -> None: ...

    def set_network_keys(self, network_id: str, keys: Sequence[types_pb2.EncryptionKey] | None) -> None: ...

    def set_all_network_keys(self, keys: dict[str, Sequence[types_pb2.EncryptionKey]]) -> None: ...


# Docker's defaultGossipConvergeDelay: a deactivated endpoint reaches every node well within it
# (gossip rounds of 0.2 s, then the node's VIP/DNS reconcile).
GOSSIP_CONVERGE_DELAY = 2.0


class TaskRejected(Exception):
    """The task cannot run here (bad image, registry error, invalid spec): REJECTED with this reason."""


def container_name(task: objects_pb2.Task) -> str:
    """Docker's container name for a task: <service>.<slot or node>.<task id>."""
    return task.annotations.name or task.id


def one_line(e: BaseException | str) -> str:
    s = str(e).strip() or type(e).__name__
    return s.splitlines()[0] if s else s


def _now_status(state: int, message: str, err: str = "") -> types_pb2.TaskStatus:
    st = types_pb2.TaskStatus(state=state, message=message, err=err)
    st.timestamp.FromNanoseconds(time.time_ns())
    return st


class EngineAdapter:
    """The few engine calls the worker makes, in one place (`shoal.agent.engine.Engine`)."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine

    async def pull(self, task: objects_pb2.Task) -> None:
        """Ask the registry (as Docker does); fall back to a local copy when the registry is unreachable."""
        from shoal.agent.engine import RegistryAuth, RegistryUnreachable

        c = task.spec.container
        if not c.image:
            raise TaskRejected("image is empty: set the service's image")
        auth = RegistryAuth.from_b64(c.pull_options.registry_auth) if c.pull_options.registry_auth else None
        try:
            await self.engine.pull(c.image, auth)
        except RegistryUnreachable as e:
            if await self.engine.image(c.image) is None:
                raise
            log.warning(
                "registry unreachable, using the local image task=%s image=%s err=%s", task.id, c.image, e
            )

    async def create(
        self,
        task: objects_pb2.Task,
        net: NetworkSetup,
        secrets: dict[str, objects_pb2.Secret],
        configs: dict[str, objects_pb2.Config],
        node_id: str,
    ) -> None:
        from shoal.agent.engine import ContainerConfig

        c = task.spec.container
        missing = [r.secret_name or r.secret_id for r in c.secrets if r.secret_id not in secrets]
        missing += [r.config_name or r.config_id for r in c.configs if r.config_id not in configs]
        if missing:
            raise TaskRejected(
                f"secrets/configs {', '.join(missing)} were not sent to this node; check they exist"
            )
        labels = dict(c.labels)
        labels.update(
            {
                LABEL_TASK_ID: task.id,
                LABEL_TASK_NAME: container_name(task),
                LABEL_SERVICE_ID: task.service_id,
                LABEL_SERVICE_NAME: task.service_annotations.name,
                LABEL_NODE_ID: node_id,
            }
        )
        cfg = ContainerConfig(
            id=task.id,
            name=container_name(task),
            spec=c,
            resources=task.spec.resources,
            network=net,
            secrets={r.secret_id: secrets[r.secret_id].spec.data for r in c.secrets},
            configs={r.config_id: configs[r.config_id].spec.data for r in c.configs},
            labels=labels,
        )
        await self.engine.create(cfg)

    async def start(self, cid: str) -> None:
        await self.engine.start(cid)

    async def wait(self, cid: str) -> Any:
        return await self.engine.wait(cid)

    async def stop(self, cid: str, grace: float | None) -> None:
        await self.engine.stop(cid, timeout=grace)

    async def remove(self, cid: str) -> None:
        from shoal.agent.engine import ContainerNotFound

        with contextlib.suppress(ContainerNotFound):
            await self.engine.remove(cid)

    async def inspect(self, cid: str) -> Any | None:
        from shoal.agent.engine import ContainerNotFound

        try:
            return await self.engine.inspect(cid)
        except ContainerNotFound:
            return None

    async def list(self) -> list[Any]:
        return list(await self.engine.list())

    def logs(self, cid: str, *, follow: bool, tail: int, since: Any) -> Any:
        return self.engine.logs(cid, follow=follow, tail=tail, since=since)


def _status_of(info: Any) -> str:
    return str(info.status)


def _pid_of(info: Any) -> int:
    return int(info.pid or 0)


def _health_of(info: Any) -> str:
    return str(info.health_status or "")


def _labels_of(info: Any) -> dict[str, str]:
    return dict(info.labels or {})


def exit_error(ex: Any) -> str:
    """The one-line error of a container that exited non-zero (or was lost)."""
    if getattr(ex, "oom_killed", False):
        return f"task: non-zero exit ({ex.exit_code}): the container ran out of memory (OOM killed)"
    if getattr(ex, "reason", "") == "Lost":
        return "task: the container's process disappeared and its exit status is unknown"
    return f"task: non-zero exit ({ex.exit_code})"


class TaskController:
    """Drives one task; `update()` hands it a newer assignment, `drop()` tells it the task is gone."""

    def __init__(self, worker: Worker, task: objects_pb2.Task, adopted: Any | None = None) -> None:
        self.w = worker
        self.task = task
        self.state = max(task.status.state, S.ASSIGNED)
        self.exit_code: int | None = None
        self.adopted = adopted
        self.has_container = adopted is not None
        self.dropped = False
        self.changed = asyncio.Event()
        self.health_changed = asyncio.Event()
        self._interruptible: asyncio.Task[Any] | None = None
        self._netns_prepared = False
        self._serving = False  # in its service's load balancing and DNS (NetworkHooks.activate)
        self.finished = asyncio.Event()

    @property
    def id(self) -> str:
        return self.task.id

    def wants_stop(self) -> bool:
        return self.dropped or self.task.desired_state > S.RUNNING

    def update(self, task: objects_pb2.Task) -> None:
        self.task = task
        self._poke()

    def drop(self) -> None:
        self.dropped = True
        self._poke()

    def _poke(self) -> None:
        self.changed.set()
        if self.wants_stop() and self._interruptible is not None and not self._interruptible.done():
            self._interruptible.cancel()

    def report(
        self, state: int, message: str, err: str = "", exit_code: int | None = None, pid: int = 0
    ) -> None:
        self.state = state
        st = _now_status(state, message, err)
        if self.has_container or exit_code is not None:
            st.container.container_id = self.id
            st.container.pid = pid
            if exit_code is not None:
                st.container.exit_code = exit_code
        st.port_status.ports.extend(self.task.endpoint.ports)
        log.info(
            "task state task=%s name=%s state=%s%s",
            self.id,
            container_name(self.task),
            S.TaskState.Name(state),
            f" err={err!r}" if err else "",
        )
        self.w._report(self.id, st)

    async def _interrupt(self, coro: Any) -> Any:
        """Run a long step (pull, wait) that a shutdown cancels; INTERRUPTED when it did."""
        self._interruptible = asyncio.ensure_future(coro)
        try:
            return await self._interruptible
        except asyncio.CancelledError:
            if self._interruptible.cancelled() and not _current_cancelling():
                return INTERRUPTED
            raise
        finally:
            self._interruptible = None

    # ---- main loop ----------------------------------------------------------------------------
    async def run(self) -> None:
        try:
            if self.adopted is not None:
                await self._adopt(self.adopted)
            while True:
                self.changed.clear()
                if self.wants_stop():
                    await self._shutdown()
                    if self.dropped or self.task.desired_state >= S.REMOVE:
                        await self._remove()
                    if self.dropped:
                        return
                elif self.state < S.COMPLETE and not (
                    self.state >= S.READY and self.task.desired_state < S.RUNNING
                ):
                    await self._advance()
                    continue
                await self.changed.wait()
        except asyncio.CancelledError:
            raise
        except Exception as e:  # a bug, not a task failure: log it and report the task failed
            log.exception("task controller crashed task=%s", self.id)
            if self.state < S.COMPLETE:
                self.report(
                    S.FAILED if self.state >= S.STARTING else S.REJECTED, "controller error", one_line(e)
                )
        finally:
            self.finished.set()

    async def _adopt(self, info: Any) -> None:
        status = _status_of(info)
        log.info("container re-adopted task=%s status=%s", self.id, status)
        if self.w.network is not None and status != "exited":
            try:  # idempotent: the namespace is kept, endpoint records and DNS come back
                await self.w.network.prepare(self.task)  # active: it served before the restart
                self._netns_prepared = True
                self._serving = status == "running"
            except Exception as e:
                log.warning("network re-adoption failed task=%s err=%s", self.id, one_line(e))
        if status == "running" and self.state > S.RUNNING:
            log.warning("container of a finished task still runs task=%s: stopping it", self.id)
            await self._stop()
        elif status == "running":
            self.report(S.RUNNING, "started", pid=_pid_of(info))
        elif status == "exited":
            if self.state < S.COMPLETE and info.exit is not None:
                self._report_exit(info.exit)
        elif status == "created" and self.state < S.READY:
            self.report(S.READY, "prepared")
        elif status == "created" and self.state >= S.STARTING:
            # It was about to start when the agent died: start it now.
            self.state = S.READY

    async def _advance(self) -> None:
        eng = self.w.engine
        task = self.task
        if self.state < S.ACCEPTED:
            self.report(S.ACCEPTED, "accepted")
        elif self.state < S.PREPARING:
            self.report(S.PREPARING, "preparing")
        elif self.state < S.READY or (self.state < S.RUNNING and not self.has_container):
            # (Also after an agent restart that lost a prepared container: prepare it again.)
            try:
                if await self._interrupt(eng.pull(task)) is INTERRUPTED or self.wants_stop():
                    return
                net = NetworkSetup()
                if self.w.network is not None:
                    self._netns_prepared = True  # release() even if prepare fails half-way
                    net = await self.w.network.prepare(task, active=False)
                spec_task = expand_task(task, self.w.node_id, self.w.hostname)
                await eng.create(spec_task, net, self.w.secrets, self.w.configs, self.w.node_id)
                self.has_container = True
            except asyncio.CancelledError:
                raise
            except Exception as e:
                await self._cleanup_after_failure()
                self.report(S.REJECTED, "preparing", one_line(e))
                return
            if self.state < S.READY:
                self.report(S.READY, "prepared")
        elif self.state < S.STARTING:
            if self.task.desired_state < S.RUNNING:
                return
            self.report(S.STARTING, "starting")
        elif self.state < S.RUNNING:
            try:
                info = await eng.inspect(self.id)
                if info is None:
                    raise RuntimeError("container vanished before it started")
                if _status_of(info) == "created":
                    await eng.start(self.id)
                    info = await eng.inspect(self.id)
            except asyncio.CancelledError:
                raise
            except Exception as e:
                self.report(S.FAILED, "starting", one_line(e))
                return
            if info is not None and _status_of(info) == "exited" and info.exit is not None:
                self._report_exit(info.exit)
                return
            if info is not None and self._has_health(info) and _health_of(info) != "healthy":
                # As Docker: a task with a health check is RUNNING once healthy, so a start-first
                # update stops an old task only when its replacement serves.
                result = await self._interrupt(self._wait(has_health=True, until_healthy=True))
                if result is INTERRUPTED:
                    return  # shutdown requested: the main loop stops it
                what, ex = result
                if what == "exit":
                    self._report_exit(ex)
                    return
                if what == "unhealthy":
                    await self._stop()
                    self.report(S.FAILED, "starting", "task: container is unhealthy")
                    return
                info = await eng.inspect(self.id)
            self.report(S.RUNNING, "started", pid=_pid_of(info) if info is not None else 0)
        else:  # RUNNING: wait for the exit, or for the health check to give up on it
            await self._watch_running()

    def _has_health(self, info: Any) -> bool:
        return bool(self.task.spec.container.healthcheck.test) or _health_of(info) != ""

    async def _wait(self, *, has_health: bool, until_healthy: bool) -> tuple[str, Any]:
        """Until the container exits ("exit", its exit) or turns unhealthy ("unhealthy", None); with
        `until_healthy`, until it is healthy ("healthy", None), else the task serves while it is healthy."""
        eng = self.w.engine
        # Health changes arrive through the engine's callback; polling is the fallback.
        poll = HEALTH_POLL * (4 if self.w.health_events else 1)
        wait_task = asyncio.ensure_future(eng.wait(self.id))
        health_task: asyncio.Future[Any] | None = None
        try:
            while True:
                if health_task is None or health_task.done():
                    self.health_changed.clear()
                    health_task = asyncio.ensure_future(self.health_changed.wait())
                if until_healthy:  # after arming the event: a change from here on is not missed
                    cur = await eng.inspect(self.id)
                    if cur is not None and _health_of(cur) == "healthy":
                        return "healthy", None
                done, _ = await asyncio.wait(
                    {wait_task, health_task},
                    timeout=poll if has_health else None,
                    return_when=asyncio.FIRST_COMPLETED,
                )
                if wait_task in done:
                    return "exit", wait_task.result()
                cur = await eng.inspect(self.id)
                if cur is not None and _health_of(cur) == "unhealthy":
                    return "unhealthy", None
                if cur is not None and not until_healthy:
                    await self._serve(_health_of(cur) == "healthy")
        finally:
            for t in (wait_task, health_task):
                if t is not None and not t.done():
                    t.cancel()
                    with contextlib.suppress(asyncio.CancelledError, Exception):
                        await t

    async def _watch_running(self) -> None:
        eng = self.w.engine
        info = await eng.inspect(self.id)
        if info is None:
            self.report(S.FAILED, "started", "container is gone (removed outside the agent)")
            return
        has_health = self._has_health(info)
        if not has_health or _health_of(info) == "healthy":
            await self._serve(True)
        result = await self._interrupt(self._wait(has_health=has_health, until_healthy=False))
        if result is INTERRUPTED:
            return  # shutdown requested: the main loop stops it
        what, ex = result
        if what == "unhealthy":
            await self._stop()
            self.report(S.FAILED, "started", "task: container is unhealthy")
            return
        self._report_exit(ex)

    def _report_exit(self, ex: Any) -> None:
        code = int(ex.exit_code)
        self.exit_code = code
        if code == 0 and not ex.oom_killed:
            self.report(S.COMPLETE, "finished", exit_code=0)
        else:
            self.report(S.FAILED, "started", exit_error(ex), exit_code=code)

    async def _serve(self, active: bool) -> None:
        """Put the task in (or take it out of) its service's load balancing and DNS."""
        if self.w.network is None or active == self._serving:
            return
        try:
            await (self.w.network.activate if active else self.w.network.deactivate)(self.id)
            self._serving = active
        except Exception as e:
            log.warning("network %s failed task=%s err=%s", "activate" if active else "deactivate", self.id,
                        one_line(e))

    async def _stop(self) -> None:
        if not self.has_container:
            return
        serving = self._serving
        await self._serve(False)
        if serving and not self._serving and self.w.converge_delay > 0:
            # As Docker (defaultGossipConvergeDelay): the other nodes hear of the deactivation by
            # gossip; the container keeps listening until they stopped sending new connections to it.
            await asyncio.sleep(self.w.converge_delay)
        c = self.task.spec.container
        grace = c.stop_grace_period.ToNanoseconds() / 1e9 if c.HasField("stop_grace_period") else None
        try:
            info = await self.w.engine.inspect(self.id)
            if info is not None and _status_of(info) in ("running", "created"):
                await self.w.engine.stop(self.id, grace)
        except Exception as e:
            log.warning("stopping container failed task=%s err=%s", self.id, one_line(e))

    async def _shutdown(self) -> None:
        if self.state >= S.COMPLETE:
            return
        await self._stop()
        self.report(S.SHUTDOWN, "shutdown", exit_code=self.exit_code)

    async def _remove(self) -> None:
        if self.has_container:
            try:
                await self.w.engine.remove(self.id)
            except Exception as e:
                log.warning("removing container failed task=%s err=%s", self.id, one_line(e))
            self.has_container = False
            log.info("container removed task=%s", self.id)
        await self._release_network()

    async def _release_network(self) -> None:
        if self.w.network is not None:  # release() is idempotent: call it whatever prepare() got to
            try:
                await self.w.network.release(self.id)
            except Exception as e:
                log.warning("releasing network attachments failed task=%s err=%s", self.id, one_line(e))
            self._netns_prepared = False

    async def _cleanup_after_failure(self) -> None:
        with contextlib.suppress(Exception):
            if await self.w.engine.inspect(self.id) is not None:
                await self.w.engine.remove(self.id)
        self.has_container = False
        await self._release_network()


def _current_cancelling() -> int:
    t = asyncio.current_task()
    return t.cancelling() if t is not None else 0


class Worker:
    """Assigned tasks → task controllers. `report(task_id, status)` receives every status change."""

    def __init__(
        self,
        engine: Any,
        node_id: str,
        report: Callable[[str, types_pb2.TaskStatus], None],
        *,
        network: NetworkHooks | None = None,
        hostname: str = "",
        converge_delay: float = GOSSIP_CONVERGE_DELAY,
    ) -> None:
        """`converge_delay`: seconds between taking a serving task out of its service's load balancing
        and stopping its container, for the other nodes to hear of it."""
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
        self.controllers: dict[str, TaskController] = {}
        self._runners: set[asyncio.Task[None]] = set()
        self._adoptable: dict[str, Any] | None = None  # task id -> container info, until first COMPLETE set
        self._have_full_set = False
        self.changed = asyncio.Event()  # set on every assignment change (log followers watch it)

    async def start(self) -> None:
        """Find this node's existing containers (after an agent restart) for adoption."""
        found: dict[str, Any] = {}
        for info in await self.engine.list():
            labels = _labels_of(info)
            tid = labels.get(LABEL_TASK_ID)
            if tid and labels.get(LABEL_NODE_ID, self.node_id) == self.node_id:
                found[tid] = info
        self._adoptable = found
        log.info("worker started node=%s existing_containers=%d", self.node_id, len(found))

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
            if self.network is not None:  # before the tasks: their networks are built with the keys
                self.network.set_all_network_keys(keys)
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
        for ch in changes:
            item = ch.assignment.WhichOneof("item")
            obj = getattr(ch.assignment, item)
            remove = ch.action == dispatcher_pb2.AssignmentChange.REMOVE
            if item == "task":
                self._drop(obj.id) if remove else self._set_task(obj)
            elif item == "network_keys":
                if self.network is not None:
                    self.network.set_network_keys(obj.network_id, None if remove else list(obj.keys))
            else:
                table = self.secrets if item == "secret" else self.configs
                if remove:
                    table.pop(obj.id, None)
                else:
                    table[obj.id] = obj
        self.changed.set()
        self.changed = asyncio.Event()

    def _set_task(self, t: objects_pb2.Task) -> None:
        self.tasks[t.id] = t
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
        ctl = self.controllers.get(tid)
        if ctl is not None:
            ctl.drop()

    async def _run_controller(self, ctl: TaskController) -> None:
        try:
            await ctl.run()
        finally:
            if self.controllers.get(ctl.id) is ctl and ctl.dropped:
                del self.controllers[ctl.id]

    async def _reap_orphan(self, tid: str, info: Any) -> None:
        log.info("container of unassigned task stopped and removed task=%s", tid)
        try:
            if _status_of(info) in ("running", "created"):
                await self.engine.stop(info.id, None)
            await self.engine.remove(info.id)
        except Exception as e:
            log.warning("removing orphan container failed task=%s err=%s", tid, one_line(e))
        if self.network is not None:
            try:
                await self.network.release(tid)
            except Exception as e:
                log.warning("releasing orphan's network failed task=%s err=%s", tid, one_line(e))

    def _spawn(self, coro: Any, name: str) -> None:
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
