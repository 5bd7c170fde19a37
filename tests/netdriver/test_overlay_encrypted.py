"""Encrypted overlays (IPsec ESP transport mode under VXLAN) on namespace hosts, on a kernel with ESP.

The host kernel of this project's machines has no IPsec ESP (CONFIG_INET_ESP unset). These tests then
run inside a User-Mode Linux kernel that has it (tests/uml.py boots it with the host's filesystem
read-only), through `test_encrypted_overlays_in_uml` at the bottom; on a kernel with ESP they run
directly as well.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time

import pytest
from esp_wire import captured, needs_esp, sniff_underlay
from test_overlay import att, cleanup_all, drivers_for, make_net, ping, snapshot

from shoal.netdriver import nft, xfrm
from shoal.netdriver.overlay.driver import OverlayDriver
from shoal.netdriver.overlay.model import ESP_TABLE, mac_from_ip

pytestmark = pytest.mark.integration

K = [bytes([i]) * 32 for i in range(1, 6)]  # network keys k1..k5

# A forged VXLAN frame put on the underlay (an attacker there): VNI, inner UDP datagram to a container.
INJECT = r"""
import sys
from scapy.all import IP, UDP, VXLAN, Ether, sendp
src, dst, dst_mac, vni, inner_src, inner_dst, inner_mac = sys.argv[1:8]
f = (Ether(dst=dst_mac) / IP(src=src, dst=dst) / UDP(sport=40000, dport=4789) / VXLAN(vni=int(vni), flags=0x08)
     / Ether(src="02:42:c6:13:00:fe", dst=inner_mac) / IP(src=inner_src, dst=inner_dst) / UDP(sport=5555, dport=7777)
     / b"forged")
sendp(f, iface="br0", count=3, verbose=False)
"""

# Prints every datagram it gets on port 7777 until "control" (or 30 s), then all of them on one line.
UDP_SINK = r"""
import socket
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("0.0.0.0", 7777))
s.settimeout(30)
print("ready", flush=True)
got = []
try:
    while not got or got[-1] != "control":
        got.append(s.recvfrom(100)[0].decode())
except TimeoutError:
    got.append("timeout")
