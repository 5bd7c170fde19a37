"""Durations, byte sizes and CPU counts: the one parser of them for stack files and swarmctl's flags.

`shoal.compose` and `shoal.cli` both read these values (`stop_grace_period: 1m30s` in a stack file,
`--stop-grace-period 1m30s` on the command line) and must agree on every input, so both use this
module (cli imports compose, never the reverse). The arithmetic is exact (`fractions.Fraction`, no
float): `0.3s` is 300000000 ns, and a fraction of a nanosecond or of a byte is cut off, as Go's
time.ParseDuration and docker's RAMInBytes do; a CPU count finer than a nano CPU is refused, as
docker's ParseCPUs does.

Every parser raises `ValueError` with one sentence naming what was given and what is allowed; the
caller adds the field or flag name.
"""

from __future__ import annotations

import re
from fractions import Fraction

_NS_PER = {
    "ns": 1,
    "us": 1_000,
    "µs": 1_000,  # U+00B5 micro sign
    "μs": 1_000,  # U+03BC Greek mu: Go takes both
    "ms": 1_000_000,
    "s": 1_000_000_000,
    "m": 60 * 1_000_000_000,
    "h": 3600 * 1_000_000_000,
}
_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|μs|ms|s|m|h)")


def parse_duration(text: str) -> int:
    """Go's time.ParseDuration (``1m30s``, ``10s``, ``1.5h``, ``300ms``, ``+5s``, ``0``) → nanoseconds.

    A unit is required on every number except a lone ``0``; negative durations are refused (no field
    has a use for them). Fractions of a nanosecond are cut off, as Go does.
    """
    s = text.strip()
    if s == "0":
        return 0
    negative = s.startswith("-")
    body = s[1:] if s[:1] in ("+", "-") else s
    pos = 0
    total = Fraction(0)
    while pos < len(body):
        m = _DURATION_PART.match(body, pos)
        if m is None:
            break
        total += Fraction(m.group(1)) * _NS_PER[m.group(2)]
        pos = m.end()
    if not body or pos != len(body):
        raise ValueError(f"invalid duration {text!r}: use a number with a unit, such as 500ms, 10s, 1m30s or 2h")
    if negative:
        raise ValueError(f"invalid duration {text!r}: it must not be negative")
    return int(total)


def format_duration(ns: int) -> str:
    """Nanoseconds → a Go-style duration string (``1m30s``, ``1.5s``, ``300ms``, ``1.5us``, ``0s``), exact.

    Under a second the largest of ms, us and ns that is at least 1 is used; from a second on, hours,
    minutes and (fractional) seconds.
    """
    if ns == 0:
        return "0s"
    if ns < 10**9:
        for unit, size in (("ms", 10**6), ("us", 10**3), ("ns", 1)):
            if ns >= size:
                return _decimal(ns, size) + unit
    out = []
    h, rest = divmod(ns, 3600 * 10**9)
    m, rest = divmod(rest, 60 * 10**9)
    if h:
        out.append(f"{h}h")
    if m:
        out.append(f"{m}m")
    if rest:
        out.append(_decimal(rest, 10**9) + "s")
    return "".join(out)


def _decimal(n: int, size: int) -> str:
    """n / size written exactly in decimal (size is a power of ten)."""
    whole, frac = divmod(n, size)
    if not frac:
        return str(whole)
    digits = len(str(size)) - 1
    return f"{whole}.{frac:0{digits}d}".rstrip("0")


_BYTES = re.compile(r"^(\d+(?:\.\d+)?)\s*([kmgtp]?)(i?)(b?)$", re.I)
_BYTE_UNITS = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3, "t": 1024**4, "p": 1024**5}


def parse_bytes(value: int | str) -> int:
    """Docker's RAMInBytes: ``512m``, ``1gb``, ``64MiB``, ``100k``, ``1.5g``, ``2 GB``; plain numbers
    (and ints) are bytes. Binary units (k = 1024). An ``i`` needs a unit before it (``5ib`` is refused);
    a fraction of a byte is cut off."""
    if isinstance(value, bool):
        raise ValueError("a boolean is not a size")
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"invalid size {value!r}: it must not be negative")
        return value
    m = _BYTES.match(str(value).strip())
    if m is None or (m.group(3) and not m.group(2)):
        raise ValueError(
            f"invalid size {value!r}: use a number with an optional unit b, k, m, g or t, such as 64m or 1.5g")
    return int(Fraction(m.group(1)) * _BYTE_UNITS[m.group(2).lower()])


def parse_cpus(value: int | float | str) -> int:
    """``'0.5'``, ``2``, ``1.25`` → nano CPUs (docker's ParseCPUs: finer than 1e-9 CPU is refused)."""
    if isinstance(value, bool):
        raise ValueError("a boolean is not a CPU count")
    try:
        cpus = Fraction(str(value).strip())  # str() of a float is its shortest exact-enough decimal
    except (ValueError, ZeroDivisionError):
        raise ValueError(f"invalid CPU value {value!r}: give a number of CPUs such as 0.5 or 2") from None
    if cpus < 0:
        raise ValueError(f"invalid CPU value {value!r}: give a number of CPUs of 0 or more")
    nano = cpus * 10**9
    if nano.denominator != 1:
        raise ValueError(f"CPU count {value!r} is too precise (at most 9 decimals)")
    return int(nano)
