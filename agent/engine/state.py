"""On-disk state and exit bookkeeping of the engine's containers.

`StateDir` owns each container's files under ROOT/containers/<id> (`meta.json`: what create
decided, fixed for the container's life; `state.json`: started_at, exit code, OOM flag, reason) and
reads its runtime files under RUN/<id> (conmon's exit file and OOM marker) and the runc state dir.
From them alone it says whether a container is created, running or exited -- so a new engine
process knows the containers of an earlier one -- and records an exit exactly once.

Also here: processes watched without being their parent (pid + start time, pidfd) and the
container's cgroup directories.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import logging
import os
import time
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from shoal.agent.engine.container import ExitStatus
from shoal.agent.engine.errors import ContainerNotFound
from shoal.agent.engine.spec import HealthSpec

log = logging.getLogger(__name__)


def now() -> float:
    return time.time()


def as_datetime(ts: float | None) -> datetime | None:
    return datetime.fromtimestamp(ts, UTC) if ts else None


def cgroup_v2() -> bool:
    return os.path.exists("/sys/fs/cgroup/cgroup.controllers")


def cgroup_dirs(cg: str, v2: bool) -> list[str]:
    """The directories of cgroup ``cg`` (one on v2, one per mounted controller on v1) that exist."""
    rel = cg.lstrip("/")
    if v2:
        p = f"/sys/fs/cgroup/{rel}"
        return [p] if os.path.isdir(p) else []
    out = []
    with contextlib.suppress(OSError):
        for c in os.listdir("/sys/fs/cgroup"):
            p = f"/sys/fs/cgroup/{c}/{rel}"
            if os.path.isdir(p) and not os.path.islink(f"/sys/fs/cgroup/{c}"):
                out.append(p)
    return out


def remove_cgroup(path: str, attempts: int = 8) -> None:
    """rmdir a cgroup directory, if it exists. Right after its last process exited the kernel may
    still refuse it (EBUSY, cgroup v2 above all: the dying task is released asynchronously), so that
    is retried for about a second, as runc does; any other failure is logged and left."""
    delay = 0.01
    for attempt in range(attempts):
        try:
            os.rmdir(path)
            return
        except FileNotFoundError:
            return
        except OSError as e:
            if e.errno != errno.EBUSY or attempt == attempts - 1:
                if attempts > 1:
                    log.warning("cannot remove cgroup %s: %s", path, e.strerror or e)
                return
        time.sleep(delay)
        delay = min(delay * 2, 0.25)


def pid_start(pid: int) -> int | None:
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


def alive(pid: int, start: int | None) -> bool:
    """Whether ``pid`` runs and is the process that started at ``start`` (not a recycled pid)."""
    if pid <= 0:
        return False
    s = pid_start(pid)
    return s is not None and (start is None or s == start)


async def wait_pid(pid: int, start: int | None) -> None:
    """Waits until ``pid`` exits, without being its parent (pidfd), falling back to polling."""
    try:
        fd = os.pidfd_open(pid)
    except OSError:
        while alive(pid, start):
            await asyncio.sleep(0.05)
        return
    try:
        if not alive(pid, start):
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


@dataclass
class Meta:
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


def write_json(path: Path, doc: object) -> None:
    """Replaces ``path`` atomically (a reader sees the old or the new document, never half of one)."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(doc))
    os.replace(tmp, path)


def _exit_from(st: dict) -> ExitStatus:
    return ExitStatus(
        int(st["exit_code"]), bool(st.get("oom_killed")), as_datetime(st.get("finished_at")), st.get("reason", "")
    )


