"""`swarmctl events`: follow what changes in the cluster, one line per event (like `docker events`)."""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

import grpc
from google.protobuf import json_format

from shoal.cli.cmdline import CONN
from shoal.cli.errors import CliError
from shoal.proto import types_pb2, watch_pb2, watch_pb2_grpc

KINDS = ("node", "service", "task", "network", "secret", "config", "cluster")
ACTIONS = {watch_pb2.WatchEvent.CREATE: "create", watch_pb2.WatchEvent.UPDATE: "update",
           watch_pb2.WatchEvent.DELETE: "remove"}


def register(subparsers: Any) -> Any:
    p = subparsers.add_parser("events", help="follow changes in the cluster, one line per event", parents=[CONN])
    p.add_argument("--kind", action="append", choices=KINDS, default=[],
                   help="only objects of this kind (repeatable; default: all)")
    p.add_argument("--format", choices=("table", "json"), default="table")
    p.add_argument("--count", type=int, default=0, help="stop after this many events (default: follow)")
    p.set_defaults(func=events)
    return p


def _name(kind: str, obj: Any) -> str:
    if kind == "task":
        return obj.annotations.name
    if kind == "node":
        return obj.description.hostname or obj.spec.annotations.name
    return obj.spec.annotations.name


def describe(ev: watch_pb2.WatchEvent) -> str:
    kind = ev.object.WhichOneof("object") or "?"
    obj = getattr(ev.object, kind)
    extra = ""
    if kind == "task":
        extra = f" state={types_pb2.TaskState.Name(obj.status.state).lower()}"
        if obj.node_id:
            extra += f" node={obj.node_id[:12]}"
    elif kind == "node":
        extra = f" status={types_pb2.NodeStatus.State.Name(obj.status.state).lower()}"
    return f"{kind} {ACTIONS.get(ev.action, '?')} {obj.id[:12]} ({_name(kind, obj)}){extra}"


def events(client: Any, args: argparse.Namespace) -> None:
    stub = watch_pb2_grpc.WatchStub(client.channel)
    seen = 0
    try:
        for msg in stub.Watch(watch_pb2.WatchRequest(kinds=args.kind)):
            for ev in msg.events:
                if args.format == "json":
                    print(json.dumps(json_format.MessageToDict(ev, preserving_proto_field_name=True)), flush=True)
                else:
                    print(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} {describe(ev)}", flush=True)
                seen += 1
                if args.count and seen >= args.count:
                    return
    except grpc.RpcError as e:
        raise CliError(e.details() or str(e.code())) from None
    except KeyboardInterrupt:
        sys.stdout.flush()
