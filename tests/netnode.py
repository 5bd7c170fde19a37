"""One node's networking (`NetworkAgent`) as a process, with a tiny control channel: tests and benchmarks
drive namespace hosts with it, without swarmd (tests/agent/test_network*.py, bench/propagation.py).

Run it in a host's network namespace, by its path (so that it works from a clone anywhere)::

    nsenter --net=/run/netns/HOST python tests/netnode.py --node-id N --addr 198.18.0.1 \
        --state-dir DIR --ns-prefix P [--gw-subnet CIDR] [--upstream-dns IP]... [--events]

It runs `NetworkAgent.serve()` as swarmd does, and reads one JSON request per line on stdin,
answering one JSON line on stdout ``{"id": …, "ok": true, "result": …}`` (or ``"ok": false,
"error": …``). Requests (``{"id": 1, "op": "…", …}``; protobufs as base64 of their bytes):

* ``session`` ``msg`` (dispatcher_pb2.SessionMessage): `on_session` (keys, managers to join, node);
* ``keys`` ``msg`` (dispatcher_pb2.NetworkKeys) [``update``: false = REMOVE]: `set_network_keys`;
* ``prepare`` ``task`` (objects_pb2.Task) [``active``] → ``{netns_path, resolv_conf, addresses, t}``
  (t: unix time when prepare() returned); ``activate`` / ``deactivate`` ``task_id``;
* ``release`` ``task_id`` → ``{t}``; ``cleanup``; ``stop`` (leave the gossip and exit; nothing removed);
* ``state`` → ``{ready, error, members: {node: state}, networks, ingress, tasks, dns}``;
* ``peers`` ``network_id`` → ``{fdb: [[mac, vtep]…], neigh: [[ip, mac]…]}`` (what the kernel holds).

With ``--events`` it also prints ``{"ev": "peer", "t": <unix time>, "net", "ip", "mac", "vtep",
"added"}`` each time a remote endpoint's FDB/neighbour entries were programmed or removed.

`NetNode` is the client side: it starts the process in a namespace and calls it.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import ipaddress
import itertools
import json
import logging
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO, Any

from shoal.agent.network import NetworkAgent
from shoal.proto import dispatcher_pb2, objects_pb2, types_pb2

log = logging.getLogger("netnode")

PATH = str(Path(__file__).resolve())  # argv[1] for sys.executable


def _b64(msg: Any) -> str:
    return base64.b64encode(msg.SerializeToString()).decode()


class _Server:
    def __init__(self, net: NetworkAgent, events: bool) -> None:
        self.net = net
        self.done = asyncio.Event()
        if events:
            net.on_peer = self._on_peer

    @staticmethod
    def _out(obj: dict) -> None:
        sys.stdout.write(json.dumps(obj) + "\n")
        sys.stdout.flush()

    def _on_peer(self, network_id: str, ip: str, mac: str, vtep: str, added: bool) -> None:
        self._out({"ev": "peer", "t": time.time(), "net": network_id, "ip": ip, "mac": mac, "vtep": vtep,
                   "added": added})

    async def handle(self, req: dict) -> Any:
        op = req.get("op")
        net = self.net
        if op == "session":
            net.on_session(dispatcher_pb2.SessionMessage.FromString(base64.b64decode(req["msg"])))
            return None
        if op == "prepare":
            tn = await net.prepare(objects_pb2.Task.FromString(base64.b64decode(req["task"])),
                                   active=req.get("active", True))
            return {"netns_path": tn.netns_path, "resolv_conf": tn.resolv_conf, "addresses": tn.addresses,
                    "t": time.time()}
        if op in ("activate", "deactivate"):
            await getattr(net, op)(req["task_id"])
            return None
        if op == "release":
            await net.release(req["task_id"])
            return {"t": time.time()}
        if op == "cleanup":
            await net.cleanup()
            return None
        if op == "stop":
            self.done.set()
            return None
        if op == "state":
            g = net.gossip
            return {
                "ready": net._ready.is_set(),
                "error": net._error,
                "members": {m.node_id: m.state_name for m in g.members()} if g else {},
                "networks": sorted(g.networks()) if g else [],
                "ingress": net._ingress_id,
                "tasks": sorted(net._tasks),
                "dns": sorted(net.dns.serving()) if net.dns else [],
            }
        if op == "keys":  # an encrypted network's NetworkKeys assignment (REMOVE: no keys)
            nk = dispatcher_pb2.NetworkKeys.FromString(base64.b64decode(req["msg"]))
            net.set_network_keys(nk.network_id, list(nk.keys) if req.get("update", True) else None)
            return None
        if op == "peers":
            fdb, neigh = await asyncio.to_thread(net.driver.peer_entries, req["network_id"])
            return {"fdb": sorted(fdb), "neigh": sorted(neigh)}
        raise ValueError(f"unknown op {op!r}; use session, keys, prepare, activate, deactivate, release, cleanup, "
                         "stop, state or peers")

    async def _one(self, line: str) -> None:
        try:
            req = json.loads(line)
        except ValueError as e:
            self._out({"id": None, "ok": False, "error": f"bad request line: {e}"})
            return
        try:
            self._out({"id": req.get("id"), "ok": True, "result": await self.handle(req)})
        except Exception as e:
            log.exception("node=%s request %s failed", self.net.node_id, req.get("op"))
            self._out({"id": req.get("id"), "ok": False, "error": f"{type(e).__name__}: {e}"})

    async def read(self) -> None:
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader(limit=16 * 1024 * 1024)
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
        pending: set[asyncio.Task] = set()
        while line := await reader.readline():
            t = asyncio.create_task(self._one(line.decode()))
            pending.add(t)
            t.add_done_callback(pending.discard)
        if pending:
            await asyncio.wait(pending)
        self.done.set()  # stdin closed: the test is gone


async def _main(args: argparse.Namespace) -> None:
    net = NetworkAgent(args.node_id, args.addr, Path(args.state_dir), args.ns_prefix, gossip_port=args.gossip_port,
                       gw_subnet=args.gw_subnet, upstream_dns=args.upstream_dns)
    srv = _Server(net, args.events)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, srv.done.set)
    serve = asyncio.create_task(net.serve(), name="net-serve")
    reader = asyncio.create_task(srv.read(), name="netnode-control")
    srv._out({"ev": "started", "pid": os.getpid()})
    try:
        await srv.done.wait()
    finally:
        reader.cancel()
        serve.cancel()
        for t in (reader, serve):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        await net.stop()


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="netnode.py", description=__doc__.split("\n")[0])
    ap.add_argument("--node-id", required=True)
    ap.add_argument("--addr", required=True, help="advertise (underlay) address of this host")
    ap.add_argument("--state-dir", required=True)
    ap.add_argument("--ns-prefix", required=True)
    ap.add_argument("--gossip-port", type=int, default=7946)
    ap.add_argument("--gw-subnet", default="172.18.0.0/16")
    ap.add_argument("--upstream-dns", action="append", default=None)
    ap.add_argument("--events", action="store_true")
    ap.add_argument("--log-level", default="INFO")
    args = ap.parse_args(argv)
    logging.basicConfig(level=args.log_level, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s %(message)s")
    asyncio.run(_main(args))


# ----- client side ----------------------------------------------------------------------------------------


def make_network(network_id: str, name: str, vni: int, subnet: str, *, internal: bool = False,
                 ingress: bool = False) -> objects_pb2.Network:
    """An overlay network as the allocator leaves it (VNI, subnet, gateway = first address)."""
    n = objects_pb2.Network(id=network_id)
    n.spec.annotations.name = name
    n.spec.internal, n.spec.ingress = internal, ingress
    n.driver_state.vni = vni
    c = n.ipam.configs.add()
    c.subnet = subnet
    c.gateway = str(ipaddress.ip_network(subnet).network_address + 1)
    return n


def attachment(net: objects_pb2.Network, ip: str, aliases: Sequence[str] = ()) -> objects_pb2.NetworkAttachment:
    """A task's (or node's) attachment: address in CIDR form, MAC by Docker's rule (manager.allocator.mac_for)."""
    plen = ipaddress.ip_network(net.ipam.configs[0].subnet).prefixlen
    a = objects_pb2.NetworkAttachment(addresses=[f"{ip}/{plen}"], aliases=list(aliases),
                                      mac="02:42:" + ":".join(f"{b:02x}" for b in ipaddress.ip_address(ip).packed))
    a.network.CopyFrom(net)
    return a


