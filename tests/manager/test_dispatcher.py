"""Dispatcher over a LocalStore, served by an in-process grpc.aio server on loopback."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time
from collections.abc import AsyncIterator, Iterator

import grpc
import pytest
from etcd_cluster import CLUSTER, EtcdCluster, etcd_cluster
from helpers.aio import cancel_and_wait, run
from helpers.waiting import wait_for_async

from shoal.manager import dispatcher as dispatcher_mod
from shoal.manager.ca import RootCA
from shoal.manager.dispatcher import (
    BEHIND_MAX_GRACES,
    LEADER_ADDR_KEY,
    MASS_MAX_GRACES,
    MASS_MIN,
    MAX_HEARTBEAT_RATE,
    NEW_LEADER_GRACE,
    NODE_ID_KEY,
    RECONNECT_RATE,
    STALL_EXCUSE_PERIODS,
    Dispatcher,
    _Session,
)
from shoal.manager.etcdstore import Election, EtcdStore
from shoal.manager.store import LocalStore, Store, Tx
from shoal.proto import dispatcher_pb2, dispatcher_pb2_grpc, objects_pb2, specs_pb2, types_pb2

AM = dispatcher_pb2.AssignmentsMessage
AC = dispatcher_pb2.AssignmentChange


@contextlib.asynccontextmanager
async def serve(store: Store, **kw) -> AsyncIterator[tuple[Dispatcher, str]]:
    disp = Dispatcher(store, insecure_node_id_from_metadata=True, **kw)
    server = grpc.aio.server()
    dispatcher_pb2_grpc.add_DispatcherServicer_to_server(disp, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield disp, f"127.0.0.1:{port}"
    finally:
        await server.stop(0)


class Client:
    """A node's calls; with `stream`, its heartbeats go on one Heartbeats stream (as an agent's do)."""

    def __init__(self, addr: str, node_id: str, stream: bool = False) -> None:
        self.channel = grpc.aio.insecure_channel(addr)
        self.stub = dispatcher_pb2_grpc.DispatcherStub(self.channel)
        self.md = ((NODE_ID_KEY, node_id),)
        self.session_call = None
        self.session_id = ""
        self.beats = self.stub.Heartbeats(metadata=self.md) if stream else None

    async def open(self, hostname: str = "h") -> dispatcher_pb2.SessionMessage:
        desc = types_pb2.NodeDescription(
            hostname=hostname, platform=types_pb2.Platform(os="linux", architecture="x86_64")
        )
        self.session_call = self.stub.Session(
            dispatcher_pb2.SessionRequest(description=desc), metadata=self.md
        )
        first = await self.session_call.read()
        self.session_id = first.session_id
        return first

    async def heartbeat(self) -> dispatcher_pb2.HeartbeatResponse:
        req = dispatcher_pb2.HeartbeatRequest(session_id=self.session_id)
        if self.beats is None:
            return await self.stub.Heartbeat(req, metadata=self.md)
        if not self.beats.done():
            await self.beats.write(req)
        resp = await self.beats.read()
        assert resp is not grpc.aio.EOF
        return resp

    def assignments(self):
        return self.stub.Assignments(
            dispatcher_pb2.AssignmentsRequest(session_id=self.session_id), metadata=self.md
        )

    async def status(self, *updates: tuple[str, int]) -> None:
        req = dispatcher_pb2.UpdateTaskStatusRequest(session_id=self.session_id)
        for tid, state in updates:
            req.updates.add(
                task_id=tid, status=types_pb2.TaskStatus(state=state, message=types_pb2.TaskState.Name(state))
            )
        await self.stub.UpdateTaskStatus(req, metadata=self.md)

    async def close(self) -> None:
        for call in (self.session_call, self.beats):
            if call is not None:
                call.cancel()
        await self.channel.close()


async def add_node(store: Store, node_id: str) -> None:
    await store.update(lambda tx: tx.create(objects_pb2.Node(id=node_id, spec=specs_pb2.NodeSpec())))


async def add_cluster(store: Store, period_s: float | None = None) -> None:
    c = objects_pb2.Cluster(
        id="c1", spec=specs_pb2.ClusterSpec(annotations=types_pb2.Annotations(name="default"))
    )
    if period_s is not None:
        c.spec.dispatcher.heartbeat_period.FromNanoseconds(int(period_s * 1e9))
    c.network_bootstrap_keys.add(subsystem="networking:gossip", key=b"k" * 16, lamport_time=1)
    await store.update(lambda tx: tx.create(c))


async def fleet(nodes: int, period_s: float | None = None) -> LocalStore:
    """A store with the cluster and nodes n0 … n{nodes - 1}, created 500 a transaction."""
    st = LocalStore()
    await add_cluster(st, period_s)
    made = [objects_pb2.Node(id=f"n{i}", spec=specs_pb2.NodeSpec()) for i in range(nodes)]
    for i in range(0, nodes, 500):
        await st.update(lambda tx, part=made[i : i + 500]: [tx.create(n) for n in part])
    return st


def task(
    node_id: str, state: int, secrets=(), configs=(), desired: int = types_pb2.RUNNING
) -> objects_pb2.Task:
    t = objects_pb2.Task(node_id=node_id, service_id="svc", desired_state=desired)
    t.status.state = state
    t.spec.container.image = "busybox"
    for s in secrets:
        t.spec.container.secrets.add(secret_id=s, secret_name=s)
    for c in configs:
        t.spec.container.configs.add(config_id=c, config_name=c)
    return t


async def put(store: Store, obj) -> None:
    await store.update(lambda tx: tx.create(obj))


async def change_task(store: Store, tid: str, **fields) -> None:
    def fn(tx: Tx) -> None:
        t = objects_pb2.Task()
        t.CopyFrom(tx.get("task", tid))
        for k, v in fields.items():
            if k == "state":
                t.status.state = v
            else:
                setattr(t, k, v)
        tx.update(t)

    await store.update(fn)


wait_for = functools.partial(wait_for_async, timeout=10.0, interval=0.02)


def kinds(msg: dispatcher_pb2.AssignmentsMessage) -> list[tuple[str, str, int]]:
    out = []
    for ch in msg.changes:
        k = ch.assignment.WhichOneof("item")
        item = getattr(ch.assignment, k)
        out.append((k, item.network_id if k == "network_keys" else item.id, ch.action))
    return sorted(out)


def test_session_registers_node_and_sends_managers_and_keys() -> None:
    async def main() -> None:
        st = LocalStore()
        await add_cluster(st)
        await add_node(st, "n1")
        async with serve(st) as (_, addr):
            c = Client(addr, "n1")
            try:
                first = await c.open(hostname="alpha")
                assert first.session_id
                assert first.node.status.state == types_pb2.NodeStatus.READY
                assert [k.subsystem for k in first.network_bootstrap_keys] == ["networking:gossip"]
                node = st.get("node", "n1")
                assert node.description.hostname == "alpha"
                assert node.status.state == types_pb2.NodeStatus.READY
                assert node.status.addr == "127.0.0.1"
                hb = await c.heartbeat()
                # the period less up to 20 % jitter, so that agents that connected together drift apart
                assert 800_000_000 <= hb.period.ToNanoseconds() <= 1_000_000_000
            finally:
                await c.close()

            # An unknown node is refused; a caller without identity too.
            stranger = Client(addr, "nobody")
            try:
                with pytest.raises(grpc.aio.AioRpcError) as e:
                    await stranger.open()
                assert e.value.code() == grpc.StatusCode.NOT_FOUND
                assert "not registered" in e.value.details()
            finally:
                await stranger.close()
            anon = grpc.aio.insecure_channel(addr)
            try:
                with pytest.raises(grpc.aio.AioRpcError) as e:
                    await dispatcher_pb2_grpc.DispatcherStub(anon).Heartbeat(
                        dispatcher_pb2.HeartbeatRequest()
                    )
                assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
            finally:
                await anon.close()

    run(main())


def test_without_insecure_flag_metadata_identity_is_ignored() -> None:
    async def main() -> None:
        st = LocalStore()
        await add_node(st, "n1")
        disp = Dispatcher(st)
        server = grpc.aio.server()
        dispatcher_pb2_grpc.add_DispatcherServicer_to_server(disp, server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        c = Client(f"127.0.0.1:{port}", "n1")
        try:
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await c.open()
            assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
        finally:
            await c.close()
            await server.stop(0)

    run(main())


@pytest.fixture
def etcd1() -> Iterator[EtcdCluster]:
    yield from etcd_cluster(RootCA.create(CLUSTER), 1)


@pytest.mark.integration
def test_follower_refuses_with_leader_address(etcd1: EtcdCluster) -> None:
    """A manager on a real etcd member whose leader key another manager holds is not the leader:
    agents are sent to the leader's address."""
    cluster = etcd1

    class Mgr:
        @staticmethod
        def leader_api_addr() -> str:
            return "127.0.0.9:2377"

    async def main() -> None:
        st = await cluster.store()
        other = Election(await cluster.store(), "the-other-manager")
        terms = other.terms()
        assert await anext(terms) is not None  # the other manager leads
        assert not st.is_leader()
        async with serve(st, manager=Mgr()) as (_, addr):
            c = Client(addr, "n1")
            try:
                with pytest.raises(grpc.aio.AioRpcError) as e:
                    await c.open()
                assert e.value.code() == grpc.StatusCode.UNAVAILABLE
                assert dict(e.value.trailing_metadata())[LEADER_ADDR_KEY] == "127.0.0.9:2377"
                # so is a heartbeat on a stream (a leader that lost its key answers the next one so)
                beats = c.stub.Heartbeats(metadata=c.md)
                await beats.write(dispatcher_pb2.HeartbeatRequest(session_id="s"))
                with pytest.raises(grpc.aio.AioRpcError) as e:
                    await beats.read()
                assert e.value.code() == grpc.StatusCode.UNAVAILABLE
                assert dict(e.value.trailing_metadata())[LEADER_ADDR_KEY] == "127.0.0.9:2377"
            finally:
                await c.close()
        await terms.aclose()

    cluster.run(main())


