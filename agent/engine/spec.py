"""From a ContainerSpec and an image config to an OCI runtime spec (config.json for runc).

Pure functions (no root needed) except where they read the container's root file system
(``resolve_user``, ``find_executable``), which they do without following symlinks out of it.
"""

from __future__ import annotations

import os
import posixpath
import re
import resource
import signal
from dataclasses import dataclass, field

from shoal.agent.engine.errors import ExecutableNotFound, InvalidSpec, UserNotFound
from shoal.proto import types_pb2

DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
DEFAULT_STOP_GRACE = 10.0
INIT_PATH = "/sbin/docker-init"
DEFAULT_CAPS = [
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_FSETID",
    "CAP_FOWNER",
    "CAP_MKNOD",
    "CAP_NET_RAW",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETFCAP",
    "CAP_SETPCAP",
    "CAP_NET_BIND_SERVICE",
    "CAP_SYS_CHROOT",
    "CAP_KILL",
    "CAP_AUDIT_WRITE",
]
ALL_CAPS = [
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_DAC_READ_SEARCH",
    "CAP_FOWNER",
    "CAP_FSETID",
    "CAP_KILL",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETPCAP",
    "CAP_LINUX_IMMUTABLE",
    "CAP_NET_BIND_SERVICE",
    "CAP_NET_BROADCAST",
    "CAP_NET_ADMIN",
    "CAP_NET_RAW",
    "CAP_IPC_LOCK",
    "CAP_IPC_OWNER",
    "CAP_SYS_MODULE",
    "CAP_SYS_RAWIO",
    "CAP_SYS_CHROOT",
    "CAP_SYS_PTRACE",
    "CAP_SYS_PACCT",
    "CAP_SYS_ADMIN",
    "CAP_SYS_BOOT",
    "CAP_SYS_NICE",
    "CAP_SYS_RESOURCE",
    "CAP_SYS_TIME",
    "CAP_SYS_TTY_CONFIG",
    "CAP_MKNOD",
    "CAP_LEASE",
    "CAP_AUDIT_WRITE",
    "CAP_AUDIT_CONTROL",
    "CAP_SETFCAP",
    "CAP_MAC_OVERRIDE",
    "CAP_MAC_ADMIN",
    "CAP_SYSLOG",
    "CAP_WAKE_ALARM",
    "CAP_BLOCK_SUSPEND",
    "CAP_AUDIT_READ",
    "CAP_PERFMON",
    "CAP_BPF",
    "CAP_CHECKPOINT_RESTORE",
]
RLIMITS = {
    "as",
    "core",
    "cpu",
    "data",
    "fsize",
    "locks",
    "memlock",
    "msgqueue",
    "nice",
    "nofile",
    "nproc",
    "rss",
    "rtprio",
    "rttime",
    "sigpending",
    "stack",
}
MASKED_PATHS = [
    "/proc/asound",
    "/proc/acpi",
    "/proc/kcore",
    "/proc/keys",
    "/proc/latency_stats",
    "/proc/timer_list",
    "/proc/timer_stats",
    "/proc/sched_debug",
    "/proc/scsi",
    "/sys/firmware",
    "/sys/devices/virtual/powercap",
]
READONLY_PATHS = ["/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger"]
_NAMESPACED_SYSCTL = re.compile(
    r"^(kernel\.(msgmax|msgmnb|msgmni|sem|shmall|shmmax|shmmni|shm_rmid_forced)"
    r"|fs\.mqueue\..+|net\..+)$"
)


@dataclass
class HealthSpec:
    test: list[str]  # ["CMD", ...] or ["CMD-SHELL", "..."]
    interval: float = 30.0
    timeout: float = 30.0
    retries: int = 3
    start_period: float = 0.0
    start_interval: float = 5.0
    shell: list[str] = field(default_factory=lambda: ["/bin/sh", "-c"])  # the image's SHELL

    @property
    def argv(self) -> list[str]:
        if self.test[0] == "CMD-SHELL":
            return [*self.shell, " ".join(self.test[1:])]
        return list(self.test[1:])


