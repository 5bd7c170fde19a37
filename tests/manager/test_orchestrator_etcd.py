"""The orchestrators and the scheduler on a real EtcdStore (one etcd member on 127.0.0.1): the leader
loops write through a store fenced by an `Election` term, as on a manager, and read a cache fed by
etcd's watch."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from etcd_cluster import CLUSTER, EtcdCluster, etcd_cluster
from orchestrator_sim import Sim, service_spec

from shoal.manager import ca
from shoal.manager.etcdstore import Election, Fence
from shoal.proto import types_pb2

pytestmark = pytest.mark.integration


@pytest.fixture
def etcd() -> Iterator[EtcdCluster]:
    yield from etcd_cluster(ca.RootCA.create(CLUSTER), 1)


def test_loops_on_etcd_store(etcd: EtcdCluster) -> None:
    async def main() -> None:
        store = await etcd.store()
        terms = Election(store, "node-1").terms()
        try:
            fence = await anext(terms)
            assert isinstance(fence, Fence)
            await store.wait_for(fence.revision)
            store.leading = True  # as the manager sets it for the term
            sim = Sim(store=store.fenced(fence))  # type: ignore[arg-type]
            nodes = await sim.add_nodes(3)
            async with sim.running():
                svc = await sim.create_service(service_spec("web", replicas=6))
                glob = await sim.create_service(service_spec("g", replicas=None))
                await sim.until(lambda: len(sim.live(svc.id)) == 6 and len(sim.live(glob.id)) == 3, timeout=20)
                await sim.update_service(svc.id, lambda s: s.task.container.__setattr__("image", "busybox:2"))
                await sim.until(lambda: sim.update_state(svc.id) == "COMPLETED", timeout=20)
                await sim.set_node_state(nodes[0].id, types_pb2.NodeStatus.DOWN)
                await sim.until(
                    lambda: len(sim.live(svc.id)) == 6 and len(sim.live(glob.id)) == 2
                    and all(t.spec.container.image == "busybox:2" for t in sim.live(svc.id)),
                    timeout=20,
                )
                sim.check_slots()
            # what the loops wrote is in etcd: a second store loads the same state
            other = await etcd.store()
            await other.wait_for(store.sm.version)
            assert {t.id for t in other.find("task")} == {t.id for t in store.find("task")}
        finally:
            await terms.aclose()

    etcd.run(main(), timeout=90)
