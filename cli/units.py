"""Parsing of swarmctl's flag values: whole numbers, ratios, ports, mounts, secret/config refs.

Durations, byte sizes and CPU counts are parsed by `shoal.compose.units`, the one parser stack files
and flags share. Every parser raises `ValueError` with one sentence naming what was given and what is
allowed; the caller adds the flag name.
"""

from __future__ import annotations

import os

from shoal.compose.units import parse_bytes
from shoal.proto import types_pb2


# --- sizes and numbers ----------------------------------------------------------------------------------
def format_bytes(n: int) -> str:
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return f"{n / size:g}{unit}"
    return f"{n}B"


def parse_uint(text: str, what: str) -> int:
    t = text.strip()
    if not t.isdigit():
        raise ValueError(f"invalid {what} {text!r}: give a whole number of 0 or more")
    v = int(t)
    if v >= 1 << 63:
        raise ValueError(f"invalid {what} {text!r}: the number is too large")
    return v


def parse_ratio(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"invalid ratio {text!r}: give a number from 0 to 1, such as 0.2") from None


# --- key=value lists ------------------------------------------------------------------------------
def parse_kv(text: str, what: str = "label") -> tuple[str, str]:
    key, _, value = text.partition("=")
    if not key:
        raise ValueError(f"invalid {what} {text!r}: use KEY=VALUE (or KEY)")
    return key, value


def parse_env(text: str) -> str:
    """`KEY=VALUE` as is; a bare `KEY` takes its value from swarmctl's environment, as docker does."""
    if "=" not in text and text in os.environ:
        return f"{text}={os.environ[text]}"
    return text


def parse_csv_opts(text: str) -> list[tuple[str, str]]:
    out = []
    for part in text.split(","):
        if not part:
            continue
        k, eq, v = part.partition("=")
        out.append((k.strip().lower(), v.strip() if eq else ""))
    return out


def _bool(v: str, what: str) -> bool:
    if v in ("", "1", "true", "yes"):
        return True
    if v in ("0", "false", "no"):
        return False
    raise ValueError(f"invalid {what} value {v!r}: use true or false")


# --- ports ----------------------------------------------------------------------------------------
_PROTOCOLS = {"tcp": types_pb2.PortConfig.TCP, "udp": types_pb2.PortConfig.UDP, "sctp": types_pb2.PortConfig.SCTP}
_PUBLISH_MODES = {"ingress": types_pb2.PortConfig.INGRESS, "host": types_pb2.PortConfig.HOST}


def _port_number(text: str, what: str) -> int:
    if not text.isdigit() or int(text) >= 1 << 32:
        raise ValueError(f"invalid {what} {text!r}: give a port number from 1 to 65535")
    return int(text)


def _port_range(text: str, what: str) -> list[int]:
    if "-" in text:
        lo, _, hi = text.partition("-")
        a, b = _port_number(lo, what), _port_number(hi, what)
        if b < a or b - a > 1000:
            raise ValueError(f"invalid {what} range {text!r}: give LOW-HIGH with LOW <= HIGH")
        return list(range(a, b + 1))
    return [_port_number(text, what)]


def parse_port(text: str) -> list[types_pb2.PortConfig]:
    """Docker's --publish: `[PUBLISHED:]TARGET[/PROTOCOL]` (ranges allowed) or
    `published=8080,target=80,protocol=udp,mode=host`."""
    if "=" in text:
        p = types_pb2.PortConfig()
        for k, v in parse_csv_opts(text):
            if k in ("published", "published_port"):
                p.published_port = _port_number(v, "published port")
            elif k in ("target", "target_port"):
                p.target_port = _port_number(v, "target port")
            elif k == "protocol":
                if v.lower() not in _PROTOCOLS:
                    raise ValueError(f"invalid protocol {v!r} in {text!r}: use tcp, udp or sctp")
                p.protocol = _PROTOCOLS[v.lower()]
            elif k == "mode":
                if v.lower() not in _PUBLISH_MODES:
                    raise ValueError(f"invalid publish mode {v!r} in {text!r}: use ingress or host")
                p.publish_mode = _PUBLISH_MODES[v.lower()]
            elif k == "name":
                p.name = v
            else:
                raise ValueError(f"unknown port option {k!r} in {text!r}: use published, target, protocol and mode")
        if not p.target_port and "target" not in text:
            raise ValueError(f"port {text!r} has no target: add target=PORT")
        return [p]
    spec, _, proto = text.partition("/")
    proto = proto.lower() or "tcp"
    if proto not in _PROTOCOLS:
        raise ValueError(f"invalid protocol {proto!r} in {text!r}: use tcp, udp or sctp")
    parts = spec.split(":")
    if len(parts) == 1:
        published, target = [], _port_range(parts[0], "target port")
    elif len(parts) == 2:
        published = _port_range(parts[0], "published port") if parts[0] else []
        target = _port_range(parts[1], "target port")
    else:
        raise ValueError(f"invalid port {text!r}: use [PUBLISHED:]TARGET[/PROTOCOL], such as 8080:80 or 53/udp")
    if published and len(published) != len(target):
        raise ValueError(f"invalid port {text!r}: the published and target ranges differ in size")
    return [
        types_pb2.PortConfig(target_port=t, published_port=published[i] if published else 0,
                             protocol=_PROTOCOLS[proto])
        for i, t in enumerate(target)
    ]