def test_a_follower_that_knows_no_leader_holds_a_session_call_until_one_is_known(etcd1: EtcdCluster,
                                                                                    monkeypatch) -> None:
    """While no leader is known (an election under way), a Session call is not refused at once (a
    fleet's agents would try manager after manager, a TLS connection each): it waits, then is sent
    to the leader once one is known, or served when this manager wins; with none after ELECTION_WAIT
    s it is refused saying the election is under way."""
    monkeypatch.setattr(dispatcher_mod, "ELECTION_WAIT", 1.5)
    leader: list[str | None] = [None]

    class Mgr:
        @staticmethod
        def leader_api_addr() -> str | None:
            return leader[0]

    async def main() -> None:
        st = await etcd1.store()
        await add_cluster(st)
        await add_node(st, "n1")
        assert not st.is_leader()
        async with serve(st, manager=Mgr()) as (_, addr):
            loop = asyncio.get_running_loop()

            async def opened(after: float, then) -> tuple[float, object]:  # noqa: ANN001
                c = Client(addr, "n1")
                t0 = loop.time()
                loop.call_later(after, then)
                try:
                    first = await c.open()
                    return loop.time() - t0, first
                except grpc.aio.AioRpcError as e:
                    return loop.time() - t0, e
                finally:
                    await c.close()

            # a leader becomes known 0.5 s in: the call is sent there then
            waited, e = await opened(0.5, lambda: leader.__setitem__(0, "127.0.0.9:2377"))
            assert isinstance(e, grpc.aio.AioRpcError) and e.code() == grpc.StatusCode.UNAVAILABLE, e
            assert dict(e.trailing_metadata())[LEADER_ADDR_KEY] == "127.0.0.9:2377"
            assert 0.4 < waited < 1.4, waited
            # none: refused after ELECTION_WAIT
            leader[0] = None
            waited, e = await opened(60, lambda: None)
            assert isinstance(e, grpc.aio.AioRpcError) and "election under way" in e.details(), e
            assert 1.4 < waited < 5, waited
            # this manager wins 0.5 s in: the call is served here
            waited, first = await opened(0.5, lambda: setattr(st, "leading", True))
            assert isinstance(first, dispatcher_pb2.SessionMessage) and first.session_id, first
            assert 0.4 < waited < 1.4, waited

    etcd1.run(main())


def test_a_node_that_joined_through_another_manager_is_found_while_this_copy_lags(etcd1: EtcdCluster,
                                                                                  monkeypatch) -> None:
    """The node object is committed (through another manager's store) but this leader's copy of the
    store lags behind (its watch answers late): the session does not fail with "not registered";
    the dispatcher catches up with etcd (a read barrier) and finds the node."""
    watch = EtcdStore._watch_stream

    async def lagging(self, start):  # noqa: ANN001, ANN202
        async for resp in watch(self, start):
            await asyncio.sleep(getattr(self, "test_lag", 0.0))
            yield resp

    monkeypatch.setattr(EtcdStore, "_watch_stream", lagging)

    async def main() -> None:
        st, other = await etcd1.store(), await etcd1.store()
        st.leading = True  # this manager runs the dispatcher
        st.test_lag = 0.5  # type: ignore[attr-defined]
        await add_node(other, "n1")  # the join, committed through the other manager
        assert st.get("node", "n1") is None  # not in this copy yet
        async with serve(st) as (_, addr):
            c = Client(addr, "n1")
            try:
                first = await c.open()
                assert first.node.id == "n1" and first.session_id
                assert st.get("node", "n1").status.state == types_pb2.NodeStatus.READY
            finally:
                await c.close()

    etcd1.run(main())


