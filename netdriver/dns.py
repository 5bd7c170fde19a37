"""Embedded DNS server (Docker's 127.0.0.11) for containers, answering from the gossip tables.

Our process lives in the host namespace; for each container :meth:`DNSServer.serve_in` enters the
container's network namespace just long enough to create a UDP and a TCP socket bound to
``127.0.0.11:53`` there (``setns(2)`` through ctypes on the namespace file, so both
``/run/netns/NAME`` and ``/proc/PID/ns/net`` work), then serves them from the one asyncio loop.

Names resolved, from the ``endpoint_table`` entries (``EndpointRecord``) of the networks the
container is on (case-insensitive, trailing dot ignored):

* ``<service>`` and each network alias of a service → the service's VIP(s); all task IPs when the
  service's endpoint mode is ``dnsrr`` (or it has no VIP);
* ``tasks.<service>`` / ``tasks.<alias>`` → the IPs of all its tasks;
* a task name (``demo_web.1.<task id>``) or task id → that task's IP;
* stack short names: from a container of stack ``demo``, ``web`` (and ``tasks.web``) resolve like
  ``demo_web`` does for services whose record says ``stack == "demo"``;
* reverse lookups (PTR, ``d.c.b.a.in-addr.arpa``): a task IP → its task name, a VIP → its
  service name (unknown addresses are forwarded).

Single-label names and ``tasks.*`` names are ours: unknown → NXDOMAIN; a known name asked for
another type (AAAA, …) → an empty NOERROR answer. Every other query is forwarded unchanged to the
upstream resolvers (by default the ``nameserver`` lines of the host's ``/etc/resolv.conf``), from
the host namespace, over UDP (or TCP for TCP queries); no answer → SERVFAIL. A container with no
egress (only on internal networks: ``serve_in(..., forward=False)``) gets SERVFAIL at once instead,
as in Docker ≥ 26: its names do not leave the host. The DNS wire format (RFC 1035, A records only)
is written here.

API::

    DNSServer(tables, *, upstreams=None, resolv_conf="/etc/resolv.conf", ttl=600,
              address="127.0.0.11", port=53, forward_timeout=2.0)
        tables: anything with entries(table, network_id) -> dict[str, bytes] (a NetworkDB)
        await serve_in(container_id, netns_path, networks, stack=None, forward=True)
        update(container_id, networks, stack=None, forward=True)   # the container (dis)connected
        await stop_serving(container_id); await close()
        resolve(name, networks, stack=None) -> Resolution (RCODE and IPs, or forward=True)
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import fcntl
import ipaddress
import logging
import os
import random
import socket
import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

from shoal.netdriver.networkdb import ENDPOINT_TABLE
from shoal.proto.gossip_pb2 import EndpointRecord

log = logging.getLogger("shoal.netdriver.dns")

CLONE_NEWNET = 0x40000000
SIOCGIFFLAGS, SIOCSIFFLAGS, IFF_UP = 0x8913, 0x8914, 0x1
NETNS_DIR = "/run/netns"

TYPE_A = 1
TYPE_PTR = 12
CLASS_IN = 1
RCODE_OK, RCODE_FORMERR, RCODE_SERVFAIL, RCODE_NXDOMAIN, RCODE_NOTIMP = 0, 1, 2, 3, 4
MAX_UDP = 512

_libc = ctypes.CDLL(None, use_errno=True)


# ----- namespaces ----------------------------------------------------------------------------------


def netns_file(netns: str) -> str:
    return netns if netns.startswith("/") else os.path.join(NETNS_DIR, netns)


@contextlib.contextmanager
def in_netns(netns: str) -> Iterator[None]:
    """Run the body with this thread in network namespace ``netns`` (a name under /run/netns or
    a path such as /proc/PID/ns/net); sockets created inside stay in that namespace."""
    path = netns_file(netns)
    try:
        target = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise FileNotFoundError(errno.ENOENT, f"network namespace {path} does not exist; check netns_path") from None
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        if _libc.setns(target, CLONE_NEWNET) != 0:
            e = ctypes.get_errno()
            raise OSError(e, f"cannot enter network namespace {path}: {os.strerror(e)} (needs root)")
        try:
            yield
        finally:
            if _libc.setns(own, CLONE_NEWNET) != 0:  # pragma: no cover - would leave the loop thread astray
                e = ctypes.get_errno()
                raise SystemExit(f"cannot return to our own network namespace: {os.strerror(e)}")
    finally:
        os.close(target)
        os.close(own)


def _ensure_lo_up() -> None:
    """Bring ``lo`` of the current namespace up (127.0.0.11 lives on it). A plain ioctl: the
    synchronous pyroute2 API cannot run inside our event loop."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        req = struct.pack("16sH", b"lo", 0)
        flags = struct.unpack("16sH", fcntl.ioctl(s.fileno(), SIOCGIFFLAGS, req + bytes(22))[:18])[1]
        if not flags & IFF_UP:
            fcntl.ioctl(s.fileno(), SIOCSIFFLAGS, struct.pack("16sH", b"lo", flags | IFF_UP) + bytes(22))


