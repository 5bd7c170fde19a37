"""`/services` and `/tasks`: list (Docker's filters), inspect, create, update (with `?version=`,
`?rollback=previous`, `?registryAuthFrom=`), remove; tasks list and inspect.

Service JSON as Docker's (../shared/docs/docker-cli-api.md §5.3): `Spec` (and `PreviousSpec` once
updated) in the form of `shoal.engineapi.servicespec`, `Endpoint` (Spec, allocated Ports, VirtualIPs),
`UpdateStatus` once an update or rollback ran, and with `?status=true` on lists `ServiceStatus`
{RunningTasks, DesiredTasks, CompletedTasks} (tasks on nodes that are down do not count, as in
Docker). Task JSON as §5.4: no `Slot` for global tasks, no `NodeID` while pending, `Labels` the
task's own, and the `label` filter matches the service's labels too; `_up-to-date` (the CLI's
progress loop) keeps the tasks not dirty against the current spec (`up_to_date`).

Updates: the Spec the CLI read and posts back is the stored spec (servicespec's round trip), and the
lists it re-sorts (mounts, environment) keep the stored order (`keep_list_order`): no change, no
new spec version, no rolling restart.

Registry credentials: Docker sends them in the `X-Registry-Auth` header (base64 JSON), not in the
spec; on create they become the spec's `pull_options`; an update keeps the stored ones unless the
header brings others (`registryAuthFrom=previous-spec` takes the previous spec's).
"""

from __future__ import annotations

import base64
import binascii
import json
from typing import Any

from shoal.engineapi.convert import label_filter, labels, lookup, meta, query_version, ts
from shoal.engineapi.server import APIError, EngineContext, Request, Response, Route, empty, json_response
from shoal.engineapi.servicespec import (
    endpoint_spec_json,
    fill_defaults,
    port_json,
    spec_from_json,
    spec_json,
    task_spec_json,
)
from shoal.proto import control_pb2, objects_pb2, specs_pb2, types_pb2

TASK_STATES = {v: k.lower() for k, v in types_pb2.TaskState.items()}
UPDATE_STATES = {types_pb2.UpdateStatus.UPDATING: "updating", types_pb2.UpdateStatus.PAUSED: "paused",
                 types_pb2.UpdateStatus.COMPLETED: "completed",
                 types_pb2.UpdateStatus.ROLLBACK_STARTED: "rollback_started",
                 types_pb2.UpdateStatus.ROLLBACK_PAUSED: "rollback_paused",
                 types_pb2.UpdateStatus.ROLLBACK_COMPLETED: "rollback_completed"}
DESIRED_STATE_FILTER = {"running": types_pb2.RUNNING, "shutdown": types_pb2.SHUTDOWN, "accepted": types_pb2.ACCEPTED,
                        "ready": types_pb2.READY, "remove": types_pb2.REMOVE}


def service_json(s: objects_pb2.Service, insert_defaults: bool = False) -> dict[str, Any]:
    out = meta(s)
    out["Spec"] = spec_json(s.spec)
    if insert_defaults:
        fill_defaults(out["Spec"])
    if s.HasField("previous_spec"):
        out["PreviousSpec"] = spec_json(s.previous_spec)
        if insert_defaults:
            fill_defaults(out["PreviousSpec"])
    ep: dict[str, Any] = {"Spec": endpoint_spec_json(s.endpoint.spec) if s.endpoint.HasField("spec") else {}}
    if s.endpoint.ports:
        ep["Ports"] = [port_json(p) for p in s.endpoint.ports]
    if s.endpoint.virtual_ips:
        ep["VirtualIPs"] = [{"NetworkID": v.network_id, "Addr": v.addr} for v in s.endpoint.virtual_ips]
    out["Endpoint"] = ep
    if s.update_status.state != types_pb2.UpdateStatus.UNKNOWN:
        u = s.update_status
        us: dict[str, Any] = {"State": UPDATE_STATES[u.state], "StartedAt": ts(u.started_at)}
        if u.HasField("completed_at"):
            us["CompletedAt"] = ts(u.completed_at)
        us["Message"] = u.message
        out["UpdateStatus"] = us
    return out


