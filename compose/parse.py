"""Validation of one interpolated stack file into the typed model (:mod:`shoal.compose.model`).

Every error is a :class:`ComposeError` naming the file, the line and the key path and saying what
is allowed. Options that ``docker stack deploy`` ignores are recorded in ``Collector`` so the
loader can print Docker's warnings; options it rejects are rejected.
"""

from __future__ import annotations

import difflib
import ipaddress
import os
import re
import shlex
import signal
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

from shoal.compose import model as m
from shoal.compose.envfile import read_env_file
from shoal.compose.errors import ComposeError, Loc
from shoal.compose.units import parse_bytes, parse_cpus, parse_duration
from shoal.compose.yamlsrc import CList, CMap

# Docker's lists (docker/cli cli/compose/types/types.go).
UNSUPPORTED = frozenset({
    "build", "cgroupns_mode", "cgroup_parent", "devices", "domainname", "external_links", "ipc",
    "links", "mac_address", "network_mode", "pid", "privileged", "restart", "security_opt",
    "shm_size", "userns_mode",
})
DEPRECATED = {
    "container_name": "Setting the container name is not supported.",
    "expose": "Exposing ports is unnecessary - services on the same network can access each other's "
              "containers on any port.",
}
FORBIDDEN = {
    "extends": "Support for `extends` is not implemented yet.",
    "volume_driver": "Instead of setting the volume driver on the service, define a volume using the "
                     "top-level `volumes` option and specify the driver there.",
    "volumes_from": "To share a volume between services, define it using the top-level `volumes` "
                    "option and reference it from each service that shares it using the service-level "
                    "`volumes` option.",
    "cpu_quota": "Set resource limits using deploy.resources",
    "cpu_shares": "Set resource limits using deploy.resources",
    "cpuset": "Set resource limits using deploy.resources",
    "mem_limit": "Set resource limits using deploy.resources",
    "memswap_limit": "Set resource limits using deploy.resources",
}
# Keys of the v3 format or the Compose Specification that have no meaning for a swarm service:
# read and ignored with the same warning as Docker's unsupported options.
IGNORED = frozenset({
    "credential_spec", "isolation", "oom_score_adj",
    "annotations", "attach", "blkio_config", "cgroup", "cpu_count", "cpu_percent", "cpu_period",
    "cpu_rt_period", "cpu_rt_runtime", "cpus", "develop", "device_cgroup_rules", "gpus", "label_file",
    "mem_reservation", "mem_swappiness", "models", "oom_kill_disable", "pids_limit", "platform",
    "post_start", "pre_stop", "profiles", "provider", "pull_policy", "pull_refresh_after", "runtime",
    "scale", "storage_opt", "use_api_socket", "uts",
})
SERVICE_KEYS = frozenset({
    "image", "command", "entrypoint", "environment", "env_file", "user", "working_dir", "hostname",
    "healthcheck", "stop_grace_period", "stop_signal", "tmpfs", "cap_add", "cap_drop", "sysctls",
    "ulimits", "dns", "dns_search", "dns_opt", "extra_hosts", "group_add", "init", "read_only", "tty",
    "stdin_open", "labels", "logging", "ports", "volumes", "secrets", "configs", "networks", "deploy",
    "depends_on",
})
ALL_SERVICE_KEYS = SERVICE_KEYS | UNSUPPORTED | set(DEPRECATED) | set(FORBIDDEN) | IGNORED
TOP_KEYS = ("version", "name", "services", "networks", "volumes", "secrets", "configs")

_NAME_RE = re.compile(r"^[a-zA-Z0-9][a-zA-Z0-9_.-]*$")
_LABEL_KEY_RE = re.compile(r"^[a-zA-Z0-9]([a-zA-Z0-9._/:-]*[a-zA-Z0-9])?$")
_HOST_LABEL_RE = re.compile(r"^[a-zA-Z0-9]([a-zA-Z0-9_-]{0,61}[a-zA-Z0-9])?$")
_SIGNALS = {s.name for s in signal.Signals} | {"SIGRTMIN", "SIGRTMAX"}
_PLACEMENT_KEYS = ("node.id", "node.hostname", "node.role", "node.platform.os", "node.platform.arch")
_PLACEMENT_HELP = ("node.id, node.hostname, node.role, node.platform.os, node.platform.arch, node.labels.NAME or "
                   "engine.labels.NAME")
MIN_NANO_CPUS = 1_000_000
MIN_MEMORY = 4 * 1024 * 1024
MIN_HEALTH_NS = 1_000_000


@dataclass
class Collector:
    """What the loader reports besides errors."""

    unsupported: set[str] = field(default_factory=set)
    deprecated: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def describe(value: Any) -> str:
    if value is None:
        return "nothing (null)"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return f'"{value}"' if len(value) <= 60 else f'"{value[:57]}..."'
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    return type(value).__name__


@dataclass
class V:
    """A value of the YAML tree with its key path and location."""

    value: Any
    path: str
    loc: Loc

    def fail(self, msg: str) -> NoReturn:
        raise ComposeError(msg, self.loc, self.path)

    def expected(self, what: str) -> NoReturn:
        self.fail(f"expected {what}, got {describe(self.value)}")

    def is_map(self) -> bool:
        return isinstance(self.value, dict)

    def is_list(self) -> bool:
        return isinstance(self.value, list)

    def child(self, key: str) -> V:
        d = self.value
        loc = d.locs.get(key, self.loc) if isinstance(d, CMap) else self.loc
        return V(d[key], f"{self.path}.{key}" if self.path else str(key), loc)

    def get(self, key: str) -> V | None:
        return self.child(key) if key in self.value else None

    def items(self) -> Iterator[tuple[str, V]]:
        for k in self.value:
            kv = self.child(k)
            if not isinstance(k, str):
                if isinstance(k, (int, float)) and not isinstance(k, bool):
                    yield str(k), kv
                    continue
                kv.fail(f"a key must be a string, got {describe(k)}")
            yield k, kv

    def elems(self) -> Iterator[V]:
        lst = self.value
        for i, item in enumerate(lst):
            loc = lst.locs[i] if isinstance(lst, CList) and i < len(lst.locs) else self.loc
            yield V(item, f"{self.path}[{i}]", loc)


# ---------------------------------------------------------------- scalar readers


def as_map(v: V, what: str = "a mapping") -> V:
    if not v.is_map():
        v.expected(what)
    return v


def check_keys(v: V, allowed: frozenset[str] | set[str] | tuple[str, ...], *, ignored: Mapping[str, Any] = (),
               col: Collector | None = None, warn_prefix: str = "") -> None:
    """Reject keys not in ``allowed`` (``x-`` extension keys are always allowed)."""
    as_map(v)
    for key, kv in v.items():
        if key in allowed or key.startswith("x-"):
            continue
        if key in ignored:
            if col is not None:
                col.unsupported.add(warn_prefix + key)
            continue
        close = difflib.get_close_matches(key, list(allowed), n=1)
        hint = f' (did you mean "{close[0]}"?)' if close else ""
        kv.fail(f"unknown option{hint}; allowed here: {', '.join(sorted(allowed))}")


