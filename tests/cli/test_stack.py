"""`swarmctl stack …` as real processes against a served ControlServicer (helpers.controlapi, LocalStore).

The served store has no orchestrator: services get no tasks, so deploys here use --detach, except
against a store without nodes, where the wait ends at once (nothing can run the tasks yet).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import controlapi
from helpers.paths import SHARED

from shoal.cli.client import Client
from shoal.cli.commands import stack as stack_cli
from shoal.cli.errors import CliError
from shoal.proto import control_pb2

VOTING_APP = SHARED / "compose" / "examples" / "example-voting-app.docker-stack.yml"
PREFIX = f"st{os.getpid() % 10000}"
NAMESPACE = "com.docker.stack.namespace"



STACK_FILE = """\
version: "3.8"
x-common: &common
  image: "busybox:${TAG:-latest}"
  stop_grace_period: 2s
services:
  web:
    <<: *common
    command: ["httpd", "-f", "-p", "8080"]
    networks:
      front:
        aliases: [www]
      back:
    ports: ["${WEB_PORT}:8080"]
    secrets:
      - source: pw
        target: db_password
        mode: 0400
    configs:
      - source: conf
        target: /etc/app.conf
    healthcheck:
      test: ["CMD", "true"]
      interval: 5s
      timeout: 2s
      retries: 3
    deploy:
      replicas: 2
      placement:
        constraints: [node.role == manager]
      labels:
        tier: front
  worker:
    <<: *common
    command: sleep 600
    networks: [back]
    secrets: [pw]
    deploy:
      replicas: 3
      placement:
        constraints: ["node.labels.zone != nowhere"]
      resources:
        limits: {memory: 64m}
networks:
  front:
    driver: overlay
  back:
    driver: overlay
    ipam:
      config:
        - subnet: 10.251.%(n)d.0/24
secrets:
  pw:
    file: ./pw.txt
configs:
  conf:
    file: ./app.conf
