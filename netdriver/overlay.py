"""Overlay network data path: VXLAN sandboxes, task interfaces, peers, service VIPs, published ports.

One `OverlayDriver` per node, in the process that runs in the node's ("host") network namespace, or
pointed at it with `host_netns=` (tests run several hosts from one process). Everything is sync
(netlink calls are fast); the agent calls it through `asyncio.to_thread`. All public methods hold
one lock, are idempotent, and leave nothing half-built when they raise; set_service_backends and
remove_service write the containers' VIP tables (one nft process each) after releasing it, under a
second lock, so that peers are programmed meanwhile.

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

Layout on a host (prefix = ns_prefix)
-------------------------------------
* network sandbox: netns `<prefix>-ov-<network id[:12]>` holding bridge `br0` (gateway address,
  MTU = underlay − 50) and `vxlan0` (VNI, dstport 4789, local = advertise address, nolearning,
  proxy). vxlan0 is created in the host namespace as `vx-<vni>` and moved in, so its UDP socket
  stays in the host namespace. br0's ifalias keeps the network's metadata for restore().
* task interface: veth `ve<hash>` (port of br0, ifalias = task id) ↔ `ethN` in the container
  with the attachment's address, MAC (derived 02:42:<ip> when empty) and the overlay MTU.
* gateway bridge `shoal_gwbridge` in the host namespace (first address of `gw_subnet`), veth
  `gw<hash>` ↔ container `ethN`; default route through it; nft masquerade for egress. Networks
  with spec.internal get no gateway interface; a container only on internal networks gets no
  default route (as Docker: "Network unreachable" at once).
* nft table `ip shoal` in each container with VIPs (output-hook nat, `numgen inc` round robin),
  `ip shoal` in the host namespace (published ports, egress masquerade), and `ip shoal` in the
  ingress sandbox `<prefix>-ingress-sbox` (published port → task IP:target port, masquerade).
  Each table is rewritten as a whole in one nft transaction; existing connections keep their
  conntrack NAT mapping, so connections to live backends survive backend changes. Published
  ports: `fib daddr type local` DNAT in prerouting and output (host mode → the task's gateway
  address; ingress → the ingress sandbox's gateway address, same port), plus a hairpin masquerade
  for containers reaching their own node's published ports.
* encrypted network (spec.driver_config.options has "encrypted"), as Docker: VXLAN between VTEPs in
  IPsec ESP transport mode, AES-256-GCM (rfc4106, 64-bit ICV), overlay MTU = underlay − 76 (1424).
  In the host namespace, table `ip shoal_ipsec` marks outgoing UDP 4789 packets carrying the
  network's VNI with mark = reqid = 0xE0000000|VNI (a route chain, so the mark re-routes them
  through xfrm) and drops incoming ones of that VNI that were not decrypted by an SA of that
  network (`meta secpath missing`, `ipsec in reqid !=`). Per remote VTEP with endpoints on the
  network: one output policy (local→VTEP, UDP dport 4789, the mark; template ESP transport, the
  reqid), one outbound SA under the primary key, one inbound SA under every key. SPIs and SA keys
  are derived from the network key per direction (xfrm.derive_sa), so both ends agree without
  talking. A peer VTEP's policy is in place before its first FDB entry (nothing leaves in clear);
  without keys the policy has no SA and the kernel drops (fail closed). Keys change: the SAs of the
  new keys are added before those of dropped keys go. Everything is reconciled against what the
  kernel holds (found by reqid and mark), so an agent restart adopts it. No anti-replay window
  (xfrm.REPLAY_WINDOW).
* Netlink sockets in other namespaces are made by a short-lived setns thread (netns.netns_socket),
  not by pyroute2's fork helper: attach takes ~10-25 ms.
"""

from __future__ import annotations

import errno
import hashlib
import ipaddress
import logging
import os
import socket
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

from pyroute2 import netns
from pyroute2.iproute import IPRoute  # submodules: swarmd skips pyroute2/__init__ (memory)
from pyroute2.netlink.exceptions import NetlinkError

from shoal.proto import objects_pb2

from . import nft, xfrm
from .netns import add_veth, create_netns, move_link, netns_socket, ns_path, open_ipr

log = logging.getLogger(__name__)

VXLAN_PORT = 4789
VXLAN_OVERHEAD = 50
ESP_OVERHEAD = 76  # 1500 -> 1424, as Docker
ESP_MARK = 0xE0000000  # | VNI: packet mark and xfrm reqid of an encrypted network's traffic
ESP_TABLE = "shoal_ipsec"
NUD_PERMANENT = 0x80
NTF_SELF = 0x02
TABLE = "shoal"
INGRESS_TASK = "ingress-sbox"


class OverlayError(RuntimeError):
    """A problem the caller (or the user's spec) can fix; the message names the field and the fix."""


class PortConflictError(OverlayError):
    pass


@dataclass
class Interface:
    network_id: str  # "" for the gateway-bridge interface
    ifname: str  # name inside the container
    address: str  # CIDR
    mac: str
    mtu: int


@dataclass
class _Service:
    backends: list[str]
    ports: list[tuple[str, int]]


@dataclass
class _Network:
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
    services: dict[str, _Service] = field(default_factory=dict)  # vip -> service


@dataclass
class _Endpoint:
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


