"""The cluster store: object tables with indexes, atomic transactions, optimistic concurrency, watch.

`StateMachine` is the deterministic part: tables, indexes and the preconditions of a transaction
-- a stale version, a duplicate name, a missing object, an overlapping subnet -- checked in `apply`
(or, without changing anything, in `check`); a failing transaction changes nothing. `LocalStore`
applies transactions to it directly (unit tests, benchmarks): object `meta.version` is then the
store version of the transaction that last wrote it, timestamps come from the transaction.

On managers the store is `shoal.manager.etcdstore.EtcdStore`: the same `StateMachine` is its local
cache, fed in order by etcd's watch (`apply_committed`), and `check` runs before each etcd
transaction; `meta.version` is the etcd revision that last wrote the object.

`Store` is what the rest of the manager uses: reads go to the local tables, writes are built with a
`Tx` and proposed (`Store.update(fn, retries=N)` builds one again when the store refuses it with a
`StaleVersion`: something it read changed meanwhile; it is the manager's one retry-on-conflict loop). Objects returned by reads are the store's own: treat them as read-only and copy
(`Message.CopyFrom`) before changing one for an update.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import secrets
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from google.protobuf.message import Message

from shoal.proto import control_pb2, objects_pb2, store_pb2, types_pb2, watch_pb2

KINDS = ("node", "service", "task", "network", "secret", "config", "cluster")
# Kinds whose names are unique; tasks and nodes may share names.
UNIQUE_NAMES = frozenset({"service", "network", "secret", "config", "cluster"})
_MESSAGE_KIND = {
    objects_pb2.Node: "node",
    objects_pb2.Service: "service",
    objects_pb2.Task: "task",
    objects_pb2.Network: "network",
    objects_pb2.Secret: "secret",
    objects_pb2.Config: "config",
    objects_pb2.Cluster: "cluster",
}
_ID_ALPHABET = "0123456789abcdefghijklmnopqrstuvwxyz"

Obj = Message
T = TypeVar("T")
log = logging.getLogger("shoal.store")


class StoreError(Exception):
    """A request the store refuses; `code` is the gRPC status name the control API answers with."""

    code = "UNKNOWN"


class NotFound(StoreError):
    code = "NOT_FOUND"


class AlreadyExists(StoreError):
    code = "ALREADY_EXISTS"


class Conflict(StoreError):
    code = "FAILED_PRECONDITION"


class StaleVersion(Conflict):
    """An object changed since it was read: its version is not the one the write names.

    Raised by the store when a transaction updates or removes an object at a version that is no
    longer current (or, on etcd, when what it read kept changing while it was sent): `client` is
    False, and `Store.update(fn, retries=N)` builds the transaction again from the current state.
    Raised with `client=True` inside a transaction function when the version the caller sent in its
    request (e.g. `UpdateServiceRequest.service_version`) is stale: that one is never retried (the
    caller must read again), since building the transaction again cannot make the request current.
    The control API answers either with ABORTED and this message."""

    code = "ABORTED"

    def __init__(self, message: str, *, client: bool = False) -> None:
        super().__init__(message)
        self.client = client


class InvalidArgument(StoreError):
    code = "INVALID_ARGUMENT"


class Unavailable(StoreError):
    code = "UNAVAILABLE"


def new_id() -> str:
    """A 25-character random id like Swarm's (base 36 of 128 random bits)."""
    n = secrets.randbits(128)
    out = []
    for _ in range(25):
        n, r = divmod(n, 36)
        out.append(_ID_ALPHABET[r])
    return "".join(out)


def kind_of(obj: Obj) -> str:
    return _MESSAGE_KIND[type(obj)]


def wrap(obj: Obj) -> objects_pb2.StoreObject:
    so = objects_pb2.StoreObject()
    getattr(so, kind_of(obj)).CopyFrom(obj)
    return so


def unwrap(so: objects_pb2.StoreObject) -> tuple[str, Obj]:
    kind = so.WhichOneof("object")
    if kind is None:
        raise InvalidArgument("store action has no object")
    return kind, getattr(so, kind)


def name_of(kind: str, obj: Any) -> str:
    if kind == "task":
        return obj.annotations.name
    if kind == "node":
        return obj.spec.annotations.name or obj.description.hostname
    return obj.spec.annotations.name


def labels_of(kind: str, obj: Any) -> Any:
    if kind == "task":
        return obj.annotations.labels
    return obj.spec.annotations.labels


