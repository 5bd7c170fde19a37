"""Error messages: file, line, key path and what is allowed; Docker's forbidden and ignored options."""

from __future__ import annotations

import pytest

from shoal.compose import ComposeError


def _err(load_text, text: str, **kw) -> str:
    with pytest.raises(ComposeError) as info:
        load_text(text, **kw)
    msg = str(info.value)
    # Always: "<file>:<line> <path>: <sentence>"
    return msg.split("/stack.yml:", 1)[1] if "/stack.yml:" in msg else msg


def test_replicas_not_a_number(load_text) -> None:
    text = "services:\n  web:\n    image: nginx\n" + "\n" * 8 + (
        "    deploy:\n"
        "      mode: replicated\n"
        "      replicas: three\n")
    assert _err(load_text, text) == '14 services.web.deploy.replicas: expected a non-negative integer, got "three"'


@pytest.mark.parametrize("text,expected", [
    ("services:\n  web:\n    image: nginx\n    deploy: {replicas: -1}\n",
     "4 services.web.deploy.replicas: expected a non-negative integer, got -1"),
    ("services:\n  web:\n    image: nginx\n    deploy:\n      mode: global\n      replicas: 2\n",
     "6 services.web.deploy.replicas: replicas can only be used with replicated mode; remove replicas: or use "
     "mode: replicated"),
    ("services:\n  web:\n    image: nginx\n    deploy: {mode: replicated-job}\n",
     '4 services.web.deploy.mode: mode "replicated-job" (jobs) is not supported by Shoal; allowed: replicated, '
     "global"),
    ("services:\n  web:\n    image: nginx\n    deploy: {mode: sometimes}\n",
     '4 services.web.deploy.mode: unknown mode "sometimes"; allowed: replicated, global'),
    ("services:\n  web:\n    image: nginx\n    deploy:\n      restart_policy: {condition: always}\n",
     '5 services.web.deploy.restart_policy.condition: unknown condition "always"; allowed: none, on-failure, any'),
    ("services:\n  web:\n    image: nginx\n    stop_grace_period: 10\n",
     '4 services.web.stop_grace_period: expected a duration such as "10s", "1m30s" or "1h", got 10'),
    ("services:\n  web:\n    image: nginx\n    deploy:\n      resources:\n        limits:\n          memory: lots\n",
     '7 services.web.deploy.resources.limits.memory: expected a size in bytes such as 1024, "100k", "512m" or '
     '"1gb", got "lots"'),
    ("services:\n  web:\n    image: nginx\n    deploy:\n      resources:\n        limits: {cpus: many}\n",
     '6 services.web.deploy.resources.limits.cpus: expected a number of CPUs such as 2 or "0.5", got "many"'),
    ("services:\n  web:\n    image: nginx\n    ports: ['80:80:80:80']\n",
     '4 services.web.ports[0]: invalid port "80:80:80:80"; expected [[IP:]PUBLISHED:]TARGET[/PROTOCOL] such as '
     '"8080:80" or "53:53/udp", or the long syntax with target:'),
    ("services:\n  web:\n    image: nginx\n    ports:\n      - 70000\n",
     '5 services.web.ports[0]: port "70000" is out of range; ports are 1-65535 and ranges are written low-high'),
    ("services:\n  web:\n    image: nginx\n    ports:\n      - published: 80\n",
     "5 services.web.ports[0]: a port in long syntax needs target: (the port inside the container)"),
    ("services:\n  web:\n    image: nginx\n    ports: ['80/icmp']\n",
     '4 services.web.ports[0]: unknown protocol "icmp"; allowed: tcp, udp, sctp'),
    ("services:\n  web:\n    image: nginx\n    volumes: ['data:relative']\n",
     '4 services.web.volumes[0]: invalid volume "data:relative": the target "relative" must be an absolute path '
     "in the container"),
    ("services:\n  web:\n    image: nginx\n    volumes: ['data:/d:bogus']\n",
     '4 services.web.volumes[0]: unknown volume mode "bogus" in "data:/d:bogus"; allowed: ro, rw, z, Z, nocopy, '
     "shared, rshared, slave, rslave, private, rprivate, consistent, cached, delegated"),
    ("services:\n  web:\n    image: nginx\n    volumes: ['data:/d']\n",
     '4 services.web.volumes: volume "data" is not defined; declare it under the top-level volumes: (or use a '
     'path starting with "/", "./" or "~" for a bind mount)'),
    ("services:\n  web:\n    image: nginx\n    volumes:\n      - type: npipe\n        target: /x\n",
     '5 services.web.volumes[0].type: volume type "npipe" is not supported by stack deploy; allowed: volume, '
     "bind, tmpfs"),
    ("services:\n  web:\n    image: nginx\n    secrets: [nope]\n",
     '4 services.web.secrets: secret "nope" is not defined; declare it under the top-level secrets:'),
    ("services:\n  web:\n    image: nginx\n    configs: [{target: /x}]\n",
     "4 services.web.configs[0]: a config reference needs source: (the name of a top-level config)"),
    ("services:\n  web:\n    image: nginx\n    imgae: nginx\n",
     '4 services.web.imgae: unknown service option (did you mean "image"?); see the Compose file reference for '
     "the options a service takes"),
    ("services:\n  web:\n    image: nginx\n    deploy:\n      replica: 2\n",
     '5 services.web.deploy.replica: unknown option (did you mean "replicas"?); allowed here: endpoint_mode, '
     "labels, mode, placement, replicas, resources, restart_policy, rollback_config, update_config"),
    ("services:\n  web:\n    image: nginx\n    healthcheck:\n      test: [RUN, x]\n",
     '5 services.web.healthcheck.test: a test list starts with "CMD", "CMD-SHELL" or "NONE", got "RUN"'),
    ("services:\n  web:\n    image: nginx\n    deploy:\n      placement:\n        constraints: [zone=a]\n",
     '6 services.web.deploy.placement.constraints[0]: invalid constraint "zone=a"; expected KEY==VALUE or '
     'KEY!=VALUE such as "node.role==manager" or "node.labels.zone==a"'),
    ("services:\n  web:\n    image: nginx\n    deploy:\n      update_config: {order: random}\n",
     '5 services.web.deploy.update_config.order: unknown order "random"; allowed: stop-first, start-first'),
    ("services:\n  web:\n    image: nginx\n    deploy:\n      update_config: {max_failure_ratio: 2}\n",
     "5 services.web.deploy.update_config.max_failure_ratio: expected a number from 0 to 1, got 2"),
    ("services:\n  web:\n    image: Nginx\n",
     '3 services.web.image: invalid image reference "Nginx"; use [registry/]repository[:tag][@digest] with a '
     "lower-case repository"),
    ("services:\n  web:\n    build: .\n",
     "2 services.web: has no image; `stack deploy` needs an image for every service (build is not supported: "
     "build and push the image, then set image:)"),
    ("services:\n  web:\n    hostname: x\n",
     "2 services.web: has no image; set image: (such as nginx:1.25)"),
    ("services:\n  web:\n    image: nginx\n    networks: [front]\n",
     '4 services.web.networks: network "front" is not defined; declare it under the top-level networks:'),
    ("services:\n  web:\n    image: nginx\nnetworks:\n  ext:\n    external: true\n    driver: overlay\n",
     '7 networks.ext.driver: conflicting options "external" and "driver"; an external network is created '
     "outside the stack"),
    ("services:\n  web:\n    image: nginx\nsecrets:\n  s: {}\n",
     "5 secrets.s: a secret needs file:, environment: or external: true"),
    ("services:\n  web:\n    image: nginx\nsecrets:\n  s: {file: a, environment: B}\n",
     "5 secrets.s.environment: a secret takes only one of file:, environment: or external: true"),
    ("version: '2.4'\nservices:\n  web:\n    image: nginx\n",
     '1 version: unsupported Compose file version "2.4"; stack files use version 3.x or no version at all '
     "(the Compose Specification)"),
    ("services:\n  web:\n    image: nginx\nfoo: 1\n",
     "4 foo: unknown option; allowed here: configs, models, name, networks, secrets, services, version, volumes"),
    ("services: [web]\n",
     '1 services: expected a mapping of service names to services, got a list'),
    ("services:\n  web:\n    image: nginx\n    restart: sometimes\n",
     '4 services.web.restart: unknown restart policy "sometimes"; allowed: "no", always, on-failure[:N], '
     "unless-stopped (better: deploy.restart_policy)"),
    ("services:\n  web:\n    image: nginx\n    ulimits:\n      nofile: {soft: 10, hard: 5}\n",
     "5 services.web.ulimits.nofile: soft limit 10 is above hard limit 5"),
    ("services:\n  web:\n    image: nginx\n    environment: 5\n",
     "4 services.web.environment: expected a mapping or a list of KEY=VALUE strings, got 5"),
    ("services:\n  web:\n    image: nginx\n    command: 'echo \"unclosed'\n",
     "4 services.web.command: cannot split the command into words: No closing quotation"),
    ("services:\n  web:\n    image: nginx\n    environment:\n      - X=$\n",
     "5 services.web.environment[0]: a lone '$' at the end; write '$$' for a literal '$' (in 'X=$')"),
    ("services:\n  'bad name!':\n    image: nginx\n",
     '2 services.bad name!: invalid service name "bad name!"; use letters, digits, "_", "." and "-", starting '
     "with a letter or digit"),
    ("",
     "1: the file is empty; a stack file needs at least a services: section"),
])
def test_error_messages(load_text, text: str, expected: str) -> None:
    assert _err(load_text, text) == expected


