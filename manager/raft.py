"""The Raft-replicated store: `RaftStore`, a `Store` whose writes go through pysyncobj.

Every write is one serialized `StoreTransaction` (protobuf bytes), the only argument of the one
replicated method `_RaftNode.apply_txn`. Each replica applies it to its own `StateMachine`, which
checks every precondition itself (versions, unique names), so all replicas agree; the result -- the
new store version or the refusal -- goes back to the proposer only (results never cross the wire).
Exceptions never escape `apply_txn`: a refusal comes back as `(code, message)` and the proposer
raises the matching `StoreError`.

pysyncobj runs in its own thread (autoTick). `propose` bridges its callback to asyncio with
`loop.call_soon_threadsafe`, and refuses writes with `Unavailable` within `propose_timeout` (4 s)
when there is no leader or no quorum -- it never hangs. Followers answer reads from their replica;
their writes are forwarded to the leader by pysyncobj and complete once applied locally.

On disk, in `<state_dir>/raft/`: `journal.bin` (pysyncobj's journal: every entry as soon as it is
received, plus current term, vote and commit index), `snapshot.pb` (a `RaftSnapshot` protobuf made by
our serializer hook at log compaction -- nothing of our state is pickled) and `members.json` (the
member addresses last seen, used as the peer list when the manager restarts). The Raft TCP port is
encrypted and authenticated with the cluster's raft key (pysyncobj `password`, Fernet), so only
holders of the key -- managers -- can talk to it. pysyncobj still pickles its own envelopes (a
method number and our bytes) inside those encrypted messages.
"""

from __future__ import annotations

import _socket
import asyncio
import json
import logging
import os
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from pysyncobj import FAIL_REASON, SyncObj, SyncObjConf, replicated

from shoal.manager.store import (
    AlreadyExists,
    Conflict,
    InvalidArgument,
    NotFound,
    StateMachine,
    Store,
    StoreError,
    Unavailable,
)
from shoal.proto import store_pb2

# pysyncobj.win_inet_pton replaces socket.inet_ntop with a Windows-only version on every OS, which
# breaks everyone else in the process that formats addresses (pyroute2's netlink decoding): undo it.
socket.inet_ntop = _socket.inet_ntop

log = logging.getLogger(__name__)

_ERRORS: dict[str, type[StoreError]] = {
    cls.__name__: cls for cls in (StoreError, NotFound, AlreadyExists, Conflict, InvalidArgument, Unavailable)
}
_FAIL_NAMES = {v: k for k, v in vars(FAIL_REASON).items() if not k.startswith("_")}


@dataclass(frozen=True)
class RaftConfig:
    """Timing of the Raft node. Defaults: commit p50 of a few ms, a dead leader replaced in < 1 s.

    `append_entries_period` is the heartbeat; new entries are sent at once (no batching: the pipe
    notifier wakes the Raft thread), so the heartbeat only bounds failure detection and idle CPU.
    Election timeouts must stay > 3x the heartbeat (pysyncobj checks)."""

    append_entries_period: float = 0.02
    # Elections: a dead leader is replaced in ~0.3-0.9 s; not lower, so that a busy 2-core machine
    # (the GIL, other daemons) does not cause spurious elections.
    min_timeout: float = 0.3
    max_timeout: float = 0.6
    leader_fallback_timeout: float = 1.5  # a leader without a majority steps down after this
    connection_timeout: float = 1.5
    connection_retry: float = 0.1
    propose_timeout: float = 4.0  # writes fail with Unavailable after this (< 5 s)
    compaction_min_entries: int = 5000
    compaction_min_time: float = 300.0


@dataclass(frozen=True)
class RaftMemberStatus:
    addr: str  # raft address host:port
    leader: bool
    reachable: bool  # connected to this member (self: always True)
    is_self: bool


