"""The agent's task state machine as tables: every state x desired state for the next step, every
step x outcome for the status reported, and where an adopted container resumes. No containers."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from shoal.agent.engine import ExitStatus
from shoal.agent.taskstate import (
    GONE,
    UNHEALTHY,
    Outcome,
    Result,
    Step,
    TaskView,
    Transition,
    adopt,
    crashed,
    exit_error,
    next_step,
    stopping,
    transition,
)
from shoal.proto import types_pb2

S = types_pb2
STATES = [S.NEW, S.PENDING, S.ASSIGNED, S.ACCEPTED, S.PREPARING, S.READY, S.STARTING, S.RUNNING,
          S.COMPLETE, S.SHUTDOWN, S.FAILED, S.REJECTED, S.REMOVE, S.ORPHANED]
FINISHED = [S.COMPLETE, S.SHUTDOWN, S.FAILED, S.REJECTED, S.REMOVE, S.ORPHANED]
W, ACC, PRE, PREP, STG, STA, WAT = (Step.WAIT, Step.ACCEPT, Step.PREPARING, Step.PREPARE, Step.STARTING,
                                    Step.START, Step.WATCH)

# state -> (next step without a container, next step with one), for a task wanted RUNNING
WANT_RUNNING = {
    S.NEW: (ACC, ACC),
    S.PENDING: (ACC, ACC),
    S.ASSIGNED: (ACC, ACC),
    S.ACCEPTED: (PRE, PRE),
    S.PREPARING: (PREP, PREP),
    S.READY: (PREP, STG),  # a READY task whose container was lost (agent restart) is prepared again
    S.STARTING: (PREP, STA),
    S.RUNNING: (WAT, WAT),
    **{s: (W, W) for s in FINISHED},
}
# a task wanted READY (a start-first update's new task) is prepared, then held at READY
WANT_READY = {**WANT_RUNNING, S.READY: (W, W), S.STARTING: (W, W), S.RUNNING: (W, W)}


def ex(code: int, *, oom: bool = False, reason: str = "") -> ExitStatus:
    return ExitStatus(code, oom, datetime(2026, 1, 1, tzinfo=UTC), reason)


@pytest.mark.parametrize("state", STATES, ids=S.TaskState.Name)
@pytest.mark.parametrize("container", [False, True], ids=["no-container", "container"])
def test_next_step_wanted_running_or_ready(state: int, container: bool) -> None:
    assert next_step(TaskView(state, S.RUNNING, has_container=container)) is WANT_RUNNING[state][container]
    assert next_step(TaskView(state, S.READY, has_container=container)) is WANT_READY[state][container]
    assert not stopping(TaskView(state, S.RUNNING, has_container=container))
    assert not stopping(TaskView(state, S.READY, has_container=container))


@pytest.mark.parametrize("state", STATES, ids=S.TaskState.Name)
@pytest.mark.parametrize("container", [False, True], ids=["no-container", "container"])
def test_next_step_past_running(state: int, container: bool) -> None:
    """Desired SHUTDOWN stops, REMOVE also removes (once), a dropped task also ends its controller."""
    finished = state >= S.COMPLETE

    def step(desired: int, *, dropped: bool = False, removed: bool = False) -> Step:
        return next_step(TaskView(state, desired, dropped, container, removed))

    assert stopping(TaskView(state, S.SHUTDOWN)) and stopping(TaskView(state, S.RUNNING, dropped=True))
    assert step(S.SHUTDOWN) is (W if finished else Step.SHUTDOWN)
    assert step(S.REMOVE) is (Step.REMOVE if finished else Step.SHUTDOWN)
    assert step(S.REMOVE, removed=True) is (W if finished else Step.SHUTDOWN)
    for desired in (S.READY, S.RUNNING, S.SHUTDOWN, S.REMOVE):
        assert step(desired, dropped=True) is (Step.REMOVE if finished else Step.SHUTDOWN)
        assert step(desired, dropped=True, removed=True) is (Step.FINISH if finished else Step.SHUTDOWN)


# (step, result) -> the status reported; absent: the step cannot end so (ValueError)
TRANSITIONS: dict[tuple[Step, Result], Transition | None] = {
    (Step.ACCEPT, Result.DONE): Transition(S.ACCEPTED, "accepted"),
    (Step.PREPARING, Result.DONE): Transition(S.PREPARING, "preparing"),
    (Step.PREPARE, Result.DONE): Transition(S.READY, "prepared"),
    (Step.PREPARE, Result.ERROR): Transition(S.REJECTED, "preparing", "boom"),
    (Step.PREPARE, Result.INTERRUPTED): None,
    (Step.STARTING, Result.DONE): Transition(S.STARTING, "starting"),
    (Step.START, Result.DONE): Transition(S.RUNNING, "started", pid=42),
    (Step.START, Result.ERROR): Transition(S.FAILED, "starting", "boom"),
    (Step.START, Result.EXITED): Transition(S.FAILED, "started", "task: non-zero exit (3)", exit_code=3),
    (Step.START, Result.UNHEALTHY): Transition(S.FAILED, "starting", "task: container is unhealthy"),
    (Step.START, Result.INTERRUPTED): None,
    (Step.WATCH, Result.EXITED): Transition(S.FAILED, "started", "task: non-zero exit (3)", exit_code=3),
    (Step.WATCH, Result.UNHEALTHY): Transition(S.FAILED, "started", "task: container is unhealthy"),
    (Step.WATCH, Result.GONE): Transition(S.FAILED, "started", "container is gone (removed outside the agent)"),
    (Step.WATCH, Result.INTERRUPTED): None,
    (Step.SHUTDOWN, Result.DONE): Transition(S.SHUTDOWN, "shutdown"),
    (Step.REMOVE, Result.DONE): None,
}
# the state each step is taken from (next_step's table above)
FROM = {Step.ACCEPT: S.ASSIGNED, Step.PREPARING: S.ACCEPTED, Step.PREPARE: S.PREPARING, Step.STARTING: S.READY,
        Step.START: S.STARTING, Step.WATCH: S.RUNNING, Step.SHUTDOWN: S.RUNNING, Step.REMOVE: S.SHUTDOWN,
        Step.WAIT: S.COMPLETE, Step.FINISH: S.COMPLETE}


@pytest.mark.parametrize("step", list(Step), ids=lambda s: s.name)
@pytest.mark.parametrize("result", list(Result), ids=lambda r: r.name)
def test_transition_every_step_and_outcome(step: Step, result: Result) -> None:
    outcome = Outcome(result, err="boom", exit=ex(3), pid=42)
    if (step, result) not in TRANSITIONS:
        with pytest.raises(ValueError, match=f"step {step.name} cannot end {result.name}"):
            transition(FROM[step], step, outcome)
        return
    assert transition(FROM[step], step, outcome) == TRANSITIONS[step, result]


def test_a_container_prepared_again_past_ready_reports_nothing() -> None:
    assert transition(S.STARTING, Step.PREPARE, Outcome(Result.DONE)) is None
    assert transition(S.READY, Step.PREPARE, Outcome(Result.DONE)) is None


@pytest.mark.parametrize(
    ("exit", "want"),
    [
        (ex(0, reason="Completed"), Transition(S.COMPLETE, "finished", exit_code=0)),
        (ex(3, reason="Error"), Transition(S.FAILED, "started", "task: non-zero exit (3)", exit_code=3)),
        (ex(137, oom=True, reason="OOMKilled"), Transition(
            S.FAILED, "started", "task: non-zero exit (137): the container ran out of memory (OOM killed)",
            exit_code=137)),
        (ex(0, oom=True, reason="OOMKilled"), Transition(
            S.FAILED, "started", "task: non-zero exit (0): the container ran out of memory (OOM killed)",
            exit_code=0)),
        (ex(-1, reason="Lost"), Transition(
            S.FAILED, "started", "task: the container's process disappeared and its exit status is unknown",
            exit_code=-1)),
    ],
    ids=["exit-0", "exit-3", "oom", "oom-exit-0", "lost"],
)
def test_exits(exit: ExitStatus, want: Transition) -> None:
    for step in (Step.START, Step.WATCH):
        assert transition(S.RUNNING, step, Outcome(Result.EXITED, exit=exit)) == want
    assert exit_error(exit) == want.err or want.state == S.COMPLETE
    assert UNHEALTHY == "task: container is unhealthy" and GONE.startswith("container is gone")


@pytest.mark.parametrize("state", STATES, ids=S.TaskState.Name)
def test_adopt_every_state_and_container_status(state: int) -> None:
    running = adopt(state, "running", pid=7)
    if state > S.RUNNING:
        assert running == adopt(state, "running") and running.stop and running.report is None
    else:
        assert not running.stop and running.report == Transition(S.RUNNING, "started", pid=7)

    exited = adopt(state, "exited", ex(3))
    if state < S.COMPLETE:
        assert exited.report == Transition(S.FAILED, "started", "task: non-zero exit (3)", exit_code=3)
    else:
        assert exited.report is None
    assert adopt(state, "exited", None).report is None and not exited.stop

    created = adopt(state, "created")
    assert not created.stop
    if state < S.READY:
        assert created.report == Transition(S.READY, "prepared") and created.state is None
    elif state == S.READY:
        assert created.report is None and created.state is None
    else:  # about to start (or past it) when the agent died: start it now
        assert created.report is None and created.state == S.READY


@pytest.mark.parametrize("state", STATES, ids=S.TaskState.Name)
def test_a_crashed_controller(state: int) -> None:
    got = crashed(state, "oops")
    if state >= S.COMPLETE:
        assert got is None
    elif state >= S.STARTING:
        assert got == Transition(S.FAILED, "controller error", "oops")
    else:
        assert got == Transition(S.REJECTED, "controller error", "oops")


def test_a_task_walks_to_running_and_shutdown_when_every_step_succeeds() -> None:
    """The table replayed: the statuses the worker reports for a task that runs, then is shut down."""
    state, desired, container, removed, seen = S.ASSIGNED, S.RUNNING, False, False, []
    for _ in range(20):
        step = next_step(TaskView(state, desired, has_container=container, removed=removed))
        if step is Step.WAIT:
            if desired == S.RUNNING:
                desired = S.REMOVE
                continue
            break
        if step is Step.WATCH:  # the operator removes the service while it runs
            desired = S.REMOVE
            continue
        container = container or step is Step.PREPARE
        removed = removed or step is Step.REMOVE
        t = transition(state, step, Outcome(Result.DONE, pid=9))
        if t is not None:
            state = t.state
            seen.append(t.state)
    assert seen == [S.ACCEPTED, S.PREPARING, S.READY, S.STARTING, S.RUNNING, S.SHUTDOWN]
    assert removed and next_step(TaskView(state, desired, has_container=container, removed=True)) is Step.WAIT
