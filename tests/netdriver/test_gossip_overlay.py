"""Gossip → overlay: endpoint records put on one node's gossip become FDB/neighbour entries and VIP
backends of the other node's real overlay driver (two namespace hosts, real VXLAN), and go away
when the record is deleted or its node dies."""

from __future__ import annotations

import asyncio
import functools
import json
import os

import pytest

from shoal.netdriver.gossip import ENDPOINT_TABLE, Gossip
from shoal.netdriver.overlay import OverlayDriver, mac_from_ip
from shoal.netdriver.peersync import PeerSync
from shoal.proto import objects_pb2
from shoal.proto.gossip_pb2 import EndpointRecord

pytestmark = pytest.mark.integration

PORT = 20000 + (os.getpid() + 11) % 20000
NET = 10 + (os.getpid() + 5) % 200
NID = "netgossipoverlay0000000001"
VIP = "198.19.77.100"
IP1, IP2, IP3 = "198.19.77.2", "198.19.77.3", "198.19.77.4"


def aiotest(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        return asyncio.run(fn(*args, **kwargs))

    return wrapper


def network() -> objects_pb2.Network:
    n = objects_pb2.Network(id=NID)
    n.driver_state.vni = 4777
    c = n.ipam.configs.add()
    c.subnet, c.gateway = "198.19.77.0/24", "198.19.77.1"
    n.spec.annotations.name = "gossipnet"
    return n


def attachment(ip: str) -> objects_pb2.NetworkAttachment:
    a = objects_pb2.NetworkAttachment(addresses=[f"{ip}/24"], mac=mac_from_ip(ip))
    a.network.CopyFrom(network())
    return a


def record(task: str, ip: str, vtep: str) -> bytes:
    return EndpointRecord(task_id=task, task_name=f"web.{task}", service_name="web", service_id="svc",
                          ip=ip, mac=mac_from_ip(ip), vtep=vtep, vip=VIP).SerializeToString()


async def until(pred, what: str, timeout: float = 30.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not await pred():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"gave up waiting for: {what}")
        await asyncio.sleep(0.1)


@aiotest
async def test_gossip_feeds_overlay_peers_and_vips(nslab, netprogs):
    # pyroute2's synchronous API cannot run on a running event loop: lab and driver calls go to threads
    lab = await asyncio.to_thread(nslab, 2)
    h1, h2 = lab.hosts
    drivers = [await asyncio.to_thread(OverlayDriver, f"node{i}", h.addr, f"{lab.prefix}n{i}", host_netns=h.path,
                                       gw_subnet="198.19.251.0/24")
               for i, h in enumerate(lab.hosts, 1)]
    d1, d2 = drivers
    g1 = Gossip("node1", f"127.{NET}.252.1", f"127.{NET}.252.1", port=PORT)
    g2 = Gossip("node2", f"127.{NET}.252.2", f"127.{NET}.252.2", port=PORT)
    tasks: list[asyncio.Task] = []
    run = functools.partial(asyncio.to_thread, lab.run)
    try:
        await g1.start()
        await g2.start()
        assert await g2.join([f"127.{NET}.252.1:{PORT}"]) == 1
        c1, c2, c3 = [await asyncio.to_thread(lab.add_netns, c) for c in ("c1", "c2", "c3")]
        await asyncio.to_thread(d1.ensure_network, network())
        await asyncio.to_thread(d2.ensure_network, network())
        await asyncio.to_thread(d1.attach, "task1", c1, [attachment(IP1)])
        await asyncio.to_thread(d2.attach, "task2", c2, [attachment(IP2)])
        await asyncio.to_thread(d2.attach, "task3", c3, [attachment(IP3)])
        for g in (g1, g2):
            await g.join_network(NID)
        syncs = [PeerSync(g1, d1), PeerSync(g2, d2)]
        tasks = [asyncio.create_task(s.run()) for s in syncs]
        g1.put(ENDPOINT_TABLE, NID, "task1", record("task1", IP1, h1.addr))
        g2.put(ENDPOINT_TABLE, NID, "task2", record("task2", IP2, h2.addr))
        g2.put(ENDPOINT_TABLE, NID, "task3", record("task3", IP3, h2.addr))

        async def neigh(d: OverlayDriver) -> set[str]:
            return {ip for ip, _ in (await asyncio.to_thread(d.peer_entries, NID))[1]}

        async def both_programmed() -> bool:
            return await neigh(d1) == {IP2, IP3} and await neigh(d2) == {IP1}

        await until(both_programmed, "peers programmed from gossip")
        fdb1 = (await asyncio.to_thread(d1.peer_entries, NID))[0]
        assert (mac_from_ip(IP2), h2.addr) in fdb1
        r = await run(c1, ["busybox", "ping", "-c", "2", "-i", "0.2", "-W", "2", IP2], check=False)
        assert r.returncode == 0, r.stdout + r.stderr

        # the VIP balances over the three tasks, from a container on either host
        for c, tag in ((c1, "t1"), (c2, "t2"), (c3, "t3")):
            await asyncio.to_thread(lab.spawn_ready, c, netprogs.tag_server(tag, 8080))
        out = json.loads((await run(c1, netprogs.tag_client(VIP, 8080, 9))).stdout)
        assert set(out) == {"t1", "t2", "t3"}, out

        # a task removed: its record deleted on its node → gone from the other node's kernel and VIP
        g2.delete(ENDPOINT_TABLE, NID, "task3")

        async def task3_gone() -> bool:
            return await neigh(d1) == {IP2}

        await until(task3_gone, "task3's peer entry removed")
        out = json.loads((await run(c1, netprogs.tag_client(VIP, 8080, 6))).stdout)
        assert set(out) == {"t1", "t2"}, out

        # node2 dies (no leave): node1 purges its endpoints, peers and backends
        tasks[1].cancel()
        await g2.stop()

        async def node2_gone() -> bool:
            return await neigh(d1) == set()

        await until(node2_gone, "node2's peers purged after it died")
        out = json.loads((await run(c1, netprogs.tag_client(VIP, 8080, 3))).stdout)
        assert out == {"t1": 3}, out
    finally:
        for t in tasks:
            t.cancel()
        for t in tasks:
            try:
                await t
            except (asyncio.CancelledError, Exception):
                pass
        await g1.stop()
        await g2.stop()
        errors = []
        for d in drivers:
            try:
                await asyncio.to_thread(d.cleanup)
            except Exception as e:
                errors.append(e)
        if errors:
            raise errors[0]
