"""Prometheus metrics of the manager role: the store, the control API, tasks, scheduler, dispatcher.

Off unless swarmd was given `--metrics-addr`: importing `prometheus_client` costs ~2.4 MB resident,
so this module imports it only in `enable`. Until then `current()` is None and every hook below is
one `None` check. Once enabled (once per process, on every node: a worker may be promoted later),
the counters and histograms are process-wide and count from then on; the gauges are read at scrape
time from the live manager role (`ManagerCollector`), and have no sample while this node runs no
manager role (or, for the scheduler's, while this manager does not lead).

Metrics (names, types and labels are listed in docs/operations.md, "Metrics"):

- `shoal_store_write_duration_seconds` (histogram): one committed store write (`EtcdStore.propose`),
  from the call to the cache holding it;
- `shoal_store_watch_latency_seconds` (histogram): from etcd's answer to a committed write of this
  manager until this manager's watch has applied that revision to its cache;
- `shoal_store_leader`, `shoal_store_raft_term`, `shoal_store_revision`, `shoal_manager_leader` (gauges);
- `shoal_controlapi_requests_total{method,code}` (counter) and
  `shoal_controlapi_request_duration_seconds{method}` (histogram), by `ControlAPIMetrics`, a server
  interceptor on the control API's listeners (local socket and mTLS);
- `shoal_manager_tasks{state}` (gauge): tasks in the store by observed state;
- `shoal_scheduler_pending_tasks` (gauge), `shoal_scheduler_decisions_total{result}` (counter);
- `shoal_dispatcher_sessions` (gauge), `shoal_dispatcher_sessions_opened_total` and
  `shoal_dispatcher_heartbeats_total` (counters).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import TYPE_CHECKING, Any, Protocol

import grpc

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry
    from prometheus_client.metrics_core import Metric

CONTROL_PREFIX = "/shoal.Control/"
# Store writes here take ~1-20 ms; a write without quorum waits up to its 4 s deadline.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class LiveManager(Protocol):
    """What the collector reads from the manager role (`shoal.manager.manager.Manager`)."""

    def metrics_snapshot(self) -> ManagerSnapshot | None: ...


class ManagerSnapshot(Protocol):
    store_leader: bool
    raft_term: int
    revision: int
    control_leader: bool
    tasks_by_state: dict[str, int]
    dispatcher_sessions: int


class ManagerMetrics:
    """The manager's metrics in `registry`. Build it through `enable`."""

    def __init__(self, registry: CollectorRegistry, manager: Callable[[], LiveManager | None]) -> None:
        from prometheus_client import Counter, Histogram

        self.store_write = Histogram(
            "shoal_store_write_duration_seconds",
            "Committed store writes: from the call until this manager's cache holds the write.",
            buckets=LATENCY_BUCKETS, registry=registry)
        self.store_watch = Histogram(
            "shoal_store_watch_latency_seconds",
            "From etcd's answer to a committed write of this manager until its watch applied that revision.",
            buckets=LATENCY_BUCKETS, registry=registry)
        self.control_requests = Counter(
            "shoal_controlapi_requests", "Control API calls answered, by method and gRPC status code.",
            ["method", "code"], registry=registry)
        self.control_duration = Histogram(
            "shoal_controlapi_request_duration_seconds", "Time to answer a control API call, by method.",
            ["method"], buckets=LATENCY_BUCKETS, registry=registry)
        self.scheduler_decisions = Counter(
            "shoal_scheduler_decisions",
            "Scheduler decisions committed: result=assigned (a node chosen) or unplaced (no node fits; "
            "the task stays pending with a message).", ["result"], registry=registry)
        self.dispatcher_sessions_opened = Counter(
            "shoal_dispatcher_sessions_opened", "Agent sessions opened with this dispatcher.", registry=registry)
        self.dispatcher_heartbeats = Counter(
            "shoal_dispatcher_heartbeats", "Agent heartbeats answered by this dispatcher.", registry=registry)
        self.scheduler_pending: Callable[[], int] | None = None  # set by the running scheduler
        registry.register(ManagerCollector(manager, self))


