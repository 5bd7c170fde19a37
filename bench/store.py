"""Benchmark of the Raft store: 3 members in separate processes on 127.0.0.1-3, real TCP Raft.

Measures one synchronous write from the leader and from a follower (p50, p99), the throughput of
batched task writes (transactions of 2000 tasks), and the time from `kill -9` of the leader until a
write is accepted again (several rounds; the killed member restarts from its journal in between).
Prints a table and one JSON line. Not a test: it never fails on figures.

    .venv/bin/python bench/store.py [--writes 500] [--tasks 20000] [--rounds 5]
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DOCKER_FAILOVER_S = 12.8  # Docker Swarm 20.10 on the same kind of machine (DESIGN.md)


def free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class Member:
    def __init__(self, base: Path, idx: int, addr: str, peers: list[str]) -> None:
        self.idx, self.addr, self.peers = idx, addr, peers
        self.dir = base / f"m{idx}"
        self.log = base / f"m{idx}.log"
        self.proc: subprocess.Popen[str] | None = None
        self.start()

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "shoal.manager.raft", "--dir", str(self.dir), "--addr", self.addr,
             "--peers", ",".join(self.peers)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=open(self.log, "a"), text=True,  # noqa: SIM115
        )

    def send(self, line: str) -> None:
        assert self.proc and self.proc.stdin
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    def recv(self) -> object:
        assert self.proc and self.proc.stdout
        ans = json.loads(self.proc.stdout.readline())
        if "ok" not in ans:
            raise RuntimeError(f"member {self.idx}: {ans}")
        return ans["ok"]

    def cmd(self, line: str) -> object:
        self.send(line)
        return self.recv()

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()


def leader_of(members: list[Member]) -> tuple[Member, list[Member]]:
    for _ in range(1000):
        alive = [m for m in members if m.proc and m.proc.poll() is None]
        st = {m.idx: m.cmd("status") for m in alive}
        leaders = [m for m in alive if st[m.idx]["is_leader"]]  # type: ignore[index]
        if len(leaders) == 1 and all(s["leader"] == leaders[0].addr for s in st.values()):  # type: ignore[index]
            return leaders[0], [m for m in alive if m is not leaders[0]]
        time.sleep(0.01)
    raise RuntimeError("no leader")


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(len(xs) * p))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--writes", type=int, default=500)
    ap.add_argument("--tasks", type=int, default=20000)
    ap.add_argument("--rounds", type=int, default=5)
    a = ap.parse_args()
    base = Path(tempfile.mkdtemp(prefix="shoal-bench-store-"))
    addrs = [f"127.0.0.{i + 1}:{free_port(f'127.0.0.{i + 1}')}" for i in range(3)]
    members = [Member(base, i, addr, [x for x in addrs if x != addr]) for i, addr in enumerate(addrs)]
    try:
        for m in members:
            m.cmd("wait-leader 10")
        leader, followers = leader_of(members)
        leader.cmd("time-writes 50 warm")
        lat_l = [x * 1000 for x in leader.cmd(f"time-writes {a.writes} l")]  # type: ignore[union-attr]
        lat_f = [x * 1000 for x in followers[0].cmd(f"time-writes {a.writes} f")]  # type: ignore[union-attr]
        t_batch = float(leader.cmd(f"batch {a.tasks} t"))  # type: ignore[arg-type]
        for m in members:
            m.cmd("barrier")
        failovers = []
        for r in range(a.rounds):
            leader, followers = leader_of(members)
            t_kill = time.monotonic()
            leader.kill()
            t_ok = float(followers[0].cmd(f"first-write fo{r}-"))  # type: ignore[arg-type]
            failovers.append(t_ok - t_kill)
            leader.start()
            leader.cmd("wait-leader 10")
            leader.cmd("barrier")
        counts = {m.idx: m.cmd("count") for m in members}
    finally:
        for m in members:
            m.kill()
        shutil.rmtree(base, ignore_errors=True)

    res = {
        "bench": "store",
        "members": 3,
        "write_leader_p50_ms": round(statistics.median(lat_l), 3),
        "write_leader_p99_ms": round(pct(lat_l, 0.99), 3),
        "write_follower_p50_ms": round(statistics.median(lat_f), 3),
        "write_follower_p99_ms": round(pct(lat_f, 0.99), 3),
        "batched_task_writes_per_s": round(a.tasks / t_batch),
        "failover_write_accepted_s_median": round(statistics.median(failovers), 3),
        "failover_write_accepted_s_max": round(max(failovers), 3),
        "failover_rounds": len(failovers),
        "docker_swarm_failover_s": DOCKER_FAILOVER_S,
        "failover_speedup_vs_docker": round(DOCKER_FAILOVER_S / statistics.median(failovers), 1),
        "replicas_agree": len(set(counts.values())) == 1,
    }
    rows = [
        ("write from leader p50 / p99", f"{res['write_leader_p50_ms']:.2f} / {res['write_leader_p99_ms']:.2f} ms", "p50 <= 5 ms"),
        ("write from follower p50 / p99", f"{res['write_follower_p50_ms']:.2f} / {res['write_follower_p99_ms']:.2f} ms", "p50 <= 5 ms"),
        ("batched task writes", f"{res['batched_task_writes_per_s']:,}/s", ">= 5,000/s"),
        ("kill -9 leader -> write accepted", f"{res['failover_write_accepted_s_median']:.2f} s median, "
         f"{res['failover_write_accepted_s_max']:.2f} s max ({len(failovers)} rounds)", f"<= 2 s (Docker {DOCKER_FAILOVER_S} s)"),
    ]
    w = max(len(r[0]) for r in rows)
    v = max(len(r[1]) for r in rows)
    print(f"{'measure':<{w}}  {'result':<{v}}  target")
    for name, val, target in rows:
        print(f"{name:<{w}}  {val:<{v}}  {target}")
    print(json.dumps(res))


if __name__ == "__main__":
    main()
