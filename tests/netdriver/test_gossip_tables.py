"""Table merge (shoal.netdriver.tables): any delivery order of the same versions converges."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from shoal.netdriver.tables import EventKind, LamportClock, TableStore
from shoal.proto.gossip_pb2 import TableEntry

# one operation = (owner, key, ltime, deleted, value); versions of the same (ltime, owner) carry one
# content, as they do in the cluster (an owner never reuses a clock value)
ops = st.lists(
    st.tuples(st.sampled_from(["n1", "n2", "n3"]), st.sampled_from(["a", "b", "c"]), st.integers(1, 12),
              st.booleans(), st.binary(max_size=3)),
    max_size=25,
    unique_by=lambda o: (o[0], o[1], o[2]),
)


def entry(owner: str, key: str, ltime: int, deleted: bool, value: bytes) -> TableEntry:
    return TableEntry(table="t", network_id="n", key=key, value=value, owner=owner, ltime=ltime, deleted=deleted)


def replay(entries: list[TableEntry]) -> tuple[TableStore, dict[str, bytes]]:
    """Merge in order; also rebuild the table from the events only (what a subscriber sees)."""
    s = TableStore()
    seen: dict[str, bytes] = {}
    for e in entries:
        _, ev = s.merge(e)
        if ev is None:
            continue
        if ev.kind == EventKind.DELETE:
            assert seen.pop(ev.key) == ev.value
        else:
            assert (ev.kind == EventKind.UPDATE) == (ev.key in seen)
            seen[ev.key] = ev.value
    return s, seen


@settings(max_examples=300, deadline=None)
@given(ops, st.randoms(use_true_random=False), st.integers(0, 3))
def test_any_delivery_order_converges(op_list, rnd, dups):
    entries = [entry(*o) for o in op_list]
    a_order = list(entries)
    b_order = list(entries) + [entries[i % len(entries)] for i in range(dups)] if entries else []
    rnd.shuffle(a_order)
    rnd.shuffle(b_order)
    a, a_seen = replay(a_order)
    b, b_seen = replay(b_order)
    assert a.entries("t", "n") == b.entries("t", "n") == a_seen == b_seen
    for k in "abc":
        ea, eb = a.get("t", "n", k), b.get("t", "n", k)
        assert (ea is None) == (eb is None)
        if ea is not None:
            assert (ea.ltime, ea.owner, ea.deleted) == (eb.ltime, eb.owner, eb.deleted)
            # the winner is the largest version
            best = max((e for e in entries if e.key == k), key=lambda e: (e.ltime, e.owner, e.deleted))
            assert ea.ltime == best.ltime and ea.owner == best.owner


def test_purge_reap_and_drop():
    s = TableStore()
    s.merge(entry("n1", "a", 1, False, b"1"))
    s.merge(entry("n2", "b", 1, False, b"2"))
    s.merge(entry("n1", "c", 2, True, b"3"), now=100.0)
    evs = s.purge_owner("n1")
    assert [(e.kind, e.key) for e in evs] == [(EventKind.DELETE, "a")]
    assert s.get("t", "n", "c") is None  # tombstones of a purged owner go too
    s.merge(entry("n2", "d", 3, True, b""), now=100.0)
    assert s.reap(older_than=50.0) == 0 and s.reap(older_than=101.0) == 1
    assert [e.key for e in s.drop_network("n")] == ["b"]
    assert len(s) == 0


def test_lamport_clock_is_monotonic_and_witnesses():
    c = LamportClock()
    t1 = c.next()
    c.witness(t1 + 1000)
    assert c.next() == t1 + 1001
    c.witness(5)
    assert c.next() > t1 + 1001
