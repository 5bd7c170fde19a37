"""Server-side validation of the specs that come in through the control API.

Every check raises `InvalidArgument` with one sentence naming the field and what is allowed, before
anything is written. Checks that need the store (unknown network, secret or config, a published port
already taken) live in the control API's transaction; everything that a spec alone decides is here.

`parse_constraint` and `PLACEMENT_KEYS` are shared with the scheduler: a constraint is
`<key> == <value>` or `<key> != <value>`, keys are case-insensitive.
"""

from __future__ import annotations

import ipaddress
import math
import re
import signal
from dataclasses import dataclass

from google.protobuf.duration_pb2 import Duration

from shoal.manager.keymanager import DEFAULT_ROTATION_NS, ENCRYPTED_OPTION, MIN_ROTATION_NS
from shoal.manager.store import InvalidArgument
from shoal.proto import specs_pb2, types_pb2

# Docker's rule for object names (services, networks, secrets, configs, nodes' names).
NAME_RE = re.compile(r"^[a-zA-Z0-9][a-zA-Z0-9_.-]*$")
NAME_MAX = 63
LABEL_KEY_RE = re.compile(r"^[a-zA-Z0-9]([a-zA-Z0-9._/:-]*[a-zA-Z0-9])?$")
LABEL_KEY_MAX = 255
MAX_SECRET_SIZE = 500 * 1024
MAX_CONFIG_SIZE = 1000 * 1024
MIN_NANO_CPUS = 1_000_000  # 0.001 CPU
MIN_MEMORY = 4 * 1024 * 1024
MIN_HEALTH_DURATION_NS = 1_000_000  # 1 ms
MIN_CERT_EXPIRY_NS = 60 * 10**9  # Docker's is an hour; a minute lets labs watch renewals
MIN_HEARTBEAT_NS = 100_000_000
MAX_HEARTBEAT_NS = 3600 * 10**9

# --- image references (github.com/distribution/reference grammar) ---------------------------------
_ALNUM = r"[a-z0-9]+"
_SEP = r"(?:[._]|__|[-]+)"
_PATH_COMPONENT = rf"{_ALNUM}(?:{_SEP}{_ALNUM})*"
_DOMAIN_COMPONENT = r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
_DOMAIN = rf"(?:{_DOMAIN_COMPONENT}(?:\.{_DOMAIN_COMPONENT})*|\[[0-9a-fA-F:]+\])(?::[0-9]+)?"
_TAG = r"[\w][\w.-]{0,127}"
_DIGEST = r"[A-Za-z][A-Za-z0-9]*(?:[-_+.][A-Za-z][A-Za-z0-9]*)*:[0-9a-fA-F]{32,}"
_NAME = rf"(?:{_DOMAIN}/)?{_PATH_COMPONENT}(?:/{_PATH_COMPONENT})*"
IMAGE_RE = re.compile(rf"^(?P<name>{_NAME})(?::(?P<tag>{_TAG}))?(?:@(?P<digest>{_DIGEST}))?$")
IMAGE_NAME_MAX = 255

# --- placement ------------------------------------------------------------------------------------
PLACEMENT_KEYS = ("node.id", "node.hostname", "node.role", "node.platform.os", "node.platform.arch")
LABEL_PREFIXES = ("node.labels.", "engine.labels.")
_CONSTRAINT_KEY_RE = re.compile(r"^[a-z_][a-z0-9\-_.]+$", re.IGNORECASE)
_CONSTRAINT_VALUE_RE = re.compile(r"^[a-z0-9:\-_\s.*()?+\[\]\\^$|/]+$", re.IGNORECASE)
_CONSTRAINT_HELP = (
    "use KEY==VALUE or KEY!=VALUE with KEY one of node.id, node.hostname, node.role, node.platform.os, "
    "node.platform.arch, node.labels.NAME, engine.labels.NAME"
)


@dataclass(frozen=True)
class Constraint:
    key: str  # lower-cased for the fixed keys; label names keep their case
    equal: bool
    value: str

    def __str__(self) -> str:
        return f"{self.key}{'==' if self.equal else '!='}{self.value}"


