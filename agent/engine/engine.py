"""The local container engine: image store + overlayfs rootfs + OCI bundle + conmon/runc.

See the package docstring (``shoal.agent.engine``) for the API and the on-disk layout.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import glob
import hashlib
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from shoal.agent.engine import reference
from shoal.agent.engine import spec as specmod
from shoal.agent.engine.distribution import RegistryAuth
from shoal.agent.engine.errors import (
    ContainerExists,
    ContainerNotFound,
    EngineError,
    InvalidImage,
    InvalidSpec,
    InvalidState,
    RuntimeFailed,
)
from shoal.agent.engine.health import HealthMonitor, HealthState
from shoal.agent.engine.images import Image, ImageStore
from shoal.agent.engine.logs import LogLine, read_log
from shoal.agent.engine.spec import HealthSpec
from shoal.proto import types_pb2

log = logging.getLogger(__name__)

RUNC = shutil.which("runc", path="/usr/sbin:/usr/bin:/sbin:/bin") or "/usr/sbin/runc"
CONMON = shutil.which("conmon", path="/usr/bin:/usr/libexec/podman:/usr/sbin") or "/usr/bin/conmon"
TINI = next(
    (
        p
        for p in ("/usr/bin/tini-static", "/usr/bin/catatonit", "/usr/libexec/podman/catatonit")
        if os.path.exists(p)
    ),
    "/usr/bin/tini-static",
)
_ID_RE = re.compile(r"^[a-zA-Z0-9][a-zA-Z0-9_.-]{0,127}$")
_VOLUME_RE = re.compile(r"^[a-zA-Z0-9][a-zA-Z0-9_.-]+$")
MS_NOSUID, MS_NODEV, MS_NOEXEC = 2, 4, 8
MNT_DETACH = 2
_libc = ctypes.CDLL(None, use_errno=True)
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]


def _mount(source: str, target: str, fstype: str, flags: int, data: str) -> None:
    if _libc.mount(source.encode(), target.encode(), fstype.encode(), flags, data.encode()) != 0:
        e = ctypes.get_errno()
        raise OSError(e, f"mount {fstype} on {target}: {os.strerror(e)}")


def _umount(target: str) -> None:
    if _libc.umount2(target.encode(), MNT_DETACH) != 0:
        e = ctypes.get_errno()
        if e not in (errno.EINVAL, errno.ENOENT):
            raise OSError(e, f"umount {target}: {os.strerror(e)}")


def _is_mountpoint(path: str) -> bool:
    try:
        with open("/proc/self/mountinfo") as f:
            return any(ln.split()[4] == path for ln in f)
    except OSError:
        return False


def cgroup_v2() -> bool:
    return os.path.exists("/sys/fs/cgroup/cgroup.controllers")


def _pid_start(pid: int) -> int | None:
    """The start time (clock ticks since boot) of ``pid``, or None when it does not exist."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    fields = data[data.rindex(b")") + 2 :].split()
    if fields[0] == b"Z":
        return None
    return int(fields[19])


def _alive(pid: int, start: int | None) -> bool:
    if pid <= 0:
        return False
    s = _pid_start(pid)
    return s is not None and (start is None or s == start)


def _now() -> float:
    return time.time()


def _dt(ts: float | None) -> datetime | None:
    return datetime.fromtimestamp(ts, UTC) if ts else None


@dataclass
class ContainerConfig:
    id: str  # the task id (letters, digits, _ . -)
    name: str  # e.g. web.1.<taskid>
    spec: types_pb2.ContainerSpec
    resources: types_pb2.ResourceRequirements | None = None
    netns_path: str | None = None  # join this netns; None = new netns with only loopback
    secrets: dict[str, bytes] = field(default_factory=dict)  # secret_id -> data
    configs: dict[str, bytes] = field(default_factory=dict)  # config_id -> data
    labels: dict[str, str] = field(default_factory=dict)
    resolv_conf: str | None = None  # whole /etc/resolv.conf; None = from dns_config or the host
    extra_hosts: list[str] = field(default_factory=list)  # "IP name..." lines for /etc/hosts


@dataclass
class ExitStatus:
    exit_code: int
    oom_killed: bool
    finished_at: datetime | None
    reason: str = ""  # "OOMKilled" | "Completed" | "Error" | "Lost"


@dataclass
class ContainerState:
    id: str
    name: str
    status: str  # created | running | exited
    pid: int
    image: str
    image_id: str
    labels: dict[str, str]
    created_at: datetime | None
    started_at: datetime | None
    exit: ExitStatus | None = None
    health: HealthState | None = None  # None when the container has no health check

    @property
    def health_status(self) -> str | None:
        return self.health.status if self.health else None


@dataclass
class _Meta:
    """What create() wrote; fixed for the container's life (meta.json)."""

    id: str
    name: str
    image: str
    image_id: str
    labels: dict[str, str]
    created: float
    hostname: str
    stop_signal: str
    stop_grace: float
    health: dict | None
    exec_env: list[str]
    exec_cwd: str
    exec_user: str  # "uid:gid"
    exec_groups: list[int]
    cgroups_path: str
    pid: int = 0
    pid_start: int | None = None
    conmon_pid: int = 0
    conmon_start: int | None = None
    anon_volumes: list[str] = field(default_factory=list)

    def health_spec(self) -> HealthSpec | None:
        return HealthSpec(**self.health) if self.health else None