def port_key(p: types_pb2.PortConfig) -> tuple[int, int, int]:
    return (p.published_port, p.target_port, p.protocol)


def format_port(p: types_pb2.PortConfig) -> str:
    proto = types_pb2.PortConfig.Protocol.Name(p.protocol).lower()
    pub = str(p.published_port) if p.published_port else ""
    return f"*:{pub}->{p.target_port}/{proto}"


# --- mounts ---------------------------------------------------------------------------------------
_MOUNT_TYPES = {"bind": types_pb2.Mount.BIND, "volume": types_pb2.Mount.VOLUME, "tmpfs": types_pb2.Mount.TMPFS}


def parse_mount(text: str) -> types_pb2.Mount:
    """Docker's --mount `type=bind,source=/a,target=/b,readonly` (or the short `SRC:DST[:ro]`)."""
    m = types_pb2.Mount(type=types_pb2.Mount.VOLUME)
    if "=" not in text:
        parts = text.split(":")
        if len(parts) not in (2, 3) or (len(parts) == 3 and parts[2] not in ("ro", "rw")):
            raise ValueError(f"invalid mount {text!r}: use type=bind|volume|tmpfs,source=SRC,target=DST[,readonly]")
        m.source, m.target = parts[0], parts[1]
        m.type = types_pb2.Mount.BIND if parts[0].startswith("/") else types_pb2.Mount.VOLUME
        m.readonly = len(parts) == 3 and parts[2] == "ro"
        return m
    for k, v in parse_csv_opts(text):
        if k == "type":
            if v not in _MOUNT_TYPES:
                raise ValueError(f"invalid mount type {v!r} in {text!r}: use bind, volume or tmpfs")
            m.type = _MOUNT_TYPES[v]
        elif k in ("source", "src"):
            m.source = v
        elif k in ("target", "dst", "destination"):
            m.target = v
        elif k in ("readonly", "ro"):
            m.readonly = _bool(v, "readonly")
        elif k == "bind-propagation":
            m.bind_options.propagation = v
        elif k == "volume-nocopy":
            m.volume_options.nocopy = _bool(v, "volume-nocopy")
        elif k == "volume-label":
            lk, lv = parse_kv(v)
            m.volume_options.labels[lk] = lv
        elif k == "volume-driver":
            m.volume_options.driver_config.name = v
        elif k == "volume-opt":
            ok, ov = parse_kv(v, "volume option")
            m.volume_options.driver_config.options[ok] = ov
        elif k == "tmpfs-size":
            m.tmpfs_options.size_bytes = parse_bytes(v)
        elif k == "tmpfs-mode":
            try:
                m.tmpfs_options.mode = int(v, 8)
            except ValueError:
                raise ValueError(f"invalid tmpfs-mode {v!r}: give an octal mode such as 1777") from None
        else:
            raise ValueError(f"unknown mount option {k!r} in {text!r}")
    if not m.target:
        raise ValueError(f"mount {text!r} has no target: add target=PATH")
    return m


# --- secret and config references -----------------------------------------------------------------
def parse_file_ref(text: str, kind: str) -> types_pb2.SecretReference | types_pb2.ConfigReference:
    """`NAME` or `source=NAME,target=PATH,uid=0,gid=0,mode=0444`."""
    ref = types_pb2.SecretReference() if kind == "secret" else types_pb2.ConfigReference()
    name_field = f"{kind}_name"
    if "=" not in text:
        setattr(ref, name_field, text)
        return ref
    for k, v in parse_csv_opts(text):
        if k in ("source", "src"):
            setattr(ref, name_field, v)
        elif k in ("target", "dst"):
            ref.file.name = v
        elif k == "uid":
            ref.file.uid = v
        elif k == "gid":
            ref.file.gid = v
        elif k == "mode":
            try:
                ref.file.mode = int(v, 8)
            except ValueError:
                raise ValueError(f"invalid {kind} mode {v!r}: give an octal mode such as 0400") from None
        else:
            raise ValueError(f"unknown {kind} option {k!r} in {text!r}: use source, target, uid, gid and mode")
    if not getattr(ref, name_field):
        raise ValueError(f"{kind} {text!r} has no source: add source=NAME")
    return ref


def parse_placement_pref(text: str) -> types_pb2.PlacementPreference:
    kind, eq, value = text.partition("=")
    if kind != "spread" or not eq:
        raise ValueError(f"invalid placement preference {text!r}: use spread=node.labels.NAME")
    return types_pb2.PlacementPreference(spread_descriptor=value)


def parse_ulimit(text: str) -> types_pb2.Ulimit:
    name, eq, v = text.partition("=")
    if not eq:
        raise ValueError(f"invalid ulimit {text!r}: use NAME=SOFT[:HARD], such as nofile=1024:2048")
    soft, _, hard = v.partition(":")
    try:
        s = int(soft)
        h = int(hard) if hard else s
    except ValueError:
        raise ValueError(f"invalid ulimit {text!r}: use NAME=SOFT[:HARD] with numbers") from None
    return types_pb2.Ulimit(name=name, soft=s, hard=h)


def parse_add_host(text: str) -> str:
    """Docker's --host HOST:IP becomes the spec's 'IP HOST' line."""
    host, sep, ip = text.partition(":")
    if not sep or not host or not ip:
        raise ValueError(f"invalid extra host {text!r}: use HOSTNAME:IP")
    return f"{ip} {host}"
