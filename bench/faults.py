"""A Jepsen-style fault campaign against the store: a workload of concurrent clients, faults on the
managers, and a linearizability check of everything that was acknowledged.

    .venv/bin/python bench/faults.py [--managers 3] [--faults 50] [--clients 6] [--keys 4] [--seed N]
                                     [--history FILE]

Brings up its own lab of managers only (named `faults`, network-namespace hosts on the underlay),
runs until the number of faults has been injected, heals everything, lets the clients finish, takes
the lab down and prints a report (a table and one JSON line). Never fails on a figure.

Workload (one asyncio loop, gRPC to each manager's local control socket, a client pinned to one
manager like a tool on that host):

- registers `svc-K`: a service (0 replicas) whose label `v` holds the value; `read` is GetService,
  `cas` is UpdateService with the version the client last read (so it succeeds only if nothing was
  written since: cas(expected=value read, new));
- registers `sec-K`: a secret whose label `v` holds the value; `create`, `delete`, `read`.

Every operation is recorded with invocation and completion times (time.monotonic, one process) and
its outcome: ok; fail when the answer proves it did not happen (FAILED_PRECONDITION, ABORTED,
ALREADY_EXISTS, NOT_FOUND, or no connection at all); unknown otherwise (a timeout, UNAVAILABLE after it was sent,
the manager paused or killed mid-call). A read answered without a quorum (trailing metadata
`x-shoal-stale`) is recorded as unknown: it carries no guarantee and says so.

Faults, each held for 1-4 s, then healed: `kill-leader` / `kill-random` (SIGKILL of swarmd and its
etcd member, then a restart), `pause` (SIGSTOP of swarmd and etcd; SIGCONT), `pause-swarmd`
(swarmd only: its etcd member keeps running, so fencing is what keeps a stale leader out),
`isolate-leader` (the etcd leader cut off the underlay), `split` (a random minority from the
majority), `bridge` (5 managers: two sides that both still reach one middle manager), `restart`
(SIGTERM and start).

Checker: bench/linearizability.py (Wing-Gong search per register, plus lost writes and stale reads).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import grpc

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cluster import etcd_pid  # noqa: E402
from linearizability import Op, check, report, to_jsonl  # noqa: E402

from shoal.lab.lab import Host, Lab, LabState, _alive  # noqa: E402
from shoal.proto import control_pb2, control_pb2_grpc, specs_pb2, types_pb2  # noqa: E402

STALE_KEY = "x-shoal-stale"
CALL_TIMEOUT = 5.0
DEFINITE_FAILURES = {
    grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.ABORTED, grpc.StatusCode.ALREADY_EXISTS, grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.INVALID_ARGUMENT,
}
FAULT_KINDS = ("kill-leader", "kill-random", "pause", "pause-swarmd", "isolate-leader", "split", "restart")
NFT_TABLE = "shoal_fault"


@dataclass
class Campaign:
    lab: Lab
    state: LabState
    rng: random.Random
    history: list[Op] = field(default_factory=list)
    faults: Counter[str] = field(default_factory=Counter)
    fault_log: list[tuple[float, str, str]] = field(default_factory=list)
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    values: int = 0

    def managers(self) -> list[Host]:
        return [h for h in self.lab.state().hosts if h.role == "manager"]

    def next_value(self, client: int) -> str:
        self.values += 1
        return f"c{client}-{self.values}"


# ---- the workload --------------------------------------------------------------------------------
def _outcome(e: grpc.aio.AioRpcError) -> str:
    if e.code() in DEFINITE_FAILURES:
        return "fail"
    if e.code() == grpc.StatusCode.UNAVAILABLE and "failed to connect" in (e.details() or ""):
        return "fail"  # never reached the manager
    return "unknown"


def _stale(call_metadata: object) -> bool:
    return any(k == STALE_KEY for k, _ in (call_metadata or ()))  # type: ignore[attr-defined]


async def _call(method, request):  # -> (response | None, outcome, stale)
    call = method(request, timeout=CALL_TIMEOUT)
    try:
        resp = await call
    except grpc.aio.AioRpcError as e:
        return None, _outcome(e), False, e
    return resp, "ok", _stale(await call.trailing_metadata()), None


async def client(camp: Campaign, idx: int, host: Host, keys: int) -> None:
    rng = random.Random(camp.rng.random())
    ch = grpc.aio.insecure_channel(f"unix:{host.socket}")
    stub = control_pb2_grpc.ControlStub(ch)
    seen: dict[str, tuple[str | None, int, str]] = {}  # key -> (value, version, object id) last read
    try:
        while not camp.stop.is_set():
            key = f"{rng.choice(('svc', 'sec'))}-{rng.randrange(keys)}"
            if key.startswith("svc"):
                if key in seen and rng.random() < 0.5:
                    await _svc_cas(camp, stub, idx, key, seen)
                else:
                    await _svc_read(camp, stub, idx, key, seen)
            else:
                r = rng.random()
                if r < 0.5:
                    await _sec_read(camp, stub, idx, key)
                elif r < 0.75:
                    await _sec_create(camp, stub, idx, key)
                else:
                    await _sec_delete(camp, stub, idx, key)
            await asyncio.sleep(rng.uniform(0, 0.02))
    finally:
        await ch.close()


def _record(camp: Campaign, idx: int, key: str, kind: str, value: object, t0: float, outcome: str) -> None:
    done = time.monotonic() if outcome != "unknown" else None
    camp.history.append(Op(client=idx, key=key, kind=kind, value=value, invoke=t0, complete=done, outcome=outcome))


async def _svc_read(camp: Campaign, stub, idx: int, key: str, seen: dict) -> None:
    t0 = time.monotonic()
    resp, outcome, stale, _ = await _call(stub.GetService, control_pb2.GetServiceRequest(service_id=key))
    if outcome == "ok" and not stale:
        svc = resp.service
        value = svc.spec.annotations.labels.get("v")
        seen[key] = (value, svc.meta.version, svc.id)
        _record(camp, idx, key, "read", value, t0, "ok")
    else:
        seen.pop(key, None)


async def _svc_cas(camp: Campaign, stub, idx: int, key: str, seen: dict) -> None:
    expected, version, sid = seen.pop(key)
    new = camp.next_value(idx)
    spec = _svc_spec(key, new)
    t0 = time.monotonic()
    _, outcome, _, _ = await _call(stub.UpdateService, control_pb2.UpdateServiceRequest(
        service_id=sid, service_version=version, spec=spec))
    _record(camp, idx, key, "cas", (expected, new), t0, outcome)


async def _sec_read(camp: Campaign, stub, idx: int, key: str) -> None:
    t0 = time.monotonic()
    resp, outcome, stale, err = await _call(stub.GetSecret, control_pb2.GetSecretRequest(secret_id=key))
    if outcome == "ok" and not stale:
        _record(camp, idx, key, "read", resp.secret.spec.annotations.labels.get("v"), t0, "ok")
    elif err is not None and err.code() == grpc.StatusCode.NOT_FOUND and not _stale(err.trailing_metadata()):
        _record(camp, idx, key, "read", None, t0, "ok")  # absent


async def _sec_create(camp: Campaign, stub, idx: int, key: str) -> None:
    value = camp.next_value(idx)
    spec = specs_pb2.SecretSpec(annotations=types_pb2.Annotations(name=key, labels={"v": value}), data=b"x")
    t0 = time.monotonic()
    _, outcome, _, _ = await _call(stub.CreateSecret, control_pb2.CreateSecretRequest(spec=spec))
    _record(camp, idx, key, "create", value, t0, outcome)


async def _sec_delete(camp: Campaign, stub, idx: int, key: str) -> None:
    t0 = time.monotonic()
    _, outcome, _, _ = await _call(stub.RemoveSecret, control_pb2.RemoveSecretRequest(secret_id=key))
    _record(camp, idx, key, "delete", None, t0, outcome)


def _svc_spec(name: str, value: str) -> specs_pb2.ServiceSpec:
    spec = specs_pb2.ServiceSpec(annotations=types_pb2.Annotations(name=name, labels={"v": value}))
    spec.task.container.image = "busybox:latest"
    spec.replicated.replicas = 0
    return spec


async def setup_registers(camp: Campaign, keys: int) -> None:
    """Create the service registers with their initial value (recorded as ops of client -1)."""
    host = camp.managers()[0]
    async with grpc.aio.insecure_channel(f"unix:{host.socket}") as ch:
        stub = control_pb2_grpc.ControlStub(ch)
        for k in range(keys):
            key = f"svc-{k}"
            value = f"init-{k}"
            t0 = time.monotonic()
            await stub.CreateService(control_pb2.CreateServiceRequest(spec=_svc_spec(key, value)), timeout=30)
            _record(camp, -1, key, "create", value, t0, "ok")


# ---- faults ----------------------------------------------------------------------------------------
def _signal(pids: list[int], sig: int) -> None:
    for pid in pids:
        if pid:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)


def etcd_leader(camp: Campaign) -> Host | None:
    """The manager whose member is etcd's leader, as a running manager sees it."""
    hosts = camp.managers()
    for h in hosts:
        if not _alive(h.swarmd_pid):
            continue
        try:
            with camp.lab.control(h) as c:
                info = c.Info(control_pb2.InfoRequest(), timeout=2)
        except Exception:
            continue
        leader = next((m for m in info.members if m.leader), None)
        if leader is None:
            continue
        for x in hosts:
            if leader.addr.startswith(x.addr + ":"):
                return x
    return None


