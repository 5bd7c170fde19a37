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
import logging
import socket

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


class RemoteAPIFront:
    """The manager's remote API port (2377): routes each TCP connection, by its first bytes and
    without terminating TLS, to the mTLS, join (server TLS) or plaintext (root CA only) gRPC
    listener on unix sockets, then copies bytes both ways. See the module docstring for why."""

    def __init__(self, listen: str, mtls_path: str, join_path: str, plain_path: str) -> None:
        host, _, port = listen.rpartition(":")
        self.host = host.strip("[]") or "0.0.0.0"
        self.port = int(port)
        self.paths = {"mtls": mtls_path, "join": join_path, "plain": plain_path}
        self._server: asyncio.base_events.Server | None = None
        self._conns: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, self.host, self.port, reuse_address=True)
        log.info("remote API listening on %s:%d", self.host, self.port)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for t in list(self._conns):
            t.cancel()
        if self._conns:
            await asyncio.gather(*self._conns, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._conns.add(task)
        try:
            await self._route(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError, TimeoutError, OSError):
            pass
        except asyncio.CancelledError:  # close(): this handler task ends here (asyncio logs a
            pass  # cancelled connection handler as an error otherwise)
        finally:
            self._conns.discard(task)
            writer.close()

    async def _route(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        sock = writer.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        head = await asyncio.wait_for(reader.readexactly(5), 10)
        if head[0] == 0x16:  # TLS handshake record: read the whole ClientHello record
            body = await asyncio.wait_for(reader.readexactly(int.from_bytes(head[3:5], "big")), 10)
            head += body
            route = "join" if _client_hello_sni(head) == JOIN_NAME else "mtls"
        else:
            route = "plain"
        up_r, up_w = await asyncio.open_unix_connection(self.paths[route])
        try:
            up_w.write(head)
            await asyncio.gather(_pump(reader, up_w), _pump(up_r, writer))
        finally:
            up_w.close()


async def _pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
    try:
        while data := await src.read(65536):
            dst.write(data)
            await dst.drain()
    finally:
        if dst.can_write_eof():
            try:
                dst.write_eof()
            except OSError:
                pass