@pytest.mark.parametrize("stream", [False, True], ids=["calls", "stream"])
def test_heartbeat_expiry_marks_node_down_and_session_reopens(stream: bool) -> None:
    """Heartbeats (one call each, or on one stream) keep a node READY; once they stop it is DOWN, its
    session is gone (the next heartbeat: NOT_FOUND), and a new session makes it READY again."""

    async def main() -> None:
        st = LocalStore()
        await add_cluster(st, period_s=0.1)
        await add_node(st, "n1")
        await add_node(st, "n2")  # never connects: DOWN after one grace period of the new leader
        async with serve(st) as (disp, addr):
            loop_task = asyncio.create_task(disp.run())
            c = Client(addr, "n1", stream)
            try:
                await c.open()
                assert 80_000_000 <= (await c.heartbeat()).period.ToNanoseconds() <= 100_000_000

                stop = asyncio.Event()

                async def beat() -> None:
                    while not stop.is_set():
                        await c.heartbeat()
                        await asyncio.sleep(0.05)

                beater = asyncio.create_task(beat())
                await wait_for(lambda: st.get("node", "n2").status.state == types_pb2.NodeStatus.DOWN)
                # Heartbeats keep n1 READY across many grace periods.
                await asyncio.sleep(1.0)
                assert st.get("node", "n1").status.state == types_pb2.NodeStatus.READY
                # stopped between two heartbeats: cancelled in the middle of one, the task would
                # cancel the whole Heartbeats stream with it (gRPC cancels a call whose read is)
                stop.set()
                await asyncio.wait_for(beater, 5)
                # Heartbeats stop: DOWN, and the old session is gone.
                await wait_for(lambda: st.get("node", "n1").status.state == types_pb2.NodeStatus.DOWN)
                assert st.get("node", "n1").status.message == "heartbeat failure"
                with pytest.raises(grpc.aio.AioRpcError) as e:
                    await c.heartbeat()
                assert e.value.code() == grpc.StatusCode.NOT_FOUND
                # A new session makes it READY again.
                c.session_call.cancel()
                await c.open()
                assert st.get("node", "n1").status.state == types_pb2.NodeStatus.READY
            finally:
                await c.close()
                await cancel_and_wait(loop_task)

    run(main())


def test_graceful_stop_keeps_the_node_for_the_restart_window_also_under_a_new_leader() -> None:
    """Heartbeat(restarting): DISCONNECTED with a deadline, not DOWN within the window (many grace
    periods), READY again on the next session; not back in time: DOWN, saying why. A new leader's
    dispatcher honours a deadline written under the old one."""

    async def main() -> None:
        st = LocalStore()
        await add_cluster(st, period_s=0.1)  # grace 0.28 s
        cl = objects_pb2.Cluster()
        cl.CopyFrom(st.cluster())
        cl.spec.dispatcher.restart_window.FromNanoseconds(1_500_000_000)
        await st.update(lambda tx: tx.update(cl))
        await add_node(st, "n1")
        state = lambda: st.get("node", "n1").status  # noqa: E731
        async with serve(st) as (disp, addr):
            loop_task = asyncio.create_task(disp.run())
            c = Client(addr, "n1")
            try:
                await c.open()
                t0 = time.monotonic()
                await c.stub.Heartbeat(dispatcher_pb2.HeartbeatRequest(session_id=c.session_id, restarting=True),
                                       metadata=c.md)
                assert state().state == types_pb2.NodeStatus.DISCONNECTED
                left = state().restart_deadline.ToNanoseconds() / 1e9 - time.time()
                assert 1.3 < left <= 1.5
                await asyncio.sleep(1.0)  # > 3 grace periods
                assert state().state == types_pb2.NodeStatus.DISCONNECTED
                c.session_call.cancel()
                await c.open()  # back in time
                assert state().state == types_pb2.NodeStatus.READY and not state().HasField("restart_deadline")
                await c.stub.Heartbeat(dispatcher_pb2.HeartbeatRequest(session_id=c.session_id, restarting=True),
                                       metadata=c.md)
                t0 = time.monotonic()
                await wait_for(lambda: state().state == types_pb2.NodeStatus.DOWN, timeout=5)
                assert time.monotonic() - t0 >= 1.4
                assert state().message == "not back within the restart window after a graceful stop"
            finally:
                await c.close()
                await cancel_and_wait(loop_task)

            # A node that stopped gracefully under the old leader: the new leader waits for its deadline
            # (without it, 2 grace periods: 0.56 s).
            n = objects_pb2.Node()
            n.CopyFrom(st.get("node", "n1"))
            n.status.state = types_pb2.NodeStatus.DISCONNECTED
            n.status.restart_deadline.FromNanoseconds(time.time_ns() + 1_500_000_000)
            await st.update(lambda tx: tx.update(n))
            t0 = time.monotonic()
            new_leader = asyncio.create_task(disp.run())
            try:
                await asyncio.sleep(1.0)
                assert state().state == types_pb2.NodeStatus.DISCONNECTED
                await wait_for(lambda: state().state == types_pb2.NodeStatus.DOWN, timeout=5)
                assert time.monotonic() - t0 >= 1.4
            finally:
                await cancel_and_wait(new_leader)

    run(main())


def test_assignments_complete_then_incremental_with_only_own_secrets() -> None:
    async def main() -> None:
        st = LocalStore()
        await add_cluster(st)
        for n in ("a", "b"):
            await add_node(st, n)
        for sid in ("s1", "s2", "s3"):
            await put(
                st,
                objects_pb2.Secret(
                    id=sid,
                    spec=specs_pb2.SecretSpec(
                        annotations=types_pb2.Annotations(name=sid), data=b"secret-" + sid.encode()
                    ),
                ),
            )
        await put(
            st,
            objects_pb2.Config(
                id="c1", spec=specs_pb2.ConfigSpec(annotations=types_pb2.Annotations(name="c1"), data=b"cfg")
            ),
        )
        ta = task("a", types_pb2.ASSIGNED, secrets=["s1"])
        tb = task("b", types_pb2.ASSIGNED, secrets=["s2"])
        pending = task("a", types_pb2.PENDING, secrets=["s3"], configs=["c1"])
        for t in (ta, tb, pending):
            await put(st, t)

        async with serve(st) as (_, addr):
            ca, cb = Client(addr, "a"), Client(addr, "b")
            try:
                await ca.open()
                await cb.open()
                sa, sb = ca.assignments(), cb.assignments()
                m = await sa.read()
                assert m.type == AM.COMPLETE
                assert kinds(m) == [("secret", "s1", AC.UPDATE), ("task", ta.id, AC.UPDATE)]
                assert [
                    ch.assignment.secret.spec.data for ch in m.changes if ch.assignment.HasField("secret")
                ] == [b"secret-s1"]
                m = await sb.read()
                assert kinds(m) == [("secret", "s2", AC.UPDATE), ("task", tb.id, AC.UPDATE)]

                # The scheduler assigns the pending task: it arrives with its secret and config.
                await change_task(st, pending.id, state=types_pb2.ASSIGNED)
                m = await sa.read()
                assert m.type == AM.INCREMENTAL
                assert kinds(m) == [
                    ("config", "c1", AC.UPDATE),
                    ("secret", "s3", AC.UPDATE),
                    ("task", pending.id, AC.UPDATE),
                ]

                # Status written by the agent is not echoed back; a desired-state change is sent,
                # and the secrets of a task that is shut down are withdrawn.
                await ca.status((ta.id, types_pb2.RUNNING))
                await change_task(st, ta.id, desired_state=types_pb2.SHUTDOWN)
                m = await sa.read()
                assert kinds(m) == [("secret", "s1", AC.REMOVE), ("task", ta.id, AC.UPDATE)]
                upd = [ch.assignment.task for ch in m.changes if ch.assignment.HasField("task")][0]
                assert upd.desired_state == types_pb2.SHUTDOWN and upd.status.state == types_pb2.RUNNING

                # The reaper deletes the task: REMOVE.
                await st.update(lambda tx: tx.delete(st.get("task", ta.id)))
                m = await sa.read()
                assert kinds(m) == [("task", ta.id, AC.REMOVE)]
                assert m.applies_to and m.results_in and int(m.results_in) > int(m.applies_to)

                # Node b heard nothing of node a's secrets (its next message is its own change).
                await change_task(st, tb.id, desired_state=types_pb2.SHUTDOWN)
                m = await sb.read()
                assert kinds(m) == [("secret", "s2", AC.REMOVE), ("task", tb.id, AC.UPDATE)]
            finally:
                await ca.close()
                await cb.close()

    run(main())


