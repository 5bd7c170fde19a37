"""`service create` / `service update` flags -> ServiceSpec (shoal.cli.servicespec), with no cluster:
the real swarmctl parser parses the flags, servicespec builds the spec."""

from __future__ import annotations

import argparse
import base64
import json
from pathlib import Path

import pytest

from shoal.cli import servicespec
from shoal.cli.errors import CliError
from shoal.cli.swarmctl import build_parser
from shoal.proto import specs_pb2, types_pb2


def parse(*argv: str) -> argparse.Namespace:
    return build_parser(list(argv)).parse_args(list(argv))


def create(*flags: str) -> specs_pb2.ServiceSpec:
    return servicespec.create_spec(parse("service", "create", *flags))


def update(spec: specs_pb2.ServiceSpec, *flags: str, network_ids: dict[str, str] | None = None) -> None:
    ids = network_ids or {}
    servicespec.update_spec(spec, parse("service", "update", *flags, "svc"), network_id=lambda r: ids.get(r, r))


def test_create_single_values() -> None:
    spec = create("--name", "web", "--replicas", "3", "--memory-limit", "64m", "--cpu-limit", "0.5",
                  "--memory-reservation", "32MiB", "--pids-limit", "100", "--restart-condition", "on-failure",
                  "--restart-delay", "2s", "--restart-max-attempts", "3", "--update-parallelism", "2",
                  "--update-delay", "1m30s", "--update-failure-action", "rollback", "--update-order", "start-first",
                  "--update-max-failure-ratio", "0.2", "--rollback-parallelism", "1", "--user", "nobody",
                  "--workdir", "/srv", "--hostname", "h1", "--health-cmd", "true", "--health-interval", "5s",
                  "--init", "--read-only", "--stop-grace-period", "3s", "--stop-signal", "SIGINT",
                  "--endpoint-mode", "dnsrr", "--log-driver", "json-file",
                  "busybox:1.36", "httpd", "-f", "-p", "80")
    t, c = spec.task, spec.task.container
    assert spec.annotations.name == "web" and spec.replicated.replicas == 3
    assert c.image == "busybox:1.36" and list(c.args) == ["httpd", "-f", "-p", "80"] and not c.command
    assert t.resources.limits.memory_bytes == 64 << 20 and t.resources.limits.nano_cpus == 500_000_000
    assert t.resources.reservations.memory_bytes == 32 << 20 and t.resources.pids_limit == 100
    assert t.restart.condition == types_pb2.RestartPolicy.ON_FAILURE and t.restart.delay.seconds == 2
    assert t.restart.max_attempts == 3
    assert spec.update.parallelism == 2 and spec.update.delay.seconds == 90
    assert spec.update.failure_action == types_pb2.UpdateConfig.ROLLBACK
    assert spec.update.order == types_pb2.UpdateConfig.START_FIRST and abs(spec.update.max_failure_ratio - 0.2) < 1e-6
    assert spec.rollback.parallelism == 1
    assert (c.user, c.dir, c.hostname, c.init, c.read_only) == ("nobody", "/srv", "h1", True, True)
    assert list(c.healthcheck.test) == ["CMD-SHELL", "true"] and c.healthcheck.interval.seconds == 5
    assert c.stop_grace_period.seconds == 3 and c.stop_signal == "SIGINT"
    assert spec.endpoint.mode == types_pb2.EndpointSpec.DNSRR and t.log_driver.name == "json-file"


