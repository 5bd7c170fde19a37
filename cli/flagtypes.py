"""argparse converters for swarmctl's flag values: a bad value is a usage error naming the value.

The parsing itself is in `shoal.cli.units` (ports, mounts, references) and `shoal.compose.units`
(durations, sizes, CPU counts: shared with stack files).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from typing import Any

from shoal.cli import units
from shoal.cli.errors import CliError
from shoal.compose import units as sizes


def typed(fn: Callable[[str], Any], what: str | None = None) -> Callable[[str], Any]:
    """`fn` as an argparse type: its ValueError sentence becomes the usage error."""
    def conv(text: str) -> Any:
        try:
            return fn(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    conv.__name__ = what or fn.__name__
    return conv


def uint(what: str) -> Callable[[str], int]:
    return typed(lambda t: units.parse_uint(t, what), what)


def _bool(text: str) -> bool:
    t = text.strip().lower()
    if t in ("true", "1", "yes", "on"):
        return True
    if t in ("false", "0", "no", "off"):
        return False
    raise ValueError(f"{text!r} is not a boolean: give true or false")


DURATION = typed(sizes.parse_duration, "duration")  # nanoseconds
TIMEOUT = typed(lambda t: sizes.parse_duration(t) / 1e9, "duration")  # seconds, for --timeout
BYTES = typed(sizes.parse_bytes, "size")
CPUS = typed(sizes.parse_cpus, "cpus")
RATIO = typed(units.parse_ratio, "ratio")
PORT = typed(units.parse_port, "port")
MOUNT = typed(units.parse_mount, "mount")
PREF = typed(units.parse_placement_pref, "placement preference")
ULIMIT = typed(units.parse_ulimit, "ulimit")
ADD_HOST = typed(units.parse_add_host, "host")
SECRET = typed(lambda t: units.parse_file_ref(t, "secret"), "secret")
CONFIG = typed(lambda t: units.parse_file_ref(t, "config"), "config")
BOOL = typed(_bool, "boolean")


def parse_labels(items: Sequence[str] | None, what: str = "label") -> dict[str, str]:
    """Repeated KEY=VALUE flags (`--label a=1 --label b`) as a dict; a bad one is a CliError."""
    result: dict[str, str] = {}
    for item in items or ():
        try:
            k, v = units.parse_kv(item, what)
        except ValueError as e:
            raise CliError(str(e)) from None
        result[k] = v
    return result
