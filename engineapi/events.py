"""`GET /events`: the swarm's changes as Docker's event stream (`docker events --filter scope=swarm`).

Docker's swarm events are about services, nodes, secrets, configs and networks (not tasks), with the
actions `create`, `update` and `remove`; an update names what changed as `<attr>.old` / `<attr>.new`
attributes (a service's image, replicas and update state; a node's availability, role and state).
Each event is one JSON object, streamed as it happens:

    {"Type":"service","Action":"update","Actor":{"ID":"...","Attributes":{"name":"web",
     "replicas.old":"1","replicas.new":"3"}},"scope":"swarm","time":1733500000,"timeNano":1733500000123456789}

Filters: `scope` (only `swarm` has events here; `local` gets none), `type`, `event` (the action),
`service`, `node`, `secret`, `config`, `network` (an id or a name). `until` (unix seconds) ends the
stream then; `since` cannot replay the past (the store keeps no event history): events start now,
and a `since` in the past is accepted as "from now".
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import grpc

from shoal.engineapi.nodes import AVAILABILITY, ROLES
from shoal.engineapi.server import APIError, EngineContext, Request, Route, StreamResponse
from shoal.proto import types_pb2, watch_pb2

KINDS = ("service", "node", "secret", "config", "network")
ACTIONS = {watch_pb2.WatchEvent.CREATE: "create", watch_pb2.WatchEvent.UPDATE: "update",
           watch_pb2.WatchEvent.DELETE: "remove"}
NODE_STATES = {types_pb2.NodeStatus.UNKNOWN: "unknown", types_pb2.NodeStatus.DOWN: "down",
               types_pb2.NodeStatus.READY: "ready", types_pb2.NodeStatus.DISCONNECTED: "disconnected"}
UPDATE_STATES = {0: "", 1: "updating", 2: "paused", 3: "completed", 4: "rollback_started", 5: "rollback_paused",
                 6: "rollback_completed"}


def _name(kind: str, obj: Any) -> str:
    if kind == "node":
        return obj.description.hostname or obj.spec.annotations.name
    return obj.spec.annotations.name


def _service_attrs(obj: Any) -> dict[str, str]:
    spec = obj.spec
    out = {"image": spec.task.container.image}
    if spec.HasField("replicated"):
        out["replicas"] = str(spec.replicated.replicas)
    if obj.HasField("update_status"):
        out["updatestate"] = UPDATE_STATES.get(obj.update_status.state, "")
    return out


def _node_attrs(obj: Any) -> dict[str, str]:
    return {"availability": AVAILABILITY[obj.spec.availability], "role": ROLES[obj.spec.desired_role],
            "state": NODE_STATES[obj.status.state]}


ATTRS = {"service": _service_attrs, "node": _node_attrs}


def docker_event(ev: watch_pb2.WatchEvent) -> dict[str, Any] | None:
    """The Docker event of a store change; None for kinds Docker has no swarm events for, and for an
    update that changed nothing Docker reports (a task count, a heartbeat)."""
    kind = ev.object.WhichOneof("object")
    if kind not in KINDS:
        return None
    obj = getattr(ev.object, kind)
    attrs = {"name": _name(kind, obj)}
    action = ACTIONS[ev.action]
    if action == "update" and kind in ATTRS and ev.HasField("old_object"):
        new, old = ATTRS[kind](obj), ATTRS[kind](getattr(ev.old_object, kind))
        changed = {k for k in new if new[k] != old.get(k)}
        if not changed and kind == "node":
            return None  # a node's status timestamps and heartbeats: nothing Docker reports
        for k in sorted(changed):
            attrs[f"{k}.old"], attrs[f"{k}.new"] = old.get(k, ""), new[k]
    now = time.time_ns()
    return {"Type": kind, "Action": action, "Actor": {"ID": obj.id, "Attributes": attrs}, "scope": "swarm",
            "time": now // 1_000_000_000, "timeNano": now}


def _matches(e: dict[str, Any], f: dict[str, list[str]]) -> bool:
    if f.get("type") and e["Type"] not in f["type"]:
        return False
    if f.get("event") and e["Action"] not in f["event"]:
        return False
    for kind in KINDS:
        refs = f.get(kind)
        if refs and (e["Type"] != kind or not ({e["Actor"]["ID"], e["Actor"]["Attributes"]["name"]} & set(refs))):
            return False
    return True


def routes(ctx: EngineContext) -> list[Route]:
    async def events(req: Request) -> StreamResponse:
        f = req.filters()
        unknown = set(f) - {"scope", "type", "event", *KINDS, "container", "image", "volume", "daemon", "plugin"}
        if unknown:
            raise APIError(400, f"invalid filter '{sorted(unknown)[0]}'")
        for bad in set(f.get("type", [])) - set(KINDS) - {"container", "image", "volume", "daemon", "plugin"}:
            raise APIError(400, f"invalid filter 'type={bad}'")
        until = _unix(req.query.get("until", ""), "until")
        _unix(req.query.get("since", ""), "since")  # checked; the past cannot be replayed (see above)
        local_only = f.get("scope") == ["local"] or any(t in ("container", "image", "volume", "daemon", "plugin")
                                                        for t in f.get("type", []))
        kinds = [k for k in KINDS if not f.get("type") or k in f["type"]]
        call = ctx.watch.Watch(watch_pb2.WatchRequest(kinds=kinds, include_old_object=True))

        async def stream() -> AsyncIterator[bytes]:
            try:
                while True:
                    timeout = None if until is None else until - time.time()
                    if timeout is not None and timeout <= 0:
                        return
                    try:
                        msg = await asyncio.wait_for(call.read(), timeout)
                    except TimeoutError:
                        return
                    if msg is grpc.aio.EOF:
                        return
                    for ev in msg.events:
                        e = docker_event(ev)
                        if e is not None and not local_only and _matches(e, f):
                            yield json.dumps(e, separators=(",", ":")).encode() + b"\n"
            finally:
                call.cancel()
                with contextlib.suppress(BaseException):
                    await call.code()

        return StreamResponse(stream(), content_type="application/json")

    return [Route("GET", r"/events", events)]


def _unix(raw: str, name: str) -> float | None:
    """A Docker `since`/`until`: unix seconds, with an optional fraction ("1733500000.123456789")."""
    if not raw:
        return None
    try:
        return float(raw)
    except ValueError:
        raise APIError(400, f"invalid value for {name}: {raw!r} (unix seconds; the docker CLI converts "
                            "durations and dates itself)") from None
