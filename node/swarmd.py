"""swarmd: the node daemon. Every node runs the agent role; managers also run `Manager`.

    swarmd -d STATE_DIR --listen-remote-api ADDR:2377 [--advertise-remote-api ADDR:2377]
           [--listen-control-api SOCKET] [--hostname NAME] [--listen-peer ADDR:PORT]
           [--join-addr ADDR:2377 --join-token TOKEN] [--manager] [--default-addr-pool CIDR]
           [--force-new-cluster]

First start without --join-addr creates a cluster (root CA, join tokens, gossip key) with this node
as its first manager. With --join-addr it joins with the token (a worker token makes a worker, a
manager token a manager, whose etcd member joins the store). Started again with the same -d it
resumes its identity and state (the join flags are then ignored). SIGTERM/SIGINT: clean shutdown.
`--force-new-cluster` (a manager's later start): restart the store with this manager's member alone,
keeping everything in it -- the way back from a lost quorum.

State dir: `node.json` (identity and addresses), `certificates/` (node key 0600, certificate, root
CA), `keys/` (managers: the store's data key, wrapped; see `shoal.manager.encryption`), `etcd/`
(managers: the etcd member's data, its client socket, its log), `swarmd.sock` (control API, 0600).

Autolock: a manager whose `keys/dek` is locked (the cluster has autolock on) starts nothing of the
node -- no etcd member, no agent -- and serves only `UnlockCluster` on its control socket (every
other RPC: FAILED_PRECONDITION, "this manager is locked"); the right unlock key continues the start.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import datetime
import importlib
import importlib.util
import ipaddress
import json
import logging
import os
import random
import secrets
import shutil
import signal
import socket
import ssl
import sys
import time
import types
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc

from shoal.manager import ca
from shoal.proto import ca_pb2, ca_pb2_grpc, control_pb2, objects_pb2, specs_pb2, store_pb2, types_pb2

if TYPE_CHECKING:  # the manager role (store, control API, leader loops) is imported on managers only
    from shoal.manager.manager import Manager

log = logging.getLogger("shoal.swarmd")

DEFAULT_API_PORT = 2377
DEFAULT_PEER_PORT = 2380
ROLE_CHECK_PERIOD = 2.0
RENEW_BACKOFF_MAX = 60.0  # a failing renewal is retried at most this far apart
LOCKED_MESSAGE = "this manager is locked: run `swarmctl cluster unlock` and give it the unlock key"


@dataclass
class NodeState:
    """What `node.json` in the state dir remembers between starts."""

    node_id: str
    cluster_id: str
    role: str  # "manager" | "worker"
    hostname: str
    listen_api: str
    advertise_api: str
    raft_addr: str = ""
    raft_listen: str = ""
    managers: list[str] = field(default_factory=list)  # remote API addresses of managers
    bootstrapped: bool = True

    @classmethod
    def load(cls, state_dir: Path) -> NodeState | None:
        try:
            return cls(**json.loads((state_dir / "node.json").read_text()))
        except FileNotFoundError:
            return None

    def save(self, state_dir: Path) -> None:
        tmp = state_dir / "node.json.tmp"
        tmp.write_text(json.dumps(asdict(self), indent=1))
        os.replace(tmp, state_dir / "node.json")


@dataclass
class AgentContext:
    """Everything the agent needs from the node daemon."""

    node_id: str
    cluster_id: str
    hostname: str
    state_dir: Path
    identity: ca.TLSIdentity  # mTLS to managers at start; `credentials` follows renewals
    # Remote API addresses (host:port) of managers. The agent may update this list in place with
    # the managers its dispatcher session announces; swarmd's role checks use it too.
    managers: list[str]
    advertise_addr: str  # this node's address (data path / gossip)
    is_manager: bool
    registry_mirrors: list[str] = field(default_factory=list)     # mirrors of Docker Hub, tried first
    insecure_registries: list[str] = field(default_factory=list)  # HOST:PORT reached over plain HTTP
    egress_subnet: str = "172.18.0.0/16"                          # the node's gateway bridge (egress NAT)
    gossip_port: int = 7946
    credentials: ca.NodeCredentials | None = None  # the node's TLS identity as renewals change it


async def start_agent(ctx: AgentContext) -> asyncio.Task[None] | None:
    """The agent role's hook (every node): a task running the agent and the node's networking.

    `shoal.agent.agent.start_agent_task(ctx)` builds the engine under `<state dir>/engine` and the
    agent's mTLS session with the dispatcher; `shoal.agent.network.NetworkAgent` gives its tasks
    overlay networks (started with the gossip keys of the first session message). Both keep what the
    next start needs in `<state dir>/worker` (`shoal.agent.localstate`): a restarted node re-adopts its
    containers and serves their names and VIPs before any manager answers. swarmd cancels the task
    on shutdown (containers keep running and are adopted on the next start)."""
    from shoal.agent.agent import start_agent_task
    from shoal.agent.localstate import LocalState
    from shoal.agent.network import NetworkAgent

    state = LocalState(Path(ctx.state_dir) / "worker")
    net = NetworkAgent(ctx.node_id, ctx.advertise_addr, ctx.state_dir, f"n{ctx.node_id[:6]}",
                       gossip_port=ctx.gossip_port, gw_subnet=ctx.egress_subnet, state=state)
    agent_task = start_agent_task(
        ctx, registry_mirrors=ctx.registry_mirrors, insecure_registries=ctx.insecure_registries,
        network=net, on_session=net.on_session, state=state,
    )

    async def node_agent() -> None:
        try:
            async with asyncio.TaskGroup() as tg:
                tg.create_task(net.serve())
                await agent_task
                raise asyncio.CancelledError  # the agent ended: end the networking loop too
        finally:
            agent_task.cancel()
            await asyncio.gather(agent_task, return_exceptions=True)
            await net.stop()

    task = asyncio.create_task(node_agent(), name=f"node-agent-{ctx.node_id}")
    task.agent = agent_task.agent  # type: ignore[attr-defined]
    task.network = net  # type: ignore[attr-defined]
    return task


# ---- memory (issue #7: manager idle <= 80 MB, agent idle <= 50 MB resident) ------------------------
MALLOC_ARENA_MAX = 2  # glibc default: 8 per core, each thread (gRPC's, executors) grows its own
M_ARENA_MAX = -8      # mallopt parameter number (malloc.h)


def _lazy_pyroute2() -> None:
    """Register the pyroute2 package without running its __init__, which imports every netlink
    family pyroute2 has (NDB and sqlite3, IPDB, nl80211, ipvs, conntrack, ...: ~80 modules and
    ~6 MB resident more) while swarmd uses rtnl and netns only. Submodule imports (`from pyroute2 import
    netns`, `pyroute2.iproute`) load just what they name; any other name (`from pyroute2 import
    NDB`) runs the real __init__ on first use, so nothing a caller could ask for is missing."""
    if "pyroute2" in sys.modules:
        return
    spec = importlib.util.find_spec("pyroute2")
    if spec is None or spec.origin is None or not spec.submodule_search_locations:
        return
    mod = types.ModuleType("pyroute2")
    mod.__spec__, mod.__file__, mod.__package__ = spec, spec.origin, "pyroute2"
    mod.__path__ = list(spec.submodule_search_locations)
    origin = spec.origin

    def __getattr__(name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        try:
            return importlib.import_module(f"pyroute2.{name}")
        except ModuleNotFoundError as e:
            if e.name != f"pyroute2.{name}":
                raise
        mod.__dict__.pop("__getattr__", None)
        log.debug("pyroute2.%s asked for: loading the whole pyroute2 package", name)
        exec(compile(Path(origin).read_bytes(), origin, "exec"), mod.__dict__)  # noqa: S102
        return getattr(mod, name)

    mod.__getattr__ = __getattr__  # type: ignore[method-assign]
    sys.modules["pyroute2"] = mod


def _libc() -> ctypes.CDLL | None:
    try:
        return ctypes.CDLL(None)
    except OSError:
        return None


def _limit_malloc_arenas() -> None:
    """Cap glibc's malloc arenas (like MALLOC_ARENA_MAX=2) before any thread starts, unless the
    environment already chose; an explicit MALLOC_ARENA_MAX wins."""
    libc = _libc()
    if "MALLOC_ARENA_MAX" not in os.environ and libc is not None and hasattr(libc, "mallopt"):
        libc.mallopt(M_ARENA_MAX, MALLOC_ARENA_MAX)


def trim_heap() -> None:
    """Give freed heap pages back to the kernel (glibc keeps them otherwise): after start-up and
    after a role switch, when the imports' and handshakes' garbage has been freed, after a full
    collection once a minute at most (`_watch_collections`), and in the memory census."""
    libc = _libc()
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


def _memdebug_install() -> None:
    """SWARMD_MEMDEBUG=N (frames, e.g. 1): trace Python allocations from the start, so that the
    memory census (SIGUSR2, `_memory_census`) also lists the lines that allocated the most."""
    frames = int(os.environ.get("SWARMD_MEMDEBUG", "0") or 0)
    if frames > 0:
        import tracemalloc

        tracemalloc.start(frames)


# ---- helpers ----------------------------------------------------------------------------------
def _split(addr: str, default_port: int) -> tuple[str, int]:
    host, sep, port = addr.rpartition(":")
    if not sep:
        return addr, default_port
    return host.strip("[]"), int(port)


def _fmt(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _default_advertise_host(listen_host: str) -> str:
    if listen_host not in ("", "0.0.0.0", "::"):
        return listen_host
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("198.18.0.1", 9))  # no packet is sent; picks the outgoing interface
            return s.getsockname()[0]
        except OSError:
            return "127.0.0.1"


def expired_message(node_id: str, identity: ca.TLSIdentity, state_dir: Path) -> str:
    """The one sentence for a worker whose certificate expired (off, or cut off from every manager,
    for longer than the cluster's certificate expiry): no manager accepts it any more."""
    when = ca.expiry(identity.cert_pem).isoformat(timespec="seconds")
    return (f"the certificate of node {node_id} expired at {when}, so no manager accepts this node any more: "
            f"on a manager run `swarmctl node rm --force {node_id}`, then remove {state_dir} and join again "
            "with a token from `swarmctl swarm join-token worker`")


class NodeIdFilter(logging.Filter):
    def __init__(self) -> None:
        super().__init__()
        self.node_id = "-"

    def filter(self, record: logging.LogRecord) -> bool:
        record.node = self.node_id
        return True


class Swarmd:
    def __init__(self, args: argparse.Namespace, idfilter: NodeIdFilter) -> None:
        self.args = args
        self.dir = Path(args.state_dir).resolve()
        self.idfilter = idfilter
        self.state: NodeState | None = None
        self.identity: ca.TLSIdentity | None = None  # as found or made at start; then `credentials`
        self.credentials: ca.NodeCredentials | None = None
        self.manager: Manager | None = None
        self.agent: asyncio.Task[None] | None = None
        self.agent_ctx: AgentContext | None = None
        self.role_task: asyncio.Task[None] | None = None
        self.engine_api: asyncio.Server | None = None  # the Docker Engine API (shoal.engineapi)
        self.engine_api_tls: asyncio.Server | None = None  # and on TCP with mutual TLS (--engine-api-addr)
        self.metrics: Any = None  # shoal.node.metrics.MetricsServer with --metrics-addr
        self.stop_event = asyncio.Event()

    # ---- init / join / resume ----------------------------------------------------------------
    def _addresses(self) -> tuple[str, str, str, str]:
        a = self.args
        lhost, lport = _split(a.listen_remote_api, DEFAULT_API_PORT)
        if a.advertise_remote_api:
            ahost, aport = _split(a.advertise_remote_api, lport)
        else:
            ahost, aport = _default_advertise_host(lhost), lport
        if a.listen_peer:
            rhost, rport = _split(a.listen_peer, DEFAULT_PEER_PORT)
            raft_listen = _fmt(rhost, rport)
            raft_addr = _fmt(ahost if rhost in ("0.0.0.0", "::", "") else rhost, rport)
        else:
            raft_addr = _fmt(ahost, DEFAULT_PEER_PORT)
            raft_listen = ""
        return _fmt(lhost, lport), _fmt(ahost, aport), raft_addr, raft_listen

    async def setup(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        st = NodeState.load(self.dir)
        if st is not None and self.args.restore:
            raise SystemExit(f"--restore starts a new manager from a backup, but {self.dir} already holds node "
                             f"{st.node_id}: give a new, empty state dir (-d)")
        if st is not None:
            self.state = st
            self.identity = ca.TLSIdentity.load(self.dir / "certificates")
            if self.identity is None:
                raise SystemExit(f"state dir {self.dir} has node.json but no certificates: remove it and join again")
            self.idfilter.node_id = st.node_id
            if self.args.join_addr:
                log.info("resuming node %s from %s; --join-addr/--join-token ignored", st.node_id, self.dir)
            else:
                log.info("resuming node %s (%s) from %s", st.node_id, st.role, self.dir)
            return
        listen, advertise, raft_addr, raft_listen = self._addresses()
        hostname = self.args.hostname or socket.gethostname()
        if self.args.restore:
            self._restore(hostname, listen, advertise, raft_addr, raft_listen)
        elif self.args.join_addr:
            await self._join(hostname, listen, advertise, raft_addr, raft_listen)
        else:
            self._init(hostname, listen, advertise, raft_addr, raft_listen)

    def _init(self, hostname: str, listen: str, advertise: str, raft_addr: str, raft_listen: str) -> None:
        from shoal.manager.store import new_id

        cluster_id = new_id()
        root = ca.RootCA.create(cluster_id)
        pool = self.args.default_addr_pool or "10.0.0.0/8"
        try:
            ipaddress.ip_network(pool)
        except ValueError:
            raise SystemExit(f"--default-addr-pool {pool!r} is not a CIDR network (e.g. 10.0.0.0/8)") from None
        assert root.key_pem is not None
        cluster = objects_pb2.Cluster(
            id=cluster_id,
            spec=specs_pb2.ClusterSpec(
                annotations=types_pb2.Annotations(name="default"),
                orchestration=specs_pb2.ClusterSpec.Orchestration(task_history_retention_limit=5),
                dispatcher=specs_pb2.ClusterSpec.Dispatcher(heartbeat_period={"seconds": 1}),
                default_address_pool=[pool],
                subnet_size=24,
            ),
            root_ca=objects_pb2.RootCA(
                ca_key=root.key_pem,
                ca_cert=root.cert_pem,
                ca_cert_hash=root.digest,
                join_tokens=types_pb2.JoinTokens(
                    worker=ca.generate_join_token(root.cert_pem), manager=ca.generate_join_token(root.cert_pem)
                ),
            ),
            network_bootstrap_keys=[
                types_pb2.EncryptionKey(subsystem="networking:gossip", key=secrets.token_bytes(16), lamport_time=1)
            ],
        )
        pending = store_pb2.StoreSnapshot()
        pending.objects.add().cluster.CopyFrom(cluster)
        self._first_manager(pending, hostname, listen, advertise, raft_addr, raft_listen)
        log.info("initialized a new cluster %s; this node %s is its first manager", cluster_id, self.state.node_id)

    def _restore(self, hostname: str, listen: str, advertise: str, raft_addr: str, raft_listen: str) -> None:
        """--restore FILE: a new cluster of this one manager with everything the backup holds; the
        key that opens the backup is read from standard input."""
        from shoal.manager import backup

        path = self.args.restore
        try:
            data = Path(path).read_bytes()
            head = backup.read_header(data, path)
        except OSError as e:
            raise SystemExit(f"--restore {path}: {e.strerror or e}") from None
        except backup.BackupError as e:
            raise SystemExit(f"--restore: {e}") from None
        if sys.stdin.isatty():
            import getpass

            key = getpass.getpass(f"key of the backup of cluster {head.cluster_id} (SWMKEY-1-...): ")
        else:
            key = sys.stdin.readline()
        try:
            snap = backup.open_backup(data, key, path)
        except backup.BackupError as e:
            raise SystemExit(f"--restore: {e}; give it on standard input, e.g. `swarmd ... --restore {path} < KEYFILE`") from None
        if sum(1 for so in snap.objects if so.WhichOneof("object") == "cluster") != 1:
            raise SystemExit(f"--restore: {path} holds no cluster object: it is not a backup of a cluster")
        # The Cluster goes last (see Manager.bootstrap); this manager's Node is added before it.
        pending = store_pb2.StoreSnapshot(version=snap.version)
        pending.objects.extend(so for so in snap.objects if so.WhichOneof("object") != "cluster")
        pending.objects.extend(so for so in snap.objects if so.WhichOneof("object") == "cluster")
        self._first_manager(pending, hostname, listen, advertise, raft_addr, raft_listen)
        log.info("restoring cluster %s from %s (store version %d, %d objects); this node %s is its manager",
                 head.cluster_id, path, snap.version, len(snap.objects), self.state.node_id)

    def _first_manager(self, pending: store_pb2.StoreSnapshot, hostname: str, listen: str, advertise: str,
                       raft_addr: str, raft_listen: str) -> None:
        """Make this node the first manager of the cluster whose objects `pending` holds (its Cluster
        last): identity from the cluster's CA, a data key, and `bootstrap.pb` for Manager.bootstrap."""
        from shoal.manager.encryption import KeyDir, new_data_key
        from shoal.manager.manager import cert_ips
        from shoal.manager.store import new_id

        cluster = pending.objects[-1].cluster
        node_id = new_id()
        self.idfilter.node_id = node_id
        root = ca.RootCA(cluster.root_ca.ca_cert, cluster.root_ca.ca_key)
        _, key = ca.new_key()
        cert = root.issue(ca.make_csr(key), node_id, types_pb2.MANAGER, cluster.id, ips=cert_ips(raft_addr))
        self.identity = ca.TLSIdentity(key, cert, root.cert_pem)
        self.identity.save(self.dir / "certificates")
        KeyDir(self.dir / "keys").create(new_data_key())  # the store's data key, before anything is written
        node = objects_pb2.Node(
            id=node_id,
            spec=specs_pb2.NodeSpec(
                desired_role=types_pb2.MANAGER,
                membership=specs_pb2.NodeSpec.ACCEPTED,
                availability=types_pb2.ACTIVE,
            ),
            description=types_pb2.NodeDescription(hostname=hostname, addr=_split(advertise, 0)[0]),
            status=types_pb2.NodeStatus(state=types_pb2.NodeStatus.READY, addr=_split(advertise, 0)[0]),
            manager_status=types_pb2.ManagerStatus(
                addr=raft_addr, api_addr=advertise, leader=True, reachability=types_pb2.ManagerStatus.REACHABLE
            ),
            role=types_pb2.MANAGER,
            certificate=self.identity.cert_pem,
            tls_info=ca.tls_info(self.identity.cert_pem, root.cert_pem),
        )
        first = store_pb2.StoreSnapshot(version=pending.version)
        first.objects.extend(pending.objects[:-1])
        first.objects.add().node.CopyFrom(node)
        first.objects.extend(pending.objects[-1:])
        # Until the first write commits, the cluster (root CA key included) lives in this file
        # (0600), so that a crash in between resumes instead of losing it.
        fd = os.open(self.dir / "bootstrap.pb", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(first.SerializeToString())
        self.state = NodeState(
            node_id, cluster.id, "manager", hostname, listen, advertise, raft_addr, raft_listen,
            [advertise], bootstrapped=False,
        )
        self.state.save(self.dir)

    async def _join(self, hostname: str, listen: str, advertise: str, raft_addr: str, raft_listen: str) -> None:
        a = self.args
        if not a.join_token:
            raise SystemExit("--join-addr needs --join-token: get one with `swarmctl swarm join-token worker` on a manager")
        try:
            res = await ca.join_cluster(
                a.join_addr, a.join_token, hostname=hostname, advertise_addr=advertise, raft_addr=raft_addr
            )
        except ca.JoinError as e:
            raise SystemExit(f"cannot join the swarm through {a.join_addr}: {e}") from None
        resp = res.response
        if a.manager and resp.role != types_pb2.MANAGER:
            raise SystemExit("--manager needs a manager join token: get one with `swarmctl swarm join-token manager`")
        self.idfilter.node_id = resp.node_id
        self.identity = res.identity
        self.identity.save(self.dir / "certificates")
        role = "manager" if resp.role == types_pb2.MANAGER else "worker"
        if role == "manager":
            self._initial_cluster = list(resp.raft_peers)
            if not resp.data_key:
                raise SystemExit(f"the manager at {a.join_addr} sent no data key for the store: "
                                 "join through a manager running the same swarmd version")
            from shoal.manager.encryption import KeyDir

            # A random KEK first; the manager re-wraps it with the unlock key if autolock is on.
            KeyDir(self.dir / "keys").create(resp.data_key)
        self.state = NodeState(
            resp.node_id, resp.cluster_id, role, hostname, listen, advertise,
            raft_addr if role == "manager" else "", raft_listen if role == "manager" else "",
            [a.join_addr] + ([advertise] if role == "manager" else []),
        )
        self.state.save(self.dir)
        if resp.heartbeat_period.ToNanoseconds() > 0:  # the agent's first connection sets its keepalive from it
            from shoal.agent.localstate import LocalState

            LocalState(self.dir / "worker").save_heartbeat_period(resp.heartbeat_period.ToNanoseconds() / 1e9)
        log.info("joined cluster %s through %s as %s %s", resp.cluster_id, a.join_addr, role, resp.node_id)

    # ---- roles ---------------------------------------------------------------------------------
    async def start_manager(
        self, initial_cluster: list[str] | None = None, bootstrap: store_pb2.StoreSnapshot | None = None,
        data_key: bytes | None = None,
    ) -> None:
        from shoal.manager.encryption import KeyDir
        from shoal.manager.manager import Manager, ManagerConfig  # not loaded on a worker

        st, creds = self.state, self.credentials
        assert st is not None and creds is not None
        if data_key is None:
            data_key = KeyDir(self.dir / "keys").load()
            if data_key is None:
                raise RuntimeError("the manager's data key is locked: start it through start_manager_unlocked")
        log.info("starting the manager role")
        self.manager = Manager(
            ManagerConfig(
                state_dir=self.dir,
                identity=creds.current,
                credentials=creds,
                cluster_id=st.cluster_id,
                remote_listen=st.listen_api,
                advertise_api=st.advertise_api,
                raft_addr=st.raft_addr,
                raft_listen=st.raft_listen or None,
                initial_cluster=initial_cluster or [],
                force_new_cluster=self.args.force_new_cluster,
                control_socket=Path(self.args.listen_control_api) if self.args.listen_control_api else None,
                hostname=st.hostname,
                data_key=data_key,
            )
        )
        await self.manager.start(bootstrap)

    def _control_socket(self) -> Path:
        return Path(self.args.listen_control_api) if self.args.listen_control_api else self.dir / "swarmd.sock"

    async def start_manager_unlocked(
        self, initial_cluster: list[str] | None = None, bootstrap: store_pb2.StoreSnapshot | None = None
    ) -> bool:
        """`start_manager` with the data key from `keys/`. A locked key (autolock) first waits for
        the unlock key: only `UnlockCluster` is served on the control socket meanwhile, nothing else
        of the node runs. False if the daemon was told to stop while locked."""
        from shoal.manager.encryption import KeyDir, KeyFileError

        keys = KeyDir(self.dir / "keys")
        try:
            data_key = keys.load()
        except KeyFileError as e:
            raise SystemExit(f"cannot start the manager role: {e}") from None
        if data_key is None:
            data_key = await self._wait_for_unlock(keys)
            if data_key is None:
                return False
        await self.start_manager(initial_cluster, bootstrap, data_key=data_key)
        return True

    async def _wait_for_unlock(self, keys: Any) -> bytes | None:
        """Serve the locked control socket until a right unlock key arrives (the data key) or the
        daemon is told to stop (None)."""
        from shoal.manager.encryption import InvalidUnlockKey

        unlocked: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()

        async def unlock(request: control_pb2.UnlockClusterRequest, context: Any) -> control_pb2.UnlockClusterResponse:
            if unlocked.done():
                return control_pb2.UnlockClusterResponse()
            try:
                dek = keys.unlock(request.unlock_key)
            except InvalidUnlockKey as e:
                log.warning("unlock refused: %s", e)
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
            log.info("unlock key accepted: starting the manager role")
            unlocked.set_result(dek)
            return control_pb2.UnlockClusterResponse()

        async def locked(request_iterator: Any, context: Any) -> None:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, LOCKED_MESSAGE)

        class Handler(grpc.GenericRpcHandler):
            def service(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
                if details.method == "/shoal.Control/UnlockCluster":
                    return grpc.unary_unary_rpc_method_handler(
                        unlock, request_deserializer=control_pb2.UnlockClusterRequest.FromString,
                        response_serializer=control_pb2.UnlockClusterResponse.SerializeToString,
                    )
                return grpc.stream_stream_rpc_method_handler(locked)

        from shoal.manager.manager import start_local_server

        sock = self._control_socket()
        server = grpc.aio.server()
        server.add_generic_rpc_handlers((Handler(),))
        await start_local_server(server, sock)
        log.warning("this manager is locked (autolock): nothing runs until `swarmctl cluster unlock` "
                    "gives it the unlock key on %s", sock)
        stop = asyncio.ensure_future(self.stop_event.wait())
        try:
            await asyncio.wait({unlocked, stop}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop.cancel()
            await server.stop(1.0)  # the grace lets the accepted unlock answer reach the client
            with contextlib.suppress(FileNotFoundError):
                sock.unlink()
        return unlocked.result() if unlocked.done() else None

    async def stop_manager(self) -> None:
        if self.manager is not None:
            await self.manager.stop()
            self.manager = None

    async def _certificates(self) -> None:
        """The node's certificate loop. Every ROLE_CHECK_PERIOD it asks a manager whether this node's
        role changed (promote/demote), and switches the manager role on or off with the certificate of
        the new role when it did. At a random point between 50 % and 80 % of its certificate's life it
        asks for a new certificate for a new key (renewal), and retries with backoff until one comes.
        Either certificate goes to `self.credentials`: the next TLS handshake of every server and
        client of the node uses it; open connections (the agent's session) go on undisturbed."""
        assert self.state is not None and self.credentials is not None
        creds = self.credentials
        rng = random.Random()

        def renewal_time(cert_pem: bytes) -> datetime.datetime:
            return ca.renewal_time(cert_pem, rng.uniform(ca.RENEW_FROM, ca.RENEW_UNTIL))

        renew_at = renewal_time(creds.current.cert_pem)
        retry_at, backoff = 0.0, ROLE_CHECK_PERIOD
        csr_for: tuple[bytes, bytes] = (b"", b"")  # (key, its CSR): role checks reuse it
        while True:
            await asyncio.sleep(ROLE_CHECK_PERIOD)
            ident = creds.current
            renew = datetime.datetime.now(datetime.UTC) >= renew_at and time.monotonic() >= retry_at
            if renew:
                key_pem = ca.new_key()[1]
                csr = ca.make_csr(key_pem)
            else:
                if csr_for[0] != ident.key_pem:
                    csr_for = (ident.key_pem, ca.make_csr(ident.key_pem))
                key_pem, csr = csr_for
            t0 = time.monotonic()
            resp = await self._ask_ca(csr, renew)
            took = time.monotonic() - t0
            if resp is not None and resp.root_ca and resp.root_ca != ident.ca_pem:
                # a root rotation began or ended: trust what the manager (authenticated) trusts now
                log.info("trusted root CAs changed: now %d root(s), %s first", len(ca.load_certs(resp.root_ca)),
                         ca.ca_digest(resp.root_ca)[:12])
                if not resp.certificate:
                    creds.update(ca.TLSIdentity(ident.key_pem, ident.cert_pem, resp.root_ca))
            if resp is None or not resp.certificate:
                if renew:  # backoff: doubling, at most a minute and a tenth of the certificate's life
                    cap = min(RENEW_BACKOFF_MAX, ca.lifetime(ident.cert_pem).total_seconds() / 10)
                    retry_at, backoff = time.monotonic() + backoff, max(ROLE_CHECK_PERIOD, min(backoff * 2, cap))
                    self._warn_renewal_failed(ident)
                continue
            trust = resp.root_ca or ident.ca_pem
            new = ca.TLSIdentity(key_pem, resp.certificate, trust)
            try:
                info = ca.cert_info(new.cert_pem, trust)
            except (ValueError, TypeError) as e:  # cryptography: a signature or issuer mismatch
                log.error("a manager sent a certificate this node cannot use (%s): ignoring it", e)
                continue
            if info.node_id != self.state.node_id:
                log.error("a manager sent a certificate for node %s, not this node: ignoring it", info.node_id)
                continue
            if info.role == ident.role:
                creds.update(new)
                renew_at = renewal_time(new.cert_pem)
                retry_at, backoff = 0.0, ROLE_CHECK_PERIOD
                log.info("certificate renewed in %.0f ms: valid until %s, next renewal at %s", took * 1000,
                         ca.expiry(new.cert_pem).isoformat(timespec="seconds"), renew_at.isoformat(timespec="seconds"))
                continue
            await self._switch_role(resp, new)
            renew_at = renewal_time(new.cert_pem)

    def _warn_renewal_failed(self, ident: ca.TLSIdentity) -> None:
        left = (ca.expiry(ident.cert_pem) - datetime.datetime.now(datetime.UTC)).total_seconds()
        if left <= 0:
            log.error("%s", expired_message(self.state.node_id if self.state else "?", ident, self.dir))
        else:
            log.warning("certificate renewal failed (no manager answered): retrying; it expires in %.0f s", left)

    async def _switch_role(self, resp: ca_pb2.IssueNodeCertificateResponse, new: ca.TLSIdentity) -> None:
        """Promoted or demoted: take the new role's certificate and start or stop the manager role."""
        assert self.state is not None and self.credentials is not None
        new_role = "manager" if resp.role == types_pb2.MANAGER else "worker"
        if new_role == "manager" and not resp.data_key:
            log.error("promoted, but the manager sent no data key for the store: retrying")
            return
        log.info("role changed to %s: switching", new_role)
        self.credentials.update(new)
        if new_role == "manager":
            shutil.rmtree(self.dir / "etcd", ignore_errors=True)  # a member of an earlier term
            from shoal.manager.encryption import KeyDir

            KeyDir(self.dir / "keys").create(resp.data_key)  # re-wrapped by the manager if autolocked
            self.state.role = "manager"
            self.state.save(self.dir)
            await self.start_manager(list(resp.raft_peers))
        else:
            await self.stop_manager()
            shutil.rmtree(self.dir / "etcd", ignore_errors=True)
            shutil.rmtree(self.dir / "keys", ignore_errors=True)  # a worker holds no data key
            self.state.role = "worker"
            self.state.save(self.dir)
        log.info("now a %s", new_role)
        trim_heap()

    def _manager_addrs(self) -> list[str]:
        assert self.state is not None
        addrs: list[str] = []
        if self.manager is not None:
            try:
                addrs = [a for _, a in self.manager.api_peers() if a != self.state.advertise_api]
                addrs.append(self.state.advertise_api)
            except Exception:
                addrs = []
        known = list(self.state.managers)
        if self.agent_ctx is not None:
            known += self.agent_ctx.managers
        agent = getattr(self.agent, "agent", None)  # the Agent object start_agent_task attaches
        known += list(getattr(agent, "managers", None) or [])
        for a in known:
            if a not in addrs:
                addrs.append(a)
        return addrs

    async def _ask_ca(self, csr: bytes, renew: bool) -> ca_pb2.IssueNodeCertificateResponse | None:
        """Send this node's CSR to the CA of the first manager that answers: a role check, or a
        renewal (`renew`). None if no manager answered or each refused."""
        assert self.state is not None and self.credentials is not None
        st = self.state
        raft_addr = st.raft_addr or self._addresses()[2]
        if not st.raft_addr:
            st.raft_addr = raft_addr
            st.raft_listen = self._addresses()[3]
        req = ca_pb2.IssueNodeCertificateRequest(
            csr=csr, node_id=st.node_id, hostname=st.hostname, advertise_addr=st.advertise_api, raft_addr=raft_addr,
            renew=renew,
        )
        for addr in self._manager_addrs():
            try:
                async with ca.secure_channel(addr, self.credentials.current) as ch:
                    return await ca_pb2_grpc.CAStub(ch).IssueNodeCertificate(req, timeout=5)
            except grpc.aio.AioRpcError as e:
                if e.code() == grpc.StatusCode.PERMISSION_DENIED:
                    log.warning("%s refused by %s: %s", "renewal" if renew else "role check", addr, e.details())
                continue
        return None

    # ---- run -----------------------------------------------------------------------------------
    def _check_force_new_cluster(self) -> None:
        """--force-new-cluster restarts an existing manager's store alone, keeping its data. Refuse it
        where there is no such store (a mistyped -d would otherwise create a new, empty swarm)."""
        st = NodeState.load(self.dir)
        if st is None:
            raise SystemExit(f"--force-new-cluster restarts the store of an existing manager, but {self.dir} holds "
                             "no node: give the state dir (-d) of a surviving manager")
        if st.role != "manager":
            raise SystemExit(f"--force-new-cluster is for a manager: node {st.node_id} in {self.dir} is a worker")
        wal = self.dir / "etcd" / "data" / "member" / "wal"  # = EtcdMember.has_data
        if not (wal.is_dir() and any(wal.glob("*.wal"))):
            raise SystemExit(f"--force-new-cluster keeps this manager's store data, but {self.dir / 'etcd'} holds "
                             "none: restore the state dir from a backup instead")
        log.warning("--force-new-cluster: the store of manager %s restarts as a cluster of this member alone, "
                    "keeping its data; remove the lost managers (node demote, then node rm --force) and join "
                    "new ones. Do not keep the flag for later starts.", st.node_id)

    async def _start_engine_api(self) -> asyncio.Server | None:
        """The Docker Engine API on `--engine-api-socket` (default STATE_DIR/docker.sock): every node
        answers /_ping, /version and /info; the swarm endpoints need the manager role (shoal.engineapi)."""
        if self.args.no_engine_api:
            return None
        from shoal.engineapi import api as engineapi
        from shoal.engineapi.server import NodeInfo

        st = self.state
        assert st is not None
        path = Path(self.args.engine_api_socket) if self.args.engine_api_socket else self.dir / "docker.sock"
        node = NodeInfo(st.node_id, st.cluster_id, st.hostname, _split(st.advertise_api, 0)[0],
                        managers=self._manager_addrs, is_manager=lambda: self.manager is not None,
                        insecure_registries=list(self.args.insecure_registry))
        try:
            server = await engineapi.start(path, node, self._control_socket())
        except OSError as e:
            raise SystemExit(f"cannot listen on the Engine API socket {path}: {e.strerror or e} "
                             "(--engine-api-socket PATH, or --no-engine-api)") from None
        if self.args.engine_api_addr:
            host, port = _split(self.args.engine_api_addr, 2376)
            try:
                self.engine_api_tls = await engineapi.start_tls(
                    (host, port), node, self._control_socket(), self._engine_api_ssl(), self._engine_api_authorize)
            except OSError as e:
                raise SystemExit(f"cannot listen on --engine-api-addr {self.args.engine_api_addr}: {e.strerror or e}") \
                    from None
        return server

    def _engine_api_ssl(self) -> ssl.SSLContext:
        """The Engine API's TLS on TCP: this node's certificate, client certificates required and
        verified against the cluster's roots. A renewal reloads the certificate for the next
        handshakes; roots added by a root rotation are trusted from then on (the old ones stay until
        swarmd restarts)."""
        assert self.credentials is not None
        certs = self.dir / "certificates"
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.verify_mode = ssl.CERT_REQUIRED

        def load(ident: ca.TLSIdentity) -> None:
            ctx.load_cert_chain(certs / "node.crt", certs / "node.key")
            ctx.load_verify_locations(cadata=ident.ca_pem.decode())

        load(self.credentials.current)
        self.credentials.subscribe(load)
        return ctx

    def _engine_api_authorize(self, der: bytes) -> str | None:
        """Who may use the Engine API on TCP: a manager's certificate of this cluster that the store
        still honours (not removed, not demoted: the 2377 listener's rule, shoal.manager.authz)."""
        try:
            info = ca.cert_info(ssl.DER_cert_to_PEM_cert(der).encode())
        except ValueError as e:
            return f"the client certificate is not a node certificate of this cluster: {e}"
        if info.role != types_pb2.MANAGER:
            return (f"the client certificate is node {info.node_id}'s, a worker's: the Engine API takes a "
                    "manager's certificate (the files in a manager's STATE_DIR/certificates)")
        if self.manager is None:
            return "this node is no longer a manager: use a manager's Engine API"
        return self.manager.authz.refusal(ca.PeerIdentity(info.node_id, info.role, info.cluster_id), "/shoal.Control/")

    def _gossip(self) -> Any:
        """This node's live gossip (`NetworkDB`), once its networking has started; else None."""
        net = getattr(self.agent, "network", None)
        return getattr(net, "gossip", None)

    async def _start_metrics(self) -> Any:
        """`--metrics-addr`: serve /metrics (shoal.node.metrics). Without it prometheus_client is never
        imported (~2.4 MB resident on an idle worker)."""
        if not self.args.metrics_addr:
            return None
        from shoal.node import metrics

        sources = metrics.Sources(manager=lambda: self.manager, gossip=self._gossip)
        try:
            return await metrics.start(self.args.metrics_addr, sources)
        except ValueError as e:
            raise SystemExit(str(e)) from None
        except OSError as e:
            raise SystemExit(f"cannot listen on --metrics-addr {self.args.metrics_addr}: {e.strerror or e}") from None

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stop_event.set)
        loop.add_signal_handler(signal.SIGUSR1, _dump_stacks)
        loop.add_signal_handler(signal.SIGUSR2, _memory_census)
        _memdebug_install()
        if self.args.force_new_cluster:
            self._check_force_new_cluster()
        # First (a bad address fails before anything is made), and before the manager role starts:
        # its control API servers take the metrics interceptor.
        self.metrics = await self._start_metrics()
        try:
            return await self._run()
        finally:
            if self.metrics is not None:
                await self.metrics.stop()

    async def _run(self) -> int:
        loop = asyncio.get_running_loop()
        await self.setup()
        st = self.state
        assert st is not None and self.identity is not None
        if st.role == "worker" and ca.expiry(self.identity.cert_pem) <= datetime.datetime.now(datetime.UTC):
            raise SystemExit(expired_message(st.node_id, self.identity, self.dir))
        self.credentials = ca.NodeCredentials(self.identity, self.dir / "certificates")
        try:
            if st.role == "manager":
                bootstrap = None
                if not st.bootstrapped:
                    bootstrap = store_pb2.StoreSnapshot.FromString((self.dir / "bootstrap.pb").read_bytes())
                from shoal.manager.manager import ExpiredCertificate  # managers only

                try:
                    if not await self.start_manager_unlocked(getattr(self, "_initial_cluster", None), bootstrap):
                        log.info("stopped while locked")
                        return 0
                    # --force-new-cluster is spent: a manager role started later by this process (after
                    # a demotion and a promotion) joins the cluster as any member does.
                    self.args.force_new_cluster = False
                except ExpiredCertificate as e:
                    raise SystemExit(str(e)) from None
                except OSError as e:
                    log.error("cannot start the manager role: %s", e)
                    raise SystemExit(
                        f"cannot listen on {st.listen_api} or the control socket: {e.strerror or e}; "
                        "is another swarmd running with these addresses?"
                    ) from None
                if not st.bootstrapped:
                    st.bootstrapped = True
                    st.save(self.dir)
                    (self.dir / "bootstrap.pb").unlink()
            self.agent_ctx = AgentContext(
                st.node_id, st.cluster_id, st.hostname, self.dir, self.identity, self._manager_addrs(),
                _split(st.advertise_api, 0)[0], st.role == "manager",
                registry_mirrors=list(self.args.registry_mirror), insecure_registries=list(self.args.insecure_registry),
                egress_subnet=self.args.egress_subnet, gossip_port=self.args.gossip_port,
                credentials=self.credentials,
            )
            self.agent = await start_agent(self.agent_ctx)
            self.engine_api = await self._start_engine_api()
            self.role_task = asyncio.create_task(self._certificates(), name="certificates")
            log.info("swarmd ready: node %s, %s, remote API %s", st.node_id, st.role, st.advertise_api)
            loop.call_later(3.0, trim_heap)  # once the first session and role check are done
            await self.stop_event.wait()
            log.info("SIGTERM: shutting down")
        finally:
            for server in (self.engine_api, self.engine_api_tls):
                if server is not None:
                    from shoal.engineapi import api as engineapi

                    await engineapi.stop(server)
            for t in (self.role_task, self.agent):
                if t is not None:
                    t.cancel()
                    await asyncio.gather(t, return_exceptions=True)
            await self.stop_manager()
        log.info("swarmd stopped")
        return 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="swarmd", description="Shoal node daemon (agent, and manager on managers).")
    p.add_argument("-d", "--state-dir", required=True, help="state directory (identity, store data, sockets)")
    p.add_argument("--listen-remote-api", default=f"0.0.0.0:{DEFAULT_API_PORT}", help="ADDR:PORT of the manager API")
    p.add_argument("--advertise-remote-api", default="", help="ADDR:PORT other nodes reach the manager API at")
    p.add_argument("--listen-control-api", default="", help="unix socket of the local control API (default STATE_DIR/swarmd.sock)")
    p.add_argument("--engine-api-socket", default="",
                   help="unix socket of the Docker Engine API 1.41 (default STATE_DIR/docker.sock): "
                        "`docker -H unix://PATH service ls`")
    p.add_argument("--no-engine-api", action="store_true", help="do not serve the Docker Engine API")
    p.add_argument("--engine-api-addr", default="", metavar="ADDR[:PORT]",
                   help="also serve the Docker Engine API on TCP with mutual TLS (port 2376 by default); "
                        "clients use a manager's certificate: docker --tlsverify -H tcp://ADDR:2376")
    p.add_argument("--listen-peer", "--listen-raft", dest="listen_peer", default="",
                   help="ADDR:PORT of the store's peer port between managers (default advertise address, port 2380)")
    p.add_argument("--restore", default="", metavar="FILE",
                   help="with a new state dir: start a one-manager cluster from a backup (swarmctl cluster backup); "
                        "the backup's key on standard input")
    p.add_argument("--force-new-cluster", action="store_true",
                   help="a manager's restart after a lost quorum: restart the store with this member alone, keeping its data")
    p.add_argument("--hostname", default="", help="node name (default: the host name)")
    p.add_argument("--join-addr", default="", help="ADDR:PORT of a manager to join through")
    p.add_argument("--join-token", default="", help="join token (swarmctl swarm join-token worker|manager)")
    p.add_argument("--manager", action="store_true", help="join as a manager (needs a manager token)")
    p.add_argument("--default-addr-pool", default="", help="CIDR of overlay subnets for a new cluster (default 10.0.0.0/8)")
    p.add_argument("--registry-mirror", action="append", default=[], metavar="URL",
                   help="mirror of Docker Hub tried first for docker.io images (repeatable)")
    p.add_argument("--insecure-registry", action="append", default=[], metavar="HOST:PORT",
                   help="registry reached over plain HTTP (repeatable)")
    p.add_argument("--egress-subnet", default="172.18.0.0/16",
                   help="subnet of the node's gateway bridge that gives containers egress (default 172.18.0.0/16)")
    p.add_argument("--gossip-port", type=int, default=7946, help="gossip port, TCP and UDP (default 7946)")
    p.add_argument("--metrics-addr", default="", metavar="ADDR:PORT",
                   help="serve Prometheus metrics at http://ADDR:PORT/metrics (and, on a manager, its etcd "
                        "member's at /metrics/etcd); off by default")
    p.add_argument("--log-level", default=os.environ.get("SWARMD_LOG_LEVEL", "info"))
    return p.parse_args(argv)


def _dump_stacks() -> None:
    """SIGUSR1: every asyncio task's stack and every thread's, to the log (a stuck start or shutdown)."""
    import faulthandler

    for task in asyncio.all_tasks():
        where = [f"  {f.f_code.co_filename}:{f.f_lineno} in {f.f_code.co_name}" for f in task.get_stack(limit=12)]
        log.warning("SIGUSR1 task %s:\n%s", task.get_name(), "\n".join(where) or "  (not started)")
    faulthandler.dump_traceback(file=sys.stderr, all_threads=True)


def _memory_census(top: int = 15) -> None:
    """SIGUSR2: where this process's memory is, to the log: resident size (and what malloc gave back
    when asked), the Python objects the collector tracks by type (count and shallow size), the
    asyncio tasks by coroutine, and with tracemalloc on (SWARMD_MEMDEBUG, see `_memdebug_install`)
    the lines that allocated the most. Walks every object: seconds in a manager of thousands of
    nodes, so it is for a person investigating, not for a timer."""
    import collections
    import gc
    import tracemalloc

    def rss() -> str:
        return next((line.split()[1] for line in Path("/proc/self/status").read_text().splitlines()
                     if line.startswith("VmRSS:")), "?")

    count: collections.Counter[str] = collections.Counter()
    size: collections.Counter[str] = collections.Counter()
    gc.unfreeze()  # the permanent generation (see `_watch_collections`) is not in get_objects()
    try:
        for obj in gc.get_objects():
            name = type(obj).__qualname__
            count[name] += 1
            size[name] += sys.getsizeof(obj, 0)
    finally:
        gc.freeze()
    before = rss()
    trim_heap()  # what malloc held free, given back
    lines = [f"SIGUSR2 memory: VmRSS {before} kB ({rss()} kB after malloc_trim), "
             f"{sum(count.values())} tracked objects"]
    lines += [f"  {n:>9} {size[name] / 1e6:8.1f} MB  {name}" for name, n in count.most_common(top)]
    tasks = collections.Counter(getattr(t.get_coro(), "__qualname__", type(t.get_coro()).__name__)
                                for t in asyncio.all_tasks())
    lines.append(f"  {sum(tasks.values())} asyncio tasks, by coroutine:")
    lines += [f"  {n:>9}  {name}" for name, n in tasks.most_common(top)]
    if tracemalloc.is_tracing():
        traced, _ = tracemalloc.get_traced_memory()
        lines.append(f"  tracemalloc: {traced / 1e6:.1f} MB traced; by line:")
        for stat in tracemalloc.take_snapshot().statistics("lineno")[:top]:
            lines.append(f"    {stat.size / 1e6:8.1f} MB {stat.count:>9}  {stat.traceback[0]}")
    log.warning("%s", "\n".join(lines))


GC_LOG_AFTER = 0.25  # s: a garbage collection at least this long is logged (it holds the event loop)
GC_REFREEZE = 600.0  # s between two full collections that walk every object (see `_watch_collections`)
TRIM_EVERY = 60.0  # s at least between two `malloc_trim`s (see `_watch_collections`)


def _watch_collections() -> None:
    """Keep full garbage collections short, and log any collection that held the process for
    GC_LOG_AFTER s or more.

    A manager's heap is mostly long-lived (the store's copy, sessions, streams: hundreds of MB at
    thousands of nodes), and a full collection walks all of it: at 1,000 nodes they took 0.55-0.8 s
    each, every few seconds of a convergence, and found 6-135 objects to free; on a machine out of
    CPU one held a 2,000-node leader's loop past its lease. After each full collection every object
    still alive moves to the permanent generation (`gc.freeze`), so the next ones walk only what came
    since; once every GC_REFREEZE s a full collection walks everything again first (`gc.unfreeze`),
    so a reference cycle among old objects is freed within that time.

    After a full collection, at most once every TRIM_EVERY s, malloc gives the memory it holds free
    back to the system (`malloc_trim`): a burst of writes leaves it holding much (26-100 MB of a
    3,000-node leader's 1 GB after 30,000 tasks were created), which no later allocation may reuse."""
    import gc

    started = [0.0]
    walked_all = [time.monotonic()]
    trimmed = [time.monotonic()]

    def note(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            started[0] = time.monotonic()
            if info["generation"] == 2 and started[0] - walked_all[0] >= GC_REFREEZE:
                gc.unfreeze()
                walked_all[0] = started[0]
            return
        if (took := time.monotonic() - started[0]) >= GC_LOG_AFTER:
            log.info("gc: a generation-%d collection took %.2f s (%d objects collected)", info["generation"],
                     took, info["collected"])
        if info["generation"] == 2:
            gc.freeze()
            if (now := time.monotonic()) - trimmed[0] >= TRIM_EVERY:
                trimmed[0] = now
                trim_heap()
                if (took := time.monotonic() - now) >= GC_LOG_AFTER:
                    log.info("gc: giving free memory back to the system took %.2f s", took)

    gc.callbacks.append(note)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    _limit_malloc_arenas()
    _watch_collections()
    _lazy_pyroute2()
    idfilter = NodeIdFilter()
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(idfilter)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s node=%(node)s %(name)s: %(message)s"))
    logging.basicConfig(level=args.log_level.upper(), handlers=[handler])
    try:
        code = asyncio.run(Swarmd(args, idfilter).run())
    except KeyboardInterrupt:
        code = 0
    sys.exit(code)


if __name__ == "__main__":
    main()
