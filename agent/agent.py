"""The agent: one session with the leader's dispatcher, and the worker that runs what it assigns.

`Agent.run()` keeps a session open with the leader: it registers the node's description,
heartbeats at the period the dispatcher asks for, feeds assignments to the worker, sends task
status changes in batches, and serves log subscriptions from the manager's log broker. When the
session breaks (the leader died, stepped down or is partitioned away) it tries the leader named in
the refusal, then the other managers it heard of, so a leader change is followed within about 2 s.

Credentials: `grpc.ChannelCredentials` for mutual TLS (the node certificate); None for tests on
an insecure channel, where the node id travels in metadata (`shoal-node-id`) and the manager's
servicers must have their insecure test flag set.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import os
import platform
import random
import socket
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import grpc

from shoal.agent.controller import NetworkHooks
from shoal.agent.executor import ContainerEngine, container_name
from shoal.agent.localstate import LocalState
from shoal.agent.worker import Worker
from shoal.netdriver import xfrm
from shoal.proto import dispatcher_pb2, dispatcher_pb2_grpc, logs_pb2, logs_pb2_grpc, types_pb2

log = logging.getLogger("shoal.agent")

LEADER_ADDR_KEY = "shoal-leader-addr"
NODE_ID_KEY = "shoal-node-id"
ENGINE_VERSION = "shoal-0.1.0"
# A broken session is opened again after a random delay of up to RECONNECT_DELAY heartbeat periods
# (a whole fleet that lost its leader at once spreads out; the period grows with the cluster), the
# bound doubling at each failure up to MAX_RECONNECT_DELAY periods.
RECONNECT_DELAY = 0.1
MAX_RECONNECT_DELAY = 0.5
# A heartbeat unanswered within this many periods ends the session: by then the dispatcher's grace
# (two periods and 0.8 of the configured one, at most 2.8 periods) ran out too, so giving up sooner
# on a slow answer of a busy leader would only bring it one more connection and registration. A dead
# manager's connection fails at once; only a silent one (paused, cut off) is waited out this long.
HEARTBEAT_TIMEOUT = 3.0
# ... and never less than this many seconds: a leader scheduling thousands of tasks at once may not
# answer for a few seconds, and a new leader waits at least 5.6 s for the agents of the last one.
MIN_HEARTBEAT_TIMEOUT = 5.0
# Past that deadline the agent waits on, up to this many seconds from the heartbeat, while the
# connection stays alive: the manager's process answers the connection's HTTP/2 pings (gRPC's C core
# does, and the manager's remote API front copies them in a process of its own), so its loop is busy,
# not gone, and a new session would only add a connection, a registration and a complete assignment
# set to its work. A dead, paused or cut-off manager fails the keepalive instead: a ping unanswered
# within max(KEEPALIVE_TIMEOUT, KEEPALIVE_TIMEOUT_PERIODS heartbeat periods) s ends the connection and
# its calls (UNAVAILABLE), a keepalive interval (below) after the last sign of life at most.
HEARTBEAT_PATIENCE = 30.0
# The keepalive pings when nothing came for max(KEEPALIVE, KEEPALIVE_PERIODS heartbeat periods) s (the
# period known when the connection opens): while heartbeats are answered no ping is sent (a fleet's
# pings would double the bytes its managers pass), and a silent manager is still left about when the
# heartbeat's deadline (HEARTBEAT_TIMEOUT periods) passes.
KEEPALIVE = 2.0
KEEPALIVE_PERIODS = 1.25
KEEPALIVE_TIMEOUT = 3.0
# ... or longer in a large cluster: there a busy machine's stall of a few seconds (the manager's, or
# an agent host's) must not end thousands of sessions at once, their nodes then reconnecting past
# the grace of two periods and more. A silent manager is left after 1.25 + 1.5 periods, still before
# the heartbeat's deadline; a small cluster (a 1 s period) keeps the 3 s of a fast detection.
KEEPALIVE_TIMEOUT_PERIODS = 1.5
UNREGISTERED_DELAY = 10.0
STATUS_TIMEOUT = HEARTBEAT_PATIENCE  # s for a task status report's answer (a busy manager); then sent again
# A report refused UNAVAILABLE (the manager's store did not confirm the write, or its copy lagged behind
# the commit) is sent again after a random pause of up to this many heartbeat periods. A manager that is
# really gone ends the session through the heartbeat and the keepalive, not through this stream.
STATUS_RETRY_PERIODS = 1.0
# A manager that refuses the connection (dead, not listening) is left at once; one that does not
# answer (cut off) is left after QUICK_CONNECT_TIMEOUT s, unless it is the leader another manager
# named: a busy leader's TLS handshakes queue up, and it is given CONNECT_TIMEOUT s.
CONNECT_TIMEOUT = 5.0
QUICK_CONNECT_TIMEOUT = 1.5
# Each connection in a row that was not answered in time doubles the time given to the next one, up
# to this many seconds; a session opened sets it back. Managers answering none in time are busy
# with a fleet's handshakes (a failover: thousands at once), and giving up on each after 1.5 s only
# to try the next manager kept them from finishing any.
MAX_CONNECT_TIMEOUT = 12.0
# The leader answers a new session once it has registered the node (a store write): a busy leader
# (a fleet reconnecting at once) may take long, and an agent that gave up would only come back
# with another connection and another registration for it to do. A dead leader fails at once.
FIRST_MESSAGE_TIMEOUT = 30.0
RESTARTING_TIMEOUT = 1.0  # the last heartbeat of a graceful stop (see Agent._say_restarting)
STATUS_BATCH = 500
# The heartbeat period kept for the next start (`LocalState.heartbeat_period`) is written again when an
# answer's falls outside these multiples of it (answers are up to a fifth shorter than the period).
PERIOD_KEPT_BELOW = 0.6
PERIOD_KEPT_ABOVE = 1.25
LOG_BATCH = 100


class _Redirect(Exception):
    def __init__(self, addr: str) -> None:
        super().__init__(f"redirected to leader {addr}")
        self.addr = addr


class _Unanswered(ConnectionError):
    """A connection attempt not answered in time (not refused)."""


async def _connected(channel: grpc.aio.Channel, addr: str, timeout: float | None = None) -> None:
    """Wait until `channel` is READY: ConnectionError at once when its connection attempt failed
    (TRANSIENT_FAILURE: refused, reset), or after `timeout` (CONNECT_TIMEOUT) s without an answer."""
    loop = asyncio.get_running_loop()
    timeout = CONNECT_TIMEOUT if timeout is None else timeout
    deadline = loop.time() + timeout
    state = channel.get_state(try_to_connect=True)
    while state != grpc.ChannelConnectivity.READY:
        if state in (grpc.ChannelConnectivity.TRANSIENT_FAILURE, grpc.ChannelConnectivity.SHUTDOWN):
            raise ConnectionError(f"manager {addr} refused the connection")
        try:
            async with asyncio.timeout_at(deadline):
                await channel.wait_for_state_change(state)
        except TimeoutError:
            raise _Unanswered(f"manager {addr} unreachable within {timeout:g} s") from None
        state = channel.get_state(try_to_connect=True)


def describe_node(
    hostname: str | None, addr: str, labels: dict[str, str] | None, capabilities: Sequence[str] = ()
) -> types_pb2.NodeDescription:
    """This host as the scheduler sees it: hostname, platform, CPUs, memory, engine labels, data-path
    address, and what its data path can do (data_path_capabilities())."""
    mem = 0
    with contextlib.suppress(OSError):
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    mem = int(line.split()[1]) * 1024
                    break
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    return types_pb2.NodeDescription(
        hostname=hostname or socket.gethostname(),
        platform=types_pb2.Platform(os=platform.system().lower(), architecture=platform.machine()),
        resources=types_pb2.Resources(nano_cpus=cpus * 1_000_000_000, memory_bytes=mem),
        engine=types_pb2.NodeDescription.EngineDescription(
            engine_version=ENGINE_VERSION, labels=labels or {}
        ),
        addr=addr,
        capabilities=list(capabilities),
    )


def data_path_capabilities(addr: str) -> list[str]:
    """"ipsec-esp" when this host's kernel can carry encrypted overlays (IPsec ESP with AES-GCM); a node
    that advertises a loopback address has no data path at all."""
    try:
        if ipaddress.ip_address(addr.rsplit(":", 1)[0] if addr.count(":") == 1 else addr).is_loopback:
            return []
    except ValueError:  # no (or no usable) data-path address
        return []
    try:
        return ["ipsec-esp"] if xfrm.esp_supported() else []
    except OSError as e:
        log.warning("IPsec ESP probe failed: %s", e)
        return []


def _rpc_errors(exc: BaseException) -> list[grpc.aio.AioRpcError]:
    if isinstance(exc, grpc.aio.AioRpcError):
        return [exc]
    if isinstance(exc, BaseExceptionGroup):
        return [e for sub in exc.exceptions for e in _rpc_errors(sub)]
    return []


def _failures(exc: BaseException) -> str:
    """What ended a session, each failure of the group named by the stream it ended (`_named`)."""
    if isinstance(exc, BaseExceptionGroup):
        return "; ".join(dict.fromkeys(_failures(sub) for sub in exc.exceptions))
    what = f"{exc.code().name}: {exc.details()}" if isinstance(exc, grpc.aio.AioRpcError) else repr(exc)
    notes = getattr(exc, "__notes__", None)
    return f"{notes[0]}: {what}" if notes else what


async def _named(name: str, work: Awaitable[None]) -> None:
    """Run one of a session's streams; a failure of it carries its name (the session-end log says it)."""
    try:
        await work
    except Exception as e:
        e.add_note(name)
        raise


