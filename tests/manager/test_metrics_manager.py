"""The manager's Prometheus metrics without a cluster: the control API interceptor over a real grpc.aio
server (counts by method and status code, latency), the gauges read from a live manager at scrape
time, and the hooks being no-ops while metrics are off."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
from helpers.aio import run
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from shoal.manager import metrics
from shoal.manager.controlapi import ControlServicer, add_to_server
from shoal.manager.store import LocalStore
from shoal.proto import control_pb2, control_pb2_grpc, specs_pb2, types_pb2


def samples(reg: CollectorRegistry) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for fam in text_string_to_metric_families(generate_latest(reg).decode()):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


@dataclass
class Snap:
    store_leader: bool = True
    raft_term: int = 3
    revision: int = 42
    control_leader: bool = False
    tasks_by_state: dict[str, int] = field(default_factory=lambda: {"RUNNING": 2, "PENDING": 1})
    dispatcher_sessions: int = 4


class Live:
    def __init__(self) -> None:
        self.snap: Snap | None = Snap()

    def metrics_snapshot(self) -> Snap | None:
        return self.snap


@pytest.fixture
def enabled():
    reg = CollectorRegistry()
    live = Live()
    holder: dict[str, Live | None] = {"m": live}
    m = metrics.enable(reg, lambda: holder["m"])
    try:
        yield reg, m, live, holder
    finally:
        metrics.disable()


def test_interceptor_counts_control_calls_by_method_and_code(tmp_path: Path, enabled) -> None:
    reg, m, _, _ = enabled

    async def main() -> None:
        store = LocalStore()
        server = grpc.aio.server(interceptors=[metrics.ControlAPIMetrics(m)])
        add_to_server(ControlServicer(store, None), server)
        sock = str(tmp_path / "c.sock")
        server.add_insecure_port(f"unix://{sock}")
        await server.start()
        try:
            async with grpc.aio.insecure_channel(f"unix://{sock}") as ch:
                stub = control_pb2_grpc.ControlStub(ch)
                spec = specs_pb2.ServiceSpec(
                    annotations=types_pb2.Annotations(name="web"),
                    task=types_pb2.TaskSpec(container=types_pb2.ContainerSpec(image="busybox")),
                    replicated=specs_pb2.ReplicatedService(replicas=1))
                await stub.CreateService(control_pb2.CreateServiceRequest(spec=spec))
                await stub.ListServices(control_pb2.ListServicesRequest())
                await stub.ListServices(control_pb2.ListServicesRequest())
                with pytest.raises(grpc.aio.AioRpcError) as ei:
                    await stub.GetService(control_pb2.GetServiceRequest(service_id="nope"))
                assert ei.value.code() == grpc.StatusCode.NOT_FOUND
                with pytest.raises(grpc.aio.AioRpcError) as ei:
                    await stub.CreateService(control_pb2.CreateServiceRequest(spec=spec))  # same name
                assert ei.value.code() == grpc.StatusCode.ALREADY_EXISTS
        finally:
            await server.stop(None)

    run(main())
    s = samples(reg)
    req = "shoal_controlapi_requests_total"
    assert s[(req, (("code", "OK"), ("method", "CreateService")))] == 1
    assert s[(req, (("code", "ALREADY_EXISTS"), ("method", "CreateService")))] == 1
    assert s[(req, (("code", "OK"), ("method", "ListServices")))] == 2
    assert s[(req, (("code", "NOT_FOUND"), ("method", "GetService")))] == 1
    dur = "shoal_controlapi_request_duration_seconds_count"
    assert s[(dur, (("method", "ListServices"),))] == 2
    assert s[(dur, (("method", "CreateService"),))] == 2
    assert s[("shoal_controlapi_request_duration_seconds_sum", (("method", "GetService"),))] > 0


def test_gauges_come_from_the_live_manager_at_scrape_time(enabled) -> None:
    reg, m, live, holder = enabled
    s = samples(reg)
    assert s[("shoal_store_leader", ())] == 1 and s[("shoal_manager_leader", ())] == 0
    assert s[("shoal_store_raft_term", ())] == 3 and s[("shoal_store_revision", ())] == 42
    assert s[("shoal_manager_tasks", (("state", "RUNNING"),))] == 2
    assert s[("shoal_manager_tasks", (("state", "PENDING"),))] == 1
    assert s[("shoal_dispatcher_sessions", ())] == 4
    assert ("shoal_scheduler_pending_tasks", ()) not in s  # no scheduler runs here
    pending = [5]
    metrics.set_scheduler_pending(lambda: pending[0])
    live.snap = Snap(revision=50, tasks_by_state={"RUNNING": 3})
    s = samples(reg)
    assert s[("shoal_scheduler_pending_tasks", ())] == 5 and s[("shoal_store_revision", ())] == 50
    assert ("shoal_manager_tasks", (("state", "PENDING"),)) not in s
    holder["m"] = None  # the manager role stopped (a demotion): no samples, not stale ones
    s = samples(reg)
    gauges = {"shoal_store_leader", "shoal_store_raft_term", "shoal_store_revision", "shoal_manager_leader",
              "shoal_manager_tasks", "shoal_dispatcher_sessions"}
    assert not [k for k in s if k[0] in gauges]


def test_hooks_count_only_when_enabled(enabled) -> None:
    reg, m, _, _ = enabled
    metrics.observe_store_write(0.003)
    metrics.observe_store_watch(0.001)
    metrics.count_decisions(assigned=3, unplaced=1)
    metrics.count_session_opened()
    metrics.count_heartbeat()
    metrics.count_heartbeat()
    s = samples(reg)
    assert s[("shoal_store_write_duration_seconds_count", ())] == 1
    assert s[("shoal_store_watch_latency_seconds_count", ())] == 1
    assert s[("shoal_scheduler_decisions_total", (("result", "assigned"),))] == 3
    assert s[("shoal_scheduler_decisions_total", (("result", "unplaced"),))] == 1
    assert s[("shoal_dispatcher_sessions_opened_total", ())] == 1
    assert s[("shoal_dispatcher_heartbeats_total", ())] == 2
    with pytest.raises(RuntimeError, match="already enabled"):
        metrics.enable(CollectorRegistry(), lambda: None)
    metrics.disable()
    metrics.observe_store_write(0.003)  # off: nothing to count, nothing raised
    metrics.count_heartbeat()
    assert metrics.current() is None


def test_escaped_exception_is_unknown_and_other_services_are_not_counted(tmp_path: Path, enabled) -> None:
    reg, m, _, _ = enabled

    async def boom(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        raise RuntimeError("a bug in a handler")

    async def echo(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        return request

    class Handlers(grpc.GenericRpcHandler):
        def service(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
            fn = {"/shoal.Control/Boom": boom, "/shoal.Other/Echo": echo}.get(details.method)
            return grpc.unary_unary_rpc_method_handler(fn) if fn else None

    async def main() -> None:
        server = grpc.aio.server(interceptors=[metrics.ControlAPIMetrics(m)])
        server.add_generic_rpc_handlers((Handlers(),))
        sock = str(tmp_path / "g.sock")
        server.add_insecure_port(f"unix://{sock}")
        await server.start()
        try:
            async with grpc.aio.insecure_channel(f"unix://{sock}") as ch:
                with pytest.raises(grpc.aio.AioRpcError) as ei:
                    await ch.unary_unary("/shoal.Control/Boom")(b"x")
                assert ei.value.code() == grpc.StatusCode.UNKNOWN
                assert await ch.unary_unary("/shoal.Other/Echo")(b"x") == b"x"
        finally:
            await server.stop(None)

    run(main())
    s = samples(reg)
    assert s[("shoal_controlapi_requests_total", (("code", "UNKNOWN"), ("method", "Boom")))] == 1
    assert not [k for k in s if ("method", "Echo") in k[1]]
