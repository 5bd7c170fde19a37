"""Per-network tables of the gossip layer: pure merge logic, no I/O.

An entry is keyed ``(table, network_id, key)`` and versioned by ``(ltime, owner, deleted)``: a
merge keeps the larger version, so any delivery order (and any number of duplicates) of the same
set of versions converges to the same table. Deletes are tombstones (``deleted=True``, the last
value kept so that delete events can carry it) that are reaped after a TTL.

API::

    LamportClock(start=0).time / .next() -> int / .witness(t)
    TableStore.merge(entry: TableEntry) -> tuple[bool, TableEvent | None]   (changed?, event)
    TableStore.get(table, network_id, key) -> TableEntry | None     (tombstones included)
    TableStore.entries(table, network_id) -> dict[str, bytes]        (live entries only)
    TableStore.network_entries(network_id) -> list[TableEntry]       (with tombstones, for sync)
    TableStore.purge_owner(owner, network_id=None) -> list[TableEvent]
    TableStore.drop_network(network_id) -> list[TableEvent]
    TableStore.reap(older_than: float) -> int
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass

from shoal.proto.gossip_pb2 import TableEntry


class EventKind(enum.StrEnum):
    CREATE = "create"
    UPDATE = "update"
    DELETE = "delete"


@dataclass(frozen=True, slots=True)
class TableEvent:
    kind: EventKind
    table: str
    network_id: str
    key: str
    value: bytes
    owner: str


class LamportClock:
    """Lamport clock with a wall-clock floor (milliseconds), so a restarted node's clock still
    moves past the versions its previous life left in the cluster."""

    def __init__(self, start: int = 0) -> None:
        self.time = start

    def next(self) -> int:
        self.time = max(self.time + 1, time.time_ns() // 1_000_000)
        return self.time

    def witness(self, t: int) -> None:
        if t > self.time:
            self.time = t


def version(e: TableEntry) -> tuple[int, str, bool]:
    return (e.ltime, e.owner, e.deleted)


_Key = tuple[str, str, str]


class TableStore:
    def __init__(self) -> None:
        self._entries: dict[_Key, TableEntry] = {}
        self._tombstone_at: dict[_Key, float] = {}
        self._by_net: dict[str, dict[_Key, TableEntry]] = {}  # network id -> its entries

    def _put(self, k: _Key, e: TableEntry) -> None:
        self._entries[k] = e
        self._by_net.setdefault(k[1], {})[k] = e

    def _pop(self, k: _Key) -> TableEntry | None:
        e = self._entries.pop(k, None)
        net = self._by_net.get(k[1])
        if net is not None:
            net.pop(k, None)
            if not net:
                del self._by_net[k[1]]
        return e

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, table: str, network_id: str, key: str) -> TableEntry | None:
        return self._entries.get((table, network_id, key))

    def merge(self, entry: TableEntry, now: float | None = None) -> tuple[bool, TableEvent | None]:
        """Keep ``entry`` if its version is newer. Returns whether it was kept and the event a
        subscriber should see (none for a tombstone of an entry this store never had live)."""
        k = (entry.table, entry.network_id, entry.key)
        cur = self._entries.get(k)
        if cur is not None and version(cur) >= version(entry):
            return False, None
        e = TableEntry()
        e.CopyFrom(entry)
        self._put(k, e)
        if e.deleted:
            self._tombstone_at[k] = time.monotonic() if now is None else now
            if cur is not None and not cur.deleted:
                return True, TableEvent(EventKind.DELETE, e.table, e.network_id, e.key, cur.value, cur.owner)
            return True, None
        self._tombstone_at.pop(k, None)
        kind = EventKind.UPDATE if cur is not None and not cur.deleted else EventKind.CREATE
        return True, TableEvent(kind, e.table, e.network_id, e.key, e.value, e.owner)

    def entries(self, table: str, network_id: str) -> dict[str, bytes]:
        return {
            k[2]: e.value
            for k, e in self._by_net.get(network_id, {}).items()
            if k[0] == table and not e.deleted
        }

    def live(self) -> list[TableEntry]:
        return [e for e in self._entries.values() if not e.deleted]

    def network_entries(self, network_id: str) -> list[TableEntry]:
        return list(self._by_net.get(network_id, {}).values())

    def owned_by(self, owner: str) -> list[TableEntry]:
        return [e for e in self._entries.values() if e.owner == owner]

    def _remove(self, pred) -> list[TableEvent]:
        events = []
        for k in [k for k, e in self._entries.items() if pred(k, e)]:
            e = self._pop(k)
            self._tombstone_at.pop(k, None)
            if not e.deleted:
                events.append(TableEvent(EventKind.DELETE, e.table, e.network_id, e.key, e.value, e.owner))
        return events

    def purge_owner(self, owner: str, network_id: str | None = None) -> list[TableEvent]:
        """Forget every entry (and tombstone) of ``owner`` (a dead or departed node)."""
        return self._remove(lambda k, e: e.owner == owner and (network_id is None or k[1] == network_id))

    def drop_network(self, network_id: str) -> list[TableEvent]:
        """Forget a network this node left."""
        keys = set(self._by_net.get(network_id, {}))
        return self._remove(lambda k, e: k in keys)

    def reap(self, older_than: float) -> int:
        """Remove tombstones created before ``older_than`` (monotonic time)."""
        old = [k for k, t in self._tombstone_at.items() if t < older_than]
        for k in old:
            del self._tombstone_at[k]
            self._pop(k)
        return len(old)
