"""`/nodes`: list (filters id, name, role, membership, label, node.label), inspect (id, id prefix,
name or hostname), update (the whole NodeSpec with `?version=`: availability, labels, role --
`docker node promote/demote` are updates of the role), remove (`?force=1`).

Node JSON as Docker's (../shared/docs/docker-cli-api.md §5.5): a worker has no `ManagerStatus`; the
TLS info names the issuer of the node's own certificate and the cluster's trusted root.
"""

from __future__ import annotations

import base64
from typing import Any

from shoal.engineapi.convert import (
    NODE_STATES,
    label_filter,
    labels,
    lookup,
    meta,
    query_version,
    want_labels,
)
from shoal.engineapi.server import APIError, EngineContext, Request, Response, Route, empty, json_response
from shoal.proto import control_pb2, objects_pb2, specs_pb2, types_pb2

ROLES = {types_pb2.WORKER: "worker", types_pb2.MANAGER: "manager"}
AVAILABILITY = {types_pb2.ACTIVE: "active", types_pb2.PAUSE: "pause", types_pb2.DRAIN: "drain"}
REACHABILITY = {types_pb2.ManagerStatus.UNKNOWN: "unknown", types_pb2.ManagerStatus.UNREACHABLE: "unreachable",
                types_pb2.ManagerStatus.REACHABLE: "reachable"}


def issuer_subject_der(rfc4514: str) -> bytes:
    """The DER of an RFC 4514 name (Docker shows the issuer's subject as base64 DER)."""
    if not rfc4514:
        return b""
    from cryptography import x509

    return x509.Name.from_rfc4514_string(rfc4514).public_bytes()


def node_json(n: objects_pb2.Node, trust_root: bytes) -> dict[str, Any]:
    d = n.description
    out = meta(n)
    out["Spec"] = {"Labels": labels(n.spec.annotations.labels), "Role": ROLES[n.spec.desired_role],
                   "Availability": AVAILABILITY[n.spec.availability]}
    if n.spec.annotations.name:
        out["Spec"]["Name"] = n.spec.annotations.name
    out["Description"] = {
        "Hostname": d.hostname,
        "Platform": {"Architecture": d.platform.architecture, "OS": d.platform.os},
        "Resources": {"NanoCPUs": d.resources.nano_cpus, "MemoryBytes": d.resources.memory_bytes},
        "Engine": {"EngineVersion": d.engine.engine_version, "Labels": labels(d.engine.labels),
                   "Plugins": [{"Type": "Network", "Name": "overlay"}, {"Type": "Volume", "Name": "local"},
                               {"Type": "Log", "Name": "json-file"}]},
        "TLSInfo": {"TrustRoot": trust_root.decode(),
                    "CertIssuerSubject": base64.b64encode(issuer_subject_der(n.tls_info.cert_issuer_subject)).decode(),
                    "CertIssuerPublicKey": base64.b64encode(n.tls_info.cert_issuer_public_key).decode()},
    }
    out["Status"] = {"State": NODE_STATES[n.status.state], "Addr": n.status.addr or d.addr}
    if n.status.message:
        out["Status"]["Message"] = n.status.message
    if n.HasField("manager_status"):
        ms = n.manager_status
        out["ManagerStatus"] = {"Reachability": REACHABILITY[ms.reachability], "Addr": ms.api_addr or ms.addr}
        if ms.leader:
            out["ManagerStatus"] = {"Leader": True, **out["ManagerStatus"]}
    return out


def node_spec(doc: Any, current: specs_pb2.NodeSpec) -> specs_pb2.NodeSpec:
    """Docker's NodeSpec (the whole of it, as `docker node update` sends it) as Shoal's."""
    if not isinstance(doc, dict):
        raise APIError(400, "the body must be the node's Spec object: {\"Role\", \"Availability\", \"Labels\"}")
    spec = specs_pb2.NodeSpec()
    spec.CopyFrom(current)
    if "Name" in doc:
        spec.annotations.name = doc["Name"] or ""
    spec.annotations.labels.clear()
    spec.annotations.labels.update(want_labels(doc, "Labels", "Spec."))
    role = doc.get("Role") or ROLES[current.desired_role]
    roles = {v: k for k, v in ROLES.items()}
    if role not in roles:
        raise APIError(400, f"invalid role '{role}': Spec.Role is worker or manager")
    spec.desired_role = roles[role]
    avail = doc.get("Availability") or AVAILABILITY[current.availability]
    avails = {v: k for k, v in AVAILABILITY.items()}
    if avail not in avails:
        raise APIError(400, f"invalid availability '{avail}': Spec.Availability is active, pause or drain")
    spec.availability = avails[avail]
    return spec


def routes(ctx: EngineContext) -> list[Route]:
    async def trust_root() -> bytes:
        return (await ctx.control.GetCluster(control_pb2.GetClusterRequest(), timeout=10)).cluster.root_ca.ca_cert

    async def get_node(ref: str) -> objects_pb2.Node:
        return (await lookup("node", ref, ctx.control.GetNode(control_pb2.GetNodeRequest(node_id=ref), timeout=10))).node

    async def list_nodes(req: Request) -> Response:
        f = req.filters()
        unknown = set(f) - {"id", "name", "role", "membership", "label", "node.label"}
        if unknown:
            raise APIError(400, f"invalid filter '{sorted(unknown)[0]}'")
        lf = control_pb2.ListFilters(id_prefixes=f.get("id", []), name_prefixes=f.get("name", []))
        lf.labels.update(label_filter(f.get("node.label", [])))
        for r in f.get("role", []):
            if r not in ("worker", "manager"):
                raise APIError(400, f"invalid filter 'role={r}': role is worker or manager")
            lf.roles.append(types_pb2.MANAGER if r == "manager" else types_pb2.WORKER)
        nodes = (await ctx.control.ListNodes(control_pb2.ListNodesRequest(filters=lf), timeout=10)).nodes
        want_engine = label_filter(f.get("label", []))
        if want_engine:
            nodes = [n for n in nodes if all(k in n.description.engine.labels and
                                             (not v or n.description.engine.labels[k] == v)
                                             for k, v in want_engine.items())]
        if any(m != "accepted" for m in f.get("membership", [])):
            nodes = []  # every node of a Shoal cluster is accepted (joining needs a token)
        root = await trust_root()
        return json_response([node_json(n, root) for n in nodes])

    async def inspect_node(req: Request) -> Response:
        return json_response(node_json(await get_node(req.params["id"]), await trust_root()))

    async def update_node(req: Request) -> Response:
        version = query_version(req)
        node = await get_node(req.params["id"])
        spec = node_spec(req.json(), node.spec)
        await ctx.control.UpdateNode(control_pb2.UpdateNodeRequest(node_id=node.id, node_version=version, spec=spec),
                                     timeout=30)
        return empty()

    async def remove_node(req: Request) -> Response:
        node = await get_node(req.params["id"])
        await ctx.control.RemoveNode(control_pb2.RemoveNodeRequest(node_id=node.id, force=req.flag("force")),
                                     timeout=30)
        return empty()

    return [
        Route("GET", r"/nodes", list_nodes),
        Route("GET", r"/nodes/(?P<id>[^/]+)", inspect_node),
        Route("POST", r"/nodes/(?P<id>[^/]+)/update", update_node),
        Route("DELETE", r"/nodes/(?P<id>[^/]+)", remove_node),
    ]
