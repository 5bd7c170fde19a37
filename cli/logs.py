"""`swarmctl service logs NAME` and `swarmctl task logs ID`: container logs streamed from the agents
through the manager's log broker, printed like `docker service logs`:

    web.1.k2j4h5g6f7d8@node-1    | hello
    2026-11-24T07:45:48.424051000Z web.2.a8s7d6f5g4h3@node-2    | hello     (with --timestamps)

Wiring (in swarmctl's parser): `logs.register(service_subparsers, "service", parents=[CONN])` and
`logs.register(task_subparsers, "task", parents=[CONN])`; the handlers take `(client, args)` where
`client.channel` is the gRPC channel to the manager and `client.call(method, request)` the Control API.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from datetime import UTC
from typing import Any

import grpc

from shoal.proto import control_pb2, logs_pb2, logs_pb2_grpc

UNAVAILABLE_NODES_KEY = "shoal-logs-unavailable-nodes"


def register(subparsers: Any, kind: str = "service", parents: Sequence[argparse.ArgumentParser] = ()) -> Any:
    """Add `logs` to the `service` or `task` command group; returns the new parser."""
    if kind not in ("service", "task"):
        raise ValueError(f"kind must be 'service' or 'task', not {kind!r}")
    what = "a service's tasks" if kind == "service" else "tasks"
    p = subparsers.add_parser("logs", help=f"fetch the logs of {what}", parents=list(parents))
    p.add_argument("refs", nargs="+", metavar=kind.upper(), help=f"{kind} name or id (or id prefix)")
    p.add_argument("-f", "--follow", action="store_true", help="follow log output")
    p.add_argument(
        "-n", "--tail", default="all", help='lines to show from the end of each task\'s log ("all")'
    )
    p.add_argument("-t", "--timestamps", action="store_true", help="show timestamps")
    p.add_argument("--no-trunc", action="store_true", help="do not truncate task ids")
    p.add_argument("--no-task-ids", action="store_true", help="do not include task ids in the prefix")
    p.add_argument("--raw", action="store_true", help="print only the log lines, without the prefix")
    p.set_defaults(func=service_logs if kind == "service" else task_logs, logs_kind=kind)
    return p


def _tail(text: str) -> int:
    if text == "all":
        return -1
    try:
        n = int(text)
    except ValueError:
        n = -2
    if n < 0:
        raise _cli_error(f"--tail {text!r} is not a number of lines: give a whole number ≥ 0 or 'all'")
    return n


def _cli_error(msg: str) -> Exception:
    from shoal.cli.client import CliError

    return CliError(msg)


def service_logs(client: Any, args: argparse.Namespace) -> None:
    sel = logs_pb2.LogSelector()
    for ref in args.refs:
        sel.service_ids.append(_resolve(client, "Service", ref))
    _stream(client, args, sel)


def task_logs(client: Any, args: argparse.Namespace) -> None:
    sel = logs_pb2.LogSelector()
    for ref in args.refs:
        sel.task_ids.append(_resolve(client, "Task", ref))
    _stream(client, args, sel)


def _resolve(client: Any, kind: str, ref: str) -> str:
    req = getattr(control_pb2, f"Get{kind}Request")(**{f"{kind.lower()}_id": ref})
    resp = client.call(f"Get{kind}", req)
    return getattr(resp, kind.lower()).id


class _Names:
    """Task and node names for the prefix, fetched once each through the Control API."""

    def __init__(self, client: Any, no_trunc: bool, no_task_ids: bool) -> None:
        self.client = client
        self.no_trunc = no_trunc
        self.no_task_ids = no_task_ids
        self._tasks: dict[str, str] = {}
        self._nodes: dict[str, str] = {}

    def node(self, node_id: str) -> str:
        if node_id not in self._nodes:
            name = node_id
            try:
                n = self.client.call("GetNode", control_pb2.GetNodeRequest(node_id=node_id)).node
                name = n.spec.annotations.name or n.description.hostname or node_id
            except Exception:  # the node may have been removed: show its id
                pass
            self._nodes[node_id] = name
        return self._nodes[node_id]

    def task(self, task_id: str) -> str:
        if task_id not in self._tasks:
            name = task_id
            try:
                t = self.client.call("GetTask", control_pb2.GetTaskRequest(task_id=task_id)).task
                svc = t.service_annotations.name or t.service_id
                base = f"{svc}.{t.slot}" if t.slot else f"{svc}.{t.node_id}"
                if not self.no_task_ids:
                    base += "." + (t.id if self.no_trunc else t.id[:12])
                name = base
            except Exception:
                pass
            self._tasks[task_id] = name
        return self._tasks[task_id]


def format_line(prefix: str, msg: logs_pb2.LogMessage, timestamps: bool, width: int) -> str:
    text = msg.data.decode("utf-8", "replace")
    head = f"{prefix.ljust(width)}    | " if prefix else ""
    if timestamps:
        ts = msg.timestamp.ToDatetime().replace(tzinfo=UTC)
        stamp = ts.strftime("%Y-%m-%dT%H:%M:%S.") + f"{msg.timestamp.nanos:09d}Z"
        head = f"{stamp} {head}"
    return head + text


def _stream(client: Any, args: argparse.Namespace, sel: logs_pb2.LogSelector) -> None:
    opts = logs_pb2.LogSubscriptionOptions(follow=args.follow, tail=_tail(args.tail))
    names = _Names(client, args.no_trunc, args.no_task_ids)
    stub = logs_pb2_grpc.LogsStub(client.channel)
    call = stub.SubscribeLogs(logs_pb2.SubscribeLogsRequest(selector=sel, options=opts))
    width = 0
    try:
        for batch in call:
            for m in batch.messages:
                prefix = (
                    "" if args.raw else f"{names.task(m.context.task_id)}@{names.node(m.context.node_id)}"
                )
                width = max(width, len(prefix))
                out = sys.stderr if m.stream == logs_pb2.LogMessage.STDERR else sys.stdout
                out.write(format_line(prefix, m, args.timestamps, width) + "\n")
            sys.stdout.flush()
    except grpc.RpcError as e:
        if e.code() == grpc.StatusCode.CANCELLED:
            return
        raise _cli_error(
            client._message(e, client.timeout) if hasattr(client, "_message") else e.details()
        ) from None
    except KeyboardInterrupt:
        call.cancel()
        return
    md = dict(call.trailing_metadata() or ())
    if md.get(UNAVAILABLE_NODES_KEY):
        nodes = [names.node(n) for n in md[UNAVAILABLE_NODES_KEY].split(",") if n]
        sys.stderr.write(
            f"warning: logs of nodes {', '.join(nodes)} are missing: those nodes are not connected\n"
        )