@dataclass
class _Published:
    owner: str  # task id, or "ingress"
    target: str  # ip:port for host mode, target port for ingress
    backends: list[str] = field(default_factory=list)


def mac_from_ip(ip: str) -> str:
    b = ipaddress.ip_address(ip).packed
    return "02:42:" + ":".join(f"{x:02x}" for x in b)


def _h(*parts: str) -> str:
    return hashlib.sha1("/".join(parts).encode()).hexdigest()[:10]


def _strip(ip: str) -> str:
    return ip.split("/")[0]


class OverlayDriver:
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
        self._nets: dict[str, _Network] = {}
        self._pending_peers: dict[str, dict[str, tuple[str, str]]] = {}
        self._eps: dict[str, _Endpoint] = {}
        self._gw_alloc: dict[str, str] = {}  # gw ip -> task id
        self._host_ports: dict[tuple[str, int], _Published] = {}
        self._ingress: Interface | None = None
        self._ingress_gw_ip: str | None = None
        self._keys: dict[str, list[bytes]] = {}  # network id -> IPsec keys, primary first
        self._gw_ready = False  # gateway bridge, forwarding and host nft table checked by this run
        self.underlay_mtu = underlay_mtu or self._detect_mtu()

    # ------------------------------------------------------------------ helpers
    def _log(self, event: str, **kv: object) -> None:
        log.info("overlay node=%s %s %s", self.node_id, event, " ".join(f"{k}={v}" for k, v in kv.items()))

    @contextmanager
    def _ipr(self, path: str | None) -> Iterator[IPRoute]:
        ipr = open_ipr(path)
        try:
            yield ipr
        finally:
            ipr.close()

    def _host(self) -> IPRoute:
        return self._ipr(self.host_netns)  # type: ignore[return-value]

    def _detect_mtu(self) -> int:
        with self._host() as ipr:
            for a in ipr.get_addr(family=2):
                if a.get_attr("IFA_ADDRESS") == self.advertise_addr:
                    return ipr.get_links(a["index"])[0].get_attr("IFLA_MTU")
        return 1500

    def _sandbox_name(self, network_id: str) -> str:
        return f"{self.prefix}-ov-{network_id[:12]}"

    @property
    def ingress_sbox(self) -> str:
        return f"{self.prefix}-ingress-sbox"

    def _owned_netns(self) -> list[str]:
        return [n for n in netns.listnetns() if n.startswith(f"{self.prefix}-ov-") or n == self.ingress_sbox]

    @staticmethod
    def _idx(ipr: IPRoute, name: str) -> int | None:
        r = ipr.link_lookup(ifname=name)
        return r[0] if r else None

    @staticmethod
    def _del_link(ipr: IPRoute, name: str) -> None:
        idx = OverlayDriver._idx(ipr, name)
        if idx is not None:
            try:
                ipr.link("del", index=idx)
            except NetlinkError as e:
                if e.code != errno.ENODEV:
                    raise

    # ------------------------------------------------------------------ networks
    def ensure_network(self, net: objects_pb2.Network) -> None:
        with self._lock:
            self._ensure_network(net)

    def _ensure_network(self, net: objects_pb2.Network) -> _Network:
        nid = net.id
        if not nid:
            raise OverlayError("network.id is empty; pass the allocated Network object")
        vni = net.driver_state.vni
        if not vni:
            raise OverlayError(f"network {nid}: driver_state.vni is 0; the network is not allocated yet")
        if not net.ipam.configs or not net.ipam.configs[0].subnet:
            raise OverlayError(f"network {nid}: ipam.configs[0].subnet is empty; the network is not allocated yet")
        subnet = ipaddress.ip_network(net.ipam.configs[0].subnet, strict=False)
        gateway = net.ipam.configs[0].gateway or str(subnet.network_address + 1)
        gateway = _strip(gateway)
        encrypted = "encrypted" in net.spec.driver_config.options
        if encrypted and not self.esp_supported():
            raise OverlayError(
                f"network {nid}: --opt encrypted needs IPsec ESP with AES-GCM in the kernel "
                "(CONFIG_INET_ESP, CONFIG_CRYPTO_GCM), which this node's kernel lacks; "
                "create the network without --opt encrypted or run the node on such a kernel")
        mtu = self.underlay_mtu - (ESP_OVERHEAD if encrypted else VXLAN_OVERHEAD)
        n = _Network(id=nid, vni=vni, subnet=subnet, gateway=gateway, internal=net.spec.internal,
                     ingress=net.spec.ingress, mtu=mtu, sandbox=self._sandbox_name(nid), encrypted=encrypted)
        old = self._nets.get(nid)
        if old is not None:
            n.peers, n.services = old.peers, old.services
        n.peers.update(self._pending_peers.pop(nid, {}))
        created = n.sandbox not in netns.listnetns()
        try:
            self._build_sandbox(n, created)
            self._nets[nid] = n
            if n.encrypted:
                self._sync_esp_nft()
                self._sync_esp(n)
        except BaseException:
            if created:
                self._nets.pop(nid, None)
                self._destroy_sandbox(n.sandbox, vni)
                if n.encrypted:
                    self._sync_esp(n, drop=True)
                    self._sync_esp_nft()
            raise
        for ip, (mac, vtep) in n.peers.items():
            self._program_peer(n, ip, mac, vtep)
        return n

    def _build_sandbox(self, n: _Network, created: bool) -> None:
        sb = ns_path(n.sandbox)
        if created:
            create_netns(n.sandbox)
        meta = f"{n.id}|{n.vni}|{n.subnet}|{n.gateway}|{int(n.internal)}{int(n.ingress)}{int(n.encrypted)}"
        with self._ipr(sb) as ipr:
            ipr.link("set", index=self._idx(ipr, "lo"), state="up")
            br = self._idx(ipr, "br0")
            if br is None:
                ipr.link("add", ifname="br0", kind="bridge", br_stp_state=0, br_forward_delay=0)
                br = self._idx(ipr, "br0")
            ipr.link("set", index=br, mtu=n.mtu, ifalias=meta)
            have = {(a.get_attr("IFA_ADDRESS"), a["prefixlen"]) for a in ipr.get_addr(index=br, family=2)}
            if (n.gateway, n.subnet.prefixlen) not in have:
                ipr.addr("add", index=br, address=n.gateway, prefixlen=n.subnet.prefixlen)
            ipr.link("set", index=br, state="up")
            vx = self._idx(ipr, "vxlan0")
            if vx is not None and self._vxlan_vni(ipr, vx) != n.vni:
                ipr.link("del", index=vx)
                vx = None
        if vx is None:
            tmp = f"vx-{n.vni}"
            with self._host() as h:
                self._del_link(h, tmp)  # a leftover of a crash between create and move
                try:
                    h.link("add", ifname=tmp, kind="vxlan", vxlan_id=n.vni, vxlan_port=VXLAN_PORT,
                           vxlan_local=self.advertise_addr, vxlan_learning=0, vxlan_proxy=1, mtu=n.mtu)
                except NetlinkError as e:
                    if e.code == errno.EEXIST:
                        raise OverlayError(
                            f"network {n.id}: a VXLAN device with VNI {n.vni} already exists on this host; "
                            "remove the other network or give this one another VNI") from e
                    raise
                try:
                    move_link(h, self._idx(h, tmp), sb)
                except BaseException:
                    self._del_link(h, tmp)
                    raise
            with self._ipr(sb) as ipr:
                vx = self._idx(ipr, tmp)
                ipr.link("set", index=vx, ifname="vxlan0", mtu=n.mtu, master=self._idx(ipr, "br0"))
                try:
                    ipr.link("set", index=vx, state="up")
                except NetlinkError as e:
                    if e.code == errno.EADDRINUSE:
                        raise OverlayError(
                            f"network {n.id}: UDP port {VXLAN_PORT} on {self.advertise_addr} is already bound by "
                            "another program; stop it (see `ss -ulpn sport = {VXLAN_PORT}`)") from e
                    raise
        self._log("network.ready", network=n.id, vni=n.vni, sandbox=n.sandbox, mtu=n.mtu,
                  created=created)

    @staticmethod
    def _vxlan_vni(ipr: IPRoute, idx: int) -> int | None:
        info = ipr.get_links(idx)[0].get_attr("IFLA_LINKINFO")
        data = info.get_attr("IFLA_INFO_DATA") if info else None
        return data.get_attr("IFLA_VXLAN_ID") if data else None

    def _destroy_sandbox(self, name: str, vni: int | None = None) -> None:
        if name in netns.listnetns():
            with self._ipr(ns_path(name)) as ipr:
                # delete the vxlan first: a dying netns frees its devices asynchronously
                self._del_link(ipr, "vxlan0")
                self._del_link(ipr, "br0")
            netns.remove(name)
        if vni is not None:
            with self._host() as h:
                self._del_link(h, f"vx-{vni}")

    def esp_supported(self) -> bool:
        """Can this host's kernel carry encrypted networks (IPsec ESP with AES-GCM)?"""
        return xfrm.esp_supported(self.host_netns)

    # ------------------------------------------------------------------ encryption (IPsec ESP)
    def set_network_keys(self, network_id: str, keys: Sequence[bytes]) -> None:
        """The IPsec keys of an encrypted network, primary (the one to send with) first. Peers'
        SAs follow at once; keys for a network not set up here yet are kept for ensure_network."""
        for k in keys:
            if len(k) < 16:
                raise OverlayError(f"network {network_id}: an IPsec key of {len(k)} bytes is too short; "
                                   "the managers send 32-byte keys")
        with self._lock:
            if list(keys) == self._keys.get(network_id):
                return
            self._keys[network_id] = list(keys)
            n = self._nets.get(network_id)
            if n is not None and n.encrypted:
                self._sync_esp(n)
            self._log("network.keys", network=network_id, keys=len(keys))

    def _sync_esp(self, n: _Network, *, drop: bool = False) -> None:
        """Bring the kernel's policies and SAs of encrypted network n in line with its keys and the
        VTEPs of its peers (drop=True: remove them all)."""
        local = self.advertise_addr
        mark = ESP_MARK | n.vni
        keys = [] if drop else self._keys.get(n.id, [])
        vteps = set() if drop else {v for _, v in n.peers.values() if v != local}
        want_sa: dict[tuple[str, int], tuple[str, bytes]] = {}  # (dst, spi) -> (src, key)
        for r in sorted(vteps):
            if keys:
                spi, k = xfrm.derive_sa(keys[0], local, r)
                want_sa[(r, spi)] = (local, k)
            for key in keys:
                spi, k = xfrm.derive_sa(key, r, local)
                want_sa[(local, spi)] = (r, k)
        with xfrm.Xfrm(self.host_netns) as x:
            held_sa = {(sa.dst, sa.spi) for sa in x.list_sas() if sa.reqid == mark}
            held_pol = {p.dst for p in x.list_policies() if p.mark == mark and p.src == local}
            for r in sorted(vteps - held_pol):  # before any SA: nothing to that VTEP leaves in clear
                x.set_out_policy(local, r, VXLAN_PORT, mark, mark)
            for (dst, spi), (src, k) in want_sa.items():
                if (dst, spi) not in held_sa:
                    x.add_sa(src, dst, spi, k, mark)
            for dst, spi in held_sa - want_sa.keys():
                x.del_sa(dst, spi)
            for r in sorted(held_pol - vteps):
                x.del_out_policy(local, r, VXLAN_PORT, mark)
        if not keys and vteps:
            log.warning("overlay node=%s network=%s encrypted but no keys yet: traffic to %s is dropped "
                        "until the managers send them", self.node_id, n.id, ",".join(sorted(vteps)))

    def _sync_esp_nft(self) -> None:
        """The host table that marks encrypted networks' VXLAN packets for xfrm and drops clear ones."""
        vnis = sorted(n.vni for n in self._nets.values() if n.encrypted)
        if not vnis:
            nft.delete_table(self.host_netns, "ip", ESP_TABLE)
            return
        out = "".join(f"    udp dport {VXLAN_PORT} @th,96,24 {v} meta mark set {ESP_MARK | v:#x}\n" for v in vnis)
        inp = "".join(f"    udp dport {VXLAN_PORT} @th,96,24 {v} meta secpath missing drop\n"
                      f"    udp dport {VXLAN_PORT} @th,96,24 {v} ipsec in reqid != {ESP_MARK | v:#x} drop\n"
                      for v in vnis)
        nft.replace_table(self.host_netns, "ip", ESP_TABLE,
                          f"  chain esp_out {{ type route hook output priority mangle; policy accept;\n{out}  }}\n"
                          f"  chain esp_in {{ type filter hook input priority filter; policy accept;\n{inp}  }}")

    def esp_state(self, network_id: str) -> tuple[list[xfrm.SA], list[xfrm.Policy]]:
        """What the kernel holds for an encrypted network: (SAs, output policies)."""
        with self._lock:
            n = self._nets.get(network_id)
            if n is None:
                return [], []
            mark = ESP_MARK | n.vni
            with xfrm.Xfrm(self.host_netns) as x:
                return ([sa for sa in x.list_sas() if sa.reqid == mark],
                        [p for p in x.list_policies() if p.mark == mark])

    def remove_network(self, network_id: str) -> None:
        with self._lock:
            users = [t for t, ep in self._eps.items() if any(nid == network_id for nid, _ in ep.links)]
            if users:
                raise OverlayError(
                    f"network {network_id} still has tasks attached on this node ({', '.join(users[:3])}); "
                    "detach them first")
            n = self._nets.pop(network_id, None)
            self._pending_peers.pop(network_id, None)
            self._keys.pop(network_id, None)
            self._destroy_sandbox(self._sandbox_name(network_id), n.vni if n else None)
            if n is not None and n.encrypted:
                self._sync_esp(n, drop=True)
                self._sync_esp_nft()
            self._log("network.removed", network=network_id)

    # ------------------------------------------------------------------ peers
    def add_peer(self, network_id: str, ip: str, mac: str, vtep: str) -> None:
        ip = _strip(ip)
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

    def _program_peer(self, n: _Network, ip: str, mac: str, vtep: str) -> None:
        if vtep == self.advertise_addr:
            return
        with self._ipr(ns_path(n.sandbox)) as ipr:
            vx = self._idx(ipr, "vxlan0")
            ipr.fdb("replace", ifindex=vx, lladdr=mac, dst=vtep, state=NUD_PERMANENT, flags=NTF_SELF)
            ipr.neigh("replace", ifindex=vx, dst=ip, lladdr=mac, state=NUD_PERMANENT)

    def remove_peer(self, network_id: str, ip: str, mac: str, vtep: str) -> None:
        ip = _strip(ip)
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
            with self._ipr(ns_path(n.sandbox)) as ipr:
                vx = self._idx(ipr, "vxlan0")
                if vx is None:
                    return
                for kind, kw in (("neigh", {"dst": ip, "lladdr": mac}),
                                 ("fdb", None if still_used else {"lladdr": mac, "dst": vtep,
                                                                  "flags": NTF_SELF})):
                    if kw is None:
                        continue
                    try:
                        getattr(ipr, kind)("del", ifindex=vx, **kw)
                    except NetlinkError as e:
                        if e.code not in (errno.ENOENT, errno.ESRCH):
                            raise
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

    def ingress_ports(self) -> set[tuple[str, int]]:
        """The (protocol, port) pairs published in ingress mode on this node (also restored ones)."""
        with self._lock:
            return {k for k, p in self._host_ports.items() if p.owner == "ingress"}

    def task_networks(self, task_id: str) -> list[str]:
        """The networks a task is attached to on this node (also a task adopted by restore())."""
        with self._lock:
            ep = self._eps.get(task_id)
            return list(dict.fromkeys(nid for nid, _ in ep.links)) if ep is not None else []

    def peer_entries(self, network_id: str) -> tuple[set[tuple[str, str]], set[tuple[str, str]]]:
        """What the kernel holds on the network's vxlan0: ({(mac, vtep)}, {(ip, mac)}) (permanent only)."""
        with self._lock, self._ipr(ns_path(self._sandbox_name(network_id))) as ipr:
            vx = self._idx(ipr, "vxlan0")
            fdb = {(e.get_attr("NDA_LLADDR"), e.get_attr("NDA_DST"))
                   for e in ipr.fdb("dump", ifindex=vx) if e.get_attr("NDA_DST")
                   and e["ifindex"] == vx}
            neigh = {(e.get_attr("NDA_DST"), e.get_attr("NDA_LLADDR"))
                     for e in ipr.get_neighbours(ifindex=vx, family=2) if e["state"] & NUD_PERMANENT}
            return fdb, neigh

    # ------------------------------------------------------------------ gateway bridge
    def _ensure_gw(self) -> None:
        with self._host() as h:
            br = self._idx(h, self.gw_bridge)
            if br is not None and self._gw_ready:
                return
            if br is None:
                h.link("add", ifname=self.gw_bridge, kind="bridge", br_stp_state=0, br_forward_delay=0)
                br = self._idx(h, self.gw_bridge)
            have = {a.get_attr("IFA_ADDRESS") for a in h.get_addr(index=br, family=2)}
            if self.gw_gateway not in have:
                h.addr("add", index=br, address=self.gw_gateway, prefixlen=self.gw_net.prefixlen)
            h.link("set", index=br, state="up")
        nft.set_sysctl(self.host_netns, "net.ipv4.ip_forward", "1")
        self._sync_host_nft()
        self._gw_ready = True

    def _alloc_gw_ip(self, task_id: str) -> str:
        for ip in self.gw_net.hosts():
            s = str(ip)
            if s != self.gw_gateway and s not in self._gw_alloc:
                self._gw_alloc[s] = task_id
                return s
        raise OverlayError(f"gw_subnet {self.gw_net} has no free address left; configure a larger gw_subnet")

    # ------------------------------------------------------------------ attach / detach
    def attach(self, task_id: str, container_netns: str,
               attachments: Sequence[objects_pb2.NetworkAttachment]) -> list[Interface]:
        with self._lock:
            path = ns_path(container_netns)
            old = self._eps.get(task_id)
            if old is not None and old.netns == path and old.interfaces and self._still_there(old):
                return list(old.interfaces)
            if old is not None and not old.interfaces and old.netns in (None, path):
                adopted = self._adopt(old, path, attachments)  # restored after an agent restart
                if adopted is not None:
                    self._log("task.adopted", task=task_id, netns=path)
                    return adopted
            ep = _Endpoint(task_id=task_id, netns=path, nft=False)
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

    def _adopt(self, ep: _Endpoint, path: str, attachments: Sequence[objects_pb2.NetworkAttachment]
               ) -> list[Interface] | None:
        """Take over interfaces an earlier run built, if they are all still in place."""
        if not os.path.exists(path):
            return None
        try:
            with self._ipr(path) as c:
                by_mac = {link.get_attr("IFLA_ADDRESS"): link for link in c.get_links()}
                addrs = {(a["index"], a.get_attr("IFA_ADDRESS")) for a in c.get_addr(family=2)}
            ifaces: list[Interface] = []
            links: list[tuple[str, str]] = []
            egress = False
            for att in attachments:
                n = self._nets.get(att.network.id)
                if n is None or not att.addresses:
                    return None
                iface = ipaddress.ip_interface(att.addresses[0])
                mac = att.mac or mac_from_ip(str(iface.ip))
                link = by_mac.get(mac)
                sb_end = f"ve{_h(ep.task_id, n.id)}"
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
                ifaces.append(Interface("", link.get_attr("IFLA_IFNAME"), f"{ep.gw_ip}/{self.gw_net.prefixlen}",
                                        mac_from_ip(ep.gw_ip), link.get_attr("IFLA_MTU")))
        except (OSError, NetlinkError):
            return None
        if set(links) != set(ep.links):
            return None
        ep.netns, ep.interfaces, ep.links = path, ifaces, links
        # the container's VIP table stays as it is until set_service_backends() brings news
        return list(ifaces)

    def _still_there(self, ep: _Endpoint) -> bool:
        try:
            with self._ipr(ep.netns) as ipr:
                return all(self._idx(ipr, i.ifname) is not None for i in ep.interfaces)
        except (OSError, NetlinkError):
            return False

    def _build_endpoint(self, ep: _Endpoint, attachments: Sequence[objects_pb2.NetworkAttachment]) -> None:
        path = ep.netns
        assert path is not None
        if not os.path.exists(path):
            raise OverlayError(f"task {ep.task_id}: container network namespace {path} does not exist")
        with self._ipr(path) as c:
            used = {link.get_attr("IFLA_IFNAME") for link in c.get_links()}
        names = (f"eth{i}" for i in range(1000) if f"eth{i}" not in used)
        egress = False
        for att in attachments:
            n = self._nets.get(att.network.id) or self._ensure_network(att.network)
            if not att.addresses:
                raise OverlayError(f"task {ep.task_id}: attachment to network {n.id} has no address; "
                                   "the allocator must fill addresses")
            iface = ipaddress.ip_interface(f"{_strip(att.addresses[0])}/{n.subnet.prefixlen}")
            mac = att.mac or mac_from_ip(str(iface.ip))
            ifname = next(names)
            h = _h(ep.task_id, n.id)
            sb_end, c_end = f"ve{h}", f"vc{h}"
            ep.links.append((n.id, sb_end))
            with self._ipr(ns_path(n.sandbox)) as s:
                self._del_link(s, sb_end)
                add_veth(s, sb_end, c_end, path)
                s.link("set", index=self._idx(s, sb_end), mtu=n.mtu, master=self._idx(s, "br0"),
                       ifalias=ep.task_id, state="up")
            self._setup_container_if(path, c_end, ifname, str(iface), mac, n.mtu)
            ep.interfaces.append(Interface(n.id, ifname, str(iface), mac, n.mtu))
            egress = egress or not n.internal
        if egress:
            self._ensure_gw()
            ip = self._alloc_gw_ip(ep.task_id)
            ep.gw_ip = ip
            h = _h(ep.task_id, "gw")
            host_end, c_end = f"gw{h}", f"gc{h}"
            ep.gw_link = host_end
            ifname = next(names)
            mac = mac_from_ip(ip)
            with self._host() as hr:
                self._del_link(hr, host_end)
                add_veth(hr, host_end, c_end, path)
                hr.link("set", index=self._idx(hr, host_end), mtu=self.underlay_mtu,
                        master=self._idx(hr, self.gw_bridge), ifalias=f"{ep.task_id} {ip}", state="up")
            addr = f"{ip}/{self.gw_net.prefixlen}"
            self._setup_container_if(path, c_end, ifname, addr, mac, self.underlay_mtu)
            ep.interfaces.append(Interface("", ifname, addr, mac, self.underlay_mtu))
        if egress:  # as Docker: only internal networks -> no default route ("Network unreachable")
            with self._ipr(path) as c:
                c.route("replace", dst="0.0.0.0/0", gateway=self.gw_gateway)
        self._want_container_nft(ep)  # attach() writes it

    def _setup_container_if(self, path: str, tmp: str, ifname: str, cidr: str, mac: str, mtu: int) -> None:
        iface = ipaddress.ip_interface(cidr)
        with self._ipr(path) as c:
            c.link("set", index=self._idx(c, "lo"), state="up")
            idx = self._idx(c, tmp)
            c.link("set", index=idx, ifname=ifname, address=mac, mtu=mtu)
            c.addr("add", index=idx, address=str(iface.ip), prefixlen=iface.network.prefixlen)
            c.link("set", index=idx, state="up")

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

    def _teardown(self, ep: _Endpoint) -> None:
        for nid, link in ep.links:
            sb = self._sandbox_name(nid)
            if sb in netns.listnetns():
                with self._ipr(ns_path(sb)) as s:
                    self._del_link(s, link)  # its container end goes with it
        if ep.gw_link:
            with self._host() as h:
                self._del_link(h, ep.gw_link)
        if ep.gw_ip:
            self._gw_alloc.pop(ep.gw_ip, None)
        with self._nft_lock:
            ep.gone = True
            if ep.nft and ep.netns and os.path.exists(ep.netns):
                try:
                    nft.delete_table(ep.netns, "ip", TABLE)
                except nft.NftError as e:
                    log.warning("overlay node=%s task=%s nft cleanup failed: %s", self.node_id, ep.task_id, e)

    # ------------------------------------------------------------------ service VIPs
    def set_service_backends(self, network_id: str, vip: str, backend_ips: Sequence[str],
                             ports: Sequence[tuple[str, int]] = ()) -> None:
        """Balance connections to `vip` (on `network_id`) over `backend_ips`, round robin, in every
        local container attached to the network. `ports` limits it to ("tcp"|"udp", port) pairs;
        empty means every packet to the VIP. No backends: connections are refused at once."""
        with self._lock:
            n = self._nets.get(network_id)
            if n is None:
                raise OverlayError(f"network {network_id} is not set up on this node; call ensure_network first")
            for proto, _ in ports:
                if proto not in ("tcp", "udp"):
                    raise OverlayError(f"service port protocol {proto!r} is not supported; use tcp or udp")
            n.services[_strip(vip)] = _Service([_strip(b) for b in backend_ips], list(ports))
            eps = self._want_network_containers(network_id)
        self._apply_containers_nft(eps)
        self._log("service.backends", network=network_id, vip=vip, backends=",".join(backend_ips) or "-")

    def remove_service(self, network_id: str, vip: str) -> None:
        with self._lock:
            n = self._nets.get(network_id)
            if n is None or n.services.pop(_strip(vip), None) is None:
                return
            eps = self._want_network_containers(network_id)
        self._apply_containers_nft(eps)
        self._log("service.removed", network=network_id, vip=vip)

    def _want_network_containers(self, network_id: str) -> list[_Endpoint]:
        """Under _lock: the VIP table every local container of the network should have."""
        eps = [ep for ep in self._eps.values() if any(nid == network_id for nid, _ in ep.links)]
        for ep in eps:
            self._want_container_nft(ep)
        return eps

    def _apply_containers_nft(self, eps: Sequence[_Endpoint]) -> None:
        """Without _lock: write what each container should have (the latest wish, whoever made it)."""
        with self._nft_lock:
            for ep in eps:
                self._apply_container_nft(ep)

    def _apply_container_nft(self, ep: _Endpoint) -> None:
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

    def _want_container_nft(self, ep: _Endpoint) -> None:
        if ep.netns is None:
            return
        nat: list[str] = []
        flt: list[str] = []
        for nid in dict.fromkeys(nid for nid, _ in ep.links):
            n = self._nets.get(nid)
            for vip, svc in (n.services.items() if n else ()):
                if not svc.backends:
                    flt.append(f"ip daddr {vip} meta l4proto tcp reject with tcp reset")
                    flt.append(f"ip daddr {vip} reject")
                    continue
                target = _numgen(svc.backends, None)
                if not svc.ports:
                    nat.append(f"ip daddr {vip} dnat to {target}")
                for proto in ("tcp", "udp"):
                    pl = sorted({p for pr, p in svc.ports if pr == proto})
                    if pl:
                        nat.append(f"ip daddr {vip} {proto} dport {{ {', '.join(map(str, pl))} }} dnat to {target}")
        if not nat and not flt:
            ep.nft_want = ""
            return
        ep.nft_want = ("  chain vip { type nat hook output priority -100; policy accept;\n"
                       + "".join(f"    {r}\n" for r in nat) + "  }\n"
                       "  chain novip { type filter hook output priority 0; policy accept;\n"
                       + "".join(f"    {r}\n" for r in flt) + "  }")

    # ------------------------------------------------------------------ published ports
    def _check_port(self, proto: str, port: int, owner: str) -> None:
        if proto not in ("tcp", "udp"):
            raise OverlayError(f"published port protocol {proto!r} is not supported; use tcp or udp")
        if not 1 <= port <= 65535:
            raise OverlayError(f"published_port {port} is out of range; use 1-65535")
        cur = self._host_ports.get((proto, port))
        if cur is not None and cur.owner != owner:
            who = "the ingress routing mesh" if cur.owner == "ingress" else f"task {cur.owner}"
            raise PortConflictError(
                f"published_port {port}/{proto} is already in use on this node by {who}; "
                "choose another published_port")
        if cur is None and self._port_bound(proto, port):
            raise PortConflictError(
                f"published_port {port}/{proto} is already bound by a program on this node; "
                "stop that program or choose another published_port")

    def _port_bound(self, proto: str, port: int) -> bool:
        kind = socket.SOCK_STREAM if proto == "tcp" else socket.SOCK_DGRAM
        s = netns_socket(self.host_netns, socket.AF_INET, kind)
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

    def publish_host_port(self, task_id: str, protocol: str, published_port: int, target_port: int) -> None:
        """mode=host: DNAT <any local address>:published_port → the task's gateway-bridge address."""
        with self._lock:
            self._check_port(protocol, published_port, task_id)
            ep = self._eps.get(task_id)
            if ep is None:
                raise OverlayError(f"task {task_id} is not attached on this node; attach it before publishing")
            if ep.gw_ip is None:
                raise OverlayError(
                    f"task {task_id}: publish_mode=host needs the task on at least one non-internal network; "
                    "attach it to one or use mode=ingress")
            self._host_ports[(protocol, published_port)] = _Published(task_id, f"{ep.gw_ip}:{target_port}")
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
            if p is None or p.owner == "ingress":
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
            created = self.ingress_sbox not in netns.listnetns()
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
            self._check_port(protocol, published_port, "ingress")
            key = (protocol, published_port)
            old = self._host_ports.get(key)
            self._host_ports[key] = _Published("ingress", str(target_port), [_strip(b) for b in backend_ips])
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
            if p is None or p.owner != "ingress":
                return
            del self._host_ports[(protocol, published_port)]
            self._sync_ingress_nft()
            self._sync_host_nft()
            self._log("port.unpublished", mode="ingress", port=f"{published_port}/{protocol}")

    def _sync_host_nft(self) -> None:
        with self._host() as h:
            if self._idx(h, self.gw_bridge) is None:
                return
        rules = []
        for (proto, port), p in sorted(self._host_ports.items()):
            if p.owner == "ingress":
                if self._ingress_gw_ip is None:
                    continue
                rules.append(f"fib daddr type local {proto} dport {port} dnat to {self._ingress_gw_ip}:{port}"
                             f' comment "ingress {proto} {port} {p.target}"')
            else:
                rules.append(f"fib daddr type local {proto} dport {port} dnat to {p.target}"
                             f' comment "{p.owner} {proto} {port} {p.target}"')
        r = "".join(f"    {x}\n" for x in rules)
        body = (
            f"  chain pre {{ type nat hook prerouting priority -100; policy accept;\n{r}  }}\n"
            f"  chain out {{ type nat hook output priority -100; policy accept;\n{r}  }}\n"
            "  chain post { type nat hook postrouting priority 100; policy accept;\n"
            f"    ip saddr {self.gw_net} oifname != \"{self.gw_bridge}\" masquerade\n"
            # hairpin: a container reaching a port published on its own node comes back through
            # the bridge; without this the answer would bypass the DNAT and be dropped
            f"    ip saddr {self.gw_net} oifname \"{self.gw_bridge}\" ct status dnat masquerade\n  }}")
        nft.replace_table(self.host_netns, "ip", TABLE, body)

    def _sync_ingress_nft(self) -> None:
        if self._ingress is None:
            return
        rules = []
        for (proto, port), p in sorted(self._host_ports.items()):
            if p.owner == "ingress" and p.backends:
                rules.append(f"{proto} dport {port} dnat ip to {_numgen(p.backends, int(p.target))}")
        r = "".join(f"    {x}\n" for x in rules)
        body = (
            f"  chain pre {{ type nat hook prerouting priority -100; policy accept;\n{r}  }}\n"
            "  chain post { type nat hook postrouting priority 100; policy accept;\n"
            f"    ct status dnat oifname \"{self._ingress.ifname}\" masquerade\n  }}")
        nft.replace_table(ns_path(self.ingress_sbox), "ip", TABLE, body)

    def _remove_ingress(self) -> None:
        ep = self._eps.pop(INGRESS_TASK, None)
        if ep is not None:
            self._teardown(ep)
        if self.ingress_sbox in netns.listnetns():
            netns.remove(self.ingress_sbox)
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
            tasks: set[str] = set()
            for name in self._owned_netns():
                if name == self.ingress_sbox:
                    continue
                with self._ipr(ns_path(name)) as ipr:
                    br = self._idx(ipr, "br0")
                    meta = ipr.get_links(br)[0].get_attr("IFLA_IFALIAS") if br is not None else None
                    if not meta or meta.count("|") != 4:
                        log.warning("overlay node=%s sandbox=%s has no metadata; removing it", self.node_id, name)
                        ipr.close()
                        self._destroy_sandbox(name)
                        continue
                    nid, vni, subnet, gw, flags = meta.split("|")
                    n = _Network(id=nid, vni=int(vni), subnet=ipaddress.ip_network(subnet), gateway=gw,
                                 internal=flags[0] == "1", ingress=flags[1] == "1",
                                 mtu=ipr.get_links(br)[0].get_attr("IFLA_MTU"), sandbox=name,
                                 encrypted=flags[2:3] == "1")
                    for link in ipr.get_links():
                        if link.get_attr("IFLA_MASTER") == br and link.get_attr("IFLA_IFNAME").startswith("ve"):
                            task = link.get_attr("IFLA_IFALIAS") or ""
                            tasks.add(task)
                            ep = self._eps.setdefault(task, _Endpoint(task_id=task, netns=None))
                            ep.links.append((nid, link.get_attr("IFLA_IFNAME")))
                self._nets[nid] = n
                fdb, neigh = self.peer_entries(nid)
                vtep_of = dict(fdb)
                for ip, mac in neigh:
                    if mac in vtep_of:
                        n.peers[ip] = (mac, vtep_of[mac])
            with self._host() as h:
                br = self._idx(h, self.gw_bridge)
                links = h.get_links() if br is not None else []
                for link in links:
                    if link.get_attr("IFLA_MASTER") == br and (alias := link.get_attr("IFLA_IFALIAS")):
                        task, _, ip = alias.partition(" ")
                        self._gw_alloc[ip] = task
                        tasks.add(task)
                        ep = self._eps.setdefault(task, _Endpoint(task_id=task, netns=None))
                        ep.gw_ip, ep.gw_link = ip, link.get_attr("IFLA_IFNAME")
            if INGRESS_TASK in self._eps and self.ingress_sbox in netns.listnetns():
                self._eps[INGRESS_TASK].netns = ns_path(self.ingress_sbox)
            # published ports, from the comments of the host table (ingress backends are re-sent)
            for comment in nft.rule_comments(self.host_netns, "ip", TABLE, "pre"):
                owner, proto, port, target = comment.split()
                self._host_ports[(proto, int(port))] = _Published(owner, target)
            tasks.discard(INGRESS_TASK)
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
            for name in self._owned_netns():
                self._destroy_sandbox(name)
            self._pending_peers.clear()
            self._host_ports.clear()
            self._keys.clear()
            with xfrm.Xfrm(self.host_netns) as x:  # an earlier run's, of networks no longer known
                for sa in x.list_sas():
                    if sa.reqid & 0xFF000000 == ESP_MARK and self.advertise_addr in (sa.src, sa.dst):
                        x.del_sa(sa.dst, sa.spi)
                for p in x.list_policies():
                    if p.mark & 0xFF000000 == ESP_MARK and p.src == self.advertise_addr:
                        x.del_out_policy(p.src, p.dst, VXLAN_PORT, p.mark)
            nft.delete_table(self.host_netns, "ip", ESP_TABLE)
            with self._host() as h:
                for link in h.get_links():
                    name = link.get_attr("IFLA_IFNAME")
                    if name.startswith("vx-") or (name.startswith("gw") and len(name) == 12
                                                  and link.get_attr("IFLA_IFALIAS")):
                        self._del_link(h, name)
                self._del_link(h, self.gw_bridge)
            nft.delete_table(self.host_netns, "ip", TABLE)
            self._gw_alloc.clear()
            self._log("cleaned")


def _numgen(backends: Sequence[str], port: int | None) -> str:
    items = ", ".join(f"{i} : {b}" + (f" . {port}" if port is not None else "") for i, b in enumerate(backends))
    if len(backends) == 1 and port is None:
        return backends[0]
    if len(backends) == 1:
        return f"{backends[0]}:{port}"
    return f"numgen inc mod {len(backends)} map {{ {items} }}"
