"""Conversion of a loaded Project into the protobuf specs of a stack (``docker stack deploy`` semantics)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from google.protobuf.duration_pb2 import Duration

from shoal.compose import model as m
from shoal.compose.errors import ComposeError, Loc
from shoal.compose.units import parse_bytes
from shoal.proto import specs_pb2, types_pb2

LABEL_NAMESPACE = "com.docker.stack.namespace"
LABEL_IMAGE = "com.docker.stack.image"
MAX_SECRET_SIZE = 500 * 1024
MAX_CONFIG_SIZE = 1000 * 1024

_OBJECT_NAME = re.compile(r"^[a-zA-Z0-9](?:[-_]*[A-Za-z0-9]+)*$")


@dataclass
class StackSpec:
    """Everything ``stack deploy`` sends for one stack.

    ``services``/``networks``/``secrets``/``configs`` are keyed by their full (stack-scoped) names and
    sorted. Network attachments and secret/config references carry *names*; the caller resolves
    them to ids. ``external_*`` name objects the stack uses but does not create: the caller must
    check that they exist (``plan`` does, given the existing objects).
    """

    name: str
    services: dict[str, specs_pb2.ServiceSpec] = field(default_factory=dict)
    networks: dict[str, specs_pb2.NetworkSpec] = field(default_factory=dict)
    secrets: dict[str, specs_pb2.SecretSpec] = field(default_factory=dict)
    configs: dict[str, specs_pb2.ConfigSpec] = field(default_factory=dict)
    external_networks: list[str] = field(default_factory=list)
    external_secrets: list[str] = field(default_factory=list)
    external_configs: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def scope(stack: str, name: str) -> str:
    return f"{stack}_{name}"


def validate_stack_name(stack: str) -> None:
    if not _OBJECT_NAME.match(stack) or len(stack) > 63:
        raise ComposeError(
            f'invalid stack name "{stack}"; use letters and digits, with "-" or "_" between them '
            "(at most 63 characters)")


def _dur(ns: int) -> Duration:
    d = Duration()
    d.FromNanoseconds(ns)
    return d


def _labels(stack: str, labels: dict[str, str]) -> dict[str, str]:
    out = dict(labels)
    out[LABEL_NAMESPACE] = stack
    return out


def convert(project: m.Project, stack_name: str) -> StackSpec:
    """Turn a loaded project into the specs of stack ``stack_name``. Raises ComposeError.

    Reads the files of file-based secrets and configs (paths were resolved against the project's
    working directory when loading).
    """
    validate_stack_name(stack_name)
    spec = StackSpec(name=stack_name)
    used_networks: dict[str, Loc] = {}
    for _name, svc in sorted(project.services.items()):
        for net in (svc.networks or {"default": None}):
            used_networks.setdefault(net, svc.where("networks"))
    for net in sorted(used_networks):
        cfg = project.networks.get(net) or m.Network()
        full = cfg.name or scope(stack_name, net)
        if cfg.external:
            spec.external_networks.append(full)
            continue
        spec.networks[full] = _network(stack_name, full, cfg)
    used_secrets = {r.source for s in project.services.values() for r in s.secrets}
    used_configs = {r.source for s in project.services.values() for r in s.configs}
    for kind, table, used, out, ext in (
        ("secret", project.secrets, used_secrets, spec.secrets, spec.external_secrets),
        ("config", project.configs, used_configs, spec.configs, spec.external_configs),
    ):
        for name, obj in sorted(table.items()):
            full = obj.name or scope(stack_name, name)
            if obj.external:
                if name in used:
                    ext.append(full)
                continue
            data = _object_data(kind, name, obj, project)
            cls = specs_pb2.SecretSpec if kind == "secret" else specs_pb2.ConfigSpec
            out[full] = cls(annotations=types_pb2.Annotations(name=full, labels=_labels(stack_name, obj.labels)),
                            data=data)
    for name, svc in sorted(project.services.items()):
        full = scope(stack_name, name)
        if not _OBJECT_NAME.match(full) or len(full) > 63:
            raise ComposeError(
                f'service name "{full}" is not valid in a swarm; service and stack names use letters and digits '
                'with "-" or "_" between them, together at most 63 characters', svc.loc, f"services.{name}")
        spec.services[full] = _service(stack_name, svc, project, spec.warnings)
    ingress: dict[tuple[int, int], str] = {}
    for name, svc in sorted(project.services.items()):
        for port in spec.services[scope(stack_name, name)].endpoint.ports:
            if port.publish_mode != types_pb2.PortConfig.INGRESS or not port.published_port:
                continue
            other = ingress.setdefault((port.published_port, port.protocol), name)
            if other != name:
                proto = types_pb2.PortConfig.Protocol.Name(port.protocol).lower()
                raise ComposeError(f"published port {port.published_port}/{proto} is already published by service "
                                   f'"{other}"; publish each port once per stack', svc.where("ports"),
                                   f"services.{name}.ports")
    return spec


def _network(stack: str, full: str, cfg: m.Network) -> specs_pb2.NetworkSpec:
    ns = specs_pb2.NetworkSpec(
        annotations=types_pb2.Annotations(name=full, labels=_labels(stack, cfg.labels)),
        driver_config=types_pb2.Driver(name=cfg.driver or "overlay", options=cfg.driver_opts),
        internal=bool(cfg.internal),
        attachable=bool(cfg.attachable),
    )
    if cfg.ipam is not None and (cfg.ipam.driver or cfg.ipam.config):
        if cfg.ipam.driver:
            ns.ipam.driver.name = cfg.ipam.driver
        for c in cfg.ipam.config:
            ns.ipam.configs.add(subnet=c.subnet or "", range=c.ip_range or "", gateway=c.gateway or "")
    return ns


def _object_data(kind: str, name: str, obj: m.FileObject, project: m.Project) -> bytes:
    path = f"{kind}s.{name}"
    limit = MAX_SECRET_SIZE if kind == "secret" else MAX_CONFIG_SIZE
    if obj.file is not None:
        try:
            with open(obj.file, "rb") as f:
                data = f.read(limit + 1)
        except OSError as e:
            raise ComposeError(f'cannot read "{obj.file}": {e.strerror or e}', obj.where("file"),
                               f"{path}.file") from None
        loc, key = obj.where("file"), f"{path}.file"
    elif obj.environment is not None:
        value = project.environment.get(obj.environment)
        if value is None:
            raise ComposeError(f'environment variable "{obj.environment}" is not set; set it before deploying',
                               obj.where("environment"), f"{path}.environment")
        data = value.encode()
        loc, key = obj.where("environment"), f"{path}.environment"
    else:
        data = (obj.content or "").encode()
        loc, key = obj.where("content"), f"{path}.content"
    if len(data) > limit:
        raise ComposeError(f"{kind} data is larger than {limit // 1024} KiB, the most a swarm {kind} may hold",
                           loc, key)
    return data


def _caps(values: list[str]) -> list[str]:
    out = set()
    for c in values:
        c = c.strip().upper()
        if c != "ALL" and not c.startswith("CAP_"):
            c = "CAP_" + c
        out.add(c)
    return sorted(out)


def _effective_caps(add: list[str], drop: list[str]) -> tuple[list[str], list[str]]:
    a, d = _caps(add), _caps(drop)
    if "ALL" in a:
        a = ["ALL"]
    if "ALL" in d:
        d = ["ALL"]
    d = [c for c in d if c not in a]
    return a, d


def _restart(svc: m.Service) -> types_pb2.RestartPolicy | None:
    rp = svc.deploy.restart_policy if svc.deploy else None
    if rp is not None:
        out = types_pb2.RestartPolicy(
            condition={"none": types_pb2.RestartPolicy.NONE, "on-failure": types_pb2.RestartPolicy.ON_FAILURE,
                       "any": types_pb2.RestartPolicy.ANY, None: types_pb2.RestartPolicy.ANY}[rp.condition],
            max_attempts=rp.max_attempts or 0,
        )
        if rp.delay is not None:
            out.delay.CopyFrom(_dur(rp.delay))
        if rp.window is not None:
            out.window.CopyFrom(_dur(rp.window))
        return out
    # Docker falls back on the (otherwise ignored) service-level restart: key.
    if not svc.restart or svc.restart == "no":
        return None
    name, _, count = svc.restart.partition(":")
    cond = types_pb2.RestartPolicy.ON_FAILURE if name == "on-failure" else types_pb2.RestartPolicy.ANY
    return types_pb2.RestartPolicy(condition=cond, max_attempts=int(count) if count else 0)


def _update(u: m.UpdateConfig | None) -> types_pb2.UpdateConfig | None:
    if u is None:
        return None
    out = types_pb2.UpdateConfig(
        parallelism=1 if u.parallelism is None else u.parallelism,
        failure_action={None: types_pb2.UpdateConfig.PAUSE, "pause": types_pb2.UpdateConfig.PAUSE,
                        "continue": types_pb2.UpdateConfig.CONTINUE,
                        "rollback": types_pb2.UpdateConfig.ROLLBACK}[u.failure_action],
        max_failure_ratio=u.max_failure_ratio or 0.0,
        order=types_pb2.UpdateConfig.START_FIRST if u.order == "start-first" else types_pb2.UpdateConfig.STOP_FIRST,
    )
    if u.delay is not None:
        out.delay.CopyFrom(_dur(u.delay))
    if u.monitor is not None:
        out.monitor.CopyFrom(_dur(u.monitor))
    return out


def _resources(r: m.Resources | None) -> types_pb2.ResourceRequirements | None:
    if r is None:
        return None
    out = types_pb2.ResourceRequirements()
    if r.limits is not None:
        out.limits.nano_cpus = r.limits.cpus or 0
        out.limits.memory_bytes = r.limits.memory or 0
        out.pids_limit = r.limits.pids or 0
    if r.reservations is not None:
        out.reservations.nano_cpus = r.reservations.cpus or 0
        out.reservations.memory_bytes = r.reservations.memory or 0
        for g in r.reservations.generic_resources:
            out.reservations.generic.add(kind=g.kind, value=g.value)
    return out


def _tmpfs_mount(svc: m.Service, entry: str) -> types_pb2.Mount:
    target, _, opts = entry.partition(":")
    mount = types_pb2.Mount(type=types_pb2.Mount.TMPFS, target=target)
    for opt in filter(None, opts.split(",")):
        key, _, value = opt.partition("=")
        try:
            if key == "size":
                size = parse_bytes(value)
                if size > 2**63 - 1:
                    raise ValueError(value)
                mount.tmpfs_options.size_bytes = size
            elif key == "mode":
                mode = int(value, 8)
                if not 0 <= mode <= 0o7777:
                    raise ValueError(value)
                mount.tmpfs_options.mode = mode
            elif key in ("ro", "readonly"):
                mount.readonly = True
            elif key in ("rw", "exec", "noexec", "nosuid", "nodev", "suid", "dev"):
                continue
            else:
                raise ValueError(key)
        except ValueError:
            raise ComposeError(f'invalid tmpfs option "{opt}" in "{entry}"; allowed: size=BYTES, mode=OCTAL, ro',
                               svc.where("tmpfs"), f"services.{svc.name}.tmpfs") from None
    return mount


def _mounts(stack: str, svc: m.Service, project: m.Project) -> list[types_pb2.Mount]:
    out = []
    for v in svc.volumes:
        mount = types_pb2.Mount(target=v.target, readonly=v.read_only)
        if v.type == "bind":
            mount.type = types_pb2.Mount.BIND
            mount.source = v.source
            if v.bind is not None and v.bind.propagation:
                mount.bind_options.propagation = v.bind.propagation
        elif v.type == "tmpfs":
            mount.type = types_pb2.Mount.TMPFS
            if v.tmpfs is not None:
                if v.tmpfs.size is not None:
                    mount.tmpfs_options.size_bytes = v.tmpfs.size
                if v.tmpfs.mode is not None:
                    mount.tmpfs_options.mode = v.tmpfs.mode
        else:
            mount.type = types_pb2.Mount.VOLUME
            if v.source:
                vol = project.volumes[v.source]
                mount.source = vol.name or scope(stack, v.source)
                mount.volume_options.nocopy = bool(v.volume and v.volume.nocopy)
                if not vol.external:
                    mount.volume_options.labels.update(_labels(stack, vol.labels))
                    if vol.driver or vol.driver_opts:
                        mount.volume_options.driver_config.name = vol.driver or ""
                        mount.volume_options.driver_config.options.update(vol.driver_opts)
            elif v.volume is not None and v.volume.nocopy:
                mount.volume_options.nocopy = True
        out.append(mount)
    out.extend(_tmpfs_mount(svc, t) for t in svc.tmpfs)
    return out


def _file_target(ref: m.FileRef) -> types_pb2.FileTarget:
    return types_pb2.FileTarget(name=ref.target or ref.source, uid=ref.uid or "0", gid=ref.gid or "0",
                                mode=0o444 if ref.mode is None else ref.mode)


def _service(stack: str, svc: m.Service, project: m.Project, warnings: list[str]) -> specs_pb2.ServiceSpec:
    assert svc.image
    path = f"services.{svc.name}"
    deploy = svc.deploy or m.Deploy()
    c = types_pb2.ContainerSpec(
        image=svc.image,
        labels=_labels(stack, svc.labels),
        command=svc.entrypoint or [],
        args=svc.command or [],
        hostname=svc.hostname or "",
        env=sorted(k if v is None else f"{k}={v}" for k, v in svc.environment.items()),
        dir=svc.working_dir or "",
        user=svc.user or "",
        groups=svc.group_add,
        tty=bool(svc.tty),
        open_stdin=bool(svc.stdin_open),
        read_only=bool(svc.read_only),
        mounts=_mounts(stack, svc, project),
        stop_signal=svc.stop_signal or "",
        hosts=[f"{ip} {host}" for host, _, ip in (h.partition(":") for h in svc.extra_hosts)],
        sysctls=svc.sysctls,
        ulimits=[types_pb2.Ulimit(name=n, soft=u.soft, hard=u.hard) for n, u in sorted(svc.ulimits.items())],
    )
    c.capability_add[:], c.capability_drop[:] = _effective_caps(svc.cap_add, svc.cap_drop)
    if svc.stop_grace_period is not None:
        c.stop_grace_period.CopyFrom(_dur(svc.stop_grace_period))
    if svc.init is not None:
        c.init = svc.init
    if svc.dns or svc.dns_search or svc.dns_opt:
        c.dns_config.nameservers[:] = svc.dns
        c.dns_config.search[:] = svc.dns_search
        c.dns_config.options[:] = svc.dns_opt
    if svc.healthcheck is not None:
        hc = svc.healthcheck
        if hc.disable:
            c.healthcheck.test[:] = ["NONE"]
        else:
            c.healthcheck.test[:] = hc.test or []
            c.healthcheck.retries = hc.retries or 0
            for key in ("interval", "timeout", "start_period", "start_interval"):
                if getattr(hc, key) is not None:
                    getattr(c.healthcheck, key).CopyFrom(_dur(getattr(hc, key)))
    for ref in sorted(svc.secrets, key=lambda r: project.secrets[r.source].name or scope(stack, r.source)):
        obj = project.secrets[ref.source]
        c.secrets.add(secret_name=obj.name or scope(stack, ref.source), file=_file_target(ref))
    for ref in sorted(svc.configs, key=lambda r: project.configs[r.source].name or scope(stack, r.source)):
        obj = project.configs[ref.source]
        c.configs.add(config_name=obj.name or scope(stack, ref.source), file=_file_target(ref))

    targets: set[str] = set()
    for mount in c.mounts:
        if mount.target in targets:
            raise ComposeError(f'mount target "{mount.target}" is used twice; mount one thing per path',
                               svc.where("volumes") if "volumes" in svc.locs else svc.where("tmpfs"),
                               f"{path}.volumes")
        targets.add(mount.target)

    task = types_pb2.TaskSpec(container=c)
    if (res := _resources(deploy.resources)) is not None:
        task.resources.CopyFrom(res)
        r = deploy.resources
        assert r is not None
        for what, lim, rsv in (("memory", res.limits.memory_bytes, res.reservations.memory_bytes),
                               ("cpus", res.limits.nano_cpus, res.reservations.nano_cpus)):
            if lim and rsv > lim:
                where = r.reservations.where(what) if r.reservations is not None else r.loc
                raise ComposeError(f"the {what} reservation is larger than the {what} limit; reserve at most the "
                                   "limit", where, f"{path}.deploy.resources.reservations.{what}")
    if (rp := _restart(svc)) is not None:
        task.restart.CopyFrom(rp)
    if deploy.placement is not None:
        pl = deploy.placement
        if pl.max_replicas_per_node and deploy.mode == "global":
            raise ComposeError("max_replicas_per_node can only be used with replicated mode; a global service runs "
                               "one task per node already", pl.where("max_replicas_per_node"),
                               f"{path}.deploy.placement.max_replicas_per_node")
        task.placement.constraints[:] = pl.constraints
        for pref in pl.preferences:
            task.placement.preferences.add(spread_descriptor=pref)
        task.placement.max_replicas = pl.max_replicas_per_node or 0
    if svc.logging is not None:
        task.log_driver.name = svc.logging.driver or ""
        task.log_driver.options.update(svc.logging.options)
    nets = []
    for net, sn in (svc.networks or {"default": None}).items():
        cfg = project.networks.get(net)
        target = (cfg.name if cfg is not None and cfg.name else None) or scope(stack, net)
        aliases = list(sn.aliases) if sn is not None else []
        if svc.name not in aliases:
            aliases.append(svc.name)
        nets.append(types_pb2.NetworkAttachmentConfig(
            target=target, aliases=aliases, driver_attachment_opts=sn.driver_opts if sn is not None else {}))
    task.networks.extend(sorted(nets, key=lambda n: n.target))
    for a, b in zip(task.networks, task.networks[1:], strict=False):
        if a.target == b.target:
            raise ComposeError(f'network "{a.target}" is attached twice (two stack networks have that name); '
                               "attach it once", svc.where("networks"), f"{path}.networks")

    spec = specs_pb2.ServiceSpec(
        annotations=types_pb2.Annotations(name=scope(stack, svc.name), labels=_labels(stack, deploy.labels)),
        task=task,
    )
    spec.annotations.labels[LABEL_IMAGE] = svc.image
    if deploy.mode == "global":
        getattr(spec, "global").SetInParent()  # "global" is a Python keyword
    else:
        spec.replicated.replicas = 1 if deploy.replicas is None else deploy.replicas
    if (u := _update(deploy.update_config)) is not None:
        spec.update.CopyFrom(u)
    if (u := _update(deploy.rollback_config)) is not None:
        spec.rollback.CopyFrom(u)
    dnsrr = deploy.endpoint_mode == "dnsrr"
    spec.endpoint.mode = types_pb2.EndpointSpec.DNSRR if dnsrr else types_pb2.EndpointSpec.VIP
    ports = []
    for p in svc.ports:
        if dnsrr and p.mode == "ingress":
            raise ComposeError(
                f"port {p.target} is published in ingress mode, which needs endpoint_mode: vip; publish it with "
                "mode: host or remove endpoint_mode: dnsrr", p.loc, f"{path}.ports")
        if p.host_ip:
            warnings.append(f"{p.loc} {path}.ports: host_ip {p.host_ip} is ignored; swarm publishes a port "
                            "on every address of the node")
        ports.append(types_pb2.PortConfig(
            name=p.name,
            protocol={"tcp": types_pb2.PortConfig.TCP, "udp": types_pb2.PortConfig.UDP,
                      "sctp": types_pb2.PortConfig.SCTP}[p.protocol],
            target_port=p.target,
            published_port=p.published or 0,
            publish_mode=types_pb2.PortConfig.HOST if p.mode == "host" else types_pb2.PortConfig.INGRESS,
        ))
    seen: dict[tuple[int, int], int] = {}
    for p in ports:
        if p.published_port:
            key = (p.published_port, p.protocol)
            if key in seen:
                raise ComposeError(f"published port {p.published_port} is given twice; publish each port once",
                                   svc.where("ports"), f"{path}.ports")
            seen[key] = p.target_port
    spec.endpoint.ports.extend(sorted(ports, key=lambda p: (p.protocol, p.target_port, p.published_port,
                                                            p.publish_mode, p.name)))
    return spec