def as_str(v: V, *, numbers: bool = True, what: str = "a string") -> str:
    x = v.value
    if isinstance(x, str):
        return x
    if numbers and isinstance(x, (int, float)) and not isinstance(x, bool):
        return str(x)
    v.expected(what)


def as_nonempty_str(v: V, what: str = "a non-empty string") -> str:
    s = as_str(v, what=what)
    if not s:
        v.expected(what)
    return s


INT64_MAX = 2**63 - 1
INT32_MAX = 2**31 - 1
MAX_DURATION_NS = 315_576_000_000 * 10**9      # what a protobuf Duration holds (10,000 years)


def _too_large(v: V, x: int, maximum: int) -> None:
    if x > maximum:
        v.fail(f"{x} is too large; at most {maximum} is allowed here")


def as_int(v: V, *, minimum: int | None = 0, what: str | None = None, maximum: int = INT64_MAX) -> int:
    what = what or ("a non-negative integer" if minimum == 0 else "an integer" if minimum is None
                    else f"an integer of at least {minimum}")
    x = v.value
    if isinstance(x, bool):
        v.expected(what)
    if isinstance(x, float) and x.is_integer():
        x = int(x)
    if isinstance(x, str) and re.fullmatch(r"[+-]?[0-9]+", x.strip()):
        x = int(x.strip())
    if not isinstance(x, int):
        v.expected(what)
    if minimum is not None and x < minimum:
        v.expected(what)
    if minimum is None and x < -INT64_MAX:
        v.expected(what)
    _too_large(v, x, maximum)
    return x


def as_float(v: V, *, minimum: float | None = 0.0, maximum: float | None = None, what: str = "a number") -> float:
    x = v.value
    if isinstance(x, bool):
        v.expected(what)
    if isinstance(x, str):
        try:
            x = float(x.strip())
        except ValueError:
            v.expected(what)
    if not isinstance(x, (int, float)) or x != x:
        v.expected(what)
    if (minimum is not None and x < minimum) or (maximum is not None and x > maximum):
        v.expected(what)
    return float(x)


def as_bool(v: V) -> bool:
    x = v.value
    if isinstance(x, bool):
        return x
    if isinstance(x, str) and x.strip().lower() in ("true", "false"):
        return x.strip().lower() == "true"
    v.expected("true or false")


def as_duration(v: V) -> int:
    x = v.value
    what = 'a duration such as "10s", "1m30s" or "1h"'
    if isinstance(x, str):
        try:
            ns = parse_duration(x)
        except ValueError:
            v.expected(what)
        if ns > MAX_DURATION_NS:
            v.fail(f'duration "{x}" is too long; at most 87600000h is allowed')
        return ns
    if isinstance(x, int) and not isinstance(x, bool) and x == 0:
        return 0
    v.expected(what)


def as_bytes(v: V) -> int:
    try:
        if isinstance(v.value, (int, str)):
            n = parse_bytes(v.value)
            _too_large(v, n, INT64_MAX)
            return n
    except ValueError:
        pass
    v.expected('a size in bytes such as 1024, "100k", "512m" or "1gb"')


def as_cpus(v: V) -> int:
    try:
        if isinstance(v.value, (int, float, str)) and not isinstance(v.value, bool):
            n = parse_cpus(v.value)
            _too_large(v, n, INT64_MAX)
            return n
    except ValueError as e:
        if "precise" in str(e):
            v.fail(str(e))
    v.expected('a number of CPUs such as 2 or "0.5"')


def as_mode(v: V) -> int:
    x = v.value
    if isinstance(x, str) and re.fullmatch(r"0?o?[0-7]{1,4}", x.strip()):
        return int(x.strip().replace("o", ""), 8)
    if isinstance(x, int) and not isinstance(x, bool) and 0 <= x <= 0o7777:
        return x
    v.expected('a file mode such as 0440 or "0440"')


def as_str_list(v: V, *, single: bool = True, what: str = "a list of strings") -> list[str]:
    if single and isinstance(v.value, str):
        return [v.value]
    if not v.is_list():
        v.expected(what + (" or a string" if single else ""))
    return [as_str(e) for e in v.elems()]


def as_command(v: V) -> list[str] | None:
    if v.value is None:
        return None
    if isinstance(v.value, str):
        try:
            return shlex.split(v.value)
        except ValueError as e:
            v.fail(f"cannot split the command into words: {e}")
    if v.is_list():
        return [as_str(e) for e in v.elems()]
    v.expected("a string or a list of strings")


def as_kv(v: V, *, sep: str = "=", none_ok: bool = False, what: str = "a mapping or a list of KEY=VALUE strings"
          ) -> dict[str, Any]:
    """A mapping or a list of ``KEY=VALUE`` strings (Compose's list-or-dict)."""
    out: dict[str, Any] = {}
    if v.is_map():
        for k, kv in v.items():
            x = kv.value
            if x is None:
                out[k] = None if none_ok else ""
            elif isinstance(x, bool):
                out[k] = "true" if x else "false"
            elif isinstance(x, (str, int, float)):
                out[k] = str(x)
            else:
                kv.expected("a string, a number, a boolean or null")
        return out
    if v.is_list():
        for e in v.elems():
            s = as_str(e)
            if sep in s:
                k, val = s.split(sep, 1)
                out[k] = val
            else:
                out[s] = None if none_ok else ""
        return out
    if v.value is None:
        return out
    v.expected(what)


def as_labels(v: V) -> dict[str, str]:
    labels = as_kv(v)
    for key in labels:
        if len(key) > 255 or not _LABEL_KEY_RE.match(key):
            v.fail(f'invalid label key "{key}"; use letters, digits, ".", "_", "-", "/" and ":", starting and '
                   "ending with a letter or digit")
    return labels


def as_ip(v: V, what: str = "an IP address") -> str:
    s = as_str(v).strip()
    try:
        ipaddress.ip_address(s)
    except ValueError:
        v.expected(what)
    return s


def as_hostname(v: V, s: str | None = None, what: str = "host name") -> str:
    s = as_str(v) if s is None else s
    if "{{" in s:          # Go templates ({{.Node.Hostname}}) are expanded per task
        return s
    if not s or len(s) > 253 or not all(_HOST_LABEL_RE.match(part) for part in s.split(".")):
        v.fail(f'"{s}" is not a valid {what}; use letters, digits and "-" in dot-separated parts of at most '
               "63 characters")
    return s


def as_str_map(v: V) -> dict[str, str]:
    out: dict[str, str] = {}
    if v.value is None:
        return out
    as_map(v)
    for k, kv in v.items():
        x = kv.value
        if isinstance(x, bool):
            out[k] = "true" if x else "false"
        elif isinstance(x, (str, int, float)):
            out[k] = str(x)
        elif x is None:
            out[k] = ""
        else:
            kv.expected("a string")
    return out


def _located(obj: Any, v: V) -> Any:
    obj.loc = v.loc
    if isinstance(v.value, CMap):
        obj.locs = {str(k): loc for k, loc in v.value.locs.items()}
    return obj


def _name(v: V, kind: str) -> str:
    s = as_str(v)
    if not _NAME_RE.match(s):
        v.fail(f'invalid {kind} name "{s}"; use letters, digits, "_", "." and "-", starting with a letter or digit')
    return s


# ---------------------------------------------------------------- the file