def network_subnet(net: objects_pb2.Network) -> ipaddress.IPv4Network | None:
    """The allocated (or else requested) subnet of a network."""
    cfgs = net.ipam.configs or net.spec.ipam.configs
    if not cfgs or not cfgs[0].subnet:
        return None
    return ipaddress.ip_network(cfgs[0].subnet, strict=False)  # type: ignore[return-value]


def describe(kind: str, obj: Any) -> str:
    name = name_of(kind, obj)
    return f"{kind} {name!r}" if name else f"{kind} {obj.id}"


def stale_version(kind: str, cur: Any, version: int, *, client: bool = False) -> StaleVersion:
    """The StaleVersion of an update of `cur` (the current object) that named `version`."""
    return StaleVersion(
        f"update out of sequence: {describe(kind, cur)} was changed since it was read "
        f"(version {cur.meta.version}, request had {version}); read it again and retry",
        client=client,
    )


class StateMachine:
    """The replicated tables. Thread-safe: Raft applies from its own thread, asyncio code reads."""

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self.version = 0
        self.tables: dict[str, dict[str, Any]] = {k: {} for k in KINDS}
        self._names: dict[str, dict[str, str]] = {k: {} for k in UNIQUE_NAMES}
        self._tasks_by_service: dict[str, set[str]] = {}
        self._tasks_by_node: dict[str, set[str]] = {}
        self._watchers: list[Watcher] = []

    # ---- apply -----------------------------------------------------------------------------
    def apply(self, txn: store_pb2.StoreTransaction) -> int:
        """Apply all actions of `txn` or none; returns the new store version."""
        with self.lock:
            version = self.version + 1
            undo: list[tuple[str, str, Any]] = []
            events: list[watch_pb2.WatchEvent] = []
            try:
                for action in txn.actions:
                    events.append(self._apply_action(action, version, txn.timestamp_unix_nano, undo))
            except StoreError:
                for kind, oid, old in reversed(undo):
                    self._put(kind, oid, old)
                raise
            self.version = version
            if events:
                self._notify(watch_pb2.WatchMessage(events=events, version=version))
            return version

    def check(self, txn: store_pb2.StoreTransaction) -> None:
        """Raise the StoreError `apply(txn)` would raise now, changing nothing (a dry run)."""
        with self.lock:
            # Objects without unique names (a fleet's tasks, nodes), each once: every action's
            # preconditions read only the store as it is, so none is applied and undone.
            seen: set[tuple[str, str]] = set()
            for action in txn.actions:
                kind, src = unwrap(action.object)
                if kind in UNIQUE_NAMES or (kind, src.id) in seen:
                    break
                seen.add((kind, src.id))
            else:
                for action in txn.actions:
                    kind, src = unwrap(action.object)
                    self._precheck(action.kind, kind, src, self.tables[kind].get(src.id))
                return
            undo: list[tuple[str, str, Any]] = []
            try:
                for action in txn.actions:
                    self._apply_action(action, self.version + 1, txn.timestamp_unix_nano, undo)
            finally:
                for kind, oid, old in reversed(undo):
                    self._put(kind, oid, old)

    def apply_committed(self, version: int, changes: Iterable[tuple[str, str, Any]]) -> None:
        """Take changes another party has already committed and ordered (a cache of etcd).

        `changes` are (kind, id, object or None for a removal) as of store version `version`; the
        objects carry their final `meta` already. No precondition is checked; watchers get one
        message with an event per change that changed something. The version never goes back."""
        with self.lock:
            events: list[watch_pb2.WatchEvent] = []
            for kind, oid, obj in changes:
                old = self.tables[kind].get(oid)
                if obj is None and old is None:
                    continue
                ev = watch_pb2.WatchEvent()
                if obj is None:
                    ev.action = watch_pb2.WatchEvent.DELETE
                    getattr(ev.object, kind).CopyFrom(old)
                else:
                    ev.action = watch_pb2.WatchEvent.CREATE if old is None else watch_pb2.WatchEvent.UPDATE
                    getattr(ev.object, kind).CopyFrom(obj)
                    if old is not None:
                        getattr(ev.old_object, kind).CopyFrom(old)
                self._put(kind, oid, obj)
                events.append(ev)
            self.version = max(self.version, version)
            if events:
                self._notify(watch_pb2.WatchMessage(events=events, version=self.version))

    def _apply_action(
        self, action: store_pb2.StoreAction, version: int, ts: int, undo: list[tuple[str, str, Any]]
    ) -> watch_pb2.WatchEvent:
        kind, src = unwrap(action.object)
        old = self.tables[kind].get(src.id)
        self._precheck(action.kind, kind, src, old)
        ev = watch_pb2.WatchEvent()
        if action.kind == store_pb2.StoreAction.CREATE:
            obj = type(src)()
            obj.CopyFrom(src)
            obj.meta.version = version
            obj.meta.created_at.FromNanoseconds(ts)
            obj.meta.updated_at.FromNanoseconds(ts)
            ev.action = watch_pb2.WatchEvent.CREATE
        elif action.kind == store_pb2.StoreAction.UPDATE:
            obj = type(src)()
            obj.CopyFrom(src)
            obj.meta.version = version
            obj.meta.created_at.CopyFrom(old.meta.created_at)
            obj.meta.updated_at.FromNanoseconds(ts)
            ev.action = watch_pb2.WatchEvent.UPDATE
            getattr(ev.old_object, kind).CopyFrom(old)
        else:
            obj = None
            ev.action = watch_pb2.WatchEvent.DELETE
        undo.append((kind, src.id, old))
        self._put(kind, src.id, obj)
        getattr(ev.object, kind).CopyFrom(obj if obj is not None else old)
        return ev

    def _precheck(self, action: int, kind: str, src: Any, old: Any) -> None:
        """Raise the StoreError that refuses `action` on `src` when the store holds `old` for its id."""
        if not src.id:
            raise InvalidArgument(f"{kind} has no id")
        if action == store_pb2.StoreAction.CREATE:
            if old is not None:
                raise AlreadyExists(f"{describe(kind, old)} already exists with id {src.id}")
            self._check_name(kind, src, None)
            self._check_network(kind, src)
        elif action == store_pb2.StoreAction.UPDATE:
            if old is None:
                raise NotFound(f"{describe(kind, src)} does not exist (it may have been removed)")
            if src.meta.version != old.meta.version:
                raise stale_version(kind, old, src.meta.version)
            self._check_name(kind, src, old)
            self._check_network(kind, src)
        elif action == store_pb2.StoreAction.DELETE:
            if old is None:
                raise NotFound(f"{describe(kind, src)} does not exist")
            if src.meta.version and src.meta.version != old.meta.version:
                raise StaleVersion(
                    f"remove out of sequence: {describe(kind, old)} was changed since it was read; "
                    "read it again and retry"
                )
        else:  # pragma: no cover - enum is closed
            raise InvalidArgument(f"unknown store action {action}")

    def _check_name(self, kind: str, new: Any, old: Any) -> None:
        if kind not in UNIQUE_NAMES:
            return
        name = name_of(kind, new)
        if not name:
            raise InvalidArgument(f"{kind} name is empty: give the {kind} a name")
        holder = self._names[kind].get(name)
        if holder is not None and holder != new.id:
            raise AlreadyExists(f"{kind} name {name!r} is already in use by {kind} {holder}; choose another name")

    def _check_network(self, kind: str, net: Any) -> None:
        """Networks keep unique VXLAN ids and non-overlapping subnets, on every replica alike."""
        if kind != "network":
            return
        subnet = network_subnet(net)
        for other in self.tables["network"].values():
            if other.id == net.id:
                continue
            if net.driver_state.vni and other.driver_state.vni == net.driver_state.vni:
                raise Conflict(f"VXLAN id {net.driver_state.vni} is already used by {describe(kind, other)}; retry")
            theirs = network_subnet(other)
            if subnet is not None and theirs is not None and theirs.overlaps(subnet):
                raise InvalidArgument(
                    f"subnet {subnet} overlaps {theirs} of {describe(kind, other)}: choose another subnet"
                )

    def _put(self, kind: str, oid: str, obj: Any) -> None:
        """Set or remove one object, keeping every index in step."""
        table = self.tables[kind]
        prev = table.get(oid)
        if prev is not None:
            if kind in UNIQUE_NAMES:
                self._names[kind].pop(name_of(kind, prev), None)
            elif kind == "task":
                self._index_remove(self._tasks_by_service, prev.service_id, oid)
                self._index_remove(self._tasks_by_node, prev.node_id, oid)
        if obj is None:
            table.pop(oid, None)
            return
        table[oid] = obj
        if kind in UNIQUE_NAMES:
            self._names[kind][name_of(kind, obj)] = oid
        elif kind == "task":
            self._tasks_by_service.setdefault(obj.service_id, set()).add(oid)
            self._tasks_by_node.setdefault(obj.node_id, set()).add(oid)

    @staticmethod
    def _index_remove(index: dict[str, set[str]], key: str, oid: str) -> None:
        ids = index.get(key)
        if ids is not None:
            ids.discard(oid)
            if not ids:
                del index[key]

    # ---- snapshots ---------------------------------------------------------------------------
    def snapshot(self) -> store_pb2.StoreSnapshot:
        with self.lock:
            snap = store_pb2.StoreSnapshot(version=self.version)
            for kind in KINDS:
                for obj in self.tables[kind].values():
                    getattr(snap.objects.add(), kind).CopyFrom(obj)
            return snap

    def restore(self, snap: store_pb2.StoreSnapshot) -> None:
        with self.lock:
            self.tables = {k: {} for k in KINDS}
            self._names = {k: {} for k in UNIQUE_NAMES}
            self._tasks_by_service = {}
            self._tasks_by_node = {}
            for so in snap.objects:
                kind, obj = unwrap(so)
                copy = type(obj)()
                copy.CopyFrom(obj)
                self._put(kind, copy.id, copy)
            self.version = snap.version

    # ---- reads -------------------------------------------------------------------------------
    def get(self, kind: str, oid: str) -> Any:
        with self.lock:
            return self.tables[kind].get(oid)

    def unchanged(self, action: store_pb2.StoreAction) -> bool:
        """Whether the object an UPDATE `action` writes is still here at the version the action was
        built from (`meta.version`): a batch refused part way (its earlier transactions committed) or
        a concurrent writer moved on those it is not, and writing them again one by one would only be
        refused as out of sequence, a round trip each."""
        kind = action.object.WhichOneof("object")
        obj = getattr(action.object, kind)
        cur = self.get(kind, obj.id)
        return cur is not None and cur.meta.version == obj.meta.version

    def get_by_name(self, kind: str, name: str) -> Any:
        with self.lock:
            if kind in UNIQUE_NAMES:
                oid = self._names[kind].get(name)
                return self.tables[kind].get(oid) if oid else None
            for obj in self.tables[kind].values():
                if name_of(kind, obj) == name:
                    return obj
            return None

    def list(self, kind: str) -> list[Any]:
        with self.lock:
            return list(self.tables[kind].values())

    def tasks_by_service(self, service_id: str) -> list[objects_pb2.Task]:
        with self.lock:
            tasks = self.tables["task"]
            return [tasks[i] for i in self._tasks_by_service.get(service_id, ())]

    def tasks_by_node(self, node_id: str) -> list[objects_pb2.Task]:
        with self.lock:
            tasks = self.tables["task"]
            return [tasks[i] for i in self._tasks_by_node.get(node_id, ())]

    def find(self, kind: str, filters: control_pb2.ListFilters | None = None) -> list[Any]:
        """List objects matching every given filter (each filter's values are alternatives)."""
        with self.lock:
            if filters is None:
                return list(self.tables[kind].values())
            if kind == "task" and filters.service_ids:
                candidates: Iterable[Any] = [t for s in filters.service_ids for t in self.tasks_by_service(s)]
            elif kind == "task" and filters.node_ids:
                candidates = [t for n in filters.node_ids for t in self.tasks_by_node(n)]
            else:
                candidates = self.tables[kind].values()
            return [o for o in candidates if _matches(kind, o, filters)]

    def resolve(self, kind: str, ref: str) -> Any:
        """An object by full id, exact name, or unique id prefix; NotFound/InvalidArgument otherwise."""
        if not ref:
            raise InvalidArgument(f"no {kind} given: name a {kind} by id or name")
        with self.lock:
            obj = self.tables[kind].get(ref) or self.get_by_name(kind, ref)
            if obj is not None:
                return obj
            hits = [o for oid, o in self.tables[kind].items() if oid.startswith(ref)]
        if len(hits) == 1:
            return hits[0]
        if not hits:
            raise NotFound(f"{kind} {ref!r} not found")
        raise InvalidArgument(f"{kind} id prefix {ref!r} is ambiguous ({len(hits)} match): give more characters")

    # ---- watch -------------------------------------------------------------------------------
    def watch(
        self,
        kinds: Iterable[str] = (),
        loop: asyncio.AbstractEventLoop | None = None,
        on_message: Callable[[watch_pb2.WatchMessage], None] | None = None,
    ) -> Watcher:
        w = Watcher(self, frozenset(kinds), loop or asyncio.get_running_loop(), on_message)
        with self.lock:
            self._watchers.append(w)
        return w

    def _unwatch(self, w: Watcher) -> None:
        with self.lock:
            if w in self._watchers:
                self._watchers.remove(w)

    def _notify(self, msg: watch_pb2.WatchMessage) -> None:
        if not self._watchers:
            return
        kinds = [e.object.WhichOneof("object") for e in msg.events]  # read once for every watcher
        present = frozenset(kinds)
        for w in self._watchers:
            w.deliver(msg, kinds, present)