# ----- wire format ---------------------------------------------------------------------------------


class DNSFormatError(ValueError):
    pass


@dataclass
class Query:
    id: int
    flags: int
    name: str           # lower case, no trailing dot
    qtype: int
    qclass: int
    question: bytes     # raw question section (echoed in the reply)


def parse_name(msg: bytes, off: int) -> tuple[str, int]:
    labels: list[str] = []
    end = None
    for _ in range(128):
        if off >= len(msg):
            raise DNSFormatError("name runs past the message")
        n = msg[off]
        if n == 0:
            off += 1
            break
        if n & 0xC0 == 0xC0:
            if off + 1 >= len(msg):
                raise DNSFormatError("truncated pointer")
            if end is None:
                end = off + 2
            off = ((n & 0x3F) << 8) | msg[off + 1]
            continue
        if n > 63 or off + 1 + n > len(msg):
            raise DNSFormatError("bad label")
        labels.append(msg[off + 1:off + 1 + n].decode("ascii", "replace"))
        off += 1 + n
    else:
        raise DNSFormatError("name too long")
    return ".".join(labels), (end if end is not None else off)


def parse_query(msg: bytes) -> Query:
    if len(msg) < 12:
        raise DNSFormatError("short header")
    qid, flags, qd, _an, _ns, _ar = struct.unpack("!6H", msg[:12])
    if flags & 0x8000 or qd != 1:
        raise DNSFormatError("not a single-question query")
    name, off = parse_name(msg, 12)
    if off + 4 > len(msg):
        raise DNSFormatError("truncated question")
    qtype, qclass = struct.unpack("!HH", msg[off:off + 4])
    return Query(qid, flags, name.lower().rstrip("."), qtype, qclass, msg[12:off + 4])


def encode_name(name: str) -> bytes:
    out = b""
    for label in name.rstrip(".").split("."):
        if label:
            b = label.encode("ascii")
            out += bytes([len(b)]) + b
    return out + b"\0"


def build_query(name: str, qtype: int = TYPE_A, qid: int | None = None) -> bytes:
    qid = random.randrange(1 << 16) if qid is None else qid
    return struct.pack("!6H", qid, 0x0100, 1, 0, 0, 0) + encode_name(name) + struct.pack("!HH", qtype, CLASS_IN)


def build_response(q: Query, rcode: int, ips: Sequence[str] = (), ttl: int = 600, limit: int | None = None,
                   ptrs: Sequence[str] = ()) -> bytes:
    answers = [b"\xc0\x0c" + struct.pack("!HHIH", TYPE_A, CLASS_IN, ttl, 4) + ipaddress.IPv4Address(ip).packed
               for ip in ips]
    for name in ptrs:
        rdata = encode_name(name)
        answers.append(b"\xc0\x0c" + struct.pack("!HHIH", TYPE_PTR, CLASS_IN, ttl, len(rdata)) + rdata)
    tc = 0
    if limit is not None:
        room = limit - 12 - len(q.question)
        keep = 0
        while keep < len(answers) and room >= len(answers[keep]):
            room -= len(answers[keep])
            keep += 1
        if keep < len(answers):
            answers, tc = answers[:keep], 0x0200
    flags = 0x8000 | (q.flags & 0x7800) | 0x0400 | tc | (q.flags & 0x0100) | 0x0080 | rcode
    return struct.pack("!6H", q.id, flags, 1, len(answers), 0, 0) + q.question + b"".join(answers)


def error_response(msg: bytes, rcode: int) -> bytes | None:
    """A reply with just the header (no question) for a query we could not parse."""
    if len(msg) < 12:
        return None
    qid, flags = struct.unpack("!HH", msg[:4])
    return struct.pack("!6H", qid, 0x8000 | (flags & 0x7900) | 0x0080 | rcode, 0, 0, 0, 0)


