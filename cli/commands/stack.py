"""`swarmctl stack …`: applications described in compose files, deployed as stacks (like `docker stack`).

    swarmctl stack deploy -c stack.yml [-c override.yml] [--env-file F] [--prune] [-d] NAME
    swarmctl stack ls | services NAME | ps NAME | rm NAME…

Wiring: `register(cmds)` adds the `stack` group to swarmctl's root subparsers; the handlers take
`(client, args)` like every command's.

A deploy loads, converts and plans the whole stack with `shoal.compose` and checks everything it
can (the file, external networks/secrets/configs, names taken by other stacks, published ports
held by services outside the stack, mode changes) before its first write; then it creates
networks, secrets and configs, removes pruned services, and creates or updates services (each
update carries the version the plan read). A server error mid-way names what was done and what
was not. A swarm secret's data cannot be read back, so the stack labels the secrets it creates
with the SHA-256 of their data (`SECRET_DIGEST_LABEL`) to tell an edited secret file from an
unchanged one; API users can mount and read any secret anyway, so the digest reveals nothing new.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import ipaddress
import json
import logging
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from shoal.cli import query, servicespec
from shoal.cli.client import Client
from shoal.cli.cmdline import DEFAULT_WAIT_TIMEOUT, add_group, add_leaf, add_listing_flags
from shoal.cli.commands.service import service_ls
from shoal.cli.errors import CliError
from shoal.cli.flagtypes import TIMEOUT
from shoal.cli.output import print_table
from shoal.cli.progress import Waiter
from shoal.compose import LABEL_NAMESPACE, ComposeError, ComposeSource, StackSpec, convert, load, plan
from shoal.compose import Plan as StackPlan
from shoal.proto import control_pb2, objects_pb2, specs_pb2, types_pb2

log = logging.getLogger(__name__)

SECRET_DIGEST_LABEL = "com.shoal.stack.secret-sha256"
DEFAULT_ADDRESS_POOL = "10.0.0.0/8"  # the swarm's default, as Docker's


# ---- parser --------------------------------------------------------------------------------------
def register(subparsers: Any) -> None:
    """Add the `stack` command group to swarmctl's root subparsers."""
    sub = add_group(subparsers, "stack", "deploy and manage stacks from compose files")
    q = add_leaf(sub, "deploy", stack_deploy, "deploy a new stack or update an existing one", aliases=["up"])
    q.add_argument("-c", "--compose-file", "-f", dest="files", action="append", metavar="FILE",
                   help="stack file (- for standard input); repeat to merge overrides, later files win")
    q.add_argument("--env-file", action="append", metavar="FILE",
                   help="variables for interpolation (default: .env beside the first stack file)")
    q.add_argument("--prune", action="store_true", help="remove services that are no longer in the file")
    q.add_argument("-d", "--detach", action="store_true", help="return once the cluster has the stack, do not wait")
    q.add_argument("-q", "--quiet", action="store_true", help="suppress progress output")
    q.add_argument("--timeout", type=TIMEOUT, default=DEFAULT_WAIT_TIMEOUT,
                   help="give up waiting for the services to converge after this long (default 5m)")
    q.add_argument("--with-registry-auth", action="store_true", help="send registry credentials to the agents")
    q.add_argument("stack", metavar="STACK")

    q = add_leaf(sub, "ls", stack_ls, "list stacks", aliases=["list"])
    q.add_argument("--format", choices=("table", "json"), default="table", help="output format")

    q = add_leaf(sub, "services", stack_services, "list the services of a stack")
    q.add_argument("stack", metavar="STACK")
    add_listing_flags(q, "name=, name-prefix=, id=, label=", no_trunc=False)

    q = add_leaf(sub, "ps", stack_ps, "list the tasks of a stack")
    q.add_argument("stack", metavar="STACK")
    add_listing_flags(q, "desired-state=, node=, id=, name=")

    q = add_leaf(sub, "rm", stack_rm, "remove stacks", aliases=["remove", "down"])
    q.add_argument("stacks", nargs="+", metavar="STACK")
    q.add_argument("-d", "--detach", action="store_true", help="do not wait for the services' tasks to stop")
    q.add_argument("-q", "--quiet", action="store_true", help="suppress progress output")
    q.add_argument("--timeout", type=TIMEOUT, default=DEFAULT_WAIT_TIMEOUT,
                   help="give up waiting for tasks to stop after this long (default 5m)")


