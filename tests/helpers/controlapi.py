"""The control API over a ``LocalStore`` on a unix socket, for tests that need no cluster behind it.

- ``served(dir)``: in this process, with a real ``grpc.aio`` client (``Served.stub``).
- ``Server(dir)``: in a child process (``python -m helpers.controlapi SOCKET [--seed]``), with the
  Watch API beside it as swarmd serves them, that real ``swarmctl`` processes talk to; ``ok``,
  ``fails`` and ``js`` run swarmctl against it and check the outcome.

``--seed`` (``seed``) creates what a fresh single-manager swarm has: the cluster object (with a root CA
certificate and join tokens) and this manager's node (READY, leader), plus a DOWN worker ``w1``.
The child prints ``ready`` on stdout once it listens and stops on SIGTERM/SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from helpers.pki import ca_cert_pem
from helpers.swarmctl import SWARMCTL, expect_error, expect_ok
from shoal.manager.ca import generate_join_token
from shoal.manager.controlapi import ControlServicer, add_to_server
from shoal.manager.store import LocalStore, Tx
from shoal.manager.watchapi import WatchServicer
from shoal.proto import control_pb2_grpc, objects_pb2, specs_pb2, types_pb2, watch_pb2_grpc

TESTS = Path(__file__).resolve().parents[1]


@dataclass
class Served:
    store: LocalStore
    stub: control_pb2_grpc.ControlStub
    socket: str


@contextlib.asynccontextmanager
async def served(tmp_path: Path, store: LocalStore | None = None, manager: object = None,
                 name: str = "control.sock") -> AsyncIterator[Served]:
    """A ControlServicer over ``store`` (a new LocalStore when None) on ``tmp_path/name``, and a client
    channel to it; both are closed on exit."""
    store = store or LocalStore()
    server = grpc.aio.server()
    add_to_server(ControlServicer(store, manager), server)
    sock = str(tmp_path / name)
    server.add_insecure_port(f"unix://{sock}")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"unix://{sock}") as channel:
            yield Served(store, control_pb2_grpc.ControlStub(channel), sock)
    finally:
        await server.stop(None)


def seed(tx: Tx) -> None:
    """What a fresh single-manager swarm holds: cluster `default`, leader `m1` (READY), worker `w1` (DOWN)."""
    pem = ca_cert_pem()
    cl = objects_pb2.Cluster(spec=specs_pb2.ClusterSpec(annotations=types_pb2.Annotations(name="default")),
                             root_ca=objects_pb2.RootCA(ca_key=b"KEY", ca_cert=pem))
    cl.root_ca.join_tokens.worker = generate_join_token(pem)
    cl.root_ca.join_tokens.manager = generate_join_token(pem)
    tx.create(cl)
    m = objects_pb2.Node(role=types_pb2.MANAGER)
    m.description.hostname = "m1"
    m.description.platform.os = "linux"
    m.description.platform.architecture = "x86_64"
    m.status.state = types_pb2.NodeStatus.READY
    m.status.addr = "127.0.0.1"
    m.spec.desired_role = types_pb2.MANAGER
    m.spec.membership = specs_pb2.NodeSpec.ACCEPTED
    m.manager_status.leader = True
    m.manager_status.reachability = types_pb2.ManagerStatus.REACHABLE
    m.manager_status.addr = "127.0.0.1:2377"
    tx.create(m)
    w = objects_pb2.Node(role=types_pb2.WORKER)
    w.description.hostname = "w1"
    w.status.state = types_pb2.NodeStatus.DOWN
    w.spec.membership = specs_pb2.NodeSpec.ACCEPTED
    tx.create(w)


class Server:
    """The control API in a child process on ``tmp/ctl.sock``, and real ``swarmctl`` runs against it.

    Subclasses tune ``timeout`` (seconds one swarmctl run may take) and ``one_line_errors`` (``fails``
    also checks that stderr is a single line)."""

    timeout: float = 60
    one_line_errors: bool = False

    def __init__(self, tmp: Path, *flags: str) -> None:
        self.socket = str(tmp / "ctl.sock")
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(TESTS), os.environ.get("PYTHONPATH")])))
        self.proc = subprocess.Popen([sys.executable, "-m", "helpers.controlapi", self.socket, *flags],
                                     stdout=subprocess.PIPE, text=True, env=env)
        line = self.proc.stdout.readline() if self.proc.stdout else ""
        if line.strip() != "ready":
            self.stop()
            raise RuntimeError(f"test server did not start: {line!r}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def run(self, *args: str, input: str | None = None, cwd: Path | None = None,
            env: dict[str, str] | None = None, timeout: float | None = None) -> subprocess.CompletedProcess[str]:
        """``swarmctl ARGS`` with SWARM_SOCKET pointing here (plus ``env``); never raises on its exit code."""
        full = dict(os.environ, SWARM_SOCKET=self.socket, **(env or {}))
        return subprocess.run(SWARMCTL + list(args), capture_output=True, text=True, input=input, env=full,
                              timeout=timeout or self.timeout, cwd=cwd)

    def ok(self, *args: str, **kw: Any) -> str:
        """Its stdout; asserts exit code 0."""
        return expect_ok(self.run(*args, **kw), args)

    def fails(self, *args: str, match: str, code: int = 1, **kw: Any) -> str:
        """Its stderr; asserts exit code ``code`` and an ``Error: `` message holding ``match`` (any case)."""
        return expect_error(self.run(*args, **kw), args, match, code, fold_case=True, one_line=self.one_line_errors)

    def js(self, *args: str) -> list[dict]:
        """``swarmctl ARGS --format json``, parsed."""
        return json.loads(self.ok(*args, "--format", "json"))


async def _serve(sock: str, do_seed: bool) -> None:
    store = LocalStore()
    if do_seed:
        await store.update(seed)
    server = grpc.aio.server()
    add_to_server(ControlServicer(store), server)
    watch_pb2_grpc.add_WatchServicer_to_server(WatchServicer(store), server)
    server.add_insecure_port(f"unix://{sock}")
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print("ready", flush=True)
    await stop.wait()
    await server.stop(None)


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m helpers.controlapi")
    p.add_argument("socket")
    p.add_argument("--seed", action="store_true")
    a = p.parse_args()
    asyncio.run(_serve(a.socket, a.seed))


if __name__ == "__main__":
    main()
