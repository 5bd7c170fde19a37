"""The cluster store on etcd: `EtcdStore`, a `Store` whose writes are etcd transactions.

Keys (all under `/shoal/`):

- `o/<kind>/<id>`   one object: its protobuf bytes, sealed by the store's `ValueCodec`. The stored
                    `meta.version` is 0; readers set it to the key's mod_revision, so an object's
                    version is the etcd revision that last wrote it;
- `n/<kind>/<name>` the id holding a unique name (services, networks, secrets, configs, cluster);
- `g/network`       a guard written by every network change: network checks span all networks
                    (VXLAN ids, subnets), so a network write compares the guard's revision;
- `e/leader`        the control-loop leader (see `Election`), held under a lease;
- `w/<token>`       a write marker: each transaction puts one, under a lease of about 2 minutes,
                    so that a transaction sent again (its first answer lost) is recognized as done.

Writes. `propose(txn)` first checks the transaction against the local cache (`StateMachine.check`:
stale version, duplicate name, missing object, overlapping subnet -- the same one-sentence errors
as ever), then sends one etcd Txn whose compares pin everything the check relied on: each written
object's mod_revision (0 for a create), each newly claimed name key's absence, the network guard,
and, for a fenced store (`fenced`), the leader key's create_revision. If a compare fails, the
cache is brought up to the revision the failure was seen at and the check runs again: it then
raises the precise error, or (the race touched nothing of ours) the Txn is sent again. A write
returns once the cache holds it, so a caller reads its own writes. A stale version -- an object
changed since it was read, or compares that kept failing -- raises `StaleVersion`, exactly as the
local store does, so `Store.update(fn, retries=N)` builds such a transaction again.

Reads come from the cache, a `StateMachine` fed by one etcd watch on `/shoal/` that applies each
revision's events atomically, in revision order; its version (the etcd revision) never goes
backwards. A watch that breaks resumes from the next revision; if that revision was compacted the
cache lists everything at the current revision and applies the difference as events.

Failures. Every etcd call has a deadline (`write_timeout`, 4 s): a write without a quorum fails
with `Unavailable` naming how many managers are reachable; a write whose outcome is unknown (the
deadline passed after it was sent) says so. A write etcd committed is answered once the cache
holds it, waited for up to `APPLY_PATIENCE` (30 s) however much of the deadline is left. Within
the deadline, a Txn left unanswered for a second
(a proposal lost with a killed leader) or refused as unavailable is sent again, exactly once in
effect: every copy carries the same write marker and compares that it is absent, so a copy after
one that landed fails, finds the marker and returns the revision the first one landed at. Before
a write with an unanswered attempt answers anything else, it claims the marker itself, so that no
copy still in flight can land after the answer. Reads keep answering from the cache.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any, Protocol

import grpc

from shoal.manager import metrics
from shoal.manager.store import (
    KINDS,
    UNIQUE_NAMES,
    InvalidArgument,
    StaleVersion,
    StateMachine,
    Store,
    StoreError,
    Unavailable,
    name_of,
    unwrap,
)
from shoal.proto import etcd_pb2, etcd_pb2_grpc, objects_pb2, store_pb2

log = logging.getLogger(__name__)

PREFIX = b"/shoal/"
OBJ = PREFIX + b"o/"
NAME = PREFIX + b"n/"
GUARD = PREFIX + b"g/"
LEADER_KEY = PREFIX + b"e/leader"
NETWORK_GUARD = GUARD + b"network"
WRITE = PREFIX + b"w/"  # write markers: one per proposed transaction, on a short lease
MARKER_TTL = 120  # seconds a write marker lives (a lease is used for new markers for half of that)

_OBJECT_TYPES = {kind: type(getattr(objects_pb2.StoreObject(), kind)) for kind in KINDS}

# A transaction stays well inside etcd's limits (--max-txn-ops 4096, --max-request-bytes 4 MiB):
# an object action is at most 3 operations and 3 compares.
MAX_TXN_ACTIONS = 1000
MAX_TXN_BYTES = 3 * 1024 * 1024
# After this many failed compares in a row a write gives up with a StaleVersion (what it read kept changing).
MAX_TXN_CONFLICTS = 8
KEPT_CHANGING = "the objects of this write kept changing while it was retried; read them again and retry"

CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
    ("grpc.max_send_message_length", 8 * 1024 * 1024),
    ("grpc.keepalive_time_ms", 2000),
    ("grpc.keepalive_timeout_ms", 2000),
    ("grpc.keepalive_permit_without_calls", 1),
    # The member is local: once it is back (restarted by its supervisor), reconnect within a second
    # rather than after gRPC's default backoff, which grows to minutes.
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
]


def prefix_end(prefix: bytes) -> bytes:
    """The range end covering every key that starts with `prefix` (etcd's convention)."""
    b = bytearray(prefix)
    for i in range(len(b) - 1, -1, -1):
        if b[i] < 0xFF:
            b[i] += 1
            return bytes(b[: i + 1])
    return b"\0"


def object_key(kind: str, oid: str) -> bytes:
    return OBJ + kind.encode() + b"/" + oid.encode()


def name_key(kind: str, name: str) -> bytes:
    return NAME + kind.encode() + b"/" + name.encode()


class ValueCodec(Protocol):
    """Seals values on their way into etcd and opens them on the way out. `key` is the etcd key,
    bound to the value (an implementation that encrypts uses it as associated data)."""

    def seal(self, key: bytes, data: bytes) -> bytes: ...

    def open(self, key: bytes, data: bytes) -> bytes: ...


class PlainCodec:
    """Values as they are (tests of the store alone)."""

    def seal(self, key: bytes, data: bytes) -> bytes:
        return data

    def open(self, key: bytes, data: bytes) -> bytes:
        return data


class FenceLost(Unavailable):
    """A fenced write refused because its writer no longer holds the leader lease."""


@dataclass(frozen=True)
class Fence:
    """A leader's claim: the create_revision of the leader key it wrote."""

    revision: int


def _compare(key: bytes, *, mod: int | None = None, create: int | None = None, value: bytes | None = None,
             result: int = etcd_pb2.Compare.EQUAL) -> etcd_pb2.Compare:
    c = etcd_pb2.Compare(key=key, result=result)
    if mod is not None:
        c.target = etcd_pb2.Compare.MOD
        c.mod_revision = mod
    elif create is not None:
        c.target = etcd_pb2.Compare.CREATE
        c.create_revision = create
    else:
        c.target = etcd_pb2.Compare.VALUE
        c.value = value or b""
    return c


def _put(key: bytes, value: bytes, lease: int = 0) -> etcd_pb2.RequestOp:
    return etcd_pb2.RequestOp(request_put=etcd_pb2.PutRequest(key=key, value=value, lease=lease))


def _delete(key: bytes) -> etcd_pb2.RequestOp:
    return etcd_pb2.RequestOp(request_delete_range=etcd_pb2.DeleteRangeRequest(key=key))


def _timed_out(e: grpc.aio.AioRpcError) -> bool:
    """Our deadline passed, as gRPC says it or as etcd does when it ran out first (UNKNOWN)."""
    return e.code() == grpc.StatusCode.DEADLINE_EXCEEDED or (
        e.code() == grpc.StatusCode.UNKNOWN and "context deadline exceeded" in (e.details() or ""))


def rpc_unavailable(e: grpc.aio.AioRpcError, what: str) -> Unavailable:
    """A gRPC failure of an etcd call as the store's Unavailable, in one sentence."""
    code = e.code()
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return Unavailable(f"{what}: etcd did not answer in time")
    return Unavailable(f"{what}: etcd answered {code.name}: {e.details()}")


class EtcdStore(Store):
    """A `Store` on an etcd cluster reached at `target` (this manager's own member's unix socket).

    `quorum_message`, if given, is awaited to explain a write that timed out (how many managers
    are reachable); the manager supplies it from its member's view of the cluster."""

    # One Txn attempt: unanswered after this long, it is sent again (see `propose`).
    ATTEMPT_TIMEOUT = 0.5
    # A write etcd committed is answered once this manager's cache holds it, waited for this long
    # (beyond `write_timeout`: a leader busy applying a large convergence's commits lags seconds
    # behind its own writes, and failing a write that is done made its writers do it again: the
    # allocator 4,000 writes one by one, a join a second node, a reconcile more tasks).
    APPLY_PATIENCE = 30.0

    def __init__(
        self,
        target: str,
        *,
        codec: ValueCodec | None = None,
        write_timeout: float = 4.0,
        sm: StateMachine | None = None,
        quorum_message: Callable[[], Awaitable[str | None]] | None = None,
    ) -> None:
        super().__init__(sm)
        self.target = target
        self.codec: ValueCodec = codec or PlainCodec()
        self.write_timeout = write_timeout
        self.quorum_message = quorum_message
        self._channel: grpc.aio.Channel | None = None
        self.kv: etcd_pb2_grpc.KVStub
        self.lease: etcd_pb2_grpc.LeaseStub
        self.cluster_api: etcd_pb2_grpc.ClusterStub
        self.maintenance: etcd_pb2_grpc.MaintenanceStub
        self._watch_task: asyncio.Task[None] | None = None
        self._waiters: list[tuple[int, asyncio.Future[None]]] = []
        self._guards: dict[bytes, int] = {}  # guard key -> mod_revision, as of the cache's version
        self.leader_key: etcd_pb2.KeyValue | None = None  # the control-loop leader key, as cached
        self._leader_subscribers: list[asyncio.Queue[etcd_pb2.KeyValue | None]] = []
        self._closed = False
        self._lease_id = 0  # for write markers (see `_marker_lease`)
        self._lease_until = 0.0
        self._watch_ok = asyncio.Event()

    # ---- lifecycle ---------------------------------------------------------------------------
    async def start(self, timeout: float = 30.0) -> None:
        """Connect, load everything under /shoal/ into the cache and start following the watch."""
        self._channel = grpc.aio.insecure_channel(self.target, options=CHANNEL_OPTIONS)
        self.kv = etcd_pb2_grpc.KVStub(self._channel)
        self.watch_api = etcd_pb2_grpc.WatchStub(self._channel)
        self.lease = etcd_pb2_grpc.LeaseStub(self._channel)
        self.cluster_api = etcd_pb2_grpc.ClusterStub(self._channel)
        self.maintenance = etcd_pb2_grpc.MaintenanceStub(self._channel)
        deadline = time.monotonic() + timeout
        while True:
            try:
                await self._relist()
                break
            except (grpc.aio.AioRpcError, Unavailable) as e:
                if time.monotonic() > deadline:
                    raise Unavailable(f"the store did not load within {timeout:.0f} s: {e}") from None
                await asyncio.sleep(0.2)
        self._watch_task = asyncio.create_task(self._follow(), name="etcd-watch")

    async def close(self) -> None:
        self._closed = True
        if self._watch_task is not None:
            self._watch_task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._watch_task
        for _, fut in self._waiters:
            if not fut.done():
                fut.set_exception(Unavailable("this manager is shutting down; retry on another manager"))
        self._waiters.clear()
        if self._channel is not None:
            await self._channel.close()

    @property
    def closed(self) -> bool:
        return self._closed

    # ---- the cache -----------------------------------------------------------------------------
    def _decode(self, kv: etcd_pb2.KeyValue) -> tuple[str, str, Any] | None:
        """(kind, id, object) of an object key; None for other keys."""
        if not kv.key.startswith(OBJ):
            return None
        kind, _, oid = kv.key[len(OBJ):].decode().partition("/")
        cls = _OBJECT_TYPES.get(kind)
        if cls is None:
            return None
        obj = cls.FromString(self.codec.open(kv.key, kv.value))
        obj.meta.version = kv.mod_revision
        return kind, oid, obj

    async def _range_all(self, revision: int = 0) -> tuple[int, list[etcd_pb2.KeyValue]]:
        """Every key under /shoal/ at one revision (the newest when 0), in pages."""
        out: list[etcd_pb2.KeyValue] = []
        key, end = PREFIX, prefix_end(PREFIX)
        while True:
            resp = await self.kv.Range(
                etcd_pb2.RangeRequest(key=key, range_end=end, limit=2000, revision=revision, serializable=True),
                timeout=self.write_timeout,
            )
            revision = revision or resp.header.revision
            out.extend(resp.kvs)
            if not resp.more or not resp.kvs:
                return revision, out
            key = resp.kvs[-1].key + b"\0"

    async def _relist(self) -> None:
        """Load the whole keyspace at its current revision; apply the difference to the cache."""
        revision, kvs = await self._range_all()
        seen: dict[tuple[str, str], Any] = {}
        guards: dict[bytes, int] = {}
        leader: etcd_pb2.KeyValue | None = None
        for kv in kvs:
            d = self._decode(kv)
            if d is not None:
                seen[(d[0], d[1])] = d[2]
            elif kv.key.startswith(GUARD):
                guards[kv.key] = kv.mod_revision
            elif kv.key == LEADER_KEY:
                leader = kv
        with self.sm.lock:
            changes: list[tuple[str, str, Any]] = []
            for (kind, oid), obj in seen.items():
                cur = self.sm.get(kind, oid)
                if cur is None or cur.meta.version != obj.meta.version:
                    changes.append((kind, oid, obj))
            for kind in KINDS:
                changes.extend((kind, oid, None) for oid in self.sm.tables[kind] if (kind, oid) not in seen)
            self._guards = guards
            self.sm.apply_committed(revision, changes)
        self._set_leader_key(leader)
        self._wake(revision)
        log.info("store: loaded %d objects at revision %d", len(seen), revision)

    def _apply_events(self, revision: int, events: Iterable[etcd_pb2.Event]) -> None:
        changes: list[tuple[str, str, Any]] = []
        leader_changed = False
        leader: etcd_pb2.KeyValue | None = self.leader_key
        for ev in events:
            kv = ev.kv
            if kv.key.startswith(OBJ):
                kind, _, oid = kv.key[len(OBJ):].decode().partition("/")
                if kind not in _OBJECT_TYPES:
                    continue
                if ev.type == etcd_pb2.Event.DELETE:
                    changes.append((kind, oid, None))
                else:
                    d = self._decode(kv)
                    assert d is not None
                    changes.append(d)
            elif kv.key.startswith(GUARD):
                if ev.type == etcd_pb2.Event.DELETE:
                    self._guards.pop(kv.key, None)
                else:
                    self._guards[kv.key] = kv.mod_revision
            elif kv.key == LEADER_KEY:
                leader_changed = True
                leader = None if ev.type == etcd_pb2.Event.DELETE else kv
        self.sm.apply_committed(revision, changes)
        if leader_changed:
            self._set_leader_key(leader)

    def _set_leader_key(self, kv: etcd_pb2.KeyValue | None) -> None:
        old = self.leader_key
        self.leader_key = kv
        if (old is None) != (kv is None) or (old is not None and kv is not None and old.create_revision != kv.create_revision):
            for q in list(self._leader_subscribers):
                q.put_nowait(kv)

    def subscribe_leader(self) -> asyncio.Queue[etcd_pb2.KeyValue | None]:
        """A queue that receives the leader key (None when there is none) whenever it changes."""
        q: asyncio.Queue[etcd_pb2.KeyValue | None] = asyncio.Queue()
        self._leader_subscribers.append(q)
        q.put_nowait(self.leader_key)
        return q

    def unsubscribe_leader(self, q: asyncio.Queue[Any]) -> None:
        if q in self._leader_subscribers:
            self._leader_subscribers.remove(q)

    def _wake(self, revision: int) -> None:
        keep = []
        for rev, fut in self._waiters:
            if rev <= revision:
                if not fut.done():
                    fut.set_result(None)
            else:
                keep.append((rev, fut))
        self._waiters = keep

    async def wait_for(self, revision: int, timeout: float | None = None) -> None:
        """Return once the cache holds revision `revision` (Unavailable after `timeout`)."""
        if self.sm.version >= revision:
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append((revision, fut))
        try:
            async with asyncio.timeout(self.write_timeout if timeout is None else timeout):
                await fut
        except TimeoutError:
            if self.sm.version >= revision:  # reached as the time ran out (a busy loop ran the timeout first)
                return
            raise Unavailable(
                f"this manager's copy of the store did not reach revision {revision} in time "
                f"(it holds {self.sm.version}); retry"
            ) from None

    async def _watch_stream(self, start: int) -> AsyncIterator[etcd_pb2.WatchResponse]:
        req = etcd_pb2.WatchRequest(
            create_request=etcd_pb2.WatchCreateRequest(
                key=PREFIX, range_end=prefix_end(PREFIX), start_revision=start
            )
        )

        async def requests() -> AsyncIterator[etcd_pb2.WatchRequest]:
            yield req
            await asyncio.Event().wait()  # keep the request side open

        call = self.watch_api.Watch(requests())
        try:
            async for resp in call:
                yield resp
        finally:
            call.cancel()

    async def _follow(self) -> None:
        """The one watch loop: apply each revision's events in order; resume or re-list on breaks."""
        backoff = 0.05
        while True:
            try:
                async for resp in self._watch_stream(self.sm.version + 1):
                    backoff = 0.05
                    if resp.canceled or resp.compact_revision:
                        log.warning(
                            "store: watch from revision %d lost (compacted at %d%s); re-listing",
                            self.sm.version + 1, resp.compact_revision,
                            f", {resp.cancel_reason}" if resp.cancel_reason else "",
                        )
                        await self._relist()
                        break
                    if resp.created:
                        self._watch_ok.set()
                        continue
                    group: list[etcd_pb2.Event] = []
                    rev = 0
                    for ev in resp.events:
                        if ev.kv.mod_revision != rev and group:
                            self._apply_events(rev, group)
                            group = []
                        rev = ev.kv.mod_revision
                        group.append(ev)
                    if group:
                        self._apply_events(rev, group)
                    # Progress notifications are ignored: every revision of this etcd is a write
                    # under /shoal/ and comes with its events, and etcd 3.4 before 3.4.25 may send
                    # a notification ahead of events still queued for the watch (etcd issue 15220).
                    self._wake(self.sm.version)
            except asyncio.CancelledError:
                raise
            except (grpc.aio.AioRpcError, Unavailable) as e:
                self._watch_ok.clear()
                log.info("store: watch broken at revision %d (%s); resuming in %.2f s", self.sm.version,
                         e.code().name if isinstance(e, grpc.aio.AioRpcError) else e, backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 1.0)

    # ---- writes --------------------------------------------------------------------------------
    def _txn_request(
        self, txn: store_pb2.StoreTransaction, fence: Fence | None, marker: bytes, lease: int
    ) -> etcd_pb2.TxnRequest:
        """The etcd Txn for a transaction the cache has just checked (see the module docstring);
        `marker` is its write marker key, put under `lease`. On a failed compare the Txn answers
        with the marker's and (fenced) the leader key's current state, in that order."""
        req = etcd_pb2.TxnRequest()
        ops: dict[bytes, etcd_pb2.RequestOp] = {}
        ts = txn.timestamp_unix_nano
        network = False
        for action in txn.actions:
            kind, src = unwrap(action.object)
            key = object_key(kind, src.id)
            old = self.sm.get(kind, src.id)
            if action.kind == store_pb2.StoreAction.DELETE:
                # Pin the version the check saw (the request's, or the cache's when the request
                # names none): the name key deleted with it is the one of that version.
                assert old is not None  # the check found it
                req.compare.append(_compare(key, mod=src.meta.version or old.meta.version))
                ops[key] = _delete(key)
                if kind in UNIQUE_NAMES and old is not None:
                    nk = name_key(kind, name_of(kind, old))
                    ops[nk] = _delete(nk)
            else:
                obj = type(src)()
                obj.CopyFrom(src)
                if action.kind == store_pb2.StoreAction.CREATE:
                    req.compare.append(_compare(key, mod=0))
                    if not src.meta.HasField("created_at"):  # a restored object keeps its own
                        obj.meta.created_at.FromNanoseconds(ts)
                else:
                    req.compare.append(_compare(key, mod=src.meta.version))
                    if old is not None:
                        obj.meta.created_at.CopyFrom(old.meta.created_at)
                obj.meta.updated_at.FromNanoseconds(ts)
                obj.meta.version = 0
                ops[key] = _put(key, self.codec.seal(key, obj.SerializeToString()))
                if kind in UNIQUE_NAMES:
                    name = name_of(kind, src)
                    if old is None or name_of(kind, old) != name:
                        nk = name_key(kind, name)
                        req.compare.append(_compare(nk, mod=0))
                        ops[nk] = _put(nk, src.id.encode())
                        if old is not None:
                            onk = name_key(kind, name_of(kind, old))
                            ops[onk] = _delete(onk)
            network = network or kind == "network"
        if network:
            req.compare.append(_compare(NETWORK_GUARD, mod=self._guards.get(NETWORK_GUARD, 0)))
            ops[NETWORK_GUARD] = _put(NETWORK_GUARD, b"")
        req.compare.append(_compare(marker, create=0))
        ops[marker] = _put(marker, b"", lease)
        req.failure.append(etcd_pb2.RequestOp(request_range=etcd_pb2.RangeRequest(key=marker)))
        if fence is not None:
            req.compare.append(_compare(LEADER_KEY, create=fence.revision))
            req.failure.append(etcd_pb2.RequestOp(request_range=etcd_pb2.RangeRequest(key=LEADER_KEY)))
        req.success.extend(ops.values())
        return req

    async def _marker_lease(self, timeout: float) -> int:
        """A lease for new write markers: granted for MARKER_TTL s, used for half of that."""
        now = time.monotonic()
        if self._lease_id and now < self._lease_until:
            return self._lease_id
        resp = await self.lease.LeaseGrant(etcd_pb2.LeaseGrantRequest(TTL=MARKER_TTL), timeout=timeout)
        self._lease_id, self._lease_until = resp.ID, now + MARKER_TTL / 2
        return resp.ID

    async def propose(self, txn: store_pb2.StoreTransaction, fence: Fence | None = None) -> int:
        """`_propose`, timed for `shoal_store_write_duration_seconds` when it commits."""
        t0 = time.monotonic()
        rev = await self._propose(txn, fence)
        metrics.observe_store_write(time.monotonic() - t0)
        return rev

    async def _propose(self, txn: store_pb2.StoreTransaction, fence: Fence | None = None) -> int:
        """Commit `txn` (all of it or nothing) and return its revision once the cache holds it.

        An attempt unanswered after `ATTEMPT_TIMEOUT` (a proposal forwarded to a leader that just
        died is lost without an answer), or refused as UNAVAILABLE (the member restarting, a leader
        election), is sent again until the write deadline. Every attempt carries the same write
        marker and compares that it is absent: an attempt after one that landed fails, sees the
        marker, and the write returns the revision it landed at -- it takes effect once."""
        if not txn.actions:
            raise InvalidArgument("empty transaction: nothing to write")
        if self._closed:
            raise Unavailable("this manager is shutting down; retry on another manager")
        deadline = time.monotonic() + self.write_timeout
        marker = WRITE + secrets.token_hex(12).encode()
        failure: grpc.aio.AioRpcError | None = None
        conflicts = 0
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            try:
                lease = await self._marker_lease(min(remaining, self.ATTEMPT_TIMEOUT))
                # The check and the compares that pin what it relied on (the network guard's revision
                # among them) come from the same state of the cache: no await between them. (With the
                # lease's grant between them, a network committed meanwhile reached the cache after
                # the check and its guard revision before the request: two overlapping subnets were
                # both accepted.)
                self.sm.check(txn)
                req = self._txn_request(txn, fence, marker, lease)
                resp = await self.kv.Txn(req, timeout=min(remaining, self.ATTEMPT_TIMEOUT))
            except grpc.aio.AioRpcError as e:
                if not _timed_out(e) and e.code() != grpc.StatusCode.UNAVAILABLE:
                    raise await self._write_failed(e) from None
                failure = e
                if e.code() == grpc.StatusCode.UNAVAILABLE:  # answered at once: do not spin
                    await asyncio.sleep(min(0.1, max(0.0, deadline - time.monotonic())))
                continue
            except StoreError:
                # After an unanswered attempt the check may see that attempt's own effect, or the
                # attempt may still be in flight: settle it before answering.
                if failure is not None:
                    rev = await self._settle(marker, deadline)
                    if rev:
                        return rev
                    if rev is None:
                        raise Unavailable("write outcome unknown: the store did not confirm it in time; "
                                          "read the object again and retry") from None
                raise
            if resp.succeeded:
                answered = time.monotonic()
                await self.wait_for(resp.header.revision, self.APPLY_PATIENCE)
                metrics.observe_store_watch(time.monotonic() - answered)
                return resp.header.revision
            landed = resp.responses[0].response_range.kvs if resp.responses else []
            if landed:  # an earlier attempt of this very write committed
                rev = landed[0].mod_revision
                await self.wait_for(rev, self.APPLY_PATIENCE)
                return rev
            if fence is not None:
                held = resp.responses[1].response_range.kvs if len(resp.responses) > 1 else []
                if not held or held[0].create_revision != fence.revision:
                    raise FenceLost(
                        "this manager no longer holds the leader lease; its control loops stop "
                        "and the new leader's take over"
                    )
            # Something we relied on changed: catch up to what the compare saw, then check again.
            conflicts += 1
            if conflicts >= MAX_TXN_CONFLICTS:
                raise StaleVersion(KEPT_CHANGING)
            await self.wait_for(resp.header.revision, max(0.5, deadline - time.monotonic()))
        if failure is not None:
            rev = await self._settle(marker, time.monotonic() + self.ATTEMPT_TIMEOUT)
            if rev:
                return rev
            raise await self._write_failed(failure) from None
        raise StaleVersion(KEPT_CHANGING)

    async def _settle(self, marker: bytes, deadline: float) -> int | None:
        """After an unanswered attempt: claim the write marker, so that no copy still in flight can
        ever land (they all compare it absent). The revision a copy landed at if one did; 0 when none
        did and none will; None when etcd did not answer (the outcome stays unknown)."""
        req = etcd_pb2.TxnRequest(
            compare=[_compare(marker, create=0)],
            success=[_put(marker, b"void", self._lease_id)],
            failure=[etcd_pb2.RequestOp(request_range=etcd_pb2.RangeRequest(key=marker))],
        )
        try:
            resp = await self.kv.Txn(req, timeout=max(0.2, deadline - time.monotonic()))
        except grpc.aio.AioRpcError:
            return None
        if resp.succeeded:
            return 0
        kvs = resp.responses[0].response_range.kvs if resp.responses else []
        if not kvs or kvs[0].value == b"void":
            return 0
        with contextlib.suppress(Unavailable):
            await self.wait_for(kvs[0].mod_revision, max(0.5, deadline - time.monotonic()))
        return kvs[0].mod_revision

    async def _write_failed(self, e: grpc.aio.AioRpcError) -> Unavailable:
        if _timed_out(e) or e.code() == grpc.StatusCode.UNAVAILABLE:
            why = None
            if self.quorum_message is not None:
                with contextlib.suppress(Exception):
                    async with asyncio.timeout(1.0):
                        why = await self.quorum_message()
            if why:
                return Unavailable(why)
            return Unavailable(
                f"write outcome unknown: the store did not confirm it within {self.write_timeout:.0f} s "
                "(no quorum, or the leader is changing); read the object again and retry"
            )
        if "too many operations" in (e.details() or "") or "too large" in (e.details() or ""):
            return Unavailable(f"write too large for the store ({e.details()}); write fewer objects at once")
        return rpc_unavailable(e, "write failed")

    async def batch(
        self, actions: list[store_pb2.StoreAction], max_actions: int = MAX_TXN_ACTIONS, fence: Fence | None = None
    ) -> int:
        """Commit many independent actions in transactions within etcd's request limits."""
        version = self.sm.version
        chunk: list[store_pb2.StoreAction] = []
        size = 0
        for a in [*actions, None]:
            n = a.ByteSize() if a is not None else 0
            if chunk and (a is None or len(chunk) >= max_actions or size + n > MAX_TXN_BYTES):
                txn = store_pb2.StoreTransaction(actions=chunk, timestamp_unix_nano=time.time_ns())
                version = await self.propose(txn, fence)
                chunk, size = [], 0
            if a is not None:
                chunk.append(a)
                size += n
        return version

    async def read_barrier(self, timeout: float = 1.0) -> str | None:
        """A linearizable (quorum) read of one key gives the cluster's current revision; the cache
        then catches up to it. Without a quorum within `timeout` the reads go on from the cache."""
        try:
            resp = await self.kv.Range(etcd_pb2.RangeRequest(key=LEADER_KEY, count_only=True), timeout=timeout)
            await self.wait_for(resp.header.revision, timeout)
            return None
        except (grpc.aio.AioRpcError, Unavailable):
            return ("this manager cannot reach a quorum: the answer comes from its own copy of the store "
                    f"(revision {self.sm.version}), which may be stale")

    def is_leader(self) -> bool:
        """Whether this store's owner runs the control loops (set by the manager's election)."""
        return self.leading

    leading = False

    def fenced(self, fence: Fence) -> FencedStore:
        """A view of this store whose every write fails once `fence` no longer holds the lease."""
        return FencedStore(self, fence)


class FencedStore(Store):
    """The store as the leader loops see it: the same cache, writes fenced by the leader lease."""

    def __init__(self, base: EtcdStore, fence: Fence) -> None:
        super().__init__(base.sm)
        self.base = base
        self.fence = fence

    async def propose(self, txn: store_pb2.StoreTransaction) -> int:
        return await self.base.propose(txn, self.fence)

    async def batch(self, actions: list[store_pb2.StoreAction], max_actions: int = MAX_TXN_ACTIONS) -> int:
        return await self.base.batch(actions, max_actions, self.fence)

    def is_leader(self) -> bool:
        return self.base.is_leader()

    async def read_barrier(self, timeout: float = 1.0) -> str | None:
        return await self.base.read_barrier(timeout)


class Election:
    """Chooses the one manager that runs the control loops, through an etcd lease.

    `terms()` yields a `Fence` each time this manager takes the leader key (`/shoal/e/leader`,
    value: its node id, attached to a lease of `ttl` seconds that it keeps alive) and None when it
    loses it: the key went (lease expired, revoked, deleted) or the keep-alives stopped being
    answered for long enough that the lease may have expired on the server (`ttl` minus a margin).
    Writes made with the fence fail once the key is gone, whatever this manager believes, so a
    paused or partitioned old leader cannot commit after a new one has started. A leftover key of
    this same node (an earlier run) is deleted at once rather than waited out.

    The lease of a larger cluster is longer: one more second per LEASE_NODES nodes, up to
    MAX_LEASE_TTL s (a leader's event loop stalls for longer under the load of a large fleet, and a
    lost lease moves every agent session at once; a leader that died is replaced later instead). A
    leader whose cluster grew moves its key to a longer lease (same key, same create revision: the
    fence holds) every GROW_CHECK s at most."""

    MARGIN = 0.4
    LOOP_TICK = 0.25  # s: how often the event loop shows the keep-alive thread it is alive
    RENEW_ROUNDS = 8  # keep-alive requests a lease (see `_renew_from_thread`)
    MIN_RENEW_WAIT = 0.5  # s a keep-alive is waited for at least (the first, or once the lease may be gone)
    LEASE_NODES = 500
    MAX_LEASE_TTL = 10
    GROW_CHECK = 5.0

    def __init__(self, store: EtcdStore, node_id: str, ttl: int = 2) -> None:
        self.store = store
        self.node_id = node_id
        self.base_ttl = ttl
        self.ttl = ttl
        self.lease_id = 0
        self._renewed = 0.0
        self._pending = 0  # a longer lease granted that the key may be moving to (see `_grow_lease`)
        self._pending_renewed = 0.0
        self._pending_ttl = 0
        self._stand_back_until = 0.0  # after resign(): let another manager take the key first

    def _wanted_ttl(self) -> int:
        nodes = len(self.store.sm.tables["node"])
        return max(self.base_ttl, min(self.MAX_LEASE_TTL, self.base_ttl + nodes // self.LEASE_NODES))

    async def _grow_lease(self, fence: Fence) -> None:
        """Move the leader key to a longer lease if the cluster grew (see the class docstring).

        The new lease runs from its grant, and the keep-alive thread renews it from then on as
        `_pending`, beside the key's: the move's answer may come seconds after its commit (a loop
        stalled under a large fleet), and the key, on the new lease by then, expired with it (at
        2,000 nodes another manager took it 0.5 s after the move was logged). A move whose outcome
        is unknown (no answer) is settled by reading the key before anything else is moved."""
        if self._pending:
            moved = await self._holds(fence, self._pending)
            if moved is None:
                return  # still unknown: both leases stay renewed
            await self._settle(moved)
            return
        want = self._wanted_ttl()
        if want <= self.ttl:
            return
        sent = time.monotonic()
        try:
            new = (await self.store.lease.LeaseGrant(etcd_pb2.LeaseGrantRequest(TTL=want), timeout=2.0)).ID
        except grpc.aio.AioRpcError as e:
            log.info("election: leader lease not lengthened (%s); retrying later", e.code().name)
            return
        self._pending, self._pending_renewed, self._pending_ttl = new, sent, want
        req = etcd_pb2.TxnRequest(compare=[_compare(LEADER_KEY, create=fence.revision)],
                                  success=[_put(LEADER_KEY, self.node_id.encode(), new)])
        try:
            moved = (await self.store.kv.Txn(req, timeout=2.0)).succeeded
        except grpc.aio.AioRpcError as e:
            log.info("election: leader lease move unanswered (%s); the next check reads where the key is",
                     e.code().name)
            return  # both leases stay renewed meanwhile
        await self._settle(moved)

    async def _holds(self, fence: Fence, lease: int) -> bool | None:
        """Whether the leader key of this term is attached to `lease`; None when etcd did not say."""
        try:
            resp = await self.store.kv.Range(etcd_pb2.RangeRequest(key=LEADER_KEY), timeout=2.0)
        except grpc.aio.AioRpcError:
            return None
        kv = resp.kvs[0] if resp.kvs else None
        return kv is not None and kv.create_revision == fence.revision and kv.lease == lease

    async def _settle(self, moved: bool) -> None:
        """The key moved to `_pending` (it is the lease now) or not (`_pending` is revoked)."""
        old, new = self.lease_id, self._pending
        if moved:
            self.lease_id, self.ttl, self._renewed = new, self._pending_ttl, self._pending_renewed
            log.info("election: leader lease now %d s (%d nodes)", self.ttl, len(self.store.sm.tables["node"]))
        self._pending = 0
        with contextlib.suppress(grpc.aio.AioRpcError):  # the one not holding the key
            await self.store.lease.LeaseRevoke(etcd_pb2.LeaseRevokeRequest(ID=old if moved else new), timeout=1.0)

    async def _grant(self) -> int:
        self.ttl = self._wanted_ttl()
        resp = await self.store.lease.LeaseGrant(etcd_pb2.LeaseGrantRequest(TTL=self.ttl), timeout=2.0)
        self._renewed = time.monotonic()
        return resp.ID

    async def _keepalive(self, lease_id: int, lost: asyncio.Event) -> None:
        """Renew the lease every ttl/RENEW_ROUNDS s from a thread of its own; set `lost` when the server says it
        expired.

        The renewals do not wait for this manager's event loop: a loop busy for a second or two under
        a large fleet's load still leads (losing the key would move every agent session at once,
        making the load worse). They do wait for its sign of life: this coroutine marks the loop
        alive every LOOP_TICK s, and the thread renews only while the last mark is less than `ttl`
        s old, so a loop wedged for good loses the key within two leases."""
        loop = asyncio.get_running_loop()
        alive = [time.monotonic()]
        stop = threading.Event()
        worker = threading.Thread(target=self._renew_from_thread, args=(lease_id, lost, loop, alive, stop),
                                  name="lease-keepalive", daemon=True)
        worker.start()
        try:
            while worker.is_alive():
                alive[0] = time.monotonic()
                await asyncio.sleep(self.LOOP_TICK)
        finally:
            stop.set()

    def _renew_from_thread(self, lease_id: int, lost: asyncio.Event, loop: asyncio.AbstractEventLoop,
                           alive: list[float], stop: threading.Event) -> None:
        """`_keepalive`'s thread: one keep-alive request every ttl/RENEW_ROUNDS s on a channel of its
        own, each waited for as long as the lease is still surely valid: a store slow to answer (a
        machine out of CPU) costs the key only when no renewal came back for `ttl` less the margin
        (a request given half the lease cost it after one slow answer of 2.5 s under a 5 s lease)."""
        broken = ""
        with grpc.insecure_channel(self.store.target, options=CHANNEL_OPTIONS) as channel:
            stub = etcd_pb2_grpc.LeaseStub(channel)
            while not stop.wait(self.ttl / self.RENEW_ROUNDS):
                if time.monotonic() - alive[0] >= self.ttl:
                    continue  # the loop is wedged: let the lease run out
                if pending := self._pending:  # the longer lease `_grow_lease` is moving the key to
                    sent = time.monotonic()
                    if self._renew_once(stub, pending, self.MIN_RENEW_WAIT) == "" and pending == self._pending:
                        self._pending_renewed = max(self._pending_renewed, sent)
                lease = self.lease_id or lease_id  # the lease of the moment (`_grow_lease` may move the key)
                sent = time.monotonic()
                outcome = self._renew_once(stub, lease, max(self.MIN_RENEW_WAIT, self._valid_for()))
                if outcome not in ("", "gone"):
                    if outcome != broken:
                        log.info("election: lease keep-alive failed (%s); retrying", outcome)
                    broken = outcome
                    continue
                broken = ""
                if lease != self.lease_id:  # the answer for a lease `_grow_lease` replaced meanwhile
                    continue
                if outcome == "gone":
                    with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
                        loop.call_soon_threadsafe(lost.set)
                    return
                self._renewed = max(self._renewed, sent)

    @staticmethod
    def _renew_once(stub: etcd_pb2_grpc.LeaseStub, lease: int, wait: float) -> str:
        """One keep-alive of `lease`: "" renewed, "gone" (expired or revoked), or why it failed."""
        call = stub.LeaseKeepAlive(iter([etcd_pb2.LeaseKeepAliveRequest(ID=lease)]), timeout=wait)
        try:
            resp = next(call)
        except (grpc.RpcError, StopIteration) as e:
            return e.code().name if isinstance(e, grpc.RpcError) else "no answer"
        finally:
            call.cancel()
        return "gone" if resp.TTL <= 0 else ""

    def _valid_for(self) -> float:
        return self._renewed + self.ttl - self.MARGIN - time.monotonic()

    async def _try_take(self, lease_id: int) -> Fence | None:
        req = etcd_pb2.TxnRequest(
            compare=[_compare(LEADER_KEY, create=0)],
            success=[_put(LEADER_KEY, self.node_id.encode(), lease_id)],
            failure=[etcd_pb2.RequestOp(request_range=etcd_pb2.RangeRequest(key=LEADER_KEY))],
        )
        resp = await self.store.kv.Txn(req, timeout=2.0)
        if resp.succeeded:
            return Fence(resp.header.revision)
        held = resp.responses[0].response_range.kvs
        if held and held[0].value == self.node_id.encode() and held[0].lease == lease_id:
            # ours already: an earlier take committed but its answer was lost (a timeout)
            return Fence(held[0].create_revision)
        if held and held[0].value == self.node_id.encode() and held[0].lease != lease_id:
            # an earlier run of this node: it is gone, do not wait for its lease
            await self.store.kv.Txn(
                etcd_pb2.TxnRequest(compare=[_compare(LEADER_KEY, create=held[0].create_revision)],
                                    success=[_delete(LEADER_KEY)]),
                timeout=2.0,
            )
        return None

    async def terms(self) -> AsyncIterator[Fence | None]:
        q = self.store.subscribe_leader()
        try:
            while True:
                try:
                    lease_id = await self._grant()
                except grpc.aio.AioRpcError as e:
                    log.info("election: no lease (%s); retrying", e.code().name)
                    await asyncio.sleep(0.5)
                    continue
                self.lease_id, self._pending = lease_id, 0
                lost = asyncio.Event()
                keeper = asyncio.create_task(self._keepalive(lease_id, lost), name="lease-keepalive")
                try:
                    async for item in self._campaign(lease_id, lost, q):
                        yield item
                finally:
                    keeper.cancel()
                    await asyncio.gather(keeper, return_exceptions=True)
        finally:
            self.store.unsubscribe_leader(q)

    async def _campaign(
        self, lease_id: int, lost: asyncio.Event, q: asyncio.Queue[etcd_pb2.KeyValue | None]
    ) -> AsyncIterator[Fence | None]:
        """Campaign under one lease until it is lost, or until the cluster grew past it: a follower
        campaigns from its start, under the short lease of the cluster it joined; winning with it, its
        key would expire while its loop takes the control loops over (seconds at 2,000 nodes, no
        renewal while the loop shows no sign of life for a lease), and the other follower would win
        in its turn, and lose the same way (`terms` grants a lease of the wanted length)."""
        while not lost.is_set() and self._valid_for() > 0:
            if self._wanted_ttl() > self.ttl:
                log.info("election: campaigning under a %d s lease from now on (%d nodes)", self._wanted_ttl(),
                         len(self.store.sm.tables["node"]))
                with contextlib.suppress(grpc.aio.AioRpcError):
                    await self.store.lease.LeaseRevoke(etcd_pb2.LeaseRevokeRequest(ID=lease_id), timeout=1.0)
                return
            wait = self._stand_back_until - time.monotonic()
            if wait > 0:
                await next_or_timeout(q, min(wait, 0.5))
                continue
            try:
                fence = await self._try_take(lease_id)
            except grpc.aio.AioRpcError as e:
                log.info("election: campaign failed (%s); retrying", e.code().name)
                fence = None
            if fence is None:
                await next_or_timeout(q, 0.5)
                continue
            log.info("election: node %s leads the control loops (revision %d)", self.node_id, fence.revision)
            yield fence
            # Lead until the key changes hands or the lease may have expired.
            grow_at = time.monotonic() + self.GROW_CHECK
            while not lost.is_set():
                if time.monotonic() >= grow_at:
                    grow_at = time.monotonic() + self.GROW_CHECK
                    await self._grow_lease(fence)
                key = self.store.leader_key
                if key is not None and key.create_revision > fence.revision:
                    break
                if key is None and self.store.sm.version > fence.revision:
                    break
                if self._valid_for() <= 0:
                    break
                await next_or_timeout(q, min(0.1, max(0.01, self._valid_for())))
            log.info("election: node %s lost the leader key", self.node_id)
            yield None
            return

    async def resign(self) -> None:
        """Give the leader key up at once (revoke the lease), so another manager takes over: this
        election then stays out of the race for 2 x ttl (and campaigns again after that, in case
        no other manager did)."""
        self._stand_back_until = time.monotonic() + 2 * self.ttl
        if self.lease_id:
            with contextlib.suppress(grpc.aio.AioRpcError):
                await self.store.lease.LeaseRevoke(etcd_pb2.LeaseRevokeRequest(ID=self.lease_id), timeout=1.0)


async def next_or_timeout(q: asyncio.Queue[Any], timeout: float) -> None:
    """Wait for the next item of `q` (or `timeout` s), then drop whatever else is queued."""
    try:
        async with asyncio.timeout(timeout):
            await q.get()
    except TimeoutError:
        return
    while not q.empty():
        q.get_nowait()