def network_json(n: objects_pb2.Network) -> dict[str, Any]:
    """A network as a task's attachment shows it (the swarm object, not /networks' form)."""
    spec: dict[str, Any] = {"Name": n.spec.annotations.name, "Labels": labels(n.spec.annotations.labels)}
    if n.spec.driver_config.name and not n.spec.ingress:
        spec["DriverConfiguration"] = {"Name": n.spec.driver_config.name}
    else:
        spec["DriverConfiguration"] = {}
    if n.spec.internal:
        spec["Internal"] = True
    if n.spec.attachable:
        spec["Attachable"] = True
    if n.spec.ingress:
        spec["Ingress"] = True
    spec["IPAMOptions"] = {"Driver": {}}
    spec["Scope"] = "swarm"
    opts = dict(n.driver_state.options)
    if n.driver_state.vni:
        opts.setdefault("com.docker.network.driver.overlay.vxlanid_list", str(n.driver_state.vni))
    out = meta(n)
    out.update({"Spec": spec, "DriverState": {"Name": n.spec.driver_config.name or "overlay", "Options": opts},
                "IPAMOptions": {"Driver": {"Name": n.ipam.driver.name or "default"},
                                "Configs": [{"Subnet": c.subnet, "Gateway": c.gateway} for c in n.ipam.configs]}})
    return out


def task_json(t: objects_pb2.Task) -> dict[str, Any]:
    out = meta(t)
    out["Labels"] = labels(t.annotations.labels)
    out["Spec"] = task_spec_json(t.spec)
    out["ServiceID"] = t.service_id
    if t.slot:
        out["Slot"] = t.slot
    if t.node_id:
        out["NodeID"] = t.node_id
    st = t.status
    status: dict[str, Any] = {"Timestamp": ts(st.timestamp), "State": TASK_STATES[st.state], "Message": st.message}
    if st.err:
        status["Err"] = st.err
    if st.HasField("container") and st.container.container_id:
        status["ContainerStatus"] = {"ContainerID": st.container.container_id, "PID": st.container.pid,
                                     "ExitCode": st.container.exit_code}
    status["PortStatus"] = {"Ports": [port_json(p) for p in st.port_status.ports]} if st.port_status.ports else {}
    out["Status"] = status
    out["DesiredState"] = TASK_STATES[t.desired_state]
    if t.networks:
        out["NetworksAttachments"] = [{"Network": network_json(a.network), "Addresses": list(a.addresses)}
                                      for a in t.networks]
    if t.assigned_generic_resources:
        out["AssignedGenericResources"] = [{"DiscreteResourceSpec": {"Kind": g.kind, "Value": g.value}}
                                           for g in t.assigned_generic_resources]
    return out


def up_to_date(svc: objects_pb2.Service, t: objects_pb2.Task) -> bool:
    """The `_up-to-date` task filter (Docker's UpToDate, swarmkit's `!IsTaskDirty`): the task was made
    from the service's current spec version, or from the same task template and endpoint (a scale or a
    rollback changes the version without replacing such tasks). A change of placement alone replaces
    only tasks whose node no longer fits; the orchestrator decides that, so such a task counts as up
    to date while it is meant to run (it is told to shut down when it is replaced)."""
    if t.spec_version and t.spec_version == svc.spec_version:
        return True
    if t.endpoint.spec != svc.spec.endpoint:
        return False
    if t.spec == svc.spec.task:
        return True
    a, b = types_pb2.TaskSpec(), types_pb2.TaskSpec()
    a.CopyFrom(t.spec)
    b.CopyFrom(svc.spec.task)
    a.ClearField("placement")
    b.ClearField("placement")
    return a == b and t.desired_state <= types_pb2.RUNNING


def keep_list_order(new: types_pb2.ContainerSpec, current: types_pb2.ContainerSpec) -> None:
    """The docker CLI's `service update` posts some lists back in another order than it read them:
    the mounts re-sorted (by source, then target) even when no mount flag was given, the environment
    rebuilt from a map after --env-add/--env-rm. The same mounts in another order, or the same
    environment (each variable once) in another order, keep the stored order: that is no change.
    (Mount order would matter only for nested targets, which Docker's own sort does not keep either.)"""
    def same(a: list[bytes], b: list[bytes]) -> bool:
        return len(a) == len(b) and sorted(a) == sorted(b)

    def ser(ms: Any) -> list[bytes]:
        return [m.SerializeToString(deterministic=True) for m in ms]

    if list(new.mounts) != list(current.mounts) and same(ser(new.mounts), ser(current.mounts)):
        del new.mounts[:]
        new.mounts.extend(current.mounts)
    keys = [e.partition("=")[0] for e in current.env]
    if list(new.env) != list(current.env) and len(set(keys)) == len(keys) and sorted(new.env) == sorted(current.env):
        del new.env[:]
        new.env.extend(current.env)