@dataclass
class Merged:
    """The container's process as Docker would run it, before user lookup."""

    argv: list[str]
    env: list[str]
    workdir: str
    user: str
    stop_signal: str
    stop_grace: float
    health: HealthSpec | None
    labels: dict[str, str] = field(default_factory=dict)
    hostname: str = ""


def _dur(d, present: bool) -> float | None:
    return d.seconds + d.nanos / 1e9 if present else None


def _ns(v) -> float | None:
    return v / 1e9 if v else None


def merge_env(*envs: list[str]) -> list[str]:
    out: dict[str, str] = {}
    for env in envs:
        for kv in env:
            k, sep, v = kv.partition("=")
            if not k:
                raise InvalidSpec(f"env entry {kv!r} has no variable name; use KEY=VALUE")
            out[k] = kv if sep else f"{k}="
    return list(out.values())


def merge_health(
    spec_h: types_pb2.HealthConfig | None, image_h: dict | None, shell: list[str] | None = None
) -> HealthSpec | None:
    image_h = image_h or {}
    test = list(spec_h.test) if spec_h is not None and spec_h.test else list(image_h.get("Test") or [])
    if not test or test[0] == "NONE":
        return None
    if test[0] not in ("CMD", "CMD-SHELL") or len(test) < 2:
        raise InvalidSpec(
            f'healthcheck.test {test!r} must be ["CMD", args...], ["CMD-SHELL", "command"] or ["NONE"]'
        )

    def pick(name: str, img_key: str, default: float) -> float:
        v = None
        if spec_h is not None:
            v = _dur(getattr(spec_h, name), spec_h.HasField(name))
        if not v:
            v = _ns(image_h.get(img_key))
        return v if v else default

    retries = (
        (spec_h.retries if spec_h is not None and spec_h.retries else 0)
        or int(image_h.get("Retries") or 0)
        or 3
    )
    return HealthSpec(
        test,
        pick("interval", "Interval", 30.0),
        pick("timeout", "Timeout", 30.0),
        retries,
        pick("start_period", "StartPeriod", 0.0),
        pick("start_interval", "StartInterval", 5.0),
        list(shell) if shell else ["/bin/sh", "-c"],
    )


def parse_signal(sig: str, field_name: str = "stop_signal") -> signal.Signals:
    s = sig.strip().upper()
    try:
        if s.isdigit():
            return signal.Signals(int(s))
        return signal.Signals[s if s.startswith("SIG") else "SIG" + s]
    except (KeyError, ValueError):
        raise InvalidSpec(f"{field_name} {sig!r} is not a signal name or number; use e.g. SIGTERM") from None


def merge_config(spec: types_pb2.ContainerSpec, image_config: dict, *, default_hostname: str = "") -> Merged:
    """Merges the spec over the image config the way Docker (and SwarmKit's adapter) do.

    ``command`` replaces the image's Entrypoint and drops its Cmd; ``args`` replace the Cmd only.
    """
    ic = image_config or {}
    if spec.command:
        argv = list(spec.command) + list(spec.args)
    else:
        argv = list(ic.get("Entrypoint") or []) + (
            list(spec.args) if spec.args else list(ic.get("Cmd") or [])
        )
    if not argv:
        raise InvalidSpec(
            "no command: the image has no Entrypoint or Cmd and the spec sets neither command nor args"
        )
    hostname = spec.hostname or default_hostname
    env = merge_env(list(ic.get("Env") or []), list(spec.env))
    if not any(e.startswith("PATH=") for e in env):
        env.insert(0, f"PATH={DEFAULT_PATH}")
    if hostname and not any(e.startswith("HOSTNAME=") for e in env):
        env.insert(1, f"HOSTNAME={hostname}")
    workdir = spec.dir or ic.get("WorkingDir") or "/"
    if not workdir.startswith("/"):
        raise InvalidSpec(f"dir {workdir!r} must be an absolute path")
    stop_signal = spec.stop_signal or ic.get("StopSignal") or "SIGTERM"
    parse_signal(stop_signal)
    grace = _dur(spec.stop_grace_period, spec.HasField("stop_grace_period"))
    health = merge_health(
        spec.healthcheck if spec.HasField("healthcheck") else None, ic.get("Healthcheck"), ic.get("Shell")
    )
    labels = {**(ic.get("Labels") or {}), **dict(spec.labels)}
    return Merged(
        argv,
        env,
        posixpath.normpath(workdir),
        spec.user or ic.get("User") or "",
        stop_signal,
        DEFAULT_STOP_GRACE if grace is None else grace,
        health,
        labels,
        hostname,
    )


