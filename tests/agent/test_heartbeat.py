"""The agent's session against the real dispatcher, whose answers are delayed as a busy leader's are.
The agent beats on one stream (Heartbeats), or one call a beat with a manager without it.
The heartbeat deadline (agent.HEARTBEAT_TIMEOUT periods, at least MIN_HEARTBEAT_TIMEOUT s): an
answer slower than the old 1.5 periods but within the dispatcher's own grace keeps the session (and
the node READY); an answer that never comes ends it (the dispatcher's grace first, or the agent's
patience while the connection answers its pings, or the connection's keepalive when it does not),
and the agent opens a new one. Status reports in flight when a session ends are sent again on the
next. Real engine (runc under conmon). Needs root."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
import pytest
from agent_helpers import add_node, make_task, manager_side, new_engine, run, task_state, wait_for

from shoal.agent import agent as agent_mod
from shoal.agent.agent import Agent
from shoal.agent.localstate import LocalState
from shoal.manager.dispatcher import Dispatcher
from shoal.proto import dispatcher_pb2_grpc, objects_pb2, specs_pb2, types_pb2

pytestmark = pytest.mark.integration

PERIOD = 1.0  # s, the cluster's heartbeat period: the dispatcher's grace is 2.8 s


async def set_period(st, seconds: float) -> None:  # noqa: ANN001
    def fn(tx):  # noqa: ANN001, ANN202
        c = objects_pb2.Cluster()
        c.CopyFrom(tx.get("cluster", st.cluster().id))
        c.spec.dispatcher.heartbeat_period.FromNanoseconds(int(seconds * 1e9))
        tx.update(c)

    await st.update(fn)


def answer_after(monkeypatch, first: Callable[[], Awaitable[None]]) -> None:  # noqa: ANN001
    """Every heartbeat answer of the dispatcher (stream or call) waits for `first()`: a busy or paused
    leader. Set before the server binds its handlers."""
    beat = Dispatcher._beat

    async def late(self, s, request):  # noqa: ANN001, ANN202
        await first()
        return await beat(self, s, request)

    monkeypatch.setattr(Dispatcher, "_beat", late)


@contextlib.asynccontextmanager
async def agent_in_session(addr: str, engine_root, registry, tmp_path,  # noqa: ANN001
                           **kw: Any) -> AsyncIterator[tuple[Agent, Any]]:
    """Node n1's agent (real engine) against the dispatcher at `addr`, in session; stopped at the end.
    `kw` goes to the Agent."""
    engine = new_engine(engine_root, registry)
    agent = Agent("n1", tmp_path, [addr], None, engine, hostname="node-1", **kw)
    runner = asyncio.create_task(agent.run())
    try:
        await wait_for(lambda: agent.session_id != "", what="a session")
        yield agent, engine
    finally:
        runner.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await runner
        await engine.close()


def test_a_slow_heartbeat_answer_keeps_the_session_a_lost_one_ends_it(engine_root, registry, tmp_path,
                                                                    caplog, monkeypatch) -> None:
    delay = [0.0]
    answer_after(monkeypatch, lambda: asyncio.sleep(delay[0]))  # a busy leader: the answer comes late

    async def main() -> None:
        async with manager_side() as (st, _disp, _broker, addr):
            await set_period(st, PERIOD)
            await add_node(st, "n1", hostname="node-1")
            async with agent_in_session(addr, engine_root, registry, tmp_path) as (agent, _engine):
                first = agent.session_id
                # 1.8 s: past the old deadline (1.5 periods, less the period's jitter), within the
                # dispatcher's grace (2.8 s) and the agent's deadline (5 s)
                delay[0] = 1.8 * PERIOD
                await asyncio.sleep(4.5)  # two or three slow answers
                assert agent.session_id == first
                node = st.get("node", "n1")
                assert node.status.state == types_pb2.NodeStatus.READY
                assert not [r for r in caplog.records if "session ended" in r.getMessage()]

                # no answer: the session ends (the agent's deadline, or the
                # dispatcher's grace of 2.8 s closing it first) and the agent opens another
                delay[0] = 30.0
                await wait_for(lambda: agent.session_id not in ("", first), what="a new session", timeout=20)
                ended = [r.getMessage() for r in caplog.records if "session ended" in r.getMessage()]
                assert ended and ("no heartbeat answer within 5 s" in ended[0] or "was closed" in ended[0]), ended

    assert agent_mod.HEARTBEAT_TIMEOUT == 3.0
    with caplog.at_level(logging.INFO, logger="shoal.agent"):
        run(main())


def test_statuses_in_flight_when_the_session_ends_are_sent_on_the_next(engine_root, registry, tmp_path,
                                                                       monkeypatch) -> None:
    """A status report still unanswered when the session ends (its heartbeat went unanswered: the
    session's calls are cancelled) is kept and sent again on the next session, so the task does not
    stay ASSIGNED in the store while it runs."""
    stuck = [False]
    held = asyncio.Event()  # set once a report of RUNNING is held
    hb_delay = [0.0]
    update = Dispatcher.UpdateTaskStatus

    async def slow_update(self, request, context):  # noqa: ANN001, ANN202
        while stuck[0] and any(u.status.state == types_pb2.RUNNING for u in request.updates):
            held.set()
            await asyncio.sleep(0.05)  # the report of RUNNING gets no answer
        return await update(self, request, context)

    monkeypatch.setattr(Dispatcher, "UpdateTaskStatus", slow_update)
    answer_after(monkeypatch, lambda: asyncio.sleep(hb_delay[0]))

    async def main() -> None:
        async with manager_side() as (st, _disp, _broker, addr):
            await add_node(st, "n1", hostname="node-1")
            async with agent_in_session(addr, engine_root, registry, tmp_path) as (agent, engine):
                first = agent.session_id
                stuck[0] = True
                svc = objects_pb2.Service(
                    id="svc-id", spec=specs_pb2.ServiceSpec(annotations=types_pb2.Annotations(name="svc"))
                )
                t = make_task("n1", "sleep", "600")
                await st.update(lambda tx: [tx.create(svc), tx.create(t)])
                async def running() -> bool:  # (engine.list() while the container is created: no harm)
                    return any(c.id == t.id and c.status == "running" for c in await engine.list())

                await wait_for(running, what="the container running")
                await wait_for(held.is_set, what="the report of RUNNING in flight")
                assert task_state(st, t.id) < types_pb2.RUNNING
                hb_delay[0] = 60.0  # its heartbeat goes unanswered: the session ends
                await wait_for(lambda: agent.session_id not in ("", first), what="a new session", timeout=30)
                hb_delay[0], stuck[0] = 0.0, False
                await wait_for(lambda: task_state(st, t.id) == types_pb2.RUNNING, what="RUNNING in the store",
                               timeout=30)

    run(main())


def test_a_leader_that_answers_nothing_is_left_after_the_agents_patience(engine_root, registry, tmp_path, caplog,
                                                                        monkeypatch) -> None:
    """A leader whose process lives (its connection answers the keepalive pings) but whose answers
    stop (its loop busy or wedged; its expiry loop stands still too) is waited for past the heartbeat
    deadline (MIN_HEARTBEAT_TIMEOUT s, here 1.5; 3 periods of 0.5 s are less), saying so, and left by
    the agent once HEARTBEAT_PATIENCE s (here 4) went by without an answer; it opens a new session."""
    silent = [False]

    async def paused() -> None:
        while silent[0]:
            await asyncio.sleep(0.05)

    async def no_expiry(self) -> None:  # noqa: ANN001
        await asyncio.Event().wait()

    answer_after(monkeypatch, paused)
    monkeypatch.setattr(Dispatcher, "run", no_expiry)
    monkeypatch.setattr(agent_mod, "MIN_HEARTBEAT_TIMEOUT", 1.5)  # shorter than the defaults: a quick test
    monkeypatch.setattr(agent_mod, "HEARTBEAT_PATIENCE", 4.0)

    async def main() -> None:
        async with manager_side() as (st, _disp, _broker, addr):
            await set_period(st, 0.5)
            await add_node(st, "n1", hostname="node-1")
            async with agent_in_session(addr, engine_root, registry, tmp_path) as (agent, _engine):
                first = agent.session_id
                await asyncio.sleep(1.5)  # a few answered heartbeats: the period is known (0.5 s)
                silent[0] = True
                t0 = asyncio.get_running_loop().time()
                await wait_for(lambda: agent.session_id not in ("", first), what="a new session", timeout=20)
                waited = asyncio.get_running_loop().time() - t0
                silent[0] = False
        messages = [r.getMessage() for r in caplog.records]
        assert any("no heartbeat answer within 1.5 s, but the manager's connection is alive" in m for m in messages)
        ended = [m for m in messages if "session ended" in m]
        # (named by the stream whose failure ended the session)
        assert ended and "heartbeats: ConnectionError('no heartbeat answer within 4 s')" in ended[0], ended
        # the first unanswered heartbeat left after `silent`: the patience ended the session 4 s later
        # at the earliest (a lower bound: a loaded machine only makes it later)
        assert waited >= 3.8, waited

    with caplog.at_level(logging.INFO, logger="shoal.agent"):
        run(main())


H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
H2_DATA, H2_PING = 0, 6


class _Blackhole:
    """A TCP proxy to `target` whose connections, once `cut()`, carry nothing more either way while
    staying open (a manager cut off by the network, or its host frozen); connections made after
    the cut carry bytes again (the manager is back). Between `hold()` and `release()` its
    connections carry nothing and lose nothing (a stalled machine). It counts the HTTP/2 frames it
    carries by type (`frames`; plaintext connections only)."""

    def __init__(self, target: str) -> None:
        self.target = target.rsplit(":", 1)
        self.frames: Counter[int] = Counter()
        self.cut_conns: list[asyncio.StreamWriter] = []
        self._live: set[tuple[asyncio.StreamWriter, asyncio.StreamWriter]] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self.server: asyncio.base_events.Server | None = None
        self._flowing = asyncio.Event()
        self._flowing.set()

    def hold(self) -> None:
        self._flowing.clear()

    def release(self) -> None:
        self._flowing.set()

    async def start(self) -> str:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return f"127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def _serve(self, cr: asyncio.StreamReader, cw: asyncio.StreamWriter) -> None:
        ur, uw = await asyncio.open_connection(self.target[0], int(self.target[1]))
        pair = (cw, uw)
        self._live.add(pair)

        async def pipe(r: asyncio.StreamReader, w: asyncio.StreamWriter, upstream: bool) -> None:
            buf = b""
            preface = upstream  # the client's first bytes are the connection preface, not a frame
            with contextlib.suppress(ConnectionError):
                while data := await r.read(65536):
                    await self._flowing.wait()
                    if pair in self._live:
                        w.write(data)
                        await w.drain()
                    buf += data
                    if preface and len(buf) >= len(H2_PREFACE):
                        buf, preface = buf[len(H2_PREFACE):], False
                    while not preface and len(buf) >= 9 and len(buf) >= 9 + int.from_bytes(buf[:3], "big"):
                        self.frames[buf[3]] += 1  # frame header: length (3 bytes), type, flags, stream
                        buf = buf[9 + int.from_bytes(buf[:3], "big"):]

        for t in (asyncio.create_task(pipe(cr, uw, True)), asyncio.create_task(pipe(ur, cw, False))):
            self._tasks.add(t)
            t.add_done_callback(self._tasks.discard)

    def cut(self) -> None:
        for pair in self._live:
            self.cut_conns += pair
        self._live.clear()

    async def close(self) -> None:
        for t in list(self._tasks):
            t.cancel()
        for w in self.cut_conns + [w for pair in self._live for w in pair]:
            w.close()
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()


@contextlib.asynccontextmanager
async def proxied_manager(period: float | None = None) -> AsyncIterator[tuple[_Blackhole, str]]:
    """A manager side with node n1 (and the heartbeat `period`, if given) behind a `_Blackhole`
    proxy: yields the proxy and the address agents dial through it."""
    async with manager_side() as (st, _disp, _broker, addr):
        if period is not None:
            await set_period(st, period)
        await add_node(st, "n1", hostname="node-1")
        hole = _Blackhole(addr)
        try:
            yield hole, await hole.start()
        finally:
            hole.release()
            await hole.close()


def test_a_cut_off_leader_is_left_when_its_connection_stops_answering_pings(engine_root, registry, tmp_path,
                                                                            caplog, monkeypatch) -> None:
    """A manager cut off (nothing passes its connection any more, which stays open) is left through
    the connection's keepalive: a ping unanswered within KEEPALIVE_TIMEOUT s ends the connection and
    the session with it, long before the heartbeat's own deadline and patience (here 30 and 60 s),
    and the agent opens a new session (here through the same address, which carries bytes again)."""
    monkeypatch.setattr(agent_mod, "MIN_HEARTBEAT_TIMEOUT", 30.0)
    monkeypatch.setattr(agent_mod, "HEARTBEAT_PATIENCE", 60.0)
    monkeypatch.setattr(agent_mod, "KEEPALIVE", 1.0)
    monkeypatch.setattr(agent_mod, "KEEPALIVE_TIMEOUT", 1.0)

    async def main() -> None:
        async with proxied_manager() as (hole, via):
            async with agent_in_session(via, engine_root, registry, tmp_path) as (agent, _engine):
                first = agent.session_id
                await asyncio.sleep(2.0)  # answered heartbeats and pings
                assert agent.session_id == first
                hole.cut()
                t0 = asyncio.get_running_loop().time()
                await wait_for(lambda: agent.session_id not in ("", first), what="a new session", timeout=20)
                waited = asyncio.get_running_loop().time() - t0
        ended = [r.getMessage() for r in caplog.records if "session ended" in r.getMessage()]
        assert ended and "UNAVAILABLE" in ended[0], ended
        # a ping a second, unanswered within a second: the connection ends within about 2 s of the cut
        assert waited < 10.0, waited

    with caplog.at_level(logging.INFO, logger="shoal.agent"):
        run(main())


@pytest.mark.parametrize("scaled", [True, False], ids=["scaled", "floor-only"])
def test_a_stall_shorter_than_the_periods_ping_timeout_keeps_the_session(engine_root, registry, tmp_path,
                                                                       caplog, monkeypatch, scaled) -> None:
    """Under a long heartbeat period (a large cluster) a ping may go unanswered for
    KEEPALIVE_TIMEOUT_PERIODS periods: the connection outlives a stall of both machines (nothing
    passes for 6.5 s, then everything held arrives) that a floor-only timeout (here 1 s, with the
    scaling turned off) does not. Period 3 s: the first ping 3.75 s after the last answer, given
    4.5 s (scaled: ends at 8.25 s) or 1 s (4.75 s)."""
    monkeypatch.setattr(agent_mod, "KEEPALIVE_TIMEOUT", 1.0)
    if not scaled:
        monkeypatch.setattr(agent_mod, "KEEPALIVE_TIMEOUT_PERIODS", 0.0)

    async def main() -> None:
        async with proxied_manager(3.0) as (hole, via):
            async with agent_in_session(via, engine_root, registry, tmp_path, period=3.0) as (agent, _engine):
                first = agent.session_id
                answered = asyncio.Event()
                agent.on_heartbeat = lambda rtt: rtt is not None and (hole.hold(), answered.set())
                await asyncio.wait_for(answered.wait(), 10)  # held from right after an answer
                await asyncio.sleep(6.5)
                hole.release()
                agent.on_heartbeat = None
                await asyncio.sleep(4.0)  # a few answers after the stall
                same = agent.session_id == first
        ended = [r.getMessage() for r in caplog.records if "session ended" in r.getMessage()]
        if scaled:
            assert same and not ended, ended
        else:
            assert not same and ended and "UNAVAILABLE" in ended[0], ended

    with caplog.at_level(logging.INFO, logger="shoal.agent"):
        run(main())


@pytest.mark.parametrize("period,keepalive,beats_min", [(0.5, None, 5), (1.0, 0.5, 3)],
                         ids=["below-keepalive", "periods"])
def test_answered_heartbeats_cost_no_pings(engine_root, registry, tmp_path, monkeypatch, period, keepalive,
                                           beats_min) -> None:
    """Between an agent and a manager whose heartbeats are answered, no HTTP/2 ping passes: no
    keepalive ping (answers come more often than its interval: KEEPALIVE, or KEEPALIVE_PERIODS of
    the period the agent knows when that is longer, here KEEPALIVE set to 0.5 s under a 1 s period)
    and no bandwidth-delay probe (gRPC's default pings with every message received; through a
    manager's remote API front that tripled the chunks a fleet's heartbeats cost)."""
    if keepalive is not None:
        monkeypatch.setattr(agent_mod, "KEEPALIVE", keepalive)

    async def main() -> None:
        async with proxied_manager(period) as (hole, via):
            async with agent_in_session(via, engine_root, registry, tmp_path) as (agent, _engine):
                beats: list[float | None] = []
                agent.on_heartbeat = beats.append
                await asyncio.sleep(4.0)
                assert len(beats) >= beats_min and None not in beats, beats
        assert hole.frames[H2_DATA] >= 2 * len(beats), hole.frames
        assert hole.frames[H2_PING] == 0, hole.frames

    run(main())


@pytest.mark.parametrize("start", ["told", "kept", "unknown"])
def test_the_first_connection_keeps_alive_by_the_period_it_was_told_or_kept(engine_root, registry, tmp_path,
                                                                           monkeypatch, start) -> None:
    """An agent's first connection sets its keepalive from the heartbeat period it starts with: the
    join answer's (`period`), or the one its local state kept from the last run. Knowing it, no ping
    passes under a 2 s period (KEEPALIVE set to 0.5 s: the channel pings after 2.5 s without a
    frame), unless a heartbeat comes 0.5 s late (a stalled loop on a loaded machine: at most one is
    let pass); not knowing it (1 s assumed: a keepalive of 1.25 s), a ping goes with about every
    heartbeat until the agent connects again (one more round trip per heartbeat for the leader of a
    large cluster, whose period is long). Whatever it started with, the period the answers say is
    kept for the next start."""
    monkeypatch.setattr(agent_mod, "KEEPALIVE", 0.5)
    keepalives: list[int] = []  # the keepalive (ms) of each channel the agent opened
    open_channel = grpc.aio.insecure_channel

    def channel(target: str, options=(), *a, **kw):  # noqa: ANN001, ANN202
        keepalives.extend(v for k, v in options if k == "grpc.keepalive_time_ms")
        return open_channel(target, options, *a, **kw)

    monkeypatch.setattr(grpc.aio, "insecure_channel", channel)
    state = LocalState(tmp_path / "worker")
    if start == "kept":
        state.save_heartbeat_period(2.0)

    async def main() -> None:
        async with proxied_manager(2.0) as (hole, via):
            async with agent_in_session(via, engine_root, registry, tmp_path, state=state,
                                        period=2.0 if start == "told" else None) as (agent, _engine):
                beats: list[float | None] = []
                agent.on_heartbeat = beats.append
                await asyncio.sleep(5.0)
                assert len(beats) >= 2 and None not in beats, beats
        assert keepalives[0] == (1250 if start == "unknown" else 2500), keepalives
        if start == "unknown":
            assert hole.frames[H2_PING] >= 2, hole.frames
        else:
            assert hole.frames[H2_PING] <= 1, hole.frames
        assert 1.6 <= (state.heartbeat_period() or 0) <= 2.0, state.heartbeat_period()

    run(main())


@pytest.mark.parametrize("manager", ["connect", "streams", "calls"])
def test_heartbeats_go_on_the_session_stream_or_a_stream_or_a_call_each(engine_root, registry, tmp_path,
                                                                      caplog, monkeypatch, manager) -> None:
    """The agent beats on its Connect stream (the whole session on one), not with Heartbeat calls; a
    manager of an older version answers Connect UNIMPLEMENTED, and the agent opens a stream for each
    part of the session, beating on the Heartbeats stream; an older one still answers that stream
    UNIMPLEMENTED too, and the agent then beats with one call each, in the same session. Either way
    the node stays READY and each answered heartbeat is timed."""
    calls = [0]
    one_call = Dispatcher.Heartbeat

    async def counted(self, request, context):  # noqa: ANN001, ANN202
        calls[0] += 1
        return await one_call(self, request, context)

    monkeypatch.setattr(Dispatcher, "Heartbeat", counted)
    if manager != "connect":  # the generated servicer's default: UNIMPLEMENTED
        monkeypatch.setattr(Dispatcher, "Connect", dispatcher_pb2_grpc.DispatcherServicer.Connect)
    if manager == "calls":
        monkeypatch.setattr(Dispatcher, "Heartbeats", dispatcher_pb2_grpc.DispatcherServicer.Heartbeats)

    async def main() -> None:
        async with manager_side() as (st, _disp, _broker, addr):
            await set_period(st, 0.5)
            await add_node(st, "n1", hostname="node-1")
            async with agent_in_session(addr, engine_root, registry, tmp_path) as (agent, _engine):
                rtts: list[float | None] = []
                agent.on_heartbeat = rtts.append
                first = agent.session_id
                await asyncio.sleep(3.0)
                assert agent.session_id == first
                assert st.get("node", "n1").status.state == types_pb2.NodeStatus.READY
                assert len(rtts) >= 3 and None not in rtts, rtts
                assert (calls[0] >= len(rtts)) if manager == "calls" else (calls[0] == 0), (calls, rtts)

    with caplog.at_level(logging.INFO, logger="shoal.agent"):
        run(main())
    said = " ".join(r.getMessage() for r in caplog.records)
    assert ("no Connect stream" in said) == (manager != "connect"), said
    assert ("no heartbeat stream" in said) == (manager == "calls"), said


def test_a_shorter_period_reaches_the_agent_at_once(engine_root, registry, tmp_path, caplog, monkeypatch) -> None:
    """The cluster's heartbeat period lowered from 20 s to 0.5 s: the agent, told 20 s by its last
    answer, hears of it from its session stream and beats at 0.5 s at once, so a leader that falls
    silent after that is left after MIN_HEARTBEAT_TIMEOUT (5 s), not after 3 periods of 20 s (with
    no HEARTBEAT_PATIENCE here: the deadline the period gives is the test's point)."""
    silent = [False]

    async def paused() -> None:
        while silent[0]:
            await asyncio.sleep(0.05)

    async def no_expiry(self) -> None:  # noqa: ANN001 - a silent leader's expiry loop stands still too
        await asyncio.Event().wait()

    answer_after(monkeypatch, paused)
    monkeypatch.setattr(Dispatcher, "run", no_expiry)
    monkeypatch.setattr(agent_mod, "HEARTBEAT_PATIENCE", 0.0)

    async def main() -> None:
        async with manager_side() as (st, _disp, _broker, addr):
            await add_node(st, "n1", hostname="node-1")
            async with agent_in_session(addr, engine_root, registry, tmp_path) as (agent, _engine):
                first = agent.session_id
                await set_period(st, 20.0)
                await wait_for(lambda: agent._period >= 15.0, what="the agent told 20 s", timeout=10)
                beats: list[float | None] = []
                agent.on_heartbeat = beats.append
                await set_period(st, 0.5)
                await wait_for(lambda: len(beats) >= 3, what="beats at the new period", timeout=5)
                assert agent._period <= 0.5 and agent.session_id == first
                silent[0] = True
                await wait_for(lambda: agent.session_id not in ("", first), what="a new session", timeout=15)
                silent[0] = False
        ended = [r.getMessage() for r in caplog.records if "session ended" in r.getMessage()]
        assert ended and "no heartbeat answer within 5 s" in ended[0], ended

    with caplog.at_level(logging.INFO, logger="shoal.agent"):
        run(main())


def test_each_unanswered_connection_gives_the_next_more_time_until_a_session_opens(engine_root, registry, tmp_path,
                                                                                 caplog, monkeypatch) -> None:
    """Managers that accept connections but answer none in time (busy with a fleet's handshakes) get
    twice the time at each attempt in a row, up to MAX_CONNECT_TIMEOUT; a session opened sets it back."""
    monkeypatch.setattr(agent_mod, "QUICK_CONNECT_TIMEOUT", 0.2)
    monkeypatch.setattr(agent_mod, "MAX_CONNECT_TIMEOUT", 0.8)
    monkeypatch.setattr(agent_mod, "RECONNECT_DELAY", 0.01)

    async def silent(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await r.read()  # accepts, reads, never answers
        w.close()

    async def main() -> None:
        servers = [await asyncio.start_server(silent, "127.0.0.1", 0) for _ in range(4)]
        mute = [f"127.0.0.1:{srv.sockets[0].getsockname()[1]}" for srv in servers]
        try:
            async with manager_side() as (st, _disp, _broker, addr):
                await add_node(st, "n1", hostname="node-1")
                engine = new_engine(engine_root, registry)
                agent = Agent("n1", tmp_path, [*mute, addr], None, engine, hostname="node-1")
                runner = asyncio.create_task(agent.run())
                try:
                    await wait_for(lambda: agent.session_id != "", what="a session", timeout=20)
                    assert agent._connect_patience == 0.2
                finally:
                    runner.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await runner
                    await engine.close()
        finally:
            for srv in servers:
                srv.close()

    with caplog.at_level(logging.INFO, logger="shoal.agent"):
        run(main())
    waits = [r.getMessage().split("unreachable within ")[1].split(" ")[0] for r in caplog.records
             if "unreachable within" in r.getMessage()]
    assert waits == ["0.2", "0.4", "0.8", "0.8"], waits


@pytest.mark.parametrize("ending", ["deadline", "cancelled", "unavailable"])
def test_a_status_report_out_of_time_is_sent_again_in_the_same_session(engine_root, registry, tmp_path,
                                                                      monkeypatch, ending) -> None:
    """A status report the manager does not answer within STATUS_TIMEOUT (a busy leader) is sent
    again in the same session, whether the deadline ends the call on the agent's side
    (DEADLINE_EXCEEDED) or first on the manager's, which ends it CANCELLED (seen by the thousand
    at 2,000 nodes: each ended a session before). One refused UNAVAILABLE (the store did not confirm
    the write, or the manager's copy of it lagged behind the commit) is sent again too, after a pause."""
    monkeypatch.setattr(agent_mod, "STATUS_TIMEOUT", 1.0)
    refused = [0]
    update = Dispatcher.UpdateTaskStatus

    async def out_of_time(self, request, context):  # noqa: ANN001, ANN202
        if refused[0] < 2 and any(u.status.state == types_pb2.RUNNING for u in request.updates):
            refused[0] += 1
            if ending == "cancelled":
                await context.abort(grpc.StatusCode.CANCELLED, "CANCELLED")
            if ending == "unavailable":
                await context.abort(grpc.StatusCode.UNAVAILABLE, "task status not saved: this manager's copy "
                                    "of the store did not reach revision 7 in time (it holds 6); retry")
            await asyncio.sleep(5)
        return await update(self, request, context)

    monkeypatch.setattr(Dispatcher, "UpdateTaskStatus", out_of_time)

    async def main() -> None:
        async with manager_side() as (st, _disp, _broker, addr):
            await add_node(st, "n1", hostname="node-1")
            async with agent_in_session(addr, engine_root, registry, tmp_path) as (agent, _engine):
                first = agent.session_id
                svc = objects_pb2.Service(
                    id="svc-id", spec=specs_pb2.ServiceSpec(annotations=types_pb2.Annotations(name="svc"))
                )
                t = make_task("n1", "sleep", "600")
                await st.update(lambda tx: [tx.create(svc), tx.create(t)])
                await wait_for(lambda: task_state(st, t.id) == types_pb2.RUNNING, what="RUNNING in the store",
                               timeout=60)
                assert refused[0] == 2 and agent.session_id == first

    run(main())
