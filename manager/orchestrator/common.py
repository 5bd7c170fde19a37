"""Helpers shared by the orchestrators: task creation, dirtiness, policies with their defaults, commits."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

from google.protobuf.duration_pb2 import Duration

from shoal.manager.scheduler.constraint import Constraint, matches, parse_constraints
from shoal.manager.store import Conflict, NotFound, Store, Tx, drain, new_id
from shoal.proto import objects_pb2, specs_pb2, types_pb2, watch_pb2

log = logging.getLogger("shoal.orchestrator")

T = TypeVar("T")

RUNNING = types_pb2.RUNNING
DEFAULT_RESTART_DELAY = 5.0
DEFAULT_MONITOR = 5.0
DEFAULT_HISTORY_LIMIT = 5
COMMIT_BACKOFF = 0.005  # seconds, times the attempt number, before `commit` builds a transaction again
# States a task reaches by itself when it ends (as opposed to being shut down on purpose).
ENDED_BY_ITSELF = frozenset({types_pb2.COMPLETE, types_pb2.FAILED, types_pb2.REJECTED})


def seconds(d: Duration) -> float:
    return d.seconds + d.nanos / 1e9


def is_replicated(svc: objects_pb2.Service) -> bool:
    return svc.spec.WhichOneof("mode") in ("replicated", None)


def is_global(svc: objects_pb2.Service) -> bool:
    return svc.spec.WhichOneof("mode") == "global"


def is_live_service(svc: objects_pb2.Service | None) -> bool:
    return svc is not None and not svc.pending_delete


def restart_delay(spec: types_pb2.TaskSpec) -> float:
    if spec.restart.HasField("delay"):
        return seconds(spec.restart.delay)
    return DEFAULT_RESTART_DELAY


def update_config(svc: objects_pb2.Service, rollback: bool) -> types_pb2.UpdateConfig:
    """The update (or rollback) config in force, with Docker's defaults when the spec has none."""
    field = "rollback" if rollback else "update"
    if svc.spec.HasField(field):
        cfg = types_pb2.UpdateConfig()
        cfg.CopyFrom(getattr(svc.spec, field))
        return cfg
    return types_pb2.UpdateConfig(parallelism=1)


def monitor_period(cfg: types_pb2.UpdateConfig) -> float:
    return seconds(cfg.monitor) if cfg.HasField("monitor") else DEFAULT_MONITOR


def history_limit(store: Store) -> int:
    """Dead tasks kept per slot: the cluster's task_history_retention_limit (0/unset = 5, < 0 = keep all)."""
    cluster = store.cluster()
    limit = cluster.spec.orchestration.task_history_retention_limit if cluster else 0
    return DEFAULT_HISTORY_LIMIT if limit == 0 else int(limit)


def task_timestamp(t: objects_pb2.Task) -> float:
    """When the task's current status was reached (manager clock preferred)."""
    for ts in (t.status.applied_at, t.status.timestamp, t.meta.updated_at):
        if ts.seconds or ts.nanos:
            return ts.seconds + ts.nanos / 1e9
    return time.time()


def created_key(t: objects_pb2.Task) -> tuple[int, int, int]:
    """Sort key: oldest first (creation time, then store version)."""
    return (t.meta.created_at.seconds, t.meta.created_at.nanos, t.meta.version)


def new_task(
    svc: objects_pb2.Service,
    slot: int = 0,
    node_id: str = "",
    desired: int = RUNNING,
) -> objects_pb2.Task:
    """A task of the service's current spec, in state NEW (the allocator moves it on to PENDING)."""
    tid = new_id()
    t = objects_pb2.Task(
        id=tid,
        service_id=svc.id,
        slot=slot,
        node_id=node_id,
        spec_version=svc.spec_version,
        desired_state=desired,  # type: ignore[arg-type]
    )
    t.spec.CopyFrom(svc.spec.task)
    t.service_annotations.CopyFrom(svc.spec.annotations)
    t.annotations.name = f"{svc.spec.annotations.name}.{node_id if node_id and not slot else slot}.{tid}"
    if svc.HasField("endpoint"):
        t.endpoint.CopyFrom(svc.endpoint)
    elif svc.spec.HasField("endpoint"):
        t.endpoint.spec.CopyFrom(svc.spec.endpoint)
    t.status.state = types_pb2.NEW
    t.status.message = "created"
    t.status.timestamp.GetCurrentTime()
    return t


