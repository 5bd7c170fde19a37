"""IPsec keys of encrypted overlay networks and the cluster's gossip keys, and their rotation (one
leader loop), like Docker Swarm's.

An overlay network created with the driver option `encrypted` carries its IPsec keys in the store:
`Network.encryption_keys`, subsystem `networking:ipsec`, 32 random bytes each, oldest first by
`lamport_time`, and `Network.keys_rotated_at`. `allocate_network` gives a new encrypted network its
first `KEYS_KEPT` keys (lamport times 1, 2, 3) in the transaction that allocates it; the `Allocator`
gives keys to an encrypted network that has none (one written before keys existed) on its next pass.

`KeyManager` (leader only) rotates: once the cluster's `network_encryption.key_rotation_interval`
(0 = `DEFAULT_ROTATION_NS`, 12 h; at least 1 s) has passed since `keys_rotated_at`, a network gets one
new key (lamport time = the highest + 1), keeps the newest `KEYS_KEPT`, and `keys_rotated_at` = now,
in one store update checked against the network's version. Agents send with the second oldest of the
three keys and accept all three, so a new key is installed on every node one whole interval before
anybody sends with it, and the key dropped was last used to send one interval earlier.

Keys and timestamps are made here, before the transaction is proposed; the store's apply only copies
them, so every replica holds the same bytes. Keys leave the store only in the dispatcher's
`NetworkKeys` assignments, to nodes with tasks on the network: `public` strips them from anything
else that carries a Network (API answers, watch events, task and node attachments).

Gossip keys (`Cluster.network_bootstrap_keys`, subsystem `networking:gossip`) follow the same order:
the same loop keeps `KEYS_KEPT` of them and, every rotation interval, adds one new key (lamport time =
the highest + 1) and drops the oldest. Agents get them in every session message (the dispatcher sends
a new one whenever the Cluster changes) and apply them with `NetworkDB.set_bootstrap_keys` (send with
the second oldest, accept all). Before a rotation every node sends with B and accepts A, B, C; after
it a node sends with C and accepts B, C, D: whichever of the two rings a node holds, it reads what
the others send, so members never lose each other during a change. A cluster with fewer than
`KEYS_KEPT` gossip keys (swarmd makes one) is topped up first, around the key that is primary now
(one key P becomes F, P, N), so that top-up changes no node's sending key either.

The time of the last top-up or rotation is `Cluster.gossip_keys_rotated_at`, written in the same
transaction, so the interval counts across leader changes (a cluster without it counts from the
start of the leader's term).
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from typing import Any

from shoal.manager.store import Conflict, Store, StoreError, Tx, drain
from shoal.proto import objects_pb2, types_pb2

log = logging.getLogger("shoal.keymanager")

ENCRYPTED_OPTION = "encrypted"  # overlay driver option; present (any value) means encrypted, as in Docker
IPSEC_SUBSYSTEM = "networking:ipsec"
GOSSIP_SUBSYSTEMS = ("networking:gossip", "")  # "" = gossip, as the agents read it
KEY_BYTES = 32
KEYS_KEPT = 3
DEFAULT_ROTATION_NS = 12 * 3600 * 10**9
MIN_ROTATION_NS = 10**9
# The loop re-reads the clock at least this often, so a wall-clock step cannot delay a rotation long.
MAX_SLEEP = 60.0
# After a refused update (the network changed meanwhile), try again this soon.
RETRY_DELAY = 0.1


def is_encrypted(net: objects_pb2.Network | None) -> bool:
    return net is not None and ENCRYPTED_OPTION in net.spec.driver_config.options


def ipsec_keys(net: objects_pb2.Network) -> list[types_pb2.EncryptionKey]:
    """The network's IPsec keys, oldest first."""
    return sorted((k for k in net.encryption_keys if k.subsystem == IPSEC_SUBSYSTEM), key=lambda k: k.lamport_time)


def new_key(lamport_time: int, subsystem: str = IPSEC_SUBSYSTEM) -> types_pb2.EncryptionKey:
    return types_pb2.EncryptionKey(subsystem=subsystem, key=os.urandom(KEY_BYTES), lamport_time=lamport_time)


def gossip_keys(cluster: objects_pb2.Cluster) -> list[types_pb2.EncryptionKey]:
    """The cluster's gossip keys, oldest first."""
    return sorted((k for k in cluster.network_bootstrap_keys if k.subsystem in GOSSIP_SUBSYSTEMS),
                  key=lambda k: k.lamport_time)


def _set_gossip_keys(cluster: objects_pb2.Cluster, keys: list[types_pb2.EncryptionKey]) -> None:
    others = [k for k in cluster.network_bootstrap_keys if k.subsystem not in GOSSIP_SUBSYSTEMS]
    del cluster.network_bootstrap_keys[:]
    cluster.network_bootstrap_keys.extend(others)
    cluster.network_bootstrap_keys.extend(keys)


