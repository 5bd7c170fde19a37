"""Encrypted overlay networks, manager side: validation, IPsec keys made with the network's allocation,
and keys never leaving the store through attachments, the control API or the watch API."""

from __future__ import annotations

import time

import pytest
from helpers.aio import run
from helpers.controlapi import served

from shoal.manager import validation
from shoal.manager.allocator import Allocator, allocate_network
from shoal.manager.keymanager import IPSEC_SUBSYSTEM, ipsec_keys, public
from shoal.manager.store import InvalidArgument, LocalStore, StateMachine, Store
from shoal.manager.watchapi import redact
from shoal.proto import control_pb2, objects_pb2, specs_pb2, store_pb2, types_pb2, watch_pb2


class RecordingStore(LocalStore):
    """A LocalStore that keeps every transaction it was asked to commit (to replay on another replica)."""

    def __init__(self) -> None:
        super().__init__()
        self.log: list[store_pb2.StoreTransaction] = []

    async def propose(self, txn: store_pb2.StoreTransaction) -> int:
        copy = store_pb2.StoreTransaction()
        copy.CopyFrom(txn)
        self.log.append(copy)
        return await super().propose(txn)


def net_spec(name: str, encrypted: bool = True, ingress: bool = False) -> specs_pb2.NetworkSpec:
    spec = specs_pb2.NetworkSpec(annotations=types_pb2.Annotations(name=name), ingress=ingress)
    spec.driver_config.name = "overlay"
    if encrypted:
        spec.driver_config.options["encrypted"] = ""
    return spec


async def new_store(store: Store | None = None) -> Store:
    st = store or LocalStore()
    cl = objects_pb2.Cluster(spec=specs_pb2.ClusterSpec(annotations=types_pb2.Annotations(name="default"),
                                                        default_address_pool=["198.19.0.0/16"]))
    await st.update(lambda tx: tx.create(cl))
    return st


async def create(st: Store, spec: specs_pb2.NetworkSpec) -> objects_pb2.Network:
    def fn(tx):
        net = objects_pb2.Network(spec=spec)
        allocate_network(tx.sm, net)
        return tx.create(net)

    return await st.update(fn)


# ---- validation ------------------------------------------------------------------------------------
def test_encrypted_option_accepted_on_overlay_refused_on_ingress() -> None:
    validation.validate_network_spec(net_spec("secure"))
    spec = net_spec("secure")
    spec.driver_config.options["encrypted"] = "true"  # compose files often give a value: still encrypted
    validation.validate_network_spec(spec)
    with pytest.raises(InvalidArgument) as e:
        validation.validate_network_spec(net_spec("ingress", ingress=True))
    msg = str(e.value)
    assert msg.startswith("network driver option encrypted cannot be used on the ingress network")
    assert "without --opt encrypted" in msg and "\n" not in msg


@pytest.mark.parametrize("ns,ok", [(0, True), (10**9, True), (12 * 3600 * 10**9, True), (999_999_999, False),
                                   (1, False), (-(10**9), False)])
def test_key_rotation_interval_is_zero_or_at_least_a_second(ns: int, ok: bool) -> None:
    spec = specs_pb2.ClusterSpec()
    spec.network_encryption.key_rotation_interval.FromNanoseconds(ns)
    if ok:
        validation.validate_cluster_spec(spec)
        return
    with pytest.raises(InvalidArgument, match=r"network key rotation interval .*: give 0 \(the default, 12h\) "
                                              r"or at least 1s"):
        validation.validate_cluster_spec(spec)