def _nft(h: Host, script: str) -> None:
    subprocess.run(["nsenter", f"--net={h.netns}", "nft", "-f", "-"], input=script, text=True, check=True,
                   capture_output=True)


def cut(side_a: list[Host], side_b: list[Host]) -> None:
    """Drop all traffic between the two sides (nft in each host's namespace)."""
    for mine, theirs in ((side_a, side_b), (side_b, side_a)):
        addrs = ", ".join(h.addr for h in theirs)
        for h in mine:
            _nft(h, f"table ip {NFT_TABLE} {{\n"
                    f" chain in {{ type filter hook input priority -10; ip saddr {{ {addrs} }} drop; }}\n"
                    f" chain out {{ type filter hook output priority -10; ip daddr {{ {addrs} }} drop; }}\n}}\n")


def heal(hosts: list[Host]) -> None:
    for h in hosts:
        subprocess.run(["nsenter", f"--net={h.netns}", "nft", "delete", "table", "ip", NFT_TABLE],
                       capture_output=True)


async def inject(camp: Campaign, kind: str) -> str:
    """Inject one fault, hold it, heal it; returns a description."""
    loop = asyncio.get_running_loop()
    hosts = camp.managers()
    hold = camp.rng.uniform(1.0, 4.0)
    if kind in ("kill-leader", "isolate-leader"):
        target = etcd_leader(camp) or camp.rng.choice(hosts)
    else:
        target = camp.rng.choice(hosts)
    if kind in ("kill-leader", "kill-random"):
        _signal([target.swarmd_pid, etcd_pid(target)], signal.SIGKILL)
        await asyncio.sleep(hold)
        await loop.run_in_executor(None, camp.lab.kill, target.name)  # forget the pid
        await loop.run_in_executor(None, camp.lab.start, target.name)
        return f"SIGKILL {target.name} ({target.addr}) for {hold:.1f} s"
    if kind in ("pause", "pause-swarmd"):
        pids = [target.swarmd_pid] + ([etcd_pid(target)] if kind == "pause" else [])
        _signal(pids, signal.SIGSTOP)
        await asyncio.sleep(hold)
        _signal(pids, signal.SIGCONT)
        return f"SIGSTOP {'swarmd+etcd' if kind == 'pause' else 'swarmd'} of {target.name} for {hold:.1f} s"
    if kind == "restart":
        await loop.run_in_executor(None, _restart, camp, target)
        return f"restart of {target.name}"
    if kind == "isolate-leader":
        side_a, side_b = [target], [h for h in hosts if h.name != target.name]
    elif kind == "split":
        minority = camp.rng.sample(hosts, (len(hosts) - 1) // 2)
        side_a, side_b = minority, [h for h in hosts if h.name not in {m.name for m in minority}]
    elif kind == "bridge":
        middle = camp.rng.choice(hosts)
        rest = [h for h in hosts if h.name != middle.name]
        camp.rng.shuffle(rest)
        side_a, side_b = rest[: len(rest) // 2], rest[len(rest) // 2:]
    else:
        raise ValueError(kind)
    cut(side_a, side_b)
    try:
        await asyncio.sleep(hold)
    finally:
        heal(hosts)
    return (f"{kind}: {'+'.join(h.name for h in side_a)} | {'+'.join(h.name for h in side_b)} "
            f"for {hold:.1f} s")


def _restart(camp: Campaign, h: Host) -> None:
    _signal([h.swarmd_pid], signal.SIGTERM)
    deadline = time.monotonic() + 20
    while _alive(h.swarmd_pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    camp.lab.kill(h.name)
    camp.lab.start(h.name)


async def nemesis(camp: Campaign, n_faults: int, kinds: tuple[str, ...]) -> None:
    t_start = time.monotonic()
    for _ in range(n_faults):
        await asyncio.sleep(camp.rng.uniform(0.5, 2.0))
        kind = camp.rng.choice(kinds)
        what = await inject(camp, kind)
        camp.faults[kind] += 1
        camp.fault_log.append((time.monotonic() - t_start, kind, what))
        print(f"  fault {sum(camp.faults.values()):3d} at {time.monotonic() - t_start:6.1f} s: {what}", flush=True)
    await asyncio.sleep(2.0)  # quiet time: the clients see the healed cluster


# ---- the run ---------------------------------------------------------------------------------------
async def campaign(lab: Lab, managers: int, n_faults: int, clients: int, keys: int, seed: int) -> dict:
    st = lab.state()
    camp = Campaign(lab, st, random.Random(seed))
    await setup_registers(camp, keys)
    kinds = FAULT_KINDS + (("bridge",) if managers >= 5 else ())
    hosts = camp.managers()
    t0 = time.monotonic()
    workers = [asyncio.create_task(client(camp, i, hosts[i % len(hosts)], keys)) for i in range(clients)]
    try:
        await nemesis(camp, n_faults, kinds)
    finally:
        heal(hosts)
        for h in camp.managers():  # nothing left paused
            _signal([h.swarmd_pid, etcd_pid(h)], signal.SIGCONT)
        camp.stop.set()
        await asyncio.gather(*workers, return_exceptions=True)
    elapsed = time.monotonic() - t0
    result = check(camp.history)
    ops = Counter(o.outcome for o in camp.history)
    lat = sorted((o.complete - o.invoke) * 1000 for o in camp.history
                 if o.outcome == "ok" and o.kind != "read" and o.client >= 0 and o.complete is not None)
    return {
        "camp": camp,
        "result": result,
        "managers": managers,
        "seconds": round(elapsed, 1),
        "ops": len(camp.history),
        "ok": ops["ok"], "fail": ops["fail"], "unknown": ops["unknown"],
        "faults": sum(camp.faults.values()),
        "faults_by_kind": dict(camp.faults),
        "violations": len(result.failures) + len(result.lost_writes) + len(result.stale_reads),
        "linearizable": result.ok,
        "lost_writes": len(result.lost_writes),
        "stale_reads": len(result.stale_reads),
        "write_p50_ms": round(statistics.median(lat), 1) if lat else None,
        "write_p99_ms": round(lat[min(len(lat) - 1, int(len(lat) * 0.99))], 1) if lat else None,
    }


def run(managers: int, n_faults: int, clients: int, keys: int, seed: int, history: str | None = None,
        lab_name: str = "faults") -> dict:
    lab = Lab(lab_name, progress=lambda m: print(f"  {m}", flush=True))
    try:
        lab.up(managers=managers, workers=0, timeout=120)
        out = asyncio.run(campaign(lab, managers, n_faults, clients, keys, seed))
    except BaseException:
        keep = Path(tempfile.mkdtemp(prefix=f"shoal-{lab_name}-logs-"))
        with contextlib.suppress(Exception):
            for h in lab.state().hosts:
                for log in (Path(h.state_dir, "swarmd.log"), Path(h.state_dir, "etcd", "etcd.log")):
                    if log.exists():
                        shutil.copy(log, keep / f"{h.name}-{log.name}")
        print(f"  the campaign failed; the hosts' logs are in {keep}", flush=True)
        raise
    finally:
        with contextlib.suppress(Exception):
            heal([h for h in lab.state().hosts])
        lab.down()
    if history:
        to_jsonl(out["camp"].history, history)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--managers", type=int, action="append", help="managers per run (repeatable; default 3 and 5)")
    ap.add_argument("--faults", type=int, default=50, help="faults per run (default 50)")
    ap.add_argument("--clients", type=int, default=6)
    ap.add_argument("--keys", type=int, default=4, help="registers of each family")
    ap.add_argument("--seed", type=int, default=int(time.time()))
    ap.add_argument("--history", help="write each run's history (JSON lines) to FILE.N")
    a = ap.parse_args()
    runs = []
    for i, m in enumerate(a.managers or [3, 5]):
        print(f"== {m} managers, {a.faults} faults, {a.clients} clients, seed {a.seed + i}", flush=True)
        out = run(m, a.faults, a.clients, a.keys, a.seed + i, f"{a.history}.{i}" if a.history else None)
        print(report(out["result"]))
        runs.append(out)
    print(f"\n{'managers':>8} {'ops':>6} {'ok':>6} {'fail':>5} {'unknown':>7} {'faults':>6} {'violations':>10} "
          f"{'w p50 ms':>8} {'w p99 ms':>8}  faults by kind")
    for r in runs:
        kinds = ", ".join(f"{k} {v}" for k, v in sorted(r["faults_by_kind"].items()))
        print(f"{r['managers']:>8} {r['ops']:>6} {r['ok']:>6} {r['fail']:>5} {r['unknown']:>7} {r['faults']:>6} "
              f"{r['violations']:>10} {r['write_p50_ms']!s:>8} {r['write_p99_ms']!s:>8}  {kinds}")
    summary = {"bench": "faults", "machine": f"{platform.node()} {os.cpu_count()} cores", "seed": a.seed,
               "runs": [{k: v for k, v in r.items() if k not in ("camp", "result")} for r in runs]}
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
