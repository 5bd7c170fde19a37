"""Helpers for the agent's cluster tests: swarmd processes on loopback, swarmctl processes."""

from __future__ import annotations

import asyncio
import functools
import re
import shutil
import signal
import subprocess
import sys
from datetime import datetime
from pathlib import Path

from helpers.swarmd import Swarmd, remove_containers, remove_task_netns, unmount_under
from helpers.waiting import wait_for

SWARMCTL = [sys.executable, "-m", "shoal.cli.swarmctl"]


class Node(Swarmd):
    """A swarmd whose etcd peer address, when it needs one, comes in the start arguments."""

    def __init__(self, base: Path, name: str) -> None:
        super().__init__(base, name, peer=False)

    def start(self, *extra: str) -> None:  # type: ignore[override]
        self.dir.mkdir(exist_ok=True)
        super().start(extra)

    def stop(self, sig: int = signal.SIGTERM) -> None:  # type: ignore[override]
        super().stop(sig, timeout=20)


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


def cleanup_cluster(base: Path, nodes) -> None:  # type: ignore[no-untyped-def]
    """Stop every swarmd (by PID), remove every container, unmount leftovers, delete the dir."""
    for n in reversed(list(nodes)):
        n.stop()
    for n in nodes:
        remove_containers(n.dir / "engine")
    remove_task_netns(nodes)
    unmount_under(base)
    shutil.rmtree(base, ignore_errors=True)


def dump_logs(base: Path, nodes, lines: int = 30) -> None:  # type: ignore[no-untyped-def]
    for n in nodes:
        log = base / f"{n.name}.log"
        if log.exists():
            sys.stderr.write(
                f"---- {n.name} log tail\n" + "\n".join(log.read_text().splitlines()[-lines:]) + "\n"
            )