# ---- keys made with the allocation -----------------------------------------------------------------
def test_encrypted_network_gets_three_keys_in_its_allocation_transaction() -> None:
    async def main() -> None:
        st = await new_store(RecordingStore())
        before = time.time_ns()
        net = await create(st, net_spec("secure"))
        plain = await create(st, net_spec("plain", encrypted=False))
        stored = st.get("network", net.id)
        keys = ipsec_keys(stored)
        assert [k.lamport_time for k in keys] == [1, 2, 3]
        assert all(k.subsystem == IPSEC_SUBSYSTEM and len(k.key) == 32 for k in keys)
        assert len({k.key for k in keys}) == 3
        assert before <= stored.keys_rotated_at.ToNanoseconds() <= time.time_ns()
        assert stored.driver_state.vni and stored.ipam.configs[0].subnet
        assert not st.get("network", plain.id).encryption_keys
        assert not st.get("network", plain.id).HasField("keys_rotated_at")

        # The keys travel in the proposed transaction (the one that creates the network): a replica that
        # applies the same log holds the same bytes.
        create_txn = next(t for t in st.log if any(a.object.network.id == net.id for a in t.actions))
        assert [a.kind for a in create_txn.actions] == [store_pb2.StoreAction.CREATE]
        assert ipsec_keys(create_txn.actions[0].object.network) == keys
        replica = StateMachine()
        for txn in st.log:
            replica.apply(txn)
        assert replica.get("network", net.id) == stored

    run(main())


def test_allocator_gives_keys_to_an_encrypted_network_that_has_none() -> None:
    async def main() -> None:
        st = await new_store()
        net = await create(st, net_spec("old"))
        bare = objects_pb2.Network()
        bare.CopyFrom(st.get("network", net.id))
        bare.ClearField("encryption_keys")
        bare.ClearField("keys_rotated_at")
        await st.update(lambda tx: tx.update(bare))
        assert not st.get("network", net.id).encryption_keys
        alloc = Allocator(st)
        await alloc.allocate_once()
        got = st.get("network", net.id)
        assert [k.lamport_time for k in ipsec_keys(got)] == [1, 2, 3] and got.HasField("keys_rotated_at")
        # The next pass leaves them alone.
        version = got.meta.version
        await alloc.allocate_once()
        assert st.get("network", net.id).meta.version == version

    run(main())


def test_task_and_node_attachments_never_carry_keys() -> None:
    async def main() -> None:
        st = await new_store()
        net = await create(st, net_spec("secure"))
        node = objects_pb2.Node(id="n1")
        node.status.state = types_pb2.NodeStatus.READY
        t = objects_pb2.Task(id="t1", service_id="", desired_state=types_pb2.RUNNING)
        t.status.state = types_pb2.NEW
        t.spec.container.image = "busybox"
        t.spec.networks.add(target=net.id)

        def fn(tx):
            tx.create(node)
            tx.create(t)

        await st.update(fn)
        alloc = Allocator(st)
        await alloc._ensure_ingress()  # what run() does first
        await alloc.allocate_once()
        task = st.get("task", "t1")
        assert task.status.state == types_pb2.PENDING
        [att] = task.networks
        assert att.network.id == net.id and att.network.driver_state.vni == net.driver_state.vni
        assert att.network.spec.driver_config.options["encrypted"] == ""
        assert not att.network.encryption_keys
        ingress = st.get("node", "n1").attachments
        assert ingress and all(not a.network.encryption_keys for a in ingress)
        assert len(ipsec_keys(st.get("network", net.id))) == 3  # the store keeps them

    run(main())


# ---- keys never leave through the APIs ---------------------------------------------------------------
def _with_keys(net: objects_pb2.Network) -> objects_pb2.Network:
    """A copy of a network as an attachment written before attachments were stripped would hold it."""
    out = objects_pb2.Network()
    out.CopyFrom(net)
    assert out.encryption_keys
    return out


