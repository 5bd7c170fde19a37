"""agent._connected: how an agent waits for a manager's channel. A refused connection is left at once
(the message says so, no timeout involved); a manager that accepts the connection but never answers
is left after CONNECT_TIMEOUT; a live one is READY. Plain gRPC on loopback, no root."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from helpers.aio import run_bounded

from shoal.agent import agent as agent_mod
from shoal.lab.registry import free_port


def test_refused_is_left_at_once_silent_after_the_timeout_live_is_ready(monkeypatch) -> None:
    monkeypatch.setattr(agent_mod, "CONNECT_TIMEOUT", 30.0)  # a refusal must not wait for it

    async def body() -> None:
        dead = f"127.0.0.1:{free_port('127.0.0.1')}"
        async with grpc.aio.insecure_channel(dead) as ch:
            with pytest.raises(ConnectionError, match=f"manager {dead} refused the connection"):
                await asyncio.wait_for(agent_mod._connected(ch, dead), 20)

        async def silent(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            await r.read()  # accepts, reads, never answers (HTTP/2 settings never come)
            w.close()

        srv = await asyncio.start_server(silent, "127.0.0.1", 0)
        mute = f"127.0.0.1:{srv.sockets[0].getsockname()[1]}"
        monkeypatch.setattr(agent_mod, "CONNECT_TIMEOUT", 0.5)
        try:
            async with grpc.aio.insecure_channel(mute) as ch:
                with pytest.raises(ConnectionError, match=f"manager {mute} unreachable within 0.5 s"):
                    await agent_mod._connected(ch, mute)
            async with grpc.aio.insecure_channel(mute) as ch:  # a timeout of the caller's
                with pytest.raises(ConnectionError, match=f"manager {mute} unreachable within 0.3 s"):
                    await agent_mod._connected(ch, mute, 0.3)
        finally:
            srv.close()

        server = grpc.aio.server()
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
                await agent_mod._connected(ch, f"127.0.0.1:{port}")
                assert ch.get_state() == grpc.ChannelConnectivity.READY
        finally:
            await server.stop(0)

    run_bounded(body())
