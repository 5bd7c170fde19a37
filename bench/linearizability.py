"""Linearizability checker for histories of per-key registers (stand-alone, stdlib only).

A history is a list of `Op`: one client operation on one key, with the time it was invoked, the
time it completed and its outcome. Every key is an independent register whose initial state is
*absent* (`None`):

- ``write(v)`` sets the value to ``v``;
- ``create(v)`` sets it to ``v`` and succeeds only if the key is absent;
- ``cas((expected, new))`` sets it to ``new`` and succeeds only if the value equals ``expected``
  (``expected=None`` means "absent");
- ``delete`` makes the key absent;
- ``read`` returns the value, or ``None`` when the key is absent.

Outcomes: ``"ok"`` ops took effect exactly once, somewhere between invoke and complete.
``"fail"`` ops definitely did not take effect and are dropped. ``"unknown"`` ops (a timeout, a
lost connection) may or may not have taken effect, at any time after their invoke: their
completion is taken as +inf; an unknown read carries no information and is dropped.

Assumptions the workload must guarantee (the two plain claims rely on them; the search does not):
every written value is unique per key (no two writes/creates/cas put the same value in one key),
values are hashable (JSON scalars; lists are turned into tuples), and ``None`` is never written
(it means "absent").

`check` partitions the history by key (linearizability is compositional, so each register is
checked alone) and runs, per key, the Wing & Gong search as refined by Lowe and used by porcupine:
a doubly linked list of call/return entries sorted by time, an explicit stack instead of recursion,
and a cache of visited (set of linearized ops, register state) pairs so that no configuration is
explored twice. An op whose invoke equals another's completion is treated as concurrent with it
(permissive: coarse clocks do not raise false alarms). Cost grows with concurrency, not length:
a few thousand ops per key with ~5 clients in flight take well under a second. An op with an unknown
outcome never completes, so it stays concurrent with everything after it; `_bound_unknown` drops
those whose value nobody observes and bounds those whose value someone observed (both exact), so
only unknown deletes and unknown writes of values observed by unknown ops stay open-ended.

Next to the verdict, `check` computes two cheap claims directly from the timestamps (O(n log n),
independent of the search); each is sound, i.e. any entry proves the key is not linearizable.
See `lost_and_stale` for their exact definitions.

    from linearizability import Op, check, report
    result = check(history)
    print(report(result))
"""

from __future__ import annotations

import bisect
import json
import math
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

Kind = Literal["read", "write", "cas", "create", "delete"]
Outcome = Literal["ok", "fail", "unknown"]

KINDS: frozenset[str] = frozenset({"read", "write", "cas", "create", "delete"})
OUTCOMES: frozenset[str] = frozenset({"ok", "fail", "unknown"})
WRITE_KINDS: frozenset[str] = frozenset({"write", "create", "cas"})  # ops that store a value
MUTATING_KINDS: frozenset[str] = WRITE_KINDS | {"delete"}

_READ, _WRITE, _CREATE, _CAS, _DELETE = range(5)
_KIND_CODE = {"read": _READ, "write": _WRITE, "create": _CREATE, "cas": _CAS, "delete": _DELETE}


def _freeze(value: Any) -> Any:
    """Lists (e.g. from JSON) become tuples, so values are hashable and compare as written."""
    if isinstance(value, list | tuple):
        return tuple(_freeze(v) for v in value)
    return value


@dataclass(frozen=True)
class Op:
    """One client operation on one key.

    `value`: for write/create the value written; for cas the pair ``(expected, new)``; for read
    the value returned (``None``: the key was absent); ignored for delete. `complete` is ``None``
    or ``math.inf`` when the outcome is unknown (it is ignored for unknown ops anyway).
    """

    client: int
    key: str
    kind: Kind
    value: Any
    invoke: float
    complete: float | None
    outcome: Outcome = "ok"

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"Op.kind {self.kind!r} is not one of {sorted(KINDS)}")
        if self.outcome not in OUTCOMES:
            raise ValueError(f"Op.outcome {self.outcome!r} is not one of {sorted(OUTCOMES)}")
        object.__setattr__(self, "value", _freeze(self.value))
        if self.kind == "cas" and self.outcome != "fail":
            if not (isinstance(self.value, tuple) and len(self.value) == 2):
                raise ValueError(f"Op.value of a cas must be (expected, new), got {self.value!r}")
        if not math.isfinite(self.invoke):
            raise ValueError(f"Op.invoke must be a finite time, got {self.invoke!r}")
        if self.outcome == "ok":
            if self.complete is None or not math.isfinite(self.complete):
                raise ValueError("Op.complete must be a finite time for an ok op; use outcome='unknown'")
            if self.complete < self.invoke:
                raise ValueError(f"Op.complete {self.complete} is before Op.invoke {self.invoke}")

    @property
    def end(self) -> float:
        """Latest time the op can take effect: its completion, or +inf when the outcome is unknown."""
        if self.outcome == "unknown" or self.complete is None:
            return math.inf
        return self.complete

    @property
    def written(self) -> Any:
        """The register value after this op took effect (mutating ops only; None = absent)."""
        if self.kind == "cas":
            return self.value[1]
        if self.kind == "delete":
            return None
        return self.value


