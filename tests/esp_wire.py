"""Shared by the encrypted-overlay tests: a skip mark for kernels without IPsec ESP (the tests then run
inside a UML kernel, see tests/uml.py) and a capture of what crosses the underlay between two hosts."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from shoal.netdriver import xfrm

needs_esp = pytest.mark.skipif(
    not xfrm.esp_supported(),
    reason="this kernel has no IPsec ESP; test_encrypted_overlays_in_uml runs these in a UML kernel that has")

# Underlay capture: every IP packet between the two hosts, as (proto, udp dport or 0).
SNIFF_UNDERLAY = r"""
import json, sys
from scapy.all import IP, UDP, sniff
a, b, secs = sys.argv[1], sys.argv[2], float(sys.argv[3])
seen = []
def keep(p):
    if IP in p and {p[IP].src, p[IP].dst} == {a, b}:
        seen.append([p[IP].proto, p[UDP].dport if UDP in p else 0])
sniff(iface="br0", prn=keep, store=False, timeout=secs, started_callback=lambda: print("ready", flush=True))
print(json.dumps(seen), flush=True)
"""

def sniff_underlay(lab, secs: float) -> subprocess.Popen:
    """Capture `secs` seconds of what crosses an NsLab's underlay between its first two hosts."""
    return lab.spawn_ready(lab.underlay.path, [sys.executable, "-c", SNIFF_UNDERLAY, lab.hosts[0].addr,
                                               lab.hosts[1].addr, str(secs)])


def sniff_between(underlay_netns: str, a: str, b: str, secs: float) -> subprocess.Popen:
    """The same on any underlay namespace (a `swarmctl lab`'s): a process of the caller's, which
    captured() waits for."""
    p = subprocess.Popen(["nsenter", f"--net={underlay_netns}", sys.executable, "-c", SNIFF_UNDERLAY, a, b,
                          str(secs)], stdout=subprocess.PIPE, text=True)
    assert p.stdout is not None
    for line in p.stdout:
        if "ready" in line:
            return p
    raise RuntimeError(f"the underlay capture exited ({p.wait()}) before it was ready")


def captured(proc: subprocess.Popen) -> list[tuple[int, int]]:
    out, _ = proc.communicate(timeout=60)
    return [tuple(x) for x in json.loads(out.strip().splitlines()[-1])]


