"""Real `swarmctl` processes against a real single-manager `swarmd` (Raft store, mTLS remote API, its
own agent running runc containers) and a real registry on loopback. Needs root."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers.registry import local_registry
from helpers.swarmctl import SWARMCTL
from helpers.swarmd import Swarmd, remove_containers, unmount_under

from shoal.lab.registry import Registry

pytestmark = pytest.mark.integration
PREFIX = f"st{os.getpid() % 10000}"


class Manager(Swarmd):
    """One manager (and its agent) that runs containers; swarmctl may take minutes (image pulls)."""

    ctl_timeout = 180
    fold_case = True

    def __init__(self) -> None:
        self.base = Path(tempfile.mkdtemp(prefix=f"{PREFIX}c-", dir="/var/tmp"))
        super().__init__(self.base, "m1", hostname=f"{PREFIX}m1")

    def start(self) -> None:  # type: ignore[override]
        super().start()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.sock.exists():
                r = self.run("node", "ls", "--format", "json")
                if r.returncode == 0 and any(n.get("status", {}).get("state") == "READY"
                                             for n in json.loads(r.stdout)):
                    return
            time.sleep(0.2)
        raise AssertionError(f"swarmd did not come up: {self.log.read_text()[-3000:]}")

    run = Swarmd.ctl

    def ok(self, *args: str, **kw: Any) -> str:
        r = self.run(*args, **kw)
        if r.returncode != 0:
            tasks = self.run("task", "ls", "--no-trunc").stdout
            raise AssertionError(f"swarmctl {' '.join(args)} failed ({r.returncode}): {r.stderr}\n{r.stdout}\n"
                                 f"tasks:\n{tasks}")
        return r.stdout

    def cleanup(self) -> None:
        remove_containers(self.dir / "engine")
        unmount_under(self.base)
        shutil.rmtree(self.base, ignore_errors=True)


@pytest.fixture(scope="module")
def registry() -> Iterator[Registry]:
    if os.geteuid() != 0:
        pytest.fail("swarmd tests need root (or deselect with -m 'not integration')")
    with local_registry() as reg:
        yield reg


@pytest.fixture(scope="module")
def mgr(registry: Registry) -> Iterator[Manager]:
    m = Manager()
    try:
        m.start()
        yield m
    except BaseException:
        if m.log.exists():
            sys.stderr.write("---- swarmd log tail\n" + "\n".join(m.log.read_text().splitlines()[-40:]) + "\n")
        raise
    finally:
        m.stop()
        m.cleanup()


def test_control_and_validation_through_raft(mgr: Manager) -> None:
    lines = mgr.ok("node", "ls").splitlines()
    row = lines[1].split()
    assert row[1:6] == ["*", f"{PREFIX}m1", "Ready", "Active", "Leader"]
    info = mgr.ok("info")
    assert "Is Manager: true" in info and "Managers: 1" in info
    tok = mgr.ok("swarm", "join-token", "-q", "worker").strip()
    assert tok.startswith("SWMTKN-1-")
    assert f"--join-addr {mgr.api}" in mgr.ok("swarm", "join-token", "manager")
    rotated = mgr.ok("swarm", "join-token", "--rotate", "-q", "worker").strip()
    assert rotated != tok

    before = mgr.ok("service", "ls", "--format", "json")
    mgr.fails("service", "create", "-d", "--name", "bad", "--constraint", "node.colour==x", "busybox",
              match="unknown key 'node.colour'")
    mgr.fails("service", "create", "-d", "--name", "bad", "-p", "70000:80", "busybox", match="out of range")
    mgr.fails("service", "create", "-d", "--name", "bad", "--network", "nosuch", "busybox", match="not found")
    assert mgr.ok("service", "ls", "--format", "json") == before

    mgr.ok("network", "create", f"{PREFIX}net")
    mgr.fails("network", "create", f"{PREFIX}net", match="already in use")
    mgr.ok("secret", "create", f"{PREFIX}s", "-", input="pw")
    [sec] = json.loads(mgr.ok("secret", "inspect", f"{PREFIX}s"))
    assert "data" not in sec["spec"]
    cl = json.loads(mgr.ok("cluster", "inspect"))
    assert "ca_key" not in cl["root_ca"] and cl["root_ca"]["ca_cert"]
    mgr.ok("secret", "rm", f"{PREFIX}s")
    mgr.ok("network", "rm", f"{PREFIX}net")

    # The remote API with the node's own (manager) TLS identity, over mutual TLS.
    assert json.loads(mgr.ok("info", "--format", "json", remote=True))["is_manager"]
    assert mgr.ok("node", "ls", "-q", remote=True).split() == mgr.ok("node", "ls", "-q").split()


def test_service_converges_scales_updates_rolls_back_and_is_removed(mgr: Manager, registry: Registry) -> None:
    image = f"{registry.host}/library/busybox:latest"
    name = f"{PREFIX}web"
    out = mgr.ok("service", "create", "--name", name, "--replicas", "2", "--stop-grace-period", "1s",
                 "--update-monitor", "500ms", "--update-failure-action", "continue", "--rollback-failure-action",
                 "continue", image, "sleep", "600")
    assert f"verify: Service {name} converged" in out and "overall progress: 2 out of 2 tasks" in out
    row = next(r for r in mgr.ok("service", "ls").splitlines() if f" {name} " in r)
    assert row.split()[2:4] == ["replicated", "2/2"]
    ps = mgr.ok("service", "ps", name).splitlines()
    assert ps[0].split()[:5] == ["ID", "NAME", "IMAGE", "NODE", "DESIRED"]
    assert sum(1 for r in ps[1:] if " Running " in r and "ago" in r) == 2

    assert sum(" Running " in r for r in mgr.ok("node", "ps").splitlines()) == 2  # this node runs both
    assert "converged" in mgr.ok("service", "scale", f"{name}=3")
    assert mgr.ok("service", "ls").count("3/3") == 1

    out = mgr.ok("service", "update", "--env-add", "V=2", name)
    assert f"verify: Service {name} converged" in out
    [svc] = json.loads(mgr.ok("service", "inspect", name))
    running = [t for t in json.loads(mgr.ok("service", "ps", name, "--format", "json"))
               if t["status"].get("state") == "RUNNING" and t.get("desired_state") == "RUNNING"]
    assert len(running) == 3 and all(t.get("spec_version") == svc["spec_version"] for t in running)

    out = mgr.ok("service", "rollback", name)
    assert "converged" in out
    [svc] = json.loads(mgr.ok("service", "inspect", name))
    assert "env" not in svc["spec"]["task"]["container"]

    out = mgr.ok("service", "rm", name)
    assert out.startswith(name)
    live = [t for t in json.loads(mgr.ok("task", "ls", "--format", "json"))
            if t.get("service_id") == svc["id"] and t["status"].get("state") == "RUNNING"]
    assert live == []


def test_failing_service_is_reported_clearly(mgr: Manager, registry: Registry) -> None:
    name = f"{PREFIX}bad"
    err = mgr.fails("service", "create", "--name", name, "--timeout", "2m", f"{registry.host}/library/nosuch:1",
                    match="is not converging")
    assert "last error:" in err
    mgr.ok("service", "rm", "-d", name)


def test_unplaceable_service_is_reported_clearly(mgr: Manager, registry: Registry) -> None:
    name = f"{PREFIX}nowhere"
    err = mgr.fails("service", "create", "--name", name, "--constraint", "node.labels.zone==mars",
                    f"{registry.host}/library/busybox:latest", match="cannot be placed: no suitable node")
    assert "constraint" in err.lower() or "node.labels.zone" in err
    [t] = json.loads(mgr.ok("service", "ps", name, "--format", "json"))
    assert t["status"]["state"] == "PENDING"
    mgr.ok("service", "rm", name)


def test_events_follow_the_store_without_secret_data(mgr: Manager) -> None:
    """`swarmctl events` streams committed changes (filtered by kind); the Watch API never sends
    secret data, through the local socket or the mTLS remote API."""
    name = f"{PREFIX}evsecret"
    conn = ["--socket", str(mgr.sock)]
    follow = subprocess.Popen(SWARMCTL + conn + ["events", "--kind", "secret", "--format", "json", "--count", "2"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    remote = subprocess.Popen(SWARMCTL + ["--host", mgr.api, "--tls-dir", str(mgr.dir), "events", "--kind", "secret",
                                          "--count", "1"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(1.0)  # both streams open before the changes
        mgr.ok("secret", "create", name, "-", input="hush-hush")
        mgr.ok("config", "create", f"{PREFIX}evconfig", "-", input="not a secret")  # another kind: filtered out
        mgr.ok("secret", "rm", name)
        out, err = follow.communicate(timeout=30)
        rout, rerr = remote.communicate(timeout=30)
    finally:
        for p in (follow, remote):
            if p.poll() is None:
                p.kill()
                p.wait()
        mgr.run("config", "rm", f"{PREFIX}evconfig")
    assert follow.returncode == 0, err
    events = [json.loads(line) for line in out.splitlines()]
    assert [e.get("action", "CREATE") for e in events] == ["CREATE", "DELETE"]
    assert all(e["object"]["secret"]["spec"]["annotations"]["name"] == name for e in events)
    assert "hush" not in out and "data" not in events[0]["object"]["secret"]["spec"]
    assert remote.returncode == 0, rerr
    assert "secret create" in rout and name in rout
