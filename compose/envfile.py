"""``.env`` / ``--env-file`` / service ``env_file:`` parsing (Compose's dotenv dialect)."""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path

from shoal.compose.errors import ComposeError, Loc
from shoal.compose.interpolate import InterpolationError, substitute

_KEY = re.compile(r"^\s*(?:export\s+)?([A-Za-z_][A-Za-z0-9_.\-]*)\s*(=?)")
_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "\\": "\\", '"': '"', "$": "$"}


def parse_env_text(text: str, filename: str, lookup: Mapping[str, str] | None = None,
                   interpolate: bool = True) -> dict[str, str | None]:
    """Parse dotenv text into an ordered mapping; a bare ``KEY`` maps to None (taken from the environment).

    ``lookup`` is used to interpolate ``${VAR}`` in unquoted and double-quoted values (variables
    defined earlier in the same file are visible too).
    """
    result: dict[str, str | None] = {}
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        lineno = i + 1
        i += 1
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        m = _KEY.match(line)
        if m is None:
            raise ComposeError(f"invalid line {stripped[:40]!r}; expected KEY=VALUE", Loc(filename, lineno))
        key, eq = m.group(1), m.group(2)
        rest = line[m.end():]
        if not eq:
            if rest.strip() and not rest.strip().startswith("#"):
                raise ComposeError(f"invalid line {stripped[:40]!r}; expected KEY=VALUE", Loc(filename, lineno))
            result[key] = None
            continue
        rest = rest.lstrip()
        scope = dict(lookup or {})
        scope.update({k: v for k, v in result.items() if v is not None})
        if rest[:1] in ("'", '"'):
            quote = rest[0]
            body = rest[1:]
            while True:
                end = _find_close(body, quote)
                if end >= 0:
                    break
                if i >= len(lines):
                    raise ComposeError(f"value of {key} opens a {quote} quote that is never closed",
                                       Loc(filename, lineno))
                body += "\n" + lines[i]
                i += 1
            value = body[:end]
            if quote == '"':
                value = re.sub(r"\\(.)", lambda mm: _ESCAPES.get(mm.group(1), "\\" + mm.group(1)), value)
                value = _interp(value, scope, filename, lineno, interpolate)
            result[key] = value
            continue
        value = re.split(r"\s+#", rest, maxsplit=1)[0].strip()
        result[key] = _interp(value, scope, filename, lineno, interpolate)
    return result


def _find_close(body: str, quote: str) -> int:
    i = 0
    while i < len(body):
        if body[i] == "\\" and quote == '"':
            i += 2
            continue
        if body[i] == quote:
            return i
        i += 1
    return -1


def _interp(value: str, scope: Mapping[str, str], filename: str, lineno: int, enabled: bool) -> str:
    if not enabled or "$" not in value:
        return value
    try:
        return substitute(value, scope)
    except InterpolationError as e:
        raise ComposeError(str(e), Loc(filename, lineno)) from None


def read_env_file(path: Path, lookup: Mapping[str, str] | None = None, *, shown: str | None = None,
                  loc: Loc | None = None, key_path: str = "") -> dict[str, str | None]:
    """Read one env file; a missing/unreadable file is a ComposeError pointing at ``loc``."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise ComposeError(f"cannot read env file {str(path)!r}: {e.strerror or e}", loc, key_path) from None
    except UnicodeDecodeError:
        raise ComposeError(f"env file {str(path)!r} is not UTF-8 text", loc, key_path) from None
    return parse_env_text(text, shown or str(path), lookup)