# ---- reading the cluster -------------------------------------------------------------------------
def _of_stack(stack: str) -> control_pb2.ListFilters:
    return control_pb2.ListFilters(labels={LABEL_NAMESPACE: stack})


def _stack_services(c: Client, stack: str) -> list[objects_pb2.Service]:
    return [s for s in query.list_objects(c, "service", _of_stack(stack))
            if s.spec.annotations.labels.get(LABEL_NAMESPACE) == stack]


def _say(args: argparse.Namespace, line: str) -> None:
    if not getattr(args, "quiet", False):
        print(line, flush=True)


# ---- deploy --------------------------------------------------------------------------------------
def load_stack(files: Sequence[str], env_files: Sequence[str] | None, stack: str) -> StackSpec:
    """Load, merge and convert the stack files (warnings on stderr). Raises CliError on a bad file."""
    sources: list[str | ComposeSource] = []
    for f in files:
        if f == "-":
            sources.append(ComposeSource("-", sys.stdin.read()))
        else:
            sources.append(f)
    try:
        project = load(sources, environment=os.environ, env_files=env_files or None)
        for w in project.warnings:
            print(w, file=sys.stderr)
        spec = convert(project, stack)
    except ComposeError as e:
        raise CliError(str(e)) from None
    for w in spec.warnings:
        print(w, file=sys.stderr)
    return spec


def _secret_digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _prepare_secrets(spec: StackSpec, existing: list[objects_pb2.Secret]) -> None:
    """Label the file's secrets with their digest, and put the file's data into the (redacted) existing
    secrets whose digest matches (or that have none to compare), so that the plan sees only real changes."""
    for s in spec.secrets.values():
        s.annotations.labels[SECRET_DIGEST_LABEL] = _secret_digest(s.data)
    for have in existing:
        want = spec.secrets.get(have.spec.annotations.name)
        if want is None or have.spec.data:
            continue
        digest = have.spec.annotations.labels.get(SECRET_DIGEST_LABEL)
        if digest is None or digest == want.annotations.labels[SECRET_DIGEST_LABEL]:
            have.spec.data = want.data


def _ingress_ports(spec: specs_pb2.ServiceSpec) -> set[tuple[int, int]]:
    return {(p.published_port, p.protocol) for p in spec.endpoint.ports
            if p.published_port and p.publish_mode == types_pb2.PortConfig.INGRESS}


def _precheck(stack: StackSpec, p: StackPlan, services: list[objects_pb2.Service]) -> None:
    """What the control API would refuse half-way through, refused before the first write."""
    for u in p.update_services:
        have = next(s for s in services if s.id == u.service_id)
        old, new = have.spec.WhichOneof("mode") or "replicated", u.spec.WhichOneof("mode") or "replicated"
        if old != new:
            raise CliError(f"service {u.name} cannot change mode from {old} to {new}: remove it (swarmctl service "
                           "rm) and deploy the stack again")
    leaving = {s.id for s in p.remove_services}
    held: dict[tuple[int, int], str] = {}
    for s in services:
        if s.spec.annotations.name in stack.services or s.id in leaving:
            continue
        ports = s.endpoint.ports or s.spec.endpoint.ports
        for p_ in ports:
            if p_.published_port and p_.publish_mode == types_pb2.PortConfig.INGRESS:
                held[(p_.published_port, p_.protocol)] = s.spec.annotations.name
    for name, spec in stack.services.items():
        for key in sorted(_ingress_ports(spec)):
            if key in held:
                proto = types_pb2.PortConfig.Protocol.Name(key[1]).lower()
                raise CliError(f"service {name} publishes port {key[0]}/{proto}, which service {held[key]} already "
                               "publishes: change the published port in the stack file or remove that service")


