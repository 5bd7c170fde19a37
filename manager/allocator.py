"""Network allocation: VNIs and subnets for networks, VIPs and published ports for services, and
addresses for tasks' network attachments.

Networks are allocated synchronously when they are created (`allocate_network`, called inside the
control API's transaction), so a bad or exhausted subnet is an error the user sees at once; the
store's apply refuses a duplicate VNI or an overlapping subnet on every replica, so two concurrent
creates cannot both win. Services and tasks are allocated by `Allocator`, a leader-only loop and the
only writer of VIPs, published port numbers and task addresses: it rebuilds what is in use from the
store at every pass, so a new leader never hands out an address twice. A task moves NEW → PENDING
once its attachments are allocated (or at once when it has no network), and only then is scheduled.
An encrypted network gets its IPsec keys with its allocation (`shoal.manager.keymanager`); the copies
of a Network in task and node attachments never carry them.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from shoal.manager.keymanager import give_initial_keys, ipsec_keys, is_encrypted
from shoal.manager.pacing import Pacer
from shoal.manager.store import (
    InvalidArgument,
    StateMachine,
    Store,
    Tx,
    Unavailable,
    drain,
    is_terminal,
    network_subnet,
    wrap,
)
from shoal.proto import objects_pb2, specs_pb2, types_pb2

log = logging.getLogger("shoal.allocator")

# A pass whose writes the store did not confirm (Unavailable: no quorum, or this manager's copy of the
# store still behind the commit) runs again this many seconds later if no event calls for one sooner.
UNCONFIRMED_RETRY = 1.0

VNI_FIRST = 4097
VNI_LAST = (1 << 24) - 1
DEFAULT_POOL = "10.0.0.0/8"
DEFAULT_SUBNET_SIZE = 24
DYNAMIC_PORTS = range(30000, 32768)
INGRESS_NAME = "ingress"

Net = ipaddress.IPv4Network



def cluster_pools(sm: StateMachine) -> tuple[list[Net], int]:
    clusters = sm.list("cluster")
    spec = clusters[0].spec if clusters else specs_pb2.ClusterSpec()
    pools = [ipaddress.ip_network(p) for p in (spec.default_address_pool or [DEFAULT_POOL])]
    return pools, spec.subnet_size or DEFAULT_SUBNET_SIZE  # type: ignore[return-value]


def allocate_network(sm: StateMachine, net: objects_pb2.Network) -> None:
    """Give a new network its VNI and subnet (and gateway), or raise InvalidArgument saying why not."""
    others = [n for n in sm.list("network") if n.id != net.id]
    used_vnis = {n.driver_state.vni for n in others}
    vni = next((v for v in range(VNI_FIRST, VNI_LAST) if v not in used_vnis), None)
    if vni is None:
        raise InvalidArgument("no free VXLAN id is left: remove unused networks")
    taken = [s for s in (network_subnet(n) for n in others) if s is not None]
    pools, size = cluster_pools(sm)
    want = net.spec.ipam.configs[0] if net.spec.ipam.configs else types_pb2.IPAMConfig()
    if want.subnet:
        try:
            subnet = ipaddress.ip_network(want.subnet, strict=True)
        except ValueError as e:
            raise InvalidArgument(f"subnet {want.subnet!r} is not a valid IPv4 network in CIDR form ({e})") from e
        if not isinstance(subnet, Net):
            raise InvalidArgument(f"subnet {want.subnet!r}: only IPv4 subnets are supported")
        if subnet.prefixlen > 29:
            raise InvalidArgument(f"subnet {want.subnet!r} is too small: use a /29 or larger")
        if not any(subnet.subnet_of(p) for p in pools):
            raise InvalidArgument(
                f"subnet {want.subnet} is outside the cluster's address pool ({', '.join(map(str, pools))}): "
                "choose a subnet inside it, or create the cluster with --default-addr-pool"
            )
        clash = next((n for n in others if (s := network_subnet(n)) and s.overlaps(subnet)), None)
        if clash is not None:
            raise InvalidArgument(
                f"subnet {subnet} overlaps {network_subnet(clash)} of network {clash.spec.annotations.name!r}: "
                "choose another subnet"
            )
    else:
        subnet = _next_free_subnet(pools, size, taken)
        if subnet is None:
            raise InvalidArgument(
                f"the address pool ({', '.join(map(str, pools))}) has no free /{size} left: "
                "remove unused networks or give the network a --subnet"
            )
    if want.gateway:
        try:
            gateway = ipaddress.ip_address(want.gateway)
        except ValueError as e:
            raise InvalidArgument(f"gateway {want.gateway!r} is not an IPv4 address") from e
        if gateway not in subnet or gateway in (subnet.network_address, subnet.broadcast_address):
            raise InvalidArgument(f"gateway {gateway} is not a host address of subnet {subnet}: choose one inside it")
    else:
        gateway = subnet.network_address + 1
    net.driver_state.vni = vni
    if not net.spec.driver_config.name:
        net.spec.driver_config.name = "overlay"
    net.driver_state.options.update(net.spec.driver_config.options)
    del net.ipam.configs[:]
    net.ipam.configs.add(subnet=str(subnet), gateway=str(gateway))
    if is_encrypted(net) and not ipsec_keys(net):
        give_initial_keys(net)  # made here, before the transaction is proposed: apply only copies them


def _next_free_subnet(pools: list[Net], size: int, taken: list[Net]) -> Net | None:
    for pool in pools:
        if size < pool.prefixlen:
            continue
        step = 1 << (32 - size)
        addr = int(pool.network_address)
        end = int(pool.broadcast_address)
        while addr + step - 1 <= end:
            cand = ipaddress.ip_network((addr, size))
            clash = next((t for t in taken if t.overlaps(cand)), None)
            if clash is None:
                return cand  # type: ignore[return-value]
            # jump past the clashing subnet
            addr = max(addr + step, ((int(clash.broadcast_address) + 1 + step - 1) // step) * step)
    return None


def mac_for(ip: ipaddress.IPv4Address) -> str:
    """Docker's rule: 02:42 followed by the four bytes of the IPv4 address."""
    return "02:42:" + ":".join(f"{b:02x}" for b in ip.packed)


