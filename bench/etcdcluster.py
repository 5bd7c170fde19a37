"""Real etcd members on loopback for benchmarks and tests: `Cluster(root, base, n)` -- n members
(static bootstrap, peer mutual TLS with manager certificates of `root`, member i on 127.0.0.(i+1)),
supervised, with one `EtcdStore` per member once started."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from pathlib import Path

import grpc

from shoal.manager import ca
from shoal.manager.etcdmember import EtcdConfig, EtcdMember
from shoal.manager.etcdstore import EtcdStore
from shoal.proto import types_pb2

CLUSTER = "clusteretcdbench"  # the cluster id in the members' certificates: make `root` with it


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class Cluster:
    """n members (static bootstrap) on 127.0.0.1..n under `base`, supervised, one store per member."""

    def __init__(self, root: ca.RootCA, base: Path, n: int) -> None:
        self.members: list[EtcdMember] = []
        self.stores: list[EtcdStore] = []
        self.supervisors: list[asyncio.Task[None]] = []
        peers = []
        for i in range(n):
            host = f"127.0.0.{i + 1}"
            peers.append((f"m{i}", f"https://{host}:{free_port(host)}"))
        for i, (name, url) in enumerate(peers):
            key = ca.new_key()[1]
            cert = root.issue(ca.make_csr(key), name, types_pb2.MANAGER, CLUSTER, ips=[f"127.0.0.{i + 1}"])
            self.members.append(EtcdMember(EtcdConfig(
                dir=base / name, name=name, peer_url=url, cert_pem=cert, key_pem=key, ca_pem=root.cert_pem,
                initial_cluster=tuple(peers) if n > 1 else (),
            )))

    async def start(self, stores: bool = True) -> None:
        await asyncio.gather(*(m.start(timeout=60) for m in self.members))
        self.supervisors = [asyncio.create_task(m.run(), name=f"etcd-{m.name}") for m in self.members]
        if stores:
            for i in range(len(self.members)):
                await self.store(i)

    async def store(self, i: int = 0, **kw: object) -> EtcdStore:
        """Another started store on member `i` (closed with the cluster)."""
        s = EtcdStore(self.members[i].client_target, **kw)  # type: ignore[arg-type]
        self.stores.append(s)
        await s.start()
        return s

    async def leader(self) -> int:
        """Index of the Raft leader once every running member agrees on it."""
        while True:
            ids, leaders = {}, set()
            for i, m in enumerate(self.members):
                with contextlib.suppress(grpc.aio.AioRpcError):
                    st = await m.status(timeout=1)
                    ids[st.header.member_id] = i
                    leaders.add(st.leader)
            if len(ids) == len(self.members) and len(leaders) == 1 and (lid := leaders.pop()) in ids:
                return ids[lid]
            await asyncio.sleep(0.05)

    async def stop(self) -> None:
        for s in self.stores:
            with contextlib.suppress(Exception):
                await s.close()
        for m in self.members:  # one by one: members stopped together wait on each other
            with contextlib.suppress(Exception):
                await m.stop(timeout=5)
        for t in self.supervisors:
            t.cancel()
        await asyncio.gather(*self.supervisors, return_exceptions=True)
