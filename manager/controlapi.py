"""The Control API: the gRPC service `swarmctl` (and stack deploy) talk to.

`ControlServicer(store, manager=None)` implements every RPC of proto/control.proto on grpc.aio. Specs
are validated (shoal.manager.validation) before anything is written; every write is one store
transaction (`await store.update(fn)`), and references (networks, secrets, configs) are resolved and
checked inside that transaction's function against the current state. Store errors come back as
gRPC status codes (`StoreError.code`) with their one-sentence message.

Semantics follow SwarmKit's controlapi:
- ids, unique id prefixes and names are accepted wherever an id is (`StateMachine.resolve`);
- a service create sets spec_version 1; an update that changes the spec keeps the old one in
  previous_spec and gives the new one a spec_version above every earlier one; `rollback=PREVIOUS`
  swaps spec and previous_spec (with their versions) and sets update_status ROLLBACK_STARTED;
- removing a service deletes it and sets desired_state REMOVE on its tasks in the same
  transaction (agents stop them, the task reaper deletes them);
- a network, secret or config still used cannot be removed (FAILED_PRECONDITION);
- a write naming a stale object version (the request's, or one the store saw change while it
  committed, after `COMMIT_ATTEMPTS` tries) fails with ABORTED, "update out of sequence: ...";
  a node update is stale only when the node's spec changed after the version it names (its status,
  description, manager status and attachments change all the time, and the request replaces only
  the spec: `Node.spec_changed_after`);
- a READY node cannot be removed without force, and a manager must be demoted first;
- secrets never carry their data out, and the cluster never carries its CA key, network
  bootstrap keys or unlock key out (the unlock key only through `GetUnlockKey`); networks, tasks
  and nodes never carry IPsec keys of encrypted networks out (`keymanager.public`;
  `keys_rotated_at` stays visible).

`manager` (optional) gives Raft facts to `Info`: it may have `node_id` (str) and `info()` returning
an `InfoResponse` (or an awaitable of one) with node_id, is_manager, leader_node_id and members; the
servicer fills store_version and cluster_id. Without it, Info answers for a single local store.
"""

from __future__ import annotations

import functools
import hmac
import inspect
import logging
import random
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import grpc
from google.protobuf.message import Message

from shoal.manager import backup, validation
from shoal.manager.allocator import allocate_network
from shoal.manager.authz import revoke
from shoal.manager.encryption import format_unlock_key, new_unlock_key
from shoal.manager.keymanager import public
from shoal.manager.store import (
    AlreadyExists,
    Conflict,
    InvalidArgument,
    NotFound,
    Store,
    StoreError,
    Tx,
    is_terminal,
    kind_of,
    new_id,
    stale_version,
)
from shoal.proto import control_pb2, control_pb2_grpc, objects_pb2, specs_pb2, types_pb2

log = logging.getLogger("shoal.controlapi")

M = TypeVar("M", bound=Message)
T = TypeVar("T")
F = TypeVar("F", objects_pb2.Secret, objects_pb2.Config)
COMMIT_ATTEMPTS = 5
INGRESS_NAME = "ingress"


def _copy(msg: M) -> M:
    out = type(msg)()
    out.CopyFrom(msg)
    return out


# Reads (Get*, List*, Info) are linearizable: they see every write acknowledged before they began.
# Without a quorum they still answer, from this manager's copy, with this trailing metadata key
# saying so (swarmctl prints it as a warning).
READ_PREFIXES = ("Get", "List", "Info")
STALE_KEY = "x-shoal-stale"


