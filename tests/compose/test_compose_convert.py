"""Conversion of a loaded stack into protobuf specs (docker stack deploy semantics)."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers.paths import SHARED

from shoal.compose import ComposeError, convert, load
from shoal.proto import types_pb2

FULL = """
version: "3.9"
x-logging: &logging
  logging:
    driver: json-file
    options: {max-size: 10m}
services:
  web:
    <<: *logging
    image: nginx:1.25
    command: nginx -g 'daemon off;'
    entrypoint: [/docker-entrypoint.sh]
    environment: [MODE=prod, FROM_SHELL]
    labels: {team: core}
    user: "101:101"
    working_dir: /srv
    hostname: web-host
    healthcheck:
      test: curl -f http://localhost/
      interval: 1m30s
      timeout: 10s
      retries: 3
      start_period: 5s
      start_interval: 1s
    stop_grace_period: 1m
    stop_signal: SIGQUIT
    tmpfs: ["/run:size=64m,mode=1777"]
    cap_add: [net_admin, CAP_SYS_TIME]
    cap_drop: [all]
    sysctls: {net.core.somaxconn: 1024}
    ulimits:
      nproc: 65535
      nofile: {soft: 20000, hard: 40000}
    dns: [9.9.9.9]
    dns_search: example.org
    dns_opt: [ndots:2]
    extra_hosts: ["db.local:10.0.0.5"]
    init: true
    read_only: true
    ports:
      - "8080:80"
      - "53:53/udp"
      - {target: 8443, published: 18443, mode: host}
    volumes:
      - data:/var/lib/data
      - ./conf:/etc/conf:ro
      - {type: tmpfs, target: /cache, tmpfs: {size: 100k}}
    secrets:
      - db_pass
      - {source: api_key, target: /etc/api.key, uid: "101", mode: 0400}
    configs:
      - {source: nginx_conf, target: /etc/nginx/nginx.conf}
    networks:
      front: {aliases: [www]}
      back:
    deploy:
      replicas: 3
      labels: [tier=frontend]
      placement:
        constraints: [node.role==worker]
        preferences: [{spread: node.labels.zone}]
        max_replicas_per_node: 2
      resources:
        limits: {cpus: '0.5', memory: 512m, pids: 100}
        reservations:
          cpus: 0.25
          memory: 256m
          generic_resources: [{discrete_resource_spec: {kind: gpu, value: 2}}]
      restart_policy: {condition: on-failure, delay: 5s, max_attempts: 3, window: 2m}
      update_config: {parallelism: 2, delay: 10s, failure_action: rollback, monitor: 30s,
                      max_failure_ratio: 0.1, order: start-first}
      rollback_config: {order: stop-first}
  worker:
    image: busybox
    command: [sleep, "3600"]
    deploy: {mode: global, endpoint_mode: dnsrr}
    secrets: [ext_secret]
    networks: [outside]
  plain:
    image: busybox
    restart: on-failure:4
networks:
  front:
    attachable: true
    labels: {net: front}
    driver_opts: {encrypted: ""}
    ipam: {config: [{subnet: 10.20.0.0/24}]}
  back: {internal: true}
  outside: {external: true, name: shared-net}
  unused: {}
volumes:
  data: {driver_opts: {type: none}, labels: {v: "1"}}
secrets:
  db_pass: {file: ./db_pass.txt}
  api_key: {environment: API_KEY, name: my-api-key}
  ext_secret: {external: true}
  unused_ext: {external: true}
configs:
  nginx_conf: {file: nginx.conf, labels: {c: "1"}}
  inline: {content: "hello"}
