"""SWIM membership (probe, indirect probe, suspicion, incarnation refutation, piggybacked
dissemination, push-pull state sync over TCP) on one UDP and one TCP socket (port 7946).

Semantics follow hashicorp/memberlist (written here from its documented behaviour), with faster
defaults (see :class:`GossipConfig`): every ``probe_interval`` a node probes the next member of a
shuffled round-robin list; no ack within ``probe_timeout`` → ``indirect_checks`` random members
are asked to probe it; no ack by the end of the interval → the member is *suspect*. A suspect
that does not refute (by gossiping ``alive`` with a higher incarnation) within
``suspicion_mult * max(1, log10(n)) * probe_interval`` (Lifeguard: up to ``suspicion_max_timeout_mult``
times longer until ``suspicion_confirmations`` other members suspect it too) is declared *dead*.
Membership changes are piggybacked on probes/acks and gossiped to ``gossip_nodes`` random members
every ``gossip_interval``, each up to ``retransmit_mult * ceil(log10(n + 1))`` times. Incarnations start
at the wall clock in milliseconds, so a restarted node supersedes its previous (dead) life.

Used by :class:`shoal.netdriver.networkdb.NetworkDB`, which adds network tables through the
:class:`Delegate` hooks. Public pieces::

    GossipConfig (dataclass of intervals), Member (dataclass), MemberState (proto enum values)
    SwimMembership(node_id, bind_addr, advertise_addr, port, keyring, config, delegate)
        await start() / stop() / join(seeds) -> int / leave()
        members() -> list[Member]; alive_members() -> list[Member]; member(node_id)
        queue_broadcast(key, Message); send_packet(addr, port, messages)
        await stream_request(addr, port, Stream) -> Stream
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
import random
import struct
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from shoal.netdriver.keyring import OVERHEAD, Keyring, KeyringError
from shoal.proto import gossip_pb2 as pb

log = logging.getLogger("shoal.netdriver.swim")

ALIVE, SUSPECT, DEAD, LEFT = pb.ALIVE, pb.SUSPECT, pb.DEAD, pb.LEFT
STATE_NAMES = {ALIVE: "alive", SUSPECT: "suspect", DEAD: "dead", LEFT: "left"}
MAX_FRAME = 64 << 20
STOP_TIMEOUT = 5.0  # stop(): how long open stream connections may still take to close


@dataclass
class GossipConfig:
    probe_interval: float = 0.5
    probe_timeout: float = 0.25
    indirect_checks: int = 3
    suspicion_mult: float = 3.0          # suspicion timeout = mult * max(1, log10 n) * probe_interval ...
    suspicion_max_timeout_mult: float = 3.0  # ... times this while no other member confirms it; it
    suspicion_confirmations: int = 2     # falls to the minimum once this many others suspect it too
    retransmit_mult: int = 4             # each broadcast sent mult * ceil(log10(n + 1)) times
    gossip_interval: float = 0.2         # membership and table retransmits
    gossip_nodes: int = 3                # fan-out
    push_pull_interval: float = 30.0     # membership anti-entropy (TCP) with one random member
    table_sync_interval: float = 7.5     # per-network table anti-entropy (TCP), jittered ±25 %
    tombstone_ttl: float = 300.0         # deleted entries are forgotten after this long
    dead_reclaim_time: float = 30.0      # dead/left members are forgotten after this long
    udp_buffer_size: int = 1400          # max datagram size (plaintext + crypto overhead)
    tcp_timeout: float = 5.0
    leave_timeout: float = 1.0           # how long leave() waits for its broadcasts to go out
    reconnect_interval: float = 10.0     # try to rejoin one random failed (dead) member this often,
    reconnect_timeout: float = 3600.0    # for this long after it failed (heals partitions)
    replay_max_age: float = 60.0         # packets sealed longer ago (or ahead) by the sender's clock are dropped

    @classmethod
    def memberlist_lan(cls) -> GossipConfig:
        """hashicorp/memberlist's DefaultLANConfig timings (the reference; slower detection)."""
        return cls(probe_interval=1.0, probe_timeout=0.5, suspicion_mult=4.0, suspicion_max_timeout_mult=6.0,
                   suspicion_confirmations=2, retransmit_mult=4, gossip_interval=0.2, gossip_nodes=3,
                   push_pull_interval=30.0)

    def validate(self) -> None:
        """Raise ValueError naming the first bad field."""
        for name in ("probe_interval", "probe_timeout", "suspicion_mult", "gossip_interval", "push_pull_interval",
                     "table_sync_interval", "tombstone_ttl", "dead_reclaim_time", "tcp_timeout", "replay_max_age"):
            if getattr(self, name) <= 0:
                raise ValueError(f"GossipConfig.{name} must be > 0")
        if self.probe_timeout >= self.probe_interval:
            raise ValueError("GossipConfig.probe_timeout must be shorter than probe_interval (e.g. half of it)")
        if self.gossip_nodes < 1 or self.retransmit_mult < 1 or self.indirect_checks < 0:
            raise ValueError("GossipConfig.gossip_nodes and retransmit_mult must be >= 1, indirect_checks >= 0")
        if self.suspicion_max_timeout_mult < 1 or self.suspicion_confirmations < 0:
            raise ValueError("GossipConfig.suspicion_max_timeout_mult must be >= 1 and suspicion_confirmations >= 0")
        if self.udp_buffer_size < 512:
            raise ValueError("GossipConfig.udp_buffer_size must be at least 512 bytes")


