"""`swarmctl node …`: list, show, update, promote/demote, drain/activate/pause and remove nodes, and their tasks."""

from __future__ import annotations

import argparse
import base64
import time
from collections.abc import Callable
from typing import Any

from google.protobuf.timestamp_pb2 import Timestamp

from shoal.cli import query, units
from shoal.cli.client import Client
from shoal.cli.cmdline import add_group, add_leaf, add_listing_flags
from shoal.cli.errors import CliError, retry_on_conflict
from shoal.cli.flagtypes import parse_labels
from shoal.compose.units import format_duration
from shoal.proto import control_pb2, objects_pb2, specs_pb2, types_pb2


def register(cmds: Any) -> None:
    sub = add_group(cmds, "node", "manage nodes")
    p = add_leaf(sub, "ls", node_ls, "list nodes", aliases=["list"])
    add_listing_flags(p, "name=, id=, label=, role=manager|worker", no_trunc=False)
    p = add_leaf(sub, "inspect", node_inspect, "show nodes in detail")
    p.add_argument("nodes", nargs="+", metavar="NODE", help="id, id prefix, hostname or self")
    p.add_argument("--pretty", action="store_true", help="human-readable output")
    p.add_argument("--format", choices=("json",), default="json")
    p = add_leaf(sub, "update", node_update, "update a node")
    p.add_argument("node", metavar="NODE")
    p.add_argument("--availability", choices=("active", "pause", "drain"))
    p.add_argument("--role", choices=("worker", "manager"))
    p.add_argument("--label-add", action="append", help="add a node label KEY=VALUE")
    p.add_argument("--label-rm", action="append", help="remove a node label")
    for name, attr, value, msg in (
        ("promote", "desired_role", types_pb2.MANAGER, "Node {} promoted to a manager in the swarm."),
        ("demote", "desired_role", types_pb2.WORKER, "Manager {} demoted in the swarm."),
        ("drain", "availability", types_pb2.DRAIN, "{}"),
        ("activate", "availability", types_pb2.ACTIVE, "{}"),
        ("pause", "availability", types_pb2.PAUSE, "{}"),
    ):
        p = add_leaf(sub, name, _node_set(attr, value, msg), f"{name} nodes")
        p.add_argument("nodes", nargs="+", metavar="NODE")
    p = add_leaf(sub, "ps", node_ps, "list the tasks on nodes (default: this node)")
    p.add_argument("nodes", nargs="*", metavar="NODE")
    add_listing_flags(p, "desired-state=, service=, id=, name=")
    p = add_leaf(sub, "rm", node_rm, "remove nodes from the swarm", aliases=["remove"])
    p.add_argument("nodes", nargs="+", metavar="NODE")
    p.add_argument("-f", "--force", action="store_true", help="remove a node that is not down")


def _manager_status(n: objects_pb2.Node) -> str:
    if n.role != types_pb2.MANAGER and not n.HasField("manager_status"):
        return ""
    if n.manager_status.leader:
        return "Leader"
    r = n.manager_status.reachability
    return {types_pb2.ManagerStatus.REACHABLE: "Reachable",
            types_pb2.ManagerStatus.UNREACHABLE: "Unreachable"}.get(r, "Unknown")


def node_ls(c: Client, args: argparse.Namespace) -> None:
    nodes = query.list_objects(c, "node", query.list_filters(args.filter, "node"))
    self_id = ""
    if args.format == "table" and not args.quiet:
        try:
            self_id = query.info(c).node_id
        except CliError:
            pass

    def row(n: objects_pb2.Node) -> list[str]:
        return [n.id + (" *" if n.id == self_id else ""), n.description.hostname,
                types_pb2.NodeStatus.State.Name(n.status.state).capitalize(),
                types_pb2.NodeAvailability.Name(n.spec.availability).capitalize(), _manager_status(n),
                n.description.engine.engine_version]

    query.print_list(args, nodes, ["ID", "HOSTNAME", "STATUS", "AVAILABILITY", "MANAGER STATUS", "ENGINE VERSION"], row)


