"""Restore: what an earlier run of the driver (same ns_prefix) left in the kernel, read back into
records -- network sandboxes (from br0's ifalias) with their peers (FDB/neighbour entries), the
task ports on the sandboxes and on the gateway bridge, the published ports of the host table.
Reading only, except that a sandbox without metadata is removed."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from shoal.netdriver import lb
from shoal.netdriver.overlay import gateway, peers, sandbox
from shoal.netdriver.overlay.model import Endpoint, Network, Published

log = logging.getLogger(__name__)


@dataclass
class Found:
    networks: dict[str, Network] = field(default_factory=dict)
    endpoints: dict[str, Endpoint] = field(default_factory=dict)  # task id -> its links, gateway port
    gw_alloc: dict[str, str] = field(default_factory=dict)  # gateway address -> task id
    host_ports: dict[tuple[str, int], Published] = field(default_factory=dict)
    tasks: set[str] = field(default_factory=set)  # tasks with interfaces here (ingress sandbox included)


def scan_kernel(prefix: str, host_netns: str | None, gw_bridge: str, node_id: str) -> Found:
    found = Found()
    ingress_sbox = sandbox.ingress_sandbox_name(prefix)
    for name in sandbox.owned_netns(prefix):
        if name == ingress_sbox:
            continue
        meta, mtu, ports = sandbox.scan(name)
        n = sandbox.from_metadata(meta, name, mtu or 0)
        if n is None:
            log.warning("overlay node=%s sandbox=%s has no metadata; removing it", node_id, name)
            sandbox.destroy(name, host_netns)
            continue
        for task, link in ports:
            found.tasks.add(task)
            found.endpoints.setdefault(task, Endpoint(task_id=task, netns=None)).links.append((n.id, link))
        found.networks[n.id] = n
        fdb, neigh = peers.entries(n.sandbox)
        vtep_of = dict(fdb)
        for ip, mac in neigh:
            if mac in vtep_of:
                n.peers[ip] = (mac, vtep_of[mac])
    for task, ip, link in gateway.ports(host_netns, gw_bridge):
        found.gw_alloc[ip] = task
        found.tasks.add(task)
        ep = found.endpoints.setdefault(task, Endpoint(task_id=task, netns=None))
        ep.gw_ip, ep.gw_link = ip, link
    # published ports, from the comments of the host table (ingress backends are re-sent)
    found.host_ports = lb.read_host_ports(host_netns)
    return found