@dataclass
class FileContext:
    filename: str
    working_dir: Path
    environment: Mapping[str, str]
    col: Collector


def parse_file(doc: Any, ctx: FileContext) -> m.Project:
    top = V(doc, "", Loc(ctx.filename, 1))
    if doc is None:
        top.fail("the file is empty; a stack file needs at least a services: section")
    if not top.is_map():
        top.fail(f"expected a mapping at the top level (services:, networks:, ...), got {describe(doc)}")
    if "include" in doc:
        top.child("include").fail("include is not supported by stack deploy; pass every file with -f instead")
    check_keys(top, TOP_KEYS + ("models",), ignored={"models": 1}, col=ctx.col)
    project = m.Project(working_dir=str(ctx.working_dir), files=[ctx.filename], environment=dict(ctx.environment))
    _located(project, top)
    if (vv := top.get("version")) is not None:
        version = as_str(vv)
        if not re.fullmatch(r"3(\.\d+)?", version.strip()):
            vv.fail(f'unsupported Compose file version "{version}"; stack files use version 3.x or no '
                    "version at all (the Compose Specification)")
        project.version = version.strip()
    if (nv := top.get("name")) is not None:
        project.name = as_str(nv)
    for key, value in doc.items():
        if isinstance(key, str) and key.startswith("x-"):
            project.extensions[key] = value
    sv = top.get("services")
    if sv is not None and sv.value is not None:
        as_map(sv, "a mapping of service names to services")
        for name, s in sv.items():
            _name(V(name, s.path, s.loc), "service")
            project.services[name] = parse_service(name, s, ctx)
    for section, fn in (("networks", parse_network), ("volumes", parse_volume),
                        ("secrets", parse_secret), ("configs", parse_config)):
        sec = top.get(section)
        if sec is None or sec.value is None:
            continue
        as_map(sec, f"a mapping of {section} names to their options")
        target = getattr(project, section)
        for name, item in sec.items():
            if name.startswith("x-"):
                continue
            _name(V(name, item.path, item.loc), section[:-1])
            target[name] = fn(name, item, ctx)
    return project


# ---------------------------------------------------------------- services


def parse_service(name: str, v: V, ctx: FileContext) -> m.Service:
    if v.value is None:
        v.fail("a service needs options (at least image:)")
    as_map(v, "a mapping of service options")
    svc = _located(m.Service(name=name), v)
    forbidden = {k: FORBIDDEN[k] for k in v.value if k in FORBIDDEN}
    if forbidden:
        key = sorted(forbidden)[0]
        v.child(key).fail(f"not supported by stack deploy: {forbidden[key]}")
    for key, kv in v.items():
        if key.startswith("x-"):
            svc.extensions[key] = kv.value
            continue
        if key in UNSUPPORTED or key in IGNORED:
            ctx.col.unsupported.add(key)
            if key == "build":
                svc.build = kv.value if isinstance(kv.value, dict) else {"context": kv.value}
            elif key == "restart":
                svc.restart = _restart(kv)
            continue
        if key in DEPRECATED:
            ctx.col.deprecated[key] = DEPRECATED[key]
            continue
        if key not in SERVICE_KEYS:
            close = difflib.get_close_matches(key, sorted(ALL_SERVICE_KEYS), n=1)
            hint = f' (did you mean "{close[0]}"?)' if close else ""
            kv.fail(f"unknown service option{hint}; see the Compose file reference for the options a service takes")
        _SERVICE_FIELDS[key](svc, kv, ctx)
    env: dict[str, str | None] = {}
    if "env_file" in v.value:
        env.update(_env_files(v.child("env_file"), ctx))
    if "environment" in v.value:
        env.update(as_kv(v.child("environment"), none_ok=True))
    # A bare KEY takes its value from the environment the stack is deployed from (as Docker does);
    # when that does not have it either, it is left out (as docker compose does).
    where = v.child("environment") if "environment" in v.value else v.child("env_file") if "env_file" in v.value else v
    svc.environment = {}
    for k, val in env.items():
        if not k or any(ch.isspace() for ch in k) or "\x00" in k:
            where.fail(f'invalid variable name "{k}"; use KEY=VALUE with a KEY without spaces')
        if val is None:
            val = ctx.environment.get(k)
            if val is None:
                ctx.col.notes.append(f'{where.loc} {where.path}: "{k}" has no value and is not set in the '
                                     "environment; it is left out")
                continue
        svc.environment[k] = val
    return svc


def _restart(v: V) -> str:
    r = as_str(v).strip()
    if not re.fullmatch(r"no|always|unless-stopped|on-failure(:[0-9]+)?", r):
        v.fail(f'unknown restart policy "{r}"; allowed: "no", always, on-failure[:N], unless-stopped '
               "(better: deploy.restart_policy)")
    return r


def _env_files(v: V, ctx: FileContext) -> dict[str, str | None]:
    entries: list[tuple[V, str, bool]] = []
    if isinstance(v.value, str):
        entries.append((v, v.value, True))
    elif v.is_list():
        for e in v.elems():
            if isinstance(e.value, str):
                entries.append((e, e.value, True))
            elif e.is_map():
                check_keys(e, ("path", "required", "format"))
                if "path" not in e.value:
                    e.fail("an env_file entry needs path:")
                req = as_bool(e.child("required")) if "required" in e.value else True
                entries.append((e.child("path"), as_nonempty_str(e.child("path")), req))
            else:
                e.expected("a path or a mapping with path: and required:")
    else:
        v.expected("a path or a list of paths")
    out: dict[str, str | None] = {}
    for ev, p, required in entries:
        path = _resolve(ctx, p, ev)
        if not path.exists() and not required:
            continue
        out.update(read_env_file(path, ctx.environment, loc=ev.loc, key_path=ev.path))
    return out


def _resolve(ctx: FileContext, p: str, v: V) -> Path:
    if "\x00" in p:
        v.fail("a path cannot contain a NUL character")
    if p.startswith("~"):
        home = ctx.environment.get("HOME") or os.path.expanduser("~")
        p = home + p[1:]
    path = Path(p)
    return path if path.is_absolute() else ctx.working_dir / path


def _set(attr: str, reader: Any) -> Any:
    def apply(svc: m.Service, v: V, ctx: FileContext) -> None:
        setattr(svc, attr, reader(v))
    return apply


_DOMAIN = r"(?:[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?(?:\.[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?)*|\[[0-9a-fA-F:]+\])(?::[0-9]+)?"
_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_IMAGE_RE = re.compile(
    rf"^(?:{_DOMAIN}/)?{_COMPONENT}(?:/{_COMPONENT})*(?::[A-Za-z0-9_][A-Za-z0-9_.-]{{0,127}})?"
    r"(?:@[A-Za-z][A-Za-z0-9]*(?:[-_+.][A-Za-z][A-Za-z0-9]*)*:[0-9a-fA-F]{32,})?$"
)


def _image(svc: m.Service, v: V, ctx: FileContext) -> None:
    image = as_str(v).strip()
    if not image:
        v.fail("expected an image reference such as nginx:1.25 or registry:5000/app@sha256:…, got an empty string")
    if len(image) > 255 or not _IMAGE_RE.match(image):
        v.fail(f'invalid image reference "{image}"; use [registry/]repository[:tag][@digest] '
               "with a lower-case repository")
    svc.image = image


