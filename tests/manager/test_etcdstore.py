"""EtcdStore on real etcd members (Debian's etcd-server) on 127.0.0.1: the cache, compare-and-swap
transactions, unique names, the network guard, batches, watch events, watch resume and re-list,
fencing by the leader lease and quorum loss. No mocks: every store talks gRPC to its own member's
unix socket, members talk Raft over peer mutual TLS."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import signal
import time
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import grpc
import pytest
from etcd_cluster import CLUSTER, EtcdCluster, etcd_cluster
from helpers.waiting import wait_for_async

from shoal.manager import ca
from shoal.manager.etcdstore import LEADER_KEY, Election, EtcdStore, Fence, FenceLost
from shoal.manager.manager import write_bootstrap
from shoal.manager.store import (
    AlreadyExists,
    Conflict,
    InvalidArgument,
    NotFound,
    StaleVersion,
    Tx,
    Unavailable,
)
from shoal.proto import etcd_pb2, etcd_pb2_grpc, objects_pb2, specs_pb2, store_pb2, types_pb2, watch_pb2

pytestmark = pytest.mark.integration
T = TypeVar("T")


# ---- real members ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def root() -> ca.RootCA:
    return ca.RootCA.create(CLUSTER)




@pytest.fixture
def etcd1(root: ca.RootCA) -> Iterator[EtcdCluster]:
    """A 1-member cluster, stopped and removed afterwards."""
    yield from etcd_cluster(root, 1)


@pytest.fixture
def etcd3(root: ca.RootCA) -> Iterator[EtcdCluster]:
    """A 3-member cluster, stopped and removed afterwards."""
    yield from etcd_cluster(root, 3)


# ---- objects ---------------------------------------------------------------------------------------
def secret(name: str, data: bytes = b"s") -> objects_pb2.Secret:
    return objects_pb2.Secret(spec=specs_pb2.SecretSpec(annotations=types_pb2.Annotations(name=name), data=data))


def network(name: str, subnet: str) -> objects_pb2.Network:
    n = objects_pb2.Network(spec=specs_pb2.NetworkSpec(annotations=types_pb2.Annotations(name=name)))
    n.spec.ipam.configs.add(subnet=subnet)
    return n


def task(i: int, service_id: str = "svc") -> objects_pb2.Task:
    t = objects_pb2.Task(service_id=service_id, slot=i + 1, node_id=f"node{i % 7}")
    t.annotations.name = f"web.{i + 1}"
    t.spec.container.image = "busybox:1"
    return t


def copy(m: T) -> T:
    c = type(m)()  # type: ignore[call-arg]
    c.CopyFrom(m)  # type: ignore[attr-defined]
    return c


def names(store: EtcdStore, kind: str = "secret") -> list[str]:
    return sorted(o.spec.annotations.name for o in store.find(kind))


async def etcd_keys(kv: etcd_pb2_grpc.KVStub) -> dict[bytes, bytes]:
    """Every key under /shoal/ but the write markers (/shoal/w/, on their lease)."""
    r = await kv.Range(etcd_pb2.RangeRequest(key=b"/shoal/", range_end=b"/shoal0"), timeout=5)
    return {x.key: x.value for x in r.kvs if not x.key.startswith(b"/shoal/w/")}


async def object_keys(kv: etcd_pb2_grpc.KVStub) -> dict[bytes, bytes]:
    """The store's keys without the leader key (another manager may take it any time)."""
    return {k: v for k, v in (await etcd_keys(kv)).items() if not k.startswith(b"/shoal/e/")}


eventually = functools.partial(wait_for_async, timeout=10, interval=0.02)


def drain(w: Any) -> list[watch_pb2.WatchEvent]:
    """Every event queued on a store watcher so far."""
    out: list[watch_pb2.WatchEvent] = []
    while not w.queue.empty():
        msg = w.queue.get_nowait()
        assert msg is not None
        out.extend(msg.events)
    return out


async def stop_watch(store: EtcdStore) -> None:
    """Stop a store's cache from following etcd (as if its watch fell behind)."""
    assert store._watch_task is not None
    store._watch_task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await store._watch_task


def restart_watch(store: EtcdStore) -> None:
    store._watch_task = asyncio.get_running_loop().create_task(store._follow())


def state_of(store: EtcdStore) -> dict[tuple[str, str], bytes]:
    return {(k, oid): o.SerializeToString(deterministic=True) for k, table in store.sm.tables.items()
            for oid, o in table.items()}


# ---- basics ----------------------------------------------------------------------------------------
def test_create_update_delete_and_reads_through_the_cache(etcd1: EtcdCluster) -> None:
    async def body() -> None:
        s = await etcd1.store()
        kv = await etcd1.kv()
        t0 = time.time_ns()
        sec = await s.update(lambda tx: tx.create(secret("db", b"pw1")))
        assert len(sec.id) == 25
        got = s.get("secret", sec.id)
        assert got.spec.data == b"pw1" and got.spec.annotations.name == "db"
        v1 = got.meta.version
        assert v1 == s.sm.version  # the version is the etcd revision that wrote it
        assert got.meta.created_at.ToNanoseconds() == got.meta.updated_at.ToNanoseconds() >= t0
        assert s.resolve("secret", "db").id == sec.id and s.resolve("secret", sec.id[:6]).id == sec.id
        keys = await etcd_keys(kv)
        assert set(keys) == {f"/shoal/o/secret/{sec.id}".encode(), b"/shoal/n/secret/db"}
        assert keys[b"/shoal/n/secret/db"] == sec.id.encode()
        stored = objects_pb2.Secret.FromString(keys[f"/shoal/o/secret/{sec.id}".encode()])
        assert stored.meta.version == 0 and stored.spec.data == b"pw1"

        upd = copy(got)
        upd.spec.data = b"pw2"
        await s.update(lambda tx: tx.update(upd))
        got2 = s.get("secret", sec.id)
        assert got2.spec.data == b"pw2" and got2.meta.version > v1 == got.meta.version
        assert got2.meta.created_at == got.meta.created_at
        assert got2.meta.updated_at.ToNanoseconds() > got.meta.updated_at.ToNanoseconds()

        await s.update(lambda tx: tx.delete(got2))
        assert s.get("secret", sec.id) is None and s.find("secret") == []
        with pytest.raises(NotFound, match=r"^secret 'db' does not exist$"):
            await s.update(lambda tx: tx.delete(got2))
        with pytest.raises(NotFound, match=r"^secret 'db' does not exist \(it may have been removed\)$"):
            await s.update(lambda tx: tx.update(got2))
        assert await etcd_keys(kv) == {}
        # a second store loads the same state from etcd
        s2 = await etcd1.store()
        assert state_of(s2) == state_of(s) == {}
        await s.update(lambda tx: tx.create(secret("again")))
        await s2.wait_for(s.sm.version)
        assert state_of(s2) == state_of(s) and names(s2) == ["again"]

    etcd1.run(body())


