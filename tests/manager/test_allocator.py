import asyncio
import contextlib
import ipaddress

import pytest
from helpers.aio import run

from shoal.manager.allocator import INGRESS_NAME, Allocator, allocate_network, mac_for
from shoal.manager.store import Conflict, InvalidArgument, LocalStore, StaleVersion, Unavailable
from shoal.proto import objects_pb2, specs_pb2, store_pb2, types_pb2


def cluster(pool: str = "198.19.0.0/16", size: int = 24) -> objects_pb2.Cluster:
    return objects_pb2.Cluster(
        spec=specs_pb2.ClusterSpec(
            annotations=types_pb2.Annotations(name="default"), default_address_pool=[pool], subnet_size=size
        )
    )


async def new_store(pool: str = "198.19.0.0/16", size: int = 24) -> LocalStore:
    st = LocalStore()
    await st.update(lambda tx: tx.create(cluster(pool, size)))
    return st


async def create_network(st: LocalStore, name: str, subnet: str = "", gateway: str = "") -> objects_pb2.Network:
    def fn(tx):
        net = objects_pb2.Network(
            spec=specs_pb2.NetworkSpec(annotations=types_pb2.Annotations(name=name))
        )
        if subnet or gateway:
            net.spec.ipam.configs.add(subnet=subnet, gateway=gateway)
        allocate_network(tx.sm, net)
        return tx.create(net)

    return await st.update(fn)


def test_networks_get_sequential_vnis_and_free_subnets() -> None:
    async def main() -> None:
        st = await new_store()
        a = await create_network(st, "a")
        b = await create_network(st, "b", subnet="198.19.1.0/24")
        c = await create_network(st, "c")
        assert [n.driver_state.vni for n in (a, b, c)] == [4097, 4098, 4099]
        assert a.ipam.configs[0].subnet == "198.19.0.0/24" and a.ipam.configs[0].gateway == "198.19.0.1"
        assert c.ipam.configs[0].subnet == "198.19.2.0/24"  # skips b's
        assert a.spec.driver_config.name == "overlay"

    run(main())


@pytest.mark.parametrize(
    "subnet,gateway,message",
    [
        ("198.19.0.0/25", "", "overlaps 198.19.0.0/24 of network 'a'"),
        ("10.1.0.0/24", "", "outside the cluster's address pool"),
        ("198.19.9.1/24", "", "not a valid IPv4 network"),
        ("198.19.9.0/30", "", "too small"),
        ("198.19.9.0/24", "198.19.8.1", "not a host address of subnet"),
    ],
)
def test_bad_subnets_are_refused_with_a_reason(subnet: str, gateway: str, message: str) -> None:
    async def main() -> None:
        st = await new_store()
        await create_network(st, "a")
        before = st.sm.version
        with pytest.raises(InvalidArgument, match=message):
            await create_network(st, "b", subnet=subnet, gateway=gateway)
        assert st.sm.version == before

    run(main())


def test_exhausted_pool() -> None:
    async def main() -> None:
        st = await new_store("198.19.0.0/23", 24)
        await create_network(st, "a")
        await create_network(st, "b")
        with pytest.raises(InvalidArgument, match="no free /24 left"):
            await create_network(st, "c")

    run(main())


def test_apply_refuses_duplicate_vni_and_overlap_on_every_replica() -> None:
    async def main() -> None:
        st = await new_store()
        a = await create_network(st, "a")
        dup = objects_pb2.Network(spec=specs_pb2.NetworkSpec(annotations=types_pb2.Annotations(name="x")))
        dup.id = "x1"
        dup.driver_state.vni = a.driver_state.vni
        dup.ipam.configs.add(subnet="198.19.5.0/24")
        txn = store_pb2.StoreTransaction(actions=[store_pb2.StoreAction(kind=store_pb2.StoreAction.CREATE)])
        txn.actions[0].object.network.CopyFrom(dup)
        with pytest.raises(Conflict, match="VXLAN id 4097"):
            st.sm.apply(txn)
        txn.actions[0].object.network.driver_state.vni = 5000
        txn.actions[0].object.network.ipam.configs[0].subnet = "198.19.0.128/25"
        with pytest.raises(InvalidArgument, match="overlaps"):
            st.sm.apply(txn)

    run(main())


async def add_service(st, name, nets=(), ports=(), replicas=2, mode=types_pb2.EndpointSpec.VIP):
    def fn(tx):
        svc = objects_pb2.Service(
            spec=specs_pb2.ServiceSpec(
                annotations=types_pb2.Annotations(name=name),
                task=types_pb2.TaskSpec(
                    container=types_pb2.ContainerSpec(image="busybox"),
                    networks=[types_pb2.NetworkAttachmentConfig(target=n, aliases=[f"{name}-alias"]) for n in nets],
                ),
                replicated=specs_pb2.ReplicatedService(replicas=replicas),
                endpoint=types_pb2.EndpointSpec(mode=mode, ports=list(ports)),
            )
        )
        svc = tx.create(svc)
        for slot in range(1, replicas + 1):
            tx.create(objects_pb2.Task(service_id=svc.id, slot=slot, spec=svc.spec.task,
                                       desired_state=types_pb2.RUNNING,
                                       status=types_pb2.TaskStatus(state=types_pb2.NEW)))
        return svc

    return await st.update(fn)