def _hostname(svc: m.Service, v: V, ctx: FileContext) -> None:
    svc.hostname = as_hostname(v)


def _working_dir(svc: m.Service, v: V, ctx: FileContext) -> None:
    d = as_str(v)
    if d and not d.startswith("/"):
        v.expected("an absolute path in the container")
    svc.working_dir = d


def _dns(svc: m.Service, v: V, ctx: FileContext) -> None:
    if isinstance(v.value, str):
        svc.dns = [as_ip(v, "an IP address of a DNS server")]
    elif v.is_list():
        svc.dns = [as_ip(e, "an IP address of a DNS server") for e in v.elems()]
    else:
        v.expected("an IP address or a list of them")


def _stop_signal(svc: m.Service, v: V, ctx: FileContext) -> None:
    sig = as_str(v)
    name = sig.upper() if sig.upper().startswith("SIG") else "SIG" + sig.upper()
    ok = (sig.isdigit() and 1 <= int(sig) <= 64) or name in _SIGNALS or re.match(r"^SIGRTM(IN|AX)[+-]\d+$", name)
    if not ok:
        v.expected('a signal name such as "SIGTERM" or a number 1-64')
    svc.stop_signal = sig


def _ports(svc: m.Service, v: V, ctx: FileContext) -> None:
    if not v.is_list():
        v.expected("a list of ports")
    for e in v.elems():
        svc.ports.extend(parse_port(e))


def _volumes(svc: m.Service, v: V, ctx: FileContext) -> None:
    if not v.is_list():
        v.expected("a list of volumes")
    svc.volumes = [parse_service_volume(e, ctx) for e in v.elems()]


def _file_refs(attr: str) -> Any:
    def apply(svc: m.Service, v: V, ctx: FileContext) -> None:
        if not v.is_list():
            v.expected(f"a list of {attr}")
        refs = []
        for e in v.elems():
            if isinstance(e.value, str):
                refs.append(_located(m.FileRef(source=e.value), e))
                continue
            check_keys(e, ("source", "target", "uid", "gid", "mode"))
            if "source" not in e.value:
                e.fail(f"a {attr[:-1]} reference needs source: (the name of a top-level {attr[:-1]})")
            ref = _located(m.FileRef(source=as_nonempty_str(e.child("source"))), e)
            if (t := e.get("target")) is not None:
                ref.target = as_nonempty_str(t)
                if ".." in ref.target.split("/"):
                    t.fail(f'"{ref.target}" contains ".."; give a plain file name or path')
            for key in ("uid", "gid"):
                if (u := e.get(key)) is not None:
                    setattr(ref, key, as_str(u))
                    if not getattr(ref, key).isdigit():
                        u.expected("a numeric id")
            if (mo := e.get("mode")) is not None:
                ref.mode = as_mode(mo)
                if ref.mode > 0o777:
                    mo.expected("a file mode of at most 0777")
            refs.append(ref)
        seen: dict[str, V] = {}
        for ref, e in zip(refs, v.elems(), strict=True):
            target = ref.target or ref.source
            if target in seen:
                e.fail(f'target "{target}" is used twice; give each {attr[:-1]} its own file')
            seen[target] = e
        setattr(svc, attr, refs)
    return apply


def _networks(svc: m.Service, v: V, ctx: FileContext) -> None:
    nets: dict[str, m.ServiceNetwork | None] = {}
    if v.is_list():
        for e in v.elems():
            nets[as_nonempty_str(e)] = None
    elif v.is_map():
        for name, nv in v.items():
            if nv.value is None:
                nets[name] = None
                continue
            check_keys(nv, ("aliases", "driver_opts"),
                       ignored={k: 1 for k in ("ipv4_address", "ipv6_address", "priority", "link_local_ips",
                                               "mac_address", "gw_priority", "interface_name")},
                       col=ctx.col, warn_prefix="networks.")
            sn = _located(m.ServiceNetwork(), nv)
            if (a := nv.get("aliases")) is not None:
                sn.aliases = as_str_list(a, single=False)
                for alias, av in zip(sn.aliases, a.elems(), strict=True):
                    as_hostname(av, alias, "network alias")
            if (a := nv.get("driver_opts")) is not None:
                sn.driver_opts = as_str_map(a)
            nets[name] = sn
    else:
        v.expected("a list of network names or a mapping of network names to options")
    svc.networks = nets


def _extra_hosts(svc: m.Service, v: V, ctx: FileContext) -> None:
    hosts: list[str] = []
    if v.is_map():
        for host, hv in v.items():
            ips = [as_ip(e) for e in (hv.elems() if hv.is_list() else [hv])]
            hosts.extend(f"{host}:{ip}" for ip in ips)
    elif v.is_list():
        for e in v.elems():
            s = as_str(e)
            sep_eq, sep_colon = s.find("="), s.find(":")
            cut = sep_eq if sep_eq >= 0 and (sep_colon < 0 or sep_eq < sep_colon) else sep_colon
            if cut <= 0 or cut == len(s) - 1:
                e.expected('"HOST:IP" or "HOST=IP"')
            host, ip = s[:cut], s[cut + 1:]
            if ip.startswith("[") and ip.endswith("]"):
                ip = ip[1:-1]
            as_ip(V(ip, e.path, e.loc), f'"HOST:IP" with an IP address (got "{s}")')
            hosts.append(f"{host}:{ip}")
    else:
        v.expected('a list of "HOST:IP" strings or a mapping of hosts to IPs')
    svc.extra_hosts = hosts


def _ulimits(svc: m.Service, v: V, ctx: FileContext) -> None:
    as_map(v, "a mapping of ulimit names to a number or to soft:/hard:")
    out: dict[str, m.Ulimit] = {}
    for name, uv in v.items():
        if not re.fullmatch(r"[a-z]+", name):
            uv.fail(f'unknown ulimit "{name}"; use a name such as nofile, nproc or memlock')
        if uv.is_map():
            check_keys(uv, ("soft", "hard"))
            if "soft" not in uv.value or "hard" not in uv.value:
                uv.fail("a ulimit mapping needs both soft: and hard:")
            soft = as_int(uv.child("soft"), minimum=-1)
            hard = as_int(uv.child("hard"), minimum=-1)
            if hard != -1 and soft > hard:
                uv.fail(f"soft limit {soft} is above hard limit {hard}")
            out[name] = _located(m.Ulimit(soft=soft, hard=hard), uv)
        else:
            n = as_int(uv, minimum=-1, what="a number or a mapping with soft: and hard:")
            out[name] = _located(m.Ulimit(soft=n, hard=n, single=True), uv)
    svc.ulimits = out


