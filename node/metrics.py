"""swarmd's metrics endpoint (`--metrics-addr ADDR:PORT`, off by default as in Docker).

`start` creates one `prometheus_client` registry holding the metrics of every package
(`shoal.manager.metrics`, `shoal.agent.metrics`, `shoal.netdriver.metrics`) and swarmd's process
metrics (`process_*`: resident memory, CPU seconds, open fds), and serves it over HTTP/1.1 on asyncio
streams, in the event loop that runs everything else (so the scrape-time gauges read the live
objects without locks):

- `GET /metrics`: everything above, in the Prometheus text exposition format 0.0.4;
- `GET /metrics/etcd`: on a manager, its etcd member's own /metrics, relayed as the member serves
  them (the member's client endpoint is a unix socket in the state dir, never a TCP port); 404 on a
  node that runs no manager role, 502 when the member does not answer.

Nothing here is imported, and `prometheus_client` is not loaded, unless `--metrics-addr` is given
(it costs ~2.4 MB resident: tests/manager/test_metrics_scrape.py checks a worker without it).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

    from shoal.manager.manager import Manager
    from shoal.netdriver.networkdb import NetworkDB

log = logging.getLogger(__name__)

READ_TIMEOUT = 10.0  # seconds a client has to send its request line and headers


@dataclass
class Sources:
    """Where the scrape-time gauges look: the live manager role and gossip (None when not running)."""

    manager: Callable[[], Manager | None]
    gossip: Callable[[], NetworkDB | None]


def build_registry(sources: Sources) -> CollectorRegistry:
    """A registry with every package's metrics enabled (once per process)."""
    from prometheus_client import CollectorRegistry, ProcessCollector, disable_created_metrics

    from shoal.agent import metrics as agent_metrics
    from shoal.manager import metrics as manager_metrics
    from shoal.netdriver import metrics as gossip_metrics

    disable_created_metrics()  # no `*_created` series: they double the output and say only the start time
    reg = CollectorRegistry()
    ProcessCollector(registry=reg)
    manager_metrics.enable(reg, sources.manager)
    agent_metrics.enable(reg)
    gossip_metrics.enable(reg, sources.gossip)
    return reg


class MetricsServer:
    """The HTTP endpoint. `start()` listens; `stop()` closes the listener and open connections."""

    def __init__(self, host: str, port: int, registry: CollectorRegistry, sources: Sources) -> None:
        self.host, self.port = host, port
        self.registry = registry
        self.sources = sources
        self._server: asyncio.Server | None = None
        self._conns: set[asyncio.Task[Any]] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, self.host, self.port)

    @property
    def address(self) -> tuple[str, int]:
        assert self._server is not None
        return self._server.sockets[0].getsockname()[:2]

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            for t in list(self._conns):
                t.cancel()
            await asyncio.gather(*self._conns, return_exceptions=True)
            await self._server.wait_closed()
            self._server = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._conns.add(task)
        try:
            async with asyncio.timeout(READ_TIMEOUT):
                line = (await reader.readline()).decode("latin-1").split()
                while (await reader.readline()).strip():
                    pass
            if len(line) != 3 or not line[2].startswith("HTTP/1."):
                await self._respond(writer, 400, b"bad request\n")
                return
            method, target = line[0], line[1].split("?", 1)[0]
            if method not in ("GET", "HEAD"):
                await self._respond(writer, 405, b"only GET and HEAD\n", head=False, allow=True)
                return
            status, body, ctype = await self._route(target)
            await self._respond(writer, status, body, ctype, head=method == "HEAD")
        except (TimeoutError, ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            self._conns.discard(task)
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    async def _route(self, target: str) -> tuple[int, bytes, str]:
        from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4, generate_latest

        text = "text/plain; charset=utf-8"
        if target == "/metrics":
            return 200, generate_latest(self.registry), CONTENT_TYPE_PLAIN_0_0_4
        if target == "/metrics/etcd":
            manager = self.sources.manager()
            member = manager.member if manager is not None else None
            if member is None:
                return 404, b"this node runs no manager role, so no etcd member: scrape a manager\n", text
            from shoal.manager.etcdmember import EtcdError

            try:
                return 200, await member.metrics_text(), CONTENT_TYPE_PLAIN_0_0_4
            except EtcdError as e:
                return 502, f"{e}\n".encode(), text
        return 404, b"not found: /metrics and /metrics/etcd are served here\n", text

    @staticmethod
    async def _respond(writer: asyncio.StreamWriter, status: int, body: bytes,
                       ctype: str = "text/plain; charset=utf-8", head: bool = False, allow: bool = False) -> None:
        reason = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
                  502: "Bad Gateway"}[status]
        headers = [f"HTTP/1.1 {status} {reason}", f"Content-Type: {ctype}", f"Content-Length: {len(body)}",
                   "Connection: close"]
        if allow:
            headers.append("Allow: GET, HEAD")
        writer.write(("\r\n".join(headers) + "\r\n\r\n").encode("latin-1") + (b"" if head else body))
        await writer.drain()


async def start(addr: str, sources: Sources) -> MetricsServer:
    """Parse `addr` (HOST:PORT, [IPv6]:PORT), build the registry and serve it."""
    host, sep, port = addr.rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise ValueError(f"--metrics-addr {addr!r}: give ADDR:PORT, e.g. 127.0.0.1:9323")
    host = host.strip("[]")
    server = MetricsServer(host, int(port), build_registry(sources), sources)
    await server.start()
    log.info("metrics at http://%s/metrics", addr)
    return server
