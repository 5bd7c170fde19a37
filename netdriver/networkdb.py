"""NetworkDB: the gossiped per-network tables of Shoal nodes (libnetwork's NetworkDB) on SWIM membership.

One UDP and one TCP socket on ``port`` (7946 by default) carry everything, sealed with the
cluster's gossip keys (:mod:`shoal.netdriver.keyring`: AES-GCM, key id in the header, send with
the primary key, accept every key of the ring; replays dropped by sender epoch, counter window and
a timestamp at most ``config.replay_max_age`` off). Membership is :mod:`shoal.netdriver.swim`.

Tables: entries keyed ``(table, network_id, key)`` → value bytes, owned by the node that wrote them
and versioned by a Lamport clock (:mod:`shoal.netdriver.tables`). A network's entries live only on
the nodes that joined that network:

* ``join_network`` announces (cluster-wide, ordered by a network clock) that this node is on the
  network, then does a full TCP push-pull sync with a node already on it;
* ``put``/``delete`` apply locally, then go out at once over UDP to ``gossip_nodes`` random nodes
  of the network; every node that learns something new forwards it the same way, and queued
  changes are retransmitted every ``gossip_interval`` (``ceil(retransmit_mult * log10(n+1))``
  rounds per node);
* every ``table_sync_interval`` (±25 %) a node push-pulls each of its networks with a random node
  of that network over TCP (anti-entropy);
* deletes are tombstones, reaped after ``tombstone_ttl``;
* entries of a node that dies, leaves the cluster or leaves the network are purged everywhere,
  and its entries that still arrive later (retransmits, push-pulls from nodes that had not heard
  of it yet) are dropped; a node that hears an entry of its own it does not hold (a previous
  life's) deletes it;
* a node's network events are ordered by (Lamport time, leave): of two with the same time the
  leave wins on every node, and push-pull carries every event, so all nodes agree.

Events (create/update/delete with network id, key, value, owner; a delete carries the last value)
reach :meth:`NetworkDB.subscribe` iterators and :meth:`NetworkDB.add_listener` callbacks, for local and
remote changes alike (filter on ``event.owner != gossip.node_id`` for remote endpoints).

API::

    NetworkDB(node_id, bind_addr, advertise_addr, *, port=7946, keys=(), config=GossipConfig())
        await start() / stop() / join(seeds: Sequence[str]) -> int / leave()
        members() -> list[Member]                     # alive, suspect, dead and left members
        dropped_packets -> int; replayed_packets -> int  # refused packets; of them, replays
        await join_network(network_id) / leave_network(network_id); networks() -> set[str]
        network_nodes(network_id) -> list[Member]     # live members on the network (self excluded)
        put(table, network_id, key, value: bytes) / delete(table, network_id, key)
        entries(table, network_id) -> dict[str, bytes]
        subscribe() -> Subscription (AsyncIterator[TableEvent]; .close())
        add_listener(cb: Callable[[TableEvent], None]) / remove_listener(cb)
        add_member_listener(cb: Callable[[Member], None])  # a member appeared or changed state
        set_keys(keys: Sequence[bytes])                # first = primary; others accepted; rest dropped
        set_bootstrap_keys(keys: Sequence[types_pb2.EncryptionKey])  # Docker's rule, see there
        keyring -> Keyring (add/use/remove keys for rotation)

The endpoint table is ``ENDPOINT_TABLE`` with ``shoal.proto.gossip_pb2.EndpointRecord`` values.
A NetworkDB lives on one asyncio event loop: call it from that loop's thread only.

One node as a process (for tests and benchmarks) is ``tests/gossipnode.py``.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
import time
from collections.abc import Callable, Sequence

from shoal.netdriver.keyring import OVERHEAD, Keyring, KeyringError
from shoal.netdriver.swim import (
    ALIVE,
    DEAD,
    LEFT,
    SUSPECT,
    Delegate,
    GossipConfig,
    Member,
    SwimMembership,
    TransmitQueue,
    cancel_and_wait,
)
from shoal.netdriver.tables import EventKind, LamportClock, TableEvent, TableStore, version
from shoal.proto import gossip_pb2 as pb
from shoal.proto import types_pb2

__all__ = ["ALIVE", "DEAD", "LEFT", "SUSPECT", "ENDPOINT_TABLE", "EventKind", "NetworkDB", "GossipConfig", "Member", "Subscription", "TableEvent"]

log = logging.getLogger(__name__)

ENDPOINT_TABLE = "endpoint_table"
_MAX_PACKETS_PER_FLUSH = 32
_STREAM_ERRORS = (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError, KeyringError, ValueError)


def _net_version(ev: pb.NetworkEvent) -> tuple[int, bool]:
    """The order of one node's membership events on one network: the Lamport time, then a leave
    before a join, so that two events with one time (a restarted node's clock can repeat a time its
    previous life used) resolve the same way on every node, whatever order they arrive in; the node
    itself then hears the winning leave and, if it is on the network, announces its join again, later."""
    return ev.ltime, ev.leave


class Subscription:
    """Async iterator of :class:`TableEvent`; ends when closed or when the gossip stops."""

    def __init__(self, owner: NetworkDB) -> None:
        self._owner = owner
        self._q: asyncio.Queue[TableEvent | None] = asyncio.Queue()
        self._closed = False

    def __aiter__(self) -> Subscription:
        return self

    async def __anext__(self) -> TableEvent:
        if self._closed and self._q.empty():
            raise StopAsyncIteration
        ev = await self._q.get()
        if ev is None:
            raise StopAsyncIteration
        return ev

    def _push(self, ev: TableEvent | None) -> None:
        if not self._closed:
            self._q.put_nowait(ev)

    def close(self) -> None:
        if not self._closed:
            self._q.put_nowait(None)
            self._closed = True
            self._owner._subs.discard(self)


class NetworkDB(Delegate):
    """One node's view of the cluster's network tables and of its members (see the module docstring)."""

    def __init__(
        self,
        node_id: str,
        bind_addr: str,
        advertise_addr: str,
        *,
        port: int = 7946,
        keys: Sequence[bytes] = (),
        config: GossipConfig | None = None,
    ) -> None:
        if not node_id:
            raise ValueError("gossip node_id is empty; pass the node's id")
        self.node_id = node_id
        self.config = config or GossipConfig()
        self.config.validate()
        self.keyring = Keyring(keys, sender=node_id, max_age=self.config.replay_max_age)
        self.membership = SwimMembership(node_id, bind_addr, advertise_addr, port, self.keyring, self.config, self)
        self.store = TableStore()
        self.table_clock = LamportClock()
        self.network_clock = LamportClock()
        self._networks: set[str] = set()
        self._node_networks: dict[tuple[str, str], pb.NetworkEvent] = {}
        self._net_queues: dict[str, TransmitQueue] = {}
        self._flush_pending: set[str] = set()
        self._subs: set[Subscription] = set()
        self._listeners: list[Callable[[TableEvent], None]] = []
        self._member_listeners: list[Callable[[Member], None]] = []
        self._tasks: list[asyncio.Task] = []
        self._bg: set[asyncio.Task] = set()

    # ----- lifecycle and membership ----------------------------------------------------------

    @property
    def port(self) -> int:
        return self.membership.port

    @property
    def advertise_addr(self) -> str:
        return self.membership.advertise_addr

    async def start(self) -> None:
        await self.membership.start()
        self._tasks = [
            asyncio.create_task(self._table_gossip_loop(), name=f"gossip-tables-{self.node_id}"),
            asyncio.create_task(self._anti_entropy_loop(), name=f"gossip-sync-{self.node_id}"),
            asyncio.create_task(self._reap_loop(), name=f"gossip-reap-{self.node_id}"),
        ]

    async def stop(self) -> None:
        await cancel_and_wait([*self._tasks, *self._bg])
        self._tasks = []
        await self.membership.stop()
        for s in list(self._subs):
            s.close()

    async def join(self, seeds: Sequence[str]) -> int:
        """Join the cluster through ``seeds`` ("host" or "host:port"); returns how many answered.
        Networks joined before are then synced with a node of each."""
        n = await self.membership.join(seeds)
        if n and self._networks:
            await self._anti_entropy_once()
        return n

    def set_bootstrap_keys(self, keys: Sequence[types_pb2.EncryptionKey]) -> None:
        """Apply the managers' ``network_bootstrap_keys`` (session message) the way Docker does:
        the ``networking:gossip`` keys ordered by lamport time, the second oldest primary when
        there are two or more (a key the managers just added is accepted everywhere before any node
        sends with it; after the next rotation it becomes primary), keys no longer listed dropped."""
        ks = sorted((k for k in keys if k.subsystem in ("", "networking:gossip")), key=lambda k: k.lamport_time)
        if not ks:
            raise ValueError("network_bootstrap_keys holds no networking:gossip key; the managers must send one")
        primary = ks[1] if len(ks) > 1 else ks[0]
        self.set_keys([primary.key, *(k.key for k in ks if k.key != primary.key)])

    def set_keys(self, keys: Sequence[bytes]) -> None:
        """Replace the keyring with ``keys`` as distributed by the managers (first = primary):
        new keys are accepted at once, packets go out with the primary, dropped keys stop working."""
        if not keys:
            raise ValueError("gossip keys are empty; the managers must distribute at least one key")
        for k in keys:
            self.keyring.add(k)
        self.keyring.use(keys[0])
        for old in self.keyring.keys:
            if old not in keys:
                self.keyring.remove(old)

    async def leave(self) -> None:
        """Leave the cluster gracefully: the others purge this node's entries."""
        await self.membership.leave()

    def members(self) -> list[Member]:
        return self.membership.members()

    def table_sizes(self) -> dict[str, int]:
        """Live entries (tombstones not counted) of each table this node holds, all networks together."""
        sizes: dict[str, int] = {}
        for e in self.store.live():
            sizes[e.table] = sizes.get(e.table, 0) + 1
        return sizes

    @property
    def dropped_packets(self) -> int:
        """Packets and frames dropped: not authenticated, not decodable, or replays."""
        return self.membership.dropped

    @property
    def replayed_packets(self) -> int:
        """Packets and frames dropped by the replay checks (:mod:`shoal.netdriver.keyring`)."""
        return self.keyring.replayed

    # ----- networks --------------------------------------------------------------------------

    def networks(self) -> set[str]:
        return set(self._networks)

    def _in_network(self, node: str, network_id: str) -> bool:
        ev = self._node_networks.get((node, network_id))
        return ev is not None and not ev.leave

    def network_nodes(self, network_id: str) -> list[Member]:
        return [m for m in self.membership.alive_members()
                if m.node_id != self.node_id and self._in_network(m.node_id, network_id)]

    def _announce(self, network_id: str, leave: bool) -> None:
        ev = pb.NetworkEvent(node=self.node_id, network_id=network_id, ltime=self.network_clock.next(), leave=leave)
        self._node_networks[(self.node_id, network_id)] = ev
        self.membership.queue_broadcast(("net", self.node_id, network_id), pb.Message(network=ev))
        for m in self.membership._gossip_targets(self.config.gossip_nodes):
            self.membership.send_packet(m.addr, m.port, [])

    async def join_network(self, network_id: str) -> None:
        """Start sharing ``network_id``'s tables: announce it and fully sync with a node on it."""
        if not network_id:
            raise ValueError("network_id is empty; pass the overlay network's id")
        if network_id in self._networks:
            return
        self._networks.add(network_id)
        self._net_queues.setdefault(network_id, TransmitQueue())
        self._announce(network_id, leave=False)
        log.info("node=%s joined network=%s", self.node_id, network_id)
        peers = self.network_nodes(network_id)
        random.shuffle(peers)
        for p in peers[:3]:
            try:
                await self._sync(p, [network_id])
                return
            except _STREAM_ERRORS as e:
                log.info("node=%s network=%s sync with %s failed: %s", self.node_id, network_id, p.node_id,
                         e or type(e).__name__)

    async def leave_network(self, network_id: str) -> None:
        """Stop sharing ``network_id``: the others purge our entries of it; we forget its table."""
        if network_id not in self._networks:
            return
        self._networks.discard(network_id)
        self._net_queues.pop(network_id, None)
        self._announce(network_id, leave=True)
        for ev in self.store.drop_network(network_id):
            self._emit(ev)
        log.info("node=%s left network=%s", self.node_id, network_id)

    def _left_network(self, node: str, network_id: str) -> bool:
        ev = self._node_networks.get((node, network_id))
        return ev is not None and ev.leave

    def _on_network_event(self, ev: pb.NetworkEvent, rebroadcast: bool) -> None:
        self.network_clock.witness(ev.ltime)
        key = (ev.node, ev.network_id)
        cur = self._node_networks.get(key)
        if cur is not None and _net_version(cur) >= _net_version(ev):
            return
        if ev.node == self.node_id:
            # someone holds a newer but wrong idea of our membership: re-assert ours
            if ev.leave != (ev.network_id not in self._networks):
                self._announce(ev.network_id, leave=ev.network_id not in self._networks)
            return
        copy = pb.NetworkEvent()
        copy.CopyFrom(ev)
        self._node_networks[key] = copy
        if rebroadcast:
            self.membership.queue_broadcast(("net", ev.node, ev.network_id), pb.Message(network=copy))
        if not ev.leave and (cur is None or cur.leave) and ev.network_id in self._networks:
            # a node new on one of our networks: hand it our own entries at once (its own sync
            # may have found nobody yet; anti-entropy would only catch up seconds later)
            self._push_own_entries(ev.node, ev.network_id)
        if ev.leave and ev.network_id in self._networks:
            log.info("node=%s member=%s left network=%s, purging its entries", self.node_id, ev.node, ev.network_id)
            for tev in self.store.purge_owner(ev.node, ev.network_id):
                self._emit(tev)

    def _push_own_entries(self, node: str, network_id: str) -> None:
        m = self.membership.member(node)
        if m is None or m.state not in (ALIVE, SUSPECT):
            return
        own = [pb.Message(entry=e) for e in self.store.network_entries(network_id)
               if e.owner == self.node_id and not e.deleted]
        budget = self.config.udp_buffer_size - OVERHEAD - len(self.node_id) - 8
        batch: list[pb.Message] = []
        size = 0
        for msg in own:
            n = msg.ByteSize() + 3
            if n > budget:
                continue  # too big for a datagram: anti-entropy (TCP) brings it
            if batch and size + n > budget:
                self.membership.send_raw(m.addr, m.port, pb.Packet(source=self.node_id, messages=batch))
                batch, size = [], 0
            batch.append(msg)
            size += n
        if batch:
            self.membership.send_raw(m.addr, m.port, pb.Packet(source=self.node_id, messages=batch))

    # ----- tables ----------------------------------------------------------------------------

    def _check_network(self, network_id: str) -> None:
        if network_id not in self._networks:
            raise ValueError(f"network {network_id!r} is not joined on this node; call join_network first")

    def put(self, table: str, network_id: str, key: str, value: bytes) -> None:
        """Create or update an entry owned by this node and broadcast it at once."""
        self._check_network(network_id)
        e = pb.TableEntry(table=table, network_id=network_id, key=key, value=value, owner=self.node_id,
                          ltime=self.table_clock.next())
        self._apply_local(e)

    def delete(self, table: str, network_id: str, key: str) -> None:
        """Delete an entry (a tombstone that spreads like an update)."""
        self._check_network(network_id)
        cur = self.store.get(table, network_id, key)
        if cur is None or cur.deleted:
            raise KeyError(f"no entry {key!r} in table {table!r} of network {network_id!r}")
        e = pb.TableEntry(table=table, network_id=network_id, key=key, value=cur.value, owner=self.node_id,
                          ltime=self.table_clock.next(), deleted=True)
        self._apply_local(e)

    def entries(self, table: str, network_id: str) -> dict[str, bytes]:
        return self.store.entries(table, network_id)

    def _apply_local(self, e: pb.TableEntry) -> None:
        _, ev = self.store.merge(e)
        self._queue_entry(e)
        if ev is not None:
            self._emit(ev)

    def _queue_entry(self, e: pb.TableEntry) -> None:
        q = self._net_queues.get(e.network_id)
        if q is None:
            return
        q.queue((e.table, e.key), pb.Message(entry=e))
        if e.network_id not in self._flush_pending:
            self._flush_pending.add(e.network_id)
            asyncio.get_running_loop().call_soon(self._flush, e.network_id)

    def _on_entry(self, e: pb.TableEntry, rebroadcast: bool) -> None:
        if e.network_id not in self._networks:
            return  # not on this network: its entries are none of our business
        self.table_clock.witness(e.ltime)
        if e.owner == self.node_id:
            cur = self.store.get(e.table, e.network_id, e.key)
            if cur is None or version(e) > version(cur):
                if e.deleted:
                    self.store.merge(e)
                else:  # an entry from a previous life of this node: delete it
                    log.info("node=%s network=%s deleting stale own entry %s/%s", self.node_id, e.network_id,
                             e.table, e.key)
                    tomb = pb.TableEntry()
                    tomb.CopyFrom(e)
                    tomb.deleted, tomb.ltime = True, self.table_clock.next()
                    self._apply_local(tomb)
            return
        m = self.membership.member(e.owner)
        if m is not None and m.state in (DEAD, LEFT):
            return  # a dead node's entries are purged, not resurrected
        if self._left_network(e.owner, e.network_id):
            # nor those of a node that left the network: a member that has not heard the leave yet
            # still retransmits them, or pushes them in a push-pull (issue 16, item 8)
            return
        changed, ev = self.store.merge(e)
        if changed and rebroadcast:
            self._queue_entry(e)
        if ev is not None:
            self._emit(ev)

    def _flush(self, network_id: str) -> None:
        self._flush_pending.discard(network_id)
        q = self._net_queues.get(network_id)
        if not q:
            return
        peers = self.network_nodes(network_id)
        if not peers:
            return
        targets = random.sample(peers, min(len(peers), self.config.gossip_nodes))
        # rounds of gossip_nodes sends each node gives an entry: ceil(mult * log10(n + 1)); a node
        # then misses an entry with probability ~ exp(-rounds * gossip_nodes) (anti-entropy repairs it)
        limit = max(2, math.ceil(self.config.retransmit_mult * math.log10(len(peers) + 2)))
        budget = self.config.udp_buffer_size - OVERHEAD - len(self.node_id) - 8
        if q.pop_oversize(budget):
            # too big for a datagram: push the network's table over TCP to the fan-out peers
            log.info("node=%s network=%s entry too large for UDP, syncing over TCP", self.node_id, network_id)
            for t in targets:
                self._spawn(self._sync_quietly(t, [network_id]))
        for batch in q.batches(budget, limit, _MAX_PACKETS_PER_FLUSH, sends=1):
            pkt = pb.Packet(source=self.node_id, messages=batch)
            for t in targets:
                self.membership.send_raw(t.addr, t.port, pkt)

    # ----- events ----------------------------------------------------------------------------

    def subscribe(self) -> Subscription:
        s = Subscription(self)
        self._subs.add(s)
        return s

    def add_listener(self, cb: Callable[[TableEvent], None]) -> None:
        self._listeners.append(cb)

    def remove_listener(self, cb: Callable[[TableEvent], None]) -> None:
        self._listeners.remove(cb)

    def add_member_listener(self, cb: Callable[[Member], None]) -> None:
        self._member_listeners.append(cb)

    def notify_state(self, member: Member) -> None:
        snap = Member(member.node_id, member.addr, member.port, member.state, member.incarnation,
                      member.state_change)
        for cb in list(self._member_listeners):
            try:
                cb(snap)
            except Exception:
                log.exception("node=%s member listener failed", self.node_id)

    def _emit(self, ev: TableEvent) -> None:
        log.debug("node=%s network=%s %s %s/%s owner=%s", self.node_id, ev.network_id, ev.kind, ev.table, ev.key,
                  ev.owner)
        for s in list(self._subs):
            s._push(ev)
        for cb in list(self._listeners):
            try:
                cb(ev)
            except Exception:
                log.exception("node=%s table listener failed", self.node_id)

    # ----- Delegate hooks (called by SwimMembership) ---------------------------------------------

    def notify_alive(self, member: Member, rejoined: bool) -> None:
        # a member back from the dead (or forgotten, after a partition) whose networks we know:
        # its entries were purged here, so fetch them (and give it ours) at once
        nets = [n for n in self._networks if self._in_network(member.node_id, n)]
        if nets:
            self._spawn(self._sync_quietly(member, nets))

    def notify_gone(self, member: Member) -> None:
        events = self.store.purge_owner(member.node_id)
        log.info("node=%s member=%s is %s, purged %d entries", self.node_id, member.node_id, member.state_name,
                 len(events))
        for ev in events:
            self._emit(ev)

    def refuted_dead(self) -> None:
        # the others purged our entries while they thought we were dead: push them again
        self._spawn(self._anti_entropy_once())

    def handle_message(self, msg: pb.Message, source: str) -> None:
        kind = msg.WhichOneof("body")
        if kind == "entry":
            self._on_entry(msg.entry, rebroadcast=True)
        elif kind == "network":
            self._on_network_event(msg.network, rebroadcast=True)

    def local_state(self, pp: pb.PushPull, remote: pb.PushPull | None) -> None:
        pp.networks.extend(self._node_networks.values())
        pp.network_ltime = self.network_clock.time
        pp.table_ltime = self.table_clock.time
        # as requester (join, membership anti-entropy) we send no tables: _sync() adds the ones it wants
        nets = [] if remote is None else [n for n in remote.sync_networks if n in self._networks]
        pp.sync_networks.extend(nets)
        for n in nets:
            pp.entries.extend(self.store.network_entries(n))

    def merge_remote_state(self, pp: pb.PushPull) -> None:
        self.network_clock.witness(pp.network_ltime)
        self.table_clock.witness(pp.table_ltime)
        for ev in pp.networks:
            self._on_network_event(ev, rebroadcast=False)
        synced = set(pp.sync_networks)
        for e in pp.entries:
            if e.network_id in synced:
                self._on_entry(e, rebroadcast=False)

    # ----- anti-entropy ----------------------------------------------------------------------

    def _spawn(self, coro) -> None:
        t = asyncio.get_running_loop().create_task(coro)
        self._bg.add(t)
        t.add_done_callback(self._bg.discard)

    async def _sync(self, peer: Member, network_ids: list[str]) -> None:
        pp = self.membership.local_state(False, None)
        del pp.sync_networks[:]
        del pp.entries[:]
        pp.sync_networks.extend(network_ids)
        for n in network_ids:
            pp.entries.extend(self.store.network_entries(n))
        await self.membership.push_pull(peer.addr, peer.port, join=False, state=pp)
        log.debug("node=%s synced networks=%s with %s", self.node_id, ",".join(network_ids), peer.node_id)

    async def _sync_quietly(self, peer: Member, network_ids: list[str]) -> None:
        try:
            await self._sync(peer, network_ids)
        except _STREAM_ERRORS as e:
            log.info("node=%s sync of %s with %s failed: %s", self.node_id, ",".join(network_ids), peer.node_id,
                     e or type(e).__name__)

    async def _anti_entropy_once(self) -> None:
        by_peer: dict[str, tuple[Member, list[str]]] = {}
        for n in sorted(self._networks):
            peers = self.network_nodes(n)
            if peers:
                p = random.choice(peers)
                by_peer.setdefault(p.node_id, (p, []))[1].append(n)
        for p, nets in by_peer.values():
            await self._sync_quietly(p, nets)

    async def _anti_entropy_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.table_sync_interval * random.uniform(0.75, 1.25))
            await self._anti_entropy_once()

    async def _table_gossip_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.gossip_interval)
            for n, q in list(self._net_queues.items()):
                if len(q):
                    self._flush(n)

    async def _reap_loop(self) -> None:
        while True:
            await asyncio.sleep(max(0.5, min(30.0, self.config.tombstone_ttl / 4)))
            n = self.store.reap(time.monotonic() - self.config.tombstone_ttl)
            if n:
                log.debug("node=%s reaped %d tombstones", self.node_id, n)