def test_create_lists() -> None:
    spec = create("-p", "8080:80", "--publish", "published=5353,target=53,protocol=udp,mode=host",
                  "--env", "A=1", "-e", "B=2", "--label", "tier=front", "--container-label", "c=1",
                  "--constraint", "node.role==manager", "--placement-pref", "spread=node.labels.zone",
                  "--network", "front", "--network", "name=back,alias=db", "--secret",
                  "source=pw,target=pw.txt,mode=0400", "--config", "cfg", "--mount", "type=tmpfs,target=/cache,tmpfs-size=16m",
                  "--add-host", "db:10.0.0.2", "--dns", "1.1.1.1", "--cap-add", "NET_ADMIN", "--sysctl", "a.b=1",
                  "--ulimit", "nofile=1024:2048", "--log-opt", "max-size=1m", "busybox")
    t, c = spec.task, spec.task.container
    assert [(p.published_port, p.target_port, p.protocol, p.publish_mode) for p in spec.endpoint.ports] == [
        (8080, 80, types_pb2.PortConfig.TCP, types_pb2.PortConfig.INGRESS),
        (5353, 53, types_pb2.PortConfig.UDP, types_pb2.PortConfig.HOST)]
    assert list(c.env) == ["A=1", "B=2"] and dict(c.labels) == {"c": "1"}
    assert dict(spec.annotations.labels) == {"tier": "front"}
    assert list(t.placement.constraints) == ["node.role==manager"]
    assert [p.spread_descriptor for p in t.placement.preferences] == ["node.labels.zone"]
    # names are left as given: the control API resolves them to ids (and names an unknown one)
    assert [(n.target, list(n.aliases)) for n in t.networks] == [("front", []), ("back", ["db"])]
    assert c.secrets[0].secret_name == "pw" and c.secrets[0].file.name == "pw.txt" and c.secrets[0].file.mode == 0o400
    assert c.configs[0].config_name == "cfg"
    assert c.mounts[0].type == types_pb2.Mount.TMPFS and c.mounts[0].tmpfs_options.size_bytes == 16 << 20
    assert list(c.hosts) == ["10.0.0.2 db"] and list(c.dns_config.nameservers) == ["1.1.1.1"]
    assert list(c.capability_add) == ["NET_ADMIN"] and dict(c.sysctls) == {"a.b": "1"}
    assert [(u.name, u.soft, u.hard) for u in c.ulimits] == [("nofile", 1024, 2048)]
    assert dict(t.log_driver.options) == {"max-size": "1m"}


def test_create_image_mode_and_command() -> None:
    spec = create("--mode", "global", "busybox", "sh", "-c", "sleep 1000")
    assert spec.WhichOneof("mode") == "global" and list(spec.task.container.args) == ["sh", "-c", "sleep 1000"]
    spec = create("--image", "busybox", "--command", "sh -c", "--args", "echo hi")
    assert list(spec.task.container.command) == ["sh", "-c"] and list(spec.task.container.args) == ["echo", "hi"]
    assert create("--image", "busybox", "busybox").task.container.image == "busybox"
    assert create("busybox").replicated.replicas == 1
    assert list(create("--no-healthcheck", "busybox").task.container.healthcheck.test) == ["NONE"]
    for flags, match in ((["--image", "a", "b"], "two images given"), ([], "no image given"),
                         (["--mode", "global", "--replicas", "2", "busybox"], "only be used with replicated mode"),
                         (["--label", "=x", "busybox"], "invalid label '=x'"),
                         (["--network", "name=n,colour=red", "busybox"], "unknown network option 'colour'")):
        with pytest.raises(CliError, match=match):
            create(*flags)


def test_registry_auth_from_docker_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    auth = base64.b64encode(b"me:secret").decode()
    (tmp_path / "config.json").write_text(json.dumps({"auths": {"reg.example:5000": {"auth": auth}}}))
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path))
    spec = create("--with-registry-auth", "reg.example:5000/app:1")
    creds = json.loads(base64.urlsafe_b64decode(spec.task.container.pull_options.registry_auth))
    assert creds == {"username": "me", "password": "secret", "serveraddress": "reg.example:5000"}
    assert json.loads(base64.urlsafe_b64decode(servicespec.registry_auth("busybox"))) == {}


def test_update_removes_then_adds() -> None:
    spec = create("--env", "A=1", "-e", "B=2", "-p", "8080:80", "-p", "53/udp", "--constraint", "node.role==manager",
                  "--network", "net-id-1", "--mount", "type=tmpfs,target=/cache", "--replicas", "3", "busybox")
    update(spec, "--env-add", "C=3", "--env-rm", "A", "--env-add", "B=20", "--publish-rm", "80",
           "--constraint-rm", "node.role==manager", "--replicas", "2", "--network-rm", "front",
           "--network-add", "back", "--mount-rm", "/cache", "--force", network_ids={"front": "net-id-1"})
    c = spec.task.container
    assert list(c.env) == ["C=3", "B=20"] and spec.replicated.replicas == 2
    assert [(p.target_port, p.protocol) for p in spec.endpoint.ports] == [(53, types_pb2.PortConfig.UDP)]
    assert not spec.task.placement.constraints and not c.mounts
    assert [n.target for n in spec.task.networks] == ["back"]  # removed by name, via its id
    assert spec.task.force_update == 1
    update(spec, "--no-init", "--image", "busybox:2")
    assert c.init is False and c.image == "busybox:2"
    with pytest.raises(CliError, match="--publish-rm"):
        update(spec, "--publish-rm", "http")


def test_update_keeps_what_no_flag_names() -> None:
    spec = create("--name", "web", "--env", "A=1", "--replicas", "3", "--restart-delay", "2s", "busybox")
    before = specs_pb2.ServiceSpec()
    before.CopyFrom(spec)
    update(spec)
    assert spec == before