def _placement_key(key: str) -> str | None:
    """The canonical form of a placement key, or None when it is not one we know."""
    low = key.lower()
    if low in PLACEMENT_KEYS:
        return low
    for prefix in LABEL_PREFIXES:
        if low.startswith(prefix) and len(key) > len(prefix):
            return prefix + key[len(prefix) :]
    return None


def parse_constraint(expr: str) -> Constraint:
    """Parse `node.labels.zone==a` style expressions; InvalidArgument naming the problem otherwise."""
    for op in ("==", "!="):
        if op in expr:
            key, _, value = expr.partition(op)
            break
    else:
        raise InvalidArgument(f"placement constraint {expr!r} has no == or != operator: {_CONSTRAINT_HELP}")
    key, value = key.strip(), value.strip()
    if "==" in value or "!=" in value:
        raise InvalidArgument(f"placement constraint {expr!r} has more than one operator: {_CONSTRAINT_HELP}")
    if not _CONSTRAINT_KEY_RE.match(key):
        raise InvalidArgument(f"placement constraint {expr!r} has an invalid key {key!r}: {_CONSTRAINT_HELP}")
    canon = _placement_key(key)
    if canon is None:
        raise InvalidArgument(f"placement constraint {expr!r} has an unknown key {key!r}: {_CONSTRAINT_HELP}")
    if not value or not _CONSTRAINT_VALUE_RE.match(value):
        raise InvalidArgument(
            f"placement constraint {expr!r} has an invalid value {value!r}: give letters, digits and - _ . : / * "
        )
    if canon == "node.role" and value.lower() not in ("manager", "worker"):
        raise InvalidArgument(f"placement constraint {expr!r}: node.role can only be manager or worker")
    return Constraint(canon, op == "==", value)


def validate_spread_descriptor(descriptor: str) -> str:
    if not descriptor:
        raise InvalidArgument(
            "placement preference has an empty spread descriptor: use spread=node.labels.NAME (or engine.labels.NAME)"
        )
    canon = _placement_key(descriptor)
    if canon is None or not _CONSTRAINT_KEY_RE.match(descriptor):
        raise InvalidArgument(
            f"placement preference spread={descriptor!r} is not supported: spread over node.labels.NAME, "
            "engine.labels.NAME, node.id, node.hostname, node.role, node.platform.os or node.platform.arch"
        )
    return canon


# --- small checks ---------------------------------------------------------------------------------
def validate_name(kind: str, name: str, required: bool = True) -> None:
    if not name:
        if required:
            raise InvalidArgument(f"{kind} name is empty: give the {kind} a name")
        return
    if len(name) > NAME_MAX:
        raise InvalidArgument(f"{kind} name {name!r} is {len(name)} characters long: at most {NAME_MAX} are allowed")
    if not NAME_RE.match(name):
        raise InvalidArgument(
            f"{kind} name {name!r} is invalid: use letters, digits, '_', '.' and '-', starting with a letter or digit"
        )


def validate_labels(field: str, labels: dict[str, str] | object) -> None:
    for key in labels:  # type: ignore[attr-defined]
        if not key:
            raise InvalidArgument(f"{field} has an empty label key: every label needs a key")
        if len(key) > LABEL_KEY_MAX or not LABEL_KEY_RE.match(key):
            raise InvalidArgument(
                f"{field} key {key!r} is invalid: use letters, digits, '.', '_', '-', '/' and ':', "
                f"starting and ending with a letter or digit, at most {LABEL_KEY_MAX} characters"
            )


def validate_annotations(kind: str, ann: types_pb2.Annotations, name_required: bool = True) -> None:
    validate_name(kind, ann.name, name_required)
    validate_labels(f"{kind} label", ann.labels)