def servfail(msg: bytes) -> bytes | None:
    try:
        return build_response(parse_query(msg), RCODE_SERVFAIL)
    except DNSFormatError:
        return error_response(msg, RCODE_SERVFAIL)


def parse_response(msg: bytes) -> tuple[int, int, list[str]]:
    """(id, rcode, A-record addresses and PTR names) of a reply (for tests and diagnostics)."""
    qid, flags, qd, an, _ns, _ar = struct.unpack("!6H", msg[:12])
    off = 12
    for _ in range(qd):
        _, off = parse_name(msg, off)
        off += 4
    ips = []
    for _ in range(an):
        _, off = parse_name(msg, off)
        rtype, _cls, _ttl, rdlen = struct.unpack("!HHIH", msg[off:off + 10])
        off += 10
        if rtype == TYPE_A and rdlen == 4:
            ips.append(str(ipaddress.IPv4Address(msg[off:off + 4])))
        elif rtype == TYPE_PTR:
            ips.append(parse_name(msg, off)[0])
        off += rdlen
    return qid, flags & 0x000F, ips


# ----- resolution ----------------------------------------------------------------------------------


@dataclass
class Resolution:
    rcode: int = RCODE_OK
    ips: list[str] = field(default_factory=list)
    forward: bool = False
    ptrs: list[str] = field(default_factory=list)  # answers of a reverse (in-addr.arpa) lookup


def reverse_ip(name: str) -> str | None:
    """'4.3.2.1.in-addr.arpa' -> '1.2.3.4' (None if not a full IPv4 reverse name)."""
    if not name.endswith(".in-addr.arpa"):
        return None
    parts = name[: -len(".in-addr.arpa")].split(".")
    if len(parts) != 4:
        return None
    try:
        return str(ipaddress.IPv4Address(".".join(reversed(parts))))
    except ValueError:
        return None


def _strip_len(addr: str) -> str:
    return addr.split("/")[0]


def _dedup(xs: Sequence[str]) -> list[str]:
    return list(dict.fromkeys(x for x in xs if x))


def _service_names(r: EndpointRecord, stack: str | None, *, serving_only: bool = True) -> set[str]:
    """Names the record answers to. An inactive record (not yet / no more serving) answers to its
    service's names only for the VIP, which stays the service's address whatever its tasks do."""
    if r.inactive and serving_only:
        return set()
    names = {r.service_name.lower()} if r.service_name else set()
    names.update(a.lower() for a in r.aliases if a)
    if stack and r.stack == stack and r.service_name.startswith(stack + "_"):
        names.add(r.service_name[len(stack) + 1:].lower())
    return names


def _is_ours(name: str) -> bool:
    return "." not in name or name.startswith("tasks.")


@dataclass
class _Container:
    container_id: str
    networks: list[str]
    stack: str | None
    forward: bool = True  # other names go to the upstream resolvers (False: SERVFAIL, no egress)
    transports: list = field(default_factory=list)
    servers: list = field(default_factory=list)


class _UDPServer(asyncio.DatagramProtocol):
    def __init__(self, dns: DNSServer, ctr: _Container) -> None:
        self.dns, self.ctr = dns, ctr
        self.transport: asyncio.DatagramTransport | None = None
        self.closed = asyncio.get_running_loop().create_future()

    def connection_made(self, transport) -> None:
        self.transport = transport

    def connection_lost(self, exc) -> None:
        if not self.closed.done():
            self.closed.set_result(None)

    def datagram_received(self, data: bytes, addr) -> None:
        reply = self.dns._answer_local(data, self.ctr, MAX_UDP)
        if isinstance(reply, bytes):
            self.transport.sendto(reply, addr)
        elif reply is not None:  # forward
            self.dns._spawn(self._forward(data, addr))

    async def _forward(self, data: bytes, addr) -> None:
        reply = await self.dns._forward_udp(data, self.ctr)
        if reply is not None and self.transport is not None and not self.transport.is_closing():
            self.transport.sendto(reply, addr)


class _UpstreamUDP(asyncio.DatagramProtocol):
    def __init__(self, qid: bytes) -> None:
        self.qid = qid
        self.reply = asyncio.get_running_loop().create_future()

    def datagram_received(self, data: bytes, addr) -> None:
        if data[:2] == self.qid and not self.reply.done():
            self.reply.set_result(data)


def read_resolv_conf(path: str) -> list[tuple[str, int]]:
    out = []
    try:
        with open(path) as f:
            for line in f:
                parts = line.split()
                if len(parts) >= 2 and parts[0] == "nameserver":
                    try:
                        ip = ipaddress.ip_address(parts[1])
                    except ValueError:
                        continue
                    if ip.version == 4 and str(ip) != "127.0.0.11":
                        out.append((str(ip), 53))
    except FileNotFoundError:
        pass
    return out


