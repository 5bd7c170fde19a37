"""Real etcd members for tests: `EtcdCluster(root, n)` is bench/etcdcluster.py's `Cluster` (n
members, peer mutual TLS with manager certificates of `root`, one store per `store()` call) on an
event loop of its own, under a fresh short dir in /tmp; `etcd_cluster(root, n)` is the generator
fixtures wrap (always stopped and removed afterwards)."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import sys
import tempfile
import time
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import grpc

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from etcdcluster import CLUSTER, Cluster  # noqa: E402

from shoal.manager import ca  # noqa: E402
from shoal.proto import etcd_pb2_grpc  # noqa: E402

T = TypeVar("T")
__all__ = ["CLUSTER", "EtcdCluster", "etcd_cluster"]


class EtcdCluster(Cluster):
    def __init__(self, root: ca.RootCA, n: int) -> None:
        self.base = Path(tempfile.mkdtemp(prefix="es", dir="/tmp"))
        super().__init__(root, self.base, n)
        self.loop = asyncio.new_event_loop()
        self._channels: list[grpc.aio.Channel] = []

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 120) -> T:
        async def bounded() -> T:
            async with asyncio.timeout(timeout):
                return await coro

        return self.loop.run_until_complete(bounded())

    async def kv(self, i: int = 0) -> etcd_pb2_grpc.KVStub:
        """A raw etcd KV client of member `i` (its channel closes with the cluster)."""
        ch = grpc.aio.insecure_channel(self.members[i].client_target)
        self._channels.append(ch)
        return etcd_pb2_grpc.KVStub(ch)

    async def leader_index(self) -> int:
        """The index of the member that is the Raft leader now (all running members agree)."""
        deadline = time.monotonic() + 10
        while True:
            ids, leaders = {}, set()
            for i, m in enumerate(self.members):
                if m.pid is None:
                    continue
                with contextlib.suppress(grpc.aio.AioRpcError):
                    st = await m.status()
                    ids[st.header.member_id] = i
                    leaders.add(st.leader)
            if len(leaders) == 1 and (lid := leaders.pop()) in ids:
                return ids[lid]
            if time.monotonic() > deadline:
                raise AssertionError("the members do not agree on a leader")
            await asyncio.sleep(0.05)

    async def aclose(self) -> None:
        for ch in self._channels:
            with contextlib.suppress(Exception):
                await ch.close()
        await self.stop()

    def close(self) -> None:
        try:
            self.loop.run_until_complete(self.aclose())
            self.loop.run_until_complete(_cancel_all())
            self.loop.run_until_complete(self.loop.shutdown_asyncgens())
        finally:
            self.loop.close()
            shutil.rmtree(self.base, ignore_errors=True)


async def _cancel_all() -> None:
    pending = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
    for t in pending:
        t.cancel()
    await asyncio.gather(*pending, return_exceptions=True)


def etcd_cluster(root: ca.RootCA, n: int) -> Iterator[EtcdCluster]:
    c = EtcdCluster(root, n)
    try:
        c.run(c.start(stores=False), timeout=60)
        yield c
    finally:
        c.close()
