"""The dispatcher: the only part of the manager that talks to agents.

Each agent keeps one session with the leader's dispatcher (`Session` stream), heartbeats on it,
receives its assignments (`Assignments` stream: tasks plus exactly the secrets and configs they
use, and the IPsec keys of the encrypted networks they are attached to) and reports task status
(`UpdateTaskStatus`, batched into store transactions). An agent of this version holds all of that
but the status reports on one stream, `Connect` (with its log subscriptions); the separate streams
serve older agents.

Network keys (`NetworkKeys`): in the COMPLETE set, every encrypted network of the node's tasks that
have not stopped; an UPDATE when a network's keys change (rotation), to the nodes that hold them; a
REMOVE (network id only) once the node's last task there has stopped. Within a message, key changes
come first, then secrets and configs, then tasks, so an agent has the keys before it builds a task's
network. Keys are never sent any other way: task and node copies go out without them.

Only the leader's dispatcher serves. On a follower every call fails with UNAVAILABLE and the
leader's address in the trailing metadata key `shoal-leader-addr`, so the agent moves there.

The caller's node id comes from the CN of its mTLS client certificate. Unit tests without TLS set
`insecure_node_id_from_metadata=True`, and the node id is then read from metadata `shoal-node-id`.

`run()` is a leader loop: it marks nodes whose heartbeats stopped DOWN (grace: two heartbeat
periods plus 0.8 of the configured one; with the default 1 s period a dead node is DOWN in under
3 s), and, when this manager has just become leader, gives every node two grace periods plus the
time a whole fleet takes to reconnect to open a session here.

Scale. The heartbeat period the agents are told grows with the cluster, so that the leader answers
at most `MAX_HEARTBEAT_RATE` heartbeats a second (1 s up to 500 nodes by default, 10 s at 5,000),
less a random 0-20 % per answer so that a fleet which (re)connected at once spreads out. The
streams cost nothing while nothing changes: one store watch feeds them all, each task event goes
to the one node it names, and a session stream rebuilds its message only when its node, the
managers or the cluster changed.

Restarts are not failures. An agent that stops gracefully (swarmd got SIGTERM: an upgrade, a
reboot) says so in a last `Heartbeat(restarting=True)`: its node becomes DISCONNECTED with a
`restart_deadline` = now + the cluster's restart window (`dispatcher.restart_window`, default
60 s), and is marked DOWN (its tasks then replaced) only if no session of it opens by then. The
deadline is in the store, so a new leader honours it too. DISCONNECTED keeps the node's tasks where
they are (orchestrators replace tasks of DOWN nodes only) and places no new ones there. A crash
followed by an immediate restart needs nothing of this: the agent is back within the grace.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import random
import time
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field
from typing import Any

import grpc

from shoal.manager import metrics
from shoal.manager.keymanager import ipsec_keys, is_encrypted, strip_keys
from shoal.manager.store import Store, StoreError, Tx, WatchBatch, Watcher, drain, new_id
from shoal.proto import (
    dispatcher_pb2,
    dispatcher_pb2_grpc,
    logs_pb2,
    objects_pb2,
    specs_pb2,
    types_pb2,
    watch_pb2,
)

log = logging.getLogger("shoal.dispatcher")

DEFAULT_HEARTBEAT_PERIOD = 1.0
DEFAULT_RESTART_WINDOW = 60.0  # seconds a gracefully stopped node has to come back (see the docstring)
# The period grows past the configured one so that the leader answers at most this many heartbeats a
# second: nodes / MAX_HEARTBEAT_RATE seconds.
MAX_HEARTBEAT_RATE = 500.0
# Each answer tells the agent the period less a random fraction up to this one: heartbeats of agents
# that connected together drift apart, and none comes later than the period.
HEARTBEAT_JITTER = 0.2
# A node is DOWN when no heartbeat came for two periods plus GRACE_MARGIN configured periods: two
# missed heartbeats and most of a third at the 1 s default (2.8 s, < 3 s); 20.8 s at 5,000 nodes.
GRACE_MARGIN = 0.8
# A new leader waits this many grace periods for nodes it has not seen (their agents must first learn
# that the old leader is gone and find this one), plus one second per RECONNECT_RATE nodes: the time
# the whole fleet takes to open its sessions here.
NEW_LEADER_GRACE = 2.0
RECONNECT_RATE = 500.0
# When at least MASS_FRACTION of the nodes (and MASS_MIN or more) miss their deadline within one grace
# period (those marked DOWN in the last grace period count too), the likelier cause is this leader
# (overloaded, paused, cut off from them) rather than the nodes: they get another grace period, up to
# MASS_MAX_GRACES more in all, before they are marked DOWN. Marking them DOWN would replace their tasks
# and bring their sessions back at once, the work that overloaded the leader again. A node that
# stopped gracefully is not held (its window is its grace). A session whose first heartbeat has not
# come is held the same way at any count: its agent was alive a grace period ago, when it opened it.
MASS_FRACTION = 0.25
MASS_MIN = 10
MASS_MAX_GRACES = 4
# A leader that stalls or reads heartbeats late (below) holds for longer: its lateness lasts as long
# as the work that causes it (a service of tens of thousands of tasks converging on a 2,000-node
# fleet takes it minutes), and each node it marked DOWN meanwhile would add its tasks to that work.
BEHIND_MAX_GRACES = 12
# The leader loop woke this much later than it asked: its event loop stalled, and the deadlines move on
# by the stall (see `Dispatcher._forgive_stall`). Within a grace period after such a stall, a missed
# deadline is held as a mass expiry is when the stall may have kept the node's heartbeat unread: the
# node's last heartbeat came less than STALL_EXCUSE_PERIODS periods before the loop stopped (its next
# one was due at most a period later, and may wait in the sockets or behind the stall's backlog). A
# node silent for longer before the stall began is late on its own account: it is marked DOWN (a dead
# node after a failover was held while the loop kept stalling, for up to BEHIND_MAX_GRACES).
STALL_TOLERANCE = 0.25
STALL_EXCUSE_PERIODS = 1.5
# Nor does it while it answered fewer than this fraction of the heartbeats owed to it in the last grace
# period (its sessions' count / the period, times the grace): it is reading them late, not the nodes
# sending them late (a lost quarter of the fleet is a mass expiry anyway).
BEHIND_FRACTION = 1 - MASS_FRACTION
# The expiry pass runs at most this many times a grace period (a node is DOWN at most a grace period
# and 1/EXPIRY_TICKS of one after its last heartbeat: 2.86 s at the 1 s default).
EXPIRY_TICKS = 50
# Options of a gRPC server that serves the Dispatcher: agents send an HTTP/2 keepalive ping when
# nothing came for agent.KEEPALIVE s (2, or more with a longer heartbeat period) to tell a busy
# manager from a lost one, also while no answer comes; gRPC's default answers pings without data
# more often than every 5 min with GOAWAY (too_many_pings).
# No bandwidth-delay probes: gRPC would send a ping with every message it receives (every heartbeat,
# status report, call), each answered, and the remote API front would copy three times the chunks.
SERVER_OPTIONS = [
    ("grpc.http2.min_ping_interval_without_data_ms", 1000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.bdp_probe", 0),
]
# A Session call to a manager that is not the leader and knows of none (an election under way, the
# last leader's lease still running) waits up to this many seconds for one, then is served (this
# manager won) or sent to it, instead of being refused at once: a fleet's agents would try manager
# after manager meanwhile, a TLS connection each, thousands a second on the managers left.
ELECTION_WAIT = 15.0
LEADER_POLL = 0.1  # s between two looks for a leader while Session calls wait for one
LEADER_ADDR_KEY = "shoal-leader-addr"
NODE_ID_KEY = "shoal-node-id"
API_PORT = 2377
# Incremental assignment changes arriving within this window go out as one message.
ASSIGNMENT_BATCH_WINDOW = 0.02
# Status updates arriving while a commit is in flight (or within this window) share a transaction.
STATUS_BATCH_WINDOW = 0.005
# At most this many node or task status changes go in one transaction (etcd's limits: see etcdstore).
MAX_BATCH = 1000
# A node or task status write refused as a stale version is built again this many times (8 attempts
# in all), after CONFLICT_BACKOFF s times the attempt number (see `Store.update`).
CONFLICT_RETRIES = 7
CONFLICT_BACKOFF = 0.001


def _dispatcher_seconds(cluster: objects_pb2.Cluster | None, field: str, default: float) -> float:
    """A duration of the cluster's dispatcher settings in seconds; `default` when unset or 0."""
    if cluster is not None and cluster.spec.dispatcher.HasField(field):
        v = getattr(cluster.spec.dispatcher, field).ToNanoseconds() / 1e9
        if v > 0:
            return v
    return default


