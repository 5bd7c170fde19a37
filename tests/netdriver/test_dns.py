"""Embedded DNS (shoal.netdriver.dns): wire format and name rules (unit), and a real server bound to
127.0.0.11:53 inside container network namespaces, answering from gossip tables filled by another
gossip node, queried by busybox nslookup and a raw UDP/TCP client run in the namespace, forwarding
to a fake upstream resolver of the test on loopback."""

from __future__ import annotations

import asyncio
import os
import struct
import subprocess
import sys

import pytest
from helpers.aio import aiotest

from shoal.netdriver.dns import (
    RCODE_NXDOMAIN,
    RCODE_OK,
    RCODE_SERVFAIL,
    TYPE_A,
    TYPE_PTR,
    DNSServer,
    build_query,
    build_response,
    parse_query,
    parse_response,
)
from shoal.netdriver.networkdb import ENDPOINT_TABLE, NetworkDB
from shoal.netdriver.tables import TableStore
from shoal.proto.gossip_pb2 import EndpointRecord, TableEntry

PORT = 20000 + (os.getpid() + 7) % 20000
NET = 10 + (os.getpid() + 3) % 200
TYPE_AAAA = 28


# records: network netA holds stack "demo" (web in vip mode with an alias, db in dnsrr mode) and
# service other_api of stack "other"; netB holds "hidden"
RECORDS = {
    "netA": [
        EndpointRecord(task_id="t1", task_name="demo_web.1.t1", service_name="demo_web", service_id="s1",
                       ip="198.19.5.3", vip="198.19.5.2", aliases=["frontend"], stack="demo"),
        EndpointRecord(task_id="t2", task_name="demo_web.2.t2", service_name="demo_web", service_id="s1",
                       ip="198.19.5.4", vip="198.19.5.2", aliases=["frontend"], stack="demo"),
        EndpointRecord(task_id="t3", task_name="demo_db.1.t3", service_name="demo_db", service_id="s2",
                       ip="198.19.5.10", stack="demo", endpoint_mode="dnsrr"),
        EndpointRecord(task_id="t4", task_name="demo_db.2.t4", service_name="demo_db", service_id="s2",
                       ip="198.19.5.11", stack="demo", endpoint_mode="dnsrr"),
        EndpointRecord(task_id="t5", task_name="other_api.1.t5", service_name="other_api", service_id="s3",
                       ip="198.19.5.21", vip="198.19.5.20", stack="other"),
    ],
    "netB": [
        EndpointRecord(task_id="t6", task_name="hidden.1.t6", service_name="hidden", service_id="s4",
                       ip="198.19.6.3", vip="198.19.6.2"),
    ],
}

# name -> (rcode, sorted IPs) for a container of stack "demo" on netA only
EXPECT_DEMO = {
    "web": (RCODE_OK, ["198.19.5.2"]),
    "WEB.": (RCODE_OK, ["198.19.5.2"]),
    "demo_web": (RCODE_OK, ["198.19.5.2"]),
    "frontend": (RCODE_OK, ["198.19.5.2"]),
    "tasks.web": (RCODE_OK, ["198.19.5.3", "198.19.5.4"]),
    "tasks.demo_web": (RCODE_OK, ["198.19.5.3", "198.19.5.4"]),
    "tasks.frontend": (RCODE_OK, ["198.19.5.3", "198.19.5.4"]),
    "db": (RCODE_OK, ["198.19.5.10", "198.19.5.11"]),
    "demo_web.1.t1": (RCODE_OK, ["198.19.5.3"]),
    "other_api": (RCODE_OK, ["198.19.5.20"]),
    "api": (RCODE_NXDOMAIN, []),
    "hidden": (RCODE_NXDOMAIN, []),
    "tasks.nothing": (RCODE_NXDOMAIN, []),
}


def store_with_records() -> TableStore:
    s = TableStore()
    for net, recs in RECORDS.items():
        for i, r in enumerate(recs):
            s.merge(TableEntry(table=ENDPOINT_TABLE, network_id=net, key=f"{net}-{i}", owner="n",
                               ltime=1, value=r.SerializeToString()))
    return s


# ----- unit ------------------------------------------------------------------------------------


def test_wire_format_roundtrip():
    raw = build_query("Tasks.Web.", TYPE_A, qid=0x1234)
    q = parse_query(raw)
    assert (q.id, q.name, q.qtype) == (0x1234, "tasks.web", TYPE_A)
    resp = build_response(q, RCODE_OK, ["198.19.5.3", "198.19.5.4"], ttl=5)
    assert parse_response(resp) == (0x1234, RCODE_OK, ["198.19.5.3", "198.19.5.4"])
    # truncation to the UDP limit sets TC and keeps what fits
    many = [f"198.19.7.{i}" for i in range(1, 60)]
    small = build_response(q, RCODE_OK, many, limit=512)
    assert len(small) <= 512 and struct.unpack("!H", small[2:4])[0] & 0x0200
    assert parse_response(small)[2] == many[: len(parse_response(small)[2])]


