"""Docker's ServiceSpec JSON (Engine API 1.41) and Shoal's `specs_pb2.ServiceSpec`, both ways.

    spec = spec_from_json(doc)          # a POST /services/create or /services/{id}/update body
    doc = spec_json(spec)               # the `Spec` (and `PreviousSpec`) of a Service
    doc = task_spec_json(task_spec)     # a Task's `Spec` (Docker's TaskTemplate)
    fill_defaults(doc)                  # `?insertDefaults=true`: what Shoal does when a field is unset

Contracts:
* Round trip: `spec_from_json(spec_json(s)) == s` for every spec whose fields all have a Docker
  counterpart (everything but `ContainerSpec.pull_options`, which Docker carries in the
  `X-Registry-Auth` header, `NetworkAttachmentConfig.addresses` and `limits.generic`). Message fields
  keep their presence: an empty `"Placement": {}` is a set, empty `placement` and comes back as `{}`;
  a key left out is an unset field. So the Spec the CLI reads and posts back unchanged is the spec
  Shoal stored, and the manager sees no change where there is none.
* What Docker's JSON has and Shoal's spec has not (jobs, plugins, Privileges, Isolation other than
  default, ...) is refused with a 400 naming the field (`Spec.TaskTemplate.ContainerSpec.Privileges
  .SELinuxContext ...`) when it is set to anything but its empty/default value; empty or default values
  (the CLI sends many) are accepted. A key the facade does not know at all is treated the same way.
* Wrong JSON types are a 400 naming the field and the type wanted. The manager's own validation
  (image, constraints, mounts, ...) runs on the result and answers 400 with its own sentence.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from shoal.engineapi.convert import ns, set_ns
from shoal.engineapi.server import APIError
from shoal.proto import specs_pb2, types_pb2

RESTART = {"any": types_pb2.RestartPolicy.ANY, "on-failure": types_pb2.RestartPolicy.ON_FAILURE,
           "none": types_pb2.RestartPolicy.NONE}
FAILURE_ACTION = {"pause": types_pb2.UpdateConfig.PAUSE, "continue": types_pb2.UpdateConfig.CONTINUE,
                  "rollback": types_pb2.UpdateConfig.ROLLBACK}
ORDER = {"stop-first": types_pb2.UpdateConfig.STOP_FIRST, "start-first": types_pb2.UpdateConfig.START_FIRST}
PROTOCOL = {"tcp": types_pb2.PortConfig.TCP, "udp": types_pb2.PortConfig.UDP, "sctp": types_pb2.PortConfig.SCTP}
PUBLISH_MODE = {"ingress": types_pb2.PortConfig.INGRESS, "host": types_pb2.PortConfig.HOST}
ENDPOINT_MODE = {"vip": types_pb2.EndpointSpec.VIP, "dnsrr": types_pb2.EndpointSpec.DNSRR}
MOUNT_TYPE = {"bind": types_pb2.Mount.BIND, "volume": types_pb2.Mount.VOLUME, "tmpfs": types_pb2.Mount.TMPFS}

# ?insertDefaults=true: Shoal's behaviour for an unset field, in Docker's words
DEFAULT_UPDATE = {"Parallelism": 1, "FailureAction": "pause", "Monitor": 5_000_000_000, "MaxFailureRatio": 0,
                  "Order": "stop-first"}
DEFAULT_STOP_GRACE_NS = 10_000_000_000
DEFAULT_RESTART = {"Condition": "any", "Delay": 5_000_000_000, "MaxAttempts": 0}


def _name(d: Mapping[int, str], v: int) -> str:
    return {x: k for k, x in d.items()}[v]


# ---- Docker JSON -> Shoal ------------------------------------------------------------------------
def _empty(v: Any) -> bool:
    """Docker's zero value: what an unset field looks like on the wire."""
    if v is None or v is False or v == 0 or v == "" or v == []:
        return True
    if isinstance(v, dict):
        return all(_empty(x) for x in v.values())
    return False


