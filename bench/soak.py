"""A lab soak: service churn and a leader failover every 2 minutes; counts what went wrong without cause.

    .venv/bin/python bench/soak.py [--minutes 30] [--failover-every 120] [--managers 3] [--workers 2]

Brings up its own lab (named `soak`). For `--minutes`:

- churn, one action every 3-6 s from a random manager's control socket: create a service (at most 5,
  1-4 replicas of busybox httpd, on workers only), scale one, update one (an env change: a rolling
  update), remove one (at least 2 stay);
- every `--failover-every` seconds the leader's swarmd is killed (SIGKILL, with its etcd member) and
  started again at once, as systemd's `Restart=always` would.

And counts:

- nodes falsely marked Down: the managers' `node down node=` log lines during the run (every node
  stays alive, the killed leader is back within about a second);
- tasks replaced without cause: more than one task for the same service, slot and spec version
  (every task seen by polling the tasks each second is remembered, even once the task reaper drops
  it). A scale or an update makes a new spec version, so its replacements are not counted;
- tasks that failed or were rejected (busybox httpd never exits on its own);
- churn actions refused (a failover in progress: the CLI's error, the action is skipped);
- the idle resident memory (VmRSS) of each worker's swarmd, before the churn and after it, with no
  service left.

Prints a table and one JSON line; never fails on a figure. Takes the lab down at the end.
"""

from __future__ import annotations

import argparse
import os
import random
import re
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

import grpc
from report import report

from shoal.lab.lab import Lab
from shoal.proto import control_pb2, control_pb2_grpc, types_pb2

SWARMCTL = [sys.executable, "-m", "shoal.cli.swarmctl"]
DOWN = re.compile(r"node down node=(\w+)")
PREFIX = "soak"