def test_resolution_rules():
    dns = DNSServer(store_with_records(), upstreams=[])
    for name, (rcode, ips) in EXPECT_DEMO.items():
        r = dns.resolve(name, ["netA"], "demo")
        assert (r.rcode, sorted(r.ips), r.forward) == (rcode, ips, False), name
    # no stack: short names do not resolve; other networks' services do
    assert dns.resolve("web", ["netA", "netB"], None).rcode == RCODE_NXDOMAIN
    assert dns.resolve("hidden", ["netA", "netB"], None).ips == ["198.19.6.2"]
    assert dns.resolve("api", ["netA"], "other").ips == ["198.19.5.20"]
    # names with dots that are not ours are forwarded
    assert dns.resolve("example.test", ["netA"], "demo").forward
    # reverse lookups: task IP -> task name, VIP -> service; unknown addresses are forwarded
    assert dns.resolve("3.5.19.198.in-addr.arpa", ["netA"], "demo").ptrs == ["demo_web.1.t1"]
    assert dns.resolve("2.5.19.198.in-addr.arpa.", ["netA"], "demo").ptrs == ["demo_web"]
    assert dns.resolve("3.6.19.198.in-addr.arpa", ["netA"], "demo").forward  # netB is not ours


# ----- integration: real sockets in namespaces ---------------------------------------------------

CLIENT = r"""
import socket, struct, sys
from shoal.netdriver.dns import build_query
name, qtype, proto = sys.argv[1], int(sys.argv[2]), sys.argv[3]
q = build_query(name, qtype)
if proto == "udp":
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.settimeout(10)
    s.sendto(q, ("127.0.0.11", 53))
    print(s.recv(4096).hex())
else:
    s = socket.create_connection(("127.0.0.11", 53), timeout=10)
    s.sendall(struct.pack("!H", len(q)) + q)
    f = s.makefile("rb")
    (n,) = struct.unpack("!H", f.read(2))
    print(f.read(n).hex())
"""


