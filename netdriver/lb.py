"""Load balancing on a node, on nftables: service VIPs, the ingress routing mesh, host-mode
published ports. This is where a VIP is programmed.

Tables (each rewritten as a whole in one nft transaction; existing connections keep their
conntrack NAT mapping, so connections to live backends survive backend changes):

* `ip shoal` in each container: the VIPs of its networks' services (output-hook nat,
  `numgen inc` round robin over the backends; a VIP without backends is rejected at once);
* `ip shoal` in the host namespace: published ports (`fib daddr type local` DNAT in prerouting and
  output, so every address of the node answers, 127.0.0.1 included; host mode -> the task's
  gateway-bridge address, ingress -> the ingress sandbox's gateway address, same port), egress
  masquerade of the gateway bridge's subnet, a hairpin masquerade for containers reaching their
  own node's published ports, and the loopback path (below);
* `ip shoal` in the ingress sandbox: published port -> backend task IP:target port over the
  ingress network (round robin), masqueraded.

Loopback (`curl 127.0.0.1:8080` on a node), as Docker without its userland proxy: a connection
from 127.0.0.1 DNATed to a gateway-bridge address needs `route_localnet` on the gateway bridge
(the kernel otherwise refuses a 127/8 source or destination on a non-loopback link, both ways) and
a masquerade of the 127/8 source to the bridge's address (the task cannot answer 127.0.0.1). The
sysctl is set on our bridge only, while the node has a published port, and set back when the last
one goes. What route_localnet would open besides (kube-proxy's CVE-2020-8558, moby#41872: a
neighbour or a container sending a crafted packet to 127.0.0.1 reaching the node's loopback
services or a published port) is closed by a raw-priority prerouting drop of any packet for 127/8
that did not come in on `lo`.

The overlay driver (shoal.netdriver.overlay.driver) keeps the state (which services, which
ports, which containers) under its lock and calls these functions to write it.
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import os
import socket
from collections.abc import Iterable, Mapping, Sequence

from shoal.netdriver import nft
from shoal.netdriver.netns import netns_socket
from shoal.netdriver.overlay.model import Endpoint, OverlayError, PortConflictError, Published, VipService

log = logging.getLogger(__name__)

TABLE = "shoal"
INGRESS_OWNER = "ingress"  # Published.owner of ports of the routing mesh
LOOPBACK_NET = "127.0.0.0/8"

Ports = Mapping[tuple[str, int], Published]  # (protocol, published port) -> what it goes to


# ---- service VIPs in containers ---------------------------------------------------------------------
def check_service_ports(ports: Sequence[tuple[str, int]]) -> None:
    for proto, _ in ports:
        if proto not in ("tcp", "udp"):
            raise OverlayError(f"service port protocol {proto!r} is not supported; use tcp or udp")


def vip_table(services: Iterable[tuple[str, VipService]]) -> str:
    """The body of a container's VIP table for the (vip, service) pairs of its networks; "" when
    it needs none."""
    nat: list[str] = []
    flt: list[str] = []
    for vip, svc in services:
        if not svc.backends:
            flt.append(f"ip daddr {vip} meta l4proto tcp reject with tcp reset")
            flt.append(f"ip daddr {vip} reject")
            continue
        target = numgen(svc.backends, None)
        if not svc.ports:
            nat.append(f"ip daddr {vip} dnat to {target}")
        for proto in ("tcp", "udp"):
            pl = sorted({p for pr, p in svc.ports if pr == proto})
            if pl:
                nat.append(f"ip daddr {vip} {proto} dport {{ {', '.join(map(str, pl))} }} dnat to {target}")
    if not nat and not flt:
        return ""
    return ("  chain vip { type nat hook output priority -100; policy accept;\n"
            + "".join(f"    {r}\n" for r in nat) + "  }\n"
            "  chain novip { type filter hook output priority 0; policy accept;\n"
            + "".join(f"    {r}\n" for r in flt) + "  }")


def apply_container_table(ep: Endpoint) -> None:
    """Write ep.nft_want into the container (nothing when it already holds it, or is gone)."""
    want = ep.nft_want
    if ep.gone or ep.netns is None or want is None:
        return
    if not want:
        if ep.nft:
            nft.delete_table(ep.netns, "ip", TABLE)
            ep.nft, ep.nft_body = False, None
        return
    if ep.nft and ep.nft_body == want:
        return
    ep.nft, ep.nft_body = True, None
    nft.replace_table(ep.netns, "ip", TABLE, want)
    ep.nft_body = want


def drop_container_table(ep: Endpoint, node_id: str) -> None:
    """The endpoint is torn down: remove its VIP table (a failure is logged) and write no more."""
    ep.gone = True
    if ep.nft and ep.netns and os.path.exists(ep.netns):
        try:
            nft.delete_table(ep.netns, "ip", TABLE)
        except nft.NftError as e:
            log.warning("overlay node=%s task=%s nft cleanup failed: %s", node_id, ep.task_id, e)


# ---- published ports ------------------------------------------------------------------------------
def check_port(ports: Ports, host_netns: str | None, proto: str, port: int, owner: str) -> None:
    """Refuse a published port another owner holds here, or a program has bound."""
    if proto not in ("tcp", "udp"):
        raise OverlayError(f"published port protocol {proto!r} is not supported; use tcp or udp")
    if not 1 <= port <= 65535:
        raise OverlayError(f"published_port {port} is out of range; use 1-65535")
    cur = ports.get((proto, port))
    if cur is not None and cur.owner != owner:
        who = "the ingress routing mesh" if cur.owner == INGRESS_OWNER else f"task {cur.owner}"
        raise PortConflictError(
            f"published_port {port}/{proto} is already in use on this node by {who}; "
            "choose another published_port")
    if cur is None and port_bound(host_netns, proto, port):
        raise PortConflictError(
            f"published_port {port}/{proto} is already bound by a program on this node; "
            "stop that program or choose another published_port")


def port_bound(host_netns: str | None, proto: str, port: int) -> bool:
    kind = socket.SOCK_STREAM if proto == "tcp" else socket.SOCK_DGRAM
    s = netns_socket(host_netns, socket.AF_INET, kind)
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("0.0.0.0", port))
    except OSError as e:
        if e.errno == errno.EADDRINUSE:
            return True
        raise
    finally:
        s.close()
    return False


def write_host_table(host_netns: str | None, ports: Ports, ingress_gw_ip: str | None,
                     gw_net: ipaddress.IPv4Network, gw_bridge: str) -> bool:
    """The host namespace's table: published ports, egress masquerade, hairpin, loopback guard.
    Returns whether it holds a published port (then set_route_localnet(on=True))."""
    rules = []
    for (proto, port), p in sorted(ports.items()):
        if p.owner == INGRESS_OWNER:
            if ingress_gw_ip is None:
                continue
            rules.append(f"fib daddr type local {proto} dport {port} dnat to {ingress_gw_ip}:{port}"
                         f' comment "ingress {proto} {port} {p.target}"')
        else:
            rules.append(f"fib daddr type local {proto} dport {port} dnat to {p.target}"
                         f' comment "{p.owner} {proto} {port} {p.target}"')
    r = "".join(f"    {x}\n" for x in rules)
    # from the node's own 127.0.0.1 to a published port: the task answers the bridge's address
    loopback = (f"    ip saddr {LOOPBACK_NET} oifname \"{gw_bridge}\" ct status dnat masquerade\n"
                if rules else "")
    body = (
        # before conntrack and NAT: nothing for 127/8 comes in from a link (see the module doc)
        "  chain guard { type filter hook prerouting priority -300; policy accept;\n"
        f"    iifname != \"lo\" ip daddr {LOOPBACK_NET} drop\n  }}\n"
        f"  chain pre {{ type nat hook prerouting priority -100; policy accept;\n{r}  }}\n"
        f"  chain out {{ type nat hook output priority -100; policy accept;\n{r}  }}\n"
        "  chain post { type nat hook postrouting priority 100; policy accept;\n"
        f"    ip saddr {gw_net} oifname != \"{gw_bridge}\" masquerade\n"
        # hairpin: a container reaching a port published on its own node comes back through
        # the bridge; without this the answer would bypass the DNAT and be dropped
        f"    ip saddr {gw_net} oifname \"{gw_bridge}\" ct status dnat masquerade\n{loopback}  }}")
    nft.replace_table(host_netns, "ip", TABLE, body)
    return bool(rules)


def set_route_localnet(host_netns: str | None, gw_bridge: str, on: bool) -> None:
    """Let 127.0.0.1 reach published ports through the gateway bridge (on), or not (off). Only
    the bridge's own setting: never `all`, never another link. Call it after write_host_table()
    (whose guard chain must be in place before it is turned on)."""
    nft.set_sysctl(host_netns, f"net.ipv4.conf.{gw_bridge}.route_localnet", "1" if on else "0")


def read_host_ports(host_netns: str | None) -> dict[tuple[str, int], Published]:
    """The published ports an earlier run wrote in the host table (from the rules' comments;
    ingress ports come back without backends: those are re-sent)."""
    out = {}
    for comment in nft.rule_comments(host_netns, "ip", TABLE, "pre"):
        owner, proto, port, target = comment.split()
        out[(proto, int(port))] = Published(owner, target)
    return out


def write_ingress_table(sandbox_path: str, ports: Ports, ifname: str) -> None:
    """The ingress sandbox's table: each ingress port to its backends over the ingress network."""
    rules = []
    for (proto, port), p in sorted(ports.items()):
        if p.owner == INGRESS_OWNER and p.backends:
            rules.append(f"{proto} dport {port} dnat ip to {numgen(p.backends, int(p.target))}")
    r = "".join(f"    {x}\n" for x in rules)
    body = (
        f"  chain pre {{ type nat hook prerouting priority -100; policy accept;\n{r}  }}\n"
        "  chain post { type nat hook postrouting priority 100; policy accept;\n"
        f"    ct status dnat oifname \"{ifname}\" masquerade\n  }}")
    nft.replace_table(sandbox_path, "ip", TABLE, body)


def delete_host_table(host_netns: str | None) -> None:
    nft.delete_table(host_netns, "ip", TABLE)


def numgen(backends: Sequence[str], port: int | None) -> str:
    """The DNAT target spreading over the backends round robin (one backend: itself)."""
    items = ", ".join(f"{i} : {b}" + (f" . {port}" if port is not None else "") for i, b in enumerate(backends))
    if len(backends) == 1 and port is None:
        return backends[0]
    if len(backends) == 1:
        return f"{backends[0]}:{port}"
    return f"numgen inc mod {len(backends)} map {{ {items} }}"