def _matches(kind: str, obj: Any, f: control_pb2.ListFilters) -> bool:
    if f.names or f.name_prefixes:
        name = name_of(kind, obj)
        if f.names and name not in f.names:
            return False
        if f.name_prefixes and not any(name.startswith(p) for p in f.name_prefixes):
            return False
    if f.id_prefixes and not any(obj.id.startswith(p) for p in f.id_prefixes):
        return False
    if f.labels:
        labels = labels_of(kind, obj)
        for k, v in f.labels.items():
            if k not in labels or (v and labels[k] != v):
                return False
    if kind == "task":
        if f.service_ids and obj.service_id not in f.service_ids:
            return False
        if f.node_ids and obj.node_id not in f.node_ids:
            return False
        if f.desired_states and obj.desired_state not in f.desired_states:
            return False
    if kind == "node" and f.roles and obj.role not in f.roles:
        return False
    return True


@dataclass
class WatchBatch:
    """A filtered WatchMessage: the same `events` and `version`, without copying the events."""

    events: list[watch_pb2.WatchEvent]
    version: int


def drain(queue: asyncio.Queue[T]) -> list[T]:
    """Everything `queue` holds now, without waiting (a watch's messages that came while its consumer
    was busy: a fleet's status changes come in thousands, to be taken as one batch)."""
    out = []
    while not queue.empty():
        out.append(queue.get_nowait())
    return out