class _Obj:
    """One JSON object being read: typed getters that name the field in their 400, and a final check
    that every key left unread is empty (Docker fields Shoal has not). Keys match as dockerd's Go
    decoder matches them: exactly, else ignoring case (the docker SDK for Python sends
    `{"replicated": {"Replicas": 2}}` as a service's Mode)."""

    def __init__(self, doc: Any, path: str) -> None:
        if doc is None:
            doc = {}
        if not isinstance(doc, dict):
            raise APIError(400, f"{path} must be a JSON object, got {_show(doc)}")
        self.doc, self.path, self.seen = doc, path, set()
        self._folded = {k.lower(): k for k in doc if isinstance(k, str)}

    def _key(self, key: str) -> str:
        return key if key in self.doc else self._folded.get(key.lower(), key)

    def has(self, key: str) -> bool:
        """The key is there and not null (a message field: present, even when empty)."""
        return self.doc.get(self._key(key)) is not None

    def raw(self, key: str) -> Any:
        k = self._key(key)
        self.seen.add(k)
        return self.doc.get(k)

    def at(self, key: str) -> str:
        return f"{self.path}.{key}"

    def obj(self, key: str) -> _Obj:
        return _Obj(self.raw(key), self.at(key))

    def str(self, key: str) -> str:
        v = self.raw(key)
        if v is None:
            return ""
        if not isinstance(v, str):
            raise APIError(400, f"{self.at(key)} must be a string, got {_show(v)}")
        return v

    def bool(self, key: str) -> bool:
        v = self.raw(key)
        if v is None:
            return False
        if not isinstance(v, bool):
            raise APIError(400, f"{self.at(key)} must be true or false, got {_show(v)}")
        return v

    def int(self, key: str, minimum: int | None = 0) -> int:
        v = self.raw(key)
        if v is None:
            return 0
        if isinstance(v, bool) or not isinstance(v, int) or (minimum is not None and v < minimum):
            what = "a non-negative integer" if minimum == 0 else "an integer"
            raise APIError(400, f"{self.at(key)} must be {what}, got {_show(v)}")
        return v

    def float(self, key: str) -> float:
        v = self.raw(key)
        if v is None:
            return 0.0
        if isinstance(v, bool) or not isinstance(v, int | float):
            raise APIError(400, f"{self.at(key)} must be a number, got {_show(v)}")
        return float(v)

    def strs(self, key: str) -> list[str]:
        v = self.raw(key)
        if v is None:
            return []
        if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
            raise APIError(400, f"{self.at(key)} must be a list of strings, got {_show(v)}")
        return v

    def map(self, key: str) -> dict[str, str]:
        v = self.raw(key)
        if v is None:
            return {}
        if not isinstance(v, dict) or not all(isinstance(x, str) for x in v.values()):
            raise APIError(400, f"{self.at(key)} must be an object of string values, got {_show(v)}")
        return v

    def objs(self, key: str) -> list[_Obj]:
        v = self.raw(key)
        if v is None:
            return []
        if not isinstance(v, list):
            raise APIError(400, f"{self.at(key)} must be a list of objects, got {_show(v)}")
        return [_Obj(x, f"{self.at(key)}[{i}]") for i, x in enumerate(v)]

    def enum(self, key: str, table: Mapping[str, int], default: str) -> int:
        v = self.str(key) or default
        if v not in table:
            raise APIError(400, f"{self.at(key)} {v!r} is invalid: use one of {', '.join(sorted(table))}")
        return table[v]

    def unsupported(self, key: str, fix: str, allowed: Callable[[Any], bool] = _empty) -> None:
        """A Docker field Shoal has not: accepted when empty (or `allowed`), a 400 otherwise."""
        v = self.raw(key)
        if not allowed(v):
            raise APIError(400, f"{self.at(key)} is not supported by Shoal (got {_show(v)}): {fix}")

    def done(self) -> None:
        for key in self.doc:
            if key not in self.seen and not _empty(self.doc[key]):
                raise APIError(400, f"{self.at(key)} is not a field Shoal knows in Docker Engine API 1.41 "
                                    f"(got {_show(self.doc[key])}): leave it out")


