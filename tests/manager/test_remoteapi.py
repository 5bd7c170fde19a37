"""The remote API front's byte copying (`remoteapi.RemoteAPIFront`), with a unix-socket listener of
the test's own behind each route: every byte both ways, in order, also when one side reads slowly
(flow control), and the end of stream passed on as a half-close. The routing by first bytes and the
real gRPC listeners behind it are tests/manager/test_ca.py's."""

from __future__ import annotations

import asyncio
import hashlib
import os
import socket
import threading
import time
from pathlib import Path

from helpers.aio import run_bounded

from shoal.lab.registry import free_port
from shoal.manager import remoteapi


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
        front = remoteapi.RemoteAPIFront(addr, str(paths["mtls"]), str(paths["join"]), str(paths["plain"]))
        await front.start()
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
            # a connection that never says enough to be routed is dropped after HEAD_TIMEOUT
            front_timeout, remoteapi.HEAD_TIMEOUT = remoteapi.HEAD_TIMEOUT, 0.2
            try:
                r2, w2 = await asyncio.open_connection(host, int(port))
                w2.write(b"\x16\x03")
                assert await asyncio.wait_for(r2.read(), 5) == b""
                w2.close()
            finally:
                remoteapi.HEAD_TIMEOUT = front_timeout
            for _ in range(100):  # and both connections are let go of (closed on their own, not by close())
                if not front._conns:
                    break
                await asyncio.sleep(0.05)
            assert not front._conns
        finally:
            await front.close()
            for s in servers:
                s.close()
                await s.wait_closed()

    run_bounded(body())


def test_bytes_pass_while_the_managers_event_loop_is_busy(tmp_path: Path) -> None:
    """The front copies on a loop of its own: while the loop that started it is blocked (a manager
    busy with a large scheduling pass), a client's bytes still reach the listener and its answer
    comes back (an agent's HTTP/2 ping, answered by gRPC's C core, keeps telling it the manager is
    alive). The listener here is a thread of its own too."""

    async def body() -> None:
        paths = {k: tmp_path / k for k in ("mtls", "join", "plain")}
        listener = socket.socket(socket.AF_UNIX)
        listener.bind(str(paths["plain"]))
        listener.listen()

        def echo() -> None:
            conn, _ = listener.accept()
            with conn:
                while data := conn.recv(65536):
                    conn.sendall(data)

        threading.Thread(target=echo, daemon=True).start()
        addr = f"127.0.0.1:{free_port('127.0.0.1')}"
        front = remoteapi.RemoteAPIFront(addr, str(paths["mtls"]), str(paths["join"]), str(paths["plain"]))
        await front.start()
        answered: list[float] = []
        host, port = addr.rsplit(":", 1)
        client = socket.create_connection((host, int(port)))

        def ping_pong() -> None:
            for i in range(5):
                msg = b"PRI * HTTP/2.0\r\n" if i == 0 else b"ping"
                client.sendall(msg)
                got = b""
                while len(got) < len(msg):
                    got += client.recv(65536)
                assert got == msg
                answered.append(time.monotonic())

        try:
            t0 = time.monotonic()
            pinger = threading.Thread(target=ping_pong, daemon=True)
            pinger.start()
            time.sleep(2.0)  # this loop blocked: nothing of it runs meanwhile
            blocked_until = time.monotonic()
            pinger.join(5)
            assert len(answered) == 5, answered
            assert answered[-1] < blocked_until, (answered[-1] - t0, blocked_until - t0)
        finally:
            client.close()
            await front.close()
            listener.close()

    run_bounded(body())
