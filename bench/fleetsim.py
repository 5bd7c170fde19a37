"""Simulated fleet nodes for bench/fleet.py: one process, one asyncio loop, many real agents.

Each node joins through the cluster CA (`shoal.manager.ca.join_cluster`: its own key and certificate),
then runs the project's own `shoal.agent.agent.Agent` over mutual TLS to the managers, with an
in-memory engine (`MemEngine`: no image pull, containers "run" at once and until stopped), as
`swarmctl lab up --simulated` runs them (`shoal.node.simnodes`). Only two
things are added to the agent, without changing it: an event that remembers when the agent came into
session (`connected` set on its first assignments message) and its `on_heartbeat` hook, which times
the heartbeats.

    python bench/fleetsim.py --managers A,B,C --token T --count K --prefix s0 [--first F] [--step-dir D]

Protocol (JSON lines): it prints {"type": "ready"} and waits for "go" on stdin; then joins F nodes at
once (reported as {"type": "batch", t0, t1, n, ok}) and the rest with --conc joins at a time, each
node's agent starting as soon as it joined; {"type": "joined", ids, failed, errors} when all tried.
Every 0.2 s {"type": "status", n, joined, in_session, back} (back: in session again since the last
"mark T"). Commands on stdin: "mark T" (wall-clock time T), "rtt_reset", "rtt" (answers
{"type": "rtt", samples, failed}: heartbeats answered, their round trips, and the failed ones), "since T" (answers {"type": "since", first}: per agent, the first time it
came into session at or after T, or null).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import sys
import threading
import time
from collections.abc import Sequence
from typing import Any

from shoal.agent.agent import Agent
from shoal.node.simnodes import join_simulated


class TimedEvent(asyncio.Event):
    """`Agent.connected`, remembering the wall-clock times it was set (the agent came into session)."""

    def __init__(self) -> None:
        super().__init__()
        self.times: list[float] = []

    def set(self) -> None:
        if not self.is_set():
            self.times.append(time.time())
        super().set()


class SimAgent(Agent):
    """The real agent (its own channels: keepalive and all); the round trips of its answered heartbeats
    go to `samples`, its failed ones (unanswered in time, unavailable...) are counted in `failed[0]`."""

    def __init__(self, *args: Any, samples: list[float], failed: list[int], **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.connected = TimedEvent()

        def timed(rtt: float | None) -> None:
            if rtt is None:
                failed[0] += 1
            else:
                samples.append(rtt)

        self.on_heartbeat = timed


def emit(msg: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(msg, separators=(",", ":")) + "\n")
    sys.stdout.flush()


class Fleet:
    def __init__(self, managers: Sequence[str], token: str, prefix: str) -> None:
        self.managers = list(managers)
        self.token = token
        self.prefix = prefix
        self.agents: list[SimAgent] = []
        self.ids: list[str] = []
        self.samples: list[float] = []
        self.hb_failed = [0]
        self.mark = 0.0
        self.failed = 0
        self.errors: list[str] = []
        self.tasks: set[asyncio.Task[None]] = set()

    async def join_one(self, i: int) -> bool:
        name = f"{self.prefix}-{i:05d}"
        try:
            agent = await join_simulated(
                self.managers, self.token, name, first=i,
                addr="127.0.0.1",  # as swarmd, which always advertises an address (loopback: no data path)
                agent_cls=SimAgent, samples=self.samples, failed=self.hb_failed)
        except Exception as e:  # noqa: BLE001 - counted and reported, the fleet goes on
            self.failed += 1
            if len(self.errors) < 5:
                self.errors.append(f"{name}: {e}")
            return False
        self.agents.append(agent)
        self.ids.append(agent.node_id)
        t = asyncio.create_task(agent.run(), name=f"agent-{name}")
        self.tasks.add(t)
        return True

    def status(self) -> dict[str, Any]:
        ins = [a for a in self.agents if a.connected.is_set()]
        back = sum(1 for a in ins if a.connected.times and a.connected.times[-1] >= self.mark) if self.mark else 0
        return {"type": "status", "n": len(self.agents), "in_session": len(ins), "back": back,
                "failed": self.failed}

    def command(self, line: str) -> None:
        cmd, _, arg = line.strip().partition(" ")
        if cmd == "mark":
            self.mark = float(arg)
        elif cmd == "rtt_reset":
            self.samples.clear()
            self.hb_failed[0] = 0
        elif cmd == "rtt":
            emit({"type": "rtt", "samples": [round(s, 5) for s in self.samples], "failed": self.hb_failed[0]})
        elif cmd == "since":
            t = float(arg)
            emit({"type": "since", "first": [next((x for x in a.connected.times if x >= t), None)
                                             for a in self.agents]})


async def main(a: argparse.Namespace) -> None:
    loop = asyncio.get_running_loop()
    lines: asyncio.Queue[str] = asyncio.Queue()

    def read_stdin() -> None:
        for line in sys.stdin:
            loop.call_soon_threadsafe(lines.put_nowait, line)
        loop.call_soon_threadsafe(lines.put_nowait, "")

    threading.Thread(target=read_stdin, daemon=True).start()
    fleet = Fleet(a.managers.split(","), a.token, a.prefix)
    emit({"type": "ready"})
    while (await lines.get()).strip() != "go":
        pass

    async def joins() -> None:
        t0 = time.time()
        first = min(a.first, a.count)
        ok = await asyncio.gather(*(fleet.join_one(i) for i in range(first)))
        emit({"type": "batch", "t0": t0, "t1": time.time(), "n": first, "ok": sum(ok)})
        sem = asyncio.Semaphore(a.conc)

        async def one(i: int) -> None:
            async with sem:
                await fleet.join_one(i)

        await asyncio.gather(*(one(i) for i in range(first, a.count)))
        emit({"type": "joined", "ids": fleet.ids, "failed": fleet.failed, "errors": fleet.errors})

    async def reporter() -> None:
        while True:
            emit(fleet.status())
            await asyncio.sleep(0.2)

    async def commands() -> None:
        while True:
            line = await lines.get()
            if not line:  # the parent closed our stdin: stop
                raise SystemExit(0)
            fleet.command(line)

    try:
        async with asyncio.TaskGroup() as tg:
            tg.create_task(joins())
            tg.create_task(reporter())
            tg.create_task(commands())
    finally:
        for t in fleet.tasks:
            t.cancel()


def cli() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--managers", required=True, help="manager API addresses, comma-separated")
    ap.add_argument("--token", required=True, help="the worker join token")
    ap.add_argument("--count", type=int, required=True)
    ap.add_argument("--prefix", required=True, help="hostname prefix of this process's nodes")
    ap.add_argument("--first", type=int, default=0, help="nodes joined all at once before the others")
    ap.add_argument("--conc", type=int, default=32, help="joins at a time after the first ones")
    ap.add_argument("--step-dir", default="", help="unused here: names the bench step this process belongs "
                                                   "to in its command line (fleet.py's cleanup finds it so)")
    a = ap.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    with contextlib.suppress(KeyboardInterrupt, SystemExit):
        asyncio.run(main(a))


if __name__ == "__main__":
    cli()
