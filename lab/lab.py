"""The one-machine lab: a Shoal cluster of network-namespace hosts on an underlay bridge.

Layout for lab NAME (default "lab"), all on this machine, nothing on the host's own network:

- namespace `shoal-NAME-ul`: bridge `br0` with 198.18.0.254/24 (the "outside world") and the
  local registry (Debian's docker-registry) on 198.18.0.254:5000, seeded with test images and used
  by every node as its mirror of Docker Hub;
- host i: namespace `shoal-NAME-h<i>` with `eth0` = 198.18.0.<i>/24, plus a holder process that
  keeps the host's own mount and UTS namespaces (a private tmpfs on /run/netns, so the overlay
  sandboxes a host makes stay inside that host, and its hostname `h<i>`); `swarmd` runs inside
  those namespaces with its state in /var/lib/shoal-lab/NAME/h<i>;
- lab state in /var/lib/shoal-lab/NAME/lab.json, so `status`, `kill`, `partition` … work from any
  later command, and `down` (or an `up` after a crash) removes everything the lab made.

Hosts 1..managers are managers (host 1 creates the cluster with the overlay pool 198.19.0.0/16);
the rest are workers, joined with tokens. `--simulated N` adds N simulated worker nodes (see
shoal.node.simnodes: real agents and sessions, containers in memory) named `sim-00001`…, all in one
process in the underlay namespace, advertising 198.18.0.254 and labelled `engine.labels.simulated=true`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from shoal.lab.provision import swarmd_argv

log = logging.getLogger("shoal.lab")

BASE = Path(os.environ.get("SHOAL_LAB_DIR", "/var/lib/shoal-lab"))
UNDERLAY_SUBNET = "198.18.0.0/24"
UNDERLAY_GW = "198.18.0.254"
OVERLAY_POOL = "198.19.0.0/16"
# Each host's gateway bridge (containers' egress NAT) stays inside the lab's ranges too: the last /24
# of the overlay pool, which the allocator (handing out /24s from the start) reaches only at the
# 256th network.
EGRESS_SUBNET = "198.19.255.0/24"
REGISTRY_PORT = 5000
SIMULATED_LABEL = ("simulated", "true")  # the engine label of the lab's simulated nodes
MAX_SIMULATED = 5000  # all in one process (the fleet bench's 1,000-2,000 nodes took 0.5-0.85 of a core)

Progress = Callable[[str], None]
_save_lock = threading.Lock()


class LabError(Exception):
    """Something the user can fix; the message says what."""


@dataclass
class Host:
    name: str                 # h1, h2, …
    index: int
    role: str                 # manager | worker
    addr: str                 # underlay address
    netns: str                # /run/netns/shoal-NAME-hI
    state_dir: str
    holder_pid: int = 0
    swarmd_pid: int = 0
    partitioned: bool = False

    @property
    def socket(self) -> str:
        return f"{self.state_dir}/swarmd.sock"


@dataclass
class LabState:
    name: str
    prefix: str
    hosts: list[Host] = field(default_factory=list)
    registry_pid: int = 0
    registry_dir: str = ""
    simulated: int = 0  # simulated nodes (`up --simulated`), run by the process sim_pid
    sim_pid: int = 0

    @property
    def dir(self) -> Path:
        return BASE / self.name

    def host(self, name: str) -> Host:
        for h in self.hosts:
            if h.name == name or h.addr == name:
                return h
        raise LabError(f"lab {self.name!r} has no host {name!r}: hosts are {', '.join(h.name for h in self.hosts)}")

    def save(self) -> None:
        with _save_lock:  # `up` saves from its registry thread too
            self.dir.mkdir(parents=True, exist_ok=True)
            tmp = self.dir / "lab.json.tmp"
            tmp.write_text(json.dumps(asdict(self), indent=2))
            tmp.replace(self.dir / "lab.json")

    @classmethod
    def load(cls, name: str) -> LabState:
        path = BASE / name / "lab.json"
        if not path.exists():
            raise LabError(f"no lab named {name!r} is up: start one with `swarmctl lab up --name {name}`")
        raw = json.loads(path.read_text())
        hosts = [Host(**h) for h in raw.pop("hosts")]
        return cls(hosts=hosts, **raw)


def _simulated_ready(nodes: Iterable[Any]) -> int:
    """How many of these Nodes (proto) are the lab's simulated nodes, READY."""
    from shoal.proto import types_pb2

    key, value = SIMULATED_LABEL
    return sum(1 for n in nodes if n.description.engine.labels.get(key) == value
               and n.status.state == types_pb2.NodeStatus.READY)


