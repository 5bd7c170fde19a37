"""The engine side of a task: where an assigned task enters the engine.

`check_task` is the one check of a task's preconditions (an image is set, its secrets and configs
were sent to this node), made when the task starts preparing; what it lets through the engine
trusts. `container_config` turns the task, the `NetworkSetup` its networking returned and the
secret and config data into the `ContainerConfig` the engine creates. `ContainerEngine` is the
engine as the worker drives it (`shoal.agent.engine.Engine`), and `EngineAdapter` the few calls
the worker makes on it, with the worker's error conventions (a missing container is None or
nothing to do; an unreachable registry falls back to a local image).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import AsyncIterator, Mapping
from datetime import datetime
from typing import Protocol

from shoal.agent import metrics
from shoal.agent.engine import (
    ContainerConfig,
    ContainerNotFound,
    ContainerState,
    ExitStatus,
    Image,
    LogLine,
    NetworkSetup,
    RegistryAuth,
    RegistryUnreachable,
)
from shoal.proto import objects_pb2

log = logging.getLogger("shoal.worker")

LABEL_TASK_ID = "com.docker.swarm.task.id"
LABEL_TASK_NAME = "com.docker.swarm.task.name"
LABEL_SERVICE_ID = "com.docker.swarm.service.id"
LABEL_SERVICE_NAME = "com.docker.swarm.service.name"
LABEL_NODE_ID = "com.docker.swarm.node.id"


class TaskRejected(Exception):
    """The task cannot run here (bad image, registry error, invalid spec): REJECTED with this reason."""


def container_name(task: objects_pb2.Task) -> str:
    """Docker's container name for a task: <service>.<slot or node>.<task id>."""
    return task.annotations.name or task.id


def check_task(
    task: objects_pb2.Task,
    secrets: Mapping[str, objects_pb2.Secret],
    configs: Mapping[str, objects_pb2.Config],
) -> None:
    """TaskRejected, with the sentence the user sees, unless the task has an image and every secret and
    config it refers to is in ``secrets`` / ``configs`` (what the dispatcher sent this node)."""
    c = task.spec.container
    if not c.image:
        raise TaskRejected("image is empty: set the service's image")
    missing = [r.secret_name or r.secret_id for r in c.secrets if r.secret_id not in secrets]
    missing += [r.config_name or r.config_id for r in c.configs if r.config_id not in configs]
    if missing:
        raise TaskRejected(f"secrets/configs {', '.join(missing)} were not sent to this node; check they exist")


def container_config(
    task: objects_pb2.Task,
    network: NetworkSetup,
    secrets: Mapping[str, objects_pb2.Secret],
    configs: Mapping[str, objects_pb2.Config],
    node_id: str,
) -> ContainerConfig:
    """The container of a task that passed `check_task`: named and labelled as Docker's, in ``network``."""
    c = task.spec.container
    labels = dict(c.labels)
    labels.update(
        {
            LABEL_TASK_ID: task.id,
            LABEL_TASK_NAME: container_name(task),
            LABEL_SERVICE_ID: task.service_id,
            LABEL_SERVICE_NAME: task.service_annotations.name,
            LABEL_NODE_ID: node_id,
        }
    )
    return ContainerConfig(
        id=task.id,
        name=container_name(task),
        spec=c,
        resources=task.spec.resources,
        network=network,
        secrets={r.secret_id: secrets[r.secret_id].spec.data for r in c.secrets},
        configs={r.config_id: configs[r.config_id].spec.data for r in c.configs},
        labels=labels,
    )


class ContainerEngine(Protocol):
    """The container engine as the worker drives it (`shoal.agent.engine.Engine`)."""

    async def pull(self, ref: str, auth: RegistryAuth | None = None) -> Image: ...

    async def image(self, name: str) -> Image | None: ...

    async def create(self, cfg: ContainerConfig) -> None: ...

    async def start(self, cid: str) -> None: ...

    async def wait(self, cid: str) -> ExitStatus: ...

    async def stop(self, cid: str, timeout: float | None = None) -> None: ...

    async def remove(self, cid: str) -> None: ...

    async def inspect(self, cid: str) -> ContainerState: ...

    async def list(self) -> list[ContainerState]: ...

    def logs(
        self, cid: str, *, follow: bool = False, tail: int = -1, since: datetime | None = None
    ) -> AsyncIterator[LogLine]: ...


class EngineAdapter:
    """The few engine calls the worker makes, in one place."""

    def __init__(self, engine: ContainerEngine) -> None:
        self.engine = engine

    async def pull(self, task: objects_pb2.Task) -> None:
        """Ask the registry (as Docker does); fall back to a local copy when the registry is unreachable."""
        c = task.spec.container
        auth = RegistryAuth.from_b64(c.pull_options.registry_auth) if c.pull_options.registry_auth else None
        t0 = time.monotonic()
        try:
            await self.engine.pull(c.image, auth)
        except Exception as e:  # a cancelled pull (task removed, agent stopping) is not counted
            metrics.observe_pull(time.monotonic() - t0, ok=False)
            if not isinstance(e, RegistryUnreachable) or await self.engine.image(c.image) is None:
                raise
            log.warning(
                "registry unreachable, using the local image task=%s image=%s err=%s", task.id, c.image, e
            )
        else:
            metrics.observe_pull(time.monotonic() - t0, ok=True)

    async def create(self, cfg: ContainerConfig) -> None:
        try:
            await self.engine.create(cfg)
        except Exception:
            metrics.count_failure("create")
            raise

    async def start(self, cid: str) -> None:
        try:
            await self.engine.start(cid)
        except Exception:
            metrics.count_failure("start")
            raise
        metrics.count_start()

    async def wait(self, cid: str) -> ExitStatus:
        return await self.engine.wait(cid)

    async def stop(self, cid: str, grace: float | None) -> None:
        await self.engine.stop(cid, timeout=grace)

    async def remove(self, cid: str) -> None:
        """Removes the container; one that is not there is nothing to do."""
        with contextlib.suppress(ContainerNotFound):
            await self.engine.remove(cid)

    async def inspect(self, cid: str) -> ContainerState | None:
        """The container's state; None when it is not there."""
        try:
            return await self.engine.inspect(cid)
        except ContainerNotFound:
            return None

    async def list(self) -> list[ContainerState]:
        return list(await self.engine.list())

    def logs(
        self, cid: str, *, follow: bool, tail: int, since: datetime | None
    ) -> AsyncIterator[LogLine]:
        return self.engine.logs(cid, follow=follow, tail=tail, since=since)
