"""The records of the engine's container API: what `Engine.create` takes and what it reports.

`NetworkSetup` is the one record of a container's networking: the node's network agent
(`shoal.agent.network.NetworkAgent.prepare`) returns it, the worker hands it on unchanged, and it
travels inside `ContainerConfig` to the bundle. It lives here, in the engine, because the engine
must not import the network side; the network side may import the engine.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime

from shoal.agent.engine.health import HealthState
from shoal.proto import types_pb2


@dataclass
class NetworkSetup:
    """What a container joins. The default is a namespace of its own with loopback only."""

    netns_path: str | None = None  # join this netns; None = new netns with only loopback
    resolv_conf: str | None = None  # whole /etc/resolv.conf; None = from dns_config or the host
    extra_hosts: list[str] = field(default_factory=list)  # "IP name..." lines for /etc/hosts
    addresses: list[str] = field(default_factory=list)  # CIDRs of its interfaces (one per network)


@dataclass
class ContainerConfig:
    """One container to create. The caller has checked its preconditions: `spec.image` is set, and
    every secret and config `spec` refers to has its data in `secrets` / `configs`."""

    id: str  # the task id (letters, digits, _ . -)
    name: str  # e.g. web.1.<taskid>
    spec: types_pb2.ContainerSpec
    resources: types_pb2.ResourceRequirements | None = None
    network: NetworkSetup = field(default_factory=NetworkSetup)
    secrets: dict[str, bytes] = field(default_factory=dict)  # secret_id -> data
    configs: dict[str, bytes] = field(default_factory=dict)  # config_id -> data
    labels: dict[str, str] = field(default_factory=dict)


@dataclass
class ExitStatus:
    exit_code: int
    oom_killed: bool
    finished_at: datetime | None
    reason: str = ""  # "OOMKilled" | "Completed" | "Error" | "Lost"


@dataclass
class ContainerState:
    id: str
    name: str
    status: str  # created | running | exited
    pid: int
    image: str
    image_id: str
    labels: dict[str, str]
    created_at: datetime | None
    started_at: datetime | None
    exit: ExitStatus | None = None
    health: HealthState | None = None  # None when the container has no health check

    @property
    def health_status(self) -> str | None:
        return self.health.status if self.health else None