def _healthcheck(svc: m.Service, v: V, ctx: FileContext) -> None:
    check_keys(v, ("test", "interval", "timeout", "retries", "start_period", "start_interval", "disable"))
    hc = _located(m.Healthcheck(), v)
    if (t := v.get("test")) is not None:
        if isinstance(t.value, str):
            hc.test = ["CMD-SHELL", t.value]
        elif t.is_list():
            hc.test = [as_str(e) for e in t.elems()]
            if hc.test and hc.test[0] not in ("CMD", "CMD-SHELL", "NONE"):
                t.fail(f'a test list starts with "CMD", "CMD-SHELL" or "NONE", got "{hc.test[0]}"')
            if hc.test and hc.test[0] in ("CMD", "CMD-SHELL") and len(hc.test) < 2:
                t.fail(f'"{hc.test[0]}" needs a command after it')
        else:
            t.expected("a string or a list such as [\"CMD\", \"curl\", \"-f\", \"http://localhost\"]")
    for key in ("interval", "timeout", "start_period", "start_interval"):
        if (d := v.get(key)) is not None:
            ns = as_duration(d)
            if 0 < ns < MIN_HEALTH_NS:
                d.fail("too short; give 0 (the default) or at least 1ms")
            setattr(hc, key, ns)
    if (r := v.get("retries")) is not None:
        hc.retries = as_int(r, maximum=INT32_MAX)
    if (d := v.get("disable")) is not None:
        hc.disable = as_bool(d)
        if hc.disable and hc.test and hc.test != ["NONE"]:
            d.fail("disable: true and test: cannot be set together; remove one of them")
    svc.healthcheck = hc


def _sysctls(svc: m.Service, v: V) -> None:
    out = {k: ("" if x is None else x) for k, x in as_kv(v).items()}
    for key in out:
        if not re.fullmatch(r"[a-z0-9_.\-/]+", key):
            v.fail(f'invalid sysctl "{key}"; use a dotted kernel parameter such as net.core.somaxconn')
    svc.sysctls = out


def _caps(svc: m.Service, attr: str, v: V) -> None:
    caps = as_str_list(v, single=False)
    for cap, e in zip(caps, v.elems(), strict=True):
        if not re.fullmatch(r"(CAP_)?[A-Z_]+", cap, re.IGNORECASE):
            e.expected("a capability such as NET_ADMIN, CAP_SYS_TIME or ALL")
    setattr(svc, attr, caps)


def _logging(svc: m.Service, v: V, ctx: FileContext) -> None:
    check_keys(v, ("driver", "options"))
    lg = _located(m.Logging(), v)
    if (d := v.get("driver")) is not None:
        lg.driver = as_nonempty_str(d)
    if (o := v.get("options")) is not None:
        lg.options = as_str_map(o)
    svc.logging = lg


def _tmpfs(svc: m.Service, v: V, ctx: FileContext) -> None:
    paths = as_str_list(v)
    for p, e in zip(paths, v.elems() if v.is_list() else [v], strict=False):
        if not p.startswith("/"):
            e.fail(f'expected an absolute path in the container (optionally ":size=64m,mode=1777"), got "{p}"')
    svc.tmpfs = paths


def _depends_on(svc: m.Service, v: V, ctx: FileContext) -> None:
    if v.is_list():
        svc.depends_on = [as_str(e) for e in v.elems()]
    elif v.is_map():
        for name, dv in v.items():
            if dv.value is not None:
                check_keys(dv, ("condition", "restart", "required"))
            svc.depends_on.append(name)
    else:
        v.expected("a list of service names or a mapping of service names to conditions")


def _deploy(svc: m.Service, v: V, ctx: FileContext) -> None:
    if v.value is None:
        return
    svc.deploy = parse_deploy(v, ctx)


_SERVICE_FIELDS: dict[str, Any] = {
    "image": _image,
    "command": _set("command", as_command),
    "entrypoint": _set("entrypoint", as_command),
    "environment": lambda svc, v, ctx: as_kv(v, none_ok=True),   # applied after env_file
    "env_file": lambda svc, v, ctx: None,                        # applied in parse_service
    "user": _set("user", as_str),
    "working_dir": _working_dir,
    "hostname": _hostname,
    "healthcheck": _healthcheck,
    "stop_grace_period": _set("stop_grace_period", as_duration),
    "stop_signal": _stop_signal,
    "tmpfs": _tmpfs,
    "cap_add": lambda svc, v, ctx: _caps(svc, "cap_add", v),
    "cap_drop": lambda svc, v, ctx: _caps(svc, "cap_drop", v),
    "sysctls": lambda svc, v, ctx: _sysctls(svc, v),
    "ulimits": _ulimits,
    "dns": _dns,
    "dns_search": _set("dns_search", as_str_list),
    "dns_opt": _set("dns_opt", lambda v: as_str_list(v, single=False)),
    "extra_hosts": _extra_hosts,
    "group_add": _set("group_add", lambda v: as_str_list(v, single=False)),
    "init": _set("init", as_bool),
    "read_only": _set("read_only", as_bool),
    "tty": _set("tty", as_bool),
    "stdin_open": _set("stdin_open", as_bool),
    "labels": _set("labels", as_labels),
    "logging": _logging,
    "ports": _ports,
    "volumes": _volumes,
    "secrets": _file_refs("secrets"),
    "configs": _file_refs("configs"),
    "networks": _networks,
    "deploy": _deploy,
    "depends_on": _depends_on,
}


# ---------------------------------------------------------------- ports

_PORT_SHORT = re.compile(
    r"^(?:(?P<ip>\[[0-9a-fA-F:.]+\]|[0-9]{1,3}(?:\.[0-9]{1,3}){3}):)?"
    r"(?:(?P<pub>\d+(?:-\d+)?)?:)?(?P<target>\d+(?:-\d+)?)(?:/(?P<proto>[a-zA-Z]+))?$"
)


def _port_range(v: V, text: str) -> list[int]:
    m = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", text)
    if m is None:
        v.fail(f'invalid port "{text}"; expected a port number 1-65535 or a range such as "8000-8010"')
    a = int(m.group(1))
    b = int(m.group(2)) if m.group(2) else a
    if not (1 <= a <= 65535 and 1 <= b <= 65535) or b < a:
        v.fail(f'port "{text}" is out of range; ports are 1-65535 and ranges are written low-high')
    return list(range(a, b + 1))


def _protocol(v: V, proto: str) -> str:
    p = proto.lower()
    if p not in ("tcp", "udp", "sctp"):
        v.fail(f'unknown protocol "{proto}"; allowed: tcp, udp, sctp')
    return p


