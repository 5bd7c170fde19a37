"""swarmd's systemd unit (lab/swarmd.service) under a real systemd: a Debian 12 machine booted with
``systemd-nspawn --boot`` (systemd as its PID 1), a one-manager cluster inside it run by the unit.

The machine boots an overlay of the rootfs ``scripts/nspawn-rootfs`` caches (the cache stays
clean), with the host's checkout, virtualenv and python bind-mounted read-only at the same paths,
swarmd's state dir bind-mounted from the host (so this test reads its control socket directly), and a
network namespace of its own (``nsp-…``: loopback and 198.18.0.201/24 on a veth pair). The host has
no systemd as PID 1, so nspawn runs with ``--register=no --keep-unit``, started inside a cgroup of
its own (``shoal-nsp-…`` in the name=systemd and unified hierarchies) where it makes its
``supervisor`` and ``payload`` cgroups; when /run is not a tmpfs, a tmpfs is mounted on
/run/systemd/nspawn (nspawn refuses to clean its propagation directory on a disk file system).
Commands run inside with ``nsenter -t <the machine's PID 1> -a`` (no machinectl: nothing is
registered).

Containers run inside the machine with two changes to nspawn's defaults, found by letting swarmd try:

- On this cgroup v1 (hybrid) host nspawn mounts the v1 controller hierarchies read-only in the
  machine, and runc fails: ``mkdir /sys/fs/cgroup/cpuset/shoal-…: read-only file system``. With
  ``SYSTEMD_NSPAWN_UNIFIED_HIERARCHY=1`` the machine runs on cgroup v2 alone (the host's unified
  hierarchy, writable below the machine's cgroup); it has no controllers there (the host binds them
  all to v1), so containers run without resource limits: a service with limits is not tested here.
- nspawn's seccomp filter refuses, with EPERM, ``keyctl`` (runc: ``unable to join session keyring``)
  and ``bpf`` (runc's cgroup v2 device filter: ``bpf_prog_query(BPF_CGROUP_DEVICE) failed``):
  ``--system-call-filter`` allows them and ``add_key``, ``request_key``.

nspawn also leaves CAP_NET_ADMIN out of the machine's capabilities (swarmd then logs ``IPsec ESP probe
failed: [Errno 1] Operation not permitted``): ``--capability=CAP_NET_ADMIN`` gives it back. Overlay
networking still does not start inside: nspawn mounts /proc/sys read-only, and swarmd logs
``session update not applied to networking: [Errno 30] Read-only file system:
'/proc/sys/net/ipv4/ip_forward'``. The service here has no network; overlay networks under this
machine are not tested.

The unit is installed as ``python -m shoal.lab.provision`` installs it (``provision.unit_text`` of a
``provision.swarmd_argv`` command line), then ``systemctl daemon-reload`` and ``enable --now``. Shown:

1. start: the unit is active, the node is Ready, a busybox service's task runs (image pulled from a
   docker-registry serving in the machine's network namespace);
2. crash: ``kill -9`` of the unit's MainPID → systemd starts swarmd again (NRestarts 1) → the same
   task, the same container process (pid and start time), no task replaced;
3. ``systemctl restart swarmd`` (an upgrade) → the same;
4. ``systemctl stop swarmd`` → swarmd gone, the unit inactive, the container's monitor (conmon) and
   the container alive; ``systemctl start swarmd`` → re-adopted: the same task and container.

Every process, mount, namespace and cgroup it makes is gone afterwards, also when it fails: the
machine's PID 1 is killed, which ends every process of its PID namespace, the containers and
conmon with it. Needs root.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from helpers.paths import ROOT
from helpers.swarmctl import SWARMCTL, expect_ok
from helpers.waiting import wait_for

from shoal.lab import provision
from shoal.lab.registry import Registry

pytestmark = pytest.mark.integration

ADDR = "198.18.0.201"
STATE = "/var/lib/shoal"
#: the unit's main process, as ``systemctl show`` says (pids of the machine's PID namespace)
PROPS = ("ActiveState", "SubState", "MainPID", "NRestarts")


def _run(argv: list[str], timeout: float = 60) -> str:
    r = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, f"{argv}: rc {r.returncode}\n{r.stdout}\n{r.stderr}"
    return r.stdout


def _is_mountpoint(path: str) -> bool:
    with open("/proc/self/mountinfo") as f:
        return any(ln.split()[4] == path for ln in f)


def _fstype(path: str) -> str:
    """The file system type of the mount ``path`` is on."""
    best, kind = "", ""
    with open("/proc/self/mountinfo") as f:
        for ln in f:
            fields = ln.split()
            mp, fs = fields[4], fields[fields.index("-") + 1]
            if (path == mp or path.startswith(mp.rstrip("/") + "/")) and len(mp) >= len(best):
                best, kind = mp, fs
    return kind


def _cgroup_roots() -> list[str]:
    """Where nspawn's cgroup is made: the name=systemd and unified hierarchies of a cgroup v1 (hybrid)
    host such as this one; /sys/fs/cgroup itself on a cgroup v2 host (not tried)."""
    if os.path.exists("/sys/fs/cgroup/cgroup.controllers"):
        return ["/sys/fs/cgroup"]
    return [h for h in ("/sys/fs/cgroup/systemd", "/sys/fs/cgroup/unified") if os.path.isdir(h)]


def _start_time(pid: int) -> int:
    """A process's start time (clock ticks since boot): a pid and this name one process for good."""
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[19])


