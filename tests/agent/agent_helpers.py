"""Fixtures for agent tests: a real docker-registry on loopback holding busybox, engine roots, and an
in-process manager side (LocalStore + Dispatcher + LogBroker on a loopback gRPC port, insecure test
mode where the node id travels in metadata)."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import shutil
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc
import pytest
from helpers.aio import run
from helpers.registry import HEALTHCHECK, local_registry
from helpers.waiting import wait_for_async

from shoal.lab.images import busybox_image
from shoal.lab.registry import Registry, push_image
from shoal.manager.dispatcher import SERVER_OPTIONS, Dispatcher
from shoal.manager.logbroker import LogBroker
from shoal.manager.store import LocalStore, Store, Tx
from shoal.proto import (
    dispatcher_pb2_grpc,
    logs_pb2_grpc,
    objects_pb2,
    specs_pb2,
    types_pb2,
)

PREFIX = f"st{os.getpid() % 10000}"
@pytest.fixture(scope="session")
def registry() -> Iterator[Registry]:
    if os.geteuid() != 0:
        pytest.fail("agent integration tests need root (or deselect with -m 'not integration')")

    def seed(reg: Registry) -> None:
        push_image(reg.url, "library/busybox", "latest", busybox_image())
        push_image(reg.url, "hc", "latest", busybox_image(config=HEALTHCHECK))

    with local_registry(seed) as reg:
        yield reg


async def _remove_all(root: Path) -> None:
    from shoal.agent.engine import Engine

    e = Engine(root)
    for c in await e.list():
        with contextlib.suppress(Exception):
            await e.remove(c.id)
    await e.close()


@pytest.fixture
def engine_root(registry) -> Iterator[Path]:
    """An engine root of its own; every container under it is removed at the end."""
    root = Path(tempfile.mkdtemp(prefix=f"shoal-{PREFIX}-agent-", dir="/var/tmp"))
    try:
        yield root
    finally:
        run(_remove_all(root))
        with open("/proc/self/mountinfo") as f:
            mps = [ln.split()[4] for ln in f if ln.split()[4].startswith(str(root))]
        for mp in sorted(mps, reverse=True):
            os.system(f"umount -l {mp!r} 2>/dev/null")
        shutil.rmtree(root, ignore_errors=True)


def new_engine(root: Path, registry: Registry):
    from shoal.agent.engine import Engine

    return Engine(root, registry_mirrors=[registry.url], insecure_registries=[registry.host])


@contextlib.asynccontextmanager
async def manager_side(store: Store | None = None) -> AsyncIterator[tuple[Store, Dispatcher, LogBroker, str]]:
    """A LocalStore with a cluster object and a dispatcher + log broker served on 127.0.0.1."""
    st = store or LocalStore()
    if st.cluster() is None:
        c = objects_pb2.Cluster(
            id="cluster", spec=specs_pb2.ClusterSpec(annotations=types_pb2.Annotations(name="default"))
        )
        await st.update(lambda tx: tx.create(c))
    broker = LogBroker(st, insecure_node_id_from_metadata=True)
    disp = Dispatcher(st, insecure_node_id_from_metadata=True, logbroker=broker)
    server = grpc.aio.server(options=SERVER_OPTIONS)  # (the manager's: agents' keepalive pings accepted)
    dispatcher_pb2_grpc.add_DispatcherServicer_to_server(disp, server)
    logs_pb2_grpc.add_LogBrokerServicer_to_server(broker, server)
    logs_pb2_grpc.add_LogsServicer_to_server(broker, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    loop_task = asyncio.create_task(disp.run())
    try:
        yield st, disp, broker, f"127.0.0.1:{port}"
    finally:
        loop_task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await loop_task
        await server.stop(0)


async def add_node(st: Store, node_id: str, hostname: str = "") -> None:
    n = objects_pb2.Node(
        id=node_id, spec=specs_pb2.NodeSpec(annotations=types_pb2.Annotations(name=hostname))
    )
    await st.update(lambda tx: tx.create(n))


def make_task(
    node_id: str,
    *args: str,
    image: str = "busybox",
    service: str = "svc",
    slot: int = 1,
    secrets: list[objects_pb2.Secret] = (),
    grace_s: float = 1.0,
) -> objects_pb2.Task:
    from shoal.manager.store import new_id

    t = objects_pb2.Task(id=new_id(), node_id=node_id, service_id=f"{service}-id", slot=slot)
    t.annotations.name = f"{service}.{slot}.{t.id}"
    t.service_annotations.name = service
    t.desired_state = types_pb2.RUNNING
    t.status.state = types_pb2.ASSIGNED
    c = t.spec.container
    c.image = image
    c.args.extend(args)
    c.stop_grace_period.FromNanoseconds(int(grace_s * 1e9))
    for s in secrets:
        c.secrets.add(
            secret_id=s.id,
            secret_name=s.spec.annotations.name,
            file=types_pb2.FileTarget(name=s.spec.annotations.name, uid="0", gid="0", mode=0o444),
        )
    return t


async def set_task(st: Store, tid: str, **fields) -> None:
    def fn(tx: Tx) -> None:
        t = objects_pb2.Task()
        t.CopyFrom(tx.get("task", tid))
        for k, v in fields.items():
            setattr(t, k, v)
        tx.update(t)

    await st.update(fn)


wait_for = functools.partial(wait_for_async, timeout=60.0)


def task_state(st: Store, tid: str) -> int:
    t = st.get("task", tid)
    return t.status.state if t is not None else -1
