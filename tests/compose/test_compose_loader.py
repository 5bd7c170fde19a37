"""Loader: YAML features, interpolation, env files, short/long syntax, units, merging of files."""

from __future__ import annotations

from pathlib import Path

import pytest

from shoal.compose import ComposeError, ComposeSource, load
from shoal.compose.interpolate import InterpolationError, substitute
from shoal.compose.units import format_duration, parse_bytes, parse_cpus, parse_duration

# ---------------------------------------------------------------- interpolation


@pytest.mark.parametrize("text,expected", [
    ("$A", "a"),
    ("${A}", "a"),
    ("x${A}y$A", "xaya"),
    ("${UNSET:-dflt}", "dflt"),
    ("${EMPTY:-dflt}", "dflt"),
    ("${UNSET-dflt}", "dflt"),
    ("${EMPTY-dflt}", ""),
    ("${A:-dflt}", "a"),
    ("${UNSET:-${A}-nested}", "a-nested"),
    ("${A:+alt}", "alt"),
    ("${UNSET:+alt}", ""),
    ("${EMPTY+alt}", "alt"),
    ("$$A", "$A"),
    ("$${A}", "${A}"),
    ("a$$$A", "a$a"),
    ("${UNSET}", ""),
    ("no vars", "no vars"),
    ("${A:?must be set}", "a"),
    ("${EMPTY?ok when set}", ""),
])
def test_substitute(text: str, expected: str) -> None:
    assert substitute(text, {"A": "a", "EMPTY": ""}) == expected


@pytest.mark.parametrize("text,fragment", [
    ("${UNSET:?need UNSET}", "required variable UNSET is missing a value: need UNSET"),
    ("${EMPTY:?}", "required variable EMPTY is missing a value"),
    ("${UNSET?gone}", "required variable UNSET is missing a value: gone"),
    ("cost: 5$", "a lone '$' at the end"),
    ("${A", "never closed"),
    ("$-x", "invalid interpolation"),
    ("${A B}", "invalid interpolation"),
    ("${}", "invalid variable name"),
])
def test_substitute_errors(text: str, fragment: str) -> None:
    with pytest.raises(InterpolationError) as info:
        substitute(text, {"A": "a", "EMPTY": ""})
    assert fragment in str(info.value)


def test_interpolation_in_stack_and_missing_warning(load_text) -> None:
    p = load_text("""
        services:
          web:
            image: "nginx:${TAG:-latest}"
            environment:
              GREETING: "hello ${WHO}"
              PRICE: "$$5"
            deploy:
              replicas: ${N}
        """, environment={"N": "4"})
    web = p.services["web"]
    assert web.image == "nginx:latest"
    assert web.environment == {"GREETING": "hello ", "PRICE": "$5"}
    assert web.deploy is not None and web.deploy.replicas == 4
    assert len(p.warnings) == 1
    assert p.warnings[0].endswith('stack.yml:5 services.web.environment.GREETING: the "WHO" variable is not set. '
                                  "Defaulting to a blank string.")


def test_required_variable_error_names_line(load_text) -> None:
    with pytest.raises(ComposeError) as info:
        load_text("""
            services:
              web:
                image: ${IMAGE:?set IMAGE to the image to deploy}
            """)
    assert str(info.value).endswith(
        "stack.yml:3 services.web.image: required variable IMAGE is missing a value: set IMAGE to the image "
        "to deploy (in '${IMAGE:?set IMAGE to the image to deploy}')")


def test_dotenv_beside_first_file_and_environment_wins(write, stackdir: Path) -> None:
    write(".env", """
        # defaults for the stack
        TAG=1.0
        export REPLICAS=2
        MSG="two words # kept"
        RAW='${TAG} stays'
        COMBO=v${TAG}
        """)
    path = write("stack.yml", """
        services:
          app:
            image: app:${TAG}
            environment: [MSG=$MSG, RAW=$RAW, COMBO=$COMBO]
            deploy: {replicas: "$REPLICAS"}
        """)
    p = load([path], environment={"TAG": "2.0"})
    app = p.services["app"]
    assert app.image == "app:2.0"
    assert app.deploy is not None and app.deploy.replicas == 2
    assert app.environment == {"MSG": "two words # kept", "RAW": "${TAG} stays", "COMBO": "v1.0"}


def test_env_files_replace_dotenv(write) -> None:
    write(".env", "TAG=from-dotenv\n")
    one = write("one.env", "TAG=one\nOTHER=x\n")
    two = write("two.env", "TAG=two\n")
    path = write("stack.yml", "services: {app: {image: 'app:${TAG}-${OTHER}'}}\n")
    p = load([path], environment={}, env_files=[one, two])
    assert p.services["app"].image == "app:two-x"