class Watcher:
    """Committed events for some kinds, delivered into an asyncio queue from whichever thread applied;
    or, with `on_message`, handed to that function on the loop's thread instead (in commit order), for
    a consumer that routes one stream of events to many (the dispatcher's streams)."""

    def __init__(
        self,
        sm: StateMachine,
        kinds: frozenset[str],
        loop: asyncio.AbstractEventLoop,
        on_message: Callable[[watch_pb2.WatchMessage], None] | None = None,
    ) -> None:
        self._sm = sm
        self.kinds = kinds
        self._loop = loop
        self.queue: asyncio.Queue[watch_pb2.WatchMessage | None] = asyncio.Queue()
        self._target: Callable[[Any], None] = on_message or self.queue.put_nowait

    def deliver(self, msg: watch_pb2.WatchMessage, kinds: list[str | None], present: frozenset[str | None]) -> None:
        """Hand `msg` on, filtered to this watcher's kinds; `kinds` names the kind of each of its
        events, `present` is their set (read once for all watchers)."""
        if self.kinds:
            if self.kinds.isdisjoint(present):
                return
            if not present <= self.kinds:
                events = [e for e, k in zip(msg.events, kinds, strict=True) if k in self.kinds]
                msg = WatchBatch(events=events, version=msg.version)  # type: ignore[assignment]
        try:
            self._loop.call_soon_threadsafe(self._target, msg)
        except RuntimeError:  # loop closed
            self._sm._unwatch(self)

    def close(self) -> None:
        self._sm._unwatch(self)
        try:
            self._loop.call_soon_threadsafe(self.queue.put_nowait, None)
        except RuntimeError:
            pass

    async def messages(self) -> AsyncIterator[watch_pb2.WatchMessage]:
        while True:
            msg = await self.queue.get()
            if msg is None:
                return
            yield msg

    async def events(self) -> AsyncIterator[watch_pb2.WatchEvent]:
        async for msg in self.messages():
            for ev in msg.events:
                yield ev

    def __enter__(self) -> Watcher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass
class Tx:
    """Collects the actions of one transaction; reads see the transaction's own writes by id."""

    sm: StateMachine
    actions: list[store_pb2.StoreAction] = field(default_factory=list)
    _staged: dict[tuple[str, str], Any] = field(default_factory=dict)

    def get(self, kind: str, oid: str) -> Any:
        key = (kind, oid)
        if key in self._staged:
            return self._staged[key]
        return self.sm.get(kind, oid)

    def create(self, obj: Obj) -> Obj:
        if not obj.id:
            obj.id = new_id()
        self._add(store_pb2.StoreAction.CREATE, obj)
        return obj

    def update(self, obj: Obj) -> Obj:
        self._add(store_pb2.StoreAction.UPDATE, obj)
        return obj

    def delete(self, obj: Obj) -> None:
        self._add(store_pb2.StoreAction.DELETE, obj)

    def _add(self, kind: int, obj: Obj) -> None:
        action = store_pb2.StoreAction(kind=kind)
        k = kind_of(obj)
        getattr(action.object, k).CopyFrom(obj)
        self.actions.append(action)
        self._staged[(k, obj.id)] = None if kind == store_pb2.StoreAction.DELETE else obj

    def transaction(self) -> store_pb2.StoreTransaction:
        return store_pb2.StoreTransaction(actions=self.actions, timestamp_unix_nano=time.time_ns())