def validate_image(image: str) -> None:
    if not image:
        raise InvalidArgument("image is empty: give an image reference such as busybox:latest")
    m = IMAGE_RE.match(image)
    if m is None:
        low = image.lower()
        hint = " (repository names must be lowercase)" if IMAGE_RE.match(low) or image != low else ""
        raise InvalidArgument(
            f"image reference {image!r} is invalid{hint}: use [REGISTRY[:PORT]/]NAME[:TAG][@DIGEST], "
            "for example busybox:1.36 or localhost:5000/app/web:v2"
        )
    if len(m.group("name")) > IMAGE_NAME_MAX:
        raise InvalidArgument(f"image name in {image!r} is longer than {IMAGE_NAME_MAX} characters")


def duration_ns(d: Duration) -> int:
    return d.seconds * 10**9 + d.nanos


def validate_duration(field: str, d: Duration, minimum_ns: int = 0, allow_zero: bool = True) -> None:
    ns = duration_ns(d)
    if ns < 0:
        raise InvalidArgument(f"{field} is negative: give a duration of 0 or more, e.g. 5s or 1m30s")
    if ns == 0 and allow_zero:
        return
    if ns < minimum_ns:
        raise InvalidArgument(f"{field} is too short: give 0 (the default) or at least {_fmt_ns(minimum_ns)}")


def _fmt_ns(ns: int) -> str:
    for unit, size in (("h", 3600 * 10**9), ("m", 60 * 10**9), ("s", 10**9), ("ms", 10**6)):
        if ns >= size and ns % size == 0:
            return f"{ns // size}{unit}"
    return f"{ns}ns"


def _enum(field: str, enum_type: object, value: int) -> None:
    descriptor = enum_type.DESCRIPTOR  # type: ignore[attr-defined]
    if value not in descriptor.values_by_number:
        allowed = ", ".join(v.name.lower() for v in descriptor.values)
        raise InvalidArgument(f"{field} has an unknown value {value}: use one of {allowed}")


_SIGNAL_NAMES = {s.name for s in signal.Signals} | {"SIGRTMIN", "SIGRTMAX"}


def validate_signal(field: str, sig: str) -> None:
    if not sig:
        return
    if sig.isdigit():
        if 1 <= int(sig) <= 64:
            return
    else:
        name = sig.upper()
        if not name.startswith("SIG"):
            name = "SIG" + name
        if name in _SIGNAL_NAMES or re.match(r"^SIGRTM(IN|AX)[+-]\d+$", name):
            return
    raise InvalidArgument(f"{field} {sig!r} is not a signal: use a name such as SIGTERM or a number 1-64")


# Letters, digits and '-' as RFC 1123 wants, plus '_' which compose service names (used as hostnames
# and network aliases) often carry and which Docker accepts.
_HOSTNAME_LABEL = re.compile(r"^[a-zA-Z0-9_]([a-zA-Z0-9_-]{0,61}[a-zA-Z0-9_])?$")


def validate_hostname(field: str, hostname: str) -> None:
    if not hostname or "{{" in hostname:  # Go-template hostnames are expanded per task
        return
    if len(hostname) > 253 or not all(_HOSTNAME_LABEL.match(p) for p in hostname.split(".")):
        raise InvalidArgument(
            f"{field} {hostname!r} is not a valid host name: use letters, digits, '-' and '_' in dot-separated "
            "parts of at most 63 characters"
        )


def _ip(field: str, value: str) -> None:
    try:
        ipaddress.ip_address(value)
    except ValueError:
        raise InvalidArgument(f"{field} {value!r} is not an IP address") from None


# --- services -------------------------------------------------------------------------------------
def validate_service_spec(spec: specs_pb2.ServiceSpec) -> None:
    """Everything a service spec alone decides. The name may be empty (the API then picks one)."""
    validate_annotations("service", spec.annotations, name_required=False)
    if not spec.HasField("task") or not spec.task.HasField("container"):
        raise InvalidArgument("service spec has no container: give at least an image")
    validate_task_spec(spec.task)
    if spec.WhichOneof("mode") == "global" and spec.task.placement.max_replicas:
        raise InvalidArgument("placement max replicas per node cannot be used with mode global: use mode replicated")
    validate_update_config("update config", spec.update, rollback=False)
    validate_update_config("rollback config", spec.rollback, rollback=True)
    validate_endpoint(spec.endpoint)