def is_task_dirty(svc: objects_pb2.Service, t: objects_pb2.Task, sm: Any = None) -> bool:
    """True when the task was made from another task template (or endpoint) than the service's now.

    As in Docker, a change of placement alone does not replace a task whose node still fits it (given
    `sm`, the store's state machine, to look the node up)."""
    if t.spec_version and t.spec_version == svc.spec_version:
        return False
    if t.endpoint.spec != svc.spec.endpoint:
        return True
    if t.spec == svc.spec.task:
        return False
    if sm is None or not t.node_id or t.spec.placement == svc.spec.task.placement:
        return True
    a, b = types_pb2.TaskSpec(), types_pb2.TaskSpec()
    a.CopyFrom(t.spec)
    b.CopyFrom(svc.spec.task)
    a.ClearField("placement")
    b.ClearField("placement")
    if a != b:
        return True
    node = sm.get("node", t.node_id)
    return node is None or not node_fits_spec(svc.spec.task, node)


_constraint_cache: dict[tuple[str, ...], list[Constraint]] = {}


def constraints_of(spec: types_pb2.TaskSpec) -> list[Constraint]:
    key = tuple(spec.placement.constraints)
    got = _constraint_cache.get(key)
    if got is None:
        try:
            got = parse_constraints(key)
        except ValueError as e:
            log.warning("ignoring bad placement constraints %s: %s", list(key), e)
            got = []
        if len(_constraint_cache) > 4096:
            _constraint_cache.clear()
        _constraint_cache[key] = got
    return got


def platform_ok(spec: types_pb2.TaskSpec, node: objects_pb2.Node) -> bool:
    plats = spec.placement.platforms
    if not plats:
        return True
    from shoal.manager.scheduler.constraint import normalize_arch

    nos = node.description.platform.os.lower()
    narch = normalize_arch(node.description.platform.architecture)
    for p in plats:
        if (not p.os or p.os.lower() == nos) and (not p.architecture or normalize_arch(p.architecture) == narch):
            return True
    return False


def node_fits_spec(spec: types_pb2.TaskSpec, node: objects_pb2.Node) -> bool:
    """Constraints and platforms (not resources) of a task template hold on the node."""
    return matches(constraints_of(spec), node) and platform_ok(spec, node)


def node_ready_active(node: objects_pb2.Node | None) -> bool:
    return (
        node is not None
        and node.status.state == types_pb2.NodeStatus.READY
        and node.spec.availability == types_pb2.ACTIVE
    )


def node_lost(node: objects_pb2.Node | None) -> bool:
    """Tasks on this node must be replaced: the node is gone, down, or drained."""
    return node is None or node.status.state == types_pb2.NodeStatus.DOWN or node.spec.availability == types_pb2.DRAIN


def copy_task(t: objects_pb2.Task) -> objects_pb2.Task:
    c = objects_pb2.Task()
    c.CopyFrom(t)
    return c


def copy_service(s: objects_pb2.Service) -> objects_pb2.Service:
    c = objects_pb2.Service()
    c.CopyFrom(s)
    return c


def shut_down(tx: Tx, task_id: str) -> objects_pb2.Task | None:
    """In `tx`: set desired_state SHUTDOWN on the task, unless it is gone or already past RUNNING;
    the updated task, or None."""
    t = tx.get("task", task_id)
    if t is None or t.desired_state > RUNNING:
        return None
    t = copy_task(t)
    t.desired_state = types_pb2.SHUTDOWN
    tx.update(t)
    return t


