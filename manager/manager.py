"""The manager role of a node: Raft store, gRPC services, leader-only control loops.

`Manager` opens the `RaftStore` in the state dir and serves:

- the Control API (`shoal.manager.controlapi.ControlServicer(store, manager=self)`) on the local unix
  socket (mode 0600, no TLS: whoever can open it is root on this host) and on the remote port;
- the Dispatcher (`shoal.manager.dispatcher.Dispatcher(store, manager=self)`) and the CA service
  (`shoal.manager.ca.CAServicer`) on the remote port;
- the log broker (`shoal.manager.logbroker.LogBroker(store, manager=self)`): `Logs` on both, and
  `LogBroker` (agents) on the remote port.

The remote port (2377) is `ca.RemoteAPIFront`: it splices each connection to one of three gRPC
listeners on abstract unix sockets (per network namespace): mutual TLS (Control, Dispatcher, Logs,
LogBroker, CA),
join (server TLS, CA only) and plaintext (root CA certificate only). Why: see `shoal.manager.ca`.

While this manager is the Raft leader it runs the loops built by the factories in `LEADER_LOOPS`
(each `factory(store, manager)` returns an object with `async def run(self) -> None`, a list of
them, or None) plus the dispatcher's `run()`; a new leader first commits a barrier so its replica is
current; all loops are cancelled when leadership is lost and built afresh on the next term. A loop
that raises is logged and restarted after a second.

Two loops of this module: `RoleManager` reconciles Raft membership with each node's
`spec.desired_role` (promote: role=MANAGER, the node then renews its certificate and is added to
Raft; demote: role=WORKER, then the member is removed -- never the last manager, never below a
quorum, and a leader hands leadership over before it is demoted) and removes Raft members that no
manager node owns any more; `ManagerStatusLoop` keeps every manager Node's `manager_status` (leader,
reachability) current.
"""

from __future__ import annotations

import asyncio
import logging
import os
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from shoal.manager import ca
from shoal.manager.allocator import Allocator
from shoal.manager.controlapi import ControlServicer
from shoal.manager.dispatcher import Dispatcher
from shoal.manager.keymanager import KeyManager
from shoal.manager.logbroker import LogBroker
from shoal.manager.orchestrator import leader_loops
from shoal.manager.raft import RaftConfig, RaftStatus, RaftStore
from shoal.manager.store import Conflict, Store, StoreError, Tx, Unavailable, new_id
from shoal.manager.watchapi import WatchServicer
from shoal.proto import (
    ca_pb2_grpc,
    control_pb2,
    control_pb2_grpc,
    dispatcher_pb2_grpc,
    logs_pb2_grpc,
    objects_pb2,
    specs_pb2,
    types_pb2,
    watch_pb2_grpc,
)

log = logging.getLogger(__name__)

LoopFactory = Callable[[Store, "Manager"], Any]


# ---- leader loops -----------------------------------------------------------------------------
def _role_manager(store: Store, manager: Manager) -> Any:
    return RoleManager(store, manager)


def _manager_status(store: Store, manager: Manager) -> Any:
    return ManagerStatusLoop(store, manager)


def _allocator(store: Store, manager: Manager) -> Any:
    return Allocator(store, manager)


def _orchestration(store: Store, manager: Manager) -> Any:
    return leader_loops(store)


def _key_manager(store: Store, manager: Manager) -> Any:
    return KeyManager(store, manager)


# Every leader-only control loop, built anew each time this manager becomes leader. Add yours here:
# a callable (store, manager) -> loop | list of loops | None; a loop has `async def run(self)`.
# (The dispatcher's own `run()` is started by the Manager, as it is the object serving gRPC.)
LEADER_LOOPS: list[LoopFactory] = [_role_manager, _manager_status, _allocator, _orchestration, _key_manager]


@dataclass
class ManagerConfig:
    state_dir: Path
    identity: ca.TLSIdentity
    cluster_id: str
    remote_listen: str  # host:port the remote API binds (2377)
    advertise_api: str  # host:port other nodes reach the remote API at
    raft_addr: str  # host:port other managers reach Raft at (2378)
    raft_key: bytes
    raft_peers: list[str] = field(default_factory=list)
    raft_listen: str | None = None  # bind address of Raft if not raft_addr
    control_socket: Path | None = None  # default <state_dir>/swarmd.sock
    raft_config: RaftConfig | None = None
    hostname: str = ""