def restart_window(cluster: objects_pb2.Cluster | None) -> float:
    return _dispatcher_seconds(cluster, "restart_window", DEFAULT_RESTART_WINDOW)


def heartbeat_period(cluster: objects_pb2.Cluster | None) -> float:
    """The configured heartbeat period (the cluster's `dispatcher.heartbeat_period`)."""
    return _dispatcher_seconds(cluster, "heartbeat_period", DEFAULT_HEARTBEAT_PERIOD)


def scaled_period(configured: float, nodes: int) -> float:
    """The heartbeat period of a cluster of `nodes`: the configured one, or longer so that the leader
    answers at most MAX_HEARTBEAT_RATE heartbeats a second."""
    return max(configured, nodes / MAX_HEARTBEAT_RATE)


def grace(configured: float, nodes: int) -> float:
    """How long after its last heartbeat a node is marked DOWN."""
    return 2 * scaled_period(configured, nodes) + GRACE_MARGIN * configured


def node_id_from_auth_context(context: grpc.aio.ServicerContext) -> str | None:
    """The node id of the verified client certificate, or None on a connection without mTLS."""
    from shoal.manager.ca import peer_identity

    peer = peer_identity(context)
    return peer.node_id if peer is not None else None


def _stable(t: objects_pb2.Task) -> bytes:
    """The task without its status and meta, serialized: what the agent needs to hear about when it
    changes."""
    x = objects_pb2.Task()
    x.CopyFrom(t)
    x.ClearField("status")
    x.ClearField("meta")
    return x.SerializeToString(deterministic=True)


def tasks_equal_stable(a: objects_pb2.Task, b: objects_pb2.Task) -> bool:
    """Equal except for status and meta: a change the agent does not need to hear about."""
    return _stable(a) == _stable(b)


@dataclass(frozen=True, slots=True)
class _Held:
    """What an Assignments stream keeps of a task it sent: what the task needs (secrets, configs,
    networks), how far it is, and its `_stable` form to tell whether a new version is news. A
    protobuf Task held 2.5 KB of memory for the fleet bench's 289-byte tasks (an arena each), and
    every session kept each of its tasks: this keeps about a fifth of that."""

    state: int
    desired: int
    secrets: tuple[str, ...]
    configs: tuple[str, ...]
    networks: tuple[str, ...]
    stable: bytes

    @classmethod
    def of(cls, t: objects_pb2.Task) -> _Held:
        c = t.spec.container
        return cls(t.status.state, t.desired_state, tuple(r.secret_id for r in c.secrets if r.secret_id),
                   tuple(r.config_id for r in c.configs if r.config_id),
                   tuple(a.network.id for a in t.networks if a.network.id), _stable(t))


def task_dependencies(tasks: Iterable[_Held]) -> tuple[set[str], set[str]]:
    """Ids of the secrets and configs needed by the tasks that may still start or run."""
    secrets: set[str] = set()
    configs: set[str] = set()
    for t in tasks:
        if t.state > types_pb2.RUNNING or t.desired > types_pb2.RUNNING:
            continue
        secrets.update(t.secrets)
        configs.update(t.configs)
    return secrets, configs


def task_networks(tasks: Iterable[_Held]) -> set[str]:
    """Ids of the networks the tasks that have not stopped yet are attached to. Unlike a secret, a network's
    keys stay while a task asked to stop still runs (its stop grace period), so its traffic stays
    encrypted until it is gone."""
    ids: set[str] = set()
    for t in tasks:
        if t.state <= types_pb2.RUNNING:
            ids.update(t.networks)
    return ids


@dataclass
class _Sent:
    """What one Assignments stream has sent: secret and config ids, and per network the keys sent."""

    secrets: set[str] = field(default_factory=set)
    configs: set[str] = field(default_factory=set)
    network_keys: dict[str, bytes] = field(default_factory=dict)  # network id -> serialized NetworkKeys


@dataclass
class _Session:
    """One node's session. Its streams wait on `changed` (the Session stream) and `assignments` (the
    Assignments stream's events, routed here by `Dispatcher._route`); `close()` wakes both."""

    id: str
    node_id: str
    expires: float
    closed: asyncio.Event = field(default_factory=asyncio.Event)
    restarting: bool = False  # its agent stopped gracefully: `expires` is the restart deadline
    heard: bool = False  # a heartbeat of it came: until then its deadline is held as a mass expiry's
    opened: float = field(default_factory=time.monotonic)  # (monotonic) it owes heartbeats from then
    beat: float = field(default_factory=time.monotonic)  # (monotonic) its last heartbeat, or its opening
    # Set when the node, the managers or the cluster changed: the Session stream builds its message again.
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    # The open Assignments stream's events (task events naming this node, every secret, config and
    # network event); None closes the stream. None when no Assignments stream is open.
    assignments: asyncio.Queue[WatchBatch | None] | None = None

    def close(self) -> None:
        self.closed.set()
        self.changed.set()
        if self.assignments is not None:
            self.assignments.put_nowait(None)
            self.assignments = None