def validate_task_spec(task: types_pb2.TaskSpec) -> None:
    validate_container_spec(task.container)
    validate_resources(task.resources)
    validate_restart(task.restart)
    validate_placement(task.placement)
    seen: set[str] = set()
    for att in task.networks:
        if not att.target:
            raise InvalidArgument("network attachment has no target: name a network by id or name")
        if att.target in seen:
            raise InvalidArgument(f"network {att.target!r} is attached twice: list each network once")
        seen.add(att.target)
        for alias in att.aliases:
            validate_hostname(f"network alias of {att.target!r}", alias)
        for addr in att.addresses:
            _ip(f"address on network {att.target!r}", addr.split("/")[0])
    if task.log_driver.name:
        validate_name("log driver", task.log_driver.name)


def validate_container_spec(c: types_pb2.ContainerSpec) -> None:
    validate_image(c.image)
    validate_labels("container label", c.labels)
    for e in c.env:
        key, eq, _ = e.partition("=")
        if not eq or not key or any(ch.isspace() for ch in key) or "\0" in e:
            raise InvalidArgument(f"environment entry {e!r} is invalid: use KEY=VALUE with a non-empty KEY without spaces")
    validate_hostname("hostname", c.hostname)
    if c.dir and not c.dir.startswith("/"):
        raise InvalidArgument(f"working directory {c.dir!r} is not an absolute path: start it with /")
    validate_duration("stop grace period", c.stop_grace_period)
    validate_signal("stop signal", c.stop_signal)
    validate_mounts(c.mounts)
    validate_file_refs("secret", c.secrets)
    validate_file_refs("config", c.configs)
    if c.HasField("healthcheck"):
        validate_health(c.healthcheck)
    for line in c.hosts:
        parts = line.split()
        if len(parts) < 2:
            raise InvalidArgument(f"extra host entry {line!r} is invalid: use 'IP HOSTNAME [ALIAS...]'")
        _ip("extra host address", parts[0])
    for ns in c.dns_config.nameservers:
        _ip("DNS nameserver", ns)
    for key in c.sysctls:
        if not key or not re.match(r"^[a-z0-9_.\-/]+$", key):
            raise InvalidArgument(f"sysctl {key!r} is invalid: use a dotted kernel parameter such as net.ipv4.ip_forward")
    for cap in list(c.capability_add) + list(c.capability_drop):
        if not re.match(r"^(CAP_)?[A-Z_]+$", cap, re.IGNORECASE):
            raise InvalidArgument(f"capability {cap!r} is invalid: use a name such as CAP_NET_ADMIN or ALL")
    for ul in c.ulimits:
        if not ul.name or not re.match(r"^[a-z]+$", ul.name):
            raise InvalidArgument(f"ulimit name {ul.name!r} is invalid: use a name such as nofile or nproc")
        if ul.soft < 0 or ul.hard < 0 or ul.soft > ul.hard:
            raise InvalidArgument(f"ulimit {ul.name}: soft limit {ul.soft} must be between 0 and the hard limit {ul.hard}")


def validate_mounts(mounts: object) -> None:
    targets: set[str] = set()
    for m in mounts:  # type: ignore[attr-defined]
        _enum("mount type", types_pb2.Mount.Type, m.type)
        if not m.target or not m.target.startswith("/"):
            raise InvalidArgument(f"mount target {m.target!r} is not an absolute path: give the path in the container")
        if m.target in targets:
            raise InvalidArgument(f"mount target {m.target!r} is used twice: mount one thing per path")
        targets.add(m.target)
        if m.type == types_pb2.Mount.BIND:
            if not m.source.startswith("/"):
                raise InvalidArgument(
                    f"bind mount source {m.source!r} for {m.target} is not an absolute path on the host"
                )
        elif m.type == types_pb2.Mount.VOLUME:
            if m.source:
                validate_name("volume", m.source)
        elif m.type == types_pb2.Mount.TMPFS:
            if m.source:
                raise InvalidArgument(f"tmpfs mount {m.target} has a source: a tmpfs mount takes none")
            if m.tmpfs_options.size_bytes < 0:
                raise InvalidArgument(f"tmpfs size for {m.target} is negative: give 0 (no limit) or a size")
            if m.tmpfs_options.mode > 0o7777:
                raise InvalidArgument(f"tmpfs mode for {m.target} is larger than 07777")


