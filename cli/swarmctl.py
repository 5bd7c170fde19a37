"""swarmctl: the command line of a Shoal cluster (talks to a manager's control API over gRPC).

    swarmctl [--socket PATH | --host ADDR:2377 --tls-dir DIR] COMMAND ...

Errors print `Error: <sentence>` on stderr and exit 1; usage errors exit 2.

This module owns `main` and the root parser only. Each command group is a module of
`shoal.cli.commands` with a `register(subparsers)`; COMMANDS names them in the order `--help` lists
them. The root parser loads only the module of the command a command line names and lists the
others by name and help line, so `swarmctl --version`, `swarmctl --help` and `swarmctl lab …` load
neither gRPC nor a generated `*_pb2` module (tests/cli/test_cli_imports.py checks it); the client
(and gRPC) is loaded only for a command that talks to a manager.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass

from shoal.cli.cmdline import CONN, CONN_FLAGS_WITH_VALUE, Parser
from shoal.cli.errors import CliError


@dataclass(frozen=True)
class Command:
    """A top-level command: `shoal.cli.commands.<module>.<register>(subparsers)` adds it."""

    module: str
    help: str  # its line in `swarmctl --help`; the module's parser says the same (tested)
    register: str = "register"


COMMANDS: dict[str, Command] = {
    "cluster": Command("cluster", "inspect and update the cluster"),
    "swarm": Command("swarm", "swarm-wide commands"),
    "info": Command("cluster", "show the swarm as this manager sees it", "register_info"),
    "node": Command("node", "manage nodes"),
    "service": Command("service", "manage services"),
    "task": Command("task", "list and inspect tasks"),
    "network": Command("network", "manage networks"),
    "secret": Command("secret", "manage secrets", "register_secret"),
    "config": Command("secret", "manage configs", "register_config"),
    "stack": Command("stack", "deploy and manage stacks from compose files"),
    "events": Command("events", "follow changes in the cluster, one line per event"),
    "lab": Command("lab", "a multi-host cluster of network-namespace hosts on this machine"),
}


def named_command(argv: Sequence[str]) -> str | None:
    """The command word of a command line: its first argument that is neither an option nor the value
    of a connection option (`--socket S`, abbreviations included, as argparse takes them)."""
    it = iter(argv)
    for tok in it:
        if tok == "--":
            return next(it, None)
        if tok.startswith("-"):
            if tok.startswith("--") and "=" not in tok and any(f.startswith(tok) for f in CONN_FLAGS_WITH_VALUE):
                next(it, None)
            continue
        return tok
    return None


def _version() -> str:
    try:
        return importlib.metadata.version("shoal")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def build_parser(argv: Sequence[str] | None = None) -> Parser:
    """The root parser. Given the command line, only the module of the command it names is loaded and
    the other commands are listed by name and help line; without one, every command module is loaded."""
    named = named_command(argv) if argv is not None else None
    root = Parser(prog="swarmctl", parents=[CONN], description="Control a Shoal swarm.")
    root.add_argument("--version", action="version", version=f"swarmctl {_version()}")
    cmds = root.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    for name, cmd in COMMANDS.items():
        if argv is None or name == named:
            module = importlib.import_module(f"shoal.cli.commands.{cmd.module}")
            getattr(module, cmd.register)(cmds)
        else:
            cmds.add_parser(name, help=cmd.help)
    return root


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    func = getattr(args, "func", None)
    if func is None:
        (getattr(args, "parser", None) or parser).print_help(sys.stderr)
        return 2
    if getattr(args, "no_client", False):  # local commands (the lab) talk to no manager
        try:
            return int(func(args) or 0)
        except KeyboardInterrupt:
            return 130
    # Loaded here, not at the top: the client brings gRPC, which local commands and --help do without.
    from shoal.cli.client import Client

    client = None
    try:
        client = Client(socket=getattr(args, "socket", None),
                        host=getattr(args, "host", None) or os.environ.get("SWARM_HOST"),
                        tls_dir=getattr(args, "tls_dir", None) or os.environ.get("SWARM_TLS_DIR"))
        func(client, args)
        return 0
    except CliError as e:
        sys.stdout.flush()
        sys.stderr.write(f"Error: {e}\n")
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return 0
    finally:
        if client is not None:
            client.close()


if __name__ == "__main__":
    sys.exit(main())
