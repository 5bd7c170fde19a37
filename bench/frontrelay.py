"""The remote API front's relay (`shoal.manager.remoteapi.RemoteAPIFront`): round trips of small
messages through it, from K client connections to an echo listener behind its plain route, while the
interpreter that started it idles and while it computes (a manager's event loop busy with a large
scheduling pass holds its interpreter lock). The clients and the listener are a process of their
own, so only the front's latency differs between the two. Prints a table and one JSON line; never
fails a run.

    .venv/bin/python bench/frontrelay.py [--round-trips 4000] [--connections 40]

Each connection sends 4 bytes, waits for them to come back, then pauses 5 ms (a fleet's heartbeats
and pings are small messages spread in time).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from shoal.lab.registry import free_port
from shoal.manager import remoteapi

PEER = r'''
import socket, sys, threading, time
listener = socket.socket(socket.AF_UNIX)
listener.bind(sys.argv[1])
listener.listen(512)
def echo(conn):
    while data := conn.recv(65536):
        conn.sendall(data)
def accept():
    while True:
        conn, _ = listener.accept()
        threading.Thread(target=echo, args=(conn,), daemon=True).start()
threading.Thread(target=accept, daemon=True).start()
print("ready", flush=True)
sys.stdin.readline()
host, port, total, k = sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
lat = []
def client():
    c = socket.create_connection((host, port))
    c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    c.sendall(b"PRI * HTTP/2.0\r\n")  # not TLS: the plain route
    got = b""
    while len(got) < 16:
        got += c.recv(65536)
    for _ in range(total // k):
        t = time.monotonic()
        c.sendall(b"ping")
        got = b""
        while len(got) < 4:
            got += c.recv(65536)
        lat.append(time.monotonic() - t)
        time.sleep(0.005)
    c.close()
t0 = time.monotonic()
threads = [threading.Thread(target=client) for _ in range(k)]
for t in threads:
    t.start()
for t in threads:
    t.join()
print(time.monotonic() - t0, " ".join(f"{x:.6f}" for x in lat), flush=True)
'''


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(len(xs) * p / 100))] if xs else float("nan")


async def run(round_trips: int, connections: int) -> dict[str, float]:
    res: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as d:
        for busy in (False, True):
            plain = str(Path(d) / f"plain-{busy}")
            addr = f"127.0.0.1:{free_port('127.0.0.1')}"
            host, port = addr.rsplit(":", 1)
            front = remoteapi.RemoteAPIFront(addr, str(Path(d) / "mtls"), str(Path(d) / "join"), plain)
            await front.start()
            peer = subprocess.Popen([sys.executable, "-c", PEER, plain, host, port, str(round_trips), str(connections)],
                                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
            try:
                assert peer.stdin is not None and peer.stdout is not None
                assert peer.stdout.readline().strip() == "ready"
                peer.stdin.write("go\n")
                peer.stdin.flush()
                while busy and peer.poll() is None:  # this interpreter computes, holding its lock
                    sum(i * i for i in range(1000))
                took, *lat = (float(x) for x in (await asyncio.to_thread(peer.stdout.readline)).split())
            finally:
                peer.kill()
                peer.wait()
                await front.close()
            key = "busy" if busy else "idle"
            res[f"{key}_p50_ms"] = round(pct(lat, 50) * 1000, 2)
            res[f"{key}_p99_ms"] = round(pct(lat, 99) * 1000, 2)
            res[f"{key}_max_ms"] = round(max(lat) * 1000, 2)
            res[f"{key}_s"] = round(took, 2)
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--round-trips", type=int, default=4000)
    ap.add_argument("--connections", type=int, default=40)
    a = ap.parse_args()
    t0 = time.monotonic()
    res = asyncio.run(run(a.round_trips, a.connections))
    print(f"remote API front relay, {a.round_trips} round trips on {a.connections} connections")
    print(f"{'':32} {'p50':>8} {'p99':>8} {'max':>8} {'all in':>8}")
    for key, title in (("idle", "the manager's interpreter idle"), ("busy", "... computing")):
        print(f"{title:32} {res[key + '_p50_ms']:7.1f}ms {res[key + '_p99_ms']:7.1f}ms "
              f"{res[key + '_max_ms']:7.1f}ms {res[key + '_s']:7.2f}s")
    print(json.dumps({"bench": "frontrelay", "round_trips": a.round_trips, "connections": a.connections,
                      "took_s": round(time.monotonic() - t0, 1), "results": res}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
