"""The normalised form of a loaded project as a plain dict in Compose Specification layout (long
syntax everywhere, durations as strings): what ``docker compose config`` would print. Useful for
``stack config``-style output and to cross-check the loader against the official schema."""

from __future__ import annotations

from dataclasses import fields, is_dataclass
from typing import Any

from shoal.compose import model as m
from shoal.compose.units import format_duration

_DURATIONS = {"interval", "timeout", "start_period", "start_interval", "stop_grace_period", "delay", "window",
              "monitor"}


def _cpus(nano: int) -> str:
    return f"{nano / 1e9:g}"


def _clean(d: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in d.items() if v is not None and v != [] and v != {}}


def _obj(o: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for f in fields(o):
        if f.name in ("loc", "locs", "extensions"):
            continue
        v = getattr(o, f.name)
        if v is None:
            continue
        if f.name in _DURATIONS and isinstance(v, int):
            v = format_duration(v)
        elif f.name == "cpus" and isinstance(v, int):
            v = _cpus(v)
        elif is_dataclass(v):
            v = _obj(v)
        elif isinstance(v, list):
            v = [_obj(x) if is_dataclass(x) else x for x in v]
        out[f.name] = v
    out.update(getattr(o, "extensions", {}) or {})
    return _clean(out)


def _service(s: m.Service) -> dict[str, Any]:
    d: dict[str, Any] = {
        "image": s.image,
        "command": s.command,
        "entrypoint": s.entrypoint,
        "environment": dict(s.environment) or None,
        "user": s.user,
        "working_dir": s.working_dir,
        "hostname": s.hostname,
        "healthcheck": _obj(s.healthcheck) if s.healthcheck else None,
        "stop_grace_period": format_duration(s.stop_grace_period) if s.stop_grace_period is not None else None,
        "stop_signal": s.stop_signal,
        "tmpfs": s.tmpfs,
        "cap_add": s.cap_add,
        "cap_drop": s.cap_drop,
        "sysctls": s.sysctls,
        "ulimits": {n: (u.soft if u.single else {"soft": u.soft, "hard": u.hard}) for n, u in s.ulimits.items()},
        "dns": s.dns,
        "dns_search": s.dns_search,
        "dns_opt": s.dns_opt,
        "extra_hosts": s.extra_hosts,
        "group_add": s.group_add,
        "init": s.init,
        "read_only": s.read_only,
        "tty": s.tty,
        "stdin_open": s.stdin_open,
        "labels": s.labels,
        "logging": _obj(s.logging) if s.logging else None,
        "ports": [_clean({"name": p.name or None, "target": p.target, "published": p.published,
                          "host_ip": p.host_ip or None, "protocol": p.protocol, "mode": p.mode}) for p in s.ports],
        "volumes": [_volume(v) for v in s.volumes],
        "secrets": [_obj(r) for r in s.secrets],
        "configs": [_obj(r) for r in s.configs],
        "networks": None if s.networks is None else {
            n: (_obj(sn) or None) if sn is not None else None for n, sn in s.networks.items()},
        "deploy": _deploy(s.deploy) if s.deploy else None,
        "depends_on": s.depends_on,
        "restart": s.restart,
    }
    d.update(s.extensions)
    return _clean(d)


def _volume(v: m.ServiceVolume) -> dict[str, Any]:
    d = _obj(v)
    if v.read_only is False:
        d.pop("read_only", None)
    if not v.source:
        d.pop("source", None)
    return d


def _deploy(d: m.Deploy) -> dict[str, Any]:
    out = _obj(d)
    if d.placement is not None:
        out["placement"] = _clean({
            "constraints": d.placement.constraints,
            "preferences": [{"spread": p} for p in d.placement.preferences],
            "max_replicas_per_node": d.placement.max_replicas_per_node,
        })
    if d.resources is not None:
        res: dict[str, Any] = {}
        for key in ("limits", "reservations"):
            rs = getattr(d.resources, key)
            if rs is None:
                continue
            res[key] = _clean({
                "cpus": _cpus(rs.cpus) if rs.cpus is not None else None,
                "memory": None if rs.memory is None else str(rs.memory),
                "pids": rs.pids,
                "generic_resources": [{"discrete_resource_spec": {"kind": g.kind, "value": g.value}}
                                      for g in rs.generic_resources],
            })
        out["resources"] = res
    return _clean(out)


def _top(o: Any) -> dict[str, Any] | None:
    d = _obj(o)
    if d.get("external") is False:
        d.pop("external")
    return d or None


def to_dict(project: m.Project) -> dict[str, Any]:
    """The project as a Compose Specification document (plain dicts, lists, strings and numbers)."""
    out: dict[str, Any] = {}
    if project.name:
        out["name"] = project.name
    out["services"] = {n: _service(s) for n, s in project.services.items()}
    for section in ("networks", "volumes", "secrets", "configs"):
        table = getattr(project, section)
        if table:
            out[section] = {n: _top(o) for n, o in table.items()}
    out.update(project.extensions)
    return out
