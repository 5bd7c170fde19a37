"""Scheduler benchmark: the scheduler alone on a LocalStore (and, with --etcd, a one-member etcd store) with simulated nodes.

Measures the time from a batch of PENDING tasks being committed to all their assignments being
committed (wall clock, which includes the scheduler's 50 ms debounce, and the CPU time this process
used meanwhile -- the machine may be shared), for several cluster sizes, with and without placement constraints (and with a spread
preference), and the evenness of the result (max - min tasks per eligible node). Prints a table and
one JSON line. Not a test: it never fails a run.

    .venv/bin/python bench/scheduler.py [--quick] [--big] [--etcd]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import socket
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

from shoal.manager.scheduler import Scheduler
from shoal.manager.store import LocalStore, Store, new_id
from shoal.proto import objects_pb2, specs_pb2, store_pb2, types_pb2

SERVICES = 10
ZONES = 4


def make_node(i: int) -> objects_pb2.Node:
    n = objects_pb2.Node(id=new_id(), role=types_pb2.WORKER)
    n.spec.annotations.labels["zone"] = f"z{i % ZONES}"
    n.spec.annotations.labels["rack"] = f"r{i % 16}"
    n.spec.membership = specs_pb2.NodeSpec.ACCEPTED
    n.description.hostname = f"node-{i:05d}"
    n.description.platform.os = "linux"
    n.description.platform.architecture = "x86_64"
    n.description.resources.nano_cpus = 64 * 10**9
    n.description.resources.memory_bytes = 256 << 30
    n.status.state = types_pb2.NodeStatus.READY
    return n


def make_task(service: int, slot: int, mode: str) -> objects_pb2.Task:
    t = objects_pb2.Task(id=new_id(), service_id=f"svc{service}", slot=slot, spec_version=1)
    t.annotations.name = f"svc{service}.{slot}.{t.id}"
    t.service_annotations.name = f"svc{service}"
    t.desired_state = types_pb2.RUNNING
    t.status.state = types_pb2.PENDING
    t.status.message = "pending task scheduling"
    c = t.spec.container
    c.image = "registry.local/app:1.0"
    c.env.extend(["A=1", "B=2"])
    c.args.extend(["serve", "--port", "8080"])
    r = t.spec.resources.reservations
    r.nano_cpus = 10**7
    r.memory_bytes = 16 << 20
    if mode in ("constraints", "spread"):
        t.spec.placement.constraints.extend(["node.labels.zone!=z0", "node.platform.os==linux"])
    if mode == "spread":
        t.spec.placement.preferences.add(spread_descriptor="node.labels.rack")
    return t


async def commit_all(store: Store, objs: list, chunk: int = 2000) -> None:
    actions = []
    for o in objs:
        a = store_pb2.StoreAction(kind=store_pb2.StoreAction.CREATE)
        getattr(a.object, "node" if isinstance(o, objects_pb2.Node) else "task").CopyFrom(o)
        actions.append(a)
    await store.batch(actions, max_actions=chunk)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def make_store(kind: str, tmp: str) -> tuple[Store, object]:
    """The store to schedule on, and what to close afterwards."""
    if kind == "local":
        return LocalStore(), None
    from etcdcluster import CLUSTER, Cluster

    from shoal.manager.ca import RootCA

    cluster = Cluster(RootCA.create(CLUSTER), Path(tmp) / f"etcd{free_port()}", 1)
    await cluster.start()
    return cluster.stores[0], cluster


async def scenario(n_nodes: int, n_tasks: int, mode: str, store_kind: str = "local", tmp: str = "") -> dict:
    store, cluster = await make_store(store_kind, tmp)
    nodes = [make_node(i) for i in range(n_nodes)]
    await commit_all(store, nodes)
    sched = Scheduler(store)
    runner = asyncio.create_task(sched.run())
    await asyncio.sleep(0.05)
    per_service = n_tasks // SERVICES
    tasks = [make_task(s, i + 1, mode) for s in range(SERVICES) for i in range(per_service)]
    gc.collect()
    gc.disable()
    try:
        await commit_all(store, tasks)
        t0, c0 = time.perf_counter(), time.process_time()
        while sched.placed < len(tasks):
            await asyncio.sleep(0.001)
            if time.perf_counter() - t0 > 600:
                break
        elapsed, cpu = time.perf_counter() - t0, time.process_time() - c0
    finally:
        gc.enable()
    runner.cancel()
    try:
        await runner
    except asyncio.CancelledError:
        pass
    placed = [store.get("task", t.id) for t in tasks]
    if cluster is not None:
        await cluster.stop()  # type: ignore[attr-defined]
    assigned = [t for t in placed if t.status.state == types_pb2.ASSIGNED]
    eligible = [n for n in nodes if mode == "plain" or n.spec.annotations.labels["zone"] != "z0"]
    per_node = Counter(t.node_id for t in assigned)
    counts = [per_node.get(n.id, 0) for n in eligible]
    svc0 = Counter(t.node_id for t in assigned if t.service_id == "svc0")
    svc0_counts = [svc0.get(n.id, 0) for n in eligible]
    wrong = sum(1 for t in assigned if mode != "plain" and store.get("node", t.node_id).spec.annotations.labels["zone"] == "z0")
    return {
        "store": store_kind,
        "nodes": n_nodes,
        "tasks": len(tasks),
        "mode": mode,
        "assigned": len(assigned),
        "seconds": round(elapsed, 3),
        "per_s": round(len(assigned) / elapsed) if elapsed > 0 else 0,
        # CPU seconds of this process (all threads) over the same window: less sensitive to a busy machine.
        "cpu_s": round(cpu, 3),
        "per_cpu_s": round(len(assigned) / cpu) if cpu > 0 else 0,
        "evenness": max(counts) - min(counts),
        "evenness_service": max(svc0_counts) - min(svc0_counts),
        "violations": wrong,
        "passes": sched.passes,
    }


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="only 1k nodes x 1k tasks")
    ap.add_argument("--big", action="store_true", help="also 10k nodes x 100k tasks (a few minutes)")
    ap.add_argument("--etcd", action="store_true", help="also on a one-member etcd store (fsync on)")
    args = ap.parse_args()
    sizes = [(1000, 1000), (1000, 10000)]
    if args.big:
        sizes.append((10000, 100000))
    if args.quick:
        sizes = [(1000, 1000)]
    runs = [("local", n, t, m) for n, t in sizes for m in ("plain", "constraints", "spread")]
    if args.etcd:
        runs += [("etcd", 1000, 1000, "plain"), ("etcd", 1000, 10000, "plain"), ("etcd", 1000, 10000, "spread")]
    results = []
    tmp = tempfile.mkdtemp(prefix="shoal-bench-")
    print(
        f"{'store':>5} {'nodes':>6} {'tasks':>7} {'mode':>12} {'seconds':>8} {'placed/s':>9} {'cpu s':>7} "
        f"{'per cpu s':>9} {'even':>5} {'even/svc':>8} {'passes':>6}"
    )
    for kind, n_nodes, n_tasks, mode in runs:
        r = await scenario(n_nodes, n_tasks, mode, kind, tmp)
        results.append(r)
        print(
            f"{r['store']:>5} {r['nodes']:>6} {r['tasks']:>7} {r['mode']:>12} {r['seconds']:>8.3f} {r['per_s']:>9} "
            f"{r['cpu_s']:>7.3f} {r['per_cpu_s']:>9} {r['evenness']:>5} {r['evenness_service']:>8} {r['passes']:>6}",
            flush=True,
        )
        if r["assigned"] != r["tasks"] or r["violations"]:
            print(f"  !! assigned {r['assigned']} of {r['tasks']}, constraint violations {r['violations']}")
    import shutil

    shutil.rmtree(tmp, ignore_errors=True)
    print(json.dumps({"bench": "scheduler", "python": sys.version.split()[0], "results": results}))


if __name__ == "__main__":
    asyncio.run(main())
