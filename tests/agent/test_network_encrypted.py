"""An encrypted network end to end through NetworkAgent processes (gossip, DNS, VIPs) on a kernel with
IPsec ESP: the NetworkKeys assignments reach the data path, services talk by name, only ESP crosses
the underlay, keys rotate under a live service, release leaves nothing. Run inside a UML kernel by
tests/netdriver/test_overlay_encrypted.py::test_encrypted_overlays_in_uml on kernels without ESP."""

from __future__ import annotations

import pytest
from esp_wire import captured, needs_esp, sniff_underlay
from netnode import attachment, make_network, make_task
from test_network import Cluster, cluster  # noqa: F401 - the fixture

from shoal.netdriver import nft, xfrm
from shoal.netdriver.overlay.model import ESP_TABLE
from shoal.proto import types_pb2

pytestmark = [pytest.mark.integration, needs_esp]


def ring(*ts: int) -> list[types_pb2.EncryptionKey]:
    return [types_pb2.EncryptionKey(subsystem="networking:ipsec", key=bytes([t]) * 32, lamport_time=t) for t in ts]


def xfrm_state(c: Cluster, i: int) -> tuple[list, list]:
    with xfrm.Xfrm(c.lab.hosts[i].path) as x:
        return x.list_sas(), x.list_policies()


def test_encrypted_network_through_network_agents(cluster):  # noqa: F811
    c = cluster(2)
    c.start_all()
    before = [c.host_state(i) for i in range(2)]
    net = make_network("encnet0000000000000000001", "demo_secure", 4301, "198.19.44.0/24")
    net.spec.driver_config.options["encrypted"] = ""
    vip = {net.id: "198.19.44.2/24"}
    c.node(0).keys(net.id, ring(1, 2, 3))  # as the dispatcher: with the task, before it
    web = "webtask00000000000000001"
    client = "clienttask0000000000001"
    c.prepare(1, make_task(web, "demo_web", "svcweb", "node2", [attachment(net, "198.19.44.11")], vips=vip,
                           stack="demo"))
    c.prepare(0, make_task(client, "demo_client", "svcclient", "node1", [attachment(net, "198.19.44.21")],
                           vips={net.id: "198.19.44.3/24"}, stack="demo"))
    c.httpd(web, "secret")
    # node 2's keys come late: until then its end has policies but no SAs, so nothing gets through
    assert c.sh(client, "timeout 3 busybox wget -q -O- http://web:8080/", check=False).returncode != 0
    c.node(1).keys(net.id, ring(1, 2, 3))
    assert c.fetch(client, "http://web:8080/", 3) == {"secret": 3}
    assert "mtu 1424" in c.sh(client, "ip -o link show eth0").stdout

    sniffer = sniff_underlay(c.lab, 3)
    assert c.fetch(client, "http://198.19.44.11:8080/", 2) == {"secret": 2}
    seen = set(captured(sniffer))
    assert (50, 0) in seen and (17, 4789) not in seen, seen

    # rotation, one node after the other, under a live service
    for i in (0, 1):
        c.node(i).keys(net.id, ring(2, 3, 4))
        assert c.fetch(client, "http://web:8080/", 2) == {"secret": 2}
    sas, pols = xfrm_state(c, 0)
    assert len(sas) == 4 and len(pols) == 1  # 1 out (key 3) + 3 in, one policy to node 2
    assert {s.spi for s in sas} >= {xfrm.derive_sa(bytes([3]) * 32, c.lab.hosts[0].addr, c.lab.hosts[1].addr)[0]}

    # the tasks go: so do the SAs, policies and the host table; the hosts are as they were
    for tid in (client, web):
        c.release(tid)
    for i in (0, 1):
        c.node(i).keys(net.id, None)
        assert xfrm_state(c, i) == ([], [])
        assert ("ip", ESP_TABLE) not in nft.list_tables(c.lab.hosts[i].path)
        c.node(i).call("cleanup")  # the gateway bridge stays until then, as for any network
    assert [c.host_state(i) for i in range(2)] == before
