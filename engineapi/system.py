"""`/_ping`, `/version`, `/info`, `/swarm` and `/swarm/update` (join tokens, the settings Shoal has).

`/_ping`, `/version` and `/info` answer on every node, a worker included (`docker info` there shows
`Is Manager: false`); the rest needs the manager role (503 otherwise, Docker's sentence).
`/swarm/init`, `/swarm/join` and `/swarm/leave` are swarmd's command line in Shoal and answer 501
with the command to run instead.
"""

from __future__ import annotations

import base64
import os
import platform
from typing import Any

from shoal.engineapi.convert import meta, ns, query_version, set_ns, want_labels
from shoal.engineapi.server import (
    API_VERSION,
    MIN_API_VERSION,
    APIError,
    EngineContext,
    Request,
    Response,
    Route,
    empty,
    json_response,
)
from shoal.proto import control_pb2, objects_pb2, specs_pb2

ENGINE_VERSION = "shoal-0.1.0"
DATA_PATH_PORT = 4789
# What an unset setting means (the manager's defaults): shown as Docker shows its own defaults
DEFAULT_HEARTBEAT_NS = 1_000_000_000
DEFAULT_CERT_EXPIRY_NS = 90 * 24 * 3600 * 1_000_000_000
DEFAULT_TASK_HISTORY = 5


def tls_info_of(root_pem: bytes, issuer_subject_der: bytes = b"", issuer_key_der: bytes = b"") -> dict[str, str]:
    return {"TrustRoot": root_pem.decode(), "CertIssuerSubject": base64.b64encode(issuer_subject_der).decode(),
            "CertIssuerPublicKey": base64.b64encode(issuer_key_der).decode()}


def cluster_spec_json(spec: specs_pb2.ClusterSpec) -> dict[str, Any]:
    hb = ns(spec.dispatcher.heartbeat_period) or DEFAULT_HEARTBEAT_NS
    expiry = ns(spec.ca_config.node_cert_expiry) or DEFAULT_CERT_EXPIRY_NS
    history = spec.orchestration.task_history_retention_limit or DEFAULT_TASK_HISTORY  # 0: the default
    return {
        "Name": spec.annotations.name or "default",
        "Labels": dict(spec.annotations.labels),
        "Orchestration": {"TaskHistoryRetentionLimit": history},
        # etcd's Raft: ticks of 100 ms, an election after 5 (0.5 s)
        "Raft": {"SnapshotInterval": 10000, "KeepOldSnapshots": 0, "LogEntriesForSlowFollowers": 500,
                 "ElectionTick": 5, "HeartbeatTick": 1},
        "Dispatcher": {"HeartbeatPeriod": hb},
        "CAConfig": {"NodeCertExpiry": expiry},
        "TaskDefaults": {},
        "EncryptionConfig": {"AutoLockManagers": spec.encryption_config.autolock_managers},
    }


def apply_cluster_spec(doc: dict[str, Any], spec: specs_pb2.ClusterSpec) -> None:
    """The Docker `Spec` of `POST /swarm/update` onto `spec`: the settings Shoal has (labels, task
    history, heartbeat, certificate expiry, autolock). Zero values keep the current setting, as in
    Docker; the others (Raft, TaskDefaults) are accepted as Shoal shows them."""
    if not isinstance(doc, dict):
        raise APIError(400, "the body must be the swarm's Spec object (GET /swarm, then edit it)")
    spec.annotations.labels.clear()
    spec.annotations.labels.update(want_labels(doc, "Labels", "Spec."))
    orch = doc.get("Orchestration") or {}
    if orch.get("TaskHistoryRetentionLimit") is not None:
        v = orch["TaskHistoryRetentionLimit"]
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise APIError(400, f"Spec.Orchestration.TaskHistoryRetentionLimit must be a non-negative integer, got {v!r}")
        spec.orchestration.task_history_retention_limit = v
    hb = (doc.get("Dispatcher") or {}).get("HeartbeatPeriod")
    if hb:
        set_ns(spec.dispatcher.heartbeat_period, hb, "Spec.Dispatcher.HeartbeatPeriod")
    exp = (doc.get("CAConfig") or {}).get("NodeCertExpiry")
    if exp:
        set_ns(spec.ca_config.node_cert_expiry, exp, "Spec.CAConfig.NodeCertExpiry")
    enc = doc.get("EncryptionConfig") or {}
    if "AutoLockManagers" in enc:
        spec.encryption_config.autolock_managers = bool(enc["AutoLockManagers"])


def cluster_json(c: objects_pb2.Cluster, tokens: bool) -> dict[str, Any]:
    out = meta(c)
    out.update({
        "Spec": cluster_spec_json(c.spec),
        "TLSInfo": tls_info_of(c.root_ca.ca_cert),
        "RootRotationInProgress": c.root_ca.HasField("root_rotation"),
        "DefaultAddrPool": list(c.spec.default_address_pool),
        "SubnetSize": c.spec.subnet_size or 24,
        "DataPathPort": DATA_PATH_PORT,
    })
    if tokens:
        out["JoinTokens"] = {"Worker": c.root_ca.join_tokens.worker, "Manager": c.root_ca.join_tokens.manager}
    return out