# -- paths inside the root file system -------------------------------------------------------------
def resolve_in_root(root: str, path: str, *, max_links: int = 40) -> str:
    """Resolves ``path`` inside ``root`` like a chroot would (symlinks are relative to ``root``)."""
    parts = [p for p in path.split("/") if p and p != "."]
    done: list[str] = []
    links = 0
    while parts:
        p = parts.pop(0)
        if p == "..":
            if done:
                done.pop()
            continue
        cand = os.path.join(root, *done, p)
        if os.path.islink(cand):
            links += 1
            if links > max_links:
                raise InvalidSpec(f"too many symlinks resolving {path} in the image")
            target = os.readlink(cand)
            if target.startswith("/"):
                done = []
            parts = [x for x in target.split("/") if x and x != "."] + parts
            continue
        done.append(p)
    return os.path.join(root, *done)


def read_in_root(root: str, path: str) -> str | None:
    try:
        with open(resolve_in_root(root, path), errors="replace") as f:
            return f.read()
    except OSError:
        return None


@dataclass
class ResolvedUser:
    uid: int
    gid: int
    additional_gids: list[int]
    home: str


def _passwd(root: str) -> list[list[str]]:
    text = read_in_root(root, "/etc/passwd") or ""
    return [ln.split(":") for ln in text.splitlines() if ln and not ln.startswith("#") and ln.count(":") >= 6]


def _group(root: str) -> list[list[str]]:
    text = read_in_root(root, "/etc/group") or ""
    return [ln.split(":") for ln in text.splitlines() if ln and not ln.startswith("#") and ln.count(":") >= 3]


def resolve_user(root: str, user: str, groups: list[str] | None = None) -> ResolvedUser:
    """``user`` is ``name|uid[:group|gid]``, looked up in the image's /etc/passwd and /etc/group."""
    name, _, grp = (user or "0").partition(":")
    pw = _passwd(root)
    entry = None
    if name.isdigit():
        uid = int(name)
        entry = next((e for e in pw if e[2] == name), None)
    else:
        entry = next((e for e in pw if e[0] == name), None)
        if entry is None:
            raise UserNotFound(f"unable to find user {name}: no matching entries in passwd file of the image")
        uid = int(entry[2])
    gid = int(entry[3]) if entry is not None and entry[3].isdigit() else 0
    home = entry[5] if entry is not None and entry[5] else "/"
    gr = _group(root)
    if grp:
        gid = _gid(gr, grp, "user")
    extra: list[int] = []
    if entry is not None:
        for g in gr:
            if entry[0] in g[3].split(",") and g[2].isdigit():
                extra.append(int(g[2]))
    for g in groups or []:
        extra.append(_gid(gr, g, "groups"))
    return ResolvedUser(uid, gid, sorted(set(extra) - {gid}), home)


def _gid(gr: list[list[str]], g: str, field_name: str) -> int:
    if g.isdigit():
        return int(g)
    e = next((x for x in gr if x[0] == g), None)
    if e is None or not e[2].isdigit():
        raise UserNotFound(
            f"{field_name}: unable to find group {g}: no matching entries in group file of the image"
        )
    return int(e[2])