def test_allocator_gives_vips_task_addresses_and_moves_tasks_to_pending() -> None:
    async def main() -> None:
        st = await new_store()
        alloc = Allocator(st)
        await alloc._ensure_ingress()
        net = await create_network(st, "front")
        web = await add_service(
            st, "web", nets=[net.id], replicas=3,
            ports=[types_pb2.PortConfig(target_port=80)],  # ingress, number allocated
        )
        plain = await add_service(st, "plain", replicas=1)
        await alloc.allocate_once()

        web = st.get("service", web.id)
        ingress = st.sm.get_by_name("network", INGRESS_NAME)
        assert {v.network_id for v in web.endpoint.virtual_ips} == {net.id, ingress.id}
        assert 30000 <= web.endpoint.ports[0].published_port <= 32767
        tasks = st.sm.tasks_by_service(web.id)
        assert all(t.status.state == types_pb2.PENDING for t in tasks)
        addrs = set()
        for t in tasks:
            assert [a.network.id for a in t.networks] == [ingress.id, net.id]
            assert t.networks[1].aliases == ["web-alias"]
            assert t.networks[1].network.driver_state.vni == net.driver_state.vni
            for a in t.networks:
                ip = ipaddress.ip_interface(a.addresses[0])
                assert a.mac == mac_for(ip.ip)
                addrs.add(a.addresses[0])
            assert t.endpoint.ports[0].published_port == web.endpoint.ports[0].published_port
        vips = {v.addr for v in web.endpoint.virtual_ips}
        assert len(addrs) == 6 and not (addrs & vips)
        assert "198.19.1.1/24" not in addrs  # gateway of "front" (ingress took 198.19.0.0/24)
        [pt] = st.sm.tasks_by_service(plain.id)
        assert pt.status.state == types_pb2.PENDING and not pt.networks
        # a second pass (or a new leader's allocator) changes nothing
        assert await Allocator(st).allocate_once() == 0

    run(main())


def test_a_batch_refused_part_way_is_finished_one_by_one_without_what_it_wrote(caplog) -> None:  # noqa: ANN001
    """The store commits a pass's batch in transactions; when a later one is refused, those before
    it stay committed: the one-by-one fallback writes only the objects still as the pass read them
    (at 2,000 nodes it sent thousands of writes refused as out of sequence, and the tasks left NEW
    waited for later events). The log says why the batch was refused."""

    async def main() -> None:
        st = await new_store()
        alloc = Allocator(st)
        svc = await add_service(st, "plain", replicas=4)
        real = st.batch
        sizes: list[int] = []

        async def batch(actions, max_actions=2000):  # noqa: ANN001, ANN202
            sizes.append(len(actions))
            if len(actions) > 1:  # its first transaction commits, the second is refused
                await real(actions[:2])
                raise StaleVersion("update out of sequence: a task was changed since it was read")
            return await real(actions, max_actions)

        st.batch = batch  # type: ignore[method-assign]
        await alloc.allocate_once()
        assert sizes[sizes.index(4):] == [4, 1, 1], sizes  # (before it: the service's endpoint)
        assert all(t.status.state == types_pb2.PENDING for t in st.sm.tasks_by_service(svc.id))

    with caplog.at_level("WARNING", logger="shoal.allocator"):
        run(main())
    assert any("allocation batch of 4 objects refused (StaleVersion: update out of sequence" in r.getMessage()
               for r in caplog.records), [r.getMessage() for r in caplog.records]


@pytest.mark.parametrize("landed", [True, False], ids=["landed", "lost"])
def test_an_unconfirmed_batch_is_not_sent_again_one_by_one_and_the_pass_runs_again(landed: bool) -> None:
    """The store does not confirm a pass's batch (Unavailable: this manager's copy of the store did not
    reach the commit in time, or no quorum). Nothing is written one by one (the cache may not show
    what landed: at 2,000 nodes 4,000 such writes, a round trip each, fed the scheduler a few tasks
    at a time for minutes); the pass runs again UNCONFIRMED_RETRY later without any event, and
    leaves every task PENDING whether the batch had landed or not."""

    async def main() -> None:
        st = await new_store()
        svc = await add_service(st, "plain", replicas=4)
        real = st.batch
        sizes: list[int] = []
        refusals = [1]

        async def batch(actions, max_actions=2000):  # noqa: ANN001, ANN202
            tasks = any(a.object.WhichOneof("object") == "task" for a in actions)
            if tasks:
                sizes.append(len(actions))
            if refusals[0] and tasks:
                refusals[0] -= 1
                if landed:
                    await real(actions, max_actions)
                raise Unavailable("this manager's copy of the store did not reach revision 9 in time (it holds 8)")
            return await real(actions, max_actions)

        st.batch = batch  # type: ignore[method-assign]
        alloc = Allocator(st)
        loop_task = asyncio.create_task(alloc.run())
        try:
            for _ in range(300):
                if all(t.status.state == types_pb2.PENDING for t in st.sm.tasks_by_service(svc.id)):
                    break
                await asyncio.sleep(0.01)
            assert all(t.status.state == types_pb2.PENDING for t in st.sm.tasks_by_service(svc.id))
            assert 1 not in sizes, sizes  # no task one by one
            assert sizes.count(4) == (1 if landed else 2), sizes  # lost: the next pass wrote them
        finally:
            loop_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await loop_task

    run(main())


