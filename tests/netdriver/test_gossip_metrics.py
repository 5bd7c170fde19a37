"""The gossip gauges (shoal.netdriver.metrics) read from real NetworkDB nodes on loopback sockets: members
by SWIM state, table entries, networks; and no samples while a node has no gossip."""

from __future__ import annotations

import os

import pytest
from helpers.aio import aiotest
from helpers.waiting import wait_for_async as until
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from shoal.netdriver import metrics
from shoal.netdriver.networkdb import ENDPOINT_TABLE, NetworkDB

pytestmark = pytest.mark.integration  # real sockets between nodes, as the other gossip tests

PORT = 20000 + (os.getpid() + 7) % 20000
ADDRS = [f"127.{10 + (os.getpid() + 3) % 200}.251.{i}" for i in (1, 2)]
KEY = bytes(range(32))


def samples(reg: CollectorRegistry) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for fam in text_string_to_metric_families(generate_latest(reg).decode()):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


@aiotest
async def test_gossip_gauges_follow_members_tables_and_networks() -> None:
    a = NetworkDB("ga", ADDRS[0], ADDRS[0], port=PORT, keys=[KEY])
    b = NetworkDB("gb", ADDRS[1], ADDRS[1], port=PORT, keys=[KEY])
    live: dict[str, NetworkDB | None] = {"db": None}
    reg = CollectorRegistry()
    metrics.enable(reg, lambda: live["db"])
    assert not [k for k in samples(reg) if k[0].startswith("shoal_gossip")]  # no gossip yet: no samples
    try:
        await a.start()
        await b.start()
        live["db"] = a
        s = samples(reg)
        assert s[("shoal_gossip_members", (("state", "alive"),))] == 1  # itself
        assert s[("shoal_gossip_networks", ())] == 0
        assert await b.join([f"{ADDRS[0]}:{PORT}"]) == 1
        await until(lambda: samples(reg)[("shoal_gossip_members", (("state", "alive"),))] == 2, "2 alive members")
        for g in (a, b):
            await g.join_network("net1")
        b.put(ENDPOINT_TABLE, "net1", "task1", b"x")
        b.put(ENDPOINT_TABLE, "net1", "task2", b"y")
        a.put(ENDPOINT_TABLE, "net1", "task3", b"z")
        await until(lambda: samples(reg).get(("shoal_gossip_table_entries", (("table", ENDPOINT_TABLE),))) == 3,
                    "3 endpoint entries on a")
        assert samples(reg)[("shoal_gossip_networks", ())] == 1
        b.delete(ENDPOINT_TABLE, "net1", "task2")  # a tombstone is not a live entry
        await until(lambda: samples(reg).get(("shoal_gossip_table_entries", (("table", ENDPOINT_TABLE),))) == 2,
                    "2 endpoint entries on a after a delete")
        await b.stop()  # gone without leaving: suspect, then dead
        await until(lambda: samples(reg)[("shoal_gossip_members", (("state", "alive"),))] == 1
                    and samples(reg)[("shoal_gossip_members", (("state", "alive"),))] +
                    samples(reg)[("shoal_gossip_members", (("state", "suspect"),))] +
                    samples(reg)[("shoal_gossip_members", (("state", "dead"),))] == 2,
                    "b no longer alive on a", timeout=30)
    finally:
        await a.stop()
        await b.stop()