def test_service_env_file(write) -> None:
    write("common.env", """
        A=1
        B=from-file
        SHELL_VAR
        """)
    path = write("stack.yml", """
        services:
          app:
            image: app
            env_file:
              - common.env
              - path: missing.env
                required: false
            environment:
              B: override
              C:
              D: true
        """)
    p = load([path], environment={"SHELL_VAR": "sv", "C": "from-shell"})
    assert p.services["app"].environment == {"A": "1", "B": "override", "SHELL_VAR": "sv", "C": "from-shell",
                                             "D": "true"}


def test_missing_env_file_is_an_error_with_line(write) -> None:
    path = write("stack.yml", """
        services:
          app:
            image: app
            env_file: nothere.env
        """)
    with pytest.raises(ComposeError) as info:
        load([path], environment={})
    assert f"{path}:4 services.app.env_file: cannot read env file" in str(info.value)


def test_bad_env_file_line(write) -> None:
    envf = write("bad.env", "OK=1\n=novalue\n")
    path = write("stack.yml", "services: {app: {image: app}}\n")
    with pytest.raises(ComposeError) as info:
        load([path], environment={}, env_files=[envf])
    assert str(info.value).startswith(f"{envf}:2: invalid line")


# ---------------------------------------------------------------- YAML


def test_anchors_merge_keys_and_extensions(load_text) -> None:
    p = load_text("""
        version: "3.8"
        x-defaults: &defaults
          image: base:1
          environment: {A: "1"}
          deploy:
            replicas: 2
        services:
          one:
            <<: *defaults
          two:
            <<: *defaults
            image: other:2
            x-note: keep me
        """)
    assert p.services["one"].image == "base:1"
    assert p.services["two"].image == "other:2"
    assert p.services["two"].deploy.replicas == 2
    assert p.services["two"].extensions == {"x-note": "keep me"}
    assert "x-defaults" in p.extensions
    assert p.services["one"].locs["image"].line == 3    # the anchor's line


def test_yaml12_scalars(load_text) -> None:
    p = load_text("""
        services:
          app:
            image: app
            ports: [80:80, 22:22]
            environment: {FLAG: yes, ON: on}
            secrets: [{source: s, mode: 0440}]
        secrets:
          s: {file: ./s.txt}
        """)
    app = p.services["app"]
    assert [(x.published, x.target) for x in app.ports] == [(80, 80), (22, 22)]   # not base-60 integers
    assert app.environment == {"FLAG": "yes", "ON": "on"}
    assert app.secrets[0].mode == 0o440


def test_duplicate_keys_rejected(load_text) -> None:
    with pytest.raises(ComposeError) as info:
        load_text("""
            services:
              web:
                image: a
                image: b
            """)
    assert str(info.value).endswith('stack.yml:4: mapping key "image" is given twice')


def test_yaml_syntax_error_has_line(load_text) -> None:
    with pytest.raises(ComposeError) as info:
        load_text("services:\n  web:\n    image: [a\n")
    assert "stack.yml:4: invalid YAML" in str(info.value)


# ---------------------------------------------------------------- short and long syntax


def test_ports_short_and_long(load_text) -> None:
    p = load_text("""
        services:
          app:
            image: app
            ports:
              - 80
              - "8080:80"
              - "127.0.0.1:5000:5000/udp"
              - "7000-7001:8000-8001"
              - "9090-9091"
              - target: 443
                published: "8443"
                protocol: tcp
                mode: host
                name: https
        """)
    got = [(x.target, x.published, x.protocol, x.mode, x.host_ip, x.name) for x in p.services["app"].ports]
    assert got == [
        (80, None, "tcp", "ingress", "", ""),
        (80, 8080, "tcp", "ingress", "", ""),
        (5000, 5000, "udp", "ingress", "127.0.0.1", ""),
        (8000, 7000, "tcp", "ingress", "", ""),
        (8001, 7001, "tcp", "ingress", "", ""),
        (9090, None, "tcp", "ingress", "", ""),
        (9091, None, "tcp", "ingress", "", ""),
        (443, 8443, "tcp", "host", "", "https"),
    ]


