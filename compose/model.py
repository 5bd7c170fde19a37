"""The typed model of a loaded stack (after interpolation, validation and merging of all files).

Every object keeps ``loc`` (where it was declared) and ``locs`` (where each of its keys was written,
by field name) so later checks (conversion, cross references) can point at the file and line.
Optional fields are None when the file does not set them; merging relies on that.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from shoal.compose.errors import Loc

NOWHERE = Loc("<unknown>", 0)


@dataclass
class Located:
    loc: Loc = field(default=NOWHERE, repr=False, compare=False, kw_only=True)
    locs: dict[str, Loc] = field(default_factory=dict, repr=False, compare=False, kw_only=True)

    def where(self, key: str) -> Loc:
        return self.locs.get(key, self.loc)


@dataclass
class Port(Located):
    target: int
    published: int | None = None    # None/0 = allocate
    protocol: str = "tcp"             # tcp | udp | sctp
    mode: str = "ingress"             # ingress | host
    name: str = ""
    host_ip: str = ""


@dataclass
class BindOpts(Located):
    propagation: str | None = None
    create_host_path: bool | None = None
    selinux: str | None = None


@dataclass
class VolumeOpts(Located):
    nocopy: bool | None = None
    subpath: str | None = None


@dataclass
class TmpfsOpts(Located):
    size: int | None = None
    mode: int | None = None


@dataclass
class ServiceVolume(Located):
    type: str                         # volume | bind | tmpfs
    target: str
    source: str = ""
    read_only: bool = False
    bind: BindOpts | None = None
    volume: VolumeOpts | None = None
    tmpfs: TmpfsOpts | None = None
    consistency: str | None = None


@dataclass
class FileRef(Located):
    """A service's use of a secret or config."""

    source: str
    target: str | None = None
    uid: str | None = None
    gid: str | None = None
    mode: int | None = None


@dataclass
class ServiceNetwork(Located):
    aliases: list[str] = field(default_factory=list)
    driver_opts: dict[str, str] = field(default_factory=dict)


@dataclass
class Healthcheck(Located):
    test: list[str] | None = None
    interval: int | None = None       # nanoseconds
    timeout: int | None = None
    retries: int | None = None
    start_period: int | None = None
    start_interval: int | None = None
    disable: bool | None = None


@dataclass
class Logging(Located):
    driver: str | None = None
    options: dict[str, str] = field(default_factory=dict)


@dataclass
class Ulimit(Located):
    soft: int
    hard: int
    single: bool = False              # written as one number


@dataclass
class GenericResource(Located):
    kind: str
    value: int


@dataclass
class ResourceSet(Located):
    cpus: int | None = None           # nano CPUs
    memory: int | None = None         # bytes
    pids: int | None = None
    generic_resources: list[GenericResource] = field(default_factory=list)


@dataclass
class Resources(Located):
    limits: ResourceSet | None = None
    reservations: ResourceSet | None = None


@dataclass
class RestartPolicy(Located):
    condition: str | None = None      # none | on-failure | any
    delay: int | None = None
    max_attempts: int | None = None
    window: int | None = None


@dataclass
class UpdateConfig(Located):
    parallelism: int | None = None
    delay: int | None = None
    failure_action: str | None = None  # pause | continue | rollback
    monitor: int | None = None
    max_failure_ratio: float | None = None
    order: str | None = None           # stop-first | start-first


@dataclass
class Placement(Located):
    constraints: list[str] = field(default_factory=list)
    preferences: list[str] = field(default_factory=list)   # spread descriptors
    max_replicas_per_node: int | None = None


@dataclass
class Deploy(Located):
    mode: str | None = None            # replicated | global
    replicas: int | None = None
    endpoint_mode: str | None = None   # vip | dnsrr
    labels: dict[str, str] = field(default_factory=dict)
    placement: Placement | None = None
    resources: Resources | None = None
    restart_policy: RestartPolicy | None = None
    update_config: UpdateConfig | None = None
    rollback_config: UpdateConfig | None = None


@dataclass
class Service(Located):
    name: str
    image: str | None = None
    command: list[str] | None = None
    entrypoint: list[str] | None = None
    environment: dict[str, str | None] = field(default_factory=dict)
    user: str | None = None
    working_dir: str | None = None
    hostname: str | None = None
    healthcheck: Healthcheck | None = None
    stop_grace_period: int | None = None
    stop_signal: str | None = None
    tmpfs: list[str] = field(default_factory=list)
    cap_add: list[str] = field(default_factory=list)
    cap_drop: list[str] = field(default_factory=list)
    sysctls: dict[str, str] = field(default_factory=dict)
    ulimits: dict[str, Ulimit] = field(default_factory=dict)
    dns: list[str] = field(default_factory=list)
    dns_search: list[str] = field(default_factory=list)
    dns_opt: list[str] = field(default_factory=list)
    extra_hosts: list[str] = field(default_factory=list)     # "host:ip"
    group_add: list[str] = field(default_factory=list)
    init: bool | None = None
    read_only: bool | None = None
    tty: bool | None = None
    stdin_open: bool | None = None
    labels: dict[str, str] = field(default_factory=dict)
    logging: Logging | None = None
    ports: list[Port] = field(default_factory=list)
    volumes: list[ServiceVolume] = field(default_factory=list)
    secrets: list[FileRef] = field(default_factory=list)
    configs: list[FileRef] = field(default_factory=list)
    networks: dict[str, ServiceNetwork | None] | None = None
    deploy: Deploy | None = None
    depends_on: list[str] = field(default_factory=list)      # read, ignored by swarm (as Docker)
    restart: str | None = None       # ignored option, but Docker falls back on it without restart_policy
    build: dict[str, Any] | None = None                      # kept only to explain a missing image
    extensions: dict[str, Any] = field(default_factory=dict)


@dataclass
class IpamConfig(Located):
    subnet: str | None = None
    ip_range: str | None = None
    gateway: str | None = None


@dataclass
class Ipam(Located):
    driver: str | None = None
    config: list[IpamConfig] = field(default_factory=list)


@dataclass
class Network(Located):
    name: str | None = None
    driver: str | None = None
    driver_opts: dict[str, str] = field(default_factory=dict)
    external: bool = False
    internal: bool | None = None
    attachable: bool | None = None
    ipam: Ipam | None = None
    labels: dict[str, str] = field(default_factory=dict)
    extensions: dict[str, Any] = field(default_factory=dict)


@dataclass
class Volume(Located):
    name: str | None = None
    driver: str | None = None
    driver_opts: dict[str, str] = field(default_factory=dict)
    external: bool = False
    labels: dict[str, str] = field(default_factory=dict)
    extensions: dict[str, Any] = field(default_factory=dict)


@dataclass
class FileObject(Located):
    """A top-level secret or config."""

    name: str | None = None
    file: str | None = None            # absolute path (resolved against the working dir)
    environment: str | None = None     # take the data from this variable
    content: str | None = None         # inline data (configs only)
    external: bool = False
    labels: dict[str, str] = field(default_factory=dict)
    extensions: dict[str, Any] = field(default_factory=dict)


@dataclass
class Project(Located):
    """Everything read from the stack file(s)."""

    working_dir: str
    files: list[str]
    environment: dict[str, str]
    services: dict[str, Service] = field(default_factory=dict)
    networks: dict[str, Network] = field(default_factory=dict)
    volumes: dict[str, Volume] = field(default_factory=dict)
    secrets: dict[str, FileObject] = field(default_factory=dict)
    configs: dict[str, FileObject] = field(default_factory=dict)
    name: str | None = None
    version: str | None = None
    extensions: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
