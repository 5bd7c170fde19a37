"""One etcd member as a supervised child process of swarmd (Debian's `etcd-server`, etcd 3.4).

Every manager runs one etcd member. `EtcdMember` starts it, waits until it answers, restarts it when
it dies (`run`), stops it (`stop`) and reads its Prometheus metrics (`metrics`). The member dir
(`EtcdConfig.dir`, normally `<state dir>/etcd`, mode 0700) holds:

- `data/`            etcd's data dir (WAL and snapshots); once it has a WAL, etcd ignores the
                     `initial_*` settings and the `force_new_cluster` one-shot is the only way to
                     change membership from outside the cluster;
- `client.sock:0`    the client endpoint, a unix socket (etcd 3.4 accepts only `host:port` client
                     URLs, so the socket is named `client.sock:0` relative to etcd's working
                     directory, which is the member dir); gRPC target `unix://<abs path>`; the
                     clients are this manager's own processes only;
- `tls/`             the manager's certificate, key and the cluster root CA as etcd reads them
                     (files 0600; `tls` is a symlink to a `tls-<n>/` folder, rewritten on every
                     start and replaced in one rename by `update_tls`);
- `etcd.log`         etcd's own log (zap JSON lines, level warn and above), appended;
- `etcd.pid`         the pid of the running etcd.

Peer traffic (2380/tcp) is mutual TLS with the cluster CA: a peer must present a certificate of the
cluster CA that names `swarm-manager` (a manager certificate; a worker's certificate of the same CA
is refused), and peers check each other's certificate against the peer URL host (the IP SANs that
`RootCA.issue(ips=...)` adds).

Orphans: the child is started through `setpriv --pdeathsig TERM` (PR_SET_PDEATHSIG), so when swarmd dies (even by SIGKILL) etcd is
told to stop. The kernel sends it when the *thread* that forked the child ends: start members from
the thread that runs the event loop for the life of the member (asyncio forks from the loop thread).
On every start a stray etcd named by `etcd.pid` with this binary and this data dir is SIGKILLed and
waited for, so a restart never finds its data dir held by another process.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import re
import shutil
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import grpc

from shoal.proto import etcd_pb2, etcd_pb2_grpc

log = logging.getLogger(__name__)

SOCKET_NAME = "client.sock:0"
CLIENT_URL = "unix://" + SOCKET_NAME  # relative to etcd's working directory, the member dir
MAX_SOCKET_PATH = 107  # bytes in sockaddr_un.sun_path, without the terminating NUL
PEER_ALLOWED_HOSTNAME = "swarm-manager"  # = ca.MANAGER_NAME (not imported: ca pulls in the store)
CLUSTER_TOKEN = "shoal"
BACKOFF_MIN = 0.5
BACKOFF_MAX = 8.0
BACKOFF_RESET = 30.0  # seconds of uptime after which a crash starts the backoff over
SETPRIV = "/usr/bin/setpriv"
_LOG_TAIL_BYTES = 64 * 1024
# Warnings every start logs (auth is off, its token type does not matter): never "the last line".
_LOG_NOISE = ("simple token is not cryptographically signed",)

Metrics = dict[str, list[tuple[dict[str, str], float]]]


class EtcdError(RuntimeError):
    """etcd could not be started or answered wrongly; the message says why (with etcd's own words)."""


@dataclass(frozen=True)
class EtcdConfig:
    """How to run one member. `dir` is made absolute by `EtcdMember`."""

    dir: Path  # the member dir, <state_dir>/etcd, created mode 0700
    name: str  # member name (the node id)
    peer_url: str  # advertised peer URL, https://HOST:PORT (port 2380 by default)
    cert_pem: bytes  # the manager's TLS identity (cluster CA signed, DNS SAN "swarm-manager")
    key_pem: bytes
    ca_pem: bytes
    peer_listen: str = ""  # https://HOST:PORT to bind; default peer_url
    # (name, peer url) of every member incl. self for a first start; () = a new cluster of this member
    initial_cluster: tuple[tuple[str, str], ...] = ()
    initial_state: str = "new"  # "new" | "existing" (joining an existing cluster as added by MemberAdd)
    force_new_cluster: bool = False
    heartbeat_ms: int = 50
    election_ms: int = 500
    binary: str = "etcd"


class EtcdMember:
    """The etcd child process of one manager: `start`, then `run` (supervise) until `stop`.

    Not thread-safe: use it from one event loop, in the thread that keeps running that loop (see
    the module docstring about PR_SET_PDEATHSIG)."""

    def __init__(self, config: EtcdConfig) -> None:
        if config.initial_state not in ("new", "existing"):
            raise ValueError(f"initial_state must be 'new' or 'existing', not {config.initial_state!r}")
        self.config = config
        self.dir = Path(os.path.abspath(config.dir))
        self._proc: asyncio.subprocess.Process | None = None
        self._started_at = 0.0  # time.monotonic() of the last spawn
        self._log_offset = 0  # size of etcd.log at the last spawn: where this run's lines begin
        self._force_new = config.force_new_cluster  # a one-shot: only the first spawn gets it
        self._had_data = False  # has_data at the last spawn
        self._stopping = False
        self._restarting = False  # `restart` replaces the process: `run` waits for it, then goes on
        self._lock = asyncio.Lock()

    # ---- paths and state ---------------------------------------------------------------------
    @property
    def name(self) -> str:
        return self.config.name

    @property
    def socket_path(self) -> Path:
        return self.dir / SOCKET_NAME

    @property
    def client_target(self) -> str:
        """The gRPC target of the client socket: `unix:///abs/dir/client.sock:0`."""
        return f"unix://{self.socket_path}"

    @property
    def data_dir(self) -> Path:
        return self.dir / "data"

    @property
    def log_path(self) -> Path:
        return self.dir / "etcd.log"

    @property
    def pid_path(self) -> Path:
        return self.dir / "etcd.pid"

    @property
    def tls_dir(self) -> Path:
        return self.dir / "tls"

    @property
    def has_data(self) -> bool:
        """True when the data dir holds a member already (a WAL): etcd then ignores the initial_*
        settings and restarts as the member it was."""
        wal = self.data_dir / "member" / "wal"
        return wal.is_dir() and any(wal.glob("*.wal"))

    @property
    def pid(self) -> int | None:
        """The pid of the etcd process while it runs, else None."""
        p = self._proc
        return p.pid if p is not None and p.returncode is None else None

    @property
    def returncode(self) -> int | None:
        """The exit code of the last etcd process (negative: killed by that signal); None if running
        or never started."""
        return self._proc.returncode if self._proc is not None else None

    # ---- start / supervise / stop ------------------------------------------------------------
    async def start(self, timeout: float = 30) -> None:
        """Start etcd and return once `Maintenance.Status` answers on the client socket.

        Kills a stray etcd of this data dir first (see the module docstring). Raises EtcdError with
        the last lines of etcd.log if etcd exits, or if it does not answer within `timeout` seconds
        (it is then killed). A member that is running already is only waited for.

        etcd serves clients only once it has published itself through Raft, so a member of a
        multi-member cluster whose quorum is down does not answer until enough members are back.
        To restart such a member without a deadline, use `run()` (which does not wait) and
        `wait_ready()`."""
        t0 = time.monotonic()
        async with self._lock:
            if self.pid is None:
                self._stopping = False
                await self._spawn()
            proc = self._proc
        assert proc is not None
        if await self._poll_ready(t0 + timeout, proc):
            log.info("etcd answering member=%s pid=%d after=%.2fs socket=%s", self.name, proc.pid,
                     time.monotonic() - t0, self.socket_path)
            return
        async with self._lock:
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()
            self._remove_pidfile(proc.pid)
        hint = (" A member of a multi-member cluster answers only while a quorum of its members runs."
                if self._had_data or len(self.config.initial_cluster) > 1 else "")
        raise EtcdError(f"etcd member {self.name} did not answer on {self.socket_path} within {timeout:g} s "
                        f"(killed it).{hint} {self._tail_text()}")

    async def wait_ready(self, timeout: float | None = None) -> bool:
        """Wait until the member answers `Maintenance.Status`; False if it did not within `timeout`
        seconds (None: no limit). Never kills nor starts anything; an exited process is waited
        through (for `run()` to restart it)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        return await self._poll_ready(deadline, None)

    async def run(self) -> None:
        """Supervise until cancelled or stopped: restart etcd whenever it exits unexpectedly.

        Spawns etcd first if it is not running, without waiting for it to answer (see `start`).
        Restarts back off exponentially from 0.5 s to 8 s; a member that ran 30 s or more before
        dying starts the backoff over; each exit is logged with etcd's last log line. Returns after
        `stop()`; cancelling it ends the supervision only, the process keeps running until `stop()`."""
        async with self._lock:
            if self.pid is None:
                self._stopping = False
                await self._spawn()
        delay = BACKOFF_MIN
        while True:
            proc = self._proc
            assert proc is not None
            code = await proc.wait()
            if self._stopping:
                return
            if self._restarting or self._proc is not proc:
                async with self._lock:  # held by `restart` until the new process runs
                    pass
                continue
            if time.monotonic() - self._started_at >= BACKOFF_RESET:
                delay = BACKOFF_MIN
            last = self._tail(1)
            log.warning("etcd member %s exited with code %s: %s; restarting in %.1f s", self.name,
                        _describe_code(code), last[-1] if last else "(nothing new in etcd.log)", delay)
            while True:
                await asyncio.sleep(delay)
                delay = min(delay * 2, BACKOFF_MAX)
                async with self._lock:
                    if self._stopping:
                        return
                    try:
                        await self._spawn()
                        break
                    except (EtcdError, OSError) as e:
                        log.error("etcd member %s could not be restarted: %s; retrying in %.1f s",
                                  self.name, e, delay)

    async def restart(self, ca_pem: bytes, timeout: float = 30) -> None:
        """Stop etcd and start it again trusting the roots `ca_pem` (etcd reads its trusted roots at
        start only: after a root rotation). Waits until it answers (EtcdError otherwise); a running
        `run` supervises the new process."""
        self.config = dataclasses.replace(self.config, ca_pem=ca_pem)
        t0 = time.monotonic()
        async with self._lock:
            self._restarting = True
            try:
                if self._proc is not None:
                    await self._terminate(self._proc, 10)
                await self._spawn()
                proc = self._proc
            finally:
                self._restarting = False
        assert proc is not None
        if not await self._poll_ready(t0 + timeout, proc):
            raise EtcdError(f"etcd member {self.name} did not answer within {timeout:g} s of its restart. "
                            f"{self._tail_text()}")
        log.info("etcd member %s restarted with new trusted roots in %.2f s", self.name, time.monotonic() - t0)

    async def stop(self, timeout: float = 10) -> None:
        """Stop etcd: SIGTERM, SIGKILL after `timeout` seconds, and wait for it. A running `run`
        then returns. Safe to call when etcd is not running."""
        async with self._lock:
            self._stopping = True
            proc = self._proc
            if proc is not None:
                await self._terminate(proc, timeout)

    async def _terminate(self, proc: asyncio.subprocess.Process, timeout: float) -> None:
        """SIGTERM, SIGKILL after `timeout` seconds, wait for it, drop its pidfile. Called with the
        lock held."""
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), timeout)
            except TimeoutError:
                log.warning("etcd did not stop within %.0f s of SIGTERM, killing it member=%s pid=%d",
                            timeout, self.name, proc.pid)
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()
            log.info("etcd stopped member=%s pid=%d code=%s", self.name, proc.pid, _describe_code(proc.returncode))
        self._remove_pidfile(proc.pid)

    # ---- client helpers ----------------------------------------------------------------------
    async def status(self, timeout: float = 2) -> etcd_pb2.StatusResponse:
        """`Maintenance.Status` of this member over its client socket (grpc.aio errors pass through)."""
        async with grpc.aio.insecure_channel(self.client_target) as ch:
            return await etcd_pb2_grpc.MaintenanceStub(ch).Status(etcd_pb2.StatusRequest(), timeout=timeout)

    async def metrics_text(self, timeout: float = 5) -> bytes:
        """etcd's own /metrics, as the member serves it (Prometheus text format), for swarmd to relay."""
        try:
            return await asyncio.wait_for(self._http_get("/metrics"), timeout)
        except (OSError, ValueError, TimeoutError, asyncio.IncompleteReadError) as e:
            raise EtcdError(f"etcd member {self.name}: GET /metrics on {self.socket_path} failed: "
                            f"{e or type(e).__name__}") from None

    async def metrics(self, timeout: float = 5, names: tuple[str, ...] = ()) -> Metrics:
        """etcd's Prometheus metrics (GET /metrics over the client socket), parsed: metric name ->
        [(labels, value)]; with `names`, only the series of those names (parsing all of them costs the
        manager's loop a few ms). Raises EtcdError if the socket does not answer a 200 in `timeout` s."""
        return parse_metrics((await self.metrics_text(timeout)).decode("utf-8", "replace"), names)

    # ---- internals ---------------------------------------------------------------------------
    def _argv(self, binary: str) -> list[str]:
        c = self.config
        cluster = c.initial_cluster or ((c.name, c.peer_url),)
        tls = self.tls_dir
        argv = [
            binary,
            f"--name={c.name}",
            f"--data-dir={self.data_dir}",
            f"--listen-client-urls={CLIENT_URL}",
            f"--advertise-client-urls={CLIENT_URL}",
            f"--listen-peer-urls={c.peer_listen or c.peer_url}",
            f"--initial-advertise-peer-urls={c.peer_url}",
            "--initial-cluster=" + ",".join(f"{n}={u}" for n, u in cluster),
            f"--initial-cluster-state={c.initial_state}",
            f"--initial-cluster-token={CLUSTER_TOKEN}",
            f"--heartbeat-interval={c.heartbeat_ms}",
            f"--election-timeout={c.election_ms}",
            "--pre-vote=true",
            "--snapshot-count=10000",
            "--auto-compaction-mode=periodic",
            "--auto-compaction-retention=10m",
            "--max-txn-ops=4096",
            "--max-request-bytes=4194304",
            "--logger=zap",
            "--log-outputs=stderr",
            "--log-level=warn",
            "--enable-v2=false",
            "--experimental-initial-corrupt-check=true",
            # Membership changes are guarded by the manager (learners only, promoted when etcd finds
            # them caught up; no removal that leaves the voters without a reachable majority), not by
            # etcd's strict check, which also holds every new member back 5 s after the last one.
            "--strict-reconfig-check=false",
            f"--peer-cert-file={tls / 'peer.crt'}",
            f"--peer-key-file={tls / 'peer.key'}",
            f"--peer-trusted-ca-file={tls / 'ca.crt'}",
            "--peer-client-cert-auth=true",
            f"--peer-cert-allowed-hostname={PEER_ALLOWED_HOSTNAME}",
            # The caller's address is not checked against its certificate's SANs: a member dials
            # from whichever local address the kernel picks, and checking DNS SANs means lookups.
            "--experimental-peer-skip-client-san-verification=true",
        ]
        if self._force_new:
            argv.append("--force-new-cluster=true")
        return argv

    def _prepare_dir(self) -> None:
        n = len(os.fsencode(str(self.socket_path)))
        if n > MAX_SOCKET_PATH:
            raise EtcdError(
                f"the etcd client socket {self.socket_path} would be {n} bytes long, more than the "
                f"{MAX_SOCKET_PATH} a unix socket path allows: give swarmd a shorter --state-dir than "
                f"{self.dir.parent}"
            )
        for d in (self.dir, self.data_dir):
            d.mkdir(mode=0o700, parents=True, exist_ok=True)
            os.chmod(d, 0o700)
        self._write_tls()

    def update_tls(self, cert_pem: bytes, key_pem: bytes) -> None:
        """A renewed certificate and key. etcd reads its certificate files at every new peer
        handshake, so the next connection uses them with no restart (connections already open go on;
        the trusted roots, `ca.crt`, are read at start only)."""
        self.config = dataclasses.replace(self.config, cert_pem=cert_pem, key_pem=key_pem)
        self._write_tls()

    def _write_tls(self) -> None:
        """Write the TLS files into a new `tls-<n>` folder and point the `tls` symlink at it with one
        rename: a handshake reads either the old pair or the new one, never a certificate with the
        other's key (up to the moment between etcd's two reads)."""
        c = self.config
        name = f"tls-{time.time_ns():x}"
        new = self.dir / name
        new.mkdir(mode=0o700)
        for fname, data in (("peer.crt", c.cert_pem), ("peer.key", c.key_pem), ("ca.crt", c.ca_pem)):
            _write_private(new / fname, data)
        link = self.dir / (name + ".link")
        os.symlink(name, link)
        if self.tls_dir.is_dir() and not self.tls_dir.is_symlink():
            shutil.rmtree(self.tls_dir)  # a real folder, as members made before renewals had
        os.replace(link, self.tls_dir)
        for old in self.dir.glob("tls-*"):
            if old.name != name:
                shutil.rmtree(old, ignore_errors=True)

    async def _spawn(self) -> None:
        """Start the process (no readiness wait). Called with the lock held."""
        binary = shutil.which(self.config.binary)
        if binary is None:
            raise EtcdError(f"etcd binary {self.config.binary!r} not found: install Debian's etcd-server "
                            "(scripts/setup)")
        binary = os.path.abspath(binary)
        self._prepare_dir()
        await self._kill_stray(binary)
        with contextlib.suppress(FileNotFoundError):
            self.socket_path.unlink()
        self._had_data = self.has_data
        env = {k: v for k, v in os.environ.items() if not k.startswith("ETCD_")}
        fd = os.open(self.log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            self._log_offset = os.fstat(fd).st_size
            # setpriv (util-linux) sets PR_SET_PDEATHSIG and execs etcd: no Python code may run in
            # the forked child of a process with gRPC threads (a preexec_fn there can crash).
            self._proc = await asyncio.create_subprocess_exec(
                SETPRIV, "--pdeathsig", "TERM", "--", *self._argv(binary),
                cwd=self.dir,
                env=env,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=fd,
                stderr=fd,
                start_new_session=True,  # a ^C to swarmd's terminal is swarmd's to handle
                umask=0o077,
            )
        finally:
            os.close(fd)
        self._started_at = time.monotonic()
        force_new, self._force_new = self._force_new, False  # a one-shot: never on a restart
        _write_private(self.pid_path, f"{self._proc.pid}\n".encode())
        log.info("etcd started member=%s pid=%d peer=%s data=%s state=%s force_new_cluster=%s",
                 self.name, self._proc.pid, self.config.peer_url, self.data_dir,
                 "existing data" if self._had_data else self.config.initial_state, force_new)

    async def _poll_ready(self, deadline: float | None, proc: asyncio.subprocess.Process | None) -> bool:
        """Poll Status until it answers (True) or `deadline` passes (False). With `proc`, raise
        EtcdError as soon as that process exits; without, follow whatever process is current."""
        opts = [("grpc.initial_reconnect_backoff_ms", 50), ("grpc.min_reconnect_backoff_ms", 50),
                ("grpc.max_reconnect_backoff_ms", 250)]
        channel: grpc.aio.Channel | None = None
        try:
            while True:
                if proc is not None and proc.returncode is not None:
                    self._remove_pidfile(proc.pid)
                    raise EtcdError(f"etcd member {self.name} exited with code {_describe_code(proc.returncode)}"
                                    f" while starting. {self._tail_text()}")
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                running = self.pid is not None
                if channel is None and running and self.socket_path.exists():
                    channel = grpc.aio.insecure_channel(self.client_target, options=opts)
                if channel is not None and running:
                    try:
                        await etcd_pb2_grpc.MaintenanceStub(channel).Status(
                            etcd_pb2.StatusRequest(), timeout=1.0 if left is None else min(1.0, max(left, 0.05)))
                        with contextlib.suppress(OSError):
                            os.chmod(self.socket_path, 0o600)
                        return True
                    except grpc.aio.AioRpcError:
                        pass
                await asyncio.sleep(0.02 if left is None else min(0.02, max(deadline - time.monotonic(), 0)))
        finally:
            if channel is not None:
                await channel.close()

    async def _kill_stray(self, binary: str) -> None:
        try:
            pid = int(self.pid_path.read_text().split()[0])
        except (FileNotFoundError, ValueError, IndexError):
            return
        if pid <= 1 or pid == os.getpid() or not _is_member_process(pid, binary, self.data_dir):
            return
        log.warning("killing a stray etcd that holds the data dir member=%s pid=%d data=%s",
                    self.name, pid, self.data_dir)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while process_alive(pid):
            if time.monotonic() > deadline:
                raise EtcdError(f"a stray etcd (pid {pid}) holds {self.data_dir} and did not die within 10 s "
                                "of SIGKILL")
            await asyncio.sleep(0.02)

    def _remove_pidfile(self, pid: int) -> None:
        try:
            if self.pid_path.read_text().split()[0] == str(pid):
                self.pid_path.unlink()
        except (FileNotFoundError, IndexError):
            pass

    def _tail(self, n: int) -> list[str]:
        """The last `n` lines etcd wrote since the last spawn, made readable (`_summarize`)."""
        try:
            with open(self.log_path, "rb") as f:
                size = f.seek(0, os.SEEK_END)
                start = max(self._log_offset, size - _LOG_TAIL_BYTES)
                f.seek(start)
                data = f.read()
        except FileNotFoundError:
            return []
        lines = [ln for ln in data.decode("utf-8", "replace").splitlines()
                 if ln.strip() and not any(noise in ln for noise in _LOG_NOISE)]
        return [_summarize(ln) for ln in lines[-n:]]

    def _tail_text(self, n: int = 8) -> str:
        lines = self._tail(n)
        if not lines:
            return f"{self.log_path} has nothing new"
        return f"last lines of {self.log_path}:\n  " + "\n  ".join(lines)

    async def _http_get(self, path: str) -> bytes:
        reader, writer = await asyncio.open_unix_connection(str(self.socket_path))
        try:
            writer.write(f"GET {path} HTTP/1.1\r\nHost: localhost\r\nAccept: text/plain\r\n"
                         "Connection: close\r\n\r\n".encode())
            await writer.drain()
            status = (await reader.readline()).decode("latin-1").split()
            if len(status) < 2 or not status[0].startswith("HTTP/1."):
                raise ValueError(f"not an HTTP response: {' '.join(status)!r}")
            headers: dict[str, str] = {}
            while (line := (await reader.readline()).decode("latin-1").strip()):
                k, _, v = line.partition(":")
                headers[k.strip().lower()] = v.strip()
            if "chunked" in headers.get("transfer-encoding", "").lower():
                chunks = []
                while True:
                    size = int((await reader.readline()).split(b";")[0].strip() or b"0", 16)
                    if size == 0:
                        break
                    chunks.append(await reader.readexactly(size))
                    await reader.readexactly(2)
                body = b"".join(chunks)
            elif "content-length" in headers:
                body = await reader.readexactly(int(headers["content-length"]))
            else:
                body = await reader.read()
            if status[1] != "200":
                raise ValueError(f"HTTP {' '.join(status[1:])}: {body[:200].decode('utf-8', 'replace')}")
            return body
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()


# ---- helpers -----------------------------------------------------------------------------------
def _write_private(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)


def process_alive(pid: int) -> bool:
    """The process exists and is not a zombie (a zombie holds no files, locks nor ports)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(") ", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def _is_member_process(pid: int, binary: str, data_dir: Path) -> bool:
    """`pid` runs `binary` (same file name) with `--data-dir` = `data_dir`."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = [a.decode("utf-8", "replace") for a in f.read().split(b"\0") if a]
    except OSError:
        return False
    if not argv or os.path.basename(argv[0]) != os.path.basename(binary) or not process_alive(pid):
        return False
    want = str(data_dir)
    for i, a in enumerate(argv):
        if a == f"--data-dir={want}" or (a == "--data-dir" and argv[i + 1 : i + 2] == [want]):
            return True
    return False


def _describe_code(code: int | None) -> str:
    if code is None:
        return "none"
    if code < 0:
        try:
            return f"{code} (killed by {signal.Signals(-code).name})"
        except ValueError:
            return str(code)
    return str(code)


def _summarize(line: str, limit: int = 400) -> str:
    """One etcd log line made short: zap JSON becomes `level msg key=value ...` (no time, caller,
    stack trace); anything else is kept as it is. Cut at `limit` characters."""
    line = line.strip()
    if line.startswith("{"):
        try:
            rec = json.loads(line)
        except ValueError:
            rec = None
        if isinstance(rec, dict):
            extra = " ".join(f"{k}={v}" for k, v in rec.items()
                             if k not in ("level", "ts", "caller", "msg", "stacktrace"))
            line = f"{rec.get('level', '?')} {rec.get('msg', '')}" + (f" {extra}" if extra else "")
    return line if len(line) <= limit else line[: limit - 3] + "..."


_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{.*\})?\s+(\S+)(?:\s+-?\d+)?\s*$")
_LABEL = re.compile(r'\s*([a-zA-Z_][a-zA-Z0-9_]*)\s*=\s*"((?:[^"\\]|\\.)*)"\s*,?')
_UNESCAPE = {"\\\\": "\\", '\\"': '"', "\\n": "\n"}


def parse_metrics(text: str, names: tuple[str, ...] = ()) -> Metrics:
    """Parse the Prometheus text format: metric name -> [(labels, value)], in the order given; with
    `names`, only the lines that start with one of them.

    Comments (# HELP / # TYPE) are skipped, label values unescaped, an optional timestamp dropped;
    histogram and summary series appear under their own names (`..._bucket`, `..._sum`, `..._count`).
    Lines that do not parse are skipped."""
    out: Metrics = {}
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#") or (names and not line.startswith(names)):
            continue
        m = _SAMPLE.match(line)
        if m is None:
            continue
        name, labels_text, value_text = m.groups()
        try:
            value = float(value_text)
        except ValueError:
            continue
        labels: dict[str, str] = {}
        if labels_text:
            for lm in _LABEL.finditer(labels_text[1:-1]):
                labels[lm.group(1)] = re.sub(r'\\[\\"n]', lambda e: _UNESCAPE[e.group(0)], lm.group(2))
        out.setdefault(name, []).append((labels, value))
    return out
