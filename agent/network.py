"""Networking of one node's tasks: ties the overlay data path, the gossip tables and the DNS together.

`NetworkAgent` is what the worker calls around a container's life:

    net = NetworkAgent(node_id, advertise_addr, state_dir, ns_prefix, gossip_port=7946, gw_subnet=CIDR)
    net.on_session(msg); await net.serve()    # as swarmd does: start with the session's gossip keys,
                                              # join the managers' hosts, set_node, run() -- or by hand:
    await net.start(keys)                     # gossip up, sandboxes of an earlier life adopted
    run = asyncio.create_task(net.run())      # follow the tables (below)
    await net.join(["198.18.0.1:7946"])       # the managers' gossip ports
    await net.set_node(node)                  # the node's ingress attachment -> routing-mesh sandbox
    tn = await net.prepare(task)              # container netns + interfaces + endpoint records + DNS
    ...engine create/start with tn.netns_path and tn.resolv_conf...
    await net.release(task.id)                # everything above undone (records first)
    await net.cleanup()                       # (tests, lab down) remove everything it made, then
    await net.stop()                          # leave the gossip; run() ends; the data path stays

and it runs one control loop (`run`) that follows the gossip endpoint tables: a remote endpoint
becomes an FDB + neighbour entry on this node's VXLAN device (and goes when it goes), every
service VIP on a local network is balanced over the endpoints that carry it, and every port a
service publishes in ingress mode is accepted on this node and routed to that service's endpoints
on the ingress network, wherever they run. `run` first replays what the tables already hold, and
each network's pass also drops kernel peers the table no longer has (an earlier run's).

Agent restart: prepare() keeps each task under `<state_dir>/network/tasks/<task id>.pb`; a new
process's start() adopts the sandboxes and interfaces left in the kernel and announces those tasks
again (records, DNS) before it joins the cluster: the other nodes do not purge them (if they
already had, the endpoints come back at once). Load balancing and peer reconciliation wait for that
first join. The worker's prepare() for the re-adopted task is then a no-op; release() forgets it.
`on_peer(network_id, ip, mac, vtep, added)`, if set, is called after a remote endpoint's kernel
entries were programmed or removed (benchmarks, tests).

A node that advertises a loopback address (a cluster of several swarmd on 127.0.0.x, as the
loopback tests run) has no data path: VXLAN between loopback addresses would only build gateway
bridges, sandboxes and nft tables in the machine's own namespace. Its tasks get a network
namespace of their own with loopback only, and a task on an overlay network fails with a reason.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import os
import random
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from pyroute2 import netns as pr_netns

from shoal.agent.engine import NetworkSetup
from shoal.agent.engine.locks import KeyedLocks
from shoal.agent.localstate import LocalState, RecordDir
from shoal.netdriver.dns import DNSServer
from shoal.netdriver.driverapi import Interface, NetworkDriver
from shoal.netdriver.netns import create_netns
from shoal.netdriver.networkdb import ENDPOINT_TABLE, EventKind, NetworkDB
from shoal.netdriver.overlay.driver import OverlayDriver
from shoal.netdriver.swim import LEFT
from shoal.proto import dispatcher_pb2, gossip_pb2, objects_pb2, types_pb2

log = logging.getLogger("shoal.agent.network")

JOIN_PEER_TRIES = 16  # kept gossip peers tried, one at a time, when no manager answers a join

STACK_LABEL = "com.docker.stack.namespace"
RESOLV_CONF = "nameserver 127.0.0.11\noptions ndots:0\n"
PROTOCOLS = {
    types_pb2.PortConfig.TCP: "tcp",
    types_pb2.PortConfig.UDP: "udp",
    types_pb2.PortConfig.SCTP: "sctp",
}


@dataclass
class _Local:
    netns: str
    networks: list[str]
    host_ports: list[tuple[str, int]]
    task: objects_pb2.Task | None = None
    ifaces: dict[str, Interface] = field(default_factory=dict)  # network id -> its interface
    active: bool = True


def primary_first(keys: Sequence[types_pb2.EncryptionKey], subsystems: Sequence[str]) -> list[bytes]:
    """Keys of the subsystems, primary (the one to send with) first, by Docker's rule
    (NetworkDB.set_bootstrap_keys): ordered by lamport time, the second oldest is primary when there are two
    or more -- the managers add a new key a whole rotation before anybody sends with it."""
    ks = [k.key for k in sorted(keys, key=lambda k: k.lamport_time) if k.subsystem in subsystems]
    if len(ks) > 1:
        ks.insert(0, ks.pop(1))
    return ks


def _gossip_keys(msg: dispatcher_pb2.SessionMessage) -> list[bytes]:
    return primary_first(msg.network_bootstrap_keys, ("", "networking:gossip"))


def _ip(cidr: str) -> str:
    return cidr.split("/")[0]


class NetworkAgent:
    def __init__(
        self,
        node_id: str,
        advertise_addr: str,
        state_dir: Path,
        ns_prefix: str,
        *,
        gossip_port: int = 7946,
        gw_subnet: str = "172.18.0.0/16",
        upstream_dns: Sequence[str] | None = None,
        state: LocalState | None = None,
    ) -> None:
        """`state`: the agent's records (shoal.agent.localstate); with one, serve() starts at once from
        the last session message kept there, before any manager answers."""
        self.node_id = node_id
        self.local_state = state
        self.addr = advertise_addr
        self.prefix = ns_prefix
        self.state_dir = Path(state_dir)
        # the tasks prepared here, for the next run's start() (restored before any session)
        self._prepared: RecordDir[objects_pb2.Task] = RecordDir(self.state_dir / "network" / "tasks", objects_pb2.Task)
        # pyroute2's synchronous sockets refuse to be made on a thread that runs an event loop:
        # the driver is made (and always called) on worker threads.
        self._driver_args = (node_id, advertise_addr, ns_prefix, gw_subnet)
        self._driver: NetworkDriver | None = None
        self.gossip_port = gossip_port
        self.gossip: NetworkDB | None = None
        self.dns: DNSServer | None = None
        self.upstream_dns = upstream_dns
        self._tasks: dict[str, _Local] = {}
        # prepare() and release() of one task run one at a time: after an agent restart the restore
        # in start() and the worker's re-adoption prepare the same running task at once
        self._task_locks = KeyedLocks()
        self._dirty: asyncio.Queue[str] = asyncio.Queue()
        self._vips: dict[str, set[str]] = defaultdict(set)  # network -> VIPs programmed here
        self._ingress_ports: dict[tuple[str, int], tuple[int, list[str]]] = {}
        self._ingress_id = ""
        self._applied: dict[tuple[str, str], tuple[str, str, str]] = {}  # (network, key) -> remote peer
        # called after a remote endpoint's FDB/neighbour entries were programmed (added=True) or
        # removed (added=False): on_peer(network_id, ip, mac, vtep, added); benchmarks and tests
        self.on_peer: Callable[[str, str, str, str, bool], None] | None = None
        self._lock = asyncio.Lock()
        self.loopback = ipaddress.ip_address(advertise_addr).is_loopback
        self._sessions: asyncio.Queue[dispatcher_pb2.SessionMessage] = asyncio.Queue()
        self._ready = asyncio.Event()
        # set once join() has synced the tables with the cluster: before that (a restarted agent),
        # the tables hold only this node's entries, and VIP backends or the peer reconciliation
        # computed from them would drop every remote endpoint for a moment
        self._joined = asyncio.Event()
        self._error = ""
        self._net_keys: dict[str, list[bytes]] = {}  # encrypted network id -> IPsec keys, primary first

    # ---- wired into the agent (swarmd) -----------------------------------------------------------
    def on_session(self, msg: dispatcher_pb2.SessionMessage) -> None:
        """The agent's session messages: gossip keys, the managers to join through, this node."""
        self._sessions.put_nowait(msg)

    async def serve(self) -> None:
        """The node's networking loop: start gossip with the keys of the first session message,
        then follow session messages (keys, seeds, the node's ingress address) and the tables.

        With a LocalState that holds a session message with gossip keys for this node (an agent
        restart; not one of an identity the state dir had before), that one is the first: names, VIPs and published ports are back before any manager answers, and the
        gossip joins through the managers and the peers it last knew (a few of them), so that it
        fills its tables from the other nodes even when no manager is reachable."""
        saved = self.local_state.last_session() if self.local_state is not None else None
        if saved is not None and saved.network_bootstrap_keys and saved.node.id == self.node_id:
            log.info("node=%s networking starts from the last session kept on disk", self.node_id)
            msg = saved
        else:
            msg = await self._sessions.get()
        if self.loopback:
            self._error = (f"this node advertises the loopback address {self.addr}; overlay networks need an "
                           "address other hosts reach (swarmd --advertise-remote-api)")
            log.info("node=%s no data path: %s", self.node_id, self._error)
            self._ready.set()
            return
        try:
            await self.start(_gossip_keys(msg))
        except Exception as e:
            self._error = f"networking could not start on {self.addr} (gossip port {self.gossip_port}): {getattr(e, 'strerror', None) or e}"
            log.error("node=%s overlay networking disabled: %s", self.node_id, self._error)
            self._ready.set()
            return
        self._ready.set()
        async with asyncio.TaskGroup() as tg:
            tg.create_task(self.run())
            while True:
                try:
                    if msg.network_bootstrap_keys:
                        self.gossip.set_bootstrap_keys(msg.network_bootstrap_keys)
                    host_port = [m.addr.rsplit(":", 1)[0] for m in msg.managers if m.addr]
                    await self.join([f"{h}:{self.gossip_port}" for h in host_port])
                    if msg.HasField("node"):
                        await self.set_node(msg.node)
                except Exception as e:
                    log.warning("node=%s session update not applied to networking: %s", self.node_id, e)
                msg = await self._sessions.get()

    # ---- life ------------------------------------------------------------------------------
    @property
    def driver(self) -> NetworkDriver:
        if self._driver is None:
            raise RuntimeError("the overlay driver is not started")
        return self._driver

    async def start(self, keys: Sequence[bytes]) -> None:
        node_id, addr, prefix, gw = self._driver_args
        self._driver = await asyncio.to_thread(OverlayDriver, node_id, addr, prefix, gw_subnet=gw)
        self.gossip = NetworkDB(self.node_id, self.addr, self.addr, port=self.gossip_port, keys=list(keys))
        self.gossip.add_member_listener(lambda _member: self._keep_peers())
        await self.gossip.start()
        self.dns = DNSServer(self.gossip, upstreams=self.upstream_dns)
        found = await asyncio.to_thread(self.driver.restore)
        self._ready.set()
        # Tasks of an earlier life still attached here: announce them again before this node joins
        # the cluster. Otherwise the others, hearing that this (new) process is on none of their
        # networks, would purge its endpoints until the worker prepare()s them again.
        again = 0
        for tid in sorted(found):
            task = self._prepared.get(tid)
            if task is None or not os.path.exists(f"/run/netns/{self._netns_name(tid)}"):
                continue
            try:
                await self.prepare(task)
                again += 1
            except Exception as e:
                log.warning("node=%s task=%s networking of an earlier run not restored: %s", self.node_id, tid, e)
        log.info(
            "node=%s network agent started gossip=%s:%d adopted=%d restored=%d",
            self.node_id,
            self.addr,
            self.gossip_port,
            len(found),
            again,
        )

    def set_keys(self, keys: Sequence[bytes]) -> None:
        """Replace the gossip keys (primary first); keys no longer listed stop working."""
        if self.gossip is None or not keys:
            return
        self.gossip.set_keys(keys)

    def set_network_keys(self, network_id: str, keys: Sequence[types_pb2.EncryptionKey] | None) -> None:
        """The IPsec keys of an encrypted network this node has tasks on (None: no longer needed here).
        Applied to the data path by the network's next sync (and by prepare(), before its sandbox)."""
        if keys is None:
            self._net_keys.pop(network_id, None)
            return
        self._net_keys[network_id] = primary_first(keys, ("", "networking:ipsec"))
        self._dirty.put_nowait(network_id)

    def set_all_network_keys(self, keys: dict[str, Sequence[types_pb2.EncryptionKey]]) -> None:
        """A complete assignment set's keys: networks not in it have none here any more."""
        for nid in set(self._net_keys) - set(keys):
            self.set_network_keys(nid, None)
        for nid, ks in keys.items():
            self.set_network_keys(nid, ks)

    async def _push_keys(self, network_id: str) -> None:
        keys = self._net_keys.get(network_id)
        if keys and self._driver is not None:
            await asyncio.to_thread(self._driver.set_network_keys, network_id, keys)

    def _known_peers(self) -> list[str]:
        """The gossip peers this node last heard (kept on disk), in a random order."""
        peers = self.local_state.gossip_peers() if self.local_state is not None else []
        return random.sample(peers, len(peers))

    def _keep_peers(self) -> None:
        """The gossip members this node knows (but those that left) to disk: the candidates a restart
        joins through when no manager answers. Called as the membership changes; the file is written
        only when the list changed."""
        if self.local_state is None or self.gossip is None:
            return
        try:
            self.local_state.save_gossip_peers(
                f"{m.addr}:{m.port}" for m in self.gossip.members() if m.node_id != self.node_id and m.state != LEFT)
        except OSError as e:
            log.warning("node=%s gossip peers not kept on disk: %s", self.node_id, e)

    async def join(self, seeds: Sequence[str]) -> int:
        """Join the gossip through `seeds` (the managers' hosts); when none answers (every manager
        down), through the peers kept on disk, one at a time in a random order until one answers (at
        most JOIN_PEER_TRIES): any live node fills the tables. Returns how many answered."""
        assert self.gossip is not None
        mine = f"{self.addr}:"
        seeds = list(dict.fromkeys(s for s in seeds if s and not s.startswith(mine)))
        try:
            n = await self.gossip.join(seeds) if seeds else 0
            if n == 0:
                for peer in [p for p in self._known_peers() if p not in seeds and not p.startswith(mine)][
                        :JOIN_PEER_TRIES]:
                    if await self.gossip.join([peer]):
                        log.info("node=%s no manager answered: joined the gossip through %s", self.node_id, peer)
                        return 1
            return n
        finally:
            self._joined.set()
            self._keep_peers()

    async def stop(self) -> None:
        self._keep_peers()
        if self.dns is not None:
            await self.dns.close()
        if self.gossip is not None:
            with contextlib.suppress(Exception):
                await self.gossip.leave()
            await self.gossip.stop()

    async def run(self) -> None:
        """Follow the endpoint tables; program peers, VIP backends and ingress ports. Ends when the
        gossip stops (stop())."""
        assert self.gossip is not None
        sub = self.gossip.subscribe()  # before the replay, so that nothing falls in between
        sync = asyncio.create_task(self._sync_loop(), name=f"net-sync-{self.node_id}")
        try:
            # entries already in the tables (a join or sync before this loop started)
            for nid in sorted(self.gossip.networks()):
                for key, value in self.gossip.entries(ENDPOINT_TABLE, nid).items():
                    e = self.gossip.store.get(ENDPOINT_TABLE, nid, key)
                    if e is not None and e.owner != self.node_id:
                        await self._peer(EventKind.CREATE, nid, key, value)
                self._dirty.put_nowait(nid)
            async for ev in sub:
                if ev.table != ENDPOINT_TABLE:
                    continue
                if ev.owner != self.node_id:
                    if ev.kind == EventKind.DELETE and self._joined.is_set():
                        # An endpoint went: stop sending it new connections before its peer entries go.
                        try:
                            await self._sync_network(ev.network_id)
                        except Exception as e:
                            log.warning("node=%s network=%s load balancing not updated: %s", self.node_id,
                                        ev.network_id, e)
                    await self._peer(ev.kind, ev.network_id, ev.key, ev.value)
                self._dirty.put_nowait(ev.network_id)
        finally:
            sub.close()
            sync.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sync

    async def _peer(self, kind: EventKind, network_id: str, key: str, value: bytes) -> None:
        """A remote endpoint appeared, changed or went: its FDB + neighbour entries follow."""
        k = (network_id, key)
        old = self._applied.get(k)
        new: tuple[str, str, str] | None = None
        if kind != EventKind.DELETE:
            try:
                rec = gossip_pb2.EndpointRecord.FromString(value)
            except Exception:
                log.warning("node=%s network=%s endpoint %s: undecodable record", self.node_id, network_id, key)
                return
            if rec.ip and rec.mac and rec.vtep and rec.vtep != self.addr:
                new = (_ip(rec.ip), rec.mac, rec.vtep)
        if old == new:
            return
        try:
            if old is not None:
                del self._applied[k]
                await asyncio.to_thread(self.driver.remove_peer, network_id, *old)
                self._notify_peer(network_id, old, False)
            if new is not None:
                await asyncio.to_thread(self.driver.add_peer, network_id, *new)
                self._applied[k] = new
                self._notify_peer(network_id, new, True)
        except Exception as e:
            log.warning("node=%s network=%s endpoint=%s peer %s not programmed: %s", self.node_id, network_id, key,
                        new or old, e)

    def _notify_peer(self, network_id: str, peer: tuple[str, str, str], added: bool) -> None:
        if self.on_peer is not None:
            try:
                self.on_peer(network_id, *peer, added)
            except Exception:
                log.exception("node=%s on_peer callback failed", self.node_id)

    async def _sync_loop(self) -> None:
        with contextlib.suppress(TimeoutError):  # no join() (a lone node): go ahead after a while
            await asyncio.wait_for(self._joined.wait(), 10)
        while True:
            nid = await self._dirty.get()
            await asyncio.sleep(0.02)  # gather a burst of changes
            nets = {nid}
            while not self._dirty.empty():
                nets.add(self._dirty.get_nowait())
            for n in sorted(nets):
                try:
                    await self._sync_network(n)
                except Exception as e:
                    log.warning("node=%s network=%s load balancing not updated: %s", self.node_id, n, e)

    def _records(self, network_id: str) -> list[gossip_pb2.EndpointRecord]:
        assert self.gossip is not None
        out = []
        for raw in self.gossip.entries(ENDPOINT_TABLE, network_id).values():
            try:
                out.append(gossip_pb2.EndpointRecord.FromString(raw))
            except Exception:
                continue
        return out

    async def _sync_network(self, network_id: str) -> None:
        """Bring the network's VIP backends, ingress ports and peers in line with its table."""
        async with self._lock:
            records = self._records(network_id)
            here = any(network_id in t.networks for t in self._tasks.values())
            if here:
                await self._push_keys(network_id)
                backends: dict[str, set[str]] = defaultdict(set)
                for r in records:
                    if r.vip and r.ip and r.endpoint_mode != "dnsrr":
                        ips = backends[_ip(r.vip)]  # a VIP with only inactive endpoints rejects
                        if not r.inactive:
                            ips.add(_ip(r.ip))
                for vip, ips in backends.items():
                    await asyncio.to_thread(self.driver.set_service_backends, network_id, vip, sorted(ips))
                for vip in self._vips[network_id] - set(backends):
                    await asyncio.to_thread(self.driver.remove_service, network_id, vip)
                self._vips[network_id] = set(backends)
            else:
                self._vips.pop(network_id, None)  # the sandbox went with the last task
            if network_id == self._ingress_id:
                ports: dict[tuple[str, int], tuple[int, list[str]]] = {}
                for r in records:
                    if r.inactive:
                        continue
                    for p in r.ingress_ports:
                        key = (p.protocol, p.published_port)
                        ports.setdefault(key, (p.target_port, []))[1].append(_ip(r.ip))
                for (proto, pub), (target, ips) in ports.items():
                    ips.sort()
                    if self._ingress_ports.get((proto, pub)) != (target, ips):
                        await asyncio.to_thread(self.driver.set_ingress_backends, proto, pub, target, ips)
                # also ports an earlier run published (restored from the host's nft table)
                held = await asyncio.to_thread(self.driver.ingress_ports)
                for proto, pub in (set(self._ingress_ports) | held) - set(ports):
                    await asyncio.to_thread(self.driver.unpublish_ingress, proto, pub)
                self._ingress_ports = ports
            if here or network_id == self._ingress_id:
                # peers the kernel holds but the table no longer has (an earlier life's, adopted by
                # restore(), or an event lost to an error) go too
                held = await asyncio.to_thread(self.driver.peers, network_id)
                table_ips = {_ip(r.ip) for r in self._records(network_id) if r.ip}  # read after `held`
                for ip, (mac, vtep) in held.items():
                    if ip not in table_ips:
                        await asyncio.to_thread(self.driver.remove_peer, network_id, ip, mac, vtep)
                        self._notify_peer(network_id, (ip, mac, vtep), False)
                        log.info("node=%s network=%s stale peer %s@%s removed", self.node_id, network_id, ip, vtep)

    # ---- the node's ingress sandbox ------------------------------------------------------------
    async def set_node(self, node: objects_pb2.Node) -> None:
        """Build the routing-mesh sandbox from the node's ingress attachment (once it has one)."""
        assert self.gossip is not None
        for att in node.attachments:
            if not att.network.spec.ingress or not att.addresses:
                continue
            if self._ingress_id == att.network.id:
                return
            iface = await asyncio.to_thread(
                self.driver.ensure_ingress, att.network, att.addresses[0], att.mac
            )
            self._ingress_id = att.network.id
            await self.gossip.join_network(att.network.id)
            rec = gossip_pb2.EndpointRecord(
                ip=_ip(iface.address), mac=iface.mac, vtep=self.addr, node_id=self.node_id
            )
            self.gossip.put(ENDPOINT_TABLE, att.network.id, f"sbox-{self.node_id}", rec.SerializeToString())
            self._dirty.put_nowait(att.network.id)
            log.info("node=%s ingress sandbox up addr=%s", self.node_id, iface.address)

    # ---- tasks -------------------------------------------------------------------------------
    def _netns_name(self, task_id: str) -> str:
        return f"{self.prefix}-c{task_id[:12]}"

    async def prepare(self, task: objects_pb2.Task, *, active: bool = True) -> NetworkSetup:
        """Make the task's network namespace and everything in it; undone by release().

        active=False: the endpoint is announced (peers, task name) but does not serve its service
        yet (no VIP backend, no service/alias name, no ingress routing) until activate().

        Idempotent: after an agent restart, call it again for a re-adopted running task -- its
        namespace and interfaces are kept, its endpoint records and DNS server come back. Calls for
        the same task, and release(), wait for each other."""
        await self._ready.wait()
        async with self._task_locks.hold(task.id):
            return await self._prepare(task, active)

    async def _prepare(self, task: objects_pb2.Task, active: bool) -> NetworkSetup:
        if task.networks and (self.gossip is None or self.dns is None):
            raise RuntimeError(f"overlay networking is not available on this node: {self._error or 'not started'}")
        name = self._netns_name(task.id)
        path = f"/run/netns/{name}"
        if not os.path.exists(path):
            await asyncio.to_thread(create_netns, name)
        nets = [att.network.id for att in task.networks]
        local = _Local(path, nets, [])
        self._tasks[task.id] = local
        try:
            if self._driver is None:  # loopback node: a namespace with loopback only
                return NetworkSetup(netns_path=path)
            for nid in nets:
                await self._push_keys(nid)  # an encrypted network's sandbox is built with its keys
            ifaces = await asyncio.to_thread(self.driver.attach, task.id, path, list(task.networks))
            for nid in nets:
                await self.gossip.join_network(nid)  # type: ignore[union-attr]
            local.task, local.ifaces, local.active = task, {i.network_id: i for i in ifaces}, active
            self._put_records(local)
            for p in task.endpoint.ports:
                if p.publish_mode == types_pb2.PortConfig.HOST and p.published_port:
                    proto = PROTOCOLS[p.protocol]
                    await asyncio.to_thread(
                        self.driver.publish_host_port, task.id, proto, p.published_port, p.target_port
                    )
                    local.host_ports.append((proto, p.published_port))
            # every container with networks gets the resolver its resolv.conf names; one only on the
            # ingress network (no names there) has everything forwarded
            user_nets = [a.network.id for a in task.networks if not a.network.spec.ingress]
            if task.networks and self.dns is not None:
                stack = task.service_annotations.labels.get(STACK_LABEL, "")
                # only internal networks: no egress, so no name leaves the host either (Docker >= 26)
                egress = any(not a.network.spec.internal for a in task.networks)
                await self.dns.serve_in(task.id, path, user_nets, stack or None, forward=egress)
            for nid in nets:
                self._dirty.put_nowait(nid)
            await asyncio.to_thread(self._prepared.put, task.id, task)
        except BaseException as e:
            try:
                await self._release(task.id)
            except Exception as e2:
                log.warning("node=%s task=%s release after a failed prepare failed: %s", self.node_id, task.id, e2)
            if isinstance(e, Exception):
                log.warning("node=%s task=%s networking not prepared: %s", self.node_id, task.id, e)
            raise
        return NetworkSetup(path, RESOLV_CONF if task.networks else None, addresses=[i.address for i in ifaces])

    def _put_records(self, local: _Local) -> None:
        """The task's endpoint record on each of its networks (again, when something changed)."""
        task = local.task
        assert task is not None and self.gossip is not None
        stack = task.service_annotations.labels.get(STACK_LABEL, "")
        dnsrr = task.endpoint.spec.mode == types_pb2.EndpointSpec.DNSRR
        vips = {v.network_id: v.addr for v in task.endpoint.virtual_ips}
        ingress = [
            gossip_pb2.PublishedPort(
                protocol=PROTOCOLS[p.protocol], published_port=p.published_port, target_port=p.target_port
            )
            for p in task.endpoint.ports
            if p.publish_mode == types_pb2.PortConfig.INGRESS and p.published_port
        ]
        for att in task.networks:
            iface = local.ifaces.get(att.network.id)
            if iface is None:
                continue
            rec = gossip_pb2.EndpointRecord(
                task_id=task.id,
                task_name=task.annotations.name,
                service_name=task.service_annotations.name,
                service_id=task.service_id,
                ip=_ip(iface.address),
                mac=iface.mac,
                vtep=self.addr,
                vip="" if dnsrr else _ip(vips.get(att.network.id, "")),
                aliases=list(att.aliases),
                stack=stack,
                endpoint_mode="dnsrr" if dnsrr else "vip",
                node_id=self.node_id,
                container_id=task.id,
                inactive=not local.active,
            )
            if att.network.spec.ingress:
                rec.ingress_ports.extend(ingress)
            self.gossip.put(ENDPOINT_TABLE, att.network.id, task.id, rec.SerializeToString())

    async def activate(self, task_id: str) -> None:
        """The task serves its service (its container runs, and is healthy if it has a health check):
        VIP backend, DNS service and alias names, ingress routing, on every node."""
        await self._set_active(task_id, True)

    async def deactivate(self, task_id: str) -> None:
        """The task stops serving its service (call it before stopping the container, as Docker does):
        the other nodes stop sending new connections to it; it keeps its peers and interfaces."""
        await self._set_active(task_id, False)

    async def _set_active(self, task_id: str, active: bool) -> None:
        local = self._tasks.get(task_id)
        if local is None or local.task is None or local.active == active:
            return
        local.active = active
        self._put_records(local)
        for nid in local.networks:
            self._dirty.put_nowait(nid)
        log.info("node=%s task=%s %s", self.node_id, task_id, "activated" if active else "deactivated")

    async def release(self, task_id: str) -> None:
        """Undo prepare(): endpoint records, DNS, interfaces, published ports, the namespace, and the
        network sandboxes no other local task uses. Also for a task this process never prepared
        (found by restore() after an agent restart)."""
        async with self._task_locks.hold(task_id):
            await self._release(task_id)

    async def _release(self, task_id: str) -> None:
        local = self._tasks.pop(task_id, None)
        self._prepared.delete(task_id)
        nets = list(local.networks) if local else []
        self._delete_records(task_id, nets)  # first: the other nodes stop sending to it at once
        if self.dns is not None:
            await self.dns.stop_serving(task_id)
        if self._driver is not None:
            more = [n for n in await asyncio.to_thread(self._driver.task_networks, task_id) if n not in nets]
            self._delete_records(task_id, more)
            nets += more
        async with self._lock:
            if self._driver is not None:
                await asyncio.to_thread(self._driver.detach, task_id)
            name = self._netns_name(task_id)
            if os.path.exists(f"/run/netns/{name}"):
                await asyncio.to_thread(pr_netns.remove, name)
            still = {n for t in self._tasks.values() for n in t.networks}
            for nid in nets:
                self._dirty.put_nowait(nid)
                if nid in still or nid == self._ingress_id:
                    continue
                if self.gossip is not None:
                    await self.gossip.leave_network(nid)
                if self._driver is not None:
                    try:
                        await asyncio.to_thread(self._driver.remove_network, nid)
                    except Exception as e:  # another (restored) task still on it: kept for its release
                        log.info("node=%s network=%s sandbox kept: %s", self.node_id, nid, e)
        log.info("node=%s task=%s networking released networks=%s", self.node_id, task_id, ",".join(nets) or "-")

    def _delete_records(self, task_id: str, networks: Sequence[str]) -> None:
        if self.gossip is None:
            return
        for nid in networks:
            if nid in self.gossip.networks() and task_id in self.gossip.entries(ENDPOINT_TABLE, nid):
                self.gossip.delete(ENDPOINT_TABLE, nid, task_id)

    async def cleanup(self) -> None:
        """Remove everything this node's networking made (tests, lab down)."""
        for tid in list(self._tasks):
            await self.release(tid)
        if self.gossip is not None and self._ingress_id:
            nid, self._ingress_id = self._ingress_id, ""
            key = f"sbox-{self.node_id}"
            if nid in self.gossip.networks() and key in self.gossip.entries(ENDPOINT_TABLE, nid):
                self.gossip.delete(ENDPOINT_TABLE, nid, key)
            await self.gossip.leave_network(nid)
            self._ingress_ports.clear()
        if self._driver is not None:
            await asyncio.to_thread(self._driver.cleanup)
        self._prepared.clear()
        log.info("node=%s networking cleaned up", self.node_id)