def _redirect_of(exc: BaseException) -> str | None:
    if isinstance(exc, _Redirect):
        return exc.addr
    if isinstance(exc, BaseExceptionGroup):
        for sub in exc.exceptions:
            r = _redirect_of(sub)
            if r:
                return r
    for e in _rpc_errors(exc):
        if e.code() == grpc.StatusCode.UNAVAILABLE:
            md = dict(e.trailing_metadata() or ())
            if md.get(LEADER_ADDR_KEY):
                return str(md[LEADER_ADDR_KEY])
    return None


class Agent:
    def __init__(
        self,
        node_id: str,
        state_dir: str | os.PathLike[str],
        managers: Sequence[str],
        # mTLS to managers: fixed, or a function giving the node's current ones (renewals), called for
        # each new session's channel; None = plaintext with the node id in metadata (tests only)
        credentials: grpc.ChannelCredentials | Callable[[], grpc.ChannelCredentials] | None,
        engine: ContainerEngine,
        *,
        hostname: str | None = None,
        addr: str = "",
        labels: dict[str, str] | None = None,
        network: NetworkHooks | None = None,
        channel_options: Sequence[tuple[str, Any]] = (),
        on_session: Callable[[dispatcher_pb2.SessionMessage], None] | None = None,
        state: LocalState | None = None,
        period: float | None = None,
    ) -> None:
        """`state`: where the assignments, the last session message and the heartbeat period are
        kept for the next run (see `shoal.agent.localstate`); None keeps nothing. `period`: the
        heartbeat period to start with (a join answer's); by default the one `state` kept, or 1 s.
        The first connection's keepalive follows it (see KEEPALIVE_PERIODS)."""
        if not managers:
            raise ValueError("managers is empty: give at least one manager address host:port")
        self.node_id = node_id
        self.state_dir = os.fspath(state_dir)
        self.managers: list[str] = list(dict.fromkeys(managers))
        self.credentials = credentials
        self.hostname = hostname
        self.addr = addr
        self.labels = labels or {}
        self.channel_options = list(channel_options)
        self.on_session = on_session
        self.state = state
        self.worker = Worker(engine, node_id, self._report, network=network, hostname=hostname or "", state=state)
        self.session_id = ""
        self.manager_addr = ""  # the manager of the current session
        self.connected = asyncio.Event()
        self._next: str | None = None
        self._rr = 0
        self._pending: dict[str, types_pb2.TaskStatus] = {}
        self._status_wake = asyncio.Event()
        self._subs: dict[str, asyncio.Task[None]] = {}
        kept = state.heartbeat_period() if state is not None else None
        self._period = period or kept or 1.0
        self._kept_period = kept  # what `state` holds (see `_keep_period`)
        self._connect_patience = QUICK_CONNECT_TIMEOUT  # s for the next connection (MAX_CONNECT_TIMEOUT)
        self._configured_period = 0.0  # the cluster's, as the last session message said
        self._beat_now = asyncio.Event()  # the period shrank: beat again without waiting out the old one
        # called with the round trip of every answered heartbeat (s), or None for one that failed or
        # went unanswered (benchmarks)
        self.on_heartbeat: Callable[[float | None], None] | None = None

    @property
    def _md(self) -> tuple[tuple[str, str], ...]:
        return ((NODE_ID_KEY, self.node_id),) if self.credentials is None else ()

    # ---- status reports from the worker -----------------------------------------------------------
    def _report(self, task_id: str, status: types_pb2.TaskStatus) -> None:
        prev = self._pending.get(task_id)
        if prev is None or status.state >= prev.state:
            self._pending[task_id] = status
        self._status_wake.set()

    # ---- session loop ---------------------------------------------------------------------------------
    def _pick(self) -> str:
        if self._next:
            addr, self._next = self._next, None
            return addr
        addr = self.managers[self._rr % len(self.managers)]
        self._rr += 1
        return addr

    def _ping_timeout(self) -> float:
        """Seconds a keepalive ping of a new connection may go unanswered (see KEEPALIVE_TIMEOUT_PERIODS)."""
        return max(KEEPALIVE_TIMEOUT, KEEPALIVE_TIMEOUT_PERIODS * self._period)

    def _channel(self, addr: str) -> grpc.aio.Channel:
        opts = [
            # a COMPLETE assignment set carries the node's secrets and configs (≤ 500 KB each)
            ("grpc.max_receive_message_length", 256 << 20),
            # the keepalive (see HEARTBEAT_PATIENCE); managers accept a ping a second
            # (dispatcher.SERVER_OPTIONS), an older one may send GOAWAY: the session reconnects
            ("grpc.keepalive_time_ms", int(max(KEEPALIVE, KEEPALIVE_PERIODS * self._period) * 1000)),
            ("grpc.keepalive_timeout_ms", int(self._ping_timeout() * 1000)),
            ("grpc.http2.ping_timeout_ms", int(self._ping_timeout() * 1000)),  # (gRPC 1.85 times a ping by this)
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.max_pings_without_data", 0),
            # no bandwidth-delay probes: gRPC would ping with every message received, tripling
            # the frames of a heartbeat (the messages are small; the default windows do)
            ("grpc.http2.bdp_probe", 0),
            *self.channel_options,
        ]
        if self.credentials is None:
            return grpc.aio.insecure_channel(addr, options=opts)
        creds = self.credentials() if callable(self.credentials) else self.credentials
        return grpc.aio.secure_channel(addr, creds, options=opts)

    async def run(self) -> None:
        """Run until cancelled: keep a session with the leader and drive the worker."""
        await self.worker.start()
        delay = RECONNECT_DELAY
        try:
            while True:
                named = self._next is not None  # the leader, as another manager said
                addr = self._pick()
                pause = 0.0
                try:
                    patience = self._connect_patience
                    await self._session(addr, max(CONNECT_TIMEOUT, patience) if named else patience)
                    delay = RECONNECT_DELAY
                except asyncio.CancelledError:
                    raise
                except BaseException as e:  # noqa: BLE001 - any failure ends the session; start again
                    if isinstance(e, KeyboardInterrupt | SystemExit):
                        raise
                    if isinstance(e, _Unanswered):
                        self._connect_patience = min(2 * self._connect_patience, MAX_CONNECT_TIMEOUT)
                    leader = _redirect_of(e)
                    errs = _rpc_errors(e)
                    why = _failures(e)
                    if leader and leader != addr:
                        log.info("session moved node=%s from=%s to leader=%s", self.node_id, addr, leader)
                        self._next = leader
                        if leader not in self.managers:
                            self.managers.append(leader)
                        continue
                    log.warning("session ended node=%s manager=%s err=%s", self.node_id, addr, why)
                    if any(
                        x.code() == grpc.StatusCode.NOT_FOUND and "not registered" in (x.details() or "")
                        for x in errs
                    ):
                        pause = UNREGISTERED_DELAY  # removed from the cluster: retry, but slowly
                finally:
                    self.connected.clear()
                    self.session_id = ""
                await asyncio.sleep(pause or random.uniform(0, delay * self._period))
                delay = min(delay * 2, MAX_RECONNECT_DELAY)
        finally:
            for t in self._subs.values():
                t.cancel()
            await self.worker.close()

    async def _session(self, addr: str, connect_timeout: float) -> None:
        channel = self._channel(addr)
        try:
            await _connected(channel, addr, connect_timeout)
            stub = dispatcher_pb2_grpc.DispatcherStub(channel)
            desc = describe_node(self.hostname, self.addr, self.labels, data_path_capabilities(self.addr))
            call, first, one_stream = await self._open(stub, dispatcher_pb2.SessionRequest(description=desc))
            if first is grpc.aio.EOF:
                raise ConnectionError(f"manager {addr} closed the session at once")
            self.session_id = first.session_id
            self.manager_addr = addr
            self._connect_patience = QUICK_CONNECT_TIMEOUT
            self._on_session_message(first)
            log.info("session opened node=%s manager=%s session=%s", self.node_id, addr, self.session_id)
            try:
                async with asyncio.TaskGroup() as tg:
                    if one_stream:
                        answers: asyncio.Queue[dispatcher_pb2.HeartbeatResponse] = asyncio.Queue()
                        tg.create_task(_named("session", self._manager_messages(call, channel, answers)))
                        tg.create_task(_named("heartbeats", self._beat(stub, call, answers)))
                    else:  # an older manager: a stream for each
                        tg.create_task(_named("session", self._session_messages(call)))
                        tg.create_task(_named("heartbeats", self._heartbeats(stub)))
                        tg.create_task(_named("assignments", self._assignments(stub)))
                        tg.create_task(_named("log subscriptions", self._log_subscriptions(channel)))
                    tg.create_task(_named("statuses", self._send_statuses(stub)))
            except asyncio.CancelledError:
                await self._say_restarting(stub)
                raise
        finally:
            for t in self._subs.values():
                t.cancel()
            self._subs.clear()
            await channel.close(grace=None)

    async def _open(
        self, stub: dispatcher_pb2_grpc.DispatcherStub, request: dispatcher_pb2.SessionRequest
    ) -> tuple[Any, Any, bool]:
        """Open the session: the call, its first session message (or EOF), and whether the call is
        a Connect stream (the whole session on one stream) or, with a manager of an older version
        (Connect UNIMPLEMENTED), a Session stream that the other streams go beside."""
        call = stub.Connect(metadata=self._md)
        try:
            with contextlib.suppress(asyncio.InvalidStateError):  # it ended already: read() says how
                await call.write(dispatcher_pb2.AgentMessage(session=request))
            first = await asyncio.wait_for(call.read(), FIRST_MESSAGE_TIMEOUT)
        except grpc.aio.AioRpcError as e:
            if e.code() != grpc.StatusCode.UNIMPLEMENTED:
                raise
            log.info("manager has no Connect stream (an older version): a stream each node=%s", self.node_id)
        else:
            if first is grpc.aio.EOF or first.WhichOneof("item") != "session":
                return call, grpc.aio.EOF, True
            return call, first.session, True
        call = stub.Session(request, metadata=self._md)
        return call, await asyncio.wait_for(call.read(), FIRST_MESSAGE_TIMEOUT), False

    async def _manager_messages(self, call: Any, channel: grpc.aio.Channel,
                                answers: asyncio.Queue[dispatcher_pb2.HeartbeatResponse]) -> None:
        """A Connect stream's messages to the parts of the session (heartbeat answers to `answers`)."""
        logs = logs_pb2_grpc.LogBrokerStub(channel)
        while True:
            msg = await call.read()
            if msg is grpc.aio.EOF:
                raise ConnectionError("the dispatcher ended the session")
            item = msg.WhichOneof("item")
            if item == "heartbeat":
                answers.put_nowait(msg.heartbeat)
            elif item == "assignments":
                self._on_assignments(msg.assignments)
            elif item == "session":
                self._on_session_message(msg.session)
            elif item == "subscription":
                self._on_subscription(logs, msg.subscription)

    def _on_session_message(self, msg: dispatcher_pb2.SessionMessage) -> None:
        configured = msg.heartbeat_period.ToNanoseconds() / 1e9
        if configured > 0 and configured != self._configured_period:
            self._configured_period = configured
            if configured < self._period:  # the next answer says the period to keep (longer in a large cluster)
                self._period = configured
                self._beat_now.set()
        addrs = [p.addr for p in msg.managers if p.addr]
        if addrs:
            self.managers = list(dict.fromkeys(addrs + [a for a in self.managers if a not in addrs]))
        if self.state is not None:
            try:
                self.state.save_session(msg)
            except OSError as e:
                log.warning("session message not kept on disk node=%s: %s", self.node_id, e)
        if self.on_session is not None:
            try:
                self.on_session(msg)
            except Exception:
                log.exception("session message hook failed node=%s", self.node_id)

    async def _session_messages(self, call: Any) -> None:
        while True:
            msg = await call.read()
            if msg is grpc.aio.EOF:
                raise ConnectionError("the dispatcher ended the session")
            self._on_session_message(msg)

    async def _say_restarting(self, stub: dispatcher_pb2_grpc.DispatcherStub) -> None:
        """The agent is stopped (swarmd's SIGTERM: an upgrade, a reboot): a last heartbeat tells the
        dispatcher the node will be back, so it is not marked DOWN, nor its tasks replaced, within the
        cluster's restart window. Best effort, at most a second: a crash sends nothing."""
        req = dispatcher_pb2.HeartbeatRequest(session_id=self.session_id, restarting=True)
        try:
            await stub.Heartbeat(req, metadata=self._md, timeout=RESTARTING_TIMEOUT)
            log.info("told the dispatcher this node is restarting node=%s", self.node_id)
        except grpc.aio.AioRpcError as e:
            log.info("could not tell the dispatcher this node is restarting node=%s: %s", self.node_id,
                     e.code().name)

    async def _heartbeats(self, stub: dispatcher_pb2_grpc.DispatcherStub) -> None:
        """Beat on one stream (Heartbeats) until the session ends; one call a beat with a manager
        that has no such stream (an older version still)."""
        try:
            await self._beat(stub, stub.Heartbeats(metadata=self._md))
        except grpc.aio.AioRpcError as e:
            if e.code() != grpc.StatusCode.UNIMPLEMENTED:
                raise
            log.info("manager has no heartbeat stream (an older version): a call a heartbeat node=%s", self.node_id)
            await self._beat(stub, None)

    async def _beat(self, stub: dispatcher_pb2_grpc.DispatcherStub, call: Any,
                    answers: asyncio.Queue[dispatcher_pb2.HeartbeatResponse] | None = None) -> None:
        """Beat until the session ends: on `call`, a Connect stream whose answers the session's
        reader puts in `answers`, or a Heartbeats stream; with neither, a Heartbeat call each."""
        req = dispatcher_pb2.HeartbeatRequest(session_id=self.session_id)
        beat = dispatcher_pb2.AgentMessage(heartbeat=req)

        async def answer() -> dispatcher_pb2.HeartbeatResponse:
            if call is None:
                return await stub.Heartbeat(req, metadata=self._md)
            if answers is not None:
                try:
                    if not call.done():  # else the session's reader raises how it ended
                        await call.write(beat)
                except grpc.aio.AioRpcError:  # ended meanwhile: gRPC says INTERNAL, the reader the status
                    if not call.done():
                        raise
                return await answers.get()
            if not call.done():  # else read() raises how it ended
                await call.write(req)
            resp = await call.read()
            if resp is grpc.aio.EOF:
                raise ConnectionError("the dispatcher ended the heartbeat stream")
            return resp

        try:
            while True:
                sent = time.monotonic()
                try:
                    resp = await self._answered(answer())
                except ConnectionError:
                    self._timed(None)
                    raise
                except grpc.aio.AioRpcError as e:
                    if not (call is not None and answers is None and e.code() == grpc.StatusCode.UNIMPLEMENTED):
                        self._timed(None)  # (an older manager's UNIMPLEMENTED is not a heartbeat lost)
                    raise
                self._timed(time.monotonic() - sent)
                if resp.HasField("period") and resp.period.ToNanoseconds() > 0:
                    self._period = resp.period.ToNanoseconds() / 1e9
                    self._keep_period()
                self._beat_now.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._beat_now.wait(), max(0.0, self._period - (time.monotonic() - sent)))
        finally:
            if call is not None and answers is None:
                call.cancel()

    def _keep_period(self) -> None:
        """Keep the period in `state` for the next start when it moved past the answers' jitter
        (up to a fifth shorter) from the one kept: rarely written (a cluster that grew or shrank)."""
        kept = self._kept_period
        if self.state is None or (kept is not None and PERIOD_KEPT_BELOW * kept <= self._period <= PERIOD_KEPT_ABOVE * kept):
            return
        try:
            self.state.save_heartbeat_period(self._period)
            self._kept_period = self._period
        except OSError as e:
            log.warning("heartbeat period not kept on disk node=%s: %s", self.node_id, e)

    async def _answered(self, answer: Awaitable[dispatcher_pb2.HeartbeatResponse]) -> dispatcher_pb2.HeartbeatResponse:
        """The heartbeat's answer, waited for HEARTBEAT_TIMEOUT periods (MIN_HEARTBEAT_TIMEOUT s at
        least), then on up to HEARTBEAT_PATIENCE s while the connection lives (its keepalive fails
        the call otherwise). Raises ConnectionError when none came, and what the call raised."""
        pending = asyncio.ensure_future(answer)
        # An answer that fails as the session ends (its stream reset) is no news: retrieved here, not
        # logged as "Task exception was never retrieved" (hundreds at each failover of a large fleet).
        pending.add_done_callback(lambda f: f.cancelled() or f.exception())
        try:
            deadline = max(MIN_HEARTBEAT_TIMEOUT, HEARTBEAT_TIMEOUT * self._period)
            done, _ = await asyncio.wait({pending}, timeout=deadline)
            patience = max(deadline, HEARTBEAT_PATIENCE)
            if not done and patience > deadline:
                log.warning("no heartbeat answer within %g s, but the manager's connection is alive (a busy "
                            "manager): waiting up to %g s node=%s", deadline, patience, self.node_id)
                done, _ = await asyncio.wait({pending}, timeout=patience - deadline)
            if not done:
                raise ConnectionError(f"no heartbeat answer within {patience:g} s")
            return pending.result()
        finally:
            if not pending.done():
                pending.cancel()

    def _timed(self, rtt: float | None) -> None:
        if self.on_heartbeat is not None:
            self.on_heartbeat(rtt)

    async def _assignments(self, stub: dispatcher_pb2_grpc.DispatcherStub) -> None:
        call = stub.Assignments(
            dispatcher_pb2.AssignmentsRequest(session_id=self.session_id), metadata=self._md
        )
        while True:
            msg = await call.read()
            if msg is grpc.aio.EOF:
                raise ConnectionError("the dispatcher ended the assignments stream")
            self._on_assignments(msg)

    def _on_assignments(self, msg: dispatcher_pb2.AssignmentsMessage) -> None:
        self.connected.set()  # (the session's first assignments came)
        log.debug("assignments node=%s type=%s changes=%d", self.node_id,
                  dispatcher_pb2.AssignmentsMessage.Type.Name(msg.type), len(msg.changes))
        self.worker.apply(msg)

    async def _send_statuses(self, stub: dispatcher_pb2_grpc.DispatcherStub) -> None:
        while True:
            if not self._pending:
                self._status_wake.clear()
                await self._status_wake.wait()
            batch = dict(list(self._pending.items())[:STATUS_BATCH])
            for tid in batch:
                del self._pending[tid]
            req = dispatcher_pb2.UpdateTaskStatusRequest(session_id=self.session_id)
            for tid, st in batch.items():
                req.updates.add(task_id=tid, status=st)
            try:
                await stub.UpdateTaskStatus(req, metadata=self._md, timeout=STATUS_TIMEOUT)
            except grpc.aio.AioRpcError as e:
                if e.code() == grpc.StatusCode.PERMISSION_DENIED:
                    log.warning("task status refused node=%s err=%s", self.node_id, e.details())
                    continue
                for tid, st in batch.items():  # keep them for the next session unless newer arrived
                    self._pending.setdefault(tid, st)
                # Busy (a lost manager fails the keepalive instead): the call's deadline passed, on this
                # side (DEADLINE_EXCEEDED) or first on the manager's, which then ends it CANCELLED.
                if e.code() in (grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED):
                    log.warning("task status report unanswered within %g s (a busy manager, %s): sending it "
                                "again node=%s", STATUS_TIMEOUT, e.code().name, self.node_id)
                    continue
                if e.code() == grpc.StatusCode.UNAVAILABLE:
                    pause = random.uniform(0.5, 1.0) * STATUS_RETRY_PERIODS * self._period
                    log.warning("task status report not saved (%s): sending it again in %.1f s node=%s",
                                e.details(), pause, self.node_id)
                    await asyncio.sleep(pause)
                    continue
                raise
            except BaseException:  # cancelled with the session (its heartbeat failed): the same
                for tid, st in batch.items():
                    self._pending.setdefault(tid, st)
                raise

    # ---- logs ------------------------------------------------------------------------------------------
    async def _log_subscriptions(self, channel: grpc.aio.Channel) -> None:
        stub = logs_pb2_grpc.LogBrokerStub(channel)
        call = stub.ListenSubscriptions(logs_pb2.ListenSubscriptionsRequest(), metadata=self._md)
        try:
            while True:
                sub = await call.read()
                if sub is grpc.aio.EOF:
                    return  # the broker is optional: the session goes on without it
                self._on_subscription(stub, sub)
        except grpc.aio.AioRpcError as e:
            if e.code() == grpc.StatusCode.UNIMPLEMENTED:
                log.info("manager has no log broker node=%s", self.node_id)
                await asyncio.Event().wait()
            raise

    def _on_subscription(self, stub: logs_pb2_grpc.LogBrokerStub, sub: logs_pb2.SubscriptionMessage) -> None:
        """Start publishing what `sub` asks for, or stop (`close`)."""
        if sub.close:
            t = self._subs.pop(sub.id, None)
            if t is not None:
                t.cancel()
            return
        if sub.id in self._subs:
            return
        t = asyncio.create_task(self._publish(stub, sub), name=f"logs-{sub.id}")
        self._subs[sub.id] = t
        t.add_done_callback(lambda _t, sid=sub.id: self._subs.pop(sid, None))

    def _matching_tasks(self, sel: logs_pb2.LogSelector) -> list[Any]:
        out = []
        for t in list(self.worker.tasks.values()):
            if (
                (sel.task_ids and t.id in sel.task_ids)
                or (sel.service_ids and t.service_id in sel.service_ids)
                or (sel.node_ids and self.node_id in sel.node_ids)
            ):
                ctl = self.worker.controllers.get(t.id)
                if ctl is not None and ctl.has_container:
                    out.append(t)
        return out

    async def _publish(self, stub: logs_pb2_grpc.LogBrokerStub, sub: logs_pb2.SubscriptionMessage) -> None:
        call = stub.PublishLogs(metadata=self._md)
        queue: asyncio.Queue[logs_pb2.LogMessage | None] = asyncio.Queue(maxsize=1000)
        opts = sub.options
        since = (
            opts.since.ToDatetime().replace(tzinfo=__import__("datetime").timezone.utc)
            if opts.HasField("since")
            else None
        )

        async def one(t: Any) -> None:
            ctx = logs_pb2.LogContext(service_id=t.service_id, node_id=self.node_id, task_id=t.id)
            try:
                async for line in self.worker.engine.logs(
                    t.id, follow=opts.follow, tail=opts.tail, since=since
                ):
                    m = logs_pb2.LogMessage(
                        context=ctx,
                        stream=logs_pb2.LogMessage.STDERR
                        if line.stream == "stderr"
                        else logs_pb2.LogMessage.STDOUT,
                        data=line.line.encode(),
                    )
                    m.timestamp.FromDatetime(line.timestamp)
                    await queue.put(m)
            except Exception as e:
                log.warning("reading logs failed task=%s name=%s err=%s", t.id, container_name(t), e)

        async def readers() -> None:
            seen: set[str] = set()
            async with asyncio.TaskGroup() as tg:
                while True:
                    for t in self._matching_tasks(sub.selector):
                        if t.id not in seen:
                            seen.add(t.id)
                            tg.create_task(one(t))
                    if not opts.follow:
                        break
                    changed = self.worker.changed
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(changed.wait(), 1.0)
            await queue.put(None)

        reader = asyncio.create_task(readers())
        try:
            done = False
            while not done:
                m = await queue.get()
                batch = []
                while m is not None:
                    batch.append(m)
                    if len(batch) >= LOG_BATCH or queue.empty():
                        break
                    m = queue.get_nowait()
                done = m is None
                if batch:
                    await call.write(logs_pb2.PublishLogsMessage(subscription_id=sub.id, messages=batch))
            await call.write(logs_pb2.PublishLogsMessage(subscription_id=sub.id, close=True))
            await call.done_writing()
            await call
        finally:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await reader
            call.cancel()