@dataclass(frozen=True)
class RaftStatus:
    """A consistent picture of the Raft node, taken in its own thread on every tick."""

    self_addr: str
    leader_addr: str | None
    is_leader: bool
    term: int
    commit_index: int
    last_applied: int
    members: tuple[RaftMemberStatus, ...] = ()
    ready: bool = False  # caught up with the leader's commit index once since start

    @property
    def reachable(self) -> int:
        return sum(1 for m in self.members if m.reachable)

    @property
    def total(self) -> int:
        return len(self.members)

    @property
    def has_quorum(self) -> bool:
        """A write can commit: we lead a majority, or we follow a leader we are connected to."""
        if self.is_leader:
            return self.reachable * 2 > self.total
        if self.leader_addr is None:
            return False
        return any(m.addr == self.leader_addr and m.reachable for m in self.members)


class _RaftNode(SyncObj):
    def __init__(self, owner: RaftStore, self_addr: str, peers: list[str], conf: SyncObjConf) -> None:
        self._owner = owner
        super().__init__(self_addr, peers, conf)

    @replicated
    def apply_txn(self, data: bytes) -> int | tuple[str, str]:
        return self._owner._apply(data)


def _entry_pb(entry: tuple[bytes, int, int]) -> store_pb2.RaftLogEntry:
    return store_pb2.RaftLogEntry(command=bytes(entry[0]), index=entry[1], term=entry[2])


def _entry_tuple(e: store_pb2.RaftLogEntry) -> tuple[bytes, int, int]:
    return (e.command, e.index, e.term)