print(" ".join(got), flush=True)
"""

UDP_SEND = r"""
import socket, sys
socket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(b"control", (sys.argv[1], 7777))
"""


def encrypted_net(nid: str, vni: int, subnet: str):
    net = make_net(nid, vni, subnet)
    net.spec.driver_config.options["encrypted"] = ""
    return net


def pair(lab, net, d1: OverlayDriver, d2: OverlayDriver, ip1: str, ip2: str) -> tuple[str, str]:
    c1, c2 = (lab.add_netns("c" + "x".join(ip.split(".")[2:])) for ip in (ip1, ip2))
    d1.attach(f"t{ip1}", c1, [att(net, ip1)])
    d2.attach(f"t{ip2}", c2, [att(net, ip2)])
    d1.add_peer(net.id, ip2, mac_from_ip(ip2), lab.hosts[1].addr)
    d2.add_peer(net.id, ip1, mac_from_ip(ip1), lab.hosts[0].addr)
    return c1, c2


def underlay_mac(lab, i: int) -> str:
    out = lab.run(lab.hosts[i].path, ["ip", "-o", "link", "show", lab.hosts[i].ifname]).stdout
    return re.search(r"link/ether ([0-9a-f:]+)", out).group(1)


def forged_arrives(lab, c_dst: str, c_src: str, vni: int, dst_ip: str, src_ip: str) -> list[str]:
    """Put a clear VXLAN frame (VNI, to dst_ip's container) on the underlay as if host 2 sent it, then
    a real datagram from c_src through the overlay: what dst_ip's container received, in order (the
    control datagram goes after the forged frame, so "control" alone means it was dropped)."""
    sink = lab.spawn_ready(c_dst, [sys.executable, "-c", UDP_SINK])
    lab.run(lab.underlay.path, [sys.executable, "-c", INJECT, lab.hosts[1].addr, lab.hosts[0].addr,
                                underlay_mac(lab, 0), str(vni), src_ip, dst_ip, mac_from_ip(dst_ip)])
    lab.run(c_src, [sys.executable, "-c", UDP_SEND, dst_ip])
    out, _ = sink.communicate(timeout=60)
    return out.strip().splitlines()[-1].split()


@needs_esp
def test_encrypted_network_esp_on_the_wire_and_clear_frames_dropped(nslab, netprogs):
    lab = nslab(2)
    before = snapshot(lab, netprogs)
    d1, d2 = drivers_for(lab)
    try:
        net = encrypted_net("netenc1", 4400, "198.19.40.0/24")
        plain = make_net("netplain1", 4401, "198.19.41.0/24")
        for d in (d1, d2):
            d.set_network_keys(net.id, [K[1], K[0], K[2]])  # primary first, as the agent orders them
        c1, c2 = pair(lab, net, d1, d2, "198.19.40.2", "198.19.40.3")
        p1, p2 = pair(lab, plain, d1, d2, "198.19.41.2", "198.19.41.3")
        link = lab.run(c1, ["ip", "-o", "link", "show", "eth0"]).stdout
        assert "mtu 1424" in link  # 1500 - VXLAN - ESP, as Docker

        # ping and TCP (64 KB echoed: full-size frames fit the lowered MTU) across the hosts
        r = ping(lab, c1, "198.19.40.3")
        assert r.returncode == 0, r.stdout + r.stderr
        lab.spawn_ready(c2, netprogs.tag_server("enc2", 8080))
        held = lab.spawn_ready(c1, netprogs.hold_client("198.19.40.3", 8080), ready="enc2", stdin=subprocess.PIPE)
        big = "x" * 65536
        held.stdin.write(big + "\n")
        held.stdin.flush()
        assert held.stdout.readline().strip() == big

        # the wire: the encrypted network's traffic is ESP only; the plain network's stays VXLAN
        sniffer = sniff_underlay(lab, 3)
        assert ping(lab, c1, "198.19.40.3").returncode == 0
        seen = set(captured(sniffer))
        assert (50, 0) in seen and (17, 4789) not in seen, seen
        sniffer = sniff_underlay(lab, 3)
        assert ping(lab, p1, "198.19.41.3").returncode == 0
        assert (17, 4789) in set(captured(sniffer))

        # the kernel: per peer one policy, one outbound SA (primary key), one inbound SA per key
        sas, pols = d1.esp_state(net.id)
        mark = 0xE0000000 | 4400
        assert [(p.src, p.dst, p.mark) for p in pols] == [(lab.hosts[0].addr, lab.hosts[1].addr, mark)]
        out_spi = xfrm.derive_sa(K[1], lab.hosts[0].addr, lab.hosts[1].addr)[0]
        in_spis = {xfrm.derive_sa(k, lab.hosts[1].addr, lab.hosts[0].addr)[0] for k in K[:3]}
        assert {(s.dst, s.spi) for s in sas} == {(lab.hosts[1].addr, out_spi)} | {
            (lab.hosts[0].addr, s) for s in in_spis}
        shown = lab.run(lab.hosts[0].path, ["ip", "xfrm", "state"]).stdout
        assert "rfc4106(gcm(aes))" in shown and "mode transport" in shown

        # a forged clear VXLAN frame on the underlay reaches a plain network's container, never an
        # encrypted network's (no ESP secpath -> dropped by the host table)
        assert set(forged_arrives(lab, p1, p2, 4401, "198.19.41.2", "198.19.41.3")) == {"forged", "control"}
        assert forged_arrives(lab, c1, c2, 4400, "198.19.40.2", "198.19.40.3") == ["control"]

        # the last endpoint behind a VTEP goes: its policy and SAs go with it
        d1.remove_peer(net.id, "198.19.40.3", mac_from_ip("198.19.40.3"), lab.hosts[1].addr)
        assert d1.esp_state(net.id) == ([], [])
        held.kill()
        for d in (d1, d2):
            for t in list(d._eps):
                d.detach(t)
            d.remove_network(net.id)
            d.remove_network(plain.id)
        with xfrm.Xfrm(lab.hosts[0].path) as x:
            assert x.list_sas() == [] and x.list_policies() == []
        assert (("ip", ESP_TABLE) not in nft.list_tables(lab.hosts[0].path))
    finally:
        cleanup_all([d1, d2])
    assert snapshot(lab, netprogs) == before


@needs_esp
def test_key_rotation_keeps_connections_and_keys_come_late(nslab, netprogs):
    lab = nslab(2)
    before = snapshot(lab, netprogs)
    d1, d2 = drivers_for(lab)
    try:
        net = encrypted_net("netenc2", 4410, "198.19.42.0/24")
        # no keys yet: the peers' policies are in place but have no SA -- nothing leaves, not even in clear
        c1, c2 = pair(lab, net, d1, d2, "198.19.42.2", "198.19.42.3")
        sniffer = sniff_underlay(lab, 3)
        assert ping(lab, c1, "198.19.42.3").returncode != 0
        assert captured(sniffer) == []
        for d in (d1, d2):
            d.set_network_keys(net.id, [K[1], K[0], K[2]])
        assert ping(lab, c1, "198.19.42.3").returncode == 0

        lab.spawn_ready(c2, netprogs.tag_server("rot", 8080))
        held = lab.spawn_ready(c1, netprogs.hold_client("198.19.42.3", 8080), ready="rot", stdin=subprocess.PIPE)

        def echo(msg: str) -> None:
            held.stdin.write(msg + "\n")
            held.stdin.flush()
            assert held.stdout.readline().strip() == msg

        # Two rotations as the managers do them (a new key appended, the oldest dropped, the second
        # oldest sends), reaching the hosts one after the other: the connection never notices.
        for ring in ([K[2], K[1], K[3]], [K[3], K[2], K[4]]):
            d1.set_network_keys(net.id, ring)
            echo(f"half {ring[0][0]}")
            assert ping(lab, c2, "198.19.42.2").returncode == 0
            d2.set_network_keys(net.id, ring)
            echo(f"both {ring[0][0]}")
        sas, _ = d2.esp_state(net.id)
        in_spis = {xfrm.derive_sa(k, lab.hosts[0].addr, lab.hosts[1].addr)[0] for k in (K[2], K[3], K[4])}
        out_spi = xfrm.derive_sa(K[3], lab.hosts[1].addr, lab.hosts[0].addr)[0]
        assert {s.spi for s in sas} == in_spis | {out_spi}  # the old keys' SAs are gone

        # an agent restart: a new driver adopts the sandboxes and the SAs, gets the keys again, and
        # the connection lives on without a duplicate SA
        d1b = OverlayDriver("node1", lab.hosts[0].addr, d1.prefix, host_netns=lab.hosts[0].path,
                            gw_subnet="198.19.250.0/24")
        d1b.restore()
        d1b.set_network_keys(net.id, [K[3], K[2], K[4]])
        echo("after restart")
        assert len(d1b.esp_state(net.id)[0]) == 4
        d1 = d1b
        held.kill()
    finally:
        cleanup_all([d1, d2])
    assert snapshot(lab, netprogs) == before


@pytest.mark.uml
def test_encrypted_overlays_in_uml():
    """Runs this module's ESP tests inside a User-Mode Linux kernel that has IPsec ESP."""
    if xfrm.esp_supported() or os.environ.get("SHOAL_UML"):
        pytest.skip("this kernel has IPsec ESP: the tests above ran directly")
    import uml

    t0 = time.monotonic()
    agent_level = os.path.join(os.path.dirname(__file__), "..", "agent", "test_network_encrypted.py")
    r = uml.pytest([os.path.relpath(p, uml.REPO) for p in (__file__, agent_level)], timeout=600)
    tail = "\n".join(r.output.splitlines()[-40:])
    assert r.returncode == 0, f"inside UML:\n{tail}"
    assert re.search(r"\b3 passed\b", r.output), tail
    print(f"UML run took {time.monotonic() - t0:.1f} s")
