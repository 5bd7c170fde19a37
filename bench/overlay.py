"""Overlay data-path benchmark: iperf3 and ping between two "containers" on two namespace hosts over
the VXLAN overlay, against the same between the two hosts on the underlay, in one run.

    sudo .venv/bin/python bench/overlay.py [--seconds 5] [--rounds 3]

Prints a table and one JSON line. The figure that matters is the ratio overlay/underlay (Docker
Swarm on the same kind of lab: 14.8 vs 21-22 Gbit/s, ratio ~0.68; ping 0.093 ms avg).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import statistics
import sys

from shoal.netdriver.nslab import NsLab
from shoal.netdriver.overlay import OverlayDriver, mac_from_ip
from shoal.proto import objects_pb2


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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=int, default=5, help="iperf3 duration per measurement")
    ap.add_argument("--rounds", type=int, default=3, help="alternating overlay/underlay rounds")
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("bench/overlay.py needs root (network namespaces)")

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
        cs = [lab.add_netns(f"c{i}") for i in (1, 2)]
        for d, c, ip in zip(drivers, cs, ips, strict=True):
            a = objects_pb2.NetworkAttachment(addresses=[f"{ip}/24"], mac=mac_from_ip(ip))
            a.network.CopyFrom(net)
            d.attach(f"task-{ip}", c, [a])
        for d in drivers:
            for h, ip in zip(lab.hosts, ips, strict=True):
                d.add_peer(net.id, ip, mac_from_ip(ip), h.addr)
        h1, h2 = lab.hosts
        ping_avg(lab, cs[0], ips[1], 5)  # warm up ARP and the FDB path
        ping_avg(lab, h1.path, h2.addr, 5)

        over: list[float] = []
        under: list[float] = []
        for _ in range(args.rounds):
            over.append(iperf(lab, cs[1], cs[0], ips[1], args.seconds))
            under.append(iperf(lab, h2.path, h1.path, h2.addr, args.seconds))
        ping_over = ping_avg(lab, cs[0], ips[1])
        ping_under = ping_avg(lab, h1.path, h2.addr)
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
    w = max(len(r[0]) for r in rows)
    print(f"{'measure':<{w}}  {'value':>8}  runs / reference")
    for name, val, extra in rows:
        print(f"{name:<{w}}  {val:>8}  {extra}")
    print(json.dumps({
        "bench": "overlay", "seconds": args.seconds, "rounds": args.rounds,
        "overlay_gbps": round(o, 3), "underlay_gbps": round(u, 3), "ratio": round(ratio, 3),
        "overlay_runs": [round(x, 3) for x in over], "underlay_runs": [round(x, 3) for x in under],
        "ping_overlay_ms": ping_over, "ping_underlay_ms": ping_under, "target_ratio": 0.68,
    }))


if __name__ == "__main__":
    main()
