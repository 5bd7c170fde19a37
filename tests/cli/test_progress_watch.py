"""swarmctl's wait follows the Watch stream: a real Control + Watch API over a LocalStore (in this
process), the test playing the orchestrator and the agents by writing tasks into the store."""

from __future__ import annotations

import asyncio
import io
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from shoal.cli.client import Client
from shoal.cli.progress import ServiceView, Waiter
from shoal.manager.controlapi import ControlServicer, add_to_server
from shoal.manager.store import LocalStore, Tx
from shoal.manager.watchapi import WatchServicer
from shoal.proto import objects_pb2, specs_pb2, types_pb2, watch_pb2_grpc


class Manager:
    """A Control (+ Watch) API on a unix socket, served from a loop in a thread."""

    def __init__(self, sock: Path, watch: bool = True) -> None:
        self.sock = str(sock)
        self.watch = watch
        self.store = LocalStore()
        self.loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(watch,), daemon=True)
        self._thread.start()
        assert self._ready.wait(10)

    def _run(self, watch: bool) -> None:
        asyncio.set_event_loop(self.loop)

        async def start() -> None:
            self.server = grpc.aio.server()
            add_to_server(ControlServicer(self.store), self.server)
            if watch:
                watch_pb2_grpc.add_WatchServicer_to_server(WatchServicer(self.store), self.server)
            self.server.add_insecure_port(f"unix://{self.sock}")
            await self.server.start()
            self._ready.set()

        self.loop.run_until_complete(start())
        self.loop.run_forever()

    def write(self, fn: Callable[[Tx], Any]) -> Any:
        return asyncio.run_coroutine_threadsafe(self.store.update(fn), self.loop).result(10)

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self.server.stop(None), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)


class CountingClient(Client):
    def __init__(self, sock: str) -> None:
        super().__init__(socket=sock)
        self.calls: Counter[str] = Counter()

    def call(self, method: str, request: Any, timeout: float | None = None) -> Any:
        self.calls[method] += 1
        return super().call(method, request, timeout)


@pytest.fixture(params=[True, False], ids=["watch", "no-watch"])
def mgr(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Manager]:
    m = Manager(tmp_path / "ctl.sock", watch=request.param)
    try:
        yield m
    finally:
        m.stop()


def seed(m: Manager, replicas: int) -> objects_pb2.Service:
    def fn(tx: Tx) -> objects_pb2.Service:
        n = objects_pb2.Node(role=types_pb2.WORKER)
        n.status.state = types_pb2.NodeStatus.READY
        n.spec.availability = types_pb2.ACTIVE
        tx.create(n)
        spec = specs_pb2.ServiceSpec(annotations=types_pb2.Annotations(name="web"))
        spec.replicated.replicas = replicas
        spec.task.container.image = "busybox"
        return tx.create(objects_pb2.Service(spec=spec, spec_version=1))

    return m.write(fn)


def run_tasks(m: Manager, svc: objects_pb2.Service, node_id: str, slots: range, state: int) -> list[str]:
    def fn(tx: Tx) -> list[str]:
        out = []
        for slot in slots:
            t = objects_pb2.Task(service_id=svc.id, slot=slot, node_id=node_id, spec_version=svc.spec_version,
                                 desired_state=types_pb2.RUNNING)
            t.spec.CopyFrom(svc.spec.task)
            t.status.state = state
            out.append(tx.create(t).id)
        return out

    return m.write(fn)


def set_state(m: Manager, task_ids: list[str], state: int) -> None:
    def fn(tx: Tx) -> None:
        for tid in task_ids:
            t = objects_pb2.Task()
            t.CopyFrom(tx.get("task", tid))
            t.status.state = state
            tx.update(t)

    m.write(fn)


def test_converges_from_the_stream(mgr: Manager) -> None:
    svc = seed(mgr, 2)
    node_id = mgr.store.sm.list("node")[0].id
    c = CountingClient(mgr.sock)
    out = io.StringIO()

    def orchestrate() -> None:
        time.sleep(0.5)
        ids = run_tasks(mgr, svc, node_id, range(1, 3), types_pb2.PREPARING)
        time.sleep(1.5)  # past TICK: nothing polls in between when the stream is live
        set_state(mgr, ids, types_pb2.RUNNING)

    t = threading.Thread(target=orchestrate)
    t.start()
    start = time.monotonic()
    try:
        Waiter(c, out=out, timeout=20).converge(svc.id, "web")
    finally:
        t.join()
        c.close()
    took = time.monotonic() - start
    text = out.getvalue()
    assert "overall progress: 0 out of 2 tasks [1/2: preparing, 2/2: preparing]" in text
    assert text.endswith("overall progress: 2 out of 2 tasks [1/2: running, 2/2: running]\n"
                         "verify: Service web converged\n"), text
    assert took < 5
    reads = c.calls["ListTasks"]  # with the stream, a handful of reads; without, one every 200 ms
    assert (reads <= 4) if mgr.watch else (reads >= 8), c.calls


@pytest.fixture
def watched(tmp_path: Path) -> Iterator[tuple[Manager, objects_pb2.Service, str, CountingClient]]:
    """A manager with the Watch API, a service of 1 replica, its node's id, and a client."""
    m = Manager(tmp_path / "ctl.sock")
    c = CountingClient(m.sock)
    try:
        svc = seed(m, 1)
        yield m, svc, m.store.sm.list("node")[0].id, c
    finally:
        c.close()
        m.stop()


def follow(v: ServiceView, done: Callable[[], bool], within: float = 5) -> None:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline and not done():
        v.wait()
    assert done()


def first_state(v: ServiceView) -> int:
    tasks = v.snapshot().tasks
    return tasks[0].status.state if tasks else -1


def test_view_applies_events_and_drops_older_ones(watched: tuple[Manager, objects_pb2.Service, str, CountingClient]) -> None:
    m, svc, node_id, c = watched
    with ServiceView(c, svc.id) as v:
        assert v.snapshot().tasks == []
        [tid] = run_tasks(m, svc, node_id, range(1, 2), types_pb2.PREPARING)
        follow(v, lambda: first_state(v) == types_pb2.PREPARING)
        assert not v.polling
        old = v.snapshot().tasks[0]
        set_state(m, [tid], types_pb2.RUNNING)
        follow(v, lambda: first_state(v) == types_pb2.RUNNING)
        reads = c.calls["ListTasks"]
        v._put(v._tasks, old, 1)  # an event older than the copy held changes nothing
        assert first_state(v) == types_pb2.RUNNING and c.calls["ListTasks"] == reads


def test_a_broken_stream_is_followed_again_with_a_fresh_read(
        watched: tuple[Manager, objects_pb2.Service, str, CountingClient]) -> None:
    m, svc, node_id, c = watched
    with ServiceView(c, svc.id) as v:
        v.snapshot()
        [tid] = run_tasks(m, svc, node_id, range(1, 2), types_pb2.PREPARING)
        follow(v, lambda: v._live)
        v._call.cancel()  # as when the manager goes away: the stream ends with an error
        v.wait()
        assert v._live is False and not v.polling and v._call is not None  # subscribed again
        set_state(m, [tid], types_pb2.RUNNING)  # may land before the new subscription: the read has it
        follow(v, lambda: first_state(v) == types_pb2.RUNNING)