def test_status_updates_batched_forward_only_and_own_tasks_only() -> None:
    async def main() -> None:
        st = LocalStore()
        for n in ("a", "b"):
            await add_node(st, n)
        tasks = [task("a", types_pb2.ASSIGNED) for _ in range(40)]
        other = task("b", types_pb2.ASSIGNED)
        for t in [*tasks, other]:
            await put(st, t)
        async with serve(st) as (_, addr):
            ca = Client(addr, "a")
            try:
                await ca.open()
                v0 = st.sm.version
                await asyncio.gather(*(ca.status((t.id, types_pb2.ACCEPTED)) for t in tasks))
                assert all(st.get("task", t.id).status.state == types_pb2.ACCEPTED for t in tasks)
                commits = st.sm.version - v0
                assert commits < len(tasks), f"{len(tasks)} status calls took {commits} transactions"

                # Forward only: a late PREPARING after RUNNING is ignored.
                t0 = tasks[0].id
                await ca.status((t0, types_pb2.RUNNING))
                await ca.status((t0, types_pb2.PREPARING))
                assert st.get("task", t0).status.state == types_pb2.RUNNING
                # Within one request the later (higher) state wins.
                await ca.status((tasks[1].id, types_pb2.RUNNING), (tasks[1].id, types_pb2.FAILED))
                assert st.get("task", tasks[1].id).status.state == types_pb2.FAILED

                # Another node's task: refused, nothing applied.
                with pytest.raises(grpc.aio.AioRpcError) as e:
                    await ca.status((tasks[2].id, types_pb2.RUNNING), (other.id, types_pb2.RUNNING))
                assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED
                assert st.get("task", other.id).status.state == types_pb2.ASSIGNED
                assert st.get("task", tasks[2].id).status.state == types_pb2.ACCEPTED

                # A stale session id is refused.
                ca.session_id = "bogus"
                with pytest.raises(grpc.aio.AioRpcError) as e:
                    await ca.status((tasks[2].id, types_pb2.RUNNING))
                assert e.value.code() == grpc.StatusCode.NOT_FOUND
            finally:
                await ca.close()

    run(main())


def test_removed_node_loses_its_session() -> None:
    async def main() -> None:
        st = LocalStore()
        await add_node(st, "n1")
        async with serve(st) as (_, addr):
            c = Client(addr, "n1")
            try:
                await c.open()
                await st.update(lambda tx: tx.delete(st.get("node", "n1")))
                with pytest.raises(grpc.aio.AioRpcError) as e:
                    while True:
                        await c.session_call.read()
                assert e.value.code() == grpc.StatusCode.NOT_FOUND and "removed" in e.value.details()
                with pytest.raises(grpc.aio.AioRpcError) as e:
                    await c.heartbeat()
                assert e.value.code() == grpc.StatusCode.NOT_FOUND
            finally:
                await c.close()

    run(main())


def keyed_network(net_id: str, encrypted: bool = True) -> objects_pb2.Network:
    from shoal.manager.keymanager import give_initial_keys

    net = objects_pb2.Network(id=net_id, spec=specs_pb2.NetworkSpec(annotations=types_pb2.Annotations(name=net_id)))
    if encrypted:
        net.spec.driver_config.options["encrypted"] = ""
        give_initial_keys(net)
    return net


def on_networks(t: objects_pb2.Task, *nets: objects_pb2.Network) -> objects_pb2.Task:
    for n in nets:
        att = t.networks.add()
        att.network.CopyFrom(n)  # as an old writer might have: the dispatcher must strip the keys
        att.addresses.append("10.0.0.2/24")
    return t


def key_changes(msg: dispatcher_pb2.AssignmentsMessage) -> list[tuple[str, int, list[int]]]:
    return [
        (ch.assignment.network_keys.network_id, ch.action, [k.lamport_time for k in ch.assignment.network_keys.keys])
        for ch in msg.changes
        if ch.assignment.HasField("network_keys")
    ]


def assert_keys_first_and_tasks_bare(msg: dispatcher_pb2.AssignmentsMessage) -> None:
    items = [ch.assignment.WhichOneof("item") for ch in msg.changes]
    if "network_keys" in items and "task" in items:
        assert max(i for i, k in enumerate(items) if k == "network_keys") < items.index("task"), items
    for ch in msg.changes:
        if ch.assignment.HasField("task"):
            assert all(not a.network.encryption_keys for a in ch.assignment.task.networks)