@pytest.mark.parametrize("key,reason", [
    ("mem_limit", "Set resource limits using deploy.resources"),
    ("cpu_shares", "Set resource limits using deploy.resources"),
    ("volumes_from", "To share a volume between services"),
    ("extends", "Support for `extends` is not implemented yet."),
])
def test_forbidden_options_are_rejected(load_text, key: str, reason: str) -> None:
    msg = _err(load_text, f"services:\n  web:\n    image: nginx\n    {key}: x\n")
    assert msg.startswith(f"4 services.web.{key}: not supported by stack deploy: {reason}")


def test_ignored_options_warn_like_docker(load_text) -> None:
    p = load_text("""
        services:
          web:
            image: nginx
            build: .
            restart: always
            privileged: true
            network_mode: host
            container_name: web
            expose: [80]
            depends_on: [db]
            platform: linux/amd64
          db:
            image: postgres
            links: [web]
            security_opt: [seccomp=unconfined]
        """)
    assert p.warnings == [
        "Ignoring unsupported options: build, links, network_mode, platform, privileged, restart, security_opt",
        "Ignoring deprecated options:\n\n"
        "container_name: Setting the container name is not supported.\n\n"
        "expose: Exposing ports is unnecessary - services on the same network can access each other's "
        "containers on any port.",
    ]