def parse_port(v: V) -> list[m.Port]:
    x = v.value
    if isinstance(x, int) and not isinstance(x, bool):
        return [_located(m.Port(target=t), v) for t in _port_range(v, str(x))]
    if isinstance(x, str):
        mm = _PORT_SHORT.match(x.strip())
        if mm is None:
            v.fail(f'invalid port "{x}"; expected [[IP:]PUBLISHED:]TARGET[/PROTOCOL] such as "8080:80" or '
                   '"53:53/udp", or the long syntax with target:')
        targets = _port_range(v, mm.group("target"))
        pubs = _port_range(v, mm.group("pub")) if mm.group("pub") else []
        proto = _protocol(v, mm.group("proto") or "tcp")
        ip = (mm.group("ip") or "").strip("[]")
        if pubs and len(pubs) != len(targets):
            v.fail(f'published range and target range of "{x}" differ in length; give both the same number of ports')
        return [
            _located(m.Port(target=t, published=pubs[i] if pubs else None, protocol=proto, host_ip=ip), v)
            for i, t in enumerate(targets)
        ]
    if v.is_map():
        check_keys(v, ("target", "published", "protocol", "mode", "name", "host_ip", "app_protocol"))
        if "target" not in v.value:
            v.fail("a port in long syntax needs target: (the port inside the container)")
        target = as_int(v.child("target"), minimum=1, what="a port number 1-65535")
        if target > 65535:
            v.child("target").expected("a port number 1-65535")
        port = _located(m.Port(target=target), v)
        if (p := v.get("published")) is not None and p.value not in (None, ""):
            if isinstance(p.value, str) and "-" in p.value:
                rng = _port_range(p, p.value)
                if len(rng) != 1:
                    p.fail("a published range needs the short syntax (\"8000-8001:80-81\") in a stack file")
                port.published = rng[0]
            else:
                port.published = as_int(p, minimum=0, what="a port number 0-65535")
                if port.published > 65535:
                    p.expected("a port number 0-65535")
        if (p := v.get("protocol")) is not None:
            port.protocol = _protocol(p, as_str(p))
        if (p := v.get("mode")) is not None:
            mode = as_str(p)
            if mode not in ("ingress", "host"):
                p.fail(f'unknown publish mode "{mode}"; allowed: ingress, host')
            port.mode = mode
        if (p := v.get("name")) is not None:
            port.name = as_str(p)
        if (p := v.get("host_ip")) is not None:
            port.host_ip = as_str(p)
        return [port]
    v.expected('a port ("8080:80", 80) or a mapping with target:')


# ---------------------------------------------------------------- volumes

_PROPAGATIONS = ("shared", "rshared", "slave", "rslave", "private", "rprivate")


def parse_service_volume(v: V, ctx: FileContext) -> m.ServiceVolume:
    if isinstance(v.value, str):
        return _short_volume(v, ctx)
    if not v.is_map():
        v.expected('a volume ("data:/var/lib/data", "./conf:/etc/app:ro") or a mapping with type:, source:, target:')
    check_keys(v, ("type", "source", "target", "read_only", "bind", "volume", "tmpfs", "consistency"))
    if "type" not in v.value:
        v.fail("a volume in long syntax needs type: (volume, bind or tmpfs)")
    tv = v.child("type")
    vtype = as_str(tv)
    if vtype not in ("volume", "bind", "tmpfs"):
        tv.fail(f'volume type "{vtype}" is not supported by stack deploy; allowed: volume, bind, tmpfs')
    if "target" not in v.value:
        v.fail("a volume needs target: (the path in the container)")
    target = as_nonempty_str(v.child("target"))
    if not target.startswith("/"):
        v.child("target").expected("an absolute path in the container")
    vol = _located(m.ServiceVolume(type=vtype, target=target), v)
    if (s := v.get("source")) is not None and s.value is not None:
        vol.source = as_str(s)
    if (r := v.get("read_only")) is not None:
        vol.read_only = as_bool(r)
    if (c := v.get("consistency")) is not None:
        vol.consistency = as_str(c)
    for opt in ("bind", "volume", "tmpfs"):
        if opt in v.value and opt != vtype:
            v.child(opt).fail(f"{opt} options do not go with type: {vtype}")
    if (b := v.get("bind")) is not None:
        check_keys(b, ("propagation", "create_host_path", "selinux"))
        bo = _located(m.BindOpts(), b)
        if (p := b.get("propagation")) is not None:
            bo.propagation = as_str(p)
            if bo.propagation not in _PROPAGATIONS:
                p.fail(f'unknown propagation "{bo.propagation}"; allowed: {", ".join(_PROPAGATIONS)}')
        if (p := b.get("create_host_path")) is not None:
            bo.create_host_path = as_bool(p)
        if (p := b.get("selinux")) is not None:
            bo.selinux = as_str(p)
        vol.bind = bo
    if (b := v.get("volume")) is not None:
        check_keys(b, ("nocopy", "subpath"))
        vo = _located(m.VolumeOpts(), b)
        if (p := b.get("nocopy")) is not None:
            vo.nocopy = as_bool(p)
        if (p := b.get("subpath")) is not None:
            vo.subpath = as_str(p)
        vol.volume = vo
    if (b := v.get("tmpfs")) is not None:
        check_keys(b, ("size", "mode"))
        to = _located(m.TmpfsOpts(), b)
        if (p := b.get("size")) is not None:
            to.size = as_bytes(p)
        if (p := b.get("mode")) is not None:
            to.mode = as_mode(p)
        vol.tmpfs = to
    if vtype == "bind":
        if not vol.source:
            v.fail("a bind mount needs source: (a path on the host)")
        vol.source = str(_resolve(ctx, vol.source, v))
    if vtype == "tmpfs" and vol.source:
        v.child("source").fail("a tmpfs mount takes no source:")
    return vol


def _short_volume(v: V, ctx: FileContext) -> m.ServiceVolume:
    spec = v.value.strip()
    parts = spec.split(":")
    if not spec or len(parts) > 3 or any(p == "" for p in parts):
        v.fail(f'invalid volume "{spec}"; expected [SOURCE:]TARGET[:MODE] such as "data:/var/lib/data" '
               'or "./conf:/etc/app:ro"')
    mode_opts: list[str] = []
    if len(parts) == 1:
        source, target = "", parts[0]
    elif len(parts) == 2 and not parts[1].startswith("/") and parts[0].startswith("/"):
        source, target, mode_opts = "", parts[0], parts[1].split(",")
    elif len(parts) == 2:
        source, target = parts
    else:
        source, target = parts[0], parts[1]
        mode_opts = parts[2].split(",")
    if not target.startswith("/"):
        v.fail(f'invalid volume "{spec}": the target "{target}" must be an absolute path in the container')
    vol = _located(m.ServiceVolume(type="volume", target=target, source=source), v)
    for opt in mode_opts:
        if opt == "ro":
            vol.read_only = True
        elif opt == "rw":
            vol.read_only = False
        elif opt in ("z", "Z"):
            vol.bind = vol.bind or _located(m.BindOpts(), v)
            vol.bind.selinux = opt
        elif opt == "nocopy":
            vol.volume = _located(m.VolumeOpts(nocopy=True), v)
        elif opt in _PROPAGATIONS:
            vol.bind = vol.bind or _located(m.BindOpts(), v)
            vol.bind.propagation = opt
        elif opt in ("consistent", "cached", "delegated"):
            vol.consistency = opt
        else:
            v.fail(f'unknown volume mode "{opt}" in "{spec}"; allowed: ro, rw, z, Z, nocopy, '
                   f'{", ".join(_PROPAGATIONS)}, consistent, cached, delegated')
    if source and (source.startswith((".", "/", "~"))):
        vol.type = "bind"
        vol.source = str(_resolve(ctx, source, v))
        if vol.volume is not None:
            v.fail(f'"nocopy" in "{spec}" only applies to named volumes')
    else:
        if vol.bind is not None and vol.bind.propagation:
            v.fail(f'propagation in "{spec}" only applies to bind mounts (a host path starting with ".", "/" or "~")')
        vol.bind = None
    return vol


# ---------------------------------------------------------------- deploy


