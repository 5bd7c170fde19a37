"""Real `swarmctl` listing more than gRPC's default 4 MB answer: a cluster of thousands of nodes with
tens of thousands of tasks (the fleet bench's 30,000 tasks are a 9 MB ListTasks answer)."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

from helpers.controlapi import served
from helpers.swarmctl import SWARMCTL

from shoal.manager.store import Tx
from shoal.proto import objects_pb2, specs_pb2, types_pb2

TASKS = 25_000


def fill(tx: Tx) -> None:
    spec = specs_pb2.ServiceSpec(annotations=types_pb2.Annotations(name="big"))
    spec.replicated.replicas = TASKS
    spec.task.container.image = "registry.example:5000/team/an-image-with-a-long-name:1.2.3"
    spec.task.container.env.extend(f"VARIABLE_{i}=some value of a realistic length" for i in range(3))
    svc = tx.create(objects_pb2.Service(spec=spec))
    for slot in range(1, TASKS + 1):
        t = objects_pb2.Task(service_id=svc.id, slot=slot, spec=spec.task, desired_state=types_pb2.TaskState.RUNNING)
        t.status.state = types_pb2.TaskState.RUNNING
        t.status.message = "started"
        tx.create(t)


def test_lists_larger_than_grpc_default_answer(tmp_path: Path) -> None:
    async def swarmctl(sock: str, *args: str) -> tuple[int, str, str]:
        p = await asyncio.create_subprocess_exec(*SWARMCTL, *args, env=dict(os.environ, SWARM_SOCKET=sock),
                                                 stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        out, err = await asyncio.wait_for(p.communicate(), 120)
        return p.returncode or 0, out.decode(), err.decode()

    async def main() -> None:
        async with served(tmp_path) as s:
            await s.store.update(fill)
            size = sum(t.ByteSize() for t in s.store.sm.list("task"))
            assert size > 5 * 1024 * 1024, size  # past the 4 MB default of a gRPC client
            code, out, err = await swarmctl(s.socket, "task", "ls", "-q")
            assert code == 0, err
            assert len(out.split()) == TASKS
            code, out, err = await swarmctl(s.socket, "service", "ls")
            assert code == 0, err
            assert f"{TASKS}/{TASKS}" in out.splitlines()[1], out

    asyncio.run(main())
