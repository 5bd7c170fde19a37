"""A simulated cluster for orchestrator and scheduler tests: nodes in a LocalStore, the real leader
loops, a stand-in for the allocator (NEW -> PENDING, nothing else) and simulated agents that run
assigned tasks (ASSIGNED -> RUNNING, or FAILED for images told to fail) and stop tasks told to stop."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from google.protobuf.duration_pb2 import Duration

from shoal.manager.orchestrator import (
    ConstraintEnforcer,
    GlobalOrchestrator,
    ReplicatedOrchestrator,
    TaskReaper,
)
from shoal.manager.scheduler import Scheduler
from shoal.manager.store import Conflict, LocalStore, NotFound, Tx
from shoal.proto import objects_pb2, specs_pb2, types_pb2

RUNNING = types_pb2.RUNNING
GB = 1 << 30
CPU = 10**9


def dur(seconds: float) -> Duration:
    d = Duration()
    d.FromNanoseconds(int(seconds * 1e9))
    return d


def node(
    hostname: str,
    labels: dict[str, str] | None = None,
    cpus: float = 4,
    mem_gb: float = 8,
    role: int = types_pb2.WORKER,
    state: int = types_pb2.NodeStatus.READY,
    availability: int = types_pb2.ACTIVE,
    engine_labels: dict[str, str] | None = None,
    os: str = "linux",
    arch: str = "x86_64",
    node_id: str = "",
) -> objects_pb2.Node:
    n = objects_pb2.Node(id=node_id, role=role)  # type: ignore[arg-type]
    n.spec.annotations.labels.update(labels or {})
    n.spec.availability = availability  # type: ignore[assignment]
    n.spec.membership = specs_pb2.NodeSpec.ACCEPTED
    n.description.hostname = hostname
    n.description.platform.os = os
    n.description.platform.architecture = arch
    n.description.resources.nano_cpus = int(cpus * CPU)
    n.description.resources.memory_bytes = int(mem_gb * GB)
    n.description.engine.labels.update(engine_labels or {})
    n.status.state = state  # type: ignore[assignment]
    return n


def service_spec(
    name: str,
    replicas: int | None = 1,
    image: str = "busybox:1",
    restart: types_pb2.RestartPolicy | None = None,
    update: types_pb2.UpdateConfig | None = None,
    rollback: types_pb2.UpdateConfig | None = None,
    constraints: list[str] | None = None,
    spread: list[str] | None = None,
    max_replicas: int = 0,
    cpus: float = 0,
    mem_gb: float = 0,
    host_ports: list[int] | None = None,
) -> specs_pb2.ServiceSpec:
    spec = specs_pb2.ServiceSpec()
    spec.annotations.name = name
    spec.task.container.image = image
    if replicas is None:
        getattr(spec, "global").SetInParent()
    else:
        spec.replicated.replicas = replicas
    # Tests want fast restarts unless they say otherwise.
    spec.task.restart.CopyFrom(restart or types_pb2.RestartPolicy(delay=dur(0.01)))
    if update is not None:
        spec.update.CopyFrom(update)
    else:
        spec.update.CopyFrom(types_pb2.UpdateConfig(parallelism=1, monitor=dur(0.05)))
    if rollback is not None:
        spec.rollback.CopyFrom(rollback)
    else:
        spec.rollback.CopyFrom(types_pb2.UpdateConfig(parallelism=0, monitor=dur(0.05)))
    spec.task.placement.constraints.extend(constraints or [])
    for s in spread or []:
        spec.task.placement.preferences.add(spread_descriptor=s)
    spec.task.placement.max_replicas = max_replicas
    spec.task.resources.reservations.nano_cpus = int(cpus * CPU)
    spec.task.resources.reservations.memory_bytes = int(mem_gb * GB)
    for p in host_ports or []:
        spec.endpoint.ports.add(
            target_port=p, published_port=p, publish_mode=types_pb2.PortConfig.HOST
        )
    return spec


def _copy(m: Any) -> Any:
    c = type(m)()
    c.CopyFrom(m)
    return c


@dataclass
class Sim:
    store: LocalStore = field(default_factory=LocalStore)
    fail_images: set[str] = field(default_factory=set)
    reject_images: set[str] = field(default_factory=set)  # the agent rejects these while preparing (bad image)
    # Images whose tasks run for a moment and then fail by themselves.
    crash_images: set[str] = field(default_factory=set)
    agents_paused: bool = False
    loops: dict[str, Any] = field(default_factory=dict)
    history: list[tuple[float, str, str, int, int]] = field(default_factory=list)  # (t, task, node, slot, state)
    observers: list[Callable[[Sim], None]] = field(default_factory=list)

    # ---- objects -----------------------------------------------------------------------------
    async def add_node(self, *args: Any, **kw: Any) -> objects_pb2.Node:
        n = node(*args, **kw)
        return await self.store.update(lambda tx: tx.create(n))

    async def add_nodes(self, count: int, prefix: str = "n", **kw: Any) -> list[objects_pb2.Node]:
        return [await self.add_node(f"{prefix}{i}", **kw) for i in range(count)]

    async def change_node(self, node_id: str, fn: Callable[[objects_pb2.Node], None]) -> None:
        def tx_fn(tx: Tx) -> None:
            n = _copy(tx.get("node", node_id))
            fn(n)
            tx.update(n)

        await self._retry(tx_fn)

    async def set_node_state(self, node_id: str, state: int) -> None:
        def f(n: objects_pb2.Node) -> None:
            n.status.state = state  # type: ignore[assignment]

        await self.change_node(node_id, f)

    async def set_availability(self, node_id: str, availability: int) -> None:
        def f(n: objects_pb2.Node) -> None:
            n.spec.availability = availability  # type: ignore[assignment]

        await self.change_node(node_id, f)

    async def create_service(self, spec: specs_pb2.ServiceSpec) -> objects_pb2.Service:
        svc = objects_pb2.Service(spec=spec, spec_version=1)
        return await self.store.update(lambda tx: tx.create(svc))

    async def update_service(self, sid: str, fn: Callable[[specs_pb2.ServiceSpec], None]) -> None:
        """As the control API does: previous_spec kept, spec_version bumped, update_status cleared."""

        def tx_fn(tx: Tx) -> None:
            svc = _copy(tx.get("service", sid))
            spec = _copy(svc.spec)
            fn(spec)
            if spec == svc.spec:
                return
            svc.previous_spec.CopyFrom(svc.spec)
            svc.previous_spec_version = svc.spec_version
            svc.spec_version = max(svc.spec_version, svc.previous_spec_version) + 1
            svc.spec.CopyFrom(spec)
            svc.ClearField("update_status")
            tx.update(svc)

        await self._retry(tx_fn)

    async def scale(self, sid: str, replicas: int) -> None:
        def f(spec: specs_pb2.ServiceSpec) -> None:
            spec.replicated.replicas = replicas

        await self.update_service(sid, f)

    async def rollback_service(self, sid: str) -> None:
        def tx_fn(tx: Tx) -> None:
            svc = _copy(tx.get("service", sid))
            cur, v = _copy(svc.spec), svc.spec_version
            svc.spec.CopyFrom(svc.previous_spec)
            svc.spec_version = svc.previous_spec_version
            svc.previous_spec.CopyFrom(cur)
            svc.previous_spec_version = v
            svc.update_status.CopyFrom(
                types_pb2.UpdateStatus(state=types_pb2.UpdateStatus.ROLLBACK_STARTED, message="manually requested rollback")
            )
            tx.update(svc)

        await self._retry(tx_fn)

    async def remove_service(self, sid: str) -> None:
        def tx_fn(tx: Tx) -> None:
            tx.delete(tx.get("service", sid))
            for t in tx.sm.tasks_by_service(sid):
                if t.desired_state < types_pb2.REMOVE:
                    t = _copy(t)
                    t.desired_state = types_pb2.REMOVE
                    tx.update(t)

        await self._retry(tx_fn)

    async def _retry(self, fn: Callable[[Tx], Any]) -> Any:
        for _ in range(50):
            try:
                return await self.store.update(fn)
            except (Conflict, NotFound):
                await asyncio.sleep(0.002)
        raise AssertionError("could not commit after 50 conflicts")

    # ---- reads -------------------------------------------------------------------------------
    def tasks(self, sid: str) -> list[objects_pb2.Task]:
        return self.store.sm.tasks_by_service(sid)

    def live(self, sid: str) -> list[objects_pb2.Task]:
        """Tasks that should run and do, on nodes that are up."""
        out = []
        for t in self.tasks(sid):
            n = self.store.get("node", t.node_id) if t.node_id else None
            if (
                t.desired_state == RUNNING
                and t.status.state == RUNNING
                and n is not None
                and n.status.state == types_pb2.NodeStatus.READY
            ):
                out.append(t)
        return out

    def running_per_node(self, sid: str) -> dict[str, int]:
        out: dict[str, int] = {}
        for t in self.live(sid):
            out[t.node_id] = out.get(t.node_id, 0) + 1
        return out

    def service(self, sid: str) -> objects_pb2.Service:
        return self.store.get("service", sid)

    def update_state(self, sid: str) -> str:
        s = self.service(sid)
        return types_pb2.UpdateStatus.State.Name(s.update_status.state)

    def check_slots(self) -> None:
        """Invariant: never two tasks of one slot running (desired and observed) on live nodes."""
        seen: dict[tuple[str, int], str] = {}
        for svc in self.store.sm.list("service"):
            if svc.spec.WhichOneof("mode") != "replicated":
                continue
            for t in self.live(svc.id):
                key = (svc.id, t.slot)
                assert key not in seen, f"slot {t.slot} of {svc.spec.annotations.name} runs {seen[key]} and {t.id}"
                seen[key] = t.id

    # ---- waiting -----------------------------------------------------------------------------
    async def until(self, pred: Callable[[], bool], timeout: float = 20.0, what: str = "condition") -> None:
        deadline = time.monotonic() + timeout
        while not pred():
            for obs in self.observers:
                obs(self)
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}\n{self.dump()}")
            await asyncio.sleep(0.005)

    def busy(self) -> bool:
        """A loop has events to handle, a restart timer or an update (with its monitor period) runs."""
        for loop in self.loops.values():
            idle = getattr(loop, "idle", None)
            if idle is not None and not idle.is_set():
                return True
            restarts = getattr(loop, "restarts", None)
            if restarts is not None and restarts.pending_starts():
                return True
            updates = getattr(loop, "updates", None)
            if updates is not None and any(not t.done() for _, t in updates._updates.values()):
                return True
        return False

    async def settle(self, quiet: float = 0.15, timeout: float = 20.0) -> None:
        """Until no loop is busy and nothing was written for `quiet` seconds."""
        deadline = time.monotonic() + timeout
        last, since = self.store.sm.version, time.monotonic()
        while True:
            await asyncio.sleep(0.01)
            for obs in self.observers:
                obs(self)
            v = self.store.sm.version
            if v != last or self.busy():
                last, since = v, time.monotonic()
            elif time.monotonic() - since >= quiet:
                return
            if time.monotonic() > deadline:
                raise AssertionError(f"cluster did not settle\n{self.dump()}")

    def dump(self) -> str:
        lines = []
        for svc in self.store.sm.list("service"):
            lines.append(
                f"service {svc.spec.annotations.name} v{svc.spec_version} {svc.spec.WhichOneof('mode')} "
                f"replicas={svc.spec.replicated.replicas} update={types_pb2.UpdateStatus.State.Name(svc.update_status.state)} "
                f"{svc.update_status.message!r}"
            )
        nodes = {n.id: n.description.hostname for n in self.store.sm.list("node")}
        for t in sorted(self.store.sm.list("task"), key=lambda t: (t.service_id, t.slot, t.meta.version)):
            lines.append(
                f"  task {t.annotations.name} node={nodes.get(t.node_id, t.node_id)} "
                f"state={types_pb2.TaskState.Name(t.status.state)} desired={types_pb2.TaskState.Name(t.desired_state)} "
                f"v{t.spec_version} image={t.spec.container.image} msg={t.status.message!r}"
            )
        return "\n".join(lines)

    # ---- the simulated allocator and agents ----------------------------------------------------
    async def _allocator(self) -> None:
        with self.store.watch(["task"]) as w:
            while True:
                todo = [t for t in self.store.sm.list("task") if t.status.state == types_pb2.NEW and t.desired_state <= RUNNING]
                for t in todo:
                    await self._set_state(t.id, types_pb2.PENDING, "pending task scheduling", when=types_pb2.NEW)
                if await w.queue.get() is None:
                    return

    async def _set_state(self, tid: str, state: int, msg: str, when: int | None = None) -> None:
        def fn(tx: Tx) -> None:
            t = tx.get("task", tid)
            if t is None or (when is not None and t.status.state != when) or t.status.state >= state:
                return
            t = _copy(t)
            t.status.state = state  # type: ignore[assignment]
            t.status.message = msg
            t.status.timestamp.GetCurrentTime()
            tx.update(t)

        for _ in range(50):
            try:
                await self.store.update(fn)
                break
            except (Conflict, NotFound):
                await asyncio.sleep(0.001)
        self.history.append((time.monotonic(), tid, "", 0, state))
        for obs in self.observers:  # every state an agent reports is seen, not only a 5 ms sample
            obs(self)

    async def _agents(self) -> None:
        with self.store.watch(["task", "node"]) as w:
            while True:
                await self._agent_pass()
                try:  # also look again now and then: tests change what agents do without an event
                    async with asyncio.timeout(0.05):
                        msg = await w.queue.get()
                except TimeoutError:
                    continue
                if msg is None:
                    return
                await asyncio.sleep(0.002)
                while not w.queue.empty():
                    if w.queue.get_nowait() is None:
                        return

    async def _agent_pass(self) -> None:
        if self.agents_paused:
            return
        sm = self.store.sm
        for t in sm.list("task"):
            if not t.node_id or t.status.state < types_pb2.ASSIGNED or t.status.state > RUNNING:
                continue
            n = sm.get("node", t.node_id)
            if n is None or n.status.state != types_pb2.NodeStatus.READY:
                continue
            if t.desired_state > RUNNING:
                await self._set_state(t.id, types_pb2.SHUTDOWN, "shutdown")
            elif t.spec.container.image in self.reject_images and t.status.state < types_pb2.READY:
                await self._set_state(t.id, types_pb2.REJECTED, "No such image")
            elif t.desired_state == RUNNING and t.status.state < RUNNING:
                if t.spec.container.image in self.fail_images:
                    await self._set_state(t.id, types_pb2.FAILED, "task: non-zero exit (1)")
                else:
                    await self._set_state(t.id, RUNNING, "started")
            elif t.desired_state == RUNNING and t.spec.container.image in self.crash_images:
                await self._set_state(t.id, types_pb2.FAILED, "task: non-zero exit (2)")
            elif t.desired_state == types_pb2.READY and t.status.state < types_pb2.READY:
                await self._set_state(t.id, types_pb2.READY, "prepared")

    @contextlib.asynccontextmanager
    async def running(
        self, scheduler_debounce: float = 0.005, real_allocator: bool = False, **names: bool
    ) -> AsyncIterator[Sim]:
        """Run the leader loops (all, or those named True) plus the allocator (the real one, or a stand-in
        that only moves NEW tasks to PENDING) and the simulated agents."""
        all_loops = {
            "replicated": lambda: ReplicatedOrchestrator(self.store, debounce=0.005, old_task_timeout=2.0),
            "global_": lambda: GlobalOrchestrator(self.store, debounce=0.005, old_task_timeout=2.0),
            "enforcer": lambda: ConstraintEnforcer(self.store),
            "reaper": lambda: TaskReaper(self.store, debounce=0.005),
            "scheduler": lambda: Scheduler(self.store, debounce=scheduler_debounce, max_delay=0.05),
        }
        chosen = {k: v for k, v in all_loops.items() if names.get(k, not names or not any(names.values()))}
        tasks = []
        try:
            for k, make in chosen.items():
                self.loops[k] = make()
                tasks.append(asyncio.create_task(self.loops[k].run(), name=k))
            if real_allocator:
                from shoal.manager.allocator import Allocator

                if self.store.cluster() is None:  # as `swarmd init` writes it; the allocator waits for it
                    await self.store.update(lambda tx: tx.create(objects_pb2.Cluster(spec=specs_pb2.ClusterSpec(
                        annotations=types_pb2.Annotations(name="default"),
                        default_address_pool=["198.19.0.0/16"], subnet_size=24))))
                self.loops["allocator"] = Allocator(self.store)
                tasks.append(asyncio.create_task(self.loops["allocator"].run(), name="allocator"))
            else:
                tasks.append(asyncio.create_task(self._allocator(), name="allocator"))
            tasks.append(asyncio.create_task(self._agents(), name="agents"))
            await asyncio.sleep(0)
            yield self
            for t in tasks:
                if t.done() and not t.cancelled() and t.exception() is not None:
                    raise t.exception()  # type: ignore[misc]
        finally:
            for t in tasks:
                t.cancel()
            done, stuck = await asyncio.wait(tasks, timeout=5)
            assert not stuck, f"loops that ignored cancellation: {[t.get_name() for t in stuck]}"
