"""The overlay driver's records and constants: what it knows of a network and of a task's endpoint,
the errors it raises, and the names and numbers it puts in the kernel. No kernel calls here."""

from __future__ import annotations

import hashlib
import ipaddress
from dataclasses import dataclass, field

from shoal.netdriver.driverapi import Interface

VXLAN_PORT = 4789
VXLAN_OVERHEAD = 50
ESP_OVERHEAD = 76  # 1500 -> 1424, as Docker
ESP_MARK = 0xE0000000  # | VNI: packet mark and xfrm reqid of an encrypted network's traffic
ESP_TABLE = "shoal_ipsec"
NUD_PERMANENT = 0x80
NTF_SELF = 0x02
INGRESS_TASK = "ingress-sbox"


class OverlayError(RuntimeError):
    """A problem the caller (or the user's spec) can fix; the message names the field and the fix."""


class PortConflictError(OverlayError):
    pass


@dataclass
class VipService:
    """A service VIP balanced in a network's local containers."""

    backends: list[str]
    ports: list[tuple[str, int]]  # ("tcp"|"udp", port); empty: every packet to the VIP


@dataclass
class Network:
    """An overlay network set up on this node (its sandbox namespace holds br0 and vxlan0)."""

    id: str
    vni: int
    subnet: ipaddress.IPv4Network
    gateway: str
    internal: bool
    ingress: bool
    mtu: int
    sandbox: str  # netns name
    encrypted: bool = False
    peers: dict[str, tuple[str, str]] = field(default_factory=dict)  # ip -> (mac, vtep)
    services: dict[str, VipService] = field(default_factory=dict)  # vip -> service


@dataclass
class Endpoint:
    """A task's interfaces on this node, and the VIP table of its container."""

    task_id: str
    netns: str | None  # container netns path (None: restored, not yet re-attached)
    interfaces: list[Interface] = field(default_factory=list)
    links: list[tuple[str, str]] = field(default_factory=list)  # (network id, sandbox veth name)
    gw_ip: str | None = None
    gw_link: str | None = None
    nft: bool = True  # our nft table may exist in the container (unknown after a restore)
    nft_body: str | None = None  # what we last wrote there
    nft_want: str | None = None  # what should be there ("" = no table); set under _lock, applied under _nft_lock
    gone: bool = False  # torn down: nothing more is written to its namespace

    def network_ids(self) -> list[str]:
        """The networks it is attached to, each once, in attach order."""
        return list(dict.fromkeys(nid for nid, _ in self.links))

    def on_network(self, network_id: str) -> bool:
        return any(nid == network_id for nid, _ in self.links)


@dataclass
class Published:
    """A port published on this node (host mode: owned by a task; ingress mode: by the mesh)."""

    owner: str  # task id, or "ingress"
    target: str  # ip:port for host mode, target port for ingress
    backends: list[str] = field(default_factory=list)


def mac_from_ip(ip: str) -> str:
    """Docker's MAC for an address: 02:42 then the IPv4 bytes."""
    b = ipaddress.ip_address(ip).packed
    return "02:42:" + ":".join(f"{x:02x}" for x in b)


def link_hash(*parts: str) -> str:
    """10 hex digits naming a veth pair after what it joins (task, network)."""
    return hashlib.sha1("/".join(parts).encode()).hexdigest()[:10]


def strip_prefix(ip: str) -> str:
    """An address without its /prefix."""
    return ip.split("/")[0]
