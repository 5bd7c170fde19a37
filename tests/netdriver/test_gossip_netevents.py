"""Network membership events of NetworkDB without sockets: ties of equal Lamport times, and the
entries of a node that left a network (issue 16, item 8: a leave lost for 30 s).

Nodes are NetworkDB objects that are never started: UDP delivery is a direct ``handle_message``
call, and a TCP push-pull is routed in memory to the other node's real push-pull handling
(``SwimMembership.local_state`` then ``merge_remote_state``, as ``_on_stream`` does).
"""

from __future__ import annotations

import asyncio

from helpers.aio import aiotest

from shoal.netdriver.networkdb import ALIVE, Member, NetworkDB
from shoal.proto import gossip_pb2 as pb

NET = "netX"


def wire(nodes: list[NetworkDB]) -> dict[str, NetworkDB]:
    """Route every node's stream requests (push-pull) to the node at the address asked for."""
    by_addr = {g.advertise_addr: g for g in nodes}

    for g in nodes:
        async def request(addr: str, port: int, req: pb.Stream) -> pb.Stream:
            peer = by_addr[addr]
            reply = peer.membership.local_state(False, req.push_pull)  # before merging, as _on_stream
            peer.membership.merge_remote_state(req.push_pull)
            return pb.Stream(push_pull=reply)

        g.membership.stream_request = request
    return {g.node_id: g for g in nodes}


async def make(n: int) -> dict[str, NetworkDB]:
    nodes = [NetworkDB(f"n{i}", f"127.0.0.{i + 1}", f"127.0.0.{i + 1}") for i in range(n)]
    byname = wire(nodes)
    for g in nodes:  # what start() does besides binding sockets and starting loops
        m = g.membership
        m._members[g.node_id] = Member(g.node_id, m.advertise_addr, m.port, ALIVE, m.incarnation)
    for g in nodes[1:]:  # a join: membership push-pull with n0, then n0 tells the rest
        await g.membership.push_pull(nodes[0].advertise_addr, nodes[0].port, join=True)
    for g in nodes[1:]:
        await nodes[0].membership.push_pull(g.advertise_addr, g.port, join=False)
    assert all(len(g.membership.alive_members()) == n for g in nodes)
    return byname


async def sync(a: NetworkDB, b: NetworkDB) -> None:
    """a's anti-entropy of its networks with b (NetworkDB._sync over the in-memory stream)."""
    await a._sync(a.membership.member(b.node_id), sorted(a.networks()))


def deliver(g: NetworkDB, msg: pb.Message, source: str) -> None:
    g.handle_message(msg, source)


def net_event(node: str, ltime: int, leave: bool) -> pb.Message:
    return pb.Message(network=pb.NetworkEvent(node=node, network_id=NET, ltime=ltime, leave=leave))


def held(g: NetworkDB, node: str) -> tuple[int, bool]:
    ev = g._node_networks[(node, NET)]
    return ev.ltime, ev.leave


# ----- ties ------------------------------------------------------------------------------------


@aiotest
async def test_equal_ltime_tie_resolves_the_same_in_both_orders_and_push_pull_agrees():
    nodes = await make(2)
    a, b = nodes["n0"], nodes["n1"]
    for g in (a, b):
        await g.join_network(NET)
    # "n7" (not a member: a previous life, or a node far away) announced a join and a leave with
    # one Lamport time; a hears them in one order, b in the other
    join, leave = net_event("n7", 5000, False), net_event("n7", 5000, True)
    deliver(a, join, "n7")
    deliver(a, leave, "n7")
    deliver(b, leave, "n7")
    deliver(b, join, "n7")
    assert held(a, "n7") == held(b, "n7") == (5000, True)  # a leave wins a tie, whatever the order
    # and a divergence made behind the rule's back (an older node) is repaired by push-pull both ways
    a._node_networks[("n7", NET)] = pb.NetworkEvent(node="n7", network_id=NET, ltime=5000, leave=False)
    await sync(a, b)
    assert held(a, "n7") == held(b, "n7") == (5000, True)
    b._node_networks[("n7", NET)] = pb.NetworkEvent(node="n7", network_id=NET, ltime=5000, leave=False)
    await sync(a, b)
    assert held(a, "n7") == held(b, "n7") == (5000, True)


