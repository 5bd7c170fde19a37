"""A worker's swarmd restarted under its running tasks: how soon it is back in session, and how many
of its containers had to start again (goal 0). Real swarmd processes on loopback (1 manager + 1
worker), a local registry, 4 busybox replicas on the worker, the default 1 s heartbeat. As root.

    .venv/bin/python bench/restart.py [--runs 5] [--away 5]

Each run, in turn: `kill -9` then an immediate start (a crash under systemd's Restart=always), and
SIGTERM then a start `--away` seconds later (an upgrade). Measured from the signal (kill -9) or from
the start (SIGTERM): until the agent's `session opened` log line. Counted over all runs: containers
whose process changed, tasks replaced, and `node down` lines of the manager. Prints a table and one
JSON line; never fails on a figure.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

import grpc
from polling import until
from report import report

from shoal.lab.images import busybox_image
from shoal.lab.registry import Registry, free_port, push_image
from shoal.proto import control_pb2, control_pb2_grpc, types_pb2

SWARMCTL = [sys.executable, "-m", "shoal.cli.swarmctl"]
SESSION = re.compile(r"^(\S+ \S+) .*shoal\.agent: session opened", re.M)
RESTORED = re.compile(r"^(\S+ \S+) .*network agent started .* restored=(\d+)", re.M)


class Daemon:
    def __init__(self, base: Path, name: str, ip: str, extra: list[str]) -> None:
        self.dir, self.log = base / name, base / f"{name}.log"
        self.api = f"{ip}:{free_port(ip)}"
        self.argv = [sys.executable, "-m", "shoal.node.swarmd", "-d", str(self.dir), "--listen-remote-api", self.api,
                     "--listen-peer", f"{ip}:{free_port(ip)}", "--hostname", name, *extra]
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, extra: list[str] | None = None) -> None:
        with open(self.log, "ab") as f:
            self.proc = subprocess.Popen([*self.argv, *(extra or [])], stdout=f, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True)

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)
        self.proc.wait(30)

    def sessions(self) -> list[datetime]:
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        return [datetime.strptime(m, "%Y-%m-%d %H:%M:%S,%f") for m in SESSION.findall(text)]


def wait(pred, what: str, timeout: float = 60):
    got = until(pred, timeout, 0.05)
    if not got:
        raise SystemExit(f"timed out waiting for {what}")
    return got


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--away", type=float, default=5.0)
    ap.add_argument("--lab", action="store_true", help="a worker with overlay networks, on a namespace lab")
    a = ap.parse_args()
    if a.lab:
        return lab_main(a.runs, a.away)
    base = Path(tempfile.mkdtemp(prefix="rs", dir="/var/tmp"))
    reg = Registry("127.0.0.1")
    reg.start()
    m1 = Daemon(base, "m1", "127.0.0.1", ["--insecure-registry", reg.host])
    w1: Daemon | None = None
    res: dict[str, object] = {}
    try:
        push_image(reg.url, "library/busybox", "latest", busybox_image())
        m1.start()
        sock = m1.dir / "swarmd.sock"
        c = control_pb2_grpc.ControlStub(grpc.insecure_channel(f"unix://{sock}"))
        cl = wait(lambda: sock.exists() and c.GetCluster(control_pb2.GetClusterRequest(), timeout=5).cluster, "m1")
        w1 = Daemon(base, "w1", "127.0.0.2", ["--insecure-registry", reg.host, "--join-addr", m1.api,
                                               "--join-token", cl.root_ca.join_tokens.worker])
        w1.start()
        wait(lambda: w1.sessions(), "w1's session")
        subprocess.run([*SWARMCTL, "--socket", str(sock), "service", "create", "--name", "r", "--replicas", "4",
                        "--constraint", "node.role==worker", f"{reg.host}/library/busybox:latest", "sleep", "3600"],
                       check=True, capture_output=True, timeout=120)

        def running() -> dict[str, int]:
            """Running task id -> the pid of its container process, as the worker's engine records it."""
            ts = c.ListTasks(control_pb2.ListTasksRequest(), timeout=5).tasks
            ids = {t.id for t in ts if t.desired_state == types_pb2.RUNNING and t.status.state == types_pb2.RUNNING}
            pids = _container_pids(base / "w1" / "engine")
            return {tid: pids.get(tid, 0) for tid in ids}

        before = wait(lambda: len(r := running()) == 4 and all(r.values()) and r, "4 tasks running")
        crash, graceful = [], []
        for _ in range(a.runs):
            n = len(w1.sessions())
            t0 = datetime.now()
            w1.signal(signal.SIGKILL)
            w1.start()
            got = wait(lambda n=n: len(s := w1.sessions()) > n and s, "session after kill -9")
            crash.append((got[-1] - t0).total_seconds())
            wait(lambda: running() == before, "the same tasks after kill -9", 30)
            time.sleep(1)
            n = len(w1.sessions())
            w1.signal(signal.SIGTERM)
            time.sleep(a.away)
            t0 = datetime.now()
            w1.start()
            got = wait(lambda n=n: len(s := w1.sessions()) > n and s, "session after SIGTERM")
            graceful.append((got[-1] - t0).total_seconds())
            wait(lambda: running() == before, "the same tasks after SIGTERM", 30)
            time.sleep(1)
        after = running()
        res = {
            "kill9_to_session_p50_s": round(statistics.median(crash), 3), "kill9_to_session_max_s": round(max(crash), 3),
            "start_to_session_p50_s": round(statistics.median(graceful), 3),
            "start_to_session_max_s": round(max(graceful), 3),
            "containers_restarted": sum(1 for tid, pid in before.items() if after.get(tid) != pid),
            "tasks_replaced": len(set(before) ^ set(after)),
            "node_down_lines": m1.log.read_text(errors="replace").count("node down node="),
            "runs": a.runs, "away_s": a.away,
        }
    finally:
        for d in (w1, m1):
            if d is not None and d.proc is not None and d.proc.poll() is None:
                d.signal(signal.SIGKILL)
        time.sleep(3)  # the killed manager's etcd member stops by itself (PDEATHSIG)
        reg.stop()
        _remove_containers(base / "w1" / "engine")
        _remove_task_netns(base / "w1")
        with open("/proc/self/mountinfo") as f:  # what the killed worker left mounted
            mounts = sorted((ln.split()[4] for ln in f if ln.split()[4].startswith(str(base))), reverse=True)
        for mp in mounts:
            subprocess.run(["umount", "-l", mp], check=False, capture_output=True)
        shutil.rmtree(base, ignore_errors=True)
    report("restart", "swarmd restarts under 4 running tasks, 1+1 nodes on loopback", res)
    return 0


