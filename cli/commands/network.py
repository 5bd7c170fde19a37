"""`swarmctl network …`: create, list, show and remove overlay networks."""

from __future__ import annotations

import argparse
from typing import Any

from shoal.cli import output as out
from shoal.cli import query
from shoal.cli.client import Client
from shoal.cli.cmdline import add_group, add_leaf, add_listing_flags
from shoal.cli.flagtypes import parse_labels
from shoal.proto import control_pb2, objects_pb2, specs_pb2, types_pb2


def register(cmds: Any) -> None:
    sub = add_group(cmds, "network", "manage networks")
    p = add_leaf(sub, "create", network_create, "create an overlay network")
    p.add_argument("name", metavar="NAME")
    p.add_argument("-d", "--driver", default="overlay")
    p.add_argument("--subnet")
    p.add_argument("--gateway")
    p.add_argument("--ip-range")
    p.add_argument("--attachable", action="store_true")
    p.add_argument("--internal", action="store_true")
    p.add_argument("--ingress", action="store_true")
    p.add_argument("--label", action="append")
    p.add_argument("-o", "--opt", action="append", help="driver option KEY=VALUE (e.g. encrypted)")
    p = add_leaf(sub, "ls", network_ls, "list networks", aliases=["list"])
    add_listing_flags(p, "name=, name-prefix=, id=, label=")
    p = add_leaf(sub, "inspect", network_inspect, "show networks in detail")
    p.add_argument("refs", nargs="+", metavar="NETWORK")
    p.add_argument("--format", choices=("json",), default="json")
    p.add_argument("--pretty", action="store_true", help="human-readable output")
    p = add_leaf(sub, "rm", network_rm, "remove networks", aliases=["remove"])
    p.add_argument("refs", nargs="+", metavar="NETWORK")


def network_create(c: Client, args: argparse.Namespace) -> None:
    spec = specs_pb2.NetworkSpec(annotations=types_pb2.Annotations(name=args.name, labels=parse_labels(args.label)),
                                 internal=args.internal, attachable=args.attachable, ingress=args.ingress)
    spec.driver_config.name = args.driver
    spec.driver_config.options.update(parse_labels(args.opt, "driver option"))
    if args.subnet or args.gateway or args.ip_range:
        spec.ipam.configs.add(subnet=args.subnet or "", gateway=args.gateway or "", range=args.ip_range or "")
    net = c.call("CreateNetwork", control_pb2.CreateNetworkRequest(spec=spec)).network
    print(net.id)


def _network_pretty(n: objects_pb2.Network) -> None:
    s = n.spec
    cfg = n.ipam.configs[0] if n.ipam.configs else None
    print(f"ID:\t\t{n.id}\nName:\t\t{s.annotations.name}\nDriver:\t\t{s.driver_config.name or 'overlay'}")
    print(f"Scope:\t\tswarm\nVXLAN ID:\t{n.driver_state.vni}")
    print(f"Subnet:\t\t{cfg.subnet if cfg else ''}\nGateway:\t{cfg.gateway if cfg else ''}")
    for label, flag in (("Attachable", s.attachable), ("Internal", s.internal), ("Ingress", s.ingress)):
        print(f"{label}:\t{'true' if flag else 'false'}")
    if "encrypted" in s.driver_config.options:
        when = (f"keys rotated {out.ago(n.keys_rotated_at).lower()} ({n.keys_rotated_at.ToJsonString()})"
                if n.HasField("keys_rotated_at") else "keys not made yet")
        print(f"Encrypted:\ttrue (IPsec ESP between nodes; {when})")
    else:
        print("Encrypted:\tfalse")
    if s.driver_config.options:
        print("Options:")
        for k, v in sorted(s.driver_config.options.items()):
            print(f" - {k}={v}" if v else f" - {k}")
    if s.annotations.labels:
        print("Labels:")
        for k, v in sorted(s.annotations.labels.items()):
            print(f" - {k}={v}")


def network_inspect(c: Client, args: argparse.Namespace) -> None:
    # the manager never sends a network's IPsec keys; never print them either
    query.inspect(args, c, "network", args.refs, _network_pretty, redact=lambda n: n.ClearField("encryption_keys"))


def network_ls(c: Client, args: argparse.Namespace) -> None:
    nets = query.list_objects(c, "network", query.list_filters(args.filter, "network"))

    def row(n: objects_pb2.Network) -> list[str]:
        subnet = n.ipam.configs[0].subnet if n.ipam.configs else ""
        return [n.id[:12], n.spec.annotations.name, n.spec.driver_config.name or "overlay", "swarm", subnet]

    query.print_list(args, nets, ["NETWORK ID", "NAME", "DRIVER", "SCOPE", "SUBNET"], row)




def network_rm(c: Client, args: argparse.Namespace) -> None:
    query.remove_each(c, "network", args.refs)
