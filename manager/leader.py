"""The leader-only control loops: what one manager at a time runs while it holds the leader key.

`LEADER_LOOPS` lists their factories; `Manager._lead` (shoal.manager.manager) builds them anew at
each term on the store fenced by that term's claim, in this order, after the dispatcher's own
`run()` (heartbeat expiry; the Dispatcher is built once, as it serves gRPC), and runs them all
side by side in one task group (a loop that raises is restarted after 1 s; all are cancelled when
the leader key is lost). They start one after another, each after a pause as long as the first
step of the one before took (the first passes read the whole store):

1. `RoleManager` -- etcd membership follows each node's `spec.desired_role` (promote:
   role=MANAGER, the node then renews its certificate and joins as a learner, promoted to a voter
   once caught up; demote, as swarmkit does: the member is removed, then role=WORKER -- never the
   last manager, never below a quorum; a leader resigns before it is demoted), and members that no
   manager node owns any more are removed;
2. `ManagerStatusLoop` -- each manager Node's `manager_status` (etcd leader, reachability), from
   the manager's `StoreStatus`;
3. `Allocator` (shoal.manager.allocator) -- network VNIs and subnets, VIPs, published ports,
   task network attachments;
4. the orchestration loops, in this order: `ReplicatedOrchestrator`, `GlobalOrchestrator`,
   `ConstraintEnforcer`, `TaskReaper` (shoal.manager.orchestrator) and the `Scheduler`
   (shoal.manager.scheduler) -- services become tasks, and tasks get nodes;
5. `KeyManager` (shoal.manager.keymanager) -- rotation of the encrypted networks' IPsec keys and of the cluster's gossip keys;
6. `RootRotation` (shoal.manager.rotation) -- finishes a root CA rotation once every node holds a
   certificate of the new root.

The loops meet only through the store (watch events and transactions), so the order is that of
their start, not a pipeline: each one's first pass sees what the store holds then.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any, Protocol

import grpc

from shoal.manager.allocator import Allocator
from shoal.manager.etcdstore import Election, EtcdStore, next_or_timeout, rpc_unavailable
from shoal.manager.keymanager import KeyManager
from shoal.manager.orchestrator import (
    ConstraintEnforcer,
    GlobalOrchestrator,
    ReplicatedOrchestrator,
    TaskReaper,
)
from shoal.manager.rotation import RootRotation
from shoal.manager.scheduler import Scheduler
from shoal.manager.store import Conflict, Store, StoreError, Tx, drain
from shoal.manager.storestatus import MemberStatus, StoreStatus
from shoal.proto import etcd_pb2, objects_pb2, types_pb2

log = logging.getLogger(__name__)


class LeaderLoop(Protocol):
    async def run(self) -> None:
        """Run until cancelled (the leader key lost); raising gets the loop restarted after 1 s."""


class LeaderHost(Protocol):
    """What the manager's own loops (RoleManager, ManagerStatusLoop) use of the running Manager."""

    node_id: str
    election: Election | None

    @property
    def raft(self) -> EtcdStore: ...

    def status(self) -> StoreStatus: ...

    def subscribe(self) -> asyncio.Queue[StoreStatus]: ...

    def unsubscribe(self, q: asyncio.Queue[StoreStatus]) -> None: ...

    async def refresh_status(self) -> StoreStatus: ...


# A factory builds the loop (or loops, or None) of one term from the fenced store and the manager.
LoopFactory = Callable[[Store, LeaderHost], "LeaderLoop | list[LeaderLoop] | None"]


def _role_manager(store: Store, manager: LeaderHost) -> LeaderLoop:
    return RoleManager(store, manager)


def _manager_status(store: Store, manager: LeaderHost) -> LeaderLoop:
    return ManagerStatusLoop(store, manager)


def _allocator(store: Store, manager: LeaderHost) -> LeaderLoop:
    return Allocator(store, manager)


def _orchestration(store: Store, manager: LeaderHost) -> list[LeaderLoop]:
    """The orchestrators, the task reaper and the scheduler (they need no manager)."""
    return [
        ReplicatedOrchestrator(store),
        GlobalOrchestrator(store),
        ConstraintEnforcer(store),
        TaskReaper(store),
        Scheduler(store),
    ]


def _key_manager(store: Store, manager: LeaderHost) -> LeaderLoop:
    return KeyManager(store, manager)


def _root_rotation(store: Store, manager: LeaderHost) -> LeaderLoop:
    return RootRotation(store, manager)


# Every leader-only control loop, built anew each time this manager becomes leader, in this order
# (see the module docstring). Add yours here: a LoopFactory.
LEADER_LOOPS: list[LoopFactory] = [_role_manager, _manager_status, _allocator, _orchestration, _key_manager,
                                   _root_rotation]