def registry_auth(req: Request) -> str:
    """The `X-Registry-Auth` header when it carries credentials ("" for none or `{}`)."""
    raw = req.headers.get("x-registry-auth", "").strip()
    if not raw:
        return ""
    try:
        doc = json.loads(base64.urlsafe_b64decode(raw + "=" * (-len(raw) % 4)))
    except (binascii.Error, ValueError):
        raise APIError(400, "X-Registry-Auth is not base64 of a JSON object: send {\"username\",\"password\"} "
                            "base64-encoded, or leave the header out") from None
    if not isinstance(doc, dict):
        raise APIError(400, "X-Registry-Auth is not base64 of a JSON object")
    return raw if any(doc.values()) else ""


def service_status(services: list[objects_pb2.Service], tasks: list[objects_pb2.Task],
                   down_nodes: set[str]) -> dict[str, dict[str, int]]:
    """Docker's ServiceStatus per service id: running tasks (not on a down node), desired tasks
    (the replicas, or for a global service its tasks meant to run), completed tasks (0: no jobs)."""
    globals_ = {s.id for s in services if s.spec.WhichOneof("mode") == "global"}
    out = {s.id: {"RunningTasks": 0, "DesiredTasks": 0 if s.id in globals_ else s.spec.replicated.replicas,
                  "CompletedTasks": 0} for s in services}
    for t in tasks:
        st = out.get(t.service_id)
        if st is None or t.node_id in down_nodes:
            continue
        if t.status.state == types_pb2.RUNNING and t.desired_state <= types_pb2.RUNNING:
            st["RunningTasks"] += 1
        if t.service_id in globals_ and t.desired_state == types_pb2.RUNNING:
            st["DesiredTasks"] += 1
    return out


