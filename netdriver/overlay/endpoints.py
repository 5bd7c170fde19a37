"""A task's interfaces: per network a veth `ve<hash>` (a port of the sandbox's br0, ifalias = task id)
<-> `ethN` in the container with the attachment's address, MAC (02:42:<ip> when empty) and the
overlay MTU; the gateway interface comes from shoal.netdriver.overlay.gateway."""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Mapping, Sequence

from pyroute2.netlink.exceptions import NetlinkError

from shoal.netdriver.driverapi import Interface
from shoal.netdriver.netns import add_veth, del_link, link_index, list_netns, netlink, ns_path
from shoal.netdriver.overlay.model import Endpoint, Network, link_hash, mac_from_ip
from shoal.netdriver.overlay.sandbox import sandbox_name
from shoal.proto import objects_pb2


def free_ifnames(path: str) -> list[str]:
    """eth0, eth1 … not yet used in the container (enough for any task)."""
    with netlink(path) as c:
        used = {link.get_attr("IFLA_IFNAME") for link in c.get_links()}
    return [f"eth{i}" for i in range(1000) if f"eth{i}" not in used]


def sandbox_end(task_id: str, network_id: str) -> str:
    """The name of the task's veth end in the network's sandbox."""
    return f"ve{link_hash(task_id, network_id)}"


def add_network_port(task_id: str, n: Network, container_path: str) -> str:
    """The task's veth pair on the network's br0 (the sandbox end is sandbox_end()); returns the
    container end's temporary name."""
    sb_end, c_end = sandbox_end(task_id, n.id), f"vc{link_hash(task_id, n.id)}"
    with netlink(ns_path(n.sandbox)) as s:
        del_link(s, sb_end)
        add_veth(s, sb_end, c_end, container_path)
        s.link("set", index=link_index(s, sb_end), mtu=n.mtu, master=link_index(s, "br0"),
               ifalias=task_id, state="up")
    return c_end


def setup_container_if(path: str, tmp: str, ifname: str, cidr: str, mac: str, mtu: int) -> None:
    """Rename the container end `tmp` to ifname with its address, MAC and MTU, and bring it up."""
    iface = ipaddress.ip_interface(cidr)
    with netlink(path) as c:
        c.link("set", index=link_index(c, "lo"), state="up")
        idx = link_index(c, tmp)
        c.link("set", index=idx, ifname=ifname, address=mac, mtu=mtu)
        c.addr("add", index=idx, address=str(iface.ip), prefixlen=iface.network.prefixlen)
        c.link("set", index=idx, state="up")


def set_default_route(path: str, gateway: str) -> None:
    with netlink(path) as c:
        c.route("replace", dst="0.0.0.0/0", gateway=gateway)


def still_there(ep: Endpoint) -> bool:
    """Are all of the endpoint's interfaces still in its container?"""
    try:
        with netlink(ep.netns) as ipr:
            return all(link_index(ipr, i.ifname) is not None for i in ep.interfaces)
    except (OSError, NetlinkError):
        return False


def adopt(ep: Endpoint, path: str, attachments: Sequence[objects_pb2.NetworkAttachment],
          nets: Mapping[str, Network], gw_prefixlen: int) -> list[Interface] | None:
    """Take over interfaces an earlier run built (ep as restore() found it), if they are all still
    in place in the container at path; None when anything differs (then the caller rebuilds)."""
    if not os.path.exists(path):
        return None
    try:
        with netlink(path) as c:
            by_mac = {link.get_attr("IFLA_ADDRESS"): link for link in c.get_links()}
            addrs = {(a["index"], a.get_attr("IFA_ADDRESS")) for a in c.get_addr(family=2)}
        ifaces: list[Interface] = []
        links: list[tuple[str, str]] = []
        egress = False
        for att in attachments:
            n = nets.get(att.network.id)
            if n is None or not att.addresses:
                return None
            iface = ipaddress.ip_interface(att.addresses[0])
            mac = att.mac or mac_from_ip(str(iface.ip))
            link = by_mac.get(mac)
            sb_end = sandbox_end(ep.task_id, n.id)
            if link is None or (link["index"], str(iface.ip)) not in addrs or (n.id, sb_end) not in ep.links:
                return None
            ifaces.append(Interface(n.id, link.get_attr("IFLA_IFNAME"),
                                    f"{iface.ip}/{n.subnet.prefixlen}", mac, link.get_attr("IFLA_MTU")))
            links.append((n.id, sb_end))
            egress = egress or not n.internal
        if egress:
            link = by_mac.get(mac_from_ip(ep.gw_ip)) if ep.gw_ip else None
            if link is None:
                return None
            ifaces.append(Interface("", link.get_attr("IFLA_IFNAME"), f"{ep.gw_ip}/{gw_prefixlen}",
                                    mac_from_ip(ep.gw_ip), link.get_attr("IFLA_MTU")))
    except (OSError, NetlinkError):
        return None
    if set(links) != set(ep.links):
        return None
    ep.netns, ep.interfaces, ep.links = path, ifaces, links
    # the container's VIP table stays as it is until set_service_backends() brings news
    return list(ifaces)


def remove_network_ports(ep: Endpoint, prefix: str) -> None:
    """Delete the endpoint's veths in the network sandboxes (their container ends go with them)."""
    for nid, link in ep.links:
        sb = sandbox_name(prefix, nid)
        if sb in list_netns():
            with netlink(ns_path(sb)) as s:
                del_link(s, link)