def validate_file_refs(kind: str, refs: object) -> None:
    targets: set[str] = set()
    for r in refs:  # type: ignore[attr-defined]
        ref_id = getattr(r, f"{kind}_id")
        ref_name = getattr(r, f"{kind}_name")
        if not ref_id and not ref_name:
            raise InvalidArgument(f"{kind} reference has neither an id nor a name: name the {kind}")
        target = r.file.name or ref_name
        if not target:
            continue  # named after the referenced object once it is resolved
        if ".." in target.split("/"):
            raise InvalidArgument(f"{kind} target {target!r} contains '..': give a plain file name or path")
        if target in targets:
            raise InvalidArgument(f"{kind} target {target!r} is used twice: give each {kind} its own file")
        targets.add(target)
        if r.file.mode > 0o777:
            raise InvalidArgument(f"{kind} file mode {oct(r.file.mode)} for {target!r} is larger than 0777")
        for field in ("uid", "gid"):
            v = getattr(r.file, field)
            if v and not v.isdigit():
                raise InvalidArgument(f"{kind} file {field} {v!r} for {target!r} must be a number")


def validate_health(h: types_pb2.HealthConfig) -> None:
    if h.test:
        kind = h.test[0]
        if kind not in ("NONE", "CMD", "CMD-SHELL"):
            raise InvalidArgument(f"health check test starts with {kind!r}: use NONE, CMD or CMD-SHELL")
        if kind != "NONE" and len(h.test) < 2:
            raise InvalidArgument(f"health check {kind} has no command: give the command to run")
    for field in ("interval", "timeout", "start_period"):
        validate_duration(f"health check {field.replace('_', ' ')}", getattr(h, field), MIN_HEALTH_DURATION_NS)
    if h.retries < 0:
        raise InvalidArgument(f"health check retries is {h.retries}: give 0 or more")


def validate_resources(r: types_pb2.ResourceRequirements) -> None:
    for which in ("limits", "reservations"):
        res = getattr(r, which)
        if res.nano_cpus < 0 or (res.nano_cpus and res.nano_cpus < MIN_NANO_CPUS):
            raise InvalidArgument(f"CPU {which[:-1]} {res.nano_cpus / 1e9:g} is invalid: give at least 0.001 CPU")
        if res.memory_bytes < 0 or (res.memory_bytes and res.memory_bytes < MIN_MEMORY):
            raise InvalidArgument(f"memory {which[:-1]} of {res.memory_bytes} bytes is invalid: give at least 4MiB")
        for g in res.generic:
            if not g.kind or g.value <= 0:
                raise InvalidArgument(f"generic resource {g.kind!r}={g.value} is invalid: give a kind and a count above 0")
    lim, res = r.limits, r.reservations
    if lim.memory_bytes and res.memory_bytes > lim.memory_bytes:
        raise InvalidArgument("memory reservation is larger than the memory limit: reserve at most the limit")
    if lim.nano_cpus and res.nano_cpus > lim.nano_cpus:
        raise InvalidArgument("CPU reservation is larger than the CPU limit: reserve at most the limit")
    if r.pids_limit < 0:
        raise InvalidArgument(f"pids limit {r.pids_limit} is negative: give 0 (no limit) or more")


def validate_restart(p: types_pb2.RestartPolicy) -> None:
    _enum("restart condition", types_pb2.RestartPolicy.Condition, p.condition)
    validate_duration("restart delay", p.delay)
    validate_duration("restart window", p.window)


def validate_placement(p: types_pb2.Placement) -> None:
    for c in p.constraints:
        parse_constraint(c)
    for pref in p.preferences:
        validate_spread_descriptor(pref.spread_descriptor)
    for plat in p.platforms:
        if not plat.os and not plat.architecture:
            raise InvalidArgument("placement platform is empty: give an os and/or architecture")