def make_task(task_id: str, service: str, service_id: str, node_id: str,
              attachments: Sequence[objects_pb2.NetworkAttachment], *, vips: dict[str, str] | None = None,
              ports: Sequence[types_pb2.PortConfig] = (), stack: str = "", slot: int = 1,
              dnsrr: bool = False) -> objects_pb2.Task:
    """A task as the allocator hands it to an agent: attachments, the service's endpoint (VIPs in CIDR
    form by network id, published ports), service annotations with the stack label."""
    t = objects_pb2.Task(id=task_id, service_id=service_id, node_id=node_id, slot=slot)
    t.annotations.name = f"{service}.{slot}.{task_id}"
    t.service_annotations.name = service
    if stack:
        t.service_annotations.labels["com.docker.stack.namespace"] = stack
    t.endpoint.spec.mode = types_pb2.EndpointSpec.DNSRR if dnsrr else types_pb2.EndpointSpec.VIP
    t.endpoint.spec.ports.extend(ports)
    t.endpoint.ports.extend(ports)
    for nid, vip in (vips or {}).items():
        t.endpoint.virtual_ips.add(network_id=nid, addr=vip)
    t.networks.extend(attachments)
    return t


def session_message(keys: Sequence[bytes], managers: Sequence[str], node: objects_pb2.Node | None = None
                    ) -> dispatcher_pb2.SessionMessage:
    """A dispatcher session message: gossip keys (lamport time in list order), managers' host:2377, the node."""
    m = dispatcher_pb2.SessionMessage(session_id="netnode")
    for i, k in enumerate(keys, 1):
        m.network_bootstrap_keys.add(subsystem="networking:gossip", key=k, lamport_time=i)
    for a in managers:
        m.managers.add(addr=a)
    if node is not None:
        m.node.CopyFrom(node)
    return m


