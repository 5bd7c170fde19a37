"""Leader-only control loops that turn services into tasks (see each module).

The manager builds them with the scheduler in `shoal.manager.leader.LEADER_LOOPS` and runs each
one's `run()` while it leads.
"""

from __future__ import annotations

from shoal.manager.orchestrator.constraint_enforcer import ConstraintEnforcer
from shoal.manager.orchestrator.global_ import GlobalOrchestrator
from shoal.manager.orchestrator.replicated import ReplicatedOrchestrator
from shoal.manager.orchestrator.task_reaper import TaskReaper

__all__ = ["ConstraintEnforcer", "GlobalOrchestrator", "ReplicatedOrchestrator", "TaskReaper"]