@dataclass
class KeyFailure:
    """Why one key's history is not linearizable.

    `prefix`: the longest sequence of ops the search could linearize (in linearization order);
    `unplaced`: the op that had to take effect next (it completed) but could not, after `prefix`;
    `state`: the register value after `prefix`. `inconclusive` is set when the search stopped at
    `max_states` without a verdict (then the key is not proven non-linearizable).
    """

    key: str
    explanation: str
    prefix: list[Op] = field(default_factory=list)
    unplaced: Op | None = None
    state: Any = None
    inconclusive: bool = False


@dataclass
class Result:
    """Verdict of `check`.

    `ok`: every key is linearizable (False when a key failed or its search was inconclusive).
    `failures`: one entry per key that is not linearizable (or inconclusive).
    `ops_checked`: ops given to the search (fail ops and unknown reads are dropped);
    `keys`: number of keys checked. `lost_writes` and `stale_reads`: see `lost_and_stale`.
    `states`: configurations the search visited (all keys); `elapsed`: seconds spent in `check`.
    """

    ok: bool
    failures: list[KeyFailure]
    ops_checked: int
    keys: int
    lost_writes: list[Op]
    stale_reads: list[Op]
    states: int = 0
    elapsed: float = 0.0


def describe(op: Op) -> str:
    """One short line for an op: ``c3 cas(1->2) [0.100, 0.250] ok``."""
    if op.kind == "cas":
        what = f"cas({op.value[0]!r}->{op.value[1]!r})"
    elif op.kind == "delete":
        what = "delete"
    elif op.kind == "read":
        what = "read->absent" if op.value is None else f"read->{op.value!r}"
    else:
        what = f"{op.kind}({op.value!r})"
    end = "?" if op.end == math.inf else f"{op.end:.3f}"
    return f"c{op.client} {what} [{op.invoke:.3f}, {end}] {op.outcome}"


def _relevant(op: Op) -> bool:
    """Ops that constrain the history: fail ops never happened, unknown reads say nothing."""
    if op.outcome == "fail":
        return False
    return not (op.outcome == "unknown" and op.kind == "read")


def check(history: Sequence[Op], *, max_states: int | None = None) -> Result:
    """Check that `history` is linearizable, key by key.

    `max_states` bounds the configurations visited per key (None: unbounded); a key that exceeds it
    is reported as an inconclusive failure. Raises ValueError for malformed ops (see `Op`).
    """
    started = time.perf_counter()
    by_key: dict[str, list[Op]] = {}
    for op in history:
        if _relevant(op):
            by_key.setdefault(op.key, []).append(op)
    failures: list[KeyFailure] = []
    lost: list[Op] = []
    stale: list[Op] = []
    states = 0
    for key, ops in by_key.items():
        failure, visited = _search(key, ops, max_states)
        states += visited
        if failure is not None:
            failures.append(failure)
        key_lost, key_stale = lost_and_stale(ops)
        lost.extend(key_lost)
        stale.extend(key_stale)
    return Result(
        ok=not failures,
        failures=failures,
        ops_checked=sum(len(ops) for ops in by_key.values()),
        keys=len(by_key),
        lost_writes=lost,
        stale_reads=stale,
        states=states,
        elapsed=time.perf_counter() - started,
    )


