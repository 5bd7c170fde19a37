"""Shared pieces of the translation between Shoal's objects (protobuf) and Docker's JSON, and of looking
objects up the way Docker does.

Docker's conventions (../shared/docs/docker-cli-api.md §1): times are RFC 3339 with nanoseconds in
UTC; durations are integer nanoseconds; `Version.Index` is the object's store version, which an
update must send back (`?version=`); `GET /<kind>/{ref}` takes a full id, an id prefix or a name.
"""

from __future__ import annotations

from collections.abc import Awaitable, Iterable, Mapping
from typing import Any, TypeVar

from google.protobuf import duration_pb2, timestamp_pb2

from shoal.engineapi.server import APIError, Request, not_found
from shoal.proto import types_pb2

T = TypeVar("T")


def ts(t: timestamp_pb2.Timestamp) -> str:
    """RFC 3339 with nanoseconds, UTC: 2026-11-24T06:58:55.82862703Z (Go's RFC3339Nano drops
    trailing zeros); the zero time for an unset timestamp, as Go prints it."""
    if t.seconds == 0 and t.nanos == 0:
        return "0001-01-01T00:00:00Z"
    base = t.ToDatetime().strftime("%Y-%m-%dT%H:%M:%S")
    frac = f"{t.nanos:09d}".rstrip("0")
    return f"{base}.{frac}Z" if frac else f"{base}Z"


def ns(d: duration_pb2.Duration) -> int:
    return d.seconds * 1_000_000_000 + d.nanos


def set_ns(d: duration_pb2.Duration, value: Any, field: str) -> None:
    """A Docker duration (integer nanoseconds) into `d`; 400 naming `field` when it is not one."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise APIError(400, f"{field} must be a non-negative integer of nanoseconds, got {value!r}")
    d.FromNanoseconds(value)


def meta(obj: Any) -> dict[str, Any]:
    """ID, Version, CreatedAt, UpdatedAt of a stored object."""
    return {"ID": obj.id, "Version": {"Index": obj.meta.version}, "CreatedAt": ts(obj.meta.created_at),
            "UpdatedAt": ts(obj.meta.updated_at)}


def labels(m: Mapping[str, str]) -> dict[str, str]:
    return dict(sorted(m.items()))


def want_str(doc: Mapping[str, Any], key: str, where: str) -> str:
    v = doc.get(key) or ""
    if not isinstance(v, str):
        raise APIError(400, f"{where}{key} must be a string, got {v!r}")
    return v


def want_labels(doc: Mapping[str, Any], key: str, where: str) -> dict[str, str]:
    v = doc.get(key) or {}
    if not isinstance(v, dict) or not all(isinstance(k, str) and isinstance(x, str) for k, x in v.items()):
        raise APIError(400, f"{where}{key} must be an object of string values, got {v!r}")
    return v


def query_version(req: Request) -> int:
    """The `?version=` an update names (the object's Version.Index the client read)."""
    raw = req.query.get("version", "")
    try:
        v = int(raw)
    except ValueError:
        raise APIError(400, f"invalid version '{raw}': give the object's Version.Index as ?version=N") from None
    if v < 0:
        raise APIError(400, f"invalid version '{raw}': give the object's Version.Index as ?version=N")
    return v


def label_filter(values: Iterable[str]) -> dict[str, str]:
    """Docker's `label` filter values (`k` or `k=v`) as ListFilters.labels (empty value: present)."""
    out = {}
    for v in values:
        k, _, val = v.partition("=")
        out[k] = val
    return out


async def lookup(kind: str, ref: str, call: Awaitable[T]) -> T:
    """A control API Get (which takes a full id, an exact name or a unique id prefix, as Docker's
    lookups do): its NOT_FOUND, or INVALID_ARGUMENT for an empty or ambiguous ref, become Docker's
    404 `<kind> <ref> not found`."""
    import grpc

    try:
        return await call
    except grpc.aio.AioRpcError as e:
        if e.code() == grpc.StatusCode.NOT_FOUND:
            raise not_found(kind, ref) from None
        if e.code() == grpc.StatusCode.INVALID_ARGUMENT:
            raise APIError(404, f"{kind} {ref} not found: {e.details()}") from None
        raise


NODE_STATES = {types_pb2.NodeStatus.UNKNOWN: "unknown", types_pb2.NodeStatus.DOWN: "down",
               types_pb2.NodeStatus.READY: "ready", types_pb2.NodeStatus.DISCONNECTED: "disconnected"}