class RaftStore(Store):
    """A `Store` replicated with Raft among the managers.

    `self_addr` is this manager's Raft address (host:port, as the others reach it); `peers` the
    other members' addresses (ignored when `members.json` in the state dir knows better, i.e. on a
    restart); `password` the cluster's raft key. A new cluster starts with no peers; a joining
    manager starts with the members the CA handed it, after the leader added it."""

    def __init__(
        self,
        state_dir: str | os.PathLike[str],
        self_addr: str,
        peers: Iterable[str],
        password: bytes | str,
        *,
        bind_addr: str | None = None,
        config: RaftConfig | None = None,
        sm: StateMachine | None = None,
    ) -> None:
        super().__init__(sm)
        self.config = config or RaftConfig()
        self.self_addr = self_addr
        self.dir = Path(state_dir) / "raft"
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._members_file = self.dir / "members.json"
        saved = self._load_members()
        peer_list = sorted({p for p in (saved if saved is not None else peers) if p and p != self_addr})
        self._status = RaftStatus(self_addr, None, False, 0, 0, 0)
        self._status_lock = threading.Lock()
        self._subscribers: list[tuple[asyncio.AbstractEventLoop, asyncio.Queue[RaftStatus]]] = []
        self._closed = False
        self._last_members: tuple[str, ...] | None = None
        c = self.config
        conf = SyncObjConf(
            password=password,
            autoTick=True,
            autoTickPeriod=c.append_entries_period,
            appendEntriesPeriod=c.append_entries_period,
            appendEntriesUseBatch=False,
            raftMinTimeout=c.min_timeout,
            raftMaxTimeout=c.max_timeout,
            leaderFallbackTimeout=c.leader_fallback_timeout,
            connectionTimeout=max(c.connection_timeout, c.max_timeout),
            connectionRetryTime=c.connection_retry,
            commandsWaitLeader=False,
            dynamicMembershipChange=True,
            journalFile=str(self.dir / "journal.bin"),
            fullDumpFile=str(self.dir / "snapshot.pb"),
            serializer=self._serialize,
            deserializer=self._deserialize,
            logCompactionMinEntries=c.compaction_min_entries,
            logCompactionMinTime=c.compaction_min_time,
            bindAddress=bind_addr or self_addr,  # not pysyncobj's default 0.0.0.0
            tcp_keepalive=(1, 1, 3),
            onReady=self._on_ready,
        )
        self._ready = False
        log.info("raft %s: starting with peers %s in %s", self_addr, ",".join(peer_list) or "-", self.dir)
        # pysyncobj's tick thread stops when the creating thread ends: create it in a long-lived
        # thread (the asyncio main thread).
        self._node = _RaftNode(self, self_addr, peer_list, conf)
        self._node.addOnTickCallback(self._on_tick)

    # ---- replicated state machine (Raft thread) ---------------------------------------------
    def _apply(self, data: bytes) -> int | tuple[str, str]:
        if not data:  # barrier: everything before it is applied
            return self.sm.version
        try:
            txn = store_pb2.StoreTransaction.FromString(data)
            return self.sm.apply(txn)
        except StoreError as e:
            return (type(e).__name__, str(e))
        except Exception as e:  # a bug, or bytes that do not parse: the same on every replica
            log.exception("raft %s: transaction failed to apply", self.self_addr)
            return ("StoreError", f"transaction could not be applied: {e}")

    def _serialize(self, filename: str, data: tuple) -> None:
        last, prev, cluster = data
        snap = store_pb2.RaftSnapshot(
            store=self.sm.snapshot(),
            last_applied=_entry_pb(last),
            previous=_entry_pb(prev),
            members=sorted(n.address for n in cluster),
        )
        with open(filename, "wb") as f:
            f.write(snap.SerializeToString())
            f.flush()
            os.fsync(f.fileno())
        log.info(
            "raft %s: snapshot at index %d, store version %d", self.self_addr, last[1], snap.store.version
        )

    def _deserialize(self, filename: str) -> tuple:
        with open(filename, "rb") as f:
            snap = store_pb2.RaftSnapshot.FromString(f.read())
        self.sm.restore(snap.store)
        log.info(
            "raft %s: restored snapshot at index %d, store version %d",
            self.self_addr,
            snap.last_applied.index,
            snap.store.version,
        )
        return (_entry_tuple(snap.last_applied), _entry_tuple(snap.previous), list(snap.members))

    def _on_ready(self) -> None:
        self._ready = True

    def _on_tick(self) -> None:
        node = self._node
        leader = node._getLeader()
        leader_addr = leader.address if leader is not None else None
        is_leader = node._isLeader()
        others = node.otherNodes
        members = [RaftMemberStatus(self.self_addr, is_leader, True, True)]
        for n in sorted(others, key=lambda n: n.address):
            members.append(RaftMemberStatus(n.address, n.address == leader_addr, node.isNodeConnected(n), False))
        st = RaftStatus(
            self.self_addr,
            leader_addr,
            is_leader,
            node.raftCurrentTerm,
            node.raftCommitIndex,
            node.raftLastApplied,
            tuple(members),
            self._ready,
        )
        with self._status_lock:
            old = self._status
            self._status = st
        addrs = tuple(m.addr for m in members)
        if addrs != self._last_members:
            self._last_members = addrs
            self._save_members(addrs)
        if (old.leader_addr, old.is_leader, old.members, old.ready) != (
            st.leader_addr,
            st.is_leader,
            st.members,
            st.ready,
        ):
            if old.leader_addr != st.leader_addr or old.is_leader != st.is_leader:
                log.info(
                    "raft %s: leader is now %s (term %d)%s",
                    self.self_addr,
                    st.leader_addr or "unknown",
                    st.term,
                    " -- this manager" if st.is_leader else "",
                )
            for loop, q in list(self._subscribers):
                try:
                    loop.call_soon_threadsafe(q.put_nowait, st)
                except RuntimeError:
                    pass

    def _load_members(self) -> list[str] | None:
        try:
            return list(json.loads(self._members_file.read_text()))
        except (OSError, ValueError):
            return None

    def _save_members(self, addrs: tuple[str, ...]) -> None:
        tmp = self._members_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(sorted(addrs)))
        os.replace(tmp, self._members_file)

    # ---- status ------------------------------------------------------------------------------
    def status(self) -> RaftStatus:
        with self._status_lock:
            return self._status

    def is_leader(self) -> bool:
        return self.status().is_leader

    def leader_addr(self) -> str | None:
        return self.status().leader_addr

    def members(self) -> tuple[RaftMemberStatus, ...]:
        return self.status().members

    def subscribe(self) -> asyncio.Queue[RaftStatus]:
        """A queue receiving a `RaftStatus` whenever the leader, a member or reachability changes.

        Call from the event loop that will read it; `unsubscribe` when done."""
        q: asyncio.Queue[RaftStatus] = asyncio.Queue()
        self._subscribers.append((asyncio.get_running_loop(), q))
        q.put_nowait(self.status())
        return q

    def unsubscribe(self, q: asyncio.Queue[RaftStatus]) -> None:
        self._subscribers = [(lp, x) for lp, x in self._subscribers if x is not q]

    def no_quorum_error(self, st: RaftStatus | None = None) -> Unavailable:
        st = st or self.status()
        return Unavailable(
            f"no quorum: {st.reachable} of {st.total} managers reachable; "
            "writes are refused until a majority is back"
        )

    async def wait_leader(self, timeout: float | None = None) -> RaftStatus:
        """Wait until a leader with a reachable majority is known (Unavailable after `timeout`)."""
        now = time.monotonic()
        deadline = now + (self.config.propose_timeout if timeout is None else timeout)
        # Not even connected to a majority: give reconnections and an election a moment, then fail
        # without waiting for the whole timeout.
        minority_grace = max(1.5, 3 * self.config.max_timeout)
        minority_since: float | None = None
        while True:
            st = self.status()
            if st.has_quorum:
                return st
            now = time.monotonic()
            if st.reachable * 2 <= st.total:
                minority_since = minority_since or now
            else:
                minority_since = None
            if now >= deadline or self._closed or (minority_since and now - minority_since >= minority_grace):
                raise self.no_quorum_error(st)
            await asyncio.sleep(0.01)

    # ---- writes ------------------------------------------------------------------------------
    async def _submit(self, start: Callable[[Callable[[object, int], None]], None], what: str) -> object:
        if self._closed:
            raise Unavailable("this manager is shutting down; retry on another manager")
        deadline = time.monotonic() + self.config.propose_timeout
        await self.wait_leader(self.config.propose_timeout)
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[tuple[object, int]] = loop.create_future()

        def done(res: object, err: int) -> None:
            def resolve() -> None:
                if not fut.done():
                    fut.set_result((res, err))

            try:
                loop.call_soon_threadsafe(resolve)
            except RuntimeError:  # loop closed
                pass

        start(done)
        try:
            # asyncio.timeout, not wait_for: 3.11's wait_for can swallow a cancellation that arrives
            # as the write completes, and a leader loop must stop when it is cancelled.
            async with asyncio.timeout(max(0.05, deadline - time.monotonic())):
                res, err = await fut
        except TimeoutError:
            st = self.status()
            if not st.has_quorum:
                raise self.no_quorum_error(st) from None
            raise Unavailable(
                f"{what} was not committed within {self.config.propose_timeout:.0f} s "
                "(leader busy or changing); read the object again and retry"
            ) from None
        if err != FAIL_REASON.SUCCESS:
            st = self.status()
            if err in (FAIL_REASON.MISSING_LEADER, FAIL_REASON.QUEUE_FULL) and not st.has_quorum:
                raise self.no_quorum_error(st)
            if err in (FAIL_REASON.MISSING_LEADER, FAIL_REASON.QUEUE_FULL, FAIL_REASON.REQUEST_DENIED):
                raise Unavailable(f"{what} refused by Raft ({_FAIL_NAMES.get(err, err)}); retry")
            raise Unavailable(
                f"{what} outcome unknown: the Raft leader changed while it was in flight "
                f"({_FAIL_NAMES.get(err, err)}); read the object again and retry"
            )
        return res

    async def propose(self, txn: store_pb2.StoreTransaction) -> int:
        data = txn.SerializeToString()
        if not data:
            raise InvalidArgument("empty transaction: nothing to write")
        res = await self._submit(lambda cb: self._node.apply_txn(data, callback=cb), "write")
        if isinstance(res, tuple):
            name, msg = res
            raise _ERRORS.get(name, StoreError)(msg)
        assert isinstance(res, int)
        return res

    async def barrier(self) -> int:
        """Commit an empty entry and wait for it: afterwards this replica has applied everything
        committed before (a new leader calls this before its control loops read the store)."""
        res = await self._submit(lambda cb: self._node.apply_txn(b"", callback=cb), "barrier")
        assert isinstance(res, int)
        return res

    # ---- membership --------------------------------------------------------------------------
    async def add_member(self, addr: str, attempts: int = 50) -> None:
        """Add a manager's Raft address to the cluster (idempotent)."""
        await self._change_member("add", addr, attempts)

    async def remove_member(self, addr: str, attempts: int = 50) -> None:
        """Remove a manager's Raft address from the cluster (idempotent)."""
        await self._change_member("remove", addr, attempts)

    async def _change_member(self, op: str, addr: str, attempts: int) -> None:
        def present() -> bool:
            return (op == "add") == (addr in {m.addr for m in self.members()})

        for i in range(attempts):
            if present():
                return
            fn = self._node.addNodeToCluster if op == "add" else self._node.removeNodeFromCluster
            task = asyncio.ensure_future(self._submit(lambda cb, fn=fn: fn(addr, callback=cb), f"raft {op} {addr}"))
            # The change takes effect when appended; its commit may need the new member itself
            # (1 -> 2 members), so return as soon as our view shows it.
            while not task.done() and not present():
                await asyncio.sleep(0.005)
            if present():
                task.add_done_callback(lambda t: t.cancelled() or t.exception())
                log.info("raft %s: member %s %s", self.self_addr, addr, "added" if op == "add" else "removed")
                return
            try:
                task.result()
            except Unavailable as e:
                # REQUEST_DENIED: another change or the new leader's no-op is not committed yet.
                if i == attempts - 1:
                    raise
                log.debug("raft %s: %s %s retry: %s", self.self_addr, op, addr, e)
                await asyncio.sleep(0.1)
        if not present():
            raise Unavailable(f"raft {op} {addr} did not take effect; retry")

    async def transfer_leadership(self, timeout: float = 3.0) -> bool:
        """Hand leadership to the most caught-up follower (before this leader leaves or is demoted)."""
        st = self.status()
        if not st.is_leader:
            return True
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[int] = loop.create_future()

        def done(_res: object, err: int) -> None:
            loop.call_soon_threadsafe(lambda: fut.done() or fut.set_result(err))

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self._node.transferLeadership(callback=done)
            try:
                async with asyncio.timeout(0.5):
                    await asyncio.shield(fut)
            except TimeoutError:
                pass
            for _ in range(50):
                if not self.is_leader():
                    return True
                await asyncio.sleep(0.01)
            fut = loop.create_future()
        return not self.is_leader()

    def compact(self) -> None:
        """Write a snapshot and truncate the journal at the next tick."""
        self._node.forceLogCompaction()

    # ---- lifecycle ---------------------------------------------------------------------------
    def close(self) -> None:
        """Stop the Raft thread and close the journal (blocks until the thread has ended)."""
        if self._closed:
            return
        self._closed = True
        log.info("raft %s: closing", self.self_addr)
        try:
            self._node.destroy_synchronous()
        except Exception:  # already gone
            log.exception("raft %s: close failed", self.self_addr)

    @property
    def closed(self) -> bool:
        return self._closed