def test_stale_update_is_a_conflict_with_the_state_machine_message(etcd1: EtcdCluster) -> None:
    async def body() -> None:
        a, b = await etcd1.store(), await etcd1.store()
        sec = await a.update(lambda tx: tx.create(secret("shared")))
        await b.wait_for(a.sm.version)
        read_a = copy(a.get("secret", sec.id))
        read_b = copy(b.get("secret", sec.id))
        v = read_a.meta.version
        read_b.spec.data = b"b wins"
        await b.update(lambda tx: tx.update(read_b))
        newer = b.get("secret", sec.id).meta.version
        read_a.spec.data = b"a loses"
        # a's cache may or may not have seen b's write yet: either way the same precise error
        with pytest.raises(Conflict) as e:
            await a.update(lambda tx: tx.update(read_a))
        assert str(e.value) == (
            f"update out of sequence: secret 'shared' was changed since it was read "
            f"(version {newer}, request had {v}); read it again and retry"
        )
        assert isinstance(e.value, StaleVersion) and not e.value.client
        assert a.get("secret", sec.id).spec.data == b"b wins"
        # the same when a's cache is known to be stale: etcd's compare refuses the Txn, a catches up
        # to the revision of that refusal and then raises the precise error; nothing is written
        await stop_watch(a)
        fresh = copy(b.get("secret", sec.id))
        fresh.spec.data = b"b again"
        await b.update(lambda tx: tx.update(fresh))
        newest = b.get("secret", sec.id).meta.version
        stale = copy(a.get("secret", sec.id))  # what a believes is current
        assert stale.meta.version == newer < newest
        stale.spec.data = b"a stale"
        asyncio.get_running_loop().call_later(0.3, restart_watch, a)
        with pytest.raises(Conflict) as e:
            await a.update(lambda tx: tx.update(stale))
        assert str(e.value) == (
            f"update out of sequence: secret 'shared' was changed since it was read "
            f"(version {newest}, request had {newer}); read it again and retry"
        )
        keys = await etcd_keys(await etcd1.kv())
        assert objects_pb2.Secret.FromString(keys[f"/shoal/o/secret/{sec.id}".encode()]).spec.data == b"b again"
        assert a.get("secret", sec.id).meta.version == newest
        assert isinstance(e.value, StaleVersion) and not e.value.client
        # with retries the transaction is built again from the current state and lands
        attempts: list[int] = []

        def rebuild(tx: Tx) -> None:
            cur = stale if not attempts else copy(tx.get("secret", sec.id))
            attempts.append(cur.meta.version)
            cur.spec.data = b"a rebuilt"
            tx.update(cur)

        await a.update(rebuild, retries=2)
        assert attempts == [newer, newest]
        assert a.get("secret", sec.id).spec.data == b"a rebuilt"
        # a stale version the caller sent is never retried away
        client_calls: list[int] = []

        def client_stale(tx: Tx) -> None:
            client_calls.append(1)
            raise StaleVersion("update out of sequence: the request's version is stale", client=True)

        with pytest.raises(StaleVersion):
            await a.update(client_stale, retries=3)
        assert client_calls == [1]

    etcd1.run(body())


# ---- unique names ----------------------------------------------------------------------------------
def test_unique_names_duplicates_rename_and_delete(etcd1: EtcdCluster) -> None:
    async def body() -> None:
        s = await etcd1.store()
        kv = await etcd1.kv()
        db = await s.update(lambda tx: tx.create(secret("db")))
        with pytest.raises(AlreadyExists) as e:
            await s.update(lambda tx: tx.create(secret("db")))
        assert str(e.value) == f"secret name 'db' is already in use by secret {db.id}; choose another name"
        # a rename frees the old name and claims the new one, in the same Txn
        renamed = copy(s.get("secret", db.id))
        renamed.spec.annotations.name = "db2"
        await s.update(lambda tx: tx.update(renamed))
        keys = await etcd_keys(kv)
        assert b"/shoal/n/secret/db" not in keys and keys[b"/shoal/n/secret/db2"] == db.id.encode()
        other = await s.update(lambda tx: tx.create(secret("db")))
        assert names(s) == ["db", "db2"]
        # renaming onto a held name is refused and changes nothing
        clash = copy(s.get("secret", other.id))
        clash.spec.annotations.name = "db2"
        keys = await etcd_keys(kv)
        with pytest.raises(AlreadyExists, match=f"^secret name 'db2' is already in use by secret {db.id}; "):
            await s.update(lambda tx: tx.update(clash))
        assert await etcd_keys(kv) == keys and names(s) == ["db", "db2"]
        # a delete frees the name; the same name in another kind never clashes
        await s.update(lambda tx: tx.delete(s.get("secret", db.id)))
        assert b"/shoal/n/secret/db2" not in await etcd_keys(kv)
        cfg = objects_pb2.Config(spec=specs_pb2.ConfigSpec(annotations=types_pb2.Annotations(name="db")))
        await s.update(lambda tx: tx.create(cfg))
        await s.update(lambda tx: tx.create(secret("db2")))
        assert names(s) == ["db", "db2"] and names(s, "config") == ["db"]
        with pytest.raises(InvalidArgument, match=r"^secret name is empty: give the secret a name$"):
            await s.update(lambda tx: tx.create(secret("")))

    etcd1.run(body())


def test_delete_without_version_of_a_renamed_object_frees_its_current_name(etcd1: EtcdCluster) -> None:
    """A delete that names no version, from a cache that has not seen a rename yet, must remove the
    name key the object holds in etcd (not the one the stale cache remembers)."""

    async def body() -> None:
        a, b = await etcd1.store(), await etcd1.store()
        x = await b.update(lambda tx: tx.create(secret("n1")))
        await a.wait_for(b.sm.version)
        await stop_watch(a)
        r = copy(b.get("secret", x.id))
        r.spec.annotations.name = "n2"
        await b.update(lambda tx: tx.update(r))
        gone = objects_pb2.Secret(id=x.id)  # by id, no version: "remove whatever it is now"
        asyncio.get_running_loop().call_later(0.3, restart_watch, a)
        await a.update(lambda tx: tx.delete(gone))
        assert await etcd_keys(await etcd1.kv()) == {}
        await b.wait_for(a.sm.version)
        assert b.find("secret") == [] and a.find("secret") == []
        await b.update(lambda tx: tx.create(secret("n2")))  # the name is free again
        assert names(b) == ["n2"]

    etcd1.run(body())


def counting_txns(store: EtcdStore) -> list[tuple[etcd_pb2.TxnRequest, bool | None]]:
    """Record every Txn the store sends, with its outcome (None: no answer)."""
    sent: list[tuple[etcd_pb2.TxnRequest, bool | None]] = []
    real = store.kv.Txn

    async def txn(req: etcd_pb2.TxnRequest, **kw: Any) -> etcd_pb2.TxnResponse:
        i = len(sent)
        sent.append((req, None))
        resp = await real(req, **kw)
        sent[i] = (req, resp.succeeded)
        return resp

    store.kv.Txn = txn  # type: ignore[method-assign]
    return sent


def test_two_managers_race_for_one_name_exactly_one_wins(etcd3: EtcdCluster) -> None:
    async def body() -> None:
        a, b = await etcd3.store(0), await etcd3.store(2)
        txa, txb = counting_txns(a), counting_txns(b)
        rounds, raced = 12, 0
        for i in range(rounds):
            def make(who: str, i: int = i) -> Callable[[Tx], objects_pb2.Secret]:
                def fn(tx: Tx) -> objects_pb2.Secret:
                    tx.create(objects_pb2.Config(spec=specs_pb2.ConfigSpec(
                        annotations=types_pb2.Annotations(name=f"side-{who}-{i}"))))
                    return tx.create(secret(f"race{i}", who.encode()))
                return fn

            na, nb = len(txa), len(txb)
            ra, rb = await asyncio.gather(a.update(make("a")), b.update(make("b")), return_exceptions=True)
            raced += len(txa) > na and len(txb) > nb  # both got past their own cache to etcd
            assert isinstance(ra, objects_pb2.Secret) != isinstance(rb, objects_pb2.Secret), (ra, rb)
            winner, loser, err = ("a", "b", rb) if isinstance(ra, objects_pb2.Secret) else ("b", "a", ra)
            won = ra if winner == "a" else rb
            assert isinstance(err, AlreadyExists), err
            assert str(err) == f"secret name 'race{i}' is already in use by secret {won.id}; choose another name"
        rev = max(a.sm.version, b.sm.version)
        await a.wait_for(rev)
        await b.wait_for(rev)
        assert state_of(a) == state_of(b)
        keys = await etcd_keys(await etcd3.kv(1))
        for i in range(rounds):
            held = [o for o in a.find("secret") if o.spec.annotations.name == f"race{i}"]
            assert len(held) == 1
            who = held[0].spec.data.decode()
            assert keys[f"/shoal/n/secret/race{i}".encode()] == held[0].id.encode()
            sides = sorted(o.spec.annotations.name for o in a.find("config") if o.spec.annotations.name.endswith(f"-{i}"))
            assert sides == [f"side-{who}-{i}"]  # the loser's other action did not land either
        assert len(a.find("secret")) == len(a.find("config")) == rounds
        assert len(keys) == 4 * rounds  # object and name key of each secret and config, nothing else
        assert raced >= rounds // 2, f"the two stores raced in etcd only {raced} times of {rounds}"

    etcd3.run(body())