MANAGER_NAME = "swarm-manager"  # the DNS name in every manager certificate (managers are dialled by IP)


def start_agent_task(
    ctx: Any,
    *,
    registry_mirrors: Sequence[str] = (),
    insecure_registries: Sequence[str] = (),
    network: NetworkHooks | None = None,
    labels: dict[str, str] | None = None,
    on_session: Callable[[dispatcher_pb2.SessionMessage], None] | None = None,
    state: LocalState | None = None,
) -> asyncio.Task[None]:
    """swarmd's agent hook: the engine under `<state dir>/engine` and an agent on mutual TLS.

    `ctx` is swarmd's `AgentContext` (node_id, hostname, state_dir, identity with key_pem/cert_pem/
    ca_pem, credentials following renewals, managers, advertise_addr). Cancel the task to stop the agent; containers keep running
    and the next start re-adopts them."""
    from pathlib import Path

    from shoal.agent.engine import Engine

    engine = Engine(
        Path(ctx.state_dir) / "engine",
        registry_mirrors=list(registry_mirrors),
        insecure_registries=list(insecure_registries),
    )
    creds: grpc.ChannelCredentials | Callable[[], grpc.ChannelCredentials]
    if getattr(ctx, "credentials", None) is not None:
        creds = ctx.credentials.channel_credentials  # renewed certificates from the next session on
    else:
        ident = ctx.identity
        creds = grpc.ssl_channel_credentials(ident.ca_pem, ident.key_pem, ident.cert_pem)
    agent = Agent(
        ctx.node_id,
        ctx.state_dir,
        list(ctx.managers),
        creds,
        engine,
        hostname=ctx.hostname or None,
        addr=ctx.advertise_addr,
        labels=labels,
        network=network,
        channel_options=[
            ("grpc.ssl_target_name_override", MANAGER_NAME),
            ("grpc.default_authority", MANAGER_NAME),
        ],
        on_session=on_session,
        state=state,
    )

    async def main() -> None:
        try:
            await agent.run()
        finally:
            await engine.close()

    task = asyncio.create_task(main(), name=f"agent-{ctx.node_id}")
    task.agent = agent  # type: ignore[attr-defined]  # for swarmd and tests: the Agent object
    return task
