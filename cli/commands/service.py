"""`swarmctl service …`: create, update, scale, roll back and remove services, and list and show them.

The flags of create and update and how they become a spec are in `shoal.cli.servicespec`; the wait for
convergence is `shoal.cli.progress`.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from collections.abc import Callable
from typing import Any

from shoal.cli import logs, query, servicespec, units
from shoal.cli import output as out
from shoal.cli.client import Client
from shoal.cli.cmdline import CONN, DEFAULT_WAIT_TIMEOUT, add_group, add_leaf, add_listing_flags
from shoal.cli.errors import CliError, retry_on_conflict
from shoal.cli.flagtypes import TIMEOUT
from shoal.cli.progress import Snapshot, Waiter, measure
from shoal.proto import control_pb2, objects_pb2, specs_pb2, types_pb2


def register(cmds: Any) -> None:
    sub = add_group(cmds, "service", "manage services")
    p = add_leaf(sub, "create", service_create, "create a service")
    servicespec.add_create_flags(p)
    _wait_flags(p, "return at once instead of waiting for convergence")
    p = add_leaf(sub, "update", service_update, "update a service")
    servicespec.add_update_flags(p)
    _wait_flags(p, "return at once instead of waiting for convergence")
    p.add_argument("--rollback", action="store_true", help="roll back to the previous spec")
    p.add_argument("service", metavar="SERVICE")
    p = add_leaf(sub, "ls", service_ls, "list services", aliases=["list"])
    add_listing_flags(p, "name=, name-prefix=, id=, label=", no_trunc=False)
    p = add_leaf(sub, "inspect", service_inspect, "show services in detail")
    p.add_argument("services", nargs="+", metavar="SERVICE")
    p.add_argument("--pretty", action="store_true", help="human-readable output")
    p.add_argument("--format", choices=("json",), default="json")
    for name, func, help_text in (("rm", service_rm, "remove services"),
                                  ("rollback", service_rollback, "roll a service back to its previous spec"),
                                  ("scale", service_scale, "scale replicated services")):
        p = add_leaf(sub, name, func, help_text, aliases=["remove"] if name == "rm" else [])
        if name == "rm":
            p.add_argument("services", nargs="+", metavar="SERVICE")
        elif name == "scale":
            p.add_argument("scales", nargs="+", metavar="SERVICE=REPLICAS")
        else:
            p.add_argument("service", metavar="SERVICE")
        _wait_flags(p, "do not wait", what="")
    logs.register(sub, "service", parents=[CONN])
    p = add_leaf(sub, "ps", service_ps, "list the tasks of services")
    p.add_argument("services", nargs="+", metavar="SERVICE")
    add_listing_flags(p, "desired-state=, node=, id=, name=")


def _wait_flags(p: argparse.ArgumentParser, detach_help: str, what: str = " for convergence") -> None:
    p.add_argument("-d", "--detach", action="store_true", help=detach_help)
    p.add_argument("-q", "--quiet", action="store_true", help="suppress progress output")
    p.add_argument("--timeout", type=TIMEOUT, default=DEFAULT_WAIT_TIMEOUT,
                   help=f"give up waiting{what} after this long (default 5m)")


def waiter(args: argparse.Namespace, c: Client) -> Waiter | None:
    """The progress wait a command's flags ask for: None with --detach, silent with --quiet."""
    if getattr(args, "detach", False):
        return None
    sink = open(os.devnull, "w") if getattr(args, "quiet", False) else sys.stdout  # noqa: SIM115
    return Waiter(c, out=sink, timeout=args.timeout)


def service_create(c: Client, args: argparse.Namespace) -> None:
    spec = servicespec.create_spec(args)
    svc = c.call("CreateService", control_pb2.CreateServiceRequest(spec=spec)).service
    print(svc.id)
    w = waiter(args, c)
    if w is not None:
        w.converge(svc.id, svc.spec.annotations.name)


def _network_id(c: Client, ref: str) -> str:
    try:
        return query.get(c, "network", ref).id
    except CliError:
        return ref


def _update_request(c: Client, ref: str, change: Callable[[specs_pb2.ServiceSpec], None],
                    rollback: bool = False) -> objects_pb2.Service:
    def once() -> objects_pb2.Service:
        svc = query.get(c, "service", ref)
        spec = specs_pb2.ServiceSpec()
        spec.CopyFrom(svc.spec)
        change(spec)
        req = control_pb2.UpdateServiceRequest(service_id=svc.id, service_version=svc.meta.version, spec=spec)
        if rollback:
            req.rollback = control_pb2.UpdateServiceRequest.PREVIOUS
        return c.call("UpdateService", req).service

    return retry_on_conflict(once)


def service_update(c: Client, args: argparse.Namespace) -> None:
    def change(spec: specs_pb2.ServiceSpec) -> None:
        servicespec.update_spec(spec, args, network_id=lambda ref: _network_id(c, ref))

    svc = _update_request(c, args.service, change, rollback=args.rollback)
    print(args.service)
    w = waiter(args, c)
    if w is not None:
        w.converge(svc.id, svc.spec.annotations.name)


def service_rollback(c: Client, args: argparse.Namespace) -> None:
    svc = _update_request(c, args.service, lambda spec: None, rollback=True)
    print(args.service)
    w = waiter(args, c)
    if w is not None:
        w.converge(svc.id, svc.spec.annotations.name)