class NetNodeError(RuntimeError):
    pass


class NetNode:
    """A `python tests/netnode.py` process in the network namespace at `host_path`."""

    def __init__(self, host_path: str, node_id: str, addr: str, state_dir: str, ns_prefix: str, *,
                 gw_subnet: str = "172.18.0.0/16", upstream_dns: Sequence[str] = (), events: bool = False,
                 log_file: str | None = None, on_event: Callable[[dict], None] | None = None) -> None:
        self.node_id, self.addr, self.host_path = node_id, addr, host_path
        argv = ["nsenter", f"--net={host_path}", sys.executable, PATH, "--node-id", node_id,
                "--addr", addr, "--state-dir", state_dir, "--ns-prefix", ns_prefix, "--gw-subnet", gw_subnet]
        for u in upstream_dns:
            argv += ["--upstream-dns", u]
        if events:
            argv.append("--events")
        self._log: IO[bytes] | None = open(log_file, "ab") if log_file else None  # noqa: SIM115
        # nsenter execs the program: the PID is the agent's own
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self._log or subprocess.DEVNULL, text=True, bufsize=1,
                                     start_new_session=True)
        self._ids = itertools.count(1)
        self._replies: dict[int, queue.Queue] = {}
        self._lock = threading.Lock()
        self.events: list[dict] = []
        self._on_event = on_event
        self._started = threading.Event()
        self._reader = threading.Thread(target=self._read, name=f"netnode-{node_id}", daemon=True)
        self._reader.start()
        if not self._started.wait(60) or self.proc.poll() is not None:
            self.kill()
            raise NetNodeError(f"netnode {node_id} did not start")

    @property
    def pid(self) -> int:
        return self.proc.pid

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            try:
                msg = json.loads(line)
            except ValueError:
                continue
            if "ev" in msg:
                if msg["ev"] == "started":
                    self._started.set()
                    continue
                with self._lock:
                    self.events.append(msg)
                if self._on_event is not None:
                    self._on_event(msg)
                continue
            with self._lock:
                q = self._replies.get(msg.get("id"))
            if q is not None:
                q.put(msg)
        self._started.set()
        with self._lock:
            for q in self._replies.values():
                q.put({"ok": False, "error": f"netnode {self.node_id} exited ({self.proc.poll()})"})

    def call(self, op: str, timeout: float = 60.0, **kw: Any) -> Any:
        rid = next(self._ids)
        q: queue.Queue = queue.Queue()
        with self._lock:
            self._replies[rid] = q
        try:
            if self.proc.poll() is not None:
                raise NetNodeError(f"netnode {self.node_id} has exited ({self.proc.returncode})")
            assert self.proc.stdin is not None
            with self._lock:  # whole lines, when threads call at once
                self.proc.stdin.write(json.dumps({"id": rid, "op": op, **kw}) + "\n")
                self.proc.stdin.flush()
            try:
                msg = q.get(timeout=timeout)
            except queue.Empty:
                raise NetNodeError(f"netnode {self.node_id}: {op} got no answer in {timeout} s") from None
        finally:
            with self._lock:
                self._replies.pop(rid, None)
        if not msg.get("ok"):
            raise NetNodeError(f"netnode {self.node_id}: {op} failed: {msg.get('error')}")
        return msg.get("result")

    # conveniences
    def session(self, msg: dispatcher_pb2.SessionMessage) -> None:
        self.call("session", msg=_b64(msg))

    def keys(self, network_id: str, keys: Sequence[types_pb2.EncryptionKey] | None) -> None:
        msg = dispatcher_pb2.NetworkKeys(network_id=network_id, keys=keys or [])
        self.call("keys", msg=_b64(msg), update=keys is not None)

    def prepare(self, task: objects_pb2.Task, active: bool = True) -> dict:
        return self.call("prepare", task=_b64(task), active=active)

    def release(self, task_id: str) -> dict:
        return self.call("release", task_id=task_id)

    def state(self) -> dict:
        return self.call("state")

    def peers(self, network_id: str) -> dict:
        return self.call("peers", network_id=network_id)

    def stop(self, timeout: float = 15.0) -> None:
        """Leave the gossip and exit (what it built stays, as after an agent restart)."""
        if self.proc.poll() is None:
            with contextlib.suppress(NetNodeError, OSError):
                self.call("stop", timeout=timeout)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        self._close()

    def kill(self) -> None:
        """SIGKILL, by PID (a crashed agent)."""
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self._close()

    def _close(self) -> None:
        for f in (self.proc.stdin, self.proc.stdout):
            with contextlib.suppress(Exception):
                f.close()  # type: ignore[union-attr]
        if self._log is not None:
            self._log.close()
            self._log = None


if __name__ == "__main__":
    main()