@dataclass
class _StatusBatch:
    updates: dict[str, tuple[str, types_pb2.TaskStatus]] = field(default_factory=dict)
    waiters: list[asyncio.Future[None]] = field(default_factory=list)


class Dispatcher(dispatcher_pb2_grpc.DispatcherServicer):
    """gRPC servicer of `shoal.Dispatcher`, plus `run()` as a leader loop.

    `manager` (optional) may provide `leader_api_addr() -> str | None` (the leader's host:2377) and
    `api_peers() -> list[tuple[node_id, addr]]` (every manager's API address). Without them both are
    derived from the store: no leader address, and the manager nodes.
    """

    def __init__(
        self,
        store: Store,
        manager: Any = None,
        *,
        insecure_node_id_from_metadata: bool = False,
        auto_register: bool = False,
        logbroker: Any = None,
    ) -> None:
        """`logbroker`: whose ListenSubscriptions a Connect stream carries (`shoal.manager.logbroker`);
        None carries none (the agent then publishes no logs)."""
        self.store = store
        self.manager = manager
        self.logbroker = logbroker
        self.insecure = insecure_node_id_from_metadata
        # Create the Node object for an unknown caller (single-node setups and tests); normally the
        # CA creates it when it issues the node certificate, and an unknown node is refused.
        self.auto_register = auto_register
        self._sessions: dict[str, _Session] = {}
        # Nodes not yet seen by this leader: node id -> deadline to open a session here. While the
        # leader loop runs (`_leading`), a node created meanwhile (a join) gets one too: a node whose
        # agent never connects (its join's answer lost, the joiner gone) is DOWN, not READY for ever.
        self._unconfirmed: dict[str, float] = {}
        self._joined: set[str] = set()  # those of them created while this leader leads
        self._leading = False
        # Nodes held back from DOWN by a mass expiry (see MASS_FRACTION): node id -> since when.
        self._held: dict[str, float] = {}
        self._downs: list[tuple[float, int]] = []  # (when, how many) nodes were marked DOWN lately
        self._stalled_at = -1e9  # when this leader's loop last stalled (see STALL_TOLERANCE)
        self._stall_began = -1e9  # when the loop went to sleep before that stall
        self._beats = 0  # heartbeats answered so far
        # when sessions opened or nodes joined, the last grace period
        self._opened: collections.deque[float] = collections.deque()
        self._beat_counts: collections.deque[tuple[float, int]] = collections.deque()  # (when, _beats then)
        # Nodes between the start of a Session call and its session's entry: never marked DOWN then.
        self._registering: set[str] = set()
        self._batch = _StatusBatch()
        self._flusher: asyncio.Task[None] | None = None
        self._wakeup: asyncio.Event | None = None
        # The fenced store of the current leader term (set by the manager before `run`): writes of
        # the leader loop fail once this manager no longer holds the leader lease.
        self.leader_store: Store | None = None
        # The one store watch that feeds every stream (see `_route`), made by the first stream.
        self._router: Watcher | None = None
        self._managers: list[dispatcher_pb2.WeightedPeer] | None = None  # cached; None = compute again
        # Session calls waiting for a leader (`_await_leader`) wait on this event, set by one poller.
        self._leader_known: asyncio.Event | None = None
        self._leader_poll: asyncio.Task[None] | None = None
        self._leader_waiters = 0

    # ---- helpers ---------------------------------------------------------------------------
    def session_count(self) -> int:
        """Agent sessions this dispatcher holds (`shoal_dispatcher_sessions`)."""
        return len(self._sessions)

    def _node_count(self) -> int:
        return len(self.store.sm.tables["node"])

    def period(self) -> float:
        """The heartbeat period of this cluster now (configured, grown with the node count)."""
        return scaled_period(heartbeat_period(self.store.cluster()), self._node_count())

    def grace(self) -> float:
        return grace(heartbeat_period(self.store.cluster()), self._node_count())

    def restart_window(self) -> float:
        return restart_window(self.store.cluster())

    def leader_addr(self) -> str:
        fn = getattr(self.manager, "leader_api_addr", None)
        if fn is not None:
            addr = fn()
            if addr:
                return str(addr)
        return ""

    def managers(self) -> list[dispatcher_pb2.WeightedPeer]:
        """Every manager's API address, as sent in session messages (cached until a manager node changes)."""
        if self._managers is None:
            self._managers = self._find_managers()
        return self._managers

    def _find_managers(self) -> list[dispatcher_pb2.WeightedPeer]:
        fn = getattr(self.manager, "api_peers", None)
        if fn is not None:
            return [dispatcher_pb2.WeightedPeer(node_id=n, addr=a, weight=1) for n, a in fn()]
        peers = []
        for n in self.store.find("node"):
            if n.role == types_pb2.MANAGER and n.manager_status.api_addr:
                peers.append(
                    dispatcher_pb2.WeightedPeer(node_id=n.id, addr=n.manager_status.api_addr, weight=1)
                )
            elif n.role == types_pb2.MANAGER and n.manager_status.addr:
                host = n.manager_status.addr.rsplit(":", 1)[0]
                peers.append(dispatcher_pb2.WeightedPeer(node_id=n.id, addr=f"{host}:{API_PORT}", weight=1))
        return peers

    async def _check_leader(self, context: grpc.aio.ServicerContext) -> None:
        if not self.store.is_leader():
            leader = self.leader_addr()
            await context.abort(
                grpc.StatusCode.UNAVAILABLE,
                f"this manager is not the leader; the leader is at {leader or 'unknown (election under way)'}",
                trailing_metadata=((LEADER_ADDR_KEY, leader),),
            )

    async def _await_leader(self) -> None:
        """Return when this manager leads or knows the leader, or after ELECTION_WAIT s."""
        if self.store.is_leader() or self.leader_addr():
            return
        ev = self._leader_known
        if ev is None or ev.is_set():
            ev = self._leader_known = asyncio.Event()
        if self._leader_poll is None or self._leader_poll.done():
            self._leader_poll = asyncio.get_running_loop().create_task(self._poll_leader(ev))
        self._leader_waiters += 1
        try:
            async with asyncio.timeout(ELECTION_WAIT):
                await ev.wait()
        except TimeoutError:
            pass
        finally:
            self._leader_waiters -= 1

    async def _poll_leader(self, ev: asyncio.Event) -> None:
        """Set `ev` once there is a leader: one poller for every waiter, while there is one."""
        while True:
            await asyncio.sleep(LEADER_POLL)
            if self.store.is_leader() or self.leader_addr() or not self._leader_waiters:
                ev.set()
                return

    async def _caller(self, context: grpc.aio.ServicerContext) -> str:
        node_id = node_id_from_auth_context(context)
        if node_id is None and self.insecure:
            node_id = dict(context.invocation_metadata() or ()).get(NODE_ID_KEY)
        if not node_id:
            await context.abort(
                grpc.StatusCode.UNAUTHENTICATED,
                "no node identity: connect with the node's TLS certificate (mutual TLS)",
            )
        return str(node_id)

    async def _session_for(self, context: grpc.aio.ServicerContext, session_id: str) -> _Session:
        await self._check_leader(context)
        return await self._open_session(context, await self._caller(context), session_id)

    async def _open_session(self, context: grpc.aio.ServicerContext, node_id: str, session_id: str) -> _Session:
        s = self._sessions.get(node_id)
        if s is None or s.id != session_id or s.closed.is_set():
            await context.abort(
                grpc.StatusCode.NOT_FOUND,
                f"session {session_id!r} of node {node_id} is not open; open a new session",
            )
        assert s is not None
        return s

    def _ensure_flag(self) -> asyncio.Event:
        if self._wakeup is None:
            self._wakeup = asyncio.Event()
        return self._wakeup

    # ---- Session -----------------------------------------------------------------------------
    async def Session(  # noqa: N802
        self, request: dispatcher_pb2.SessionRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[dispatcher_pb2.SessionMessage]:
        await self._await_leader()
        await self._check_leader(context)
        node_id = await self._caller(context)
        peer_host = _peer_host(context.peer())
        self._registering.add(node_id)
        try:
            node = await self._register(node_id, request.description, peer_host)
        except StoreError as e:
            await context.abort(_status_code(e), str(e))
        finally:
            self._registering.discard(node_id)
        self._ensure_router()
        old = self._sessions.get(node_id)
        if old is not None:
            old.close()
        session = _Session(id=new_id(), node_id=node_id, expires=time.monotonic() + self.grace())
        self._sessions[node_id] = session
        self._unconfirmed.pop(node_id, None)
        self._joined.discard(node_id)
        self._held.pop(node_id, None)
        self._ensure_flag().set()
        metrics.count_session_opened()
        self._opened.append(time.monotonic())
        log.info("session opened node=%s session=%s addr=%s", node_id, session.id, node.status.addr)

        last: dispatcher_pb2.SessionMessage | None = None
        try:
            while True:
                session.changed.clear()
                msg = self._session_message(session)
                if msg != last:
                    yield msg
                    last = msg
                await session.changed.wait()
                await self._check_leader(context)
                if session.closed.is_set():
                    await context.abort(
                        grpc.StatusCode.NOT_FOUND, f"session {session.id} was closed; open a new one"
                    )
                if self.store.get("node", node_id) is None:
                    session.close()
                    await context.abort(
                        grpc.StatusCode.NOT_FOUND,
                        f"node {node_id} was removed from the cluster; join it again with a join token",
                    )
        finally:
            log.info("session stream ended node=%s session=%s", node_id, session.id)

    # ---- the one watch behind every stream -------------------------------------------------------
    def _ensure_router(self) -> None:
        """Watch the store for every stream of this dispatcher, once (again if the event loop changed)."""
        loop = asyncio.get_running_loop()
        if self._router is not None and self._router._loop is loop:
            return
        if self._router is not None:
            self._router.close()
        self._router = self.store.sm.watch(
            ("task", "secret", "config", "network", "node", "cluster"), loop, on_message=self._route
        )

    def _route(self, msg: watch_pb2.WatchMessage | WatchBatch) -> None:
        """Hand one commit's events to the streams they concern: a task event to the Assignments stream
        of the node it names (before and after; none for a change of status alone from ASSIGNED up to
        RUNNING, its agent's own report, which the stream would not send on and which changes nothing
        its tasks need), secret, config and network events to every Assignments
        stream (each keeps what its tasks use), a node event to that node's Session stream, and a
        change of the managers or of the cluster to every Session stream."""
        per_node: dict[str, list[watch_pb2.WatchEvent]] = {}
        shared: list[watch_pb2.WatchEvent] = []
        everyone = False
        for ev in msg.events:
            kind = ev.object.WhichOneof("object")
            if kind == "task":
                t, o = ev.object.task, ev.old_object.task
                new, old = t.node_id, o.node_id
                if (new == old and types_pb2.ASSIGNED <= o.status.state <= types_pb2.RUNNING
                        and types_pb2.ASSIGNED < t.status.state <= types_pb2.RUNNING
                        and ev.action == ev.UPDATE and tasks_equal_stable(o, t)):
                    continue  # its agent's report of a start: the stream would send nothing (`_task_event`)
                if new:
                    per_node.setdefault(new, []).append(ev)
                if old and old != new:
                    per_node.setdefault(old, []).append(ev)
            elif kind == "node":
                s = self._sessions.get(ev.object.node.id)
                if s is not None:
                    s.changed.set()
                elif self._leading and ev.action == ev.CREATE and ev.object.node.id not in self._registering:
                    self._unconfirmed[ev.object.node.id] = time.monotonic() + self.grace() * NEW_LEADER_GRACE
                    self._joined.add(ev.object.node.id)
                    self._opened.append(time.monotonic())  # a join is an arrival too (see `_hold_mass_expiry`)
                if types_pb2.MANAGER in (ev.object.node.role, ev.old_object.node.role):
                    managers = self._find_managers()
                    if managers != self._managers:
                        self._managers = managers
                        everyone = True
            elif kind == "cluster":
                everyone = True
            else:
                shared.append(ev)
        if everyone:
            for s in self._sessions.values():
                s.changed.set()
        if shared:
            for s in self._sessions.values():
                if s.assignments is not None:
                    per_node.setdefault(s.node_id, []).extend(shared)
        for node_id, events in per_node.items():
            s = self._sessions.get(node_id)
            if s is not None and s.assignments is not None:
                s.assignments.put_nowait(WatchBatch(events=events, version=msg.version))

    def _session_message(self, session: _Session) -> dispatcher_pb2.SessionMessage:
        cluster = self.store.cluster()
        msg = dispatcher_pb2.SessionMessage(session_id=session.id, managers=self.managers())
        node = self.store.get("node", session.node_id)
        if node is not None:
            msg.node.CopyFrom(node)
            msg.node.ClearField("meta")
            strip_keys(msg.node)
        if cluster is not None:
            msg.network_bootstrap_keys.extend(cluster.network_bootstrap_keys)
        msg.heartbeat_period.FromNanoseconds(int(heartbeat_period(cluster) * 1e9))
        return msg

    async def _register(
        self, node_id: str, desc: types_pb2.NodeDescription, peer_host: str
    ) -> objects_pb2.Node:
        addr = desc.addr or peer_host
        if not desc.addr:
            cur = self.store.get("node", node_id)
            if cur is not None and cur.description.addr:
                addr = cur.description.addr

        def fn(tx: Tx) -> objects_pb2.Node:
            cur = tx.get("node", node_id)
            node = objects_pb2.Node()
            if cur is None:
                if not self.auto_register:
                    raise _NotRegistered(
                        f"node {node_id} is not registered in the cluster (it may have been removed); "
                        "join the node again with a join token"
                    )
                node.id = node_id
                node.spec.membership = specs_pb2.NodeSpec.ACCEPTED
                node.description.CopyFrom(desc)
                node.status.state = types_pb2.NodeStatus.READY
                node.status.addr = addr
                return tx.create(node)
            node.CopyFrom(cur)
            keep_addr = cur.description.addr
            node.description.CopyFrom(desc)
            if not desc.addr and keep_addr:
                node.description.addr = keep_addr
            node.status.CopyFrom(types_pb2.NodeStatus(state=types_pb2.NodeStatus.READY, addr=addr))
            if node == cur:  # a session again after a leader change: nothing to write
                return cur
            return tx.update(node)

        try:
            return await self.store.update(fn, CONFLICT_RETRIES, backoff=CONFLICT_BACKOFF)
        except _NotRegistered:
            # A node that has just joined through another manager's CA: its node object may be
            # committed but not yet in this manager's copy of the store. Catch up, then look again.
            await self.store.read_barrier()
            return await self.store.update(fn, CONFLICT_RETRIES, backoff=CONFLICT_BACKOFF)

    # ---- Heartbeat ---------------------------------------------------------------------------
    async def Heartbeat(  # noqa: N802
        self, request: dispatcher_pb2.HeartbeatRequest, context: grpc.aio.ServicerContext
    ) -> dispatcher_pb2.HeartbeatResponse:
        return await self._beat(await self._session_for(context, request.session_id), request)

    async def Heartbeats(  # noqa: N802
        self, requests: AsyncIterator[dispatcher_pb2.HeartbeatRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[dispatcher_pb2.HeartbeatResponse]:
        """Heartbeat's answers, one per request and in order, on one stream: the caller's identity is
        read once, leadership and the session are checked at every request."""
        node_id = await self._caller(context)
        async for request in requests:
            await self._check_leader(context)
            yield await self._beat(await self._open_session(context, node_id, request.session_id), request)

    async def _beat(self, s: _Session, request: dispatcher_pb2.HeartbeatRequest) -> dispatcher_pb2.HeartbeatResponse:
        """One heartbeat of session `s`: its deadline moves on (or, restarting, to the restart window)."""
        configured, nodes = heartbeat_period(self.store.cluster()), self._node_count()
        period = scaled_period(configured, nodes)
        if request.restarting:
            window = self.restart_window()
            s.expires, s.restarting = time.monotonic() + window, True
            s.close()  # its streams end; the entry stays until the deadline or its next session
            await self._mark_restarting(s.node_id, window)
            self._ensure_flag().set()
        else:
            s.beat = time.monotonic()
            s.expires, s.heard = s.beat + grace(configured, nodes), True
            if self._held:
                self._held.pop(s.node_id, None)
            node = self.store.get("node", s.node_id)
            if node is not None and node.status.state == types_pb2.NodeStatus.DOWN:
                try:
                    await self._revive(s.node_id)
                except StoreError as e:  # the next heartbeat tries again
                    log.warning("node not marked ready again node=%s err=%s", s.node_id, e)
        metrics.count_heartbeat()
        self._beats += 1
        resp = dispatcher_pb2.HeartbeatResponse()
        resp.period.FromNanoseconds(int(period * (1 - random.uniform(0, HEARTBEAT_JITTER)) * 1e9))
        return resp

    # ---- Connect: the session, its heartbeats, assignments and log subscriptions on one stream ----
    async def Connect(  # noqa: N802
        self, requests: AsyncIterator[dispatcher_pb2.AgentMessage], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[dispatcher_pb2.ManagerMessage]:
        """What Session, Heartbeats, Assignments and the log broker's ListenSubscriptions serve, on one
        stream (an agent of this version opens no other): each stream costs the leader ~24 KB of gRPC
        memory, and a fleet's agents held four each.

        The first request must be `session`; the answers start with the session's first message.
        Then each of the four runs as it does on its own stream, in a task of its own, its messages
        going out as they come; the first of them to end (or fail: an abort, as a closed session's)
        ends this call the same way, and the others with it. The caller ending its requests ends it
        too (Heartbeats ends)."""
        it = aiter(requests)
        first = await anext(it, None)
        if first is None or first.WhichOneof("item") != "session":
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                "the first message of a Connect stream must be `session` (the node's SessionRequest), "
                "sent before any heartbeat",
            )
        assert first is not None
        sessions = self.Session(first.session, context)
        opened = await anext(sessions)
        yield dispatcher_pb2.ManagerMessage(session=opened)

        async def beats() -> AsyncIterator[dispatcher_pb2.HeartbeatRequest]:
            async for m in it:
                if m.WhichOneof("item") != "heartbeat":
                    await context.abort(
                        grpc.StatusCode.INVALID_ARGUMENT,
                        "a Connect stream carries one session: after the first message, send only heartbeats",
                    )
                yield m.heartbeat

        sources: list[tuple[str, AsyncIterator[Any]]] = [
            ("session", sessions),
            ("heartbeat", self.Heartbeats(beats(), context)),
            ("assignments", self.Assignments(dispatcher_pb2.AssignmentsRequest(session_id=opened.session_id),
                                             context)),
        ]
        if self.logbroker is not None:
            listen = logs_pb2.ListenSubscriptionsRequest()
            sources.append(("subscription", self.logbroker.ListenSubscriptions(listen, context)))
        out: asyncio.Queue[dispatcher_pb2.ManagerMessage | BaseException | None] = asyncio.Queue()

        async def relay(item: str, source: AsyncIterator[Any]) -> None:
            try:
                async for m in source:
                    out.put_nowait(dispatcher_pb2.ManagerMessage(**{item: m}))
                out.put_nowait(None)
            except Exception as e:  # an abort (its status already sent), a failure: this call's end
                out.put_nowait(e)

        relays = [asyncio.create_task(relay(item, source), name=f"connect-{item}") for item, source in sources]
        try:
            while True:
                m = await out.get()
                if m is None:
                    return
                if isinstance(m, BaseException):
                    raise m
                yield m
        finally:
            for t in relays:
                t.cancel()
            await asyncio.gather(*relays, return_exceptions=True)

    # ---- leader loop: heartbeat expiry ---------------------------------------------------------
    async def run(self) -> None:
        """Leader loop: mark nodes DOWN when their heartbeats stop. Cancel it on leadership loss."""
        wake = self._ensure_flag()
        now = time.monotonic()
        nodes = self.store.find("node")
        wait = self.grace() * NEW_LEADER_GRACE + len(nodes) / RECONNECT_RATE
        wall = time.time()
        for n in nodes:
            if n.status.state != types_pb2.NodeStatus.DOWN and n.id not in self._sessions:
                deadline = now + wait
                if n.status.HasField("restart_deadline"):  # restarting under the last leader
                    deadline = max(deadline, now + n.status.restart_deadline.ToNanoseconds() / 1e9 - wall)
                self._unconfirmed[n.id] = deadline
        log.info("dispatcher leader loop started nodes_awaited=%d wait=%.1fs", len(self._unconfirmed), wait)
        self._ensure_router()
        self._leading = True
        try:
            while True:
                now = time.monotonic()
                self._hold_mass_expiry(now)
                expired: list[tuple[str, str]] = []
                for node_id, s in list(self._sessions.items()):
                    if s.expires <= now:
                        del self._sessions[node_id]
                        s.close()
                        expired.append((node_id, "not back within the restart window after a graceful stop"
                                        if s.restarting else "heartbeat failure"))
                for node_id, deadline in list(self._unconfirmed.items()):
                    if deadline <= now:
                        del self._unconfirmed[node_id]
                        expired.append((node_id, "no session since it joined" if node_id in self._joined
                                        else "heartbeat failure for node not seen by this leader"))
                        self._joined.discard(node_id)
                if expired:
                    try:
                        await self._mark_down(expired)
                    except StoreError as e:
                        log.warning("marking nodes down failed nodes=%d err=%s", len(expired), e)
                # Woken at the next deadline, but not sooner than a tick: each pass reads every session
                # (a fleet's deadlines are spread over a period, one every few ms at 5,000 nodes).
                deadlines = [s.expires for s in self._sessions.values()] + list(self._unconfirmed.values())
                tick = self.grace() / EXPIRY_TICKS
                timeout = max(tick, min(deadlines) - time.monotonic() if deadlines else self.period())
                wake.clear()
                slept = time.monotonic()
                due = slept + timeout
                try:
                    await asyncio.wait_for(wake.wait(), timeout)
                except TimeoutError:
                    pass
                self._forgive_stall(time.monotonic() - due, slept)
        finally:
            # A new leader starts from scratch; streams here end with UNAVAILABLE on their next check.
            self._leading = False
            for s in self._sessions.values():
                s.close()
            self._sessions.clear()
            self._unconfirmed.clear()
            self._joined.clear()
            self._held.clear()
            self._downs.clear()
            self._beat_counts.clear()
            self._opened.clear()

    def _forgive_stall(self, late: float, slept: float | None = None) -> None:
        """This loop woke `late` s after it asked to (it went to sleep at `slept`; by default `late`
        s ago): the leader's event loop was busy (a large commit, a burst of sessions) and answered
        no heartbeat meanwhile either, so every deadline moves on by as much. Heartbeats that waited
        in the sockets are then answered before anyone is marked DOWN."""
        if late < STALL_TOLERANCE:
            return
        self._stalled_at = time.monotonic()
        self._stall_began = self._stalled_at - late if slept is None else slept
        for s in self._sessions.values():
            if not s.restarting:
                s.expires += late
        for nid in self._unconfirmed:
            self._unconfirmed[nid] += late
        log.info("dispatcher: this leader's loop stalled %.2f s; heartbeat deadlines moved on as much", late)

    def _count_beats(self, now: float, g: float) -> None:
        """Note the heartbeats answered so far, keeping the newest note a grace period old."""
        counts = self._beat_counts
        counts.append((now, self._beats))
        while len(counts) > 1 and counts[1][0] <= now - g:
            counts.popleft()

    def _behind(self, now: float, g: float) -> bool:
        """Whether this leader answered fewer than BEHIND_FRACTION of the heartbeats owed in the last
        grace period by its sessions that are not late (one a period each since the session opened,
        if that was later; the late ones may be gone): it reads them late (its loop busy with a large
        scheduling pass, thousands of status reports), however short each of its stalls."""
        since, then = self._beat_counts[0] if self._beat_counts else (now, self._beats)
        if since > now - g or not self._sessions:  # (not a whole grace period seen yet)
            return False
        owed = sum(min(g, now - s.opened) for s in self._sessions.values()
                   if s.heard and not s.restarting and s.expires > now) / self.period()
        return self._beats - then < BEHIND_FRACTION * owed

    def _hold_mass_expiry(self, now: float) -> None:
        """Give the nodes whose deadline passed another grace period when too many passed at once
        (see MASS_FRACTION) or while this leader reads heartbeats late (`_behind`); and else the
        nodes whose heartbeat a recent stall of its loop may have kept unread (see
        STALL_EXCUSE_PERIODS), a session whose first heartbeat has not come at any time (its agent
        was alive when it opened the session; a leader opening many at once, a failover's burst, is
        late to read their heartbeats), and a node not seen by this leader yet while this loop
        stalls or MASS_MIN sessions or more opened, or nodes joined, in the last grace period (the
        fleet is still reconnecting or joining: its agent may be queued behind the others; 500 nodes
        joining at once had 94 of them marked DOWN for no session two grace periods after their
        join): each for MASS_MAX_GRACES grace periods at most, or BEHIND_MAX_GRACES while this
        leader stalls or reads heartbeats late, and a node not seen yet also while the fleet still
        reconnects or joins."""
        g = self.grace()
        self._count_beats(now, g)
        while self._opened and self._opened[0] <= now - g:  # (every pass: not only when some are late)
            self._opened.popleft()
        late = [nid for nid, s in self._sessions.items() if s.expires <= now and not s.restarting]
        late += [nid for nid, deadline in self._unconfirmed.items() if deadline <= now]
        if not late:
            return
        self._downs = [(t, n) for t, n in self._downs if t > now - g]
        stalled = now - self._stalled_at < g
        behind = self._behind(now, g)
        stalling = stalled or behind
        mass = len(late) + sum(n for _, n in self._downs) >= max(MASS_MIN, MASS_FRACTION * self._node_count())
        arriving = len(self._opened) >= MASS_MIN  # the fleet still joining or (re)connecting: the rest may be queued
        if not (behind or mass):
            recent = self._stall_began - STALL_EXCUSE_PERIODS * self.period()  # heard since then: excused
            sessions = self._sessions
            late = [nid for nid in late if (nid not in sessions and (arriving or stalled))
                    or (nid in sessions and (not sessions[nid].heard or (stalled and sessions[nid].beat >= recent)))]
        held = 0
        most = (BEHIND_MAX_GRACES if stalling else MASS_MAX_GRACES) * g
        # A node not seen yet while sessions keep opening: the reconnecting fleet takes this leader
        # as long as it takes (at 2,000 nodes, longer than a mass expiry's hold), its agent queued.
        unseen_most = BEHIND_MAX_GRACES * g if arriving else most
        for nid in late:
            if now - self._held.setdefault(nid, now) >= (most if nid in self._sessions else unseen_most):
                continue
            held += 1
            if nid in self._sessions:
                self._sessions[nid].expires = now + g
            else:
                self._unconfirmed[nid] = now + g
        if held:
            log.warning(
                "%d of %d nodes missed their heartbeat deadline %s: this leader is likelier overloaded or "
                "cut off than they are down; %d of them get another %.1f s",
                len(late), self._node_count(), "while this leader stalls or reads heartbeats late" if stalling else
                "at once" if mass else "before their session's first heartbeat or while sessions still open", held, g,
            )

    async def _revive(self, node_id: str) -> None:
        """READY again: a node marked DOWN while it opened its current session (the DOWN write was built
        before the session began, and committed after its registration found nothing to write)."""
        def fn(tx: Tx) -> None:
            cur = tx.get("node", node_id)
            if cur is None or cur.status.state != types_pb2.NodeStatus.DOWN or node_id not in self._sessions:
                return
            node = objects_pb2.Node()
            node.CopyFrom(cur)
            node.status.CopyFrom(types_pb2.NodeStatus(state=types_pb2.NodeStatus.READY, addr=cur.status.addr))
            tx.update(node)

        await self.store.update(fn, CONFLICT_RETRIES, backoff=CONFLICT_BACKOFF)
        log.info("node ready again node=%s: marked down as its session opened", node_id)

    async def _mark_restarting(self, node_id: str, window: float) -> None:
        await self._set_states([(node_id, f"swarmd stopped gracefully: marked down unless back within {window:g} s")],
                               types_pb2.NodeStatus.DISCONNECTED, time.time_ns() + int(window * 1e9))
        log.info("node restarting node=%s window=%gs: not marked down until then", node_id, window)

    async def _mark_down(self, nodes: list[tuple[str, str]]) -> None:
        """Mark (node id, why) DOWN, MAX_BATCH nodes a transaction; a node that opened a session again
        meanwhile (or is opening one) is left as it is."""
        why = dict(nodes)
        for i in range(0, len(nodes), MAX_BATCH):
            part = nodes[i : i + MAX_BATCH]
            written = await self._set_states(part, types_pb2.NodeStatus.DOWN, unless_in_session=True)
            for node_id, _ in part:
                self._held.pop(node_id, None)
            for node_id in written:
                log.warning("node down node=%s reason=%r", node_id, why[node_id])
            self._downs.append((time.monotonic(), len(written)))

    async def _set_states(
        self, nodes: list[tuple[str, str]], state: int, restart_deadline_ns: int = 0, *, unless_in_session: bool = False
    ) -> list[str]:
        """The status of each (node id, message) (unless it is gone or DOWN already, or, with
        `unless_in_session`, has a session here or is opening one), in one transaction of the leader's
        fenced store. Returns the ids of the nodes written."""

        def fn(tx: Tx) -> list[str]:
            written = []
            for node_id, message in nodes:
                cur = tx.get("node", node_id)
                if cur is None or cur.status.state == types_pb2.NodeStatus.DOWN:
                    continue
                if unless_in_session and (node_id in self._sessions or node_id in self._registering):
                    continue
                node = objects_pb2.Node()
                node.CopyFrom(cur)
                node.status.state = state
                node.status.message = message
                if restart_deadline_ns:
                    node.status.restart_deadline.FromNanoseconds(restart_deadline_ns)
                tx.update(node)
                written.append(node_id)
            return written

        return await (self.leader_store or self.store).update(fn, CONFLICT_RETRIES, backoff=CONFLICT_BACKOFF)

    # ---- Assignments ---------------------------------------------------------------------------
    async def Assignments(  # noqa: N802
        self, request: dispatcher_pb2.AssignmentsRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[dispatcher_pb2.AssignmentsMessage]:
        session = await self._session_for(context, request.session_id)
        node_id = session.node_id
        sm = self.store.sm
        queue: asyncio.Queue[WatchBatch | None] = asyncio.Queue()
        with sm.lock:  # the events routed from now on are those after this copy of the node's tasks
            self._ensure_router()
            if session.assignments is not None:  # a second stream of the session replaces the first
                session.assignments.put_nowait(None)
            session.assignments = queue
            base_version = sm.version
            complete = [t for t in sm.tasks_by_node(node_id) if t.status.state >= types_pb2.ASSIGNED]
        tasks = {t.id: _Held.of(t) for t in complete}
        sent = _Sent()
        try:
            msg = dispatcher_pb2.AssignmentsMessage(
                type=dispatcher_pb2.AssignmentsMessage.COMPLETE, results_in=str(base_version)
            )
            self._dependency_changes(tasks, sent, msg, set(), set())
            for t in complete:
                a = msg.changes.add().assignment
                a.task.CopyFrom(t)
                strip_keys(a.task)
            del complete
            log.info(
                "assignments complete node=%s tasks=%d secrets=%d configs=%d network_keys=%d",
                node_id,
                len(tasks),
                len(sent.secrets),
                len(sent.configs),
                len(sent.network_keys),
            )
            yield msg
            applies_to = str(base_version)
            while True:
                events = []
                batch = [await queue.get()]
                if batch[0] is not None:
                    await asyncio.sleep(ASSIGNMENT_BATCH_WINDOW)
                    batch += drain(queue)
                if any(b is None for b in batch):
                    await self._check_leader(context)
                    if session.closed.is_set():
                        await context.abort(
                            grpc.StatusCode.NOT_FOUND, f"session {session.id} was closed; open a new one"
                        )
                    return  # replaced by a newer stream of the session
                version = base_version
                for wm in batch:
                    assert wm is not None
                    if wm.version <= base_version:
                        continue
                    version = max(version, wm.version)
                    events.extend(wm.events)
                if not events:
                    continue
                msg = dispatcher_pb2.AssignmentsMessage(
                    type=dispatcher_pb2.AssignmentsMessage.INCREMENTAL,
                    applies_to=applies_to,
                    results_in=str(version),
                )
                changed_secrets: set[str] = set()
                changed_configs: set[str] = set()
                task_changes: dict[str, dispatcher_pb2.AssignmentChange] = {}
                for ev in events:
                    kind = ev.object.WhichOneof("object")
                    if kind == "task":
                        self._task_event(node_id, ev, tasks, task_changes)
                    elif kind == "secret":
                        changed_secrets.add(ev.object.secret.id)
                    elif kind == "config":
                        changed_configs.add(ev.object.config.id)
                # Network events need no bookkeeping: the keys sent are compared with the store's.
                self._dependency_changes(tasks, sent, msg, changed_secrets, changed_configs)
                msg.changes.extend(task_changes.values())
                if msg.changes:
                    log.debug("assignments incremental node=%s changes=%d", node_id, len(msg.changes))
                    yield msg
                    applies_to = str(version)
        finally:
            if session.assignments is queue:
                session.assignments = None

    @staticmethod
    def _task_event(
        node_id: str,
        ev: Any,
        tasks: dict[str, _Held],
        changes: dict[str, dispatcher_pb2.AssignmentChange],
    ) -> None:
        t = ev.object.task
        deleted = ev.action == ev.DELETE
        mine = t.node_id == node_id and t.status.state >= types_pb2.ASSIGNED
        if deleted or not mine:
            if t.id in tasks:
                del tasks[t.id]
                ch = dispatcher_pb2.AssignmentChange(action=dispatcher_pb2.AssignmentChange.REMOVE)
                ch.assignment.task.id = t.id
                changes[t.id] = ch
            return
        old = tasks.get(t.id)
        tasks[t.id] = held = _Held.of(t)
        # ASSIGNED and below are written by the manager, so they are news even when the rest is equal;
        # later states come from the agent itself and need not be echoed back.
        if old is not None and t.status.state > types_pb2.ASSIGNED and old.stable == held.stable:
            return
        ch = dispatcher_pb2.AssignmentChange(action=dispatcher_pb2.AssignmentChange.UPDATE)
        ch.assignment.task.CopyFrom(t)
        strip_keys(ch.assignment.task)
        changes[t.id] = ch

    def _dependency_changes(
        self,
        tasks: dict[str, _Held],
        sent_all: _Sent,
        msg: dispatcher_pb2.AssignmentsMessage,
        changed_secrets: set[str],
        changed_configs: set[str],
    ) -> None:
        """Append what the node's tasks now need and was not sent (or changed), and withdraw what they no
        longer need: network keys first, then secrets and configs."""
        self._network_key_changes(tasks, sent_all.network_keys, msg)
        want_secrets, want_configs = task_dependencies(tasks.values())
        for kind, want, sent, changed in (
            ("secret", want_secrets, sent_all.secrets, changed_secrets),
            ("config", want_configs, sent_all.configs, changed_configs),
        ):
            for oid in sorted(want - sent | (want & sent & changed)):
                obj = self.store.get(kind, oid)
                if obj is None:
                    continue
                ch = msg.changes.add(action=dispatcher_pb2.AssignmentChange.UPDATE)
                getattr(ch.assignment, kind).CopyFrom(obj)
                sent.add(oid)
            for oid in sorted(sent - want):
                ch = msg.changes.add(action=dispatcher_pb2.AssignmentChange.REMOVE)
                getattr(ch.assignment, kind).id = oid
                sent.discard(oid)

    def _network_key_changes(
        self, tasks: dict[str, _Held], sent: dict[str, bytes], msg: dispatcher_pb2.AssignmentsMessage
    ) -> None:
        want: dict[str, dispatcher_pb2.NetworkKeys] = {}
        for nid in sorted(task_networks(tasks.values())):
            net = self.store.get("network", nid)
            if not is_encrypted(net):
                continue
            keys = ipsec_keys(net)
            if keys:  # an encrypted network without keys yet gets them from the allocator: sent then
                want[nid] = dispatcher_pb2.NetworkKeys(network_id=nid, keys=keys)
        for nid, nk in want.items():
            blob = nk.SerializeToString(deterministic=True)
            if sent.get(nid) != blob:
                ch = msg.changes.add(action=dispatcher_pb2.AssignmentChange.UPDATE)
                ch.assignment.network_keys.CopyFrom(nk)
                sent[nid] = blob
        for nid in sorted(set(sent) - set(want)):
            ch = msg.changes.add(action=dispatcher_pb2.AssignmentChange.REMOVE)
            ch.assignment.network_keys.network_id = nid
            del sent[nid]

    # ---- UpdateTaskStatus ---------------------------------------------------------------------
    async def UpdateTaskStatus(  # noqa: N802
        self, request: dispatcher_pb2.UpdateTaskStatusRequest, context: grpc.aio.ServicerContext
    ) -> dispatcher_pb2.UpdateTaskStatusResponse:
        session = await self._session_for(context, request.session_id)
        node_id = session.node_id
        for u in request.updates:
            t = self.store.get("task", u.task_id)
            if t is not None and t.node_id != node_id:
                await context.abort(
                    grpc.StatusCode.PERMISSION_DENIED,
                    f"task {u.task_id} is not assigned to node {node_id}: a node reports only its own tasks",
                )
        if not request.updates:
            return dispatcher_pb2.UpdateTaskStatusResponse()
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()
        batch = self._batch
        for u in request.updates:
            prev = batch.updates.get(u.task_id)
            if prev is None or u.status.state >= prev[1].state:
                batch.updates[u.task_id] = (node_id, u.status)
        batch.waiters.append(fut)
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush())
        try:
            await fut
        except StoreError as e:
            await context.abort(_status_code(e), f"task status not saved: {e}")
        return dispatcher_pb2.UpdateTaskStatusResponse()

    async def _flush(self) -> None:
        await asyncio.sleep(STATUS_BATCH_WINDOW)
        while self._batch.updates or self._batch.waiters:
            batch, self._batch = self._batch, _StatusBatch()
            try:
                items = list(batch.updates.items())
                applied = 0
                for i in range(0, len(items), MAX_BATCH):
                    chunk = dict(items[i : i + MAX_BATCH])
                    applied += await self.store.update(
                        lambda tx, c=chunk: _apply_statuses(tx, c), CONFLICT_RETRIES, backoff=CONFLICT_BACKOFF
                    )
                log.debug("task status batch committed updates=%d applied=%d", len(batch.updates), applied)
                for f in batch.waiters:
                    if not f.done():
                        f.set_result(None)
            except Exception as e:  # noqa: BLE001 - handed to every waiting caller
                log.warning("task status batch failed updates=%d err=%s", len(batch.updates), e)
                err = e if isinstance(e, StoreError) else _Unavailable(str(e))
                for f in batch.waiters:
                    if not f.done():
                        f.set_exception(err)


def _apply_statuses(tx: Tx, updates: dict[str, tuple[str, types_pb2.TaskStatus]]) -> int:
    n = 0
    for task_id, (node_id, status) in updates.items():
        cur = tx.get("task", task_id)
        if cur is None or cur.node_id != node_id:
            continue
        if status.state < cur.status.state:
            log.info(
                "stale task status ignored task=%s node=%s state=%s current=%s",
                task_id,
                node_id,
                types_pb2.TaskState.Name(status.state),
                types_pb2.TaskState.Name(cur.status.state),
            )
            continue
        if status == cur.status:
            continue
        t = objects_pb2.Task()
        t.CopyFrom(cur)
        t.status.CopyFrom(status)
        tx.update(t)
        n += 1
    return n


class _NotRegistered(StoreError):
    code = "NOT_FOUND"


class _Unavailable(StoreError):
    code = "UNAVAILABLE"


def _status_code(e: StoreError) -> grpc.StatusCode:
    return getattr(grpc.StatusCode, e.code, grpc.StatusCode.UNKNOWN)


def _peer_host(peer: str) -> str:
    """The host part of a grpc peer string: 'ipv4:1.2.3.4:5' -> '1.2.3.4', 'ipv6:[::1]:5' -> '::1'."""
    if peer.startswith("ipv4:"):
        return peer[5:].rsplit(":", 1)[0]
    if peer.startswith("ipv6:"):
        return peer[5:].rsplit(":", 1)[0].strip("[]")
    return ""
