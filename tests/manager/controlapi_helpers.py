"""Serve a ControlServicer over a LocalStore on a unix socket, with a real grpc.aio client."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import grpc

from shoal.manager.controlapi import ControlServicer, add_to_server
from shoal.manager.store import LocalStore
from shoal.proto import control_pb2_grpc


@dataclass
class Served:
    store: LocalStore
    stub: control_pb2_grpc.ControlStub
    socket: str


@contextlib.asynccontextmanager
async def served(tmp_path: Path, store: LocalStore | None = None, manager: object = None) -> AsyncIterator[Served]:
    store = store or LocalStore()
    server = grpc.aio.server()
    add_to_server(ControlServicer(store, manager), server)
    sock = str(tmp_path / "control.sock")
    server.add_insecure_port(f"unix://{sock}")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"unix://{sock}") as channel:
            yield Served(store, control_pb2_grpc.ControlStub(channel), sock)
    finally:
        await server.stop(None)