def _show(v: Any) -> str:
    import json

    s = json.dumps(v) if not isinstance(v, str) else repr(v)
    return s if len(s) <= 60 else s[:57] + "..."


def _dur(o: _Obj, key: str, parent: Any, field: str) -> None:
    v = o.raw(key)
    if v is not None:
        set_ns(getattr(parent, field), v, o.at(key))


def spec_from_json(doc: Any) -> specs_pb2.ServiceSpec:
    """A Docker ServiceSpec (the body of service create/update) as Shoal's; 400 on what Shoal cannot do."""
    o = _Obj(doc, "Spec")
    spec = specs_pb2.ServiceSpec()
    spec.annotations.name = o.str("Name")
    spec.annotations.labels.update(o.map("Labels"))
    task_spec_from_json(o.raw("TaskTemplate"), spec.task, "Spec.TaskTemplate")
    mode = o.obj("Mode")
    if mode.has("Global"):
        if mode.has("Replicated"):
            raise APIError(400, "Spec.Mode has both Replicated and Global: give one")
        mode.obj("Global").done()
        getattr(spec, "global").SetInParent()  # `global` is a Python keyword
    else:
        rep = mode.obj("Replicated")
        spec.replicated.replicas = rep.int("Replicas") if rep.has("Replicas") else 1
        rep.done()
    for job in ("ReplicatedJob", "GlobalJob"):
        mode.unsupported(job, "Shoal has no jobs; run the work as a Replicated service with RestartPolicy "
                              "Condition none", allowed=lambda v: v is None)
    mode.done()
    for key, field in (("UpdateConfig", "update"), ("RollbackConfig", "rollback")):
        if o.has(key):
            _update_config(o.obj(key), getattr(spec, field), key == "RollbackConfig")
        else:
            o.raw(key)
    if o.has("EndpointSpec"):
        e = o.obj("EndpointSpec")
        spec.endpoint.SetInParent()
        spec.endpoint.mode = e.enum("Mode", ENDPOINT_MODE, "vip")
        for p in e.objs("Ports"):
            spec.endpoint.ports.append(_port_from_json(p))
        e.done()
    o.unsupported("Networks", "list the networks in Spec.TaskTemplate.Networks (the top-level field is deprecated)")
    o.done()
    return spec


def _update_config(o: _Obj, u: types_pb2.UpdateConfig, rollback: bool) -> None:
    u.SetInParent()
    u.parallelism = o.int("Parallelism")
    _dur(o, "Delay", u, "delay")
    table = {k: v for k, v in FAILURE_ACTION.items() if not rollback or k != "rollback"}
    u.failure_action = o.enum("FailureAction", table, "pause")
    _dur(o, "Monitor", u, "monitor")
    ratio = o.float("MaxFailureRatio")
    if not 0 <= ratio <= 1:
        raise APIError(400, f"{o.at('MaxFailureRatio')} must be between 0 and 1, got {ratio}")
    u.max_failure_ratio = ratio
    u.order = o.enum("Order", ORDER, "stop-first")
    o.done()


def _port_from_json(p: _Obj) -> types_pb2.PortConfig:
    pc = types_pb2.PortConfig(name=p.str("Name"), protocol=p.enum("Protocol", PROTOCOL, "tcp"),
                              target_port=p.int("TargetPort"), published_port=p.int("PublishedPort"),
                              publish_mode=p.enum("PublishMode", PUBLISH_MODE, "ingress"))
    for key in ("TargetPort", "PublishedPort"):
        if getattr(pc, "target_port" if key == "TargetPort" else "published_port") > 65535:
            raise APIError(400, f"{p.at(key)} must be a port number of at most 65535")
    p.done()
    return pc