def test_network_keys_go_only_to_nodes_with_tasks_on_the_network() -> None:
    from shoal.manager.keymanager import ipsec_keys, rotate_keys

    async def main() -> None:
        st = LocalStore()
        await add_cluster(st)
        for n in ("a", "b"):
            await add_node(st, n)
        sec, plain = keyed_network("sec"), keyed_network("plain", encrypted=False)
        await put(st, sec)
        await put(st, plain)
        ta = on_networks(task("a", types_pb2.ASSIGNED), sec, plain)
        tb = on_networks(task("b", types_pb2.ASSIGNED), plain)
        for t in (ta, tb):
            await put(st, t)

        async with serve(st) as (_, addr):
            ca, cb = Client(addr, "a"), Client(addr, "b")
            try:
                await ca.open()
                await cb.open()
                sa, sb = ca.assignments(), cb.assignments()
                m = await sa.read()
                assert m.type == AM.COMPLETE
                assert key_changes(m) == [("sec", AC.UPDATE, [1, 2, 3])]
                sent = [ch.assignment.network_keys for ch in m.changes if ch.assignment.HasField("network_keys")][0]
                assert list(sent.keys) == ipsec_keys(st.get("network", "sec"))
                assert_keys_first_and_tasks_bare(m)
                m = await sb.read()
                assert key_changes(m) == [] and kinds(m) == [("task", tb.id, AC.UPDATE)]

                # Rotation: an UPDATE with the new keys to node a only.
                def rotate(tx: Tx) -> None:
                    n = objects_pb2.Network()
                    n.CopyFrom(tx.get("network", "sec"))
                    rotate_keys(n, time.time_ns())
                    tx.update(n)

                await st.update(rotate)
                m = await sa.read()
                assert m.type == AM.INCREMENTAL and key_changes(m) == [("sec", AC.UPDATE, [2, 3, 4])]
                assert len(m.changes) == 1

                # A task of node b joins the encrypted network: the keys come first, in the same message.
                tb2 = on_networks(task("b", types_pb2.PENDING), sec)
                await put(st, tb2)
                await change_task(st, tb2.id, state=types_pb2.ASSIGNED)
                m = await sb.read()
                assert key_changes(m) == [("sec", AC.UPDATE, [2, 3, 4])]
                assert kinds(m) == [("network_keys", "sec", AC.UPDATE), ("task", tb2.id, AC.UPDATE)]
                assert_keys_first_and_tasks_bare(m)

                # Node a's task is asked to stop: the keys stay while it still runs (stop grace period)...
                await change_task(st, ta.id, desired_state=types_pb2.SHUTDOWN)
                m = await sa.read()
                assert key_changes(m) == [] and kinds(m) == [("task", ta.id, AC.UPDATE)]
                # ...and are withdrawn (network id only) once it has stopped.
                await ca.status((ta.id, types_pb2.SHUTDOWN))
                m = await sa.read()
                assert key_changes(m) == [("sec", AC.REMOVE, [])] and len(m.changes) == 1

                # A reconnecting node gets the current keys in its COMPLETE set.
                sb.cancel()
                sb = cb.assignments()
                m = await sb.read()
                assert m.type == AM.COMPLETE and key_changes(m) == [("sec", AC.UPDATE, [2, 3, 4])]
                assert_keys_first_and_tasks_bare(m)
            finally:
                await ca.close()
                await cb.close()

    run(main())


def test_session_message_node_carries_no_network_keys() -> None:
    async def main() -> None:
        st = LocalStore()
        await add_cluster(st)
        node = objects_pb2.Node(id="n1", spec=specs_pb2.NodeSpec())
        node.attachments.add().network.CopyFrom(keyed_network("sec"))
        await put(st, node)
        async with serve(st) as (_, addr):
            c = Client(addr, "n1")
            try:
                first = await c.open()
                assert first.node.attachments and not first.node.attachments[0].network.encryption_keys
            finally:
                await c.close()

    run(main())


def test_heartbeat_period_grows_with_the_fleet_and_a_new_session_writes_nothing() -> None:
    """Past MAX_HEARTBEAT_RATE nodes a second the period grows (3,000 nodes: 6 s, told less up to 20 %
    jitter), and the grace with it (two periods and 0.8 of the configured one). A node that opens a
    session again unchanged (after a leader change) costs no store write, and no stream of another
    node wakes for it."""

    async def main() -> None:
        st = await fleet(3000)
        async with serve(st) as (disp, addr):
            assert disp.period() == pytest.approx(3000 / MAX_HEARTBEAT_RATE)
            assert disp.grace() == pytest.approx(2 * 3000 / MAX_HEARTBEAT_RATE + 0.8)
            periods = set()
            c, other = Client(addr, "n1"), Client(addr, "n2")
            try:
                await c.open()
                await other.open()
                for _ in range(20):
                    periods.add((await c.heartbeat()).period.ToNanoseconds())
                top = 3000 / MAX_HEARTBEAT_RATE * 1e9
                assert all(0.8 * top <= p <= top for p in periods) and len(periods) > 1
                await c.close()
                version = st.sm.version
                c = Client(addr, "n1")
                await c.open()
                assert st.sm.version == version  # READY with the same description: no write
                # n1's task reaches n1's stream only.
                sa, sb = c.assignments(), other.assignments()
                assert (await sa.read()).type == AM.COMPLETE and (await sb.read()).type == AM.COMPLETE
                routed_to_n2: list = []
                q = disp._sessions["n2"].assignments
                put_nowait = q.put_nowait
                q.put_nowait = lambda item: (routed_to_n2.append(item), put_nowait(item))  # type: ignore[method-assign]
                t = task("n1", types_pb2.ASSIGNED)
                await put(st, t)
                assert kinds(await sa.read()) == [("task", t.id, AC.UPDATE)]
                assert routed_to_n2 == []
            finally:
                await c.close()
                await other.close()

    run(main())


def test_a_mass_expiry_is_held_for_a_few_grace_periods_then_marked_down() -> None:
    """A new leader that hears from none of 20 nodes (a quarter or more at once: likelier its own
    fault) gives them MASS_MAX_GRACES more grace periods before marking them DOWN; a node that keeps
    heartbeating stays READY throughout. (That a lone node's expiry is not held: the next test.)"""

    async def main() -> None:
        st = await fleet(21, period_s=0.1)
        async with serve(st) as (disp, addr):
            c = Client(addr, "n0")
            await c.open()
            loop_task = asyncio.create_task(disp.run())

            async def beat() -> None:
                while True:
                    await c.heartbeat()
                    await asyncio.sleep(0.05)

            beater = asyncio.create_task(beat())
            try:
                first_deadline = disp.grace() * NEW_LEADER_GRACE + 21 / RECONNECT_RATE
                await asyncio.sleep(first_deadline + disp.grace())  # past the deadline: held, not DOWN
                states = {st.get("node", f"n{i}").status.state for i in range(1, 21)}
                assert types_pb2.NodeStatus.DOWN not in states
                await wait_for(
                    lambda: all(st.get("node", f"n{i}").status.state == types_pb2.NodeStatus.DOWN for i in range(1, 21)),
                    timeout=first_deadline + (MASS_MAX_GRACES + 4) * disp.grace() + 5,
                )
                assert st.get("node", "n0").status.state == types_pb2.NodeStatus.READY
            finally:
                await cancel_and_wait(beater, loop_task)
                await c.close()

    run(main())


def test_a_stalling_leader_holds_even_a_single_missed_deadline() -> None:
    """Within a grace period after its loop stalled, the leader holds any node whose deadline passed
    (one node of many: no mass), as it holds a mass expiry; a while later it does not."""

    async def main() -> None:
        st = await fleet(40, period_s=1.0)
        async with serve(st) as (disp, addr):
            c = Client(addr, "n0")
            await c.open()
            await c.heartbeat()  # (a session not heard from yet is held anyway: the next test)
            try:
                now = time.monotonic()
                disp._sessions["n0"].expires = now - 0.01
                disp._hold_mass_expiry(now)  # 1 of 40 late, no stall: not held
                assert disp._sessions["n0"].expires < now
                disp._forgive_stall(0.5)  # the loop woke 0.5 s late: deadlines move on by as much
                assert disp._sessions["n0"].expires == pytest.approx(now + 0.49, abs=0.01)
                later = now + 0.6
                disp._hold_mass_expiry(later)  # late again, within a grace of the stall: held
                assert disp._sessions["n0"].expires == pytest.approx(later + disp.grace())
                much_later = time.monotonic() + 10 * disp.grace()
                disp._sessions["n0"].expires = much_later - 0.01
                disp._hold_mass_expiry(much_later)  # long after the stall: not held
                assert disp._sessions["n0"].expires < much_later
            finally:
                await c.close()

    run(main())