def ctl(sock: str, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "SWARM_SOCKET": sock}
    try:
        return subprocess.run([*SWARMCTL, *args], capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return subprocess.CompletedProcess(args, -9, "", f"timed out after {timeout:g} s")


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def log_offsets(hosts) -> dict[str, int]:
    return {h.name: (Path(h.state_dir) / "swarmd.log").stat().st_size for h in hosts}


def down_lines(hosts, offsets: dict[str, int]) -> list[str]:
    out = []
    for h in hosts:
        with open(Path(h.state_dir) / "swarmd.log", errors="replace") as f:
            f.seek(offsets.get(h.name, 0))
            out += DOWN.findall(f.read())
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--minutes", type=float, default=30.0)
    ap.add_argument("--failover-every", type=float, default=120.0)
    ap.add_argument("--managers", type=int, default=3)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--seed", type=int, default=None)
    a = ap.parse_args()
    rnd = random.Random(a.seed)
    lab = Lab("soak", progress=lambda m: print(f"  {m}", file=sys.stderr))
    res: dict[str, object] = {}
    try:
        st = lab.up(a.managers, a.workers)
        managers = [h for h in st.hosts if h.role == "manager"]
        workers = [h for h in st.hosts if h.role == "worker"]
        names = {}
        time.sleep(5)  # let the fresh lab settle before the idle figure
        res["worker_rss_mb_before"] = [round(rss_mb(lab.state().host(h.name).swarmd_pid), 1) for h in workers]
        offsets = log_offsets(st.hosts)

        def live_sock() -> str:
            status = {r["host"]: r for r in lab.status()}
            up = [h for h in managers if "stopped" not in status[h.name]["state"]]
            return rnd.choice(up).socket

        seen: dict[str, tuple[str, int, int]] = {}  # task id -> (service id, slot, spec version)
        failed: set[str] = set()
        services: list[str] = []
        actions: dict[str, int] = defaultdict(int)
        refused: dict[str, int] = defaultdict(int)
        failovers = 0
        serial = 0
        t_start = time.monotonic()
        t_end = t_start + a.minutes * 60
        next_failover = t_start + a.failover_every
        next_action = t_start
        next_poll = t_start
        print(f"  soaking {a.minutes:g} min, failover every {a.failover_every:g} s", file=sys.stderr)
        while time.monotonic() < t_end:
            now = time.monotonic()
            if now >= next_poll:
                next_poll = now + 1.0
                try:
                    with grpc.insecure_channel(f"unix://{live_sock()}") as ch:
                        c = control_pb2_grpc.ControlStub(ch)
                        for t in c.ListTasks(control_pb2.ListTasksRequest(), timeout=5).tasks:
                            if t.service_annotations.name.startswith(PREFIX):
                                seen[t.id] = (t.service_id, t.slot, t.spec_version)
                                if t.status.state in (types_pb2.FAILED, types_pb2.REJECTED):
                                    failed.add(t.id)
                        if not names:
                            names = {n.id: n.description.hostname
                                     for n in c.ListNodes(control_pb2.ListNodesRequest(), timeout=5).nodes}
                except grpc.RpcError:
                    pass
            if now >= next_failover:
                next_failover = now + a.failover_every
                leader = next((r["host"] for r in lab.status() if r["leader"]), "")
                if leader:
                    lab.kill(leader)
                    lab.start(leader, wait=False)
                    failovers += 1
                    print(f"  {time.monotonic() - t_start:6.0f} s: leader {leader} killed and started again",
                          file=sys.stderr)
            if now >= next_action:
                next_action = now + rnd.uniform(3, 6)
                choices = ["create"] if len(services) < 2 else ["scale", "update", "remove", "create"]
                if len(services) >= 5:
                    choices.remove("create")
                if len(services) <= 2 and "remove" in choices:
                    choices.remove("remove")
                what = rnd.choice(choices)
                sock = live_sock()
                if what == "create":
                    serial += 1
                    name = f"{PREFIX}{serial}"
                    r = ctl(sock, "service", "create", "-d", "--name", name, "--replicas", str(rnd.randint(1, 4)),
                            "--constraint", "node.role==worker", "--stop-grace-period", "1s",
                            "busybox", "httpd", "-f", "-p", "80")
                    if r.returncode == 0:
                        services.append(name)
                else:
                    name = rnd.choice(services)
                    if what == "scale":
                        r = ctl(sock, "service", "scale", "-d", f"{name}={rnd.randint(1, 4)}")
                    elif what == "update":
                        r = ctl(sock, "service", "update", "-d", "--env-add", f"N={serial}-{rnd.random():.6f}", name)
                    else:
                        r = ctl(sock, "service", "rm", name)
                        if r.returncode == 0:
                            services.remove(name)
                actions[what] += 1
                if r.returncode != 0:
                    refused[what] += 1
                    print(f"  {what} {name} refused: {r.stderr.strip()[:200]}", file=sys.stderr)
            time.sleep(0.2)

        downs = down_lines(st.hosts, offsets)
        for name in services:
            ctl(live_sock(), "service", "rm", name)
        time.sleep(15)  # the containers stop, the workers go idle
        res["worker_rss_mb_after"] = [round(rss_mb(lab.state().host(h.name).swarmd_pid), 1) for h in workers]
        groups: dict[tuple[str, int, int], int] = defaultdict(int)
        for key in seen.values():
            groups[key] += 1
        replaced = sum(n - 1 for n in groups.values() if n > 1)
        res.update({
            "minutes": a.minutes, "nodes": len(st.hosts), "failovers": failovers,
            "actions": sum(actions.values()), "actions_by_kind": dict(actions),
            "actions_refused": sum(refused.values()),
            "tasks_seen": len(seen),
            "nodes_falsely_down": len(downs), "down_nodes": sorted({names.get(n, n) for n in downs}),
            "tasks_replaced_without_cause": replaced, "tasks_failed": len(failed),
        })
    finally:
        lab.down()
    report("soak", f"Soak of a {a.managers}+{a.workers} namespace lab", res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
