import asyncio

import pytest
from helpers.aio import run

from shoal.manager.store import (
    AlreadyExists,
    Conflict,
    InvalidArgument,
    LocalStore,
    NotFound,
    StaleVersion,
    StateMachine,
    new_id,
)
from shoal.proto import control_pb2, objects_pb2, specs_pb2, types_pb2


def service(name: str, **labels: str) -> objects_pb2.Service:
    return objects_pb2.Service(
        spec=specs_pb2.ServiceSpec(
            annotations=types_pb2.Annotations(name=name, labels=labels),
            task=types_pb2.TaskSpec(container=types_pb2.ContainerSpec(image="busybox")),
            replicated=specs_pb2.ReplicatedService(replicas=1),
        )
    )


def test_ids_are_25_chars_and_random() -> None:
    ids = {new_id() for _ in range(1000)}
    assert len(ids) == 1000
    assert all(len(i) == 25 and i.isalnum() and i.islower() or i.isdigit() for i in ids)


def test_create_get_update_delete_and_versions() -> None:
    async def main() -> None:
        st = LocalStore()
        svc = await st.update(lambda tx: tx.create(service("web")))
        stored = st.get("service", svc.id)
        assert stored.meta.version == 1 and stored.meta.created_at.seconds > 0
        assert st.resolve("service", "web").id == svc.id
        assert st.resolve("service", svc.id[:6]).id == svc.id

        changed = objects_pb2.Service()
        changed.CopyFrom(stored)
        changed.spec.replicated.replicas = 3
        await st.update(lambda tx: tx.update(changed))
        assert st.get("service", svc.id).spec.replicated.replicas == 3
        assert st.get("service", svc.id).meta.version == 2

        # The copy still holds version 1: a second update with it is stale.
        with pytest.raises(Conflict, match="out of sequence") as e:
            await st.update(lambda tx: tx.update(changed))
        assert isinstance(e.value, StaleVersion) and not e.value.client and e.value.code == "ABORTED"

        await st.update(lambda tx: tx.delete(st.get("service", svc.id)))
        assert st.get("service", svc.id) is None
        with pytest.raises(NotFound):
            st.resolve("service", "web")

    run(main())


def test_update_builds_again_on_a_stale_version_but_not_on_a_client_one() -> None:
    async def main() -> None:
        st = LocalStore()
        svc = await st.update(lambda tx: tx.create(service("web")))
        stale = objects_pb2.Service()
        stale.CopyFrom(st.get("service", svc.id))
        bumped = objects_pb2.Service()
        bumped.CopyFrom(stale)
        await st.update(lambda tx: tx.update(bumped))
        calls: list[int] = []

        def fn(tx) -> None:  # the first attempt writes what it read before: stale
            cur = objects_pb2.Service()
            cur.CopyFrom(stale if not calls else tx.get("service", svc.id))
            calls.append(cur.meta.version)
            cur.spec.replicated.replicas = 4
            tx.update(cur)

        with pytest.raises(StaleVersion, match="update out of sequence"):
            await st.update(fn)
        assert calls == [1]
        calls.clear()
        await st.update(fn, retries=2)
        assert calls == [1, 2] and st.get("service", svc.id).spec.replicated.replicas == 4

        # a stale remove is a StaleVersion as well
        with pytest.raises(StaleVersion, match="remove out of sequence"):
            await st.update(lambda tx: tx.delete(stale))

        # the caller's stale version is raised at once, whatever the retries
        client: list[int] = []

        def client_stale(tx) -> None:
            client.append(1)
            raise StaleVersion("update out of sequence: the request is stale", client=True)

        with pytest.raises(StaleVersion):
            await st.update(client_stale, retries=5, retry_on=(Conflict,))
        assert client == [1]

        # other refusals are not retried unless named in retry_on
        missing: list[int] = []

        def gone(tx) -> None:
            missing.append(1)
            tx.update(objects_pb2.Service(id="nope"))

        with pytest.raises(NotFound):
            await st.update(gone, retries=3)
        assert missing == [1]
        with pytest.raises(NotFound):
            await st.update(gone, retries=3, retry_on=(NotFound,))
        assert missing == [1] * 5

    run(main())


