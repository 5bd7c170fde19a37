"""The overlay driver: the one facade of the VXLAN data path (implements driverapi.NetworkDriver).

One `OverlayDriver` per node, in the process that runs in the node's ("host") network namespace, or
pointed at it with `host_netns=` (tests run several hosts from one process). Everything is sync
(netlink calls are fast); the agent calls it through `asyncio.to_thread`. All public methods hold
one lock, are idempotent, and leave nothing half-built when they raise; set_service_backends and
remove_service write the containers' VIP tables (one nft process each) after releasing it, under a
second lock, so that peers are programmed meanwhile. The driver keeps all the state; the modules
beside it (sandbox, esp, peers, gateway, endpoints, and shoal.netdriver.lb) are functions it calls
under its lock.

API for the agent
-----------------
    d = OverlayDriver(node_id, advertise_addr, ns_prefix, underlay_mtu=None,
                      gw_subnet="172.18.0.0/16", host_netns=None, gw_bridge="shoal_gwbridge")
    d.restore() -> set[str]                     # after an agent restart: adopt sandboxes, peers,
                                                # gateway addresses; returns task ids found here
    d.ensure_network(net: objects_pb2.Network)  # needs driver_state.vni, ipam.configs[0].subnet
    d.remove_network(network_id)                # refuses while tasks are attached here
    d.attach(task_id, container_netns, attachments: Sequence[objects_pb2.NetworkAttachment])
        -> list[Interface]                      # eth0, eth1 … in the order given, then the
                                                # gateway-bridge interface unless all are internal
    d.detach(task_id)                           # also drops the task's host-mode published ports
    d.set_network_keys(network_id, keys)        # encrypted networks: IPsec keys, primary first
                                                # (may come before or after ensure_network)
    d.add_peer(network_id, ip, mac, vtep) / d.remove_peer(network_id, ip, mac, vtep)
                                                # remote endpoint: FDB MAC->VTEP + neigh IP->MAC;
                                                # peers for a network not yet created are kept and
                                                # programmed by ensure_network
    d.set_service_backends(network_id, vip, backend_ips, ports=())
    d.remove_service(network_id, vip)           # VIP load balancing in every local container of
                                                # the network; ports: [("tcp", 80), …], () = all
    d.publish_host_port(task_id, protocol, published_port, target_port)
    d.unpublish_host_port(protocol, published_port)
    d.ensure_ingress(ingress_net, sbox_address, sbox_mac="") -> Interface
                                                # routing-mesh sandbox; its (ip, mac, vtep) must be
                                                # announced in the ingress network's endpoint table
    d.set_ingress_backends(protocol, published_port, target_port, backend_ips)
    d.unpublish_ingress(protocol, published_port)
    d.cleanup()                                 # removes everything this driver made
    d.peer_entries(network_id) -> (fdb {(mac, vtep)}, neigh {(ip, mac)})   # what the kernel holds
    d.peers(network_id) -> {ip: (mac, vtep)}    # remote endpoints held (programmed or pending)
    d.task_networks(task_id) -> [network id]    # networks a task is attached to here
    d.ingress_ports() -> {(protocol, port)}     # published in ingress mode here
    d.esp_state(network_id) -> (SAs, policies)  # encrypted networks: what the kernel holds

Errors the user can cause raise OverlayError (PortConflictError for published ports) with one
sentence naming the field and the fix: a VNI already used by another device, UDP 4789 bound by
another program, a published port used by another task / the mesh / a program, an encrypted
network on a kernel without ESP+GCM, an exhausted
gw_subnet, a missing container namespace or attachment address.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import threading
from collections.abc import Sequence

from shoal.netdriver import lb, nft, xfrm
from shoal.netdriver.driverapi import Interface
from shoal.netdriver.netns import create_netns, list_netns, ns_path, remove_netns
from shoal.netdriver.overlay import endpoints, esp, gateway, peers, sandbox
from shoal.netdriver.overlay.model import (
    ESP_OVERHEAD,
    INGRESS_TASK,
    VXLAN_OVERHEAD,
    Endpoint,
    Network,
    OverlayError,
    Published,
    VipService,
    mac_from_ip,
    strip_prefix,
)
from shoal.netdriver.overlay.restore import scan_kernel
from shoal.proto import objects_pb2

log = logging.getLogger(__name__)


class OverlayDriver:
    """One node's overlay data path (see the module docstring). Holds the lock and all the state."""

    def __init__(
        self,
        node_id: str,
        advertise_addr: str,
        ns_prefix: str,
        *,
        underlay_mtu: int | None = None,
        gw_subnet: str = "172.18.0.0/16",
        host_netns: str | None = None,
        gw_bridge: str = "shoal_gwbridge",
    ) -> None:
        if len(gw_bridge) > 15:
            raise OverlayError(f"gw_bridge name {gw_bridge!r} is longer than 15 characters; pick a shorter one")
        self.node_id = node_id
        self.advertise_addr = advertise_addr
        self.prefix = ns_prefix
        self.host_netns = ns_path(host_netns) if host_netns else None
        self.gw_bridge = gw_bridge
        self.gw_net = ipaddress.ip_network(gw_subnet)
        self.gw_gateway = str(self.gw_net.network_address + 1)
        self._lock = threading.RLock()
        # VIP tables of containers are written under this lock, not _lock, when backends change (one nft
        # process per container): peers keep being programmed meanwhile. Order: _lock, then _nft_lock.
        self._nft_lock = threading.Lock()
        self._nets: dict[str, Network] = {}
        self._pending_peers: dict[str, dict[str, tuple[str, str]]] = {}
        self._eps: dict[str, Endpoint] = {}
        self._gw_alloc: dict[str, str] = {}  # gw ip -> task id
        self._host_ports: dict[tuple[str, int], Published] = {}
        self._ingress: Interface | None = None
        self._ingress_gw_ip: str | None = None
        self._keys: dict[str, list[bytes]] = {}  # network id -> IPsec keys, primary first
        self._gw_ready = False  # gateway bridge, forwarding and host nft table checked by this run
        self._route_localnet: bool | None = None  # what this run last wrote on the gateway bridge
        self.underlay_mtu = underlay_mtu or sandbox.detect_mtu(self.host_netns, advertise_addr)

    def _log(self, event: str, **kv: object) -> None:
        log.info("overlay node=%s %s %s", self.node_id, event, " ".join(f"{k}={v}" for k, v in kv.items()))

    def _sandbox_name(self, network_id: str) -> str:
        return sandbox.sandbox_name(self.prefix, network_id)

    @property
    def ingress_sbox(self) -> str:
        return sandbox.ingress_sandbox_name(self.prefix)

    # ------------------------------------------------------------------ networks
    def ensure_network(self, net: objects_pb2.Network) -> None:
        with self._lock:
            self._ensure_network(net)

    def _ensure_network(self, net: objects_pb2.Network) -> Network:
        nid = net.id
        if not nid:
            raise OverlayError("network.id is empty; pass the allocated Network object")
        vni = net.driver_state.vni
        if not vni:
            raise OverlayError(f"network {nid}: driver_state.vni is 0; the network is not allocated yet")
        if not net.ipam.configs or not net.ipam.configs[0].subnet:
            raise OverlayError(f"network {nid}: ipam.configs[0].subnet is empty; the network is not allocated yet")
        subnet = ipaddress.ip_network(net.ipam.configs[0].subnet, strict=False)
        gateway = strip_prefix(net.ipam.configs[0].gateway or str(subnet.network_address + 1))
        encrypted = "encrypted" in net.spec.driver_config.options
        if encrypted and not self.esp_supported():
            raise OverlayError(
                f"network {nid}: --opt encrypted needs IPsec ESP with AES-GCM in the kernel "
                "(CONFIG_INET_ESP, CONFIG_CRYPTO_GCM), which this node's kernel lacks; "
                "create the network without --opt encrypted or run the node on such a kernel")
        mtu = self.underlay_mtu - (ESP_OVERHEAD if encrypted else VXLAN_OVERHEAD)
        n = Network(id=nid, vni=vni, subnet=subnet, gateway=gateway, internal=net.spec.internal,
                    ingress=net.spec.ingress, mtu=mtu, sandbox=self._sandbox_name(nid), encrypted=encrypted)
        old = self._nets.get(nid)
        if old is not None:
            n.peers, n.services = old.peers, old.services
        n.peers.update(self._pending_peers.pop(nid, {}))
        created = n.sandbox not in list_netns()
        try:
            sandbox.build(n, created, self.host_netns, self.advertise_addr)
            self._log("network.ready", network=n.id, vni=n.vni, sandbox=n.sandbox, mtu=n.mtu,
                      created=created)
            self._nets[nid] = n
            if n.encrypted:
                esp.sync_table(self.host_netns, self._nets.values())
                self._sync_esp(n)
        except BaseException:
            if created:
                self._nets.pop(nid, None)
                sandbox.destroy(n.sandbox, self.host_netns, vni)
                if n.encrypted:
                    self._sync_esp(n, drop=True)
                    esp.sync_table(self.host_netns, self._nets.values())
            raise
        for ip, (mac, vtep) in n.peers.items():
            self._program_peer(n, ip, mac, vtep)
        return n

    def remove_network(self, network_id: str) -> None:
        with self._lock:
            users = [t for t, ep in self._eps.items() if ep.on_network(network_id)]
            if users:
                raise OverlayError(
                    f"network {network_id} still has tasks attached on this node ({', '.join(users[:3])}); "
                    "detach them first")
            n = self._nets.pop(network_id, None)
            self._pending_peers.pop(network_id, None)
            self._keys.pop(network_id, None)
            sandbox.destroy(self._sandbox_name(network_id), self.host_netns, n.vni if n else None)
            if n is not None and n.encrypted:
                self._sync_esp(n, drop=True)
                esp.sync_table(self.host_netns, self._nets.values())
            self._log("network.removed", network=network_id)

    # ------------------------------------------------------------------ encryption (IPsec ESP)
    def esp_supported(self) -> bool:
        """Can this host's kernel carry encrypted networks (IPsec ESP with AES-GCM)?"""
        return xfrm.esp_supported(self.host_netns)

    def set_network_keys(self, network_id: str, keys: Sequence[bytes]) -> None:
        """The IPsec keys of an encrypted network, primary (the one to send with) first. Peers'
        SAs follow at once; keys for a network not set up here yet are kept for ensure_network."""
        esp.check_keys(network_id, keys)
        with self._lock:
            if list(keys) == self._keys.get(network_id):
                return
            self._keys[network_id] = list(keys)
            n = self._nets.get(network_id)
            if n is not None and n.encrypted:
                self._sync_esp(n)
            self._log("network.keys", network=network_id, keys=len(keys))

    def _sync_esp(self, n: Network, *, drop: bool = False) -> None:
        esp.sync(self.host_netns, self.advertise_addr, n, self._keys.get(n.id, []), node_id=self.node_id, drop=drop)

    def esp_state(self, network_id: str) -> tuple[list[xfrm.SA], list[xfrm.Policy]]:
        """What the kernel holds for an encrypted network: (SAs, output policies)."""
        with self._lock:
            n = self._nets.get(network_id)
            if n is None:
                return [], []
            return esp.state(self.host_netns, n.vni)

    # ------------------------------------------------------------------ peers
    def add_peer(self, network_id: str, ip: str, mac: str, vtep: str) -> None:
        ip = strip_prefix(ip)
        with self._lock:
            n = self._nets.get(network_id)
            if n is None:
                self._pending_peers.setdefault(network_id, {})[ip] = (mac, vtep)
                self._log("peer.pending", network=network_id, ip=ip, mac=mac, vtep=vtep)
                return
            if vtep == self.advertise_addr:
                return  # a local endpoint: the bridge already knows it
            new_vtep = n.encrypted and all(v != vtep for _, v in n.peers.values())
            n.peers[ip] = (mac, vtep)
            if new_vtep:
                self._sync_esp(n)  # its policy and SAs before its first FDB entry
            self._program_peer(n, ip, mac, vtep)
            self._log("peer.added", network=network_id, ip=ip, mac=mac, vtep=vtep)

    def _program_peer(self, n: Network, ip: str, mac: str, vtep: str) -> None:
        if vtep != self.advertise_addr:
            peers.program(n, ip, mac, vtep)

    def remove_peer(self, network_id: str, ip: str, mac: str, vtep: str) -> None:
        ip = strip_prefix(ip)
        with self._lock:
            pend = self._pending_peers.get(network_id)
            if pend is not None:
                pend.pop(ip, None)
            n = self._nets.get(network_id)
            if n is None:
                return
            n.peers.pop(ip, None)
            if vtep == self.advertise_addr:
                return
            still_used = any(m == mac and v == vtep for m, v in n.peers.values())
            peers.unprogram(n, ip, mac, vtep, keep_fdb=still_used)
            if n.encrypted and all(v != vtep for _, v in n.peers.values()):
                self._sync_esp(n)  # its last endpoint here went: its SAs and policy go too
            self._log("peer.removed", network=network_id, ip=ip, mac=mac, vtep=vtep)

    def peers(self, network_id: str) -> dict[str, tuple[str, str]]:
        """The remote endpoints this driver holds for the network (programmed or pending): ip -> (mac, vtep)."""
        with self._lock:
            n = self._nets.get(network_id)
            out = dict(self._pending_peers.get(network_id, {}))
            if n is not None:
                out.update(n.peers)
            return out

    def peer_entries(self, network_id: str) -> tuple[set[tuple[str, str]], set[tuple[str, str]]]:
        """What the kernel holds on the network's vxlan0: ({(mac, vtep)}, {(ip, mac)}) (permanent only)."""
        with self._lock:
            return peers.entries(self._sandbox_name(network_id))

    def ingress_ports(self) -> set[tuple[str, int]]:
        """The (protocol, port) pairs published in ingress mode on this node (also restored ones)."""
        with self._lock:
            return {k for k, p in self._host_ports.items() if p.owner == lb.INGRESS_OWNER}

    def task_networks(self, task_id: str) -> list[str]:
        """The networks a task is attached to on this node (also a task adopted by restore())."""
        with self._lock:
            ep = self._eps.get(task_id)
            return ep.network_ids() if ep is not None else []

    # ------------------------------------------------------------------ attach / detach
    def attach(self, task_id: str, container_netns: str,
               attachments: Sequence[objects_pb2.NetworkAttachment]) -> list[Interface]:
        with self._lock:
            path = ns_path(container_netns)
            old = self._eps.get(task_id)
            if old is not None and old.netns == path and old.interfaces and endpoints.still_there(old):
                return list(old.interfaces)
            if old is not None and not old.interfaces and old.netns in (None, path):
                # restored after an agent restart
                adopted = endpoints.adopt(old, path, attachments, self._nets, self.gw_net.prefixlen)
                if adopted is not None:
                    self._log("task.adopted", task=task_id, netns=path)
                    return adopted
            ep = Endpoint(task_id=task_id, netns=path, nft=False)
            if old is not None:  # moved or broken: rebuild
                self._teardown(old)
            try:
                self._build_endpoint(ep, attachments)
            except BaseException:
                self._teardown(ep)
                raise
            self._eps[task_id] = ep
        try:  # its VIP table: outside _lock (see _apply_containers_nft)
            self._apply_containers_nft([ep])
        except BaseException:
            with self._lock:
                if self._eps.get(task_id) is ep:
                    del self._eps[task_id]
                    self._teardown(ep)
            raise
        self._log("task.attached", task=task_id, netns=path,
                  ifaces=",".join(f"{i.ifname}={i.address}" for i in ep.interfaces))
        return list(ep.interfaces)

    def _build_endpoint(self, ep: Endpoint, attachments: Sequence[objects_pb2.NetworkAttachment]) -> None:
        path = ep.netns
        assert path is not None
        if not os.path.exists(path):
            raise OverlayError(f"task {ep.task_id}: container network namespace {path} does not exist")
        names = iter(endpoints.free_ifnames(path))
        egress = False
        for att in attachments:
            n = self._nets.get(att.network.id) or self._ensure_network(att.network)
            if not att.addresses:
                raise OverlayError(f"task {ep.task_id}: attachment to network {n.id} has no address; "
                                   "the allocator must fill addresses")
            iface = ipaddress.ip_interface(f"{strip_prefix(att.addresses[0])}/{n.subnet.prefixlen}")
            mac = att.mac or mac_from_ip(str(iface.ip))
            ifname = next(names)
            sb_end = endpoints.sandbox_end(ep.task_id, n.id)
            ep.links.append((n.id, sb_end))
            c_end = endpoints.add_network_port(ep.task_id, n, path)
            endpoints.setup_container_if(path, c_end, ifname, str(iface), mac, n.mtu)
            ep.interfaces.append(Interface(n.id, ifname, str(iface), mac, n.mtu))
            egress = egress or not n.internal
        if egress:
            self._ensure_gw()
            ip = gateway.alloc_ip(self.gw_net, self.gw_gateway, self._gw_alloc, ep.task_id)
            ep.gw_ip = ip
            ep.gw_link = gateway.port_name(ep.task_id)
            ifname = next(names)
            mac = mac_from_ip(ip)
            c_end = gateway.add_port(self.host_netns, self.gw_bridge, ep.task_id, ip, path, self.underlay_mtu)
            addr = f"{ip}/{self.gw_net.prefixlen}"
            endpoints.setup_container_if(path, c_end, ifname, addr, mac, self.underlay_mtu)
            ep.interfaces.append(Interface("", ifname, addr, mac, self.underlay_mtu))
            # as Docker: only internal networks -> no default route ("Network unreachable")
            endpoints.set_default_route(path, self.gw_gateway)
        self._want_container_nft(ep)  # attach() writes it

    def _ensure_gw(self) -> None:
        if gateway.ensure_bridge(self.host_netns, self.gw_bridge, self.gw_net, self.gw_gateway,
                                 checked=self._gw_ready):
            self._route_localnet = None
            self._sync_host_nft()
            self._gw_ready = True

    def detach(self, task_id: str) -> None:
        with self._lock:
            ep = self._eps.pop(task_id, None)
            for key, p in list(self._host_ports.items()):
                if p.owner == task_id:
                    del self._host_ports[key]
                    self._sync_host_nft()
            if ep is None:
                return
            self._teardown(ep)
            self._log("task.detached", task=task_id)

    def _teardown(self, ep: Endpoint) -> None:
        endpoints.remove_network_ports(ep, self.prefix)
        if ep.gw_link:
            gateway.remove_port(self.host_netns, ep.gw_link)
        if ep.gw_ip:
            self._gw_alloc.pop(ep.gw_ip, None)
        with self._nft_lock:
            lb.drop_container_table(ep, self.node_id)

    # ------------------------------------------------------------------ service VIPs (lb)
    def set_service_backends(self, network_id: str, vip: str, backend_ips: Sequence[str],
                             ports: Sequence[tuple[str, int]] = ()) -> None:
        """Balance connections to `vip` (on `network_id`) over `backend_ips`, round robin, in every
        local container attached to the network. `ports` limits it to ("tcp"|"udp", port) pairs;
        empty means every packet to the VIP. No backends: connections are refused at once."""
        with self._lock:
            n = self._nets.get(network_id)
            if n is None:
                raise OverlayError(f"network {network_id} is not set up on this node; call ensure_network first")
            lb.check_service_ports(ports)
            n.services[strip_prefix(vip)] = VipService([strip_prefix(b) for b in backend_ips], list(ports))
            eps = self._want_network_containers(network_id)
        self._apply_containers_nft(eps)
        self._log("service.backends", network=network_id, vip=vip, backends=",".join(backend_ips) or "-")

    def remove_service(self, network_id: str, vip: str) -> None:
        with self._lock:
            n = self._nets.get(network_id)
            if n is None or n.services.pop(strip_prefix(vip), None) is None:
                return
            eps = self._want_network_containers(network_id)
        self._apply_containers_nft(eps)
        self._log("service.removed", network=network_id, vip=vip)

    def _want_network_containers(self, network_id: str) -> list[Endpoint]:
        """Under _lock: the VIP table every local container of the network should have."""
        eps = [ep for ep in self._eps.values() if ep.on_network(network_id)]
        for ep in eps:
            self._want_container_nft(ep)
        return eps

    def _want_container_nft(self, ep: Endpoint) -> None:
        """Under _lock: what the container's VIP table should hold, from its networks' services."""
        if ep.netns is None:
            return
        ep.nft_want = lb.vip_table((vip, svc) for nid in ep.network_ids()
                                   if (n := self._nets.get(nid)) is not None
                                   for vip, svc in n.services.items())

    def _apply_containers_nft(self, eps: Sequence[Endpoint]) -> None:
        """Without _lock: write what each container should have (the latest wish, whoever made it)."""
        with self._nft_lock:
            for ep in eps:
                lb.apply_container_table(ep)

    # ------------------------------------------------------------------ published ports (lb)
    def publish_host_port(self, task_id: str, protocol: str, published_port: int, target_port: int) -> None:
        """mode=host: DNAT <any local address>:published_port → the task's gateway-bridge address."""
        with self._lock:
            lb.check_port(self._host_ports, self.host_netns, protocol, published_port, task_id)
            ep = self._eps.get(task_id)
            if ep is None:
                raise OverlayError(f"task {task_id} is not attached on this node; attach it before publishing")
            if ep.gw_ip is None:
                raise OverlayError(
                    f"task {task_id}: publish_mode=host needs the task on at least one non-internal network; "
                    "attach it to one or use mode=ingress")
            self._host_ports[(protocol, published_port)] = Published(task_id, f"{ep.gw_ip}:{target_port}")
            try:
                self._sync_host_nft()
            except BaseException:
                del self._host_ports[(protocol, published_port)]
                raise
            self._log("port.published", mode="host", task=task_id, port=f"{published_port}/{protocol}",
                      target=f"{ep.gw_ip}:{target_port}")

    def unpublish_host_port(self, protocol: str, published_port: int) -> None:
        with self._lock:
            p = self._host_ports.get((protocol, published_port))
            if p is None or p.owner == lb.INGRESS_OWNER:
                return
            del self._host_ports[(protocol, published_port)]
            self._sync_host_nft()
            self._log("port.unpublished", mode="host", port=f"{published_port}/{protocol}")

    def ensure_ingress(self, ingress_net: objects_pb2.Network, sbox_address: str, sbox_mac: str = "") -> Interface:
        """Build this node's routing-mesh sandbox on the ingress network (spec.ingress) with the
        node's ingress address (CIDR, allocated by the managers). Returns its interface on the
        ingress network: announce (ip, mac, this node's VTEP) in the ingress endpoint table."""
        with self._lock:
            if not ingress_net.spec.ingress:
                raise OverlayError(f"network {ingress_net.id} is not the ingress network (spec.ingress is false)")
            if ingress_net.spec.internal:
                raise OverlayError("the ingress network cannot be internal; recreate it without --internal")
            created = self.ingress_sbox not in list_netns()
            try:
                if created:
                    create_netns(self.ingress_sbox)
                att = objects_pb2.NetworkAttachment(addresses=[sbox_address], mac=sbox_mac)
                att.network.CopyFrom(ingress_net)
                ifaces = self.attach(INGRESS_TASK, ns_path(self.ingress_sbox), [att])
                nft.set_sysctl(ns_path(self.ingress_sbox), "net.ipv4.ip_forward", "1")
            except BaseException:
                if created:
                    self._remove_ingress()
                raise
            self._ingress = ifaces[0]
            self._ingress_gw_ip = self._eps[INGRESS_TASK].gw_ip
            self._sync_ingress_nft()
            self._sync_host_nft()
            return ifaces[0]

    def set_ingress_backends(self, protocol: str, published_port: int, target_port: int,
                             backend_ips: Sequence[str]) -> None:
        """mode=ingress: every node accepts published_port and forwards it over the ingress network
        to backend_ips:target_port (round robin), whichever node runs them."""
        with self._lock:
            if self._ingress is None:
                raise OverlayError("the ingress sandbox is not set up on this node; call ensure_ingress first")
            lb.check_port(self._host_ports, self.host_netns, protocol, published_port, lb.INGRESS_OWNER)
            key = (protocol, published_port)
            old = self._host_ports.get(key)
            self._host_ports[key] = Published(lb.INGRESS_OWNER, str(target_port),
                                              [strip_prefix(b) for b in backend_ips])
            try:
                self._sync_ingress_nft()
                self._sync_host_nft()
            except BaseException:
                if old is None:
                    del self._host_ports[key]
                else:
                    self._host_ports[key] = old
                raise
            self._log("port.published", mode="ingress", port=f"{published_port}/{protocol}",
                      target=target_port, backends=",".join(backend_ips) or "-")

    def unpublish_ingress(self, protocol: str, published_port: int) -> None:
        with self._lock:
            p = self._host_ports.get((protocol, published_port))
            if p is None or p.owner != lb.INGRESS_OWNER:
                return
            del self._host_ports[(protocol, published_port)]
            self._sync_ingress_nft()
            self._sync_host_nft()
            self._log("port.unpublished", mode="ingress", port=f"{published_port}/{protocol}")

    def _sync_host_nft(self) -> None:
        if not gateway.exists(self.host_netns, self.gw_bridge):
            return
        has_ports = lb.write_host_table(self.host_netns, self._host_ports, self._ingress_gw_ip, self.gw_net,
                                        self.gw_bridge)
        # 127.0.0.1 -> published ports; written when it changes (None: unknown, e.g. a new bridge)
        if has_ports != self._route_localnet and (has_ports or self._route_localnet is not None):
            lb.set_route_localnet(self.host_netns, self.gw_bridge, has_ports)
        self._route_localnet = has_ports

    def _sync_ingress_nft(self) -> None:
        if self._ingress is None:
            return
        lb.write_ingress_table(ns_path(self.ingress_sbox), self._host_ports, self._ingress.ifname)

    def _remove_ingress(self) -> None:
        ep = self._eps.pop(INGRESS_TASK, None)
        if ep is not None:
            self._teardown(ep)
        if self.ingress_sbox in list_netns():
            remove_netns(self.ingress_sbox)
        self._ingress = None
        self._ingress_gw_ip = None

    # ------------------------------------------------------------------ restore / cleanup
    def restore(self) -> set[str]:
        """Adopt what an earlier run of this driver left in the kernel (same ns_prefix): network
        sandboxes (from br0's ifalias), their FDB/neighbour entries, gateway-bridge addresses.
        Returns the task ids that still have interfaces here; the agent re-attach()es the ones it
        still runs (that rebuilds their interfaces and VIP rules) and detach()es the others. It
        then re-sends service backends and published ports."""
        with self._lock:
            found = scan_kernel(self.prefix, self.host_netns, self.gw_bridge, self.node_id)
            self._nets.update(found.networks)
            for task, ep in found.endpoints.items():
                held = self._eps.setdefault(task, Endpoint(task_id=task, netns=None))
                held.links.extend(ep.links)
                if ep.gw_ip is not None:
                    held.gw_ip, held.gw_link = ep.gw_ip, ep.gw_link
            self._gw_alloc.update(found.gw_alloc)
            if INGRESS_TASK in self._eps and self.ingress_sbox in list_netns():
                self._eps[INGRESS_TASK].netns = ns_path(self.ingress_sbox)
            self._host_ports.update(found.host_ports)
            if found.host_ports:  # an earlier run published ports: it turned route_localnet on
                self._route_localnet = True
            tasks = found.tasks - {INGRESS_TASK}
            self._log("restored", networks=len(self._nets), tasks=len(tasks))
            return tasks

    def cleanup(self) -> None:
        """Remove everything this driver made: namespaces, links, FDB/neighbour entries, nft tables."""
        with self._lock:
            for task in list(self._eps):
                if task != INGRESS_TASK:
                    self.detach(task)
            self._remove_ingress()
            for nid in list(self._nets):
                self.remove_network(nid)
            for name in sandbox.owned_netns(self.prefix):
                sandbox.destroy(name, self.host_netns)
            self._pending_peers.clear()
            self._host_ports.clear()
            self._keys.clear()
            esp.sweep(self.host_netns, self.advertise_addr)
            gateway.sweep(self.host_netns, self.gw_bridge)
            lb.delete_host_table(self.host_netns)
            self._gw_alloc.clear()
            self._log("cleaned")