class Manager:
    """The manager role. Plug-in points for the other parts: `store`, `node_id`, `is_leader()`,
    `leader_api_addr()`, `api_peers()`, `info()`, `raft` (the RaftStore)."""

    def __init__(self, cfg: ManagerConfig) -> None:
        self.cfg = cfg
        self.node_id = cfg.identity.node_id
        self.cluster_id = cfg.cluster_id
        self.store: RaftStore | None = None
        self.control: Any = None
        self.dispatcher: Any = None
        self.logbroker: Any = None
        self._servers: list[grpc.aio.Server] = []
        self._front: ca.RemoteAPIFront | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self.control_socket = cfg.control_socket or (cfg.state_dir / "swarmd.sock")
        self._leading = asyncio.Event()

    @property
    def raft(self) -> RaftStore:
        assert self.store is not None, "manager not started"
        return self.store

    # ---- plug-in API ---------------------------------------------------------------------------
    def is_leader(self) -> bool:
        return self.store is not None and self.store.is_leader()

    def _manager_nodes(self) -> list[objects_pb2.Node]:
        return [n for n in self.raft.find("node") if n.role == types_pb2.MANAGER]

    def leader_api_addr(self) -> str | None:
        """The leader's remote API address host:port, None during an election."""
        leader = self.raft.leader_addr()
        if leader is None:
            return None
        if leader == self.cfg.raft_addr:
            return self.cfg.advertise_api
        for n in self.raft.find("node"):
            if n.manager_status.addr == leader and n.manager_status.api_addr:
                return n.manager_status.api_addr
        return None

    def api_peers(self) -> list[tuple[str, str]]:
        """(node id, remote API host:port) of every manager."""
        out = [(n.id, n.manager_status.api_addr) for n in self._manager_nodes() if n.manager_status.api_addr]
        if not any(nid == self.node_id for nid, _ in out):
            out.append((self.node_id, self.cfg.advertise_api))
        return out

    def info(self) -> control_pb2.InfoResponse:
        st = self.raft.status()
        by_addr = {n.manager_status.addr: n for n in self._manager_nodes()}
        resp = control_pb2.InfoResponse(
            node_id=self.node_id, is_manager=True, store_version=self.raft.sm.version, cluster_id=self.cluster_id
        )
        for m in st.members:
            n = by_addr.get(m.addr)
            if st.is_leader or m.is_self or m.leader:
                reachable = m.reachable
            else:  # a follower only knows its link to the leader; the leader keeps the store current
                reachable = n is not None and n.manager_status.reachability == types_pb2.ManagerStatus.REACHABLE
            nid = n.id if n is not None else (self.node_id if m.is_self else "")
            resp.members.add(node_id=nid, addr=m.addr, leader=m.addr == st.leader_addr, reachable=reachable)
            if m.addr == st.leader_addr:
                resp.leader_node_id = nid
        return resp

    # ---- lifecycle -----------------------------------------------------------------------------
    async def start(self) -> None:
        cfg = self.cfg
        self.store = RaftStore(
            cfg.state_dir,
            cfg.raft_addr,
            cfg.raft_peers,
            cfg.raft_key,
            bind_addr=cfg.raft_listen,
            config=cfg.raft_config,
        )
        self.control = ControlServicer(self.store, manager=self)
        self.dispatcher = Dispatcher(self.store, manager=self)
        self.logbroker = LogBroker(self.store, manager=self)
        self.watch = WatchServicer(self.store, self)
        ca_svc = ca.CAServicer(self._root_ca_pem, self.issue_node_certificate)
        ca_plain = ca.CAServicer(self._root_ca_pem, self.issue_node_certificate, plain=True)
        tag = f"shoal-{self.node_id}-{os.getpid()}"
        paths = {k: f"\0{tag}-{k}" for k in ("mtls", "join", "plain")}

        # Local control socket (0600).
        sock = Path(self.control_socket)
        if len(str(sock).encode()) > 100:
            raise ValueError(f"--listen-control-api path {sock} is too long for a unix socket: use a shorter path")
        sock.parent.mkdir(parents=True, exist_ok=True)
        if sock.exists() or sock.is_symlink():
            sock.unlink()
        local = grpc.aio.server()
        control_pb2_grpc.add_ControlServicer_to_server(self.control, local)
        logs_pb2_grpc.add_LogsServicer_to_server(self.logbroker, local)
        watch_pb2_grpc.add_WatchServicer_to_server(self.watch, local)
        old_umask = os.umask(0o177)
        try:
            local.add_insecure_port(f"unix:{sock}")
            await local.start()
        finally:
            os.umask(old_umask)
        os.chmod(sock, stat.S_IRUSR | stat.S_IWUSR)
        self._servers.append(local)

        mtls = grpc.aio.server()
        control_pb2_grpc.add_ControlServicer_to_server(self.control, mtls)
        dispatcher_pb2_grpc.add_DispatcherServicer_to_server(self.dispatcher, mtls)
        logs_pb2_grpc.add_LogsServicer_to_server(self.logbroker, mtls)
        logs_pb2_grpc.add_LogBrokerServicer_to_server(self.logbroker, mtls)
        watch_pb2_grpc.add_WatchServicer_to_server(self.watch, mtls)
        ca_pb2_grpc.add_CAServicer_to_server(ca_svc, mtls)
        mtls.add_secure_port(f"unix-abstract:{paths['mtls'][1:]}", ca.server_credentials(cfg.identity))
        join = grpc.aio.server()
        ca_pb2_grpc.add_CAServicer_to_server(ca_svc, join)
        join.add_secure_port(f"unix-abstract:{paths['join'][1:]}", ca.join_server_credentials(cfg.identity))
        plain = grpc.aio.server()
        ca_pb2_grpc.add_CAServicer_to_server(ca_plain, plain)
        plain.add_insecure_port(f"unix-abstract:{paths['plain'][1:]}")
        for s in (mtls, join, plain):
            await s.start()
            self._servers.append(s)
        self._front = ca.RemoteAPIFront(cfg.remote_listen, paths["mtls"], paths["join"], paths["plain"])
        await self._front.start()
        self._tasks.append(asyncio.create_task(self._leadership(), name="leadership"))
        log.info(
            "node=%s manager started: raft %s, remote API %s (advertised %s), control socket %s",
            self.node_id, cfg.raft_addr, cfg.remote_listen, cfg.advertise_api, sock,
        )

    async def stop(self) -> None:
        log.info("node=%s manager stopping", self.node_id)
        if self.store is not None and self.store.is_leader() and len(self.store.members()) > 1:
            # Hand leadership over first: the others need not wait for an election timeout.
            try:
                moved = await self.store.transfer_leadership(timeout=1.0)
                log.info("node=%s leadership %s before stopping", self.node_id, "handed over" if moved else "kept")
            except Exception:
                log.exception("node=%s leadership hand-over failed", self.node_id)
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()
        if self._front is not None:
            await self._front.close()
        await asyncio.gather(*(s.stop(0.5) for s in self._servers), return_exceptions=True)
        self._servers.clear()
        if self.store is not None:
            self.store.close()
        try:
            Path(self.control_socket).unlink()
        except FileNotFoundError:
            pass
        log.info("node=%s manager stopped", self.node_id)

    async def bootstrap(self, cluster: objects_pb2.Cluster, node: objects_pb2.Node) -> None:
        """First start of a new cluster: write the Cluster and this manager's Node."""
        await self.raft.wait_leader(30)
        if self.raft.cluster() is not None:
            return

        def fn(tx: Tx) -> None:
            tx.create(cluster)
            tx.create(node)

        await self.raft.update(fn)
        log.info("node=%s cluster %s created", self.node_id, cluster.id)

    # ---- CA --------------------------------------------------------------------------------------
    def _root_ca_pem(self) -> bytes:
        cluster = self.raft.cluster()
        return cluster.root_ca.ca_cert if cluster is not None else self.cfg.identity.ca_pem

    async def issue_node_certificate(self, req: Any, peer: ca.PeerIdentity | None) -> ca.IssuedNode:
        """The CA's issue hook: a join with a token, or an existing node's role check / renewal."""
        cluster = self.raft.cluster()
        if cluster is None:
            raise ca.JoinError("this manager has no cluster state yet; retry in a moment")
        root = ca.RootCA(cluster.root_ca.ca_cert, cluster.root_ca.ca_key)
        if peer is not None:
            return await self._renew(req, peer, cluster, root)
        role = ca.role_for_token(req.token, cluster.root_ca.join_tokens, cluster.root_ca.ca_cert)
        if role == types_pb2.MANAGER and not req.raft_addr:
            raise ca.JoinError("a manager must send its Raft address (raft_addr) to join")
        node_id = new_id()
        cert = root.issue(req.csr, node_id, role, cluster.id)
        node = objects_pb2.Node(
            id=node_id,
            spec=specs_pb2.NodeSpec(
                desired_role=role,
                membership=specs_pb2.NodeSpec.ACCEPTED,
                availability=types_pb2.ACTIVE,
            ),
            description=types_pb2.NodeDescription(
                hostname=req.hostname, addr=req.advertise_addr.rsplit(":", 1)[0] if req.advertise_addr else ""
            ),
            status=types_pb2.NodeStatus(state=types_pb2.NodeStatus.READY, message="joined"),
            role=role,
            certificate=cert,
        )
        if role == types_pb2.MANAGER:
            node.manager_status.CopyFrom(
                types_pb2.ManagerStatus(
                    addr=req.raft_addr, api_addr=req.advertise_addr, reachability=types_pb2.ManagerStatus.UNKNOWN
                )
            )
        await self.raft.update(lambda tx: tx.create(node))
        log.info(
            "node=%s issued a %s certificate to new node %s (%s)",
            self.node_id, types_pb2.NodeRole.Name(role).lower(), node_id, req.hostname or "-",
        )
        issued = ca.IssuedNode(node_id, cert, role, cluster_id=cluster.id)
        if role == types_pb2.MANAGER:
            await self._admit_manager(req.raft_addr, issued, cluster)
        return issued

    async def _admit_manager(self, raft_addr: str, issued: ca.IssuedNode, cluster: objects_pb2.Cluster) -> None:
        await self.raft.add_member(raft_addr)
        issued.raft_key = cluster.raft_key
        issued.raft_peers = tuple(m.addr for m in self.raft.members() if m.addr != raft_addr)
        log.info("node=%s added manager %s to Raft at %s", self.node_id, issued.node_id, raft_addr)

    async def _renew(
        self, req: Any, peer: ca.PeerIdentity, cluster: objects_pb2.Cluster, root: ca.RootCA
    ) -> ca.IssuedNode:
        if req.node_id and req.node_id != peer.node_id:
            raise ca.JoinError("a node can only renew its own certificate")
        node = self.raft.get("node", peer.node_id)
        if node is None:
            raise ca.JoinError(
                f"node {peer.node_id} is not part of the swarm any more (it was removed): "
                "join again with a join token after clearing its state dir"
            )
        if node.role == peer.role:
            return ca.IssuedNode(node.id, b"", node.role, cluster_id=cluster.id)
        cert = root.issue(req.csr, node.id, node.role, cluster.id)

        def fn(tx: Tx) -> None:
            cur = tx.get("node", node.id)
            n = objects_pb2.Node()
            n.CopyFrom(cur)
            n.certificate = cert
            if n.role == types_pb2.MANAGER:
                n.manager_status.addr = req.raft_addr
                n.manager_status.api_addr = req.advertise_addr
            tx.update(n)

        if node.role == types_pb2.MANAGER and not req.raft_addr:
            raise ca.JoinError("a promoted node must send its Raft address (raft_addr) to renew")
        await self.raft.update(fn)
        issued = ca.IssuedNode(node.id, cert, node.role, cluster_id=cluster.id)
        log.info("node=%s renewed node %s as %s", self.node_id, node.id, types_pb2.NodeRole.Name(node.role).lower())
        if node.role == types_pb2.MANAGER:
            await self._admit_manager(req.raft_addr, issued, cluster)
        return issued

    # ---- leadership ------------------------------------------------------------------------------
    async def _leadership(self) -> None:
        q = self.raft.subscribe()
        lead: asyncio.Task[None] | None = None
        try:
            while True:
                st = await q.get()
                while not q.empty():
                    st = q.get_nowait()
                if st.is_leader and lead is None:
                    log.info("node=%s became leader (term %d): starting control loops", self.node_id, st.term)
                    lead = asyncio.create_task(self._lead(), name="leader-loops")
                    self._leading.set()
                elif not st.is_leader and lead is not None:
                    log.info("node=%s lost leadership: stopping control loops", self.node_id)
                    await self._stop_loops(lead)
                    lead = None
                    self._leading.clear()
        finally:
            self.raft.unsubscribe(q)
            if lead is not None:
                await self._stop_loops(lead)

    async def _stop_loops(self, lead: asyncio.Task[None]) -> None:
        lead.cancel()
        done, _ = await asyncio.wait({lead}, timeout=5)
        if not done:
            stuck = [t.get_name() for t in asyncio.all_tasks() if t.get_coro().__qualname__.startswith("Manager._supervise")]
            log.error(
                "node=%s leader loops did not stop within 5 s of cancellation (one swallows CancelledError): %s",
                self.node_id, ", ".join(stuck),
            )

    async def _lead(self) -> None:
        while True:  # a barrier: the replica holds everything committed before this term
            try:
                await self.raft.barrier()
                break
            except Unavailable as e:
                log.info("node=%s leader barrier: %s", self.node_id, e)
                await asyncio.sleep(0.1)
        loops: list[tuple[str, Any]] = []
        for factory in LEADER_LOOPS:
            name = getattr(factory, "__name__", repr(factory)).lstrip("_")
            try:
                built = factory(self.raft, self)
            except Exception:
                log.exception("node=%s leader loop %s failed to build", self.node_id, name)
                continue
            for loop in built if isinstance(built, list | tuple) else [built]:
                if loop is not None:
                    loops.append((type(loop).__name__, loop))
        loops.append(("Dispatcher", self.dispatcher))
        async with asyncio.TaskGroup() as tg:
            for name, loop in loops:
                tg.create_task(self._supervise(name, loop), name=name)

    async def _supervise(self, name: str, loop: Any) -> None:
        while True:
            try:
                await loop.run()
                log.info("node=%s leader loop %s returned", self.node_id, name)
                return
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("node=%s leader loop %s failed; restarting in 1 s", self.node_id, name)
                await asyncio.sleep(1)


