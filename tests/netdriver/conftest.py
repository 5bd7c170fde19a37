"""Fixtures for netdriver integration tests: namespace hosts on an underlay bridge, and tiny servers.

    def test_x(nslab):
        lab = nslab(3)                      # NsLab with hosts st<pid><n>-h1..h3 on 198.18.0.0/24
        c = lab.add_netns("c1")             # a "container" namespace (removed at teardown)
    def test_y(nslab, netprogs):
        lab.spawn_ready(c, netprogs.tag_server("a", 8080))
        out = lab.run(c2, netprogs.tag_client("198.19.1.2", 8080, 10)).stdout   # JSON {tag: count}

Everything created through the lab (namespaces, processes) is removed at teardown even when the
test fails; anything made inside the host namespaces dies with them.
"""

from __future__ import annotations

import itertools
import os
import sys
from types import SimpleNamespace

import pytest

from shoal.lab.nshosts import NsLab

_counter = itertools.count()

TAG_SERVER = r"""
import socket, sys, threading
tag, port, proto = sys.argv[1], int(sys.argv[2]), sys.argv[3]
if proto == "udp":
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("0.0.0.0", port))
    print("ready", flush=True)
    while True:
        d, a = s.recvfrom(2048)
        s.sendto(tag.encode(), a)
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", port))
s.listen(256)
print("ready", flush=True)
def serve(c):
    with c:
        c.sendall((tag + "\n").encode())
        while d := c.recv(4096):
            c.sendall(d)
while True:
    c, _ = s.accept()
    threading.Thread(target=serve, args=(c,), daemon=True).start()
"""

TAG_CLIENT = r"""
import collections, json, socket, sys
addr, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
tags = collections.Counter()
for _ in range(n):
    with socket.create_connection((addr, port), timeout=5) as c:
        tags[c.makefile().readline().strip()] += 1
print(json.dumps(tags))
"""

# Holds one connection open: prints the tag, then echoes each stdin line through the connection.
HOLD_CLIENT = r"""
import socket, sys
c = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5)
f = c.makefile("rw")
print(f.readline().strip(), flush=True)
for line in sys.stdin:
    f.write(line); f.flush()
    print(f.readline().strip(), flush=True)
"""


def tag_server(tag: str, port: int, proto: str = "tcp") -> list[str]:
    return [sys.executable, "-c", TAG_SERVER, tag, str(port), proto]


def tag_client(addr: str, port: int, n: int = 1) -> list[str]:
    return [sys.executable, "-c", TAG_CLIENT, addr, str(port), str(n)]


def hold_client(addr: str, port: int) -> list[str]:
    return [sys.executable, "-c", HOLD_CLIENT, addr, str(port)]


def unique_prefix() -> str:
    return f"st{os.getpid() % 10000}{next(_counter)}"


@pytest.fixture
def nslab():
    """Factory: nslab(n_hosts=2, **kw) -> NsLab; every lab is closed at teardown."""
    if os.geteuid() != 0:
        pytest.fail("netdriver integration tests need root (network namespaces)")
    labs: list[NsLab] = []

    def make(n_hosts: int = 2, **kw) -> NsLab:
        lab = NsLab(unique_prefix(), n_hosts, **kw)
        labs.append(lab)
        return lab

    yield make
    for lab in labs:
        lab.close()


def host_state(lab: NsLab, path: str) -> tuple[list[str], str]:
    """(link names, nft ruleset) of a namespace, to compare before/after."""
    links = lab.run(path, ["ip", "-o", "link", "show"]).stdout
    names = sorted(line.split(":")[1].strip().split("@")[0] for line in links.splitlines())
    rules = lab.run(path, ["nft", "list", "ruleset"]).stdout
    return names, rules


@pytest.fixture
def netprogs() -> SimpleNamespace:
    """The helpers above as a fixture (test modules should not import conftest)."""
    return SimpleNamespace(tag_server=tag_server, tag_client=tag_client, hold_client=hold_client,
                           host_state=host_state)