def test_new_leader_never_reuses_live_addresses_but_reuses_dead_ones() -> None:
    async def main() -> None:
        st = await new_store()
        net = await create_network(st, "n", subnet="198.19.7.0/29")  # 6 hosts: gw + vip + 4 tasks
        svc = await add_service(st, "s", nets=[net.id], replicas=4)
        await Allocator(st).allocate_once()
        used = {t.networks[0].addresses[0] for t in st.sm.tasks_by_service(svc.id)}
        assert len(used) == 4
        # one more task cannot get an address: it stays NEW with the reason
        await st.update(lambda tx: tx.create(objects_pb2.Task(
            service_id=svc.id, slot=5, desired_state=types_pb2.RUNNING, status=types_pb2.TaskStatus(state=types_pb2.NEW))))
        await Allocator(st).allocate_once()
        stuck = [t for t in st.sm.tasks_by_service(svc.id) if t.slot == 5][0]
        assert stuck.status.state == types_pb2.NEW and "no free address" in stuck.status.message
        # a task dies: its address is free again for the next allocation
        dead = objects_pb2.Task()
        dead.CopyFrom([t for t in st.sm.tasks_by_service(svc.id) if t.slot == 1][0])
        dead.status.state = types_pb2.FAILED
        await st.update(lambda tx: tx.update(dead))
        await Allocator(st).allocate_once()
        stuck = [t for t in st.sm.tasks_by_service(svc.id) if t.slot == 5][0]
        assert stuck.status.state == types_pb2.PENDING
        assert stuck.networks[0].addresses[0] == dead.networks[0].addresses[0]

    run(main())


def test_allocator_loop_follows_events() -> None:
    async def main() -> None:
        st = await new_store()
        loop = asyncio.create_task(Allocator(st).run())
        try:
            svc = await add_service(st, "late", replicas=2)
            for _ in range(200):
                if all(t.status.state == types_pb2.PENDING for t in st.sm.tasks_by_service(svc.id)):
                    break
                await asyncio.sleep(0.01)
            assert all(t.status.state == types_pb2.PENDING for t in st.sm.tasks_by_service(svc.id))
            assert st.sm.get_by_name("network", INGRESS_NAME) is not None
        finally:
            loop.cancel()
            with pytest.raises(asyncio.CancelledError):
                await loop

    run(main())


def test_every_node_gets_one_ingress_address() -> None:
    async def main() -> None:
        st = await new_store()
        alloc = Allocator(st)
        await alloc._ensure_ingress()
        for i in range(3):
            await st.update(lambda tx, i=i: tx.create(objects_pb2.Node(
                description=types_pb2.NodeDescription(hostname=f"h{i}"))))
        await alloc.allocate_once()
        ingress = st.sm.get_by_name("network", INGRESS_NAME)
        addrs = []
        for n in st.sm.list("node"):
            [att] = n.attachments
            assert att.network.id == ingress.id and att.mac == mac_for(ipaddress.ip_interface(att.addresses[0]).ip)
            addrs.append(att.addresses[0])
        assert len(set(addrs)) == 3
        svc = await add_service(st, "p", ports=[types_pb2.PortConfig(target_port=80, published_port=8080)], replicas=2)
        await alloc.allocate_once()
        task_addrs = {t.networks[0].addresses[0] for t in st.sm.tasks_by_service(svc.id)}
        assert not task_addrs & set(addrs)
        assert await alloc.allocate_once() == 0

    run(main())


def test_allocator_waits_for_the_cluster_and_its_pool() -> None:
    """The ingress network comes from the cluster's pool even when the loop starts first."""

    async def main() -> None:
        st = LocalStore()
        loop = asyncio.create_task(Allocator(st).run())
        try:
            await asyncio.sleep(0.05)
            assert st.sm.get_by_name("network", INGRESS_NAME) is None
            await st.update(lambda tx: tx.create(cluster("198.19.0.0/16")))
            for _ in range(200):
                if st.sm.get_by_name("network", INGRESS_NAME) is not None:
                    break
                await asyncio.sleep(0.01)
            ingress = st.sm.get_by_name("network", INGRESS_NAME)
            assert ingress.ipam.configs[0].subnet == "198.19.0.0/24"
        finally:
            loop.cancel()
            with pytest.raises(asyncio.CancelledError):
                await loop

    run(main())
