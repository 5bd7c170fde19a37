"""Overlay data-path benchmark: iperf3 and ping between two "containers" on two namespace hosts over
the VXLAN overlay, against the same between the two hosts on the underlay, in one run.

    sudo .venv/bin/python bench/overlay.py [--seconds 5] [--rounds 3] [--encrypted [--uml]]

Prints a table and one JSON line. The figure that matters is the ratio overlay/underlay (Docker
Swarm on the same kind of lab: 14.8 vs 21-22 Gbit/s, ratio ~0.68; ping 0.093 ms avg).

--encrypted also measures an encrypted overlay (IPsec ESP, AES-256-GCM) between the same hosts, as a
ratio to the plain overlay. It needs a kernel with ESP; --uml runs the whole benchmark inside the
User-Mode Linux kernel of the tests (tests/uml.py), where every figure is far below the host's
(system calls go through ptrace) and only the ratios measured in that one kernel mean anything.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import statistics
import sys

from shoal.lab.nshosts import NsLab
from shoal.netdriver.overlay.driver import OverlayDriver
from shoal.netdriver.overlay.model import mac_from_ip
from shoal.proto import objects_pb2

TOP = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def iperf(lab: NsLab, server_ns: str, client_ns: str, addr: str, seconds: int) -> float:
    srv = lab.spawn_ready(server_ns, ["iperf3", "-s", "-1", "--forceflush", "-B", addr], ready="Server listening")
    try:
        r = lab.run(client_ns, ["iperf3", "-c", addr, "-t", str(seconds), "-J"], timeout=seconds + 30)
    finally:
        srv.wait(timeout=30)
    return json.loads(r.stdout)["end"]["sum_received"]["bits_per_second"] / 1e9


def ping_avg(lab: NsLab, src_ns: str, addr: str, count: int = 50) -> float:
    r = lab.run(src_ns, ["busybox", "ping", "-q", "-c", str(count), "-i", "0.02", addr])
    m = re.search(r"min/avg/max = [\d.]+/([\d.]+)/", r.stdout)
    assert m, r.stdout
    return float(m.group(1))


def two_containers(lab: NsLab, drivers: list[OverlayDriver], net: objects_pb2.Network, ips: list[str],
                   tag: str) -> list[str]:
    """A "container" on each host on the network, each the other's peer."""
    cs = [lab.add_netns(f"{tag}{i}") for i in (1, 2)]
    for d, c, ip in zip(drivers, cs, ips, strict=True):
        a = objects_pb2.NetworkAttachment(addresses=[f"{ip}/24"], mac=mac_from_ip(ip))
        a.network.CopyFrom(net)
        d.attach(f"task-{ip}", c, [a])
    for d in drivers:
        for h, ip in zip(lab.hosts, ips, strict=True):
            d.add_peer(net.id, ip, mac_from_ip(ip), h.addr)
    return cs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=int, default=5, help="iperf3 duration per measurement")
    ap.add_argument("--rounds", type=int, default=3, help="alternating overlay/underlay rounds")
    ap.add_argument("--encrypted", action="store_true", help="also an encrypted overlay (needs IPsec ESP)")
    ap.add_argument("--uml", action="store_true", help="run inside the tests' UML kernel (has ESP)")
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("bench/overlay.py needs root (network namespaces)")
    if args.uml:
        sys.path.insert(0, os.path.join(TOP, "tests"))
        import uml

        argv = [a for a in sys.argv[1:] if a != "--uml"]
        r = uml.run([sys.executable, os.path.join(TOP, "bench", "overlay.py"), *argv], mem="2G",
                    timeout=120 + 4 * args.rounds * (args.seconds + 10))
        print(r.output, end="")
        sys.exit(r.returncode)

    main_pid = os.getpid()  # forked helpers must not run our cleanup: only the main process exits so
    signal.signal(signal.SIGTERM, lambda *_: sys.exit("terminated") if os.getpid() == main_pid else os._exit(1))
    lab = NsLab(f"bo{os.getpid() % 10000}", 2)
    drivers = [OverlayDriver(f"node{i}", h.addr, f"{lab.prefix}n{i}", host_netns=h.path,
                             gw_subnet="198.19.250.0/24") for i, h in enumerate(lab.hosts, 1)]
    try:
        net = objects_pb2.Network(id="benchnet")
        net.driver_state.vni = 4999
        net.ipam.configs.add(subnet="198.19.99.0/24", gateway="198.19.99.1")
        ips = ["198.19.99.2", "198.19.99.3"]
        cs = two_containers(lab, drivers, net, ips, "c")
        if args.encrypted:
            enc = objects_pb2.Network(id="benchenc")
            enc.driver_state.vni = 4998
            enc.spec.driver_config.options["encrypted"] = ""
            enc.ipam.configs.add(subnet="198.19.98.0/24", gateway="198.19.98.1")
            eips = ["198.19.98.2", "198.19.98.3"]
            for d in drivers:
                d.set_network_keys(enc.id, [bytes([2]) * 32, bytes([1]) * 32, bytes([3]) * 32])
            ecs = two_containers(lab, drivers, enc, eips, "e")
            ping_avg(lab, ecs[0], eips[1], 5)
        h1, h2 = lab.hosts
        ping_avg(lab, cs[0], ips[1], 5)  # warm up ARP and the FDB path
        ping_avg(lab, h1.path, h2.addr, 5)

        over: list[float] = []
        under: list[float] = []
        encr: list[float] = []
        for _ in range(args.rounds):
            over.append(iperf(lab, cs[1], cs[0], ips[1], args.seconds))
            under.append(iperf(lab, h2.path, h1.path, h2.addr, args.seconds))
            if args.encrypted:
                encr.append(iperf(lab, ecs[1], ecs[0], eips[1], args.seconds))
        ping_over = ping_avg(lab, cs[0], ips[1])
        ping_under = ping_avg(lab, h1.path, h2.addr)
        ping_enc = ping_avg(lab, ecs[0], eips[1]) if args.encrypted else 0.0
    finally:
        for d in drivers:
            d.cleanup()
        lab.close()

    o, u = statistics.median(over), statistics.median(under)
    ratio = o / u if u else 0.0
    rows = [
        ("iperf3 overlay (Gbit/s, median)", f"{o:.2f}", " ".join(f"{x:.2f}" for x in over)),
        ("iperf3 underlay (Gbit/s, median)", f"{u:.2f}", " ".join(f"{x:.2f}" for x in under)),
        ("ratio overlay/underlay (target >= 0.68)", f"{ratio:.3f}", ""),
        ("ping overlay avg (ms)", f"{ping_over:.3f}", "Docker Swarm: 0.093"),
        ("ping underlay avg (ms)", f"{ping_under:.3f}", ""),
    ]
    e = statistics.median(encr) if encr else 0.0
    if encr:
        rows += [
            ("iperf3 encrypted overlay (Gbit/s, median)", f"{e:.2f}", " ".join(f"{x:.2f}" for x in encr)),
            ("ratio encrypted/plain overlay", f"{e / o if o else 0.0:.3f}", ""),
            ("ping encrypted overlay avg (ms)", f"{ping_enc:.3f}", ""),
        ]
    w = max(len(r[0]) for r in rows)
    print(f"{'measure':<{w}}  {'value':>8}  runs / reference")
    for name, val, extra in rows:
        print(f"{name:<{w}}  {val:>8}  {extra}")
    print(json.dumps({
        "bench": "overlay", "seconds": args.seconds, "rounds": args.rounds,
        "overlay_gbps": round(o, 3), "underlay_gbps": round(u, 3), "ratio": round(ratio, 3),
        "overlay_runs": [round(x, 3) for x in over], "underlay_runs": [round(x, 3) for x in under],
        "ping_overlay_ms": ping_over, "ping_underlay_ms": ping_under, "target_ratio": 0.68,
        **({"encrypted_gbps": round(e, 3), "encrypted_runs": [round(x, 3) for x in encr],
            "ratio_encrypted_plain": round(e / o, 3) if o else 0.0, "ping_encrypted_ms": ping_enc,
            "kernel": os.uname().release} if encr else {}),
    }))


if __name__ == "__main__":
    main()
