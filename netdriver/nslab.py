"""Network-namespace "hosts" on an underlay bridge, for tests, benchmarks and the one-machine lab.

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
"""

from __future__ import annotations

import ctypes
import ipaddress
import logging
import os
import signal
import socket
import subprocess
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field

import pyroute2.config
from pyroute2 import netns
from pyroute2.iproute import IPRoute  # not `from pyroute2 import IPRoute`: see swarmd._lazy_pyroute2

log = logging.getLogger(__name__)

# pyroute2 forks short-lived helpers (netns sockets, netns creation) and stops them with SIGTERM.
# A child that inherited a Python SIGTERM handler (sys.exit, or asyncio's wakeup fd shared with
# the parent) would unwind the parent's stack or signal the parent's loop. Default dispositions
# in those children:
pyroute2.config.disable_mp_signal = True

NETNS_DIR = "/run/netns"


@dataclass
class NsHost:
    name: str  # netns name (under /run/netns)
    path: str  # /run/netns/<name>
    addr: str  # underlay address, e.g. 198.18.0.1
    ifname: str = "eth0"


def ns_path(name: str) -> str:
    return name if name.startswith("/") else f"{NETNS_DIR}/{name}"


_CLONE_NEWNET = 0x40000000
_MS_REC, _MS_BIND, _MS_SHARED = 0x4000, 0x1000, 1 << 20


def create_netns(name: str) -> str:
    """Create the named network namespace /run/netns/NAME without forking.

    pyroute2's netns.create forks a helper, and a fork of a process that runs gRPC threads aborts
    in the child (gRPC's fork handlers); here a short-lived thread unshares its own network
    namespace and bind-mounts it, as `ip netns add` does in its process."""
    libc = ctypes.CDLL(None, use_errno=True)
    path = ns_path(name)
    os.makedirs(NETNS_DIR, exist_ok=True)
    if libc.mount(b"", NETNS_DIR.encode(), b"none", _MS_SHARED | _MS_REC, None) != 0:
        if libc.mount(NETNS_DIR.encode(), NETNS_DIR.encode(), b"none", _MS_BIND | _MS_REC, None) != 0:
            e = ctypes.get_errno()
            raise OSError(e, f"cannot prepare {NETNS_DIR} for namespace {name}: {os.strerror(e)}")
        libc.mount(b"", NETNS_DIR.encode(), b"none", _MS_SHARED | _MS_REC, None)
    os.close(os.open(path, os.O_RDONLY | os.O_CREAT | os.O_EXCL, 0))
    errors: list[int] = []

    def unshare_and_bind() -> None:
        if libc.unshare(_CLONE_NEWNET) != 0:
            errors.append(ctypes.get_errno())
        elif libc.mount(b"/proc/thread-self/ns/net", path.encode(), b"none", _MS_BIND, None) != 0:
            errors.append(ctypes.get_errno())

    t = threading.Thread(target=unshare_and_bind, name=f"netns-{name}")
    t.start()
    t.join()
    if errors:
        os.unlink(path)
        raise OSError(errors[0], f"cannot create network namespace {name}: {os.strerror(errors[0])}")
    return path


def nsenter(path: str | None, argv: Sequence[str]) -> list[str]:
    """argv prefixed to run in the network namespace at `path` (None: the current one)."""
    return list(argv) if path is None else ["nsenter", f"--net={ns_path(path)}", *argv]


_libc = ctypes.CDLL(None, use_errno=True)
CLONE_NEWNET = 0x40000000


def netns_socket(path: str | None, family: int = socket.AF_NETLINK, type_: int = socket.SOCK_DGRAM,
                 proto: int = 0) -> socket.socket:
    """A socket created in the network namespace at `path` (None: this process's). A short-lived
    thread enters the namespace (setns affects only the calling thread) and makes it: no fork, so
    ~10x cheaper than pyroute2's netns= and safe in a process with gRPC threads."""
    if path is None:
        return socket.socket(family, type_, proto)
    out: dict[str, object] = {}

    def run() -> None:
        try:
            fd = os.open(ns_path(path), os.O_RDONLY)
            try:
                if _libc.setns(fd, CLONE_NEWNET) != 0:
                    err = ctypes.get_errno()
                    raise OSError(err, os.strerror(err), path)
            finally:
                os.close(fd)
            out["sock"] = socket.socket(family, type_, proto)
        except BaseException as e:  # handed to the caller's thread
            out["err"] = e

    t = threading.Thread(target=run, name="netns-socket", daemon=True)
    t.start()
    t.join()
    if "err" in out:
        raise out["err"]  # type: ignore[misc]
    return out["sock"]  # type: ignore[return-value]


def open_ipr(path: str | None) -> IPRoute:
    """IPRoute bound to the namespace at `path` (None: this process's), without forking."""
    if path is None:
        return IPRoute(groups=0)
    return IPRoute(fileno=netns_socket(path).detach(), groups=0)


def move_link(ipr: IPRoute, index: int, path: str) -> None:
    """Move a link into the namespace at `path`. The fd is ours to open and close: pyroute2 closes
    an fd it opened for a name from a callback that may run late (and hit a reused fd number)."""
    fd = os.open(ns_path(path), os.O_RDONLY)
    try:
        ipr.link("set", index=index, net_ns_fd=fd)
    finally:
        os.close(fd)


def add_veth(ipr: IPRoute, name: str, peer: str, peer_netns: str) -> None:
    """A veth pair: `name` in ipr's namespace, `peer` created directly in the namespace at
    `peer_netns` (one request; cheaper than creating both ends here and moving one)."""
    fd = os.open(ns_path(peer_netns), os.O_RDONLY)
    try:
        ipr.link("add", ifname=name, kind="veth", peer={"ifname": peer, "net_ns_fd": fd})
    finally:
        os.close(fd)


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
        log.info("nslab host=%s addr=%s ready", host.name, addr)
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
            if name in netns.listnetns():
                try:
                    netns.remove(name)
                except OSError as e:
                    log.warning("nslab remove netns=%s failed: %s", name, e)
        self._namespaces.clear()
