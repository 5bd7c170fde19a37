"""Network-namespace primitives of the data path: named namespaces, sockets and netlink handles
inside them, links moved or created across them -- all without forking (a fork of a process that
runs gRPC threads aborts in the child).

    create_netns(name) -> path        # /run/netns/NAME, like `ip netns add`
    list_netns() / remove_netns(name) # what /run/netns holds; `ip netns del`
    ns_path(name_or_path) -> path
    nsenter(path, argv) -> argv       # run a command in a namespace (None: this one)
    netns_socket(path, family, type)  # a socket made in that namespace
    open_ipr(path) -> IPRoute         # netlink handle in that namespace
    with netlink(path) as ipr: ...    # the same, closed on exit
    link_index(ipr, name) -> int | None; del_link(ipr, name)   # by name; a missing link is no error
    move_link(ipr, index, path) / add_veth(ipr, name, peer, peer_netns)

Used by the overlay driver, nft, xfrm and the agent's DNS sandbox; the lab's namespace hosts
(shoal.lab.nshosts) are built from them.
"""

from __future__ import annotations

import ctypes
import errno
import os
import socket
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import pyroute2.config
from pyroute2 import netns
from pyroute2.iproute import IPRoute  # not `from pyroute2 import IPRoute`: see swarmd._lazy_pyroute2
from pyroute2.netlink.exceptions import NetlinkError

# pyroute2 forks short-lived helpers (netns sockets, netns creation) and stops them with SIGTERM.
# A child that inherited a Python SIGTERM handler (sys.exit, or asyncio's wakeup fd shared with
# the parent) would unwind the parent's stack or signal the parent's loop. Default dispositions
# in those children:
pyroute2.config.disable_mp_signal = True

NETNS_DIR = "/run/netns"


def ns_path(name: str) -> str:
    """The path of a namespace given by name (under /run/netns) or already by path."""
    return name if name.startswith("/") else f"{NETNS_DIR}/{name}"


def list_netns() -> list[str]:
    """The names of the namespaces under /run/netns."""
    return netns.listnetns()


def remove_netns(name: str) -> None:
    """Remove the named namespace (its devices go when the last user leaves it)."""
    netns.remove(name)


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


@contextmanager
def netlink(path: str | None) -> Iterator[IPRoute]:
    """open_ipr(path) for the duration of a with block."""
    ipr = open_ipr(path)
    try:
        yield ipr
    finally:
        ipr.close()


def link_index(ipr: IPRoute, name: str) -> int | None:
    """The index of the link called `name` in ipr's namespace, None if there is none."""
    r = ipr.link_lookup(ifname=name)
    return r[0] if r else None


def del_link(ipr: IPRoute, name: str) -> None:
    """Delete the link called `name` if it exists (also when it vanishes meanwhile)."""
    idx = link_index(ipr, name)
    if idx is not None:
        try:
            ipr.link("del", index=idx)
        except NetlinkError as e:
            if e.code != errno.ENODEV:
                raise


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