def _log_times(path: Path, pattern: re.Pattern[str], after: datetime) -> list[datetime]:
    text = path.read_text(errors="replace")
    times = [datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f") for m in pattern.finditer(text)]
    return [t for t in times if t >= after]


def lab_main(runs: int, away: float) -> int:
    """--lab: a 1+2 namespace lab; a service on an overlay network, a replica on each worker. Each run,
    h3's swarmd gets SIGTERM, stays away `away` s and is started again; then kill -9 and a start at
    once. Measured from the start: the restored networking (`network agent started ... restored=N`,
    from which its tasks' names and VIPs answer, before any session) and the session."""
    from shoal.lab.lab import Lab, _alive

    lab = Lab("rst", progress=lambda m: print(f"  {m}", file=sys.stderr))
    res: dict[str, object] = {}
    try:
        st = lab.up(1, 2)
        sock = str(st.hosts[0].socket)
        c = control_pb2_grpc.ControlStub(grpc.insecure_channel(f"unix://{sock}"))
        for args in (["network", "create", "-d", "overlay", "rnet"],
                     ["service", "create", "--name", "r", "--replicas", "2", "--network", "rnet",
                      "--constraint", "node.role==worker", "--replicas-max-per-node", "1",
                      "busybox", "httpd", "-f", "-p", "80"]):
            subprocess.run([*SWARMCTL, "--socket", sock, *args], check=True, capture_output=True, timeout=120)

        def running() -> dict[str, int]:
            ts = c.ListTasks(control_pb2.ListTasksRequest(), timeout=5).tasks
            return {t.id: t.status.container.pid for t in ts
                    if t.desired_state == types_pb2.RUNNING and t.status.state == types_pb2.RUNNING}

        before = wait(lambda: len(r := running()) == 2 and r, "2 tasks running")
        log = Path(st.host("h3").state_dir) / "swarmd.log"
        served: dict[str, list[float]] = {"sigterm": [], "kill9": []}
        session: dict[str, list[float]] = {"sigterm": [], "kill9": []}
        for _ in range(runs):
            for how in ("sigterm", "kill9"):
                pid = lab.state().host("h3").swarmd_pid
                if how == "sigterm":
                    os.kill(pid, signal.SIGTERM)
                    wait(lambda pid=pid: not _alive(pid), "swarmd to exit after SIGTERM")
                    time.sleep(away)
                else:
                    lab.kill("h3")
                t0 = datetime.now()
                lab.start("h3", wait=False)
                got = wait(lambda t0=t0: _log_times(log, RESTORED, t0), "networking restored")
                served[how].append((got[0] - t0).total_seconds())
                got = wait(lambda t0=t0: _log_times(log, SESSION, t0), "session")
                session[how].append((got[0] - t0).total_seconds())
                wait(lambda: running() == before, f"the same tasks after {how}", 30)
                time.sleep(1)
        after = running()
        for how in ("sigterm", "kill9"):
            res[f"{how}_start_to_served_p50_s"] = round(statistics.median(served[how]), 3)
            res[f"{how}_start_to_session_p50_s"] = round(statistics.median(session[how]), 3)
        res.update({
            "containers_restarted": sum(1 for tid, pid in before.items() if after.get(tid) != pid),
            "tasks_replaced": len(set(before) ^ set(after)),
            "node_down_lines": (Path(st.hosts[0].state_dir) / "swarmd.log").read_text(errors="replace")
            .count("node down node="),
            "runs": runs, "away_s": away,
        })
    finally:
        lab.down()
    report("restart-lab", "swarmd restarts of a worker with an overlay network, 1+2 namespace lab", res)
    return 0


def _container_pids(root: Path) -> dict[str, int]:
    """Task id -> pid of each running container of the engine at `root` (container ids are task ids)."""
    import asyncio

    from shoal.agent.engine import Engine

    async def ls() -> dict[str, int]:
        e = Engine(root)
        try:
            return {ct.id: ct.pid for ct in await e.list() if ct.status == "running"}
        finally:
            await e.close()

    return asyncio.run(ls())


def _remove_task_netns(state_dir: Path) -> None:
    """The network namespaces of the killed worker's tasks (`n<node id[:6]>-c<task id[:12]>`)."""
    try:
        node_id = json.loads((state_dir / "node.json").read_text())["node_id"]
    except (OSError, ValueError, KeyError):
        return
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    for name in (ln.split()[0] for ln in out.splitlines() if ln.strip()):
        if name.startswith(f"n{node_id[:6]}-c"):
            subprocess.run(["ip", "netns", "delete", name], check=False, capture_output=True)


def _remove_containers(root: Path) -> None:
    """The containers conmon kept running after the worker was killed: ours, by the engine's record."""
    if not (root / "containers").is_dir():
        return
    import asyncio

    from shoal.agent.engine import Engine

    async def rm() -> None:
        e = Engine(root)
        try:
            for ct in await e.list():
                await e.remove(ct.id)
        finally:
            await e.close()

    asyncio.run(rm())


if __name__ == "__main__":
    sys.exit(main())