@dataclass
class Member:
    node_id: str
    addr: str
    port: int
    state: int = ALIVE
    incarnation: int = 0
    state_change: float = field(default_factory=time.monotonic)

    @property
    def state_name(self) -> str:
        return STATE_NAMES[self.state]


class Delegate:
    """Hooks for the layer above (network tables)."""

    def notify_alive(self, member: Member, rejoined: bool) -> None: ...

    def notify_gone(self, member: Member) -> None: ...  # dead or left

    def handle_message(self, msg: pb.Message, source: str) -> None: ...

    def local_state(self, pp: pb.PushPull, remote: pb.PushPull | None) -> None: ...

    def merge_remote_state(self, pp: pb.PushPull) -> None: ...

    def refuted_dead(self) -> None: ...

    def notify_state(self, member: Member) -> None: ...  # any state change (incl. first alive)


class TransmitQueue:
    """Broadcasts waiting to be sent, each at most ``limit`` times; a newer broadcast with the
    same key replaces the older one (e.g. a later state of the same member)."""

    def __init__(self) -> None:
        self._items: dict[object, list] = {}  # key -> [transmits, order, msg, size]
        self._order = itertools.count()

    def __len__(self) -> int:
        return len(self._items)

    def queue(self, key: object, msg: pb.Message) -> None:
        self._items[key] = [0, next(self._order), msg, msg.ByteSize() + 3]

    def fresh(self) -> int:
        return sum(1 for it in self._items.values() if it[0] == 0)

    def get(self, budget: int, limit: int) -> list[pb.Message]:
        """Messages fitting in ``budget`` bytes, least-sent first (newest first among equals)."""
        batches = self.batches(budget, limit, max_packets=1, sends=1)
        return batches[0] if batches else []

    def batches(self, budget: int, limit: int, max_packets: int, sends: int) -> list[list[pb.Message]]:
        """Pack queued messages (least-sent first) into at most ``max_packets`` lists of at most
        ``budget`` bytes each; every packed message counts ``sends`` transmissions."""
        if not self._items:
            return []
        out: list[list[pb.Message]] = []
        cur: list[pb.Message] = []
        left = budget
        for key, it in sorted(self._items.items(), key=lambda kv: (kv[1][0], -kv[1][1])):
            if it[3] > left:
                if it[3] > budget:
                    continue  # can never fit
                out.append(cur)
                if len(out) >= max_packets:
                    return out
                cur, left = [], budget
            left -= it[3]
            cur.append(it[2])
            it[0] += sends
            if it[0] >= limit:
                del self._items[key]
        if cur:
            out.append(cur)
        return out

    def pop_oversize(self, budget: int) -> list[pb.Message]:
        """Remove and return messages that can never fit in one datagram of ``budget`` bytes."""
        big = [k for k, it in self._items.items() if it[3] > budget]
        return [self._items.pop(k)[2] for k in big]

    def clear(self) -> None:
        self._items.clear()


def retransmit_limit(mult: int, n: int) -> int:
    return mult * max(1, math.ceil(math.log10(n + 1)))


def parse_seed(seed: str, default_port: int) -> tuple[str, int]:
    host, sep, port = seed.rpartition(":")
    if not sep:
        return seed, default_port
    try:
        return host, int(port)
    except ValueError:
        raise ValueError(f"gossip seed {seed!r} has a bad port; use HOST or HOST:PORT") from None


