"""Merging of several stack files with Compose's override rules.

Mappings merge key by key; scalars of a later file replace earlier ones; ``command``,
``entrypoint`` and ``healthcheck.test`` are replaced whole; the unique resources merge by their
Compose Specification key — ports by (host IP, target, published, protocol), volumes by target,
secrets and configs by their target in the container (an entry of a later file replaces the earlier
entry with the same key); other lists are appended without duplicates.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from shoal.compose import model as m

_REPLACE_LISTS = {"command", "entrypoint", "test", "aliases"}


def _ref_target(r: m.FileRef) -> str:
    return r.target or r.source


_KEYED: dict[str, Callable[[Any], Any]] = {
    "ports": lambda p: (p.host_ip, p.target, p.published, p.protocol),
    "volumes": lambda v: v.target,
    "secrets": _ref_target,
    "configs": _ref_target,
}


def _merge_keyed(base: list[Any], over: list[Any], key: Callable[[Any], Any]) -> list[Any]:
    over_keys = {key(x) for x in over}
    kept = [x for x in base if key(x) not in over_keys]
    return kept + list(over)


def merge_value(name: str, base: Any, over: Any) -> Any:
    if over is None:
        return base
    if base is None:
        return over
    if dataclasses.is_dataclass(base) and type(base) is type(over):
        return merge_objects(base, over)
    if isinstance(base, dict) and isinstance(over, dict):
        out = dict(base)
        for k, v in over.items():
            out[k] = merge_value(k, base.get(k), v) if k in base and dataclasses.is_dataclass(v) else v
        return out
    if isinstance(base, list) and isinstance(over, list):
        if name in _REPLACE_LISTS:
            return list(over)
        if name in _KEYED:
            return _merge_keyed(base, over, _KEYED[name])
        if not over:
            return base
        out_l = list(base)
        for x in over:
            if x not in out_l:
                out_l.append(x)
        return out_l
    return over


def merge_objects(base: Any, over: Any) -> Any:
    """Merge two model objects of the same type; ``over`` wins. Neither input is modified."""
    changes: dict[str, Any] = {}
    for f in dataclasses.fields(base):
        if f.name in ("loc", "locs"):
            continue
        b, o = getattr(base, f.name), getattr(over, f.name)
        if f.name in ("working_dir", "files", "environment", "warnings") and isinstance(base, m.Project):
            continue
        if f.name == "name" and isinstance(base, m.Service):
            continue
        if f.name == "networks" and isinstance(base, m.Service):
            changes[f.name] = b if o is None else o if b is None else {**b, **o}
            continue
        if isinstance(o, (list, dict)) and not o and f.name not in _REPLACE_LISTS:
            changes[f.name] = b
            continue
        if isinstance(o, bool) and isinstance(b, bool) and f.default is not dataclasses.MISSING \
                and o == f.default and f.name not in over.locs:
            changes[f.name] = b
            continue
        if isinstance(o, str) and isinstance(b, str) and f.default is not dataclasses.MISSING \
                and o == f.default and f.name not in over.locs:
            changes[f.name] = b
            continue
        changes[f.name] = merge_value(f.name, b, o)
    out = dataclasses.replace(base, **changes)
    out.loc = base.loc
    out.locs = {**base.locs, **over.locs}
    return out


def merge_projects(projects: list[m.Project]) -> m.Project:
    result = projects[0]
    for p in projects[1:]:
        merged = merge_objects(result, p)
        merged.files = result.files + p.files
        for section in ("services", "networks", "volumes", "secrets", "configs"):
            b, o = getattr(result, section), getattr(p, section)
            combined = dict(b)
            for name, obj in o.items():
                combined[name] = merge_objects(b[name], obj) if name in b else obj
            setattr(merged, section, combined)
        result = merged
    return result