def test_a_stall_does_not_excuse_a_node_silent_since_well_before_it() -> None:
    """A node whose last heartbeat came more than STALL_EXCUSE_PERIODS periods before the loop
    stopped was late on its own account (its next heartbeat was due while the loop ran): a stall
    does not hold it, and it is marked DOWN at its deadline (after a failover, a dead node was held
    for as long as the busy new leader kept stalling: 24-28 s at 2,000 nodes). One heard from
    within that time before the stall is held; a node not seen by this leader yet is held too."""

    async def main() -> None:
        st = await fleet(40, period_s=1.0)
        async with serve(st) as (disp, addr):
            quiet, recent = Client(addr, "n0"), Client(addr, "n1")
            await quiet.open()
            await recent.open()
            await quiet.heartbeat()
            await recent.heartbeat()
            try:
                p = disp.period()
                now = time.monotonic()
                slept = now - 0.5  # the loop went to sleep then, and woke 0.5 s late
                disp._sessions["n0"].beat = slept - (STALL_EXCUSE_PERIODS + 0.1) * p  # silent before the stall
                disp._sessions["n1"].beat = slept - (STALL_EXCUSE_PERIODS - 0.1) * p  # its next beat due in it
                disp._unconfirmed["n2"] = now - 0.01
                disp._forgive_stall(0.5, slept=slept)
                later = now + 0.1
                for nid in ("n0", "n1"):
                    disp._sessions[nid].expires = later - 0.01
                disp._unconfirmed["n2"] = later - 0.01
                disp._hold_mass_expiry(later)
                assert disp._sessions["n0"].expires < later  # not held: DOWN at this pass
                assert disp._sessions["n1"].expires == pytest.approx(later + disp.grace())  # held
                assert disp._unconfirmed["n2"] == pytest.approx(later + disp.grace())  # held
                # the loop marks the silent one DOWN at its deadline, the other not
                loop_task = asyncio.create_task(disp.run())
                try:
                    await wait_for(lambda: st.get("node", "n0").status.state == types_pb2.NodeStatus.DOWN,
                                   timeout=10)
                finally:
                    await cancel_and_wait(loop_task)
            finally:
                await quiet.close()
                await recent.close()

    run(main())


def test_a_node_that_joins_and_never_opens_a_session_is_marked_down() -> None:
    """A node the CA creates (READY, "joined") while this leader leads, whose agent never opens a
    session (the join's answer was lost and the joiner joined again under a new id, or it is gone),
    is DOWN two grace periods later, as a node a new leader never hears from is, not READY for
    ever; one that opens its session in time stays READY."""

    async def main() -> None:
        st = await fleet(1, period_s=0.1)
        async with serve(st) as (disp, addr):
            c = Client(addr, "n0")
            await c.open()
            loop_task = asyncio.create_task(disp.run())
            beating = Client(addr, "late")

            async def beat() -> None:
                while True:
                    await c.heartbeat()
                    if beating.session_id:
                        await beating.heartbeat()
                    await asyncio.sleep(0.05)

            beater = asyncio.create_task(beat())
            try:
                await asyncio.sleep(0.2)
                t0 = time.monotonic()
                joined = [objects_pb2.Node(id=i, spec=specs_pb2.NodeSpec(), status=types_pb2.NodeStatus(
                    state=types_pb2.NodeStatus.READY, message="joined")) for i in ("orphan", "late")]
                await st.update(lambda tx: [tx.create(n) for n in joined])
                await beating.open()  # the other one's agent connects
                await wait_for(lambda: st.get("node", "orphan").status.state == types_pb2.NodeStatus.DOWN,
                               timeout=NEW_LEADER_GRACE * disp.grace() + 5)
                took = time.monotonic() - t0
                assert took >= NEW_LEADER_GRACE * disp.grace() - 0.05, took
                assert st.get("node", "orphan").status.message == "no session since it joined"
                assert st.get("node", "late").status.state == types_pb2.NodeStatus.READY
                assert st.get("node", "n0").status.state == types_pb2.NodeStatus.READY
            finally:
                await cancel_and_wait(beater, loop_task)
                await c.close()
                await beating.close()

    run(main())


def test_a_session_whose_first_heartbeat_does_not_come_is_held_then_marked_down() -> None:
    """A node that opened its session was alive then: when its first heartbeat does not come within
    the grace period (a new leader busy opening a whole fleet's sessions reads it late), it is held
    as a mass expiry is, one node of many, and marked DOWN only after MASS_MAX_GRACES more grace
    periods. A node heard from once and then silent is DOWN after one grace period, as before."""

    async def main() -> None:
        st = await fleet(2, period_s=0.1)
        async with serve(st) as (disp, addr):
            quiet, heard = Client(addr, "n0"), Client(addr, "n1")
            await quiet.open()
            await heard.open()
            await heard.heartbeat()
            t0 = time.monotonic()
            loop_task = asyncio.create_task(disp.run())
            try:
                await wait_for(lambda: st.get("node", "n1").status.state == types_pb2.NodeStatus.DOWN, timeout=10)
                took_heard = time.monotonic() - t0
                assert st.get("node", "n0").status.state == types_pb2.NodeStatus.READY
                await wait_for(lambda: st.get("node", "n0").status.state == types_pb2.NodeStatus.DOWN,
                               timeout=(MASS_MAX_GRACES + 4) * disp.grace() + 5)
                took_quiet = time.monotonic() - t0
                assert took_quiet >= (1 + MASS_MAX_GRACES) * disp.grace() - 0.05 > took_heard, (took_quiet, took_heard)
                assert st.get("node", "n0").status.message == "heartbeat failure"
            finally:
                await cancel_and_wait(loop_task)
                await quiet.close()
                await heard.close()

    run(main())