def test_overlapping_subnets_from_two_managers_one_is_refused(etcd3: EtcdCluster) -> None:
    async def body() -> None:
        a, b = await etcd3.store(0), await etcd3.store(1)
        for i in range(8):
            na, nb = network(f"na{i}", f"10.{i}.0.0/16"), network(f"nb{i}", f"10.{i}.5.0/24")
            ra, rb = await asyncio.gather(a.update(lambda tx, n=na: tx.create(n)),
                                          b.update(lambda tx, n=nb: tx.create(n)), return_exceptions=True)
            errs = [r for r in (ra, rb) if isinstance(r, Exception)]
            assert len(errs) == 1 and isinstance(errs[0], InvalidArgument), (ra, rb)
            if errs[0] is rb:
                assert str(rb) == (f"subnet 10.{i}.5.0/24 overlaps 10.{i}.0.0/16 of network 'na{i}': "
                                   "choose another subnet")
            else:
                assert str(ra) == (f"subnet 10.{i}.0.0/16 overlaps 10.{i}.5.0/24 of network 'nb{i}': "
                                   "choose another subnet")
        rev = max(a.sm.version, b.sm.version)
        await a.wait_for(rev)
        await b.wait_for(rev)
        assert state_of(a) == state_of(b) and len(a.find("network")) == 8
        subnets = sorted(o.spec.ipam.configs[0].subnet for o in a.find("network"))
        assert all(len([s for s in subnets if s.startswith(f"10.{i}.")]) == 1 for i in range(8))

    etcd3.run(body())


def test_a_network_committed_while_a_write_waits_for_its_marker_lease_is_checked_against(etcd3: EtcdCluster) -> None:
    """A write's check and the compares that pin what it relied on come from the same state of the
    cache: when another manager's overlapping network commits while this write waits for its write
    marker's lease (its first write: a grant), the write is refused as overlapping, not committed
    beside it (the check ran before the wait and the guard's revision was read after it)."""

    async def body() -> None:
        a, b = await etcd3.store(0), await etcd3.store(1)
        grant = b._marker_lease

        async def slow_grant(timeout: float) -> int:
            await a.update(lambda tx: tx.create(network("na", "10.0.0.0/16")))
            await b.wait_for(a.sm.version)  # b's cache holds na and the guard's new revision
            return await grant(timeout)

        b._marker_lease = slow_grant  # type: ignore[method-assign]
        with pytest.raises(InvalidArgument, match="overlaps 10.0.0.0/16 of network 'na'"):
            await b.update(lambda tx: tx.create(network("nb", "10.0.5.0/24")))
        await b.wait_for(a.sm.version)
        assert sorted(n.spec.annotations.name for n in b.find("network")) == ["na"]

    etcd3.run(body())


# ---- transactions ----------------------------------------------------------------------------------
def test_multi_action_transaction_with_one_stale_action_changes_nothing(etcd1: EtcdCluster) -> None:
    async def body() -> None:
        a, b = await etcd1.store(), await etcd1.store()
        kv = await etcd1.kv()
        x = await a.update(lambda tx: tx.create(secret("x")))
        y = await a.update(lambda tx: tx.create(secret("y")))
        z = await a.update(lambda tx: tx.create(secret("z")))
        await b.wait_for(a.sm.version)
        stale_y = copy(a.get("secret", y.id))
        fresh = copy(b.get("secret", y.id))
        fresh.spec.data = b"by b"
        await b.update(lambda tx: tx.update(fresh))
        y_now = b.get("secret", y.id).meta.version

        def txn(tx: Tx) -> None:
            tx.create(secret("new"))
            xx = copy(tx.get("secret", x.id))
            xx.spec.data = b"changed"
            tx.update(xx)
            tx.delete(copy(tx.get("secret", z.id)))
            stale_y.spec.data = b"stale"
            tx.update(stale_y)

        for cache_knows in (True, False):
            if cache_knows:
                await a.wait_for(b.sm.version)
            else:  # a's cache has not seen b's write: etcd's compare refuses, a catches up, then says why
                await stop_watch(a)
                stale_y = copy(a.get("secret", y.id))
                fresh = copy(b.get("secret", y.id))
                fresh.spec.data = b"by b again"
                await b.update(lambda tx, fresh=fresh: tx.update(fresh))
                y_now = b.get("secret", y.id).meta.version
                asyncio.get_running_loop().call_later(0.3, restart_watch, a)
            before = await etcd_keys(kv)
            with pytest.raises(Conflict) as e:
                await a.update(txn)
            assert str(e.value) == (
                f"update out of sequence: secret 'y' was changed since it was read "
                f"(version {y_now}, request had {stale_y.meta.version}); read it again and retry"
            )
            assert await etcd_keys(kv) == before
            assert names(a) == ["x", "y", "z"] and a.get("secret", x.id).spec.data == b"s"

    etcd1.run(body())


def test_batch_of_12000_tasks_is_split_within_etcd_limits(etcd1: EtcdCluster) -> None:
    async def body() -> None:
        s = await etcd1.store()
        sent = counting_txns(s)
        actions = []
        for i in range(12000):
            a = store_pb2.StoreAction(kind=store_pb2.StoreAction.CREATE)
            t = task(i)
            t.id = f"t{i:05d}"
            a.object.task.CopyFrom(t)
            actions.append(a)
        t0 = time.monotonic()
        rev = await s.batch(actions)
        took = time.monotonic() - t0
        print(f"12,000 task creates in {took:.2f} s ({12000 / took:,.0f}/s), {len(sent)} Txns")
        assert rev == s.sm.version and len(s.find("task")) == 12000
        assert all(ok for _, ok in sent) and len(sent) == 12
        for req, _ in sent:
            assert len(req.success) <= 4096 and len(req.compare) <= 4096 and req.ByteSize() < 4 * 1024 * 1024
        assert len(s.sm.tasks_by_service("svc")) == 12000 and len(s.sm.tasks_by_node("node3")) == 12000 // 7 + (3 < 12000 % 7)
        got = s.get("task", "t11999")
        assert got.slot == 12000 and got.meta.version == rev
        kv = await etcd1.kv()
        r = await kv.Range(etcd_pb2.RangeRequest(key=b"/shoal/o/task/", range_end=b"/shoal/o/task0",
                                                 count_only=True), timeout=5)
        assert r.count == 12000
        fresh = await etcd1.store()  # loads them in pages
        assert state_of(fresh) == state_of(s)
        # large objects: split by bytes, every request below etcd's 4 MiB
        sent.clear()
        big = []
        for i in range(30):
            a = store_pb2.StoreAction(kind=store_pb2.StoreAction.CREATE)
            sec = secret(f"big{i}", bytes([i]) * 300_000)
            sec.id = f"big{i:02d}"
            a.object.secret.CopyFrom(sec)
            big.append(a)
        await s.batch(big)
        assert len(sent) >= 3 and all(ok for _, ok in sent)
        assert all(req.ByteSize() < 4 * 1024 * 1024 for req, _ in sent)
        assert len(s.find("secret")) == 30 and s.get("secret", "big29").spec.data == bytes([29]) * 300_000

    etcd1.run(body(), timeout=240)


