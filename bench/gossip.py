"""NetworkDB benchmark: table propagation and failure detection among 10 nodes on loopback.

    .venv/bin/python bench/gossip.py [--nodes 10] [--entries 100] [--detect-runs 3] [--no-key]

Every node seals its packets with one gossip key (as in a cluster, where the managers always hand
one out); ``--no-key`` runs them in plaintext instead.

* sealing: CPU time of ``Keyring.seal`` and ``Keyring.open`` per packet (64, 512 and 1400-byte
  payloads, sender and receiver keyrings apart) and the bytes the sealed format adds;

* propagation, separate processes: node 0 lives in this process, nodes 1..N-1 are child
  processes (``python tests/gossipnode.py --events``) that print each table event with its
  wall-clock time; time from ``put`` on node 0 until the last other node has the entry, over
  ``--entries`` entries put every 20 ms ("spaced") and all at once ("burst");
* propagation, one process: the same with all N nodes on one event loop (spaced);
* failure detection: a child node is SIGKILLed; time until the first node suspects it, until every
  other node has declared it dead, and until its entry is purged everywhere; with Shoal's defaults
  (probe 0.5 s / timeout 0.25 s, suspicion 3 x 0.5 s, up to 3x that until 2 confirmations) and with
  memberlist's LAN defaults (1 s / 0.5 s, suspicion 4 x 1 s, up to 6x) in the same run.

Prints a table and one JSON line; never fails on a figure (target: propagation p99 <= 0.5 s).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

from shoal.netdriver.keyring import Keyring
from shoal.netdriver.networkdb import GossipConfig, NetworkDB

PORT = 30000 + os.getpid() % 20000
TABLE = "endpoint_table"
NET = "benchnet"
GOSSIPNODE = str(Path(__file__).resolve().parents[1] / "tests" / "gossipnode.py")  # one node as a process
KEY = bytes(range(32))
KEYS: list[bytes] = [KEY]  # main() empties it for --no-key


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    if not xs:
        return float("nan")
    k = min(len(xs) - 1, max(0, round(p / 100 * (len(xs) - 1))))
    return xs[k]


class Child:
    """One gossip node in a child process; its JSON event lines are collected as they come."""

    def __init__(self, node_id: str, addr: str, seed: str, lan: bool) -> None:
        self.node_id, self.addr, self.seed, self.lan = node_id, addr, seed, lan
        self.events: list[dict] = []
        self.proc: asyncio.subprocess.Process | None = None
        self.ready = asyncio.get_running_loop().create_future()
        self.reader: asyncio.Task | None = None

    async def start(self) -> None:
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, GOSSIPNODE, "--node-id", self.node_id, "--bind", self.addr,
            "--port", str(PORT), "--join", self.seed, "--network", NET, "--events",
            *[a for k in KEYS for a in ("--key-hex", k.hex())],
            *(["--lan-defaults"] if self.lan else []), "--put", f"{TABLE}/{NET}/own-{self.node_id}=x",
            "--log-level", "WARNING", stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        self.reader = asyncio.get_running_loop().create_task(self._read())

    async def _read(self) -> None:
        while line := await self.proc.stdout.readline():
            line = line.decode().strip()
            if line == "ready":
                self.ready.set_result(None)
            elif line.startswith("{"):
                self.events.append(json.loads(line))

    def kill(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            os.kill(self.proc.pid, signal.SIGKILL)

    async def close(self) -> None:
        if self.proc is None:
            return
        if self.proc.returncode is None:
            self.proc.terminate()
            try:
                await asyncio.wait_for(self.proc.wait(), 5)
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()
        if self.reader is not None:
            self.reader.cancel()


async def wait_until(pred, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.01)
    return True


async def proc_cluster(n: int, block: int, lan: bool) -> tuple[NetworkDB, list[Child]]:
    cfg = GossipConfig.memberlist_lan() if lan else GossipConfig()
    addr0 = f"127.99.{block}.1"
    g0 = NetworkDB("node0", addr0, addr0, port=PORT, keys=KEYS, config=cfg)
    children = [Child(f"node{i}", f"127.99.{block}.{i + 1}", f"{addr0}:{PORT}", lan) for i in range(1, n)]
    try:
        await g0.start()
        await g0.join_network(NET)
        for c in children:
            await c.start()
        await asyncio.wait_for(asyncio.gather(*(c.ready for c in children)), 60)
        # wait until everyone knows everyone and their network (own-* entries of all nodes on node 0)
        ok = await wait_until(
            lambda: len(g0.entries(TABLE, NET)) == n - 1 and len(g0.network_nodes(NET)) == n - 1, 60)
        if not ok:
            raise RuntimeError("cluster did not converge")
        await asyncio.sleep(2 * cfg.probe_interval)
    except BaseException:
        for c in children:
            await c.close()
        await g0.stop()
        raise
    return g0, children


async def propagation_procs(n: int, entries: int, block: int) -> dict:
    g0, children = await proc_cluster(n, block, lan=False)
    out = {}
    try:
        for mode in ("spaced", "burst"):
            put_at: dict[str, float] = {}
            for i in range(entries):
                key = f"{mode}-{i}"
                put_at[key] = time.time()
                g0.put(TABLE, NET, key, b"v" * 100)
                if mode == "spaced":
                    await asyncio.sleep(0.02)

            def have_all(mode: str = mode) -> bool:
                return all(sum(1 for e in c.events if e.get("kind") == "create" and e["key"].startswith(mode))
                           == entries for c in children)

            await wait_until(have_all, 60)
            lat = []
            for key, t0 in put_at.items():
                ts = [next((e["t"] for e in c.events if e.get("key") == key and e.get("kind") == "create"), None)
                      for c in children]
                lat.append(float("inf") if None in ts else max(ts) - t0)
            out[mode] = lat
    finally:
        for c in children:
            await c.close()
        await g0.stop()
    return out


async def propagation_inproc(n: int, entries: int, block: int) -> list[float]:
    nodes = [NetworkDB(f"node{i}", f"127.99.{block}.{i + 1}", f"127.99.{block}.{i + 1}", port=PORT, keys=KEYS)
             for i in range(n)]
    seen: dict[str, list[float]] = {}
    try:
        for g in nodes:
            await g.start()
        for g in nodes[1:]:
            await g.join([f"127.99.{block}.1:{PORT}"])
        for g in nodes:
            await g.join_network(NET)
        await wait_until(lambda: all(len(g.network_nodes(NET)) == n - 1 for g in nodes), 60)
        loop = asyncio.get_running_loop()
        for g in nodes[1:]:
            g.add_listener(lambda ev: ev.kind == "create" and seen.setdefault(ev.key, []).append(loop.time()))
        put_at = {}
        for i in range(entries):
            key = f"k{i}"
            put_at[key] = loop.time()
            nodes[i % n].put(TABLE, NET, key, b"v" * 100)
            await asyncio.sleep(0.02)
        await wait_until(lambda: all(len(seen.get(k, [])) >= n - 1 for k in put_at), 60)
        # the origin's own listener is not attached for node0; others' puts count their own create too
        lat = []
        for i, (key, t0) in enumerate(put_at.items()):
            ts = seen.get(key, [])
            need = n - 1 if i % n == 0 else n - 2  # nodes other than the origin that carry a listener
            others = sorted(ts)[-need:] if len(ts) >= need else []
            lat.append(max(others) - t0 if others else float("inf"))
        return lat
    finally:
        for g in nodes:
            await g.stop()


async def detection(n: int, block: int, lan: bool) -> dict:
    g0, children = await proc_cluster(n, block, lan)
    victim = children[-1]
    gone = victim.node_id
    try:
        t_kill = time.time()
        state_t: dict[str, float] = {}
        g0.add_member_listener(lambda m: m.node_id == gone and state_t.setdefault(m.state_name, time.time()))
        victim.kill()
        observers = children[:-1]

        def states(state: str) -> list[float | None]:
            ts = [next((e["t"] for e in c.events if e.get("member") == gone and e.get("state") == state
                        and e["t"] >= t_kill), None) for c in observers]
            return [*ts, state_t.get(state)]

        await wait_until(lambda: None not in states("dead"), 60)
        await wait_until(lambda: f"own-{gone}" not in g0.entries(TABLE, NET) and all(
            any(e.get("kind") == "delete" and e.get("key") == f"own-{gone}" for e in c.events) for c in observers), 30)
        purged = [next((e["t"] for e in c.events if e.get("kind") == "delete" and e.get("key") == f"own-{gone}"),
                       None) for c in observers]
        suspect = [t for t in states("suspect") if t is not None]
        dead = states("dead")
        return {
            "first_suspect_s": round(min(suspect) - t_kill, 3) if suspect else None,
            "first_dead_s": round(min(t for t in dead if t) - t_kill, 3) if any(dead) else None,
            "all_dead_s": round(max(dead) - t_kill, 3) if None not in dead else None,
            "purged_everywhere_s": round(max(purged) - t_kill, 3) if None not in purged else None,
        }
    finally:
        for c in children:
            await c.close()
        await g0.stop()


def sealing(rounds: int = 20000) -> dict:
    """Microseconds per seal and per open of one packet, and the bytes sealing adds."""
    tx, rx = Keyring([KEY]), Keyring([KEY])
    out: dict = {}
    for size in (64, 512, 1400):
        data = os.urandom(size)
        blobs = []
        t0 = time.perf_counter()
        for _ in range(rounds):
            blobs.append(tx.seal(data, b"udp"))
        t1 = time.perf_counter()
        for b in blobs:
            rx.open(b, b"udp")
        t2 = time.perf_counter()
        out[f"seal_{size}B_us"] = round((t1 - t0) / rounds * 1e6, 2)
        out[f"open_{size}B_us"] = round((t2 - t1) / rounds * 1e6, 2)
        out["overhead_bytes"] = len(blobs[0]) - size
    return out


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nodes", type=int, default=10)
    ap.add_argument("--entries", type=int, default=100)
    ap.add_argument("--detect-runs", type=int, default=3)
    ap.add_argument("--no-key", action="store_true", help="plaintext gossip (no key)")
    args = ap.parse_args()
    if args.no_key:
        KEYS.clear()
    n = args.nodes
    seal = sealing()
    block = 1 + os.getpid() % 200

    procs = await propagation_procs(n, args.entries, block)
    inproc = await propagation_inproc(n, args.entries, block + 1)
    det: dict[str, list[dict]] = {"shoal": [], "lan": []}
    for r in range(args.detect_runs):
        det["shoal"].append(await detection(n, block + 2 + 2 * r, lan=False))
        det["lan"].append(await detection(n, block + 3 + 2 * r, lan=True))

    def med(runs: list[dict], k: str) -> float | None:
        xs = [x[k] for x in runs if x.get(k) is not None]
        return round(statistics.median(xs), 3) if xs else None

    result = {
        "bench": "gossip",
        "nodes": n,
        "entries": args.entries,
        "key": bool(KEYS),
        **seal,
        "propagation_procs_spaced_p50_s": round(pct(procs["spaced"], 50), 4),
        "propagation_procs_spaced_p99_s": round(pct(procs["spaced"], 99), 4),
        "propagation_procs_burst_p50_s": round(pct(procs["burst"], 50), 4),
        "propagation_procs_burst_p99_s": round(pct(procs["burst"], 99), 4),
        "propagation_procs_max_s": round(max(procs["spaced"] + procs["burst"]), 4),
        "propagation_inproc_spaced_p50_s": round(pct(inproc, 50), 4),
        "propagation_inproc_spaced_p99_s": round(pct(inproc, 99), 4),
        "target_p99_s": 0.5,
    }
    for cfg in ("shoal", "lan"):
        for k in ("first_suspect_s", "first_dead_s", "all_dead_s", "purged_everywhere_s"):
            result[f"detect_{cfg}_{k}"] = med(det[cfg], k)
    if result["detect_shoal_all_dead_s"] and result["detect_lan_all_dead_s"]:
        result["detect_all_dead_ratio_shoal_vs_lan"] = round(
            result["detect_shoal_all_dead_s"] / result["detect_lan_all_dead_s"], 3)
    result["detect_runs"] = det

    print(f"{'figure':48} {'value':>10}")
    for k, v in result.items():
        if k not in ("bench", "detect_runs"):
            print(f"{k:48} {v!s:>10}")
    print(json.dumps(result))


if __name__ == "__main__":
    asyncio.run(main())
