"""End-to-end figures on a lab cluster (3 managers + 2 workers by default), beside Docker Swarm's.

    .venv/bin/python bench/cluster.py [--managers 3] [--workers 2] [--skip-failover]

cli_create_* time the same creates through a `swarmctl service create` process (the venv's console
script, which waits for convergence by default: its progress follows the Watch stream), from the
process's start to its exit; the gap to create_* is the CLI's own cost (start-up, watch, output).

swarmd RSS is read twice: idle (rss_*_idle_mb, a few seconds after `lab up`, before any service) and
after the create_* workload (rss_*_after_load_mb). A manager's figure is swarmd plus its remote API
front's process and its etcd member (target 110 MB idle, against dockerd + containerd's 157 MB); the agent's target is 50 MB.

Brings up its own lab (named `bench`), measures, and takes it down again. Prints a table and one
JSON line. Never fails on a figure: targets are shown, not asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import grpc
from fleet import children  # (bench/ is on the path of a bench run)

from shoal.lab.lab import Lab, LabState, _alive
from shoal.proto import control_pb2, control_pb2_grpc, specs_pb2, types_pb2

DOCKER = {  # Docker Swarm 20.10 on a 4-host namespace lab of this kind of machine (issue #7)
    "create_1": 0.55, "create_12": 2.05, "create_100": 15.0, "leader_failover": 12.8,
    "worker_down": 12.0, "worker_tasks_moved": 17.6,
}
TARGET = {"create_1": 0.3, "create_12": 1.0, "create_100": 5.0, "leader_failover": 2.0, "worker_down": 3.0,
          "worker_tasks_moved": 5.0, "rss_manager_idle_mb": 110, "rss_agent_idle_mb": 50}
IDLE_SETTLE = 5.0  # seconds after `lab up` (every node READY, no service) before the idle RSS is read


def stub(h) -> control_pb2_grpc.ControlStub:
    return control_pb2_grpc.ControlStub(grpc.insecure_channel(f"unix://{h.socket}"))


def service_spec(name: str, replicas: int) -> specs_pb2.ServiceSpec:
    return specs_pb2.ServiceSpec(
        annotations=types_pb2.Annotations(name=name),
        task=types_pb2.TaskSpec(
            container=types_pb2.ContainerSpec(image="busybox", args=["sleep", "3600"]),
            restart=types_pb2.RestartPolicy(condition=types_pb2.RestartPolicy.ANY),
        ),
        replicated=specs_pb2.ReplicatedService(replicas=replicas),
    )


def running(c, service_id: str) -> list:
    f = control_pb2.ListFilters(service_ids=[service_id], desired_states=[types_pb2.RUNNING])
    tasks = c.ListTasks(control_pb2.ListTasksRequest(filters=f), timeout=5).tasks
    return [t for t in tasks if t.status.state == types_pb2.RUNNING]


def wait(pred, timeout: float, step: float = 0.01):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            v = pred()
        except grpc.RpcError:
            v = None
        if v:
            return v
        time.sleep(step)
    return None


def create_and_wait(c, name: str, replicas: int, timeout: float) -> float | None:
    t0 = time.monotonic()
    svc = c.CreateService(control_pb2.CreateServiceRequest(spec=service_spec(name, replicas)), timeout=10).service
    ok = wait(lambda: len(running(c, svc.id)) >= replicas, timeout)
    dt = time.monotonic() - t0
    c.RemoveService(control_pb2.RemoveServiceRequest(service_id=svc.id), timeout=10)
    wait(lambda: not c.ListTasks(control_pb2.ListTasksRequest(
        filters=control_pb2.ListFilters(service_ids=[svc.id])), timeout=5).tasks, 60, 0.1)
    return dt if ok else None


SWARMCTL = Path(sys.executable).with_name("swarmctl")


def cli_create_and_wait(c, h, name: str, replicas: int, timeout: float) -> float | None:
    """Seconds from starting `swarmctl service create --replicas N` on host h's socket to its exit (it
    returns once every replica runs); None when it failed."""
    argv = [str(SWARMCTL), "--socket", h.socket, "service", "create", "--name", name, "--replicas", str(replicas),
            "--restart-condition", "any", "busybox", "sleep", "3600"]
    t0 = time.monotonic()
    r = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    dt = time.monotonic() - t0
    if r.returncode != 0:
        print(f"  swarmctl failed ({r.returncode}): {r.stderr.strip()[-300:]}", file=sys.stderr)
    svc = c.GetService(control_pb2.GetServiceRequest(service_id=name), timeout=10).service
    c.RemoveService(control_pb2.RemoveServiceRequest(service_id=svc.id), timeout=10)
    wait(lambda: not c.ListTasks(control_pb2.ListTasksRequest(
        filters=control_pb2.ListFilters(service_ids=[svc.id])), timeout=5).tasks, 60, 0.1)
    return dt if r.returncode == 0 else None


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def etcd_pid(h) -> int:
    """The pid of a lab manager's running etcd member (its pid file in the state dir), 0 if none."""
    try:
        pid = int(Path(h.state_dir, "etcd", "etcd.pid").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 0
    return pid if _alive(pid) else 0


def etcd_rss_mb(h) -> float:
    """VmRSS (MB) of a manager's etcd member, 0 if none runs."""
    pid = etcd_pid(h)
    return rss_mb(pid) if pid else 0.0


def front_rss_mb(h) -> float:
    """VmRSS (MB) of a lab manager's remote API front (the swarmd child running
    `shoal.manager.remoteapi`), 0 if none runs."""
    for pid in children(h.swarmd_pid):
        try:
            if b"shoal.manager.remoteapi" in Path(f"/proc/{pid}/cmdline").read_bytes():
                return rss_mb(pid)
        except OSError:
            continue
    return 0.0


def rss_by_role(st: LabState, suffix: str) -> dict[str, float | None]:
    """Largest VmRSS (MB) of the live swarmd of each role: rss_manager_<suffix> (swarmd plus its
    remote API front and its etcd member: the manager's whole footprint, as dockerd + containerd is
    Docker's), rss_manager_swarmd_, rss_manager_front_ and rss_manager_etcd_<suffix> (its parts),
    rss_agent_<suffix>."""
    out: dict[str, float | None] = {}
    managers = [h for h in st.hosts if h.role == "manager" and _alive(h.swarmd_pid)]
    parts = [(rss_mb(h.swarmd_pid), front_rss_mb(h), etcd_rss_mb(h)) for h in managers]
    whole = max(parts, key=sum) if parts else None
    out[f"rss_manager_{suffix}"] = round(sum(whole), 1) if whole else None
    out[f"rss_manager_swarmd_{suffix}"] = round(whole[0], 1) if whole else None
    out[f"rss_manager_front_{suffix}"] = round(whole[1], 1) if whole else None
    out[f"rss_manager_etcd_{suffix}"] = round(whole[2], 1) if whole else None
    vals = [rss_mb(h.swarmd_pid) for h in st.hosts if h.role == "worker" and _alive(h.swarmd_pid)]
    out[f"rss_agent_{suffix}"] = max(vals) if vals else None
    return out


def leader_host(st: LabState, lab: Lab):
    for h in st.hosts:
        if h.role == "manager" and _alive(h.swarmd_pid) and not h.partitioned:
            try:
                info = stub(h).Info(control_pb2.InfoRequest(), timeout=2)
                nodes = stub(h).ListNodes(control_pb2.ListNodesRequest(), timeout=2).nodes
                for n in nodes:
                    if n.id == info.leader_node_id:
                        return st.host(n.description.hostname)
            except grpc.RpcError:
                continue
    return None


def failover(lab: Lab, st: LabState) -> float | None:
    old = leader_host(st, lab)
    other = next(h for h in st.hosts if h.role == "manager" and h is not old)
    lab.partition(old.name)
    t0 = time.monotonic()
    n = [0]

    def write() -> bool:
        n[0] += 1
        spec = specs_pb2.SecretSpec(annotations=types_pb2.Annotations(name=f"failover-{n[0]}"), data=b"x")
        stub(other).CreateSecret(control_pb2.CreateSecretRequest(spec=spec), timeout=1)
        return True

    ok = wait(write, 30, 0.05)
    dt = time.monotonic() - t0
    lab.partition(old.name, cut=False)
    return dt if ok else None


def worker_partition(lab: Lab, st: LabState) -> tuple[float | None, float | None]:
    c = stub(st.hosts[0])
    svc = c.CreateService(control_pb2.CreateServiceRequest(spec=service_spec("moving", 4)), timeout=10).service
    wait(lambda: len(running(c, svc.id)) >= 4, 60)
    nodes = {n.id: n for n in c.ListNodes(control_pb2.ListNodesRequest(), timeout=5).nodes}
    on_worker = [t for t in running(c, svc.id) if nodes[t.node_id].role == types_pb2.WORKER]
    if not on_worker:
        return None, None
    victim_node = nodes[on_worker[0].node_id]
    victim = st.host(victim_node.description.hostname)
    lab.partition(victim.name)
    t0 = time.monotonic()
    down = wait(lambda: c.GetNode(control_pb2.GetNodeRequest(node_id=victim_node.id), timeout=2)
                .node.status.state == types_pb2.NodeStatus.DOWN, 60)
    t_down = time.monotonic() - t0 if down else None
    moved = wait(lambda: len([t for t in running(c, svc.id) if t.node_id != victim_node.id]) >= 4, 60)
    t_moved = time.monotonic() - t0 if moved else None
    lab.partition(victim.name, cut=False)
    c.RemoveService(control_pb2.RemoveServiceRequest(service_id=svc.id), timeout=10)
    return t_down, t_moved


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--managers", type=int, default=3)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--skip-failover", action="store_true")
    a = ap.parse_args()
    lab = Lab("bench", progress=lambda m: print(f"  {m}", file=sys.stderr))
    res: dict[str, float | None] = {}
    try:
        st = lab.up(a.managers, a.workers)
        time.sleep(IDLE_SETTLE)
        res.update(rss_by_role(st, "idle_mb"))  # right after `lab up`: no service, no image pulled
        c = stub(st.hosts[0])
        create_and_wait(c, "warmup", 1, 60)  # pulls the image on one node
        for n, key in ((1, "create_1"), (12, "create_12"), (100, "create_100")):
            runs = [create_and_wait(c, f"b{n}-{i}", n, 120) for i in range(a.runs if n < 100 else 1)]
            ok = [r for r in runs if r is not None]
            res[key] = statistics.median(ok) if ok else None
        for n in (1, 12):
            runs = [cli_create_and_wait(c, st.hosts[0], f"c{n}-{i}", n, 120) for i in range(a.runs)]
            ok = [r for r in runs if r is not None]
            res[f"cli_create_{n}"] = statistics.median(ok) if ok else None
        time.sleep(2)
        res.update(rss_by_role(st, "after_load_mb"))  # after the create_* workload (services removed)
        if not a.skip_failover:
            st = lab.state()
            res["leader_failover"] = failover(lab, st)
            time.sleep(3)
            res["worker_down"], res["worker_tasks_moved"] = worker_partition(lab, lab.state())
    finally:
        lab.down()
    print(f"\nShoal end to end on a {a.managers}+{a.workers} namespace lab, {platform.node()}, "
          f"{os.cpu_count()} cores, {time.strftime('%Y-%m-%d')}")
    print(f"{'figure':<28}{'shoal':>10}{'docker':>10}{'target':>10}")
    for k, v in res.items():
        shown = f"{v:.2f}" if isinstance(v, float) else "failed"
        d = DOCKER.get(k)
        print(f"{k:<28}{shown:>10}{(f'{d:.2f}' if d else '-'):>10}{TARGET.get(k, '-'):>10}")
    print(json.dumps({"bench": "cluster", "results": res, "docker": DOCKER, "targets": TARGET}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