# ---- watch and cache -------------------------------------------------------------------------------
async def next_messages(w: Any, n_events: int, timeout: float = 10) -> list[Any]:
    out, got = [], 0
    async with asyncio.timeout(timeout):
        while got < n_events:
            msg = await w.queue.get()
            assert msg is not None
            out.append(msg)
            got += len(msg.events)
    return out


def test_watch_sees_create_update_delete_with_old_object(etcd1: EtcdCluster) -> None:
    async def body() -> None:
        s = await etcd1.store()
        w = s.watch(["secret"])
        sec = await s.update(lambda tx: tx.create(secret("w", b"1")))
        await s.update(lambda tx: tx.create(objects_pb2.Config(
            spec=specs_pb2.ConfigSpec(annotations=types_pb2.Annotations(name="not-watched")))))
        v1 = copy(s.get("secret", sec.id))
        v2 = copy(v1)
        v2.spec.data = b"2"
        await s.update(lambda tx: tx.update(v2))
        v2 = copy(s.get("secret", sec.id))
        await s.update(lambda tx: tx.delete(v2))
        msgs = await next_messages(w, 3)
        assert [len(m.events) for m in msgs] == [1, 1, 1]
        c, u, d = (m.events[0] for m in msgs)
        assert c.action == watch_pb2.WatchEvent.CREATE and c.object.secret == v1 and not c.HasField("old_object")
        assert u.action == watch_pb2.WatchEvent.UPDATE and u.object.secret == v2 and u.old_object.secret == v1
        assert d.action == watch_pb2.WatchEvent.DELETE and d.object.secret == v2
        assert msgs[0].version == v1.meta.version and msgs[1].version == v2.meta.version
        assert msgs[2].version == s.sm.version > v2.meta.version
        assert w.queue.empty()
        w.close()

    etcd1.run(body())


def test_a_revision_reached_as_the_wait_runs_out_is_not_a_timeout(etcd1: EtcdCluster) -> None:
    """A busy loop may run a wait's timeout before the waiting task resumes with the revision it got
    (seen as "did not reach revision 4382 in time (it holds 4382)" under a 2,000-node convergence):
    the wait answers by what the cache holds then, not by which callback ran first."""

    async def body() -> None:
        s = await etcd1.store()
        target = s.sm.version + 1
        waiter = asyncio.create_task(s.wait_for(target, timeout=0.05))
        await asyncio.sleep(0)  # waiting now
        time.sleep(0.1)  # the loop busy past the timeout...
        s.sm.version = target  # ...during which the cache applied the revision (the waiter not resumed yet)
        await waiter  # no Unavailable
        with pytest.raises(Unavailable, match=f"did not reach revision {target + 1} in time"):
            await s.wait_for(target + 1, timeout=0.05)

    etcd1.run(body())


def test_a_committed_write_waits_for_a_lagging_cache_past_the_write_deadline(etcd1: EtcdCluster) -> None:
    """etcd commits the write, but this manager's cache takes longer than `write_timeout` (4 s) to
    hold it (its loop busy applying a convergence's large commits): the write is answered once the
    cache holds it, not failed as unavailable (its writer would do again what is done)."""

    async def body() -> None:
        s = await etcd1.store()
        await stop_watch(s)  # the cache falls behind...
        asyncio.get_running_loop().call_later(s.write_timeout + 1.5, restart_watch, s)  # ...for 5.5 s
        t0 = time.monotonic()
        sec = await s.update(lambda tx: tx.create(secret("late")))
        took = time.monotonic() - t0
        assert took > s.write_timeout + 1 and s.get("secret", sec.id).spec.annotations.name == "late", took

    etcd1.run(body())


def test_read_your_writes_and_the_version_never_goes_back(etcd3: EtcdCluster) -> None:
    async def body() -> None:
        a, b = await etcd3.store(0), await etcd3.store(2)
        wa, wb = a.watch(), b.watch()
        seen: dict[str, list[int]] = {"a": [], "b": []}
        stop = asyncio.Event()

        async def sample() -> None:
            while not stop.is_set():
                seen["a"].append(a.sm.version)
                seen["b"].append(b.sm.version)
                await asyncio.sleep(0)

        sampler = asyncio.create_task(sample())
        ids = []
        for i in range(40):
            writer, other = (a, b) if i % 2 == 0 else (b, a)
            if i < 20:
                sec = await writer.update(lambda tx, i=i: tx.create(secret(f"r{i}", b"0")))
                ids.append(sec.id)
            else:
                cur = copy(writer.get("secret", ids[i - 20]))
                cur.spec.data = b"%d" % i
                await writer.update(lambda tx, cur=cur: tx.update(cur))
            mine = writer.get("secret", ids[i % 20])  # the writer's own cache holds it on return
            assert mine is not None and mine.spec.data == (b"0" if i < 20 else b"%d" % i)
            rev = mine.meta.version
            assert writer.sm.version >= rev
            await other.wait_for(rev)
            theirs = other.get("secret", ids[i % 20])
            assert theirs.meta.version >= rev and theirs.spec.data == mine.spec.data
        stop.set()
        await sampler
        for who, vs in seen.items():
            assert vs == sorted(vs), f"{who}'s cache version went backwards"
        await b.wait_for(a.sm.version)
        await a.wait_for(b.sm.version)
        assert state_of(a) == state_of(b)
        for w in (wa, wb):
            versions = [m.version for m in drain_messages(w)]
            assert len(versions) == 40 and versions == sorted(set(versions))

    etcd3.run(body())


def drain_messages(w: Any) -> list[Any]:
    out = []
    while not w.queue.empty():
        msg = w.queue.get_nowait()
        assert msg is not None
        out.append(msg)
    return out


def history(msgs: list[Any]) -> list[tuple[int, list[tuple[int, bytes, bytes]]]]:
    return [(m.version, [(e.action, e.object.SerializeToString(deterministic=True),
                          e.old_object.SerializeToString(deterministic=True)) for e in m.events]) for m in msgs]


