"""A 1-manager + 2-worker cluster on loopback: real swarmd processes (Raft, mTLS, CA join), real
swarmctl processes, a real registry, real runc containers. A 6-replica busybox service spreads 2/2/2;
a worker killed with SIGKILL goes DOWN and its tasks run elsewhere; restarted, its agent re-adopts
its containers and stops them (their tasks were replaced). Needs root."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import pytest
from agent_helpers import PREFIX

from shoal.lab.registry import free_port

pytestmark = pytest.mark.integration
HERE = Path(__file__).resolve().parent
SWARMCTL = [sys.executable, "-m", "shoal.cli.swarmctl"]


class Node:
    def __init__(self, base: Path, name: str) -> None:
        self.name = name
        self.dir = base / name
        self.api = f"127.0.0.1:{free_port()}"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, *extra: str) -> None:
        self.dir.mkdir(exist_ok=True)
        log = open(self.dir.parent / f"{self.name}.log", "ab")
        argv = [
            sys.executable,
            str(HERE / "run_swarmd.py"),
            "-d",
            str(self.dir),
            "--listen-remote-api",
            self.api,
            "--hostname",
            self.name,
            *extra,
        ]
        self.proc = subprocess.Popen(
            argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True
        )
        log.close()

    def stop(self, sig: int = signal.SIGTERM) -> None:
        p, self.proc = self.proc, None
        if p is None or p.poll() is not None:
            return
        p.send_signal(sig)
        try:
            p.wait(20)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def ctl(sock: Path, *args: str, check: bool = True, timeout: float = 120) -> str:
    r = subprocess.run(
        [*SWARMCTL, "--socket", str(sock), *args], capture_output=True, text=True, timeout=timeout
    )
    if check and r.returncode != 0:
        raise AssertionError(f"swarmctl {' '.join(args)} failed ({r.returncode}): {r.stderr.strip()}")
    return r.stdout


def wait_until(pred, timeout: float = 60, what: str = "condition"):
    end = time.monotonic() + timeout
    while True:
        v = pred()
        if v:
            return v
        if time.monotonic() > end:
            raise AssertionError(f"{what} not reached within {timeout} s")
        time.sleep(0.2)


def running_containers(node: Node) -> list[str]:
    from shoal.agent.engine import Engine

    async def main() -> list[str]:
        e = Engine(node.dir / "engine")
        try:
            return sorted(c.id for c in await e.list() if c.status == "running")
        finally:
            await e.close()

    return asyncio.run(main())


def cleanup_engine(root: Path) -> None:
    from shoal.agent.engine import Engine

    async def main() -> None:
        e = Engine(root)
        for c in await e.list():
            with contextlib.suppress(Exception):
                await e.remove(c.id)
        await e.close()

    if (root / "containers").is_dir():
        asyncio.run(main())


def test_one_manager_two_workers_run_six_replicas_spread_two_each(registry) -> None:
    base = Path(tempfile.mkdtemp(prefix=f"sh{PREFIX}c-", dir="/var/tmp"))
    m1, w1, w2 = (Node(base, n) for n in ("m1", "w1", "w2"))
    nodes = (m1, w1, w2)
    sock = m1.dir / "swarmd.sock"
    try:
        m1.start("--listen-raft", f"127.0.0.1:{free_port()}")
        token = wait_until(
            lambda: sock.exists() and ctl(sock, "swarm", "join-token", "worker", "-q", check=False).strip(),
            what="manager up",
        )
        for w in (w1, w2):
            w.start("--join-addr", m1.api, "--join-token", token)

        def by_name() -> dict[str, dict]:
            return {
                n["description"]["hostname"]: n
                for n in json.loads(ctl(sock, "node", "ls", "--format", "json"))
            }

        def all_ready() -> bool:
            ns = by_name()
            return len(ns) == 3 and all(n.get("status", {}).get("state") == "READY" for n in ns.values())

        wait_until(all_ready, what="3 nodes READY")
        ids = {name: n["id"] for name, n in by_name().items()}
        desc = by_name()["w1"]["description"]
        assert desc["platform"]["os"] == "linux" and int(desc["resources"]["nano_cpus"]) > 0
        assert desc["engine"]["engine_version"]

        image = f"{registry.host}/library/busybox:latest"
        ctl(
            sock,
            "service",
            "create",
            "--name",
            "web",
            "--replicas",
            "6",
            "--stop-grace-period",
            "1s",
            image,
            "sleep",
            "600",
        )

        def tasks(state: str = "RUNNING") -> list[dict]:
            ts = json.loads(ctl(sock, "service", "ps", "web", "--format", "json"))
            return [
                t
                for t in ts
                if t.get("status", {}).get("state") == state and t.get("desired_state", "NEW") == "RUNNING"
            ]

        running = wait_until(lambda: len(tasks()) == 6 and tasks(), what="6 tasks RUNNING")
        spread = Counter(t["node_id"] for t in running)
        assert sorted(spread.values()) == [2, 2, 2], spread
        assert set(spread) == set(ids.values())
        for n in nodes:  # each node's engine runs exactly its two tasks
            assert running_containers(n) == sorted(t["id"] for t in running if t["node_id"] == ids[n.name])

        # SIGKILL a worker: DOWN, and its tasks run on the two others.
        lost = sorted(running_containers(w2))
        w2.stop(signal.SIGKILL)
        wait_until(lambda: by_name()["w2"]["status"]["state"] == "DOWN", what="w2 DOWN")
        moved = wait_until(
            lambda: len(tasks()) == 6 and all(t["node_id"] != ids["w2"] for t in tasks()) and tasks(),
            what="tasks rescheduled",
        )
        assert sorted(Counter(t["node_id"] for t in moved).values()) == [3, 3]
        assert running_containers(w2) == lost  # the containers outlived their agent

        # Restarted, w2's agent re-adopts them and stops them: their tasks were replaced.
        w2.start()
        wait_until(lambda: by_name()["w2"]["status"]["state"] == "READY", what="w2 READY again")
        wait_until(lambda: running_containers(w2) == [], what="replaced containers stopped on w2")
        assert len(tasks()) == 6

        ctl(sock, "service", "rm", "web")
        for n in nodes:
            wait_until(
                lambda n=n: (
                    not (n.dir / "engine" / "containers").exists()
                    or not any((n.dir / "engine" / "containers").iterdir())
                ),
                what=f"containers removed on {n.name}",
            )
    except BaseException:
        for n in nodes:
            log = base / f"{n.name}.log"
            if log.exists():
                sys.stderr.write(
                    f"---- {n.name} log tail\n" + "\n".join(log.read_text().splitlines()[-30:]) + "\n"
                )
        raise
    finally:
        for n in (w2, w1, m1):
            n.stop()
        for n in nodes:
            cleanup_engine(n.dir / "engine")
        with open("/proc/self/mountinfo") as f:
            mps = [ln.split()[4] for ln in f if ln.split()[4].startswith(str(base))]
        for mp in sorted(mps, reverse=True):
            os.system(f"umount -l {mp!r} 2>/dev/null")
        shutil.rmtree(base, ignore_errors=True)