async def read_frame(reader: asyncio.StreamReader) -> bytes:
    (n,) = struct.unpack("!I", await reader.readexactly(4))
    if n > MAX_FRAME:
        raise ValueError(f"gossip frame of {n} bytes is too large")
    return await reader.readexactly(n)


def write_frame(writer: asyncio.StreamWriter, blob: bytes) -> None:
    writer.write(struct.pack("!I", len(blob)) + blob)


@dataclass
class _Suspicion:
    incarnation: int
    start: float                      # loop time the suspicion began
    confirmations: set[str]           # members that suspected it independently (first one included)
    k: int                            # confirmations that bring the timeout down to lo
    lo: float
    hi: float
    handle: asyncio.TimerHandle | None = None


class _UDP(asyncio.DatagramProtocol):
    def __init__(self, owner: SwimMembership) -> None:
        self.owner = owner
        self.closed = asyncio.get_running_loop().create_future()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closed.done():
            self.closed.set_result(None)

    def datagram_received(self, data: bytes, addr) -> None:
        self.owner._on_datagram(data, addr)

    def error_received(self, exc: Exception) -> None:
        log.debug("node=%s udp error: %s", self.owner.node_id, exc)


async def cancel_and_wait(tasks: Sequence[asyncio.Task]) -> None:
    """Cancel the tasks and wait until they are done. A cancellation can be lost (Python 3.11's
    wait_for swallows one that arrives as its inner future completes), so tasks still running after
    a second are cancelled again."""
    pending = {t for t in tasks if not t.done()}
    for t in pending:
        t.cancel()
    while pending:
        _, pending = await asyncio.wait(pending, timeout=1.0)
        for t in pending:
            log.warning("task %s still running after cancel; cancelling again", t.get_name())
            t.cancel()
    for t in tasks:
        if not t.cancelled() and t.exception() is not None:
            log.debug("task %s ended with %r", t.get_name(), t.exception())