# ---- a stand-alone Raft store process (tests and bench/store.py drive it over stdin/stdout) ------
async def _serve_lines(store: RaftStore) -> None:
    """One command per stdin line, one JSON answer per stdout line. Commands:

    status | wait-leader | barrier | compact | add ADDR | remove ADDR | transfer
    create NAME (a secret) | read NAME (its version or 0) | update NAME VERSION | count | names
    batch N PREFIX (N tasks in transactions of 2000) | time-writes N PREFIX (latencies in s)
    first-write PREFIX (retry until a write is accepted; answers time.monotonic() then)"""
    from shoal.proto import objects_pb2, specs_pb2, types_pb2

    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), os.fdopen(0, "rb", 0))

    def secret(name: str) -> objects_pb2.Secret:
        return objects_pb2.Secret(spec=specs_pb2.SecretSpec(annotations=types_pb2.Annotations(name=name), data=b"x"))

    while True:
        line = await reader.readline()
        if not line:
            return
        words = line.decode().split()
        if not words:
            continue
        cmd, args = words[0], words[1:]
        out: object
        try:
            if cmd == "status":
                st = store.status()
                out = {
                    "self": st.self_addr,
                    "leader": st.leader_addr,
                    "is_leader": st.is_leader,
                    "term": st.term,
                    "has_quorum": st.has_quorum,
                    "members": {m.addr: m.reachable for m in st.members},
                    "version": store.sm.version,
                    "ready": st.ready,
                }
            elif cmd == "wait-leader":
                out = (await store.wait_leader(float(args[0]) if args else None)).leader_addr
            elif cmd == "barrier":
                out = await store.barrier()
            elif cmd == "compact":
                store.compact()
                out = True
            elif cmd == "add":
                await store.add_member(args[0])
                out = True
            elif cmd == "remove":
                await store.remove_member(args[0])
                out = True
            elif cmd == "transfer":
                out = await store.transfer_leadership()
            elif cmd == "create":
                out = await store.propose(Tx_create(store, secret(args[0])))
            elif cmd == "read":
                obj = store.sm.get_by_name("secret", args[0])
                out = obj.meta.version if obj is not None else 0
            elif cmd == "update":
                obj = store.sm.get_by_name("secret", args[0])
                new = objects_pb2.Secret()
                new.CopyFrom(obj)
                new.meta.version = int(args[1])
                new.spec.data = b"y"
                out = await store.update(lambda tx, new=new: tx.update(new) and store.sm.version)
            elif cmd == "count":
                out = len(store.sm.list("secret"))
            elif cmd == "names":
                out = sorted(s.spec.annotations.name for s in store.sm.list("secret"))
            elif cmd == "batch":
                n, prefix = int(args[0]), args[1]
                actions = []
                for i in range(n):
                    t = objects_pb2.Task(
                        id=f"{prefix}{i}",
                        service_id="svc",
                        slot=i + 1,
                        desired_state=types_pb2.RUNNING,
                        annotations=types_pb2.Annotations(name=f"svc.{i + 1}.{prefix}{i}"),
                    )
                    a = store_pb2.StoreAction(kind=store_pb2.StoreAction.CREATE)
                    a.object.task.CopyFrom(t)
                    actions.append(a)
                t0 = time.perf_counter()
                await store.batch(actions)
                out = time.perf_counter() - t0
            elif cmd == "time-writes":
                n, prefix = int(args[0]), args[1]
                lat = []
                for i in range(n):
                    t0 = time.perf_counter()
                    await store.propose(Tx_create(store, secret(f"{prefix}{i}")))
                    lat.append(time.perf_counter() - t0)
                out = lat
            elif cmd == "first-write":  # retry until a write is accepted; answer its monotonic time
                prefix, i = args[0], 0
                while True:
                    i += 1
                    try:
                        await store.propose(Tx_create(store, secret(f"{prefix}{i}")))
                        out = time.monotonic()
                        break
                    except Unavailable:
                        await asyncio.sleep(0.001)
            else:
                raise InvalidArgument(f"unknown command {cmd!r}")
            answer = {"ok": out}
        except StoreError as e:
            answer = {"error": type(e).__name__, "message": str(e)}
        sys.stdout.write(json.dumps(answer) + "\n")
        sys.stdout.flush()


def Tx_create(store: RaftStore, obj: object) -> store_pb2.StoreTransaction:  # noqa: N802
    from shoal.manager.store import Tx

    tx = Tx(store.sm)
    tx.create(obj)  # type: ignore[arg-type]
    return tx.transaction()


def main(argv: list[str] | None = None) -> None:
    import argparse

    p = argparse.ArgumentParser(description="Run one Raft store member, driven by commands on stdin.")
    p.add_argument("--dir", required=True)
    p.add_argument("--addr", required=True, help="raft address host:port")
    p.add_argument("--peers", default="", help="comma-separated raft addresses of the other members")
    p.add_argument("--key", default="shoal-test-key")
    p.add_argument("--compaction-min-entries", type=int, default=RaftConfig.compaction_min_entries)
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s %(message)s")

    async def run() -> None:
        store = RaftStore(
            a.dir,
            a.addr,
            [x for x in a.peers.split(",") if x],
            a.key,
            config=RaftConfig(compaction_min_entries=a.compaction_min_entries),
        )
        try:
            await _serve_lines(store)
        finally:
            store.close()

    asyncio.run(run())


if __name__ == "__main__":
    main()