@dataclass
class Machine:
    """One booted machine: its name, nspawn process, PID 1 (host pid) and the paths it was built from."""

    name: str
    base: Path
    netns: str
    cgroup: str
    nspawn: subprocess.Popen[bytes] | None = None
    leader: int = 0
    run_tmpfs: bool = False

    @property
    def root(self) -> Path:
        return self.base / "root"

    @property
    def state(self) -> Path:
        """swarmd's state dir on the host (``STATE`` inside)."""
        return self.base / "state"

    @property
    def log(self) -> Path:
        return self.base / "nspawn.log"

    def sh(self, *argv: str, timeout: float = 60, check: bool = True) -> subprocess.CompletedProcess[str]:
        """``argv`` run inside the machine (all its namespaces), stdout and stderr captured."""
        r = subprocess.run(["nsenter", "-t", str(self.leader), "-a", *argv], capture_output=True, text=True,
                           timeout=timeout)
        if check:
            assert r.returncode == 0, f"in {self.name}: {argv}: rc {r.returncode}\n{r.stdout}\n{r.stderr}"
        return r

    def unit(self) -> dict[str, str]:
        out = self.sh("systemctl", "show", "swarmd.service", *(f"-p{p}" for p in PROPS)).stdout
        return dict(ln.split("=", 1) for ln in out.splitlines() if "=" in ln)

    def _pids(self) -> Iterator[tuple[int, list[str]]]:
        """(host pid, NSpid fields) of every process of the machine: those in cgroups below its own
        (containers included, whose PID namespaces nest in the machine's)."""
        mine = f"::/{self.cgroup}/"
        for d in os.listdir("/proc"):
            if not d.isdigit():
                continue
            try:
                with open(f"/proc/{d}/cgroup") as f:
                    if not any(mine in ln for ln in f):
                        continue
                with open(f"/proc/{d}/status") as f:
                    yield int(d), next(ln for ln in f if ln.startswith("NSpid:")).split()[1:]
            except (OSError, StopIteration):
                continue

    def host_pid(self, pid: int) -> int:
        """The host pid of the process the machine calls ``pid``."""
        for host, nspid in self._pids():
            if len(nspid) >= 2 and int(nspid[1]) == pid:
                return host
        raise AssertionError(f"no process {pid} in {self.name}")

    def processes(self, comm: str) -> dict[int, int]:
        """Host pid -> start time of the machine's processes named ``comm``."""
        found = {}
        for host, _ in self._pids():
            with contextlib.suppress(OSError):
                if Path(f"/proc/{host}/comm").read_text().strip() == comm:
                    found[host] = _start_time(host)
        return found

    def said(self, text: str, match: str = "--unit=swarmd.service") -> int:
        """How many lines of the machine's journal that ``match`` selects (the unit's, by default) hold ``text``."""
        out = self.sh("journalctl", match, "-o", "cat", "--no-pager").stdout
        return sum(text in ln for ln in out.splitlines())

    def journal(self) -> str:
        r = self.sh("journalctl", "-u", "swarmd.service", "--no-pager", "-n", "150", check=False, timeout=30)
        return r.stdout + r.stderr


