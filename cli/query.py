"""Reading the cluster for swarmctl's commands: get, list and filter objects, print them (and remove them by reference).

Shared by every command module and by `stack` (public names: they are this module's contract).
Objects come back as the generated protobuf messages; errors are CliError sentences.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from typing import Any

from shoal.cli import output as out
from shoal.cli import units
from shoal.cli.client import Client
from shoal.cli.errors import CliError
from shoal.proto import control_pb2, objects_pb2, types_pb2

TASK_HEADERS = ["ID", "NAME", "IMAGE", "NODE", "DESIRED STATE", "CURRENT STATE", "ERROR", "PORTS"]


def info(c: Client) -> control_pb2.InfoResponse:
    return c.call("Info", control_pb2.InfoRequest())


def node_ref(c: Client, ref: str) -> str:
    """A node reference with `self` replaced by this manager's node id."""
    if ref == "self":
        node_id = info(c).node_id
        if not node_id:
            raise CliError("this manager does not know its own node id: name the node by id or hostname")
        return node_id
    return ref


def get(c: Client, kind: str, ref: str) -> Any:
    """One object of `kind` (node, service, task, network, secret, config) by id, id prefix or name."""
    title = kind.capitalize()
    req = getattr(control_pb2, f"Get{title}Request")(**{f"{kind}_id": ref})
    return getattr(c.call(f"Get{title}", req), kind)


def list_objects(c: Client, kind: str, filters: control_pb2.ListFilters | None = None) -> list[Any]:
    """All objects of `kind` that pass `filters`."""
    plural = kind + "s"
    title = plural.capitalize()
    req = getattr(control_pb2, f"List{title}Request")(filters=filters)
    return list(getattr(c.call(f"List{title}", req), plural))


def list_filters(items: Sequence[str] | None, kind: str) -> control_pb2.ListFilters:
    """`--filter KEY=VALUE` flags as the control API's ListFilters; a key `kind` has not is a CliError."""
    f = control_pb2.ListFilters()
    for item in items or ():
        key, eq, value = item.partition("=")
        if not eq:
            raise CliError(f"filter {item!r} is not KEY=VALUE: use e.g. --filter name=web")
        key = key.lower()
        if key == "name":
            f.names.append(value)
        elif key in ("name-prefix", "name_prefix"):
            f.name_prefixes.append(value)
        elif key == "id":
            f.id_prefixes.append(value)
        elif key == "label":
            k, _, v = value.partition("=")
            f.labels[k] = v
        elif key == "service" and kind == "task":
            f.service_ids.append(value)
        elif key == "node" and kind == "task":
            f.node_ids.append(value)
        elif key in ("desired-state", "desired_state") and kind == "task":
            try:
                f.desired_states.append(types_pb2.TaskState.Value(value.upper()))
            except ValueError:
                raise CliError(f"desired-state {value!r} is not a task state: use e.g. running, shutdown") from None
        elif key == "role" and kind == "node":
            if value.lower() not in ("manager", "worker"):
                raise CliError(f"role {value!r} is not a node role: use manager or worker")
            f.roles.append(types_pb2.NodeRole.Value(value.upper()))
        else:
            raise CliError(f"unknown {kind} filter {key!r}: use name, name-prefix, id or label"
                           + (", service, node or desired-state" if kind == "task" else "")
                           + (" or role" if kind == "node" else ""))
    return f


def print_list(args: argparse.Namespace, objs: Sequence[Any], headers: Sequence[str],
               row: Callable[[Any], Sequence[str]]) -> None:
    """A listing as `--format json`, `--quiet` ids, or a table of `row(obj)`."""
    if getattr(args, "format", "table") == "json":
        out.print_json(objs)
    elif getattr(args, "quiet", False):
        for o in objs:
            print(o.id)
    else:
        out.print_table(headers, [row(o) for o in objs])


def inspect(args: argparse.Namespace, c: Client, kind: str, refs: Sequence[str],
            pretty: Callable[[Any], None] | None = None, redact: Callable[[Any], None] | None = None) -> None:
    """`KIND inspect`: the objects as JSON, or `pretty(obj)` each with `--pretty`; `redact(obj)` first
    clears what must never be printed."""
    objs = [get(c, kind, node_ref(c, r) if kind == "node" else r) for r in refs]
    if redact is not None:
        for o in objs:
            redact(o)
    if pretty is not None and getattr(args, "pretty", False):
        for i, o in enumerate(objs):
            if i:
                print()
            pretty(o)
    else:
        out.print_json(objs)


def task_rows(c: Client, tasks: list[objects_pb2.Task], no_trunc: bool) -> list[list[str]]:
    """docker's `service ps` rows: a slot's newest task first, its older ones below as ` \\_ name`."""
    nodes = {n.id: n for n in list_objects(c, "node")} if tasks else {}
    services: dict[str, str] = {}
    for t in tasks:
        if t.service_id not in services:
            services[t.service_id] = t.service_annotations.name or t.service_id[:12]

    def group(t: objects_pb2.Task) -> tuple[str, Any]:
        return (t.service_id, t.slot if t.slot else t.node_id)

    tasks = sorted(tasks, key=lambda t: (services[t.service_id], group(t)[1],
                                         -t.meta.created_at.ToNanoseconds()))
    rows = []
    prev = None
    for t in tasks:
        base = f"{services[t.service_id]}.{t.slot if t.slot else t.node_id}"
        name = base if group(t) != prev else f" \\_ {base}"
        prev = group(t)
        node = nodes.get(t.node_id)
        state = out.state_name(t.status.state)
        when = out.ago(t.status.timestamp) or out.ago(t.meta.updated_at)
        ports = ", ".join(units.format_port(p) for p in t.status.port_status.ports)
        # Like docker: the error, or why a task waits (e.g. "no suitable node (...)") while it is pending.
        why = t.status.err or (t.status.message if t.status.state == types_pb2.PENDING
                               and t.status.message.startswith("no suitable node") else "")
        err = f'"{out.truncate(why, 30, no_trunc)}"' if why else ""
        rows.append([out.short_id(t.id, no_trunc), name, t.spec.container.image.split("@")[0],
                     node.description.hostname if node else "", out.state_name(t.desired_state),
                     f"{state} {when}".strip(), err, ports])
    return rows


def print_tasks(c: Client, args: argparse.Namespace, tasks: list[objects_pb2.Task]) -> None:
    """A task listing (`service ps`, `node ps`, `task ls`, `stack ps`) in the format `args` asks for."""
    if args.format == "json" or args.quiet:
        print_list(args, tasks, [], lambda t: [])
    else:
        out.print_table(TASK_HEADERS, task_rows(c, tasks, args.no_trunc))


def remove_each(c: Client, kind: str, refs: Sequence[str]) -> None:
    """`KIND rm REF…`: remove each (printing its ref), then one CliError naming every failure."""
    title = kind.capitalize()
    errors = []
    for ref in refs:
        try:
            c.call(f"Remove{title}", getattr(control_pb2, f"Remove{title}Request")(**{f"{kind}_id": ref}))
            print(ref)
        except CliError as e:
            errors.append(str(e))
    if errors:
        raise CliError("; ".join(errors))
