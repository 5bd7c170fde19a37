"""Scheduler filters: what a node offers (`NodeInfo`), what a group of pending tasks needs (`Group`), and
why a node cannot take one (`static_reason`: readiness, platform, constraints, networks and what they
need of the node (their driver; IPsec ESP for an encrypted network) -- the same for every task of the
group; `dynamic_reason`: resources, max replicas per node, host ports -- changes as tasks are placed),
summed up for a pending task's message by `explain`."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field

from shoal.manager.keymanager import is_encrypted
from shoal.manager.scheduler.constraint import Constraint, first_unmet, normalize_arch
from shoal.proto import objects_pb2, types_pb2

READY = types_pb2.NodeStatus.READY
BUILTIN_NET_DRIVERS = frozenset({"", "overlay"})
# Nodes that can attach other network drivers list them (comma-separated) in this engine label.
NET_DRIVERS_LABEL = "shoal.network.drivers"
# What an agent lists in description.capabilities when its kernel does IPsec ESP with AES-GCM.
IPSEC_CAPABILITY = "ipsec-esp"


@dataclass(slots=True)
class NodeInfo:
    id: str
    node: objects_pb2.Node
    index: int
    usable: bool = False
    cpu: int = 0
    mem: int = 0
    generic: dict[str, int] = field(default_factory=dict)
    res_cpu: int = 0
    res_mem: int = 0
    res_generic: Counter[str] = field(default_factory=Counter)
    total: int = 0  # tasks that should run here
    by_service: Counter[str] = field(default_factory=Counter)
    ports: Counter[tuple[int, int]] = field(default_factory=Counter)
    ghost: bool = False  # tasks point at a node the store no longer has

    def refresh(self, node: objects_pb2.Node) -> None:
        self.node = node
        self.ghost = False
        self.usable = node.status.state == READY and node.spec.availability == types_pb2.ACTIVE
        r = node.description.resources
        self.cpu = r.nano_cpus
        self.mem = r.memory_bytes
        self.generic = {g.kind: g.value for g in r.generic}


def host_ports(t: objects_pb2.Task) -> tuple[tuple[int, int], ...]:
    ports = t.endpoint.ports or t.endpoint.spec.ports
    if not ports:
        return ()
    return tuple(
        (p.protocol, p.published_port)
        for p in ports
        if p.publish_mode == types_pb2.PortConfig.HOST and p.published_port
    )


def network_ids(t: objects_pb2.Task) -> list[str]:
    if t.networks:
        return [a.network.id for a in t.networks if a.network.id]
    return [n.target for n in t.spec.networks]


@dataclass
class Group:
    """Pending tasks that share a service and spec: one filter pass, one placement heap."""

    service_id: str
    tasks: list[objects_pb2.Task]
    constraints: list[Constraint]
    cpu: int
    mem: int
    generic: tuple[tuple[str, int], ...]
    ports: tuple[tuple[int, int], ...]
    max_replicas: int
    platforms: list[tuple[str, str]]
    networks: list[objects_pb2.Network | None]
    spreads: list[str]


def static_reason(g: Group, info: NodeInfo) -> str | None:
    """Why the node can never take a task of the group as things stand (None: it can)."""
    node = info.node
    if not info.usable:
        if node.spec.availability == types_pb2.DRAIN:
            return "node drained"
        if node.spec.availability == types_pb2.PAUSE:
            return "node paused"
        return "node not ready"
    if g.platforms:
        nos = node.description.platform.os.lower()
        narch = normalize_arch(node.description.platform.architecture)
        if not any((not o or o == nos) and (not a or a == narch) for o, a in g.platforms):
            return f"platform {nos or '?'}/{narch or '?'} not supported"
    if g.constraints:
        c = first_unmet(g.constraints, node)
        if c is not None:
            return f"constraint {c} not met"
    for net in g.networks:
        if net is None or net.pending_delete:
            return "network not available"
        drv = net.spec.driver_config.name
        if drv not in BUILTIN_NET_DRIVERS:
            have = node.description.engine.labels.get(NET_DRIVERS_LABEL, "")
            if drv not in {d.strip() for d in have.split(",")}:
                return f"network driver {drv} not available"
        if is_encrypted(net) and IPSEC_CAPABILITY not in node.description.capabilities:
            return (
                f"encrypted network {net.spec.annotations.name or net.id} needs IPsec ESP with AES-GCM in the "
                "node's kernel (CONFIG_INET_ESP, CONFIG_CRYPTO_GCM)"
            )
    return None


def dynamic_reason(g: Group, info: NodeInfo) -> str | None:
    """Why the node cannot take one more task of the group now: resources, max replicas, host ports."""
    if g.cpu and info.cpu - info.res_cpu < g.cpu:
        return "insufficient cpu"
    if g.mem and info.mem - info.res_mem < g.mem:
        return "insufficient memory"
    for k, v in g.generic:
        if info.generic.get(k, 0) - info.res_generic.get(k, 0) < v:
            return f"insufficient generic resource {k}"
    if g.max_replicas and info.by_service.get(g.service_id, 0) >= g.max_replicas:
        return f"max replicas per node ({g.max_replicas}) reached"
    for p in g.ports:
        if p in info.ports:
            proto = types_pb2.PortConfig.Protocol.Name(p[0]).lower()
            return f"host port {p[1]}/{proto} already in use"
    return None


def explain(g: Group, nodes: Iterable[NodeInfo]) -> str:
    """The pending message: per node the first filter that fails, summed up, most frequent first."""
    reasons: Counter[str] = Counter()
    order: dict[str, int] = {}
    for info in nodes:
        if info.ghost:
            continue
        r = static_reason(g, info) or dynamic_reason(g, info) or "no capacity left in this pass"
        reasons[r] += 1
        order.setdefault(r, len(order))
    if not reasons:
        return "no suitable node (no nodes in the cluster)"
    ranked = sorted(reasons.items(), key=lambda x: (-x[1], order[x[0]]))
    parts = [f"{r} on {n} node{'s' if n != 1 else ''}" for r, n in ranked]
    return f"no suitable node ({'; '.join(parts)})"