def _address_pools(c: Client) -> list[ipaddress.IPv4Network]:
    try:
        spec = c.call("GetCluster", control_pb2.GetClusterRequest()).cluster.spec
        pools = list(spec.default_address_pool)
    except CliError:
        pools = []  # a store without a cluster object allocates from the default pool
    out = []
    for p in pools or [DEFAULT_ADDRESS_POOL]:
        with contextlib.suppress(ValueError):
            out.append(ipaddress.IPv4Network(p, strict=False))
    return out


def _check_networks(new: Sequence[specs_pb2.NetworkSpec], existing: Sequence[objects_pb2.Network],
                    pools: Sequence[ipaddress.IPv4Network]) -> None:
    """The IPAM settings the control API checks, for the stack's new networks (and their overlaps)."""
    taken: list[tuple[ipaddress.IPv4Network, str]] = []
    for n in existing:
        for cfg in n.ipam.configs:
            with contextlib.suppress(ValueError):
                taken.append((ipaddress.IPv4Network(cfg.subnet, strict=False), n.spec.annotations.name))
    for spec in new:
        name = spec.annotations.name
        fix = f"; fix the ipam: of network {name} in the stack file"
        if spec.ipam.driver.name and spec.ipam.driver.name != "default":
            raise CliError(f"network {name}: IPAM driver {spec.ipam.driver.name!r} is not supported, only default"
                           + fix)
        if len(spec.ipam.configs) > 1:
            raise CliError(f"network {name} has {len(spec.ipam.configs)} IPAM configs, and a swarm network takes "
                           "one subnet" + fix)
        for cfg in spec.ipam.configs:
            if not cfg.subnet:
                if cfg.gateway or cfg.range:
                    raise CliError(f"network {name}: an IPAM gateway or ip_range needs a subnet" + fix)
                continue
            try:
                subnet = ipaddress.IPv4Network(cfg.subnet, strict=True)
            except ValueError:
                raise CliError(f"network {name}: subnet {cfg.subnet!r} is not an IPv4 network in CIDR form (such "
                               "as 10.1.2.0/24)" + fix) from None
            if subnet.prefixlen > 29:
                raise CliError(f"network {name}: subnet {subnet} is too small, give a /29 or larger" + fix)
            if pools and not any(subnet.subnet_of(p) for p in pools):
                raise CliError(f"network {name}: subnet {subnet} is outside the cluster's address pool "
                               f"({', '.join(map(str, pools))}); choose a subnet inside it or remove the subnet")
            try:
                gw = ipaddress.IPv4Address(cfg.gateway) if cfg.gateway else None
                if gw is not None and (gw not in subnet or gw in (subnet.network_address, subnet.broadcast_address)):
                    raise CliError(f"network {name}: IPAM gateway {cfg.gateway} is not a host address inside subnet "
                                   f"{subnet}" + fix)
                if cfg.range and not ipaddress.IPv4Network(cfg.range, strict=True).subnet_of(subnet):
                    raise CliError(f"network {name}: IPAM ip_range {cfg.range} is not inside subnet {subnet}" + fix)
            except ValueError:
                raise CliError(f"network {name}: IPAM gateway {cfg.gateway!r} or ip_range {cfg.range!r} is not a "
                               "valid IPv4 address or network" + fix) from None
            for other, owner in taken:
                if subnet.overlaps(other):
                    raise CliError(f"network {name}: subnet {subnet} overlaps {other} of network {owner}" + fix)
            taken.append((subnet, name))