def test_a_leader_that_reads_too_few_of_the_heartbeats_owed_holds_a_missed_deadline() -> None:
    """A leader that answered fewer than BEHIND_FRACTION of the heartbeats its sessions owe over the
    last grace period (a loop busy with thousands of status reports reads them late, however short
    each stall) holds a node whose deadline passed, one of many, for up to BEHIND_MAX_GRACES grace
    periods; with the heartbeats owed answered,
    it does not, nor when the sessions owing them opened only now (a failover's: they owe
    heartbeats from when they opened on)."""

    async def main() -> None:
        st = await fleet(40, period_s=1.0)
        async with serve(st) as (disp, addr):
            c = Client(addr, "n0")
            await c.open()
            await c.heartbeat()
            try:
                g = disp.grace()  # 2.8 s: a session owes 2.8 heartbeats a grace period
                now = time.monotonic()
                for i in range(1, 11):  # ten more sessions, heard from and not late: 28 heartbeats owed
                    disp._sessions[f"n{i}"] = _Session(id=f"s{i}", node_id=f"n{i}", expires=now + 100, heard=True,
                                                       opened=now - 10)
                disp._count_beats(now - g - 0.1, g)  # a grace period ago; none answered since
                disp._sessions["n0"].expires = now - 0.01
                disp._hold_mass_expiry(now)
                assert disp._sessions["n0"].expires == pytest.approx(now + g)  # held
                # longer than a mass expiry's MASS_MAX_GRACES grace periods, up to BEHIND_MAX_GRACES
                disp._held["n0"] = now - (MASS_MAX_GRACES + 1) * g
                disp._sessions["n0"].expires = now - 0.01
                disp._hold_mass_expiry(now)
                assert disp._sessions["n0"].expires == pytest.approx(now + g)  # held
                disp._held["n0"] = now - BEHIND_MAX_GRACES * g - 0.01
                disp._sessions["n0"].expires = now - 0.01
                disp._hold_mass_expiry(now)
                assert disp._sessions["n0"].expires < now  # not held any more
                disp._held.clear()
                disp._beat_counts.clear()
                later = now + 1
                disp._count_beats(later - g - 0.1, g)
                disp._beats += 28  # every heartbeat owed answered since
                disp._sessions["n0"].expires = later - 0.01
                disp._hold_mass_expiry(later)
                assert disp._sessions["n0"].expires < later  # not held: 1 of 40, no stall
                # one answered: the ten sessions opened a tenth of a second ago owe one (not 28)
                disp._beat_counts.clear()
                latest = later + 1
                disp._count_beats(latest - g - 0.1, g)
                disp._beats += 1
                for i in range(1, 11):
                    disp._sessions[f"n{i}"].opened = latest - 0.1
                disp._sessions["n0"].expires = latest - 0.01
                disp._hold_mass_expiry(latest)
                assert disp._sessions["n0"].expires < latest  # not held
            finally:
                await c.close()

    run(main())


def test_a_joined_node_without_a_session_is_held_while_nodes_keep_joining() -> None:
    """Nodes joining count as arrivals as sessions opening do: while MASS_MIN or more joined in the
    last grace period, a joined node whose agent has not opened its session by its deadline (two
    grace periods after its join; 500 nodes joining at once take a busy leader longer) is held, one
    of many; once the joins stopped, it is not."""

    async def main() -> None:
        st = await fleet(40, period_s=1.0)
        async with serve(st) as (disp, _addr):
            disp._ensure_router()  # as the leader loop starts (without running its expiry passes)
            disp._leading = True
            joined = [objects_pb2.Node(id=f"j{i}", spec=specs_pb2.NodeSpec(), status=types_pb2.NodeStatus(
                state=types_pb2.NodeStatus.READY, message="joined")) for i in range(MASS_MIN)]
            await st.update(lambda tx: [tx.create(n) for n in joined])
            await wait_for(lambda: len(disp._joined) == MASS_MIN, timeout=5)
            assert len(disp._opened) == MASS_MIN  # no session opened: the joins themselves
            now = time.monotonic()
            g = disp.grace()
            disp._unconfirmed["j0"] = now - 0.01
            disp._hold_mass_expiry(now)
            assert disp._unconfirmed["j0"] == pytest.approx(now + g)
            disp._held.clear()
            later = now + 2 * g  # nothing joined within a grace period of it
            disp._unconfirmed["j0"] = later - 0.01
            disp._hold_mass_expiry(later)
            assert disp._unconfirmed["j0"] < later and not disp._opened

    run(main())


def test_a_node_not_seen_yet_is_held_while_the_fleet_still_reconnects() -> None:
    """A new leader's deadline for a node it has not heard from passes while sessions keep opening
    (MASS_MIN or more in the last grace period: the fleet reconnecting, its agent maybe queued behind
    the others): held, also past a mass expiry's MASS_MAX_GRACES, up to BEHIND_MAX_GRACES grace
    periods. Once the sessions stopped opening, such a node, one of many, is not."""

    async def main() -> None:
        st = await fleet(40, period_s=1.0)
        async with serve(st) as (disp, _addr):
            now = time.monotonic()
            g = disp.grace()
            disp._unconfirmed["n5"] = now - 0.01
            disp._opened.extend([now - 0.5] * MASS_MIN)  # ten sessions opened half a second ago
            disp._hold_mass_expiry(now)
            assert disp._unconfirmed["n5"] == pytest.approx(now + g)
            disp._held.clear()
            later = now + 2 * g  # no session opened within a grace period of it
            disp._unconfirmed["n5"] = later - 0.01
            disp._hold_mass_expiry(later)
            assert disp._unconfirmed["n5"] < later and not disp._opened
            # held past a mass expiry's MASS_MAX_GRACES grace periods while sessions keep opening (a
            # failover at 2,000 nodes took this machine's leader a minute), up to BEHIND_MAX_GRACES
            disp._held["n5"] = later - (MASS_MAX_GRACES + 1) * g
            disp._opened.extend([later - 0.5] * MASS_MIN)
            disp._hold_mass_expiry(later)
            assert disp._unconfirmed["n5"] == pytest.approx(later + g)
            disp._held["n5"] = later - BEHIND_MAX_GRACES * g - 0.01
            disp._unconfirmed["n5"] = later - 0.01
            disp._hold_mass_expiry(later)
            assert disp._unconfirmed["n5"] < later
            disp._opened.clear()
            # the opening times are let go of on every pass, also when no deadline passed
            disp._unconfirmed.clear()
            disp._opened.append(later - 2 * g)
            disp._hold_mass_expiry(later)
            assert not disp._opened

    run(main())


