"""Fixtures for agent tests (defined in agent_helpers)."""

from agent_helpers import engine_root, registry  # noqa: F401
