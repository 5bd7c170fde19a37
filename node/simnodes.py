"""Simulated nodes: real agents with an in-memory engine, many to a process.

A simulated node is a real node to the managers. It joins through the CA with the worker token (its
own key and certificate), then runs the project's agent (`shoal.agent.agent.Agent`) over mutual TLS,
so its session, heartbeats, assignments and task status reports are the ones a real node sends. Only
its engine is simulated (`MemEngine`): every image is there at once, a container "runs" from its start
until it is stopped, and nothing runs on the machine. Its certificate is not renewed (it lives as
long as the cluster's node certificates: 90 days by default).

Two users: `swarmctl lab up --simulated N` (a large `node ls` on one machine: `python -m
shoal.node.simnodes`, below) and the fleet benchmark (bench/fleetsim.py), which adds its own
measurements to the same agents.

    python -m shoal.node.simnodes --managers A,B,C --count N --addr ADDR [--prefix sim] [--label K=V…] < token

reads the worker join token on stdin, joins N nodes named `<prefix>-00001`… (`--conc` at a time),
starts each node's agent as soon as it joined, logs its progress, and runs until SIGTERM or SIGINT.
Each node advertises ADDR and carries the engine labels given (the lab's: `simulated=true`, so that
a constraint `engine.labels.simulated!=true` keeps a service off them).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import itertools
import logging
import signal
import sys
from collections.abc import AsyncIterator, Sequence
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

import grpc

from shoal.agent.agent import MANAGER_NAME, Agent
from shoal.agent.engine import (
    ContainerConfig,
    ContainerNotFound,
    ContainerState,
    ExitStatus,
    Image,
    LogLine,
    RegistryAuth,
)
from shoal.manager.ca import join_cluster

log = logging.getLogger("shoal.node.simnodes")

_pids = itertools.count(100_000)


class MemEngine:
    """The `ContainerEngine` protocol in memory: every image is there, a container runs from `start`
    until `stop` or `remove`, and has no logs."""

    def __init__(self) -> None:
        self.containers: dict[str, ContainerState] = {}
        self._exits: dict[str, asyncio.Future[ExitStatus]] = {}

    @staticmethod
    def _image(ref: str) -> Image:
        return Image(id="sha256:" + hashlib.sha256(ref.encode()).hexdigest(), layers=[], config={}, refs=[ref])

    async def pull(self, ref: str, auth: RegistryAuth | None = None) -> Image:
        return self._image(ref)

    async def image(self, name: str) -> Image | None:
        return self._image(name)

    async def create(self, cfg: ContainerConfig) -> None:
        self.containers[cfg.id] = ContainerState(
            id=cfg.id, name=cfg.name, status="created", pid=0, image=cfg.spec.image,
            image_id=self._image(cfg.spec.image).id, labels=dict(cfg.labels),
            created_at=datetime.now(UTC), started_at=None)
        self._exits[cfg.id] = asyncio.get_running_loop().create_future()

    def _get(self, cid: str) -> ContainerState:
        try:
            return self.containers[cid]
        except KeyError:
            raise ContainerNotFound(f"no such container: {cid}") from None

    async def start(self, cid: str) -> None:
        c = self._get(cid)
        if c.status == "created":
            c.status, c.pid, c.started_at = "running", next(_pids), datetime.now(UTC)

    def _exit(self, cid: str, code: int) -> None:
        c = self.containers.get(cid)
        if c is not None and c.status != "exited":
            c.status, c.pid = "exited", 0
            c.exit = ExitStatus(exit_code=code, oom_killed=False, finished_at=datetime.now(UTC),
                                reason="Completed" if code == 0 else "Error")
        fut = self._exits.get(cid)
        if fut is not None and not fut.done():
            fut.set_result(c.exit if c is not None and c.exit else ExitStatus(code, False, datetime.now(UTC)))

    async def wait(self, cid: str) -> ExitStatus:
        self._get(cid)
        return await asyncio.shield(self._exits[cid])

    async def stop(self, cid: str, timeout: float | None = None) -> None:
        self._get(cid)
        self._exit(cid, 137)

    async def remove(self, cid: str) -> None:
        self._get(cid)
        self._exit(cid, 137)
        del self.containers[cid]
        self._exits.pop(cid, None)

    async def inspect(self, cid: str) -> ContainerState:
        return replace(self._get(cid))

    async def list(self) -> list[ContainerState]:
        return [replace(c) for c in self.containers.values()]

    async def logs(self, cid: str, *, follow: bool = False, tail: int = -1,
                   since: datetime | None = None) -> AsyncIterator[LogLine]:
        return
        yield  # an async generator that yields nothing


async def join_simulated(managers: Sequence[str], token: str, name: str, *, addr: str, first: int = 0,
                         labels: dict[str, str] | None = None, attempts: int = 3,
                         agent_cls: type[Agent] = Agent, **agent_kw: Any) -> Agent:
    """Join one simulated node named `name` through the CA, trying the managers in turn from
    `managers[first]` (`attempts` tries), and return its agent, not yet running: a `MemEngine`,
    mutual TLS with the node's new certificate, the heartbeat period of the join's answer, the
    engine `labels`, its own connections (as on a host of its own). `agent_kw` goes to `agent_cls`
    as well. Raises the last join's error (JoinError: what went wrong, and where)."""
    err: Exception | None = None
    for attempt in range(attempts):
        via = managers[(first + attempt) % len(managers)]
        try:
            res = await join_cluster(via, token, hostname=name, timeout=30.0, issue_timeout=120.0)
            break
        except Exception as e:  # noqa: BLE001 - the next manager is tried; the last error is raised
            err = e
    else:
        assert err is not None
        raise err
    ident = res.identity
    return agent_cls(
        ident.node_id, "/nonexistent", list(managers),  # no LocalState: the agent keeps nothing on disk
        grpc.ssl_channel_credentials(ident.ca_pem, ident.key_pem, ident.cert_pem), MemEngine(),
        hostname=name, addr=addr, labels=labels,
        channel_options=[("grpc.ssl_target_name_override", MANAGER_NAME), ("grpc.default_authority", MANAGER_NAME),
                         ("grpc.use_local_subchannel_pool", 1)],
        period=res.response.heartbeat_period.ToNanoseconds() / 1e9 or None,  # as swarmd keeps it
        **agent_kw,
    )