# ---- the manager's own leader loops ----------------------------------------------------------
async def _events_or_tick(q: asyncio.Queue[Any], period: float) -> None:
    try:
        async with asyncio.timeout(period):
            await q.get()
    except TimeoutError:
        return
    while not q.empty():
        q.get_nowait()


class ManagerStatusLoop:
    """Keeps each manager Node's `manager_status.leader` and `.reachability` current (leader only)."""

    def __init__(self, store: Store, manager: Manager, period: float = 1.0) -> None:
        self.raft = manager.raft
        self.manager = manager
        self.period = period

    async def run(self) -> None:
        q = self.raft.subscribe()
        try:
            while True:
                try:
                    await self.reconcile(self.raft.status())
                except StoreError as e:
                    log.info("node=%s manager status update: %s", self.manager.node_id, e)
                await _events_or_tick(q, self.period)
        finally:
            self.raft.unsubscribe(q)

    async def reconcile(self, st: RaftStatus) -> None:
        members = {m.addr: m for m in st.members}
        changed: list[objects_pb2.Node] = []
        for n in self.raft.find("node"):
            if n.role != types_pb2.MANAGER or not n.manager_status.addr:
                continue
            m = members.get(n.manager_status.addr)
            leader = m is not None and m.addr == st.leader_addr
            if m is None:
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

            await self.raft.update(fn)
            for n in changed:
                log.info(
                    "node=%s manager %s is %s%s", self.manager.node_id, n.id,
                    types_pb2.ManagerStatus.Reachability.Name(n.manager_status.reachability).lower(),
                    " (leader)" if n.manager_status.leader else "",
                )