# ---- the manager's own leader loops --------------------------------------------------------------
class ManagerStatusLoop:
    """Keeps each manager Node's `manager_status.leader` (the etcd leader) and `.reachability`
    (from the leading manager's member) current. Leader only."""

    def __init__(self, store: Store, manager: LeaderHost, period: float = 1.0) -> None:
        self.store = store
        self.manager = manager
        self.period = period

    async def run(self) -> None:
        q = self.manager.subscribe()
        try:
            while True:
                try:
                    await self.reconcile(self.manager.status())
                except StoreError as e:
                    log.info("node=%s manager status update: %s", self.manager.node_id, e)
                await next_or_timeout(q, self.period)
        finally:
            self.manager.unsubscribe(q)

    async def reconcile(self, st: StoreStatus) -> None:
        if not st.members:  # no view of the store's members yet: nothing to say about anyone
            return
        members = {m.addr: m for m in st.members}
        changed: list[objects_pb2.Node] = []
        for n in self.store.find("node"):
            if n.role != types_pb2.MANAGER or not n.manager_status.addr:
                continue
            m = members.get(n.manager_status.addr)
            leader = m is not None and m.leader
            if m is None or m.learner:  # not (yet) a voting member of the store
                reach = types_pb2.ManagerStatus.UNKNOWN
            else:
                reach = types_pb2.ManagerStatus.REACHABLE if m.reachable else types_pb2.ManagerStatus.UNREACHABLE
            if n.manager_status.leader != leader or n.manager_status.reachability != reach:
                new = objects_pb2.Node()
                new.CopyFrom(n)
                new.manager_status.leader = leader
                new.manager_status.reachability = reach
                changed.append(new)
        if changed:
            def fn(tx: Tx) -> None:
                for n in changed:
                    tx.update(n)

            await self.store.update(fn)
            for n in changed:
                log.info(
                    "node=%s manager %s is %s%s", self.manager.node_id, n.id,
                    types_pb2.ManagerStatus.Reachability.Name(n.manager_status.reachability).lower(),
                    " (leader)" if n.manager_status.leader else "",
                )


def _concerns_managers(msg: Any) -> bool:
    """Whether a node watch message may change what RoleManager does: a manager, a node to be
    promoted, or a node still holding a store member's address, before or after."""
    for ev in msg.events:
        for n in (ev.object.node, ev.old_object.node):
            if n.role == types_pb2.MANAGER or n.spec.desired_role == types_pb2.MANAGER or n.manager_status.addr:
                return True
    return False


