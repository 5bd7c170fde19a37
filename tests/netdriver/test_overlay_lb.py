"""Service VIP load balancing and published ports (host mode, ingress routing mesh) on namespace hosts."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from test_overlay import att, cleanup_all, drivers_for, make_net, snapshot

from shoal.lab.nshosts import NsLab
from shoal.netdriver.overlay.driver import OverlayDriver
from shoal.netdriver.overlay.model import OverlayError, PortConflictError, mac_from_ip

pytestmark = pytest.mark.integration


UDP_ASK = r"""
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(5)
s.sendto(b"?", (sys.argv[1], int(sys.argv[2])))
print(s.recvfrom(100)[0].decode())
"""


def mesh(lab: NsLab, drivers: list[OverlayDriver], net_id: str, endpoints: list[tuple[int, str]]) -> None:
    """What the gossip does: every host learns every endpoint (host index, ip) of the network."""
    for d in drivers:
        for host, ip in endpoints:
            d.add_peer(net_id, ip, mac_from_ip(ip), lab.hosts[host].addr)


def test_vip_balances_over_three_hosts_and_keeps_live_connections(nslab, netprogs):
    lab = nslab(3)
    before = snapshot(lab, netprogs)
    drivers = drivers_for(lab)
    try:
        net = make_net("netvip", 4600, "198.19.6.0/24")
        backends = {"b1": (0, "198.19.6.11"), "b2": (1, "198.19.6.12"), "b3": (2, "198.19.6.13")}
        for tag, (host, ip) in backends.items():
            c = lab.add_netns(f"c{tag}")
            drivers[host].attach(f"task-{tag}", c, [att(net, ip)])
            lab.spawn_ready(c, netprogs.tag_server(tag, 8080))
        client = lab.add_netns("c1")
        drivers[0].attach("task-client", client, [att(net, "198.19.6.20")])
        mesh(lab, drivers, net.id, [*backends.values(), (0, "198.19.6.20")])
        vip = "198.19.6.100"
        for d in drivers:
            d.set_service_backends(net.id, vip + "/24", [ip for _, ip in backends.values()], [("tcp", 8080)])

        counts = json.loads(lab.run(client, netprogs.tag_client(vip, 8080, 100)).stdout)
        assert set(counts) == {"b1", "b2", "b3"} and sum(counts.values()) == 100
        assert min(counts.values()) >= 30, counts  # round robin: 33/33/34

        # a connection held open across a backend change survives if its backend stays
        hold = lab.spawn(client, netprogs.hold_client(vip, 8080), stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, text=True)
        first = hold.stdout.readline().strip()
        assert first in backends
        gone = next(t for t in backends if t != first)
        left = [ip for t, (_, ip) in backends.items() if t != gone]
        for d in drivers:
            d.set_service_backends(net.id, vip, left, [("tcp", 8080)])
        hold.stdin.write("still-there\n")
        hold.stdin.flush()
        assert hold.stdout.readline().strip() == "still-there"
        counts = json.loads(lab.run(client, netprogs.tag_client(vip, 8080, 20)).stdout)
        assert set(counts) == set(backends) - {gone}

        # a container attached later gets the service too
        late = lab.add_netns("c2")
        drivers[1].attach("task-late", late, [att(net, "198.19.6.21")])
        mesh(lab, drivers, net.id, [(1, "198.19.6.21")])
        counts = json.loads(lab.run(late, netprogs.tag_client(vip, 8080, 4)).stdout)
        assert sum(counts.values()) == 4

        # no backends: refused at once; service removed: the nft table goes away
        drivers[0].set_service_backends(net.id, vip, [], [("tcp", 8080)])
        r = lab.run(client, netprogs.tag_client(vip, 8080, 1), check=False)
        assert r.returncode != 0 and "ConnectionRefused" in r.stderr
        drivers[0].remove_service(net.id, vip)
        assert "table ip shoal" not in lab.run(client, ["nft", "list", "ruleset"]).stdout
        with pytest.raises(OverlayError, match="protocol"):
            drivers[0].set_service_backends(net.id, vip, ["198.19.6.11"], [("sctp", 1)])
    finally:
        cleanup_all(drivers)
    assert snapshot(lab, netprogs) == before
    for name in ("cb1", "cb2", "cb3", "c1", "c2"):  # containers keep nothing of ours
        path = f"/run/netns/{lab.prefix}-{name}"
        assert lab.run(path, ["nft", "list", "ruleset"]).stdout.strip() == ""
        assert lab.run(path, ["ip", "-o", "link"]).stdout.count("\n") == 1


def test_published_ports_host_mode_and_ingress_mesh(nslab, netprogs):
    lab = nslab(3)
    before = snapshot(lab, netprogs)
    drivers = drivers_for(lab)
    outside = lab.underlay.path
    try:
        # mode=host: DNAT on the node that runs the task
        app = make_net("netapp", 4700, "198.19.8.0/24")
        c1 = lab.add_netns("c1")
        drivers[0].attach("task-host", c1, [att(app, "198.19.8.2")])
        lab.spawn_ready(c1, netprogs.tag_server("hostmode", 8080))
        drivers[0].publish_host_port("task-host", "tcp", 30001, 8080)
        out = lab.run(outside, netprogs.tag_client(lab.hosts[0].addr, 30001, 2)).stdout
        assert json.loads(out) == {"hostmode": 2}
        with pytest.raises(PortConflictError, match="published_port 30001/tcp"):
            drivers[0].publish_host_port("task-other", "tcp", 30001, 80)

        # mode=ingress: every node accepts 30080 and forwards over the ingress network
        ingress = make_net("ingress", 4701, "198.19.9.0/24", ingress=True)
        sboxes = [(i, f"198.19.9.{200 + i}") for i in range(3)]
        for (_, ip), d in zip(sboxes, drivers, strict=True):
            iface = d.ensure_ingress(ingress, f"{ip}/24")
            assert iface.address == f"{ip}/24" and iface.mac == mac_from_ip(ip)
        c2 = lab.add_netns("c2")
        drivers[1].attach("task-ing", c2, [att(ingress, "198.19.9.10")])
        lab.spawn_ready(c2, netprogs.tag_server("ingress-task", 8080))
        mesh(lab, drivers, ingress.id, [*sboxes, (1, "198.19.9.10")])
        for d in drivers:
            d.set_ingress_backends("tcp", 30080, 8080, ["198.19.9.10"])
        for h in lab.hosts:  # hosts 1 and 3 run no task
            out = lab.run(outside, netprogs.tag_client(h.addr, 30080, 2)).stdout
            assert json.loads(out) == {"ingress-task": 2}, h
        # from a host itself, and from a container on a node to its own node's published ports
        out = lab.run(lab.hosts[2].path, netprogs.tag_client(lab.hosts[2].addr, 30080, 1)).stdout
        assert json.loads(out) == {"ingress-task": 1}
        c3 = lab.add_netns("c3")
        drivers[0].attach("task-hairpin", c3, [att(app, "198.19.8.3")])
        for port, tag in ((30080, "ingress-task"), (30001, "hostmode")):
            out = lab.run(c3, netprogs.tag_client(lab.hosts[0].addr, port, 1)).stdout
            assert json.loads(out) == {tag: 1}
        # UDP through the mesh
        lab.spawn_ready(c2, netprogs.tag_server("udp-task", 5353, "udp"))
        for d in drivers:
            d.set_ingress_backends("udp", 30053, 5353, ["198.19.9.10"])
        r = lab.run(outside, [sys.executable, "-c", UDP_ASK, lab.hosts[0].addr, "30053"])
        assert r.stdout.strip() == "udp-task"
        with pytest.raises(PortConflictError, match="routing mesh"):
            drivers[1].publish_host_port("task-ing", "tcp", 30080, 8080)
        with pytest.raises(PortConflictError, match="task task-host"):
            drivers[0].set_ingress_backends("tcp", 30001, 8080, ["198.19.9.10"])

        # unpublish / detach take the rules away
        for d in drivers:
            d.unpublish_ingress("tcp", 30080)
        r = lab.run(outside, netprogs.tag_client(lab.hosts[0].addr, 30080, 1), check=False)
        assert r.returncode != 0
        drivers[0].detach("task-host")
        assert "30001" not in lab.run(lab.hosts[0].path, ["nft", "list", "table", "ip", "shoal"]).stdout
    finally:
        cleanup_all(drivers)
    assert snapshot(lab, netprogs) == before


# A crafted TCP SYN sent on IFACE to GW_MAC for DST:PORT, as a program with CAP_NET_RAW can; prints
# "synack" when the SYN-ACK comes back, "rst" for a reset, "none" when nothing answers in 1 s.
CRAFTED_SYN = r"""
import sys
from scapy.all import IP, TCP, Ether, conf, get_if_addr, get_if_hwaddr, srp1
conf.verb = 0
iface, gw_mac, dst, port = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
syn = (Ether(src=get_if_hwaddr(iface), dst=gw_mac) / IP(src=get_if_addr(iface), dst=dst)
       / TCP(sport=41234, dport=port, flags="S", seq=1000))
