"""Variable interpolation in stack files: ``$VAR``, ``${VAR}``, ``${VAR:-default}``, ``${VAR-default}``,
``${VAR:?err}``, ``${VAR?err}``, ``${VAR:+alt}``, ``${VAR+alt}`` and ``$$`` (a literal ``$``).
Defaults may themselves hold interpolations (``${A:-${B}}``)."""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any

from shoal.compose.errors import ComposeError, Loc
from shoal.compose.yamlsrc import CList, CMap

_NAME = re.compile(r"[_a-zA-Z][_a-zA-Z0-9]*")


class InterpolationError(ValueError):
    pass


def substitute(text: str, env: Mapping[str, str], missing: Callable[[str], None] | None = None) -> str:
    """Substitute variables in one string; raises InterpolationError with a one-line reason."""
    out: list[str] = []
    pos, n = 0, len(text)
    while pos < n:
        c = text[pos]
        if c != "$":
            nxt_dollar = text.find("$", pos)
            stop = n if nxt_dollar < 0 else nxt_dollar
            out.append(text[pos:stop])
            pos = stop
            continue
        if pos + 1 >= n:
            raise InterpolationError("a lone '$' at the end; write '$$' for a literal '$'")
        nxt = text[pos + 1]
        if nxt == "$":
            out.append("$")
            pos += 2
            continue
        if nxt == "{":
            value, pos = _braced(text, pos + 2, env, missing)
            out.append(value)
            continue
        m = _NAME.match(text, pos + 1)
        if m is None:
            raise InterpolationError(f"invalid interpolation at '{text[pos:pos + 2]}'; write '$$' for a literal '$'")
        out.append(_lookup(m.group(0), env, missing))
        pos = m.end()
    return "".join(out)


def _lookup(name: str, env: Mapping[str, str], missing: Callable[[str], None] | None) -> str:
    if name in env:
        return env[name]
    if missing is not None:
        missing(name)
    return ""


def _closing(text: str, pos: int) -> int:
    """Index of the '}' closing a '${' whose argument starts at pos (nested '${…}' allowed)."""
    depth, i, n = 0, pos, len(text)
    while i < n:
        c = text[i]
        if c == "$" and i + 1 < n and text[i + 1] in "${":
            if text[i + 1] == "{":
                depth += 1
            i += 2
            continue
        if c == "}":
            if depth == 0:
                return i
            depth -= 1
        i += 1
    raise InterpolationError("'${' is never closed with '}'")


def _braced(
    text: str, pos: int, env: Mapping[str, str], missing: Callable[[str], None] | None
) -> tuple[str, int]:
    m = _NAME.match(text, pos)
    if m is None:
        raise InterpolationError(f"invalid variable name in '${{{text[pos:pos + 10]}'")
    name = m.group(0)
    pos = m.end()
    if pos >= len(text):
        raise InterpolationError(f"'${{{name}' is never closed with '}}'")
    if text[pos] == "}":
        return _lookup(name, env, missing), pos + 1
    for op in (":-", ":?", ":+", "-", "?", "+"):
        if text.startswith(op, pos):
            break
    else:
        raise InterpolationError(
            f"invalid interpolation '${{{name}{text[pos:pos + 3]}'; allowed: ${{{name}}}, "
            f"${{{name}:-default}}, ${{{name}-default}}, ${{{name}:?error}}, ${{{name}?error}}"
        )
    arg_start = pos + len(op)
    arg_end = _closing(text, arg_start)
    raw_arg = text[arg_start:arg_end]
    after = arg_end + 1
    is_set = name in env
    is_nonempty = is_set and env[name] != ""
    if op in (":-", "-"):
        if is_nonempty or (op == "-" and is_set):
            return env[name], after
        return substitute(raw_arg, env, missing), after
    if op in (":?", "?"):
        if is_nonempty or (op == "?" and is_set):
            return env[name], after
        reason = substitute(raw_arg, env, None)
        raise InterpolationError(
            f"required variable {name} is missing a value: {reason}" if reason
            else f"required variable {name} is missing a value"
        )
    if is_nonempty or (op == "+" and is_set):
        return substitute(raw_arg, env, missing), after
    return "", after


def interpolate_tree(value: Any, env: Mapping[str, str], path: str, loc: Loc,
                     missing: Callable[[str, str, Loc], None] | None = None,
                     _memo: dict[int, Any] | None = None) -> Any:
    """Return a copy of a YAML tree with every string value interpolated (keys are left alone).

    A mapping or list reached several times through YAML aliases is copied once, so alias-heavy
    documents stay cheap.
    """
    memo = {} if _memo is None else _memo
    if isinstance(value, (CMap, CList)) and id(value) in memo:
        return memo[id(value)]
    if isinstance(value, CMap):
        out = CMap(loc=value.loc)
        memo[id(value)] = out
        for k, v in value.items():
            kloc = value.locs.get(k, loc)
            out[k] = interpolate_tree(v, env, f"{path}.{k}" if path else str(k), kloc, missing, memo)
            out.locs[k] = kloc
        return out
    if isinstance(value, CList):
        out_l = CList(loc=value.loc)
        memo[id(value)] = out_l
        for i, v in enumerate(value):
            iloc = value.locs[i] if i < len(value.locs) else loc
            out_l.append(interpolate_tree(v, env, f"{path}[{i}]", iloc, missing, memo))
            out_l.locs.append(iloc)
        return out_l
    if isinstance(value, str) and "$" in value:
        report = None if missing is None else (lambda name: missing(name, path, loc))
        try:
            return substitute(value, env, report)
        except InterpolationError as e:
            raise ComposeError(f"{e} (in {value!r})", loc, path) from None
    return value
