"""Tests of bench/linearizability.py: the register linearizability checker and its two plain claims."""

from __future__ import annotations

import math
import random
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

from linearizability import (  # noqa: E402
    Op,
    Result,
    check,
    history_from_jsonl,
    lost_and_stale,
    report,
    to_jsonl,
)


def w(
    client: int, value: object, invoke: float, complete: float | None, outcome: str = "ok", key: str = "k"
) -> Op:
    return Op(client, key, "write", value, invoke, complete, outcome)  # type: ignore[arg-type]


def r(
    client: int, value: object, invoke: float, complete: float | None, outcome: str = "ok", key: str = "k"
) -> Op:
    return Op(client, key, "read", value, invoke, complete, outcome)  # type: ignore[arg-type]


def cas(
    client: int, expected: object, new: object, invoke: float, complete: float | None, outcome: str = "ok"
) -> Op:
    return Op(client, "k", "cas", (expected, new), invoke, complete, outcome)  # type: ignore[arg-type]


def simulate(n_ops: int, clients: int = 5, seed: int = 0, unknown: int = 0, key: str = "k") -> list[Op]:
    """A history of a linearizable register: each client runs ops back to back, every op takes
    effect at a random point inside its [invoke, complete] interval, and the register is executed
    sequentially in the order of those points. `unknown` writes get an unknown outcome (half of
    them take effect, half do not)."""
    rng = random.Random(seed)
    slots: list[tuple[float, int, float, float]] = []  # (linearization point, client, invoke, complete)
    for client in range(clients):
        t = rng.uniform(0.0, 1.0)
        for _ in range(n_ops // clients):
            start = t + rng.uniform(0.0, 0.2)
            end = start + rng.uniform(0.1, 3.0)
            slots.append((rng.uniform(start, end), client, start, end))
            t = end
    slots.sort()
    unknown_at = set(rng.sample(range(len(slots)), unknown))
    state: object = None
    written: list[object] = []
    counter = 0
    history: list[Op] = []
    for index, (_, client, start, end) in enumerate(slots):
        counter += 1
        roll = rng.random()
        if index in unknown_at:
            if rng.random() < 0.5:
                state = counter
                written.append(counter)
            history.append(w(client, counter, start, None, "unknown", key))
        elif roll < 0.45:
            history.append(r(client, state, start, end, key=key))
        elif roll < 0.75:
            state = counter
            written.append(counter)
            history.append(w(client, counter, start, end, key=key))
        elif roll < 0.90:
            expected = state if rng.random() < 0.6 or not written else rng.choice(written)
            outcome = "ok" if expected == state else "fail"
            if outcome == "ok":
                state = counter
                written.append(counter)
            history.append(Op(client, key, "cas", (expected, counter), start, end, outcome))
        elif roll < 0.95:
            outcome = "ok" if state is None else "fail"
            if outcome == "ok":
                state = counter
                written.append(counter)
            history.append(Op(client, key, "create", counter, start, end, outcome))
        else:
            state = None
            history.append(Op(client, key, "delete", None, start, end))
    history.sort(key=lambda op: op.invoke)
    return history


def make_stale(history: list[Op], seed: int = 0) -> tuple[list[Op], Op]:
    """Alter one read in the second half to return an old value: one whose writer completed before
    another acknowledged write was invoked, that write itself completing before the read began.
    Never linearizable (values are unique)."""
    rng = random.Random(seed)
    writes = [op for op in history if op.kind in ("write", "create", "cas") and op.outcome == "ok"]
    reads = [i for i, op in enumerate(history) if op.kind == "read" and op.outcome == "ok"]
    for index in rng.sample(reads[len(reads) // 2 :], len(reads) - len(reads) // 2):
        read = history[index]
        before = [op for op in writes if op.end < read.invoke]
        if not before:
            continue
        newer = max(before, key=lambda op: op.end)
        older = [op for op in writes if op.end < newer.invoke and op.written != read.value]
        if older:
            altered = replace(read, value=rng.choice(older).written)
            return history[:index] + [altered] + history[index + 1 :], altered
    raise AssertionError("no read to alter")


def assert_clean(result: Result) -> None:
    assert result.ok, report(result)
    assert result.failures == []
    assert result.lost_writes == [] and result.stale_reads == []


def test_sequential_history_passes() -> None:
    history = [
        r(1, None, 0, 1),
        Op(1, "k", "create", "a", 2, 3, "ok"),
        r(2, "a", 4, 5),
        w(1, "b", 6, 7),
        cas(2, "b", "c", 8, 9),
        r(1, "c", 10, 11),
        Op(2, "k", "delete", None, 12, 13, "ok"),
        r(1, None, 14, 15),
        Op(1, "k", "create", "d", 16, 17, "ok"),
        r(2, "d", 18, 19),
    ]
    result = check(history)
    assert_clean(result)
    assert (result.ops_checked, result.keys) == (10, 1)
    assert report(result).startswith("linearizable:")


@pytest.mark.parametrize("seen", [1, 2])
def test_concurrent_read_may_see_either_value(seen: int) -> None:
    history = [
        w(1, 1, 0, 1),
        w(1, 2, 2, 6),  # overlaps both reads
        r(2, seen, 3, 4),
        r(3, 2, 3.5, 5),
        r(2, 2, 6.5, 7),
    ]
    assert_clean(check(history))


def test_overlapping_writes_either_order() -> None:
    history = [w(1, 1, 0, 4), w(2, 2, 1, 5), r(3, 1, 6, 7), r(3, 1, 8, 9)]
    assert_clean(check(history))
    history = [w(1, 1, 0, 4), w(2, 2, 1, 5), r(3, 2, 6, 7)]
    assert_clean(check(history))


def test_lost_write_fails_and_is_reported() -> None:
    old, acked, late = w(1, 1, 0, 1), w(1, 2, 2, 3), r(2, 1, 4, 5)
    result = check([old, acked, late])
    assert not result.ok
    assert result.lost_writes == [acked]
    assert result.stale_reads == [late]
    [failure] = result.failures
    assert failure.key == "k" and failure.unplaced == late
    assert failure.prefix == [old, acked] and failure.state == 2
    text = report(result)
    assert "NOT linearizable" in text and "lost writes: 1" in text and "read->1" in text


def test_stale_read_fails_and_is_reported() -> None:
    stale = r(2, 1, 4, 5)
    history = [w(1, 1, 0, 1), w(1, 2, 2, 3), stale, r(3, 2, 6, 7)]  # 2 is seen later: stale, not lost
    result = check(history)
    assert not result.ok
    assert result.stale_reads == [stale]
    assert result.lost_writes == []
    assert result.failures[0].unplaced == stale


def test_read_of_absent_after_acknowledged_create_is_stale_and_lost() -> None:
    create = Op(1, "k", "create", 1, 0, 1, "ok")
    read = r(2, None, 2, 3)
    result = check([create, read])
    assert not result.ok
    assert result.lost_writes == [create] and result.stale_reads == [read]
    # A delete that may come after the create explains the absent read.
    delete = Op(3, "k", "delete", None, 0.5, 2.5, "ok")
    assert_clean(check([create, delete, read]))


def test_only_the_newest_acknowledged_write_is_charged_as_lost() -> None:
    first, superseded, newest = w(1, 1, 0, 1), w(1, 2, 2, 3), w(2, 3, 4, 5)
    read = r(3, 1, 6, 7)
    result = check([first, superseded, newest, read])
    assert not result.ok
    assert result.lost_writes == [newest]
    assert result.stale_reads == [read]
    # Two concurrent newest writes, neither seen again: both are lost.
    other = w(3, 4, 3.5, 5.5)
    result = check([first, superseded, newest, other, r(3, 1, 6, 7)])
    assert result.lost_writes == [other, newest]


def test_concurrent_cas_with_same_expected_value_cannot_both_succeed() -> None:
    base = [w(1, 1, 0, 1)]
    both = base + [cas(2, 1, 2, 2, 4), cas(3, 1, 3, 2.5, 4.5)]
    result = check(both)
    assert not result.ok
    assert result.failures[0].unplaced is not None and result.failures[0].unplaced.kind == "cas"
    one_failed = base + [cas(2, 1, 2, 2, 4), cas(3, 1, 3, 2.5, 4.5, "fail"), r(1, 2, 5, 6)]
    assert_clean(check(one_failed))
    chained = base + [cas(2, 1, 2, 2, 4), cas(3, 2, 3, 2.5, 4.5), r(1, 3, 5, 6)]
    assert_clean(check(chained))


def test_create_and_delete_semantics() -> None:
    twice = [Op(1, "k", "create", 1, 0, 1, "ok"), Op(2, "k", "create", 2, 2, 3, "ok")]
    assert not check(twice).ok
    again = [Op(1, "k", "create", 1, 0, 1), Op(2, "k", "delete", None, 2, 3), Op(2, "k", "create", 2, 4, 5)]
    assert_clean(check(again))


@pytest.mark.parametrize("complete", [None, math.inf])
@pytest.mark.parametrize("seen", [2, 1])
def test_unknown_write_may_or_may_not_take_effect(seen: int, complete: float | None) -> None:
    history = [w(1, 1, 0, 1), w(2, 2, 2, complete, "unknown"), r(3, seen, 5, 6), r(3, seen, 7, 8)]
    result = check(history)
    assert_clean(result)
    assert result.ops_checked == 4


def test_unknown_write_takes_effect_at_most_once_and_not_before_invoke() -> None:
    flip_back = [w(1, 1, 0, 1), w(2, 2, 2, None, "unknown"), r(3, 2, 5, 6), r(3, 1, 7, 8)]
    assert not check(flip_back).ok
    before_invoke = [w(1, 1, 0, 1), r(3, 2, 2, 3), w(2, 2, 4, None, "unknown")]
    assert not check(before_invoke).ok


def test_unknown_read_and_failed_ops_are_ignored() -> None:
    history = [
        w(1, 1, 0, 1),
        w(2, 2, 2, 3, "fail"),
        cas(2, 1, 3, 3.5, 3.8, "fail"),
        Op(2, "k", "delete", None, 3.9, 3.95, "fail"),
        r(3, 99, 2, None, "unknown"),
        r(3, 1, 4, 5),
    ]
    result = check(history)
    assert_clean(result)
    assert result.ops_checked == 2


def test_read_of_a_value_never_written_fails() -> None:
    result = check([w(1, 1, 0, 1), r(2, 7, 2, 3)])
    assert not result.ok
    assert result.stale_reads == [] and result.lost_writes == []  # no claim about unknown values


def test_keys_are_independent() -> None:
    history = [
        w(1, 1, 0, 1, key="a"),
        w(1, 1, 0, 1, key="b"),
        w(2, 2, 2, 3, key="b"),
        r(3, 1, 4, 5, key="a"),
        r(3, 1, 4, 5, key="b"),  # stale on b only
    ]
    result = check(history)
    assert not result.ok and result.keys == 2
    assert [failure.key for failure in result.failures] == ["b"]
    assert [op.key for op in result.stale_reads] == ["b"]


@pytest.mark.parametrize("seed", range(5))
def test_simulated_linearizable_register_passes_and_an_old_read_fails(seed: int) -> None:
    history = simulate(300, clients=5, seed=seed, unknown=3)
    assert len(history) == 300
    started = time.perf_counter()
    result = check(history)
    valid_s = time.perf_counter() - started
    assert_clean(result)
    altered, read = make_stale(history, seed)
    started = time.perf_counter()
    broken = check(altered)
    broken_s = time.perf_counter() - started
    print(
        f"seed {seed}: valid {valid_s * 1000:.1f} ms ({result.states} states), "
        f"altered {broken_s * 1000:.1f} ms ({broken.states} states)"
    )
    assert not broken.ok
    assert read in broken.stale_reads
    assert broken.failures[0].unplaced is not None


def test_claims_match_the_search_on_simulated_histories() -> None:
    for seed in range(20):
        history = simulate(100, clients=4, seed=100 + seed)
        assert lost_and_stale(history) == ([], [])
        altered, read = make_stale(history, seed)
        lost, stale = lost_and_stale(altered)
        assert read in stale


def brute_force(ops: list[Op]) -> bool:
    """Reference: try every order (unknown ops may also never take effect), respecting real time."""
    ops = [op for op in ops if op.outcome != "fail" and not (op.outcome == "unknown" and op.kind == "read")]
    seen: set[tuple[frozenset[int], object]] = set()

    def step(op: Op, state: object) -> tuple[bool, object]:
        if op.kind == "read":
            return op.value == state, state
        if op.kind == "create":
            return state is None, op.value
        if op.kind == "cas":
            return state == op.value[0], op.value[1]
        return True, op.written

    def search(left: frozenset[int], state: object) -> bool:
        if all(ops[i].outcome == "unknown" for i in left):
            return True
        if (left, state) in seen:
            return False
        seen.add((left, state))
        for i in left:
            if any(ops[j].end < ops[i].invoke for j in left):
                continue
            legal, after = step(ops[i], state)
            if legal and search(left - {i}, after):
                return True
            if ops[i].outcome == "unknown" and search(left - {i}, state):
                return True
        return False

    return search(frozenset(range(len(ops))), None)


def naive_claims(history: list[Op]) -> tuple[list[Op], list[Op]]:
    """The docstring definitions of lost writes and stale reads, evaluated pair by pair."""
    ops = [
        op for op in history if op.outcome != "fail" and not (op.outcome == "unknown" and op.kind == "read")
    ]
    mutations = [op for op in ops if op.kind in ("write", "create", "cas", "delete")]
    acked = [op for op in mutations if op.outcome == "ok"]
    reads = [op for op in ops if op.kind == "read"]

    def origin(read: Op) -> float:
        producers = [op.end for op in mutations if op.written == read.value]
        if read.value is None:
            return max(producers, default=-math.inf)
        return max(producers, default=math.inf)

    stale = [
        read
        for read in reads
        if any(op.written != read.value and op.end < read.invoke and op.invoke > origin(read) for op in acked)
    ]
    lost = [
        op
        for op in acked
        if op.kind != "delete"
        and not any(read.value == op.written and read.invoke > op.end for read in reads)
        and any(
            read.invoke > op.end
            and origin(read) < op.invoke
            and not any(later.invoke > op.end and later.end < read.invoke for later in acked)
            for read in reads
        )
    ]
    return sorted(lost, key=lambda op: op.invoke), sorted(stale, key=lambda op: op.invoke)


def random_small_history(rng: random.Random, unique: bool) -> list[Op]:
    values: list[object] = [None]
    history: list[Op] = []
    for counter in range(rng.randint(1, 7)):
        start = rng.randint(0, 10)
        end: float | None = start + rng.randint(0, 4)
        outcome = rng.choice(["ok"] * 5 + ["fail", "unknown", "unknown"])
        if outcome == "unknown":
            end = None
        kind = rng.choice(["read", "read", "write", "write", "cas", "create", "delete"])
        new: object = counter if unique or len(values) == 1 or rng.random() < 0.6 else rng.choice(values[1:])
        if kind == "read":
            value: object = rng.choice(values + [100])
        elif kind == "cas":
            value = (rng.choice(values), new)
        else:
            value = None if kind == "delete" else new
        if kind != "read" and kind != "delete":
            values.append(new)
        history.append(Op(rng.randint(0, 3), "k", kind, value, start, end, outcome))  # type: ignore[arg-type]
    return history


@pytest.mark.parametrize("unique", [True, False])
def test_agrees_with_brute_force_on_small_random_histories(unique: bool) -> None:
    rng = random.Random(42 + unique)
    verdicts = {True: 0, False: 0}
    for _ in range(2000):
        history = random_small_history(rng, unique)
        expected = brute_force(history)
        result = check(history)
        assert result.ok == expected, (history, report(result))
        if unique:
            if result.lost_writes or result.stale_reads:  # the plain claims are proofs
                assert not expected, (history, report(result))
            lost, stale = naive_claims(history)
            assert result.lost_writes == lost, history
            assert sorted(result.stale_reads, key=lambda op: op.invoke) == stale, history
        verdicts[expected] += 1
    print(f"brute force (unique values: {unique}): {verdicts[True]} linearizable, {verdicts[False]} not")
    assert min(verdicts.values()) > 300


def test_two_thousand_ops_on_one_key() -> None:
    history = simulate(2000, clients=5, seed=7, unknown=2)
    started = time.perf_counter()
    result = check(history)
    elapsed = time.perf_counter() - started
    print(f"2000 ops, concurrency 5: {elapsed:.3f} s, {result.states} states")
    assert_clean(result)
    altered, _ = make_stale(history)
    started = time.perf_counter()
    broken = check(altered)
    print(f"2000 ops with one stale read: {time.perf_counter() - started:.3f} s, {broken.states} states")
    assert not broken.ok


def test_max_states_gives_an_inconclusive_failure() -> None:
    history = simulate(300, clients=5, seed=3)
    result = check(history, max_states=50)
    assert not result.ok
    assert result.failures[0].inconclusive
    assert "without a verdict" in report(result)


def test_jsonl_round_trip(tmp_path: Path) -> None:
    history = simulate(60, clients=3, seed=1, unknown=2) + [cas(9, "x", "y", 100, 101, "fail")]
    path = tmp_path / "history.jsonl"
    to_jsonl(history, path)
    loaded = history_from_jsonl(path)
    for before, after in zip(history, loaded, strict=True):
        if before.outcome == "unknown":
            assert after.complete is None and after.end == math.inf
            assert replace(before, complete=None) == after
        else:
            assert before == after
    assert check(loaded).ok
    (tmp_path / "bad.jsonl").write_text('{"client": 1}\n')
    with pytest.raises(ValueError, match="bad.jsonl:1"):
        history_from_jsonl(tmp_path / "bad.jsonl")


def test_malformed_ops_are_rejected() -> None:
    with pytest.raises(ValueError, match="kind"):
        Op(1, "k", "append", 1, 0, 1)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="outcome"):
        Op(1, "k", "write", 1, 0, 1, "maybe")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="cas"):
        Op(1, "k", "cas", 1, 0, 1)
    with pytest.raises(ValueError, match="unknown"):
        Op(1, "k", "write", 1, 0, None)
    with pytest.raises(ValueError, match="before"):
        Op(1, "k", "write", 1, 2, 1)
    assert Op(1, "k", "cas", [1, 2], 0, 1).value == (1, 2)