class Engine:
    def __init__(
        self,
        root: Path,
        *,
        registry_mirrors: Sequence[str] = (),
        insecure_registries: Sequence[str] = (),
        log_size_max: int = 10 << 20,
        on_health_change: Callable[[str, str], None] | None = None,
        spawn_parallel: int | None = None,
        run_dir: Path | None = None,
    ) -> None:
        """``spawn_parallel``: how many creates prepare rootfs and run ``runc create`` at once (default
        2 per CPU); more only makes them fight for the CPUs. ``run_dir``: where runtime files go (bundle,
        runc state, pid and exit files, hosts/resolv.conf, the secrets tmpfs mount point); default
        ``ROOT/containers`` (next to meta.json). A tmpfs such as ``/run/shoal`` is faster; it must be the
        same for every Engine on this ROOT, and a reboot empties it (its containers then read as exited)."""
        self.root = Path(root).absolute()
        self.root.mkdir(parents=True, exist_ok=True)
        self.images = ImageStore(
            self.root, registry_mirrors=registry_mirrors, insecure_registries=insecure_registries
        )
        self.cdir = self.root / "containers"
        self.vdir = self.root / "volumes"
        self.run_dir = Path(run_dir).absolute() if run_dir else self.cdir
        self.runc_root = self.run_dir / "runc" if self.run_dir != self.cdir else self.root / "runc"
        self.sock_dir = self.run_dir / "sock" if self.run_dir != self.cdir else self.root / "sock"
        for d in (self.cdir, self.vdir, self.run_dir, self.runc_root, self.sock_dir):
            d.mkdir(exist_ok=True)
        self.empty_layer = self.root / "images" / "empty"
        self.empty_layer.mkdir(exist_ok=True)
        self.tag = hashlib.sha256(str(self.root).encode()).hexdigest()[:10]
        self.v2 = cgroup_v2()
        # can the swap limit be set (so that a memory limit means OOM, not swapping)? v2's root cgroup
        # has no memory.swap.max, so look at its children
        self.swap_files = (
            bool(glob.glob("/sys/fs/cgroup/*/memory.swap.max"))
            if self.v2
            else os.path.exists("/sys/fs/cgroup/memory/memory.memsw.limit_in_bytes")
        )
        self.log_size_max = log_size_max
        self.on_health_change = on_health_change
        self._pulls: dict[str, asyncio.Future[Image]] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._health: dict[str, HealthMonitor] = {}
        self._adopted = False
        self._creating = 0
        self.spawn_parallel = spawn_parallel or max(2, 2 * (os.cpu_count() or 1))
        self._sem: asyncio.Semaphore | None = None
        self._sem_loop: asyncio.AbstractEventLoop | None = None

    # -- images -------------------------------------------------------------------------------
    async def pull(self, ref: str, auth: RegistryAuth | None = None) -> Image:
        """Pulls ``ref``; concurrent pulls of the same reference share one download."""
        r = reference.parse(ref)
        key = str(r)
        fut = self._pulls.get(key)
        if fut is None:
            fut = asyncio.ensure_future(asyncio.to_thread(self.images.pull, r, auth))
            self._pulls[key] = fut

            def done(f: asyncio.Future, key: str = key) -> None:
                self._pulls.pop(key, None)
                if not f.cancelled():
                    f.exception()  # mark retrieved: callers may all have been cancelled

            fut.add_done_callback(done)
        return await asyncio.shield(fut)

    async def load(self, tarball: Path) -> list[Image]:
        return await asyncio.to_thread(self.images.load, Path(tarball))

    async def image(self, name: str) -> Image | None:
        return await asyncio.to_thread(self.images.get, name)

    async def list_images(self) -> list[Image]:
        return await asyncio.to_thread(self.images.list)

    def _images_in_use(self) -> dict[str, str]:
        out = {}
        for m in self._metas():
            out.setdefault(m.image_id, m.id)
        return out

    async def remove_image(self, name: str, *, force: bool = False) -> list[str]:
        """Untags/deletes an image (ImageInUse while a container uses it, unless ``force`` untags only)."""
        return await asyncio.to_thread(self.images.remove, name, self._images_in_use(), force=force)

    async def prune_images(self) -> list[str]:
        """Deletes every image no container uses; returns the deleted ids."""
        return await asyncio.to_thread(self.images.prune, self._images_in_use())

    # -- volumes -----------------------------------------------------------------------------------
    async def volumes(self) -> list[str]:
        """Names of the named local volumes (anonymous ones included while their container exists)."""
        return sorted(p.name for p in self.vdir.iterdir() if (p / "_data").is_dir())

    async def remove_volume(self, name: str) -> None:
        """Deletes a named volume; InvalidState while a container mounts it."""
        if not _VOLUME_RE.match(name) or not (self.vdir / name).is_dir():
            raise InvalidSpec(f"no such volume {name!r}")
        data = str(self.vdir / name / "_data")
        for m in self._metas():
            try:
                doc = json.loads((self._rdir(m.id) / "bundle" / "config.json").read_text())
            except (OSError, ValueError):
                continue
            if any(x.get("source") == data for x in doc.get("mounts", [])):
                raise InvalidState(f"volume {name} is in use by container {m.id}; remove the container first")
        await asyncio.to_thread(shutil.rmtree, self.vdir / name)
        log.info("volume removed name=%s", name)

    # -- paths and metadata --------------------------------------------------------------------
    def _dir(self, cid: str) -> Path:
        return self.cdir / cid

    def _rdir(self, cid: str) -> Path:
        """Runtime files of a container (bundle, pid/exit files, hosts...): under run_dir."""
        return self.run_dir / cid

    def _meta(self, cid: str) -> _Meta:
        try:
            return _Meta(**json.loads((self._dir(cid) / "meta.json").read_text()))
        except FileNotFoundError:
            raise ContainerNotFound(f"no such container {cid}") from None

    def _metas(self) -> list[_Meta]:
        out = []
        for d in sorted(self.cdir.iterdir()):
            try:
                out.append(_Meta(**json.loads((d / "meta.json").read_text())))
            except (FileNotFoundError, NotADirectoryError, ValueError, TypeError):
                continue
        return out

    def _write_json(self, path: Path, doc: object) -> None:
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(json.dumps(doc))
        os.replace(tmp, path)

    def _state(self, cid: str) -> dict:
        try:
            return json.loads((self._dir(cid) / "state.json").read_text())
        except (FileNotFoundError, ValueError):
            return {}

    def _spawn_sem(self) -> asyncio.Semaphore:
        loop = asyncio.get_running_loop()
        if self._sem is None or self._sem_loop is not loop:
            self._sem, self._sem_loop = asyncio.Semaphore(self.spawn_parallel), loop
        return self._sem

    def _lock(self, cid: str) -> asyncio.Lock:
        return self._locks.setdefault(cid, asyncio.Lock())

    async def _runc(self, *args: str, check: bool = True) -> tuple[int, str]:
        try:
            p = await asyncio.create_subprocess_exec(
                RUNC,
                "--root",
                str(self.runc_root),
                *args,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
            )
        except FileNotFoundError:
            raise RuntimeFailed(f"{RUNC} is not installed on this node (Debian package runc)") from None
        out, err = await p.communicate()
        rc = p.returncode or 0
        msg = _runc_error(err.decode(errors="replace")) or out.decode(errors="replace").strip()
        if check and rc != 0:
            raise RuntimeFailed(f"runc {args[0]} {args[-1]} failed: {msg}")
        return rc, msg

    # -- create ------------------------------------------------------------------------------
    async def create(self, cfg: ContainerConfig) -> None:
        """Prepares the rootfs and bundle and has conmon run ``runc create``: the container is ``created``.

        Pulls the image when it is not in the store (with ``spec.pull_options.registry_auth``). On any
        failure everything made so far is undone (mounts, cgroups, runc state, files) and the error says why.
        """
        if not _ID_RE.match(cfg.id):
            raise InvalidSpec(f"container id {cfg.id!r} must be letters, digits, '_', '.', '-' (≤128)")
        await self._ensure_adopted()
        async with self._lock(cfg.id):
            d = self._dir(cfg.id)
            try:
                d.mkdir()
            except FileExistsError:
                raise ContainerExists(f"container {cfg.id} already exists; remove it first") from None
            t0 = time.monotonic()
            self._creating += 1
            anon: list[str] = []
            try:
                img = await self.image(cfg.spec.image) if cfg.spec.image else None
                if not cfg.spec.image:
                    raise InvalidSpec("image is empty; set the service's image")
                if img is None:
                    auth = RegistryAuth.from_b64(cfg.spec.pull_options.registry_auth)
                    img = await self.pull(cfg.spec.image, auth)
                async with self._spawn_sem():
                    meta = await asyncio.to_thread(self._prepare, cfg, img, anon)
                    await self._spawn(cfg, meta)
            except BaseException as e:
                log.info("create failed cid=%s err=%s", cfg.id, e)
                await asyncio.shield(self._cleanup(cfg.id))
                for v in anon:  # anonymous volumes made before meta.json recorded them
                    shutil.rmtree(self.vdir / v, ignore_errors=True)
                raise
            finally:
                self._creating -= 1
            log.info(
                "container created cid=%s name=%s image=%s pid=%d in %.0f ms",
                cfg.id,
                cfg.name,
                cfg.spec.image,
                meta.pid,
                (time.monotonic() - t0) * 1000,
            )

    def _prepare(self, cfg: ContainerConfig, img: Image, anon: list[str]) -> _Meta:
        """Blocking part of create: overlay mount, user lookup, files, secrets tmpfs, config.json."""
        s = cfg.spec
        d, rd = self._dir(cfg.id), self._rdir(cfg.id)
        bundle, rootfs = rd / "bundle", rd / "bundle" / "rootfs"
        for p in (d / "upper", d / "work", rootfs, rd / "exit", rd / "persist"):
            p.mkdir(parents=True, exist_ok=p.parent == rd)
        lowers = self.images.layer_dirs(img) or [str(self.empty_layer)]
        opts = f"lowerdir={':'.join(lowers)},upperdir={d / 'upper'},workdir={d / 'work'}"
        if len(opts) > 4000:
            raise InvalidImage(f"image {s.image} has too many layers ({len(lowers)}) for one overlay mount")
        _mount("overlay", str(rootfs), "overlay", 0, opts)
        merged = specmod.merge_config(s, img.config, default_hostname=cfg.id[:12])
        user = specmod.resolve_user(str(rootfs), merged.user, list(s.groups))
        env = list(merged.env)
        if not any(e.startswith("HOME=") for e in env):
            env.append(f"HOME={user.home}")
        mounts: list[dict] = []
        for i, m in enumerate(s.mounts):
            mounts.append(self._mount_spec(m, i, str(rootfs), anon))
        covered = {m["destination"].rstrip("/") or "/" for m in mounts}
        for path in sorted(img.config.get("Volumes") or {}):
            # the image's VOLUMEs not given a mount become anonymous volumes, removed with the container
            if path.startswith("/") and (path.rstrip("/") or "/") not in covered:
                mounts.append(
                    self._mount_spec(
                        types_pb2.Mount(type=types_pb2.Mount.VOLUME, target=path),
                        len(mounts),
                        str(rootfs),
                        anon,
                    )
                )
        sec_dir = rd / "secrets"
        files: list[tuple[str, bytes, int, int, int]] = []
        for ref in s.secrets:
            if ref.secret_id not in cfg.secrets:
                raise InvalidSpec(f"secret {ref.secret_name} ({ref.secret_id}) was not sent with the task")
            path, uid, gid, mode = specmod.file_target(
                ref.file, "/run/secrets", ref.secret_name, f"secrets[{ref.secret_name}]"
            )
            files.append((path, cfg.secrets[ref.secret_id], uid, gid, mode))
        for ref in s.configs:
            if ref.config_id not in cfg.configs:
                raise InvalidSpec(f"config {ref.config_name} ({ref.config_id}) was not sent with the task")
            path, uid, gid, mode = specmod.file_target(
                ref.file, "/", ref.config_name, f"configs[{ref.config_name}]"
            )
            files.append((path, cfg.configs[ref.config_id], uid, gid, mode))
        if files:
            sec_dir.mkdir()
            size = sum(len(f[1]) + 4096 for f in files) + 65536
            _mount(
                "shoal-secrets",
                str(sec_dir),
                "tmpfs",
                MS_NOSUID | MS_NODEV | MS_NOEXEC,
                f"size={size},mode=0700",
            )
            for i, (path, data, uid, gid, mode) in enumerate(files):
                src = sec_dir / f"{i}"
                fd = os.open(src, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                try:
                    os.write(fd, data)
                    os.fchown(fd, uid, gid)
                    os.fchmod(fd, mode)
                finally:
                    os.close(fd)
                mounts.append(
                    {
                        "destination": path,
                        "type": "bind",
                        "source": str(src),
                        "options": ["rbind", "rprivate", "ro"],
                    }
                )
        hostname = merged.hostname
        (rd / "hostname").write_text(hostname + "\n")
        (rd / "hosts").write_text(specmod.hosts_file(hostname, list(s.hosts) + list(cfg.extra_hosts)))
        (rd / "resolv.conf").write_text(
            specmod.resolv_conf(cfg.resolv_conf, s.dns_config if s.HasField("dns_config") else None)
        )
        targets = {m["destination"] for m in mounts}
        for name in ("hostname", "hosts", "resolv.conf"):
            if f"/etc/{name}" not in targets:
                mounts.append(
                    {
                        "destination": f"/etc/{name}",
                        "type": "bind",
                        "source": str(rd / name),
                        "options": ["rbind", "rprivate"],
                    }
                )
        argv = list(merged.argv)
        specmod.find_executable(str(rootfs), argv[0], env, merged.workdir, [m["destination"] for m in mounts])
        init = s.init if s.HasField("init") else False
        if init:
            if not os.path.exists(TINI):
                raise InvalidSpec("init is set but no static tini/catatonit is installed on this node")
            mounts.append(
                {
                    "destination": specmod.INIT_PATH,
                    "type": "bind",
                    "source": TINI,
                    "options": ["rbind", "rprivate", "ro"],
                }
            )
            argv = [specmod.INIT_PATH, "--", *argv]
        wd = specmod.resolve_in_root(str(rootfs), merged.workdir)
        if not os.path.isdir(wd):
            if os.path.lexists(wd):
                raise InvalidSpec(f"dir {merged.workdir} exists in the image but is not a directory")
            os.makedirs(wd, 0o755)
        specmod.check_sysctls(dict(s.sysctls), cfg.netns_path is None)
        cgroups_path = f"/shoal-{self.tag}/{cfg.id}"
        doc = specmod.base_spec(
            args=argv,
            env=env,
            cwd=merged.workdir,
            user=user,
            hostname=hostname,
            readonly=s.read_only,
            netns_path=cfg.netns_path,
            caps=specmod.capabilities(list(s.capability_add), list(s.capability_drop)),
            sysctls=dict(s.sysctls),
            rlimit_list=specmod.rlimits(list(s.ulimits)),
            resources=specmod.resources_spec(cfg.resources, swap_files=self.swap_files),
            cgroups_path=cgroups_path,
            mounts=mounts,
            cgroup_v2=self.v2,
            terminal=s.tty,
        )
        (bundle / "config.json").write_text(json.dumps(doc))
        meta = _Meta(
            id=cfg.id,
            name=cfg.name,
            image=s.image,
            image_id=img.id,
            labels={**merged.labels, **cfg.labels},
            created=_now(),
            hostname=hostname,
            stop_signal=merged.stop_signal,
            stop_grace=merged.stop_grace,
            health=asdict(merged.health) if merged.health else None,
            exec_env=env,
            exec_cwd=merged.workdir,
            exec_user=f"{user.uid}:{user.gid}",
            exec_groups=user.additional_gids,
            cgroups_path=cgroups_path,
            anon_volumes=anon,
        )
        self._write_json(d / "meta.json", asdict(meta))
        return meta

    def _mount_spec(self, m: types_pb2.Mount, i: int, rootfs: str, anon: list[str]) -> dict:
        target = m.target
        if not target.startswith("/"):
            raise InvalidSpec(f"mounts[{i}].target {target!r} must be an absolute path")
        ro = ["ro"] if m.readonly else []
        if m.type == types_pb2.Mount.BIND:
            if not m.source.startswith("/") or not os.path.exists(m.source):
                raise InvalidSpec(f"mounts[{i}]: bind source path does not exist on this node: {m.source}")
            prop = m.bind_options.propagation or "rprivate"
            if prop not in ("private", "rprivate", "shared", "rshared", "slave", "rslave"):
                raise InvalidSpec(f"mounts[{i}].bind_options.propagation {prop!r} is not a propagation mode")
            return {
                "destination": target,
                "type": "bind",
                "source": m.source,
                "options": ["rbind", prop, *ro],
            }
        if m.type == types_pb2.Mount.TMPFS:
            opts = ["nosuid", "nodev"]
            if m.tmpfs_options.size_bytes:
                opts.append(f"size={m.tmpfs_options.size_bytes}")
            if m.tmpfs_options.mode:
                opts.append(f"mode={m.tmpfs_options.mode:o}")
            return {"destination": target, "type": "tmpfs", "source": "tmpfs", "options": opts + ro}
        if m.type == types_pb2.Mount.VOLUME:
            if m.volume_options.driver_config.name not in ("", "local"):
                raise InvalidSpec(
                    f"mounts[{i}]: volume driver {m.volume_options.driver_config.name!r} is not "
                    "supported; use the local driver"
                )
            name = m.source
            if not name:
                name = "anon-" + os.urandom(12).hex()
                anon.append(name)
            elif not _VOLUME_RE.match(name):
                raise InvalidSpec(f"mounts[{i}].source {name!r} is not a valid volume name")
            data = self.vdir / name / "_data"
            if not data.exists():
                data.mkdir(parents=True, exist_ok=True)
                src = specmod.resolve_in_root(rootfs, target)
                if not m.volume_options.nocopy and os.path.isdir(src):
                    subprocess.run(["cp", "-a", f"{src}/.", f"{data}/"], check=False)
                log.info("volume created name=%s", name)
            return {
                "destination": target,
                "type": "bind",
                "source": str(data),
                "options": ["rbind", "rprivate", *ro],
            }
        raise InvalidSpec(f"mounts[{i}].type {m.type} is not supported")

    async def _spawn(self, cfg: ContainerConfig, meta: _Meta) -> None:
        d, rd = self._dir(cfg.id), self._rdir(cfg.id)
        r, w = os.pipe()
        argv = [
            CONMON,
            "--api-version",
            "1",
            "-c",
            cfg.id,
            "-u",
            cfg.id,
            "-n",
            cfg.name,
            "-r",
            RUNC,
            "-b",
            str(rd / "bundle"),
            "-p",
            str(rd / "ctr.pid"),
            "-P",
            str(rd / "conmon.pid"),
            "-l",
            f"k8s-file:{d / 'ctr.log'}",
            "--log-size-max",
            str(self.log_size_max),
            "--exit-dir",
            str(rd / "exit"),
            "-0",
            str(rd / "persist"),
            "--socket-dir-path",
            str(self.sock_dir),
            "--runtime-arg",
            f"--root={self.runc_root}",
            "--log-level",
            "error",
            "--no-sync-log",
        ]
        if cfg.spec.tty:
            argv.append("-t")  # conmon allocates the pty (console socket) and logs its output as stdout
        env = {"PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"), "_OCI_SYNCPIPE": str(w)}
        try:
            with open(rd / "conmon.log", "ab") as logf:
                # cwd: conmon writes an "oom" marker into its working directory (besides persist/)
                proc = await asyncio.create_subprocess_exec(
                    *argv,
                    env=env,
                    pass_fds=(w,),
                    stdin=subprocess.DEVNULL,
                    stdout=logf,
                    stderr=logf,
                    start_new_session=True,
                    cwd=str(rd),
                )
        except FileNotFoundError:
            os.close(r)
            raise RuntimeFailed(f"{CONMON} is not installed on this node (Debian package conmon)") from None
        finally:
            os.close(w)
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader()
        transport, _ = await loop.connect_read_pipe(
            lambda: asyncio.StreamReaderProtocol(reader), os.fdopen(r, "rb", 0)
        )

        async def result() -> tuple[int, bytes]:
            rc = await proc.wait()
            return rc, await asyncio.wait_for(reader.readline(), 60)

        done = asyncio.ensure_future(result())
        try:
            # a cancelled create still waits for runc create to finish, so that cleanup can undo it
            rc, line = await asyncio.shield(done)
        except asyncio.CancelledError:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(done, 60)
            raise
        except TimeoutError:
            raise RuntimeFailed(f"runc create of {cfg.id} did not finish in 60 s") from None
        finally:
            transport.close()
        if rc != 0 and not line:
            raise RuntimeFailed(
                f"conmon failed for {cfg.id} (exit {rc}): "
                f"{(rd / 'conmon.log').read_text(errors='replace').strip()[-300:]}"
            )
        try:
            res = json.loads(line)
        except ValueError:
            raise RuntimeFailed(f"conmon sent no create result for {cfg.id}: {line[:200]!r}") from None
        pid = int(res.get("data", -1))
        if pid <= 0:
            raise _create_error(res.get("message", ""), cfg.id)
        meta.pid, meta.pid_start = pid, _pid_start(pid)
        try:
            meta.conmon_pid = int((rd / "conmon.pid").read_text().strip())
            meta.conmon_start = _pid_start(meta.conmon_pid)
        except (OSError, ValueError):
            pass
        self._write_json(d / "meta.json", asdict(meta))

    # -- start / stop / wait ------------------------------------------------------------------------
    async def start(self, cid: str) -> None:
        await self._ensure_adopted()
        async with self._lock(cid):
            meta = self._meta(cid)
            status, _ = self._status(meta)
            if status != "created":
                raise InvalidState(f"container {cid} is {status}, not created; it cannot be started")
            await self._runc("start", cid)
            st = self._state(cid)
            st["started_at"] = _now()
            self._write_json(self._dir(cid) / "state.json", st)
            self._start_health(meta, st["started_at"])
            log.info("container started cid=%s pid=%d", cid, meta.pid)

    async def wait(self, cid: str) -> ExitStatus:
        """Waits for the container to exit (it may be created, running or already exited).

        ContainerNotFound if it is (or gets) removed before its exit was seen."""
        meta = self._meta(cid)
        lost_since = None
        while True:
            if not (self._dir(cid) / "meta.json").exists():
                raise ContainerNotFound(f"container {cid} was removed")
            status, ex = self._status(meta, settle=True)
            if ex is not None:
                return ex
            if _alive(meta.pid, meta.pid_start):
                await _wait_pid(meta.pid, meta.pid_start)
                lost_since = None
                continue
            lost_since = lost_since or time.monotonic()
            if time.monotonic() - lost_since > 5:
                return self._record_exit(meta, -1, lost=True)
            await asyncio.sleep(0.02)

    async def stop(self, cid: str, timeout: float | None = None) -> None:
        """Sends the stop signal, waits ``timeout`` (default: the spec's grace period), then SIGKILL."""
        meta = self._meta(cid)
        status, _ = self._status(meta)
        if status == "exited":
            return
        grace = meta.stop_grace if timeout is None else timeout
        sig = (
            "KILL" if status == "created" or grace <= 0 else str(int(specmod.parse_signal(meta.stop_signal)))
        )
        await self._runc("kill", cid, sig, check=False)
        try:
            await asyncio.wait_for(self.wait(cid), grace if sig != "KILL" else 10)
            log.info("container stopped cid=%s signal=%s", cid, sig)
            return
        except TimeoutError:
            pass
        await self._runc("kill", "--all", cid, "KILL", check=False)
        await asyncio.wait_for(self.wait(cid), 10)
        log.info("container killed cid=%s after %.1f s grace", cid, grace)

    async def remove(self, cid: str) -> None:
        """Kills the container if it still runs and removes everything it had; ContainerNotFound if unknown."""
        async with self._lock(cid):
            if not self._dir(cid).exists():
                raise ContainerNotFound(f"no such container {cid}")
            try:
                meta = self._meta(cid)
                if self._status(meta)[0] != "exited":
                    await self._runc("kill", "--all", cid, "KILL", check=False)
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self.wait(cid), 10)
            except ContainerNotFound:
                pass
            await self._cleanup(cid)
        self._locks.pop(cid, None)
        log.info("container removed cid=%s", cid)

    async def _cleanup(self, cid: str) -> None:
        mon = self._health.pop(cid, None)
        if mon:
            await mon.stop()
        meta = None
        with contextlib.suppress(ContainerNotFound, ValueError, TypeError):
            meta = self._meta(cid)
        if (self.runc_root / cid).exists():
            rc, msg = await self._runc("delete", "--force", cid, check=False)
            if rc != 0 and (self.runc_root / cid).exists():
                log.warning("runc delete failed cid=%s err=%s", cid, msg)
        if meta and meta.conmon_pid and _alive(meta.conmon_pid, meta.conmon_start):
            with contextlib.suppress(ProcessLookupError):
                os.kill(meta.conmon_pid, signal.SIGKILL)
        await asyncio.to_thread(self._cleanup_files, cid, meta)

    def _cleanup_files(self, cid: str, meta: _Meta | None) -> None:
        d, rd = self._dir(cid), self._rdir(cid)
        for mp in (rd / "secrets", rd / "bundle" / "rootfs"):
            if mp.exists() and _is_mountpoint(str(mp)):
                _umount(str(mp))
        cg = meta.cgroups_path if meta else f"/shoal-{self.tag}/{cid}"
        for p in self._cgroup_dirs(cg):
            with contextlib.suppress(OSError):
                os.rmdir(p)
        if meta:
            for v in meta.anon_volumes:
                shutil.rmtree(self.vdir / v, ignore_errors=True)
        shutil.rmtree(d, ignore_errors=True)
        shutil.rmtree(rd, ignore_errors=True)
        shutil.rmtree(self.sock_dir / cid, ignore_errors=True)
        if not self._creating and not any(self.cdir.iterdir()):
            # the engine's parent cgroup, once it holds no container (runc makes it again on create)
            for p in self._cgroup_dirs(f"/shoal-{self.tag}"):
                with contextlib.suppress(OSError):
                    os.rmdir(p)

    def _cgroup_dirs(self, cg: str) -> list[str]:
        rel = cg.lstrip("/")
        if self.v2:
            return [f"/sys/fs/cgroup/{rel}"]
        out = []
        with contextlib.suppress(OSError):
            for c in os.listdir("/sys/fs/cgroup"):
                p = f"/sys/fs/cgroup/{c}/{rel}"
                if os.path.isdir(p) and not os.path.islink(f"/sys/fs/cgroup/{c}"):
                    out.append(p)
        return out

    # -- status -----------------------------------------------------------------------------
    def _status(self, meta: _Meta, *, settle: bool = False) -> tuple[str, ExitStatus | None]:
        st = self._state(meta.id)
        if "exit_code" in st:
            return "exited", _exit_from(st)
        exit_file = self._rdir(meta.id) / "exit" / meta.id
        if exit_file.exists():
            try:
                code = int(exit_file.read_text().strip() or "-1")
            except (OSError, ValueError):
                code = -1
            return "exited", self._record_exit(meta, code, finished=exit_file.stat().st_mtime)
        if _alive(meta.pid, meta.pid_start):
            return ("created" if (self.runc_root / meta.id / "exec.fifo").exists() else "running"), None
        if meta.conmon_pid and _alive(meta.conmon_pid, meta.conmon_start):
            return "running", None  # exited a moment ago: conmon is writing the exit file
        if settle:
            return "running", None
        return "exited", self._record_exit(meta, -1, lost=True)

    def _record_exit(
        self, meta: _Meta, code: int, *, finished: float | None = None, lost: bool = False
    ) -> ExitStatus:
        oom = self._oom_killed(meta)
        st = self._state(meta.id)
        st.update(
            exit_code=code,
            oom_killed=oom,
            finished_at=finished or _now(),
            reason="OOMKilled" if oom else "Lost" if lost else "Completed" if code == 0 else "Error",
        )
        self._write_json(self._dir(meta.id) / "state.json", st)
        log.info("container exited cid=%s code=%d reason=%s", meta.id, code, st["reason"])
        return _exit_from(st)

    def _oom_killed(self, meta: _Meta) -> bool:
        rd = self._rdir(meta.id)
        if (rd / "persist" / "oom").exists() or (rd / "oom").exists():
            return True
        rel = meta.cgroups_path.lstrip("/")
        try:
            if self.v2:
                text = Path(f"/sys/fs/cgroup/{rel}/memory.events").read_text()
            else:
                text = Path(f"/sys/fs/cgroup/memory/{rel}/memory.oom_control").read_text()
        except OSError:
            return False
        for ln in text.splitlines():
            k, _, v = ln.partition(" ")
            if k == "oom_kill" and v.strip().isdigit() and int(v) > 0:
                return True
        return False

    def _container_state(self, meta: _Meta) -> ContainerState:
        status, ex = self._status(meta)
        st = self._state(meta.id)
        health = None
        if meta.health:
            mon = self._health.get(meta.id)
            if mon:
                health = mon.state
            else:
                try:
                    health = HealthState.from_json((self._dir(meta.id) / "health.json").read_text())
                except (OSError, ValueError):
                    health = HealthState()
        return ContainerState(
            id=meta.id,
            name=meta.name,
            status=status,
            pid=meta.pid if status != "exited" else 0,
            image=meta.image,
            image_id=meta.image_id,
            labels=meta.labels,
            created_at=_dt(meta.created),
            started_at=_dt(st.get("started_at")),
            exit=ex,
            health=health,
        )

    async def inspect(self, cid: str) -> ContainerState:
        await self._ensure_adopted()
        return self._container_state(self._meta(cid))

    async def list(self) -> list[ContainerState]:
        """Every container under this engine's root, including those created by an earlier process."""
        await self._ensure_adopted()
        return [self._container_state(m) for m in self._metas()]

    # -- logs, exec, health ---------------------------------------------------------------------
    def logs(
        self, cid: str, *, follow: bool = False, tail: int = -1, since: datetime | None = None
    ) -> AsyncIterator[LogLine]:
        meta = self._meta(cid)
        if since is not None and since.tzinfo is None:
            since = since.replace(tzinfo=UTC)
        return read_log(
            str(self._dir(cid) / "ctr.log"),
            follow=follow,
            tail=tail,
            since=since,
            running=lambda: self._still_running(meta),
        )

    def _still_running(self, meta: _Meta) -> bool:
        """For log followers: false once the container exited or was removed."""
        if not (self._dir(meta.id) / "meta.json").exists():
            return False
        try:
            return self._status(meta)[0] != "exited"
        except OSError:
            return False

    def _exec_argv(self, meta: _Meta, argv: list[str], pidfile: str | None = None) -> list[str]:
        out = [RUNC, "--root", str(self.runc_root), "exec", "--cwd", meta.exec_cwd, "--user", meta.exec_user]
        for g in meta.exec_groups:
            out += ["--additional-gids", str(g)]
        for e in meta.exec_env:
            out += ["--env", e]
        if pidfile:
            out += ["--pid-file", pidfile]
        return out + [meta.id, *argv]

    async def exec(self, cid: str, argv: list[str], timeout: float = 30.0) -> tuple[int, str]:
        """Runs ``argv`` in the running container as its user; returns (exit code, stdout+stderr)."""
        meta = self._meta(cid)
        if self._status(meta)[0] != "running":
            raise InvalidState(f"container {cid} is not running")
        p = await asyncio.create_subprocess_exec(
            *self._exec_argv(meta, argv),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        try:
            out, _ = await asyncio.wait_for(p.communicate(), timeout)
        except TimeoutError:
            p.kill()
            await p.wait()
            raise
        return p.returncode or 0, out.decode(errors="replace")

    def _start_health(self, meta: _Meta, started_at: float) -> None:
        hs = meta.health_spec()
        if hs is None or meta.id in self._health:
            return

        async def alive() -> bool:
            return self._status(meta)[0] == "running"

        mon = HealthMonitor(
            meta.id,
            hs,
            lambda argv, pidfile: self._exec_argv(meta, argv, pidfile),
            self._dir(meta.id) / "health.json",
            started_at,
            alive,
            self.on_health_change,
        )
        self._health[meta.id] = mon
        mon.start()

    async def _ensure_adopted(self) -> None:
        """Restarts health monitors of running containers left by an earlier engine process (once)."""
        if self._adopted:
            return
        self._adopted = True
        n = 0
        for d in list(self.cdir.iterdir()):
            # a create that an earlier process did not finish (it died in between): undo it
            try:
                meta_ok = _Meta(**json.loads((d / "meta.json").read_text())).pid > 0
            except (OSError, ValueError, TypeError):
                meta_ok = False
            if not meta_ok and d.is_dir() and time.time() - d.stat().st_mtime > 60:
                log.info("removing unfinished container cid=%s", d.name)
                async with self._lock(d.name):
                    await self._cleanup(d.name)
        for meta in self._metas():
            if not (self._rdir(meta.id) / "bundle" / "config.json").exists() or meta.pid == 0:
                continue
            status, _ = self._status(meta)
            if status == "running":
                n += 1
                self._start_health(meta, self._state(meta.id).get("started_at") or _now())
        if n:
            log.info("engine adopted running containers root=%s count=%d", self.root, n)

    async def close(self) -> None:
        """Stops this object's health monitors; containers keep running (a new Engine adopts them)."""
        for mon in list(self._health.values()):
            await mon.stop()
        self._health.clear()

    async def destroy(self) -> None:
        """Removes every container of this engine (running or not), then any mount left under ROOT and
        run_dir and the engine's parent cgroup. Images and volumes stay (delete ROOT for those)."""
        for d in list(self.cdir.iterdir()):
            if d.is_dir() and d.name not in ("runc", "sock"):
                try:
                    await self.remove(d.name)
                except ContainerNotFound:
                    async with self._lock(d.name):
                        await self._cleanup(d.name)
        await self.close()

        def leftovers() -> None:
            prefixes = (str(self.root) + "/", str(self.run_dir) + "/")
            with open("/proc/self/mountinfo") as f:
                mps = [ln.split()[4] for ln in f if ln.split()[4].startswith(prefixes)]
            for mp in sorted(mps, key=len, reverse=True):
                with contextlib.suppress(OSError):
                    _umount(mp)
            for p in self._cgroup_dirs(f"/shoal-{self.tag}"):
                with contextlib.suppress(OSError):
                    os.rmdir(p)

        await asyncio.to_thread(leftovers)
        log.info("engine destroyed root=%s", self.root)


def _exit_from(st: dict) -> ExitStatus:
    return ExitStatus(
        int(st["exit_code"]), bool(st.get("oom_killed")), _dt(st.get("finished_at")), st.get("reason", "")
    )


async def _wait_pid(pid: int, start: int | None) -> None:
    """Waits until ``pid`` exits, without being its parent (pidfd), falling back to polling."""
    try:
        fd = os.pidfd_open(pid)
    except OSError:
        while _alive(pid, start):
            await asyncio.sleep(0.05)
        return
    try:
        if not _alive(pid, start):
            return
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        loop.add_reader(fd, lambda: fut.done() or fut.set_result(None))
        try:
            await fut
        finally:
            loop.remove_reader(fd)
    finally:
        os.close(fd)


def _runc_error(stderr: str) -> str:
    """The msg="..." of runc's last error line, or the stderr text."""
    lines = [ln for ln in stderr.strip().splitlines() if ln.strip()]
    if not lines:
        return ""
    m = re.search(r'msg="((?:[^"\\]|\\.)*)"', lines[-1])
    return (m.group(1).encode().decode("unicode_escape") if m else lines[-1]).strip()


def _create_error(message: str, cid: str) -> EngineError:
    from shoal.agent.engine.errors import ExecutableNotFound

    msg = _runc_error(message) or message.strip() or "unknown error"
    msg = msg.removeprefix("runc create failed: ")
    if "executable file not found" in msg or "no such file or directory" in msg and "exec:" in msg:
        return ExecutableNotFound(msg)
    return RuntimeFailed(f"runc create of {cid} failed: {msg}")