def _prefix(name: str) -> str:
    return f"shoal-{name}"


def _alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is not alive
        return Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1][0] != "Z"
    except OSError:
        return False


def _ns_inode(pid: int, kind: str) -> int | None:
    try:
        return os.stat(f"/proc/{pid}/ns/{kind}").st_ino
    except OSError:
        return None


def _processes_in(holders: Iterable[int], netns_paths: Iterable[str]) -> list[int]:
    """PIDs in any of the holders' mount namespaces or in any of the network namespaces, and all
    their descendants (containers under conmon have namespaces of their own)."""
    mnts = {i for i in (_ns_inode(p, "mnt") for p in holders if p > 0) if i is not None}
    mnts.discard(_ns_inode(os.getpid(), "mnt"))  # never this machine's own
    nets: set[int] = set()
    for path in netns_paths:
        try:
            nets.add(os.stat(path).st_ino)
        except OSError:
            pass
    parents: dict[int, int] = {}
    found: set[int] = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        pid = int(entry.name)
        if pid == os.getpid():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(") ", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        parents[pid] = ppid
        if _ns_inode(pid, "mnt") in mnts or _ns_inode(pid, "net") in nets:
            found.add(pid)
    changed = bool(found)
    while changed:
        changed = False
        for pid, ppid in parents.items():
            if ppid in found and pid not in found:
                found.add(pid)
                changed = True
    return sorted(found)


def _engine_cgroups(engine_root: str) -> list[str]:
    """The parent cgroup dirs (one per v1 hierarchy, or the v2 one) of the engine at engine_root;
    the engine names them after a hash of its root (shoal.agent.engine.Engine.tag)."""
    import hashlib

    rel = "shoal-" + hashlib.sha256(str(Path(engine_root).absolute()).encode()).hexdigest()[:10]
    top = Path("/sys/fs/cgroup")
    cands = [top / rel] + ([d / rel for d in top.iterdir() if d.is_dir() and not d.is_symlink()] if top.is_dir() else [])
    return [str(c) for c in cands if c.is_dir()]


def _rmdir_tree(path: str) -> None:
    """rmdir a cgroup dir and its children, deepest first (cgroupfs allows only rmdir)."""
    for root, _dirs, _files in os.walk(path, topdown=False):
        try:
            os.rmdir(root)
        except OSError as e:
            log.warning("lab down: cannot remove cgroup %s: %s", root, e)


def _kill_all(pids: Iterable[int], sig: int = signal.SIGKILL) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def _wait_gone(pids: Iterable[int], timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    left = [p for p in pids if _alive(p)]
    while left and time.monotonic() < deadline:
        time.sleep(0.05)
        left = [p for p in left if _alive(p)]
    return left


class Lab:
    def __init__(self, name: str = "lab", progress: Progress | None = None) -> None:
        self.name = name
        self.progress = progress or (lambda msg: None)
        self._procs: dict[str, subprocess.Popen] = {}  # swarmd processes this object started

    # ---- up ----------------------------------------------------------------------------------
    def up(self, managers: int = 3, workers: int = 2, timeout: float = 90, simulated: int = 0) -> LabState:
        """Build the lab and return its state once every host's node (and every simulated one) is
        READY; `timeout` is for the hosts, the simulated nodes get 0.1 s more each."""
        if os.geteuid() != 0:
            raise LabError("the lab needs root (network namespaces, runc): run it with sudo")
        if managers < 1 or workers < 0 or managers + workers > 200:
            raise LabError("--managers must be at least 1 and --workers at least 0 (200 hosts at most)")
        if not 0 <= simulated <= MAX_SIMULATED:
            raise LabError(f"--simulated must be between 0 and {MAX_SIMULATED} (simulated nodes run in one "
                           "process on this machine)")
        if self._running():
            down = "swarmctl lab down" + (f" --name {self.name}" if self.name != "lab" else "")
            raise LabError(f"lab {self.name!r} is already up: use it (`eval $(swarmctl lab env)`) "
                           f"or remove it first with `{down}`")
        if (BASE / self.name).exists() or self._leftover_namespaces():
            self.progress(f"cleaning up what an earlier lab {self.name!r} left behind")
            self.down()
        from shoal.lab.nshosts import NsLab

        t0 = time.monotonic()
        n = managers + workers
        prefix = _prefix(self.name)
        self.progress(f"building {n} namespace hosts on underlay {UNDERLAY_SUBNET}")
        state = LabState(name=self.name, prefix=prefix)
        state.save()  # from here on, `down` finds what to remove even if this process dies
        ns = NsLab(prefix, n_hosts=n, subnet=UNDERLAY_SUBNET)
        for i, h in enumerate(ns.hosts, start=1):
            state.hosts.append(
                Host(
                    name=f"h{i}",
                    index=i,
                    role="manager" if i <= managers else "worker",
                    addr=h.addr,
                    netns=h.path,
                    state_dir=str(BASE / self.name / f"h{i}"),
                )
            )
        state.save()
        registry = ThreadPoolExecutor(1, thread_name_prefix="lab-registry")
        try:
            # the registry starts and is seeded while the hosts come up
            reg_done = registry.submit(self._start_registry, state)
            self._start_holders(state.hosts)
            state.save()
            first = state.hosts[0]
            self.progress(f"starting swarmd on {first.name} ({first.addr}) and creating the cluster")
            self._start_swarmd(state, first, init=True)
            self._wait_socket(first, timeout=timeout)
            tokens = self._join_tokens(first)
            rest = state.hosts[1:]
            if rest:
                self.progress("joining " + ", ".join(f"{h.name} ({h.role})" for h in rest))
            for h in rest:
                self._start_swarmd(state, h, token=tokens[h.role], join=first.addr)
            self._wait_ready(state, timeout=timeout)
            if simulated:
                self.progress(f"joining {simulated} simulated nodes (containers in memory) from {UNDERLAY_GW}")
                self._start_simulated(state, tokens["worker"], simulated)
                self._wait_ready(state, timeout=timeout + 0.1 * simulated)
            reg_done.result(timeout=timeout)
        except BaseException:
            state.save()
            down = "swarmctl lab down" + (f" --name {self.name}" if self.name != "lab" else "")
            self.progress(f"lab {self.name!r} did not come up; the logs are in {state.dir}/h*/swarmd.log; "
                          f"remove it with `{down}`")
            raise
        finally:
            registry.shutdown(wait=True)
        def n_of(k: int, what: str) -> str:
            return f"{k} {what}" + ("" if k == 1 else "s")

        sims = f", {n_of(simulated, 'simulated node')}" if simulated else ""
        self.progress(f"lab {self.name!r} is up: {n_of(managers, 'manager')}, {n_of(workers, 'worker')}{sims}, "
                      f"registry {UNDERLAY_GW}:{REGISTRY_PORT}, in {time.monotonic() - t0:.1f} s")
        return state

    def _running(self) -> bool:
        """A complete lab of this name is up: every host's holder and swarmd live."""
        try:
            st = LabState.load(self.name)
        except (LabError, json.JSONDecodeError, TypeError, KeyError):
            return False
        return bool(st.hosts) and all(
            _alive(h.holder_pid) and _alive(h.swarmd_pid) and "swarmd" in self._cmdline(h.swarmd_pid)
            for h in st.hosts
        ) and (not st.simulated or _alive(st.sim_pid))

    def _leftover_namespaces(self) -> list[str]:
        prefix = _prefix(self.name) + "-"
        try:
            return [n for n in os.listdir("/run/netns") if n.startswith(prefix)]
        except FileNotFoundError:
            return []

    def _start_registry(self, state: LabState) -> None:
        """Serve the registry on the underlay and push the test images to it from inside the
        underlay namespace (the registry is not reachable from this one)."""
        from shoal.lab.registry import Registry

        ul = f"/run/netns/{state.prefix}-ul"
        reg = Registry(UNDERLAY_GW, REGISTRY_PORT, storage=state.dir / "registry", netns=ul)
        reg.start()
        assert reg.proc is not None
        state.registry_pid = reg.proc.pid
        state.registry_dir = str(reg.dir)
        state.save()
        seed = subprocess.run(
            ["nsenter", f"--net={ul}", sys.executable, "-c",
             "import sys; from shoal.lab.registry import seed_busybox; seed_busybox(sys.argv[1])",
             f"http://{UNDERLAY_GW}:{REGISTRY_PORT}"],
            capture_output=True, text=True, check=False,
        )
        if seed.returncode != 0:
            raise LabError(f"could not seed the lab registry with busybox: {seed.stderr.strip().splitlines()[-1:]}")
        self.progress(f"registry {UNDERLAY_GW}:{REGISTRY_PORT} serves library/busybox:latest (Docker Hub mirror)")

    def _start_holders(self, hosts: list[Host]) -> None:
        """One process per host that keeps its mount and UTS namespaces: /run/netns there is a
        private tmpfs (the root namespace's entries are unmounted first, so this host holds no
        reference to other namespaces), and the hostname is the host's name."""
        procs = {}
        for h in hosts:
            Path(h.state_dir).mkdir(parents=True, exist_ok=True)
            script = (
                "for m in $(awk '$2 ~ \"^/run/netns\" {print $2}' /proc/self/mounts | sort -r); do umount -l \"$m\"; done; "
                f"mkdir -p /run/netns && mount -t tmpfs -o mode=0755 shoal-netns /run/netns && hostname {h.name} "
                "&& exec sleep infinity"
            )
            procs[h.name] = subprocess.Popen(
                ["nsenter", f"--net={h.netns}", "unshare", "--mount", "--uts", "--propagation", "private",
                 "sh", "-c", script],
                start_new_session=True, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            h.holder_pid = procs[h.name].pid
        my_mnt = _ns_inode(os.getpid(), "mnt")
        deadline = time.monotonic() + 10
        for h in hosts:
            p = procs[h.name]
            while not (_ns_inode(p.pid, "mnt") != my_mnt and self._cmdline(p.pid).startswith("sleep")):
                if p.poll() is not None:
                    raise LabError(f"could not make the namespaces of host {h.name} (exit {p.returncode})")
                if time.monotonic() > deadline:
                    raise LabError(f"host {h.name}'s namespaces did not come up within 10 s")
                time.sleep(0.01)

    def _start_simulated(self, state: LabState, token: str, count: int) -> None:
        """Start the process of the simulated nodes in the underlay namespace (which reaches every
        host; `down` ends it with the rest of that namespace's processes), its log sim.log."""
        managers = ",".join(f"{h.addr}:2377" for h in state.hosts if h.role == "manager")
        with open(state.dir / "sim.log", "ab") as logf:
            p = subprocess.Popen(
                ["nsenter", f"--net=/run/netns/{state.prefix}-ul", sys.executable, "-m", "shoal.node.simnodes",
                 "--managers", managers, "--count", str(count), "--addr", UNDERLAY_GW,
                 "--label", "=".join(SIMULATED_LABEL)],
                start_new_session=True, stdin=subprocess.PIPE, stdout=logf, stderr=logf)
        assert p.stdin is not None
        p.stdin.write(token.encode() + b"\n")  # the token on stdin, not in the command line
        p.stdin.close()
        self._procs["sim"] = p
        state.simulated, state.sim_pid = count, p.pid
        state.save()

    @staticmethod
    def _cmdline(pid: int) -> str:
        try:
            return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            return ""

    def enter(self, h: Host) -> list[str]:
        """argv prefix that runs a command inside host h (its network, mount and UTS namespaces)."""
        if not _alive(h.holder_pid):
            raise LabError(f"host {h.name} is not running: `swarmctl lab up` again")
        return ["nsenter", "-t", str(h.holder_pid), "--net", "--mount", "--uts"]

    def swarmd_argv(self, h: Host, *, init: bool = False, token: str = "", join: str = "") -> list[str]:
        return swarmd_argv(
            h.state_dir, h.addr, h.name, h.role, socket=h.socket, init=init, join_addr=join, token=token,
            addr_pool=OVERLAY_POOL if init else "",
            registry_mirrors=[f"http://{UNDERLAY_GW}:{REGISTRY_PORT}"],
            insecure_registries=[f"{UNDERLAY_GW}:{REGISTRY_PORT}"],
            egress_subnet=EGRESS_SUBNET,
        )

    def _start_swarmd(self, state: LabState, h: Host, *, init: bool = False, token: str = "", join: str = "") -> int:
        """Start swarmd in host h (nsenter execs it: the PID is swarmd's); returns the log offset
        at which this run's lines start."""
        logpath = Path(h.state_dir) / "swarmd.log"
        with open(logpath, "ab") as logf:
            offset = logf.tell()
            argv = self.enter(h) + self.swarmd_argv(h, init=init, token=token, join=join)
            p = subprocess.Popen(argv, start_new_session=True, stdin=subprocess.DEVNULL, stdout=logf, stderr=logf)
        self._procs[h.name] = p
        h.swarmd_pid = p.pid
        state.save()
        return offset

    def _check_alive(self, h: Host) -> None:
        """LabError with the log's last lines when h's swarmd (started by this process) has exited."""
        p = self._procs.get(h.name)
        code = p.poll() if p is not None else (None if _alive(h.swarmd_pid) else -1)
        if code is not None:
            raise LabError(f"swarmd on {h.name} exited with {code}: {self._log_tail(Path(h.state_dir) / 'swarmd.log')}")

    @staticmethod
    def _log_tail(path: Path, n: int = 3) -> str:
        """The last n lines of a log, its error lines if it has any."""
        try:
            lines = path.read_text(errors="replace").splitlines()
        except OSError:
            return "(no log)"
        lines = [ln for ln in lines if " ERROR " in ln or "Error" in ln or "SystemExit" in ln] or lines
        return " | ".join(lines[-n:])

    def _wait_socket(self, h: Host, timeout: float = 30) -> None:
        """Wait until a manager's local control socket answers."""
        from shoal.proto import control_pb2

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self._check_alive(h)
            if Path(h.socket).exists():
                try:
                    with self.control(h) as c:
                        c.Info(control_pb2.InfoRequest(), timeout=2)
                    return
                except Exception:
                    pass
            time.sleep(0.05)
        raise LabError(f"swarmd on {h.name} did not answer on {h.socket} within {timeout:.0f} s (see {h.state_dir}/swarmd.log)")

    def _wait_session(self, h: Host, offset: int, timeout: float = 30) -> None:
        """Wait until h's agent has opened its session with a dispatcher (logged after offset)."""
        logpath = Path(h.state_dir) / "swarmd.log"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self._check_alive(h)
            with open(logpath, "rb") as f:
                f.seek(offset)
                if b"session opened" in f.read():
                    return
            time.sleep(0.05)
        raise LabError(f"the agent on {h.name} did not reach a manager within {timeout:.0f} s (see {logpath})")

    @contextlib.contextmanager
    def control(self, h: Host) -> Iterator[Any]:
        """A Control API stub on host h's local socket (managers only); the channel closes after."""
        import grpc

        from shoal.proto import CONTROL_CHANNEL_OPTIONS, control_pb2_grpc

        with grpc.insecure_channel(f"unix://{h.socket}", options=CONTROL_CHANNEL_OPTIONS) as ch:
            yield control_pb2_grpc.ControlStub(ch)

    def _join_tokens(self, h: Host) -> dict[str, str]:
        """The tokens, once the new cluster's first write (the Cluster object) has committed."""
        from shoal.lab.provision import join_tokens

        return join_tokens(h.socket, timeout=30, poll=0.05)

    def _wait_ready(self, state: LabState, timeout: float) -> None:
        """Until every host's node and every simulated one is READY (progress at most once a second)."""
        from shoal.proto import control_pb2, types_pb2

        deadline = time.monotonic() + timeout
        want = len(state.hosts) + state.simulated
        shown, shown_at = "", 0.0
        while True:
            for h in state.hosts:
                self._check_alive(h)
            self._check_simulated(state)
            try:
                with self.control(state.hosts[0]) as c:
                    nodes = c.ListNodes(control_pb2.ListNodesRequest(), timeout=5).nodes
            except Exception:  # a manager may be busy electing
                nodes = []
            # A manager counts once its own control socket is there: its Node is READY as soon as
            # the CA admits it, before its etcd member has joined the store.
            up = {h.name for h in state.hosts if h.role != "manager" or Path(h.socket).exists()}
            ready = sorted(n.description.hostname for n in nodes
                           if n.status.state == types_pb2.NodeStatus.READY and n.description.hostname in up)
            sims = _simulated_ready(nodes)
            msg = (f"{len(ready) + sims}/{want} nodes ready" + (f": {' '.join(ready)}" if ready else "")
                   + (f" and {sims} simulated" if sims else ""))
            done = len(ready) + sims >= want
            if msg != shown and (done or time.monotonic() - shown_at >= 1.0):
                self.progress(msg)
                shown, shown_at = msg, time.monotonic()
            if done:
                return
            if time.monotonic() > deadline:
                where = f"see the swarmd.log files in {state.dir}" + (
                    f" and {state.dir}/sim.log" if state.simulated else "")
                raise LabError(f"only {len(ready) + sims} of {want} nodes became ready within {timeout:.0f} s; "
                               + where)
            time.sleep(0.1)

    def _check_simulated(self, state: LabState) -> None:
        """LabError with its log's last lines when the simulated nodes' process (started by this
        process) has exited."""
        p = self._procs.get("sim")
        if p is not None and p.poll() is not None:
            raise LabError(f"the simulated nodes' process exited with {p.returncode}: "
                           f"{self._log_tail(state.dir / 'sim.log')}")

    # ---- operations --------------------------------------------------------------------------
    def state(self) -> LabState:
        return LabState.load(self.name)

    def kill(self, host: str) -> None:
        """SIGKILL the host's swarmd; its containers (under conmon) keep running."""
        st = self.state()
        h = st.host(host)
        if _alive(h.swarmd_pid) and "swarmd" in self._cmdline(h.swarmd_pid):
            os.kill(h.swarmd_pid, signal.SIGKILL)
            _wait_gone([h.swarmd_pid], 5)
        h.swarmd_pid = 0
        st.save()

    def start(self, host: str, timeout: float = 60, *, wait: bool = True) -> None:
        """Start a killed swarmd again (it resumes from its state dir and re-adopts its containers);
        returns once its agent has a session again (and, on a manager, its socket answers), or with
        wait=False as soon as it runs (still alive after its first second)."""
        st = self.state()
        h = st.host(host)
        if _alive(h.swarmd_pid) and "swarmd" in self._cmdline(h.swarmd_pid):
            raise LabError(f"swarmd on {h.name} is already running (pid {h.swarmd_pid})")
        if not Path(h.state_dir, "node.json").exists():  # started bare, it would create a cluster of its own
            raise LabError(f"{h.name} never joined the cluster (see {h.state_dir}/swarmd.log): "
                           "run `swarmctl lab up` again")
        offset = self._start_swarmd(st, h)  # the state dir holds its identity: no join needed
        if not wait:
            time.sleep(1.0)
            self._check_alive(h)
            return
        if h.role == "manager":
            self._wait_socket(h, timeout=timeout)
        self._wait_session(h, offset, timeout=timeout)

    def partition(self, host: str, cut: bool = True) -> None:
        """Cut a host off the underlay (its port on the bridge goes down), or heal it."""
        from pyroute2 import IPRoute

        st = self.state()
        h = st.host(host)
        with IPRoute(netns=f"/run/netns/{st.prefix}-ul", groups=0) as ipr:
            idx = ipr.link_lookup(ifname=f"h{h.index}")
            if not idx:
                raise LabError(f"the underlay port of {h.name} is missing: the lab is broken, run `swarmctl lab up` again")
            ipr.link("set", index=idx[0], state="down" if cut else "up")
        h.partitioned = cut
        st.save()

    def exec(self, host: str, argv: list[str]) -> int:
        st = self.state()
        h = st.host(host)
        if not argv:
            raise LabError("give a command to run after `--`, e.g. `swarmctl lab exec h1 -- ip addr`")
        env = dict(os.environ, SWARM_SOCKET=h.socket)
        return subprocess.call(self.enter(h) + argv, env=env)

    def status(self) -> list[dict[str, str]]:
        from shoal.proto import control_pb2, types_pb2

        st = self.state()
        nodes: dict[str, Any] = {}
        leader_host = ""
        for h in st.hosts:
            if h.role != "manager" or not _alive(h.swarmd_pid) or h.partitioned:
                continue
            try:
                with self.control(h) as c:
                    nodes = {n.description.hostname: n for n in c.ListNodes(control_pb2.ListNodesRequest(), timeout=3).nodes}
                    info = c.Info(control_pb2.InfoRequest(), timeout=3)
                leader = next((n for n in nodes.values() if n.id == info.leader_node_id), None)
                leader_host = leader.description.hostname if leader else ""
                break
            except Exception:  # no answer or no quorum there: ask the next manager
                continue
        rows = []
        for h in st.hosts:
            n = nodes.get(h.name)
            state = types_pb2.NodeStatus.State.Name(n.status.state).lower() if n else "unknown"
            if not _alive(h.swarmd_pid):
                state += " (swarmd stopped)"
            if h.partitioned:
                state += " (partitioned)"
            rows.append({"host": h.name, "role": h.role, "addr": h.addr, "state": state,
                         "leader": "leader" if h.name == leader_host else ""})
        if st.simulated:  # one row for them all
            state = f"{_simulated_ready(nodes.values())}/{st.simulated} ready" + ("" if _alive(st.sim_pid) else " (process stopped)")
            rows.append({"host": "sim", "role": "worker", "addr": UNDERLAY_GW, "state": state, "leader": ""})
        return rows

    def env(self) -> str:
        st = self.state()
        managers = [h for h in st.hosts if h.role == "manager"]
        h = next((h for h in managers if _alive(h.swarmd_pid) and not h.partitioned),
                 next((h for h in managers if _alive(h.swarmd_pid)), st.hosts[0]))
        return f"export SWARM_SOCKET={h.socket}\nexport DOCKER_HOST=unix://{Path(h.state_dir) / 'docker.sock'}"

    # ---- down --------------------------------------------------------------------------------
    def down(self) -> None:
        """Remove everything the lab made; a second call finds nothing and does nothing."""
        try:
            st: LabState | None = LabState.load(self.name)
        except (LabError, json.JSONDecodeError, TypeError, KeyError):
            st = None
        hosts = st.hosts if st else []
        base = BASE / self.name
        namespaces = self._leftover_namespaces()
        if not namespaces and not base.exists():
            return
        self.progress(f"removing lab {self.name!r}")
        # 1. swarmd first, so it restarts nothing we remove; then everything else in the hosts and
        #    the underlay: conmon, containers, holders, the registry (all by PID, found by namespace)
        swarmds = [h.swarmd_pid for h in hosts if _alive(h.swarmd_pid) and "swarmd" in self._cmdline(h.swarmd_pid)]
        _kill_all(swarmds)
        _wait_gone(swarmds, 5)
        pids = _processes_in([h.holder_pid for h in hosts], [f"/run/netns/{n}" for n in namespaces])
        _kill_all(pids)
        left = _wait_gone(pids, 10)
        if left:
            log.warning("lab down: processes %s did not end", left)
        # 2. runc state and cgroups of the containers (each engine's runc root is in its state dir)
        procs = []
        for root in base.glob("h*/engine/runc") if base.exists() else []:
            for cdir in root.iterdir() if root.is_dir() else []:
                procs.append(subprocess.Popen(["runc", "--root", str(root), "delete", "--force", cdir.name],
                                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        for p in procs:
            p.wait()
        for hdir in base.glob("h*") if base.exists() else []:
            for cg in _engine_cgroups(str(hdir / "engine")):
                _rmdir_tree(cg)
        # 3. namespaces (their links, nft rules and sockets go with them), mounts, then the state
        from pyroute2 import netns

        for ns_name in namespaces:
            try:
                netns.remove(ns_name)
            except OSError as e:
                log.warning("lab down: cannot remove namespace %s: %s", ns_name, e)
        self._unmount_under(base)
        shutil.rmtree(base, ignore_errors=True)
        with contextlib.suppress(OSError):
            BASE.rmdir()  # only when no other lab is left
        self.progress(f"lab {self.name!r} removed")

    @staticmethod
    def _unmount_under(base: Path) -> None:
        prefix = str(base) + "/"
        mounts = [line.split()[1] for line in Path("/proc/mounts").read_text().splitlines()]
        for m in sorted((m for m in mounts if m.startswith(prefix)), key=len, reverse=True):
            subprocess.run(["umount", "-l", m], check=False)