class RoleManager:
    """Reconciles etcd membership with the nodes' desired roles (leader only), like swarmkit's."""

    ORPHAN_GRACE = 10.0

    def __init__(self, store: Store, manager: LeaderHost, period: float = 1.0) -> None:
        self.store = store
        self.manager = manager
        self.period = period
        self._orphans: dict[str, float] = {}

    async def run(self) -> None:
        watcher = self.store.watch(["node"])
        q = self.manager.subscribe()
        try:
            while True:
                try:
                    await self.reconcile()
                except StoreError as e:
                    log.info("node=%s role manager: %s", self.manager.node_id, e)
                except grpc.aio.AioRpcError as e:
                    log.info("node=%s role manager: store membership call failed: %s", self.manager.node_id,
                             e.details() or e.code().name)
                # Again after a period, a change of the store's members, or a node change that concerns
                # managers; the status changes of a fleet of workers (each a node event) do not.
                deadline = time.monotonic() + self.period
                while (left := deadline - time.monotonic()) > 0:
                    wait_store = asyncio.ensure_future(watcher.queue.get())
                    wait_members = asyncio.ensure_future(q.get())
                    try:
                        done, _ = await asyncio.wait({wait_store, wait_members}, timeout=left,
                                                     return_when=asyncio.FIRST_COMPLETED)
                    finally:
                        wait_store.cancel()
                        wait_members.cancel()
                    if wait_members in done:
                        break
                    if wait_store in done:
                        msgs = [wait_store.result(), *drain(watcher.queue)]
                        if any(m is None or _concerns_managers(m) for m in msgs):
                            break
        finally:
            watcher.close()
            self.manager.unsubscribe(q)

    async def reconcile(self) -> None:
        me = self.manager.node_id
        st = self.manager.status()
        nodes = self.store.find("node")
        members = {m.addr: m for m in st.members}
        for n in nodes:
            if n.spec.desired_role == types_pb2.MANAGER and n.role == types_pb2.WORKER:
                await self._set_role(n, types_pb2.MANAGER)
            elif n.spec.desired_role == types_pb2.WORKER and n.role == types_pb2.MANAGER:
                managers = [x for x in nodes if x.role == types_pb2.MANAGER]
                if len(managers) <= 1:
                    log.warning("node=%s refusing to demote %s: it is the last manager", me, n.id)
                    continue
                if n.id == me:
                    log.info("node=%s is being demoted: resigning the control loops first", me)
                    assert self.manager.election is not None
                    await self.manager.election.resign()
                    return
                # Its member leaves first, while the others can commit that: a node that saw its new
                # role first would stop its member, and two voters without it have no quorum to remove it.
                m = members.get(n.manager_status.addr)
                if m is not None and not await self._remove_member(m, members, f"node {n.id} is demoted"):
                    continue
                await self._set_role(n, types_pb2.WORKER)
        api = self.manager.raft.cluster_api
        if any(m.learner for m in st.members):
            await self._check_fence()
        for m in st.members:  # learners become voters once etcd finds them caught up
            if m.learner:
                try:
                    await api.MemberPromote(etcd_pb2.MemberPromoteRequest(ID=m.id), timeout=2.0)
                    log.info("node=%s store member at %s promoted from learner to voter", me, m.addr)
                except grpc.aio.AioRpcError as e:
                    log.debug("node=%s learner %s not promoted yet: %s", me, m.addr, e.details())
        # Members that no manager node owns (a removed node's, or one a past leader demoted before
        # removing its member), after a grace period: a joining manager's member may come first.
        owned = {n.manager_status.addr for n in nodes if n.role == types_pb2.MANAGER}
        now = time.monotonic()
        for addr, m in list(members.items()):
            if m.is_self or addr in owned:
                self._orphans.pop(addr, None)
                continue
            if now - self._orphans.setdefault(addr, now) < self.ORPHAN_GRACE:
                continue
            if await self._remove_member(m, members, "no manager node owns it any more"):
                self._orphans.pop(addr, None)
                for n in nodes:
                    if n.role == types_pb2.WORKER and n.manager_status.addr == addr:
                        await self._clear_manager_status(n.id)

    async def _remove_member(self, m: MemberStatus, members: dict[str, MemberStatus], why: str) -> bool:
        """Remove a store member, unless the voters left would have no reachable majority (etcd runs
        with --strict-reconfig-check=false, so this is the guard): whether it was removed."""
        me = self.manager.node_id
        left = [x for x in members.values() if x.id != m.id and not x.learner]
        reachable = sum(1 for x in left if x.reachable)
        if not m.learner and reachable * 2 <= len(left):
            log.warning("node=%s not removing store member %s (%s) yet: only %d of the other %d are reachable",
                        me, m.addr, why, reachable, len(left))
            return False
        await self._check_fence()
        await self.manager.raft.cluster_api.MemberRemove(etcd_pb2.MemberRemoveRequest(ID=m.id),
                                                        timeout=self.manager.raft.write_timeout)
        log.info("node=%s removed store member %s (%s)", me, m.addr, why)
        members.pop(m.addr, None)
        await self.manager.refresh_status()
        return True

    async def _check_fence(self) -> None:
        """Membership calls are not store writes, so the lease fence does not guard them: before one,
        check with a linearizable read that this manager still holds the leader key of its term (a
        paused or cut-off old leader must not remove members on a stale view). Raises FenceLost."""
        from shoal.manager.etcdstore import LEADER_KEY, FenceLost

        fence = getattr(self.store, "fence", None)
        if fence is None:  # an unfenced store (tests of the loop alone)
            return
        held = etcd_pb2.Compare(key=LEADER_KEY, target=etcd_pb2.Compare.CREATE, result=etcd_pb2.Compare.EQUAL,
                                create_revision=fence.revision)
        try:
            resp = await self.manager.raft.kv.Txn(etcd_pb2.TxnRequest(compare=[held]), timeout=2.0)
        except grpc.aio.AioRpcError as e:
            raise rpc_unavailable(e, "leader lease check before a membership change") from None
        if not resp.succeeded:
            raise FenceLost("this manager no longer holds the leader lease: membership changes are left to "
                            "the new leader")

    async def _set_role(self, n: objects_pb2.Node, role: int) -> None:
        def change(node: objects_pb2.Node) -> None:
            if node.role != role:
                node.role = role
                if role == types_pb2.WORKER:  # its store member has left
                    node.ClearField("manager_status")

        if await self._rewrite_node(n.id, change):
            log.info("node=%s node %s role is now %s", self.manager.node_id, n.id,
                     types_pb2.NodeRole.Name(role).lower())

    async def _clear_manager_status(self, node_id: str) -> None:
        def change(node: objects_pb2.Node) -> None:
            if node.role == types_pb2.WORKER:
                node.ClearField("manager_status")

        await self._rewrite_node(node_id, change)

    async def _rewrite_node(self, node_id: str, change: Callable[[objects_pb2.Node], None]) -> bool:
        """Write node `node_id` as `change` leaves a copy of it: whether it was written (not when the
        node is gone, `change` left it as it was, or it changed meanwhile: the next pass looks again)."""
        def fn(tx: Tx) -> bool:
            cur = tx.get("node", node_id)
            if cur is None:
                return False
            new = objects_pb2.Node()
            new.CopyFrom(cur)
            change(new)
            if new == cur:
                return False
            tx.update(new)
            return True

        try:
            return await self.store.update(fn)
        except Conflict:
            return False
