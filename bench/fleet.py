"""The fleet: how far three managers on this machine carry N nodes (issue 13). As root.

    .venv/bin/python bench/fleet.py --nodes N [--idle 30] [--tasks-per-node 10]   # one step
    .venv/bin/python bench/fleet.py [--steps 100,500,1000,2000,5000]               # the curve

The managers are real: three `swarmd` processes (each with its etcd member) on 127.0.0.1-3, the first
initialises the cluster, the others join with the manager token. The nodes are simulated by
bench/fleetsim.py, in about one process per 1,000 nodes (at least two) plus one process holding 1 % of
them: each node really joins through the CA (its own certificate) and runs the project's agent
(`shoal.agent.agent.Agent`) over mutual TLS with an in-memory engine, so sessions, heartbeats,
assignments and status reports are the real ones; only the containers are not.

One step, on a fresh cluster, measures in turn:
1. joins: 500 nodes (or N; `--first`) join at once (`joins_per_s`), the rest 32 at a time per fleet
   process (`--join-conc`); until all N are READY in `node ls` and their agents in session (`ready_s`).
2. idle (`--idle` s): CPU of each manager (swarmd + its etcd, utime+stime from /proc, as a fraction of
   one core) -> `leader_cpu_idle`, `follower_cpu_idle` (the busier follower); resident memory (VmRSS,
   swarmd + etcd) -> `manager_rss_mb` (largest), `leader_rss_mb`; the simulator's own CPU
   `sim_cpu_idle`; heartbeat round trips timed in the agents -> `heartbeat_p50_s`, `heartbeat_p99_s`
   (of the answered ones: `heartbeats_idle`; failed ones, e.g. past their deadline:
   `heartbeats_failed_idle`).
3. a replicated service of `--tasks-per-node` busybox tasks per node, constrained to workers:
   create -> all assigned (`tasks_assigned_s`) and all RUNNING (`tasks_running_s`), polled with
   ListTasks of the service on a follower's control socket (every 0.5 s, 1 s past 200 nodes; the
   follower's replica of the store, so that the poll of 50,000 tasks does not load the leader);
   meanwhile a thread calls ListNodes, ListTasks (one node's tasks with desired state RUNNING, as
   `docker node ps`) and GetService in a loop (0.1 s between rounds) -> `api_p99_s` and each call's p99.
   With `--steady S`, then: S seconds with every task running, the nodes seen DOWN
   meanwhile (`false_down_steady`; the issue asks for none in 10 minutes) and what the managers spend
   then (`leader_cpu_steady`, `manager_rss_steady_mb`, heartbeat round trips).
4. the leader (the manager running the control loops, where the sessions are: found in the managers'
   logs, as `node ls` names etcd's leader, which can be another manager after a failover): its swarmd
   and its etcd member SIGKILLed (a machine dying; it stays dead): until a write
   (CreateSecret, every 50 ms on the survivors) is accepted (`failover_write_s`), until every live agent
   came into session again (`failover_sessions_s`, and the p50/p99 of the agents' own times), and the
   service's tasks replaced or no longer desired RUNNING 30 s after the kill (`rescheduled_on_failover`,
   goal 0).
5. the process with 1 % of the nodes SIGKILLed: until all of them are DOWN (`down_s`) and until the
   service is back to all its tasks RUNNING (`down_moved_s`).
6. throughout: nodes of the fleet seen DOWN by a ListNodes poll every second (on a follower) that the
   bench did not kill (`false_down`; managers count too, but not the killed one), and nodes seen DOWN
   that no agent of the fleet owns (`orphan_nodes`: a join whose answer was lost after the store took
   it, joined again under a new id; the leader marks such a node DOWN for never opening a session).
Each phase waits at most 120 s + N * 0.1 s; a figure not reached is null and `errors` names it. When
the nodes never all come into session, the idle figures are still taken (what the managers spend
then) and the later phases are skipped. The polls are real API calls and cost the managers something:
a full `task ls` of 50,000 tasks is not free.

The cluster's ingress network is a /24 as Docker's (one address per node: 254 nodes); past 250
nodes the bench replaces it before the nodes join by one on `--ingress-subnet` (default
198.19.0.0/17: 32,766 nodes; the cluster's address pool is the lab's overlay range 198.19.0.0/16), as a Docker user with more nodes does. `--keep-logs DIR` keeps the managers' and fleet processes' logs.

Without --nodes, each step runs as its own `fleet.py --nodes N` process; the curve stops after a step
with a timed-out phase, and ends with a least-squares fit of idle leader CPU and memory per node and
the largest N that held (every phase in time, no false Down).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import queue
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from polling import until
from report import report

from shoal.lab.registry import free_port
from shoal.proto import control_pb2, control_pb2_grpc, objects_pb2, specs_pb2, types_pb2

HERE = Path(__file__).resolve().parent
TICK = os.sysconf("SC_CLK_TCK")
GRPC_OPTS = [("grpc.max_receive_message_length", 1 << 30)]
# Overlay subnets (the ingress network among them) come from the lab's overlay range.
ADDR_POOL = "198.19.0.0/16"
STEPS = (100, 500, 1000, 2000, 5000)
API_PAUSE = 0.1  # seconds between two rounds of the API thread's calls (one client, not a saturating one)
KEYS = ("nodes", "false_down", "orphan_nodes", "joins_per_s", "ready_s", "leader_cpu_idle", "follower_cpu_idle",
        "manager_rss_mb", "leader_rss_mb", "sim_cpu_idle", "heartbeat_p50_s", "heartbeat_p99_s", "heartbeats_idle",
        "heartbeats_failed_idle", "tasks",
        "tasks_assigned_s", "tasks_running_s", "api_p99_s", "api_node_ls_p99_s", "api_task_ls_p99_s",
        "api_service_inspect_p99_s", "api_calls", "failover_write_s", "failover_sessions_s",
        "failover_sessions_p50_s", "failover_sessions_p99_s", "rescheduled_on_failover", "killed_nodes",
        "down_s", "down_moved_s", "steady_s", "false_down_steady", "leader_cpu_steady", "follower_cpu_steady",
        "manager_rss_steady_mb", "heartbeat_p50_steady_s", "heartbeat_p99_steady_s", "heartbeats_failed_steady",
        "errors")


# ---- processes ------------------------------------------------------------------------------------
def children(pid: int) -> list[int]:
    """Every descendant of `pid` (from /proc/*/stat ppid)."""
    parent: dict[int, int] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                with open(f"/proc/{d}/stat") as f:
                    parent[int(d)] = int(f.read().rsplit(")", 1)[1].split()[1])
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        kids = [c for c, pp in parent.items() if pp == p]
        out += kids
        todo += kids
    return out


def cpu_ticks(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return int(fields[11]) + int(fields[12])  # utime + stime
    except (OSError, IndexError, ValueError):
        return 0


def rss_mb(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def started_under(base: Path) -> list[int]:
    """PIDs of every process whose command line names `base` (the step's own state dir): the managers,
    their etcd members and the fleet processes this step started, whatever became of its objects."""
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit() and int(d) != os.getpid():
            with contextlib.suppress(OSError):
                with open(f"/proc/{d}/cmdline", "rb") as f:
                    if str(base).encode() in f.read():
                        out.append(int(d))
    return out


def kill_pids(pids: list[int]) -> None:
    for p in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(p, signal.SIGKILL)


@dataclass
class Manager:
    base: Path
    name: str
    ip: str
    api: str = ""
    proc: subprocess.Popen[bytes] | None = None
    tree: list[int] = field(default_factory=list)  # swarmd and its descendants (etcd), as last seen

    def __post_init__(self) -> None:
        self.dir, self.log = self.base / self.name, self.base / f"{self.name}.log"
        self.api = f"{self.ip}:{free_port(self.ip)}"
        self.argv = [sys.executable, "-m", "shoal.node.swarmd", "-d", str(self.dir), "--listen-remote-api", self.api,
                     "--listen-peer", f"{self.ip}:{free_port(self.ip)}", "--gossip-port", str(free_port(self.ip)),
                     "--hostname", self.name, "--no-engine-api", "--default-addr-pool", ADDR_POOL]
        self._ch: grpc.Channel | None = None

    def start(self, extra: list[str]) -> None:
        with open(self.log, "ab") as f:
            self.proc = subprocess.Popen([*self.argv, *extra], stdout=f, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True)

    @property
    def sock(self) -> Path:
        return self.dir / "swarmd.sock"

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stub(self) -> control_pb2_grpc.ControlStub:
        if self._ch is None:
            self._ch = grpc.insecure_channel(f"unix:{self.sock}", options=GRPC_OPTS)
        return control_pb2_grpc.ControlStub(self._ch)

    def pids(self) -> list[int]:
        if not self.alive():
            return []
        assert self.proc is not None
        self.tree = [self.proc.pid, *children(self.proc.pid)]
        return self.tree

    def kill(self) -> None:
        """SIGKILL swarmd and its etcd member at once (a machine dying)."""
        pids = self.pids() or self.tree
        kill_pids(pids)
        if self.proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(10)
        if self._ch is not None:
            self._ch.close()
            self._ch = None

    def tail(self, n: int = 60) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""


class Sim:
    """One bench/fleetsim.py process: its JSON lines read by a thread, its commands on stdin."""

    def __init__(self, base: Path, idx: int, managers: list[str], token: str, count: int, first: int,
                 conc: int) -> None:
        self.count, self.idx = count, idx
        self.err = open(base / f"sim{idx}.log", "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [sys.executable, str(HERE / "fleetsim.py"), "--managers", ",".join(managers), "--token", token,
             "--count", str(count), "--prefix", f"fleet-s{idx}", "--first", str(first), "--conc", str(conc),
             "--step-dir", str(base)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.err, start_new_session=True)
        self.status: dict[str, Any] = {}
        self.msgs: queue.Queue[dict[str, Any]] = queue.Queue()
        self.batch: dict[str, Any] | None = None
        self.joined: dict[str, Any] | None = None
        self.ready = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            try:
                m = json.loads(raw)
            except ValueError:
                continue
            kind = m.get("type")
            if kind == "status":
                self.status = m
            elif kind == "ready":
                self.ready.set()
            elif kind == "batch":
                self.batch = m
            elif kind == "joined":
                self.joined = m
            else:
                self.msgs.put(m)

    def send(self, line: str) -> None:
        if self.proc.poll() is None:
            assert self.proc.stdin is not None
            with contextlib.suppress(OSError):
                self.proc.stdin.write((line + "\n").encode())
                self.proc.stdin.flush()

    def ask(self, line: str, kind: str, timeout: float = 30) -> dict[str, Any] | None:
        while not self.msgs.empty():
            self.msgs.get_nowait()
        self.send(line)
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            try:
                m = self.msgs.get(timeout=max(0.01, end - time.monotonic()))
            except queue.Empty:
                break
            if m.get("type") == kind:
                return m
        return None

    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait()

    def stop(self) -> None:
        if self.alive():
            self.kill()
        self.err.close()


# ---- figures --------------------------------------------------------------------------------------
def pct(xs: list[float], p: float) -> float | None:
    if not xs:
        return None
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, int(round(p / 100 * len(s))) - 1))]


def r3(x: float | None) -> float | None:
    return None if x is None else round(x, 3)


class Step:
    """One step of the fleet benchmark: N nodes on a fresh cluster of 3 managers."""

    def __init__(self, nodes: int, idle: float, tpn: int, base: Path, ingress_subnet: str = "",
                 first: int = 500, conc: int = 32, steady: float = 0.0) -> None:
        self.n, self.idle, self.tpn, self.base, self.steady = nodes, idle, tpn, base, steady
        self.ingress_subnet, self.first, self.conc = ingress_subnet, first, conc
        self.timeout = 120 + nodes * 0.1
        self.res: dict[str, Any] = {k: None for k in KEYS}
        self.res.update(nodes=nodes, errors=[])
        self.managers = [Manager(base, f"m{i + 1}", f"127.0.0.{i + 1}") for i in range(3)]
        self.sims: list[Sim] = []
        self.down_seen: set[str] = set()
        self.manager_ids: dict[str, str] = {}  # hostname -> node id
        self.stop_polls = threading.Event()
        self.service_id = ""

    def error(self, what: str) -> None:
        self.res["errors"].append(what)
        print(f"fleet N={self.n}: {what}", file=sys.stderr, flush=True)

    def live(self) -> list[Manager]:
        return [m for m in self.managers if m.alive()]

    def ctl(self) -> control_pb2_grpc.ControlStub:
        """The control API of a live manager (the leader when it is known and alive)."""
        return self.live()[0].stub()

    def leader(self) -> Manager | None:
        """The manager running the control loops (dispatcher, orchestrators, scheduler), from the
        managers' logs: the one whose last word was "leads the control loops". `node ls` shows the
        store's (etcd's) leader, which after a failover need not be the same manager."""
        self.store_leader()  # keeps the manager node ids
        best: tuple[str, Manager] | None = None
        for m in self.live():
            text = m.log.read_text(errors="replace") if m.log.exists() else ""
            lead, lost = text.rfind("leads the control loops"), text.rfind("stopping control loops")
            if lead > lost:
                when = text[text.rfind("\n", 0, lead) + 1:][:23]
                if best is None or when > best[0]:
                    best = (when, m)
        self.leader_seen = best[1] if best else self.store_leader()
        return self.leader_seen

    def store_leader(self) -> Manager | None:
        """The manager whose etcd member leads the store (`node ls`'s Leader)."""
        for m in self.live():
            try:
                ns = m.stub().ListNodes(control_pb2.ListNodesRequest(
                    filters=control_pb2.ListFilters(roles=[types_pb2.MANAGER])), timeout=10).nodes
            except grpc.RpcError:
                continue
            for n in ns:
                self.manager_ids[n.description.hostname] = n.id
                if n.manager_status.leader:
                    return next((x for x in self.managers if x.name == n.description.hostname), None)
        return None

    def log(self, msg: str) -> None:
        print(f"[fleet N={self.n} {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)

    # ---- the cluster ------------------------------------------------------------------------------
    def start_managers(self) -> str:
        m1, m2, m3 = self.managers
        m1.start([])
        cl = until(lambda: m1.sock.exists() and m1.stub().GetCluster(control_pb2.GetClusterRequest(),
                                                                       timeout=5).cluster, 60)
        if not cl:
            raise RuntimeError("m1 did not initialise the cluster within 60 s")
        for m in (m2, m3):
            m.start(["--join-addr", m1.api, "--join-token", cl.root_ca.join_tokens.manager, "--manager"])
        if not until(lambda: len([n for n in m1.stub().ListNodes(control_pb2.ListNodesRequest(), timeout=5).nodes
                                  if n.manager_status.reachability == types_pb2.ManagerStatus.REACHABLE]) == 3, 120):
            raise RuntimeError("3 reachable managers not seen within 120 s")
        for m in (m2, m3):
            if not until(lambda m=m: m.sock.exists() and m.stub().Info(control_pb2.InfoRequest(), timeout=5), 60):
                raise RuntimeError(f"{m.name}'s control API did not answer within 60 s")
        return str(cl.root_ca.join_tokens.worker)

    def replace_ingress(self, subnet: str) -> None:
        """As a Docker user with more than 254 nodes does: the ingress network (a /24 by default, one
        address per node) removed and created again on a larger subnet, before any worker joins."""
        c = self.ctl()
        for _ in range(20):
            try:
                for net in c.ListNetworks(control_pb2.ListNetworksRequest(), timeout=10).networks:
                    if net.spec.ingress:
                        c.RemoveNetwork(control_pb2.RemoveNetworkRequest(network_id=net.id), timeout=10)
                spec = specs_pb2.NetworkSpec(annotations=types_pb2.Annotations(name="ingress"), ingress=True,
                                             driver_config=types_pb2.Driver(name="overlay"))
                spec.ipam.configs.add(subnet=subnet)
                c.CreateNetwork(control_pb2.CreateNetworkRequest(spec=spec), timeout=10)
                return
            except grpc.RpcError as e:
                err = f"{e.code().name}: {e.details()}"
                time.sleep(0.5)
        raise RuntimeError(f"the ingress network could not be replaced by one on {subnet}: {err}")

    def start_sims(self, token: str) -> None:
        killed = max(1, self.n // 100)
        rest = self.n - killed
        procs = max(2, round(rest / 1000))
        counts = [rest // procs + (1 if i < rest % procs else 0) for i in range(procs)] + [killed]
        first = min(self.first, self.n)
        firsts = [c * first // self.n for c in counts]
        firsts[0] += first - sum(firsts)
        apis = [m.api for m in self.managers]
        self.sims = [Sim(self.base, i, apis, token, c, f, self.conc) for i, (c, f) in enumerate(zip(counts, firsts, strict=True))]
        for s in self.sims:
            if not s.ready.wait(60):
                raise RuntimeError(f"fleet process {s.idx} did not start within 60 s")

    # ---- polls ------------------------------------------------------------------------------------
    def followers_first(self) -> list[Manager]:
        """The live managers, those not running the control loops first: the bench's own polls read
        a follower's replica of the store, so that they do not load the leader they measure."""
        lead = self.leader_seen
        return sorted(self.live(), key=lambda m: m is lead)

    def poll_down(self) -> None:
        """Every second: the node ids ListNodes shows DOWN."""
        while not self.stop_polls.wait(1.0):
            for m in self.followers_first():
                try:
                    ns = m.stub().ListNodes(control_pb2.ListNodesRequest(), timeout=10).nodes
                except grpc.RpcError:
                    continue
                self.down_seen.update(n.id for n in ns if n.status.state == types_pb2.NodeStatus.DOWN)
                break

    def owned(self) -> set[str]:
        """The ids of the managers' nodes and of the nodes the fleet's agents joined as."""
        ids = set(self.manager_ids.values())
        for sim in self.sims:
            ids.update(sim.joined["ids"] if sim.joined else ())
        return ids

    def in_session(self, sims: list[Sim] | None = None) -> int:
        return sum(s.status.get("in_session", 0) for s in (sims or self.sims))

    # ---- phases -----------------------------------------------------------------------------------
    def phase_join(self) -> bool:
        t0 = time.monotonic()
        for s in self.sims:
            s.send("go")
        if until(lambda: all(s.batch for s in self.sims), self.timeout, 0.1):
            b = [s.batch for s in self.sims if s.batch]
            ok = sum(x["ok"] for x in b)
            span = max(x["t1"] for x in b) - min(x["t0"] for x in b)
            self.res["joins_per_s"] = round(ok / span, 1) if span > 0 else None
            if ok < sum(x["n"] for x in b):
                self.error(f"{sum(x['n'] for x in b) - ok} of the first {sum(x['n'] for x in b)} joins failed")
        else:
            self.error("timeout: the first 500 joins")

        def ready() -> bool:
            ns = self.ctl().ListNodes(control_pb2.ListNodesRequest(
                filters=control_pb2.ListFilters(roles=[types_pb2.WORKER])), timeout=30).nodes
            r = sum(1 for n in ns if n.status.state == types_pb2.NodeStatus.READY)
            return r >= self.n and self.in_session() >= self.n

        if not until(ready, self.timeout - (time.monotonic() - t0), 0.5):
            self.error(f"timeout: all nodes READY and in session (in session {self.in_session()}/{self.n})")
            for s in self.sims:
                if s.joined and s.joined["errors"]:
                    self.error(f"join errors: {s.joined['errors'][:2]}")
            return False
        self.res["ready_s"] = r3(time.monotonic() - t0)
        return True

    def window(self, seconds: float, what: str) -> dict[str, Any] | None:
        """What the managers and the fleet spend over `seconds` (the idle window, the steady state):
        each manager's CPU (a fraction of one core) and RSS, the fleet processes' CPU, and the
        heartbeat round trips the agents timed (answered ones, and the count of failed ones)."""
        leader = self.leader()
        if leader is None:
            self.error(f"no leader found before the {what} window")
            return None
        for s in self.sims:
            s.send("rtt_reset")
        trees = {m.name: m.pids() for m in self.managers if m.alive()}
        sim_pids = [s.proc.pid for s in self.sims if s.alive()]
        c0 = {name: sum(cpu_ticks(p) for p in pids) for name, pids in trees.items()}
        s0, t0 = sum(cpu_ticks(p) for p in sim_pids), time.monotonic()
        time.sleep(seconds)
        dt = time.monotonic() - t0
        cpu = {name: (sum(cpu_ticks(p) for p in pids) - c0[name]) / TICK / dt for name, pids in trees.items()}
        rss = {m.name: sum(rss_mb(p) for p in m.pids()) for m in self.managers if m.alive()}
        samples: list[float] = []
        failed = 0
        for s in self.sims:
            if not s.alive():
                continue
            m = s.ask("rtt", "rtt")
            if m is None:
                self.error(f"fleet process {s.idx} gave no heartbeat samples")
            else:
                samples += m["samples"]
                failed += m.get("failed", 0)
        self.log(f"{what}: cpu {cpu} rss {rss} heartbeats {len(samples)}")
        return {"leader_cpu": round(cpu[leader.name], 3),
                "follower_cpu": round(max(v for k, v in cpu.items() if k != leader.name), 3),
                "manager_rss_mb": round(max(rss.values()), 1), "leader_rss_mb": round(rss[leader.name], 1),
                "sim_cpu": round((sum(cpu_ticks(p) for p in sim_pids) - s0) / TICK / dt, 3),
                "heartbeats": len(samples), "heartbeats_failed": failed,
                "heartbeat_p50_s": r3(pct(samples, 50)), "heartbeat_p99_s": r3(pct(samples, 99))}

    def phase_idle(self) -> None:
        w = self.window(self.idle, "idle")
        if w is None:
            return
        self.res.update(leader_cpu_idle=w["leader_cpu"], follower_cpu_idle=w["follower_cpu"],
                        manager_rss_mb=w["manager_rss_mb"], leader_rss_mb=w["leader_rss_mb"],
                        sim_cpu_idle=w["sim_cpu"], heartbeats_idle=w["heartbeats"],
                        heartbeats_failed_idle=w["heartbeats_failed"], heartbeat_p50_s=w["heartbeat_p50_s"],
                        heartbeat_p99_s=w["heartbeat_p99_s"])

    def phase_steady(self) -> None:
        """`--steady` s with every task running, before the failover: the nodes of the fleet seen
        DOWN meanwhile (`false_down_steady`; the issue's 10-minute steady state), and what the
        managers spend holding N nodes and their tasks."""
        before = set(self.down_seen)
        w = self.window(self.steady, "steady")
        self.res["steady_s"] = self.steady
        self.res["false_down_steady"] = len((self.down_seen - before) & self.owned())
        if w is not None:
            self.res.update(leader_cpu_steady=w["leader_cpu"], follower_cpu_steady=w["follower_cpu"],
                            manager_rss_steady_mb=w["manager_rss_mb"], heartbeat_p50_steady_s=w["heartbeat_p50_s"],
                            heartbeat_p99_steady_s=w["heartbeat_p99_s"], heartbeats_failed_steady=w["heartbeats_failed"])

    def service_tasks(self, m: Manager | None = None, running_only: bool = False) -> list[objects_pb2.Task]:
        f = control_pb2.ListFilters(service_ids=[self.service_id])
        if running_only:
            f.desired_states.append(types_pb2.RUNNING)
        stub = m.stub() if m is not None else self.ctl()
        return list(stub.ListTasks(control_pb2.ListTasksRequest(filters=f), timeout=60).tasks)

    def phase_service(self) -> None:
        leader = self.leader() or self.live()[0]
        total = self.n * self.tpn
        spec = specs_pb2.ServiceSpec()
        spec.annotations.name = "fleet"
        spec.replicated.replicas = total
        spec.task.container.image = "busybox"
        spec.task.container.args.extend(["sleep", "86400"])
        spec.task.placement.constraints.append("node.role==worker")
        lat: dict[str, list[float]] = {"node_ls": [], "task_ls": [], "service_inspect": []}
        done = threading.Event()

        def api_loop() -> None:
            stub = leader.stub()
            # `task ls` as `docker node ps NODE` asks it: one node's tasks that should run (the whole
            # service's tasks are what the convergence poll reads, every `every` s).
            node = next(n.id for n in stub.ListNodes(control_pb2.ListNodesRequest(), timeout=60).nodes
                        if n.role == types_pb2.WORKER)
            calls: list[tuple[str, Callable[[], Any]]] = [
                ("node_ls", lambda: stub.ListNodes(control_pb2.ListNodesRequest(), timeout=60)),
                ("task_ls", lambda: stub.ListTasks(control_pb2.ListTasksRequest(filters=control_pb2.ListFilters(
                    node_ids=[node], desired_states=[types_pb2.RUNNING])), timeout=60)),
                ("service_inspect", lambda: stub.GetService(control_pb2.GetServiceRequest(
                    service_id=self.service_id), timeout=60)),
            ]
            while not done.wait(API_PAUSE):
                for name, call in calls:
                    t = time.perf_counter()
                    try:
                        call()
                    except grpc.RpcError as e:
                        self.error(f"api {name}: {e.code().name}")
                        lat[name].append(60.0)
                        continue
                    lat[name].append(time.perf_counter() - t)

        t0 = time.monotonic()
        try:
            self.service_id = leader.stub().CreateService(control_pb2.CreateServiceRequest(spec=spec),
                                                           timeout=60).service.id
        except grpc.RpcError as e:
            self.error(f"service create refused: {e.code().name}: {e.details()}")
            return
        self.res["tasks"] = total
        api = threading.Thread(target=api_loop, daemon=True)
        api.start()
        every = 0.5 if self.n <= 200 else 1.0
        assigned_at: float | None = None
        try:
            def converged() -> bool:
                nonlocal assigned_at
                ts = [t for t in self.service_tasks(self.followers_first()[0])
                      if t.desired_state == types_pb2.RUNNING]
                if assigned_at is None and len(ts) >= total and all(
                        t.node_id and t.status.state >= types_pb2.ASSIGNED for t in ts):
                    assigned_at = time.monotonic()
                return sum(1 for t in ts if t.status.state == types_pb2.RUNNING) >= total

            ok = until(converged, self.timeout, every)
        finally:
            done.set()
            api.join(70)
        if assigned_at is not None:
            self.res["tasks_assigned_s"] = r3(assigned_at - t0)
        else:
            self.error("timeout: all tasks assigned")
        if ok:
            self.res["tasks_running_s"] = r3(time.monotonic() - t0)
        else:
            self.error("timeout: all tasks running")
        every_call = [x for v in lat.values() for x in v]
        self.res["api_p99_s"] = r3(pct(every_call, 99))
        for name, v in lat.items():
            self.res[f"api_{name}_p99_s"] = r3(pct(v, 99))
        self.res["api_calls"] = len(every_call)

    def phase_failover(self) -> None:
        leader = self.leader()
        if leader is None:
            self.error("no leader found before the failover")
            return
        before = {t.id for t in self.service_tasks(leader, running_only=True)} if self.service_id else set()
        self.log(f"killing the leader {leader.name}")
        t_kill = time.time()
        t0 = time.monotonic()
        self.killed_managers.add(leader.name)
        leader.kill()
        for s in self.sims:
            s.send(f"mark {t_kill}")
        survivors = self.live()
        write_at: list[float] = []

        def writes() -> None:
            i = 0
            while time.monotonic() - t0 < self.timeout:
                m = survivors[i % len(survivors)]
                i += 1
                try:
                    m.stub().CreateSecret(control_pb2.CreateSecretRequest(spec=specs_pb2.SecretSpec(
                        annotations=types_pb2.Annotations(name=f"failover-{i}"), data=b"x")), timeout=2)
                except grpc.RpcError:
                    time.sleep(0.05)
                    continue
                write_at.append(time.monotonic() - t0)
                return

        w = threading.Thread(target=writes, daemon=True)
        w.start()
        live_sims = [s for s in self.sims if s.alive()]
        want = sum(s.count for s in live_sims)
        back = until(lambda: sum(s.status.get("back", 0) for s in live_sims) >= want, self.timeout, 0.1)
        seen = time.monotonic() - t0
        firsts: list[float] = []
        for s in live_sims:
            m = s.ask(f"since {t_kill}", "since")
            if m:
                firsts += [x - t_kill for x in m["first"] if x is not None]
        if back:  # the agents' own times (the status lines lag up to 0.2 s)
            self.res["failover_sessions_s"] = r3(max(firsts) if len(firsts) >= want else seen)
        else:
            self.error(f"timeout: every agent back in session after the failover "
                       f"({sum(s.status.get('back', 0) for s in live_sims)}/{want})")
        self.res["failover_sessions_p50_s"] = r3(pct(firsts, 50))
        self.res["failover_sessions_p99_s"] = r3(pct(firsts, 99))
        w.join(max(0.0, self.timeout - (time.monotonic() - t0)))
        if write_at:
            self.res["failover_write_s"] = r3(write_at[0])
        else:
            self.error("timeout: a write accepted after the leader's death")
        if self.service_id:
            time.sleep(max(0.0, 30 - (time.monotonic() - t0)))
            try:
                after = self.service_tasks()
                self.res["rescheduled_on_failover"] = sum(
                    1 for t in after if (t.id not in before and t.desired_state == types_pb2.RUNNING)
                    or (t.id in before and t.desired_state != types_pb2.RUNNING))
            except grpc.RpcError as e:
                self.error(f"task ls after the failover: {e.code().name}")
        new, store = self.leader(), self.store_leader()
        self.log(f"failover: control loops on {new.name if new else None}, store leader "
                 f"{store.name if store else None}")

    def phase_kill_nodes(self) -> None:
        victim = self.sims[-1]
        ids = set(victim.joined["ids"]) if victim.joined else set()
        if not ids:
            self.error("the 1 % fleet process has no joined nodes")
            return
        self.killed = ids
        self.res["killed_nodes"] = len(ids)
        t0 = time.monotonic()
        victim.kill()
        total = self.n * self.tpn

        def all_down() -> bool:
            ns = self.ctl().ListNodes(control_pb2.ListNodesRequest(), timeout=30).nodes
            return all(n.status.state == types_pb2.NodeStatus.DOWN for n in ns if n.id in ids)

        if until(all_down, self.timeout, 0.1):
            self.res["down_s"] = r3(time.monotonic() - t0)
        else:
            self.error("timeout: the killed nodes DOWN")
        if not self.service_id:
            return

        def moved() -> bool:
            ts = self.service_tasks(running_only=True)
            return sum(1 for t in ts if t.status.state == types_pb2.RUNNING and t.node_id not in ids) >= total

        if until(moved, self.timeout, 0.5 if self.n <= 1000 else 1.0):
            self.res["down_moved_s"] = r3(time.monotonic() - t0)
        else:
            self.error("timeout: the killed nodes' tasks running elsewhere")

    def run(self) -> dict[str, Any]:
        self.killed: set[str] = set()
        self.killed_managers: set[str] = set()
        self.leader_seen: Manager | None = None
        poller: threading.Thread | None = None
        leader_log = ""
        try:
            token = self.start_managers()
            self.leader()
            self.log("managers up")
            if self.ingress_subnet:
                self.replace_ingress(self.ingress_subnet)
                self.log(f"ingress network on {self.ingress_subnet}")
            self.start_sims(token)
            poller = threading.Thread(target=self.poll_down, daemon=True)
            poller.start()
            joined = self.phase_join()
            self.log(f"{self.n} nodes ready in {self.res['ready_s']} s, {self.res['joins_per_s']} joins/s")
            self.phase_idle()  # also when the fleet did not converge: what the managers spend then
            if not joined:
                self.error("skipped the service, failover and node-kill phases: the fleet never converged")
            else:
                self.phase_service()
                self.log(f"service: running in {self.res['tasks_running_s']} s")
                if self.steady > 0 and self.res["tasks_running_s"] is not None:
                    self.phase_steady()
                self.phase_failover()
                self.phase_kill_nodes()
        except Exception as e:  # noqa: BLE001 - recorded; the step reports what it got
            self.error(f"{type(e).__name__}: {e}")
        finally:
            self.stop_polls.set()
            if poller is not None:
                poller.join(15)
            if self.res["errors"]:
                lead = self.leader()
                leader_log = (lead or self.managers[0]).tail()
            for s in self.sims:
                s.stop()
            for m in self.managers:
                m.kill()
        ignore = self.killed | {self.manager_ids.get(name, "") for name in self.killed_managers}
        # Nodes no agent of the fleet owns: joins whose answer was lost after the store took them (the
        # sim joined again under a new id); the leader marks them DOWN for never opening a session.
        owned = self.owned()
        self.res["orphan_nodes"] = len(self.down_seen - ignore - owned)
        self.res["false_down"] = len((self.down_seen - ignore) & owned)
        if leader_log:
            print(f"--- the leader's log, last lines:\n{leader_log}", file=sys.stderr)
        if not self.res["errors"]:
            self.res["errors"] = None
        return self.res


def one_step(nodes: int, idle: float, tpn: int, ingress_subnet: str = "", keep_logs: str = "", first: int = 500,
             conc: int = 32, steady: float = 0.0) -> dict[str, Any]:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = max(65536, soft)
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, max(want, hard)))
    base = Path(tempfile.mkdtemp(prefix="fl", dir="/var/tmp"))
    print(f"fleet: state under {base}", file=sys.stderr, flush=True)
    if nodes <= 250:  # the default /24 holds them
        ingress_subnet = ""
    try:  # a SIGTERM is a Ctrl-C (see main): the finally below ends what the step started
        return Step(nodes, idle, tpn, base, ingress_subnet, first, conc, steady).run()
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not cut the cleanup short
        kill_pids(started_under(base))
        if keep_logs:
            dest = Path(keep_logs) / f"fleet-{nodes}-{time.strftime('%Y%m%d-%H%M%S')}"
            dest.mkdir(parents=True, exist_ok=True)
            for f in base.glob("*.log"):
                shutil.copy(f, dest / f.name)
            print(f"fleet: logs kept in {dest}", file=sys.stderr, flush=True)
        unmount_under(base)
        shutil.rmtree(base, ignore_errors=True)


def unmount_under(base: Path) -> None:
    with open("/proc/self/mountinfo") as f:
        mps = [ln.split()[4] for ln in f if ln.split()[4].startswith(str(base))]
    for mp in sorted(mps, reverse=True):
        subprocess.run(["umount", "-l", mp], check=False, capture_output=True)


# ---- the curve ------------------------------------------------------------------------------------
def held(r: dict[str, Any]) -> bool:
    return not r.get("errors") and r.get("false_down") == 0


def slope(xs: list[float], ys: list[float]) -> float | None:
    pts = [(x, y) for x, y in zip(xs, ys, strict=True) if y is not None]
    if len(pts) < 2:
        return None
    mx = statistics.fmean(x for x, _ in pts)
    my = statistics.fmean(y for _, y in pts)
    den = sum((x - mx) ** 2 for x, _ in pts)
    return sum((x - mx) * (y - my) for x, y in pts) / den if den else None


def steps_iter(steps: list[int], idle: float, tpn: int, extra: list[str]) -> Iterator[dict[str, Any]]:
    for n in steps:
        with subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--nodes", str(n), "--idle", str(idle),
                               "--tasks-per-node", str(tpn), *extra], stdout=subprocess.PIPE, text=True) as p:
            try:
                out, _ = p.communicate()
            except BaseException:  # Ctrl-C: the step ends what it started (SIGTERM), not killed under it
                p.terminate()
                p.wait()
                raise
        sys.stdout.write(out)
        got = None
        for line in out.splitlines():
            if line.startswith('{"bench": "fleet", '):
                got = json.loads(line)["results"]
        yield got if got is not None else {**{k: None for k in KEYS}, "nodes": n,
                                           "errors": [f"the step exited {p.returncode} without a result"]}


def curve(steps: list[int], idle: float, tpn: int, extra: list[str]) -> None:
    rows: list[dict[str, Any]] = []
    for r in steps_iter(steps, idle, tpn, extra):
        rows.append(r)
        if r.get("errors"):
            break
    ns = [float(r["nodes"]) for r in rows]
    fit = {
        "cpu_per_node": slope(ns, [r.get("leader_cpu_idle") for r in rows]),
        "rss_mb_per_node": slope(ns, [r.get("manager_rss_mb") for r in rows]),
    }
    largest = max((r["nodes"] for r in rows if held(r)), default=None)
    import platform

    print(f"\nfleet curve, 3 managers + simulated nodes on loopback, {platform.node()}, {os.cpu_count()} cores, "
          f"{time.strftime('%Y-%m-%d')}")
    width = max(len(k) for k in KEYS) + 2
    print(f"{'':<{width}}" + "".join(f"{r['nodes']:>12}" for r in rows))
    for k in KEYS:
        if k in ("nodes", "errors"):
            continue
        print(f"{k:<{width}}" + "".join(f"{r.get(k)!s:>12}" for r in rows))
    print(f"{'held':<{width}}" + "".join(f"{'yes' if held(r) else 'no':>12}" for r in rows))
    for r in rows:
        if r.get("errors"):
            print(f"errors at N={r['nodes']}: {r['errors']}")
    print(f"cpu_per_node {fit['cpu_per_node']}  rss_mb_per_node {fit['rss_mb_per_node']}  largest_n_held {largest}")
    print(json.dumps({"bench": "fleet_curve", "results": {
        "steps": rows, "cpu_per_node": fit["cpu_per_node"], "rss_mb_per_node": fit["rss_mb_per_node"],
        "largest_n_held": largest}}))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--nodes", type=int, help="one step of N nodes")
    ap.add_argument("--steps", default=",".join(map(str, STEPS)), help="without --nodes: the steps")
    ap.add_argument("--idle", type=float, default=30.0, help="seconds of the idle window")
    ap.add_argument("--tasks-per-node", type=int, default=10)
    ap.add_argument("--steady", type=float, default=0.0,
                    help="seconds of steady state with every task running, after the convergence (0: none)")
    ap.add_argument("--ingress-subnet", default="198.19.0.0/17",
                    help="past 250 nodes, replace the default ingress network (a /24: 254 node addresses) by "
                         "one on this subnet before the nodes join ('' never)")
    ap.add_argument("--first", type=int, default=500, help="nodes that join all at once (joins_per_s)")
    ap.add_argument("--join-conc", type=int, default=32, help="joins at a time per fleet process after those")
    ap.add_argument("--keep-logs", default="", metavar="DIR", help="copy the managers' and fleet logs to DIR")
    a = ap.parse_args()

    def stop(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    # as Ctrl-C: a step ends what it started, the curve stops its step (which does the same)
    signal.signal(signal.SIGTERM, stop)
    if a.nodes is None:
        extra = [*(["--ingress-subnet", a.ingress_subnet] if a.ingress_subnet else []),
                 "--first", str(a.first), "--join-conc", str(a.join_conc), "--steady", str(a.steady),
                 *(["--keep-logs", a.keep_logs] if a.keep_logs else [])]
        curve([int(x) for x in a.steps.split(",") if x], a.idle, a.tasks_per_node, extra)
        return 0
    if a.nodes < 2:
        ap.error("--nodes must be at least 2")
    res = one_step(a.nodes, a.idle, a.tasks_per_node, a.ingress_subnet, a.keep_logs, a.first, a.join_conc, a.steady)
    res["first_joins"], res["join_conc"] = min(a.first, a.nodes), a.join_conc
    ingress = f", ingress {a.ingress_subnet}" if a.ingress_subnet else ""
    report("fleet", f"fleet of {a.nodes} simulated nodes on 3 managers, loopback{ingress}", res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