"""


class Server(controlapi.Server):
    timeout = 120
    one_line_errors = True

    def everything(self) -> dict[str, list[str]]:
        """Names of every service, network, secret and config."""
        return {kind: sorted(o["spec"]["annotations"]["name"] for o in self.js(kind, "ls"))
                for kind in ("service", "network", "secret", "config")}

    def of_stack(self, stack: str) -> dict[str, list[dict]]:
        return {kind: [o for o in self.js(kind, "ls")
                       if o["spec"]["annotations"].get("labels", {}).get(NAMESPACE) == stack]
                for kind in ("service", "network", "secret", "config")}


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    s = Server(tmp_path_factory.mktemp("stack"), "--seed")
    try:
        yield s
    finally:
        s.stop()


def write_stack(d: Path, n: int, port: int, text: str = STACK_FILE, pw: str = "s3cr3t") -> Path:
    d.mkdir(parents=True, exist_ok=True)
    (d / "pw.txt").write_text(pw)
    (d / "app.conf").write_text("listen 8080\n")
    (d / ".env").write_text(f"WEB_PORT={port}\n")
    f = d / "stack.yml"
    f.write_text(text % {"n": n})
    return f


def test_deploy_redeploy_update_prune_and_rm(srv: Server, tmp_path: Path) -> None:
    stack = f"{PREFIX}a"
    f = write_stack(tmp_path, 1, 18080)
    out = srv.ok("stack", "deploy", "--detach", "-c", str(f), stack)
    lines = out.splitlines()
    assert lines[:2] == [f"Creating network {stack}_back", f"Creating network {stack}_front"]  # fixed subnet first
    assert lines[2:] == [f"Creating secret {stack}_pw", f"Creating config {stack}_conf",
                         f"Creating service {stack}_web", f"Creating service {stack}_worker"]

    objs = srv.of_stack(stack)
    nets = {n["spec"]["annotations"]["name"]: n for n in objs["network"]}
    assert sorted(nets) == [f"{stack}_back", f"{stack}_front"]
    assert nets[f"{stack}_back"]["ipam"]["configs"][0]["subnet"] == "10.251.1.0/24"
    [sec] = objs["secret"]
    [cfg] = objs["config"]
    assert sec["spec"]["annotations"]["name"] == f"{stack}_pw" and "data" not in sec["spec"]
    assert cfg["spec"]["annotations"]["name"] == f"{stack}_conf"
    svcs = {s["spec"]["annotations"]["name"]: s for s in objs["service"]}
    web, worker = svcs[f"{stack}_web"]["spec"], svcs[f"{stack}_worker"]["spec"]
    assert web["annotations"]["labels"] == {NAMESPACE: stack, "com.docker.stack.image": "busybox:latest",
                                            "tier": "front"}
    assert web["replicated"]["replicas"] == "2" and worker["replicated"]["replicas"] == "3"
    assert web["task"]["placement"]["constraints"] == ["node.role == manager"]
    assert worker["task"]["placement"]["constraints"] == ["node.labels.zone != nowhere"]
    c = web["task"]["container"]
    assert c["image"] == "busybox:latest" and c["args"] == ["httpd", "-f", "-p", "8080"]
    assert c["healthcheck"]["test"] == ["CMD", "true"] and c["healthcheck"]["retries"] == 3
    assert {(n["target"], tuple(n["aliases"])) for n in web["task"]["networks"]} == {
        (nets[f"{stack}_front"]["id"], ("www", "web")), (nets[f"{stack}_back"]["id"], ("web",))}
    [sref] = c["secrets"]
    assert (sref["secret_id"], sref["secret_name"], sref["file"]["name"], sref["file"]["mode"]) == (
        sec["id"], f"{stack}_pw", "db_password", 0o400)
    [cref] = c["configs"]
    assert (cref["config_id"], cref["file"]["name"]) == (cfg["id"], "/etc/app.conf")
    assert web["endpoint"]["ports"][0]["published_port"] == 18080  # from .env beside the file
    assert worker["task"]["resources"]["limits"]["memory_bytes"] == str(64 * 1024 * 1024)

    assert f"{stack}   2" in srv.ok("stack", "ls").splitlines()
    assert {"name": stack, "services": 2} in json.loads(srv.ok("stack", "ls", "--format", "json"))
    table = srv.ok("stack", "services", stack).splitlines()
    assert table[0].split() == ["ID", "NAME", "MODE", "REPLICAS", "IMAGE", "PORTS"]
    assert [r.split()[1] for r in table[1:]] == [f"{stack}_web", f"{stack}_worker"]
    assert "0/2" in table[1] and "*:18080->8080/tcp" in table[1]
    ids = srv.ok("stack", "services", "-q", stack).split()
    assert sorted(ids) == sorted(s["id"] for s in svcs.values())
    assert [s["id"] for s in srv.js("stack", "services", stack)] == [svcs[f"{stack}_web"]["id"],
                                                                     svcs[f"{stack}_worker"]["id"]]
    assert srv.ok("stack", "ps", stack).split() == ["ID", "NAME", "IMAGE", "NODE", "DESIRED", "STATE", "CURRENT",
                                                    "STATE", "ERROR", "PORTS"]  # no orchestrator: no tasks
    assert srv.js("stack", "ps", stack) == []

    # The same file again: nothing changes, and it says so per service.
    out = srv.ok("stack", "deploy", "-d", "--compose-file", str(f), stack)
    assert out.splitlines() == [
        f"Service {stack}_web is up to date (id: {svcs[f'{stack}_web']['id']})",
        f"Service {stack}_worker is up to date (id: {svcs[f'{stack}_worker']['id']})",
        f"Stack {stack} is up to date: nothing to change"]
    assert srv.of_stack(stack) == objs

    # An edited file: only that service is updated (with the version the plan read).
    f.write_text(f.read_text().replace("replicas: 3", "replicas: 4"))
    out = srv.ok("stack", "deploy", "-d", "-f", str(f), stack)
    wid = svcs[f"{stack}_worker"]["id"]
    assert out.splitlines() == [f"Updating service {stack}_worker (id: {wid})",
                                f"Service {stack}_web is up to date (id: {svcs[f'{stack}_web']['id']})"]
    after = {s["spec"]["annotations"]["name"]: s for s in srv.of_stack(stack)["service"]}
    assert after[f"{stack}_web"] == svcs[f"{stack}_web"]
    assert after[f"{stack}_worker"]["spec"]["replicated"]["replicas"] == "4"
    assert int(after[f"{stack}_worker"]["meta"]["version"]) > int(svcs[f"{stack}_worker"]["meta"]["version"])

    # A secret's data cannot change in place: refused before anything is written.
    before = srv.everything()
    (tmp_path / "pw.txt").write_text("other")
    srv.fails("stack", "deploy", "-d", "-c", str(f), stack, match=f'secret "{stack}_pw" already exists with other data')
    assert srv.everything() == before
    (tmp_path / "pw.txt").write_text("s3cr3t")

    # A service dropped from the file stays without --prune and goes with it.
    text = f.read_text()
    f.write_text(text[:text.index("  worker:")] + text[text.index("networks:\n  front:"):])
    out = srv.ok("stack", "deploy", "-d", "-c", str(f), stack)
    assert f"Service {stack}_web is up to date" in out and "Removing" not in out
    assert len(srv.of_stack(stack)["service"]) == 2
    out = srv.ok("stack", "deploy", "-d", "--prune", "-c", str(f), stack)
    assert out.splitlines()[0] == f"Removing service {stack}_worker"
    assert [s["spec"]["annotations"]["name"] for s in srv.of_stack(stack)["service"]] == [f"{stack}_web"]

    out = srv.ok("stack", "rm", stack)
    assert out.splitlines() == [f"Removing service {stack}_web", f"Removing network {stack}_back",
                                f"Removing network {stack}_front", f"Removing secret {stack}_pw",
                                f"Removing config {stack}_conf"]
    assert srv.of_stack(stack) == {"service": [], "network": [], "secret": [], "config": []}
    assert stack not in srv.ok("stack", "ls")
    srv.fails("stack", "rm", stack, match=f"nothing found in stack {stack}")
    srv.fails("stack", "ps", stack, match=f"nothing found in stack {stack}")
    r = srv.run("stack", "services", stack)
    assert r.returncode == 0 and r.stdout == "" and r.stderr == f"Nothing found in stack: {stack}\n"


def _line(text: str, needle: str) -> int:
    return next(i for i, ln in enumerate(text.splitlines(), 1) if needle in ln)


@pytest.mark.parametrize("old,new,needle,match", [
    ("replicas: 2", "replicas: two", "replicas: two",
     'services.web.deploy.replicas: expected a non-negative integer, got "two"'),
    ("      test: [", "      tset: [", "tset:", "services.web.healthcheck"),
    ("    networks: [back]", "    networks: [back, nosuch]", "[back, nosuch]", 'network "nosuch" is not defined'),
    ("node.role == manager", "node.colour == red", "node.colour", "services.web.deploy.placement.constraints"),
    ("    command: sleep 600\n", "    command: sleep 600\n    stop_signal: SIGNOPE\n", "SIGNOPE",
     "services.worker.stop_signal"),
])
def test_bad_file_exits_1_with_file_and_line_and_creates_nothing(srv: Server, tmp_path: Path, old: str, new: str,
                                                                 needle: str, match: str) -> None:
    f = write_stack(tmp_path, 2, 18081)
    text = f.read_text().replace(old, new)
    f.write_text(text)
    before = srv.everything()
    err = srv.fails("stack", "deploy", "-d", "-c", str(f), f"{PREFIX}b", match=match)
    assert err.startswith(f"Error: {f}:{_line(text, needle)} "), err
    assert srv.everything() == before


def test_bad_secret_file_and_no_image_create_nothing(srv: Server, tmp_path: Path) -> None:
    f = write_stack(tmp_path, 2, 18081)
    text = f.read_text()
    before = srv.everything()
    f.write_text(text.replace("./pw.txt", "./missing.txt"))
    srv.fails("stack", "deploy", "-d", "-c", str(f), f"{PREFIX}b", match="missing.txt")
    f.write_text(text.replace('  image: "busybox:${TAG:-latest}"\n', "  stop_signal: SIGTERM\n"))
    srv.fails("stack", "deploy", "-d", "-c", str(f), f"{PREFIX}b", match="has no image")
    assert srv.everything() == before


def test_refused_before_any_write(srv: Server, tmp_path: Path) -> None:
    before = srv.everything()
    f = write_stack(tmp_path, 3, 18082)
    text = f.read_text()
    # External network that does not exist.
    back = text[text.index("  back:\n    driver"):text.index("secrets:\n  pw:")]
    f.write_text(text.replace(back, f"  back:\n    external: true\n    name: {PREFIX}ext\n"))
    srv.fails("stack", "deploy", "-d", "-c", str(f), f"{PREFIX}c",
              match=f'network "{PREFIX}ext" is declared as external, but could not be found')
    assert srv.everything() == before
    # Overlapping subnets of the stack's networks.
    f.write_text(text.replace("  front:\n    driver: overlay\n",
                              "  front:\n    ipam:\n      config:\n        - subnet: 10.251.3.0/25\n"))
    srv.fails("stack", "deploy", "-d", "-c", str(f), f"{PREFIX}c", match="overlaps 10.251.3.0/24")
    # A gateway outside its subnet (the control API would refuse it).
    f.write_text(text.replace("- subnet: 10.251.3.0/24", "- subnet: 10.251.3.0/24\n          gateway: 10.9.9.9"))
    srv.fails("stack", "deploy", "-d", "-c", str(f), f"{PREFIX}c", match="gateway 10.9.9.9 is not a host address")
    # A subnet outside the cluster's address pool.
    f.write_text(text.replace("- subnet: 10.251.3.0/24", "- subnet: 192.168.3.0/24"))
    srv.fails("stack", "deploy", "-d", "-c", str(f), f"{PREFIX}c", match="outside the cluster's address pool")
    # A published port another service holds.
    srv.ok("service", "create", "-d", "--name", f"{PREFIX}holder", "-p", "18082:80", "busybox")
    before = srv.everything()
    f.write_text(text)
    srv.fails("stack", "deploy", "-d", "-c", str(f), f"{PREFIX}c",
              match=f"which service {PREFIX}holder already publishes")
    assert srv.everything() == before
    # A service of that name that belongs to no stack.
    srv.ok("service", "rm", "-d", f"{PREFIX}holder")
    srv.ok("service", "create", "-d", "--name", f"{PREFIX}c_web", "busybox")
    before = srv.everything()
    srv.fails("stack", "deploy", "-d", "-c", str(f), f"{PREFIX}c", match="belongs to no stack")
    assert srv.everything() == before
    srv.ok("service", "rm", "-d", f"{PREFIX}c_web")
    srv.fails("stack", "deploy", "-d", "-c", str(f), "bad name", match='invalid stack name "bad name"')
    srv.fails("stack", "deploy", "-d", f"{PREFIX}c", match="no stack file given")


def test_external_objects_are_used_and_left_alone(srv: Server, tmp_path: Path) -> None:
    ext = f"{PREFIX}ext2"
    srv.ok("network", "create", ext)
    srv.ok("secret", "create", f"{PREFIX}xs", "-", input="x")
    try:
        text = f"""