def task_spec_from_json(doc: Any, t: types_pb2.TaskSpec, path: str) -> None:
    o = _Obj(doc, path)
    c = o.obj("ContainerSpec")
    _container_from_json(c, t.container)
    t.container.SetInParent()
    o.unsupported("PluginSpec", "Shoal runs containers only; give a ContainerSpec")
    o.unsupported("NetworkAttachmentSpec", "Shoal runs containers only; give a ContainerSpec")
    runtime = o.str("Runtime")
    if runtime not in ("", "container"):
        raise APIError(400, f"{o.at('Runtime')} {runtime!r} is not supported by Shoal: use container (or leave it out)")
    if o.has("Resources"):
        r = o.obj("Resources")
        t.resources.SetInParent()
        if r.has("Limits"):
            lim = r.obj("Limits")
            t.resources.limits.SetInParent()
            t.resources.limits.nano_cpus = lim.int("NanoCPUs")
            t.resources.limits.memory_bytes = lim.int("MemoryBytes")
            t.resources.pids_limit = lim.int("Pids")
            lim.done()
        else:
            r.raw("Limits")
        if r.has("Reservations"):
            res = r.obj("Reservations")
            t.resources.reservations.SetInParent()
            t.resources.reservations.nano_cpus = res.int("NanoCPUs")
            t.resources.reservations.memory_bytes = res.int("MemoryBytes")
            for g in res.objs("GenericResources"):
                g.unsupported("NamedResourceSpec", "Shoal counts discrete resources only; use DiscreteResourceSpec")
                d = g.obj("DiscreteResourceSpec")
                t.resources.reservations.generic.append(
                    types_pb2.GenericResource(kind=d.str("Kind"), value=d.int("Value")))
                d.done()
                g.done()
            res.done()
        else:
            r.raw("Reservations")
        r.done()
    else:
        o.raw("Resources")
    if o.has("RestartPolicy"):
        r = o.obj("RestartPolicy")
        t.restart.SetInParent()
        t.restart.condition = r.enum("Condition", RESTART, "any")
        _dur(r, "Delay", t.restart, "delay")
        t.restart.max_attempts = r.int("MaxAttempts")
        _dur(r, "Window", t.restart, "window")
        r.done()
    else:
        o.raw("RestartPolicy")
    if o.has("Placement"):
        p = o.obj("Placement")
        t.placement.SetInParent()
        t.placement.constraints.extend(p.strs("Constraints"))
        for pref in p.objs("Preferences"):
            s = pref.obj("Spread")
            t.placement.preferences.append(types_pb2.PlacementPreference(spread_descriptor=s.str("SpreadDescriptor")))
            s.done()
            pref.done()
        t.placement.max_replicas = p.int("MaxReplicas")
        for pl in p.objs("Platforms"):
            t.placement.platforms.append(types_pb2.Platform(architecture=pl.str("Architecture"), os=pl.str("OS")))
            pl.done()
        p.done()
    else:
        o.raw("Placement")
    for n in o.objs("Networks"):
        att = t.networks.add(target=n.str("Target"), aliases=n.strs("Aliases"))
        att.driver_attachment_opts.update(n.map("DriverOpts"))
        n.done()
    if o.has("LogDriver"):
        ld = o.obj("LogDriver")
        t.log_driver.SetInParent()
        t.log_driver.name = ld.str("Name")
        t.log_driver.options.update(ld.map("Options"))
        ld.done()
    else:
        o.raw("LogDriver")
    t.force_update = o.int("ForceUpdate")
    o.done()