def _resolve_refs(spec: specs_pb2.ServiceSpec, ids: dict[str, dict[str, str]]) -> specs_pb2.ServiceSpec:
    out = specs_pb2.ServiceSpec()
    out.CopyFrom(spec)
    for att in out.task.networks:
        att.target = ids["network"].get(att.target, att.target)
    for ref in out.task.container.secrets:
        ref.secret_id = ids["secret"].get(ref.secret_name, "")
    for ref in out.task.container.configs:
        ref.config_id = ids["config"].get(ref.config_name, "")
    return out


class _Steps:
    """What a deploy or rm has done, for the message when a later step fails."""

    def __init__(self) -> None:
        self.done: list[str] = []

    def failed(self, what: str, err: CliError, todo: Sequence[str]) -> CliError:
        msg = f"{what} failed: {err}"
        msg += f"; done before it: {', '.join(self.done)}" if self.done else "; nothing was changed before it"
        if todo:
            msg += f"; not done: {', '.join(todo)}"
        return CliError(msg + "; fix the cause and run the command again")


@dataclass
class Step:
    what: str        # "create network demo_front", also used in messages
    kind: str        # network | secret | config | rm | create | update
    obj: Any         # the spec to create, the Service to remove or the ServiceUpdate


@dataclass
class Deployment:
    """A checked plan of one `stack deploy`, ready to apply."""

    stack: StackSpec
    plan: StackPlan
    steps: list[Step]
    ids: dict[str, dict[str, str]]              # kind -> name -> id of what exists (filled while applying)
    unchanged: dict[str, str] = field(default_factory=dict)   # service name -> id
    notes: list[str] = field(default_factory=list)            # warnings for stderr


def prepare(c: Client, stack: StackSpec, prune: bool = False, registry_auth: bool = False) -> Deployment:
    """Read the cluster, plan the deploy and check everything before any write. Raises CliError."""
    services = query.list_objects(c, "service")
    networks = query.list_objects(c, "network")
    secrets = query.list_objects(c, "secret")
    configs = query.list_objects(c, "config")
    _prepare_secrets(stack, secrets)
    try:
        p = plan(stack, services, networks, secrets, configs, prune=prune)
        p.check_immutable()
    except ComposeError as e:
        raise CliError(str(e)) from None
    _precheck(stack, p, services)
    _check_networks(p.create_networks, networks, _address_pools(c) if p.create_networks else [])
    if registry_auth:
        for spec in p.create_services + [u.spec for u in p.update_services]:
            spec.task.container.pull_options.registry_auth = servicespec.registry_auth(spec.task.container.image)
    d = Deployment(stack=stack, plan=p, steps=[], ids={
        "network": {n.spec.annotations.name: n.id for n in networks},
        "secret": {s.spec.annotations.name: s.id for s in secrets},
        "config": {o.spec.annotations.name: o.id for o in configs},
    })
    for kind, ups in (("secret", p.update_secrets), ("config", p.update_configs)):
        for u in ups:
            d.notes.append(f"Warning: the labels of {kind} {u.name} differ from the stack file; a {kind} cannot be "
                           "changed in place, so it is left as it is")
    # Networks with a fixed subnet first, so that no pool-allocated one takes their subnet.
    for n in sorted(p.create_networks, key=lambda n: not any(cfg.subnet for cfg in n.ipam.configs)):
        d.steps.append(Step(f"create network {n.annotations.name}", "network", n))
    for s in p.create_secrets:
        d.steps.append(Step(f"create secret {s.annotations.name}", "secret", s))
    for o in p.create_configs:
        d.steps.append(Step(f"create config {o.annotations.name}", "config", o))
    for svc in p.remove_services:
        d.steps.append(Step(f"remove service {svc.spec.annotations.name}", "rm", svc))
    for spec in p.create_services:
        d.steps.append(Step(f"create service {spec.annotations.name}", "create", spec))
    for u in p.update_services:
        d.steps.append(Step(f"update service {u.name}", "update", u))
    d.unchanged = {name: next(s.id for s in services if s.spec.annotations.name == name)
                   for name in p.unchanged_services}
    return d


_PAST = {"create": "created", "update": "updated", "remove": "removed"}