def validate_update_config(field: str, u: types_pb2.UpdateConfig, rollback: bool) -> None:
    _enum(f"{field} failure action", types_pb2.UpdateConfig.FailureAction, u.failure_action)
    if rollback and u.failure_action == types_pb2.UpdateConfig.ROLLBACK:
        raise InvalidArgument("rollback config failure action cannot be rollback: use pause or continue")
    _enum(f"{field} order", types_pb2.UpdateConfig.Order, u.order)
    validate_duration(f"{field} delay", u.delay)
    validate_duration(f"{field} monitor", u.monitor)
    r = u.max_failure_ratio
    if math.isnan(r) or r < 0 or r > 1:
        raise InvalidArgument(f"{field} max failure ratio {r:g} is out of range: give a number from 0 to 1")


def validate_endpoint(e: types_pb2.EndpointSpec) -> None:
    _enum("endpoint mode", types_pb2.EndpointSpec.ResolutionMode, e.mode)
    seen: dict[tuple[int, int], int] = {}
    for p in e.ports:
        _enum("port protocol", types_pb2.PortConfig.Protocol, p.protocol)
        _enum("port publish mode", types_pb2.PortConfig.PublishMode, p.publish_mode)
        if not 1 <= p.target_port <= 65535:
            raise InvalidArgument(f"target port {p.target_port} is out of range: give a port from 1 to 65535")
        if p.published_port > 65535:
            raise InvalidArgument(
                f"published port {p.published_port} is out of range: give a port from 1 to 65535 (or none to allocate one)"
            )
        if e.mode == types_pb2.EndpointSpec.DNSRR and p.publish_mode == types_pb2.PortConfig.INGRESS:
            raise InvalidArgument(
                f"port {p.target_port} is published in ingress mode, which endpoint mode dnsrr cannot do: "
                "use mode=host for the port or endpoint mode vip"
            )
        if p.published_port:
            key = (p.published_port, p.protocol)
            if key in seen:
                proto = types_pb2.PortConfig.Protocol.Name(p.protocol).lower()
                raise InvalidArgument(f"published port {p.published_port}/{proto} is given twice: publish each port once")
            seen[key] = p.target_port


# --- other kinds ----------------------------------------------------------------------------------
def validate_node_spec(spec: specs_pb2.NodeSpec) -> None:
    validate_annotations("node", spec.annotations, name_required=False)
    validate_labels("node label", spec.annotations.labels)
    _enum("node role", types_pb2.NodeRole, spec.desired_role)
    _enum("node availability", types_pb2.NodeAvailability, spec.availability)
    _enum("node membership", specs_pb2.NodeSpec.Membership, spec.membership)


def validate_network_spec(spec: specs_pb2.NetworkSpec) -> None:
    validate_annotations("network", spec.annotations)
    driver = spec.driver_config.name
    if driver and driver != "overlay":
        raise InvalidArgument(f"network driver {driver!r} is not supported: use overlay")
    validate_labels("network driver option", spec.driver_config.options)
    if spec.ingress and ENCRYPTED_OPTION in spec.driver_config.options:
        raise InvalidArgument(
            "network driver option encrypted cannot be used on the ingress network: Shoal does not encrypt the "
            "routing mesh; create the ingress network without --opt encrypted (other overlay networks may use it)"
        )
    if spec.ingress and spec.attachable:
        raise InvalidArgument("an ingress network cannot be attachable: drop one of the two")
    if spec.ipam.driver.name and spec.ipam.driver.name != "default":
        raise InvalidArgument(f"IPAM driver {spec.ipam.driver.name!r} is not supported: use default")
    if len(spec.ipam.configs) > 1:
        raise InvalidArgument("a network takes one IPAM config (one subnet): give a single --subnet")
    for cfg in spec.ipam.configs:
        subnet = None
        if cfg.subnet:
            try:
                subnet = ipaddress.IPv4Network(cfg.subnet, strict=True)
            except ValueError:
                raise InvalidArgument(
                    f"subnet {cfg.subnet!r} is not an IPv4 network in CIDR form: give e.g. 10.1.2.0/24"
                ) from None
            if subnet.prefixlen > 29:
                raise InvalidArgument(f"subnet {cfg.subnet} is too small: give a /29 or larger")
        for field in ("gateway", "range"):
            value = getattr(cfg, field)
            if not value:
                continue
            if subnet is None:
                raise InvalidArgument(f"IPAM {field} {value!r} needs a subnet: give --subnet as well")
            try:
                inside = (
                    ipaddress.IPv4Address(value) in subnet
                    if field == "gateway"
                    else ipaddress.IPv4Network(value, strict=True).subnet_of(subnet)
                )
            except ValueError:
                raise InvalidArgument(f"IPAM {field} {value!r} is not a valid IPv4 {'address' if field == 'gateway' else 'network'}") from None
            if not inside:
                raise InvalidArgument(f"IPAM {field} {value} is not inside subnet {subnet}")