def _container_from_json(o: _Obj, c: types_pb2.ContainerSpec) -> None:
    c.image = o.str("Image")
    c.labels.update(o.map("Labels"))
    c.command.extend(o.strs("Command"))
    c.args.extend(o.strs("Args"))
    c.hostname = o.str("Hostname")
    c.env.extend(o.strs("Env"))
    c.dir = o.str("Dir")
    c.user = o.str("User")
    c.groups.extend(o.strs("Groups"))
    c.tty = o.bool("TTY")
    c.open_stdin = o.bool("OpenStdin")
    c.read_only = o.bool("ReadOnly")
    for m in o.objs("Mounts"):
        c.mounts.append(_mount_from_json(m))
    _dur(o, "StopGracePeriod", c, "stop_grace_period")
    c.stop_signal = o.str("StopSignal")
    if o.has("Healthcheck"):
        h = o.obj("Healthcheck")
        c.healthcheck.SetInParent()
        c.healthcheck.test.extend(h.strs("Test"))
        _dur(h, "Interval", c.healthcheck, "interval")
        _dur(h, "Timeout", c.healthcheck, "timeout")
        c.healthcheck.retries = h.int("Retries")
        _dur(h, "StartPeriod", c.healthcheck, "start_period")
        _dur(h, "StartInterval", c.healthcheck, "start_interval")
        h.done()
    else:
        o.raw("Healthcheck")
    c.hosts.extend(o.strs("Hosts"))
    if o.has("DNSConfig"):
        d = o.obj("DNSConfig")
        c.dns_config.SetInParent()
        c.dns_config.nameservers.extend(d.strs("Nameservers"))
        c.dns_config.search.extend(d.strs("Search"))
        c.dns_config.options.extend(d.strs("Options"))
        d.done()
    else:
        o.raw("DNSConfig")
    for kind, refs in (("Secret", c.secrets), ("Config", c.configs)):
        for r in o.objs(f"{kind}s"):
            ref = refs.add()
            setattr(ref, f"{kind.lower()}_id", r.str(f"{kind}ID"))
            setattr(ref, f"{kind.lower()}_name", r.str(f"{kind}Name"))
            if r.has("File"):
                f = r.obj("File")
                ref.file.SetInParent()
                ref.file.name = f.str("Name")
                ref.file.uid = f.str("UID")
                ref.file.gid = f.str("GID")
                ref.file.mode = f.int("Mode")
                f.done()
            else:
                r.raw("File")
            if kind == "Config":
                r.unsupported("Runtime", "Shoal mounts configs as files; give File")
            r.done()
    init = o.raw("Init")
    if init is not None:
        if not isinstance(init, bool):
            raise APIError(400, f"{o.at('Init')} must be true or false, got {_show(init)}")
        c.init = init
    c.sysctls.update(o.map("Sysctls"))
    c.capability_add.extend(o.strs("CapabilityAdd"))
    c.capability_drop.extend(o.strs("CapabilityDrop"))
    for u in o.objs("Ulimits"):
        c.ulimits.append(types_pb2.Ulimit(name=u.str("Name"), soft=u.int("Soft", None), hard=u.int("Hard", None)))
        u.done()
    priv = o.obj("Privileges")
    for key in list(priv.doc):
        priv.unsupported(key, "Shoal's containers run with its default confinement; leave Privileges empty")
    priv.done()
    iso = o.str("Isolation")
    if iso not in ("", "default"):
        raise APIError(400, f"{o.at('Isolation')} {iso!r} is not supported by Shoal: use default (or leave it out)")
    o.done()


