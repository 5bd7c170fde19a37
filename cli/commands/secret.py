"""`swarmctl secret …` and `swarmctl config …`: create them from a file or stdin, list, show and remove them."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from shoal.cli import output as out
from shoal.cli import query
from shoal.cli.client import Client
from shoal.cli.cmdline import add_group, add_leaf, add_listing_flags
from shoal.cli.errors import CliError
from shoal.cli.flagtypes import parse_labels
from shoal.proto import control_pb2, specs_pb2, types_pb2

Command = Callable[[Client, argparse.Namespace], None]


def register_secret(cmds: Any) -> None:
    _register(cmds, "secret")


def register_config(cmds: Any) -> None:
    _register(cmds, "config")


def _register(cmds: Any, kind: str) -> None:
    sub = add_group(cmds, kind, f"manage {kind}s")
    p = add_leaf(sub, "create", _file_create(kind), f"create a {kind} from a file or standard input")
    p.add_argument("name", metavar="NAME")
    p.add_argument("file", nargs="?", metavar="FILE|-")
    p.add_argument("--file", dest="file_flag", help="read the data from this file (- for stdin)")
    p.add_argument("-l", "--label", action="append")
    p = add_leaf(sub, "ls", _file_ls(kind), f"list {kind}s", aliases=["list"])
    add_listing_flags(p, "name=, name-prefix=, id=, label=")
    p = add_leaf(sub, "inspect", _inspect(kind), f"show {kind}s in detail")
    p.add_argument("refs", nargs="+", metavar=kind.upper())
    p.add_argument("--format", choices=("json",), default="json")
    p = add_leaf(sub, "rm", _rm(kind), f"remove {kind}s", aliases=["remove"])
    p.add_argument("refs", nargs="+", metavar=kind.upper())


def _read_data(path: str | None, kind: str) -> bytes:
    if path is None:
        raise CliError(f"no {kind} data given: give a file, or - to read it from standard input")
    if path == "-":
        return sys.stdin.buffer.read()
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise CliError(f"cannot read {kind} data from {path}: {e.strerror}") from None




def _rm(kind: str) -> Command:
    def cmd(c: Client, args: argparse.Namespace) -> None:
        query.remove_each(c, kind, args.refs)

    return cmd


def _inspect(kind: str) -> Command:
    def cmd(c: Client, args: argparse.Namespace) -> None:
        query.inspect(args, c, kind, args.refs)

    return cmd


def _file_create(kind: str) -> Command:
    def cmd(c: Client, args: argparse.Namespace) -> None:
        if args.file and args.file_flag:
            raise CliError(f"{kind} data given twice (argument and --file): give it once")
        data = _read_data(args.file or args.file_flag, kind)
        cls = specs_pb2.SecretSpec if kind == "secret" else specs_pb2.ConfigSpec
        spec = cls(annotations=types_pb2.Annotations(name=args.name, labels=parse_labels(args.label)), data=data)
        title = kind.capitalize()
        obj = getattr(c.call(f"Create{title}", getattr(control_pb2, f"Create{title}Request")(spec=spec)), kind)
        print(obj.id)

    return cmd


def _file_ls(kind: str) -> Command:
    def cmd(c: Client, args: argparse.Namespace) -> None:
        objs = query.list_objects(c, kind, query.list_filters(args.filter, kind))

        def row(o: Any) -> list[str]:
            return [o.id[:12] if not args.no_trunc else o.id, o.spec.annotations.name,
                    out.ago(o.meta.created_at), out.ago(o.meta.updated_at)]

        query.print_list(args, objs, ["ID", "NAME", "CREATED", "UPDATED"], row)

    return cmd


