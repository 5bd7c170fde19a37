"""The manager role of a node: its etcd member, the store on it, gRPC services, leader loops.

`Manager` starts this node's etcd member (`shoal.manager.etcdmember.EtcdMember`, a supervised child
process with its data in `<state_dir>/etcd`, peers on mutual TLS with manager certificates, the
client on a root-only unix socket), opens the `EtcdStore` on it and serves:

- the Control API (`shoal.manager.controlapi.ControlServicer(store, manager=self)`) on the local unix
  socket (mode 0600, no TLS: whoever can open it is root on this host) and on the remote port;
- the Dispatcher (`shoal.manager.dispatcher.Dispatcher(store, manager=self)`) and the CA service
  (`shoal.manager.ca.CAServicer`) on the remote port;
- on the remote port's mutual-TLS listener, `shoal.manager.authz.Authorizer`: the certificates of
  removed nodes refused and their open calls ended, a demoted manager's manager rights ended;
- the log broker (`shoal.manager.logbroker.LogBroker(store, manager=self)`): `Logs` on both, and
  `LogBroker` (agents) on the remote port.

The remote port (2377) is `remoteapi.RemoteAPIFront`, a process of the manager's own: it splices
each connection to one of three gRPC listeners on abstract unix sockets (per network namespace):
mutual TLS (Control, Dispatcher, Logs, LogBroker, CA), join (server TLS, CA only) and plaintext
(root CA certificate only). Why: see `shoal.manager.remoteapi`.

Leader loops. One manager at a time runs the loops built by the factories in
`shoal.manager.leader.LEADER_LOOPS` (each `factory(store, manager)` returns an object with
`async def run(self) -> None`, a list of them, or None; that module names them and their order)
plus the dispatcher's `run()`: the one holding the leader key (`etcdstore.Election`). The store
the loops get is fenced by that claim (`EtcdStore.fenced`): each of their writes fails once the
key is gone, so a paused or cut-off old leader never commits after a new one started. A new leader
first waits until its cache holds the revision it won at; loops are cancelled when the key is lost
and built afresh on the next term. A loop that raises is logged and restarted after 1 s.

Encryption at rest: the store seals every value with `cfg.data_key` (`encryption.DataKeyCodec`), and
every manager (not only the leader) follows the Cluster object's autolock setting and unlock key,
re-wrapping `<state_dir>/keys/dek` as they change (`_follow_cluster_keys`, which also keeps a sealed
copy of the root CA in `keys/root-ca`). A joining or promoted manager receives the data key in its CA
answer (`IssuedNode.data_key`).

Certificates: `credentials` (`ca.NodeCredentials`, swarmd's) is the node's identity as renewals
change it; the remote API's listeners and the etcd member's peer files follow it. A manager whose
certificate expired while it was off signs itself a new one from `keys/root-ca` before its member
starts (`_renew_if_expired`).

Store status: `StoreStatus` (shoal.manager.storestatus) is this manager's view of the members,
refreshed every `STATUS_PERIOD` from its own member (member list, leader, active peers); the
leader loops, `Info` and the quorum sentence of a refused write read it.
"""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import logging
import os
import stat
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from shoal.manager import ca, metrics, remoteapi
from shoal.manager.authz import Authorizer
from shoal.manager.controlapi import ControlServicer
from shoal.manager.dispatcher import SERVER_OPTIONS as DISPATCHER_SERVER_OPTIONS
from shoal.manager.dispatcher import Dispatcher
from shoal.manager.encryption import DataKeyCodec, KeyDir
from shoal.manager.etcdmember import EtcdConfig, EtcdError, EtcdMember
from shoal.manager.etcdstore import Election, EtcdStore, Fence, rpc_unavailable
from shoal.manager.leader import LEADER_LOOPS
from shoal.manager.logbroker import LogBroker
from shoal.manager.pacing import start_paced
from shoal.manager.store import AlreadyExists, Store, StoreError, Tx, Unavailable, new_id
from shoal.manager.storestatus import STATUS_PERIOD, MemberStatus, StoreStatus
from shoal.manager.watchapi import WatchServicer
from shoal.proto import (
    ca_pb2_grpc,
    control_pb2,
    control_pb2_grpc,
    dispatcher_pb2_grpc,
    etcd_pb2,
    logs_pb2_grpc,
    objects_pb2,
    specs_pb2,
    store_pb2,
    types_pb2,
    watch_pb2_grpc,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ManagerSnapshot:
    """The manager's state the metrics' gauges show at a scrape (`shoal.manager.metrics`)."""

    store_leader: bool  # this manager's etcd member is the Raft leader
    raft_term: int
    revision: int  # the revision this manager's cache holds
    control_leader: bool  # this manager runs the control loops
    tasks_by_state: dict[str, int]
    dispatcher_sessions: int


@dataclass
class ManagerConfig:
    state_dir: Path
    identity: ca.TLSIdentity
    cluster_id: str
    remote_listen: str  # host:port the remote API binds (2377)
    advertise_api: str  # host:port other nodes reach the remote API at
    raft_addr: str  # host:port other managers reach this manager's etcd member at (2380)
    raft_listen: str | None = None  # bind address of the etcd peer port if not raft_addr
    # A joining manager's first start: every member as "name=https://host:port" (self included).
    initial_cluster: list[str] = field(default_factory=list)
    force_new_cluster: bool = False  # restart the store as a cluster of this member alone
    control_socket: Path | None = None  # default <state_dir>/swarmd.sock
    hostname: str = ""
    write_timeout: float = 4.0
    lease_ttl: int = 2
    # The store's data key (32 bytes, the same on every manager): every value in etcd is sealed
    # with it (`encryption.DataKeyCodec`). swarmd reads it from <state_dir>/keys.
    data_key: bytes = b""
    # The node's credentials as renewals change them (swarmd's); default: `identity`, never renewed.
    credentials: ca.NodeCredentials | None = None


class ExpiredCertificate(Exception):
    """The manager's certificate expired and it cannot renew it itself; the message says what to do."""


# A manager starting with less than this left on its certificate renews it itself (see
# `Manager._renew_if_expired`): the renewal loop could not reach a CA before it expires.
EXPIRY_MARGIN = datetime.timedelta(seconds=20)
TRUST_STAGGER = 6.0  # seconds between two managers' etcd restarts after a root rotation


def _host(addr: str) -> str:
    return addr.rsplit(":", 1)[0].strip("[]")


def peer_url(addr: str) -> str:
    return f"https://{addr}"


def _url_addr(url: str) -> str:
    return url.split("://", 1)[-1].rstrip("/")


def cert_ips(raft_addr: str) -> list[str]:
    """The IP SANs a manager certificate needs: etcd peers check the peer URL's host against them."""
    try:
        return [str(ipaddress.ip_address(_host(raft_addr)))]
    except ValueError:
        return []


async def start_local_server(server: grpc.aio.Server, sock: Path) -> None:
    """Start `server` on the unix socket `sock`, created 0600 (no TLS: whoever can open it is root)."""
    if len(str(sock).encode()) > 100:
        raise ValueError(f"--listen-control-api path {sock} is too long for a unix socket: use a shorter path")
    sock.parent.mkdir(parents=True, exist_ok=True)
    if sock.exists() or sock.is_symlink():
        sock.unlink()
    old_umask = os.umask(0o177)
    try:
        server.add_insecure_port(f"unix:{sock}")
        await server.start()
    finally:
        os.umask(old_umask)
    os.chmod(sock, stat.S_IRUSR | stat.S_IWUSR)


class Manager:
    """The manager role. Plug-in points for the other parts: `store`, `node_id`, `is_leader()`,
    `leader_api_addr()`, `api_peers()`, `info()`, `status()` (the etcd members as seen here)."""

    def __init__(self, cfg: ManagerConfig) -> None:
        self.cfg = cfg
        self.node_id = cfg.identity.node_id
        self.credentials = cfg.credentials or ca.NodeCredentials(cfg.identity)
        self.cluster_id = cfg.cluster_id
        self.member: EtcdMember | None = None
        self.store: EtcdStore | None = None
        self.election: Election | None = None
        self.control: Any = None
        self.dispatcher: Any = None
        self.logbroker: Any = None
        self._servers: list[grpc.aio.Server] = []
        self._front: remoteapi.RemoteAPIFront | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self.control_socket = cfg.control_socket or (cfg.state_dir / "swarmd.sock")
        self._leading = asyncio.Event()
        self._status = StoreStatus()
        self._status_subscribers: list[asyncio.Queue[StoreStatus]] = []
        self._trust_pending_since: float | None = None  # see _refresh_store_trust
        self.raft_term = 0  # the store's Raft term, from the last status refresh

    @property
    def raft(self) -> EtcdStore:
        assert self.store is not None, "manager not started"
        return self.store

    # ---- plug-in API ---------------------------------------------------------------------------
    def is_leader(self) -> bool:
        """Whether this manager runs the control loops (holds the leader key)."""
        return self.store is not None and self.store.leading

    def _manager_nodes(self) -> list[objects_pb2.Node]:
        return [n for n in self.raft.find("node") if n.role == types_pb2.MANAGER]

    def leader_api_addr(self) -> str | None:
        """The remote API address host:port of the manager running the control loops; None while
        there is none, or while its etcd member is out of this manager's reach (it died, and its
        lease has not run out yet): agents then try the other managers instead of waiting on it."""
        key = self.raft.leader_key
        if key is None:
            return None
        nid = key.value.decode()
        if nid == self.node_id:
            return self.cfg.advertise_api
        n = self.raft.get("node", nid)
        if n is None or not n.manager_status.api_addr:
            return None
        m = next((m for m in self._status.members if m.addr == n.manager_status.addr), None)
        if m is not None and not m.reachable:
            return None
        return n.manager_status.api_addr

    def api_peers(self) -> list[tuple[str, str]]:
        """(node id, remote API host:port) of every manager."""
        out = [(n.id, n.manager_status.api_addr) for n in self._manager_nodes() if n.manager_status.api_addr]
        if not any(nid == self.node_id for nid, _ in out):
            out.append((self.node_id, self.cfg.advertise_api))
        return out

    def status(self) -> StoreStatus:
        return self._status

    def metrics_snapshot(self) -> ManagerSnapshot | None:
        """What the metrics' gauges show (`shoal.manager.metrics`); None until the store is up."""
        store = self.store
        if store is None:
            return None
        by_state: dict[str, int] = {}
        for t in store.find("task"):
            name = types_pb2.TaskState.Name(t.status.state)
            by_state[name] = by_state.get(name, 0) + 1
        st = self._status
        return ManagerSnapshot(
            store_leader=st.self_id != 0 and st.self_id == st.leader_id,
            raft_term=self.raft_term,
            revision=store.sm.version,
            control_leader=self.is_leader(),
            tasks_by_state=by_state,
            dispatcher_sessions=self.dispatcher.session_count() if self.dispatcher is not None else 0,
        )

    def subscribe(self) -> asyncio.Queue[StoreStatus]:
        """A queue receiving a `StoreStatus` whenever the members, their leader or reachability change."""
        q: asyncio.Queue[StoreStatus] = asyncio.Queue()
        self._status_subscribers.append(q)
        q.put_nowait(self._status)
        return q

    def unsubscribe(self, q: asyncio.Queue[StoreStatus]) -> None:
        if q in self._status_subscribers:
            self._status_subscribers.remove(q)

    def info(self) -> control_pb2.InfoResponse:
        st = self.status()
        by_addr = {n.manager_status.addr: n for n in self._manager_nodes()}
        resp = control_pb2.InfoResponse(
            node_id=self.node_id, is_manager=True, store_version=self.raft.sm.version, cluster_id=self.cluster_id
        )
        for m in st.members:
            n = by_addr.get(m.addr)
            nid = n.id if n is not None else (self.node_id if m.is_self else m.name)
            resp.members.add(node_id=nid, addr=m.addr, leader=m.leader, reachable=m.reachable)
            if m.leader:
                resp.leader_node_id = nid
        return resp

    async def refresh_status(self) -> StoreStatus:
        """Ask this manager's own member for the members, the leader and its active peers."""
        assert self.member is not None and self.store is not None
        st = await self.raft.maintenance.Status(etcd_pb2.StatusRequest(), timeout=1.0)
        ml = await self.raft.cluster_api.MemberList(etcd_pb2.MemberListRequest(), timeout=1.0)
        active: set[str] = set()
        try:
            # not the default 5 s: this runs every 0.5 s
            metrics = await self.member.metrics(timeout=1.0, names=("etcd_network_active_peers",))
            for labels, value in metrics.get("etcd_network_active_peers", []):
                if value > 0:
                    active.add(labels.get("Remote", ""))
        except Exception as e:  # metrics are best effort: without them peers count as unreachable
            log.debug("node=%s etcd metrics: %s", self.node_id, e)
        self_id = st.header.member_id
        self.raft_term = st.raftTerm
        members = []
        for m in ml.members:
            is_self = m.ID == self_id
            members.append(MemberStatus(
                id=m.ID, name=m.name, addr=_url_addr(m.peerURLs[0]) if m.peerURLs else "",
                leader=m.ID == st.leader, reachable=is_self or f"{m.ID:x}" in active,
                is_self=is_self, learner=m.isLearner,
            ))
        status = StoreStatus(self_id, st.leader, tuple(sorted(members, key=lambda m: m.addr)))
        if status != self._status:
            if status.leader_id != self._status.leader_id:
                log.info("node=%s store leader is now %s", self.node_id, status.leader_addr or "unknown")
            self._status = status
            for q in list(self._status_subscribers):
                q.put_nowait(status)
        return status

    async def _quorum_message(self) -> str | None:
        try:
            st = await self.refresh_status()
        except grpc.aio.AioRpcError:
            st = self._status
        if not st.members or st.has_quorum:
            return None
        if st.reachable * 2 > st.total:  # a majority is connected: the store is electing its leader
            return None
        return (f"no quorum: {st.reachable} of {st.total} managers reachable; "
                "writes are refused until a majority is back (this one was not confirmed: it may still "
                "take effect then, so read before you retry)")

    async def _status_loop(self) -> None:
        while True:
            try:
                await self.refresh_status()
            except grpc.aio.AioRpcError as e:
                log.debug("node=%s store status: %s", self.node_id, e.code().name)
            await asyncio.sleep(STATUS_PERIOD)

    # ---- lifecycle -----------------------------------------------------------------------------
    def _etcd_config(self) -> EtcdConfig:
        cfg = self.cfg
        initial: tuple[tuple[str, str], ...] = ()
        for entry in cfg.initial_cluster:
            name, _, url = entry.partition("=")
            initial += ((name, url),)
        return EtcdConfig(
            dir=cfg.state_dir / "etcd",
            name=self.node_id,
            peer_url=peer_url(cfg.raft_addr),
            peer_listen=peer_url(cfg.raft_listen) if cfg.raft_listen else "",
            cert_pem=self.credentials.current.cert_pem,
            key_pem=self.credentials.current.key_pem,
            ca_pem=self.credentials.current.ca_pem,
            initial_cluster=initial,
            initial_state="existing" if initial else "new",
            force_new_cluster=cfg.force_new_cluster,
        )

    async def start(self, bootstrap: store_pb2.StoreSnapshot | None = None) -> None:
        """Start the member and the store, write `bootstrap` (a new cluster's first objects) if
        given, then open the APIs: once this returns, the control socket answers for a ready node."""
        cfg = self.cfg
        if not cfg.data_key:
            raise ValueError("ManagerConfig.data_key is empty: swarmd passes the data key from <state_dir>/keys")
        renewed = self._renew_if_expired()
        self.member = EtcdMember(self._etcd_config())
        self.credentials.subscribe(self._renewed)
        if self.member.has_data and not cfg.force_new_cluster:
            # A restart: the member answers only once a quorum of members runs, however long
            # that takes (the other managers may be restarting too).
            self._tasks.append(asyncio.create_task(self.member.run(), name="etcd-member"))
            while not await self.member.wait_ready(timeout=10):
                log.warning("node=%s waiting for the store: its etcd member has no quorum yet "
                            "(a majority of the managers must be running)", self.node_id)
        else:
            await self.member.start()
            self._tasks.append(asyncio.create_task(self.member.run(), name="etcd-member"))
        self.store = EtcdStore(self.member.client_target, codec=DataKeyCodec(cfg.data_key),
                               write_timeout=cfg.write_timeout, quorum_message=self._quorum_message)
        await self.store.start()
        self.election = Election(self.store, self.node_id, ttl=cfg.lease_ttl)
        try:
            await self.refresh_status()
        except grpc.aio.AioRpcError as e:
            log.info("node=%s store status not available yet: %s", self.node_id, e.code().name)
        self._tasks.append(asyncio.create_task(self._status_loop(), name="store-status"))
        if bootstrap is not None:
            await self.bootstrap(bootstrap)
        self._tasks.append(asyncio.create_task(self._follow_cluster_keys(), name="cluster-keys"))
        if renewed:
            self._tasks.append(asyncio.create_task(self._record_own_certificate(), name="own-certificate"))
        self.control = ControlServicer(self.store, manager=self)
        self.logbroker = LogBroker(self.store, manager=self)
        self.dispatcher = Dispatcher(self.store, manager=self, logbroker=self.logbroker)
        self.watch = WatchServicer(self.store, self)
        ca_svc = ca.CAServicer(self._root_ca_pem, self.issue_node_certificate, heartbeat_period=self.dispatcher.period)
        ca_plain = ca.CAServicer(self._root_ca_pem, self.issue_node_certificate, plain=True)
        tag = f"shoal-{self.node_id}-{os.getpid()}"
        paths = {k: f"\0{tag}-{k}" for k in ("mtls", "join", "plain")}

        # Local control socket (0600).
        sock = Path(self.control_socket)
        m = metrics.current()
        counted: list[grpc.aio.ServerInterceptor] = [metrics.ControlAPIMetrics(m)] if m is not None else []
        local = grpc.aio.server(interceptors=counted)
        control_pb2_grpc.add_ControlServicer_to_server(self.control, local)
        logs_pb2_grpc.add_LogsServicer_to_server(self.logbroker, local)
        watch_pb2_grpc.add_WatchServicer_to_server(self.watch, local)
        await start_local_server(local, sock)
        self._servers.append(local)

        self.authz = Authorizer(self.store)
        self._tasks.append(asyncio.create_task(self.authz.run(), name="authz"))
        mtls = grpc.aio.server(interceptors=[self.authz, *counted], options=DISPATCHER_SERVER_OPTIONS)
        control_pb2_grpc.add_ControlServicer_to_server(self.control, mtls)
        dispatcher_pb2_grpc.add_DispatcherServicer_to_server(self.dispatcher, mtls)
        logs_pb2_grpc.add_LogsServicer_to_server(self.logbroker, mtls)
        logs_pb2_grpc.add_LogBrokerServicer_to_server(self.logbroker, mtls)
        watch_pb2_grpc.add_WatchServicer_to_server(self.watch, mtls)
        ca_pb2_grpc.add_CAServicer_to_server(ca_svc, mtls)
        mtls.add_secure_port(f"unix-abstract:{paths['mtls'][1:]}", self.credentials.server_credentials())
        join = grpc.aio.server()
        ca_pb2_grpc.add_CAServicer_to_server(ca_svc, join)
        join.add_secure_port(f"unix-abstract:{paths['join'][1:]}", self.credentials.server_credentials(client_auth=False))
        plain = grpc.aio.server()
        ca_pb2_grpc.add_CAServicer_to_server(ca_plain, plain)
        plain.add_insecure_port(f"unix-abstract:{paths['plain'][1:]}")
        for s in (mtls, join, plain):
            await s.start()
            self._servers.append(s)
        # (its process takes a moment to start: the control socket above may answer before this port)
        self._front = remoteapi.RemoteAPIFront(cfg.remote_listen, paths["mtls"], paths["join"], paths["plain"])
        await self._front.start()
        self._tasks.append(asyncio.create_task(self._leadership(), name="leadership"))
        log.info(
            "node=%s manager started: store peer %s, remote API %s (advertised %s), control socket %s",
            self.node_id, cfg.raft_addr, cfg.remote_listen, cfg.advertise_api, sock,
        )

    def _renewed(self, identity: ca.TLSIdentity) -> None:
        """A renewed certificate: the etcd member's peer TLS uses it from its next handshake on (etcd
        reads its certificate files at every handshake; the gRPC listeners follow by themselves)."""
        if self.member is not None:
            self.member.update_tls(identity.cert_pem, identity.key_pem)

    async def stop(self) -> None:
        log.info("node=%s manager stopping", self.node_id)
        self.credentials.unsubscribe(self._renewed)
        leading = self.store is not None and self.store.leading  # stopping the loops clears it
        for t in reversed(self._tasks):  # leadership first, the member last
            if t.get_name() == "etcd-member":
                continue
            t.cancel()
            await asyncio.gather(t, return_exceptions=True)
        if self.election is not None and leading:
            await self.election.resign()  # the others need not wait for the lease to expire
        if self._front is not None:
            await self._front.close()
        await asyncio.gather(*(s.stop(0.5) for s in self._servers), return_exceptions=True)
        self._servers.clear()
        if self.store is not None:
            await self.store.close()
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()
        if self.member is not None:
            await self.member.stop()
        try:
            Path(self.control_socket).unlink()
        except FileNotFoundError:
            pass
        log.info("node=%s manager stopped", self.node_id)

    async def bootstrap(self, objects: store_pb2.StoreSnapshot) -> None:
        """First start of a new cluster: write its first objects (see `write_bootstrap`)."""
        cluster = await write_bootstrap(self.raft, objects)
        if cluster is not None:
            log.info("node=%s cluster %s created with %d objects", self.node_id, cluster.id, len(objects.objects))

    # ---- encryption at rest ----------------------------------------------------------------------
    async def _follow_cluster_keys(self) -> None:
        """Keep `<state_dir>/keys` as the Cluster object wants it: the data key wrapped with the
        cluster's unlock key and no `keys/kek` while autolock is on, with a random KEK in `keys/kek`
        while it is off; re-wrapped when the unlock key is rotated; and `keys/root-ca`, the sealed
        copy of the root CA an expired manager renews itself from (see `_renew_if_expired`). One log
        line per change."""
        keys = KeyDir(self.cfg.state_dir / "keys")
        kept_root = b""
        watcher = self.raft.watch(["cluster"])
        try:
            while True:
                retry: float | None = None
                cluster = self.raft.cluster()
                if cluster is not None:
                    autolock = cluster.spec.encryption_config.autolock_managers and bool(cluster.unlock_key)
                    root = objects_pb2.Cluster(id=cluster.id, root_ca=cluster.root_ca)
                    root.spec.ca_config.CopyFrom(cluster.spec.ca_config)
                    root_bytes = root.SerializeToString(deterministic=True)
                    try:
                        change = keys.sync(self.cfg.data_key, cluster.unlock_key if autolock else None)
                        if change:
                            log.info("node=%s %s", self.node_id, change)
                        if root_bytes != kept_root:
                            keys.save_root_ca(self.cfg.data_key, root_bytes)
                            kept_root = root_bytes
                    except OSError as e:
                        log.error("node=%s cannot write the data key to %s: %s; retrying in 5 s",
                                  self.node_id, keys.path, e)
                        retry = 5.0
                    again = await self._refresh_store_trust(cluster)
                    if again is not None:
                        retry = again if retry is None else min(retry, again)
                try:
                    async with asyncio.timeout(retry):
                        if await watcher.queue.get() is None:
                            return
                except TimeoutError:
                    pass
        finally:
            watcher.close()

    async def _refresh_store_trust(self, cluster: objects_pb2.Cluster) -> float | None:
        """After a root rotation, restart this manager's etcd member so that it trusts the new root
        alone: etcd reads its trusted roots at start only (until then it still accepts the old root,
        and peers' certificates carry the cross-signed root for it). Never while a rotation runs;
        never on the manager leading the control loops (the agents' sessions are there; it refreshes
        once it leads no more); only while every member is reachable; one manager at a time (in node
        id order, `TRUST_STAGGER` apart). Returns in how many seconds to look again, None when done."""
        if self.member is None or cluster.root_ca.HasField("root_rotation"):
            self._trust_pending_since = None
            return None
        want = ca.trust_bundle(cluster.root_ca)
        if self.member.config.ca_pem == want:
            self._trust_pending_since = None
            return None
        now = time.monotonic()
        if self._trust_pending_since is None:
            self._trust_pending_since = now
        if self.is_leader():
            return 5.0
        if not self._status.members or not all(m.reachable for m in self._status.members):
            return 1.0
        ids = sorted(nid for nid, _ in self.api_peers())
        wait = (ids.index(self.node_id) if self.node_id in ids else len(ids)) * TRUST_STAGGER
        if now - self._trust_pending_since < wait:
            return wait - (now - self._trust_pending_since)
        log.info("node=%s restarting its etcd member to trust the new root CA alone", self.node_id)
        try:
            await self.member.restart(want)
        except EtcdError as e:
            log.error("node=%s etcd member restart with the new root failed: %s; retrying", self.node_id, e)
            return 5.0
        self._trust_pending_since = None
        return None

    def _renew_if_expired(self) -> bool:
        """Before the etcd member starts: a manager whose certificate expired while it was off (or
        expires within `EXPIRY_MARGIN`) signs itself a new one from `keys/root-ca`. Its etcd peers
        would refuse the expired one (and it theirs), so a cluster whose managers were all off that
        long would never get its quorum back. True if it renewed (the store learns the certificate
        once it answers: `_record_own_certificate`)."""
        ident = self.credentials.current
        expired_at = ca.expiry(ident.cert_pem)
        if expired_at - datetime.datetime.now(datetime.UTC) > EXPIRY_MARGIN:
            return False
        data = KeyDir(self.cfg.state_dir / "keys").load_root_ca(self.cfg.data_key)
        if data is None:
            raise ExpiredCertificate(
                f"the certificate of manager {self.node_id} expired at {expired_at.isoformat()} and "
                "this manager holds no copy of the root CA to renew it (it last ran an older version): restore "
                "the cluster on another manager, or from a backup (swarmd --restore)")
        kept = objects_pb2.Cluster.FromString(data)
        _, key = ca.new_key()
        cert = self._sign(kept, ca.make_csr(key), self.node_id, types_pb2.MANAGER, self.cfg.raft_addr)
        self.credentials.update(ca.TLSIdentity(key, cert, ca.trust_bundle(kept.root_ca)))
        log.warning("node=%s this manager's certificate expired at %s (off longer than its life): renewed it "
                    "from the root CA kept in keys/root-ca, valid until %s", self.node_id,
                    expired_at.isoformat(timespec="seconds"),
                    ca.expiry(cert).isoformat(timespec="seconds"))
        return True

    async def _record_own_certificate(self) -> None:
        """Write this manager's own certificate (renewed by `_renew_if_expired`) on its Node."""
        cert = self.credentials.current.cert_pem

        def fn(tx: Tx) -> None:
            cur = tx.get("node", self.node_id)
            if cur is None or cur.certificate == cert:
                return
            n = objects_pb2.Node()
            n.CopyFrom(cur)
            n.certificate = cert
            n.tls_info.CopyFrom(ca.tls_info(cert, self.credentials.current.ca_pem))
            tx.update(n)

        while True:
            try:
                await self.raft.update(fn)
                return
            except StoreError as e:
                log.info("node=%s recording the renewed certificate: %s; retrying", self.node_id, e)
                await asyncio.sleep(1)

    # ---- CA --------------------------------------------------------------------------------------
    def _root_ca_pem(self) -> bytes:
        """The roots to trust now (both during a rotation), the cluster's current one first."""
        cluster = self.raft.cluster()
        return ca.trust_bundle(cluster.root_ca) if cluster is not None else self.credentials.current.ca_pem

    async def issue_node_certificate(self, req: Any, peer: ca.PeerIdentity | None) -> ca.IssuedNode:
        """The CA's issue hook: a join with a token, or an existing node's role check / renewal."""
        cluster = self.raft.cluster()
        if cluster is None:
            raise ca.JoinError("this manager has no cluster state yet; retry in a moment")
        if peer is not None:
            return await self._renew(req, peer, cluster)
        role = ca.role_for_token(req.token, cluster.root_ca.join_tokens, cluster.root_ca.ca_cert)
        if role == types_pb2.MANAGER and not req.raft_addr:
            raise ca.JoinError("a manager must send its store peer address (raft_addr) to join")
        node_id = new_id()
        cert = self._sign(cluster, req.csr, node_id, role, req.raft_addr)
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
            tls_info=ca.tls_info(cert, ca.trust_bundle(cluster.root_ca)),
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
        issued = ca.IssuedNode(node_id, cert, role, cluster_id=cluster.id,
                               data_key=self.cfg.data_key if role == types_pb2.MANAGER else b"")
        if role == types_pb2.MANAGER:
            await self._admit_manager(req.raft_addr, issued, cluster)
        return issued

    @staticmethod
    def _sign(cluster: objects_pb2.Cluster, csr: bytes, node_id: str, role: int, raft_addr: str) -> bytes:
        """A certificate for `csr` from the root that issues now (a rotation's new one while it
        runs), valid for the cluster's `--cert-expiry`, followed by the cross-signed root when there
        is one; a manager's names its store peer address `raft_addr` (etcd peers check it)."""
        root, chain = ca.issuing_root(cluster.root_ca)
        ips = cert_ips(raft_addr) if role == types_pb2.MANAGER else []
        validity = ca.validity_of(cluster.spec.ca_config.node_cert_expiry.ToNanoseconds())
        return root.issue(csr, node_id, role, cluster.id, validity, ips=ips) + chain

    async def _admit_manager(self, raft_addr: str, issued: ca.IssuedNode, cluster: objects_pb2.Cluster) -> None:
        """Add the manager's etcd member as a learner (RoleManager promotes it once caught up) and
        hand it the members to start with: "name=url", its own entry named after its node id."""
        url = peer_url(raft_addr)
        deadline = time.monotonic() + 75  # < the joiner's 90 s
        waited = False
        while True:
            try:
                ml = await self.raft.cluster_api.MemberList(etcd_pb2.MemberListRequest(), timeout=2.0)
                members = list(ml.members)
                if not any(url in m.peerURLs for m in members):
                    resp = await self.raft.cluster_api.MemberAdd(
                        etcd_pb2.MemberAddRequest(peerURLs=[url], isLearner=True), timeout=self.cfg.write_timeout
                    )
                    members = list(resp.members)
                break
            except grpc.aio.AioRpcError as e:
                # etcd takes one learner at a time, and no new member until the last one has been
                # up for 5 s ("unhealthy cluster"): wait while another joining manager settles.
                busy = any(w in (e.details() or "") for w in ("too many learner", "unhealthy cluster")) or \
                    e.code() in (grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.UNAVAILABLE)
                if busy and time.monotonic() < deadline:
                    if not waited:
                        log.info("node=%s manager %s waits to join the store: %s", self.node_id, issued.node_id,
                                 e.details())
                        waited = True
                    await asyncio.sleep(0.5)
                    continue
                raise ca.JoinError(
                    f"could not add the manager to the store: {rpc_unavailable(e, 'member add')}"
                ) from None
        issued.raft_peers = tuple(
            f"{issued.node_id if url in m.peerURLs else (m.name or f'{m.ID:x}')}={m.peerURLs[0]}"
            for m in members if m.peerURLs
        )
        log.info("node=%s added manager %s to the store as a learner at %s", self.node_id, issued.node_id, url)

    async def _renew(self, req: Any, peer: ca.PeerIdentity, cluster: objects_pb2.Cluster) -> ca.IssuedNode:
        """An existing node's call: a new certificate when it asks for one (`req.renew`), when its
        role changed (promote/demote), when a root rotation runs and its certificate is of the old
        root, or when it outlives a shortened `--cert-expiry`; otherwise an answer without one (a
        role check). The answer carries the roots to trust now (`CAServicer`)."""
        if req.node_id and req.node_id != peer.node_id:
            raise ca.JoinError("a node can only renew its own certificate")
        node = self.raft.get("node", peer.node_id)
        if node is None:
            raise ca.JoinError(
                f"node {peer.node_id} is not part of the swarm any more (it was removed): "
                "join again with a join token after clearing its state dir"
            )
        promoted = node.role == types_pb2.MANAGER and peer.role != types_pb2.MANAGER
        validity = ca.validity_of(cluster.spec.ca_config.node_cert_expiry.ToNanoseconds())
        # `cluster update --cert-expiry` shortened the validity below what the node holds: the
        # node's next role check brings it a certificate of the new length at once.
        outlives = node.HasField("tls_info") and \
            node.tls_info.cert_not_after.ToDatetime(datetime.UTC) > datetime.datetime.now(datetime.UTC) + validity
        root, _ = ca.issuing_root(cluster.root_ca)
        old_root = node.tls_info.cert_issuer_public_key != ca.issuer_key(root.cert_pem)
        if node.role == peer.role and not req.renew and not outlives and not old_root:
            return ca.IssuedNode(node.id, b"", node.role, cluster_id=cluster.id)
        if promoted and not req.raft_addr:
            raise ca.JoinError("a promoted node must send its store peer address (raft_addr) to renew")
        raft_addr = req.raft_addr or node.manager_status.addr
        cert = self._sign(cluster, req.csr, node.id, node.role, raft_addr)
        info = ca.tls_info(cert, ca.trust_bundle(cluster.root_ca))

        def fn(tx: Tx) -> None:
            cur = tx.get("node", node.id)
            if cur is None:
                raise ca.JoinError(f"node {node.id} was removed from the swarm while it renewed its certificate")
            n = objects_pb2.Node()
            n.CopyFrom(cur)
            n.certificate = cert
            n.tls_info.CopyFrom(info)
            if promoted:
                n.manager_status.addr = req.raft_addr
                n.manager_status.api_addr = req.advertise_addr
            tx.update(n)

        await self.raft.update(fn)
        issued = ca.IssuedNode(node.id, cert, node.role, cluster_id=cluster.id,
                               data_key=self.cfg.data_key if promoted else b"")
        what = "renewed the certificate of" if node.role == peer.role else "issued a new role certificate to"
        log.info("node=%s %s node %s (%s, valid until %s)", self.node_id, what, node.id,
                 types_pb2.NodeRole.Name(node.role).lower(), info.cert_not_after.ToJsonString())
        if promoted:
            await self._admit_manager(req.raft_addr, issued, cluster)
        return issued

    # ---- leadership ------------------------------------------------------------------------------
    async def _leadership(self) -> None:
        assert self.election is not None
        lead: asyncio.Task[None] | None = None
        try:
            async for fence in self.election.terms():
                if fence is not None and lead is None:
                    log.info("node=%s leads the control loops (fence revision %d)", self.node_id, fence.revision)
                    self.raft.leading = True
                    self._leading.set()
                    lead = asyncio.create_task(self._lead(fence), name="leader-loops")
                elif fence is None and lead is not None:
                    log.info("node=%s lost the leader key: stopping control loops", self.node_id)
                    self.raft.leading = False
                    self._leading.clear()
                    await self._stop_loops(lead)
                    lead = None
        finally:
            self.raft.leading = False
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

    async def _lead(self, fence: Fence) -> None:
        while True:  # the cache holds everything committed before this term
            try:
                await self.raft.wait_for(fence.revision)
                break
            except Unavailable as e:
                log.info("node=%s leader catching up: %s", self.node_id, e)
        store = self.raft.fenced(fence)
        # The dispatcher first: its deadlines start now, and the sessions of every node (a fleet
        # reconnecting) open while the other loops make their first passes.
        self.dispatcher.leader_store = store
        loops: list[tuple[str, Any]] = [("Dispatcher", self.dispatcher)]
        for factory in LEADER_LOOPS:
            name = getattr(factory, "__name__", repr(factory)).lstrip("_")
            try:
                built = factory(store, self)
            except Exception:
                log.exception("node=%s leader loop %s failed to build", self.node_id, name)
                continue
            for loop in built if isinstance(built, list | tuple) else [built]:
                if loop is not None:
                    loops.append((type(loop).__name__, loop))
        async with asyncio.TaskGroup() as tg:
            await start_paced(tg, ((name, self._supervise(name, loop)) for name, loop in loops))

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


async def write_bootstrap(
    store: Store, objects: store_pb2.StoreSnapshot, patience: float = 30.0
) -> objects_pb2.Cluster | None:
    """Write a new cluster's first objects -- the Cluster and the first manager's Node, or everything
    a restored backup holds -- into `store`, and return the Cluster; None (nothing written) when the
    store holds a Cluster already.

    The Cluster goes last, so a start interrupted half-way writes the rest again. Each attempt
    writes only the objects the store does not hold yet: a batch goes in several transactions, and
    when one is refused (Unavailable: no quorum yet, or the outcome unknown) or an object turns out
    to exist (a write whose answer was lost landed after all), those before it stay committed; they
    are not sent again. Unavailable is raised when the store takes no write for `patience` s."""
    if store.cluster() is not None:
        return None
    cluster = next((so.cluster for so in objects.objects if so.WhichOneof("object") == "cluster"), None)
    assert cluster is not None, "a bootstrap holds the Cluster object"
    deadline = time.monotonic() + patience
    while True:
        actions = []
        for so in objects.objects:
            kind = so.WhichOneof("object")
            obj = getattr(so, kind)
            if kind != "cluster" and store.get(kind, obj.id) is None:
                action = store_pb2.StoreAction(kind=store_pb2.StoreAction.CREATE)
                getattr(action.object, kind).CopyFrom(obj)
                getattr(action.object, kind).meta.version = 0
                actions.append(action)
        try:
            if actions:
                await store.batch(actions)
            if store.cluster() is None:
                await store.update(lambda tx: tx.create(cluster))
            return cluster
        except (Unavailable, AlreadyExists) as e:
            if time.monotonic() > deadline:
                raise
            log.info("cluster bootstrap write refused (%s): writing what is missing again", e)
            await asyncio.sleep(0.2)