def _mount_from_json(o: _Obj) -> types_pb2.Mount:
    m = types_pb2.Mount(type=o.enum("Type", MOUNT_TYPE, "volume"), source=o.str("Source"), target=o.str("Target"),
                        readonly=o.bool("ReadOnly"))
    cons = o.str("Consistency")
    if cons not in ("", "default", "consistent"):
        raise APIError(400, f"{o.at('Consistency')} {cons!r} is not supported by Shoal: use default (or leave it out)")
    if o.has("BindOptions"):
        b = o.obj("BindOptions")
        m.bind_options.SetInParent()
        m.bind_options.propagation = b.str("Propagation")
        for key in ("NonRecursive", "CreateMountpoint", "ReadOnlyNonRecursive", "ReadOnlyForceRecursive"):
            b.unsupported(key, "Shoal's bind mounts are recursive onto an existing path; leave it false")
        b.done()
    else:
        o.raw("BindOptions")
    if o.has("VolumeOptions"):
        v = o.obj("VolumeOptions")
        m.volume_options.SetInParent()
        m.volume_options.nocopy = v.bool("NoCopy")
        m.volume_options.labels.update(v.map("Labels"))
        if v.has("DriverConfig"):
            d = v.obj("DriverConfig")
            m.volume_options.driver_config.SetInParent()
            m.volume_options.driver_config.name = d.str("Name")
            m.volume_options.driver_config.options.update(d.map("Options"))
            d.done()
        else:
            v.raw("DriverConfig")
        v.unsupported("Subpath", "Shoal mounts the whole volume; leave Subpath empty")
        v.done()
    else:
        o.raw("VolumeOptions")
    if o.has("TmpfsOptions"):
        t = o.obj("TmpfsOptions")
        m.tmpfs_options.SetInParent()
        m.tmpfs_options.size_bytes = t.int("SizeBytes")
        m.tmpfs_options.mode = t.int("Mode")
        t.unsupported("Options", "Shoal's tmpfs takes SizeBytes and Mode only")
        t.done()
    else:
        o.raw("TmpfsOptions")
    o.done()
    return m


# ---- Shoal -> Docker JSON --------------------------------------------------------------------------
def _put(out: dict[str, Any], key: str, value: Any) -> None:
    """Docker's omitempty: only non-empty values."""
    if value or value is True:
        out[key] = value


def spec_json(spec: specs_pb2.ServiceSpec) -> dict[str, Any]:
    out: dict[str, Any] = {"Name": spec.annotations.name, "Labels": dict(sorted(spec.annotations.labels.items())),
                           "TaskTemplate": task_spec_json(spec.task)}
    if spec.WhichOneof("mode") == "global":
        out["Mode"] = {"Global": {}}
    else:
        out["Mode"] = {"Replicated": {"Replicas": spec.replicated.replicas}}
    for key, field in (("UpdateConfig", "update"), ("RollbackConfig", "rollback")):
        if spec.HasField(field):
            out[key] = _update_config_json(getattr(spec, field))
    if spec.HasField("endpoint"):
        out["EndpointSpec"] = endpoint_spec_json(spec.endpoint)
    return out


def endpoint_spec_json(e: types_pb2.EndpointSpec) -> dict[str, Any]:
    out: dict[str, Any] = {"Mode": _name(ENDPOINT_MODE, e.mode)}
    if e.ports:
        out["Ports"] = [port_json(p) for p in e.ports]
    return out


def port_json(p: types_pb2.PortConfig) -> dict[str, Any]:
    out: dict[str, Any] = {}
    _put(out, "Name", p.name)
    out.update({"Protocol": _name(PROTOCOL, p.protocol), "TargetPort": p.target_port,
                "PublishedPort": p.published_port, "PublishMode": _name(PUBLISH_MODE, p.publish_mode)})
    return out


def _update_config_json(u: types_pb2.UpdateConfig) -> dict[str, Any]:
    out: dict[str, Any] = {"Parallelism": u.parallelism}
    if u.HasField("delay"):
        out["Delay"] = ns(u.delay)
    out["FailureAction"] = _name(FAILURE_ACTION, u.failure_action)
    if u.HasField("monitor"):
        out["Monitor"] = ns(u.monitor)
    out["MaxFailureRatio"] = float(f"{u.max_failure_ratio:.7g}") if u.max_failure_ratio else 0
    out["Order"] = _name(ORDER, u.order)
    return out