def test_control_api_never_returns_keys(tmp_path) -> None:
    async def main() -> None:
        st = await new_store()
        async with served(tmp_path, st) as s:
            created = (await s.stub.CreateNetwork(control_pb2.CreateNetworkRequest(spec=net_spec("secure")))).network
            assert created.spec.driver_config.options["encrypted"] == "" and not created.encryption_keys
            assert created.HasField("keys_rotated_at")
            stored = st.get("network", created.id)
            assert len(stored.encryption_keys) == 3

            # Objects that (should a bug or an old writer put them there) hold keys in attachments.
            task = objects_pb2.Task(id="t1", node_id="n1", desired_state=types_pb2.RUNNING)
            task.spec.container.image = "busybox"
            task.networks.add().network.CopyFrom(_with_keys(stored))
            node = objects_pb2.Node(id="n1")
            node.description.hostname = "n1"
            node.attachments.add().network.CopyFrom(_with_keys(stored))

            def fn(tx):
                tx.create(task)
                tx.create(node)

            await st.update(fn)

            got = (await s.stub.GetNetwork(control_pb2.GetNetworkRequest(network_id="secure"))).network
            listed = (await s.stub.ListNetworks(control_pb2.ListNetworksRequest())).networks
            tasks = [(await s.stub.GetTask(control_pb2.GetTaskRequest(task_id="t1"))).task,
                     *(await s.stub.ListTasks(control_pb2.ListTasksRequest())).tasks]
            nodes = [(await s.stub.GetNode(control_pb2.GetNodeRequest(node_id="n1"))).node,
                     *(await s.stub.ListNodes(control_pb2.ListNodesRequest())).nodes]
            upd = (await s.stub.UpdateNode(control_pb2.UpdateNodeRequest(
                node_id="n1", node_version=nodes[0].meta.version,
                spec=specs_pb2.NodeSpec(availability=types_pb2.DRAIN)))).node
            nets = [got, *listed] + [a.network for t in tasks for a in t.networks]
            nets += [a.network for n in [*nodes, upd] for a in n.attachments]
            assert len(nets) == 7
            assert all(not n.encryption_keys for n in nets)
            assert got.keys_rotated_at == stored.keys_rotated_at
            for blob in (got, *tasks, *nodes, upd):
                for k in stored.encryption_keys:
                    assert k.key not in blob.SerializeToString()
            # The store still holds them.
            assert len(st.get("task", "t1").networks[0].network.encryption_keys) == 3

    run(main())


def test_public_copies_only_when_there_is_something_to_strip() -> None:
    plain = objects_pb2.Network(id="p")
    assert public(plain) is plain
    keyed = objects_pb2.Network(id="k")
    keyed.encryption_keys.add(subsystem=IPSEC_SUBSYSTEM, key=b"x" * 32, lamport_time=1)
    out = public(keyed)
    assert out is not keyed and not out.encryption_keys and len(keyed.encryption_keys) == 1
    task = objects_pb2.Task(id="t")
    task.networks.add().network.CopyFrom(keyed)
    assert not public(task).networks[0].network.encryption_keys
    assert task.networks[0].network.encryption_keys


def test_watch_api_strips_keys_from_networks_tasks_and_nodes() -> None:
    net = objects_pb2.Network(id="n")
    net.encryption_keys.add(subsystem=IPSEC_SUBSYSTEM, key=b"k" * 32, lamport_time=1)
    net.keys_rotated_at.FromSeconds(100)
    ev = watch_pb2.WatchEvent(action=watch_pb2.WatchEvent.UPDATE)
    ev.object.network.CopyFrom(net)
    ev.old_object.network.CopyFrom(net)
    redact(ev)
    assert not ev.object.network.encryption_keys and not ev.old_object.network.encryption_keys
    assert ev.object.network.keys_rotated_at.seconds == 100

    ev = watch_pb2.WatchEvent(action=watch_pb2.WatchEvent.CREATE)
    ev.object.task.networks.add().network.CopyFrom(net)
    redact(ev)
    assert not ev.object.task.networks[0].network.encryption_keys
    ev = watch_pb2.WatchEvent(action=watch_pb2.WatchEvent.CREATE)
    ev.object.node.attachments.add().network.CopyFrom(net)
    redact(ev)
    assert not ev.object.node.attachments[0].network.encryption_keys
