"""One ``swarmd`` process on loopback for end-to-end tests: its state dir, ports and log, its control
socket, and real ``swarmctl`` processes against it.

The test files' own classes (tests/node, tests/cli, tests/agent) subclass ``Swarmd`` for what only they
need (etcd member pids, containers to remove, a cluster bootstrap). Every process is started by the
test and ended by it, by PID: ``kill``, ``term`` or ``stop``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import grpc

from helpers.swarmctl import SWARMCTL, expect_error, expect_ok
from helpers.waiting import wait_for
from shoal.lab.registry import free_port
from shoal.manager.etcdmember import process_alive
from shoal.proto import control_pb2, control_pb2_grpc


class Swarmd:
    """``swarmd -d BASE/NAME`` listening on ``ip`` (its API port, its etcd peer port with ``peer``, its
    gossip port with ``gossip``: free ports picked once, so a restart keeps its addresses), logging
    stdout and stderr to ``BASE/NAME.log`` across restarts. ``extra`` arguments go to every start."""

    #: seconds ``term`` waits for the process to exit, and ``ctl`` for swarmctl
    term_timeout: float = 30
    ctl_timeout: float = 60
    #: ``fails`` matches its text in stderr ignoring case
    fold_case: bool = False
    #: ``control`` reuses one channel (see there)
    keep_channel: bool = False

    def __init__(self, base: Path, name: str, ip: str = "127.0.0.1", extra: Sequence[str] | None = None, *,
                 hostname: str | None = None, peer: bool = True, gossip: bool = False) -> None:
        self.name = hostname or name
        self.dir = base / name
        self.ip = ip
        self.api = f"{ip}:{free_port(ip)}"
        self.peer = f"{ip}:{free_port(ip)}" if peer else ""
        self.gossip = free_port(ip) if gossip else 0
        self.extra = list(extra or [])
        self.log = base / f"{name}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self._channel: grpc.Channel | None = None
        self.etcd_pids: set[int] = set()  # every etcd member pid seen for it (see ``etcd_pid``)

    def argv(self, extra: Sequence[str] = (), own_extra: bool = True) -> list[str]:
        """The command line: addresses, hostname, then ``self.extra`` (unless ``own_extra`` is False) and ``extra``."""
        argv = [sys.executable, "-m", "shoal.node.swarmd", "-d", str(self.dir), "--listen-remote-api", self.api]
        if self.peer:
            argv += ["--listen-peer", self.peer]
        if self.gossip:
            argv += ["--gossip-port", str(self.gossip)]
        return [*argv, "--hostname", self.name, *(self.extra if own_extra else []), *extra]

    def start(self, extra: Sequence[str] = (), stdin: str | None = None) -> Swarmd:
        """Start it in a session of its own; ``stdin`` is written to it and closed (else /dev/null)."""
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(self.argv(extra), stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL if stdin is None else subprocess.PIPE,
                                         start_new_session=True)
        if stdin is not None:
            assert self.proc.stdin is not None
            self.proc.stdin.write(stdin.encode())
            self.proc.stdin.close()
        return self

    def run_to_exit(self, extra: Sequence[str], timeout: float = 60) -> tuple[int, str]:
        """Run it in the foreground with ``extra`` instead of ``self.extra`` (a refusal, a restore…):
        its exit code and stderr."""
        p = subprocess.run(self.argv(extra, own_extra=False), capture_output=True, text=True, timeout=timeout)
        return p.returncode, p.stderr

    @property
    def sock(self) -> Path:
        return self.dir / "swarmd.sock"

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    # gRPC straight to the control socket (fast polling; the user-facing checks run swarmctl)
    def control(self) -> control_pb2_grpc.ControlStub:
        """A stub on a new channel, or with ``keep_channel`` on one channel kept until the process is
        killed or stopped (a kept channel that saw the socket gone retries with gRPC's backoff)."""
        if not self.keep_channel:
            return control_pb2_grpc.ControlStub(grpc.insecure_channel(f"unix:{self.sock}"))
        if self._channel is None:
            self._channel = grpc.insecure_channel(f"unix:{self.sock}")
        return control_pb2_grpc.ControlStub(self._channel)

    def reset_channel(self) -> None:
        if self._channel is not None:
            self._channel.close()
            self._channel = None

    def info(self) -> control_pb2.InfoResponse:
        return self.control().Info(control_pb2.InfoRequest(), timeout=5)

    def etcd_pid(self) -> int | None:
        """The pid of its running etcd member (a manager's), remembered in ``etcd_pids``; None if none runs."""
        try:
            pid = int((self.dir / "etcd" / "etcd.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None
        if process_alive(pid):
            self.etcd_pids.add(pid)
            return pid
        return None

    def wait_etcd_gone(self, timeout: float = 15) -> None:
        """Until every etcd member seen for it has exited. A SIGKILLed swarmd's member gets SIGTERM
        (PDEATHSIG) and stops gracefully -- a leader hands its leadership over first -- so for a moment
        it still counts towards the quorum."""
        wait_for(lambda: not any(process_alive(p) for p in self.etcd_pids), f"{self.name}'s etcd member to exit",
                 timeout)

    def kill(self) -> None:
        """SIGKILL, when it runs (its etcd member's pid is noted first, for ``wait_etcd_gone``)."""
        self.etcd_pid()
        if self.alive():
            assert self.proc is not None
            self.proc.kill()
            self.proc.wait()
        self.reset_channel()

    def term(self, timeout: float | None = None) -> int:
        """SIGTERM and its exit code. When it does not exit in time: SIGUSR1 (swarmd logs every task's
        and thread's stack) and an AssertionError with the log's end."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout or self.term_timeout)
        except subprocess.TimeoutExpired:
            self.proc.send_signal(signal.SIGUSR1)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(2)
            raise AssertionError(f"swarmd {self.name} did not exit within {timeout or self.term_timeout:g} s of "
                                 f"SIGTERM; its stacks (SIGUSR1) and log:\n{self.log_text()[-12000:]}") from None
        self.reset_channel()
        return code

    def stop(self, sig: int = signal.SIGTERM, timeout: float | None = None) -> None:
        """``sig`` when it runs, then SIGKILL when it has not exited after ``timeout`` seconds."""
        if self.alive():
            assert self.proc is not None
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout or self.term_timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.reset_channel()

    def log_text(self, offset: int = 0) -> str:
        try:
            with open(self.log, "rb") as f:
                f.seek(offset)
                return f.read().decode("utf-8", "replace")
        except FileNotFoundError:
            return ""

    def log_size(self) -> int:
        try:
            return self.log.stat().st_size
        except FileNotFoundError:
            return 0

    def ctl(self, *args: str, input: str | None = None, timeout: float | None = None,
            remote: bool = False) -> subprocess.CompletedProcess[str]:
        """``swarmctl ARGS`` on its control socket, or with ``remote`` on its API over mTLS with its own
        identity; never raises on the exit code."""
        conn = ["--host", self.api, "--tls-dir", str(self.dir)] if remote else ["--socket", str(self.sock)]
        return subprocess.run([*SWARMCTL, *conn, *args], capture_output=True, text=True, input=input,
                              timeout=timeout or self.ctl_timeout)

    def ok(self, *args: str, **kw: Any) -> str:
        """Its stdout; asserts exit code 0."""
        return expect_ok(self.ctl(*args, **kw), args)

    def fails(self, *args: str, match: str, code: int = 1, **kw: Any) -> str:
        """Its stderr; asserts exit code ``code`` and an ``Error: `` message holding ``match``."""
        return expect_error(self.ctl(*args, **kw), args, match, code, fold_case=self.fold_case)


def remove_containers(engine_root: Path) -> None:
    """Remove every container an engine at ``engine_root`` still holds (what a killed swarmd left)."""
    if not (engine_root / "containers").is_dir():
        return
    from shoal.agent.engine import Engine

    async def main() -> None:
        e = Engine(engine_root)
        for c in await e.list():
            with contextlib.suppress(Exception):
                await e.remove(c.id)
        await e.close()

    asyncio.run(main())


def unmount_under(base: Path) -> None:
    """Lazily unmount every mount point below ``base``, deepest first (what killed swarmds left)."""
    with open("/proc/self/mountinfo") as f:
        mps = [ln.split()[4] for ln in f if ln.split()[4].startswith(str(base))]
    for mp in sorted(mps, reverse=True):
        subprocess.run(["umount", "-l", mp], check=False, capture_output=True)


def task_netns(node_ids: Iterable[str]) -> list[str]:
    """The task network namespaces the nodes' networking made (named n<node id[:6]>-c<task id[:12]>)."""
    prefixes = tuple(f"n{nid[:6]}-c" for nid in node_ids)
    try:
        return sorted(n for n in os.listdir("/run/netns") if prefixes and n.startswith(prefixes))
    except FileNotFoundError:
        return []


def remove_task_netns(nodes: Iterable[Swarmd]) -> None:
    """Remove the task network namespaces of these nodes that a stopped swarmd did not release."""
    from pyroute2 import netns

    ids = []
    for n in nodes:
        with contextlib.suppress(OSError, ValueError, KeyError):
            ids.append(json.loads((n.dir / "node.json").read_text())["node_id"])
    for name in task_netns(ids):
        with contextlib.suppress(OSError):
            netns.remove(name)