class RoleManager:
    """Reconciles Raft membership with the nodes' desired roles (leader only), like swarmkit's."""

    # A demoted manager gets this long to see its new role through Raft before it is removed.
    DEMOTE_SETTLE = 1.0
    ORPHAN_GRACE = 10.0

    def __init__(self, store: Store, manager: Manager, period: float = 1.0) -> None:
        self.raft = manager.raft
        self.manager = manager
        self.period = period
        self._orphans: dict[str, float] = {}
        self._demoted_at: dict[str, float] = {}

    async def run(self) -> None:
        watcher = self.raft.watch(["node"])
        q = self.raft.subscribe()
        try:
            while True:
                try:
                    await self.reconcile()
                except StoreError as e:
                    log.info("node=%s role manager: %s", self.manager.node_id, e)
                wait_store = asyncio.ensure_future(watcher.queue.get())
                wait_raft = asyncio.ensure_future(q.get())
                try:
                    await asyncio.wait({wait_store, wait_raft}, timeout=self.period, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    wait_store.cancel()
                    wait_raft.cancel()
        finally:
            watcher.close()
            self.raft.unsubscribe(q)

    async def reconcile(self) -> None:
        me = self.manager.node_id
        st = self.raft.status()
        nodes = self.raft.find("node")
        members = {m.addr: m for m in st.members}
        for n in nodes:
            if n.spec.desired_role == types_pb2.MANAGER and n.role == types_pb2.WORKER:
                await self._set_role(n, types_pb2.MANAGER)
            elif n.spec.desired_role == types_pb2.WORKER and n.role == types_pb2.MANAGER:
                if n.id == me:
                    log.info("node=%s is being demoted: handing leadership over first", me)
                    await self.raft.transfer_leadership()
                    return
                managers = [x for x in nodes if x.role == types_pb2.MANAGER]
                if len(managers) <= 1:
                    log.warning("node=%s refusing to demote %s: it is the last manager", me, n.id)
                    continue
                remaining = [m for a, m in members.items() if a != n.manager_status.addr]
                reachable = sum(1 for m in remaining if m.reachable)
                if remaining and reachable * 2 <= len(remaining):
                    log.warning(
                        "node=%s not demoting %s yet: only %d of the other %d managers are reachable",
                        me, n.id, reachable, len(remaining),
                    )
                    continue
                await self._set_role(n, types_pb2.WORKER)
                self._demoted_at[n.manager_status.addr] = time.monotonic()
        # Raft members that no manager node owns: demoted (after a settle time) or removed nodes.
        owned = {n.manager_status.addr for n in nodes if n.role == types_pb2.MANAGER}
        worker_addrs = {n.manager_status.addr for n in nodes if n.role == types_pb2.WORKER and n.manager_status.addr}
        now = time.monotonic()
        for addr in list(members):
            if addr == st.self_addr or addr in owned:
                self._orphans.pop(addr, None)
                continue
            if addr in worker_addrs:
                if now - self._demoted_at.get(addr, 0.0) < self.DEMOTE_SETTLE:
                    continue
            else:
                first = self._orphans.setdefault(addr, now)
                if now - first < self.ORPHAN_GRACE:
                    continue
            await self.raft.remove_member(addr)
            self._orphans.pop(addr, None)
            log.info("node=%s removed Raft member %s (no manager node owns it any more)", me, addr)
            for n in nodes:
                if n.role == types_pb2.WORKER and n.manager_status.addr == addr:
                    await self._clear_manager_status(n.id)

    async def _set_role(self, n: objects_pb2.Node, role: int) -> None:
        def fn(tx: Tx) -> None:
            cur = tx.get("node", n.id)
            if cur is None or cur.role == role:
                return
            new = objects_pb2.Node()
            new.CopyFrom(cur)
            new.role = role
            tx.update(new)

        try:
            await self.raft.update(fn)
        except Conflict:
            return
        log.info("node=%s node %s role is now %s", self.manager.node_id, n.id, types_pb2.NodeRole.Name(role).lower())

    async def _clear_manager_status(self, node_id: str) -> None:
        def fn(tx: Tx) -> None:
            cur = tx.get("node", node_id)
            if cur is None or cur.role != types_pb2.WORKER:
                return
            new = objects_pb2.Node()
            new.CopyFrom(cur)
            new.ClearField("manager_status")
            tx.update(new)

        try:
            await self.raft.update(fn)
        except Conflict:
            pass
