"""The remote API front's byte copying (`remoteapi.RemoteAPIFront`, a process of its own), with a
unix-socket listener of the test's own behind each route: every byte both ways, in order, also when
one side reads slowly (flow control), and the end of stream passed on as a half-close; bytes pass
while the interpreter that started it is busy; the front ends with the manager, also one killed by
SIGKILL. The routing by first bytes and the real gRPC listeners behind it are
tests/manager/test_ca.py's."""

from __future__ import annotations

import asyncio
import hashlib
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers.aio import run_bounded
from helpers.orphans import end_both, ends_with_its_parent

from shoal.lab.registry import free_port
from shoal.manager import remoteapi

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
import frontrelay  # noqa: E402


async def _listener(path: Path, seen: dict[str, bytes]) -> asyncio.base_events.Server:
    """Reads the whole stream (slowly at first: 64 KiB reads with pauses), records its digest, then
    answers with 8 MiB of its own and closes."""

    async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        h, n = hashlib.sha256(), 0
        while chunk := await r.read(65536):
            h.update(chunk)
            n += len(chunk)
            if n < 2 << 20:
                await asyncio.sleep(0.001)
        seen[path.name] = h.digest()
        w.write(ANSWER)
        await w.drain()
        w.close()

    return await asyncio.start_unix_server(handle, str(path))


ANSWER = os.urandom(8 << 20)


def test_every_byte_both_ways_with_a_half_close(tmp_path: Path) -> None:
    async def body() -> None:
        paths = {k: tmp_path / k for k in ("mtls", "join", "plain")}
        seen: dict[str, bytes] = {}
        servers = [await _listener(p, seen) for p in paths.values()]
        addr = f"127.0.0.1:{free_port('127.0.0.1')}"
        # a connection that never says enough to be routed is dropped after head_timeout s
        front = remoteapi.RemoteAPIFront(addr, str(paths["mtls"]), str(paths["join"]), str(paths["plain"]),
                                         head_timeout=0.5)
        await front.start()
        assert front.pid is not None
        fds = len(os.listdir(f"/proc/{front.pid}/fd"))  # the listener, the event loop's own
        try:
            host, port = addr.rsplit(":", 1)
            payload = b"PRI * HTTP/2.0\r\n" + os.urandom(16 << 20)  # not TLS: the plain route
            r, w = await asyncio.open_connection(host, int(port))
            w.write(payload)
            await w.drain()
            w.write_eof()  # the listener answers only after the end of the stream reached it
            got = await r.read()  # until the listener closed: the whole answer came back
            w.close()
            assert seen == {"plain": hashlib.sha256(payload).digest()}
            assert len(got) == len(ANSWER) and got == ANSWER
            r2, w2 = await asyncio.open_connection(host, int(port))
            w2.write(b"\x16\x03")
            assert await asyncio.wait_for(r2.read(), 5) == b""
            w2.close()
            for _ in range(100):  # and both connections are let go of (closed on their own, not by close())
                if len(os.listdir(f"/proc/{front.pid}/fd")) == fds:
                    break
                await asyncio.sleep(0.05)
            assert len(os.listdir(f"/proc/{front.pid}/fd")) == fds
        finally:
            await front.close()
            for s in servers:
                s.close()
                await s.wait_closed()

    run_bounded(body())


def test_bytes_pass_while_the_managers_event_loop_is_busy(tmp_path: Path) -> None:
    """The front copies in a process of its own: while the interpreter that started it is busy (a
    manager's loop computing a large scheduling pass, holding the interpreter lock), a client's
    bytes still reach the listener and its answers come back (an agent's HTTP/2 ping, answered by
    gRPC's C core, keeps telling it the manager is alive). The client and the listener are a
    process of their own: 100 round trips through the front, all answered while this interpreter
    computes for 3 s. (How much slower a relay thread of the busy process was: bench/frontrelay.py.)"""

    async def body() -> None:
        plain = tmp_path / "plain"
        addr = f"127.0.0.1:{free_port('127.0.0.1')}"
        front = remoteapi.RemoteAPIFront(addr, str(tmp_path / "mtls"), str(tmp_path / "join"), str(plain))
        await front.start()
        host, port = addr.rsplit(":", 1)
        # bench/frontrelay.py's client and listener: one connection, 100 round trips 5 ms apart
        peer = subprocess.Popen([sys.executable, "-c", frontrelay.PEER, str(plain), host, port, "100", "1"],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        try:
            assert peer.stdout is not None and peer.stdin is not None
            assert peer.stdout.readline().strip() == "ready"
            go = time.monotonic()
            peer.stdin.write("go\n")
            peer.stdin.flush()
            busy_until = go + 3.0
            while time.monotonic() < busy_until:  # this interpreter busy, computing
                sum(i * i for i in range(1000))
            blocked_until = time.monotonic()
            took = float(peer.stdout.readline().split()[0])
            assert go + took < blocked_until, f"the last answer came {go + took - blocked_until:.2f} s after the busy spell"
        finally:
            peer.kill()
            peer.wait()
            await front.close()

    run_bounded(body())


MANAGER = '''
import asyncio, sys
from shoal.manager import remoteapi
async def main():
    front = remoteapi.RemoteAPIFront(sys.argv[1], "@x-mtls", "@x-join", "@x-plain")
    await front.start()
    print(front.pid, flush=True)
    await asyncio.Event().wait()
asyncio.run(main())
'''


def test_the_front_ends_with_a_manager_killed_by_sigkill() -> None:
    """A manager process killed by SIGKILL runs no cleanup: the kernel ends its front (PDEATHSIG),
    and nothing listens on the port any more."""
    addr = f"127.0.0.1:{free_port('127.0.0.1')}"
    host, port = addr.rsplit(":", 1)
    mgr = subprocess.Popen([sys.executable, "-c", MANAGER, addr], stdout=subprocess.PIPE, text=True)
    front_pid = 0
    try:
        assert mgr.stdout is not None
        front_pid = int(mgr.stdout.readline())
        socket.create_connection((host, int(port)), timeout=5).close()  # it listens
        assert ends_with_its_parent(mgr, front_pid, 10), f"the front (pid {front_pid}) outlived its manager"
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection((host, int(port)), timeout=5).close()
    finally:
        end_both(mgr, front_pid)