def find_executable(root: str, argv0: str, env: list[str], workdir: str, mounted: list[str] = ()) -> None:
    """Raises ExecutableNotFound unless ``argv0`` resolves to an executable file in ``root``.

    Paths under ``mounted`` targets (bind mounts, volumes) are not checked: they are not in the image.
    """

    def under_mount(p: str) -> bool:
        return any(p == m or p.startswith(m.rstrip("/") + "/") for m in mounted)

    def ok(p: str) -> bool:
        if under_mount(p):
            return True
        real = resolve_in_root(root, p)
        return os.path.isfile(real) and os.access(real, os.X_OK)

    if "/" in argv0:
        p = argv0 if argv0.startswith("/") else posixpath.join(workdir, argv0)
        if not ok(posixpath.normpath(p)):
            raise ExecutableNotFound(f'exec: "{argv0}": stat {argv0}: no such file or directory in the image')
        return
    path = next((e[5:] for e in env if e.startswith("PATH=")), DEFAULT_PATH)
    for d in path.split(":"):
        if d and ok(posixpath.join(d if d.startswith("/") else posixpath.join(workdir, d), argv0)):
            return
    raise ExecutableNotFound(f'exec: "{argv0}": executable file not found in $PATH of the image')


# -- runtime spec ------------------------------------------------------------------------------------
def normalize_caps(caps: list[str], field_name: str) -> list[str]:
    out = []
    for c in caps:
        u = c.strip().upper()
        if u == "ALL":
            out.append("ALL")
            continue
        u = u if u.startswith("CAP_") else "CAP_" + u
        if u not in ALL_CAPS:
            raise InvalidSpec(f"{field_name}: unknown capability {c!r}")
        out.append(u)
    return out


def capabilities(add: list[str], drop: list[str]) -> list[str]:
    add_n, drop_n = normalize_caps(add, "capability_add"), normalize_caps(drop, "capability_drop")
    caps = list(ALL_CAPS) if "ALL" in add_n else list(DEFAULT_CAPS)
    caps += [c for c in add_n if c != "ALL" and c not in caps]
    if "ALL" in drop_n:
        caps = [c for c in caps if c in add_n]
    else:
        caps = [c for c in caps if c not in drop_n]
    return caps


def check_sysctls(sysctls: dict[str, str], own_netns: bool) -> None:
    for k in sysctls:
        if not _NAMESPACED_SYSCTL.match(k):
            raise InvalidSpec(
                f"sysctls: {k} is not a namespaced kernel parameter and cannot be set per container"
            )


def rlimits(ulimits: list[types_pb2.Ulimit]) -> list[dict]:
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    n = 1048576 if hard == resource.RLIM_INFINITY else min(1048576, hard)
    out = {"RLIMIT_NOFILE": {"type": "RLIMIT_NOFILE", "hard": n, "soft": n}}
    for u in ulimits:
        n = u.name.lower().removeprefix("rlimit_")
        if n not in RLIMITS:
            raise InvalidSpec(f"ulimits: unknown limit {u.name!r}; use one of {', '.join(sorted(RLIMITS))}")
        if u.soft > u.hard:
            raise InvalidSpec(f"ulimits: {u.name} soft limit {u.soft} is above its hard limit {u.hard}")
        key = "RLIMIT_" + n.upper()
        out[key] = {"type": key, "hard": u.hard, "soft": u.soft}
    return list(out.values())


