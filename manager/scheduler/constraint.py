"""Placement constraints and spread descriptors: parsing (shared with the control API) and matching.

A constraint is `<key>==<value>` or `<key>!=<value>`; keys are `node.id`, `node.hostname`, `node.role`,
`node.platform.os`, `node.platform.arch`, `node.labels.<name>` and `engine.labels.<name>`. Values
compare case-insensitively, as in Docker Swarm; a label the node does not have never equals anything
(so `!=` holds). The grammar itself lives in `shoal.manager.validation` (one parser for both sides).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from shoal.manager.store import InvalidArgument
from shoal.manager.validation import Constraint, parse_constraint, validate_spread_descriptor
from shoal.proto import objects_pb2, types_pb2

__all__ = [
    "Constraint",
    "parse_constraints",
    "parse_spread",
    "node_attribute",
    "matches",
    "first_unmet",
    "normalize_arch",
]

_ARCH_ALIASES = {
    "x86_64": "amd64",
    "x86-64": "amd64",
    "aarch64": "arm64",
    "armv8": "arm64",
    "armhf": "arm",
    "armv7l": "arm",
    "i386": "386",
    "i686": "386",
}


def normalize_arch(arch: str) -> str:
    a = arch.lower()
    return _ARCH_ALIASES.get(a, a)


def parse_constraints(exprs: Iterable[str]) -> list[Constraint]:
    """Parse every expression; ValueError with one sentence naming the bad constraint otherwise."""
    out = []
    for e in exprs:
        try:
            out.append(parse_constraint(e))
        except InvalidArgument as err:
            raise ValueError(str(err)) from None
    return out


def parse_spread(descriptor: str) -> str:
    """The canonical key of a `spread=<descriptor>` preference; ValueError when it is not supported."""
    try:
        return validate_spread_descriptor(descriptor)
    except InvalidArgument as err:
        raise ValueError(str(err)) from None


def node_attribute(node: objects_pb2.Node, key: str) -> str | None:
    """The value a node has for a canonical placement key; None when it has no such label."""
    if key == "node.id":
        return node.id
    if key == "node.hostname":
        return node.description.hostname
    if key == "node.role":
        return "manager" if node.role == types_pb2.MANAGER else "worker"
    if key == "node.platform.os":
        return node.description.platform.os
    if key == "node.platform.arch":
        return node.description.platform.architecture
    if key.startswith("node.labels."):
        labels = node.spec.annotations.labels
        name = key[len("node.labels.") :]
        return labels[name] if name in labels else None
    if key.startswith("engine.labels."):
        labels = node.description.engine.labels
        name = key[len("engine.labels.") :]
        return labels[name] if name in labels else None
    return None


def _holds(c: Constraint, value: str | None) -> bool:
    if value is None:
        return not c.equal
    if c.key == "node.platform.arch":
        same = normalize_arch(value) == normalize_arch(c.value)
    else:
        same = value.lower() == c.value.lower()
    return same if c.equal else not same


def matches(constraints: Sequence[Constraint], node: objects_pb2.Node) -> bool:
    """True when the node satisfies every constraint."""
    for c in constraints:
        if not _holds(c, node_attribute(node, c.key)):
            return False
    return True


def first_unmet(constraints: Sequence[Constraint], node: objects_pb2.Node) -> Constraint | None:
    for c in constraints:
        if not _holds(c, node_attribute(node, c.key)):
            return c
    return None