def routes(ctx: EngineContext) -> list[Route]:
    async def get_service(ref: str) -> objects_pb2.Service:
        return (await lookup("service", ref, ctx.control.GetService(
            control_pb2.GetServiceRequest(service_id=ref), timeout=10))).service

    async def list_services(req: Request) -> Response:
        f = req.filters()
        unknown = set(f) - {"id", "name", "label", "mode"}
        if unknown:
            raise APIError(400, f"invalid filter '{sorted(unknown)[0]}'")
        lf = control_pb2.ListFilters(id_prefixes=f.get("id", []), name_prefixes=f.get("name", []))
        lf.labels.update(label_filter(f.get("label", [])))
        services = list((await ctx.control.ListServices(control_pb2.ListServicesRequest(filters=lf),
                                                        timeout=10)).services)
        modes = f.get("mode", [])
        for m in modes:
            if m not in ("replicated", "global"):
                raise APIError(400, f"invalid filter 'mode={m}': mode is replicated or global (Shoal has no jobs)")
        if modes:
            services = [s for s in services if ("global" if s.spec.WhichOneof("mode") == "global"
                                                else "replicated") in modes]
        out = [service_json(s) for s in services]
        if req.flag("status") and services:
            tasks = (await ctx.control.ListTasks(control_pb2.ListTasksRequest(), timeout=10)).tasks
            nodes = (await ctx.control.ListNodes(control_pb2.ListNodesRequest(), timeout=10)).nodes
            down = {n.id for n in nodes if n.status.state == types_pb2.NodeStatus.DOWN}
            status = service_status(services, list(tasks), down)
            for doc in out:
                doc["ServiceStatus"] = status[doc["ID"]]
        return json_response(out)

    async def inspect_service(req: Request) -> Response:
        raw = req.query.get("insertDefaults", "")
        if raw.lower() not in ("", "0", "1", "true", "false"):
            raise APIError(400, f"invalid insertDefaults '{raw}': give true or false")
        return json_response(service_json(await get_service(req.params["id"]), req.flag("insertDefaults")))

    async def create_service(req: Request) -> Response:
        spec = spec_from_json(req.json())
        auth = registry_auth(req)
        if auth:
            spec.task.container.pull_options.registry_auth = auth
        svc = (await ctx.control.CreateService(control_pb2.CreateServiceRequest(spec=spec), timeout=30)).service
        return json_response({"ID": svc.id}, 201)

    async def update_service(req: Request) -> Response:
        version = query_version(req)
        svc = await get_service(req.params["id"])
        rollback = req.query.get("rollback", "")
        if rollback not in ("", "previous"):
            raise APIError(400, f"invalid rollback '{rollback}': give previous (or leave it out)")
        if rollback == "previous":
            await ctx.control.UpdateService(control_pb2.UpdateServiceRequest(
                service_id=svc.id, service_version=version, rollback=control_pb2.UpdateServiceRequest.PREVIOUS),
                timeout=30)
            return json_response({"Warnings": None})
        spec = spec_from_json(req.json())
        auth = registry_auth(req)
        source = req.query.get("registryAuthFrom", "") or "spec"
        if source not in ("spec", "previous-spec"):
            raise APIError(400, f"invalid registryAuthFrom '{source}': give spec or previous-spec")
        kept: specs_pb2.ServiceSpec = svc.previous_spec if source == "previous-spec" else svc.spec
        if auth:
            spec.task.container.pull_options.registry_auth = auth
        elif kept.task.container.HasField("pull_options"):
            spec.task.container.pull_options.CopyFrom(kept.task.container.pull_options)
        keep_list_order(spec.task.container, svc.spec.task.container)
        await ctx.control.UpdateService(control_pb2.UpdateServiceRequest(
            service_id=svc.id, service_version=version, spec=spec), timeout=30)
        return json_response({"Warnings": None})

    async def remove_service(req: Request) -> Response:
        svc = await get_service(req.params["id"])
        await ctx.control.RemoveService(control_pb2.RemoveServiceRequest(service_id=svc.id), timeout=30)
        return empty()

    async def list_tasks(req: Request) -> Response:
        f = req.filters()
        unknown = set(f) - {"id", "name", "service", "node", "label", "desired-state", "_up-to-date"}
        if unknown:
            raise APIError(400, f"invalid filter '{sorted(unknown)[0]}'")
        lf = control_pb2.ListFilters(id_prefixes=f.get("id", []), name_prefixes=f.get("name", []),
                                     service_ids=f.get("service", []), node_ids=f.get("node", []))
        lf.labels.update(label_filter(f.get("label", [])))
        for d in f.get("desired-state", []):
            if d not in DESIRED_STATE_FILTER:
                raise APIError(400, f"invalid filter 'desired-state={d}': use one of {', '.join(DESIRED_STATE_FILTER)}")
            lf.desired_states.append(DESIRED_STATE_FILTER[d])
        tasks = list((await ctx.control.ListTasks(control_pb2.ListTasksRequest(filters=lf), timeout=10)).tasks)
        if "_up-to-date" in f and any(v.lower() in ("true", "1") for v in f["_up-to-date"]):
            services = (await ctx.control.ListServices(control_pb2.ListServicesRequest(), timeout=10)).services
            by_id = {s.id: s for s in services}
            tasks = [t for t in tasks if t.service_id in by_id and up_to_date(by_id[t.service_id], t)]
        return json_response([task_json(t) for t in tasks])

    async def inspect_task(req: Request) -> Response:
        ref = req.params["id"]
        task = (await lookup("task", ref, ctx.control.GetTask(control_pb2.GetTaskRequest(task_id=ref),
                                                               timeout=10))).task
        return json_response(task_json(task))

    return [
        Route("GET", r"/services", list_services),
        Route("POST", r"/services/create", create_service),
        Route("GET", r"/services/(?P<id>[^/]+)", inspect_service),
        Route("POST", r"/services/(?P<id>[^/]+)/update", update_service),
        Route("DELETE", r"/services/(?P<id>[^/]+)", remove_service),
        Route("GET", r"/tasks", list_tasks),
        Route("GET", r"/tasks/(?P<id>[^/]+)", inspect_task),
    ]
