"""The orchestrators and the scheduler on a real (single-member) Raft store over loopback TCP: writes
are proposed through pysyncobj and watch events arrive from the Raft thread."""

from __future__ import annotations

import asyncio
import socket

from orchestrator_sim import Sim, service_spec

from shoal.manager.raft import RaftStore
from shoal.proto import types_pb2


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_loops_on_raft_store(tmp_path) -> None:
    async def main() -> None:
        store = RaftStore(tmp_path / "raft", f"127.0.0.1:{free_port()}", [], b"k" * 32)
        try:
            await store.wait_leader(10)
            await store.barrier()
            sim = Sim(store=store)  # type: ignore[arg-type]
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
        finally:
            store.close()

    async def bounded() -> None:
        async with asyncio.timeout(90):
            await main()

    asyncio.run(bounded())