def resources_spec(res: types_pb2.ResourceRequirements | None, *, swap_files: bool) -> dict:
    r: dict = {"devices": [{"allow": False, "access": "rwm"}]}
    if res is None:
        return r
    mem: dict = {}
    if res.limits.memory_bytes:
        if res.limits.memory_bytes < 6 << 20:
            raise InvalidSpec("resources.limits.memory_bytes must be at least 6 MiB")
        mem["limit"] = res.limits.memory_bytes
        if swap_files:
            mem["swap"] = res.limits.memory_bytes  # no swap on top of the limit: over it means OOM
    if res.reservations.memory_bytes:
        mem["reservation"] = res.reservations.memory_bytes
    if mem:
        r["memory"] = mem
    if res.limits.nano_cpus:
        period = 100000
        r["cpu"] = {"period": period, "quota": max(1000, res.limits.nano_cpus * period // 1_000_000_000)}
    if res.pids_limit:
        r["pids"] = {"limit": res.pids_limit}
    return r


def file_target(
    target: types_pb2.FileTarget, default_dir: str, name: str, field_name: str
) -> tuple[str, int, int, int]:
    """(container path, uid, gid, mode) of a secret or config file."""
    fname = target.name or name
    path = posixpath.normpath(fname if fname.startswith("/") else posixpath.join(default_dir, fname))
    if path == "/" or ".." in fname.split("/"):
        raise InvalidSpec(f"{field_name}: target {fname!r} is not a valid file path")
    try:
        uid = int(target.uid or "0")
        gid = int(target.gid or "0")
    except ValueError:
        raise InvalidSpec(f"{field_name}: uid/gid of {fname!r} must be numeric") from None
    mode = target.mode if target.mode else 0o444
    return path, uid, gid, mode


# Seccomp: Docker's default profile allows a list of syscalls; ours allows everything but what lets a
# process without CAP_SYS_ADMIN leave its sandbox (new namespaces, notably user namespaces, which need no
# capability), plus the kernel keyring (not namespaced) and userfaultfd/kexec.
_ALWAYS_DENIED = ["add_key", "keyctl", "request_key", "kexec_load", "kexec_file_load", "userfaultfd"]
_SYS_ADMIN_DENIED = [
    "bpf", "fanotify_init", "fsconfig", "fsmount", "fsopen", "fspick", "lookup_dcookie", "mount",
    "mount_setattr", "move_mount", "name_to_handle_at", "open_tree", "perf_event_open", "quotactl",
    "quotactl_fd", "setns", "syslog", "umount", "umount2", "unshare", "pivot_root",
]  # fmt: skip
_CLONE_NS_FLAGS = [0x00020000, 0x02000000, 0x04000000, 0x08000000, 0x10000000, 0x20000000, 0x40000000]
_SECCOMP_ARCHES = {
    "x86_64": ["SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32"],
    "aarch64": ["SCMP_ARCH_AARCH64", "SCMP_ARCH_ARM"],
}


def seccomp_profile(caps: list[str]) -> dict:
    """The container's seccomp filter: deny (EPERM) the syscalls above unless CAP_SYS_ADMIN was added."""
    eperm = {"action": "SCMP_ACT_ERRNO", "errnoRet": 1}
    rules: list[dict] = [{"names": list(_ALWAYS_DENIED), **eperm}]
    if "CAP_SYS_ADMIN" not in caps:
        rules.append({"names": list(_SYS_ADMIN_DENIED), **eperm})
        for flag in _CLONE_NS_FLAGS:  # clone() creating any namespace
            rules.append(
                {
                    "names": ["clone"],
                    **eperm,
                    "args": [{"index": 0, "value": flag, "valueTwo": flag, "op": "SCMP_CMP_MASKED_EQ"}],
                }
            )
        # clone3 passes its flags in memory, out of seccomp's sight: ENOSYS makes libc fall back to clone
        rules.append({"names": ["clone3"], "action": "SCMP_ACT_ERRNO", "errnoRet": 38})
    return {
        "defaultAction": "SCMP_ACT_ALLOW",
        "architectures": _SECCOMP_ARCHES.get(os.uname().machine, []),
        "syscalls": rules,
    }


def base_spec(
    *,
    args: list[str],
    env: list[str],
    cwd: str,
    user: ResolvedUser,
    hostname: str,
    readonly: bool,
    netns_path: str | None,
    caps: list[str],
    sysctls: dict[str, str],
    rlimit_list: list[dict],
    resources: dict,
    cgroups_path: str,
    mounts: list[dict],
    cgroup_v2: bool,
    terminal: bool = False,
) -> dict:
    namespaces = [
        {"type": "pid"},
        {"type": "ipc"},
        {"type": "uts"},
        {"type": "mount"},
        {"type": "network", "path": netns_path} if netns_path else {"type": "network"},
    ]
    if cgroup_v2:
        namespaces.append({"type": "cgroup"})
    default_mounts = [
        {"destination": "/proc", "type": "proc", "source": "proc", "options": ["nosuid", "noexec", "nodev"]},
        {
            "destination": "/dev",
            "type": "tmpfs",
            "source": "tmpfs",
            "options": ["nosuid", "strictatime", "mode=755", "size=65536k"],
        },
        {
            "destination": "/dev/pts",
            "type": "devpts",
            "source": "devpts",
            "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5"],
        },
        {
            "destination": "/sys",
            "type": "sysfs",
            "source": "sysfs",
            "options": ["nosuid", "noexec", "nodev", "ro"],
        },
        {
            "destination": "/sys/fs/cgroup",
            "type": "cgroup",
            "source": "cgroup",
            "options": ["ro", "nosuid", "noexec", "nodev"],
        },
        {
            "destination": "/dev/mqueue",
            "type": "mqueue",
            "source": "mqueue",
            "options": ["nosuid", "noexec", "nodev"],
        },
        {
            "destination": "/dev/shm",
            "type": "tmpfs",
            "source": "shm",
            "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"],
        },
    ]
    targets = {m["destination"] for m in mounts}
    return {
        "ociVersion": "1.0.2",
        "process": {
            "terminal": terminal,
            "user": {"uid": user.uid, "gid": user.gid, "additionalGids": user.additional_gids},
            "args": args,
            "env": env,
            "cwd": cwd,
            "capabilities": {k: caps for k in ("bounding", "effective", "permitted")},
            "rlimits": rlimit_list,
            "noNewPrivileges": False,
            "oomScoreAdj": 0,
        },
        "root": {"path": "rootfs", "readonly": readonly},
        "hostname": hostname,
        "mounts": [m for m in default_mounts if m["destination"] not in targets] + mounts,
        "linux": {
            "namespaces": namespaces,
            "cgroupsPath": cgroups_path,
            "resources": resources,
            "sysctl": dict(sysctls),
            "maskedPaths": MASKED_PATHS,
            "seccomp": seccomp_profile(caps),
            "readonlyPaths": READONLY_PATHS,
        },
    }


