"""The network driver API: what a node's networking (agent/network.py) asks of a data-path driver.

As libnetwork's driverapi: networks are created and deleted, endpoints (a task's interfaces in its
container namespace) join and leave them, remote endpoints learnt from the gossip tables are
programmed as peers, and service load balancing (VIPs, ingress, host-mode published ports) is
programmed on the node. The one implementation is the VXLAN overlay,
:class:`shoal.netdriver.overlay.driver.OverlayDriver`.

Every method is synchronous (netlink is fast) and may block on other namespaces: callers on an
event loop run them with ``asyncio.to_thread``. Every method is idempotent and leaves nothing
half-built when it raises; errors the user can cause are raised with one sentence naming the field
and the fix.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from shoal.proto import objects_pb2


@dataclass
class Interface:
    """One interface a driver made in a container's namespace."""

    network_id: str  # "" for the gateway-bridge interface
    ifname: str  # name inside the container
    address: str  # CIDR
    mac: str
    mtu: int


class NetworkDriver(Protocol):
    # ---- life
    def restore(self) -> set[str]:
        """After an agent restart: adopt what an earlier run left in the kernel; returns the ids of
        the tasks that still have interfaces here (re-attach the ones still run, detach the rest)."""
        ...

    def cleanup(self) -> None:
        """Remove everything this driver made on the node."""
        ...

    # ---- networks
    def ensure_network(self, net: objects_pb2.Network) -> None:
        """Create (or adopt) the data path of an allocated network on this node."""
        ...

    def remove_network(self, network_id: str) -> None:
        """Delete the network's data path here; refused while tasks are attached to it here."""
        ...

    def set_network_keys(self, network_id: str, keys: Sequence[bytes]) -> None:
        """The keys of an encrypted network, primary (the one to send with) first; may come before
        or after ensure_network."""
        ...

    # ---- endpoints (join / leave)
    def attach(self, task_id: str, container_netns: str,
               attachments: Sequence[objects_pb2.NetworkAttachment]) -> list[Interface]:
        """Join a task's container namespace to its networks (creating those not set up yet):
        one interface per attachment, in order, then the gateway interface unless all are internal."""
        ...

    def detach(self, task_id: str) -> None:
        """Leave every network (and drop the task's host-mode published ports)."""
        ...

    def task_networks(self, task_id: str) -> list[str]:
        """The networks a task is attached to on this node (also one adopted by restore())."""
        ...

    # ---- remote endpoints
    def add_peer(self, network_id: str, ip: str, mac: str, vtep: str) -> None:
        """A remote endpoint of the network, reached through the node at `vtep`; kept until the
        network is set up here when it is not yet."""
        ...

    def remove_peer(self, network_id: str, ip: str, mac: str, vtep: str) -> None:
        """Forget a remote endpoint."""
        ...

    def peers(self, network_id: str) -> dict[str, tuple[str, str]]:
        """The remote endpoints held for the network (programmed or pending): ip -> (mac, vtep)."""
        ...

    def peer_entries(self, network_id: str) -> tuple[set[tuple[str, str]], set[tuple[str, str]]]:
        """Diagnostics: what the kernel holds for the network's remote endpoints, as
        ({(mac, vtep)}, {(ip, mac)})."""
        ...

    # ---- service load balancing
    def set_service_backends(self, network_id: str, vip: str, backend_ips: Sequence[str],
                             ports: Sequence[tuple[str, int]] = ()) -> None:
        """Balance connections to a service VIP over its backends in the network's local tasks."""
        ...

    def remove_service(self, network_id: str, vip: str) -> None:
        """Stop balancing a VIP here."""
        ...

    def publish_host_port(self, task_id: str, protocol: str, published_port: int, target_port: int) -> None:
        """mode=host: the node's published_port goes to this task's target_port."""
        ...

    def ensure_ingress(self, ingress_net: objects_pb2.Network, sbox_address: str, sbox_mac: str = "") -> Interface:
        """Build the node's routing-mesh sandbox on the ingress network; returns its interface
        (announce it in the ingress network's endpoint table)."""
        ...

    def set_ingress_backends(self, protocol: str, published_port: int, target_port: int,
                             backend_ips: Sequence[str]) -> None:
        """mode=ingress: the node's published_port goes to the backends, wherever they run."""
        ...

    def unpublish_ingress(self, protocol: str, published_port: int) -> None:
        """Stop publishing an ingress-mode port here."""
        ...

    def ingress_ports(self) -> set[tuple[str, int]]:
        """The (protocol, port) pairs published in ingress mode on this node (also restored ones)."""
        ...