def test_watch_resumes_after_its_member_is_killed_without_a_gap(etcd3: EtcdCluster) -> None:
    async def body() -> None:
        # s0 follows the Raft leader's member, which gets killed; s1 writes through another member
        lead = await etcd3.leader_index()
        victim = etcd3.members[lead]
        s0, s1 = await etcd3.store(lead), await etcd3.store((lead + 1) % 3)
        w0, w1 = s0.watch(), s1.watch()
        writes = 0
        retries: list[str] = []
        slowest = 0.0

        async def write(n: int) -> None:
            """n writes through s1: creates, updates and deletes (one that fails is recorded and
            retried on what s1's cache holds then)."""
            nonlocal writes, slowest
            for _ in range(n):
                i = writes
                writes += 1
                t0 = time.monotonic()
                while True:
                    live = sorted(s1.find("secret"), key=lambda o: o.meta.version)
                    try:
                        if i % 5 == 4 and live:
                            await s1.update(lambda tx, cur=live[0]: tx.delete(cur))
                        elif i % 3 == 2 and live:
                            cur = copy(live[-1])
                            cur.spec.data = b"u%d" % i
                            await s1.update(lambda tx, cur=cur: tx.update(cur))
                        else:
                            await s1.update(lambda tx, i=i: tx.create(secret(f"k{i}")))
                        break
                    except (AlreadyExists, NotFound):
                        break  # the earlier attempt landed
                    except (Unavailable, Conflict) as e:
                        retries.append(f"write {i}: {e}")
                slowest = max(slowest, time.monotonic() - t0)

        await write(20)
        await s0.wait_for(s1.sm.version)
        old_pid = victim.pid
        assert old_pid is not None
        os.kill(old_pid, signal.SIGKILL)
        t_kill = time.monotonic()
        await write(30)  # through a surviving member while the victim is down
        assert victim.pid in (None, old_pid) or time.monotonic() - t_kill > 0.4
        await eventually(lambda: victim.pid not in (None, old_pid), timeout=10)  # run() restarted it
        await write(10)
        await s0.wait_for(s1.sm.version, timeout=30)
        print(f"s0 caught up {time.monotonic() - t_kill:.2f} s after the kill; slowest write {slowest:.2f} s")
        # the write in flight when the leader died was lost by etcd without an answer: the store sent
        # it again within its deadline, so no write failed
        assert retries == []
        assert state_of(s0) == state_of(s1)
        h0, h1 = history(drain_messages(w0)), history(drain_messages(w1))
        assert len(h1) >= writes == 60
        assert [v for v, _ in h1] == sorted({v for v, _ in h1})
        assert h0 == h1  # every revision exactly once, in order, with the same events

    etcd3.run(body())


def test_compacted_watch_relists_and_delivers_the_difference(etcd1: EtcdCluster, caplog: Any) -> None:
    async def body() -> None:
        s, t = await etcd1.store(), await etcd1.store()
        a = await t.update(lambda tx: tx.create(secret("a")))
        b = await t.update(lambda tx: tx.create(secret("b")))
        c = await t.update(lambda tx: tx.create(secret("c")))
        await s.wait_for(t.sm.version)
        w = s.watch()
        await stop_watch(s)  # s falls behind from here
        behind = s.sm.version
        old_b, old_c = copy(s.get("secret", b.id)), copy(s.get("secret", c.id))
        d = await t.update(lambda tx: tx.create(secret("d")))
        nb = copy(t.get("secret", b.id))
        nb.spec.data = b"new b"
        await t.update(lambda tx: tx.update(nb))
        await t.update(lambda tx: tx.delete(t.get("secret", c.id)))
        for i in range(5):  # churn that leaves nothing behind
            e = await t.update(lambda tx, i=i: tx.create(secret(f"e{i}")))
            await t.update(lambda tx, e=e: tx.delete(t.get("secret", e.id)))
        head = t.sm.version
        kv = await etcd1.kv()
        await kv.Compact(etcd_pb2.CompactionRequest(revision=head, physical=True), timeout=10)
        assert drain_messages(w) == [] and s.sm.version == behind
        restart_watch(s)
        await s.wait_for(head)
        fresh = await etcd1.store()
        assert state_of(s) == state_of(fresh) == state_of(t)
        assert names(s) == ["a", "b", "d"] and s.get("secret", a.id).spec.data == b"s"
        msgs = drain_messages(w)
        assert len(msgs) == 1 and msgs[0].version == head
        evs = {(e.action, e.object.secret.spec.annotations.name): e for e in msgs[0].events}
        A = watch_pb2.WatchEvent
        assert set(evs) == {(A.CREATE, "d"), (A.UPDATE, "b"), (A.DELETE, "c")}
        assert evs[(A.CREATE, "d")].object.secret == t.get("secret", d.id)
        assert evs[(A.UPDATE, "b")].object.secret.spec.data == b"new b"
        assert evs[(A.UPDATE, "b")].old_object.secret == old_b
        assert evs[(A.DELETE, "c")].object.secret == old_c
        # and it follows again from there
        await t.update(lambda tx: tx.create(secret("after")))
        await s.wait_for(t.sm.version)
        assert names(s) == ["a", "after", "b", "d"]

    with caplog.at_level("INFO", logger="shoal.manager.etcdstore"):
        etcd1.run(body())
    assert any("re-listing" in r.getMessage() for r in caplog.records)


# ---- fencing ---------------------------------------------------------------------------------------
class Candidates:
    """Elections of several managers, their terms collected in one queue as (node id, term)."""

    def __init__(self, stores: dict[str, EtcdStore]) -> None:
        self.elections = {node: Election(store, node, ttl=2) for node, store in stores.items()}
        self.terms: asyncio.Queue[tuple[str, Fence | None]] = asyncio.Queue()
        self.tasks = [asyncio.create_task(self._run(node, e)) for node, e in self.elections.items()]

    async def _run(self, node: str, election: Election) -> None:
        async for term in election.terms():
            await self.terms.put((node, term))

    async def next(self, timeout: float = 10) -> tuple[str, Fence | None]:
        async with asyncio.timeout(timeout):
            return await self.terms.get()

    async def stop(self) -> None:
        for t in self.tasks:
            t.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)


def late_task(i: int) -> store_pb2.StoreAction:
    act = store_pb2.StoreAction(kind=store_pb2.StoreAction.CREATE)
    act.object.task.CopyFrom(task(i))
    act.object.task.id = f"ft{i}"
    return act


async def handover(cands: Candidates, loser: str) -> list[tuple[str, Fence]]:
    """The next two terms: `loser`'s None and someone's new Fence, in whichever order they came."""
    got = [await cands.next(), await cands.next()]
    assert (loser, None) in got, got
    return [t for t in got if t != (loser, None)]  # type: ignore[misc]


def test_fenced_writes_fail_once_the_lease_is_gone(etcd3: EtcdCluster) -> None:
    async def body() -> None:
        stores = {"node-a": await etcd3.store(0), "node-b": await etcd3.store(1)}
        kv = await etcd3.kv(2)
        cands = Candidates(stores)
        try:
            x, f1 = await cands.next()
            assert isinstance(f1, Fence)
            sx = stores[x]
            await sx.wait_for(f1.revision)
            assert sx.leader_key.create_revision == f1.revision and sx.leader_key.value == x.encode()
            old = sx.fenced(f1)
            ok = await old.update(lambda tx: tx.create(secret("by-first")))
            assert sx.get("secret", ok.id) is not None
            await old.batch([late_task(i) for i in range(3)])
            assert len(sx.find("task")) == 3
            assert cands.terms.empty()  # one leader at a time

            # the lease is revoked behind the leader's back: its very next fenced write is refused,
            # before its own election has noticed anything, and nothing of it lands
            await sx.lease.LeaseRevoke(etcd_pb2.LeaseRevokeRequest(ID=cands.elections[x].lease_id), timeout=5)
            before = await object_keys(kv)
            with pytest.raises(FenceLost) as e:
                await old.update(lambda tx: tx.create(secret("too-late")))
            assert str(e.value) == ("this manager no longer holds the leader lease; its control loops stop and "
                                    "the new leader's take over")
            with pytest.raises(FenceLost):
                await old.batch([late_task(9)])
            assert await object_keys(kv) == before
            # its election says so too, and a new term starts, for whichever manager campaigns first
            # (the two in either order: a manager learns of its loss on its own)
            (y, f2), = await handover(cands, x)
            assert isinstance(f2, Fence) and f2.revision > f1.revision
            with pytest.raises(FenceLost):  # the old claim stays dead with a new leader key
                await old.update(lambda tx: tx.create(secret("still-too-late")))
            assert not [k for k in await etcd_keys(kv) if b"too-late" in k or k.endswith(b"/ft9")]
            await stores[y].wait_for(f2.revision)
            await stores[y].fenced(f2).update(lambda tx: tx.create(secret("by-second")))

            # a resign hands the key to another manager, and the resigned claim is dead
            await cands.elections[y].resign()
            (z, f3), = await handover(cands, y)
            assert z != y and isinstance(f3, Fence) and f3.revision > f2.revision
            with pytest.raises(FenceLost):
                await stores[y].fenced(f2).update(lambda tx: tx.create(secret("resigned")))
            await stores[z].wait_for(f3.revision)
            await stores[z].fenced(f3).update(lambda tx: tx.create(secret("by-third")))
            a, b = stores.values()
            await a.wait_for(b.sm.version)
            await b.wait_for(a.sm.version)
            assert names(a) == names(b) == ["by-first", "by-second", "by-third"]
            assert sorted(t.id for t in a.find("task")) == ["ft0", "ft1", "ft2"]
            assert cands.terms.empty()
        finally:
            await cands.stop()

    etcd3.run(body())


