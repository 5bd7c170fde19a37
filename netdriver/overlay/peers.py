"""Remote endpoints of a network in its sandbox: per endpoint a permanent FDB entry (MAC -> VTEP)
and a permanent neighbour entry (IP -> MAC) on vxlan0."""

from __future__ import annotations

import errno

from pyroute2.netlink.exceptions import NetlinkError

from shoal.netdriver.netns import link_index, netlink, ns_path
from shoal.netdriver.overlay.model import NTF_SELF, NUD_PERMANENT, Network


def program(n: Network, ip: str, mac: str, vtep: str) -> None:
    """Write (or rewrite) a remote endpoint's entries."""
    with netlink(ns_path(n.sandbox)) as ipr:
        vx = link_index(ipr, "vxlan0")
        ipr.fdb("replace", ifindex=vx, lladdr=mac, dst=vtep, state=NUD_PERMANENT, flags=NTF_SELF)
        ipr.neigh("replace", ifindex=vx, dst=ip, lladdr=mac, state=NUD_PERMANENT)


def unprogram(n: Network, ip: str, mac: str, vtep: str, *, keep_fdb: bool) -> None:
    """Delete a remote endpoint's neighbour entry, and its FDB entry unless keep_fdb (another
    endpoint of the network still uses that MAC at that VTEP). Entries already gone are no error."""
    with netlink(ns_path(n.sandbox)) as ipr:
        vx = link_index(ipr, "vxlan0")
        if vx is None:
            return
        for kind, kw in (("neigh", {"dst": ip, "lladdr": mac}),
                         ("fdb", None if keep_fdb else {"lladdr": mac, "dst": vtep, "flags": NTF_SELF})):
            if kw is None:
                continue
            try:
                getattr(ipr, kind)("del", ifindex=vx, **kw)
            except NetlinkError as e:
                if e.code not in (errno.ENOENT, errno.ESRCH):
                    raise


def entries(sandbox: str) -> tuple[set[tuple[str, str]], set[tuple[str, str]]]:
    """What the kernel holds on a sandbox's vxlan0: ({(mac, vtep)}, {(ip, mac)}) (permanent only)."""
    with netlink(ns_path(sandbox)) as ipr:
        vx = link_index(ipr, "vxlan0")
        fdb = {(e.get_attr("NDA_LLADDR"), e.get_attr("NDA_DST"))
               for e in ipr.fdb("dump", ifindex=vx) if e.get_attr("NDA_DST")
               and e["ifindex"] == vx}
        neigh = {(e.get_attr("NDA_DST"), e.get_attr("NDA_LLADDR"))
                 for e in ipr.get_neighbours(ifindex=vx, family=2) if e["state"] & NUD_PERMANENT}
        return fdb, neigh