def parse_deploy(v: V, ctx: FileContext) -> m.Deploy:
    check_keys(v, ("mode", "replicas", "endpoint_mode", "labels", "placement", "resources", "restart_policy",
                   "update_config", "rollback_config"))
    d = _located(m.Deploy(), v)
    if (x := v.get("mode")) is not None:
        mode = as_str(x)
        if mode in ("replicated-job", "global-job"):
            x.fail(f'mode "{mode}" (jobs) is not supported by Shoal; allowed: replicated, global')
        if mode not in ("replicated", "global"):
            x.fail(f'unknown mode "{mode}"; allowed: replicated, global')
        d.mode = mode
    if (x := v.get("replicas")) is not None:
        d.replicas = as_int(x)
        if d.mode == "global":
            x.fail("replicas can only be used with replicated mode; remove replicas: or use mode: replicated")
    if (x := v.get("endpoint_mode")) is not None:
        em = as_str(x).lower()
        if em not in ("vip", "dnsrr"):
            x.fail(f'unknown endpoint_mode "{em}"; allowed: vip, dnsrr')
        d.endpoint_mode = em
    if (x := v.get("labels")) is not None:
        d.labels = as_labels(x)
    if (x := v.get("placement")) is not None:
        d.placement = _placement(x)
    if (x := v.get("resources")) is not None:
        d.resources = _resources(x, ctx)
    if (x := v.get("restart_policy")) is not None:
        check_keys(x, ("condition", "delay", "max_attempts", "window"))
        rp = _located(m.RestartPolicy(), x)
        if (c := x.get("condition")) is not None:
            cond = as_str(c)
            if cond not in ("none", "on-failure", "any"):
                c.fail(f'unknown condition "{cond}"; allowed: none, on-failure, any')
            rp.condition = cond
        if (c := x.get("delay")) is not None:
            rp.delay = as_duration(c)
        if (c := x.get("max_attempts")) is not None:
            rp.max_attempts = as_int(c)
        if (c := x.get("window")) is not None:
            rp.window = as_duration(c)
        d.restart_policy = rp
    for key in ("update_config", "rollback_config"):
        if (x := v.get(key)) is not None:
            setattr(d, key, _update_config(x))
    if d.rollback_config is not None and d.rollback_config.failure_action == "rollback":
        v.child("rollback_config").child("failure_action").fail(
            'a rollback cannot roll back; allowed here: pause, continue')
    return d


_CONSTRAINT = re.compile(r"^\s*[A-Za-z0-9_.\-]+(?:\.[^=!\s]+)?\s*(==|!=)\s*\S.*$")


def _placement(v: V) -> m.Placement:
    check_keys(v, ("constraints", "preferences", "max_replicas_per_node"))
    p = _located(m.Placement(), v)
    if (c := v.get("constraints")) is not None:
        for e in c.elems() if c.is_list() else [c]:
            s = as_str(e)
            if not _CONSTRAINT.match(s):
                e.fail(f'invalid constraint "{s}"; expected KEY==VALUE or KEY!=VALUE such as '
                       '"node.role==manager" or "node.labels.zone==a"')
            op = "==" if "==" in s else "!="
            key, _, value = s.partition(op)
            key, value = key.strip(), value.strip()
            if not _placement_key(key):
                e.fail(f'unknown constraint key "{key}"; allowed: {_PLACEMENT_HELP}')
            if "==" in value or "!=" in value:
                e.fail(f'constraint "{s}" has more than one operator; give one KEY==VALUE per entry')
            if key.lower() == "node.role" and value.lower() not in ("manager", "worker"):
                e.fail(f'node.role is manager or worker, got "{value}"')
            p.constraints.append(s.strip())
    if (c := v.get("preferences")) is not None:
        if not c.is_list():
            c.expected("a list of {spread: node.labels.KEY}")
        for e in c.elems():
            check_keys(e, ("spread",))
            if "spread" not in e.value:
                e.fail("a placement preference needs spread: (such as node.labels.zone)")
            spread = as_nonempty_str(e.child("spread"))
            if not _placement_key(spread):
                e.child("spread").fail(f'cannot spread over "{spread}"; allowed: {_PLACEMENT_HELP}')
            p.preferences.append(spread)
    if (c := v.get("max_replicas_per_node")) is not None:
        p.max_replicas_per_node = as_int(c)
    return p


def _placement_key(key: str) -> bool:
    low = key.lower()
    if not re.fullmatch(r"[a-z_][a-z0-9\-_.]+", low):
        return False
    return low in _PLACEMENT_KEYS or any(
        low.startswith(prefix) and len(low) > len(prefix) for prefix in ("node.labels.", "engine.labels."))


def _resources(v: V, ctx: FileContext) -> m.Resources:
    check_keys(v, ("limits", "reservations"))
    r = _located(m.Resources(), v)
    if (x := v.get("limits")) is not None:
        check_keys(x, ("cpus", "memory", "pids"))
        r.limits = _resource_set(x)
    if (x := v.get("reservations")) is not None:
        check_keys(x, ("cpus", "memory", "generic_resources"), ignored={"devices": 1}, col=ctx.col,
                   warn_prefix="deploy.resources.reservations.")
        r.reservations = _resource_set(x)
        if (g := x.get("generic_resources")) is not None:
            if not g.is_list():
                g.expected("a list of {discrete_resource_spec: {kind: ..., value: ...}}")
            for e in g.elems():
                check_keys(e, ("discrete_resource_spec",))
                if "discrete_resource_spec" not in e.value:
                    e.fail("a generic resource needs discrete_resource_spec: {kind:, value:}")
                spec = e.child("discrete_resource_spec")
                check_keys(spec, ("kind", "value"))
                if "kind" not in spec.value or "value" not in spec.value:
                    spec.fail("discrete_resource_spec needs kind: and value:")
                r.reservations.generic_resources.append(_located(
                    m.GenericResource(kind=as_nonempty_str(spec.child("kind")),
                                      value=as_int(spec.child("value"), minimum=1)),
                    e))
    return r


def _resource_set(v: V) -> m.ResourceSet:
    rs = _located(m.ResourceSet(), v)
    if (c := v.get("cpus")) is not None:
        rs.cpus = as_cpus(c)
        if 0 < rs.cpus < MIN_NANO_CPUS:
            c.fail("too small; give at least 0.001 CPU")
    if (c := v.get("memory")) is not None:
        rs.memory = as_bytes(c)
        if 0 < rs.memory < MIN_MEMORY:
            c.fail("too small; give at least 4MiB (\"4m\")")
    if (c := v.get("pids")) is not None:
        rs.pids = as_int(c)
    return rs


def _update_config(v: V) -> m.UpdateConfig:
    check_keys(v, ("parallelism", "delay", "failure_action", "monitor", "max_failure_ratio", "order"))
    u = _located(m.UpdateConfig(), v)
    if (c := v.get("parallelism")) is not None:
        u.parallelism = as_int(c)
    if (c := v.get("delay")) is not None:
        u.delay = as_duration(c)
    if (c := v.get("failure_action")) is not None:
        fa = as_str(c)
        if fa not in ("pause", "continue", "rollback"):
            c.fail(f'unknown failure_action "{fa}"; allowed: pause, continue, rollback')
        u.failure_action = fa
    if (c := v.get("monitor")) is not None:
        u.monitor = as_duration(c)
    if (c := v.get("max_failure_ratio")) is not None:
        u.max_failure_ratio = as_float(c, minimum=0.0, maximum=1.0, what="a number from 0 to 1")
    if (c := v.get("order")) is not None:
        o = as_str(c)
        if o not in ("stop-first", "start-first"):
            c.fail(f'unknown order "{o}"; allowed: stop-first, start-first')
        u.order = o
    return u


