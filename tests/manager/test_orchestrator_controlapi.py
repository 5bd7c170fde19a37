"""End to end on one LocalStore: the real Control API (gRPC on a unix socket) and the real allocator,
with the orchestrators, the scheduler and simulated agents."""

from __future__ import annotations

import asyncio

from helpers.controlapi import served
from orchestrator_sim import Sim, dur

from shoal.proto import control_pb2, specs_pb2, types_pb2


def test_service_lifecycle_through_control_api(tmp_path) -> None:
    async def main() -> None:
        sim = Sim()
        await sim.add_nodes(3)
        async with sim.running(real_allocator=True), served(tmp_path, store=sim.store) as srv:
            stub = srv.stub
            net = await stub.CreateNetwork(control_pb2.CreateNetworkRequest(spec=specs_pb2.NetworkSpec(
                annotations=types_pb2.Annotations(name="backend"))))
            spec = specs_pb2.ServiceSpec(annotations=types_pb2.Annotations(name="web"))
            spec.task.container.image = "busybox:1"
            spec.task.restart.delay.CopyFrom(dur(0.01))
            spec.task.networks.add(target="backend")
            spec.replicated.replicas = 3
            spec.update.CopyFrom(types_pb2.UpdateConfig(parallelism=1, monitor=dur(0.05)))
            spec.rollback.CopyFrom(types_pb2.UpdateConfig(parallelism=0, monitor=dur(0.05)))
            spec.endpoint.ports.add(target_port=80, published_port=8080)
            svc = (await stub.CreateService(control_pb2.CreateServiceRequest(spec=spec))).service
            await sim.until(lambda: len(sim.live(svc.id)) == 3, what="3 tasks running")
            for t in sim.live(svc.id):
                assert net.network.id in {a.network.id for a in t.networks}, t
                assert t.endpoint.ports and t.endpoint.ports[0].published_port == 8080

            cur = (await stub.GetService(control_pb2.GetServiceRequest(service_id=svc.id))).service
            new_spec = specs_pb2.ServiceSpec()
            new_spec.CopyFrom(cur.spec)
            new_spec.task.container.image = "busybox:2"
            await stub.UpdateService(control_pb2.UpdateServiceRequest(
                service_id=svc.id, service_version=cur.meta.version, spec=new_spec))
            await sim.until(lambda: sim.update_state(svc.id) == "COMPLETED", what="update completed")
            assert sorted(t.spec.container.image for t in sim.live(svc.id)) == ["busybox:2"] * 3

            cur = (await stub.GetService(control_pb2.GetServiceRequest(service_id=svc.id))).service
            await stub.UpdateService(control_pb2.UpdateServiceRequest(
                service_id=svc.id, service_version=cur.meta.version,
                rollback=control_pb2.UpdateServiceRequest.PREVIOUS))
            await sim.until(lambda: sim.update_state(svc.id) == "ROLLBACK_COMPLETED", what="rollback completed")
            await sim.until(lambda: sorted(t.spec.container.image for t in sim.live(svc.id)) == ["busybox:1"] * 3)

            # Scale through the API, then remove: every task is stopped and deleted.
            cur = (await stub.GetService(control_pb2.GetServiceRequest(service_id=svc.id))).service
            new_spec.CopyFrom(cur.spec)
            new_spec.replicated.replicas = 5
            await stub.UpdateService(control_pb2.UpdateServiceRequest(
                service_id=svc.id, service_version=cur.meta.version, spec=new_spec))
            await sim.until(lambda: len(sim.live(svc.id)) == 5, what="scaled to 5")
            await stub.RemoveService(control_pb2.RemoveServiceRequest(service_id=svc.id))
            await sim.until(lambda: not sim.tasks(svc.id), what="tasks of the removed service deleted")

    async def bounded() -> None:
        async with asyncio.timeout(60):
            await main()

    asyncio.run(bounded())
