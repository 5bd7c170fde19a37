"""Gossip key rotation end to end, with nothing mocked: the leader's KeyManager rotates the cluster's
gossip keys in a LocalStore every second, a real Dispatcher (gRPC on loopback) pushes every change in
its session messages, and each of four real NetworkDB members (loopback UDP/TCP, short SWIM timeouts)
applies them with ``set_bootstrap_keys`` the way ``agent/network.py`` does, while they gossip. One
member applies every change 0.4 s late, as a slow session would: the order of the keys must cover that.

No member may ever see another as anything but alive, no packet may be refused, and the tables must
converge. Then one member stops applying key changes: two rotations later it is cut off (the others
suspect it), which shows that the observation above would catch a partition.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import grpc
import pytest
from helpers.aio import aiotest
from helpers.waiting import wait_for_async as until
from test_gossip import PORT, fresh_addrs

from shoal.manager.dispatcher import NODE_ID_KEY, Dispatcher
from shoal.manager.keymanager import KeyManager, gossip_keys
from shoal.manager.store import LocalStore
from shoal.netdriver.networkdb import GossipConfig, NetworkDB
from shoal.proto import dispatcher_pb2, dispatcher_pb2_grpc, objects_pb2, specs_pb2, types_pb2

pytestmark = pytest.mark.integration  # real sockets, a gRPC server, several gossip nodes

N = 4
LAG = 0.4  # r2 applies every key change this late: the others send with a new key meanwhile
SHORT = GossipConfig(probe_interval=0.2, probe_timeout=0.1, suspicion_mult=2.0, suspicion_max_timeout_mult=1.0,
                     gossip_interval=0.05, push_pull_interval=2.0, table_sync_interval=1.0)


async def new_store() -> LocalStore:
    """A cluster as swarmd makes one (one 16-byte gossip key, lamport time 1), rotation every second."""
    st = LocalStore()
    cl = objects_pb2.Cluster(spec=specs_pb2.ClusterSpec(annotations=types_pb2.Annotations(name="default")))
    cl.spec.network_encryption.key_rotation_interval.FromNanoseconds(10**9)
    cl.network_bootstrap_keys.add(subsystem="networking:gossip", key=bytes(range(16)), lamport_time=1)
    await st.update(lambda tx: tx.create(cl))
    for i in range(N):
        await st.update(lambda tx, i=i: tx.create(objects_pb2.Node(id=f"r{i}", spec=specs_pb2.NodeSpec())))
    return st


@contextlib.asynccontextmanager
async def dispatcher(st: LocalStore) -> AsyncIterator[str]:
    server = grpc.aio.server()
    dispatcher_pb2_grpc.add_DispatcherServicer_to_server(Dispatcher(st, insecure_node_id_from_metadata=True), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        await server.stop(0)


class Agent:
    """One member: its session with the dispatcher, and the keys of every message applied to its gossip."""

    def __init__(self, g: NetworkDB, addr: str, lag: float = 0.0) -> None:
        self.g = g
        self.lag = lag  # apply each change this late (a slow session), less than one rotation interval
        self.channel = grpc.aio.insecure_channel(addr)
        self.frozen = False  # True: stop applying key changes (a node cut off from the managers)
        self.applied = 0
        self.task: asyncio.Task | None = None

    async def open(self) -> None:
        stub = dispatcher_pb2_grpc.DispatcherStub(self.channel)
        call = stub.Session(dispatcher_pb2.SessionRequest(description=types_pb2.NodeDescription(hostname=self.g.node_id)),
                            metadata=((NODE_ID_KEY, self.g.node_id),))
        first = await call.read()
        self.g.set_bootstrap_keys(first.network_bootstrap_keys)
        self.applied += 1
        self.task = asyncio.create_task(self._follow(call))

    async def _follow(self, call) -> None:
        while (msg := await call.read()) is not grpc.aio.EOF:
            await asyncio.sleep(self.lag)
            if not self.frozen:
                self.g.set_bootstrap_keys(msg.network_bootstrap_keys)
                self.applied += 1

    async def close(self) -> None:
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task
        await self.channel.close()


@aiotest
async def test_gossip_key_rotation_marks_no_member_suspect_and_tables_converge():
    st = await new_store()
    addrs = fresh_addrs(N)
    nodes = [NetworkDB(f"r{i}", a, a, port=PORT, keys=[bytes(range(16))], config=SHORT) for i, a in enumerate(addrs)]
    seen: list[tuple[str, str, str]] = []  # (observer, member, state): every state change any member saw
    for g in nodes:
        g.add_member_listener(lambda m, g=g: seen.append((g.node_id, m.node_id, m.state_name)))
    agents: list[Agent] = []
    km_task: asyncio.Task | None = None
    started: list[NetworkDB] = []
    async with dispatcher(st) as addr:
        try:
            for g in nodes:
                await g.start()
                started.append(g)
            for g in nodes[1:]:
                assert await g.join([f"{addrs[0]}:{PORT}"]) == 1
            for g in nodes:
                await g.join_network("netK")
            await until(lambda: all(len(g.network_nodes("netK")) == N - 1 for g in nodes), "all on netK")
            for i, g in enumerate(nodes):
                agents.append(Agent(g, addr, lag=LAG if i == 2 else 0.0))
                await agents[-1].open()
            initial = {k.key for k in gossip_keys(st.cluster())}

            # the leader's key manager: tops the one key up to three, then rotates every second
            km_task = asyncio.create_task(KeyManager(st).run())
            puts = 0

            def newest() -> int:
                return gossip_keys(st.cluster())[-1].lamport_time

            def healthy() -> None:  # the loops in tasks: their errors surface here
                for t in [km_task, *(a.task for a in agents)]:
                    if t.done():
                        t.result()
                        pytest.fail(f"{t.get_name()} ended")

            while newest() < 7:  # top-up to 1..3, then four rotations: not one original key left
                healthy()
                for g in nodes:
                    g.put("t", "netK", f"{g.node_id}-{puts}", b"%d" % puts)
                puts += 1
                await asyncio.sleep(0.1)
            ring = gossip_keys(st.cluster())
            assert not initial & {k.key for k in ring}
            await until(lambda: all(g.keyring.primary == ring[1].key and set(g.keyring.keys) == {k.key for k in ring}
                                    for g in nodes), "every member holds the last ring, sending with its second key")
            want = {f"{g.node_id}-{p}" for g in nodes for p in range(puts)}
            await until(lambda: all(set(g.entries("t", "netK")) == want for g in nodes), "tables converged")
            healthy()
            assert all(a.applied >= 5 for a in agents), [a.applied for a in agents]
            assert [s for s in seen if s[2] != "alive"] == []
            assert [g.dropped_packets for g in nodes] == [0] * N
            assert all(m.state_name == "alive" for g in nodes for m in g.members())

            # the control: r3 no longer applies key changes; two rotations later it is cut off
            agents[3].frozen = True
            frozen_at = newest()
            await until(lambda: any(s[1] == "r3" and s[2] in ("suspect", "dead") for s in seen),
                        "the members suspect r3, which missed two rotations")
            assert newest() >= frozen_at + 2
            assert nodes[0].dropped_packets > 0
        finally:
            if km_task is not None:
                km_task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await km_task
            for a in agents:
                await a.close()
            for g in started:
                await g.stop()

