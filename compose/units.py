"""Durations, byte sizes and CPU counts as Compose writes them."""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation

_DURATION_UNITS = {
    "ns": 1,
    "us": 1_000,
    "µs": 1_000,
    "μs": 1_000,
    "ms": 1_000_000,
    "s": 1_000_000_000,
    "m": 60 * 1_000_000_000,
    "h": 3600 * 1_000_000_000,
}
_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|μs|ms|s|m|h)")


def parse_duration(text: str) -> int:
    """Go's time.ParseDuration (``1m30s``, ``10s``, ``1.5h``, ``300ms``, ``0``) → nanoseconds.

    Raises ValueError on anything else (negative durations are refused: Compose has no use for them).
    """
    s = text.strip()
    if s == "0":
        return 0
    if not s:
        raise ValueError("empty duration")
    pos = 0
    total = Decimal(0)
    while pos < len(s):
        m = _DURATION_PART.match(s, pos)
        if m is None:
            raise ValueError(f"invalid duration {text!r}")
        total += Decimal(m.group(1)) * _DURATION_UNITS[m.group(2)]
        pos = m.end()
    return int(total)


def format_duration(ns: int) -> str:
    """Nanoseconds → a Go-style duration string (``1m30s``), for normalised output."""
    if ns == 0:
        return "0s"
    out = []
    h, rest = divmod(ns, 3600 * 10**9)
    m, rest = divmod(rest, 60 * 10**9)
    if h:
        out.append(f"{h}h")
    if m:
        out.append(f"{m}m")
    if rest:
        if rest % 10**9 == 0:
            out.append(f"{rest // 10**9}s")
        elif rest % 10**6 == 0 and not out and rest < 10**9:
            out.append(f"{rest // 10**6}ms")
        elif rest % 10**3 == 0 and not out and rest < 10**6:
            out.append(f"{rest // 10**3}us")
        elif not out and rest < 10**3:
            out.append(f"{rest}ns")
        else:
            out.append(f"{Decimal(rest) / 10**9:f}".rstrip("0").rstrip(".") + "s")
    return "".join(out)


_BYTES = re.compile(r"^(\d+(?:\.\d+)?)\s*([kmgtp]?)(i?b?)$", re.I)
_BYTE_UNITS = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3, "t": 1024**4, "p": 1024**5}


def parse_bytes(value: int | str) -> int:
    """Docker's RAMInBytes: ``512m``, ``1gb``, ``100k``, ``1.5g``, plain numbers are bytes (×1024)."""
    if isinstance(value, bool):
        raise ValueError("a boolean is not a size")
    if isinstance(value, int):
        if value < 0:
            raise ValueError("negative size")
        return value
    m = _BYTES.match(str(value).strip())
    if m is None:
        raise ValueError(f"invalid size {value!r}")
    return int(Decimal(m.group(1)) * _BYTE_UNITS[m.group(2).lower()])


def parse_cpus(value: int | float | str) -> int:
    """``'0.5'``, ``2``, ``1.25`` → nano CPUs (docker's ParseCPUs)."""
    if isinstance(value, bool):
        raise ValueError("a boolean is not a CPU count")
    try:
        d = Decimal(str(value).strip())
    except InvalidOperation:
        raise ValueError(f"invalid CPU count {value!r}") from None
    if not d.is_finite() or d < 0:
        raise ValueError(f"invalid CPU count {value!r}")
    nano = d * 10**9
    if nano != nano.to_integral_value():
        raise ValueError(f"CPU count {value!r} is too precise (at most 9 decimals)")
    return int(nano)
