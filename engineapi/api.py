"""The Engine API as swarmd serves it: every module's routes on one unix socket.

    server = await start(path, node, control_socket)   # an asyncio.Server
    ...
    await stop(server)

Modules and what they serve: `system` (/_ping, /version, /info, /swarm), `nodes`, `services`
(/services, /tasks), `objects` (/networks, /secrets, /configs, /distribution), `logs` (service and
task logs), `events` (/events).
"""

from __future__ import annotations

import asyncio
import os
import ssl
from collections.abc import Callable

from shoal.engineapi import events, logs, nodes, objects, services, system
from shoal.engineapi.server import App, EngineContext, NodeInfo, serve_tls, serve_unix

MODULES = (system, nodes, services, objects, logs, events)


def build_app(ctx: EngineContext) -> App:
    return App([r for m in MODULES for r in m.routes(ctx)], ctx.node.is_manager)


async def start(path: str | os.PathLike[str], node: NodeInfo, control_socket: str | os.PathLike[str]) -> asyncio.Server:
    """Serve the Engine API on the unix socket `path` (0600) for this node; handlers reach the control
    API through `control_socket` while the node is a manager."""
    ctx = EngineContext(node, control_socket)
    server = await serve_unix(path, build_app(ctx))
    server.engine_ctx = ctx  # type: ignore[attr-defined]
    return server


async def start_tls(addr: tuple[str, int], node: NodeInfo, control_socket: str | os.PathLike[str],
                    ssl_ctx: ssl.SSLContext, authorize: Callable[[bytes], str | None]) -> asyncio.Server:
    """Serve the Engine API on TCP with mutual TLS (see server.serve_tls)."""
    ctx = EngineContext(node, control_socket)
    server = await serve_tls(addr[0], addr[1], build_app(ctx), ssl_ctx, authorize)
    server.engine_ctx = ctx  # type: ignore[attr-defined]
    return server


async def stop(server: asyncio.Server) -> None:
    server.close()
    await server.wait_closed()
    ctx = getattr(server, "engine_ctx", None)
    if ctx is not None:
        await ctx.close()
