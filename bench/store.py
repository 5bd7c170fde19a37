"""Benchmark of the store on etcd: real etcd members (Debian's etcd-server, fsync on, etcd's
defaults plus the flags `EtcdMember` passes) on 127.0.0.1-3 with peer mutual TLS, an `EtcdStore`
per member over its unix socket.

Measures one synchronous write (`store.update`, returns once the writer's cache holds it) on a
1-member cluster and on a 3-member cluster (through the Raft leader's member and through a
follower's), p50 and p99; the throughput of batched task creates (`store.batch`); and, in rounds,
the time from `kill -9` of the leader's etcd member of the 3-member cluster to the next write
accepted through a surviving member (a client that writes at once and again until accepted; and
the first of probes started every 50 ms, which shows when the cluster itself took writes again).
The killed member is restarted by its supervisor (`EtcdMember.run`) between rounds.
Prints a table and one JSON line. Not a test: it never fails on figures.

    .venv/bin/python bench/store.py [--writes 500] [--tasks 20000] [--rounds 5]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import statistics
import tempfile
import time
from pathlib import Path

from etcdcluster import CLUSTER, Cluster

from shoal.manager import ca
from shoal.manager.etcdstore import EtcdStore
from shoal.manager.store import StoreError
from shoal.proto import objects_pb2, specs_pb2, store_pb2, types_pb2

DOCKER_FAILOVER_S = 12.8  # Docker Swarm 20.10 on the same kind of machine (DESIGN.md)


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(len(xs) * p))]


def secret(name: str) -> objects_pb2.Secret:
    return objects_pb2.Secret(spec=specs_pb2.SecretSpec(annotations=types_pb2.Annotations(name=name), data=b"x" * 64))


async def time_writes(store: EtcdStore, n: int, tag: str) -> list[float]:
    out = []
    for i in range(n):
        t0 = time.perf_counter()
        await store.update(lambda tx, i=i: tx.create(secret(f"{tag}{i}")))
        out.append((time.perf_counter() - t0) * 1000)
    return out


async def time_batch(store: EtcdStore, n: int, service: str) -> float:
    actions = []
    for i in range(n):
        t = objects_pb2.Task(id=f"{service}-{i:06d}", service_id=service, slot=i + 1, node_id=f"node{i % 10}")
        t.annotations.name = f"{service}.{i + 1}"
        t.spec.container.image = "busybox:1"
        t.desired_state = types_pb2.RUNNING
        actions.append(store_pb2.StoreAction(kind=store_pb2.StoreAction.CREATE, object=objects_pb2.StoreObject(task=t)))
    t0 = time.perf_counter()
    await store.batch(actions)
    return time.perf_counter() - t0


async def failover_round(c: Cluster, r: int) -> tuple[float, float, int]:
    """Kill -9 the leader's member; (s until a client writing at once got a write accepted,
    s until the first 50 ms probe was accepted, attempts the client needed)."""
    lead = await c.leader()
    store = c.stores[(lead + 1) % len(c.members)]
    victim = c.members[lead]
    pid = victim.pid
    assert pid is not None
    probes: list[asyncio.Task[float]] = []

    async def probe(k: int) -> float:
        try:
            await store.update(lambda tx: tx.create(secret(f"probe{r}-{k}")))
            return time.monotonic()
        except StoreError:
            return float("inf")

    os.kill(pid, signal.SIGKILL)
    t_kill = time.monotonic()

    async def prober() -> None:
        k = 0
        while True:
            probes.append(asyncio.create_task(probe(k)))
            k += 1
            await asyncio.sleep(0.05)

    spawner = asyncio.create_task(prober())
    attempts = 0
    while True:
        attempts += 1
        try:
            await store.update(lambda tx, n=attempts: tx.create(secret(f"fo{r}-{n}")))
            break
        except StoreError:
            continue
    t_client = time.monotonic() - t_kill
    spawner.cancel()
    await asyncio.gather(spawner, return_exceptions=True)
    done = await asyncio.gather(*probes)
    t_probe = min(done) - t_kill
    # the killed member is restarted by its supervisor; wait until all three agree again
    while victim.pid in (None, pid):
        await asyncio.sleep(0.05)
    await victim.wait_ready(timeout=60)
    await c.leader()
    head = max(s.sm.version for s in c.stores)
    for s in c.stores:
        await s.wait_for(head, timeout=30)
    return t_client, t_probe, attempts


async def run(a: argparse.Namespace) -> dict[str, object]:
    root = ca.RootCA.create(CLUSTER)
    base = Path(tempfile.mkdtemp(prefix="sb", dir="/tmp"))
    res: dict[str, object] = {"bench": "store", "store": "etcd", "cpus": os.cpu_count(),
                              "loadavg_1m_start": round(os.getloadavg()[0], 2)}
    try:
        one = Cluster(root, base / "one", 1)
        try:
            await one.start()
            await time_writes(one.stores[0], 50, "warm")
            lat1 = await time_writes(one.stores[0], a.writes, "w")
            t_batch1 = await time_batch(one.stores[0], a.tasks, "svc1")
        finally:
            await one.stop()
        three = Cluster(root, base / "three", 3)
        try:
            await three.start()
            lead = await three.leader()
            leader_store, follower_store = three.stores[lead], three.stores[(lead + 1) % 3]
            await time_writes(leader_store, 50, "warm")
            lat_l = await time_writes(leader_store, a.writes, "l")
            lat_f = await time_writes(follower_store, a.writes, "f")
            t_batch3 = await time_batch(leader_store, a.tasks, "svc3")
            rounds = [await failover_round(three, r) for r in range(a.rounds)]
            head = max(s.sm.version for s in three.stores)
            for s in three.stores:
                await s.wait_for(head, timeout=30)
            agree = len({(len(s.find("task")), tuple(sorted((o.id, o.meta.version) for o in s.find("secret"))))
                         for s in three.stores}) == 1
        finally:
            await three.stop()
    finally:
        shutil.rmtree(base, ignore_errors=True)
    client = [r[0] for r in rounds]
    probe = [r[1] for r in rounds]
    res.update({
        "write_1member_p50_ms": round(statistics.median(lat1), 3),
        "write_1member_p99_ms": round(pct(lat1, 0.99), 3),
        "write_3member_leader_p50_ms": round(statistics.median(lat_l), 3),
        "write_3member_leader_p99_ms": round(pct(lat_l, 0.99), 3),
        "write_3member_follower_p50_ms": round(statistics.median(lat_f), 3),
        "write_3member_follower_p99_ms": round(pct(lat_f, 0.99), 3),
        "batched_task_writes_per_s_1member": round(a.tasks / t_batch1),
        "batched_task_writes_per_s_3member": round(a.tasks / t_batch3),
        "batch_tasks": a.tasks,
        "failover_write_accepted_s": [round(x, 3) for x in client],
        "failover_write_accepted_s_median": round(statistics.median(client), 3),
        "failover_write_accepted_s_max": round(max(client), 3),
        "failover_client_attempts": [r[2] for r in rounds],
        "failover_first_probe_s": [round(x, 3) for x in probe],
        "failover_first_probe_s_median": round(statistics.median(probe), 3),
        "failover_rounds": len(rounds),
        "docker_swarm_failover_s": DOCKER_FAILOVER_S,
        "failover_speedup_vs_docker": round(DOCKER_FAILOVER_S / statistics.median(client), 1),
        "replicas_agree": agree,
        "loadavg_1m_end": round(os.getloadavg()[0], 2),
    })
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--writes", type=int, default=500)
    ap.add_argument("--tasks", type=int, default=20000)
    ap.add_argument("--rounds", type=int, default=5)
    a = ap.parse_args()
    res = asyncio.run(run(a))
    fo = ", ".join(f"{x:.2f}" for x in res["failover_write_accepted_s"])  # type: ignore[attr-defined]
    pr = ", ".join(f"{x:.2f}" for x in res["failover_first_probe_s"])  # type: ignore[attr-defined]
    rows = [
        ("write, 1 member p50 / p99", f"{res['write_1member_p50_ms']:.2f} / {res['write_1member_p99_ms']:.2f} ms",
         "p50 <= 5 ms"),
        ("write, 3 members, via leader p50 / p99",
         f"{res['write_3member_leader_p50_ms']:.2f} / {res['write_3member_leader_p99_ms']:.2f} ms", "p50 <= 5 ms"),
        ("write, 3 members, via follower p50 / p99",
         f"{res['write_3member_follower_p50_ms']:.2f} / {res['write_3member_follower_p99_ms']:.2f} ms", "p50 <= 5 ms"),
        (f"batched task creates ({a.tasks:,}), 1 / 3 members",
         f"{res['batched_task_writes_per_s_1member']:,}/s / {res['batched_task_writes_per_s_3member']:,}/s",
         ">= 5,000/s"),
        ("kill -9 leader -> write accepted", f"{res['failover_write_accepted_s_median']:.2f} s median ({fo})",
         f"<= 2 s (Docker {DOCKER_FAILOVER_S} s)"),
        ("kill -9 leader -> first 50 ms probe accepted", f"{res['failover_first_probe_s_median']:.2f} s median ({pr})",
         "-"),
        ("replicas agree", str(res["replicas_agree"]), "True"),
        ("machine", f"{res['cpus']} CPUs, load {res['loadavg_1m_start']} -> {res['loadavg_1m_end']}", "-"),
    ]
    w = max(len(r[0]) for r in rows)
    v = max(len(r[1]) for r in rows)
    print(f"{'measure':<{w}}  {'result':<{v}}  target")
    for name, val, target in rows:
        print(f"{name:<{w}}  {val:<{v}}  {target}")
    print(json.dumps(res))


if __name__ == "__main__":
    main()