async def run(managers: Sequence[str], token: str, count: int, prefix: str, addr: str, conc: int,
              labels: dict[str, str]) -> None:
    """Join `count` nodes, `conc` at a time, each one's agent started once it joined; then run them
    until cancelled. A node whose join failed on every manager is logged and left out."""
    sem = asyncio.Semaphore(conc)
    joined = [0, 0]  # joined, failed

    async with asyncio.TaskGroup() as tg:
        async def one(i: int) -> None:
            name = f"{prefix}-{i:05d}"
            async with sem:
                try:
                    agent = await join_simulated(managers, token, name, addr=addr, first=i, labels=labels)
                except Exception as e:  # noqa: BLE001 - reported; the other nodes go on
                    joined[1] += 1
                    log.error("node %s did not join: %s", name, e)
                    return
            joined[0] += 1
            if joined[0] % 100 == 0 or joined[0] + joined[1] == count:
                log.info("%d of %d simulated nodes joined (%d failed)", joined[0], count, joined[1])
            tg.create_task(agent.run(), name=f"agent-{name}")

        for i in range(1, count + 1):
            tg.create_task(one(i))


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m shoal.node.simnodes", description=__doc__.split("\n\n")[0])
    ap.add_argument("--managers", required=True, help="manager addresses (host:port), comma-separated")
    ap.add_argument("--count", type=int, required=True, help="nodes to simulate")
    ap.add_argument("--prefix", default="sim", help="hostname prefix: PREFIX-00001, … (default sim)")
    ap.add_argument("--addr", required=True, help="the address every node advertises")
    ap.add_argument("--conc", type=int, default=32, help="joins at a time (default 32)")
    ap.add_argument("--label", action="append", default=[], metavar="K=V", help="an engine label of every node")
    a = ap.parse_args(argv)
    if a.count < 1:
        ap.error("--count must be at least 1")
    if any("=" not in kv for kv in a.label):
        ap.error("--label takes KEY=VALUE")
    labels = dict(kv.split("=", 1) for kv in a.label)
    token = sys.stdin.readline().strip()
    if not token:
        ap.error("give the worker join token on stdin")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("shoal.agent").setLevel(logging.WARNING)

    async def serve() -> None:
        task = asyncio.current_task()
        assert task is not None
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, task.cancel)
        await run(a.managers.split(","), token, a.count, a.prefix, a.addr, a.conc, labels)

    with contextlib.suppress(asyncio.CancelledError):
        asyncio.run(serve())
    return 0


if __name__ == "__main__":
    sys.exit(main())
