"""One task's controller: the side effects of the agent's task state machine.

`TaskController.run` asks `shoal.agent.taskstate.next_step` what to do, does it -- pull, network,
create, start, waits, stop, remove, on the engine (`executor.EngineAdapter`) and the node's
networking (`NetworkHooks`) -- turns what happened into an `Outcome`, and reports the status
`taskstate.transition` gives for it. It runs until its task leaves the assignment set.

A task serves its service (VIP backend, service name in DNS, ingress routing) only between
`NetworkHooks.activate` -- once it runs, and is healthy if it has a health check -- and
`deactivate` -- before it is stopped or when it turns unhealthy -- so a rolling update never sends
a client to a container that does not listen yet or is on its way out.

The container id is the task id, so a controller made after an agent restart re-adopts the
container it finds (`taskstate.adopt`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from typing import Any, Protocol, TypeVar

from shoal.agent.engine import ContainerState, ExitStatus, NetworkSetup
from shoal.agent.executor import EngineAdapter, check_task, container_config, container_name
from shoal.agent.taskstate import (
    Outcome,
    Result,
    Step,
    TaskView,
    Transition,
    adopt,
    crashed,
    next_step,
    stopping,
    transition,
)
from shoal.agent.templates import expand_task
from shoal.proto import objects_pb2, types_pb2

log = logging.getLogger("shoal.worker")

HEALTH_POLL = 0.5
S = types_pb2
T = TypeVar("T")


class NetworkHooks(Protocol):
    """Where the node's networking plugs in (`shoal.agent.network.NetworkAgent`, wired by swarmd).

    `prepare(task)` runs before the container is created (its netns, interfaces on each of
    `task.networks`, endpoint records, DNS) and returns what the container joins. It must be
    idempotent: it is called again for a container re-adopted after an agent restart.
    `release(task_id)` runs after the container is removed, after a failed create, and for an orphan
    container removed at restart. `activate(task_id)` / `deactivate(task_id)` put the task in and
    out of its service's load balancing and DNS."""

    async def prepare(self, task: objects_pb2.Task, *, active: bool = True) -> NetworkSetup: ...

    async def activate(self, task_id: str) -> None: ...

    async def deactivate(self, task_id: str) -> None: ...

    async def release(self, task_id: str) -> None: ...

    def set_network_keys(self, network_id: str, keys: Sequence[types_pb2.EncryptionKey] | None) -> None: ...

    def set_all_network_keys(self, keys: dict[str, Sequence[types_pb2.EncryptionKey]]) -> None: ...


class TaskHost(Protocol):
    """What a task controller uses of its worker (`shoal.agent.worker.Worker`)."""

    engine: EngineAdapter
    network: NetworkHooks | None
    node_id: str
    hostname: str  # for {{.Node.Hostname}} templates
    secrets: dict[str, objects_pb2.Secret]
    configs: dict[str, objects_pb2.Config]
    converge_delay: float  # seconds between deactivate() and the stop of a serving task
    health_events: bool  # the engine calls back on health changes (else poll more often)

    def report_status(self, task_id: str, status: types_pb2.TaskStatus) -> None: ...


def one_line(e: BaseException | str) -> str:
    s = str(e).strip() or type(e).__name__
    return s.splitlines()[0] if s else s


class _Interrupted:
    """What an interruptible wait returns when a shutdown cancelled it."""


INTERRUPTED = _Interrupted()


def _current_cancelling() -> int:
    t = asyncio.current_task()
    return t.cancelling() if t is not None else 0