async def run_in(ns: str, argv: list[str]) -> tuple[int, str]:
    p = await asyncio.create_subprocess_exec("nsenter", f"--net=/run/netns/{ns}", *argv,
                                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        out, _ = await asyncio.wait_for(p.communicate(), 30)
    finally:
        if p.returncode is None:
            p.kill()
            await p.wait()
    return p.returncode, out.decode()


async def query(ns: str, name: str, qtype: int = TYPE_A, proto: str = "udp") -> tuple[int, list[str]]:
    rc, out = await run_in(ns, [sys.executable, "-c", CLIENT, name, str(qtype), proto])
    assert rc == 0, out
    _, rcode, ips = parse_response(bytes.fromhex(out.strip()))
    return rcode, sorted(ips)


class FakeUpstream(asyncio.DatagramProtocol):
    """A resolver of the test: example.test → 198.18.0.77, anything else NXDOMAIN (UDP and TCP)."""

    def __init__(self) -> None:
        self.asked: list[str] = []

    def answer(self, data: bytes) -> bytes:
        q = parse_query(data)
        self.asked.append(q.name)
        if q.name == "example.test":
            return build_response(q, RCODE_OK, ["198.18.0.77"], ttl=30)
        return build_response(q, RCODE_NXDOMAIN)

    def connection_made(self, transport) -> None:
        self.transport = transport

    def datagram_received(self, data, addr) -> None:
        self.transport.sendto(self.answer(data), addr)

    async def on_tcp(self, reader, writer) -> None:
        (n,) = struct.unpack("!H", await reader.readexactly(2))
        reply = self.answer(await reader.readexactly(n))
        writer.write(struct.pack("!H", len(reply)) + reply)
        await writer.drain()
        writer.close()


@pytest.fixture
def netns_pair():
    if os.geteuid() != 0:
        pytest.fail("DNS integration tests need root (network namespaces)")
    from pyroute2 import netns

    names = [f"st{os.getpid() % 10000}dns{i}" for i in range(2)]
    made = []
    try:
        for n in names:
            netns.create(n)
            made.append(n)
        yield names
    finally:
        for n in made:
            netns.remove(n)


@pytest.mark.integration
@aiotest
async def test_dns_in_container_namespaces(netns_pair):
    ns_demo, ns_plain = netns_pair
    loop = asyncio.get_running_loop()
    up_addr = f"127.{NET}.251.1"
    upstream = FakeUpstream()
    up_udp, _ = await loop.create_datagram_endpoint(lambda: upstream, local_addr=(up_addr, PORT))
    up_tcp = await asyncio.start_server(upstream.on_tcp, up_addr, PORT)
    a = NetworkDB("dns-a", f"127.{NET}.250.1", f"127.{NET}.250.1", port=PORT)
    b = NetworkDB("dns-b", f"127.{NET}.250.2", f"127.{NET}.250.2", port=PORT)
    dns = DNSServer(a, upstreams=[(up_addr, PORT)], forward_timeout=3)
    try:
        await a.start()
        await b.start()
        assert await b.join([f"127.{NET}.250.1:{PORT}"]) == 1
        for g in (a, b):
            await g.join_network("netA")
            await g.join_network("netB")
        # the records come from node b, by gossip
        for net, recs in RECORDS.items():
            for r in recs:
                b.put(ENDPOINT_TABLE, net, r.task_id, r.SerializeToString())
        loop_deadline = loop.time() + 30
        while len(a.entries(ENDPOINT_TABLE, "netA")) + len(a.entries(ENDPOINT_TABLE, "netB")) < 6:
            assert loop.time() < loop_deadline, "records did not reach node a"
            await asyncio.sleep(0.05)

        await dns.serve_in("c-demo", ns_demo, ["netA"], "demo")
        await dns.serve_in("c-plain", f"/run/netns/{ns_plain}", ["netA", "netB"], None)

        for name, want in EXPECT_DEMO.items():
            assert await query(ns_demo, name) == want, name
        assert await query(ns_demo, "web", proto="tcp") == (RCODE_OK, ["198.19.5.2"])
        assert await query(ns_demo, "web", qtype=TYPE_AAAA) == (RCODE_OK, [])
        assert await query(ns_demo, "10.5.19.198.in-addr.arpa", qtype=TYPE_PTR) == (RCODE_OK, ["demo_db.1.t3"])
        assert await query(ns_plain, "web") == (RCODE_NXDOMAIN, [])
        assert await query(ns_plain, "hidden") == (RCODE_OK, ["198.19.6.2"])
        # forwarded to the upstream (UDP and TCP); its NXDOMAIN comes back too
        assert await query(ns_demo, "example.test") == (RCODE_OK, ["198.18.0.77"])
        assert await query(ns_demo, "example.test", proto="tcp") == (RCODE_OK, ["198.18.0.77"])
        assert await query(ns_demo, "nosuch.test") == (RCODE_NXDOMAIN, [])
        assert upstream.asked.count("example.test") == 2 and "nosuch.test" in upstream.asked
        assert not any(n in upstream.asked for n in ("web", "api", "hidden", "tasks.nothing"))
        # a container without egress (internal networks only): its own names resolve, nothing is
        # forwarded -- SERVFAIL at once, and the upstream never hears of it
        dns.update("c-plain", ["netA", "netB"], None, forward=False)
        assert await query(ns_plain, "hidden") == (RCODE_OK, ["198.19.6.2"])
        assert await query(ns_plain, "internal-only.test") == (RCODE_SERVFAIL, [])
        assert await query(ns_plain, "internal-only.test", proto="tcp") == (RCODE_SERVFAIL, [])
        assert "internal-only.test" not in upstream.asked
        dns.update("c-plain", ["netA", "netB"], None)

        # an independent client: busybox nslookup
        rc, out = await run_in(ns_demo, ["busybox", "nslookup", "tasks.web", "127.0.0.11"])
        assert rc == 0 and "198.19.5.3" in out and "198.19.5.4" in out, out
        rc, out = await run_in(ns_demo, ["busybox", "nslookup", "example.test", "127.0.0.11"])
        assert rc == 0 and "198.18.0.77" in out, out
        rc, out = await run_in(ns_demo, ["busybox", "nslookup", "hidden", "127.0.0.11"])
        assert rc != 0 and "NXDOMAIN" in out, out
        rc, out = await run_in(ns_demo, ["busybox", "nslookup", "198.19.5.4", "127.0.0.11"])
        assert rc == 0 and "demo_web.2.t2" in out, out

        # a task goes away (delete by gossip) → tasks.web follows
        b.delete(ENDPOINT_TABLE, "netA", "t2")
        while "t2" in a.entries(ENDPOINT_TABLE, "netA"):
            assert loop.time() < loop_deadline + 30, "delete did not reach node a"
            await asyncio.sleep(0.05)
        assert await query(ns_demo, "tasks.web") == (RCODE_OK, ["198.19.5.3"])

        # the container moves: update its networks
        dns.update("c-demo", ["netA", "netB"], "demo")
        assert await query(ns_demo, "hidden") == (RCODE_OK, ["198.19.6.2"])

        await dns.stop_serving("c-demo")
        rc, out = await run_in(ns_demo, [sys.executable, "-c", CLIENT, "web", "1", "tcp"])
        assert rc != 0 and "Connection refused" in out, out
        assert dns.serving() == ["c-plain"]

        # a namespace known only as /proc/PID/ns/net (a container's process), not by name
        sleeper = await asyncio.create_subprocess_exec("nsenter", f"--net=/run/netns/{ns_demo}", "sleep", "60")
        try:
            want = os.stat(f"/run/netns/{ns_demo}").st_ino
            while os.stat(f"/proc/{sleeper.pid}/ns/net").st_ino != want:  # nsenter has not entered yet
                await asyncio.sleep(0.01)
            await dns.serve_in("c-proc", f"/proc/{sleeper.pid}/ns/net", ["netA"], "demo")
            assert await query(ns_demo, "web") == (RCODE_OK, ["198.19.5.2"])
            await dns.stop_serving("c-proc")
        finally:
            sleeper.kill()
            await sleeper.wait()
    finally:
        await dns.close()
        await b.stop()
        await a.stop()
        up_udp.close()
        up_tcp.close()
        await up_tcp.wait_closed()