def _boot(m: Machine, rootfs: str) -> None:
    """Overlay, netns, cgroup, tmpfs, then systemd-nspawn --boot; returns once systemd says the boot
    is done."""
    for d in ("upper", "work", "root", "state"):
        (m.base / d).mkdir()
    _run(["mount", "-t", "overlay", "overlay", "-o",
          f"lowerdir={rootfs},upperdir={m.base / 'upper'},workdir={m.base / 'work'}", str(m.root)])
    _run(["ip", "netns", "add", m.netns])
    ns = ["ip", "-n", m.netns]
    _run([*ns, "link", "set", "lo", "up"])
    _run([*ns, "link", "add", "nsp0", "type", "veth", "peer", "name", "nsp1"])
    _run([*ns, "addr", "add", f"{ADDR}/24", "dev", "nsp0"])
    _run([*ns, "link", "set", "nsp0", "up"])
    _run([*ns, "link", "set", "nsp1", "up"])
    for h in _cgroup_roots():
        os.mkdir(f"{h}/{m.cgroup}")
    if _fstype("/run") != "tmpfs" and not _is_mountpoint("/run/systemd/nspawn"):
        os.makedirs("/run/systemd/nspawn", exist_ok=True)
        _run(["mount", "-t", "tmpfs", "-o", "mode=755", "tmpfs", "/run/systemd/nspawn"])
        m.run_tmpfs = True
    binds = {str(ROOT), sys.prefix, sys.base_prefix}
    binds = {b for b in binds if b != "/usr" and not any(b != o and b.startswith(o + "/") for o in binds)}

    def into_cgroup() -> None:
        for h in _cgroup_roots():
            with open(f"{h}/{m.cgroup}/cgroup.procs", "w") as f:
                f.write("0")

    argv = ["systemd-nspawn", "--boot", "--register=no", "--keep-unit", "--quiet", "-D", str(m.root),
            "-M", m.name, f"--network-namespace-path=/run/netns/{m.netns}", "--console=pipe",
            # what runc needs (see the module's docstring), and what swarmd's networking needs
            "--system-call-filter=add_key keyctl request_key bpf", "--capability=CAP_NET_ADMIN",
            *(f"--bind-ro={b}" for b in sorted(binds)), f"--bind={m.state}:{STATE}"]
    with open(m.log, "wb") as log:
        # the machine on cgroup v2 alone: see the module's docstring
        env = {**os.environ, "SYSTEMD_NSPAWN_UNIFIED_HIERARCHY": "1"}
        m.nspawn = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env,
                                    start_new_session=True, preexec_fn=into_cgroup)

    def leader() -> int:
        assert m.nspawn is not None
        assert m.nspawn.poll() is None, f"systemd-nspawn exited with {m.nspawn.returncode}: {m.log.read_text()}"
        children = Path(f"/proc/{m.nspawn.pid}/task/{m.nspawn.pid}/children").read_text().split()
        return int(children[0]) if children and Path(f"/proc/{children[0]}/comm").read_text().strip() == "systemd" else 0

    m.leader = wait_for(leader, "the machine's systemd to start", 30, interval=0.1)
    # systemctl answers once systemd listens on its private socket; then --wait waits out the boot
    # ("offline": systemctl reached no manager yet, as a loaded machine's systemd is still starting)
    r = wait_for(lambda: (r := m.sh("systemctl", "is-system-running", "--wait", timeout=60, check=False))
                 .stdout.strip() not in ("", "offline") and r, "the machine's systemd to answer", 30, interval=0.1)
    assert r.stdout.strip() == "running", (
        f"the machine booted {r.stdout.strip()!r} ({r.stderr.strip()}): "
        f"{m.sh('systemctl', '--failed', check=False).stdout}\nsystemd-nspawn said: {m.log.read_text()}")


