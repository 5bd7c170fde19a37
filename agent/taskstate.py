"""Where a task's state changes on the agent: the pure transition function of its state machine.

As SwarmKit's ``exec.Do`` (agent/exec/controller.go), but with no side effect in it:

    next_step(TaskView) -> Step                  what to do now, for the task as last reported and
                                                 as assigned (its desired state, still assigned or not)
    transition(state, Step, Outcome) -> Transition | None
                                                 what to report once the step is done
    adopt(state, container status, ...) -> Adoption
                                                 where a task resumes after an agent restart

The side effects (pull, network, create, start, stop, remove, waits) are the task controller's
(`shoal.agent.controller.TaskController`), which runs the step `next_step` names, turns what happened
into an `Outcome`, and reports the `Transition`. The states, as Docker Swarm's:

    ASSIGNED → ACCEPTED → PREPARING (pull image, network attachments, create) → READY
             → STARTING → RUNNING → COMPLETE (exit 0) / FAILED (non-zero exit, unhealthy, start error)

A failure before STARTING (unknown image, unreachable registry, bad credentials, invalid spec) is
REJECTED. A desired state past RUNNING stops the container and reports SHUTDOWN; desired REMOVE,
or the task leaving the assignment set, also removes the container (once). A task whose desired
state is below RUNNING (a start-first update's new task) waits at READY.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from shoal.agent.engine import ExitStatus
from shoal.proto import types_pb2

S = types_pb2

UNHEALTHY = "task: container is unhealthy"
GONE = "container is gone (removed outside the agent)"


class Step(enum.Enum):
    """What a task controller does next."""

    WAIT = "wait"  # nothing until the assignment changes
    ACCEPT = "accept"  # report ACCEPTED
    PREPARING = "preparing"  # report PREPARING
    PREPARE = "prepare"  # pull the image, prepare the networking, create the container
    STARTING = "starting"  # report STARTING
    START = "start"  # start the container; with a health check, wait until it is healthy
    WATCH = "watch"  # serve until the container exits or turns unhealthy
    SHUTDOWN = "shutdown"  # stop the container (out of its service first), report SHUTDOWN
    REMOVE = "remove"  # remove the container and release the networking
    FINISH = "finish"  # the task is no longer assigned: its controller ends


class Result(enum.Enum):
    """How a step ended."""

    DONE = "done"  # it did what it says (started: the container runs, and is healthy if it checks)
    ERROR = "error"  # it failed (Outcome.err says why)
    EXITED = "exited"  # the container exited (Outcome.exit)
    UNHEALTHY = "unhealthy"  # the container's health check gave up on it
    GONE = "gone"  # the container is not there any more
    INTERRUPTED = "interrupted"  # a shutdown was asked for while the step waited


@dataclass(frozen=True)
class Outcome:
    result: Result
    err: str = ""  # for ERROR: one line
    exit: ExitStatus | None = None  # for EXITED
    pid: int = 0  # for START's DONE: the container's process


@dataclass(frozen=True)
class Transition:
    """A status to report: the task's new state, its message and error, and its container's exit code
    and pid where known."""

    state: int
    message: str
    err: str = ""
    exit_code: int | None = None
    pid: int = 0


@dataclass(frozen=True)
class TaskView:
    """What the next step depends on."""

    state: int  # the last state reported
    desired: int  # the task's desired state
    dropped: bool = False  # no longer in the assignment set
    has_container: bool = False  # its container exists
    removed: bool = False  # its container was removed and its networking released


def stopping(v: TaskView) -> bool:
    """Whether the task is to stop: no longer assigned, or desired past RUNNING. A step that waits
    (pull, start until healthy, watch) is cut short once this turns true."""
    return v.dropped or v.desired > S.RUNNING


def next_step(v: TaskView) -> Step:
    """The next step for the task in ``v``."""
    if stopping(v):
        if v.state < S.COMPLETE:
            return Step.SHUTDOWN
        if (v.dropped or v.desired >= S.REMOVE) and not v.removed:
            return Step.REMOVE
        return Step.FINISH if v.dropped else Step.WAIT
    if v.state >= S.COMPLETE or (v.state >= S.READY and v.desired < S.RUNNING):
        return Step.WAIT  # finished, or held at READY until it is wanted running
    if v.state < S.ACCEPTED:
        return Step.ACCEPT
    if v.state < S.PREPARING:
        return Step.PREPARING
    if v.state < S.READY or (v.state < S.RUNNING and not v.has_container):
        # (also after an agent restart that lost a prepared container: prepare it again)
        return Step.PREPARE
    if v.state < S.STARTING:
        return Step.STARTING
    if v.state < S.RUNNING:
        return Step.START
    return Step.WATCH


def exit_error(ex: ExitStatus) -> str:
    """The one-line error of a container that exited non-zero (or was lost)."""
    if ex.oom_killed:
        return f"task: non-zero exit ({ex.exit_code}): the container ran out of memory (OOM killed)"
    if ex.reason == "Lost":
        return "task: the container's process disappeared and its exit status is unknown"
    return f"task: non-zero exit ({ex.exit_code})"


def exited(ex: ExitStatus) -> Transition:
    """COMPLETE for exit 0 (not OOM killed), else FAILED with the exit's error."""
    code = int(ex.exit_code)
    if code == 0 and not ex.oom_killed:
        return Transition(S.COMPLETE, "finished", exit_code=0)
    return Transition(S.FAILED, "started", exit_error(ex), exit_code=code)


