"""The scheduler (PENDING tasks -> nodes) and the placement-constraint language it shares with the control API."""

from shoal.manager.scheduler.constraint import Constraint, matches, parse_constraints, parse_spread
from shoal.manager.scheduler.scheduler import Scheduler

__all__ = ["Constraint", "Scheduler", "matches", "parse_constraints", "parse_spread"]
