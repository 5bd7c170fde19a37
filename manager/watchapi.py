"""The Watch API: committed store events as a stream (proto/watch.proto), for `swarmctl events`
and for programs that follow the cluster (like `docker events`). Answered from the local replica of
whichever manager the client talks to; workers' certificates are refused. Secret data and the
cluster's keys are never sent, nor the IPsec keys of encrypted networks."""

from __future__ import annotations

import logging
from typing import Any

import grpc

from shoal.manager import ca
from shoal.manager.keymanager import strip_keys
from shoal.manager.store import KINDS, Store
from shoal.proto import types_pb2, watch_pb2

log = logging.getLogger("shoal.watchapi")


def redact(ev: watch_pb2.WatchEvent) -> watch_pb2.WatchEvent:
    """The event without secret data, the CA key, the cluster's keys (unlock key included) or networks'
    IPsec keys."""
    for obj in (ev.object, ev.old_object):
        kind = obj.WhichOneof("object")
        if kind == "secret":
            obj.secret.spec.ClearField("data")
        elif kind == "cluster":
            obj.cluster.root_ca.ClearField("ca_key")
            obj.cluster.ClearField("network_bootstrap_keys")
            obj.cluster.ClearField("unlock_key")
        elif kind in ("network", "task", "node"):
            strip_keys(getattr(obj, kind))
    return ev


class WatchServicer:
    def __init__(self, store: Store, manager: Any = None) -> None:
        self.store = store

    async def Watch(self, request: watch_pb2.WatchRequest, context: Any):  # noqa: N802
        ident = ca.peer_identity(context)
        if ident is not None and ident.role != types_pb2.MANAGER:
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, "only managers and the local socket may watch the store")
        bad = [k for k in request.kinds if k not in KINDS]
        if bad:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"kinds: unknown kind {bad[0]!r}; use {', '.join(KINDS)}")
        with self.store.watch(request.kinds) as w:
            async for msg in w.messages():
                out = watch_pb2.WatchMessage(version=msg.version)
                for ev in msg.events:
                    e = out.events.add()
                    e.action = ev.action
                    e.object.CopyFrom(ev.object)
                    if request.include_old_object:
                        e.old_object.CopyFrom(ev.old_object)
                    redact(e)
                yield out
