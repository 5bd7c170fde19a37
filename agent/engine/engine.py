"""The local container engine: a small facade over the image store, the OCI bundle, conmon/runc and
the containers' on-disk state.

See the package docstring (``shoal.agent.engine``) for the API and the on-disk layout. The parts:
`images.ImageStore` (pull, load, layers), `bundle.Bundles` (rootfs, files, config.json),
`conmon.Runtime` (conmon and runc processes), `state.StateDir` (meta.json, state.json, status and
exits), `volumes.Volumes` (local volumes), `health.HealthMonitor` (probes). `Engine` sequences them
per container (one lock per container id) and keeps what lives only in this process: health
monitors, in-flight pulls, the create semaphore.
"""

from __future__ import annotations

import asyncio
import contextlib
import glob
import hashlib
import logging
import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import AsyncIterator, Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path

from shoal.agent.engine import reference
from shoal.agent.engine import spec as specmod
from shoal.agent.engine.bundle import Bundles, umount
from shoal.agent.engine.conmon import Runtime
from shoal.agent.engine.container import ContainerConfig, ContainerState, ExitStatus
from shoal.agent.engine.distribution import RegistryAuth
from shoal.agent.engine.errors import ContainerExists, ContainerNotFound, InvalidSpec, InvalidState
from shoal.agent.engine.health import HealthMonitor, HealthState
from shoal.agent.engine.images import Image, ImageStore
from shoal.agent.engine.locks import KeyedLocks
from shoal.agent.engine.logs import LogLine, read_log
from shoal.agent.engine.state import (
    Meta,
    StateDir,
    alive,
    as_datetime,
    cgroup_dirs,
    cgroup_v2,
    now,
    pid_start,
    remove_cgroup,
)
from shoal.agent.engine.volumes import Volumes

log = logging.getLogger(__name__)