class ManagerCollector:
    """The manager's gauges, read from the live manager role at each scrape."""

    def __init__(self, manager: Callable[[], LiveManager | None], metrics: ManagerMetrics) -> None:
        self.manager = manager
        self.metrics = metrics

    def collect(self) -> Iterator[Metric]:
        from prometheus_client.core import GaugeMetricFamily

        m = self.manager()
        snap = m.metrics_snapshot() if m is not None else None
        families = {
            "leader": GaugeMetricFamily(
                "shoal_store_leader", "1 when this manager's etcd member is the store's Raft leader, else 0."),
            "term": GaugeMetricFamily("shoal_store_raft_term", "The store's Raft term, as this manager's member reports it."),
            "rev": GaugeMetricFamily("shoal_store_revision", "The store revision this manager's cache holds."),
            "ctl": GaugeMetricFamily(
                "shoal_manager_leader", "1 when this manager runs the control loops (holds the leader lease), else 0."),
            "tasks": GaugeMetricFamily("shoal_manager_tasks", "Tasks in the store by observed state.", labels=["state"]),
            "sess": GaugeMetricFamily("shoal_dispatcher_sessions", "Agent sessions open with this dispatcher."),
            "pend": GaugeMetricFamily(
                "shoal_scheduler_pending_tasks", "Tasks the scheduler holds as pending (leader only)."),
        }
        if snap is not None:
            families["leader"].add_metric([], 1.0 if snap.store_leader else 0.0)
            families["term"].add_metric([], float(snap.raft_term))
            families["rev"].add_metric([], float(snap.revision))
            families["ctl"].add_metric([], 1.0 if snap.control_leader else 0.0)
            for state, n in sorted(snap.tasks_by_state.items()):
                families["tasks"].add_metric([state], float(n))
            families["sess"].add_metric([], float(snap.dispatcher_sessions))
            pending = self.metrics.scheduler_pending
            if pending is not None:
                families["pend"].add_metric([], float(pending()))
        yield from families.values()


_current: ManagerMetrics | None = None


def enable(registry: CollectorRegistry, manager: Callable[[], LiveManager | None]) -> ManagerMetrics:
    """Create the manager's metrics in `registry` (once per process); `manager()` gives the live
    manager role or None."""
    global _current
    if _current is not None:
        raise RuntimeError("manager metrics are already enabled in this process")
    _current = ManagerMetrics(registry, manager)
    return _current


def disable() -> None:
    """Forget the metrics (tests that enable them in-process)."""
    global _current
    _current = None


def current() -> ManagerMetrics | None:
    """The manager's metrics, or None when this process serves none."""
    return _current


# ---- hooks for the instrumented code (each a no-op while metrics are off) ---------------------------
def observe_store_write(seconds: float) -> None:
    if _current is not None:
        _current.store_write.observe(seconds)


def observe_store_watch(seconds: float) -> None:
    if _current is not None:
        _current.store_watch.observe(seconds)


def count_decisions(assigned: int, unplaced: int) -> None:
    if _current is not None:
        if assigned:
            _current.scheduler_decisions.labels("assigned").inc(assigned)
        if unplaced:
            _current.scheduler_decisions.labels("unplaced").inc(unplaced)


def count_session_opened() -> None:
    if _current is not None:
        _current.dispatcher_sessions_opened.inc()


def count_heartbeat() -> None:
    if _current is not None:
        _current.dispatcher_heartbeats.inc()


def set_scheduler_pending(source: Callable[[], int] | None) -> None:
    """The running scheduler's pending count (None when it stops)."""
    if _current is not None:
        _current.scheduler_pending = source


# ---- the control API interceptor -------------------------------------------------------------------
def _code_name(context: grpc.aio.ServicerContext) -> str:
    code = context.code()
    if code is None:
        return "OK"
    if isinstance(code, grpc.StatusCode):
        return code.name
    return next((c.name for c in grpc.StatusCode if c.value[0] == code), str(code))


class ControlAPIMetrics(grpc.aio.ServerInterceptor):
    """Counts and times every call of the Control service (`/shoal.Control/...`) by method and status
    code: OK, the code a handler aborted with, CANCELLED when the caller went away, or UNKNOWN for an
    exception that escaped the handler. Calls of other services pass untouched."""

    def __init__(self, metrics: ManagerMetrics) -> None:
        self.metrics = metrics

    async def intercept_service(
        self, continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        # Every Control method is unary (proto/control.proto); anything else passes untouched.
        if handler is None or not details.method.startswith(CONTROL_PREFIX) or not handler.unary_unary:
            return handler
        method = details.method[len(CONTROL_PREFIX):]
        return grpc.unary_unary_rpc_method_handler(
            self._unary(handler.unary_unary, method), handler.request_deserializer, handler.response_serializer)

    def _done(self, method: str, code: str, t0: float) -> None:
        self.metrics.control_requests.labels(method, code).inc()
        self.metrics.control_duration.labels(method).observe(time.monotonic() - t0)

    def _unary(self, inner: Callable[..., Awaitable[Any]], method: str) -> Callable[..., Awaitable[Any]]:
        async def behavior(request: Any, context: grpc.aio.ServicerContext) -> Any:
            t0 = time.monotonic()
            code = "UNKNOWN"
            try:
                resp = await inner(request, context)
                code = _code_name(context)
                return resp
            except grpc.aio.AbortError:
                code = _code_name(context)
                raise
            except asyncio.CancelledError:  # the caller went away (or its deadline passed)
                code = "CANCELLED"
                raise
            finally:
                self._done(method, code, t0)

        return behavior
