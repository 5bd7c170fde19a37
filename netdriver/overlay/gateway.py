"""The gateway bridge: egress of overlay tasks to the outside world, as Docker's docker_gwbridge.

Bridge `shoal_gwbridge` in the host namespace holds the first address of gw_subnet; each task on a
non-internal network gets a veth `gw<hash>` (a port of the bridge, ifalias "<task id> <address>",
which restore reads back) <-> `ethN` in its container, and a default route through the bridge.
The host table's masquerade (shoal.netdriver.lb) lets the traffic out."""

from __future__ import annotations

import ipaddress

from shoal.netdriver import nft
from shoal.netdriver.netns import add_veth, del_link, link_index, netlink
from shoal.netdriver.overlay.model import OverlayError, link_hash


def exists(host_netns: str | None, bridge: str) -> bool:
    with netlink(host_netns) as h:
        return link_index(h, bridge) is not None


def ensure_bridge(host_netns: str | None, bridge: str, net: ipaddress.IPv4Network, gateway: str, *,
                  checked: bool) -> bool:
    """Create or repair the bridge with its address, and turn forwarding on. Returns False (and
    does nothing) when the bridge exists and checked says this run already did it."""
    with netlink(host_netns) as h:
        br = link_index(h, bridge)
        if br is not None and checked:
            return False
        if br is None:
            h.link("add", ifname=bridge, kind="bridge", br_stp_state=0, br_forward_delay=0)
            br = link_index(h, bridge)
        have = {a.get_attr("IFA_ADDRESS") for a in h.get_addr(index=br, family=2)}
        if gateway not in have:
            h.addr("add", index=br, address=gateway, prefixlen=net.prefixlen)
        h.link("set", index=br, state="up")
    nft.set_sysctl(host_netns, "net.ipv4.ip_forward", "1")
    return True


def alloc_ip(net: ipaddress.IPv4Network, gateway: str, allocated: dict[str, str], task_id: str) -> str:
    """The first free address of net for the task, recorded in allocated (address -> task id)."""
    for ip in net.hosts():
        s = str(ip)
        if s != gateway and s not in allocated:
            allocated[s] = task_id
            return s
    raise OverlayError(f"gw_subnet {net} has no free address left; configure a larger gw_subnet")


def port_name(task_id: str) -> str:
    """The name of the task's veth end on the bridge."""
    return f"gw{link_hash(task_id, 'gw')}"


def add_port(host_netns: str | None, bridge: str, task_id: str, ip: str, container_path: str,
             mtu: int) -> str:
    """The task's veth pair on the bridge (the host end is port_name()); returns the container
    end's temporary name."""
    host_end, c_end = port_name(task_id), f"gc{link_hash(task_id, 'gw')}"
    with netlink(host_netns) as hr:
        del_link(hr, host_end)
        add_veth(hr, host_end, c_end, container_path)
        hr.link("set", index=link_index(hr, host_end), mtu=mtu,
                master=link_index(hr, bridge), ifalias=f"{task_id} {ip}", state="up")
    return c_end


def ports(host_netns: str | None, bridge: str) -> list[tuple[str, str, str]]:
    """The task ports on the bridge an earlier run left: (task id, address, host end)."""
    out = []
    with netlink(host_netns) as h:
        br = link_index(h, bridge)
        links = h.get_links() if br is not None else []
        for link in links:
            if link.get_attr("IFLA_MASTER") == br and (alias := link.get_attr("IFLA_IFALIAS")):
                task, _, ip = alias.partition(" ")
                out.append((task, ip, link.get_attr("IFLA_IFNAME")))
    return out


def remove_port(host_netns: str | None, host_end: str) -> None:
    with netlink(host_netns) as h:
        del_link(h, host_end)


def sweep(host_netns: str | None, bridge: str) -> None:
    """Remove the bridge, every task port on it and the host's `vx-<vni>` leftovers."""
    with netlink(host_netns) as h:
        for link in h.get_links():
            name = link.get_attr("IFLA_IFNAME")
            if name.startswith("vx-") or (name.startswith("gw") and len(name) == 12
                                          and link.get_attr("IFLA_IFALIAS")):
                del_link(h, name)
        del_link(h, bridge)