def top_up_gossip_keys(cluster: objects_pb2.Cluster) -> bool:
    """Give a cluster with fewer than KEYS_KEPT gossip keys its KEYS_KEPT, keeping the key the agents
    send with now (the second oldest, or the only one) in the second oldest place. False: nothing to do."""
    keys = gossip_keys(cluster)
    sub = "networking:gossip"
    if len(keys) >= KEYS_KEPT:
        return False
    if not keys:
        out = [new_key(i, sub) for i in range(1, KEYS_KEPT + 1)]
    elif len(keys) == 1:  # P -> F, P, N (lamport times renumbered from P's, order is what counts)
        p = types_pb2.EncryptionKey()
        p.CopyFrom(keys[0])
        base = p.lamport_time
        p.lamport_time = base + 1
        out = [new_key(base, sub), p, new_key(base + 2, sub)]
    else:  # A, P -> A, P, N
        out = [*keys, new_key(keys[-1].lamport_time + 1, sub)]
    _set_gossip_keys(cluster, out)
    return True


def rotate_gossip_keys(cluster: objects_pb2.Cluster) -> None:
    """Add one gossip key after the newest, keep the newest KEYS_KEPT."""
    keys = gossip_keys(cluster)
    top = keys[-1].lamport_time if keys else 0
    _set_gossip_keys(cluster, [*keys, new_key(top + 1, "networking:gossip")][-KEYS_KEPT:])


def give_initial_keys(net: objects_pb2.Network, now_ns: int | None = None) -> None:
    """Set a network's first keys (lamport times 1..KEYS_KEPT) and keys_rotated_at = now."""
    others = [k for k in net.encryption_keys if k.subsystem != IPSEC_SUBSYSTEM]
    del net.encryption_keys[:]
    net.encryption_keys.extend(others)
    net.encryption_keys.extend(new_key(i) for i in range(1, KEYS_KEPT + 1))
    net.keys_rotated_at.FromNanoseconds(time.time_ns() if now_ns is None else now_ns)


def rotate_keys(net: objects_pb2.Network, now_ns: int) -> None:
    """Add one key after the newest, keep the newest KEYS_KEPT, keys_rotated_at = now."""
    keys = ipsec_keys(net)
    top = keys[-1].lamport_time if keys else 0
    kept = [*keys, new_key(top + 1)][-KEYS_KEPT:]
    others = [k for k in net.encryption_keys if k.subsystem != IPSEC_SUBSYSTEM]
    del net.encryption_keys[:]
    net.encryption_keys.extend(others)
    net.encryption_keys.extend(kept)
    net.keys_rotated_at.FromNanoseconds(now_ns)


def rotation_interval_ns(cluster: objects_pb2.Cluster | None) -> int:
    ns = 0
    if cluster is not None:
        d = cluster.spec.network_encryption.key_rotation_interval
        ns = d.seconds * 10**9 + d.nanos
    if ns <= 0:
        return DEFAULT_ROTATION_NS
    return max(ns, MIN_ROTATION_NS)


def public(obj: Any) -> Any:
    """The object as it may leave the store: a Network, a Task or a Node without IPsec keys (a copy when
    there were any to strip; the object itself otherwise, so listings copy nothing needlessly)."""
    if isinstance(obj, objects_pb2.Network):
        nets = [obj]
    elif isinstance(obj, objects_pb2.Task):
        nets = [a.network for a in obj.networks]
    elif isinstance(obj, objects_pb2.Node):
        nets = [a.network for a in obj.attachments]
    else:
        return obj
    if not any(n.encryption_keys for n in nets):
        return obj
    out = type(obj)()
    out.CopyFrom(obj)
    strip_keys(out)
    return out


def strip_keys(obj: Any) -> None:
    """Clear the IPsec keys in place from a Network, or from the attachments of a Task or a Node."""
    if isinstance(obj, objects_pb2.Network):
        obj.ClearField("encryption_keys")
    elif isinstance(obj, objects_pb2.Task):
        for a in obj.networks:
            a.network.ClearField("encryption_keys")
    elif isinstance(obj, objects_pb2.Node):
        for a in obj.attachments:
            a.network.ClearField("encryption_keys")


