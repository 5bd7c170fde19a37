"""Engine start latency: one container (create + start until running, p50 of N) and 100 containers on
one engine. Runs as root with real runc/conmon, images pulled from a local docker-registry.

    .venv/bin/python bench/engine.py [--runs 20] [--many 100] [--parallel 8]

Prints a table and one JSON line. Targets (issue 4): ≤ 0.2 s for one, ≤ 4 s for 100 on a 2-core node;
Docker Swarm on this machine: 0.55 s for one replica; runc alone ~32 ms.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from shoal.agent.engine import ContainerConfig, Engine
from shoal.lab.registry import Registry, seed_busybox
from shoal.proto import types_pb2


def spec() -> types_pb2.ContainerSpec:
    return types_pb2.ContainerSpec(image="busybox", args=["sleep", "1000"])


async def one(e: Engine, cid: str) -> float:
    t = time.perf_counter()
    await e.create(ContainerConfig(cid, cid, spec()))
    await e.start(cid)
    dt = time.perf_counter() - t
    assert (await e.inspect(cid)).status == "running"
    return dt


async def bench(runs: int, many: int, parallel: int, spawn_parallel: int | None, run_dir: str | None) -> dict:
    root = Path(tempfile.mkdtemp(prefix="shoal-bench-engine-", dir="/var/tmp"))
    reg = Registry("127.0.0.1")
    reg.start()
    e = Engine(
        root,
        registry_mirrors=[reg.url],
        spawn_parallel=spawn_parallel,
        run_dir=Path(run_dir) if run_dir else None,
    )
    try:
        seed_busybox(reg.url)
        t = time.perf_counter()
        await e.pull("busybox")
        pull_s = time.perf_counter() - t
        await one(e, "warmup")
        await e.remove("warmup")
        singles = []
        for i in range(runs):
            singles.append(await one(e, f"single{i}"))
            await e.remove(f"single{i}")
        sem = asyncio.Semaphore(parallel)

        async def limited(i: int) -> float:
            async with sem:
                return await one(e, f"many{i}")

        t = time.perf_counter()
        per = await asyncio.gather(*(limited(i) for i in range(many)))
        many_s = time.perf_counter() - t
        running = sum(1 for c in await e.list() if c.status == "running")
        t = time.perf_counter()
        await asyncio.gather(*(e.remove(f"many{i}") for i in range(many)))
        remove_s = time.perf_counter() - t
        return {
            "pull_s": round(pull_s, 4),
            "one_p50_s": round(statistics.median(singles), 4),
            "one_min_s": round(min(singles), 4),
            "one_max_s": round(max(singles), 4),
            "many": many,
            "many_running": running,
            "many_s": round(many_s, 3),
            "many_per_container_p50_s": round(statistics.median(per), 4),
            "remove_many_s": round(remove_s, 3),
            "parallel": parallel,
            "spawn_parallel": e.spawn_parallel,
            "run_dir": run_dir or "",
            "runs": runs,
            "cpus": os.cpu_count(),
        }
    finally:
        for c in await e.list():
            try:
                await e.remove(c.id)
            except Exception as exc:  # keep cleaning
                print(f"cleanup of {c.id} failed: {exc}", file=sys.stderr)
        await e.close()
        reg.stop()
        shutil.rmtree(root, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--many", type=int, default=100)
    ap.add_argument(
        "--parallel", type=int, default=100, help="creates in flight (the engine itself limits spawns)"
    )
    ap.add_argument("--spawn-parallel", type=int, default=None, help="Engine(spawn_parallel=...)")
    ap.add_argument("--run-dir", default=None, help="Engine(run_dir=...), e.g. a dir on a tmpfs")
    a = ap.parse_args()
    r = asyncio.run(bench(a.runs, a.many, a.parallel, a.spawn_parallel, a.run_dir))
    rows = [
        ("pull busybox (local registry)", f"{r['pull_s']:.3f} s", ""),
        (f"one container create+start, p50 of {a.runs}", f"{r['one_p50_s'] * 1000:.1f} ms", "≤ 200 ms"),
        ("  min / max", f"{r['one_min_s'] * 1000:.1f} / {r['one_max_s'] * 1000:.1f} ms", ""),
        (f"{a.many} containers running ({a.parallel} at a time)", f"{r['many_s']:.2f} s", "≤ 4 s"),
        ("  running at the end", str(r["many_running"]), str(a.many)),
        (f"remove {a.many}", f"{r['remove_many_s']:.2f} s", ""),
    ]
    w = max(len(x[0]) for x in rows)
    print(f"{'measure':<{w}}  {'value':>18}  target")
    for name, val, tgt in rows:
        print(f"{name:<{w}}  {val:>18}  {tgt}")
    print(json.dumps({"bench": "engine", **r}))


if __name__ == "__main__":
    main()
