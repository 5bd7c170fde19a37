"""Helpers for the agent's cluster tests: swarmd processes on loopback, swarmctl processes."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import os
import re
import shutil
import signal
import subprocess
import sys
from datetime import datetime
from pathlib import Path

from helpers.waiting import wait_for

from shoal.lab.registry import free_port

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
            "-m",
            "shoal.node.swarmd",
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


wait_until = functools.partial(wait_for, timeout=60, interval=0.2)


def running_pids(node: Node) -> dict[str, int]:
    """Container id -> pid of the node's running containers (read from its engine root)."""
    from shoal.agent.engine import Engine

    async def main() -> dict[str, int]:
        e = Engine(node.dir / "engine")
        try:
            return {c.id: c.pid for c in await e.list() if c.status == "running"}
        finally:
            await e.close()

    return asyncio.run(main())


def running_containers(node: Node) -> list[str]:
    return sorted(running_pids(node))


def sessions(log: Path) -> list[tuple[datetime, str]]:
    """(time, manager address) of every session the node's agent opened, from its swarmd log."""
    out = []
    for line in log.read_text(errors="replace").splitlines():
        m = re.match(r"(\S+ \S+) .*shoal\.agent: session opened .* manager=(\S+)", line)
        if m:
            out.append((datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f"), m.group(2)))
    return out


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


def cleanup_cluster(base: Path, nodes) -> None:  # type: ignore[no-untyped-def]
    """Stop every swarmd (by PID), remove every container, unmount leftovers, delete the dir."""
    for n in reversed(list(nodes)):
        n.stop()
    for n in nodes:
        cleanup_engine(n.dir / "engine")
    ids = []
    for n in nodes:
        with contextlib.suppress(OSError, ValueError, KeyError):
            ids.append(json.loads((n.dir / "node.json").read_text())["node_id"])
    from pyroute2 import netns

    for name in task_netns(ids):  # left by a swarmd that did not get to release them
        with contextlib.suppress(OSError):
            netns.remove(name)
    with open("/proc/self/mountinfo") as f:
        mps = [ln.split()[4] for ln in f if ln.split()[4].startswith(str(base))]
    for mp in sorted(mps, reverse=True):
        os.system(f"umount -l {mp!r} 2>/dev/null")
    shutil.rmtree(base, ignore_errors=True)


def dump_logs(base: Path, nodes, lines: int = 30) -> None:  # type: ignore[no-untyped-def]
    for n in nodes:
        log = base / f"{n.name}.log"
        if log.exists():
            sys.stderr.write(
                f"---- {n.name} log tail\n" + "\n".join(log.read_text().splitlines()[-lines:]) + "\n"
            )


def task_netns(node_ids) -> list[str]:  # type: ignore[no-untyped-def]
    """The task network namespaces the nodes' networking made (named n<node id[:6]>-c<task id[:12]>)."""
    prefixes = tuple(f"n{nid[:6]}-c" for nid in node_ids)
    try:
        return sorted(n for n in os.listdir("/run/netns") if n.startswith(prefixes))
    except FileNotFoundError:
        return []