class KeyManager:
    """Leader loop: rotates the IPsec keys of encrypted networks and the cluster's gossip keys.
    `await run()` until cancelled."""

    def __init__(self, store: Store, manager: Any = None) -> None:
        self.store = store
        self.manager = manager
        self._gossip_since: int | None = None  # wall-clock ns: term start or last gossip rotation

    async def run(self) -> None:
        # Cluster events: a changed interval counts at once. Network events: new networks, rotations.
        with self.store.watch(["cluster", "network"]) as w:
            log.info("key manager started")
            while True:
                try:
                    wait = await self.rotate_due()
                except Conflict as e:
                    log.info("key rotation refused, retrying: %s", e)
                    wait = RETRY_DELAY
                except StoreError as e:
                    log.warning("key rotation not committed, retrying in 1 s: %s", e)
                    wait = 1.0
                try:
                    async with asyncio.timeout(wait):
                        await w.queue.get()
                except TimeoutError:
                    pass
                drain(w.queue)

    async def rotate_due(self, now_ns: int | None = None) -> float:
        """Rotate the gossip keys and every encrypted network whose interval is over; returns seconds
        until the next rotation is due."""
        interval = rotation_interval_ns(self.store.cluster())
        now = time.time_ns() if now_ns is None else now_ns
        next_due = min(now + int(MAX_SLEEP * 1e9), await self._gossip_due(interval, now))
        for net in self.store.sm.list("network"):
            if not is_encrypted(net) or net.pending_delete or not ipsec_keys(net):
                continue  # networks without keys get theirs from the allocator
            due = self._due_at(net, interval, now)
            if due > now:
                next_due = min(next_due, due)
                continue
            rotated = await self.store.update(lambda tx, nid=net.id: self._rotate(tx, nid, interval, now))
            if rotated is not None:
                log.info(
                    "network keys rotated network=%s name=%s lamport_time=%d",
                    rotated.id, rotated.spec.annotations.name, ipsec_keys(rotated)[-1].lamport_time,
                )
            next_due = min(next_due, now + interval)
        return max(0.0, (next_due - now) / 1e9)

    async def _gossip_due(self, interval: int, now: int) -> int:
        """Top up or rotate the cluster's gossip keys if due; returns when the next rotation is due."""
        cluster = self.store.cluster()
        if cluster is not None and cluster.HasField("gossip_keys_rotated_at"):
            self._gossip_since = cluster.gossip_keys_rotated_at.ToNanoseconds()
        if self._gossip_since is None or self._gossip_since > now + interval:  # term start, or a clock step back
            self._gossip_since = now
        if cluster is None:
            return now + interval
        if len(gossip_keys(cluster)) < KEYS_KEPT:
            # alone in its transaction, and the first rotation one whole interval after it: the key
            # added behind the primary must reach every node before anybody sends with it
            got = await self.store.update(lambda tx: self._gossip(tx, cluster.id, False, now))
            if got is not None:
                log.info("gossip keys topped up to %d lamport_times=%s", KEYS_KEPT,
                         [k.lamport_time for k in gossip_keys(got)])
            self._gossip_since = now
            return now + interval
        if now < self._gossip_since + interval:
            return self._gossip_since + interval
        got = await self.store.update(lambda tx: self._gossip(tx, cluster.id, True, now))
        self._gossip_since = now
        if got is not None:
            log.info("gossip keys rotated lamport_time=%d", gossip_keys(got)[-1].lamport_time)
        return now + interval

    @staticmethod
    def _gossip(tx: Tx, cluster_id: str, rotate: bool, now: int) -> objects_pb2.Cluster | None:
        """Top up the cluster's gossip keys if it has too few, else (rotate) rotate them: never both
        in one transaction; `now` (ns) becomes `gossip_keys_rotated_at`."""
        cur = tx.get("cluster", cluster_id)
        if cur is None:
            return None
        cluster = objects_pb2.Cluster()
        cluster.CopyFrom(cur)
        if top_up_gossip_keys(cluster):
            cluster.gossip_keys_rotated_at.FromNanoseconds(now)
            return tx.update(cluster)
        if not rotate:
            return None
        rotate_gossip_keys(cluster)
        cluster.gossip_keys_rotated_at.FromNanoseconds(now)
        return tx.update(cluster)

    @staticmethod
    def _due_at(net: objects_pb2.Network, interval: int, now: int) -> int:
        if not net.HasField("keys_rotated_at"):
            return now
        last = net.keys_rotated_at.ToNanoseconds()
        if last > now + interval:  # the clock went back a long way: do not wait for it
            return now
        return last + interval

    def _rotate(self, tx: Tx, network_id: str, interval: int, now: int) -> objects_pb2.Network | None:
        cur = tx.get("network", network_id)
        if cur is None or not is_encrypted(cur) or cur.pending_delete or self._due_at(cur, interval, now) > now:
            return None
        net = objects_pb2.Network()
        net.CopyFrom(cur)
        rotate_keys(net, now)
        return tx.update(net)
