"""Agent path latency: a task written ASSIGNED into the store until the store says RUNNING, through the
real dispatcher (gRPC on loopback), the agent's session, the worker and the engine (runc under
conmon; busybox from a local docker-registry). p50 of N single tasks, and 100 tasks at once on one
node. Runs as root.

    .venv/bin/python bench/agent.py [--runs 20] [--many 100]

Prints a table and one JSON line. Targets (issue 4): ≤ 0.2 s for one, ≤ 4 s for 100 on a 2-core node;
Docker Swarm on this machine: 0.55 s for one replica.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import grpc

from shoal.agent.agent import Agent
from shoal.agent.engine import Engine
from shoal.lab.images import busybox_image
from shoal.lab.registry import Registry, push_image
from shoal.manager.dispatcher import Dispatcher
from shoal.manager.store import LocalStore, new_id
from shoal.proto import dispatcher_pb2_grpc, objects_pb2, specs_pb2, types_pb2


def task(image: str) -> objects_pb2.Task:
    t = objects_pb2.Task(id=new_id(), node_id="n1", service_id="bench", desired_state=types_pb2.RUNNING)
    t.annotations.name = f"bench.1.{t.id}"
    t.status.state = types_pb2.ASSIGNED
    t.spec.container.image = image
    t.spec.container.args.extend(["sleep", "1000"])
    t.spec.container.stop_grace_period.FromNanoseconds(0)
    return t


async def until_running(st: LocalStore, ids: list[str]) -> None:
    with st.watch(("task",)) as w:
        left = {i for i in ids if st.get("task", i).status.state != types_pb2.RUNNING}
        while left:
            ev = await asyncio.wait_for(w.queue.get(), 120)
            for e in ev.events:
                t = e.object.task
                if t.status.state == types_pb2.RUNNING:
                    left.discard(t.id)
                elif t.status.state > types_pb2.RUNNING and t.id in left:
                    raise RuntimeError(
                        f"task {t.id} ended {types_pb2.TaskState.Name(t.status.state)}: {t.status.err}"
                    )


async def main(runs: int, many: int) -> dict[str, float]:
    root = Path(tempfile.mkdtemp(prefix="shoal-bench-agent-", dir="/var/tmp"))
    reg = Registry("127.0.0.1")
    reg.start()
    engine = Engine(root / "engine")
    st = LocalStore()
    await st.update(
        lambda tx: tx.create(
            objects_pb2.Cluster(
                id="c", spec=specs_pb2.ClusterSpec(annotations=types_pb2.Annotations(name="default"))
            )
        )
    )
    await st.update(lambda tx: tx.create(objects_pb2.Node(id="n1")))
    server = grpc.aio.server()
    dispatcher_pb2_grpc.add_DispatcherServicer_to_server(
        Dispatcher(st, insecure_node_id_from_metadata=True), server
    )
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    agent = Agent("n1", root, [f"127.0.0.1:{port}"], None, engine)
    runner = asyncio.create_task(agent.run())
    out: dict[str, float] = {}
    try:
        push_image(reg.url, "library/busybox", "latest", busybox_image())
        image = f"{reg.host}/library/busybox:latest"
        await asyncio.wait_for(agent.connected.wait(), 30)
        warm = task(image)  # first pull
        await st.update(lambda tx: tx.create(warm))
        await until_running(st, [warm.id])
        lat = []
        for _ in range(runs):
            t = task(image)
            t0 = time.perf_counter()
            await st.update(lambda tx, t=t: tx.create(t))
            await until_running(st, [t.id])
            lat.append(time.perf_counter() - t0)
        out["one_p50_s"] = statistics.median(lat)
        out["one_max_s"] = max(lat)
        ts = [task(image) for _ in range(many)]
        t0 = time.perf_counter()
        await st.update(lambda tx: [tx.create(t) for t in ts])
        await until_running(st, [t.id for t in ts])
        out[f"many_{many}_s"] = time.perf_counter() - t0
    finally:
        runner.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await runner
        await server.stop(0)
        for c in await engine.list():
            with contextlib.suppress(Exception):
                await engine.remove(c.id)
        await engine.close()
        reg.stop()
        shutil.rmtree(root, ignore_errors=True)
    return out


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--many", type=int, default=100)
    a = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("bench/agent.py needs root (runc containers)")
    res = asyncio.run(main(a.runs, a.many))
    print(f"{'figure':<16}{'value':>10}{'target':>10}{'docker':>10}")
    print(f"{'one (p50)':<16}{res['one_p50_s']:>9.3f}s{0.2:>9.1f}s{0.55:>9.2f}s")
    print(f"{'one (max)':<16}{res['one_max_s']:>9.3f}s")
    print(f"{f'{a.many} at once':<16}{res[f'many_{a.many}_s']:>9.2f}s{4.0:>9.1f}s")
    print(json.dumps({"bench": "agent", **{k: round(v, 4) for k, v in res.items()}}))