class SwimMembership:
    def __init__(
        self,
        node_id: str,
        bind_addr: str,
        advertise_addr: str,
        port: int,
        keyring: Keyring,
        config: GossipConfig,
        delegate: Delegate,
    ) -> None:
        self.node_id = node_id
        self.bind_addr = bind_addr
        self.advertise_addr = advertise_addr or bind_addr
        self.port = port
        self.keyring = keyring
        self.config = config
        self.delegate = delegate
        self.incarnation = time.time_ns() // 1_000_000
        self._members: dict[str, Member] = {}
        self._queue = TransmitQueue()
        self._acks: dict[int, Callable[[pb.Ack], None]] = {}
        self._seq = itertools.count(random.randrange(1 << 30))
        self._probe_list: list[str] = []
        self._probe_index = 0
        self._suspicion: dict[str, _Suspicion] = {}
        self._failed: dict[str, tuple[str, int, float]] = {}  # dead members to reconnect: addr, port, since
        self._transport: asyncio.DatagramTransport | None = None
        self._protocol: _UDP | None = None
        self._server: asyncio.base_events.Server | None = None
        self._streams: set[asyncio.StreamWriter] = set()  # open inbound stream connections
        self._tasks: list[asyncio.Task] = []
        self._leaving = False
        self.dropped = 0          # packets that failed authentication/decoding or were replays
        self.stats = {"udp_sent": 0, "udp_recv": 0, "tcp_sent": 0}

    # ----- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._members[self.node_id] = Member(self.node_id, self.advertise_addr, self.port, ALIVE, self.incarnation)
        try:
            self._transport, self._protocol = await loop.create_datagram_endpoint(
                lambda: _UDP(self), local_addr=(self.bind_addr, self.port)
            )
            self._server = await asyncio.start_server(self._on_stream, self.bind_addr, self.port)
        except OSError as e:
            if self._transport is not None:
                self._transport.close()
            raise OSError(
                e.errno, f"gossip cannot bind {self.bind_addr}:{self.port} ({e.strerror}); free the port or set another one"
            ) from e
        self._tasks = [
            asyncio.create_task(self._probe_loop(), name=f"swim-probe-{self.node_id}"),
            asyncio.create_task(self._gossip_loop(), name=f"swim-gossip-{self.node_id}"),
            asyncio.create_task(self._push_pull_loop(), name=f"swim-pushpull-{self.node_id}"),
            asyncio.create_task(self._reap_loop(), name=f"swim-reap-{self.node_id}"),
            asyncio.create_task(self._reconnect_loop(), name=f"swim-reconnect-{self.node_id}"),
        ]
        log.info("node=%s gossip listening on %s:%d (advertise %s)", self.node_id, self.bind_addr, self.port,
                 self.advertise_addr)

    async def stop(self) -> None:
        await cancel_and_wait(self._tasks)
        self._tasks = []
        for node in list(self._suspicion):
            self._cancel_suspicion(node)
        if self._transport is not None:
            self._transport.close()
            self._transport = None
            await self._protocol.closed  # the socket is really closed (the port can be bound again)
        if self._server is not None:
            self._server.close()
            # wait_closed() waits for every open connection: a peer's stream that is stuck (a reply
            # it does not read) would hold stop() forever, so those are cut first
            for w in list(self._streams):
                w.transport.abort()
            try:
                await asyncio.wait_for(self._server.wait_closed(), STOP_TIMEOUT)
            except TimeoutError:
                log.warning("node=%s gossip stream connections still open after %.0f s; stopping anyway",
                            self.node_id, STOP_TIMEOUT)
            self._server = None
        log.info("node=%s gossip stopped", self.node_id)

    async def join(self, seeds: Sequence[str]) -> int:
        """Push-pull with each seed over TCP; returns how many answered."""
        ok = 0
        for seed in seeds:
            host, port = parse_seed(seed, self.port)
            if (host, port) == (self.advertise_addr, self.port):
                continue
            try:
                await self.push_pull(host, port, join=True)
                ok += 1
            except (TimeoutError, OSError, asyncio.IncompleteReadError, KeyringError, ValueError) as e:
                log.warning("node=%s join via %s:%d failed: %s", self.node_id, host, port, e or type(e).__name__)
        log.info("node=%s joined via %d of %d seeds, %d members", self.node_id, ok, len(seeds),
                 len(self.alive_members()))
        return ok

    async def leave(self) -> None:
        """Tell the cluster we leave (state left, higher incarnation) and give it time to spread."""
        self._leaving = True
        self.incarnation += 1
        me = self._members[self.node_id]
        me.incarnation, me.state = self.incarnation, LEFT
        self.queue_broadcast(("member", self.node_id), pb.Message(member=self._update_of(me)))
        others = [m for m in self.alive_members() if m.node_id != self.node_id]
        if others:
            # send at once to a few members, then let the gossip loop drain the queue
            for m in random.sample(others, min(len(others), self.config.gossip_nodes)):
                self.send_packet(m.addr, m.port, [])
            deadline = asyncio.get_running_loop().time() + self.config.leave_timeout
            while len(self._queue) and asyncio.get_running_loop().time() < deadline:
                await asyncio.sleep(self.config.gossip_interval / 2)
        log.info("node=%s left the cluster", self.node_id)

    # ----- members ---------------------------------------------------------------------------

    def members(self) -> list[Member]:
        return [Member(m.node_id, m.addr, m.port, m.state, m.incarnation, m.state_change)
                for m in self._members.values()]

    def member(self, node_id: str) -> Member | None:
        return self._members.get(node_id)

    def alive_members(self) -> list[Member]:
        return [m for m in self._members.values() if m.state in (ALIVE, SUSPECT)]

    def num_alive(self) -> int:
        return sum(1 for m in self._members.values() if m.state in (ALIVE, SUSPECT))

    def _update_of(self, m: Member, frm: str = "") -> pb.MemberUpdate:
        return pb.MemberUpdate(node=m.node_id, addr=m.addr, port=m.port, incarnation=m.incarnation,
                               state=m.state, **{"from": frm})

    def _set_state(self, m: Member, state: int) -> None:
        if m.state != state:
            log.info("node=%s member=%s %s -> %s incarnation=%d", self.node_id, m.node_id,
                     STATE_NAMES[m.state], STATE_NAMES[state], m.incarnation)
            m.state = state
            m.state_change = time.monotonic()
            self.delegate.notify_state(m)

    def _refute(self, inc: int) -> None:
        self.incarnation = max(self.incarnation, inc) + 1
        me = self._members[self.node_id]
        me.incarnation = self.incarnation
        log.info("node=%s refutes suspicion, incarnation=%d", self.node_id, self.incarnation)
        self.queue_broadcast(("member", self.node_id), pb.Message(member=self._update_of(me)))

    def _on_alive(self, u: pb.MemberUpdate) -> None:
        if u.node == self.node_id:
            return
        m = self._members.get(u.node)
        if m is None:
            m = Member(u.node, u.addr, u.port, ALIVE, u.incarnation)
            self._members[u.node] = m
            log.info("node=%s member=%s joined (%s:%d) incarnation=%d", self.node_id, u.node, u.addr, u.port,
                     u.incarnation)
            self.delegate.notify_state(m)
            self.queue_broadcast(("member", u.node), pb.Message(member=u))
            self.delegate.notify_alive(m, rejoined=False)
            return
        if u.incarnation <= m.incarnation:
            return
        was = m.state
        self._failed.pop(u.node, None)
        m.incarnation, m.addr, m.port = u.incarnation, u.addr, u.port
        self._cancel_suspicion(u.node)
        self._set_state(m, ALIVE)
        self.queue_broadcast(("member", u.node), pb.Message(member=self._update_of(m)))
        if was in (DEAD, LEFT):
            self.delegate.notify_alive(m, rejoined=True)

    def _suspicion_timeout_for(self, confirmations: int, k: int, lo: float, hi: float) -> float:
        """Lifeguard: start at ``hi`` and fall towards ``lo`` as independent suspicions arrive."""
        if k <= 0:
            return lo
        frac = math.log(confirmations + 1) / math.log(k + 1)
        return max(lo, hi - frac * (hi - lo))

    def _on_suspect(self, u: pb.MemberUpdate) -> None:
        m = self._members.get(u.node)
        if m is None or u.incarnation < m.incarnation:
            return
        frm = getattr(u, "from")
        if m.state == SUSPECT and u.incarnation == m.incarnation:
            self._confirm_suspicion(m, frm)
            return
        # a suspect with a newer incarnation than our own suspicion restarts it
        if not (m.state == ALIVE or (m.state == SUSPECT and u.incarnation > m.incarnation)):
            return
        if u.node == self.node_id:
            if not self._leaving:
                self._refute(u.incarnation)
            return
        m.incarnation = u.incarnation
        self._set_state(m, SUSPECT)
        self.queue_broadcast(("member", u.node), pb.Message(member=self._update_of(m, frm)))
        n = self.num_alive()
        lo = self.config.suspicion_mult * max(1.0, math.log10(max(1, n))) * self.config.probe_interval
        hi = self.config.suspicion_max_timeout_mult * lo
        k = self.config.suspicion_confirmations
        if n - 2 < k:  # too few members to wait for independent confirmations
            k = 0
        self._cancel_suspicion(u.node)
        loop = asyncio.get_running_loop()
        sus = _Suspicion(u.incarnation, loop.time(), {frm}, k, lo, hi)
        sus.handle = loop.call_later(self._suspicion_timeout_for(0, k, lo, hi), self._suspicion_timeout,
                                     u.node, u.incarnation)
        self._suspicion[u.node] = sus

    def _confirm_suspicion(self, m: Member, frm: str) -> None:
        sus = self._suspicion.get(m.node_id)
        if sus is None or sus.incarnation != m.incarnation or frm in sus.confirmations:
            return
        sus.confirmations.add(frm)
        loop = asyncio.get_running_loop()
        timeout = self._suspicion_timeout_for(len(sus.confirmations) - 1, sus.k, sus.lo, sus.hi)
        sus.handle.cancel()
        sus.handle = loop.call_later(max(0.0, sus.start + timeout - loop.time()), self._suspicion_timeout,
                                     m.node_id, m.incarnation)
        # pass the independent confirmation on, so that the others shorten their timers too
        self.queue_broadcast(("suspect", m.node_id, frm), pb.Message(member=self._update_of(m, frm)))

    def _suspicion_timeout(self, node: str, inc: int) -> None:
        self._suspicion.pop(node, None)
        m = self._members.get(node)
        if m is not None and m.state == SUSPECT and m.incarnation == inc:
            log.info("node=%s member=%s suspicion timed out", self.node_id, node)
            self._on_dead(pb.MemberUpdate(node=node, addr=m.addr, port=m.port, incarnation=inc, state=DEAD,
                                          **{"from": self.node_id}))

    def _cancel_suspicion(self, node: str) -> None:
        sus = self._suspicion.pop(node, None)
        if sus is not None and sus.handle is not None:
            sus.handle.cancel()

    def _on_dead(self, u: pb.MemberUpdate) -> None:
        m = self._members.get(u.node)
        if m is None or u.incarnation < m.incarnation:
            return
        if m.state in (DEAD, LEFT) and not (m.state == DEAD and u.state == LEFT):
            return
        if u.node == self.node_id:
            if not self._leaving:
                self._refute(u.incarnation)
                self.delegate.refuted_dead()
            return
        m.incarnation = u.incarnation
        self._cancel_suspicion(u.node)
        was = m.state
        self._set_state(m, LEFT if u.state == LEFT else DEAD)
        if u.state == LEFT:
            self._failed.pop(u.node, None)
        else:
            self._failed[u.node] = (m.addr, m.port, time.monotonic())
        self.queue_broadcast(("member", u.node), pb.Message(member=self._update_of(m, getattr(u, "from"))))
        if was in (ALIVE, SUSPECT):
            self.delegate.notify_gone(m)

    def _on_member_update(self, u: pb.MemberUpdate) -> None:
        if u.state == ALIVE:
            self._on_alive(u)
        elif u.state == SUSPECT:
            self._on_suspect(u)
        else:
            self._on_dead(u)

    # ----- UDP -------------------------------------------------------------------------------

    def queue_broadcast(self, key: object, msg: pb.Message) -> None:
        self._queue.queue(key, msg)

    def _limit(self) -> int:
        return retransmit_limit(self.config.retransmit_mult, self.num_alive())

    def send_raw(self, addr: str, port: int, packet: pb.Packet) -> None:
        if self._transport is None:
            return
        try:
            self._transport.sendto(self.keyring.seal(packet.SerializeToString(), b"udp"), (addr, port))
            self.stats["udp_sent"] += 1
        except OSError as e:
            log.debug("node=%s send to %s:%d failed: %s", self.node_id, addr, port, e)

    def send_packet(self, addr: str, port: int, messages: list[pb.Message], piggyback: bool = True) -> None:
        """Send ``messages`` plus as many queued membership broadcasts as fit in one datagram."""
        pkt = pb.Packet(source=self.node_id, messages=messages)
        if piggyback:
            budget = self.config.udp_buffer_size - OVERHEAD - pkt.ByteSize()
            pkt.messages.extend(self._queue.get(budget, self._limit()))
        if pkt.messages:
            self.send_raw(addr, port, pkt)

    def _on_datagram(self, data: bytes, addr) -> None:
        try:
            pkt = pb.Packet.FromString(self.keyring.open(data, b"udp"))
        except Exception as e:  # KeyringError or DecodeError
            self.dropped += 1
            log.debug("node=%s dropped packet from %s: %s", self.node_id, addr, e)
            return
        self.stats["udp_recv"] += 1
        for msg in pkt.messages:
            try:
                self._handle(msg, pkt.source, addr)
            except Exception:
                log.exception("node=%s failed to handle %s from %s", self.node_id, msg.WhichOneof("body"), pkt.source)

    def _handle(self, msg: pb.Message, source: str, addr) -> None:
        kind = msg.WhichOneof("body")
        if kind == "ping":
            if msg.ping.target and msg.ping.target != self.node_id:
                return
            self.send_packet(addr[0], addr[1], [pb.Message(ack=pb.Ack(seq=msg.ping.seq, source=self.node_id))])
        elif kind == "ack":
            cb = self._acks.get(msg.ack.seq)
            if cb is not None:
                cb(msg.ack)
        elif kind == "indirect_ping":
            self._indirect(msg.indirect_ping)
        elif kind == "member":
            self._on_member_update(msg.member)
        else:
            self.delegate.handle_message(msg, source)

    def _indirect(self, ip: pb.IndirectPing) -> None:
        seq = next(self._seq)
        loop = asyncio.get_running_loop()

        def on_ack(ack: pb.Ack) -> None:
            self._acks.pop(seq, None)
            handle.cancel()
            self.send_packet(ip.source_addr, ip.source_port, [pb.Message(ack=pb.Ack(seq=ip.seq, source=ip.target))])

        handle = loop.call_later(self.config.probe_timeout * 2, lambda: self._acks.pop(seq, None))
        self._acks[seq] = on_ack
        self.send_packet(ip.target_addr, ip.target_port, [pb.Message(ping=pb.Ping(
            seq=seq, target=ip.target, source=self.node_id, source_addr=self.advertise_addr, source_port=self.port))])

    # ----- probing ---------------------------------------------------------------------------

    def _next_probe_target(self) -> Member | None:
        for _ in range(2):
            while self._probe_index < len(self._probe_list):
                m = self._members.get(self._probe_list[self._probe_index])
                self._probe_index += 1
                if m is not None and m.node_id != self.node_id and m.state in (ALIVE, SUSPECT):
                    return m
            self._probe_list = [n for n in self._members if n != self.node_id]
            random.shuffle(self._probe_list)
            self._probe_index = 0
        return None

    async def _probe_loop(self) -> None:
        loop = asyncio.get_running_loop()
        await asyncio.sleep(random.random() * self.config.probe_interval)
        while True:
            t0 = loop.time()
            m = self._next_probe_target()
            if m is not None and not self._leaving:
                try:
                    await self._probe(m)
                except Exception:
                    log.exception("node=%s probe of %s failed", self.node_id, m.node_id)
            await asyncio.sleep(max(0.0, self.config.probe_interval - (loop.time() - t0)))

    async def _probe(self, m: Member) -> None:
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        seq = next(self._seq)
        got = loop.create_future()
        self._acks[seq] = lambda ack: got.done() or got.set_result(ack)
        try:
            msgs = [pb.Message(ping=pb.Ping(seq=seq, target=m.node_id, source=self.node_id,
                                            source_addr=self.advertise_addr, source_port=self.port))]
            if m.state == SUSPECT:  # let it hear it is suspected, so it can refute at once
                msgs.append(pb.Message(member=self._update_of(m, self.node_id)))
            self.send_packet(m.addr, m.port, msgs)
            try:
                await asyncio.wait_for(asyncio.shield(got), self.config.probe_timeout)
                return
            except TimeoutError:
                pass
            helpers = [h for h in self._members.values()
                       if h.state == ALIVE and h.node_id not in (self.node_id, m.node_id)]
            for h in random.sample(helpers, min(len(helpers), self.config.indirect_checks)):
                self.send_packet(h.addr, h.port, [pb.Message(indirect_ping=pb.IndirectPing(
                    seq=seq, target=m.node_id, target_addr=m.addr, target_port=m.port, source=self.node_id,
                    source_addr=self.advertise_addr, source_port=self.port))])
            remaining = self.config.probe_interval - (loop.time() - t0)
            try:
                await asyncio.wait_for(asyncio.shield(got), max(0.01, remaining))
                return
            except TimeoutError:
                pass
            cur = self._members.get(m.node_id)
            if cur is not None and cur.state in (ALIVE, SUSPECT) and not self._leaving:
                log.info("node=%s member=%s did not answer probe, suspecting", self.node_id, m.node_id)
                self._on_suspect(pb.MemberUpdate(node=m.node_id, addr=m.addr, port=m.port,
                                                 incarnation=cur.incarnation, state=SUSPECT,
                                                 **{"from": self.node_id}))
        finally:
            self._acks.pop(seq, None)
            if not got.done():
                got.cancel()

    # ----- gossip ----------------------------------------------------------------------------

    def _gossip_targets(self, k: int) -> list[Member]:
        now = time.monotonic()
        cands = [m for m in self._members.values() if m.node_id != self.node_id and (
            m.state in (ALIVE, SUSPECT) or now - m.state_change < self.config.dead_reclaim_time)]
        return random.sample(cands, min(k, len(cands)))

    async def _gossip_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.gossip_interval)
            if not len(self._queue):
                continue
            for m in self._gossip_targets(self.config.gossip_nodes):
                self.send_packet(m.addr, m.port, [])

    async def _push_pull_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.push_pull_interval * random.uniform(0.75, 1.25))
            others = [m for m in self.alive_members() if m.node_id != self.node_id]
            if not others or self._leaving:
                continue
            m = random.choice(others)
            try:
                await self.push_pull(m.addr, m.port, join=False)
            except (TimeoutError, OSError, asyncio.IncompleteReadError, KeyringError, ValueError) as e:
                log.info("node=%s push-pull with %s failed: %s", self.node_id, m.node_id, e or type(e).__name__)

    async def _reconnect_loop(self) -> None:
        """Like Serf/NetworkDB: now and then push-pull with a failed member, so that the two sides
        of a healed partition find each other again (probes and gossip skip dead members)."""
        while True:
            await asyncio.sleep(self.config.reconnect_interval * random.uniform(0.75, 1.25))
            now = time.monotonic()
            for node, (_, _, since) in list(self._failed.items()):
                m = self._members.get(node)
                if now - since > self.config.reconnect_timeout or (m is not None and m.state in (ALIVE, SUSPECT, LEFT)):
                    del self._failed[node]
            if not self._failed or self._leaving:
                continue
            node = random.choice(list(self._failed))
            addr, port, _ = self._failed[node]
            try:
                await self.push_pull(addr, port, join=True)
                log.info("node=%s reconnected to failed member=%s", self.node_id, node)
            except (TimeoutError, OSError, asyncio.IncompleteReadError, KeyringError, ValueError) as e:
                log.debug("node=%s reconnect to %s failed: %s", self.node_id, node, e or type(e).__name__)

    async def _reap_loop(self) -> None:
        while True:
            await asyncio.sleep(max(1.0, self.config.dead_reclaim_time / 4))
            now = time.monotonic()
            for node, m in list(self._members.items()):
                if m.state in (DEAD, LEFT) and now - m.state_change > self.config.dead_reclaim_time:
                    del self._members[node]
                    log.info("node=%s forgot member=%s (%s)", self.node_id, node, m.state_name)

    # ----- TCP -------------------------------------------------------------------------------

    def local_state(self, join: bool, remote: pb.PushPull | None) -> pb.PushPull:
        pp = pb.PushPull(source=self.node_id, join=join)
        pp.members.extend(self._update_of(m) for m in self._members.values())
        self.delegate.local_state(pp, remote)
        return pp

    def merge_remote_state(self, pp: pb.PushPull) -> None:
        for u in pp.members:
            if u.state == ALIVE:
                self._on_alive(u)
            elif u.state == LEFT:
                self._on_dead(u)
            else:  # dead or suspect: give the node a chance to refute
                self._on_suspect(pb.MemberUpdate(node=u.node, addr=u.addr, port=u.port,
                                                 incarnation=u.incarnation, state=SUSPECT,
                                                 **{"from": getattr(u, "from")}))
        self.delegate.merge_remote_state(pp)

    async def stream_request(self, addr: str, port: int, req: pb.Stream) -> pb.Stream:
        async def go() -> pb.Stream:
            reader, writer = await asyncio.open_connection(addr, port)
            try:
                write_frame(writer, self.keyring.seal(req.SerializeToString(), b"tcp"))
                await writer.drain()
                self.stats["tcp_sent"] += 1
                return pb.Stream.FromString(self.keyring.open(await read_frame(reader), b"tcp"))
            finally:
                writer.close()
                try:
                    await writer.wait_closed()
                except OSError:
                    pass

        return await asyncio.wait_for(go(), self.config.tcp_timeout)

    async def push_pull(self, addr: str, port: int, join: bool, state: pb.PushPull | None = None) -> pb.PushPull:
        pp = state if state is not None else self.local_state(join, None)
        resp = await self.stream_request(addr, port, pb.Stream(push_pull=pp))
        if resp.WhichOneof("body") != "push_pull":
            raise ValueError("unexpected push-pull reply")
        self.merge_remote_state(resp.push_pull)
        return resp.push_pull

    async def _on_stream(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        self._streams.add(writer)
        try:
            blob = await asyncio.wait_for(read_frame(reader), self.config.tcp_timeout)
            try:
                req = pb.Stream.FromString(self.keyring.open(blob, b"tcp"))
            except Exception as e:
                self.dropped += 1
                log.debug("node=%s dropped stream from %s: %s", self.node_id, peer, e)
                return
            kind = req.WhichOneof("body")
            if kind == "push_pull":
                # compute our reply before merging so the requester gets what it lacks
                reply = self.local_state(False, req.push_pull)
                self.merge_remote_state(req.push_pull)
                resp = pb.Stream(push_pull=reply)
            elif kind == "ping":
                resp = pb.Stream(ack=pb.Ack(seq=req.ping.seq, source=self.node_id))
            else:
                return
            write_frame(writer, self.keyring.seal(resp.SerializeToString(), b"tcp"))
            await asyncio.wait_for(writer.drain(), self.config.tcp_timeout)  # a peer that does not read
        except (TimeoutError, OSError, asyncio.IncompleteReadError, ValueError) as e:
            log.debug("node=%s stream from %s failed: %s", self.node_id, peer, e)
        except Exception:
            log.exception("node=%s stream from %s failed", self.node_id, peer)
        finally:
            self._streams.discard(writer)
            writer.close()