services:
  app:
    image: busybox
    networks: [outside]
    secrets: [shared]
networks:
  outside:
    external: true
    name: {ext}
secrets:
  shared:
    external: true
    name: {PREFIX}xs
"""
        stack = f"{PREFIX}d"
        out = srv.ok("stack", "deploy", "-d", "-c", "-", stack, input=text)
        assert out.splitlines() == [f"Creating service {stack}_app"]
        [svc] = srv.js("stack", "services", stack)
        net = json.loads(srv.ok("network", "inspect", ext))[0]
        assert [n["target"] for n in svc["spec"]["task"]["networks"]] == [net["id"]]
        out = srv.ok("stack", "rm", stack)
        assert out.splitlines() == [f"Removing service {stack}_app"]
        assert ext in srv.everything()["network"] and f"{PREFIX}xs" in srv.everything()["secret"]
    finally:
        srv.run("network", "rm", ext)
        srv.run("secret", "rm", f"{PREFIX}xs")


def test_voting_app_example_deploys(srv: Server, tmp_path: Path) -> None:
    stack = f"{PREFIX}vote"
    r = srv.run("stack", "deploy", "--detach", "-c", str(VOTING_APP), stack)
    assert r.returncode == 0, r.stderr
    svcs = {s["spec"]["annotations"]["name"]: s["spec"] for s in srv.js("stack", "services", stack)}
    assert sorted(svcs) == [f"{stack}_{n}" for n in ("db", "redis", "result", "vote", "worker")]
    assert svcs[f"{stack}_vote"]["replicated"]["replicas"] == "2"
    assert svcs[f"{stack}_vote"]["endpoint"]["ports"][0]["published_port"] == 8080
    assert sorted(n["spec"]["annotations"]["name"] for n in srv.of_stack(stack)["network"]) == [
        f"{stack}_backend", f"{stack}_frontend"]
    mounts = svcs[f"{stack}_db"]["task"]["container"]["mounts"]
    assert mounts[0]["source"] == f"{stack}_db-data" and mounts[0]["target"] == "/var/lib/postgresql/data"
    again = srv.ok("stack", "deploy", "--detach", "-c", str(VOTING_APP), stack)
    assert again.count("is up to date") == 6 and "Creating" not in again and "Updating" not in again
    srv.ok("stack", "rm", stack)
    assert srv.of_stack(stack) == {"service": [], "network": [], "secret": [], "config": []}


def test_wait_ends_when_no_node_can_run_tasks(tmp_path: Path) -> None:
    s = Server(tmp_path)  # no nodes at all
    try:
        f = write_stack(tmp_path / "f", 4, 18083)
        out = s.ok("stack", "deploy", "-c", str(f), f"{PREFIX}e")
        assert f"Waiting for service {PREFIX}e_web" in out
        assert f"{PREFIX}e_worker: stored; no node is ready and active to run its tasks yet" in out
        assert len(s.of_stack(f"{PREFIX}e")["service"]) == 2
        out = s.ok("stack", "rm", f"{PREFIX}e")
        assert s.of_stack(f"{PREFIX}e") == {"service": [], "network": [], "secret": [], "config": []}
    finally:
        s.stop()


def test_a_failure_mid_way_names_what_was_done(srv: Server, tmp_path: Path) -> None:
    """Between the plan and its application another client changes a service: the update is refused
    (stale version) and the error says what was already done and what was not."""
    stack = f"{PREFIX}f"
    f = write_stack(tmp_path, 5, 18085)
    srv.ok("stack", "deploy", "-d", "-c", str(f), stack)
    text = f.read_text()
    f.write_text(text.replace("replicas: 2", "replicas: 1").replace("replicas: 3", "replicas: 5")
                 .replace("networks:\n  front:", "networks:\n  extra:\n    driver: overlay\n  front:"))
    f.write_text(f.read_text().replace("    networks: [back]", "    networks: [back, extra]"))
    c = Client(socket=srv.socket)
    try:
        d = stack_cli.prepare(c, stack_cli.load_stack([str(f)], None, stack))
        assert [s.what for s in d.steps] == [f"create network {stack}_extra", f"update service {stack}_web",
                                             f"update service {stack}_worker"]
        srv.ok("service", "scale", "-d", f"{stack}_worker=7")
        said: list[str] = []
        with pytest.raises(CliError) as e:
            stack_cli.apply(c, d, said.append)
        assert str(e.value).startswith(f"update service {stack}_worker failed: update out of sequence")
        assert f"done before it: created network {stack}_extra, updated service {stack}_web" in str(e.value)
        # Run again: the deploy picks up from the cluster as it is now.
        d = stack_cli.prepare(c, stack_cli.load_stack([str(f)], None, stack))
        assert [s.what for s in d.steps] == [f"update service {stack}_worker"]
        stack_cli.apply(c, d, said.append)
        svc = c.call("GetService", control_pb2.GetServiceRequest(service_id=f"{stack}_worker")).service
        assert svc.spec.replicated.replicas == 5
    finally:
        c.close()
        srv.run("stack", "rm", stack)


def test_env_file_warnings_and_quiet(srv: Server, tmp_path: Path) -> None:
    stack = f"{PREFIX}g"
    (tmp_path / "vars.env").write_text("TAG=1.36\nREPLICAS=3\n")
    f = tmp_path / "stack.yml"
    f.write_text("services:\n  app:\n    image: busybox:${TAG}\n    build: .\n    restart: always\n"
                 "    deploy:\n      replicas: ${REPLICAS}\n")
    try:
        r = srv.run("stack", "deploy", "-d", "-q", "--env-file", str(tmp_path / "vars.env"), "-c", str(f), stack)
        assert r.returncode == 0 and r.stdout == "", r
        assert "Ignoring unsupported options: build, restart" in r.stderr
        [svc] = srv.js("stack", "services", stack)
        assert svc["spec"]["task"]["container"]["image"] == "busybox:1.36"
        assert svc["spec"]["replicated"]["replicas"] == "3"
        # Without the env file the variables are unset, and the image "busybox:" is refused.
        srv.fails("stack", "deploy", "-d", "-c", str(f), stack, match="stack.yml:3 services.app.image: invalid image reference \"busybox:\"")
        assert srv.js("stack", "services", stack)[0]["meta"] == svc["meta"]
    finally:
        srv.run("stack", "rm", stack)


def test_mode_change_is_refused_before_any_write(srv: Server) -> None:
    stack = f"{PREFIX}h"
    one = "services:\n  a:\n    image: busybox\n  b:\n    image: busybox\n"
    try:
        srv.ok("stack", "deploy", "-d", "-c", "-", stack, input=one)
        before = srv.of_stack(stack)
        two = one.replace("  b:\n    image: busybox\n", "  b:\n    image: busybox:1\n    deploy: {mode: global}\n") \
            + "  c:\n    image: busybox\n"
        srv.fails("stack", "deploy", "-d", "-c", "-", stack, input=two,
                  match=f"service {stack}_b cannot change mode from replicated to global")
        assert srv.of_stack(stack) == before
    finally:
        srv.run("stack", "rm", stack)
