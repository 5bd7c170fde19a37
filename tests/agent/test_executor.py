"""Where a task enters the engine: its preconditions checked once, with the sentences the user sees,
and the one networking record handed into the container's config unchanged. No containers."""

from __future__ import annotations

import pytest

from shoal.agent.engine import NetworkSetup
from shoal.agent.executor import TaskRejected, check_task, container_config
from shoal.proto import objects_pb2, specs_pb2, types_pb2


def task(image: str = "busybox") -> objects_pb2.Task:
    t = objects_pb2.Task(id="t1", service_id="svc-id", node_id="n1")
    t.annotations.name = "web.1.t1"
    t.service_annotations.name = "web"
    t.spec.container.image = image
    t.spec.container.labels["mine"] = "yes"
    return t


def secret(sid: str, name: str, data: bytes) -> objects_pb2.Secret:
    return objects_pb2.Secret(id=sid, spec=specs_pb2.SecretSpec(annotations=types_pb2.Annotations(name=name),
                                                                data=data))


def test_an_empty_image_is_rejected_before_anything_else() -> None:
    t = task(image="")
    t.spec.container.secrets.add(secret_id="s1", secret_name="pw")
    with pytest.raises(TaskRejected) as e:
        check_task(t, {}, {})
    assert str(e.value) == "image is empty: set the service's image"


def test_secrets_and_configs_not_sent_are_named() -> None:
    t = task()
    t.spec.container.secrets.add(secret_id="s1", secret_name="pw")
    t.spec.container.secrets.add(secret_id="s2")
    t.spec.container.configs.add(config_id="c1", config_name="conf")
    with pytest.raises(TaskRejected) as e:
        check_task(t, {"s1": secret("s1", "pw", b"x")}, {})
    assert str(e.value) == "secrets/configs s2, conf were not sent to this node; check they exist"
    check_task(t, {"s1": secret("s1", "pw", b"x"), "s2": secret("s2", "k", b"y")},
               {"c1": objects_pb2.Config(id="c1")})


def test_the_container_config_carries_the_network_record_and_docker_labels() -> None:
    t = task()
    t.spec.container.secrets.add(secret_id="s1", secret_name="pw")
    net = NetworkSetup("/run/netns/x", "nameserver 127.0.0.11\n", ["198.19.0.9 peer"], ["198.19.0.5/24"])
    cfg = container_config(t, net, {"s1": secret("s1", "pw", b"hunter2")}, {}, "n1")
    assert cfg.network is net
    assert (cfg.id, cfg.name, cfg.secrets, cfg.configs) == ("t1", "web.1.t1", {"s1": b"hunter2"}, {})
    assert cfg.labels == {
        "mine": "yes",
        "com.docker.swarm.task.id": "t1",
        "com.docker.swarm.task.name": "web.1.t1",
        "com.docker.swarm.service.id": "svc-id",
        "com.docker.swarm.service.name": "web",
        "com.docker.swarm.node.id": "n1",
    }
