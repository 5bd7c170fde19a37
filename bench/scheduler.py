"""Scheduler benchmark: the scheduler alone on a LocalStore with simulated nodes.

Measures the time from a batch of PENDING tasks being committed to all their assignments being
committed, for several cluster sizes, with and without placement constraints (and with a spread
preference), and the evenness of the result (max - min tasks per eligible node). Prints a table and
one JSON line. Not a test: it never fails a run.

    .venv/bin/python bench/scheduler.py [--quick] [--big]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import sys
import time
from collections import Counter

from shoal.manager.scheduler import Scheduler
from shoal.manager.store import LocalStore, new_id
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


async def commit_all(store: LocalStore, objs: list, chunk: int = 5000) -> None:
    actions = []
    for o in objs:
        a = store_pb2.StoreAction(kind=store_pb2.StoreAction.CREATE)
        getattr(a.object, "node" if isinstance(o, objects_pb2.Node) else "task").CopyFrom(o)
        actions.append(a)
    await store.batch(actions, max_actions=chunk)


async def scenario(n_nodes: int, n_tasks: int, mode: str) -> dict:
    store = LocalStore()
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
        t0 = time.perf_counter()
        while sched.placed < len(tasks):
            await asyncio.sleep(0.001)
            if time.perf_counter() - t0 > 600:
                break
        elapsed = time.perf_counter() - t0
    finally:
        gc.enable()
    runner.cancel()
    try:
        await runner
    except asyncio.CancelledError:
        pass
    placed = [store.get("task", t.id) for t in tasks]
    assigned = [t for t in placed if t.status.state == types_pb2.ASSIGNED]
    eligible = [n for n in nodes if mode == "plain" or n.spec.annotations.labels["zone"] != "z0"]
    per_node = Counter(t.node_id for t in assigned)
    counts = [per_node.get(n.id, 0) for n in eligible]
    svc0 = Counter(t.node_id for t in assigned if t.service_id == "svc0")
    svc0_counts = [svc0.get(n.id, 0) for n in eligible]
    wrong = sum(1 for t in assigned if mode != "plain" and store.get("node", t.node_id).spec.annotations.labels["zone"] == "z0")
    return {
        "nodes": n_nodes,
        "tasks": len(tasks),
        "mode": mode,
        "assigned": len(assigned),
        "seconds": round(elapsed, 3),
        "per_s": round(len(assigned) / elapsed) if elapsed > 0 else 0,
        "evenness": max(counts) - min(counts),
        "evenness_service": max(svc0_counts) - min(svc0_counts),
        "violations": wrong,
        "passes": sched.passes,
    }


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="only 1k nodes x 1k tasks")
    ap.add_argument("--big", action="store_true", help="also 10k nodes x 100k tasks (a few minutes)")
    args = ap.parse_args()
    sizes = [(1000, 1000), (1000, 10000)]
    if args.big:
        sizes.append((10000, 100000))
    if args.quick:
        sizes = [(1000, 1000)]
    results = []
    print(f"{'nodes':>6} {'tasks':>7} {'mode':>12} {'seconds':>8} {'placed/s':>9} {'even':>5} {'even/svc':>8} {'passes':>6}")
    for n_nodes, n_tasks in sizes:
        for mode in ("plain", "constraints", "spread"):
            r = await scenario(n_nodes, n_tasks, mode)
            results.append(r)
            print(
                f"{r['nodes']:>6} {r['tasks']:>7} {r['mode']:>12} {r['seconds']:>8.3f} {r['per_s']:>9} "
                f"{r['evenness']:>5} {r['evenness_service']:>8} {r['passes']:>6}",
                flush=True,
            )
            if r["assigned"] != r["tasks"] or r["violations"]:
                print(f"  !! assigned {r['assigned']} of {r['tasks']}, constraint violations {r['violations']}")
    print(json.dumps({"bench": "scheduler", "python": sys.version.split()[0], "results": results}))


if __name__ == "__main__":
    asyncio.run(main())