_ID_RE = re.compile(r"^[a-zA-Z0-9][a-zA-Z0-9_.-]{0,127}$")


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
        self.state = StateDir(self.cdir, self.run_dir, self.runc_root, v2=self.v2)
        self.volume_store = Volumes(self.vdir)
        self.bundles = Bundles(
            self.state,
            self.images,
            self.volume_store,
            self.empty_layer,
            cgroup_parent=f"/shoal-{self.tag}",
            v2=self.v2,
            swap_files=self.swap_files,
        )
        self.runtime = Runtime(self.runc_root, self.sock_dir, log_size_max=log_size_max)
        self._pulls: dict[str, asyncio.Future[Image]] = {}
        self._locks = KeyedLocks()  # per container: create, start, remove and re-adoption one at a time
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
        for m in self.state.metas():
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
        return self.volume_store.names()

    async def remove_volume(self, name: str) -> None:
        """Deletes a named volume; InvalidState while a container mounts it."""
        await self.volume_store.remove(name, ((m.id, self.bundles.mounts_of(m.id)) for m in self.state.metas()))

    # -- paths, locks ---------------------------------------------------------------------------
    def _cgroup_dirs(self, cg: str) -> list[str]:
        return cgroup_dirs(cg, self.v2)

    def _spawn_sem(self) -> asyncio.Semaphore:
        loop = asyncio.get_running_loop()
        if self._sem is None or self._sem_loop is not loop:
            self._sem, self._sem_loop = asyncio.Semaphore(self.spawn_parallel), loop
        return self._sem

    # -- create ------------------------------------------------------------------------------
    async def create(self, cfg: ContainerConfig) -> None:
        """Prepares the rootfs and bundle and has conmon run ``runc create``: the container is ``created``.

        Pulls the image when it is not in the store (with ``spec.pull_options.registry_auth``). On any
        failure everything made so far is undone (mounts, cgroups, runc state, files) and the error says why.
        """
        if not _ID_RE.match(cfg.id):
            raise InvalidSpec(f"container id {cfg.id!r} must be letters, digits, '_', '.', '-' (≤128)")
        await self._ensure_adopted()
        async with self._locks.hold(cfg.id):
            try:
                self.state.dir(cfg.id).mkdir()
            except FileExistsError:
                raise ContainerExists(f"container {cfg.id} already exists; remove it first") from None
            t0 = time.monotonic()
            self._creating += 1
            anon: list[str] = []
            try:
                img = await self.image(cfg.spec.image)
                if img is None:
                    auth = RegistryAuth.from_b64(cfg.spec.pull_options.registry_auth)
                    img = await self.pull(cfg.spec.image, auth)
                async with self._spawn_sem():
                    meta = await asyncio.to_thread(self.bundles.build, cfg, img, anon)
                    await self._spawn(cfg, meta)
            except BaseException as e:
                log.info("create failed cid=%s err=%s", cfg.id, e)
                await asyncio.shield(self._cleanup(cfg.id))
                self.volume_store.drop(anon)  # anonymous volumes made before meta.json recorded them
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

    async def _spawn(self, cfg: ContainerConfig, meta: Meta) -> None:
        """conmon runs ``runc create``; the pids of the container and of conmon go to meta.json."""
        pid, conmon_pid = await self.runtime.spawn(
            cfg.id, cfg.name, self.state.dir(cfg.id), self.state.rdir(cfg.id), tty=cfg.spec.tty
        )
        meta.pid, meta.pid_start = pid, pid_start(pid)
        if conmon_pid:
            meta.conmon_pid, meta.conmon_start = conmon_pid, pid_start(conmon_pid)
        self.state.save_meta(meta)

    # -- start / stop / wait ------------------------------------------------------------------------
    async def start(self, cid: str) -> None:
        await self._ensure_adopted()
        async with self._locks.hold(cid):
            meta = self.state.meta(cid)
            status, _ = self.state.status(meta)
            if status != "created":
                raise InvalidState(f"container {cid} is {status}, not created; it cannot be started")
            await self.runtime.runc("start", cid)
            st = self.state.state(cid)
            st["started_at"] = now()
            self.state.save_state(cid, st)
            self._start_health(meta, st["started_at"])
            log.info("container started cid=%s pid=%d", cid, meta.pid)

    async def wait(self, cid: str) -> ExitStatus:
        """Waits for the container to exit (it may be created, running or already exited).

        ContainerNotFound if it is (or gets) removed before its exit was seen."""
        return await self.state.wait(cid)

    async def stop(self, cid: str, timeout: float | None = None) -> None:
        """Sends the stop signal, waits ``timeout`` (default: the spec's grace period), then SIGKILL."""
        meta = self.state.meta(cid)
        status, _ = self.state.status(meta)
        if status == "exited":
            return
        grace = meta.stop_grace if timeout is None else timeout
        sig = (
            "KILL" if status == "created" or grace <= 0 else str(int(specmod.parse_signal(meta.stop_signal)))
        )
        await self.runtime.runc("kill", cid, sig, check=False)
        try:
            await asyncio.wait_for(self.wait(cid), grace if sig != "KILL" else 10)
            log.info("container stopped cid=%s signal=%s", cid, sig)
            return
        except TimeoutError:
            pass
        await self.runtime.runc("kill", "--all", cid, "KILL", check=False)
        await asyncio.wait_for(self.wait(cid), 10)
        log.info("container killed cid=%s after %.1f s grace", cid, grace)

    async def remove(self, cid: str) -> None:
        """Kills the container if it still runs and removes everything it had; ContainerNotFound if unknown."""
        async with self._locks.hold(cid):
            if not self.state.dir(cid).exists():
                raise ContainerNotFound(f"no such container {cid}")
            try:
                meta = self.state.meta(cid)
                if self.state.status(meta)[0] != "exited":
                    await self.runtime.runc("kill", "--all", cid, "KILL", check=False)
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self.wait(cid), 10)
            except ContainerNotFound:
                pass
            await self._cleanup(cid)
        log.info("container removed cid=%s", cid)

    async def _cleanup(self, cid: str) -> None:
        mon = self._health.pop(cid, None)
        if mon:
            await mon.stop()
        meta = None
        with contextlib.suppress(ContainerNotFound, ValueError, TypeError):
            meta = self.state.meta(cid)
        if (self.runc_root / cid).exists():
            rc, msg = await self.runtime.runc("delete", "--force", cid, check=False)
            if rc != 0 and (self.runc_root / cid).exists():
                log.warning("runc delete failed cid=%s err=%s", cid, msg)
        if meta and meta.conmon_pid and alive(meta.conmon_pid, meta.conmon_start):
            with contextlib.suppress(ProcessLookupError):
                os.kill(meta.conmon_pid, signal.SIGKILL)
        await asyncio.to_thread(self._cleanup_files, cid, meta)

    def _cleanup_files(self, cid: str, meta: Meta | None) -> None:
        self.bundles.unmount(cid)
        cg = meta.cgroups_path if meta else f"/shoal-{self.tag}/{cid}"
        for p in self._cgroup_dirs(cg):
            remove_cgroup(p)
        if meta:
            self.volume_store.drop(meta.anon_volumes)
        shutil.rmtree(self.state.dir(cid), ignore_errors=True)
        shutil.rmtree(self.state.rdir(cid), ignore_errors=True)
        shutil.rmtree(self.sock_dir / cid, ignore_errors=True)
        if not self._creating and not any(self.cdir.iterdir()):
            # the engine's parent cgroup, once it holds no container (runc makes it again on create)
            for p in self._cgroup_dirs(f"/shoal-{self.tag}"):
                remove_cgroup(p, attempts=1)  # the parent: one try, no wait

    # -- status -----------------------------------------------------------------------------
    def _container_state(self, meta: Meta) -> ContainerState:
        status, ex = self.state.status(meta)
        st = self.state.state(meta.id)
        health = None
        if meta.health:
            mon = self._health.get(meta.id)
            if mon:
                health = mon.state
            else:
                try:
                    health = HealthState.from_json((self.state.dir(meta.id) / "health.json").read_text())
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
            created_at=as_datetime(meta.created),
            started_at=as_datetime(st.get("started_at")),
            exit=ex,
            health=health,
        )

    async def inspect(self, cid: str) -> ContainerState:
        await self._ensure_adopted()
        return self._container_state(self.state.meta(cid))

    async def list(self) -> list[ContainerState]:
        """Every container under this engine's root, including those created by an earlier process."""
        await self._ensure_adopted()
        return [self._container_state(m) for m in self.state.metas()]

    # -- logs, exec, health ---------------------------------------------------------------------
    def logs(
        self, cid: str, *, follow: bool = False, tail: int = -1, since: datetime | None = None
    ) -> AsyncIterator[LogLine]:
        meta = self.state.meta(cid)
        if since is not None and since.tzinfo is None:
            since = since.replace(tzinfo=UTC)
        return read_log(
            str(self.state.dir(cid) / "ctr.log"),
            follow=follow,
            tail=tail,
            since=since,
            running=lambda: self._still_running(meta),
        )

    def _still_running(self, meta: Meta) -> bool:
        """For log followers: false once the container exited or was removed."""
        if not (self.state.dir(meta.id) / "meta.json").exists():
            return False
        try:
            return self.state.status(meta)[0] != "exited"
        except OSError:
            return False

    async def exec(self, cid: str, argv: list[str], timeout: float = 30.0) -> tuple[int, str]:
        """Runs ``argv`` in the running container as its user; returns (exit code, stdout+stderr)."""
        meta = self.state.meta(cid)
        if self.state.status(meta)[0] != "running":
            raise InvalidState(f"container {cid} is not running")
        p = await asyncio.create_subprocess_exec(
            *self.runtime.exec_argv(meta, argv),
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

    def _start_health(self, meta: Meta, started_at: float) -> None:
        hs = meta.health_spec()
        if hs is None or meta.id in self._health:
            return

        async def is_alive() -> bool:
            return self.state.status(meta)[0] == "running"

        mon = HealthMonitor(
            meta.id,
            hs,
            lambda argv, pidfile: self.runtime.exec_argv(meta, argv, pidfile),
            self.state.dir(meta.id) / "health.json",
            started_at,
            is_alive,
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
                meta_ok = self.state.meta(d.name).pid > 0
            except (OSError, ValueError, TypeError, ContainerNotFound):
                meta_ok = False
            if not meta_ok and d.is_dir() and time.time() - d.stat().st_mtime > 60:
                log.info("removing unfinished container cid=%s", d.name)
                async with self._locks.hold(d.name):
                    await self._cleanup(d.name)
        for meta in self.state.metas():
            if not (self.state.rdir(meta.id) / "bundle" / "config.json").exists() or meta.pid == 0:
                continue
            status, _ = self.state.status(meta)
            if status == "running":
                n += 1
                self._start_health(meta, self.state.state(meta.id).get("started_at") or now())
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
                    async with self._locks.hold(d.name):
                        await self._cleanup(d.name)
        await self.close()

        def leftovers() -> None:
            prefixes = (str(self.root) + "/", str(self.run_dir) + "/")
            with open("/proc/self/mountinfo") as f:
                mps = [ln.split()[4] for ln in f if ln.split()[4].startswith(prefixes)]
            for mp in sorted(mps, key=len, reverse=True):
                with contextlib.suppress(OSError):
                    umount(mp)
            for p in self._cgroup_dirs(f"/shoal-{self.tag}"):
                remove_cgroup(p, attempts=1)  # the parent: one try, no wait

        await asyncio.to_thread(leftovers)
        log.info("engine destroyed root=%s", self.root)