def _bound_unknown(ops: list[Op]) -> tuple[list[Op], list[float]]:
    """Shrink the search space of unknown-outcome writes/creates/cas (an unknown op is otherwise
    pending forever, and a failing search visits every subset of them). Both rules are exact:

    - a value that no op reads or expects (cas) can never be observed, so the op that writes it
      changes nothing any other op could notice: drop it (a history with it linearized stays
      linearizable without it);
    - when exactly one op writes a value and some ok op observes it (a read of it, or an ok cas
      expecting it), that op took effect before the earliest such observer completed: it becomes an
      ordinary op completing then.

    Returns the ops kept and, for each, the latest time it may take effect (+inf: maybe never).
    """
    observed: set[Any] = set()
    observed_by: dict[Any, float] = {}
    writers: dict[Any, int] = {}
    for op in ops:
        if op.kind == "read" or op.kind == "cas":
            seen = op.value if op.kind == "read" else op.value[0]
            observed.add(seen)
            if op.outcome == "ok":
                observed_by[seen] = min(observed_by.get(seen, math.inf), op.end)
        if op.kind in WRITE_KINDS:
            writers[op.written] = writers.get(op.written, 0) + 1
    kept: list[Op] = []
    ends: list[float] = []
    for op in ops:
        end = op.end
        if op.outcome == "unknown" and op.kind in WRITE_KINDS and op.written is not None:
            if op.written not in observed:
                continue
            if writers[op.written] == 1 and op.written in observed_by:
                end = max(observed_by[op.written], op.invoke)
        kept.append(op)
        ends.append(end)
    return kept, ends


def _search(key: str, ops: list[Op], max_states: int | None) -> tuple[KeyFailure | None, int]:
    """Wing & Gong / Lowe search with a (linearized set, state) cache, for one key's ops.

    Entries are numbered by position in time order; position 0 is the head sentinel and 2n+1 the
    tail. Linearizing an op "lifts" its call and return entries out of the list; backtracking
    puts them back (stack discipline keeps the prev/next links valid).
    """
    ops, ends = _bound_unknown(ops)
    n = len(ops)
    kinds = [_KIND_CODE[op.kind] for op in ops]
    values = [op.value for op in ops]
    bounded = [end != math.inf for end in ends]
    # Entry e = 2*i is the call of op i, 2*i + 1 its return. Calls sort before returns at equal times.
    order = sorted(range(2 * n), key=lambda e: (ops[e >> 1].invoke if e & 1 == 0 else ends[e >> 1], e & 1, e))
    head, tail = 0, 2 * n + 1
    size = 2 * n + 2
    is_call = [False] * size
    op_at = [-1] * size
    match = [0] * size  # position of a call's return entry
    pos_of = [0] * (2 * n)
    for p, e in enumerate(order, start=1):
        is_call[p] = e & 1 == 0
        op_at[p] = e >> 1
        pos_of[e] = p
    for p in range(1, size - 1):
        if is_call[p]:
            match[p] = pos_of[2 * op_at[p] + 1]
    nxt = list(range(1, size + 1))
    prv = list(range(-1, size - 1))

    required = sum(bounded)  # ops that must be linearized (unknown ones may never take effect)
    state: Any = None
    linearized = 0
    cache: set[tuple[int, Any]] = {(0, None)}
    stack: list[tuple[int, Any]] = []  # (call position, state before it)
    best_depth = -1
    best: tuple[list[int], int, Any] = ([], -1, None)
    entry = nxt[head]
    while required:
        if is_call[entry]:
            i = op_at[entry]
            kind = kinds[i]
            value = values[i]
            if kind == _READ:
                legal, new_state = state == value, state
            elif kind == _WRITE:
                legal, new_state = True, value
            elif kind == _CAS:
                legal, new_state = state == value[0], value[1]
            elif kind == _CREATE:
                legal, new_state = state is None, value
            else:
                legal, new_state = True, None
            if legal:
                candidate = linearized | (1 << i)
                config = (candidate, new_state)
                if config not in cache:
                    cache.add(config)
                    if max_states is not None and len(cache) > max_states:
                        return _inconclusive(key, ops, stack, op_at, state, max_states), len(cache)
                    stack.append((entry, state))
                    state = new_state
                    linearized = candidate
                    required -= bounded[i]
                    ret = match[entry]  # lift the call and its return out of the list
                    nxt[prv[entry]] = nxt[entry]
                    prv[nxt[entry]] = prv[entry]
                    nxt[prv[ret]] = nxt[ret]
                    prv[nxt[ret]] = prv[ret]
                    entry = nxt[head]
                    continue
            entry = nxt[entry]
        else:
            # A return entry (or the tail): its op must have taken effect by now and none of the
            # pending ops can be linearized next from here. Backtrack.
            if len(stack) > best_depth:
                best_depth = len(stack)
                best = ([op_at[p] for p, _ in stack], op_at[entry] if entry != tail else -1, state)
            if not stack:
                return _failure(key, ops, *best), len(cache)
            entry, state = stack.pop()
            i = op_at[entry]
            linearized ^= 1 << i
            required += bounded[i]
            ret = match[entry]  # put the return back, then the call (reverse of the lift)
            nxt[prv[ret]] = ret
            prv[nxt[ret]] = ret
            nxt[prv[entry]] = entry
            prv[nxt[entry]] = entry
            entry = nxt[entry]
    return None, len(cache)


