"""The scheduler (PENDING tasks -> nodes) and the placement-constraint language it shares with the control API."""

from shoal.manager.scheduler.constraint import Constraint, matches, parse_constraints, parse_spread
from shoal.manager.scheduler.filters import explain
from shoal.manager.scheduler.scheduler import Scheduler

__all__ = ["Constraint", "Scheduler", "explain", "matches", "parse_constraints", "parse_spread"]