def test_unique_names_and_atomic_transactions() -> None:
    async def main() -> None:
        st = LocalStore()
        await st.update(lambda tx: tx.create(service("web")))
        with pytest.raises(AlreadyExists, match="'web' is already in use"):
            await st.update(lambda tx: tx.create(service("web")))

        def two(tx):
            tx.create(service("api"))
            tx.create(service("web"))  # fails: the whole transaction must not apply

        before = st.sm.version
        with pytest.raises(AlreadyExists):
            await st.update(two)
        assert st.sm.version == before
        assert st.sm.get_by_name("service", "api") is None
        with pytest.raises(InvalidArgument, match="name is empty"):
            await st.update(lambda tx: tx.create(service("")))

    run(main())


def test_rename_frees_old_name() -> None:
    async def main() -> None:
        st = LocalStore()
        svc = await st.update(lambda tx: tx.create(service("a")))
        renamed = objects_pb2.Service()
        renamed.CopyFrom(st.get("service", svc.id))
        renamed.spec.annotations.name = "b"
        await st.update(lambda tx: tx.update(renamed))
        await st.update(lambda tx: tx.create(service("a")))
        assert {s.spec.annotations.name for s in st.find("service")} == {"a", "b"}

    run(main())


def test_task_indexes_and_filters() -> None:
    async def main() -> None:
        st = LocalStore()

        def make(tx):
            for i in range(10):
                tx.create(
                    objects_pb2.Task(
                        service_id="s1" if i < 6 else "s2",
                        node_id=f"n{i % 3}",
                        slot=i,
                        desired_state=types_pb2.RUNNING if i % 2 else types_pb2.SHUTDOWN,
                        annotations=types_pb2.Annotations(name=f"t{i}", labels={"k": "v" if i < 2 else "w"}),
                    )
                )

        await st.update(make)
        assert len(st.sm.tasks_by_service("s1")) == 6
        assert len(st.sm.tasks_by_node("n0")) == 4
        f = control_pb2.ListFilters(service_ids=["s1"], desired_states=[types_pb2.RUNNING])
        assert sorted(t.slot for t in st.find("task", f)) == [1, 3, 5]
        assert [t.slot for t in st.find("task", control_pb2.ListFilters(labels={"k": "v"}))] in ([0, 1], [1, 0])
        assert len(st.find("task", control_pb2.ListFilters(labels={"k": ""}))) == 10
        # moving a task to another node keeps indexes right
        t = objects_pb2.Task()
        t.CopyFrom(st.find("task", control_pb2.ListFilters(names=["t0"]))[0])
        t.node_id = "n9"
        await st.update(lambda tx: tx.update(t))
        assert [x.id for x in st.sm.tasks_by_node("n9")] == [t.id]
        assert len(st.sm.tasks_by_node("n0")) == 3

    run(main())


def test_watch_sees_committed_events_only() -> None:
    async def main() -> None:
        st = LocalStore()
        with st.watch(["service"]) as w:
            await st.update(lambda tx: tx.create(service("web")))
            with pytest.raises(AlreadyExists):
                await st.update(lambda tx: tx.create(service("web")))
            await st.update(lambda tx: tx.create(objects_pb2.Task(service_id="x")))  # other kind: filtered
            await st.update(lambda tx: tx.create(service("api")))
            msgs = [await asyncio.wait_for(w.queue.get(), 1) for _ in range(2)]
            assert [m.events[0].object.service.spec.annotations.name for m in msgs] == ["web", "api"]
            assert w.queue.empty()

    run(main())


def test_snapshot_restore_roundtrip_is_identical() -> None:
    async def main() -> None:
        st = LocalStore()
        for n in ("a", "b", "c"):
            await st.update(lambda tx, n=n: tx.create(service(n)))
        await st.update(lambda tx: tx.create(objects_pb2.Task(service_id="s", node_id="n")))
        snap = st.sm.snapshot()
        other = StateMachine()
        other.restore(snap)
        assert other.version == st.sm.version
        assert other.snapshot().SerializeToString(deterministic=True) == snap.SerializeToString(deterministic=True)
        assert len(other.tasks_by_service("s")) == 1
        assert other.get_by_name("service", "b") is not None

    run(main())