class DNSServer:
    def __init__(
        self,
        tables,
        *,
        upstreams: Sequence[tuple[str, int] | str] | None = None,
        resolv_conf: str = "/etc/resolv.conf",
        ttl: int = 600,
        address: str = "127.0.0.11",
        port: int = 53,
        forward_timeout: float = 2.0,
    ) -> None:
        self.tables = tables
        if upstreams is None:
            self.upstreams = read_resolv_conf(resolv_conf)
        else:
            self.upstreams = [(u, 53) if isinstance(u, str) else (u[0], int(u[1])) for u in upstreams]
        self.ttl = ttl
        self.address = address
        self.port = port
        self.forward_timeout = forward_timeout
        self._containers: dict[str, _Container] = {}
        self._bg: set[asyncio.Task] = set()

    # ----- lifecycle -------------------------------------------------------------------------

    async def serve_in(self, container_id: str, netns_path: str, networks: Sequence[str],
                       stack: str | None = None, forward: bool = True) -> None:
        """Answer DNS at ``address:port`` inside the container's network namespace; forward=False: no
        query goes to the upstream resolvers (a container without egress)."""
        if container_id in self._containers:
            self.update(container_id, networks, stack, forward)
            return
        loop = asyncio.get_running_loop()
        ctr = _Container(container_id, list(networks), stack or None, forward)
        with in_netns(netns_path):
            _ensure_lo_up()
            udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            try:
                udp.setblocking(False)
                udp.bind((self.address, self.port))
                tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                tcp.setblocking(False)
                tcp.bind((self.address, self.port))
                tcp.listen(64)
            except OSError as e:
                udp.close()
                tcp.close()
                raise OSError(e.errno, f"cannot bind DNS {self.address}:{self.port} in {netns_path} for container "
                                       f"{container_id}: {e.strerror}") from e
        try:
            transport, proto = await loop.create_datagram_endpoint(lambda: _UDPServer(self, ctr), sock=udp)
            server = await asyncio.start_server(lambda r, w: self._on_tcp(r, w, ctr), sock=tcp)
        except BaseException:
            udp.close()
            tcp.close()
            raise
        ctr.transports.append((transport, proto))
        ctr.servers.append(server)
        self._containers[container_id] = ctr
        log.info("container=%s dns serving %s:%d in %s networks=%s stack=%s", container_id, self.address, self.port,
                 netns_path, ",".join(networks), stack or "-")

    def update(self, container_id: str, networks: Sequence[str], stack: str | None = None,
               forward: bool = True) -> None:
        ctr = self._containers[container_id]
        ctr.networks, ctr.stack, ctr.forward = list(networks), stack or None, forward

    async def stop_serving(self, container_id: str) -> None:
        ctr = self._containers.pop(container_id, None)
        if ctr is None:
            return
        for transport, proto in ctr.transports:
            transport.close()
            await proto.closed
        for server in ctr.servers:
            server.close()
            await server.wait_closed()
        log.info("container=%s dns stopped", container_id)

    async def close(self) -> None:
        for cid in list(self._containers):
            await self.stop_serving(cid)
        for t in list(self._bg):
            t.cancel()

    def serving(self) -> list[str]:
        return list(self._containers)

    # ----- resolution ------------------------------------------------------------------------

    def _records(self, networks: Sequence[str]) -> list[EndpointRecord]:
        out = []
        for n in networks:
            for value in self.tables.entries(ENDPOINT_TABLE, n).values():
                try:
                    out.append(EndpointRecord.FromString(value))
                except Exception:
                    log.warning("network=%s undecodable endpoint record", n)
        return out

    def resolve(self, name: str, networks: Sequence[str], stack: str | None = None) -> Resolution:
        """What the container on ``networks`` (of ``stack``) gets for an A query of ``name``."""
        name = name.lower().rstrip(".")
        recs = self._records(networks)
        rev = reverse_ip(name)
        if rev is not None:  # reverse lookup: a task's IP -> its task name, a VIP -> its service
            ptrs = _dedup([r.task_name or r.task_id for r in recs if _strip_len(r.ip) == rev]
                          + [r.service_name for r in recs if r.vip and _strip_len(r.vip) == rev])
            return Resolution(ptrs=ptrs) if ptrs else Resolution(forward=True)
        if name.startswith("tasks."):
            svc = name[len("tasks."):]
            ips = _dedup([_strip_len(r.ip) for r in recs if svc in _service_names(r, stack)])
            if ips:
                return Resolution(ips=ips)
        vip_mode = [r for r in recs if r.endpoint_mode != "dnsrr" and r.vip
                    and name in _service_names(r, stack, serving_only=False)]
        if vip_mode:  # the VIP, as long as the service has endpoints here, serving or not
            return Resolution(ips=_dedup([_strip_len(r.vip) for r in vip_mode]))
        matched = [r for r in recs if name in _service_names(r, stack)]
        if matched:
            ips = _dedup([_strip_len(r.ip) for r in matched])
            random.shuffle(ips)  # dnsrr: spread clients
            return Resolution(ips=ips)
        ips = _dedup([_strip_len(r.ip) for r in recs if name and name in (r.task_name.lower(), r.task_id.lower())])
        if ips:
            return Resolution(ips=ips)
        if _is_ours(name):
            return Resolution(rcode=RCODE_NXDOMAIN)
        return Resolution(forward=True)

    def _answer_local(self, data: bytes, ctr: _Container, limit: int | None) -> bytes | bool | None:
        """A reply, True to forward the query, or None to drop it."""
        try:
            q = parse_query(data)
        except DNSFormatError:
            return error_response(data, RCODE_FORMERR)
        if q.flags & 0x7800:  # only standard queries
            return build_response(q, RCODE_NOTIMP)
        res = self.resolve(q.name, ctr.networks, ctr.stack) if q.qclass == CLASS_IN else Resolution(forward=True)
        if res.forward:
            return True if ctr.forward else servfail(data)
        ips = res.ips if q.qtype == TYPE_A else []
        ptrs = res.ptrs if q.qtype == TYPE_PTR else []
        log.debug("container=%s dns %s type=%d -> rcode=%d %s", ctr.container_id, q.name, q.qtype, res.rcode,
                  ",".join(ips + ptrs))
        return build_response(q, res.rcode, ips, self.ttl, limit, ptrs=ptrs)

    # ----- forwarding ------------------------------------------------------------------------

    def _spawn(self, coro) -> None:
        t = asyncio.get_running_loop().create_task(coro)
        self._bg.add(t)
        t.add_done_callback(self._bg.discard)

    async def _forward_udp(self, data: bytes, ctr: _Container) -> bytes | None:
        loop = asyncio.get_running_loop()
        for host, port in self.upstreams:
            transport = None
            try:
                transport, proto = await loop.create_datagram_endpoint(lambda: _UpstreamUDP(data[:2]),
                                                                       remote_addr=(host, port))
                transport.sendto(data)
                return await asyncio.wait_for(proto.reply, self.forward_timeout)
            except (OSError, TimeoutError) as e:
                log.info("container=%s dns upstream %s:%d failed: %s", ctr.container_id, host, port,
                         e or type(e).__name__)
            finally:
                if transport is not None:
                    transport.close()
        return servfail(data)

    async def _forward_tcp(self, data: bytes, ctr: _Container) -> bytes | None:
        for host, port in self.upstreams:
            try:
                async def ask(host=host, port=port) -> bytes:
                    reader, writer = await asyncio.open_connection(host, port)
                    try:
                        writer.write(struct.pack("!H", len(data)) + data)
                        await writer.drain()
                        (n,) = struct.unpack("!H", await reader.readexactly(2))
                        return await reader.readexactly(n)
                    finally:
                        writer.close()

                return await asyncio.wait_for(ask(), self.forward_timeout)
            except (OSError, TimeoutError, asyncio.IncompleteReadError) as e:
                log.info("container=%s dns upstream tcp %s:%d failed: %s", ctr.container_id, host, port,
                         e or type(e).__name__)
        return servfail(data)

    async def _on_tcp(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, ctr: _Container) -> None:
        try:
            while True:
                try:
                    (n,) = struct.unpack("!H", await asyncio.wait_for(reader.readexactly(2), 30))
                    data = await reader.readexactly(n)
                except (asyncio.IncompleteReadError, TimeoutError):
                    return
                reply = self._answer_local(data, ctr, None)
                if reply is True:
                    reply = await self._forward_tcp(data, ctr)
                if isinstance(reply, bytes):
                    writer.write(struct.pack("!H", len(reply)) + reply)
                    await writer.drain()
        except OSError as e:
            log.debug("container=%s dns tcp error: %s", ctr.container_id, e)
        finally:
            writer.close()
