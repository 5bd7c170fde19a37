"""The arrows of docs/architecture.md ("Rooms and arrows"), checked on the source: which room may import
which, and inside a room, that the facades and commands sit on top of the parts they use, never under.

Every `import shoal.…` / `from shoal.… import` counts, at module top or inside a function alike: a
lazy import that runs the wrong way is still an arrow the wrong way.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ROOMS = ("proto", "compose", "manager", "agent", "netdriver", "node", "cli", "lab", "engineapi")

# room -> the rooms (or single modules) it may import (itself always). `agent.engine` is a room of its
# own inside agent/.
ALLOWED: dict[str, set[str]] = {
    "proto": set(),
    "compose": {"proto"},
    "manager": {"proto"},
    "agent.engine": {"proto"},
    "netdriver": {"proto"},
    "agent": {"agent.engine", "netdriver", "proto"},
    "lab": {"netdriver.netns", "proto"},
    "cli": {"compose", "lab", "proto"},
    "engineapi": {"proto"},
    "node": {"manager", "agent", "agent.engine", "netdriver", "proto", "engineapi"},
}

# Inside a room: module (prefix) -> modules (prefixes) it must not import.
NOT_BELOW: list[tuple[str, tuple[str, ...]]] = [
    # cli: the commands use the shared helpers; the helpers never reach back into a command.
    ("cli.query", ("cli.commands", "cli.swarmctl")),
    ("cli.servicespec", ("cli.commands", "cli.swarmctl")),
    ("cli.progress", ("cli.commands", "cli.swarmctl")),
    ("cli.client", ("cli.commands", "cli.swarmctl")),
    ("cli.output", ("cli.commands", "cli.swarmctl")),
    ("cli.commands", ("cli.swarmctl",)),
    # agent: worker -> controller -> (taskstate, executor); the pure state machine knows no one.
    ("agent.taskstate", ("agent.controller", "agent.worker", "agent.executor", "agent.agent", "agent.network")),
    ("agent.executor", ("agent.controller", "agent.worker", "agent.agent", "agent.network")),
    ("agent.controller", ("agent.worker", "agent.agent")),
    ("agent.worker", ("agent.agent",)),
    ("agent.engine", ("agent.engine.engine",)),  # the engine's parts never import its facade
    # netdriver: the overlay facade uses its seams and lb; none of them imports the facade.
    ("netdriver.overlay", ("netdriver.overlay.driver",)),
    ("netdriver.lb", ("netdriver.overlay.driver",)),
    ("netdriver.netns", ("netdriver.overlay", "netdriver.lb")),
    ("netdriver.driverapi", ("netdriver.overlay", "netdriver.lb")),
    # engineapi: the HTTP server and the shared converters sit under the endpoint modules and the app.
    ("engineapi.server", ("engineapi.convert", "engineapi.api", "engineapi.system", "engineapi.nodes",
                          "engineapi.services", "engineapi.servicespec", "engineapi.objects", "engineapi.events",
                          "engineapi.logs")),
    ("engineapi.convert", ("engineapi.api", "engineapi.system", "engineapi.nodes", "engineapi.services",
                           "engineapi.servicespec", "engineapi.objects", "engineapi.events", "engineapi.logs")),
    ("engineapi.servicespec", ("engineapi.services", "engineapi.api")),
]

# The task state machine is pure: no I/O module may be imported there.
PURE = {"agent.taskstate": {"__future__", "enum", "dataclasses", "typing", "collections.abc"}}


def _module(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _room(module: str) -> str:
    return "agent.engine" if module.startswith("agent.engine") else module.split(".")[0]


def _imports(path: Path) -> list[str]:
    """Every module `path` imports (absolute names, `shoal.` kept; a relative import is resolved)."""
    out: list[str] = []
    package = _module(path).split(".")
    if path.name != "__init__.py":
        package = package[:-1]
    for n in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(n, ast.Import):
            out += [a.name for a in n.names]
        elif isinstance(n, ast.ImportFrom):
            if n.level:
                base = ["shoal", *package[: len(package) - (n.level - 1)]]
                module = ".".join(base + ([n.module] if n.module else []))
            elif n.module:
                module = n.module
            else:
                continue
            out.append(module)
            # `from shoal.netdriver import lb` imports shoal.netdriver.lb
            out += [f"{module}.{a.name}" for a in n.names if module.startswith("shoal.")]
    return out


def _sources() -> list[Path]:
    return sorted(p for room in ROOMS for p in (ROOT / room).rglob("*.py") if "_pb2" not in p.name)


def _is_module(name: str) -> bool:
    base = ROOT / Path(*name.split("."))
    return base.with_suffix(".py").exists() or (base / "__init__.py").exists()


def test_rooms_import_only_along_the_arrows() -> None:
    wrong = []
    for path in _sources():
        src = _module(path)
        for imp in _imports(path):
            if not imp.startswith("shoal.") or not _is_module(imp.removeprefix("shoal.")):
                continue
            dst = imp.removeprefix("shoal.")
            a, b = _room(src), _room(dst)
            if a != b and b not in ALLOWED[a] and not any(dst.startswith(m + ".") or dst == m for m in ALLOWED[a]):
                wrong.append(f"{path.relative_to(ROOT)} imports shoal.{dst} ({a} -> {b} is not an arrow)")
    assert not wrong, "\n".join(wrong)


@pytest.mark.parametrize("upper,below", NOT_BELOW, ids=[u for u, _ in NOT_BELOW])
def test_inside_a_room_the_arrows_run_one_way(upper: str, below: tuple[str, ...]) -> None:
    wrong = []
    for path in _sources():
        src = _module(path)
        if path.name == "__init__.py" or not (src == upper or src.startswith(upper + ".")):
            continue  # (a package's front door may re-export its facade)
        for imp in _imports(path):
            dst = imp.removeprefix("shoal.")
            if imp.startswith("shoal.") and dst != src and any(dst == b or dst.startswith(b + ".") for b in below):
                wrong.append(f"{path.relative_to(ROOT)} imports {imp}")
    assert not wrong, "\n".join(wrong)


def test_the_task_state_machine_does_no_io() -> None:
    for mod, allowed in PURE.items():
        path = ROOT / Path(*mod.split(".")).with_suffix(".py")
        others = {i for i in _imports(path) if not i.startswith("shoal.")} - allowed
        assert not others, f"{mod} imports {sorted(others)}: it must stay a pure function of its inputs"


def test_the_rules_name_real_modules() -> None:
    """A rule about a module that was renamed away would pass forever: every name must exist."""
    names = [u for u, _ in NOT_BELOW] + [b for _, bs in NOT_BELOW for b in bs] + list(PURE)
    missing = [n for n in names if not _is_module(n)]
    assert not missing, f"rules name modules that do not exist: {missing}"