def test_replicas_applying_the_same_log_agree() -> None:
    """Determinism: the same transactions give byte-identical state on two replicas."""
    async def main() -> None:
        st = LocalStore()
        log = []
        orig = st.sm.apply

        def recording(txn):
            log.append(txn.SerializeToString())
            return orig(txn)

        st.sm.apply = recording  # type: ignore[method-assign]
        await st.update(lambda tx: tx.create(service("web")))
        with pytest.raises(AlreadyExists):
            await st.update(lambda tx: tx.create(service("web")))
        await st.update(lambda tx: tx.create(service("db")))
        replica = StateMachine()
        from shoal.proto import store_pb2

        for raw in log:
            try:
                replica.apply(store_pb2.StoreTransaction.FromString(raw))
            except AlreadyExists:
                pass
        a = st.sm.snapshot().SerializeToString(deterministic=True)
        b = replica.snapshot().SerializeToString(deterministic=True)
        assert a == b and replica.version == st.sm.version

    run(main())


def test_check_refuses_what_apply_would_and_changes_nothing() -> None:
    """`check` is `apply`'s dry run: the same refusal for each precondition (transactions of tasks
    only, each once, are checked without applying; others are applied and undone), and the store,
    its indexes and its version stay as they were either way."""
    from shoal.proto import store_pb2

    sm = StateMachine()
    A = store_pb2.StoreAction

    def txn(*actions: tuple[int, objects_pb2.Task | objects_pb2.Service]) -> store_pb2.StoreTransaction:
        t = store_pb2.StoreTransaction(timestamp_unix_nano=1)
        for kind, obj in actions:
            a = t.actions.add(kind=kind)
            getattr(a.object, "task" if isinstance(obj, objects_pb2.Task) else "service").CopyFrom(obj)
        return t

    def task(tid: str, version: int = 0, node: str = "") -> objects_pb2.Task:
        t = objects_pb2.Task(id=tid, service_id="s1", node_id=node)
        t.meta.version = version
        return t

    web = service("web")
    web.id = "s1"
    sm.apply(txn((A.CREATE, web), (A.CREATE, task("t1")), (A.CREATE, task("t2"))))
    before = sm.snapshot().SerializeToString(deterministic=True), sm.version
    v = sm.get("task", "t1").meta.version
    dup = service("web")
    dup.id = "s2"

    cases = [
        (txn((A.UPDATE, task("t1", v, "n1")), (A.UPDATE, task("t2", v - 1, "n1"))), StaleVersion),
        (txn((A.UPDATE, task("t1", v, "n1")), (A.UPDATE, task("t3", v, "n1"))), NotFound),
        (txn((A.CREATE, task("t1"))), AlreadyExists),
        (txn((A.DELETE, task("t9"))), NotFound),
        (txn((A.UPDATE, task("t1", v, "n1")), (A.UPDATE, task("t1", v, "n2"))), StaleVersion),  # same id twice
        (txn((A.UPDATE, task("")),), InvalidArgument),
        (txn((A.CREATE, dup)), AlreadyExists),  # a unique name
    ]
    for t, refusal in cases:
        with pytest.raises(refusal):
            sm.check(t)
        with pytest.raises(refusal):
            sm.apply(t)
        assert (sm.snapshot().SerializeToString(deterministic=True), sm.version) == before
    ok = txn((A.UPDATE, task("t1", v, "n1")), (A.UPDATE, task("t2", v, "n2")))
    sm.check(ok)
    assert (sm.snapshot().SerializeToString(deterministic=True), sm.version) == before
    assert [t.id for t in sm.tasks_by_node("n1")] == []
    sm.apply(ok)
    assert [t.id for t in sm.tasks_by_node("n1")] == ["t1"]


def test_a_watch_of_some_kinds_gets_their_events_of_a_mixed_transaction_in_order() -> None:
    async def main() -> None:
        st = LocalStore()
        with st.watch(["service"]) as services, st.watch(["service", "task"]) as both, st.watch(["node"]) as nodes:
            def fn(tx):
                tx.create(service("web"))
                tx.create(objects_pb2.Task(id="t1", service_id="x"))
                tx.create(service("api"))

            await st.update(fn)
            await st.update(lambda tx: tx.create(objects_pb2.Node(id="n1")))
            m = await asyncio.wait_for(services.queue.get(), 1)
            assert [e.object.service.spec.annotations.name for e in m.events] == ["web", "api"]
            m = await asyncio.wait_for(both.queue.get(), 1)
            assert [e.object.WhichOneof("object") for e in m.events] == ["service", "task", "service"]
            m = await asyncio.wait_for(nodes.queue.get(), 1)
            assert [e.object.node.id for e in m.events] == ["n1"]
            await asyncio.sleep(0.05)
            assert services.queue.empty() and both.queue.empty() and nodes.queue.empty()

    run(main())