"""


@pytest.fixture
def stack(write, stackdir: Path):
    (stackdir / "db_pass.txt").write_text("s3cret\n")
    (stackdir / "nginx.conf").write_text("server {}\n")
    path = write("stack.yml", FULL)
    project = load([path], environment={"FROM_SHELL": "sh", "API_KEY": "k3y"})
    return convert(project, "demo")


def test_names_labels_and_objects(stack, stackdir: Path) -> None:
    assert list(stack.services) == ["demo_plain", "demo_web", "demo_worker"]
    assert list(stack.networks) == ["demo_back", "demo_default", "demo_front"]   # only networks in use
    assert stack.external_networks == ["shared-net"]
    assert stack.external_secrets == ["ext_secret"]                             # only external ones in use
    assert stack.external_configs == []
    assert {k: v.data for k, v in stack.secrets.items()} == {"demo_db_pass": b"s3cret\n", "my-api-key": b"k3y"}
    assert {k: v.data for k, v in stack.configs.items()} == {"demo_inline": b"hello",
                                                             "demo_nginx_conf": b"server {}\n"}
    assert dict(stack.configs["demo_nginx_conf"].annotations.labels) == {
        "c": "1", "com.docker.stack.namespace": "demo"}
    front = stack.networks["demo_front"]
    assert front.driver_config.name == "overlay" and dict(front.driver_config.options) == {"encrypted": ""}
    assert front.attachable and not front.internal
    assert [c.subnet for c in front.ipam.configs] == ["10.20.0.0/24"]
    assert dict(front.annotations.labels) == {"net": "front", "com.docker.stack.namespace": "demo"}
    assert stack.networks["demo_back"].internal


def test_service_spec(stack, stackdir: Path) -> None:
    web = stack.services["demo_web"]
    assert dict(web.annotations.labels) == {"tier": "frontend", "com.docker.stack.namespace": "demo",
                                            "com.docker.stack.image": "nginx:1.25"}
    c = web.task.container
    assert c.image == "nginx:1.25"
    assert dict(c.labels) == {"team": "core", "com.docker.stack.namespace": "demo"}
    assert list(c.command) == ["/docker-entrypoint.sh"]
    assert list(c.args) == ["nginx", "-g", "daemon off;"]
    assert list(c.env) == ["FROM_SHELL=sh", "MODE=prod"]
    assert (c.user, c.dir, c.hostname, c.stop_signal) == ("101:101", "/srv", "web-host", "SIGQUIT")
    assert c.stop_grace_period.ToSeconds() == 60
    assert c.read_only and c.HasField("init") and c.init
    assert list(c.healthcheck.test) == ["CMD-SHELL", "curl -f http://localhost/"]
    assert (c.healthcheck.interval.ToSeconds(), c.healthcheck.timeout.ToSeconds(), c.healthcheck.retries,
            c.healthcheck.start_period.ToSeconds(), c.healthcheck.start_interval.ToSeconds()) == (90, 10, 3, 5, 1)
    assert list(c.capability_add) == ["CAP_NET_ADMIN", "CAP_SYS_TIME"]
    assert list(c.capability_drop) == ["ALL"]
    assert dict(c.sysctls) == {"net.core.somaxconn": "1024"}
    assert [(u.name, u.soft, u.hard) for u in c.ulimits] == [("nofile", 20000, 40000), ("nproc", 65535, 65535)]
    assert (list(c.dns_config.nameservers), list(c.dns_config.search), list(c.dns_config.options)) == (
        ["9.9.9.9"], ["example.org"], ["ndots:2"])
    assert list(c.hosts) == ["10.0.0.5 db.local"]
    mounts = [(m.type, m.source, m.target, m.readonly) for m in c.mounts]
    assert mounts == [
        (types_pb2.Mount.VOLUME, "demo_data", "/var/lib/data", False),
        (types_pb2.Mount.BIND, str(stackdir / "conf"), "/etc/conf", True),
        (types_pb2.Mount.TMPFS, "", "/cache", False),
        (types_pb2.Mount.TMPFS, "", "/run", False),
    ]
    assert dict(c.mounts[0].volume_options.labels) == {"v": "1", "com.docker.stack.namespace": "demo"}
    assert dict(c.mounts[0].volume_options.driver_config.options) == {"type": "none"}
    assert c.mounts[2].tmpfs_options.size_bytes == 102400
    assert (c.mounts[3].tmpfs_options.size_bytes, c.mounts[3].tmpfs_options.mode) == (64 * 1024**2, 0o1777)
    assert [(s.secret_name, s.secret_id, s.file.name, s.file.uid, s.file.gid, s.file.mode) for s in c.secrets] == [
        ("demo_db_pass", "", "db_pass", "0", "0", 0o444), ("my-api-key", "", "/etc/api.key", "101", "0", 0o400)]
    assert [(x.config_name, x.file.name) for x in c.configs] == [("demo_nginx_conf", "/etc/nginx/nginx.conf")]

    t = web.task
    assert (t.resources.limits.nano_cpus, t.resources.limits.memory_bytes, t.resources.pids_limit) == (
        500_000_000, 512 * 1024**2, 100)
    assert (t.resources.reservations.nano_cpus, t.resources.reservations.memory_bytes) == (250_000_000,
                                                                                      256 * 1024**2)
    assert [(g.kind, g.value) for g in t.resources.reservations.generic] == [("gpu", 2)]
    assert (t.restart.condition, t.restart.delay.ToSeconds(), t.restart.max_attempts,
            t.restart.window.ToSeconds()) == (types_pb2.RestartPolicy.ON_FAILURE, 5, 3, 120)
    assert list(t.placement.constraints) == ["node.role==worker"]
    assert [p.spread_descriptor for p in t.placement.preferences] == ["node.labels.zone"]
    assert t.placement.max_replicas == 2
    assert [(n.target, list(n.aliases)) for n in t.networks] == [("demo_back", ["web"]),
                                                                 ("demo_front", ["www", "web"])]
    assert (t.log_driver.name, dict(t.log_driver.options)) == ("json-file", {"max-size": "10m"})

    assert web.WhichOneof("mode") == "replicated" and web.replicated.replicas == 3
    u = web.update
    assert (u.parallelism, u.delay.ToSeconds(), u.failure_action, u.monitor.ToSeconds(), u.order) == (
        2, 10, types_pb2.UpdateConfig.ROLLBACK, 30, types_pb2.UpdateConfig.START_FIRST)
    assert abs(u.max_failure_ratio - 0.1) < 1e-6
    assert web.rollback.parallelism == 1 and web.rollback.order == types_pb2.UpdateConfig.STOP_FIRST
    assert web.endpoint.mode == types_pb2.EndpointSpec.VIP
    assert [(p.protocol, p.target_port, p.published_port, p.publish_mode) for p in web.endpoint.ports] == [
        (types_pb2.PortConfig.TCP, 80, 8080, types_pb2.PortConfig.INGRESS),
        (types_pb2.PortConfig.TCP, 8443, 18443, types_pb2.PortConfig.HOST),
        (types_pb2.PortConfig.UDP, 53, 53, types_pb2.PortConfig.INGRESS),
    ]


def test_other_modes_and_defaults(stack) -> None:
    worker = stack.services["demo_worker"]
    assert worker.WhichOneof("mode") == "global"
    assert worker.endpoint.mode == types_pb2.EndpointSpec.DNSRR
    assert [n.target for n in worker.task.networks] == ["shared-net"]
    assert [s.secret_name for s in worker.task.container.secrets] == ["ext_secret"]
    plain = stack.services["demo_plain"]
    assert plain.replicated.replicas == 1                      # Docker's default
    assert [n.target for n in plain.task.networks] == ["demo_default"]
    assert not plain.task.container.HasField("init")
    # restart: is ignored with a warning but, like Docker, used when deploy.restart_policy is absent.
    assert (plain.task.restart.condition, plain.task.restart.max_attempts) == (types_pb2.RestartPolicy.ON_FAILURE, 4)
    assert not plain.HasField("update")


def test_conversion_is_deterministic(write, stackdir: Path) -> None:
    (stackdir / "db_pass.txt").write_text("s3cret\n")
    (stackdir / "nginx.conf").write_text("server {}\n")
    path = write("stack.yml", FULL)
    env = {"FROM_SHELL": "sh", "API_KEY": "k3y"}
    a = convert(load([path], environment=env), "demo")
    b = convert(load([path], environment=env), "demo")
    for name in a.services:
        assert a.services[name].SerializeToString(deterministic=True) == \
            b.services[name].SerializeToString(deterministic=True)


def test_missing_secret_file(load_text) -> None:
    p = load_text("services: {a: {image: x, secrets: [s]}}\nsecrets:\n  s:\n    file: ./nothere.txt\n")
    with pytest.raises(ComposeError) as info:
        convert(p, "st")
    assert "stack.yml:4 secrets.s.file: cannot read " in str(info.value)
    assert "nothere.txt\": No such file or directory" in str(info.value)


def test_secret_from_unset_environment(load_text) -> None:
    p = load_text("services: {a: {image: x}}\nsecrets:\n  s:\n    environment: TOKEN\n")
    with pytest.raises(ComposeError) as info:
        convert(p, "st")
    assert str(info.value).endswith(
        'stack.yml:4 secrets.s.environment: environment variable "TOKEN" is not set; set it before deploying')


def test_dnsrr_with_ingress_port(load_text) -> None:
    p = load_text("services:\n  a:\n    image: x\n    ports: ['80:80']\n    deploy: {endpoint_mode: dnsrr}\n")
    with pytest.raises(ComposeError) as info:
        convert(p, "st")
    assert str(info.value).endswith(
        "stack.yml:4 services.a.ports: port 80 is published in ingress mode, which needs endpoint_mode: vip; "
        "publish it with mode: host or remove endpoint_mode: dnsrr")


def test_duplicate_published_port(load_text) -> None:
    p = load_text("services:\n  a:\n    image: x\n    ports: ['80:80', '80:81']\n")
    with pytest.raises(ComposeError, match="published port 80 is given twice"):
        convert(p, "st")


@pytest.mark.parametrize("name", ["", "has space", "a.b", "-lead", "x" * 64])
def test_bad_stack_names(load_text, name: str) -> None:
    p = load_text("services: {a: {image: x}}\n")
    with pytest.raises(ComposeError, match="invalid stack name"):
        convert(p, name)


def test_service_name_not_valid_in_swarm(load_text) -> None:
    p = load_text("services:\n  web.v2:\n    image: x\n")
    with pytest.raises(ComposeError) as info:
        convert(p, "st")
    assert 'stack.yml:2 services.web.v2: service name "st_web.v2" is not valid in a swarm' in str(info.value)


def test_host_ip_warns(load_text) -> None:
    p = load_text("services:\n  a:\n    image: x\n    ports: ['127.0.0.1:80:80']\n")
    stack = convert(p, "st")
    assert len(stack.warnings) == 1 and "host_ip 127.0.0.1 is ignored" in stack.warnings[0]


def test_default_network_can_be_configured(load_text) -> None:
    p = load_text("services: {a: {image: x}}\nnetworks:\n  default:\n    driver_opts: {encrypted: ''}\n")
    stack = convert(p, "st")
    assert dict(stack.networks["st_default"].driver_config.options) == {"encrypted": ""}


def test_compose_does_not_import_grpc() -> None:
    import subprocess
    import sys

    code = "import sys, shoal.compose; sys.exit(1 if any(m.startswith('grpc') for m in sys.modules) else 0)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_max_replicas_with_global(load_text) -> None:
    p = load_text("services:\n  a:\n    image: x\n    deploy:\n      mode: global\n      placement:\n"
                  "        max_replicas_per_node: 1\n")
    with pytest.raises(ComposeError) as info:
        convert(p, "st")
    assert str(info.value).endswith("stack.yml:7 services.a.deploy.placement.max_replicas_per_node: "
                                    "max_replicas_per_node can only be used with replicated mode; a global service "
                                    "runs one task per node already")


def test_port_published_by_two_services(load_text) -> None:
    p = load_text("services:\n  a:\n    image: x\n    ports: ['80:80']\n  b:\n    image: x\n    ports: ['80:8080']\n"
                  "  c:\n    image: x\n    ports: ['80:80/udp']\n")
    with pytest.raises(ComposeError) as info:
        convert(p, "st")
    assert str(info.value).endswith('stack.yml:7 services.b.ports: published port 80/tcp is already published by '
                                    'service "a"; publish each port once per stack')


@pytest.mark.parametrize("text,expected", [
    ("services:\n  a:\n    image: x\n    deploy:\n      resources:\n        limits: {memory: 64m}\n"
     "        reservations: {memory: 128m}\n",
     "7 services.a.deploy.resources.reservations.memory: the memory reservation is larger than the memory limit; "
     "reserve at most the limit"),
    ("services:\n  a:\n    image: x\n    volumes: ['v:/d', '/host:/d']\nvolumes: {v: }\n",
     '4 services.a.volumes: mount target "/d" is used twice; mount one thing per path'),
    ("services:\n  a:\n    image: x\n    networks: [n1, n2]\nnetworks:\n  n1: {name: same}\n  n2: {name: same}\n",
     '4 services.a.networks: network "same" is attached twice (two stack networks have that name); attach it '
     "once"),
])
def test_conversion_errors(load_text, text: str, expected: str) -> None:
    p = load_text(text)
    with pytest.raises(ComposeError) as info:
        convert(p, "st")
    assert str(info.value).split("/stack.yml:", 1)[1] == expected


def test_specs_pass_the_control_api_validation(write, stackdir: Path) -> None:
    """Cross-check with the manager's own validation of incoming specs (tests only: compose does not
    import the manager)."""
    from shoal.manager import validation

    (stackdir / "db_pass.txt").write_text("s3cret\n")
    (stackdir / "nginx.conf").write_text("server {}\n")
    stacks = [convert(load([write("stack.yml", FULL)], environment={"FROM_SHELL": "sh", "API_KEY": "k"}), "demo")]
    examples = SHARED / "compose" / "examples"
    for f in sorted(examples.iterdir()):
        try:
            stacks.append(convert(load([f], environment={"PLEX_MEDIA_PATH": "/srv", "HOME": "/home/u"}), "st"))
        except ComposeError:
            continue
    assert len(stacks) > 10
    for stack in stacks:
        for spec in stack.services.values():
            validation.validate_service_spec(spec)
        for net in stack.networks.values():
            validation.validate_network_spec(net)  # encrypted overlay networks included
        for sec in stack.secrets.values():
            validation.validate_secret_spec(sec)
        for cfg in stack.configs.values():
            validation.validate_config_spec(cfg)