def routes(ctx: EngineContext) -> list[Route]:
    async def ping(req: Request) -> Response:
        return Response(200, b"OK", content_type="text/plain; charset=utf-8",
                        headers={"Cache-Control": "no-cache, no-store, must-revalidate", "Pragma": "no-cache",
                                 "Swarm": "active/manager" if ctx.node.is_manager() else "active/worker"})

    async def version(req: Request) -> Response:
        u = os.uname()
        details = {"ApiVersion": API_VERSION, "MinAPIVersion": MIN_API_VERSION, "GitCommit": "",
                   "GoVersion": f"python{platform.python_version()}", "Os": "linux", "Arch": _arch(),
                   "KernelVersion": u.release, "BuildTime": "", "Experimental": "false"}
        return json_response({
            "Platform": {"Name": "Shoal"},
            "Components": [{"Name": "Engine", "Version": ENGINE_VERSION, "Details": details}],
            "Version": ENGINE_VERSION, "ApiVersion": API_VERSION, "MinAPIVersion": MIN_API_VERSION,
            "GitCommit": "", "GoVersion": details["GoVersion"], "Os": "linux", "Arch": _arch(),
            "KernelVersion": u.release, "BuildTime": "",
        })

    async def info(req: Request) -> Response:
        n = ctx.node
        u = os.uname()
        swarm: dict[str, Any] = {
            "NodeID": n.node_id, "NodeAddr": n.addr, "LocalNodeState": "active",
            "ControlAvailable": n.is_manager(), "Error": "",
            "RemoteManagers": [{"NodeID": "", "Addr": a} for a in n.managers()],
        }
        if n.is_manager():
            c = ctx.control
            cluster = (await c.GetCluster(control_pb2.GetClusterRequest(), timeout=10)).cluster
            nodes = (await c.ListNodes(control_pb2.ListNodesRequest(), timeout=10)).nodes
            mgrs = [x for x in nodes if x.HasField("manager_status")]
            swarm.update({
                "RemoteManagers": [{"NodeID": x.id, "Addr": x.manager_status.api_addr or x.manager_status.addr}
                                   for x in mgrs],
                "Nodes": len(nodes), "Managers": len(mgrs), "Cluster": cluster_json(cluster, tokens=False),
            })
        mem = 0
        try:
            with open("/proc/meminfo") as f:
                mem = int(next(ln for ln in f if ln.startswith("MemTotal:")).split()[1]) * 1024
        except (OSError, StopIteration, ValueError):
            pass
        return json_response({
            "ID": n.node_id, "Name": n.hostname, "ServerVersion": ENGINE_VERSION, "OperatingSystem": _os_name(),
            "OSType": "linux", "Architecture": _arch(), "KernelVersion": u.release, "NCPU": os.cpu_count() or 1,
            "MemTotal": mem, "Driver": "overlay2", "CgroupDriver": "cgroupfs",
            "CgroupVersion": "2" if os.path.exists("/sys/fs/cgroup/cgroup.controllers") else "1",
            "Containers": 0, "ContainersRunning": 0, "ContainersPaused": 0, "ContainersStopped": 0, "Images": 0,
            "DockerRootDir": "", "Labels": [], "ExperimentalBuild": False, "Debug": False,
            "Plugins": {"Volume": ["local"], "Network": ["overlay"], "Log": ["json-file"]},
            "SecurityOptions": ["name=seccomp,profile=default"], "Runtimes": {"runc": {"path": "runc"}},
            "DefaultRuntime": "runc", "Swarm": swarm, "Warnings": None,
        })

    async def swarm_get(req: Request) -> Response:
        cluster = (await ctx.control.GetCluster(control_pb2.GetClusterRequest(), timeout=10)).cluster
        return json_response(cluster_json(cluster, tokens=True))

    async def swarm_update(req: Request) -> Response:
        version = query_version(req)
        c = ctx.control
        cluster = (await c.GetCluster(control_pb2.GetClusterRequest(), timeout=10)).cluster
        spec = specs_pb2.ClusterSpec()
        spec.CopyFrom(cluster.spec)
        apply_cluster_spec(req.json(), spec)
        await c.UpdateCluster(control_pb2.UpdateClusterRequest(
            cluster_version=version, spec=spec,
            rotate_worker_token=req.flag("rotateWorkerToken"), rotate_manager_token=req.flag("rotateManagerToken"),
            rotate_unlock_key=req.flag("rotateManagerUnlockKey")), timeout=30)
        return empty()

    async def unlock_key(req: Request) -> Response:
        r = await ctx.control.GetUnlockKey(control_pb2.GetUnlockKeyRequest(), timeout=10)
        return json_response({"UnlockKey": r.unlock_key})

    def by_swarmd(what: str, instead: str):
        async def handler(req: Request) -> Response:
            raise APIError(501, f"{what} is swarmd's job in Shoal, not the Engine API's: {instead}")
        return handler

    return [
        Route("GET", r"/_ping", ping, manager=False),
        Route("GET", r"/version", version, manager=False),
        Route("GET", r"/info", info, manager=False),
        Route("GET", r"/swarm", swarm_get),
        Route("POST", r"/swarm/update", swarm_update),
        Route("GET", r"/swarm/unlockkey", unlock_key),
        Route("POST", r"/swarm/init", by_swarmd(
            "creating a swarm", "start `swarmd -d STATE_DIR --listen-remote-api ADDR:2377` (docs/operations.md)"),
            manager=False),
        Route("POST", r"/swarm/join", by_swarmd(
            "joining a swarm", "start `swarmd -d STATE_DIR --join-addr MANAGER:2377 --join-token TOKEN` "
            "(`docker swarm join-token worker` prints the token)"), manager=False),
        Route("POST", r"/swarm/leave", by_swarmd(
            "leaving a swarm", "stop swarmd, then `swarmctl node rm NODE` on a manager"), manager=False),
    ]


def _arch() -> str:
    m = platform.machine()
    return {"x86_64": "amd64", "aarch64": "arm64"}.get(m, m)


def _os_name() -> str:
    try:
        with open("/etc/os-release") as f:
            for line in f:
                if line.startswith("PRETTY_NAME="):
                    return line.split("=", 1)[1].strip().strip('"')
    except OSError:
        pass
    return "Linux"


