"""The scheduler: PENDING tasks get a node (ASSIGNED), decided in batches and committed in big transactions.

Filters, in the order a pending task's message reports them: node ready and active, platform,
placement constraints, networks available on the node (an encrypted one only where the node has
IPsec ESP), resources (CPU, memory, generic) against what the node advertises minus what its tasks
reserve, max replicas per node, host-mode published ports.
Strategy: spread -- among the nodes that pass, the one with the fewest tasks of the same service, then
the fewest tasks overall; placement preferences (`spread=node.labels.X`, applied in order) first
spread the service's tasks evenly over the label's values (nodes without the label form one group).

Tasks of a moment are decided together: the loop waits until no new event came for `debounce`
(50 ms) but never more than `max_delay` (1 s) after the first, groups pending tasks by service and
spec version, filters nodes once per group, then places the group's tasks from a heap keyed by those
counts (one heap per preference branch), and commits the assignments in transactions of `chunk`
actions. A task no node fits stays PENDING with a message summing up why, node by node, and is tried
again whenever nodes or tasks change.

The filters and the pending message are in `filters`, the heaps of the spread strategy in `spread`,
the constraint language in `constraint`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from shoal.manager import metrics
from shoal.manager.pacing import Pacer
from shoal.manager.scheduler.constraint import normalize_arch, parse_constraints, parse_spread
from shoal.manager.scheduler.filters import (
    Group,
    NodeInfo,
    dynamic_reason,
    explain,
    host_ports,
    network_ids,
    static_reason,
)
from shoal.manager.scheduler.spread import build_tree, pick
from shoal.manager.store import Store, StoreError, Unavailable, drain
from shoal.proto import objects_pb2, store_pb2, types_pb2, watch_pb2

log = logging.getLogger("shoal.scheduler")

WE = watch_pb2.WatchEvent
PENDING = types_pb2.PENDING
ASSIGNED = types_pb2.ASSIGNED
RUNNING = types_pb2.RUNNING
ASSIGNED_MESSAGE = "scheduler assigned task to node"


@dataclass(slots=True)
class _Rec:
    """What one task holds on its node."""

    node_id: str
    service_id: str
    active: bool
    cpu: int
    mem: int
    generic: tuple[tuple[str, int], ...]
    ports: tuple[tuple[int, int], ...]
    version: int


class Scheduler:
    """Leader loop. `Scheduler(store, debounce=0.05, max_delay=1.0, chunk=2000)`; `await run()` until cancelled."""

    def __init__(self, store: Store, debounce: float = 0.05, max_delay: float = 1.0, chunk: int = 2000) -> None:
        self.store = store
        self.debounce = debounce
        self.pacer = Pacer(0.0)
        self.max_delay = max_delay
        self.chunk = chunk
        self.nodes: dict[str, NodeInfo] = {}
        self._recs: dict[str, _Rec] = {}
        self._pending: dict[str, int] = {}  # task id -> version seen
        self._dirty = True
        self._order = 0
        self.idle = asyncio.Event()
        self.placed = 0  # assignments committed, for benchmarks and logs
        self.passes = 0

    # ---- state -------------------------------------------------------------------------------
    def _rebuild(self) -> None:
        sm = self.store.sm
        self.nodes = {}
        self._recs = {}
        self._pending = {}
        for n in sm.list("node"):
            self._node_update(n)
        for t in sm.list("task"):
            self._task_update(t)
        self._dirty = True

    def _node_update(self, node: objects_pb2.Node) -> None:
        info = self.nodes.get(node.id)
        if info is None:
            self._order += 1
            info = self.nodes[node.id] = NodeInfo(node.id, node, self._order)
        info.refresh(node)

    def _task_update(self, t: objects_pb2.Task, deleted: bool = False) -> bool:
        """Account one task's state; True when a pending task may fit somewhere now."""
        tid = t.id
        old = self._recs.get(tid)
        if old is not None and t.meta.version < old.version:
            return False  # an event older than what we already know
        changed = False
        new = None
        if not deleted and t.node_id and ASSIGNED <= t.status.state <= RUNNING:
            new = self._rec_of(t, t.meta.version)
        if old is not None:
            self._release(old)
            del self._recs[tid]
            changed = new is None or new.node_id != old.node_id or new.active != old.active
        if new is not None:
            self._recs[tid] = new
            self._hold(new)
        if not deleted and t.status.state == PENDING and t.desired_state <= RUNNING:
            if tid not in self._pending:
                changed = True
            self._pending[tid] = t.meta.version
        else:
            self._pending.pop(tid, None)
        return changed

    @staticmethod
    def _rec_of(t: objects_pb2.Task, version: int, node_id: str | None = None) -> _Rec:
        r = t.spec.resources.reservations
        return _Rec(
            node_id=node_id or t.node_id,
            service_id=t.service_id,
            active=t.desired_state <= RUNNING,
            cpu=r.nano_cpus,
            mem=r.memory_bytes,
            generic=tuple((g.kind, g.value) for g in r.generic),
            ports=host_ports(t),
            version=version,
        )

    def _hold(self, rec: _Rec) -> None:
        info = self.nodes.get(rec.node_id)
        if info is None:
            self._order += 1
            info = self.nodes[rec.node_id] = NodeInfo(rec.node_id, objects_pb2.Node(id=rec.node_id), self._order)
            info.ghost = True
        info.res_cpu += rec.cpu
        info.res_mem += rec.mem
        for k, v in rec.generic:
            info.res_generic[k] += v
        for p in rec.ports:
            info.ports[p] += 1
        if rec.active:
            info.total += 1
            info.by_service[rec.service_id] += 1

    def _release(self, rec: _Rec) -> None:
        info = self.nodes.get(rec.node_id)
        if info is None:
            return
        info.res_cpu -= rec.cpu
        info.res_mem -= rec.mem
        for k, v in rec.generic:
            info.res_generic[k] -= v
        for p in rec.ports:
            info.ports[p] -= 1
            if info.ports[p] <= 0:
                del info.ports[p]
        if rec.active:
            info.total -= 1
            info.by_service[rec.service_id] -= 1
            if info.by_service[rec.service_id] <= 0:
                del info.by_service[rec.service_id]

    def _on_message(self, msg: watch_pb2.WatchMessage) -> None:
        for ev in msg.events:
            kind = ev.object.WhichOneof("object")
            if kind == "task":
                if self._task_update(ev.object.task, ev.action == WE.DELETE):
                    self._dirty = True
            elif kind == "node":
                node = ev.object.node
                if ev.action == WE.DELETE:
                    info = self.nodes.get(node.id)
                    if info is not None:
                        info.usable = False
                        info.ghost = True
                        if not any(r.node_id == node.id for r in self._recs.values()):
                            del self.nodes[node.id]
                else:
                    self._node_update(node)
                self._dirty = True
            elif kind == "network":
                self._dirty = True

    # ---- loop --------------------------------------------------------------------------------
    def pending_count(self) -> int:
        """Tasks this scheduler holds as pending (`shoal_scheduler_pending_tasks`)."""
        return len(self._pending)

    async def run(self) -> None:
        """The loop (`_run`); while it runs, the metrics' pending gauge reads this scheduler."""
        metrics.set_scheduler_pending(self.pending_count)
        try:
            await self._run()
        finally:
            metrics.set_scheduler_pending(None)

    async def _run(self) -> None:
        log.info("scheduler started")
        loop = asyncio.get_running_loop()
        # Unfiltered: a filtered watch copies every event of every transaction; other kinds are ignored.
        with self.store.watch() as w:
            self._rebuild()
            while True:
                if self._dirty and self._pending:
                    self._dirty = False
                    try:
                        with self.pacer.timing():
                            await self.schedule_pending()
                        # a long pass (thousands of tasks) is followed by as long a pause: the
                        # sessions and heartbeats of the fleet get their share of the event loop
                        await asyncio.sleep(self.pacer.pause())
                    except asyncio.CancelledError:
                        raise
                    except Exception as e:
                        if isinstance(e, Unavailable):
                            log.warning("scheduling pass not committed (%s); retrying in 1 s", e)
                        else:
                            log.exception("scheduling pass failed; retrying in 1 s")
                        self._rebuild()  # forget assignments assumed but not committed
                        self._retry_later(loop, w.queue)
                self.idle.set()
                msg = await w.queue.get()
                self.idle.clear()
                if msg is None:
                    return
                self._on_message(msg)
                first = loop.time()
                while True:
                    for msg in drain(w.queue):
                        if msg is None:
                            return
                        self._on_message(msg)
                    left = min(self.debounce, first + self.max_delay - loop.time())
                    if left <= 0 or not (self._dirty and self._pending):
                        break
                    try:
                        # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a cancellation.
                        async with asyncio.timeout(left):
                            msg = await w.queue.get()
                    except TimeoutError:
                        break
                    if msg is None:
                        return
                    self._on_message(msg)

    async def wait_idle(self) -> None:
        await self.idle.wait()

    def _retry_later(self, loop: asyncio.AbstractEventLoop, queue: asyncio.Queue[Any]) -> None:
        def wake() -> None:
            self._dirty = True
            queue.put_nowait(watch_pb2.WatchMessage())

        loop.call_later(1.0, wake)

    # ---- one pass ----------------------------------------------------------------------------
    async def schedule_pending(self) -> int:
        """Decide every pending task now and commit; returns how many were assigned."""
        sm = self.store.sm
        self.passes += 1
        groups: dict[tuple[Any, ...], list[objects_pb2.Task]] = {}
        for tid in list(self._pending):
            t = sm.get("task", tid)
            if t is None or t.status.state != PENDING or t.desired_state > RUNNING:
                self._pending.pop(tid, None)
                continue
            key: tuple[Any, ...] = (t.service_id, t.spec_version)
            if not t.spec_version:
                key = (t.service_id, 0, t.spec.SerializeToString(deterministic=True))
            groups.setdefault(key, []).append(t)
        decided: list[tuple[objects_pb2.Task, str]] = []
        messages: list[tuple[objects_pb2.Task, str]] = []
        for tasks in groups.values():
            g = self._group(tasks)
            placed, unplaced = self._place_group(g)
            decided.extend(placed)
            if unplaced:
                for t in g.tasks:
                    m = unplaced.get(t.id)
                    if m is not None and t.status.message != m:
                        messages.append((t, m))
        if not decided and not messages:
            return 0
        n = await self._commit(decided, messages)
        if decided:
            log.info("scheduler pass %d: %d tasks assigned, %d pending", self.passes, n, len(self._pending))
        return n

    def _transactions(
        self, decided: list[tuple[objects_pb2.Task, str]], messages: list[tuple[objects_pb2.Task, str]]
    ) -> list[store_pb2.StoreTransaction]:
        """The assignments (and new pending messages), `chunk` actions per transaction, each Task built once."""
        now_ns = time.time_ns()
        secs, nanos = divmod(now_ns, 10**9)
        txns: list[store_pb2.StoreTransaction] = []
        txn = None
        update = store_pb2.StoreAction.UPDATE
        items: list[tuple[objects_pb2.Task, str, bool]] = [(t, nid, True) for t, nid in decided]
        items += [(t, m, False) for t, m in messages]
        for i, (t, val, assign) in enumerate(items):
            if i % self.chunk == 0:
                txn = store_pb2.StoreTransaction(timestamp_unix_nano=now_ns)
                txns.append(txn)
            a = txn.actions.add()  # type: ignore[union-attr]
            a.kind = update
            nt = a.object.task
            nt.CopyFrom(t)
            st = nt.status
            ts = st.timestamp
            ts.seconds = secs
            ts.nanos = nanos
            if assign:
                nt.node_id = val
                st.state = ASSIGNED
                st.message = ASSIGNED_MESSAGE
                st.err = ""
                r = t.spec.resources.reservations
                if r.generic:
                    del nt.assigned_generic_resources[:]
                    nt.assigned_generic_resources.extend(r.generic)
            else:
                st.message = val
        return txns

    def _group(self, tasks: list[objects_pb2.Task]) -> Group:
        t = tasks[0]
        spec = t.spec
        try:
            cons = parse_constraints(spec.placement.constraints)
        except ValueError as e:
            log.warning("service %s: bad placement constraints ignored: %s", t.service_id, e)
            cons = []
        spreads = []
        for p in spec.placement.preferences:
            try:
                spreads.append(parse_spread(p.spread_descriptor))
            except ValueError as e:
                log.warning("service %s: bad placement preference ignored: %s", t.service_id, e)
        r = spec.resources.reservations
        sm = self.store.sm
        nets = [sm.get("network", nid) for nid in network_ids(t)]
        return Group(
            service_id=t.service_id,
            tasks=tasks,
            constraints=cons,
            cpu=r.nano_cpus,
            mem=r.memory_bytes,
            generic=tuple((g.kind, g.value) for g in r.generic),
            ports=host_ports(t),
            max_replicas=spec.placement.max_replicas,
            platforms=[(p.os.lower(), normalize_arch(p.architecture)) for p in spec.placement.platforms],
            networks=nets,
            spreads=spreads,
        )

    def _assign(self, g: Group, t: objects_pb2.Task, info: NodeInfo) -> None:
        rec = _Rec(info.id, g.service_id, t.desired_state <= RUNNING, g.cpu, g.mem, g.generic, g.ports, 1 << 62)
        old = self._recs.get(t.id)
        if old is not None:
            self._release(old)
        self._recs[t.id] = rec
        self._hold(rec)
        self._pending.pop(t.id, None)

    # ---- placement ---------------------------------------------------------------------------
    def _place_group(self, g: Group) -> tuple[list[tuple[objects_pb2.Task, str]], dict[str, str]]:
        """Place what fits; the second result maps each task left pending to its message."""
        placed: list[tuple[objects_pb2.Task, str]] = []
        unplaced: dict[str, str] = {}
        free = []
        for t in g.tasks:
            if not t.node_id:
                free.append(t)
                continue
            info = self.nodes.get(t.node_id)
            if info is None or info.ghost:
                why: str | None = "node not found"
            else:
                why = static_reason(g, info) or dynamic_reason(g, info)
            if why is None:
                self._assign(g, t, info)  # type: ignore[arg-type]
                placed.append((t, t.node_id))
            else:
                unplaced[t.id] = f"no suitable node ({why} on 1 node)"
        if free:
            root = build_tree(g, [i for i in self.nodes.values() if static_reason(g, i) is None])
            left = free
            if root is not None:
                left = []
                for i, t in enumerate(free):
                    info = pick(g, root)
                    if info is None:
                        left = free[i:]
                        break
                    self._assign(g, t, info)
                    placed.append((t, info.id))
            if left:
                msg = explain(g, self.nodes.values())
                for t in left:
                    unplaced[t.id] = msg
        return placed, unplaced

    # ---- commit ------------------------------------------------------------------------------
    async def _commit(
        self, decided: list[tuple[objects_pb2.Task, str]], messages: list[tuple[objects_pb2.Task, str]]
    ) -> int:
        done = 0
        for txn in self._transactions(decided, messages):
            try:
                version = await self.store.propose(txn)
            except Unavailable:
                raise  # no quorum: the whole pass is retried later
            except StoreError:
                # Some task changed under us (a concurrent writer, or this pass's own earlier
                # transaction whose answer was lost): commit the rest one by one; a task whose
                # version moved on since it was decided is taken from the store instead.
                for a in txn.actions:
                    if not self.store.sm.unchanged(a):
                        self._resync(a.object.task.id)
                        continue
                    try:
                        v = await self.store.propose(
                            store_pb2.StoreTransaction(actions=[a], timestamp_unix_nano=time.time_ns())
                        )
                    except Unavailable:
                        raise
                    except StoreError as e:
                        tid = a.object.task.id
                        log.info("assignment of task %s dropped: %s", tid, e)
                        self._resync(tid)
                        continue
                    done += self._committed([a], v)
                continue
            done += self._committed(txn.actions, version)
        return done

    def _committed(self, part: Iterable[store_pb2.StoreAction], version: int) -> int:
        n = unplaced = 0
        for a in part:
            t = a.object.task
            rec = self._recs.get(t.id)
            if rec is not None and rec.version > version:
                rec.version = version
            if t.status.state == ASSIGNED:
                n += 1
            else:  # a pending task's new message: no node fits it
                unplaced += 1
        self.placed += n
        metrics.count_decisions(assigned=n, unplaced=unplaced)
        return n

    def _resync(self, tid: str) -> None:
        """Forget what we assumed about a task and take the store's word for it."""
        rec = self._recs.pop(tid, None)
        if rec is not None:
            self._release(rec)
        cur = self.store.get("task", tid)
        if cur is not None:
            self._task_update(cur)
        self._dirty = True
