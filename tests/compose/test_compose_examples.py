"""Every stack file of ../shared/compose/examples loads and converts, or fails with the expected message;
the loader's normalised output is valid against the official Compose Specification schema."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest
from helpers.paths import SHARED as SHARED_DIR

from shoal.compose import ComposeError, convert, load, to_dict
from shoal.proto import types_pb2

SHARED = SHARED_DIR / "compose"
EXAMPLES = SHARED / "examples"
NO_IMAGE = "has no image; `stack deploy` needs an image for every service (build is not supported"

# file -> (service or key path, message fragment) for files docker stack deploy cannot deploy either.
EXPECTED_ERRORS = {
    "awesome-compose.angular_compose.yaml": ("services.web", NO_IMAGE),
    "awesome-compose.apache-php_compose.yaml": ("services.web", NO_IMAGE),
    "awesome-compose.aspnet-mssql_compose.yaml": ("services.web", NO_IMAGE),
    "awesome-compose.django_compose.yaml": ("services.web", NO_IMAGE),
    "awesome-compose.elasticsearch-logstash-kibana_compose.yaml": (
        "networks.elastic.driver", 'network driver "bridge" cannot carry swarm services; use driver: overlay'),
    "awesome-compose.fastapi_compose.yaml": ("services.api", NO_IMAGE),
    "awesome-compose.flask-redis_compose.yaml": ("services.web", NO_IMAGE),
    "awesome-compose.flask_compose.yaml": ("services.web", NO_IMAGE),
    "awesome-compose.nginx-aspnet-mysql_compose.yaml": ("services.backend", NO_IMAGE),
    "awesome-compose.nginx-flask-mongo_compose.yaml": ("services.backend", NO_IMAGE),
    "awesome-compose.nginx-flask-mysql_compose.yaml": ("services.backend", NO_IMAGE),
    "awesome-compose.nginx-golang-mysql_compose.yaml": ("services.backend", NO_IMAGE),
    "awesome-compose.nginx-golang-postgres_compose.yaml": ("services.backend", NO_IMAGE),
    "awesome-compose.nginx-golang_compose.yaml": ("services.backend", NO_IMAGE),
    "awesome-compose.nginx-nodejs-redis_compose.yaml": ("services.web1", NO_IMAGE),
    "awesome-compose.nginx-wsgi-flask_compose.yaml": ("services.nginx-proxy", NO_IMAGE),
    "awesome-compose.react-express-mongodb_compose.yaml": ("services.frontend", NO_IMAGE),
    "awesome-compose.react-express-mysql_compose.yaml": ("services.backend", NO_IMAGE),
    "awesome-compose.react-java-mysql_compose.yaml": ("services.backend", NO_IMAGE),
    "awesome-compose.react-nginx_compose.yaml": ("services.frontend", NO_IMAGE),
    "awesome-compose.react-rust-postgres_compose.yaml": ("services.frontend", NO_IMAGE),
    "awesome-compose.sparkjava-mysql_compose.yaml": ("services.backend", NO_IMAGE),
    "awesome-compose.sparkjava_compose.yaml": ("services.sparkjava", NO_IMAGE),
    "awesome-compose.spring-postgres_compose.yaml": ("services.backend", NO_IMAGE),
    "awesome-compose.traefik-golang_compose.yaml": ("services.backend", NO_IMAGE),
    "awesome-compose.vuejs_compose.yaml": ("services.web", NO_IMAGE),
}
# Variables some examples expect from the user's shell.
ENVIRONMENT = {"PLEX_MEDIA_PATH": "/srv/media", "TIMEZONE": "UTC", "HOME": "/home/user"}

ALL = sorted(p.name for p in EXAMPLES.iterdir())


@pytest.fixture(scope="module")
def validator() -> jsonschema.Draft7Validator:
    schema = json.loads((SHARED / "compose-spec.json").read_text())
    return jsonschema.Draft7Validator(schema)


def test_corpus_is_there() -> None:
    assert len(ALL) >= 40
    assert set(EXPECTED_ERRORS) <= set(ALL)


@pytest.mark.parametrize("name", ALL)
def test_example(name: str, validator: jsonschema.Draft7Validator) -> None:
    path = EXAMPLES / name
    if name in EXPECTED_ERRORS:
        key, fragment = EXPECTED_ERRORS[name]
        with pytest.raises(ComposeError) as info:
            convert(load([path], environment=ENVIRONMENT), "st")
        msg = str(info.value)
        assert msg.startswith(f"{path}:"), msg
        assert f" {key}: " in msg and fragment in msg, msg
        assert info.value.loc is not None and info.value.loc.line > 0
        return
    project = load([path], environment=ENVIRONMENT)
    doc = to_dict(project)
    errors = sorted(validator.iter_errors(doc), key=lambda e: list(e.path))
    assert not errors, [(list(e.path), e.message) for e in errors]
    stack = convert(project, "st")
    assert sorted(stack.services) == sorted(f"st_{s}" for s in project.services)
    for full, spec in stack.services.items():
        assert spec.annotations.name == full
        assert spec.annotations.labels["com.docker.stack.namespace"] == "st"
        assert spec.annotations.labels["com.docker.stack.image"] == spec.task.container.image
        assert spec.task.container.labels["com.docker.stack.namespace"] == "st"
        assert spec.task.networks, "every service is on at least one network"
        for att in spec.task.networks:
            assert att.target in stack.networks or att.target in stack.external_networks
    for net in stack.networks.values():
        assert net.driver_config.name == "overlay"
        assert net.annotations.labels["com.docker.stack.namespace"] == "st"


def test_plex_needs_its_variable() -> None:
    path = EXAMPLES / "awesome-compose.plex_compose.yaml"
    with pytest.raises(ComposeError) as info:
        load([path], environment={})
    assert f"{path}:10 services.plex.volumes[0]: invalid volume \":/media/\"" in str(info.value)


def test_voting_app_converts_like_docker() -> None:
    project = load([EXAMPLES / "example-voting-app.docker-stack.yml"], environment={})
    assert project.warnings == []
    stack = convert(project, "vote")
    assert sorted(stack.networks) == ["vote_backend", "vote_frontend"]
    vote = stack.services["vote_vote"]
    assert vote.replicated.replicas == 2
    assert [(p.target_port, p.published_port, p.publish_mode) for p in vote.endpoint.ports] == [
        (80, 8080, types_pb2.PortConfig.INGRESS)]
    assert [(n.target, list(n.aliases)) for n in vote.task.networks] == [("vote_frontend", ["vote"])]
    worker = stack.services["vote_worker"]
    assert [n.target for n in worker.task.networks] == ["vote_backend", "vote_frontend"]
    db = stack.services["vote_db"]
    assert db.replicated.replicas == 1
    (mount,) = db.task.container.mounts
    assert (mount.type, mount.source, mount.target) == (types_pb2.Mount.VOLUME, "vote_db-data",
                                                         "/var/lib/postgresql/data")
    assert mount.volume_options.labels["com.docker.stack.namespace"] == "vote"
    assert sorted(db.task.container.env) == ["POSTGRES_PASSWORD=postgres", "POSTGRES_USER=postgres"]


def test_docker_warnings_for_ignored_options() -> None:
    project = load([EXAMPLES / "awesome-compose.wasmedge-mysql-nginx_compose.yml"], environment={})
    assert project.warnings == ["Ignoring unsupported options: build, platform, restart, runtime"]
    project = load([EXAMPLES / "awesome-compose.wordpress-mysql_compose.yaml"], environment={})
    assert project.warnings == [
        "Ignoring unsupported options: restart",
        "Ignoring deprecated options:\n\nexpose: Exposing ports is unnecessary - services on the same network "
        "can access each other's containers on any port.",
    ]


@pytest.mark.parametrize("name", [n for n in ALL if n not in EXPECTED_ERRORS])
def test_normalised_output_loads_to_the_same_project(name: str, tmp_path: Path) -> None:
    import yaml

    first = to_dict(load([EXAMPLES / name], environment=ENVIRONMENT))
    again = tmp_path / "normalised.yml"
    again.write_text(yaml.safe_dump(first, sort_keys=False))
    assert to_dict(load([again], environment={})) == first
