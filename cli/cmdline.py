"""argparse plumbing every command module shares: the parser class, the connection flags, command groups.

No gRPC or protobuf here (the root parser and `--help` are built from this module alone). Value
converters for flags (durations, sizes, ports…) are in `shoal.cli.flagtypes`.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

DEFAULT_WAIT_TIMEOUT = 300.0  # seconds a command waits for convergence unless --timeout says otherwise


class Parser(argparse.ArgumentParser):
    """Usage errors print `Error: <message>` and a pointer to --help, and exit 2."""

    def error(self, message: str) -> NoReturn:
        sys.stderr.write(f"Error: {message}\nSee '{self.prog} --help'.\n")
        sys.exit(2)


def _conn_parent() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("connection")
    g.add_argument("--socket", default=argparse.SUPPRESS,
                   help="the manager's local control socket (default $SWARM_SOCKET or /var/run/shoal/swarmd.sock)")
    g.add_argument("--host", default=argparse.SUPPRESS, help="a manager's remote API, ADDR:2377 (needs --tls-dir)")
    g.add_argument("--tls-dir", default=argparse.SUPPRESS,
                   help="state dir (or its certificates folder) of the node whose TLS identity to use")
    return p


# The connection flags, accepted on every level (`swarmctl --socket S service ls` and `… service ls --socket S`).
CONN = _conn_parent()
CONN_FLAGS_WITH_VALUE = ("--socket", "--host", "--tls-dir")

Handler = Callable[..., Any]  # (client, args) for commands that talk to a manager, (args) for local ones


def add_group(cmds: Any, name: str, help_text: str) -> Any:
    """A command group (`swarmctl NAME SUBCOMMAND`) on the root subparsers; returns its subparsers.
    Without a subcommand it prints its help and exits 2."""
    p = cmds.add_parser(name, help=help_text, parents=[CONN])
    p.set_defaults(func=None, parser=p)
    return p.add_subparsers(dest="sub", metavar="SUBCOMMAND", parser_class=Parser)


def add_leaf(sub: Any, name: str, func: Handler, help_text: str, aliases: Sequence[str] = ()) -> argparse.ArgumentParser:
    """A subcommand of a group, run as `func(client, args)`."""
    p = sub.add_parser(name, help=help_text, parents=[CONN], aliases=list(aliases))
    p.set_defaults(func=func)
    return p


def add_format(p: argparse.ArgumentParser) -> None:
    p.add_argument("--format", choices=("table", "json"), default="table", help="output format")


def add_listing_flags(p: argparse.ArgumentParser, filters: str, no_trunc: bool = True) -> None:
    """The flags of a listing: `-f/--filter KEY=VALUE` (`filters`: the keys it takes), `--no-trunc`,
    `-q/--quiet` (ids only) and `--format table|json`."""
    p.add_argument("-f", "--filter", action="append", help=filters)
    if no_trunc:
        p.add_argument("--no-trunc", action="store_true", help="do not truncate output")
    p.add_argument("-q", "--quiet", action="store_true", help="only show ids")
    add_format(p)
