import pytest

from shoal.agent.templates import TemplateError, expand_task
from shoal.proto import objects_pb2, types_pb2


def task(**container) -> objects_pb2.Task:
    return objects_pb2.Task(
        id="t1", slot=3, service_id="s1",
        annotations=types_pb2.Annotations(name="demo_web.3.t1"),
        service_annotations=types_pb2.Annotations(name="demo_web"),
        spec=types_pb2.TaskSpec(container=types_pb2.ContainerSpec(image="busybox", **container)),
    )


def test_placeholders_in_hostname_env_and_mounts_are_expanded() -> None:
    t = task(
        hostname="{{.Node.Hostname}}-{{ .Task.Slot }}",
        env=["NODE={{.Node.Hostname}}", "SLOT={{.Task.Slot}}", "WHO={{.Service.Name}}/{{.Task.Name}}", "PLAIN=x"],
        mounts=[types_pb2.Mount(type=types_pb2.Mount.VOLUME, source="data-{{.Task.Slot}}", target="/data")],
    )
    out = expand_task(t, "n1", "h4")
    c = out.spec.container
    assert c.hostname == "h4-3"
    assert list(c.env) == ["NODE=h4", "SLOT=3", "WHO=demo_web/demo_web.3.t1", "PLAIN=x"]
    assert c.mounts[0].source == "data-3"
    assert t.spec.container.hostname.startswith("{{")  # the assigned task is left as it was


def test_global_tasks_use_the_node_id_as_slot_and_plain_specs_are_not_copied() -> None:
    t = task(env=["SLOT={{.Task.Slot}}"])
    t.slot = 0
    assert list(expand_task(t, "n1", "h4").spec.container.env) == ["SLOT=n1"]
    plain = task(env=["A=1"])
    assert expand_task(plain, "n1", "h4") is plain


def test_an_unknown_placeholder_is_named() -> None:
    with pytest.raises(TemplateError, match=r"env X: unknown template placeholder \{\{.Node.Color\}\}"):
        expand_task(task(env=["X={{.Node.Color}}"]), "n1", "h4")