# ---- quorum loss -----------------------------------------------------------------------------------
def test_quorum_loss_write_fails_within_bound_and_reads_answer(etcd3: EtcdCluster) -> None:
    async def body() -> None:
        asked = []

        async def quorum_message() -> str | None:
            asked.append(time.monotonic())
            return "no quorum: 1 of 3 managers reachable; writes are refused until a majority is back"

        s = await etcd3.store(0, quorum_message=quorum_message)
        plain = await etcd3.store(0)
        sec = await s.update(lambda tx: tx.create(secret("before")))
        await plain.wait_for(s.sm.version)
        await asyncio.gather(etcd3.members[1].stop(), etcd3.members[2].stop())

        async def timed(store: EtcdStore, name: str) -> tuple[float, BaseException | None]:
            t0 = time.monotonic()
            try:
                await store.update(lambda tx: tx.create(secret(name)))
            except BaseException as e:  # noqa: BLE001
                return time.monotonic() - t0, e
            return time.monotonic() - t0, None

        (t1, e1), (t2, e2) = await asyncio.gather(timed(s, "after"), timed(plain, "after2"))
        print(f"write without quorum refused after {t1:.2f} s (with quorum_message), {t2:.2f} s (without)")
        assert isinstance(e1, Unavailable) and not isinstance(e1, FenceLost)
        assert str(e1) == "no quorum: 1 of 3 managers reachable; writes are refused until a majority is back"
        assert len(asked) == 1
        assert isinstance(e2, Unavailable)
        assert str(e2) == ("write outcome unknown: the store did not confirm it within 4 s (no quorum, or the "
                           "leader is changing); read the object again and retry")
        assert t1 < 6 and t2 < 6
        # reads answer from the cache
        assert names(s) == names(plain) == ["before"]
        assert s.get("secret", sec.id).spec.annotations.name == "before"
        assert s.resolve("secret", "before").id == sec.id
        # a majority back: writes are accepted again (the refused ones had an unknown outcome: they
        # may or may not have landed, which is what their message says)
        await etcd3.members[1].start()
        await eventually(lambda: writes_again(s), timeout=20)

    etcd3.run(body())


def test_bootstrap_through_a_quorum_loss_mid_batch_writes_each_object_once(etcd3: EtcdCluster) -> None:
    """A restored backup's objects go in several transactions; the quorum is lost after the first
    commits (two of three members stopped). The bootstrap retries while the store refuses
    (Unavailable) and, each time, sends only the objects the store does not hold: the first
    transaction's tasks are never sent again (they were, and then failed AlreadyExists), and the
    Cluster goes last, once everything else is in."""

    async def body() -> None:
        s = await etcd3.store(0, write_timeout=1.5)
        snap = store_pb2.StoreSnapshot()
        for i in range(2500):  # three transactions of at most MAX_TXN_ACTIONS (1,000)
            t = task(i)
            t.id = f"t{i:05d}"
            snap.objects.add().task.CopyFrom(t)
        snap.objects.add().cluster.CopyFrom(objects_pb2.Cluster(
            id="c1", spec=specs_pb2.ClusterSpec(annotations=types_pb2.Annotations(name="default"))))
        real = s.kv.Txn
        sent: list[tuple[set[bytes], bool | None]] = []
        stopped = asyncio.Event()

        async def txn(req: etcd_pb2.TxnRequest, **kw: Any) -> etcd_pb2.TxnResponse:
            keys = {op.request_put.key for op in req.success if op.request_put.key.startswith(b"/shoal/o/")}
            sent.append((keys, None))
            i = len(sent) - 1
            resp = await real(req, **kw)
            sent[i] = (keys, resp.succeeded)
            if resp.succeeded and len(keys) == 1000 and not stopped.is_set():
                stopped.set()  # the first transaction is in: take the quorum away
                await asyncio.gather(etcd3.members[1].stop(), etcd3.members[2].stop())
            return resp

        s.kv.Txn = txn  # type: ignore[method-assign]

        async def quorum_back() -> None:
            await stopped.wait()
            await asyncio.sleep(4)  # the bootstrap is refused twice meanwhile
            await etcd3.members[1].start()

        back = asyncio.create_task(quorum_back())
        t0 = time.monotonic()
        assert (await write_bootstrap(s, snap)).id == "c1"  # type: ignore[union-attr]
        took = time.monotonic() - t0
        await back
        first = next(k for k, ok in sent if ok and len(k) == 1000)
        after = [k for k, _ in sent[sent.index((first, True)) + 1 :]]
        answered = [k for k, ok in sent if ok]
        unknown = [k for k, ok in sent if ok is None]  # their answer lost (timed out): may have landed
        print(f"bootstrap of 2,501 objects through a 4 s quorum loss: {took:.1f} s, {len(sent)} Txns "
              f"({len(unknown)} with their outcome unknown)")
        assert stopped.is_set() and len(after) > 2  # refused at least once before the quorum came back
        assert not any(k & first for k in after), "the first transaction's objects were sent again"
        assert sum(len(k) for k in answered) == len(set().union(*answered))  # none committed twice
        assert len(set().union(*answered, *unknown)) == 2501
        # every object's key was written exactly once (etcd counts a key's writes since its creation)
        r = await s.kv.Range(etcd_pb2.RangeRequest(key=b"/shoal/o/", range_end=b"/shoal/o0", keys_only=True),
                             timeout=5)
        assert len(r.kvs) == 2501 and {kv.version for kv in r.kvs} == {1}
        assert len(s.find("task")) == 2500 and s.cluster().id == "c1"
        assert await write_bootstrap(s, snap) is None  # a cluster is there: nothing written

    etcd3.run(body())


async def writes_again(s: EtcdStore) -> bool:
    try:
        await s.update(lambda tx: tx.create(secret(f"back{time.monotonic_ns()}")))
        return True
    except Unavailable:
        return False


