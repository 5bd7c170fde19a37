"""Commands that need no cluster (`--version`, `--help`, `lab …`) load neither gRPC nor a generated
`*_pb2` module; and the root parser's list of commands says what each command module registers."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from shoal.cli.swarmctl import COMMANDS, build_parser, named_command

PROBE = """
import json, sys
from shoal.cli.swarmctl import main
try:
    rc = main({argv!r})
except SystemExit as e:
    rc = e.code
heavy = sorted(m for m in sys.modules if m == "grpc" or m.startswith("grpc.") or m.endswith("_pb2")
               or m.endswith("_pb2_grpc") or m.startswith("google.protobuf"))
print(json.dumps({{"rc": rc, "heavy": heavy}}))
"""


def loaded_by(argv: list[str]) -> dict:
    r = subprocess.run([sys.executable, "-c", PROBE.format(argv=argv)], capture_output=True, text=True, timeout=60)
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("argv", [["--version"], ["--help"], [], ["lab", "--help"], ["lab", "up", "--help"],
                                  ["--socket", "/nowhere", "lab", "status", "--help"]])
def test_no_grpc_without_a_cluster(argv: list[str]) -> None:
    got = loaded_by(argv)
    assert got["rc"] in (0, 2) and got["heavy"] == [], got


def test_a_cluster_command_does_load_grpc() -> None:  # the probe itself works
    got = loaded_by(["--socket", "/nowhere", "info"])
    assert got["rc"] == 1 and "grpc" in got["heavy"]


def test_named_command() -> None:
    assert named_command(["--socket", "s", "service", "ls"]) == "service"
    assert named_command(["--sock", "s", "--host=h", "-h", "node"]) == "node"
    assert named_command(["--tls-dir", "d"]) is None
    assert named_command(["--", "lab"]) == "lab"


def test_listed_help_is_what_each_module_registers() -> None:
    full = build_parser()  # every command module loaded
    sub = next(a for a in full._actions if a.dest == "command")
    registered = {a.dest: a.help for a in sub._choices_actions}
    assert registered == {name: cmd.help for name, cmd in COMMANDS.items()}
    assert list(sub.choices) == list(COMMANDS)