def apply(c: Client, d: Deployment, say: Callable[[str], None]) -> list[tuple[str, str, str]]:
    """Make the changes of a prepared deploy, in order; returns what to wait for as (kind, service id, name)
    with kind "converge" or "removed". A failing step raises CliError naming what was and was not done."""
    done = _Steps()
    waits: list[tuple[str, str, str]] = []
    ids = d.ids
    for i, step in enumerate(d.steps):
        kind, obj = step.kind, step.obj
        try:
            if kind == "network":
                say(f"Creating network {obj.annotations.name}")
                net = c.call("CreateNetwork", control_pb2.CreateNetworkRequest(spec=obj)).network
                ids["network"][obj.annotations.name] = net.id
            elif kind in ("secret", "config"):
                say(f"Creating {kind} {obj.annotations.name}")
                title = kind.capitalize()
                made = getattr(c.call(f"Create{title}", getattr(control_pb2, f"Create{title}Request")(spec=obj)), kind)
                ids[kind][obj.annotations.name] = made.id
            elif kind == "rm":
                say(f"Removing service {obj.spec.annotations.name}")
                c.call("RemoveService", control_pb2.RemoveServiceRequest(service_id=obj.id))
                waits.append(("removed", obj.id, obj.spec.annotations.name))
            elif kind == "create":
                say(f"Creating service {obj.annotations.name}")
                svc = c.call("CreateService", control_pb2.CreateServiceRequest(spec=_resolve_refs(obj, ids))).service
                waits.append(("converge", svc.id, obj.annotations.name))
            else:
                say(f"Updating service {obj.name} (id: {obj.service_id})")
                c.call("UpdateService", control_pb2.UpdateServiceRequest(
                    service_id=obj.service_id, service_version=obj.version, spec=_resolve_refs(obj.spec, ids)))
                waits.append(("converge", obj.service_id, obj.name))
        except CliError as e:
            log.info("stack deploy step failed stack=%s step=%r: %s", d.stack.name, step.what, e)
            raise done.failed(step.what, e, [s.what for s in d.steps[i + 1:]]) from None
        verb, _, rest = step.what.partition(" ")
        done.done.append(f"{_PAST[verb]} {rest}")
    for name, sid in sorted(d.unchanged.items()):
        say(f"Service {name} is up to date (id: {sid})")
    log.info("stack deployed stack=%s steps=%d unchanged=%d", d.stack.name, len(d.steps), len(d.unchanged))
    if not d.steps:
        say(f"Stack {d.stack.name} is up to date: nothing to change")
    return waits


def stack_deploy(c: Client, args: argparse.Namespace) -> None:
    if not args.files:
        raise CliError("no stack file given: pass one with -c/--compose-file FILE (or -f FILE)")
    stack = load_stack(args.files, args.env_file, args.stack)
    d = prepare(c, stack, prune=args.prune, registry_auth=args.with_registry_auth)
    for note in d.notes:
        print(note, file=sys.stderr)
    waits = apply(c, d, lambda line: _say(args, line))
    if not args.detach and waits:
        failures = _wait(c, args, waits)
        if failures:
            raise CliError(f"stack {args.stack} was deployed, but " + "; ".join(failures))


def _wait(c: Client, args: argparse.Namespace, waits: list[tuple[str, str, str]]) -> list[str]:
    """Wait for each service in turn (one deadline for all); returns the failures, one sentence each."""
    sink = open(os.devnull, "w") if args.quiet else sys.stdout  # noqa: SIM115
    deadline = time.monotonic() + args.timeout
    failures = []
    try:
        for kind, sid, name in waits:
            w = Waiter(c, out=sink, timeout=max(1.0, deadline - time.monotonic()))
            if kind == "converge":
                sink.write(f"Waiting for service {name}\n")
                sink.flush()
            try:
                if kind == "converge":
                    w.converge(sid, name)
                else:
                    w.removed(sid, name)
            except CliError as e:
                failures.append(str(e))
    finally:
        if sink is not sys.stdout:
            sink.close()
    return failures