def task_spec_json(t: types_pb2.TaskSpec) -> dict[str, Any]:
    out: dict[str, Any] = {"ContainerSpec": _container_json(t.container)}
    if t.HasField("resources"):
        r = t.resources
        res: dict[str, Any] = {}
        if r.HasField("limits") or r.pids_limit:
            lim: dict[str, Any] = {}
            _put(lim, "NanoCPUs", r.limits.nano_cpus)
            _put(lim, "MemoryBytes", r.limits.memory_bytes)
            _put(lim, "Pids", r.pids_limit)
            res["Limits"] = lim
        if r.HasField("reservations"):
            rv: dict[str, Any] = {}
            _put(rv, "NanoCPUs", r.reservations.nano_cpus)
            _put(rv, "MemoryBytes", r.reservations.memory_bytes)
            _put(rv, "GenericResources", [{"DiscreteResourceSpec": {"Kind": g.kind, "Value": g.value}}
                                          for g in r.reservations.generic])
            res["Reservations"] = rv
        out["Resources"] = res
    if t.HasField("restart"):
        rp: dict[str, Any] = {"Condition": _name(RESTART, t.restart.condition)}
        if t.restart.HasField("delay"):
            rp["Delay"] = ns(t.restart.delay)
        rp["MaxAttempts"] = t.restart.max_attempts
        if t.restart.HasField("window"):
            rp["Window"] = ns(t.restart.window)
        out["RestartPolicy"] = rp
    if t.HasField("placement"):
        p = t.placement
        pl: dict[str, Any] = {}
        _put(pl, "Constraints", list(p.constraints))
        _put(pl, "Preferences", [{"Spread": {"SpreadDescriptor": x.spread_descriptor}} for x in p.preferences])
        _put(pl, "MaxReplicas", p.max_replicas)
        _put(pl, "Platforms", [{"Architecture": x.architecture, "OS": x.os} for x in p.platforms])
        out["Placement"] = pl
    if t.networks:
        nets = []
        for n in t.networks:
            nj: dict[str, Any] = {"Target": n.target}
            _put(nj, "Aliases", list(n.aliases))
            _put(nj, "DriverOpts", dict(sorted(n.driver_attachment_opts.items())))
            nets.append(nj)
        out["Networks"] = nets
    if t.HasField("log_driver"):
        ld: dict[str, Any] = {"Name": t.log_driver.name}
        _put(ld, "Options", dict(sorted(t.log_driver.options.items())))
        out["LogDriver"] = ld
    out["ForceUpdate"] = t.force_update
    out["Runtime"] = "container"
    return out


