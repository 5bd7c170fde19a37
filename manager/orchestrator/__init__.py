"""Leader-only control loops that turn services into tasks (see each module).

`leader_loops(store)` builds them all; the manager runs each one's `run()` while it leads.
"""

from __future__ import annotations

from typing import Any

from shoal.manager.orchestrator.constraint_enforcer import ConstraintEnforcer
from shoal.manager.orchestrator.global_ import GlobalOrchestrator
from shoal.manager.orchestrator.replicated import ReplicatedOrchestrator
from shoal.manager.orchestrator.task_reaper import TaskReaper
from shoal.manager.store import Store

__all__ = ["ConstraintEnforcer", "GlobalOrchestrator", "ReplicatedOrchestrator", "TaskReaper", "leader_loops"]


def leader_loops(store: Store) -> list[Any]:
    """The orchestration loops and the scheduler, each with `async def run()`."""
    from shoal.manager.scheduler import Scheduler

    return [
        ReplicatedOrchestrator(store),
        GlobalOrchestrator(store),
        ConstraintEnforcer(store),
        TaskReaper(store),
        Scheduler(store),
    ]