def test_other_warnings(load_text) -> None:
    p = load_text("""
        services:
          web:
            image: nginx
            networks:
              front: {ipv4_address: 10.0.0.9}
        networks:
          front: {enable_ipv6: true}
          old: {external: {name: legacy}}
        volumes:
          v: {external: {name: legacy-vol}}
        """)
    assert p.warnings == [
        "Ignoring unsupported options: networks.front.enable_ipv6, networks.ipv4_address",
        "network old: network.external.name is deprecated in favor of network.name",
        "volume v: volume.external.name is deprecated in favor of volume.name",
    ]
    assert p.networks["old"].name == "legacy" and p.volumes["v"].name == "legacy-vol"


@pytest.mark.parametrize("text", [
    'services: {a: {image: x, env_file: "a\\0b"}}\n',
    'services: {a: {image: x, volumes: ["./a\\0b:/x"]}}\n',
    'services: {a: {image: x}}\nsecrets: {s: {file: "a\\0b"}}\n',
])
def test_nul_in_paths(load_text, text: str) -> None:
    assert "a path cannot contain a NUL character" in _err(load_text, text)


@pytest.mark.parametrize("text", [
    'services: {a: {image: x, hostname: "\\ud800"}}\n',
    'services: {a: {image: x, labels: {"\\udc00": b}}}\n',
])
def test_lone_surrogates_are_refused(load_text, text: str) -> None:
    assert "invalid character (a lone UTF-16 surrogate" in _err(load_text, text)


@pytest.mark.parametrize("text,fragment", [
    ("services: {a: {image: !!binary aGVsbG8=}}\n", 'services.a.image: expected a string, got bytes'),
    ("services: {a: {image: !Ref x}}\n", "invalid YAML: could not determine a constructor for the tag '!Ref'"),
    ("a: 1\n---\nb: 2\n", "a stack file holds one YAML document; found several (---)"),
])
def test_unusual_yaml(load_text, text: str, fragment: str) -> None:
    assert fragment in _err(load_text, text)


def test_object_names_are_checked(load_text) -> None:
    assert _err(load_text, "services: {a: {image: x}}\nnetworks:\n  'my net':\n") == (
        '3 networks.my net: invalid network name "my net"; use letters, digits, "_", "." and "-", starting with '
        "a letter or digit")