def test_election_claims_a_key_it_took_whose_answer_was_lost(etcd1: EtcdCluster) -> None:
    """The Txn that takes the leader key commits, but its answer never comes (a deadline): the next
    campaign finds the key under its own lease and leads with it, rather than waiting for ever
    behind a key that its own keep-alives hold."""

    async def body() -> None:
        s = await etcd1.store()
        real = s.kv.Txn
        lost: list[int] = []

        async def txn(req: etcd_pb2.TxnRequest, **kw: Any) -> etcd_pb2.TxnResponse:
            resp = await real(req, **kw)
            if not lost and resp.succeeded and any(op.request_put.key == b"/shoal/e/leader" for op in req.success):
                lost.append(resp.header.revision)
                raise grpc.aio.AioRpcError(grpc.StatusCode.DEADLINE_EXCEEDED, grpc.aio.Metadata(),
                                           grpc.aio.Metadata(), "Deadline Exceeded")
            return resp

        s.kv.Txn = txn  # type: ignore[method-assign]
        cands = Candidates({"node-a": s})
        try:
            node, fence = await cands.next(timeout=5)
            assert node == "node-a" and fence == Fence(lost[0])
            await s.wait_for(fence.revision)
            await s.fenced(fence).update(lambda tx: tx.create(secret("led")))
            assert names(s) == ["led"]
        finally:
            await cands.stop()

    etcd1.run(body())


def test_a_write_whose_answer_was_lost_is_sent_again_and_counted_once(etcd1: EtcdCluster) -> None:
    """A Txn that commits but whose answer is lost (as when the leader dies after committing), and
    one refused before etcd ran it: the store sends it again within its deadline; the write marker
    every copy carries makes a repeat fail if the first landed, and the write returns as done --
    even when another client changed the object in between (a create is never done twice)."""

    async def body() -> None:
        s = await etcd1.store()
        real = s.kv.Txn
        plan: list[str] = []  # what to do to the next Txns: "lose" the answer, or "refuse" it unsent
        seen: list[bool] = []

        async def txn(req: etcd_pb2.TxnRequest, **kw: Any) -> etcd_pb2.TxnResponse:
            what = plan.pop(0) if plan else ""
            if what == "refuse":
                seen.append(False)
                raise grpc.aio.AioRpcError(grpc.StatusCode.UNAVAILABLE, grpc.aio.Metadata(), grpc.aio.Metadata(),
                                           "connection refused")
            resp = await real(req, **kw)
            seen.append(resp.succeeded)
            if what == "lose":
                raise grpc.aio.AioRpcError(grpc.StatusCode.DEADLINE_EXCEEDED, grpc.aio.Metadata(),
                                           grpc.aio.Metadata(), "Deadline Exceeded")
            return resp

        s.kv.Txn = txn  # type: ignore[method-assign]
        kv = await etcd1.kv()
        # A create lands, its answer is lost, and another client deletes the object before the
        # copy goes out: the copy must not create it again (the write marker says it landed).
        other = await etcd1.store()
        plan[:] = ["lose"]

        async def txn_then_delete(req: etcd_pb2.TxnRequest, **kw: Any) -> etcd_pb2.TxnResponse:
            if plan == ["lose"] and any(op.request_put.key.startswith(b"/shoal/o/secret/") for op in req.success):
                plan.clear()
                resp = await real(req, **kw)
                seen.append(resp.succeeded)
                created = await eventually(lambda: other.resolve("secret", "ghost") if other.find("secret") else None)
                await other.update(lambda tx: tx.delete(created))
                raise grpc.aio.AioRpcError(grpc.StatusCode.DEADLINE_EXCEEDED, grpc.aio.Metadata(),
                                           grpc.aio.Metadata(), "Deadline Exceeded")
            return await txn(req, **kw)

        s.kv.Txn = txn_then_delete  # type: ignore[method-assign]
        await s.update(lambda tx: tx.create(secret("ghost", b"g")))
        assert seen[0] is True
        await s.wait_for(other.sm.version)
        assert s.find("secret") == [] and other.find("secret") == [] and await etcd_keys(kv) == {}
        markers = (await kv.Range(etcd_pb2.RangeRequest(key=b"/shoal/w/", range_end=b"/shoal/w0"), timeout=5)).kvs
        assert markers and all(m.lease != 0 for m in markers)  # they expire with their lease
        s.kv.Txn = txn  # type: ignore[method-assign]
        seen.clear()
        plan[:] = ["lose"]
        sec = await s.update(lambda tx: tx.create(secret("once", b"1")))
        # committed; found in the cache at once, or the repeat's compare failed and then it was
        assert seen in ([True], [True, False])
        got = s.get("secret", sec.id)
        assert names(s) == ["once"] and got.spec.data == b"1"
        upd = copy(got)
        upd.spec.data = b"2"
        seen.clear()
        plan[:] = ["lose"]
        await s.update(lambda tx: tx.update(upd))
        assert seen in ([True], [True, False]) and s.get("secret", sec.id).spec.data == b"2"
        seen.clear()
        plan[:] = ["refuse", "refuse"]
        upd = copy(s.get("secret", sec.id))
        upd.spec.data = b"3"
        await s.update(lambda tx: tx.update(upd))
        assert seen == [False, False, True] and s.get("secret", sec.id).spec.data == b"3"
        seen.clear()
        plan[:] = ["lose"]
        await s.update(lambda tx: tx.delete(s.get("secret", sec.id)))
        assert seen in ([True], [True, False]) and s.find("secret") == []
        assert await etcd_keys(kv) == {}
        # the cache has not seen the first copy when the repeat goes out: its compare fails, the
        # cache catches up to that revision and holds the write exactly as sent
        seen.clear()
        plan[:] = ["lose"]
        await stop_watch(s)
        asyncio.get_running_loop().call_later(0.3, restart_watch, s)
        again = await s.update(lambda tx: tx.create(secret("again", b"a")))
        assert seen == [True, False]
        assert names(s) == ["again"] and s.get("secret", again.id).spec.data == b"a"
        await s.update(lambda tx: tx.delete(s.get("secret", again.id)))
        # every attempt refused until the deadline: the write fails, saying its outcome is unknown
        plan[:] = ["refuse"] * 100
        t0 = time.monotonic()
        with pytest.raises(Unavailable, match=r"^write outcome unknown: "):
            await s.update(lambda tx: tx.create(secret("never")))
        assert 3.9 < time.monotonic() - t0 < 4.5 and s.find("secret") == [] and await etcd_keys(kv) == {}

    etcd1.run(body())


def test_a_leader_whose_loop_is_busy_keeps_the_key_and_a_wedged_one_loses_it(etcd1: EtcdCluster) -> None:
    """The keep-alives do not wait for the event loop: a loop blocked for most of a lease (2 s) still
    leads afterwards, with no new term; a loop blocked for good (here 6 s, three leases) lets the
    lease run out, and its election says so once the loop runs again."""

    async def body() -> None:
        s = await etcd1.store()
        cands = Candidates({"node-a": s})
        try:
            node, fence = await cands.next(timeout=5)
            assert node == "node-a" and fence is not None
            await asyncio.sleep(0.6)
            time.sleep(1.8)  # noqa: ASYNC251 - the point: the loop is busy
            await asyncio.sleep(1.0)
            assert cands.terms.empty()
            await s.fenced(fence).update(lambda tx: tx.create(secret("led-after-busy")))
            time.sleep(6)  # noqa: ASYNC251 - wedged
            assert await cands.next(timeout=5) == ("node-a", None)
            with pytest.raises(FenceLost):
                await s.fenced(fence).update(lambda tx: tx.create(secret("too-late")))
        finally:
            await cands.stop()

    etcd1.run(body())