@aiotest
async def test_tie_against_the_owner_is_resolved_by_the_owner_reasserting():
    nodes = await make(2)
    a, b = nodes["n0"], nodes["n1"]
    for g in (a, b):
        await g.join_network(NET)
    # b holds a leave of a (from a previous life of a) with the very ltime of a's current join
    mine = a._node_networks[("n0", NET)].ltime
    b._node_networks[("n0", NET)] = pb.NetworkEvent(node="n0", network_id=NET, ltime=mine, leave=True)
    await sync(b, a)  # a hears it: the leave wins the tie, so a announces its join again, later
    ltime, leave = held(a, "n0")
    assert not leave and ltime > mine
    await sync(a, b)
    assert held(b, "n0") == held(a, "n0")
    assert [m.node_id for m in b.network_nodes(NET)] == ["n0"]


# ----- a node that left a network: its entries do not come back ---------------------------------


async def three_on_net_with_b() -> tuple[NetworkDB, NetworkDB, NetworkDB, pb.Message]:
    nodes = await make(3)
    n0, n1, n2 = nodes["n0"], nodes["n1"], nodes["n2"]
    for g in (n0, n1, n2):
        await g.join_network(NET)
    for g in (n0, n1, n2):
        for other in ("n0", "n1", "n2"):
            if other != g.node_id:
                deliver(g, pb.Message(network=nodes[other]._node_networks[(other, NET)]), other)
    n1.put("t", NET, "b", b"vb")
    entry = pb.Message(entry=n1.store.get("t", NET, "b"))
    deliver(n0, entry, "n1")
    deliver(n2, entry, "n1")
    assert all(g.entries("t", NET) == {"b": b"vb"} for g in (n0, n1, n2))
    await n1.leave_network(NET)
    leave = pb.Message(network=n1._node_networks[("n1", NET)])
    deliver(n0, leave, "n1")  # n0 hears the leave; n2 has not yet
    assert n0.entries("t", NET) == {} and n2.entries("t", NET) == {"b": b"vb"}
    return n0, n1, n2, entry


@aiotest
async def test_push_pull_from_a_member_that_missed_the_leave_repairs_it_and_resurrects_nothing():
    n0, n1, n2, _ = await three_on_net_with_b()
    await sync(n2, n0)  # n2's anti-entropy with n0: n2 pushes b, n0 answers with the leave
    assert held(n2, "n1") == held(n0, "n1") and held(n0, "n1")[1]
    assert n0.entries("t", NET) == {} and n2.entries("t", NET) == {}
    await sync(n0, n2)
    assert n0.entries("t", NET) == {} and n2.entries("t", NET) == {}


@aiotest
async def test_push_pull_to_a_member_that_missed_the_leave_repairs_it_and_resurrects_nothing():
    n0, n1, n2, _ = await three_on_net_with_b()
    await sync(n0, n2)  # n0 pushes the leave; n2's answer (made before it merged) still holds b
    assert held(n2, "n1") == held(n0, "n1") and held(n0, "n1")[1]
    assert n0.entries("t", NET) == {} and n2.entries("t", NET) == {}


@aiotest
async def test_a_late_retransmit_of_a_departed_nodes_entry_is_dropped():
    n0, n1, n2, entry = await three_on_net_with_b()
    n0._net_queues[NET].clear()  # n0's own retransmits of b are done
    deliver(n0, entry, "n2")  # n2's retransmit queue still held b when n0 heard the leave
    await asyncio.sleep(0)
    assert n0.entries("t", NET) == {}
    assert ("t", "b") not in n0._net_queues[NET]._items  # nor passed on