def test_volumes_short_and_long(load_text, stackdir: Path) -> None:
    p = load_text("""
        services:
          app:
            image: app
            volumes:
              - data:/data
              - data:/ro:ro
              - ./conf:/etc/conf:ro,rshared
              - /abs:/abs
              - ~/home:/home
              - /anonymous
              - data:/nc:nocopy
              - type: bind
                source: ./src
                target: /src
                read_only: true
                bind: {propagation: rslave}
              - type: volume
                source: data
                target: /v
                volume: {nocopy: true}
              - type: tmpfs
                target: /t
                tmpfs: {size: 64m, mode: 01777}
        volumes:
          data:
        """, environment={"HOME": "/home/u"})
    got = [(v.type, v.source, v.target, v.read_only) for v in p.services["app"].volumes]
    assert got == [
        ("volume", "data", "/data", False),
        ("volume", "data", "/ro", True),
        ("bind", str(stackdir / "conf"), "/etc/conf", True),
        ("bind", "/abs", "/abs", False),
        ("bind", "/home/u/home", "/home", False),
        ("volume", "", "/anonymous", False),
        ("volume", "data", "/nc", False),
        ("bind", str(stackdir / "src"), "/src", True),
        ("volume", "data", "/v", False),
        ("tmpfs", "", "/t", False),
    ]
    vols = p.services["app"].volumes
    assert vols[2].bind.propagation == "rshared"
    assert vols[6].volume.nocopy is True
    assert vols[7].bind.propagation == "rslave"
    assert (vols[9].tmpfs.size, vols[9].tmpfs.mode) == (64 * 1024**2, 0o1777)


def test_secrets_configs_networks_short_and_long(load_text) -> None:
    p = load_text("""
        services:
          app:
            image: app
            secrets:
              - db
              - {source: api, target: /etc/api, uid: "1000", gid: "1000", mode: "0400"}
            configs:
              - conf
            networks:
              front:
                aliases: [www, site]
              back: {}
          other:
            image: app
            networks: [front]
        networks:
          front:
          back:
        secrets:
          db: {file: db.txt}
          api: {external: true}
        configs:
          conf: {content: "x=1"}
        """)
    app = p.services["app"]
    assert [(s.source, s.target, s.uid, s.gid, s.mode) for s in app.secrets] == [
        ("db", None, None, None, None), ("api", "/etc/api", "1000", "1000", 0o400)]
    assert [c.source for c in app.configs] == ["conf"]
    assert app.networks["front"].aliases == ["www", "site"]
    assert app.networks["back"].aliases == []
    assert p.services["other"].networks == {"front": None}


def test_units() -> None:
    assert parse_duration("1m30s") == 90 * 10**9
    assert parse_duration("10s") == 10 * 10**9
    assert parse_duration("1h") == 3600 * 10**9
    assert parse_duration("1.5h") == 5400 * 10**9
    assert parse_duration("300ms") == 300 * 10**6
    assert parse_duration("2us") == 2000
    assert parse_duration("0") == 0
    for bad in ("", "10", "1x", "m", "-1s", "1s2"):
        with pytest.raises(ValueError):
            parse_duration(bad)
    assert format_duration(90 * 10**9) == "1m30s"
    assert format_duration(300 * 10**6) == "300ms"
    assert parse_bytes("512m") == 512 * 1024**2
    assert parse_bytes("1gb") == 1024**3
    assert parse_bytes("100k") == 102400
    assert parse_bytes("1.5G") == 3 * 1024**3 // 2
    assert parse_bytes(2048) == 2048
    assert parse_bytes("2048") == 2048
    for bad in ("12x", "-1m", "m"):
        with pytest.raises(ValueError):
            parse_bytes(bad)
    assert parse_cpus("0.5") == 500_000_000
    assert parse_cpus(2) == 2_000_000_000
    assert parse_cpus(0.25) == 250_000_000
    with pytest.raises(ValueError):
        parse_cpus("0.0000000001")
    with pytest.raises(ValueError):
        parse_cpus("half")


def test_units_in_a_stack(load_text) -> None:
    p = load_text("""
        services:
          app:
            image: app
            stop_grace_period: 1m30s
            healthcheck: {test: [CMD, "true"], interval: 10s, timeout: 1s, start_period: 1h}
            deploy:
              resources:
                limits: {cpus: '0.5', memory: 512m}
                reservations: {cpus: 1, memory: 1gb}
        """)
    app = p.services["app"]
    assert app.stop_grace_period == 90 * 10**9
    assert app.healthcheck.interval == 10 * 10**9
    assert app.deploy.resources.limits.cpus == 500_000_000
    assert app.deploy.resources.limits.memory == 512 * 1024**2
    assert app.deploy.resources.reservations.memory == 1024**3


def test_compose_source_text_and_working_dir(stackdir: Path) -> None:
    p = load([ComposeSource("-", "services: {a: {image: x, volumes: ['./d:/d']}}")], environment={},
             working_dir=stackdir)
    assert p.services["a"].volumes[0].source == str(stackdir / "d")


# ---------------------------------------------------------------- merging several files