class StateDir:
    """The files of the containers under ``cdir`` (persistent) and ``run_dir`` (runtime), and their status."""

    def __init__(self, cdir: Path, run_dir: Path, runc_root: Path, *, v2: bool) -> None:
        self.cdir = cdir
        self.run_dir = run_dir
        self.runc_root = runc_root
        self.v2 = v2

    def dir(self, cid: str) -> Path:
        """Persistent files of a container (meta.json, state.json, upper/, ctr.log...)."""
        return self.cdir / cid

    def rdir(self, cid: str) -> Path:
        """Runtime files of a container (bundle, pid/exit files, hosts...): under run_dir."""
        return self.run_dir / cid

    def meta(self, cid: str) -> Meta:
        """ContainerNotFound when the container has no meta.json."""
        try:
            return Meta(**json.loads((self.dir(cid) / "meta.json").read_text()))
        except FileNotFoundError:
            raise ContainerNotFound(f"no such container {cid}") from None

    def metas(self) -> list[Meta]:
        """Every container with a readable meta.json, by id."""
        out = []
        for d in sorted(self.cdir.iterdir()):
            try:
                out.append(Meta(**json.loads((d / "meta.json").read_text())))
            except (FileNotFoundError, NotADirectoryError, ValueError, TypeError):
                continue
        return out

    def save_meta(self, meta: Meta) -> None:
        write_json(self.dir(meta.id) / "meta.json", asdict(meta))

    def state(self, cid: str) -> dict:
        """state.json ({} before the container started)."""
        try:
            return json.loads((self.dir(cid) / "state.json").read_text())
        except (FileNotFoundError, ValueError):
            return {}

    def save_state(self, cid: str, st: dict) -> None:
        write_json(self.dir(cid) / "state.json", st)

    def status(self, meta: Meta, *, settle: bool = False) -> tuple[str, ExitStatus | None]:
        """("created" | "running" | "exited", its exit once exited). An exit is recorded the first time
        it is seen; a process gone without an exit file is "Lost" (exit -1) -- unless ``settle``, where
        it still reads as running (conmon may be about to write the exit file)."""
        st = self.state(meta.id)
        if "exit_code" in st:
            return "exited", _exit_from(st)
        exit_file = self.rdir(meta.id) / "exit" / meta.id
        if exit_file.exists():
            try:
                code = int(exit_file.read_text().strip() or "-1")
            except (OSError, ValueError):
                code = -1
            return "exited", self.record_exit(meta, code, finished=exit_file.stat().st_mtime)
        if not meta.pid and not meta.conmon_pid:  # being created: nothing was started yet
            return "created", None
        if alive(meta.pid, meta.pid_start):
            return ("created" if (self.runc_root / meta.id / "exec.fifo").exists() else "running"), None
        if meta.conmon_pid and alive(meta.conmon_pid, meta.conmon_start):
            return "running", None  # exited a moment ago: conmon is writing the exit file
        if settle:
            return "running", None
        return "exited", self.record_exit(meta, -1, lost=True)

    def record_exit(self, meta: Meta, code: int, *, finished: float | None = None, lost: bool = False) -> ExitStatus:
        oom = self.oom_killed(meta)
        st = self.state(meta.id)
        st.update(
            exit_code=code,
            oom_killed=oom,
            finished_at=finished or now(),
            reason="OOMKilled" if oom else "Lost" if lost else "Completed" if code == 0 else "Error",
        )
        self.save_state(meta.id, st)
        log.info("container exited cid=%s code=%d reason=%s", meta.id, code, st["reason"])
        return _exit_from(st)

    def oom_killed(self, meta: Meta) -> bool:
        rd = self.rdir(meta.id)
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

    async def wait(self, cid: str) -> ExitStatus:
        """Waits for the container to exit (it may be created, running or already exited).

        ContainerNotFound if it is (or gets) removed before its exit was seen."""
        meta = self.meta(cid)
        lost_since = None
        while True:
            if not (self.dir(cid) / "meta.json").exists():
                raise ContainerNotFound(f"container {cid} was removed")
            _, ex = self.status(meta, settle=True)
            if ex is not None:
                return ex
            if alive(meta.pid, meta.pid_start):
                await wait_pid(meta.pid, meta.pid_start)
                lost_since = None
                continue
            lost_since = lost_since or time.monotonic()
            if time.monotonic() - lost_since > 5:
                return self.record_exit(meta, -1, lost=True)
            await asyncio.sleep(0.02)
