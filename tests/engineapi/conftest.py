"""Fixtures for the Engine API tests (defined in engine_helpers)."""

from engine_helpers import mgr, registry  # noqa: F401
