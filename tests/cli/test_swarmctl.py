"""Real `swarmctl` processes against a served ControlServicer (helpers.controlapi over a LocalStore)."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers.controlapi import Server
from helpers.swarmctl import SWARMCTL


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    s = Server(tmp_path_factory.mktemp("swarmctl"), "--seed")
    try:
        yield s
    finally:
        s.stop()


def test_usage_errors_exit_2(srv: Server) -> None:
    r = srv.run()
    assert r.returncode == 2 and "COMMAND" in r.stderr
    srv.fails("frobnicate", match="invalid choice", code=2)
    srv.fails("service", "create", "--replicas", "-1", "busybox", match="invalid replicas '-1'", code=2)
    srv.fails("service", "create", "--replicas", "two", "busybox", match="whole number", code=2)
    srv.fails("service", "create", "--restart-delay", "5x", "busybox", match="invalid duration '5x'", code=2)
    srv.fails("service", "create", "--memory-limit", "10q", "busybox", match="invalid size '10q'", code=2)
    srv.fails("service", "create", "--cpu-limit", "lots", "busybox", match="invalid CPU value 'lots'", code=2)
    srv.fails("service", "create", "-p", "80:http", "busybox", match="invalid target port 'http'", code=2)
    srv.fails("service", "create", "--mode", "daemon", "busybox", match="invalid choice", code=2)
    srv.fails("service", "create", "--mount", "type=nfs,target=/x", "busybox", match="invalid mount type", code=2)
    srv.fails("service", "create", "--update-failure-action", "explode", "busybox", match="invalid choice", code=2)
    assert srv.ok("service", "ls", "-q") == ""


BAD_CREATES = [
    (["--name", "v1", "Bad Image"], "image reference 'Bad Image' is invalid"),
    (["--name", "v2"], "no image given"),
    (["--name", "v3", "-p", "70000:80", "busybox"], "published port 70000 is out of range"),
    (["--name", "v4", "-p", "8080:80", "-p", "8080:81", "busybox"], "published port 8080/tcp is given twice"),
    (["--name", "v5", "--constraint", "node.colour==red", "busybox"], "unknown key 'node.colour'"),
    (["--name", "v6", "--constraint", "node.role=manager", "busybox"], "no == or != operator"),
    # swarmctl sends network names as given; the control API resolves them and names an unknown one
    (["--name", "v7", "--network", "nosuchnet", "busybox"],
     "network 'nosuchnet' not found: create it first (swarmctl network create) or fix the name"),
    (["--name", "v8", "--secret", "nosuch", "busybox"], "secret 'nosuch' not found"),
    (["--name", "v9", "--config", "nosuch", "busybox"], "config 'nosuch' not found"),
    (["--name", "v10", "--update-max-failure-ratio", "2", "busybox"], "max failure ratio 2 is out of range"),
    (["--name", "v11", "--placement-pref", "spread=zone", "busybox"], "spread='zone' is not supported"),
    (["--name", "bad name", "busybox"], "service name 'bad name' is invalid"),
    (["--name", "v12", "--env", "=x", "busybox"], "environment entry '=x'"),
    (["--name", "v13", "--memory-limit", "1k", "busybox"], "at least 4MiB"),
    (["--name", "v14", "--mode", "global", "--replicas", "2", "busybox"], "only be used with replicated mode"),
    (["--name", "v15", "--stop-signal", "SIGNOPE", "busybox"], "stop signal 'SIGNOPE'"),
    (["--name", "v16", "--mount", "type=bind,source=rel,target=/x", "busybox"], "bind mount source 'rel'"),
    (["--name", "v17", "--image", "a", "b"], "two images given"),
]


def test_bad_service_create_changes_nothing(srv: Server) -> None:
    before = srv.ok("service", "ls", "--format", "json")
    for args, match in BAD_CREATES:
        srv.fails("service", "create", "-d", *args, match=match)
    assert srv.ok("service", "ls", "--format", "json") == before


def test_service_lifecycle(srv: Server) -> None:
    srv.ok("network", "create", "lnet")
    srv.ok("secret", "create", "lsec", "-", input="s3cr3t")
    sid = srv.ok(
        "service", "create", "-d", "--name", "life", "--replicas", "3", "-p", "8080:80", "--publish",
        "published=5353,target=53,protocol=udp,mode=host", "--env", "A=1", "-e", "B=2", "--label", "tier=front",
        "--container-label", "c=1", "--constraint", "node.role==manager", "--placement-pref", "spread=node.labels.zone",
        "--memory-limit", "64m", "--cpu-limit", "0.5", "--memory-reservation", "32MiB", "--pids-limit", "100",
        "--restart-condition", "on-failure", "--restart-delay", "2s", "--restart-max-attempts", "3",
        "--update-parallelism", "2", "--update-delay", "1m30s", "--update-failure-action", "rollback",
        "--update-order", "start-first", "--update-max-failure-ratio", "0.2", "--rollback-parallelism", "1",
        "--network", "lnet", "--secret", "source=lsec,target=pw,mode=0400", "--mount",
        "type=tmpfs,target=/cache,tmpfs-size=16m", "--user", "nobody", "--workdir", "/srv", "--hostname", "h1",
        "--health-cmd", "true", "--health-interval", "5s", "--init", "--read-only", "--stop-grace-period", "3s",
        "--stop-signal", "SIGINT", "--endpoint-mode", "vip", "--with-registry-auth",
        "busybox:1.36", "httpd", "-f", "-p", "80",
    ).strip()
    assert len(sid) == 25
    [svc] = json.loads(srv.ok("service", "inspect", "life"))
    spec = svc["spec"]
    c = spec["task"]["container"]
    assert svc["id"] == sid and spec["replicated"]["replicas"] == "3"
    assert c["image"] == "busybox:1.36" and c["args"] == ["httpd", "-f", "-p", "80"] and "command" not in c
    assert c["env"] == ["A=1", "B=2"] and c["labels"] == {"c": "1"} and spec["annotations"]["labels"] == {"tier": "front"}
    assert c["user"] == "nobody" and c["dir"] == "/srv" and c["hostname"] == "h1" and c["init"] and c["read_only"]
    assert c["stop_grace_period"] == "3s" and c["stop_signal"] == "SIGINT"
    assert c["healthcheck"] == {"test": ["CMD-SHELL", "true"], "interval": "5s"}
    assert c["secrets"][0]["secret_name"] == "lsec" and c["secrets"][0]["file"]["name"] == "pw"
    assert c["secrets"][0]["file"]["mode"] == 0o400
    assert c["mounts"] == [{"type": "TMPFS", "target": "/cache", "tmpfs_options": {"size_bytes": str(16 << 20)}}]
    assert "registry_auth" in c["pull_options"]
    t = spec["task"]
    assert t["resources"]["limits"] == {"nano_cpus": "500000000", "memory_bytes": str(64 << 20)}
    assert t["resources"]["reservations"] == {"memory_bytes": str(32 << 20)} and t["resources"]["pids_limit"] == "100"
    assert t["restart"] == {"condition": "ON_FAILURE", "delay": "2s", "max_attempts": "3"}
    assert t["placement"] == {"constraints": ["node.role==manager"],
                              "preferences": [{"spread_descriptor": "node.labels.zone"}]}
    assert t["networks"][0]["target"] != "lnet" and len(t["networks"][0]["target"]) == 25
    u = spec["update"]
    assert u["parallelism"] == "2" and u["delay"] == "90s" and u["failure_action"] == "ROLLBACK"
    assert u["order"] == "START_FIRST" and abs(u["max_failure_ratio"] - 0.2) < 1e-6
    assert spec["rollback"] == {"parallelism": "1"}
    ports = spec["endpoint"]["ports"]
    assert ports[0] == {"target_port": 80, "published_port": 8080}
    assert ports[1] == {"protocol": "UDP", "target_port": 53, "published_port": 5353, "publish_mode": "HOST"}

    table = srv.ok("service", "ls").splitlines()
    assert table[0].split() == ["ID", "NAME", "MODE", "REPLICAS", "IMAGE", "PORTS"]
    row = next(r for r in table if " life " in r)
    assert row.split()[:5] == [sid[:12], "life", "replicated", "0/3", "busybox:1.36"]
    assert row.endswith("*:8080->80/tcp")
    assert sid in srv.ok("service", "ls", "-q").split()
    assert srv.ok("service", "ps", "life").splitlines()[0].split()[:4] == ["ID", "NAME", "IMAGE", "NODE"]

    # update: add/rm lists, and single values
    assert srv.ok("service", "update", "-d", "--env-add", "C=3", "--env-rm", "A", "--publish-rm", "80",
                  "--replicas", "2", "--constraint-rm", "node.role==manager", "life").strip() == "life"
    [svc] = json.loads(srv.ok("service", "inspect", sid[:8]))
    c = svc["spec"]["task"]["container"]
    assert c["env"] == ["B=2", "C=3"] and svc["spec"]["replicated"]["replicas"] == "2"
    assert len(svc["spec"]["endpoint"]["ports"]) == 1 and "constraints" not in svc["spec"]["task"]["placement"]
    assert svc["spec_version"] == "2" and svc["previous_spec_version"] == "1"
    srv.fails("service", "update", "-d", "--image", "UPPER", "life", match="image reference 'UPPER' is invalid")
    srv.fails("service", "update", "-d", "--network-add", "nosuchnet", "life",
              match="network 'nosuchnet' not found: create it first (swarmctl network create) or fix the name")

    srv.ok("service", "rollback", "-d", "life")
    [svc] = json.loads(srv.ok("service", "inspect", "life"))
    assert svc["spec"]["replicated"]["replicas"] == "3" and svc["update_status"]["state"] == "ROLLBACK_STARTED"

    assert srv.ok("service", "scale", "-d", "life=5").strip() == "life scaled to 5"
    [svc] = json.loads(srv.ok("service", "inspect", "life"))
    assert svc["spec"]["replicated"]["replicas"] == "5"
    srv.fails("service", "scale", "-d", "life=-1", match="invalid replicas '-1'")
    srv.fails("service", "scale", "-d", "life", match="SERVICE=REPLICAS")

    assert "Replicas:\t5" in srv.ok("service", "inspect", "--pretty", "life")
    net2 = srv.ok("network", "create", "lnet2").strip()
    srv.ok("service", "update", "-d", "--network-rm", "lnet", "--network-add", "lnet2", "life")
    [svc] = json.loads(srv.ok("service", "inspect", "life"))
    assert [n["target"] for n in svc["spec"]["task"]["networks"]] == [net2]
    srv.ok("network", "rm", "lnet")  # no longer used
    # The previous spec names the removed network: rolling back to it is refused, nothing changes.
    srv.fails("service", "rollback", "-d", "life", match="cannot roll back")
    [svc] = json.loads(srv.ok("service", "inspect", "life"))
    assert [n["target"] for n in svc["spec"]["task"]["networks"]] == [net2]
    srv.fails("network", "rm", net2[:10], match="network lnet2 is in use by service 'life'")
    srv.fails("secret", "rm", "lsec", match="secret lsec is in use by service life")
    assert srv.ok("service", "rm", "-d", "life").strip() == "life"
    srv.fails("service", "inspect", "life", match="service 'life' not found")
    srv.fails("service", "rm", "-d", "life", match="not found")
    srv.ok("network", "rm", "lnet2")
    srv.ok("secret", "rm", "lsec")


def test_service_create_docker_positional_and_global(srv: Server) -> None:
    srv.ok("service", "create", "-d", "--name", "glob", "--mode", "global", "busybox", "sh", "-c", "sleep 1000")
    [svc] = json.loads(srv.ok("service", "inspect", "glob"))
    assert "global" in svc["spec"] and svc["spec"]["task"]["container"]["args"] == ["sh", "-c", "sleep 1000"]
    srv.fails("service", "scale", "-d", "glob=3", match="not in replicated mode")
    srv.ok("service", "create", "-d", "--name", "sk", "--image", "busybox", "--command", "sh -c", "--args", "echo hi")
    [svc] = json.loads(srv.ok("service", "inspect", "sk"))
    c = svc["spec"]["task"]["container"]
    assert c["command"] == ["sh", "-c"] and c["args"] == ["echo", "hi"]
    srv.fails("service", "create", "-d", "--name", "sk", "busybox", match="service name 'sk' is already in use")
    out = srv.ok("service", "ls", "--filter", "name=glob", "--format", "json")
    assert [s["spec"]["annotations"]["name"] for s in json.loads(out)] == ["glob"]
    srv.ok("service", "rm", "-d", "glob", "sk")


def test_nodes(srv: Server) -> None:
    lines = srv.ok("node", "ls").splitlines()
    assert lines[0].split() == ["ID", "HOSTNAME", "STATUS", "AVAILABILITY", "MANAGER", "STATUS", "ENGINE", "VERSION"]
    m1 = next(line for line in lines if " m1 " in line)
    assert m1.split()[1:6] == ["*", "m1", "Ready", "Active", "Leader"]
    w1 = next(line for line in lines if " w1 " in line)
    assert w1.split()[1:4] == ["w1", "Down", "Active"]
    nodes = json.loads(srv.ok("node", "ls", "--format", "json"))
    assert {n["description"]["hostname"] for n in nodes} >= {"m1", "w1"}
    assert srv.ok("node", "ls", "-q", "--filter", "role=manager").split() == [
        n["id"] for n in nodes if n["description"]["hostname"] == "m1"]

    assert srv.ok("node", "drain", "w1").strip() == "w1"
    assert json.loads(srv.ok("node", "inspect", "w1"))[0]["spec"]["availability"] == "DRAIN"
    srv.ok("node", "pause", "w1")
    assert json.loads(srv.ok("node", "inspect", "w1"))[0]["spec"]["availability"] == "PAUSE"
    srv.ok("node", "activate", "w1")
    srv.ok("node", "update", "--label-add", "zone=a", "--label-add", "ssd", "w1")
    [w] = json.loads(srv.ok("node", "inspect", "w1"))
    assert w["spec"]["annotations"]["labels"] == {"zone": "a", "ssd": ""} and "availability" not in w["spec"]
    srv.ok("node", "update", "--label-rm", "ssd", "w1")
    srv.fails("node", "update", "--label-rm", "nope", "w1", match="no label 'nope'")
    srv.fails("node", "update", "--label-add", "bad key=1", "w1", match="node label key 'bad key'")
    assert "zone=a" in srv.ok("node", "inspect", "--pretty", "w1")

    assert "promoted to a manager" in srv.ok("node", "promote", "w1")
    assert json.loads(srv.ok("node", "inspect", "w1"))[0]["spec"]["desired_role"] == "MANAGER"
    srv.fails("node", "rm", "w1", match="demote it first")
    assert "demoted" in srv.ok("node", "demote", "w1")
    srv.fails("node", "demote", "self", match="last manager")
    srv.fails("node", "rm", "m1", match="demote it first")
    srv.fails("node", "inspect", "nosuch", match="node 'nosuch' not found")
    self_id = json.loads(srv.ok("info", "--format", "json"))["node_id"]
    assert json.loads(srv.ok("node", "inspect", "self"))[0]["id"] == self_id


def test_networks_secrets_configs(srv: Server, tmp_path: Path) -> None:
    nid = srv.ok("network", "create", "--subnet", "10.77.0.0/24", "--gateway", "10.77.0.254", "--attachable",
                 "--label", "a=b", "n77").strip()
    [net] = json.loads(srv.ok("network", "inspect", "n77"))
    assert net["id"] == nid and net["spec"]["attachable"] and net["ipam"]["configs"][0]["gateway"] == "10.77.0.254"
    row = next(r for r in srv.ok("network", "ls").splitlines() if " n77 " in r)
    assert row.split() == [nid[:12], "n77", "overlay", "swarm", "10.77.0.0/24"]
    srv.fails("network", "create", "n77", match="network name 'n77' is already in use")
    srv.fails("network", "create", "--subnet", "10.77.0.0/16", "n78", match="overlaps")
    srv.fails("network", "create", "-d", "bridge", "n79", match="network driver 'bridge' is not supported")
    srv.fails("network", "create", "--ingress", "--opt", "encrypted", "n81",
              match="encrypted cannot be used on the ingress network")
    srv.fails("network", "create", "--subnet", "10.1.1.1/24", "n80", match="not an IPv4 network in CIDR form")
    srv.ok("network", "rm", nid[:6])

    f = tmp_path / "data.txt"
    f.write_text("config body\n")
    cid = srv.ok("config", "create", "c77", str(f)).strip()
    [cfg] = json.loads(srv.ok("config", "inspect", "c77"))
    assert cfg["id"] == cid and cfg["spec"]["data"] == "Y29uZmlnIGJvZHkK"
    sid = srv.ok("secret", "create", "--label", "x=y", "s77", "-", input="pw").strip()
    [sec] = json.loads(srv.ok("secret", "inspect", sid))
    assert "data" not in sec["spec"] and sec["spec"]["annotations"]["labels"] == {"x": "y"}
    assert srv.ok("secret", "ls", "-q", "--filter", "label=x=y").split() == [sid]
    assert "s77" in srv.ok("secret", "ls")
    srv.fails("secret", "create", "s78", "-", input="", match="secret data is 0 bytes")
    srv.fails("secret", "create", "s79", match="no secret data given")
    srv.fails("secret", "create", "s80", str(tmp_path / "missing"), match="cannot read secret data")
    big = tmp_path / "big"
    big.write_bytes(b"x" * (600 * 1024))
    srv.fails("secret", "create", "s81", str(big), match="give between 1 byte and 500 KB")
    srv.ok("config", "create", "c81", str(big))  # configs may be up to 1000 KB
    assert srv.ok("config", "rm", "c77", "c81").split() == ["c77", "c81"]
    srv.fails("secret", "rm", "s77", "nosuch", match="secret 'nosuch' not found")
    assert srv.ok("secret", "ls", "-q") == ""


def test_encrypted_networks_and_key_rotation(srv: Server) -> None:
    nid = srv.ok("network", "create", "--opt", "encrypted", "sec1").strip()
    raw = srv.ok("network", "inspect", "sec1")
    [net] = json.loads(raw)
    assert net["id"] == nid and net["spec"]["driver_config"]["options"] == {"encrypted": ""}
    assert "keys_rotated_at" in net and "encryption_keys" not in raw
    pretty = srv.ok("network", "inspect", "--pretty", "sec1")
    assert "Encrypted:\ttrue (IPsec ESP between nodes; keys rotated " in pretty and " - encrypted\n" in pretty
    assert f"ID:\t\t{nid}" in pretty and "Ingress:\tfalse" in pretty
    srv.ok("network", "create", "plain1")
    assert "Encrypted:\tfalse" in srv.ok("network", "inspect", "--pretty", "plain1")
    srv.fails("network", "create", "--ingress", "-o", "encrypted=true", "ing2",
              match="create the ingress network without --opt encrypted")
    srv.ok("network", "rm", "sec1", "plain1")

    assert "Network key rotation:\t12h (default)" in srv.ok("cluster", "inspect", "--pretty")
    srv.ok("cluster", "update", "--network-key-rotation", "30m")
    cl = json.loads(srv.ok("cluster", "inspect"))
    assert cl["spec"]["network_encryption"]["key_rotation_interval"] == "1800s"
    assert "Network key rotation:\t30m" in srv.ok("cluster", "inspect", "--pretty")
    srv.fails("cluster", "update", "--network-key-rotation", "500ms",
              match="network key rotation interval of 500ms is too short: give 0 (the default, 12h) or at least 1s")
    srv.fails("cluster", "update", "--network-key-rotation", "soon", match="invalid duration 'soon'", code=2)
    assert "Network key rotation:\t30m" in srv.ok("cluster", "inspect", "--pretty")
    srv.ok("cluster", "update", "--network-key-rotation", "0")
    assert "Network key rotation:\t12h (default)" in srv.ok("cluster", "inspect", "--pretty")


def test_cluster_and_join_tokens(srv: Server) -> None:
    tok = srv.ok("swarm", "join-token", "-q", "worker").strip()
    assert tok.startswith("SWMTKN-1-")
    full = srv.ok("swarm", "join-token", "worker")
    assert f"--join-token {tok} --join-addr 127.0.0.1:2377" in full
    new = srv.ok("swarm", "join-token", "--rotate", "-q", "worker").strip()
    assert new != tok and new.split("-")[2] == tok.split("-")[2]
    mtok = srv.ok("swarm", "join-token", "-q", "manager").strip()
    assert mtok not in (tok, new)
    cl = json.loads(srv.ok("cluster", "inspect"))
    assert "ca_key" not in cl.get("root_ca", {})
    srv.ok("cluster", "update", "--task-history-limit", "3", "--heartbeat-period", "2s")
    cl = json.loads(srv.ok("cluster", "inspect"))
    assert cl["spec"]["orchestration"]["task_history_retention_limit"] == "3"
    assert cl["spec"]["dispatcher"]["heartbeat_period"] == "2s"
    srv.fails("cluster", "update", "--heartbeat-period", "1ms", match="heartbeat period is out of range")
    srv.fails("cluster", "update", "--default-addr-pool", "10.0.0.1/8", match="default address pool '10.0.0.1/8'")
    assert "Task history limit:\t3" in srv.ok("cluster", "inspect", "--pretty")


def test_info_and_task_commands(srv: Server) -> None:
    info = srv.ok("info")
    assert "Is Manager: true" in info and "Managers: 1" in info
    assert srv.ok("task", "ls").splitlines()[0].split()[:3] == ["ID", "NAME", "IMAGE"]
    assert json.loads(srv.ok("node", "ps", "--format", "json")) == []
    assert srv.ok("node", "ps", "-q", "w1") == ""
    assert json.loads(srv.ok("task", "ls", "--format", "json")) == []
    srv.fails("task", "inspect", "nosuch", match="task 'nosuch' not found")
    srv.fails("task", "ls", "--filter", "desired-state=dancing", match="not a task state")
    srv.fails("task", "ls", "--filter", "colour=red", match="unknown task filter")


def test_wait_returns_when_no_node_can_run_tasks(tmp_path: Path) -> None:
    s = Server(tmp_path)  # no nodes at all: nothing can run tasks yet
    try:
        out = s.ok("service", "create", "--name", "w", "busybox")
        assert "no node is ready and active" in out
        assert s.ok("service", "update", "--env-add", "X=1", "w").startswith("w\n")
        assert s.ok("service", "scale", "w=2").startswith("w scaled to 2")
        assert s.ok("service", "rm", "w").strip() == "w"
    finally:
        s.stop()


def test_connection_errors(tmp_path: Path) -> None:
    env = dict(os.environ)
    env.pop("SWARM_SOCKET", None)
    r = subprocess.run(SWARMCTL + ["--socket", str(tmp_path / "none.sock"), "service", "ls"], capture_output=True,
                       text=True, env=env, timeout=60)
    assert r.returncode == 1 and r.stderr.startswith("Error: cannot reach the manager")
    r = subprocess.run(SWARMCTL + ["--host", "127.0.0.1:1", "--tls-dir", str(tmp_path), "info"], capture_output=True,
                       text=True, env=env, timeout=60)
    assert r.returncode == 1 and "TLS identity not found" in r.stderr
    # A socket path that exists but nobody listens on.
    dead = tmp_path / "dead.sock"
    dead.touch()
    r = subprocess.run(SWARMCTL + ["--socket", str(dead), "info"], capture_output=True, text=True, env=env, timeout=60)
    assert r.returncode == 1 and "cannot reach the manager" in r.stderr, r.stderr
