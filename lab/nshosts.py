"""Network-namespace "hosts" on an underlay bridge, for the one-machine lab, tests and benchmarks.

    lab = NsLab("st1234", n_hosts=3)        # namespaces st1234-ul, st1234-h1 … st1234-h3
    try:
        h1 = lab.hosts[0]                   # NsHost(name, path, addr="198.18.0.1", ifname="eth0")
        c = lab.add_netns("c1")             # an extra, empty namespace (a "container"), path returned
        lab.run(h1.path, ["ping", "-c1", "198.18.0.2"])
        p = lab.spawn(c, ["busybox", "nc", "-lk", "-p", "80", "-e", "cat"])
    finally:
        lab.close()                         # kills what spawn() started, removes every namespace

Layout: an underlay namespace `<prefix>-ul` holds bridge `br0` with `<subnet>.254/24` (the "outside
world": a server there is reachable from every host), and host i is namespace `<prefix>-h<i>` with
`eth0` = `<subnet>.<i>/24` (a veth whose other end, `h<i>`, is a port of `br0`), `lo` up and a
default route via `.254`. Nothing is created in the caller's own namespace. Commands run in a
namespace through `nsenter --net=PATH` (which, unlike `ip netns exec`, does not remount /sys).
The namespace primitives underneath are shoal.netdriver.netns.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import signal
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass, field

from shoal.netdriver.netns import (
    create_netns,
    list_netns,
    move_link,
    ns_path,
    nsenter,
    open_ipr,
    remove_netns,
)

log = logging.getLogger(__name__)


@dataclass
class NsHost:
    name: str  # netns name (under /run/netns)
    path: str  # /run/netns/<name>
    addr: str  # underlay address, e.g. 198.18.0.1
    ifname: str = "eth0"


@dataclass
class NsLab:
    prefix: str
    n_hosts: int = 2
    subnet: str = "198.18.0.0/24"
    mtu: int = 1500
    hosts: list[NsHost] = field(default_factory=list)
    underlay: NsHost | None = None
    _namespaces: list[str] = field(default_factory=list)
    _procs: list[subprocess.Popen] = field(default_factory=list)

    def __post_init__(self) -> None:
        try:
            self._build()
        except BaseException:
            self.close()
            raise

    # -- building ---------------------------------------------------------------------------
    def _build(self) -> None:
        net = ipaddress.ip_network(self.subnet)
        outside = str(net.network_address + 254)
        ul = self.add_netns("ul")
        self.underlay = NsHost(name=f"{self.prefix}-ul", path=ul, addr=outside, ifname="br0")
        with open_ipr(ul) as ipr:
            ipr.link("set", index=ipr.link_lookup(ifname="lo")[0], state="up")
            ipr.link("add", ifname="br0", kind="bridge", br_stp_state=0, br_forward_delay=0)
            br = ipr.link_lookup(ifname="br0")[0]
            ipr.link("set", index=br, mtu=self.mtu, state="up")
            ipr.addr("add", index=br, address=outside, prefixlen=net.prefixlen)
        for i in range(1, self.n_hosts + 1):
            self.add_host(i)

    def add_host(self, i: int) -> NsHost:
        net = ipaddress.ip_network(self.subnet)
        addr = str(net.network_address + i)
        path = self.add_netns(f"h{i}")
        ul = self.underlay.path if self.underlay else ""
        with open_ipr(ul) as ipr:
            ipr.link("add", ifname=f"h{i}", kind="veth", peer={"ifname": f"u{i}"})
            move_link(ipr, ipr.link_lookup(ifname=f"u{i}")[0], path)
            idx = ipr.link_lookup(ifname=f"h{i}")[0]
            ipr.link("set", index=idx, master=ipr.link_lookup(ifname="br0")[0], mtu=self.mtu, state="up")
        with open_ipr(path) as ipr:
            ipr.link("set", index=ipr.link_lookup(ifname="lo")[0], state="up")
            idx = ipr.link_lookup(ifname=f"u{i}")[0]
            ipr.link("set", index=idx, ifname="eth0", mtu=self.mtu, state="up")
            ipr.addr("add", index=idx, address=addr, prefixlen=net.prefixlen)
            ipr.route("add", dst="0.0.0.0/0", gateway=str(net.network_address + 254))
        host = NsHost(name=f"{self.prefix}-h{i}", path=path, addr=addr)
        self.hosts.append(host)
        log.info("nshosts host=%s addr=%s ready", host.name, addr)
        return host

    def add_netns(self, suffix: str) -> str:
        """Create namespace `<prefix>-<suffix>` with lo up; it is removed by close()."""
        name = f"{self.prefix}-{suffix}"
        create_netns(name)
        self._namespaces.append(name)
        with open_ipr(name) as ipr:
            ipr.link("set", index=ipr.link_lookup(ifname="lo")[0], state="up")
        return ns_path(name)

    # -- processes --------------------------------------------------------------------------
    def run(self, path: str | None, argv: Sequence[str], *, check: bool = True, timeout: float = 60,
            input: str | None = None) -> subprocess.CompletedProcess:
        return subprocess.run(nsenter(path, argv), capture_output=True, text=True, check=check,
                              timeout=timeout, input=input)

    def spawn(self, path: str | None, argv: Sequence[str], **kw) -> subprocess.Popen:
        """Start a long-running process in the namespace; close() ends it (by its PID)."""
        kw.setdefault("stdout", subprocess.DEVNULL)
        kw.setdefault("stderr", subprocess.DEVNULL)
        p = subprocess.Popen(nsenter(path, argv), start_new_session=True, **kw)
        self._procs.append(p)
        return p

    def spawn_ready(self, path: str | None, argv: Sequence[str], ready: str = "ready",
                    **kw) -> subprocess.Popen:
        """spawn() a server that prints a line containing `ready` once it listens; wait for it."""
        p = self.spawn(path, argv, stdout=subprocess.PIPE, text=True, **kw)
        assert p.stdout is not None
        for line in p.stdout:
            if ready in line:
                return p
        raise RuntimeError(f"{argv[0]} exited ({p.wait()}) before printing {ready!r}")

    # -- teardown ---------------------------------------------------------------------------
    def close(self) -> None:
        for p in self._procs:
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                p.wait()
        self._procs.clear()
        for name in reversed(self._namespaces):
            if name in list_netns():
                try:
                    remove_netns(name)
                except OSError as e:
                    log.warning("nshosts remove netns=%s failed: %s", name, e)
        self._namespaces.clear()
