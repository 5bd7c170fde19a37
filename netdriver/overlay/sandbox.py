"""A network's sandbox: the namespace `<prefix>-ov-<network id[:12]>` with bridge br0 (gateway
address, overlay MTU, the network's metadata in its ifalias) and vxlan0 (the VNI, UDP 4789 on the
advertise address, no learning, ARP proxy). vxlan0 is created in the host namespace as
`vx-<vni>` and moved in, so that its UDP socket stays in the host namespace."""

from __future__ import annotations

import contextlib
import errno
import ipaddress
from collections.abc import Iterator

from pyroute2.iproute import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from shoal.netdriver.netns import (
    create_netns,
    del_link,
    link_index,
    list_netns,
    move_link,
    netlink,
    ns_path,
    remove_netns,
)
from shoal.netdriver.overlay.model import VXLAN_PORT, Network, OverlayError


def sandbox_name(prefix: str, network_id: str) -> str:
    return f"{prefix}-ov-{network_id[:12]}"


def ingress_sandbox_name(prefix: str) -> str:
    return f"{prefix}-ingress-sbox"


def owned_netns(prefix: str) -> list[str]:
    """The namespaces a driver with this prefix made: network sandboxes and the ingress sandbox."""
    return [n for n in list_netns() if n.startswith(f"{prefix}-ov-") or n == ingress_sandbox_name(prefix)]


def detect_mtu(host_netns: str | None, advertise_addr: str) -> int:
    """The MTU of the host's link that holds the advertise address (1500 when none does)."""
    with netlink(host_netns) as ipr:
        for a in ipr.get_addr(family=2):
            if a.get_attr("IFA_ADDRESS") == advertise_addr:
                return ipr.get_links(a["index"])[0].get_attr("IFLA_MTU")
    return 1500


def metadata(n: Network) -> str:
    """What br0's ifalias keeps of the network, for restore: id|vni|subnet|gateway|flags."""
    return f"{n.id}|{n.vni}|{n.subnet}|{n.gateway}|{int(n.internal)}{int(n.ingress)}{int(n.encrypted)}"


def from_metadata(meta: str | None, sandbox: str, mtu: int) -> Network | None:
    """The network a sandbox's br0 ifalias describes; None when it holds no metadata."""
    if not meta or meta.count("|") != 4:
        return None
    nid, vni, subnet, gw, flags = meta.split("|")
    return Network(id=nid, vni=int(vni), subnet=ipaddress.ip_network(subnet), gateway=gw,
                   internal=flags[0] == "1", ingress=flags[1] == "1", mtu=mtu, sandbox=sandbox,
                   encrypted=flags[2:3] == "1")


def build(n: Network, created: bool, host_netns: str | None, advertise_addr: str) -> None:
    """Make (created=True: in a new namespace) or repair the sandbox of n. A VXLAN device of
    another VNI in it is replaced. Raises OverlayError when the VNI or UDP 4789 is taken."""
    sb = ns_path(n.sandbox)
    if created:
        create_netns(n.sandbox)
    with netlink(sb) as ipr:
        ipr.link("set", index=link_index(ipr, "lo"), state="up")
        br = link_index(ipr, "br0")
        if br is None:
            ipr.link("add", ifname="br0", kind="bridge", br_stp_state=0, br_forward_delay=0)
            br = link_index(ipr, "br0")
        ipr.link("set", index=br, mtu=n.mtu, ifalias=metadata(n))
        have = {(a.get_attr("IFA_ADDRESS"), a["prefixlen"]) for a in ipr.get_addr(index=br, family=2)}
        if (n.gateway, n.subnet.prefixlen) not in have:
            ipr.addr("add", index=br, address=n.gateway, prefixlen=n.subnet.prefixlen)
        ipr.link("set", index=br, state="up")
        vx = link_index(ipr, "vxlan0")
        if vx is not None and vxlan_vni(ipr, vx) != n.vni:
            ipr.link("del", index=vx)
            vx = None
    if vx is None:
        _add_vxlan(n, sb, host_netns, advertise_addr)


@contextlib.contextmanager
def _refused(code: int, message: str) -> Iterator[None]:
    """A netlink refusal with errno `code` becomes an OverlayError saying `message`; others pass."""
    try:
        yield
    except NetlinkError as e:
        if e.code == code:
            raise OverlayError(message) from e
        raise


def _add_vxlan(n: Network, sb: str, host_netns: str | None, advertise_addr: str) -> None:
    tmp = f"vx-{n.vni}"
    with netlink(host_netns) as h:
        del_link(h, tmp)  # a leftover of a crash between create and move
        with _refused(errno.EEXIST, f"network {n.id}: a VXLAN device with VNI {n.vni} already exists on this "
                      "host; remove the other network or give this one another VNI"):
            h.link("add", ifname=tmp, kind="vxlan", vxlan_id=n.vni, vxlan_port=VXLAN_PORT,
                   vxlan_local=advertise_addr, vxlan_learning=0, vxlan_proxy=1, mtu=n.mtu)
        try:
            move_link(h, link_index(h, tmp), sb)
        except BaseException:
            del_link(h, tmp)
            raise
    with netlink(sb) as ipr:
        vx = link_index(ipr, tmp)
        ipr.link("set", index=vx, ifname="vxlan0", mtu=n.mtu, master=link_index(ipr, "br0"))
        with _refused(errno.EADDRINUSE, f"network {n.id}: UDP port {VXLAN_PORT} on {advertise_addr} is already "
                      f"bound by another program; stop it (see `ss -ulpn sport = {VXLAN_PORT}`)"):
            ipr.link("set", index=vx, state="up")


def vxlan_vni(ipr: IPRoute, idx: int) -> int | None:
    info = ipr.get_links(idx)[0].get_attr("IFLA_LINKINFO")
    data = info.get_attr("IFLA_INFO_DATA") if info else None
    return data.get_attr("IFLA_VXLAN_ID") if data else None


def destroy(name: str, host_netns: str | None, vni: int | None = None) -> None:
    """Remove a sandbox namespace (and the host's `vx-<vni>` a crash may have left)."""
    if name in list_netns():
        with netlink(ns_path(name)) as ipr:
            # delete the vxlan first: a dying netns frees its devices asynchronously
            del_link(ipr, "vxlan0")
            del_link(ipr, "br0")
        remove_netns(name)
    if vni is not None:
        with netlink(host_netns) as h:
            del_link(h, f"vx-{vni}")


def scan(sandbox: str) -> tuple[str | None, int | None, list[tuple[str, str]]]:
    """What restore reads in a sandbox: (br0's ifalias, br0's MTU, [(task id, sandbox veth)])."""
    with netlink(ns_path(sandbox)) as ipr:
        br = link_index(ipr, "br0")
        if br is None:
            return None, None, []
        link0 = ipr.get_links(br)[0]
        ports = [(link.get_attr("IFLA_IFALIAS") or "", link.get_attr("IFLA_IFNAME"))
                 for link in ipr.get_links()
                 if link.get_attr("IFLA_MASTER") == br and link.get_attr("IFLA_IFNAME").startswith("ve")]
        return link0.get_attr("IFLA_IFALIAS"), link0.get_attr("IFLA_MTU"), ports