@pytest.mark.parametrize("text,expected", [
    ("services:\n  a:\n    image: x\n    deploy:\n      placement:\n        constraints: [node.zone==a]\n",
     '6 services.a.deploy.placement.constraints[0]: unknown constraint key "node.zone"; allowed: node.id, '
     "node.hostname, node.role, node.platform.os, node.platform.arch, node.labels.NAME or engine.labels.NAME"),
    ("services:\n  a:\n    image: x\n    deploy:\n      placement:\n        constraints: [node.role==boss]\n",
     '6 services.a.deploy.placement.constraints[0]: node.role is manager or worker, got "boss"'),
    ("services:\n  a:\n    image: x\n    deploy:\n      placement:\n        preferences:\n          - spread: zone\n",
     '7 services.a.deploy.placement.preferences[0].spread: cannot spread over "zone"; allowed: node.id, '
     "node.hostname, node.role, node.platform.os, node.platform.arch, node.labels.NAME or engine.labels.NAME"),
    ("services:\n  a:\n    image: x\n    deploy:\n      rollback_config:\n        failure_action: rollback\n",
     "6 services.a.deploy.rollback_config.failure_action: a rollback cannot roll back; allowed here: pause, "
     "continue"),
    ("services:\n  a:\n    image: x\n    secrets: [s, {source: s, target: s}]\nsecrets: {s: {file: f}}\n",
     '4 services.a.secrets[1]: target "s" is used twice; give each secret its own file'),
    ("services:\n  a:\n    image: x\n    configs:\n      - {source: c, target: ../etc/passwd}\n"
     "configs: {c: {content: x}}\n",
     '5 services.a.configs[0].target: "../etc/passwd" contains ".."; give a plain file name or path'),
    ("services:\n  a:\n    image: x\n    secrets:\n      - {source: s, uid: root}\nsecrets: {s: {file: f}}\n",
     '5 services.a.secrets[0].uid: expected a numeric id, got "root"'),
    ("services:\n  a:\n    image: x\n    environment:\n      'MY VAR': 1\n",
     '4 services.a.environment: invalid variable name "MY VAR"; use KEY=VALUE with a KEY without spaces'),
    ("services:\n  a:\n    image: x\n    hostname: web_01!\n",
     '4 services.a.hostname: "web_01!" is not a valid host name; use letters, digits and "-" in dot-separated '
     "parts of at most 63 characters"),
    ("services:\n  a:\n    image: x\n    working_dir: srv\n",
     '4 services.a.working_dir: expected an absolute path in the container, got "srv"'),
    ("services:\n  a:\n    image: x\n    stop_signal: SIGNOPE\n",
     '4 services.a.stop_signal: expected a signal name such as "SIGTERM" or a number 1-64, got "SIGNOPE"'),
    ("services:\n  a:\n    image: x\n    dns: [8.8.8]\n",
     '4 services.a.dns[0]: expected an IP address of a DNS server, got "8.8.8"'),
    ("services:\n  a:\n    image: x\n    extra_hosts: ['db:not-an-ip']\n",
     '4 services.a.extra_hosts[0]: expected "HOST:IP" with an IP address (got "db:not-an-ip"), got "not-an-ip"'),
    ("services:\n  a:\n    image: x\n    cap_add: ['NET ADMIN']\n",
     '4 services.a.cap_add[0]: expected a capability such as NET_ADMIN, CAP_SYS_TIME or ALL, got "NET ADMIN"'),
    ("services:\n  a:\n    image: x\n    labels: {'-bad': x}\n",
     '4 services.a.labels: invalid label key "-bad"; use letters, digits, ".", "_", "-", "/" and ":", starting '
     "and ending with a letter or digit"),
    ("services:\n  a:\n    image: x\n    healthcheck:\n      test: [CMD, 'true']\n      interval: 10us\n",
     "6 services.a.healthcheck.interval: too short; give 0 (the default) or at least 1ms"),
    ("services:\n  a:\n    image: x\n    deploy:\n      resources:\n        limits: {memory: 1m}\n",
     '6 services.a.deploy.resources.limits.memory: too small; give at least 4MiB ("4m")'),
    ("services:\n  a:\n    image: x\n    networks:\n      n: {aliases: [web_01!]}\nnetworks: {n: }\n",
     '5 services.a.networks.n.aliases[0]: "web_01!" is not a valid network alias; use letters, digits and "-" '
     "in dot-separated parts of at most 63 characters"),
])
def test_checks_the_control_api_would_make(load_text, text: str, expected: str) -> None:
    assert _err(load_text, text) == expected


def test_bare_variable_without_value_is_left_out(load_text) -> None:
    p = load_text("services:\n  a:\n    image: x\n    environment: [SET, UNSET, EMPTY=]\n", environment={"SET": "1"})
    assert p.services["a"].environment == {"SET": "1", "EMPTY": ""}
    assert p.warnings[-1].endswith('stack.yml:4 services.a.environment: "UNSET" has no value and is not set in the '
                                   "environment; it is left out")