def _failure(key: str, ops: list[Op], prefix: list[int], unplaced: int, state: Any) -> KeyFailure:
    placed = [ops[i] for i in prefix]
    blocked = ops[unplaced] if unplaced >= 0 else None
    held = "absent" if state is None else repr(state)
    tail = "; ".join(describe(op) for op in placed[-3:]) or "nothing"
    explanation = (
        f"key {key!r}: longest linearizable prefix has {len(placed)} of {len(ops)} ops "
        f"(ending {tail}; register {held})"
    )
    if blocked is not None:
        explanation += f"; then {describe(blocked)} cannot be placed before it completed"
    return KeyFailure(key, explanation, placed, blocked, state)


def _inconclusive(
    key: str, ops: list[Op], stack: list[tuple[int, Any]], op_at: list[int], state: Any, limit: int
) -> KeyFailure:
    placed = [ops[op_at[p]] for p, _ in stack]
    explanation = f"key {key!r}: search stopped after {limit} states without a verdict ({len(ops)} ops)"
    return KeyFailure(key, explanation, placed, None, state, inconclusive=True)


class _MinTable:
    """Sparse table: minimum of values[lo:hi] in O(1) after O(n log n) preparation."""

    def __init__(self, values: list[float]) -> None:
        self.levels = [values]
        width = 1
        while 2 * width <= len(values):
            below = self.levels[-1]
            self.levels.append([min(below[i], below[i + width]) for i in range(len(below) - width)])
            width *= 2

    def min(self, lo: int, hi: int) -> float:
        if hi <= lo:
            return math.inf
        level = (hi - lo).bit_length() - 1
        row = self.levels[level]
        return min(row[lo], row[hi - (1 << level)])