_ANNOUNCE = {
    Step.ACCEPT: Transition(S.ACCEPTED, "accepted"),
    Step.PREPARING: Transition(S.PREPARING, "preparing"),
    Step.STARTING: Transition(S.STARTING, "starting"),
    Step.SHUTDOWN: Transition(S.SHUTDOWN, "shutdown"),
}


def transition(state: int, step: Step, outcome: Outcome) -> Transition | None:
    """The status to report after ``step`` ended with ``outcome`` for a task last reported in ``state``;
    None when there is nothing to report (interrupted by a shutdown, a removal, a container prepared
    again for a task that was already past READY). ValueError for an outcome the step cannot have."""
    r = outcome.result
    if r is Result.INTERRUPTED and step in (Step.PREPARE, Step.START, Step.WATCH):
        return None
    if step in _ANNOUNCE and r is Result.DONE:
        return _ANNOUNCE[step]
    if step is Step.REMOVE and r is Result.DONE:
        return None
    if step is Step.PREPARE:
        if r is Result.DONE:
            return Transition(S.READY, "prepared") if state < S.READY else None
        if r is Result.ERROR:
            return Transition(S.REJECTED, "preparing", outcome.err)
    if step is Step.START:
        if r is Result.DONE:
            return Transition(S.RUNNING, "started", pid=outcome.pid)
        if r is Result.ERROR:
            return Transition(S.FAILED, "starting", outcome.err)
        if r is Result.UNHEALTHY:
            return Transition(S.FAILED, "starting", UNHEALTHY)
    if step is Step.WATCH:
        if r is Result.UNHEALTHY:
            return Transition(S.FAILED, "started", UNHEALTHY)
        if r is Result.GONE:
            return Transition(S.FAILED, "started", GONE)
    if step in (Step.START, Step.WATCH) and r is Result.EXITED and outcome.exit is not None:
        return exited(outcome.exit)
    raise ValueError(f"step {step.name} cannot end {r.name}")


def crashed(state: int, err: str) -> Transition | None:
    """What a controller that failed on a bug (not a task failure) reports: FAILED once the task was
    starting, REJECTED before; nothing for a task already finished."""
    if state >= S.COMPLETE:
        return None
    return Transition(S.FAILED if state >= S.STARTING else S.REJECTED, "controller error", err)


@dataclass(frozen=True)
class Adoption:
    """Where a task resumes with a container found after an agent restart."""

    report: Transition | None = None  # a status to report
    state: int | None = None  # a state to resume from without reporting it
    stop: bool = False  # stop the container: its task is finished


def adopt(state: int, status: str, exit: ExitStatus | None = None, pid: int = 0) -> Adoption:
    """The task last reported in ``state`` has a container in ``status`` (created | running | exited)."""
    if status == "running":
        if state > S.RUNNING:
            return Adoption(stop=True)  # the container of a finished task still runs
        return Adoption(report=Transition(S.RUNNING, "started", pid=pid))
    if status == "exited":
        if state < S.COMPLETE and exit is not None:
            return Adoption(report=exited(exit))
        return Adoption()
    if status == "created":
        if state < S.READY:
            return Adoption(report=Transition(S.READY, "prepared"))
        if state >= S.STARTING:
            return Adoption(state=S.READY)  # it was about to start when the agent died: start it now
    return Adoption()