def test_a_start_its_agent_reported_wakes_no_assignments_stream() -> None:
    """The router hands a node's stream the task events it may send on: not a status change alone
    from ASSIGNED up to RUNNING (its agent's own report, most of a fleet's events), but a change of
    anything else, a stop (what the node's tasks need changes: keys, secrets) and a move."""
    from shoal.proto import watch_pb2

    WE = watch_pb2.WatchEvent
    disp = Dispatcher(LocalStore(), insecure_node_id_from_metadata=True)
    queues = {n: asyncio.Queue() for n in ("a", "b")}
    for n, q in queues.items():
        disp._sessions[n] = _Session(id=f"s-{n}", node_id=n, expires=0.0, assignments=q)

    def ev(before: tuple[str, int], after: tuple[str, int], **spec) -> watch_pb2.WatchEvent:
        e = WE(action=WE.UPDATE)
        for t, (node, state) in ((e.old_object.task, before), (e.object.task, after)):
            t.id, t.node_id, t.status.state, t.desired_state = "t1", node, state, types_pb2.RUNNING
        for k, v in spec.items():
            setattr(e.object.task, k, v)
        return e

    def routed(e: watch_pb2.WatchEvent) -> dict[str, int]:
        disp._route(watch_pb2.WatchMessage(events=[e], version=7))
        return {n: len(queue_items(q)) for n, q in queues.items()}

    def queue_items(q: asyncio.Queue) -> list:
        out = []
        while not q.empty():
            out.append(q.get_nowait())
        return out

    S = types_pb2
    assert routed(ev(("a", S.ASSIGNED), ("a", S.ACCEPTED))) == {"a": 0, "b": 0}
    assert routed(ev(("a", S.STARTING), ("a", S.RUNNING))) == {"a": 0, "b": 0}
    assert routed(ev(("a", S.RUNNING), ("a", S.COMPLETE))) == {"a": 1, "b": 0}  # stopped: needs change
    assert routed(ev(("a", S.RUNNING), ("a", S.RUNNING), desired_state=S.SHUTDOWN)) == {"a": 1, "b": 0}
    assert routed(ev(("", S.PENDING), ("a", S.ASSIGNED))) == {"a": 1, "b": 0}
    assert routed(ev(("a", S.RUNNING), ("b", S.RUNNING))) == {"a": 1, "b": 1}


class Connected:
    """A node's session on one Connect stream, as an agent of this version holds it: `read` sorts
    the manager's messages by item."""

    def __init__(self, addr: str, node_id: str) -> None:
        self.channel = grpc.aio.insecure_channel(addr)
        stub = dispatcher_pb2_grpc.DispatcherStub(self.channel)
        self.call = stub.Connect(metadata=((NODE_ID_KEY, node_id),))
        self.session_id = ""

    async def open(self) -> dispatcher_pb2.SessionMessage:
        desc = types_pb2.NodeDescription(hostname="h", platform=types_pb2.Platform(os="linux", architecture="x86_64"))
        await self.call.write(dispatcher_pb2.AgentMessage(session=dispatcher_pb2.SessionRequest(description=desc)))
        first = await self.call.read()
        assert first.WhichOneof("item") == "session", first
        self.session_id = first.session.session_id
        return first.session

    async def beat(self) -> None:
        await self.call.write(dispatcher_pb2.AgentMessage(
            heartbeat=dispatcher_pb2.HeartbeatRequest(session_id=self.session_id)))

    async def read(self, *items: str) -> dict[str, list]:
        """The messages up to one of each of `items` (and whatever came between), by item."""
        got: dict[str, list] = {}
        while not all(i in got for i in items):
            m = await asyncio.wait_for(self.call.read(), 5.0)
            assert m is not grpc.aio.EOF
            got.setdefault(m.WhichOneof("item"), []).append(getattr(m, m.WhichOneof("item")))
        return got

    async def close(self) -> None:
        self.call.cancel()
        await self.channel.close()


def connect_relays() -> list[str]:
    return [t.get_name() for t in asyncio.all_tasks() if t.get_name().startswith("connect-")]


def test_connect_carries_the_session_its_heartbeats_and_assignments_on_one_stream() -> None:
    """An agent of this version opens one stream: the session's message first, then a heartbeat
    answer for each heartbeat (the period in it), the COMPLETE assignments, their increments, and a
    session message again when the node changes. The client going away ends it all: the session's
    assignments and log listener are let go and no relay of the call is left."""
    from shoal.manager.logbroker import LogBroker

    async def main() -> None:
        st = LocalStore()
        await add_cluster(st, period_s=0.5)
        await add_node(st, "n1")
        mine = task("n1", types_pb2.ASSIGNED)
        await put(st, mine)
        broker = LogBroker(st, insecure_node_id_from_metadata=True)
        async with serve(st, logbroker=broker) as (disp, addr):
            c = Connected(addr, "n1")
            try:
                first = await c.open()
                assert first.node.id == "n1" and first.heartbeat_period.ToNanoseconds() == 500_000_000
                await c.beat()
                got = await c.read("heartbeat", "assignments")
                assert len(got["heartbeat"]) == 1 and 0.4 <= got["heartbeat"][0].period.ToNanoseconds() / 1e9 <= 0.5
                assert got["assignments"][0].type == AM.COMPLETE
                assert kinds(got["assignments"][0]) == [("task", mine.id, AC.UPDATE)]
                for _ in range(3):
                    await c.beat()
                    assert len((await c.read("heartbeat"))["heartbeat"]) == 1
                assert disp._sessions["n1"].heard

                later = task("n1", types_pb2.ASSIGNED)
                await put(st, later)
                m = (await c.read("assignments"))["assignments"][0]
                assert m.type == AM.INCREMENTAL and kinds(m) == [("task", later.id, AC.UPDATE)]

                def label(tx: Tx) -> None:
                    n = objects_pb2.Node()
                    n.CopyFrom(tx.get("node", "n1"))
                    n.spec.annotations.labels["zone"] = "a"
                    tx.update(n)

                await st.update(label)
                m = (await c.read("session"))["session"][-1]
                assert m.node.spec.annotations.labels["zone"] == "a"
                assert "n1" in broker._listeners and disp._sessions["n1"].assignments is not None
                assert len(connect_relays()) == 4
            finally:
                await c.close()
            await wait_for(lambda: not connect_relays())
            assert "n1" not in broker._listeners and disp._sessions["n1"].assignments is None

    run(main())


def test_connect_refuses_a_stream_that_does_not_start_with_the_session_or_carries_two() -> None:
    async def main() -> None:
        st = LocalStore()
        await add_cluster(st)
        await add_node(st, "n1")
        async with serve(st) as (disp, addr):
            c = Connected(addr, "n1")
            try:
                await c.beat()
                with pytest.raises(grpc.aio.AioRpcError) as e:
                    await c.call.read()
                assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
                assert "first message of a Connect stream must be `session`" in e.value.details()
                assert "n1" not in disp._sessions  # nothing opened
            finally:
                await c.close()
            c = Connected(addr, "n1")
            try:
                await c.open()
                await c.call.write(dispatcher_pb2.AgentMessage(session=dispatcher_pb2.SessionRequest()))
                with pytest.raises(grpc.aio.AioRpcError) as e:
                    await c.read("never")
                assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
                assert "carries one session: after the first message, send only heartbeats" in e.value.details()
            finally:
                await c.close()
            await wait_for(lambda: not connect_relays())

    run(main())


def test_a_removed_node_loses_its_connect_stream() -> None:
    async def main() -> None:
        st = LocalStore()
        await add_cluster(st)
        await add_node(st, "n1")
        async with serve(st) as (_, addr):
            c = Connected(addr, "n1")
            try:
                await c.open()
                await st.update(lambda tx: tx.delete(st.get("node", "n1")))
                with pytest.raises(grpc.aio.AioRpcError) as e:
                    await c.read("never")
                assert e.value.code() == grpc.StatusCode.NOT_FOUND and "removed" in e.value.details()
            finally:
                await c.close()
            await wait_for(lambda: not connect_relays())

    run(main())
