"""The convergence measure of swarmctl's wait loop, on hand-built cluster views."""

from __future__ import annotations

from shoal.cli.output import human_duration
from shoal.cli.progress import Snapshot, measure, up_to_date
from shoal.proto import objects_pb2, specs_pb2, types_pb2

READY, DOWN = types_pb2.NodeStatus.READY, types_pb2.NodeStatus.DOWN
RUN = types_pb2.RUNNING


def svc(replicas: int | None = 2, version: int = 2) -> objects_pb2.Service:
    s = objects_pb2.Service(id="s", spec_version=version)
    if replicas is None:
        getattr(s.spec, "global").SetInParent()
    else:
        s.spec.replicated.replicas = replicas
    s.spec.task.container.image = "busybox"
    return s


def node(nid: str, state: int = READY, availability: int = types_pb2.ACTIVE) -> objects_pb2.Node:
    n = objects_pb2.Node(id=nid)
    n.status.state = state
    n.spec.availability = availability
    return n


def task(slot: int, node_id: str, state: int, desired: int = RUN, version: int = 2) -> objects_pb2.Task:
    t = objects_pb2.Task(id=f"t{slot}{node_id}{state}{desired}{version}", service_id="s", slot=slot,
                         node_id=node_id, desired_state=desired, spec_version=version)
    t.status.state = state
    return t


def test_replicated_converges_when_every_slot_runs_the_current_spec() -> None:
    s = svc(2)
    nodes = [node("n1"), node("n2")]
    p = measure(s, Snapshot(s, [task(1, "n1", RUN), task(2, "n2", types_pb2.PREPARING)], nodes))
    assert (p.running, p.desired) == (1, 2)
    p = measure(s, Snapshot(s, [task(1, "n1", RUN), task(2, "n2", RUN)], nodes))
    assert (p.running, p.desired, p.stopping) == (2, 2, 0)


def test_old_spec_tasks_do_not_count_and_stopping_ones_block() -> None:
    s = svc(1)
    nodes = [node("n1")]
    old = task(1, "n1", RUN, version=1)
    p = measure(s, Snapshot(s, [old], nodes))
    assert p.running == 0
    stopping = task(1, "n1", RUN, desired=types_pb2.SHUTDOWN, version=1)
    p = measure(s, Snapshot(s, [stopping, task(1, "n1", RUN)], nodes))
    assert (p.running, p.stopping) == (1, 1)


def test_slot_history_picks_the_live_task() -> None:
    s = svc(1)
    failed = task(1, "n1", types_pb2.FAILED, desired=types_pb2.SHUTDOWN)
    p = measure(s, Snapshot(s, [failed, task(1, "n1", RUN)], [node("n1")]))
    assert p.running == 1 and p.slots[0][1].status.state == RUN


def test_tasks_on_down_nodes_are_ignored_and_no_ready_node_means_nothing_to_wait_for() -> None:
    s = svc(1)
    snap = Snapshot(s, [task(1, "n1", RUN)], [node("n1", DOWN)])
    assert measure(s, snap).running == 0 and snap.active_ready == 0
    assert Snapshot(s, [], [node("n1", availability=types_pb2.DRAIN)]).active_ready == 0


def test_global_counts_nodes_with_tasks() -> None:
    s = svc(None)
    nodes = [node("n1"), node("n2")]
    p = measure(s, Snapshot(s, [task(0, "n1", RUN), task(0, "n2", types_pb2.STARTING)], nodes))
    assert (p.running, p.desired) == (1, 2)


def test_scale_to_zero_converges_when_nothing_runs() -> None:
    s = svc(0)
    p = measure(s, Snapshot(s, [task(1, "n1", types_pb2.SHUTDOWN, desired=types_pb2.SHUTDOWN)], [node("n1")]))
    assert (p.running, p.desired, p.stopping) == (0, 0, 0)


def test_scaling_keeps_tasks_of_the_same_template_current() -> None:
    s = svc(3, version=3)
    t = task(1, "n1", RUN, version=2)
    t.spec.CopyFrom(s.spec.task)
    assert up_to_date(t, s)
    p = measure(s, Snapshot(s, [t, task(2, "n1", RUN, version=3)], [node("n1")]))
    assert (p.running, p.desired) == (2, 3)


def test_up_to_date_falls_back_to_spec_comparison() -> None:
    s = svc(1)
    t = objects_pb2.Task(spec=s.spec.task)
    assert up_to_date(t, s)
    t.spec.container.image = "other"
    assert not up_to_date(t, s)
    assert specs_pb2.ServiceSpec  # the module is importable for specs built in tests


def test_human_durations() -> None:
    assert human_duration(0.3) == "Less than a second"
    assert human_duration(1) == "1 second" and human_duration(5) == "5 seconds"
    assert human_duration(70) == "About a minute" and human_duration(600) == "10 minutes"
    assert human_duration(3600) == "About an hour" and human_duration(5 * 3600) == "5 hours"
    assert human_duration(3 * 86400) == "3 days"