def lost_and_stale(ops: Iterable[Op]) -> tuple[list[Op], list[Op]]:
    """The two plain claims for one key's ops (fail ops and unknown reads are ignored).

    The *origin* of a value a read returned is the latest completion of an op that could have
    produced it: for a value v, the write/create/cas that wrote v (+inf if that op's outcome is
    unknown; no claim at all if no op wrote v); for absent, the latest completion of a delete
    (+inf if a delete's outcome is unknown; -inf if there is no delete: the initial state).

    stale read: an ok read R such that some ok mutating op W2 (write/create/cas/delete) that leaves
    a value other than R's completed before R was invoked, and W2 was invoked after the origin of
    R's value. R saw something strictly older than a change acknowledged before R began.

    lost write: an ok write/create/cas W such that (a) some ok read R returned a value whose origin
    is before W's invoke (an older value, or absent while every delete completed before W was
    invoked), where R was invoked after W completed but no later than the completion of any ok
    mutation invoked after W completed (W was still the newest acknowledged change, or one of the
    concurrent newest, when R began: writes already superseded by a later acknowledged change are
    not charged), and (b) no ok read invoked after W completed returned W's value. W was
    acknowledged, then the register went back in time and W was never seen again.

    Both relations are proofs of non-linearizability given unique values: the only ops that can
    produce R's value precede W2 (resp. W) in real time, which precedes R. A stale read whose
    write is observed later (a lagging replica) is in `stale_reads` only; a write that vanished
    puts the write in `lost_writes` and the read(s) that proved it in `stale_reads`.
    """
    relevant = [op for op in ops if _relevant(op)]
    origin_of: dict[Any, float] = {}
    absent_origin = -math.inf
    for op in relevant:
        if op.kind not in MUTATING_KINDS:
            continue
        if op.written is None:
            absent_origin = max(absent_origin, op.end)
        else:
            origin_of[op.written] = max(origin_of.get(op.written, -math.inf), op.end)

    def origin(read: Op) -> float:
        if read.value is None:
            return absent_origin
        return origin_of.get(read.value, math.inf)

    reads = sorted((op for op in relevant if op.kind == "read"), key=lambda op: op.invoke)
    acked = sorted(
        (op for op in relevant if op.kind in MUTATING_KINDS and op.outcome == "ok"), key=lambda op: op.end
    )

    # Stale reads: latest invoke among ok mutations completed before R.invoke, vs origin(R).
    def prefix_max(muts: list[Op]) -> tuple[list[float], list[float]]:
        ends, best, running = [], [], -math.inf
        for op in muts:
            running = max(running, op.invoke)
            ends.append(op.end)
            best.append(running)
        return ends, best

    all_ends, all_best = prefix_max(acked)
    val_ends, val_best = prefix_max([op for op in acked if op.written is not None])
    stale: list[Op] = []
    for read in reads:
        ends, best = (val_ends, val_best) if read.value is None else (all_ends, all_best)
        k = bisect.bisect_left(ends, read.invoke)
        if k and best[k - 1] > origin(read):
            stale.append(read)

    # Lost writes: a witness R must fall in (W.complete, superseded(W)], where superseded(W) is the
    # earliest completion of an ok mutation invoked after W completed; then min origin < W.invoke.
    invokes = [op.invoke for op in reads]
    origins = _MinTable([origin(op) for op in reads])
    by_invoke = sorted(acked, key=lambda op: op.invoke)
    mutation_invokes = [op.invoke for op in by_invoke]
    superseded = [math.inf] * (len(by_invoke) + 1)
    for k in range(len(by_invoke) - 1, -1, -1):
        superseded[k] = min(superseded[k + 1], by_invoke[k].end)
    last_seen: dict[Any, float] = {}
    for read in reads:
        if read.value is not None:
            last_seen[read.value] = max(last_seen.get(read.value, -math.inf), read.invoke)
    lost: list[Op] = []
    for op in acked:
        if op.kind not in WRITE_KINDS or op.written is None:
            continue
        if last_seen.get(op.written, -math.inf) > op.end:
            continue
        first = bisect.bisect_right(invokes, op.end)
        until = superseded[bisect.bisect_right(mutation_invokes, op.end)]
        last = bisect.bisect_right(invokes, until)
        if origins.min(first, last) < op.invoke:
            lost.append(op)
    lost.sort(key=lambda op: op.invoke)
    return lost, stale


def report(result: Result) -> str:
    """A few readable lines about a `Result`."""
    head = (
        f"{result.ops_checked} ops over {result.keys} key(s), {result.states} states, {result.elapsed:.3f} s"
    )
    if result.ok and not result.lost_writes and not result.stale_reads:
        return f"linearizable: {head}"
    lines = [f"NOT linearizable: {head}" if not result.ok else f"linearizable (but see below): {head}"]
    for failure in result.failures:
        lines.append(f"  {failure.explanation}")
    for name, ops in (("lost writes", result.lost_writes), ("stale reads", result.stale_reads)):
        if ops:
            shown = "; ".join(describe(op) for op in ops[:5])
            more = f" (+{len(ops) - 5} more)" if len(ops) > 5 else ""
            lines.append(f"  {name}: {len(ops)}: {shown}{more}")
    return "\n".join(lines)


def to_jsonl(history: Iterable[Op], path: str | Path) -> None:
    """Write one JSON object per op (unknown or missing completion is written as null)."""
    with open(path, "w", encoding="utf-8") as out:
        for op in history:
            complete = op.complete if op.complete is not None and math.isfinite(op.complete) else None
            record = {
                "client": op.client,
                "key": op.key,
                "kind": op.kind,
                "value": op.value,
                "invoke": op.invoke,
                "complete": complete,
                "outcome": op.outcome,
            }
            out.write(json.dumps(record) + "\n")


def history_from_jsonl(path: str | Path) -> list[Op]:
    """Read a history written by `to_jsonl` (blank lines are skipped)."""
    history: list[Op] = []
    with open(path, encoding="utf-8") as src:
        for number, line in enumerate(src, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                history.append(
                    Op(
                        client=int(record["client"]),
                        key=str(record["key"]),
                        kind=record["kind"],
                        value=record.get("value"),
                        invoke=float(record["invoke"]),
                        complete=None if record.get("complete") is None else float(record["complete"]),
                        outcome=record.get("outcome", "ok"),
                    )
                )
            except (KeyError, TypeError, ValueError) as exc:
                raise ValueError(f"{path}:{number}: not an op record: {exc}") from exc
    return history
