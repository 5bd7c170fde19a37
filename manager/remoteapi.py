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

This module owns the routing and the byte copying only; certificates and credentials are
`shoal.manager.ca`'s.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import threading

from shoal.manager.ca import JOIN_NAME

log = logging.getLogger(__name__)


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


class RemoteAPIFront:
    """The manager's remote API port (2377): routes each TCP connection, by its first bytes and
    without terminating TLS, to the mTLS, join (server TLS) or plaintext (root CA only) gRPC
    listener on unix sockets, then copies bytes both ways. See the module docstring for why.

    The copying is done by protocol callbacks (`_Client`, `_Upstream`): each chunk read is written
    to the other side at once, with no coroutine, future or task per chunk, as every heartbeat of
    every node passes through here. A side whose write buffer fills pauses reading on the other; an
    end of stream is passed on as one (half-close).

    It runs on an event loop of its own, in its own thread (`start` and `close` are called from the
    manager's loop): while the manager's loop is busy (a scheduling pass of thousands of tasks, a
    burst of sessions), bytes still pass within a GIL switch interval, so the agents' HTTP/2 pings,
    which gRPC's C core answers by itself, tell them that this manager is alive but slow, not gone
    (agents then wait for the heartbeat answer, see `shoal.agent.agent`)."""

    def __init__(self, listen: str, mtls_path: str, join_path: str, plain_path: str) -> None:
        host, _, port = listen.rpartition(":")
        self.host = host.strip("[]") or "0.0.0.0"
        self.port = int(port)
        self.paths = {"mtls": mtls_path, "join": join_path, "plain": plain_path}
        self._server: asyncio.base_events.Server | None = None
        self._conns: set[_Client] = set()  # touched on the front's own loop only
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    async def start(self) -> None:
        """Listen (raises OSError as `create_server` does, the port taken, say)."""
        loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=loop.run_forever, name="remote-api-front", daemon=True)
        self._thread.start()
        self._loop = loop
        try:
            await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(self._listen(), loop))
        except BaseException:
            await self.close()
            raise
        log.info("remote API listening on %s:%d", self.host, self.port)

    async def _listen(self) -> None:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(lambda: _Client(self), self.host, self.port, reuse_address=True)

    async def close(self) -> None:
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        self._loop = self._thread = None
        with contextlib.suppress(RuntimeError):  # (its loop already stopped)
            await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(self._close(), loop))
        loop.call_soon_threadsafe(loop.stop)
        await asyncio.to_thread(thread.join)
        loop.close()

    async def _close(self) -> None:
        if self._server is not None:
            self._server.close()
        for c in list(self._conns):
            c.abort()
        if self._server is not None:
            await self._server.wait_closed()


class _Client(asyncio.Protocol):
    """A connection to 2377: its first bytes choose the route; then each chunk goes upstream."""

    def __init__(self, front: RemoteAPIFront) -> None:
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
        self.timer = asyncio.get_running_loop().call_later(HEAD_TIMEOUT, self.abort)

    def data_received(self, data: bytes) -> None:
        if self.up is not None and self.up.transport is not None:
            self.up.transport.write(data)
            return
        self.head += data
        if self.connecting is not None:  # routed: the upstream connection is on its way
            return
        route = _route(self.head)
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


def _route(head: bytes) -> str | None:
    """The route of a connection by its first bytes: "join" (TLS with SNI `ca.JOIN_NAME`), "mtls"
    (other TLS), "plain" (anything else: HTTP/2 in clear); None while the TLS record holding the
    ClientHello is not complete yet."""
    if len(head) < 5:
        return None
    if head[0] != 0x16:  # not a TLS handshake record
        return "plain"
    if len(head) < 5 + int.from_bytes(head[3:5], "big"):
        return None
    return "join" if _client_hello_sni(head) == JOIN_NAME else "mtls"