def service_scale(c: Client, args: argparse.Namespace) -> None:
    targets = []
    for item in args.scales:
        name, eq, n = item.rpartition("=")
        if not eq or not name:
            raise CliError(f"invalid scale specifier {item!r}: use SERVICE=REPLICAS")
        try:
            targets.append((name, units.parse_uint(n, "replicas")))
        except ValueError as e:
            raise CliError(str(e)) from None
    done = []
    for name, n in targets:
        def change(spec: specs_pb2.ServiceSpec, n: int = n, name: str = name) -> None:
            if spec.WhichOneof("mode") != "replicated":
                raise CliError(f"service {name} is not in replicated mode: only replicated services can be scaled")
            spec.replicated.replicas = n

        svc = _update_request(c, name, change)
        print(f"{name} scaled to {n}")
        done.append(svc)
    w = waiter(args, c)
    if w is not None:
        for svc in done:
            w.converge(svc.id, svc.spec.annotations.name)


def service_rm(c: Client, args: argparse.Namespace) -> None:
    removed = []
    errors = []
    for ref in args.services:
        try:
            svc = query.get(c, "service", ref)
            c.call("RemoveService", control_pb2.RemoveServiceRequest(service_id=svc.id))
        except CliError as e:
            errors.append(str(e))
            continue
        print(ref)
        removed.append(svc)
    w = waiter(args, c)
    if w is not None:
        for svc in removed:
            w.removed(svc.id, svc.spec.annotations.name)
    if errors:
        raise CliError("; ".join(errors))


def _mode(svc: objects_pb2.Service) -> str:
    return "global" if svc.spec.WhichOneof("mode") == "global" else "replicated"


def service_ls(c: Client, args: argparse.Namespace) -> None:
    services = query.list_objects(c, "service", query.list_filters(args.filter, "service"))
    if args.format == "json" or args.quiet:
        query.print_list(args, services, [], lambda s: [])
        return
    tasks = query.list_objects(c, "task") if services else []
    nodes = query.list_objects(c, "node") if services else []
    by_service: dict[str, list[objects_pb2.Task]] = {}
    for t in tasks:
        by_service.setdefault(t.service_id, []).append(t)

    def row(s: objects_pb2.Service) -> list[str]:
        prog = measure(s, Snapshot(s, by_service.get(s.id, []), nodes))
        desired = prog.desired if _mode(s) == "global" else s.spec.replicated.replicas
        replicas = f"{prog.running}/{desired}"
        if s.spec.task.placement.max_replicas:
            replicas += f" (max {s.spec.task.placement.max_replicas} per node)"
        ports = s.endpoint.ports or s.spec.endpoint.ports
        image = s.spec.task.container.image.split("@")[0]
        return [s.id[:12], s.spec.annotations.name, _mode(s), replicas, image,
                ", ".join(units.format_port(p) for p in ports if p.publish_mode == types_pb2.PortConfig.INGRESS)]

    out.print_table(["ID", "NAME", "MODE", "REPLICAS", "IMAGE", "PORTS"], [row(s) for s in services])


def _service_pretty(s: objects_pb2.Service) -> None:
    spec = s.spec
    cs = spec.task.container
    print(f"ID:\t\t{s.id}\nName:\t\t{spec.annotations.name}")
    if spec.annotations.labels:
        print("Labels:")
        for k, v in sorted(spec.annotations.labels.items()):
            print(f" {k}={v}")
    print("Service Mode:\t" + ("Global" if _mode(s) == "global" else f"Replicated\n Replicas:\t{spec.replicated.replicas}"))
    if s.update_status.state:
        print(f"UpdateStatus:\n State:\t\t{types_pb2.UpdateStatus.State.Name(s.update_status.state).lower()}")
        print(f" Message:\t{s.update_status.message}")
    if spec.task.placement.constraints:
        print(f"Placement:\n Constraints:\t{list(spec.task.placement.constraints)}")
    print(f"ContainerSpec:\n Image:\t\t{cs.image}")
    if cs.command:
        print(f" Command:\t{shlex.join(cs.command)}")
    if cs.args:
        print(f" Args:\t\t{shlex.join(cs.args)}")
    if cs.env:
        print(" Env:\t\t" + " ".join(cs.env))
    r = spec.task.resources
    if r.limits.nano_cpus or r.limits.memory_bytes:
        print("Resources:\n Limits:")
        if r.limits.nano_cpus:
            print(f"  CPU:\t\t{r.limits.nano_cpus / 1e9:g}")
        if r.limits.memory_bytes:
            print(f"  Memory:\t{units.format_bytes(r.limits.memory_bytes)}")
    if spec.task.networks:
        print("Networks:\t" + " ".join(n.target for n in spec.task.networks))
    print(f"Endpoint Mode:\t{types_pb2.EndpointSpec.ResolutionMode.Name(spec.endpoint.mode).lower()}")
    ports = s.endpoint.ports or spec.endpoint.ports
    if ports:
        print("Ports:")
        for p in ports:
            print(f" PublishedPort = {p.published_port}\n  Protocol = "
                  f"{types_pb2.PortConfig.Protocol.Name(p.protocol).lower()}\n  TargetPort = {p.target_port}\n"
                  f"  PublishMode = {types_pb2.PortConfig.PublishMode.Name(p.publish_mode).lower()}")


def service_inspect(c: Client, args: argparse.Namespace) -> None:
    query.inspect(args, c, "service", args.services, _service_pretty)


def service_ps(c: Client, args: argparse.Namespace) -> None:
    tasks: list[objects_pb2.Task] = []
    for ref in args.services:
        svc = query.get(c, "service", ref)
        f = query.list_filters(args.filter, "task")
        f.service_ids.append(svc.id)
        tasks += query.list_objects(c, "task", f)
    query.print_tasks(c, args, tasks)