def hosts_file(hostname: str, extra: list[str]) -> str:
    lines = [
        "127.0.0.1\tlocalhost",
        "::1\tlocalhost ip6-localhost ip6-loopback",
        "fe00::0\tip6-localnet",
        "ff00::0\tip6-mcastprefix",
        "ff02::1\tip6-allnodes",
        "ff02::2\tip6-allrouters",
    ]
    for h in extra:
        h = h.strip()
        if not h:
            continue
        if " " not in h and "\t" not in h and ":" in h:  # docker run --add-host style "name:ip"
            name, _, ip = h.partition(":")
            h = f"{ip}\t{name}"
        lines.append(h)
    return "\n".join(lines) + "\n"


def resolv_conf(
    given: str | None, dns: types_pb2.DNSConfig | None, host_resolv: str = "/etc/resolv.conf"
) -> str:
    search = list(dns.search) if dns is not None else []
    options = list(dns.options) if dns is not None else []
    if given is not None:
        text = given if given.endswith("\n") or not given else given + "\n"
    elif dns is not None and dns.nameservers:
        text = "".join(f"nameserver {n}\n" for n in dns.nameservers)
    else:
        try:
            host = open(host_resolv).read()
        except OSError:
            host = ""
        keep = []
        for ln in host.splitlines():
            f = ln.split()
            if f and f[0] == "nameserver" and len(f) > 1 and (f[1].startswith("127.") or f[1] == "::1"):
                continue  # the host's local resolver is not reachable from the container
            if f and f[0] in ("search", "options") and (search or options):
                continue
            keep.append(ln)
        text = "\n".join(keep) + ("\n" if keep else "")
    if search and "search " not in text:
        text += "search " + " ".join(search) + "\n"
    if options and "options " not in text:
        text += "options " + " ".join(options) + "\n"
    return text