class TaskController:
    """Drives one task; `update()` hands it a newer assignment, `drop()` tells it the task is gone."""

    def __init__(self, host: TaskHost, task: objects_pb2.Task, adopted: ContainerState | None = None) -> None:
        self.host = host
        self.task = task
        self.state = max(task.status.state, S.ASSIGNED)
        self.adopted = adopted
        self.has_container = adopted is not None
        self.removed = False  # container removed and networking released (once)
        self.dropped = False
        self.changed = asyncio.Event()
        self.health_changed = asyncio.Event()
        self._interruptible: asyncio.Future[Any] | None = None
        self._serving = False  # in its service's load balancing and DNS (NetworkHooks.activate)
        self.finished = asyncio.Event()

    @property
    def id(self) -> str:
        return self.task.id

    def wants_stop(self) -> bool:
        return stopping(self.view())

    def view(self) -> TaskView:
        return TaskView(self.state, self.task.desired_state, self.dropped, self.has_container, self.removed)

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

    def report(self, t: Transition) -> None:
        self.state = t.state
        st = types_pb2.TaskStatus(state=t.state, message=t.message, err=t.err)
        st.timestamp.FromNanoseconds(time.time_ns())
        if self.has_container or t.exit_code is not None:
            st.container.container_id = self.id
            st.container.pid = t.pid
            if t.exit_code is not None:
                st.container.exit_code = t.exit_code
        st.port_status.ports.extend(self.task.endpoint.ports)
        log.info(
            "task state task=%s name=%s state=%s%s",
            self.id,
            container_name(self.task),
            S.TaskState.Name(t.state),
            f" err={t.err!r}" if t.err else "",
        )
        self.host.report_status(self.id, st)

    async def _interrupt(self, aw: Coroutine[Any, Any, T]) -> T | _Interrupted:
        """Run a long step (pull, wait) that a shutdown cancels; INTERRUPTED when it did."""
        fut = asyncio.ensure_future(aw)
        self._interruptible = fut
        try:
            return await fut
        except asyncio.CancelledError:
            if fut.cancelled() and not _current_cancelling():
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
                step = next_step(self.view())
                if step is Step.FINISH:
                    return
                if step is Step.WAIT:
                    await self.changed.wait()
                    continue
                t = transition(self.state, step, await self._perform(step))
                if t is not None:
                    self.report(t)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # a bug, not a task failure: log it and report the task failed
            log.exception("task controller crashed task=%s", self.id)
            t = crashed(self.state, one_line(e))
            if t is not None:
                self.report(t)
        finally:
            self.finished.set()

    async def _perform(self, step: Step) -> Outcome:
        """Do ``step``'s side effects; how it ended."""
        if step is Step.PREPARE:
            return await self._prepare()
        if step is Step.START:
            return await self._start()
        if step is Step.WATCH:
            return await self._watch_running()
        if step is Step.SHUTDOWN:
            await self._stop()
        elif step is Step.REMOVE:
            await self._remove()
        return Outcome(Result.DONE)  # ACCEPT, PREPARING, STARTING only report

    async def _adopt(self, info: ContainerState) -> None:
        status = info.status
        log.info("container re-adopted task=%s status=%s", self.id, status)
        if self.host.network is not None and status != "exited":
            try:  # idempotent: the namespace is kept, endpoint records and DNS come back
                await self.host.network.prepare(self.task)  # active: it served before the restart
                self._serving = status == "running"
            except Exception as e:
                log.warning("network re-adoption failed task=%s err=%s", self.id, one_line(e))
        a = adopt(self.state, status, info.exit, int(info.pid or 0))
        if a.stop:
            log.warning("container of a finished task still runs task=%s: stopping it", self.id)
            await self._stop()
        if a.report is not None:
            self.report(a.report)
        if a.state is not None:
            self.state = a.state

    async def _prepare(self) -> Outcome:
        """Pull the image, prepare the networking, create the container; REJECTED (with everything
        made so far undone) on any failure."""
        eng, task = self.host.engine, self.task
        try:
            check_task(task, self.host.secrets, self.host.configs)
            if await self._interrupt(eng.pull(task)) is INTERRUPTED or self.wants_stop():
                return Outcome(Result.INTERRUPTED)
            net = NetworkSetup()
            if self.host.network is not None:
                net = await self.host.network.prepare(task, active=False)
            spec_task = expand_task(task, self.host.node_id, self.host.hostname)
            await eng.create(container_config(spec_task, net, self.host.secrets, self.host.configs, self.host.node_id))
            self.has_container = True
        except asyncio.CancelledError:
            raise
        except Exception as e:
            await self._cleanup_after_failure()
            return Outcome(Result.ERROR, one_line(e))
        return Outcome(Result.DONE)

    async def _start(self) -> Outcome:
        """Start the container; as Docker, a task with a health check is RUNNING once healthy, so a
        start-first update stops an old task only when its replacement serves."""
        eng = self.host.engine
        try:
            info = await eng.inspect(self.id)
            if info is None:
                raise RuntimeError("container vanished before it started")
            if info.status == "created":
                await eng.start(self.id)
                info = await eng.inspect(self.id)
        except asyncio.CancelledError:
            raise
        except Exception as e:
            return Outcome(Result.ERROR, one_line(e))
        if info is not None and info.status == "exited" and info.exit is not None:
            return Outcome(Result.EXITED, exit=info.exit)
        if info is not None and self._has_health(info) and (info.health_status or "") != "healthy":
            result = await self._interrupt(self._wait(has_health=True, until_healthy=True))
            if isinstance(result, _Interrupted):
                return Outcome(Result.INTERRUPTED)  # shutdown requested: the main loop stops it
            if result[0] is not Result.DONE:
                return await self._failed(result)
            info = await eng.inspect(self.id)
        return Outcome(Result.DONE, pid=int(info.pid or 0) if info is not None else 0)

    async def _watch_running(self) -> Outcome:
        """Serve until the container exits or turns unhealthy."""
        info = await self.host.engine.inspect(self.id)
        if info is None:
            return Outcome(Result.GONE)
        has_health = self._has_health(info)
        if not has_health or info.health_status == "healthy":
            await self._serve(True)
        result = await self._interrupt(self._wait(has_health=has_health, until_healthy=False))
        if isinstance(result, _Interrupted):
            return Outcome(Result.INTERRUPTED)  # shutdown requested: the main loop stops it
        return await self._failed(result)

    async def _failed(self, result: tuple[Result, ExitStatus | None]) -> Outcome:
        """The outcome of a wait that saw the container exit or turn unhealthy (then stop it)."""
        what, ex = result
        if what is Result.UNHEALTHY:
            await self._stop()
            return Outcome(Result.UNHEALTHY)
        return Outcome(Result.EXITED, exit=ex)

    def _has_health(self, info: ContainerState) -> bool:
        return bool(self.task.spec.container.healthcheck.test) or (info.health_status or "") != ""

    async def _wait(self, *, has_health: bool, until_healthy: bool) -> tuple[Result, ExitStatus | None]:
        """Until the container exits (EXITED, its exit) or turns unhealthy (UNHEALTHY, None); with
        `until_healthy`, until it is healthy (DONE, None), else the task serves while it is healthy."""
        eng = self.host.engine
        # Health changes arrive through the engine's callback; polling is the fallback.
        poll = HEALTH_POLL * (4 if self.host.health_events else 1)
        wait_task = asyncio.ensure_future(eng.wait(self.id))
        health_task: asyncio.Future[Any] | None = None
        try:
            while True:
                if health_task is None or health_task.done():
                    self.health_changed.clear()
                    health_task = asyncio.ensure_future(self.health_changed.wait())
                if until_healthy:  # after arming the event: a change from here on is not missed
                    cur = await eng.inspect(self.id)
                    if cur is not None and cur.health_status == "healthy":
                        return Result.DONE, None
                done, _ = await asyncio.wait(
                    {wait_task, health_task},
                    timeout=poll if has_health else None,
                    return_when=asyncio.FIRST_COMPLETED,
                )
                if wait_task in done:
                    return Result.EXITED, wait_task.result()
                cur = await eng.inspect(self.id)
                if cur is not None and cur.health_status == "unhealthy":
                    return Result.UNHEALTHY, None
                if cur is not None and not until_healthy:
                    await self._serve(cur.health_status == "healthy")
        finally:
            for t in (wait_task, health_task):
                if t is not None and not t.done():
                    t.cancel()
                    with contextlib.suppress(asyncio.CancelledError, Exception):
                        await t

    async def _serve(self, active: bool) -> None:
        """Put the task in (or take it out of) its service's load balancing and DNS."""
        if self.host.network is None or active == self._serving:
            return
        hook: Callable[[str], Awaitable[None]] = self.host.network.activate if active else self.host.network.deactivate
        try:
            await hook(self.id)
            self._serving = active
        except Exception as e:
            log.warning("network %s failed task=%s err=%s", "activate" if active else "deactivate", self.id,
                        one_line(e))

    async def _stop(self) -> None:
        """Out of its service (and, if it served, a gossip round later), then stop the container."""
        if not self.has_container:
            return
        serving = self._serving
        await self._serve(False)
        if serving and not self._serving and self.host.converge_delay > 0:
            # As Docker (defaultGossipConvergeDelay): the other nodes hear of the deactivation by
            # gossip; the container keeps listening until they stopped sending new connections to it.
            await asyncio.sleep(self.host.converge_delay)
        c = self.task.spec.container
        grace = c.stop_grace_period.ToNanoseconds() / 1e9 if c.HasField("stop_grace_period") else None
        try:
            info = await self.host.engine.inspect(self.id)
            if info is not None and info.status in ("running", "created"):
                await self.host.engine.stop(self.id, grace)
        except Exception as e:
            log.warning("stopping container failed task=%s err=%s", self.id, one_line(e))

    async def _remove(self) -> None:
        if self.has_container:
            try:
                await self.host.engine.remove(self.id)
            except Exception as e:
                log.warning("removing container failed task=%s err=%s", self.id, one_line(e))
            self.has_container = False
            log.info("container removed task=%s", self.id)
        await self._release_network()
        self.removed = True

    async def _release_network(self) -> None:
        if self.host.network is not None:  # release() is idempotent: call it whatever prepare() got to
            try:
                await self.host.network.release(self.id)
            except Exception as e:
                log.warning("releasing network attachments failed task=%s err=%s", self.id, one_line(e))

    async def _cleanup_after_failure(self) -> None:
        with contextlib.suppress(Exception):
            if await self.host.engine.inspect(self.id) is not None:
                await self.host.engine.remove(self.id)
        self.has_container = False
        await self._release_network()