def test_a_leader_keeps_the_key_through_a_store_that_answers_late(etcd1: EtcdCluster) -> None:
    """A keep-alive is waited for as long as the lease is surely valid: under a 5 s lease, the etcd
    member stopped (SIGSTOP) for 3.4 s and then answering, the leader keeps its key, with no new
    term, and its fenced writes commit. (A request given half the lease, 2.5 s, lost the key this
    way in a 2,000-node run whose machine was out of CPU.)"""

    async def body() -> None:
        s = await etcd1.store()
        cands = Candidates({"node-a": s})
        e = cands.elections["node-a"]
        e.base_ttl = 5
        pid = etcd1.members[0].pid
        assert pid is not None
        try:
            node, fence = await cands.next(timeout=10)
            assert node == "node-a" and fence is not None and e.ttl == 5
            await asyncio.sleep(1.0)
            os.kill(pid, signal.SIGSTOP)
            try:
                await asyncio.sleep(3.4)
            finally:
                os.kill(pid, signal.SIGCONT)
            await asyncio.sleep(2.0)
            assert cands.terms.empty(), cands.terms.get_nowait()
            await s.fenced(fence).update(lambda tx: tx.create(secret("led-after-a-slow-store")))
        finally:
            await cands.stop()

    etcd1.run(body())


async def growing_leader(s: EtcdStore) -> tuple[Candidates, Election, Fence]:
    """One candidate, leading under the 2 s lease of an empty cluster, whose lease grows a second
    per two nodes (checked every 0.2 s)."""
    cands = Candidates({"node-a": s})
    e = cands.elections["node-a"]
    e.LEASE_NODES, e.GROW_CHECK = 2, 0.2  # type: ignore[misc]
    try:
        node, fence = await cands.next(timeout=5)
        assert node == "node-a" and fence is not None and e.ttl == 2
    except BaseException:
        await cands.stop()
        raise
    return cands, e, fence


@pytest.mark.parametrize("answer", ["late", "lost"])
def test_a_lease_move_answered_late_keeps_the_key(etcd1: EtcdCluster, answer: str) -> None:
    """The longer lease the key moves to is renewed from its grant: when the move's answer reaches
    the leader 3.5 s after its commit (a loop stalled under a large fleet), past the new 3 s lease's
    own time, the key is still there, still this leader's, on the new lease. (Renewed only once the
    answer came, the key expired with it: another manager took it in a 2,000-node run.) A move
    whose answer is lost (it committed, the call failed) is found by reading the key: the same."""

    class LateMoveAnswer:
        def __init__(self, kv: Any, election: Election) -> None:
            self.kv, self.election = kv, election

        def __getattr__(self, name: str) -> Any:
            return getattr(self.kv, name)

        async def Txn(self, req: etcd_pb2.TxnRequest, **kw: Any) -> Any:  # noqa: N802 - the stub's name
            resp = await self.kv.Txn(req, **kw)
            if self.election._pending and req.success and req.success[0].request_put.key == LEADER_KEY:
                await asyncio.sleep(3.5)
                if answer == "lost":
                    raise grpc.aio.AioRpcError(grpc.StatusCode.DEADLINE_EXCEEDED, grpc.aio.Metadata(),
                                               grpc.aio.Metadata(), "the answer was lost")
            return resp

    async def body() -> None:
        s = await etcd1.store()
        cands, e, fence = await growing_leader(s)
        try:
            s.kv = LateMoveAnswer(s.kv, e)  # type: ignore[assignment]
            await s.fenced(fence).update(lambda tx: [tx.create(objects_pb2.Node(id=f"n{i}")) for i in range(2)])
            await wait_for_async(lambda: e.ttl == 3, "the lease lengthened to 2 + 2 // 2 s", timeout=10)
            await asyncio.sleep(2.0)
            assert cands.terms.empty(), cands.terms.get_nowait()
            kvs = (await (await etcd1.kv()).Range(etcd_pb2.RangeRequest(key=LEADER_KEY), timeout=5)).kvs
            assert kvs and kvs[0].lease == e.lease_id and kvs[0].create_revision == fence.revision
            await s.fenced(fence).update(lambda tx: tx.create(secret("led-after-a-late-move")))
        finally:
            await cands.stop()

    etcd1.run(body())


def test_a_leader_whose_cluster_grew_moves_its_key_to_a_longer_lease(etcd1: EtcdCluster) -> None:
    """The first leader of a cluster leads under the short lease of an empty cluster; once nodes
    joined, it moves its key to a longer lease (one second more per LEASE_NODES nodes): the same key
    and create revision, so it keeps leading and its fenced writes still commit, and the lease that
    holds the key is the new, longer one."""

    async def body() -> None:
        s = await etcd1.store()
        cands, e, fence = await growing_leader(s)
        try:
            first_lease = e.lease_id
            await s.fenced(fence).update(lambda tx: [tx.create(objects_pb2.Node(id=f"n{i}")) for i in range(6)])
            await wait_for_async(lambda: e.ttl == 5, "the lease lengthened to 2 + 6 // 2 s", timeout=5)
            assert e.lease_id != first_lease
            kv = await etcd1.kv()
            key = (await kv.Range(etcd_pb2.RangeRequest(key=b"/shoal/e/leader"))).kvs[0]
            assert key.lease == e.lease_id and key.create_revision == fence.revision
            await asyncio.sleep(3)  # longer than the first lease: still leading, keep-alives on the new one
            assert cands.terms.empty()
            await s.fenced(fence).update(lambda tx: tx.create(secret("still-led")))
            assert "still-led" in names(s)
        finally:
            await cands.stop()

    etcd1.run(body())


def test_a_follower_campaigns_under_a_lease_as_long_as_the_grown_cluster_wants(etcd1: EtcdCluster) -> None:
    """A follower campaigns from its start under the short lease of a small cluster; once nodes joined,
    it campaigns under the longer lease the cluster's size wants, so that when it wins (the leader
    gone) its key does not expire while its loop takes the control loops over (at 2,000 nodes two
    followers won and lost the key in turn for 9 s: each one's 2 s lease ran out during its takeover)."""

    async def body() -> None:
        sa, sb = await etcd1.store(), await etcd1.store()
        cands = Candidates({"node-a": sa})
        ea = cands.elections["node-a"]
        ea.GROW_CHECK = 3600  # type: ignore[misc]  (the leader keeps its short lease: it steps down below)
        try:
            node, fence = await cands.next(timeout=5)
            assert node == "node-a" and fence is not None
            b = Candidates({"node-b": sb})
            eb = b.elections["node-b"]
            eb.LEASE_NODES = 2  # type: ignore[misc]
            await wait_for_async(lambda: eb.lease_id != 0 and eb.ttl == 2, "node-b campaigning", timeout=5)
            short = eb.lease_id
            await sa.fenced(fence).update(lambda tx: [tx.create(objects_pb2.Node(id=f"n{i}")) for i in range(6)])
            await wait_for_async(lambda: eb.ttl == 5 and eb.lease_id != short, "node-b's longer lease", timeout=5)
            lease = etcd_pb2_grpc.LeaseStub(grpc.aio.insecure_channel(etcd1.members[0].client_target))

            async def renewed_ttl(lease_id: int) -> int:  # what a keep-alive answers: <= 0 for a lease gone
                call = lease.LeaseKeepAlive(iter([etcd_pb2.LeaseKeepAliveRequest(ID=lease_id)]), timeout=5)
                try:
                    return (await call.read()).TTL
                finally:
                    call.cancel()

            assert await renewed_ttl(short) <= 0  # the short one was revoked
            await ea.resign()
            node, fence_b = await b.next(timeout=10)
            assert node == "node-b" and fence_b is not None and eb.ttl == 5
            kv = await etcd1.kv()
            key = (await kv.Range(etcd_pb2.RangeRequest(key=b"/shoal/e/leader"))).kvs[0]
            assert key.lease == eb.lease_id and await renewed_ttl(eb.lease_id) == 5
            await b.stop()
        finally:
            await cands.stop()

    etcd1.run(body())