def rpc(fn: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
    """Turn store and validation errors into gRPC status codes carrying their sentence; make reads
    linearizable (see READ_PREFIXES)."""

    @functools.wraps(fn)
    async def wrapper(self: ControlServicer, request: Any, context: grpc.aio.ServicerContext) -> Any:
        peer = _peer(context)
        if peer is not None and not peer.is_manager:
            log.warning("control %s refused: caller node=%s is a worker", fn.__name__, peer.node_id)
            await context.abort(
                grpc.StatusCode.PERMISSION_DENIED,
                f"node {peer.node_id} is a worker: the control API answers managers only; use a manager's "
                "TLS identity or its local socket",
            )
        try:
            if fn.__name__.startswith(READ_PREFIXES):
                stale = await self.store.read_barrier()
                if stale is not None:
                    context.set_trailing_metadata(((STALE_KEY, stale),))
            return await fn(self, request, context)
        except StoreError as e:
            code = getattr(grpc.StatusCode, e.code, grpc.StatusCode.UNKNOWN)
            log.info("control %s refused code=%s: %s", fn.__name__, e.code, e)
            await context.abort(code, str(e))
        except TimeoutError:
            log.warning("control %s timed out waiting for the store", fn.__name__)
            await context.abort(
                grpc.StatusCode.UNAVAILABLE,
                "the store did not commit in time: the managers may have lost quorum; retry when a leader is elected",
            )
        except grpc.aio.AbortError:
            raise
        except Exception as e:
            log.exception("control %s failed", fn.__name__)
            await context.abort(
                grpc.StatusCode.INTERNAL,
                f"internal error in the control API ({type(e).__name__}: {e}); see the manager's log",
            )

    return wrapper


# A few words for names of services created without one, like Docker's names generator.
_ADJECTIVES = ("brave", "calm", "eager", "fancy", "gentle", "happy", "jolly", "keen", "lucid", "merry",
               "nifty", "proud", "quirky", "sharp", "tender", "vivid", "witty", "zealous")
_NAMES = ("archimedes", "babbage", "curie", "darwin", "euler", "fermi", "gauss", "hopper", "kepler",
          "lovelace", "meitner", "newton", "noether", "pascal", "ritchie", "shannon", "turing", "wozniak")


def _random_name() -> str:
    return f"{random.choice(_ADJECTIVES)}_{random.choice(_NAMES)}"


class ControlServicer(control_pb2_grpc.ControlServicer):
    def __init__(self, store: Store, manager: Any = None) -> None:
        self.store = store
        self.manager = manager

    # ---- helpers -------------------------------------------------------------------------------
    @property
    def sm(self) -> Any:
        return self.store.sm

    def _list(self, kind: str, filters: control_pb2.ListFilters) -> list[Any]:
        objs = self.store.find(kind, filters)
        return sorted(objs, key=lambda o: (o.spec.annotations.name, o.id))

    @staticmethod
    def _resolve_for_write(tx: Tx, kind: str, ref: str, version: int = 0, *, spec_only: bool = False) -> Any:
        """The current object (a copy to change) named by `ref`; a stale `version` (the caller's)
        raises `StaleVersion(client=True)`, which `_commit` never retries. With `spec_only` (a node
        update, which replaces only the spec) a version is stale only when the spec changed after it
        (`Node.spec_changed_after`): the other fields' writes since do not count."""
        cur = tx.sm.resolve(kind, ref)
        oldest = cur.spec_changed_after + 1 if spec_only else cur.meta.version
        if version and not oldest <= version <= cur.meta.version:
            raise stale_version(kind, cur, version, client=True)
        return _copy(cur)

    async def _commit(self, fn: Callable[[Tx], T]) -> T:
        """One transaction built by `fn` from the current state; built again (`Store.update`'s
        retries) when the store refuses it because an object it read changed meanwhile (control
        loops write tasks and services all the time). A stale version the caller sent fails in `fn`
        itself as a client `StaleVersion`, so it is never retried away; both answer ABORTED."""
        return await self.store.update(fn, retries=COMMIT_ATTEMPTS - 1)

    # ---- nodes ---------------------------------------------------------------------------------
    @rpc
    async def GetNode(self, request: control_pb2.GetNodeRequest, context: Any) -> control_pb2.GetNodeResponse:
        return control_pb2.GetNodeResponse(node=public(self.store.resolve("node", request.node_id)))

    @rpc
    async def ListNodes(self, request: control_pb2.ListNodesRequest, context: Any) -> control_pb2.ListNodesResponse:
        nodes = self.store.find("node", request.filters)
        nodes.sort(key=lambda n: (n.description.hostname, n.id))
        return control_pb2.ListNodesResponse(nodes=[public(n) for n in nodes])

    @rpc
    async def UpdateNode(self, request: control_pb2.UpdateNodeRequest, context: Any) -> control_pb2.UpdateNodeResponse:
        if not request.HasField("spec"):
            raise InvalidArgument("node update has no spec: send the node's whole spec with the changes")
        validation.validate_node_spec(request.spec)

        def fn(tx: Tx) -> objects_pb2.Node:
            node = self._resolve_for_write(tx, "node", request.node_id, request.node_version, spec_only=True)
            old = _copy(node.spec)
            if old.desired_role == types_pb2.MANAGER and request.spec.desired_role == types_pb2.WORKER:
                self._check_demote(tx, node)
            node.spec.CopyFrom(request.spec)
            if node.spec == old:
                return node
            node.spec_changed_after = node.meta.version
            tx.update(node)
            return node

        node = await self._commit(fn)
        log.info("node updated id=%s availability=%s role=%s", node.id,
                 types_pb2.NodeAvailability.Name(node.spec.availability),
                 types_pb2.NodeRole.Name(node.spec.desired_role))
        return control_pb2.UpdateNodeResponse(node=public(self.store.get("node", node.id)))

    @staticmethod
    def _check_demote(tx: Tx, node: objects_pb2.Node) -> None:
        managers = [n for n in tx.sm.list("node") if n.spec.desired_role == types_pb2.MANAGER]
        name = node.description.hostname or node.id
        if len(managers) <= 1:
            raise Conflict(
                f"node {name} is the last manager of the swarm and cannot be demoted: promote another node first"
            )
        # Demoting a manager removes a Raft member; refuse when the rest could not keep a quorum.
        reachable = [n for n in managers if n.id != node.id
                     and n.manager_status.reachability != types_pb2.ManagerStatus.UNREACHABLE]
        remaining = len(managers) - 1
        if len(reachable) < remaining // 2 + 1:
            raise Conflict(
                f"demoting node {name} would leave {len(reachable)} reachable managers of {remaining}, "
                "less than a quorum: bring the unreachable managers back first"
            )

    @rpc
    async def RemoveNode(self, request: control_pb2.RemoveNodeRequest, context: Any) -> control_pb2.RemoveNodeResponse:
        def fn(tx: Tx) -> objects_pb2.Node:
            node = tx.sm.resolve("node", request.node_id)
            name = node.description.hostname or node.id
            if node.spec.desired_role == types_pb2.MANAGER or node.role == types_pb2.MANAGER:
                raise Conflict(
                    f"node {name} is a manager and a member of the Raft cluster: demote it first "
                    f"(swarmctl node demote {name}), then remove it"
                )
            if node.status.state == types_pb2.NodeStatus.READY and not request.force:
                raise Conflict(
                    f"node {name} is not down and can't be removed: stop its swarmd first, or use --force"
                )
            tx.delete(node)
            revoke(tx, node)
            return node

        node = await self._commit(fn)
        log.info("node removed id=%s force=%s; its certificate is revoked", node.id, request.force)
        return control_pb2.RemoveNodeResponse()

    # ---- tasks ---------------------------------------------------------------------------------
    @rpc
    async def GetTask(self, request: control_pb2.GetTaskRequest, context: Any) -> control_pb2.GetTaskResponse:
        return control_pb2.GetTaskResponse(task=public(self.store.resolve("task", request.task_id)))

    @rpc
    async def ListTasks(self, request: control_pb2.ListTasksRequest, context: Any) -> control_pb2.ListTasksResponse:
        f = _copy(request.filters)
        # Services and nodes may be named by id, id prefix or name, as on the docker CLI.
        for field, kind in (("service_ids", "service"), ("node_ids", "node")):
            refs = list(getattr(f, field))
            if refs:
                ids = []
                for ref in refs:
                    try:
                        ids.append(self.sm.resolve(kind, ref).id)
                    except (NotFound, InvalidArgument):
                        ids.append(ref)
                del getattr(f, field)[:]
                getattr(f, field).extend(ids)
        labels = dict(f.labels)
        f.ClearField("labels")
        tasks = self.store.find("task", f)
        if labels:
            # The label filter matches the task's own labels or its service's (as Docker does).
            tasks = [t for t in tasks if _labels_match(t.annotations.labels, labels)
                     or _labels_match(t.service_annotations.labels, labels)]
        tasks.sort(key=lambda t: (t.service_annotations.name, t.slot, t.node_id, -t.meta.created_at.seconds,
                                  -t.meta.created_at.nanos))
        return control_pb2.ListTasksResponse(tasks=[public(t) for t in tasks])

    # ---- services ------------------------------------------------------------------------------
    @rpc
    async def CreateService(
        self, request: control_pb2.CreateServiceRequest, context: Any
    ) -> control_pb2.CreateServiceResponse:
        spec = self._prepare_service_spec(request.spec)

        def fn(tx: Tx) -> objects_pb2.Service:
            if not spec.annotations.name:
                for _ in range(20):
                    spec.annotations.name = _random_name()
                    if tx.sm.get_by_name("service", spec.annotations.name) is None:
                        break
            self._resolve_service_refs(tx, spec)
            self._check_published_ports(tx, spec, None)
            svc = objects_pb2.Service(spec=spec, spec_version=1)
            return tx.create(svc)

        svc = await self._commit(fn)
        log.info("service created id=%s name=%s", svc.id, svc.spec.annotations.name)
        return control_pb2.CreateServiceResponse(service=self.store.get("service", svc.id))

    @staticmethod
    def _prepare_service_spec(spec_in: specs_pb2.ServiceSpec) -> specs_pb2.ServiceSpec:
        spec = _copy(spec_in)
        validation.validate_service_spec(spec)
        if spec.WhichOneof("mode") is None:
            spec.replicated.replicas = 1
        return spec

    @rpc
    async def GetService(self, request: control_pb2.GetServiceRequest, context: Any) -> control_pb2.GetServiceResponse:
        return control_pb2.GetServiceResponse(service=self.store.resolve("service", request.service_id))

    @rpc
    async def UpdateService(
        self, request: control_pb2.UpdateServiceRequest, context: Any
    ) -> control_pb2.UpdateServiceResponse:
        rollback = request.rollback == control_pb2.UpdateServiceRequest.PREVIOUS
        spec = None
        if not rollback:
            if not request.HasField("spec"):
                raise InvalidArgument("service update has no spec: send the service's whole spec with the changes")
            spec = self._prepare_service_spec(request.spec)

        def fn(tx: Tx) -> objects_pb2.Service:
            svc = self._resolve_for_write(tx, "service", request.service_id, request.service_version)
            name = svc.spec.annotations.name
            if rollback:
                if not svc.HasField("previous_spec"):
                    raise Conflict(f"service {name} has no previous spec to roll back to")
                cur, cur_version = _copy(svc.spec), svc.spec_version
                svc.spec.CopyFrom(svc.previous_spec)
                svc.spec_version = svc.previous_spec_version
                svc.previous_spec.CopyFrom(cur)
                svc.previous_spec_version = cur_version
                svc.update_status.CopyFrom(types_pb2.UpdateStatus(
                    state=types_pb2.UpdateStatus.ROLLBACK_STARTED, message="manually requested rollback"))
                svc.update_status.started_at.FromNanoseconds(time.time_ns())
                try:
                    self._resolve_service_refs(tx, svc.spec)
                    self._check_published_ports(tx, svc.spec, svc.id)
                except InvalidArgument as e:
                    raise Conflict(f"service {name} cannot roll back to its previous spec: {e}") from None
                tx.update(svc)
                return svc
            assert spec is not None
            if not spec.annotations.name:
                spec.annotations.name = name
            if spec.annotations.name != name:
                raise InvalidArgument(
                    f"service {name} cannot be renamed to {spec.annotations.name!r}: renaming services is not supported"
                )
            if spec.WhichOneof("mode") != svc.spec.WhichOneof("mode"):
                raise InvalidArgument(
                    f"service {name} cannot change mode from {svc.spec.WhichOneof('mode')} to "
                    f"{spec.WhichOneof('mode')}: remove the service and create it again"
                )
            self._resolve_service_refs(tx, spec)
            self._check_published_ports(tx, spec, svc.id)
            if spec == svc.spec:
                return svc
            # Above every version still referenced (the highest is always the spec's or the previous one's).
            new_version = max(svc.spec_version, svc.previous_spec_version) + 1
            svc.previous_spec.CopyFrom(svc.spec)
            svc.previous_spec_version = svc.spec_version
            svc.spec_version = new_version
            svc.spec.CopyFrom(spec)
            svc.ClearField("update_status")
            tx.update(svc)
            return svc

        svc = await self._commit(fn)
        log.info("service updated id=%s name=%s spec_version=%d rollback=%s",
                 svc.id, svc.spec.annotations.name, svc.spec_version, rollback)
        return control_pb2.UpdateServiceResponse(service=self.store.get("service", svc.id))

    @rpc
    async def RemoveService(
        self, request: control_pb2.RemoveServiceRequest, context: Any
    ) -> control_pb2.RemoveServiceResponse:
        def fn(tx: Tx) -> objects_pb2.Service:
            svc = tx.sm.resolve("service", request.service_id)
            tx.delete(svc)
            return svc

        def mark_tasks(tx: Tx) -> int:
            n = 0
            for task in tx.sm.tasks_by_service(svc.id):
                if task.desired_state < types_pb2.REMOVE:
                    t = _copy(task)
                    t.desired_state = types_pb2.REMOVE
                    tx.update(t)
                    n += 1
            return n

        svc = await self._commit(fn)
        # Its tasks are told to go at once; should agents' status writes keep winning the race, the
        # task reaper marks the orphaned tasks itself.
        try:
            n = await self._commit(mark_tasks)
        except Conflict as e:
            n = -1
            log.info("service removed id=%s: tasks left to the task reaper (%s)", svc.id, e)
        log.info("service removed id=%s name=%s tasks_to_remove=%d", svc.id, svc.spec.annotations.name, n)
        return control_pb2.RemoveServiceResponse()

    @rpc
    async def ListServices(
        self, request: control_pb2.ListServicesRequest, context: Any
    ) -> control_pb2.ListServicesResponse:
        return control_pb2.ListServicesResponse(services=self._list("service", request.filters))

    def _resolve_service_refs(self, tx: Tx, spec: specs_pb2.ServiceSpec) -> None:
        """Replace network, secret and config names by ids (and check they exist)."""
        seen: dict[str, str] = {}
        for att in spec.task.networks:
            try:
                net = tx.sm.resolve("network", att.target)
            except NotFound:
                raise InvalidArgument(
                    f"network {att.target!r} not found: create it first (swarmctl network create) or fix the name"
                ) from None
            if net.spec.ingress:
                raise InvalidArgument(
                    f"service cannot be attached to the ingress network {net.spec.annotations.name!r} explicitly: "
                    "publish a port instead"
                )
            if net.id in seen:
                raise InvalidArgument(
                    f"network {att.target!r} is attached twice (also as {seen[net.id]!r}): list each network once"
                )
            seen[net.id] = att.target
            att.target = net.id
        c = spec.task.container
        for kind, refs in (("secret", c.secrets), ("config", c.configs)):
            for ref in refs:
                key = getattr(ref, f"{kind}_id") or getattr(ref, f"{kind}_name")
                try:
                    obj = tx.sm.resolve(kind, key)
                except NotFound:
                    raise InvalidArgument(
                        f"{kind} {key!r} not found: create it first (swarmctl {kind} create) or fix the name"
                    ) from None
                setattr(ref, f"{kind}_id", obj.id)
                setattr(ref, f"{kind}_name", obj.spec.annotations.name)
                if not ref.file.name:
                    ref.file.name = obj.spec.annotations.name
                ref.file.uid = ref.file.uid or "0"
                ref.file.gid = ref.file.gid or "0"
                ref.file.mode = ref.file.mode or 0o444
            validation.validate_file_refs(kind, refs)

    @staticmethod
    def _check_published_ports(tx: Tx, spec: specs_pb2.ServiceSpec, self_id: str | None) -> None:
        wanted = {
            (p.published_port, p.protocol)
            for p in spec.endpoint.ports
            if p.published_port and p.publish_mode == types_pb2.PortConfig.INGRESS
        }
        if not wanted:
            return
        for other in tx.sm.list("service"):
            if other.id == self_id:
                continue
            ports = list(other.spec.endpoint.ports) + list(other.endpoint.ports)
            for p in ports:
                if p.publish_mode != types_pb2.PortConfig.INGRESS:
                    continue
                if (p.published_port, p.protocol) in wanted:
                    proto = types_pb2.PortConfig.Protocol.Name(p.protocol).lower()
                    raise InvalidArgument(
                        f"published port {p.published_port}/{proto} is already used by service "
                        f"{other.spec.annotations.name!r} ({other.id}): choose another port"
                    )

    # ---- networks ------------------------------------------------------------------------------
    @rpc
    async def CreateNetwork(
        self, request: control_pb2.CreateNetworkRequest, context: Any
    ) -> control_pb2.CreateNetworkResponse:
        spec = _copy(request.spec)
        validation.validate_network_spec(spec)
        if not spec.driver_config.name:
            spec.driver_config.name = "overlay"

        def fn(tx: Tx) -> objects_pb2.Network:
            if spec.ingress:
                for other in tx.sm.list("network"):
                    if other.spec.ingress:
                        raise AlreadyExists(
                            f"an ingress network already exists ({other.spec.annotations.name!r}): remove it first"
                        )
            net = objects_pb2.Network(id=new_id(), spec=spec)
            allocate_network(tx.sm, net)
            return tx.create(net)

        net = await self._commit(fn)
        log.info("network created id=%s name=%s", net.id, net.spec.annotations.name)
        return control_pb2.CreateNetworkResponse(network=public(self.store.get("network", net.id)))

    @rpc
    async def GetNetwork(self, request: control_pb2.GetNetworkRequest, context: Any) -> control_pb2.GetNetworkResponse:
        return control_pb2.GetNetworkResponse(network=public(self.store.resolve("network", request.network_id)))

    @rpc
    async def RemoveNetwork(
        self, request: control_pb2.RemoveNetworkRequest, context: Any
    ) -> control_pb2.RemoveNetworkResponse:
        def fn(tx: Tx) -> objects_pb2.Network:
            net = tx.sm.resolve("network", request.network_id)
            name = net.spec.annotations.name
            for svc in tx.sm.list("service"):
                used = any(a.target in (net.id, name) for a in svc.spec.task.networks)
                used = used or any(v.network_id == net.id for v in svc.endpoint.virtual_ips)
                if net.spec.ingress:
                    used = used or any(p.publish_mode == types_pb2.PortConfig.INGRESS for p in svc.spec.endpoint.ports)
                if used:
                    raise Conflict(
                        f"network {name} is in use by service {svc.spec.annotations.name!r}: remove the service "
                        "or detach it from the network first"
                    )
            for task in tx.sm.list("task"):
                if is_terminal(task.status.state) or task.desired_state > types_pb2.RUNNING:
                    continue
                if any(a.network.id == net.id for a in task.networks):
                    raise Conflict(
                        f"network {name} is in use by task {task.id}: stop the task or wait until it has stopped"
                    )
            tx.delete(net)
            return net

        net = await self._commit(fn)
        log.info("network removed id=%s name=%s", net.id, net.spec.annotations.name)
        return control_pb2.RemoveNetworkResponse()

    @rpc
    async def ListNetworks(
        self, request: control_pb2.ListNetworksRequest, context: Any
    ) -> control_pb2.ListNetworksResponse:
        return control_pb2.ListNetworksResponse(networks=[public(n) for n in self._list("network", request.filters)])

    # ---- secrets and configs -------------------------------------------------------------------
    @staticmethod
    def _redact_secret(secret: objects_pb2.Secret) -> objects_pb2.Secret:
        out = _copy(secret)
        out.spec.ClearField("data")
        return out

    @rpc
    async def CreateSecret(
        self, request: control_pb2.CreateSecretRequest, context: Any
    ) -> control_pb2.CreateSecretResponse:
        validation.validate_secret_spec(request.spec)
        secret = await self._create_file_object(objects_pb2.Secret, request.spec)
        return control_pb2.CreateSecretResponse(secret=self._redact_secret(secret))

    @rpc
    async def GetSecret(self, request: control_pb2.GetSecretRequest, context: Any) -> control_pb2.GetSecretResponse:
        return control_pb2.GetSecretResponse(secret=self._redact_secret(self.store.resolve("secret", request.secret_id)))

    @rpc
    async def RemoveSecret(
        self, request: control_pb2.RemoveSecretRequest, context: Any
    ) -> control_pb2.RemoveSecretResponse:
        await self._remove_file_object("secret", request.secret_id)
        return control_pb2.RemoveSecretResponse()

    @rpc
    async def ListSecrets(self, request: control_pb2.ListSecretsRequest, context: Any) -> control_pb2.ListSecretsResponse:
        return control_pb2.ListSecretsResponse(
            secrets=[self._redact_secret(s) for s in self._list("secret", request.filters)]
        )

    @rpc
    async def CreateConfig(
        self, request: control_pb2.CreateConfigRequest, context: Any
    ) -> control_pb2.CreateConfigResponse:
        validation.validate_config_spec(request.spec)
        config = await self._create_file_object(objects_pb2.Config, request.spec)
        return control_pb2.CreateConfigResponse(config=config)

    @rpc
    async def GetConfig(self, request: control_pb2.GetConfigRequest, context: Any) -> control_pb2.GetConfigResponse:
        return control_pb2.GetConfigResponse(config=self.store.resolve("config", request.config_id))

    @rpc
    async def RemoveConfig(
        self, request: control_pb2.RemoveConfigRequest, context: Any
    ) -> control_pb2.RemoveConfigResponse:
        await self._remove_file_object("config", request.config_id)
        return control_pb2.RemoveConfigResponse()

    @rpc
    async def ListConfigs(self, request: control_pb2.ListConfigsRequest, context: Any) -> control_pb2.ListConfigsResponse:
        return control_pb2.ListConfigsResponse(configs=self._list("config", request.filters))

    @rpc
    async def UpdateSecret(
        self, request: control_pb2.UpdateSecretRequest, context: Any
    ) -> control_pb2.UpdateSecretResponse:
        secret = await self._update_file_object("secret", request.secret_id, request.secret_version, request.spec)
        return control_pb2.UpdateSecretResponse(secret=self._redact_secret(secret))

    @rpc
    async def UpdateConfig(
        self, request: control_pb2.UpdateConfigRequest, context: Any
    ) -> control_pb2.UpdateConfigResponse:
        config = await self._update_file_object("config", request.config_id, request.config_version, request.spec)
        return control_pb2.UpdateConfigResponse(config=config)

    async def _update_file_object(self, kind: str, ref: str, version: int, spec: Any) -> Any:
        """Set the labels of the secret or config `ref` (`kind`) at `version` (0: any) to `spec`'s, as
        Docker allows: the name cannot change and the data must be empty or the same (INVALID_ARGUMENT
        otherwise, nothing written); the same labels write nothing."""
        validation.validate_labels(f"{kind} label", spec.annotations.labels)

        def fn(tx: Tx) -> Any:
            obj = self._resolve_for_write(tx, kind, ref, version)
            if spec.annotations.name != obj.spec.annotations.name:
                raise InvalidArgument(
                    f"only updates to Labels are allowed: {kind} {obj.spec.annotations.name} cannot be renamed to "
                    f"{spec.annotations.name!r}; create a new {kind} instead")
            if spec.data and not hmac.compare_digest(spec.data, obj.spec.data):
                raise InvalidArgument(
                    f"only updates to Labels are allowed: the data of {kind} {obj.spec.annotations.name} cannot "
                    f"change; create a new {kind} with the new data (and rotate the services to it)")
            if dict(obj.spec.annotations.labels) == dict(spec.annotations.labels):
                return obj
            obj.spec.annotations.labels.clear()
            obj.spec.annotations.labels.update(spec.annotations.labels)
            tx.update(obj)
            return obj

        obj = await self._commit(fn)
        log.info("%s updated id=%s name=%s", kind, obj.id, obj.spec.annotations.name)
        return self.store.get(kind, obj.id)

    async def _create_file_object(self, cls: type[F], spec: Message) -> F:
        """Create a secret or config (`cls`) from its validated `spec`; the stored object."""
        created = await self._commit(lambda tx: tx.create(cls(spec=spec)))
        kind = kind_of(created)
        log.info("%s created id=%s name=%s", kind, created.id, created.spec.annotations.name)
        return self.store.get(kind, created.id)

    async def _remove_file_object(self, kind: str, ref: str) -> None:
        """Remove the secret or config `ref` (`kind`); FAILED_PRECONDITION while a service uses it."""
        obj = await self._commit(lambda tx: self._remove_unused(tx, kind, ref))
        log.info("%s removed id=%s name=%s", kind, obj.id, obj.spec.annotations.name)

    @staticmethod
    def _remove_unused(tx: Tx, kind: str, ref: str) -> Any:
        obj = tx.sm.resolve(kind, ref)
        users = []
        for svc in tx.sm.list("service"):
            refs = svc.spec.task.container.secrets if kind == "secret" else svc.spec.task.container.configs
            if any(getattr(r, f"{kind}_id") == obj.id for r in refs):
                users.append(svc.spec.annotations.name)
        if users:
            plural = "s" if len(users) > 1 else ""
            raise Conflict(
                f"{kind} {obj.spec.annotations.name} is in use by service{plural} {', '.join(sorted(users))}: "
                f"remove the {kind} from the service{plural} (or remove the service{plural}) first"
            )
        tx.delete(obj)
        return obj

    # ---- cluster -------------------------------------------------------------------------------
    @staticmethod
    def _redact_cluster(cluster: objects_pb2.Cluster) -> objects_pb2.Cluster:
        out = _copy(cluster)
        out.root_ca.ClearField("ca_key")
        out.root_ca.root_rotation.ClearField("ca_key")
        if not cluster.root_ca.HasField("root_rotation"):
            out.root_ca.ClearField("root_rotation")
        out.ClearField("network_bootstrap_keys")
        out.ClearField("unlock_key")
        return out

    def _cluster(self) -> objects_pb2.Cluster:
        cluster = self.store.cluster()
        if cluster is None:
            raise NotFound("the cluster object does not exist yet: is the swarm initialised?")
        return cluster

    @rpc
    async def GetCluster(self, request: control_pb2.GetClusterRequest, context: Any) -> control_pb2.GetClusterResponse:
        return control_pb2.GetClusterResponse(cluster=self._redact_cluster(self._cluster()))

    @rpc
    async def RotateRootCA(
        self, request: control_pb2.RotateRootCARequest, context: Any
    ) -> control_pb2.RotateRootCAResponse:
        """Start a root rotation (see `shoal.manager.rotation`): to the given root, checked first, or
        to a new one. A rotation under way is replaced; the current root cross-signs the new one."""
        from shoal.manager import ca

        if bool(request.ca_cert) != bool(request.ca_key):
            raise InvalidArgument("--ca-cert and --ca-key go together: give both, or neither for a new root "
                                  "the manager makes")
        cur = self._cluster()
        if request.ca_cert:
            try:
                new = ca.check_root_pair(request.ca_cert, request.ca_key)
            except ValueError as e:
                raise InvalidArgument(str(e)) from None
            if new.digest == cur.root_ca.ca_cert_hash:
                raise InvalidArgument("--ca-cert is the cluster's root CA already: give another root, or none "
                                      "for a new one")
        else:
            new = ca.RootCA.create(cur.id)
        cross = ca.cross_sign(ca.RootCA(cur.root_ca.ca_cert, cur.root_ca.ca_key), new.cert_pem)

        def fn(tx: Tx) -> objects_pb2.Cluster:
            cluster = _copy(tx.get("cluster", cur.id))
            if cluster.root_ca.ca_cert != cur.root_ca.ca_cert:
                raise Conflict("the root CA changed while this rotation was being prepared: run it again")
            cluster.root_ca.root_rotation.CopyFrom(objects_pb2.RootRotation(
                ca_cert=new.cert_pem, ca_key=new.key_pem, cross_signed_ca_cert=cross, ca_cert_hash=new.digest))
            return tx.update(cluster)

        await self._commit(fn)
        log.info("root CA rotation started id=%s to=%s given=%s", cur.id, new.digest[:12], bool(request.ca_cert))
        return control_pb2.RotateRootCAResponse(ca_cert_hash=new.digest)

    @rpc
    async def UpdateCluster(
        self, request: control_pb2.UpdateClusterRequest, context: Any
    ) -> control_pb2.UpdateClusterResponse:
        if not request.HasField("spec"):
            raise InvalidArgument("cluster update has no spec: send the cluster's whole spec with the changes")
        validation.validate_cluster_spec(request.spec)
        if request.rotate_unlock_key and not request.spec.encryption_config.autolock_managers:
            raise Conflict(
                "cannot rotate the unlock key because autolock is not turned on: "
                "run `swarmctl cluster update --autolock=true`"
            )
        rotate = request.rotate_worker_token or request.rotate_manager_token
        generate = None
        if rotate:
            from shoal.manager.ca import generate_join_token as generate

        def fn(tx: Tx) -> objects_pb2.Cluster:
            cur = self._cluster()
            cluster = self._resolve_for_write(tx, "cluster", cur.id, request.cluster_version)
            spec = _copy(request.spec)
            old_name = cluster.spec.annotations.name
            if not spec.annotations.name:
                spec.annotations.name = old_name
            if spec.annotations.name != old_name:
                raise InvalidArgument(
                    f"the cluster cannot be renamed from {old_name!r} to {spec.annotations.name!r}"
                )
            cluster.spec.CopyFrom(spec)
            if rotate:
                if not cluster.root_ca.ca_cert:
                    raise Conflict("the cluster has no root CA yet, so its join tokens cannot be rotated")
                assert generate is not None
                if request.rotate_worker_token:
                    cluster.root_ca.join_tokens.worker = generate(cluster.root_ca.ca_cert)
                if request.rotate_manager_token:
                    cluster.root_ca.join_tokens.manager = generate(cluster.root_ca.ca_cert)
            # Autolock: the managers' unlock key exists exactly while autolock is on (each manager
            # follows it and re-wraps its data key; see Manager._follow_cluster_keys).
            if spec.encryption_config.autolock_managers:
                if not cluster.unlock_key or request.rotate_unlock_key:
                    cluster.unlock_key = new_unlock_key()
            else:
                cluster.ClearField("unlock_key")
            if cluster != tx.sm.get("cluster", cluster.id):
                tx.update(cluster)
            return cluster

        cluster = await self._commit(fn)
        log.info("cluster updated id=%s rotate_worker=%s rotate_manager=%s autolock=%s rotate_unlock_key=%s",
                 cluster.id, request.rotate_worker_token, request.rotate_manager_token,
                 cluster.spec.encryption_config.autolock_managers, request.rotate_unlock_key)
        return control_pb2.UpdateClusterResponse(cluster=self._redact_cluster(self.store.get("cluster", cluster.id)))

    @rpc
    async def GetUnlockKey(
        self, request: control_pb2.GetUnlockKeyRequest, context: Any
    ) -> control_pb2.GetUnlockKeyResponse:
        cluster = self._cluster()
        key = ""
        if cluster.spec.encryption_config.autolock_managers and cluster.unlock_key:
            key = format_unlock_key(cluster.unlock_key)
        return control_pb2.GetUnlockKeyResponse(unlock_key=key, version=cluster.meta.version)

    @rpc
    async def BackupCluster(
        self, request: control_pb2.BackupClusterRequest, context: Any
    ) -> control_pb2.BackupClusterResponse:
        """One consistent snapshot of every object (after a read barrier), sealed for the operator."""
        stale = await self.store.read_barrier()
        snap = self.store.sm.snapshot()
        cluster = next((so.cluster for so in snap.objects if so.WhichOneof("object") == "cluster"), None)
        if cluster is None:
            raise NotFound("this manager has no cluster state yet; retry in a moment")
        if cluster.spec.encryption_config.autolock_managers and cluster.unlock_key:
            raw, key = cluster.unlock_key, ""
        else:
            raw = new_unlock_key()
            key = format_unlock_key(raw)
        data = backup.seal(snap, cluster.id, raw, unlock_key=not key)
        log.info("cluster backup made version=%d objects=%d bytes=%d%s", snap.version, len(snap.objects), len(data),
                 " (stale: no quorum)" if stale else "")
        return control_pb2.BackupClusterResponse(backup=data, key=key, version=snap.version, stale=stale or "",
                                                 cluster_id=cluster.id)

    @rpc
    async def UnlockCluster(
        self, request: control_pb2.UnlockClusterRequest, context: Any
    ) -> control_pb2.UnlockClusterResponse:
        # A locked manager answers this from swarmd (before its manager role starts); here it runs.
        raise Conflict("this manager is not locked")

    # ---- info ----------------------------------------------------------------------------------
    @rpc
    async def Info(self, request: control_pb2.InfoRequest, context: Any) -> control_pb2.InfoResponse:
        resp = control_pb2.InfoResponse()
        info_fn = getattr(self.manager, "info", None)
        if info_fn is not None:
            got = info_fn()
            if inspect.isawaitable(got):
                got = await got
            resp.CopyFrom(got)
        else:
            managers = [n for n in self.sm.list("node") if n.role == types_pb2.MANAGER]
            resp.node_id = getattr(self.manager, "node_id", "") or (managers[0].id if len(managers) == 1 else "")
            resp.is_manager = True
            for n in managers:
                leader = n.manager_status.leader or len(managers) == 1
                resp.members.add(node_id=n.id, addr=n.manager_status.addr, leader=leader,
                                 reachable=n.manager_status.reachability != types_pb2.ManagerStatus.UNREACHABLE)
                if leader:
                    resp.leader_node_id = n.id
        resp.store_version = self.sm.version
        cluster = self.store.cluster()
        if cluster is not None and not resp.cluster_id:
            resp.cluster_id = cluster.id
        return resp


def _peer(context: Any) -> Any:
    """The verified node identity of an mTLS caller (None on the local socket and in tests)."""
    try:
        from shoal.manager.ca import peer_identity
    except ImportError:  # pragma: no cover
        return None
    try:
        return peer_identity(context)
    except Exception:  # no auth context (e.g. a test double)
        return None


def _labels_match(have: Any, want: dict[str, str]) -> bool:
    return all(k in have and (not v or have[k] == v) for k, v in want.items())


def add_to_server(servicer: ControlServicer, server: grpc.aio.Server) -> None:
    control_pb2_grpc.add_ControlServicer_to_server(servicer, server)