def _node_pretty(n: objects_pb2.Node) -> None:
    d = n.description
    print(f"ID:\t\t\t{n.id}\nHostname:\t\t{d.hostname}\nJoined at:\t\t{n.meta.created_at.ToJsonString()}")
    print(f"Status:\n State:\t\t\t{types_pb2.NodeStatus.State.Name(n.status.state).capitalize()}")
    print(f" Availability:\t\t{types_pb2.NodeAvailability.Name(n.spec.availability).capitalize()}")
    print(f" Address:\t\t{n.status.addr or d.addr}")
    if n.role == types_pb2.MANAGER:
        print(f"Manager Status:\n Address:\t\t{n.manager_status.addr}\n Raft Status:\t\t{_manager_status(n)}")
        print(f" Leader:\t\t{'Yes' if n.manager_status.leader else 'No'}")
    if n.spec.annotations.labels:
        print("Labels:")
        for k, v in sorted(n.spec.annotations.labels.items()):
            print(f" - {k}={v}")
    print(f"Platform:\n Operating System:\t{d.platform.os}\n Architecture:\t\t{d.platform.architecture}")
    print(f"Resources:\n CPUs:\t\t\t{d.resources.nano_cpus / 1e9:g}\n Memory:\t\t"
          f"{units.format_bytes(d.resources.memory_bytes)}")
    print(f"Engine Version:\t\t{d.engine.engine_version}")
    if d.capabilities:
        print(f"Capabilities:\t\t{', '.join(d.capabilities)}")
    if n.HasField("tls_info"):
        t = n.tls_info
        print(f"TLS Info:\n Issuer Subject:\t{t.cert_issuer_subject}\n"
              f" Issuer Public Key:\t{base64.b64encode(t.cert_issuer_public_key).decode()}")
        print(f" Certificate Expiry:\t{t.cert_not_after.ToJsonString()} ({_until(t.cert_not_after)})")


def _until(ts: Timestamp) -> str:
    left = ts.ToNanoseconds() - time.time_ns()
    return f"in {format_duration(left // 10**9 * 10**9)}" if left > 0 else \
        f"expired {format_duration(-left // 10**9 * 10**9)} ago"


def node_inspect(c: Client, args: argparse.Namespace) -> None:
    query.inspect(args, c, "node", args.nodes, _node_pretty)



def _update_node(c: Client, ref: str, change: Callable[[specs_pb2.NodeSpec], None]) -> objects_pb2.Node:
    def once() -> objects_pb2.Node:
        node = query.get(c, "node", query.node_ref(c, ref))
        spec = specs_pb2.NodeSpec()
        spec.CopyFrom(node.spec)
        change(spec)
        return c.call("UpdateNode", control_pb2.UpdateNodeRequest(
            node_id=node.id, node_version=node.meta.version, spec=spec)).node

    return retry_on_conflict(once)


def node_update(c: Client, args: argparse.Namespace) -> None:
    def change(spec: specs_pb2.NodeSpec) -> None:
        if args.availability:
            spec.availability = types_pb2.NodeAvailability.Value(args.availability.upper())
        if args.role:
            spec.desired_role = types_pb2.NodeRole.Value(args.role.upper())
        spec.annotations.labels.update(parse_labels(args.label_add))
        for k in args.label_rm or ():
            if k not in spec.annotations.labels:
                raise CliError(f"node has no label {k!r} to remove")
            del spec.annotations.labels[k]

    _update_node(c, args.node, change)
    print(args.node)


def _node_set(attr: str, value: int, message: str) -> Callable[[Client, argparse.Namespace], None]:
    def cmd(c: Client, args: argparse.Namespace) -> None:
        for ref in args.nodes:
            _update_node(c, ref, lambda spec: setattr(spec, attr, value))
            print(message.format(ref))

    return cmd


def node_rm(c: Client, args: argparse.Namespace) -> None:
    for ref in args.nodes:
        c.call("RemoveNode", control_pb2.RemoveNodeRequest(node_id=query.node_ref(c, ref), force=args.force))
        print(ref)



def node_ps(c: Client, args: argparse.Namespace) -> None:
    tasks: list[objects_pb2.Task] = []
    for ref in args.nodes or ["self"]:
        node = query.get(c, "node", query.node_ref(c, ref))
        f = query.list_filters(args.filter, "task")
        f.node_ids.append(node.id)
        tasks += query.list_objects(c, "task", f)
    query.print_tasks(c, args, tasks)


