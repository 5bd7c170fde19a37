"""The key manager: rotation of the IPsec keys of encrypted networks and of the cluster's gossip keys
(one leader loop) on a LocalStore."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time

from helpers.aio import run_bounded as run

from shoal.manager import leader
from shoal.manager.allocator import allocate_network
from shoal.manager.keymanager import (
    DEFAULT_ROTATION_NS,
    KEYS_KEPT,
    KeyManager,
    gossip_keys,
    ipsec_keys,
    rotation_interval_ns,
)
from shoal.manager.store import LocalStore, Tx
from shoal.proto import objects_pb2, specs_pb2, types_pb2

S = 10**9


GOSSIP = "networking:gossip"


async def new_store(interval_ns: int | None = None, gossip: int = KEYS_KEPT) -> LocalStore:
    """A store with a cluster holding ``gossip`` gossip keys (lamport times 1..gossip)."""
    st = LocalStore()
    cl = objects_pb2.Cluster(spec=specs_pb2.ClusterSpec(annotations=types_pb2.Annotations(name="default"),
                                                        default_address_pool=["198.19.0.0/16"]))
    for i in range(1, gossip + 1):
        cl.network_bootstrap_keys.add(subsystem=GOSSIP, key=bytes([i]) * 16, lamport_time=i)
    if interval_ns is not None:
        cl.spec.network_encryption.key_rotation_interval.FromNanoseconds(interval_ns)
    await st.update(lambda tx: tx.create(cl))
    return st


async def create(st: LocalStore, name: str, encrypted: bool = True) -> objects_pb2.Network:
    def fn(tx: Tx) -> objects_pb2.Network:
        net = objects_pb2.Network(spec=specs_pb2.NetworkSpec(annotations=types_pb2.Annotations(name=name)))
        if encrypted:
            net.spec.driver_config.options["encrypted"] = ""
        allocate_network(tx.sm, net)
        return tx.create(net)

    return await st.update(fn)


async def set_interval(st: LocalStore, ns: int) -> None:
    def fn(tx: Tx) -> None:
        cl = objects_pb2.Cluster()
        cl.CopyFrom(st.cluster())
        cl.spec.network_encryption.key_rotation_interval.FromNanoseconds(ns)
        tx.update(cl)

    await st.update(fn)


def test_rotation_interval_default_and_setting() -> None:
    assert rotation_interval_ns(None) == DEFAULT_ROTATION_NS == 12 * 3600 * S
    cl = objects_pb2.Cluster()
    assert rotation_interval_ns(cl) == DEFAULT_ROTATION_NS
    cl.spec.network_encryption.key_rotation_interval.FromNanoseconds(30 * S)
    assert rotation_interval_ns(cl) == 30 * S
    cl.spec.network_encryption.key_rotation_interval.FromNanoseconds(1000)  # below the floor: never a busy loop
    assert rotation_interval_ns(cl) == S


def test_rotation_adds_one_key_keeps_the_newest_three_and_stamps_the_time() -> None:
    async def main() -> None:
        st = await new_store(60 * S)
        net = await create(st, "secure")
        plain = await create(st, "plain", encrypted=False)
        km = KeyManager(st)
        t0 = net.keys_rotated_at.ToNanoseconds()
        before = ipsec_keys(st.get("network", net.id))

        # Not due yet: nothing written, and the wait is what is left of the interval.
        version = st.sm.version
        wait = await km.rotate_due(now_ns=t0 + 59 * S)
        assert st.sm.version == version and 0.9 < wait <= 1.0

        now = t0 + 60 * S
        wait = await km.rotate_due(now_ns=now)
        got = st.get("network", net.id)
        keys = ipsec_keys(got)
        assert [k.lamport_time for k in keys] == [2, 3, 4] and len(keys) == KEYS_KEPT
        assert [k.key for k in keys[:2]] == [k.key for k in before[1:]]
        assert len(keys[2].key) == 32 and keys[2].key not in {k.key for k in before}
        assert got.keys_rotated_at.ToNanoseconds() == now
        # next due: this network in 60 s, the gossip keys 60 s after the first pass (59 s from now)
        assert got.meta.version == st.sm.version and wait == 59
        assert not st.get("network", plain.id).encryption_keys

        # Again one interval later: the oldest goes, lamport times keep counting.
        await km.rotate_due(now_ns=now + 60 * S)
        assert [k.lamport_time for k in ipsec_keys(st.get("network", net.id))] == [3, 4, 5]

    run(main())


def test_a_network_without_a_rotation_time_is_rotated_and_a_pending_delete_one_is_not() -> None:
    async def main() -> None:
        st = await new_store()
        a = await create(st, "a")
        b = await create(st, "b")

        def fn(tx: Tx) -> None:
            na, nb = objects_pb2.Network(), objects_pb2.Network()
            na.CopyFrom(st.get("network", a.id))
            na.ClearField("keys_rotated_at")
            nb.CopyFrom(st.get("network", b.id))
            nb.ClearField("keys_rotated_at")
            nb.pending_delete = True
            tx.update(na)
            tx.update(nb)

        await st.update(fn)
        await KeyManager(st).rotate_due()
        assert [k.lamport_time for k in ipsec_keys(st.get("network", a.id))] == [2, 3, 4]
        assert [k.lamport_time for k in ipsec_keys(st.get("network", b.id))] == [1, 2, 3]

    run(main())


def test_loop_follows_a_shorter_interval_at_once_and_stops_cleanly() -> None:
    async def main() -> None:
        st = await new_store()  # default: 12 h
        net = await create(st, "secure")
        km = KeyManager(st)
        task = asyncio.create_task(km.run())
        try:
            await asyncio.sleep(0.2)
            assert [k.lamport_time for k in ipsec_keys(st.get("network", net.id))] == [1, 2, 3]
            # The interval becomes 1 s: the loop must not wait out the 12 h it was sleeping for.
            start = time.monotonic()
            await set_interval(st, S)
            while ipsec_keys(st.get("network", net.id))[-1].lamport_time < 5:
                assert time.monotonic() - start < 10, "keys were not rotated after the interval changed"
                await asyncio.sleep(0.05)
            elapsed = time.monotonic() - start
            assert elapsed < 5, elapsed  # once at once (overdue), once a second later
            # Back to 12 h: no more rotations.
            await set_interval(st, 0)
            await asyncio.sleep(0.1)
            last = ipsec_keys(st.get("network", net.id))[-1].lamport_time
            await asyncio.sleep(1.5)
            assert ipsec_keys(st.get("network", net.id))[-1].lamport_time == last
            # A new encrypted network is looked after too.
            await set_interval(st, S)
            other = await create(st, "other")
            deadline = time.monotonic() + 10
            while ipsec_keys(st.get("network", other.id))[-1].lamport_time < 4:
                assert time.monotonic() < deadline
                await asyncio.sleep(0.05)
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.wait_for(task, 2)
        assert task.cancelled()
        assert not st.sm._watchers  # its watch was closed

    run(main())


def test_key_manager_is_a_leader_loop() -> None:
    assert any(
        isinstance(f(LocalStore(), None), KeyManager) for f in leader.LEADER_LOOPS
        if f.__name__ == "_key_manager"
    )


def sending_key(cluster: objects_pb2.Cluster) -> bytes:
    """The key the agents send with (NetworkDB.set_bootstrap_keys): the second oldest, or the only one."""
    keys = gossip_keys(cluster)
    return keys[1].key if len(keys) > 1 else keys[0].key


def test_gossip_keys_topped_up_around_the_sending_key_then_rotated_in_order() -> None:
    async def main() -> None:
        st = await new_store(60 * S, gossip=1)  # as swarmd makes a cluster: one key, lamport time 1
        other = types_pb2.EncryptionKey(subsystem="other", key=b"o" * 16, lamport_time=7)

        def add_other(tx: Tx) -> None:
            cl = objects_pb2.Cluster()
            cl.CopyFrom(st.cluster())
            cl.network_bootstrap_keys.append(other)
            tx.update(cl)

        await st.update(add_other)
        km = KeyManager(st)
        t0 = 1_000_000 * S
        first = st.cluster()
        p = sending_key(first)

        # First pass: topped up to three keys, the one nodes send with now still second oldest.
        wait = await km.rotate_due(now_ns=t0)
        rings = [st.cluster()]
        keys = gossip_keys(rings[0])
        assert len(keys) == KEYS_KEPT and keys[1].key == p and sending_key(rings[0]) == p
        assert len({k.key for k in keys}) == 3 and all(len(k.key) == 32 for k in (keys[0], keys[2]))
        assert all(k.subsystem == GOSSIP for k in keys)
        assert list(rings[0].network_bootstrap_keys).count(other) == 1
        assert wait == 60  # the first rotation one whole interval after the top-up

        # Not due before the interval is over: nothing written.
        version = st.sm.version
        assert await km.rotate_due(now_ns=t0 + 59 * S) == 1 and st.sm.version == version

        # Each rotation: one new key after the newest, the oldest dropped, the next one sends.
        for i in range(1, 4):
            await km.rotate_due(now_ns=t0 + i * 60 * S)
            rings.append(st.cluster())
        for old, new in itertools.pairwise(rings):
            o, n = gossip_keys(old), gossip_keys(new)
            assert [k.key for k in n[:2]] == [k.key for k in o[1:]]
            assert n[2].lamport_time == o[2].lamport_time + 1 and n[2].key not in {k.key for k in o}
            # the order that never partitions: each ring's sending key is accepted by the other ring
            assert sending_key(new) in {k.key for k in o} and sending_key(old) in {k.key for k in n}
            assert list(new.network_bootstrap_keys).count(other) == 1
        assert p not in {k.key for k in gossip_keys(rings[-1])}
        assert rings[-1].gossip_keys_rotated_at.ToNanoseconds() == t0 + 3 * 60 * S

        # A new leader's key manager counts from the last rotation on record, not from its term.
        version = st.sm.version
        assert await KeyManager(st).rotate_due(now_ns=t0 + 3 * 60 * S + 20 * S) == 40 and st.sm.version == version

    run(main())


def test_gossip_top_up_from_none_and_from_two_keys() -> None:
    async def main() -> None:
        st = await new_store(gossip=0)
        await KeyManager(st).rotate_due()
        assert [k.lamport_time for k in gossip_keys(st.cluster())] == [1, 2, 3]

        st = await new_store(gossip=2)
        before = gossip_keys(st.cluster())
        await KeyManager(st).rotate_due()
        after = gossip_keys(st.cluster())
        assert [k.key for k in after[:2]] == [k.key for k in before] and after[2].lamport_time == 3
        assert sending_key(st.cluster()) == before[1].key

        # A new leader (a new KeyManager) counts the interval from its own start.
        st = await new_store(60 * S)
        keys = [k.key for k in gossip_keys(st.cluster())]
        km = KeyManager(st)
        await km.rotate_due(now_ns=100 * S)
        await km.rotate_due(now_ns=159 * S)
        assert [k.key for k in gossip_keys(st.cluster())] == keys
        await km.rotate_due(now_ns=160 * S)
        assert [k.key for k in gossip_keys(st.cluster())][:2] == keys[1:]

    run(main())
