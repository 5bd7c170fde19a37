"""Feed the overlay driver from the gossip endpoint table.

The agent runs one :class:`PeerSync` per node. It follows ``ENDPOINT_TABLE`` events of every
network the node has joined in gossip and turns them into overlay driver calls:

* a remote endpoint appears / changes / goes → ``add_peer`` / ``remove_peer`` + ``add_peer`` /
  ``remove_peer`` ``(network_id, ip, mac, vtep)`` (FDB + neighbour entries on the VXLAN device);
* the set of endpoints behind a VIP on a network changes (local and remote endpoints alike,
  ``endpoint_mode`` vip) → ``set_service_backends(network_id, vip, ips)``, or
  ``remove_service(network_id, vip)`` when the last one goes.

Driver calls are synchronous (netlink); they run through ``asyncio.to_thread`` one at a time, in
event order. A failing call is logged and does not stop the feed.

API::

    PeerSync(gossip: Gossip, driver)      # driver: add_peer, remove_peer, set_service_backends,
                                           #         remove_service (shoal.netdriver.overlay)
        await run()                        # replays current entries, then follows events until
                                           # cancelled
        endpoints(network_id) -> dict[str, EndpointRecord]   # what it has applied
"""

from __future__ import annotations

import asyncio
import logging

from shoal.netdriver.gossip import ENDPOINT_TABLE, EventKind, Gossip, TableEvent
from shoal.proto.gossip_pb2 import EndpointRecord

log = logging.getLogger("shoal.netdriver.peersync")


def _vip(r: EndpointRecord) -> str:
    return r.vip.split("/")[0] if r.vip and r.endpoint_mode != "dnsrr" else ""


def _ip(r: EndpointRecord) -> str:
    return r.ip.split("/")[0]


class PeerSync:
    def __init__(self, gossip: Gossip, driver) -> None:
        self.gossip = gossip
        self.driver = driver
        self._eps: dict[tuple[str, str], tuple[EndpointRecord, str]] = {}  # (network, key) -> (record, owner)
        self._backends: dict[tuple[str, str], list[str]] = {}             # (network, vip) -> ips applied

    def endpoints(self, network_id: str) -> dict[str, EndpointRecord]:
        return {k: r for (n, k), (r, _) in self._eps.items() if n == network_id}

    async def run(self) -> None:
        sub = self.gossip.subscribe()  # before the snapshot, so nothing falls in between
        try:
            for n in sorted(self.gossip.networks()):
                for key, value in self.gossip.entries(ENDPOINT_TABLE, n).items():
                    entry = self.gossip.store.get(ENDPOINT_TABLE, n, key)
                    owner = entry.owner if entry is not None else ""
                    await self._apply(TableEvent(EventKind.CREATE, ENDPOINT_TABLE, n, key, value, owner))
            async for ev in sub:
                if ev.table == ENDPOINT_TABLE:
                    await self._apply(ev)
        finally:
            sub.close()

    async def _call(self, name: str, *args) -> bool:
        try:
            await asyncio.to_thread(getattr(self.driver, name), *args)
            return True
        except Exception as e:
            log.warning("node=%s overlay %s%s failed: %s", self.gossip.node_id, name, args, e)
            return False

    async def _apply(self, ev: TableEvent) -> None:
        k = (ev.network_id, ev.key)
        old = self._eps.get(k)
        if ev.kind == EventKind.DELETE:
            if old is None:
                return
            del self._eps[k]
            new = None
        else:
            try:
                rec = EndpointRecord.FromString(ev.value)
            except Exception:
                log.warning("node=%s network=%s endpoint %s: undecodable record", self.gossip.node_id,
                            ev.network_id, ev.key)
                return
            new = (rec, ev.owner)
            if old is not None and old[0] == rec and old[1] == ev.owner:
                return  # replayed
            self._eps[k] = new
        me = self.gossip.node_id
        old_peer = (_ip(old[0]), old[0].mac, old[0].vtep) if old is not None and old[1] != me else None
        new_peer = (_ip(new[0]), new[0].mac, new[0].vtep) if new is not None and new[1] != me else None
        if old_peer != new_peer:
            if old_peer is not None:
                await self._call("remove_peer", ev.network_id, *old_peer)
            if new_peer is not None:
                await self._call("add_peer", ev.network_id, *new_peer)
        for vip in {v for v in (old and _vip(old[0]), new and _vip(new[0])) if v}:
            await self._sync_vip(ev.network_id, vip)

    async def _sync_vip(self, network_id: str, vip: str) -> None:
        ips = sorted({_ip(r) for (n, _), (r, _) in self._eps.items() if n == network_id and _vip(r) == vip})
        if self._backends.get((network_id, vip)) == ips:
            return
        if ips:
            if await self._call("set_service_backends", network_id, vip, ips):
                self._backends[(network_id, vip)] = ips
        elif await self._call("remove_service", network_id, vip):
            self._backends.pop((network_id, vip), None)
