"""Certificates on a loaded lab: renewals with a short `--cert-expiry`, then a root rotation, while a
published service answers clients.

    .venv/bin/python bench/certs.py [--expiry 2m] [--minutes 10] [--managers 3] [--workers 2]

Brings up its own lab (named `certs`), deploys the demo stack (`web`: 3 replicas published on 8080
through the routing mesh; `client`: a request to the service's VIP every second, over the overlay)
and, from the bench, requests http://<a manager>:8080/ every second from another lab host's network
namespace (the published port). Then sets `--cert-expiry`, runs for `--minutes`, rotates the root CA
(`swarmctl cluster ca --rotate`, timed), runs one more minute, and counts:

- renewals per node (distinct certificates in its `tls_info` over the run) and the time of each
  renewal's CA call (swarmd's log: `certificate renewed in N ms`);
- agent sessions opened again (`shoal.agent: session opened` lines after the first, per node);
- tasks restarted (tasks of the stack that left RUNNING, or RUNNING tasks not there at the start);
- failed requests, of the overlay client and of the published-port client.

Prints a table and one JSON line; never fails on a figure. Takes the lab down at the end.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
from report import report

from shoal.lab.lab import Lab
from shoal.proto import control_pb2, control_pb2_grpc, types_pb2

ROOT = Path(__file__).resolve().parents[1]
SWARMCTL = [sys.executable, "-m", "shoal.cli.swarmctl"]
ANSWER = re.compile(r"^(\d\d:\d\d:\d\d) (.*)$")
RENEWED = re.compile(r"certificate renewed in (\d+) ms")
OK_TEXT = "says hello from Shoal"


def ctl(sock: str, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "SWARM_SOCKET": sock}
    return subprocess.run([*SWARMCTL, *args], capture_output=True, text=True, timeout=timeout, env=env)


def stub(sock: str) -> control_pb2_grpc.ControlStub:
    return control_pb2_grpc.ControlStub(grpc.insecure_channel(f"unix://{sock}"))


class Prober(threading.Thread):
    """GET http://ADDR:8080/ every second from a lab host's network namespace (busybox wget)."""

    def __init__(self, netns: str, addr: str) -> None:
        super().__init__(daemon=True)
        self.netns, self.addr = netns, addr
        self.ok = self.failed = 0
        self.failures: list[str] = []
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            t0 = time.monotonic()
            p = subprocess.run(["nsenter", f"--net={self.netns}", "timeout", "3", "busybox", "wget", "-q", "-O", "-",
                                f"http://{self.addr}:8080/"], capture_output=True, text=True)
            if p.returncode == 0 and OK_TEXT in p.stdout:
                self.ok += 1
            else:
                self.failed += 1
                self.failures.append(f"{time.strftime('%T')} rc={p.returncode} {p.stderr.strip()[:100]}")
            self.stop.wait(max(0.0, 1.0 - (time.monotonic() - t0)))


def stack_tasks(c: control_pb2_grpc.ControlStub) -> list:
    return [t for t in c.ListTasks(control_pb2.ListTasksRequest(), timeout=10).tasks
            if t.service_annotations.name.startswith("demo_")]


def client_answers(sock: str) -> list[str]:
    out = ctl(sock, "service", "logs", "demo_client", "--raw").stdout
    return [m.group(2) for ln in out.splitlines() if (m := ANSWER.match(ln.strip()))]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--expiry", default="2m")
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--managers", type=int, default=3)
    ap.add_argument("--workers", type=int, default=2)
    a = ap.parse_args()
    lab = Lab("certs", progress=lambda m: print(f"  {m}", file=sys.stderr))
    res: dict[str, object] = {}
    try:
        st = lab.up(a.managers, a.workers)
        sock = st.hosts[0].socket
        c = stub(sock)
        r = ctl(sock, "stack", "deploy", "-f", str(ROOT / "examples" / "demo-stack.yml"), "demo")
        assert r.returncode == 0, r.stderr
        deadline = time.monotonic() + 120
        while len(client_answers(sock)) < 3 and time.monotonic() < deadline:
            time.sleep(1)
        tasks0 = {t.id for t in stack_tasks(c) if t.status.state == types_pb2.RUNNING}
        sessions0 = {h.name: (Path(h.state_dir) / "swarmd.log").read_text().count("shoal.agent: session opened")
                     for h in st.hosts}
        answers0 = len(client_answers(sock))
        prober = Prober(st.hosts[-1].netns, st.hosts[0].addr)
        prober.start()
        r = ctl(sock, "cluster", "update", "--cert-expiry", a.expiry)
        assert r.returncode == 0, r.stderr
        serials: dict[str, set[str]] = {}
        t_end = time.monotonic() + a.minutes * 60
        print(f"  running {a.minutes:g} min with --cert-expiry {a.expiry}", file=sys.stderr)
        while time.monotonic() < t_end:
            for n in c.ListNodes(control_pb2.ListNodesRequest(), timeout=10).nodes:
                serials.setdefault(n.description.hostname, set()).add(n.tls_info.cert_serial)
            time.sleep(2)
        t0 = time.monotonic()
        r = ctl(sock, "cluster", "ca", "--rotate", timeout=600)
        res["rotation_s"] = round(time.monotonic() - t0, 2) if r.returncode == 0 else None
        print(f"  rotation: exit {r.returncode}, {res['rotation_s']} s\n{r.stderr}", file=sys.stderr)
        t_end = time.monotonic() + 60
        while time.monotonic() < t_end:
            for n in c.ListNodes(control_pb2.ListNodesRequest(), timeout=10).nodes:
                serials.setdefault(n.description.hostname, set()).add(n.tls_info.cert_serial)
            time.sleep(2)
        prober.stop.set()
        prober.join()

        renew_ms: list[int] = []
        reopened = {}
        for h in st.hosts:
            text = (Path(h.state_dir) / "swarmd.log").read_text()
            renew_ms += [int(m) for m in RENEWED.findall(text)]
            reopened[h.name] = text.count("shoal.agent: session opened") - sessions0[h.name]
        tasks1 = stack_tasks(c)
        running1 = {t.id for t in tasks1 if t.status.state == types_pb2.RUNNING}
        restarted = len(tasks0 - running1) + len(running1 - tasks0)
        answers = client_answers(sock)[answers0:]
        failed_overlay = [x for x in answers if OK_TEXT not in x]
        res.update({
            "expiry": a.expiry, "minutes": a.minutes, "nodes": len(st.hosts),
            # the first serial is the 90-day certificate from before --cert-expiry
            "renewals_min": min(len(s) - 1 for s in serials.values()),
            "renewals_max": max(len(s) - 1 for s in serials.values()),
            "renew_ms_p50": statistics.median(renew_ms) if renew_ms else None,
            "renew_ms_max": max(renew_ms) if renew_ms else None,
            "renew_calls": len(renew_ms),
            "sessions_reopened": sum(reopened.values()),
            "tasks_restarted": restarted,
            "overlay_requests": len(answers), "overlay_failed": len(failed_overlay),
            "published_requests": prober.ok + prober.failed, "published_failed": prober.failed,
        })
        if failed_overlay or prober.failures:
            print("  failures:", failed_overlay[:5], prober.failures[:5], file=sys.stderr)
    finally:
        lab.down()
    report("certs", f"Certificates on a loaded {a.managers}+{a.workers} namespace lab", res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
