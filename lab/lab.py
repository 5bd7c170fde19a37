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
the rest are workers, joined with tokens.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from shoal.lab.provision import swarmd_argv

log = logging.getLogger("shoal.lab")

BASE = Path(os.environ.get("SHOAL_LAB_DIR", "/var/lib/shoal-lab"))
UNDERLAY_SUBNET = "198.18.0.0/24"
UNDERLAY_GW = "198.18.0.254"
OVERLAY_POOL = "198.19.0.0/16"
REGISTRY_PORT = 5000

Progress = Callable[[str], None]


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

    @property
    def dir(self) -> Path:
        return BASE / self.name

    def host(self, name: str) -> Host:
        for h in self.hosts:
            if h.name == name or h.addr == name:
                return h
        raise LabError(f"lab {self.name!r} has no host {name!r}: hosts are {', '.join(h.name for h in self.hosts)}")

    def save(self) -> None:
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


def _processes_in(holder_pid: int, netns_path: str) -> list[int]:
    """PIDs in the host's mount namespace or network namespace, and all their descendants."""
    mnt = _ns_inode(holder_pid, "mnt") if holder_pid else None
    try:
        net = os.stat(netns_path).st_ino
    except OSError:
        net = None
    parents: dict[int, int] = {}
    roots: set[int] = set()
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
        if (mnt is not None and _ns_inode(pid, "mnt") == mnt) or (net is not None and _ns_inode(pid, "net") == net):
            roots.add(pid)
    found = set(roots)
    changed = True
    while changed:
        changed = False
        for pid, ppid in parents.items():
            if ppid in found and pid not in found:
                found.add(pid)
                changed = True
    return sorted(found)


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

    # ---- up ----------------------------------------------------------------------------------
    def up(self, managers: int = 3, workers: int = 2) -> LabState:
        if os.geteuid() != 0:
            raise LabError("the lab needs root (network namespaces, runc): run it with sudo")
        if managers < 1 or workers < 0 or managers + workers > 200:
            raise LabError("--managers must be at least 1 and --workers at least 0 (200 hosts at most)")
        if (BASE / self.name / "lab.json").exists() or self._leftover_namespaces():
            self.progress(f"cleaning up what an earlier lab {self.name!r} left behind")
            self.down()
        from shoal.netdriver.nslab import NsLab

        t0 = time.monotonic()
        n = managers + workers
        prefix = _prefix(self.name)
        self.progress(f"building {n} namespace hosts on underlay {UNDERLAY_SUBNET}")
        ns = NsLab(prefix, n_hosts=n, subnet=UNDERLAY_SUBNET)
        state = LabState(name=self.name, prefix=prefix)
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
        try:
            self._start_registry(state, ns)
            for h in state.hosts:
                Path(h.state_dir).mkdir(parents=True, exist_ok=True)
                h.holder_pid = self._start_holder(h)
            state.save()
            first = state.hosts[0]
            self.progress(f"starting swarmd on {first.name} ({first.addr}) and creating the cluster")
            self._start_swarmd(state, first, init=True)
            tokens = self._join_tokens(first)
            for h in state.hosts[1:]:
                self.progress(f"joining {h.name} ({h.addr}) as {h.role}")
                self._start_swarmd(state, h, token=tokens[h.role], join=first.addr)
            self._wait_ready(state, timeout=60)
        except BaseException:
            state.save()
            raise
        self.progress(f"lab {self.name!r} is up: {managers} managers, {workers} workers in {time.monotonic() - t0:.1f} s")
        return state

    def _leftover_namespaces(self) -> list[str]:
        prefix = _prefix(self.name) + "-"
        try:
            return [n for n in os.listdir("/run/netns") if n.startswith(prefix)]
        except FileNotFoundError:
            return []

    def _start_registry(self, state: LabState, ns: object) -> None:
        """Seed the registry's storage through a loopback instance, then serve it on the underlay."""
        from shoal.lab.images import busybox_image
        from shoal.lab.registry import Registry, push_image

        self.progress(f"starting the local registry on {UNDERLAY_GW}:{REGISTRY_PORT} and seeding test images")
        reg_dir = state.dir / "registry"
        with Registry("127.0.0.1", storage=reg_dir) as seeder:
            push_image(seeder.url, "library/busybox", "latest", busybox_image())
        reg = Registry(UNDERLAY_GW, REGISTRY_PORT, storage=reg_dir, netns=f"/run/netns/{state.prefix}-ul")
        reg.start()
        assert reg.proc is not None
        state.registry_pid = reg.proc.pid
        state.registry_dir = str(reg_dir)
        state.save()

    def _start_holder(self, h: Host) -> int:
        script = f"mount -t tmpfs -o mode=0755 shoal-netns /run/netns && hostname {h.name} && exec sleep infinity"
        p = subprocess.Popen(
            ["nsenter", f"--net={h.netns}", "unshare", "--mount", "--uts", "--propagation", "private",
             "sh", "-c", script],
            start_new_session=True, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        for _ in range(100):  # the mount namespace exists once sleep runs in it
            if _ns_inode(p.pid, "mnt") != _ns_inode(os.getpid(), "mnt") and self._cmdline(p.pid).startswith("sleep"):
                return p.pid
            if p.poll() is not None:
                raise LabError(f"could not make the namespaces of host {h.name} (exit {p.returncode})")
            time.sleep(0.02)
        raise LabError(f"host {h.name}'s namespaces did not come up")

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
        )

    def _start_swarmd(self, state: LabState, h: Host, *, init: bool = False, token: str = "", join: str = "") -> None:
        logf = open(Path(h.state_dir) / "swarmd.log", "ab")
        argv = self.enter(h) + self.swarmd_argv(h, init=init, token=token, join=join)
        p = subprocess.Popen(argv, start_new_session=True, stdin=subprocess.DEVNULL, stdout=logf, stderr=logf)
        logf.close()
        h.swarmd_pid = p.pid
        state.save()
        self._wait_socket(h, p)

    def _wait_socket(self, h: Host, p: subprocess.Popen, timeout: float = 30) -> None:
        from shoal.proto import control_pb2

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if p.poll() is not None:
                tail = (Path(h.state_dir) / "swarmd.log").read_text(errors="replace").splitlines()[-5:]
                raise LabError(f"swarmd on {h.name} exited with {p.returncode}: " + " | ".join(tail))
            if Path(h.socket).exists():
                try:
                    self.control(h).Info(control_pb2.InfoRequest(), timeout=2)
                    return
                except Exception:
                    pass
            time.sleep(0.05)
        raise LabError(f"swarmd on {h.name} did not answer on {h.socket} within {timeout:.0f} s (see {h.state_dir}/swarmd.log)")

    def control(self, h: Host):
        import grpc

        from shoal.proto import control_pb2_grpc

        ch = grpc.insecure_channel(f"unix://{h.socket}")
        return control_pb2_grpc.ControlStub(ch)

    def _join_tokens(self, h: Host) -> dict[str, str]:
        from shoal.proto import control_pb2

        c = self.control(h).GetCluster(control_pb2.GetClusterRequest(), timeout=5).cluster
        return {"worker": c.root_ca.join_tokens.worker, "manager": c.root_ca.join_tokens.manager}

    def _wait_ready(self, state: LabState, timeout: float) -> None:
        from shoal.proto import control_pb2, types_pb2

        deadline = time.monotonic() + timeout
        want = len(state.hosts)
        last = ""
        while True:
            try:
                nodes = self.control(state.hosts[0]).ListNodes(control_pb2.ListNodesRequest(), timeout=5).nodes
            except Exception as e:  # a manager may be busy electing
                nodes, last = [], str(e)
            ready = [n for n in nodes if n.status.state == types_pb2.NodeStatus.READY]
            msg = f"{len(ready)}/{want} nodes ready"
            if msg != last:
                self.progress(msg)
                last = msg
            if len(ready) >= want:
                return
            if time.monotonic() > deadline:
                raise LabError(f"only {len(ready)} of {want} nodes became ready within {timeout:.0f} s; see the swarmd.log files in {state.dir}")
            time.sleep(0.2)

    # ---- operations --------------------------------------------------------------------------
    def state(self) -> LabState:
        return LabState.load(self.name)

    def kill(self, host: str) -> None:
        st = self.state()
        h = st.host(host)
        if _alive(h.swarmd_pid):
            os.kill(h.swarmd_pid, signal.SIGKILL)
            _wait_gone([h.swarmd_pid], 5)
        h.swarmd_pid = 0
        st.save()

    def start(self, host: str) -> None:
        st = self.state()
        h = st.host(host)
        if _alive(h.swarmd_pid):
            raise LabError(f"swarmd on {h.name} is already running (pid {h.swarmd_pid})")
        self._start_swarmd(st, h)  # the state dir holds its identity: no join needed

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
        nodes: dict[str, object] = {}
        leader_host = ""
        for h in st.hosts:
            if h.role != "manager" or not _alive(h.swarmd_pid) or h.partitioned:
                continue
            try:
                c = self.control(h)
                nodes = {n.description.hostname: n for n in c.ListNodes(control_pb2.ListNodesRequest(), timeout=3).nodes}
                info = c.Info(control_pb2.InfoRequest(), timeout=3)
                leader = next((n for n in nodes.values() if n.id == info.leader_node_id), None)  # type: ignore[attr-defined]
                leader_host = leader.description.hostname if leader else ""  # type: ignore[attr-defined]
                break
            except Exception:
                continue
        rows = []
        for h in st.hosts:
            n = nodes.get(h.name)
            state = types_pb2.NodeStatus.State.Name(n.status.state).lower() if n else "unknown"  # type: ignore[attr-defined]
            if not _alive(h.swarmd_pid):
                state += " (swarmd stopped)"
            if h.partitioned:
                state += " (partitioned)"
            rows.append({"host": h.name, "role": h.role, "addr": h.addr, "state": state,
                         "leader": "leader" if h.name == leader_host else ""})
        return rows

    def env(self) -> str:
        st = self.state()
        h = next((h for h in st.hosts if h.role == "manager" and _alive(h.swarmd_pid)), st.hosts[0])
        return f"export SWARM_SOCKET={h.socket}"

    # ---- down --------------------------------------------------------------------------------
    def down(self) -> None:
        """Remove everything the lab made; a second call finds nothing and does nothing."""
        try:
            st: LabState | None = LabState.load(self.name)
        except (LabError, json.JSONDecodeError, TypeError):
            st = None
        hosts = st.hosts if st else []
        # 1. swarmd first (SIGTERM, then SIGKILL), so it does not restart what we remove
        for h in hosts:
            if _alive(h.swarmd_pid):
                os.kill(h.swarmd_pid, signal.SIGTERM)
        left = _wait_gone([h.swarmd_pid for h in hosts], 5)
        _kill_all(left)
        # 2. everything else in each host: conmon, containers, holders
        for ns_name in self._leftover_namespaces():
            h = next((x for x in hosts if x.netns.endswith("/" + ns_name)), None)
            pids = _processes_in(h.holder_pid if h else 0, f"/run/netns/{ns_name}")
            _kill_all(pids)
            _wait_gone(pids, 5)
        for h in hosts:
            if _alive(h.holder_pid):
                os.kill(h.holder_pid, signal.SIGKILL)
                _wait_gone([h.holder_pid], 5)
        if st and _alive(st.registry_pid):
            os.kill(st.registry_pid, signal.SIGTERM)
            if _wait_gone([st.registry_pid], 5):
                os.kill(st.registry_pid, signal.SIGKILL)
        # 3. runc state and cgroups of containers (the engines keep runc roots in the state dirs)
        base = BASE / self.name
        if base.exists():
            for root in base.glob("h*/**/runc"):
                self._runc_cleanup(root)
        # 4. namespaces, then the state
        from pyroute2 import netns

        for ns_name in self._leftover_namespaces():
            try:
                netns.remove(ns_name)
            except OSError as e:
                log.warning("could not remove namespace %s: %s", ns_name, e)
        self._unmount_under(base)
        shutil.rmtree(base, ignore_errors=True)

    @staticmethod
    def _runc_cleanup(root: Path) -> None:
        if not root.is_dir():
            return
        for cdir in root.iterdir():
            if cdir.is_dir():
                subprocess.run(["runc", "--root", str(root), "delete", "--force", cdir.name],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)

    @staticmethod
    def _unmount_under(base: Path) -> None:
        prefix = str(base) + "/"
        mounts = [line.split()[1] for line in Path("/proc/mounts").read_text().splitlines()]
        for m in sorted((m for m in mounts if m.startswith(prefix)), key=len, reverse=True):
            subprocess.run(["umount", "-l", m], check=False)