def test_merge_two_files(write) -> None:
    base = write("base.yml", """
        services:
          web:
            image: web:1
            command: ["serve", "--port", "80"]
            environment: {A: "1", B: "1"}
            labels: {x: "1"}
            ports: ["8080:80", "53:53/udp"]
            volumes: ["data:/data", "./a:/a"]
            secrets: [s1]
            cap_add: [NET_ADMIN]
            networks: [front]
            deploy:
              replicas: 2
              placement: {constraints: [node.role==worker]}
              resources: {limits: {memory: 128m}}
          db:
            image: db:1
        networks: {front: {}}
        volumes: {data: {}}
        secrets:
          s1: {file: s1.txt}
        """)
    over = write("prod.yml", """
        services:
          web:
            image: web:2
            command: serve
            environment: {B: "2", C: "3"}
            ports: ["9090:80", {target: 53, published: 53, protocol: udp, mode: host}]
            volumes: ["./b:/a"]
            secrets: [{source: s2, target: s1}]
            cap_add: [SYS_TIME, NET_ADMIN]
            networks: {back: {aliases: [w]}}
            deploy:
              replicas: 5
              placement: {constraints: [node.labels.zone==a]}
              resources: {limits: {cpus: "1"}}
          cache:
            image: redis
        networks: {back: {}}
        secrets:
          s2: {file: s2.txt}
        """)
    p = load([base, over], environment={})
    web = p.services["web"]
    assert web.image == "web:2"
    assert web.command == ["serve"]
    assert web.environment == {"A": "1", "B": "2", "C": "3"}
    assert web.labels == {"x": "1"}
    # ports are unique by (host IP, target, published, protocol): a new published port is added,
    # the same one is replaced by the later file's entry.
    assert [(x.published, x.target, x.protocol, x.mode) for x in web.ports] == [
        (8080, 80, "tcp", "ingress"), (9090, 80, "tcp", "ingress"), (53, 53, "udp", "host")]
    assert [(v.source, v.target) for v in web.volumes] == [("data", "/data"), (str(base.parent / "b"), "/a")]
    assert [(s.source, s.target) for s in web.secrets] == [("s2", "s1")]
    assert web.cap_add == ["NET_ADMIN", "SYS_TIME"]
    assert set(web.networks) == {"front", "back"}
    assert web.deploy.replicas == 5
    assert web.deploy.placement.constraints == ["node.role==worker", "node.labels.zone==a"]
    assert web.deploy.resources.limits.memory == 128 * 1024**2
    assert web.deploy.resources.limits.cpus == 10**9
    assert sorted(p.services) == ["cache", "db", "web"]
    assert sorted(p.networks) == ["back", "front"] and sorted(p.secrets) == ["s1", "s2"]
    assert p.files == [str(base), str(over)]
    # Locations follow the file a value came from.
    assert web.locs["image"].file == str(over)
    assert p.services["db"].loc.file == str(base)


def test_merge_errors_point_at_the_overriding_file(write) -> None:
    base = write("base.yml", "services: {web: {image: web}}\n")
    over = write("over.yml", """
        services:
          web:
            networks: [nowhere]
        """)
    with pytest.raises(ComposeError) as info:
        load([base, over], environment={})
    assert str(info.value) == (f'{over}:3 services.web.networks: network "nowhere" is not defined; declare it '
                               "under the top-level networks:")


def test_alias_heavy_documents_stay_shared() -> None:
    levels = ['x-a: &a ["$$x", "$$x", "$$x", "$$x", "$$x", "$$x", "$$x", "$$x", "$$x"]']
    for prev, cur in zip("abcdef", "bcdefg", strict=True):
        levels.append(f"x-{cur}: &{cur} [" + ", ".join([f"*{prev}"] * 9) + "]")
    text = "\n".join(levels) + "\nservices: {a: {image: x, x-big: *g}}\n"
    p = load([ComposeSource("s.yml", text)], environment={})
    big = p.services["a"].extensions["x-big"]
    assert big[0] is big[1]                 # copied once, not 9**7 strings
    assert big[0][0][0][0][0][0][0] == "$x"


@pytest.mark.parametrize("image", ["nginx", "library/nginx:1.25", "registry.local:5000/team/app:v1",
                                   "localhost:5000/app@sha256:" + "a" * 64, "Registry.IO/app"])
def test_image_references(load_text, image: str) -> None:
    assert load_text(f"services: {{a: {{image: '{image}'}}}}\n").services["a"].image == image


@pytest.mark.parametrize("image", ["Nginx", "app/Repo", "app:", "/app", "a//b", "app@sha256:zz"])
def test_bad_image_references(load_text, image: str) -> None:
    with pytest.raises(ComposeError, match="invalid image reference"):
        load_text(f"services: {{a: {{image: '{image}'}}}}\n")