def _teardown(m: Machine) -> None:
    """Terminate the machine -- SIGKILL to its PID 1, which ends every process of its PID namespace,
    containers and conmon included (a clean poweroff would wait 90 s for the containers' PID 1, which
    ignores SIGTERM) -- then remove what _boot made."""
    if m.nspawn is not None and m.nspawn.poll() is None:
        leader = m.leader
        if not leader:
            with contextlib.suppress(OSError, ValueError, IndexError):
                leader = int(Path(f"/proc/{m.nspawn.pid}/task/{m.nspawn.pid}/children").read_text().split()[0])
        if leader:
            with contextlib.suppress(ProcessLookupError):
                os.kill(leader, signal.SIGKILL)
        try:
            m.nspawn.wait(20)
        except subprocess.TimeoutExpired:
            m.nspawn.kill()
            m.nspawn.wait()
    for mp in (str(m.root), "/run/systemd/nspawn" if m.run_tmpfs else ""):
        if mp and _is_mountpoint(mp):
            subprocess.run(["umount", mp], check=False, capture_output=True)
    if m.run_tmpfs:
        with contextlib.suppress(OSError):
            os.rmdir("/run/systemd/nspawn")
    subprocess.run(["ip", "netns", "del", m.netns], check=False, capture_output=True)
    for h in _cgroup_roots():
        top = Path(f"{h}/{m.cgroup}")
        if top.is_dir():  # deepest first; a cgroup is removed with rmdir once it has no process
            for d in sorted((p for p in top.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True):
                with contextlib.suppress(OSError):
                    d.rmdir()
            with contextlib.suppress(OSError):
                top.rmdir()
    subprocess.run(["rm", "-rf", str(m.base)], check=False)


@pytest.fixture
def machine() -> Iterator[Machine]:
    if os.geteuid() != 0:
        pytest.fail("booting a machine with systemd-nspawn needs root (deselect with -m 'not integration')")
    rootfs = _run([str(ROOT / "scripts" / "nspawn-rootfs")], timeout=900).strip()
    tag = secrets.token_hex(3)
    base = Path("/var/tmp") / f"nsp-{tag}"
    base.mkdir()
    m = Machine(name=f"nsp-{tag}", base=base, netns=f"nsp-{tag}", cgroup=f"shoal-nsp-{tag}")
    try:
        _boot(m, rootfs)
        yield m
    finally:
        _teardown(m)


def test_unit_restarts_a_crashed_swarmd_and_keeps_the_containers_on_restart_and_stop(machine: Machine) -> None:
    m = machine
    sock = m.state / "swarmd.sock"
    reg = Registry("127.0.0.1", netns=f"/run/netns/{m.netns}")
    reg.start()
    try:
        # the registry serves in the machine's network namespace: seed it from there
        _run(["nsenter", f"--net=/run/netns/{m.netns}", sys.executable, "-c",
              "import sys; from shoal.lab.registry import seed_busybox; seed_busybox(sys.argv[1])", reg.url])

        argv = provision.swarmd_argv(STATE, ADDR, "nsp1", "manager", socket=f"{STATE}/swarmd.sock", init=True,
                                     insecure_registries=[reg.host])
        (m.root / "etc/systemd/system/swarmd.service").write_text(provision.unit_text(argv))
        m.sh("systemctl", "daemon-reload")
        m.sh("systemctl", "enable", "--now", "swarmd.service")

        def ctl(*args: str) -> str:
            r = subprocess.run([*SWARMCTL, "--socket", str(sock), *args], capture_output=True, text=True,
                               timeout=60)
            return expect_ok(r, args)

        def node_state() -> str:
            try:
                nodes = json.loads(ctl("node", "ls", "--format", "json"))
            except AssertionError:
                return "no answer"
            return nodes[0]["status"]["state"] if len(nodes) == 1 else f"{len(nodes)} nodes"

        def tasks() -> list[dict]:
            return json.loads(ctl("task", "ls", "--format", "json"))

        def running() -> dict[str, int]:
            """Task id -> container pid (the machine's) of the running tasks, when every task runs."""
            ts = tasks()
            if not ts or any(t["status"]["state"] != "RUNNING" for t in ts):
                return {}
            return {t["id"]: int(t["status"]["container"]["pid"]) for t in ts}

        # 1. start
        u = m.unit()
        assert u["ActiveState"] == "active" and int(u["MainPID"]) > 0, u
        wait_for(lambda: node_state() == "READY", "the node READY", 60, interval=0.3)
        ctl("service", "create", "--name", "web", "--stop-grace-period", "1s",
            f"{reg.host}/library/busybox:latest", "sleep", "3600")
        before = wait_for(running, "the task RUNNING", 60, interval=0.3)
        (task_id, pid), = before.items()
        container = m.host_pid(pid)
        started = _start_time(container)
        monitors = m.processes("conmon")
        assert len(monitors) == 1, monitors

        def readopted() -> int:
            """How many times a swarmd said it re-adopted the task's container."""
            return m.said(f"container re-adopted task={task_id} status=running")

        def unchanged(what: str, adoptions: int) -> None:
            """The new swarmd re-adopted the container (its ``adoptions``-th time), and nothing changed."""
            wait_for(lambda: readopted() == adoptions, f"the new swarmd to re-adopt the container after {what}", 60,
                     interval=0.3)
            after = wait_for(running, f"the task RUNNING after {what}", 60, interval=0.3)
            assert after == before, f"after {what}: {after} (before: {before})"
            assert m.host_pid(pid) == container and _start_time(container) == started, f"after {what}"
            assert m.processes("conmon") == monitors, f"after {what}"
            assert [t["id"] for t in tasks()] == [task_id], f"after {what}: a task was replaced"

        assert readopted() == 0

        # 2. crash: kill -9 of the main PID; systemd starts swarmd again
        main = u["MainPID"]
        m.sh("kill", "-9", main)

        def restarted() -> dict[str, str]:
            v = m.unit()
            return v if v["MainPID"] not in ("0", main) and v["ActiveState"] == "active" else {}

        u = wait_for(restarted, "systemd to start swarmd again", 30, interval=0.1)
        assert u["NRestarts"] == "1", u
        wait_for(lambda: node_state() == "READY", "the node READY after the crash", 60, interval=0.3)
        unchanged("the crash", 1)

        # 3. systemctl restart (an upgrade)
        main = u["MainPID"]
        m.sh("systemctl", "restart", "swarmd.service")
        u = m.unit()
        assert u["ActiveState"] == "active" and u["MainPID"] != main, u
        wait_for(lambda: m.said("told the dispatcher this node is restarting", f"_PID={main}"),
                 "the stopped swarmd to say it told the dispatcher", 10, interval=0.2)
        wait_for(lambda: node_state() == "READY", "the node READY after systemctl restart", 60, interval=0.3)
        unchanged("systemctl restart", 2)

        # 4. systemctl stop: swarmd ends, its containers and their monitors do not
        main_host = m.host_pid(int(u["MainPID"]))
        m.sh("systemctl", "stop", "swarmd.service")
        u = m.unit()
        assert u["ActiveState"] == "inactive" and u["MainPID"] == "0", u
        assert not Path(f"/proc/{main_host}").exists(), "swarmd still runs after systemctl stop"
        assert all(_start_time(p) == t for p, t in monitors.items()), "a conmon ended with the unit"
        assert _start_time(container) == started, "the container ended with the unit"
        wait_for(lambda: m.said("(conmon) remains running after unit stopped"),
                 "systemd to say conmon remains running", 10, interval=0.2)
        m.sh("systemctl", "start", "swarmd.service")
        wait_for(lambda: node_state() == "READY", "the node READY after systemctl start", 60, interval=0.3)
        unchanged("systemctl stop and start", 3)
        assert m.said("(conmon) in control group while starting unit. Ignoring.")
    except BaseException:
        print(f"--- journal of swarmd.service in {m.name}:\n{m.journal()}")
        print(f"--- systemd-nspawn:\n{m.log.read_text(errors='replace')[-4000:]}")
        raise
    finally:
        reg.stop()