class Store:
    """Reads from the local replica; writes proposed through `propose` (Raft in production)."""

    def __init__(self, sm: StateMachine | None = None) -> None:
        self.sm = sm or StateMachine()

    async def propose(self, txn: store_pb2.StoreTransaction) -> int:
        raise NotImplementedError

    def is_leader(self) -> bool:
        raise NotImplementedError

    async def read_barrier(self) -> str | None:
        """Make the next reads see every write acknowledged before this call (linearizable reads).

        Returns None when they will, or one sentence saying why the reads that follow may be stale
        (no quorum: they still answer, from this manager's copy). A local store is always current."""
        return None

    async def update(
        self,
        fn: Callable[[Tx], T],
        retries: int = 0,
        *,
        retry_on: tuple[type[StoreError], ...] = (),
        backoff: float = 0.0,
    ) -> T:
        """Run `fn` to build a transaction from current state, then commit it atomically.

        This is the manager's one retry-on-conflict primitive. When the store refuses the
        transaction with a `StaleVersion` (not `client`: something `fn` read changed before the
        commit), `fn` runs again on the current state and its new transaction is proposed, up to
        `retries` more times (after `backoff * attempt` seconds); so does any error of `retry_on`
        (e.g. NotFound, for builders that read through `tx.get` and skip what is gone). A
        `StaleVersion(client=True)` -- the caller's own version is stale -- is raised at once. `fn`
        must therefore build from `tx` (or the store) each time, not from objects read before.

        Raises the StoreError of a failed precondition, or the last one once the retries are spent
        (nothing of that attempt is applied then)."""
        attempt = 0
        while True:
            tx = Tx(self.sm)
            try:
                result = fn(tx)
                if tx.actions:
                    await self.propose(tx.transaction())
                return result
            except StoreError as e:
                client = isinstance(e, StaleVersion) and e.client
                if client or not isinstance(e, (StaleVersion, *retry_on)) or attempt >= retries:
                    raise
                attempt += 1
                log.debug("store write conflict, building it again (attempt %d of %d): %s", attempt, retries, e)
                if backoff:
                    await asyncio.sleep(backoff * attempt)

    async def batch(self, actions: list[store_pb2.StoreAction], max_actions: int = 2000) -> int:
        """Commit many independent actions in transactions of at most `max_actions` each."""
        version = self.sm.version
        for i in range(0, len(actions), max_actions):
            txn = store_pb2.StoreTransaction(actions=actions[i : i + max_actions], timestamp_unix_nano=time.time_ns())
            version = await self.propose(txn)
        return version

    # Read helpers (local replica).
    def get(self, kind: str, oid: str) -> Any:
        return self.sm.get(kind, oid)

    def find(self, kind: str, filters: control_pb2.ListFilters | None = None) -> list[Any]:
        return self.sm.find(kind, filters)

    def resolve(self, kind: str, ref: str) -> Any:
        return self.sm.resolve(kind, ref)

    def watch(
        self, kinds: Iterable[str] = (), on_message: Callable[[watch_pb2.WatchMessage], None] | None = None
    ) -> Watcher:
        return self.sm.watch(kinds, on_message=on_message)

    def cluster(self) -> objects_pb2.Cluster | None:
        clusters = self.sm.list("cluster")
        return clusters[0] if clusters else None


class LocalStore(Store):
    """A single-replica store: transactions apply at once. For one manager alone and for tests."""

    def __init__(self, sm: StateMachine | None = None) -> None:
        super().__init__(sm)

    async def propose(self, txn: store_pb2.StoreTransaction) -> int:
        return self.sm.apply(txn)

    def is_leader(self) -> bool:
        return True


def is_terminal(state: int) -> bool:
    """A task state past RUNNING: the task has stopped for good (COMPLETE, SHUTDOWN, FAILED, ...)."""
    return state > types_pb2.RUNNING