def _container_json(c: types_pb2.ContainerSpec) -> dict[str, Any]:
    out: dict[str, Any] = {"Image": c.image}
    _put(out, "Labels", dict(sorted(c.labels.items())))
    _put(out, "Command", list(c.command))
    _put(out, "Args", list(c.args))
    _put(out, "Hostname", c.hostname)
    _put(out, "Env", list(c.env))
    _put(out, "Dir", c.dir)
    _put(out, "User", c.user)
    _put(out, "Groups", list(c.groups))
    _put(out, "TTY", c.tty)
    _put(out, "OpenStdin", c.open_stdin)
    _put(out, "ReadOnly", c.read_only)
    _put(out, "Mounts", [_mount_json(m) for m in c.mounts])
    if c.HasField("stop_grace_period"):
        out["StopGracePeriod"] = ns(c.stop_grace_period)
    _put(out, "StopSignal", c.stop_signal)
    if c.HasField("healthcheck"):
        h = c.healthcheck
        hj: dict[str, Any] = {}
        _put(hj, "Test", list(h.test))
        for key, field in (("Interval", "interval"), ("Timeout", "timeout")):
            if h.HasField(field):
                hj[key] = ns(getattr(h, field))
        _put(hj, "Retries", h.retries)
        for key, field in (("StartPeriod", "start_period"), ("StartInterval", "start_interval")):
            if h.HasField(field):
                hj[key] = ns(getattr(h, field))
        out["Healthcheck"] = hj
    _put(out, "Hosts", list(c.hosts))
    if c.HasField("dns_config"):
        d: dict[str, Any] = {}
        _put(d, "Nameservers", list(c.dns_config.nameservers))
        _put(d, "Search", list(c.dns_config.search))
        _put(d, "Options", list(c.dns_config.options))
        out["DNSConfig"] = d
    for kind, refs in (("Secret", c.secrets), ("Config", c.configs)):
        items = []
        for r in refs:
            rj: dict[str, Any] = {}
            if r.HasField("file"):
                rj["File"] = {"Name": r.file.name, "UID": r.file.uid, "GID": r.file.gid, "Mode": r.file.mode}
            rj[f"{kind}ID"] = getattr(r, f"{kind.lower()}_id")
            rj[f"{kind}Name"] = getattr(r, f"{kind.lower()}_name")
            items.append(rj)
        _put(out, f"{kind}s", items)
    if c.HasField("init"):
        out["Init"] = c.init
    _put(out, "Sysctls", dict(sorted(c.sysctls.items())))
    _put(out, "CapabilityAdd", list(c.capability_add))
    _put(out, "CapabilityDrop", list(c.capability_drop))
    _put(out, "Ulimits", [{"Name": u.name, "Soft": u.soft, "Hard": u.hard} for u in c.ulimits])
    out["Isolation"] = "default"
    return out


def _mount_json(m: types_pb2.Mount) -> dict[str, Any]:
    out: dict[str, Any] = {"Type": _name(MOUNT_TYPE, m.type)}
    _put(out, "Source", m.source)
    out["Target"] = m.target
    _put(out, "ReadOnly", m.readonly)
    if m.HasField("bind_options"):
        b: dict[str, Any] = {}
        _put(b, "Propagation", m.bind_options.propagation)
        out["BindOptions"] = b
    if m.HasField("volume_options"):
        v: dict[str, Any] = {}
        _put(v, "NoCopy", m.volume_options.nocopy)
        _put(v, "Labels", dict(sorted(m.volume_options.labels.items())))
        if m.volume_options.HasField("driver_config"):
            dc: dict[str, Any] = {"Name": m.volume_options.driver_config.name}
            _put(dc, "Options", dict(sorted(m.volume_options.driver_config.options.items())))
            v["DriverConfig"] = dc
        out["VolumeOptions"] = v
    if m.HasField("tmpfs_options"):
        t: dict[str, Any] = {}
        _put(t, "SizeBytes", m.tmpfs_options.size_bytes)
        _put(t, "Mode", m.tmpfs_options.mode)
        out["TmpfsOptions"] = t
    return out


def fill_defaults(doc: dict[str, Any]) -> dict[str, Any]:
    """`?insertDefaults=true` on a Spec JSON (in place, returned): what Shoal does for each unset
    field, as Docker fills its own (update and rollback configs, the stop grace period, the restart
    policy, the endpoint mode)."""
    doc.setdefault("UpdateConfig", dict(DEFAULT_UPDATE))
    doc.setdefault("RollbackConfig", dict(DEFAULT_UPDATE))
    for key in ("UpdateConfig", "RollbackConfig"):
        doc[key].setdefault("Monitor", DEFAULT_UPDATE["Monitor"])
    t = doc["TaskTemplate"]
    t["ContainerSpec"].setdefault("StopGracePeriod", DEFAULT_STOP_GRACE_NS)
    rp = t.setdefault("RestartPolicy", dict(DEFAULT_RESTART))
    rp.setdefault("Delay", DEFAULT_RESTART["Delay"])
    doc.setdefault("EndpointSpec", {"Mode": "vip"})
    return doc