@dataclass
class _Pool:
    subnet: Net
    used: set[ipaddress.IPv4Address] = field(default_factory=set)
    cursor: int = 0

    def take(self, want: str | None = None) -> ipaddress.IPv4Address:
        if want:
            ip = ipaddress.ip_address(want.split("/")[0])
            if ip in self.subnet and ip not in self.used:
                self.used.add(ip)  # type: ignore[arg-type]
                return ip  # type: ignore[return-value]
        hosts = self.subnet.num_addresses - 2
        for i in range(hosts):
            ip = self.subnet.network_address + 1 + (self.cursor + i) % hosts
            if ip not in self.used:
                self.used.add(ip)
                self.cursor = (self.cursor + i + 1) % hosts
                return ip
        raise InvalidArgument(f"subnet {self.subnet} has no free address left")


class Allocator:
    """Leader loop: VIPs and published ports for services, addresses for tasks, NEW → PENDING."""

    def __init__(self, store: Store, manager: Any = None, debounce: float = 0.01) -> None:
        self.store = store
        self.debounce = debounce
        self.pacer = Pacer(debounce)
        self._ingress_left_out = 0
        # The last pass left something without addresses (a full subnet): a freed address calls for a pass.
        self._waiting = False
        self._unconfirmed = False  # the last pass's writes were not confirmed: run it again soon

    async def run(self) -> None:
        with self.store.watch(["task", "service", "network", "node", "cluster"]) as w:
            # A new cluster's first leader may run before the Cluster object (and its address pool)
            # is written: allocate nothing until it is there.
            while self.store.cluster() is None:
                await w.queue.get()
            await self._ensure_ingress()
            while True:
                try:
                    with self.pacer.timing():
                        await self.allocate_once()
                except Exception:  # keep the loop alive; the next event retries
                    log.exception("allocation pass failed")
                await self._next_pass(w.queue)
                await asyncio.sleep(self.pacer.pause())
                drain(w.queue)

    async def _next_pass(self, queue: asyncio.Queue[Any]) -> None:
        """Wait for a commit that calls for a pass, or at most UNCONFIRMED_RETRY s after a pass whose
        writes were not confirmed (landed or not, the next pass reads the store again)."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(UNCONFIRMED_RETRY if self._unconfirmed else None):
                while not self._calls_for_a_pass(await queue.get()):
                    pass

    def _calls_for_a_pass(self, msg: Any) -> bool:
        """Whether a commit may leave something to allocate. A pass reads the whole store, so the
        status reports of a large fleet (tasks going RUNNING, nodes changing state) must not each
        start one: only new tasks, new nodes without an ingress address, services, networks, the
        cluster, and, while the last pass left something out, whatever frees an address."""
        for ev in msg.events:
            kind = ev.object.WhichOneof("object")
            deleted = ev.action == ev.DELETE
            if kind == "task":
                t = ev.object.task
                if not deleted and t.status.state == types_pb2.NEW and t.desired_state <= types_pb2.RUNNING:
                    return True
                if self._waiting and (deleted or is_terminal(t.status.state)):
                    return True
            elif kind == "node":
                if deleted:
                    if self._waiting:
                        return True
                elif not self._ingress_left_out and not ev.object.node.attachments:
                    return True
            else:
                return True
        return False

    async def _ensure_ingress(self) -> None:
        if self.store.sm.get_by_name("network", INGRESS_NAME) is not None:
            return

        def create(tx: Tx) -> None:
            net = objects_pb2.Network(
                spec=specs_pb2.NetworkSpec(
                    annotations=types_pb2.Annotations(name=INGRESS_NAME),
                    driver_config=types_pb2.Driver(name="overlay"),
                    ingress=True,
                )
            )
            allocate_network(tx.sm, net)
            tx.create(net)

        try:
            await self.store.update(create)
            log.info("created the ingress network")
        except Exception as e:  # e.g. pool exhausted; services publishing ingress ports will say so
            log.warning("could not create the ingress network: %s", e)

    async def allocate_once(self) -> int:
        """One pass over everything unallocated; returns how many objects were written."""
        self._waiting = True  # until this pass ends with nothing left out
        self._unconfirmed = False
        sm = self.store.sm
        pools = self._pools(sm)
        written = 0
        keyed = self._network_keys(sm)
        if keyed:
            written += len(keyed)
            await self._commit(keyed)
        service_updates = []
        ports_used = self._published_ports(sm)
        for svc in sm.list("service"):
            if svc.pending_delete:
                continue
            new_ep = self._service_endpoint(sm, svc, pools, ports_used)
            if new_ep is not None:
                s = objects_pb2.Service()
                s.CopyFrom(svc)
                s.endpoint.CopyFrom(new_ep)
                service_updates.append(s)
        if service_updates:
            written += len(service_updates)
            await self._commit(service_updates)
        node_updates = self._node_attachments(sm, pools)
        if node_updates:
            written += len(node_updates)
            await self._commit(node_updates)
        task_updates = []
        failed = 0
        for task in sm.list("task"):
            if task.status.state != types_pb2.NEW or task.desired_state > types_pb2.RUNNING:
                continue
            t = objects_pb2.Task()
            t.CopyFrom(task)
            try:
                self._task_attachments(sm, t, pools)
            except InvalidArgument as e:
                failed += 1
                t.status.message = f"allocation failed: {e}"
                if task.status.message != t.status.message:
                    task_updates.append(t)
                continue
            t.status.state = types_pb2.PENDING
            t.status.message = "pending task scheduling"
            t.status.timestamp.GetCurrentTime()
            task_updates.append(t)
        if task_updates:
            written += len(task_updates)
            await self._commit(task_updates)
        self._waiting = bool(self._ingress_left_out or failed)
        return written

    async def _commit(self, objs: list[Any]) -> None:
        from shoal.proto import store_pb2

        actions = []
        for o in objs:
            a = store_pb2.StoreAction(kind=store_pb2.StoreAction.UPDATE)
            a.object.MergeFrom(wrap(o))
            actions.append(a)
        # One object whose version moved on (e.g. a concurrent update) must not block the others:
        # commit in one go, and fall back to one by one when the batch is refused. The batch goes in
        # transactions of a few thousand: those before the refused one are committed, so each
        # object whose version moved on since this pass read it is left out of the fallback (the
        # batch wrote it, or another writer did, whose event calls for another pass).
        try:
            await self.store.batch(actions)
        except Unavailable as e:
            # Not refused: unconfirmed. This copy of the store may not show what landed yet, so one
            # by one would send again what the batch wrote (at 2,000 nodes 4,000 writes, a round trip
            # each, while the scheduler got the tasks a few at a time): the next pass reads it again.
            log.warning("allocation batch of %d objects not confirmed (%s): the next pass looks again",
                        len(actions), e)
            self._unconfirmed = True
            return
        except Exception as e:  # noqa: BLE001 - any refusal falls back to one by one
            log.warning("allocation batch of %d objects refused (%s: %s): writing them one by one",
                        len(actions), type(e).__name__, e)
            for a in actions:
                if not self.store.sm.unchanged(a):
                    continue
                try:
                    await self.store.batch([a])
                except Exception as e:
                    log.info("allocation of %s skipped, retried on next event: %s", a.object.WhichOneof("object"), e)

    @staticmethod
    def _network_keys(sm: StateMachine) -> list[objects_pb2.Network]:
        """Encrypted networks without IPsec keys (written before they had any) get their first keys."""
        updates = []
        for net in sm.list("network"):
            if is_encrypted(net) and not net.pending_delete and not ipsec_keys(net):
                n = objects_pb2.Network()
                n.CopyFrom(net)
                give_initial_keys(n)
                updates.append(n)
                log.info("network keys created network=%s name=%s", n.id, n.spec.annotations.name)
        return updates

    # ---- bookkeeping -------------------------------------------------------------------------
    def _pools(self, sm: StateMachine) -> dict[str, _Pool]:
        pools: dict[str, _Pool] = {}
        for net in sm.list("network"):
            subnet = network_subnet(net)
            if subnet is None:
                continue
            pool = _Pool(subnet)
            if net.ipam.configs and net.ipam.configs[0].gateway:
                pool.used.add(ipaddress.ip_address(net.ipam.configs[0].gateway))  # type: ignore[arg-type]
            pools[net.id] = pool
        for svc in sm.list("service"):
            for vip in svc.endpoint.virtual_ips:
                if vip.network_id in pools and vip.addr:
                    pools[vip.network_id].used.add(ipaddress.ip_address(vip.addr.split("/")[0]))  # type: ignore[arg-type]
        attached = [att for node in sm.list("node") for att in node.attachments]
        for task in sm.list("task"):
            if not is_terminal(task.status.state) and task.status.state != types_pb2.NEW:
                attached.extend(task.networks)
        for att in attached:
            pool = pools.get(att.network.id)
            if pool is not None:
                pool.used.update(ipaddress.ip_address(a.split("/")[0]) for a in att.addresses)  # type: ignore[misc]
        return pools

    def _node_attachments(self, sm: StateMachine, pools: dict[str, _Pool]) -> list[objects_pb2.Node]:
        """Every node gets an address on the ingress network, for its routing-mesh sandbox."""
        ingress = sm.get_by_name("network", INGRESS_NAME)
        pool = pools.get(ingress.id) if ingress is not None else None
        updates = []
        left_out = 0
        for node in sm.list("node"):
            if pool is None or any(a.network.id == ingress.id for a in node.attachments):
                continue
            if left_out:  # the subnet is full: no need to search it again for each node
                left_out += 1
                continue
            n = objects_pb2.Node()
            n.CopyFrom(node)
            try:
                ip = pool.take()
            except InvalidArgument:
                left_out += 1
                continue
            att = n.attachments.add()
            att.network.CopyFrom(ingress)
            att.network.ClearField("encryption_keys")  # keys go to nodes only as NetworkKeys assignments
            att.addresses.append(f"{ip}/{pool.subnet.prefixlen}")
            att.mac = mac_for(ip)
            updates.append(n)
        if left_out and left_out != self._ingress_left_out:
            log.warning("%d nodes get no ingress address: the ingress network %s is full", left_out,
                        pool.subnet if pool else "-")
        self._ingress_left_out = left_out
        return updates

    @staticmethod
    def _published_ports(sm: StateMachine) -> set[tuple[int, int]]:
        used = set()
        for svc in sm.list("service"):
            for p in svc.endpoint.ports:
                if p.publish_mode == types_pb2.PortConfig.INGRESS and p.published_port:
                    used.add((p.protocol, p.published_port))
        return used

    def _service_networks(self, sm: StateMachine, svc: objects_pb2.Service) -> list[str]:
        ids = [n.target for n in svc.spec.task.networks]
        if any(p.publish_mode == types_pb2.PortConfig.INGRESS for p in svc.spec.endpoint.ports):
            ingress = sm.get_by_name("network", INGRESS_NAME)
            if ingress is None:
                raise InvalidArgument("the ingress network does not exist: published ports need it")
            ids.insert(0, ingress.id)
        return ids

    def _service_endpoint(
        self, sm: StateMachine, svc: objects_pb2.Service, pools: dict[str, _Pool], ports_used: set[tuple[int, int]]
    ) -> types_pb2.Endpoint | None:
        """The endpoint the service should have, or None when it already has it."""
        spec = svc.spec.endpoint
        cur = svc.endpoint
        ep = types_pb2.Endpoint()
        ep.spec.CopyFrom(spec)
        # published ports: keep what was allocated for the same target/protocol
        prev = {(p.target_port, p.protocol, p.publish_mode): p.published_port for p in cur.ports}
        for p in spec.ports:
            q = ep.ports.add()
            q.CopyFrom(p)
            if not q.published_port and q.publish_mode == types_pb2.PortConfig.INGRESS:
                keep = prev.get((p.target_port, p.protocol, p.publish_mode))
                if keep:
                    q.published_port = keep
                else:
                    q.published_port = next(n for n in DYNAMIC_PORTS if (q.protocol, n) not in ports_used)
                    ports_used.add((q.protocol, q.published_port))
        if spec.mode == types_pb2.EndpointSpec.VIP:
            try:
                nets = self._service_networks(sm, svc)
            except InvalidArgument:
                nets = [n.target for n in svc.spec.task.networks]
            have = {v.network_id: v.addr for v in cur.virtual_ips}
            for nid in nets:
                pool = pools.get(nid)
                if pool is None:
                    continue
                if nid in have and have[nid]:
                    ep.virtual_ips.add(network_id=nid, addr=have[nid])
                else:
                    ip = pool.take()
                    ep.virtual_ips.add(network_id=nid, addr=f"{ip}/{pool.subnet.prefixlen}")
        if ep.SerializeToString(deterministic=True) == cur.SerializeToString(deterministic=True):
            return None
        return ep

    def _task_attachments(self, sm: StateMachine, task: objects_pb2.Task, pools: dict[str, _Pool]) -> None:
        svc = sm.get("service", task.service_id)
        if svc is not None:
            task.endpoint.CopyFrom(svc.endpoint)
            net_ids = self._service_networks(sm, svc)
        else:
            net_ids = [n.target for n in task.spec.networks]
        aliases = {n.target: list(n.aliases) for n in task.spec.networks}
        del task.networks[:]
        taken: list[tuple[_Pool, ipaddress.IPv4Address]] = []
        try:
            for nid in _unique(net_ids):
                net = sm.get("network", nid)
                pool = pools.get(nid)
                if net is None or pool is None:
                    raise InvalidArgument(f"network {nid} does not exist or has no subnet")
                ip = pool.take()
                taken.append((pool, ip))
                att = task.networks.add()
                att.network.CopyFrom(net)
                att.network.ClearField("encryption_keys")  # keys go to nodes only as NetworkKeys assignments
                att.addresses.append(f"{ip}/{pool.subnet.prefixlen}")
                att.aliases.extend(aliases.get(nid, []))
                att.mac = mac_for(ip)
        except InvalidArgument:
            for pool, ip in taken:
                pool.used.discard(ip)
            del task.networks[:]
            raise


def _unique(items: Iterable[str]) -> list[str]:
    seen: dict[str, None] = {}
    for i in items:
        seen.setdefault(i, None)
    return list(seen)