def validate_secret_spec(spec: specs_pb2.SecretSpec) -> None:
    validate_annotations("secret", spec.annotations)
    if not spec.data or len(spec.data) > MAX_SECRET_SIZE:
        raise InvalidArgument(
            f"secret data is {len(spec.data)} bytes: give between 1 byte and {MAX_SECRET_SIZE // 1024} KB"
        )


def validate_config_spec(spec: specs_pb2.ConfigSpec) -> None:
    validate_annotations("config", spec.annotations)
    if not spec.data or len(spec.data) > MAX_CONFIG_SIZE:
        raise InvalidArgument(
            f"config data is {len(spec.data)} bytes: give between 1 byte and {MAX_CONFIG_SIZE // 1024} KB"
        )


def validate_cluster_spec(spec: specs_pb2.ClusterSpec) -> None:
    validate_annotations("cluster", spec.annotations, name_required=False)
    if spec.orchestration.task_history_retention_limit < 0:
        raise InvalidArgument(
            f"task history retention limit {spec.orchestration.task_history_retention_limit} is negative: give 0 or more"
        )
    hb = duration_ns(spec.dispatcher.heartbeat_period)
    if hb < 0 or (hb and not MIN_HEARTBEAT_NS <= hb <= MAX_HEARTBEAT_NS):
        raise InvalidArgument("dispatcher heartbeat period is out of range: give a duration from 100ms to 1h")
    rw = duration_ns(spec.dispatcher.restart_window)
    if rw < 0 or (rw and not MIN_HEARTBEAT_NS * 10 <= rw <= 24 * MAX_HEARTBEAT_NS):
        raise InvalidArgument("dispatcher restart window is out of range: give 0 (the default, 60s) or a duration "
                              "from 1s to 24h")
    validate_duration("node certificate expiry", spec.ca_config.node_cert_expiry, MIN_CERT_EXPIRY_NS)
    rot = duration_ns(spec.network_encryption.key_rotation_interval)
    if rot < 0 or 0 < rot < MIN_ROTATION_NS:
        raise InvalidArgument(
            f"network key rotation interval {'is negative' if rot < 0 else f'of {_fmt_ns(rot)} is too short'}: "
            f"give 0 (the default, {_fmt_ns(DEFAULT_ROTATION_NS)}) or at least {_fmt_ns(MIN_ROTATION_NS)}"
        )
    size = spec.subnet_size
    if size and not 8 <= size <= 29:
        raise InvalidArgument(f"subnet size /{size} is out of range: give a prefix length from 8 to 29")
    for pool in spec.default_address_pool:
        try:
            net = ipaddress.IPv4Network(pool, strict=True)
        except ValueError:
            raise InvalidArgument(
                f"default address pool {pool!r} is not an IPv4 network in CIDR form: give e.g. 10.0.0.0/8"
            ) from None
        if net.prefixlen > (size or 24):
            raise InvalidArgument(
                f"default address pool {pool} is smaller than the subnet size /{size or 24}: give a larger pool"
            )
    pools = [ipaddress.IPv4Network(p) for p in spec.default_address_pool]
    for i, a in enumerate(pools):
        for b in pools[i + 1 :]:
            if a.overlaps(b):
                raise InvalidArgument(f"default address pools {a} and {b} overlap: give disjoint pools")