a = srp1(syn, iface=iface, timeout=1)
if a is None or TCP not in a:
    print("none")
else:
    print("synack" if int(a[TCP].flags) & 0x12 == 0x12 else "rst")
"""

SECOND_ADDR = "198.19.240.1"  # a node address on another link than the underlay


def link_mac(lab: NsLab, path: str, ifname: str) -> str:
    return json.loads(lab.run(path, ["ip", "-j", "link", "show", ifname]).stdout)[0]["address"]


def route_localnet(lab: NsLab, path: str, ifname: str) -> str:
    return lab.run(path, ["cat", f"/proc/sys/net/ipv4/conf/{ifname}/route_localnet"]).stdout.strip()


def test_published_ports_answer_on_loopback_and_every_node_address(nslab, netprogs):
    lab = nslab(2)
    before = snapshot(lab, netprogs)
    root_before = [route_localnet(lab, None, link) for link in ("all", "default", "lo")]
    drivers = drivers_for(lab)
    h0, h1 = lab.hosts
    outside = lab.underlay.path
    try:
        # a second address on another link of node 0, reachable from outside through it
        # (a veth pair: this kernel has no dummy links)
        lab.run(h0.path, ["ip", "link", "add", "extra0", "type", "veth", "peer", "name", "extra1"])
        lab.run(h0.path, ["ip", "addr", "add", f"{SECOND_ADDR}/32", "dev", "extra0"])
        for link in ("extra0", "extra1"):
            lab.run(h0.path, ["ip", "link", "set", link, "up"])
        lab.run(outside, ["ip", "route", "add", f"{SECOND_ADDR}/32", "via", h0.addr])

        # mode=host on node 0; mode=ingress on both nodes, its task on node 1
        app = make_net("netapp", 4710, "198.19.18.0/24")
        c1 = lab.add_netns("c1")
        drivers[0].attach("task-host", c1, [att(app, "198.19.18.2")])
        lab.spawn_ready(c1, netprogs.tag_server("hostmode", 8080))
        drivers[0].publish_host_port("task-host", "tcp", 30001, 8080)
        ingress = make_net("ingress", 4711, "198.19.19.0/24", ingress=True)
        sboxes = [(i, f"198.19.19.{200 + i}") for i in range(2)]
        for (_, ip), d in zip(sboxes, drivers, strict=True):
            d.ensure_ingress(ingress, f"{ip}/24")
        c2 = lab.add_netns("c2")
        drivers[1].attach("task-ing", c2, [att(ingress, "198.19.19.10")])
        lab.spawn_ready(c2, netprogs.tag_server("ingress-task", 8080))
        lab.spawn_ready(c2, netprogs.tag_server("udp-task", 5353, "udp"))
        mesh(lab, drivers, ingress.id, [*sboxes, (1, "198.19.19.10")])
        for d in drivers:
            d.set_ingress_backends("tcp", 30080, 8080, ["198.19.19.10"])
            d.set_ingress_backends("udp", 30053, 5353, ["198.19.19.10"])

        # from node 0 itself: loopback, the second address, the underlay address
        for addr in ("127.0.0.1", SECOND_ADDR, h0.addr):
            for port, tag in ((30001, "hostmode"), (30080, "ingress-task")):
                out = lab.run(h0.path, netprogs.tag_client(addr, port, 2)).stdout
                assert json.loads(out) == {tag: 2}, (addr, port)
        r = lab.run(h0.path, [sys.executable, "-c", UDP_ASK, "127.0.0.1", "30053"])
        assert r.stdout.strip() == "udp-task"
        # node 1 (runs the ingress task, not the host-mode one) on its loopback
        out = lab.run(h1.path, netprogs.tag_client("127.0.0.1", 30080, 1)).stdout
        assert json.loads(out) == {"ingress-task": 1}
        # from outside, to the second address
        for port, tag in ((30001, "hostmode"), (30080, "ingress-task")):
            out = lab.run(outside, netprogs.tag_client(SECOND_ADDR, port, 1)).stdout
            assert json.loads(out) == {tag: 1}, port
        # ports not published here do not answer
        for path, port in ((h0.path, 30099), (h1.path, 30001)):
            r = lab.run(path, netprogs.tag_client("127.0.0.1", port, 1), check=False)
            assert r.returncode != 0 and "ConnectionRefused" in r.stderr, (path, port)

        # the loopback path opens nothing else: a crafted packet for 127.0.0.1 is dropped, whether
        # it comes from a container on the gateway bridge or from the underlay (a node's own
        # services on 127.0.0.1 stay its own)
        assert route_localnet(lab, h0.path, drivers[0].gw_bridge) == "1"
        for link in ("all", "default", "eth0", "lo"):  # the gateway bridge's alone
            assert route_localnet(lab, h0.path, link) == "0", link
        lab.spawn_ready(h0.path, netprogs.tag_server("node-local", 30500))
        c3 = lab.add_netns("c3")
        drivers[0].attach("task-probe", c3, [att(app, "198.19.18.3")])
        gw_mac = link_mac(lab, h0.path, drivers[0].gw_bridge)
        ul_mac = link_mac(lab, h0.path, "eth0")
        probes = [
            (c3, "eth1", gw_mac, drivers[0].gw_gateway, 30500, "synack"),  # the probe works
            (c3, "eth1", gw_mac, "127.0.0.1", 30500, "none"),
            (c3, "eth1", gw_mac, "127.0.0.1", 30001, "none"),
            (outside, "br0", ul_mac, h0.addr, 30080, "synack"),
            (outside, "br0", ul_mac, "127.0.0.1", 30080, "none"),
            (outside, "br0", ul_mac, "127.0.0.1", 30500, "none"),
        ]
        for path, iface, mac, dst, port, want in probes:
            r = lab.run(path, [sys.executable, "-c", CRAFTED_SYN, iface, mac, dst, str(port)])
            assert r.stdout.strip() == want, (path, dst, port)

        # unpublished: gone from loopback and the second address too; the rules and the sysctl go
        for d in drivers:
            d.unpublish_ingress("tcp", 30080)
            d.unpublish_ingress("udp", 30053)
        drivers[0].detach("task-host")
        for addr, port in (("127.0.0.1", 30080), ("127.0.0.1", 30001), (SECOND_ADDR, 30080)):
            r = lab.run(h0.path, netprogs.tag_client(addr, port, 1), check=False)
            assert r.returncode != 0 and "ConnectionRefused" in r.stderr, (addr, port)
        table = lab.run(h0.path, ["nft", "list", "table", "ip", "shoal"]).stdout
        assert "dport" not in table and "127.0.0.0/8 oifname" not in table, table
        assert route_localnet(lab, h0.path, drivers[0].gw_bridge) == "0"
    finally:
        lab.run(outside, ["ip", "route", "del", f"{SECOND_ADDR}/32"], check=False)
        lab.run(h0.path, ["ip", "link", "del", "extra0"], check=False)
        cleanup_all(drivers)
    assert snapshot(lab, netprogs) == before
    assert [route_localnet(lab, None, link) for link in ("all", "default", "lo")] == root_before
