"""NetworkDB: SWIM membership and network tables between real nodes on loopback UDP/TCP sockets.

Several nodes live in one process (one event loop) on 127.0.x.y addresses; one test runs a node
as a separate process and SIGKILLs it. Waits poll for a condition with a generous deadline; they
assert outcomes, never speed (that is bench/gossip.py's job).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator

import gossipnode
import pytest
from helpers.aio import aiotest
from helpers.waiting import wait_for_async as until

from shoal.netdriver import swim
from shoal.netdriver.keyring import Keyring
from shoal.netdriver.networkdb import ENDPOINT_TABLE, EventKind, GossipConfig, NetworkDB, TableEvent
from shoal.proto import gossip_pb2

pytestmark = pytest.mark.integration  # real sockets, several nodes, child processes

PORT = 20000 + os.getpid() % 20000
_NET = 10 + os.getpid() % 200
_seq = iter(range(1, 250))

KEY1 = bytes(range(32))
KEY2 = bytes(range(100, 132))


def fresh_addrs(n: int) -> list[str]:
    """n unused loopback addresses for this test (unique per test run and per call)."""
    block = next(_seq)
    return [f"127.{_NET}.{block}.{i + 1}" for i in range(n)]


def states(g: NetworkDB) -> dict[str, str]:
    return {m.node_id: m.state_name for m in g.members()}


@contextlib.asynccontextmanager
async def cluster(n: int, keys=(KEY1,), config: GossipConfig | None = None, join: bool = True,
                  prefix: str = "n") -> AsyncIterator[list[NetworkDB]]:
    addrs = fresh_addrs(n)
    nodes = [NetworkDB(f"{prefix}{i}", a, a, port=PORT, keys=keys, config=config) for i, a in enumerate(addrs)]
    started: list[NetworkDB] = []
    try:
        for g in nodes:
            await g.start()
            started.append(g)
        if join:
            for g in nodes[1:]:
                assert await g.join([f"{addrs[0]}:{PORT}"]) == 1
            await until(lambda: all(list(states(g).values()).count("alive") == n for g in nodes),
                        f"{n} nodes see each other alive")
        yield nodes
    finally:
        for g in started:
            await g.stop()


def record(task: str, ip: str, **kw) -> bytes:
    return gossip_pb2.EndpointRecord(task_id=task, ip=ip, **kw).SerializeToString()


# ----- membership ------------------------------------------------------------------------------


@aiotest
async def test_join_stop_detected_dead_and_entries_purged():
    async with cluster(4) as nodes:
        for g in nodes:
            await g.join_network("netA")
        nodes[3].put(ENDPOINT_TABLE, "netA", "ep3", record("t3", "198.19.0.3"))
        await until(lambda: all("ep3" in g.entries(ENDPOINT_TABLE, "netA") for g in nodes), "ep3 everywhere")
        sub = nodes[0].subscribe()
        await nodes[3].stop()  # no leave: looks like a crash to the others
        await until(lambda: all(states(g)["n3"] == "dead" for g in nodes[:3]), "n3 declared dead")
        await until(lambda: not any(g.entries(ENDPOINT_TABLE, "netA") for g in nodes[:3]), "n3's entries purged")
        ev = await asyncio.wait_for(anext(sub), 10)
        assert (ev.kind, ev.key, ev.owner) == (EventKind.DELETE, "ep3", "n3")
        assert gossip_pb2.EndpointRecord.FromString(ev.value).ip == "198.19.0.3"
        assert all(states(g)[x] != "dead" for g in nodes[:3] for x in ("n0", "n1", "n2"))


@aiotest
async def test_graceful_leave_marks_left_and_purges():
    async with cluster(3) as nodes:
        for g in nodes:
            await g.join_network("netL")
        nodes[2].put("t", "netL", "k", b"v")
        await until(lambda: all(g.entries("t", "netL") == {"k": b"v"} for g in nodes), "entry everywhere")
        await nodes[2].leave()
        await until(lambda: all(states(g)["n2"] == "left" for g in nodes[:2]), "n2 left")
        assert all(g.entries("t", "netL") == {} for g in nodes[:2])


@aiotest
async def test_suspected_node_refutes_with_higher_incarnation():
    async with cluster(3) as nodes:
        victim = nodes[2]
        inc = victim.membership.incarnation
        # n0 wrongly suspects n2 (as after a lost ack); n2 must hear it and refute
        m = nodes[0].membership.member("n2")
        nodes[0].membership._on_suspect(gossip_pb2.MemberUpdate(node="n2", addr=m.addr, port=m.port,
                                                                incarnation=m.incarnation, state=gossip_pb2.SUSPECT))
        assert states(nodes[0])["n2"] == "suspect"
        await until(lambda: victim.membership.incarnation > inc, "n2 refutes")
        await until(lambda: all(states(g)["n2"] == "alive" for g in nodes), "n2 alive again everywhere")
        # past the suspicion timeout nobody declares it dead
        await asyncio.sleep(1.5 * nodes[0].config.probe_interval * nodes[0].config.suspicion_mult)
        assert all(states(g)["n2"] != "dead" for g in nodes)


@aiotest
async def test_wrong_key_packets_dropped_and_rotation():
    addrs = fresh_addrs(3)
    good = [NetworkDB(f"k{i}", addrs[i], addrs[i], port=PORT, keys=[KEY1]) for i in range(2)]
    bad = NetworkDB("bad", addrs[2], addrs[2], port=PORT, keys=[KEY2])
    plain = None
    try:
        for g in [*good, bad]:
            await g.start()
        assert await good[1].join([f"{addrs[0]}:{PORT}"]) == 1
        assert await bad.join([f"{addrs[0]}:{PORT}"]) == 0
        # UDP from the wrong key: send a ping straight at k0
        bad.membership.send_packet(addrs[0], PORT, [gossip_pb2.Message(ping=gossip_pb2.Ping(seq=1, target="k0"))])
        await until(lambda: good[0].dropped_packets >= 2, "k0 dropped the bad stream and datagram")
        assert "bad" not in states(good[0]) and "bad" not in states(good[1])
        assert set(states(bad)) == {"bad"}
        # rotation: bad gets KEY1 added (still sending with KEY2) → still refused; then uses KEY1 → joins
        bad.keyring.add(KEY1)
        assert await bad.join([f"{addrs[0]}:{PORT}"]) == 0
        bad.keyring.use(KEY1)
        assert await bad.join([f"{addrs[0]}:{PORT}"]) == 1
        await until(lambda: all(states(g).get("bad") == "alive" for g in good), "bad joined after rotation")
        await bad.stop()
        bad = None
        # a node without any key cannot talk to keyed nodes either
        plain = NetworkDB("plain", addrs[2], addrs[2], port=PORT)
        await plain.start()
        assert await plain.join([f"{addrs[0]}:{PORT}"]) == 0
    finally:
        for g in [*good, bad, plain]:
            if g is not None:
                await g.stop()


# ----- network tables --------------------------------------------------------------------------


@aiotest
async def test_tables_only_network_members_and_full_sync_on_join():
    async with cluster(4) as nodes:
        n0, n1, n2, n3 = nodes
        events: list[TableEvent] = []
        n2.add_listener(events.append)
        for g in (n0, n1):
            await g.join_network("netX")
        await n2.join_network("netY")
        n0.put(ENDPOINT_TABLE, "netX", "a", record("ta", "198.19.1.1"))
        n1.put(ENDPOINT_TABLE, "netX", "b", record("tb", "198.19.1.2"))
        n2.put(ENDPOINT_TABLE, "netY", "c", record("tc", "198.19.2.1"))
        await until(lambda: set(n0.entries(ENDPOINT_TABLE, "netX")) == {"a", "b"}
                    and set(n1.entries(ENDPOINT_TABLE, "netX")) == {"a", "b"}, "netX on n0, n1")
        # let gossip and retransmits settle; non-members hold nothing of netX
        await asyncio.sleep(1.0)
        assert n2.entries(ENDPOINT_TABLE, "netX") == {} and n3.entries(ENDPOINT_TABLE, "netX") == {}
        assert n2.store.network_entries("netX") == [] and n3.store.network_entries("netX") == []
        assert n0.entries(ENDPOINT_TABLE, "netY") == {} and n3.entries(ENDPOINT_TABLE, "netY") == {}
        assert [e.network_id for e in events] == ["netY"]
        with pytest.raises(ValueError, match="join_network"):
            n3.put(ENDPOINT_TABLE, "netX", "z", b"")
        # n3 joins netX later: full sync brings what is already there
        await n3.join_network("netX")
        assert set(n3.entries(ENDPOINT_TABLE, "netX")) == {"a", "b"}
        n3.put(ENDPOINT_TABLE, "netX", "d", record("td", "198.19.1.4"))
        await until(lambda: all(set(g.entries(ENDPOINT_TABLE, "netX")) == {"a", "b", "d"} for g in (n0, n1, n3)),
                    "d on netX members")
        # n1 leaves netX: its entry vanishes on the others, and its own table of netX is dropped
        await n1.leave_network("netX")
        assert n1.entries(ENDPOINT_TABLE, "netX") == {}
        await until(lambda: all(set(g.entries(ENDPOINT_TABLE, "netX")) == {"a", "d"} for g in (n0, n3)),
                    "b purged after n1 left netX")
        assert n2.entries(ENDPOINT_TABLE, "netX") == {}


@aiotest
async def test_late_copy_of_a_departed_nodes_entry_does_not_come_back():
    # issue 16, item 8: a member that hears a leave late still retransmits (or pushes) the leaver's
    # entries; the nodes that already purged them must not take them back
    async with cluster(3) as nodes:
        n0, n1, n2 = nodes
        for g in nodes:
            await g.join_network("netR")
        n1.put("t", "netR", "b", b"vb")
        await until(lambda: all(g.entries("t", "netR") == {"b": b"vb"} for g in nodes), "b everywhere")
        stale = gossip_pb2.TableEntry()
        stale.CopyFrom(n2.store.get("t", "netR", "b"))
        await n1.leave_network("netR")
        await until(lambda: n0.entries("t", "netR") == n2.entries("t", "netR") == {}, "b purged after the leave")
        # n2 sends the stale copy over UDP, then a marker in the same packet (handled in order)
        marker = gossip_pb2.NetworkEvent(node="n9", network_id="netZ", ltime=1, leave=True)
        n2.membership.send_raw(n0.advertise_addr, PORT, gossip_pb2.Packet(source="n2", messages=[
            gossip_pb2.Message(entry=stale), gossip_pb2.Message(network=marker)]))
        await until(lambda: ("n9", "netZ") in n0._node_networks, "n0 handled the packet")
        assert n0.entries("t", "netR") == {}
        await n2._sync(n2.membership.member("n0"), ["netR"])
        assert n0.entries("t", "netR") == n2.entries("t", "netR") == {}


@aiotest
async def test_update_and_tombstone_delete_propagate():
    cfg = GossipConfig(tombstone_ttl=2.0)
    async with cluster(3, config=cfg) as nodes:
        for g in nodes:
            await g.join_network("netD")
        subs = [g.subscribe() for g in nodes[1:]]
        nodes[0].put("t", "netD", "k", b"v1")
        await until(lambda: all(g.entries("t", "netD") == {"k": b"v1"} for g in nodes), "v1 everywhere")
        nodes[0].put("t", "netD", "k", b"v2")
        await until(lambda: all(g.entries("t", "netD") == {"k": b"v2"} for g in nodes), "v2 everywhere")
        nodes[0].delete("t", "netD", "k")
        await until(lambda: all(g.entries("t", "netD") == {} for g in nodes), "delete everywhere")
        for s in subs:
            got = [await asyncio.wait_for(anext(s), 5) for _ in range(3)]
            assert [(e.kind, e.value) for e in got] == [
                (EventKind.CREATE, b"v1"), (EventKind.UPDATE, b"v2"), (EventKind.DELETE, b"v2")]
            assert all(e.owner == "n0" and e.network_id == "netD" for e in got)
            s.close()
        # the tombstone exists for a while, then is reaped
        assert all(g.store.get("t", "netD", "k").deleted for g in nodes)
        await until(lambda: all(g.store.get("t", "netD", "k") is None for g in nodes), "tombstone reaped")
        with pytest.raises(KeyError):
            nodes[0].delete("t", "netD", "k")


@aiotest
async def test_anti_entropy_repairs_a_lost_broadcast():
    cfg = GossipConfig(table_sync_interval=1.0)
    async with cluster(3, config=cfg) as nodes:
        for g in nodes:
            await g.join_network("netE")
        # n0 writes the entry into its store without broadcasting (as if every datagram was lost)
        nodes[0].store.merge(gossip_pb2.TableEntry(table="t", network_id="netE", key="k", value=b"v",
                                                   owner="n0", ltime=nodes[0].table_clock.next()))
        await until(lambda: all(g.entries("t", "netE") == {"k": b"v"} for g in nodes), "push-pull repaired it")


@aiotest
async def test_ten_nodes_converge():
    async with cluster(10) as nodes:
        for g in nodes:
            await g.join_network("net10")
        for i, g in enumerate(nodes):
            g.put(ENDPOINT_TABLE, "net10", f"ep{i}", record(f"t{i}", f"198.19.10.{i + 1}"))
        want = {f"ep{i}" for i in range(10)}
        await until(lambda: all(set(g.entries(ENDPOINT_TABLE, "net10")) == want for g in nodes), "10x10 entries")
        await until(lambda: all(len(g.network_nodes("net10")) == 9 for g in nodes), "network membership")


# ----- a node in another process, killed with SIGKILL --------------------------------------------


def spawn_child(node_id: str, addr: str, seed: str, value: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, gossipnode.PATH, "--node-id", node_id, "--bind", addr,
         "--port", str(PORT), "--join", seed, "--key-hex", KEY1.hex(), "--network", "netK",
         "--put", f"{ENDPOINT_TABLE}/netK/{node_id}-ep={value}"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)


async def wait_ready(proc: subprocess.Popen) -> None:
    line = await asyncio.wait_for(asyncio.to_thread(proc.stdout.readline), 30)
    assert line.strip() == "ready"


def reap(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.wait()
    proc.stdout.close()


@aiotest
async def test_killed_process_is_detected_dead_and_purged():
    addrs = fresh_addrs(4)
    async with cluster(3, join=False) as nodes:
        # the in-process nodes use addrs of their own block; the children join through n0
        seed = f"{nodes[0].advertise_addr}:{PORT}"
        for g in nodes[1:]:
            assert await g.join([seed]) == 1
        for g in nodes:
            await g.join_network("netK")
        procs = [spawn_child("child", addrs[2], seed, "hello"), spawn_child("quitter", addrs[3], seed, "bye")]
        try:
            for p in procs:
                await wait_ready(p)
            want = {"child-ep": b"hello", "quitter-ep": b"bye"}
            await until(lambda: all(g.entries(ENDPOINT_TABLE, "netK") == want for g in nodes),
                        "children's entries everywhere")
            await until(lambda: all(states(g).get("child") == states(g).get("quitter") == "alive" for g in nodes),
                        "children alive everywhere")
            # SIGTERM: the child leaves gracefully
            procs[1].terminate()
            await until(lambda: all(states(g)["quitter"] == "left" for g in nodes), "quitter left")
            await until(lambda: all("quitter-ep" not in g.entries(ENDPOINT_TABLE, "netK") for g in nodes),
                        "quitter's entry purged")
            # SIGKILL: detected dead by probes
            os.kill(procs[0].pid, signal.SIGKILL)
            await until(lambda: all(states(g)["child"] == "dead" for g in nodes), "child declared dead")
            await until(lambda: all(g.entries(ENDPOINT_TABLE, "netK") == {} for g in nodes), "child's entry purged")
            # the same node restarted (same id and address): alive again, with its new entry
            reap(procs[0])
            procs[0] = spawn_child("child", addrs[2], seed, "again")
            await wait_ready(procs[0])
            await until(lambda: all(states(g)["child"] == "alive" for g in nodes), "child back")
            await until(lambda: all(g.entries(ENDPOINT_TABLE, "netK") == {"child-ep": b"again"} for g in nodes),
                        "restarted child's entry everywhere")
        finally:
            for p in procs:
                reap(p)


@aiotest
async def test_oversize_entry_goes_over_tcp_and_network_joined_before_cluster_join():
    async with cluster(2) as nodes:
        for g in nodes:
            await g.join_network("netO")
        big = os.urandom(4000)
        nodes[0].put("t", "netO", "big", big)
        await until(lambda: nodes[1].entries("t", "netO") == {"big": big}, "big entry on n1")
        # a node that joined the network (and wrote) before joining the cluster syncs on join
        addr = fresh_addrs(1)[0]
        late = NetworkDB("late", addr, addr, port=PORT, keys=[KEY1])
        try:
            await late.start()
            await late.join_network("netO")
            late.put("t", "netO", "early", b"e")
            assert await late.join([f"{nodes[0].advertise_addr}:{PORT}"]) == 1
            assert late.entries("t", "netO") == {"big": big, "early": b"e"}
            await until(lambda: all(g.entries("t", "netO").get("early") == b"e" for g in nodes), "early everywhere")
        finally:
            await late.stop()


@aiotest
async def test_live_key_rotation_keeps_the_cluster_together():
    async with cluster(3) as nodes:
        for g in nodes:
            await g.join_network("netR")
        # managers distribute [KEY2, KEY1]: every node accepts both, sends with KEY2; then KEY1 is dropped
        for g in nodes:
            g.set_keys([KEY2, KEY1])
        nodes[0].put("t", "netR", "a", b"1")
        await until(lambda: all(g.entries("t", "netR") == {"a": b"1"} for g in nodes), "a with KEY2")
        for g in nodes:
            g.set_keys([KEY2])
        assert all(g.keyring.keys == [KEY2] for g in nodes)
        nodes[1].put("t", "netR", "b", b"2")
        await until(lambda: all(g.entries("t", "netR") == {"a": b"1", "b": b"2"} for g in nodes), "b after rotation")
        assert all("dead" not in states(g).values() for g in nodes)
        with pytest.raises(ValueError, match="empty"):
            nodes[0].set_keys([])


@aiotest
async def test_partition_heals_through_reconnect():
    cfg = GossipConfig(dead_reclaim_time=2.0, reconnect_interval=1.0)
    async with cluster(4, config=cfg) as nodes:
        for g in nodes:
            await g.join_network("netP")
        nodes[3].put("t", "netP", "k3", b"3")
        nodes[0].put("t", "netP", "k0", b"0")
        await until(lambda: all(len(g.entries("t", "netP")) == 2 for g in nodes), "entries everywhere")
        # partition: n3 only speaks KEY2 now, so every packet across is dropped both ways
        nodes[3].set_keys([KEY2])
        await until(lambda: all(states(g)["n3"] == "dead" for g in nodes[:3]), "n3 dead on the majority")
        await until(lambda: all(states(nodes[3]).get(f"n{i}") in ("dead", None) for i in range(3)),
                    "the majority dead on n3")
        assert all(g.entries("t", "netP") == {"k0": b"0"} for g in nodes[:3])
        assert nodes[3].entries("t", "netP") == {"k3": b"3"}
        # let the dead be forgotten by gossip (only reconnects can find them now), then heal
        await asyncio.sleep(2 * cfg.dead_reclaim_time)
        nodes[3].set_keys([KEY1])
        await until(lambda: all(list(states(g).values()).count("alive") == 4 for g in nodes), "healed")
        await until(lambda: all(len(g.entries("t", "netP")) == 2 for g in nodes), "tables merged again")


@aiotest
async def test_nodes_hand_their_entries_to_a_newcomer_on_the_network():
    cfg = GossipConfig(table_sync_interval=1000.0)  # no anti-entropy: only the push can do it
    async with cluster(3, config=cfg) as nodes:
        a, b, c = nodes
        for g in (a, b):
            await g.join_network("netN")
        a.put("t", "netN", "a", b"1")
        b.put("t", "netN", "b", b"2")
        await until(lambda: all(g.entries("t", "netN") == {"a": b"1", "b": b"2"} for g in (a, b)), "a, b synced")
        await until(lambda: all(not len(g._net_queues["netN"]) for g in (a, b)), "retransmits done")
        # c has not heard yet that a and b are on netN, so its join finds nobody to sync with
        for n in ("n0", "n1"):
            c._node_networks.pop((n, "netN"), None)
        await c.join_network("netN")
        assert c.entries("t", "netN") == {}
        await until(lambda: c.entries("t", "netN") == {"a": b"1", "b": b"2"}, "a and b pushed their entries to c")


# ----- replays -----------------------------------------------------------------------------------


def spy_open(blob: bytes, label: bytes) -> gossip_pb2.Packet | gossip_pb2.Stream:
    """Decrypt a captured packet with a keyring of our own (its windows are its own)."""
    data = Keyring([KEY1], sender="spy").open(blob, label)
    return (gossip_pb2.Packet if label == b"udp" else gossip_pb2.Stream).FromString(data)


@aiotest
async def test_replayed_datagram_and_frame_are_dropped_also_after_the_receiver_restarts():
    # tombstones reaped after 1 s: a replayed put would then bring the deleted entry back
    cfg = GossipConfig(tombstone_ttl=1.0, replay_max_age=3.0, table_sync_interval=1000.0)
    async with cluster(3, config=cfg) as nodes:
        n0, n1, _ = nodes
        for g in nodes:
            await g.join_network("netZ")
        # capture what n0 sends to n1 (the real transport, wrapped)
        transport = n0.membership._transport
        real_sendto = transport.sendto
        to_n1: list[bytes] = []

        def sendto(data: bytes, addr) -> None:
            if addr[0] == n1.advertise_addr:
                to_n1.append(bytes(data))
            real_sendto(data, addr)

        transport.sendto = sendto
        n0.put("t", "netZ", "k", b"captured")
        await until(lambda: all(g.entries("t", "netZ") == {"k": b"captured"} for g in nodes), "k everywhere")
        await until(lambda: not len(n0._net_queues["netZ"]), "n0's retransmits done")
        transport.sendto = real_sendto
        puts = [b for b in to_n1 if any(m.entry.key == "k" for m in spy_open(b, b"udp").messages)]
        assert puts, "no datagram of n0 to n1 carried the entry"
        # and a TCP frame: n0's anti-entropy push-pull with n1, captured where it is written
        frames: list[bytes] = []
        real_write_frame = swim.write_frame

        def write_frame(writer, blob: bytes) -> None:
            frames.append(blob)
            real_write_frame(writer, blob)

        swim.write_frame = write_frame
        try:
            await n0._sync(n0.membership.member("n1"), ["netZ"])
        finally:
            swim.write_frame = real_write_frame
        request = frames[0]
        assert spy_open(request, b"tcp").push_pull.source == "n0"

        n0.delete("t", "netZ", "k")
        await until(lambda: all(g.entries("t", "netZ") == {} for g in nodes), "k deleted everywhere")
        await until(lambda: n1.store.get("t", "netZ", "k") is None, "n1 reaped the tombstone")

        # an attacker on another address sends the captures again
        attacker = fresh_addrs(1)[0]
        loop = asyncio.get_running_loop()
        sock, _ = await loop.create_datagram_endpoint(asyncio.DatagramProtocol, local_addr=(attacker, 0))
        fresh = None
        try:
            replayed, dropped = n1.replayed_packets, n1.dropped_packets
            for b in to_n1:
                sock.sendto(b, (n1.advertise_addr, PORT))
            await until(lambda: n1.replayed_packets == replayed + len(to_n1), "n1 dropped every replayed datagram")
            assert n1.dropped_packets == dropped + len(to_n1)
            assert n1.keyring.replay_drops["duplicate"] >= len(to_n1)
            assert n1.entries("t", "netZ") == {} and n1.store.get("t", "netZ", "k") is None

            # the TCP frame, on a connection of its own: dropped, no answer
            reader, writer = await asyncio.open_connection(n1.advertise_addr, PORT, local_addr=(attacker, 0))
            swim.write_frame(writer, request)
            await writer.drain()
            assert await asyncio.wait_for(reader.read(), 5) == b""  # closed without a reply
            writer.close()
            await writer.wait_closed()
            assert n1.replayed_packets == replayed + len(to_n1) + 1

            # n1 restarts: no windows any more, but the captures are older than replay_max_age now
            await asyncio.sleep(cfg.replay_max_age)
            addr = n1.advertise_addr
            await n1.stop()
            fresh = NetworkDB("n1", addr, addr, port=PORT, keys=[KEY1], config=cfg)
            await fresh.start()
            assert await fresh.join([f"{n0.advertise_addr}:{PORT}"]) == 1
            await fresh.join_network("netZ")
            for b in to_n1:
                sock.sendto(b, (addr, PORT))
            await until(lambda: fresh.keyring.replay_drops["stale"] == len(to_n1), "the restarted n1 dropped them")
            assert fresh.entries("t", "netZ") == {}
            # gossip among the others goes on
            n0.put("t", "netZ", "after", b"1")
            await until(lambda: fresh.entries("t", "netZ") == {"after": b"1"}, "fresh traffic still accepted")
        finally:
            sock.close()
            if fresh is not None:
                await fresh.stop()