# ---- listings ------------------------------------------------------------------------------------
def stack_ls(c: Client, args: argparse.Namespace) -> None:
    counts: dict[str, int] = {}
    for s in query.list_objects(c, "service", control_pb2.ListFilters(labels={LABEL_NAMESPACE: ""})):
        ns = s.spec.annotations.labels.get(LABEL_NAMESPACE)
        if ns:
            counts[ns] = counts.get(ns, 0) + 1
    rows = sorted(counts.items())
    if args.format == "json":
        json.dump([{"name": n, "services": k} for n, k in rows], sys.stdout, indent=2)
        sys.stdout.write("\n")
        return
    print_table(["NAME", "SERVICES"], [[n, str(k)] for n, k in rows])


def stack_services(c: Client, args: argparse.Namespace) -> None:
    f = query.list_filters(args.filter, "service")
    f.labels[LABEL_NAMESPACE] = args.stack
    if not query.list_objects(c, "service", f):
        if args.format == "json":
            print("[]")
        elif not args.quiet:
            print(f"Nothing found in stack: {args.stack}", file=sys.stderr)
        return
    service_ls(c, argparse.Namespace(**{**vars(args), "filter": [*(args.filter or []),
                                                                     f"label={LABEL_NAMESPACE}={args.stack}"]}))


def stack_ps(c: Client, args: argparse.Namespace) -> None:
    services = _stack_services(c, args.stack)
    if not services:
        raise CliError(f"nothing found in stack {args.stack}: no service has the label "
                       f"{LABEL_NAMESPACE}={args.stack} (swarmctl stack ls lists the stacks)")
    f = query.list_filters(args.filter, "task")
    f.service_ids.extend(s.id for s in services)
    query.print_tasks(c, args, query.list_objects(c, "task", f))


# ---- rm ------------------------------------------------------------------------------------------
def stack_rm(c: Client, args: argparse.Namespace) -> None:
    errors: list[str] = []
    for stack in args.stacks:
        try:
            _remove_stack(c, args, stack)
        except CliError as e:
            errors.append(str(e))
    if errors:
        raise CliError("; ".join(errors))


def _remove_stack(c: Client, args: argparse.Namespace, stack: str) -> None:
    services = _stack_services(c, stack)
    others = {kind: [o for o in query.list_objects(c, kind, _of_stack(stack))
                     if o.spec.annotations.labels.get(LABEL_NAMESPACE) == stack]
              for kind in ("network", "secret", "config")}
    if not services and not any(others.values()):
        raise CliError(f"nothing found in stack {stack}: no service, network, secret or config has the label "
                       f"{LABEL_NAMESPACE}={stack} (swarmctl stack ls lists the stacks)")
    errors = []
    removed = []
    for s in sorted(services, key=lambda s: s.spec.annotations.name):
        _say(args, f"Removing service {s.spec.annotations.name}")
        try:
            c.call("RemoveService", control_pb2.RemoveServiceRequest(service_id=s.id))
            removed.append(s)
        except CliError as e:
            errors.append(f"service {s.spec.annotations.name}: {e}")
    if not args.detach and removed:
        errors += _wait(c, argparse.Namespace(quiet=args.quiet, timeout=args.timeout),
                        [("removed", s.id, s.spec.annotations.name) for s in removed])
    for kind in ("network", "secret", "config"):
        title = kind.capitalize()
        for o in sorted(others[kind], key=lambda o: o.spec.annotations.name):
            _say(args, f"Removing {kind} {o.spec.annotations.name}")
            try:
                c.call(f"Remove{title}", getattr(control_pb2, f"Remove{title}Request")(**{f"{kind}_id": o.id}))
            except CliError as e:
                errors.append(f"{kind} {o.spec.annotations.name}: {e}")
    log.info("stack removed stack=%s services=%d errors=%d", stack, len(removed), len(errors))
    if errors:
        raise CliError(f"stack {stack} was not removed completely: " + "; ".join(errors))
