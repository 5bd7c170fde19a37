"""The manager's remote API port (2377): `RemoteAPIFront`, a TCP front for three gRPC listeners.

Python's gRPC cannot ask for an *optional* client certificate (`require_client_auth=False` does not
request one at all), so one gRPC server cannot both accept a node that has no certificate yet
(join) and verify the certificate of every other caller. 2377 is therefore a small TCP front that
looks at the first bytes of each connection (without terminating TLS) and splices it to one of
three internal gRPC listeners on unix sockets (the manager starts them, see
`shoal.manager.manager`):

- TLS with SNI "swarm-ca" (`ca.JOIN_NAME`, a joining node): server-only TLS, CA service only
  (`ca.NodeCredentials.server_credentials(client_auth=False)`);
- any other TLS: mutual TLS required (`ca.NodeCredentials.server_credentials()`): Control, Dispatcher, CA;
- plaintext HTTP/2: `GetRootCACertificate` only -- public data, checked by the joiner against the
  digest in its token before it opens the TLS channel that carries the token.

The front runs in a process of its own (see `RemoteAPIFront`). This module owns the routing and
the byte copying only; certificates and credentials are `shoal.manager.ca`'s.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import socket
import sys
from collections.abc import Callable

log = logging.getLogger(__name__)

START_TIMEOUT = 15.0  # s for the front's process to listen (an interpreter start on a loaded machine)
STOP_TIMEOUT = 5.0  # s for it to end after SIGTERM; then SIGKILL


def _client_hello_sni(data: bytes) -> str | None:
    """The server name of a TLS ClientHello record (None if absent or not parseable)."""
    try:
        if data[0] != 0x16 or data[5] != 0x01:
            return None
        p = 9 + 2 + 32  # record(5) + handshake header(4) + version + random
        p += 1 + data[p]  # session id
        p += 2 + int.from_bytes(data[p : p + 2], "big")  # cipher suites
        p += 1 + data[p]  # compression methods
        end = p + 2 + int.from_bytes(data[p : p + 2], "big")
        p += 2
        while p + 4 <= min(end, len(data)):
            etype = int.from_bytes(data[p : p + 2], "big")
            elen = int.from_bytes(data[p + 2 : p + 4], "big")
            body = data[p + 4 : p + 4 + elen]
            if etype == 0:  # server_name: list len(2), type(1), name len(2), name
                nlen = int.from_bytes(body[3:5], "big")
                return body[5 : 5 + nlen].decode("ascii", "replace")
            p += 4 + elen
    except IndexError:
        return None
    return None


HEAD_TIMEOUT = 10.0  # s for a new connection's first bytes (the route is chosen by them)


def _arg_path(path: str) -> str:
    """A listener's path as a command-line argument: an abstract socket's leading NUL as "@"."""
    return "@" + path[1:] if path.startswith("\0") else path


def _path_arg(arg: str) -> str:
    return "\0" + arg[1:] if arg.startswith("@") else arg


class RemoteAPIFront:
    """The manager's remote API port (2377): routes each TCP connection, by its first bytes and
    without terminating TLS, to the mTLS, join (server TLS) or plaintext (root CA only) gRPC
    listener on unix sockets, then copies bytes both ways. See the module docstring for why.

    The copying runs in a process of its own (`python -m shoal.manager.remoteapi`, `_Front`),
    started by `start` and ended by `close`, and by the kernel when the manager dies, even by
    SIGKILL (`setpriv --pdeathsig KILL`, as the etcd member): every heartbeat, status report and
    assignment of every node passes through it, and as a thread of the manager's process it needed
    the manager's interpreter lock for every read and write. While the manager's event loop
    computes (a scheduling pass of thousands of tasks, a burst of sessions) that lock is its but for
    a switch interval at a time, and each of the relay's system calls waited one out: its round
    trips took 0.06-1 s at the median and up to 11 s, against 2-5 ms in a process of its own
    (bench/frontrelay.py, docs/benchmarks.md). So the agents' HTTP/2 pings, which gRPC's C core
    answers by itself, pass while the manager is busy and tell the agents that it is alive but
    slow, not gone (agents then wait for the heartbeat answer, see `shoal.agent.agent`)."""

    def __init__(self, listen: str, mtls_path: str, join_path: str, plain_path: str,
                 head_timeout: float = HEAD_TIMEOUT) -> None:
        from shoal.manager.ca import JOIN_NAME  # not imported by the front's own process

        self.listen = listen
        self.paths = {"mtls": mtls_path, "join": join_path, "plain": plain_path}
        self.join_name = JOIN_NAME
        self.head_timeout = head_timeout
        self._proc: asyncio.subprocess.Process | None = None

    @property
    def pid(self) -> int | None:
        """The front process's pid while it runs."""
        return self._proc.pid if self._proc is not None and self._proc.returncode is None else None

    async def start(self) -> None:
        """Start the front's process and return once it listens; OSError (naming the address and
        the cause, the port taken, say) when it does not. Call it from the thread that runs the
        event loop for the manager's life: the kernel ends the front when that thread ends."""
        from shoal.manager.etcdmember import SETPRIV  # (the etcd member is started the same way)

        argv = [SETPRIV, "--pdeathsig", "KILL", "--", sys.executable, "-m", "shoal.manager.remoteapi",
                "--parent", str(os.getpid()), "--join-name", self.join_name,
                "--head-timeout", str(self.head_timeout), self.listen,
                *(_arg_path(self.paths[k]) for k in ("mtls", "join", "plain"))]
        self._proc = await asyncio.create_subprocess_exec(*argv, stdin=asyncio.subprocess.DEVNULL,
                                                          stdout=asyncio.subprocess.PIPE)
        assert self._proc.stdout is not None
        try:
            said = (await asyncio.wait_for(self._proc.stdout.readline(), START_TIMEOUT)).decode().strip()
        except TimeoutError:
            said = f"no answer within {START_TIMEOUT:.0f} s"
        if said != "listening":
            await self.close()
            raise OSError(f"the remote API on {self.listen} did not start: {said or 'its process ended'}")
        log.info("remote API listening on %s (front process %d)", self.listen, self._proc.pid)

    async def close(self) -> None:
        """End the front's process (its connections with it) and wait for it."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.terminate()
            try:
                await asyncio.wait_for(proc.wait(), STOP_TIMEOUT)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()


class _Front:
    """The front's process: listens, routes and copies on its own event loop (the protocol
    callbacks `_Client` and `_Upstream`: each chunk read is written to the other side at once, with
    no coroutine, future or task per chunk). A side whose write buffer fills pauses reading on the
    other; an end of stream is passed on as one (half-close)."""

    def __init__(self, listen: str, paths: dict[str, str], join_name: str, head_timeout: float) -> None:
        host, _, port = listen.rpartition(":")
        self.host = host.strip("[]") or "0.0.0.0"
        self.port = int(port)
        self.paths = paths
        self.join_name = join_name
        self.head_timeout = head_timeout
        self._conns: set[_Client] = set()

    async def serve(self, ready: Callable[[], None]) -> None:
        """Listen (OSError as `create_server` raises it), call `ready`, serve until SIGTERM or SIGINT."""
        loop = asyncio.get_running_loop()
        server = await loop.create_server(lambda: _Client(self), self.host, self.port, reuse_address=True)
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        ready()
        await stop.wait()
        server.close()
        for c in list(self._conns):
            c.abort()
        await server.wait_closed()


class _Client(asyncio.Protocol):
    """A connection to 2377: its first bytes choose the route; then each chunk goes upstream."""

    def __init__(self, front: _Front) -> None:
        self.front = front
        self.transport: asyncio.Transport | None = None
        self.up: _Upstream | None = None
        self.head = b""  # bytes read before the upstream connection is there
        self.eof = False
        self.timer: asyncio.TimerHandle | None = None
        self.connecting: asyncio.Task[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.front._conns.add(self)
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.timer = asyncio.get_running_loop().call_later(self.front.head_timeout, self.abort)

    def data_received(self, data: bytes) -> None:
        if self.up is not None and self.up.transport is not None:
            self.up.transport.write(data)
            return
        self.head += data
        if self.connecting is not None:  # routed: the upstream connection is on its way
            return
        route = _route(self.head, self.front.join_name)
        if route is None:  # the first bytes are not all here yet
            return
        if self.timer is not None:
            self.timer.cancel()
        assert self.transport is not None
        self.transport.pause_reading()  # until the upstream connection is there
        self.connecting = asyncio.get_running_loop().create_task(self._connect(route))

    async def _connect(self, route: str) -> None:
        loop = asyncio.get_running_loop()
        try:
            _, up = await loop.create_unix_connection(lambda: _Upstream(self), self.front.paths[route])
        except OSError as e:
            log.debug("remote API: no %s listener: %s", route, e)
            self.abort()
            return
        assert up.transport is not None
        if self.transport is None or self.transport.is_closing():
            up.transport.close()
            return
        self.up = up
        up.transport.write(self.head)
        self.head = b""
        if self.eof and up.transport.can_write_eof():
            up.transport.write_eof()
        self.transport.resume_reading()

    def eof_received(self) -> bool:
        self.eof = True
        if self.up is not None and self.up.transport is not None and self.up.transport.can_write_eof():
            self.up.transport.write_eof()
        self.close_if_done()
        return True  # half-closed: the answer may still come back

    def close_if_done(self) -> None:
        """Both ways ended: close both connections (once what is buffered is written)."""
        if self.eof and self.up is not None and self.up.eof:
            if self.transport is not None:
                self.transport.close()
            if self.up.transport is not None:
                self.up.transport.close()

    def pause_writing(self) -> None:  # the client is slow: stop reading upstream
        if self.up is not None and self.up.transport is not None:
            self.up.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.up is not None and self.up.transport is not None:
            self.up.transport.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        self.front._conns.discard(self)
        if self.timer is not None:
            self.timer.cancel()
        if self.up is not None and self.up.transport is not None:
            self.up.transport.close()
        self.transport = None

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()
        if self.up is not None and self.up.transport is not None:
            self.up.transport.abort()


class _Upstream(asyncio.Protocol):
    """The unix socket connection to the chosen gRPC listener: each chunk goes back to the client."""

    def __init__(self, client: _Client) -> None:
        self.client = client
        self.transport: asyncio.Transport | None = None
        self.eof = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        if self.client.transport is not None:
            self.client.transport.write(data)

    def eof_received(self) -> bool:
        self.eof = True
        t = self.client.transport
        if t is not None and t.can_write_eof():
            t.write_eof()
        self.client.close_if_done()
        return True

    def pause_writing(self) -> None:  # the listener is slow: stop reading the client
        if self.client.transport is not None:
            self.client.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.client.transport is not None:
            self.client.transport.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.client.transport is not None:
            self.client.transport.close()
        self.transport = None


def _route(head: bytes, join_name: str) -> str | None:
    """The route of a connection by its first bytes: "join" (TLS with SNI `join_name`), "mtls"
    (other TLS), "plain" (anything else: HTTP/2 in clear); None while the TLS record holding the
    ClientHello is not complete yet."""
    if len(head) < 5:
        return None
    if head[0] != 0x16:  # not a TLS handshake record
        return "plain"
    if len(head) < 5 + int.from_bytes(head[3:5], "big"):
        return None
    return "join" if _client_hello_sni(head) == join_name else "mtls"


def main(argv: list[str] | None = None) -> int:
    """The front's process (`RemoteAPIFront.start` runs it): prints "listening" once it listens,
    or "error: ..." and exits 1."""
    ap = argparse.ArgumentParser(prog="python -m shoal.manager.remoteapi")
    ap.add_argument("--parent", type=int, required=True, help="the manager's pid")
    ap.add_argument("--join-name", required=True)
    ap.add_argument("--head-timeout", type=float, default=HEAD_TIMEOUT)
    ap.add_argument("listen")
    ap.add_argument("paths", nargs=3, metavar="PATH", help="the mtls, join and plain listeners (@name: abstract)")
    a = ap.parse_args(argv)
    if os.getppid() != a.parent:  # the manager died before the kernel was told to end this process with it
        return 1
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s remote-api-front: %(message)s")
    paths = dict(zip(("mtls", "join", "plain"), (_path_arg(p) for p in a.paths), strict=True))
    front = _Front(a.listen, paths, a.join_name, a.head_timeout)
    try:
        asyncio.run(front.serve(lambda: print("listening", flush=True)))
    except OSError as e:
        print(f"error: {e}", flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
