"""`swarmctl stack …` as real processes against a real cluster: a one-machine lab (shoal.lab) of one manager
and two workers in network namespaces, each running swarmd (Raft store, agent, runc containers, VXLAN
overlays), with the lab's registry serving busybox. Needs root."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers.swarmctl import SWARMCTL

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parent.parent.parent
PREFIX = f"st{os.getpid() % 10000}"
NAMESPACE = "com.docker.stack.namespace"
LIVE = ("ASSIGNED", "ACCEPTED", "PREPARING", "READY", "STARTING", "RUNNING")

STACK = """\
services:
  web:
    image: busybox:latest
    command: ["httpd", "-f", "-p", "8080"]
    stop_grace_period: 1s
    networks:
      front:
        aliases: [www]
      back:
    secrets:
      - source: pw
        target: db_password
    configs:
      - source: conf
        target: /etc/app.conf
    healthcheck:
      test: ["CMD", "test", "-f", "/run/secrets/db_password", "-a", "-f", "/etc/app.conf"]
      interval: 1s
      timeout: 1s
      retries: 2
    deploy:
      replicas: 2
      placement:
        constraints: [node.role == manager]
  worker:
    image: busybox:latest
    command: ["sleep", "600"]
    init: true
    stop_grace_period: 1s
    networks: [back]
    deploy:
      replicas: 2
      placement:
        constraints: [node.role == worker]
      # A task's first network attachment on a node sometimes dies ("child process is dead, status: -6":
      # gRPC aborts in a forked child); "continue" lets the update go on with a replacement task.
      update_config:
        parallelism: 1
        monitor: 1s
        failure_action: continue
  extra:
    image: busybox:latest
    command: ["sleep", "600"]
    init: true
    stop_grace_period: 1s
networks:
  front:
  back:
    ipam:
      config:
        - subnet: 198.19.200.0/24
secrets:
  pw:
    file: ./pw.txt
configs:
  conf:
    file: ./app.conf
"""


class Cluster:
    def __init__(self, sock: str) -> None:
        self.sock = sock

    def run(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        return subprocess.run(SWARMCTL + ["--socket", self.sock] + list(args), capture_output=True, text=True,
                              timeout=timeout)

    def ok(self, *args: str) -> str:
        r = self.run(*args)
        assert r.returncode == 0, f"swarmctl {' '.join(args)} failed ({r.returncode}): {r.stderr}\n{r.stdout}"
        return r.stdout

    def js(self, *args: str) -> list[dict]:
        return json.loads(self.ok(*args, "--format", "json"))

    def of_stack(self, stack: str) -> dict[str, list[str]]:
        return {kind: sorted(o["spec"]["annotations"]["name"] for o in self.js(kind, "ls")
                             if o["spec"]["annotations"].get("labels", {}).get(NAMESPACE) == stack)
                for kind in ("service", "network", "secret", "config")}


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    if os.geteuid() != 0:
        pytest.fail("lab tests need root (or deselect with -m 'not integration')")
    from shoal.lab.lab import Lab

    lab = Lab(PREFIX)
    try:
        st = lab.up(managers=1, workers=2)
        yield Cluster(st.hosts[0].socket)
    finally:
        lab.down()


def _running(c: Cluster, stack: str) -> dict[str, list[str]]:
    """Service name → sorted hostnames of its running tasks."""
    hosts = {n["id"]: n["description"]["hostname"] for n in c.js("node", "ls")}
    out: dict[str, list[str]] = {}
    for t in c.js("stack", "ps", stack):
        if t["status"].get("state") == "RUNNING" and t.get("desired_state") == "RUNNING":
            out.setdefault(t["service_annotations"]["name"], []).append(hosts[t["node_id"]])
    return {k: sorted(v) for k, v in out.items()}


def test_stack_deploys_converges_updates_prunes_and_is_removed(cluster: Cluster, tmp_path: Path) -> None:
    c, stack = cluster, f"{PREFIX}s"
    (tmp_path / "pw.txt").write_text("s3cr3t")
    (tmp_path / "app.conf").write_text("listen 8080\n")
    f = tmp_path / "stack.yml"
    f.write_text(STACK)
    try:
        out = c.ok("stack", "deploy", "-c", str(f), stack)
        for name in ("extra", "web", "worker"):
            assert f"verify: Service {stack}_{name} converged" in out, out
        assert c.of_stack(stack) == {"service": [f"{stack}_extra", f"{stack}_web", f"{stack}_worker"],
                                     "network": [f"{stack}_back", f"{stack}_default", f"{stack}_front"],
                                     "secret": [f"{stack}_pw"], "config": [f"{stack}_conf"]}
        run = _running(c, stack)
        assert run[f"{stack}_web"] == ["h1", "h1"]  # the manager
        assert run[f"{stack}_worker"] == ["h2", "h3"]  # spread over the workers
        assert len(run[f"{stack}_extra"]) == 1
        assert c.ok("stack", "services", stack).count("1/1") == 1
        assert f"{stack}   3" in c.ok("stack", "ls").splitlines()

        out = c.ok("stack", "deploy", "-c", str(f), stack)
        assert "Updating" not in out and "Creating" not in out and out.count("is up to date") == 4, out

        text = STACK.replace('["sleep", "600"]\n    init: true\n    stop_grace_period: 1s\n    networks: [back]',
                             '["sleep", "601"]\n    init: true\n    stop_grace_period: 1s\n    networks: [back]')
        f.write_text(text[:text.index("  extra:")] + text[text.index("networks:\n  front:"):])
        out = c.ok("stack", "deploy", "--prune", "-c", str(f), stack)
        lines = out.splitlines()
        assert lines[0] == f"Removing service {stack}_extra"
        assert [ln.split(" (")[0] for ln in lines if ln.startswith(("Updating", "Creating"))] == [
            f"Updating service {stack}_worker"]
        assert f"Service {stack}_web is up to date" in out
        assert f"verify: Service {stack}_worker converged" in out, out
        [worker] = [s for s in c.js("stack", "services", stack) if s["spec"]["annotations"]["name"].endswith("worker")]
        assert worker["spec"]["task"]["container"]["args"] == ["sleep", "601"]
        run = _running(c, stack)
        assert sorted(run) == [f"{stack}_web", f"{stack}_worker"] and run[f"{stack}_worker"] == ["h2", "h3"]

        ids = {s["id"] for s in c.js("stack", "services", stack)}
        out = c.ok("stack", "rm", stack)
        assert f"Removing service {stack}_web" in out and f"Removing network {stack}_back" in out
        live = [t for t in c.js("task", "ls") if t.get("service_id") in ids and t["status"].get("state") in LIVE]
        assert live == []
        assert c.of_stack(stack) == {"service": [], "network": [], "secret": [], "config": []}
        assert stack not in c.ok("stack", "ls")
    finally:
        c.run("stack", "rm", stack)