async def commit(store: Store, fn: Callable[[Tx], T], what: str, attempts: int = 5) -> T | None:
    """Run `fn` in a transaction, built again (`Store.update`) when a concurrent writer won: any
    conflict (a stale version above all), or an object `fn` wrote that was removed meanwhile
    (NotFound; builders read through `tx.get` and skip what is gone). After `attempts` tries it
    gives up: logged, None (the next reconcile starts from the store again)."""
    try:
        return await store.update(fn, attempts - 1, retry_on=(Conflict, NotFound), backoff=COMMIT_BACKOFF)
    except (Conflict, NotFound) as e:
        log.warning("%s: gave up after %d conflicts: %s", what, attempts, e)
        return None


async def commit_chunks(store: Store, builders: Sequence[Callable[[Tx], Any]], what: str, chunk: int = 500) -> None:
    """Run many small builders, `chunk` of them per transaction; a conflicting chunk is retried alone."""
    for i in range(0, len(builders), chunk):
        part = builders[i : i + chunk]

        def run_all(tx: Tx, part: Sequence[Callable[[Tx], Any]] = part) -> None:
            for b in part:
                b(tx)

        try:
            await store.update(run_all)
        except (Conflict, NotFound):
            for b in part:
                await commit(store, b, what)


class TaskWaiters:
    """Futures resolved when a task event satisfies a predicate; fed by the owner's watch loop."""

    def __init__(self) -> None:
        self._waiters: dict[str, list[tuple[Callable[[Any], bool], asyncio.Future[Any]]]] = {}

    def notify(self, kind: str, obj: Any) -> None:
        key = f"{kind}:{obj.id}"
        lst = self._waiters.get(key)
        if not lst:
            return
        keep = []
        for pred, fut in lst:
            if fut.done():
                continue
            if pred(obj):
                fut.set_result(obj)
            else:
                keep.append((pred, fut))
        if keep:
            self._waiters[key] = keep
        else:
            del self._waiters[key]

    def notify_event(self, ev: watch_pb2.WatchEvent) -> None:
        kind = ev.object.WhichOneof("object")
        if kind is None:
            return
        obj = getattr(ev.object, kind)
        if ev.action == watch_pb2.WatchEvent.DELETE:
            # A deleted object satisfies any wait: callers re-read the store.
            lst = self._waiters.pop(f"{kind}:{obj.id}", [])
            for _, fut in lst:
                if not fut.done():
                    fut.set_result(None)
            return
        self.notify(kind, obj)

    async def wait(
        self, store: Store, kind: str, oid: str, pred: Callable[[Any], bool], timeout: float | None = None
    ) -> Any:
        """Wait until the object satisfies `pred` (checked now, then on every event); None on delete/timeout."""
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._waiters.setdefault(f"{kind}:{oid}", []).append((pred, fut))
        cur = store.get(kind, oid)
        if cur is None:
            return None
        if pred(cur):
            return cur
        try:
            # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a cancellation.
            async with asyncio.timeout(timeout):
                return await fut
        except TimeoutError:
            return None
        finally:
            if not fut.done():
                fut.cancel()


async def drain_events(
    queue: asyncio.Queue[Any], handle: Callable[[watch_pb2.WatchMessage], Awaitable[None] | None], debounce: float
) -> bool:
    """Wait for one message, then take everything arriving within `debounce`; False when the watch closed."""
    msg = await queue.get()
    if msg is None:
        return False
    r = handle(msg)
    if r is not None:
        await r
    if debounce > 0:
        await asyncio.sleep(debounce)
    for msg in drain(queue):
        if msg is None:
            return False
        r = handle(msg)
        if r is not None:
            await r
    return True


def spec_has_network(spec: specs_pb2.ServiceSpec) -> bool:
    return bool(spec.task.networks)