# ---------------------------------------------------------------- top-level objects


def _external(v: V) -> tuple[bool, str | None]:
    if v.is_map():
        check_keys(v, ("name",))
        return True, as_nonempty_str(v.child("name")) if "name" in v.value else None
    return as_bool(v), None


def _body(v: V) -> V:
    if v.value is None:
        return V(CMap(loc=v.loc), v.path, v.loc)
    return as_map(v, "a mapping of options (or nothing)")


def parse_network(name: str, v: V, ctx: FileContext) -> m.Network:
    v = _body(v)
    check_keys(v, ("name", "driver", "driver_opts", "external", "internal", "attachable", "ipam", "labels"),
               ignored={"enable_ipv6": 1, "enable_ipv4": 1}, col=ctx.col, warn_prefix=f"networks.{name}.")
    n = _located(m.Network(), v)
    n.extensions = {k: x for k, x in v.value.items() if isinstance(k, str) and k.startswith("x-")}
    if (x := v.get("name")) is not None:
        n.name = _name(x, "network")
    if (x := v.get("driver")) is not None:
        n.driver = as_nonempty_str(x)
        if n.driver not in ("overlay",):
            x.fail(f"network driver \"{n.driver}\" cannot carry swarm services; use driver: overlay or remove driver:")
    if (x := v.get("driver_opts")) is not None:
        n.driver_opts = as_str_map(x)
    if (x := v.get("internal")) is not None:
        n.internal = as_bool(x)
    if (x := v.get("attachable")) is not None:
        n.attachable = as_bool(x)
    if (x := v.get("labels")) is not None:
        n.labels = as_labels(x)
    if (x := v.get("ipam")) is not None:
        check_keys(x, ("driver", "config", "options"))
        ipam = _located(m.Ipam(), x)
        if (d := x.get("driver")) is not None:
            ipam.driver = as_nonempty_str(d)
        if (c := x.get("config")) is not None:
            if not c.is_list():
                c.expected("a list of {subnet: ...}")
            for e in c.elems():
                check_keys(e, ("subnet", "ip_range", "gateway", "aux_addresses"))
                ic = _located(m.IpamConfig(), e)
                for key, attr in (("subnet", "subnet"), ("ip_range", "ip_range"), ("gateway", "gateway")):
                    if (s := e.get(key)) is not None:
                        setattr(ic, attr, _cidr_or_ip(s, key))
                ipam.config.append(ic)
        n.ipam = ipam
    if (x := v.get("external")) is not None:
        n.external, ext_name = _external(x)
        if ext_name is not None:
            ctx.col.notes.append(f"network {name}: network.external.name is deprecated in favor of network.name")
            if n.name is not None:
                x.fail("external.name and name conflict; only use name:")
            n.name = ext_name
        if n.external:
            for key in ("driver", "driver_opts", "ipam", "internal", "attachable", "labels"):
                if key in v.value:
                    v.child(key).fail(f'conflicting options "external" and "{key}"; an external network '
                                      "is created outside the stack")
            n.name = n.name or name
    return n


def _cidr_or_ip(v: V, key: str) -> str:
    import ipaddress

    s = as_str(v)
    try:
        if key == "gateway":
            ipaddress.ip_address(s)
        else:
            ipaddress.ip_network(s, strict=False)
    except ValueError:
        v.expected("an IP address" if key == "gateway" else 'a subnet in CIDR form such as "10.20.0.0/24"')
    return s


def parse_volume(name: str, v: V, ctx: FileContext) -> m.Volume:
    v = _body(v)
    check_keys(v, ("name", "driver", "driver_opts", "external", "labels"), ignored={"x-cluster-spec": 1},
               col=ctx.col, warn_prefix=f"volumes.{name}.")
    vol = _located(m.Volume(), v)
    vol.extensions = {k: x for k, x in v.value.items() if isinstance(k, str) and k.startswith("x-")}
    if (x := v.get("name")) is not None:
        vol.name = _name(x, "volume")
    if (x := v.get("driver")) is not None:
        vol.driver = as_nonempty_str(x)
    if (x := v.get("driver_opts")) is not None:
        vol.driver_opts = as_str_map(x)
    if (x := v.get("labels")) is not None:
        vol.labels = as_labels(x)
    if (x := v.get("external")) is not None:
        vol.external, ext_name = _external(x)
        if ext_name is not None:
            ctx.col.notes.append(f"volume {name}: volume.external.name is deprecated in favor of volume.name")
            if vol.name is not None:
                x.fail("external.name and name conflict; only use name:")
            vol.name = ext_name
        if vol.external:
            for key in ("driver", "driver_opts", "labels"):
                if key in v.value:
                    v.child(key).fail(f'conflicting options "external" and "{key}"; an external volume '
                                      "is created outside the stack")
            vol.name = vol.name or name
    return vol


def _file_object(kind: str, name: str, v: V, ctx: FileContext) -> m.FileObject:
    v = _body(v)
    allowed = ["name", "file", "environment", "external", "labels"] + (["content"] if kind == "config" else [])
    check_keys(v, tuple(allowed), ignored={"template_driver": 1, "driver_opts": 1}, col=ctx.col,
               warn_prefix=f"{kind}s.{name}.")
    if "driver" in v.value:
        v.child("driver").fail(f"{kind} drivers are not supported by Shoal; give file: or environment: instead")
    obj = _located(m.FileObject(), v)
    obj.extensions = {k: x for k, x in v.value.items() if isinstance(k, str) and k.startswith("x-")}
    if (x := v.get("name")) is not None:
        obj.name = as_nonempty_str(x)
    if (x := v.get("labels")) is not None:
        obj.labels = as_labels(x)
    if (x := v.get("file")) is not None:
        obj.file = str(_resolve(ctx, as_nonempty_str(x), x))
    if (x := v.get("environment")) is not None:
        obj.environment = as_nonempty_str(x)
    if (x := v.get("content")) is not None:
        obj.content = as_str(x)
    if (x := v.get("external")) is not None:
        obj.external, ext_name = _external(x)
        if ext_name is not None:
            ctx.col.notes.append(f"{kind} {name}: {kind}.external.name is deprecated in favor of {kind}.name")
            if obj.name is not None:
                x.fail("external.name and name conflict; only use name:")
            obj.name = ext_name
    sources = [k for k in ("file", "environment", "content") if k in v.value] + (["external"] if obj.external else [])
    if len(sources) > 1:
        v.child(sources[1]).fail(f"a {kind} takes only one of file:, environment:"
                                 f"{', content:' if kind == 'config' else ''} or external: true")
    if not sources:
        v.fail(f"a {kind} needs file:, environment:{' content:' if kind == 'config' else ''} or external: true")
    if obj.external:
        obj.name = obj.name or name
    return obj


def parse_secret(name: str, v: V, ctx: FileContext) -> m.FileObject:
    return _file_object("secret", name, v, ctx)


def parse_config(name: str, v: V, ctx: FileContext) -> m.FileObject:
    return _file_object("config", name, v, ctx)
