"""Prometheus metrics of the agent: container starts and failures, image pull durations.

Off unless swarmd was given `--metrics-addr` (see `shoal.manager.metrics` for why `prometheus_client`
is imported only in `enable`): until then every hook is one `None` check. The worker's
`EngineAdapter` (shoal.agent.executor), the one place the agent calls the engine, counts:

- `shoal_agent_container_starts_total` (counter): containers of tasks started (`runc start` done);
- `shoal_agent_container_failures_total{stage}` (counter): a task's container that failed to be
  created (`stage="create"`: bundle, rootfs, conmon/`runc create`) or started (`stage="start"`);
- `shoal_agent_image_pull_duration_seconds{result}` (histogram): one image pull for a task, from the
  request to the registry until the image is in the store (`result="ok"`), or until it failed
  (`result="error"`; a local copy then used when the registry is unreachable still counts as error).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

PULL_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


class AgentMetrics:
    """The agent's metrics in `registry`. Build it through `enable`."""

    def __init__(self, registry: CollectorRegistry) -> None:
        from prometheus_client import Counter, Histogram

        self.container_starts = Counter(
            "shoal_agent_container_starts", "Task containers this agent started.", registry=registry)
        self.container_failures = Counter(
            "shoal_agent_container_failures",
            "Task containers that failed to be created (stage=create) or started (stage=start).",
            ["stage"], registry=registry)
        self.image_pull = Histogram(
            "shoal_agent_image_pull_duration_seconds", "Image pulls for tasks, by result (ok or error).",
            ["result"], buckets=PULL_BUCKETS, registry=registry)


_current: AgentMetrics | None = None


def enable(registry: CollectorRegistry) -> AgentMetrics:
    """Create the agent's metrics in `registry` (once per process)."""
    global _current
    if _current is not None:
        raise RuntimeError("agent metrics are already enabled in this process")
    _current = AgentMetrics(registry)
    return _current


def disable() -> None:
    """Forget the metrics (tests that enable them in-process)."""
    global _current
    _current = None


def current() -> AgentMetrics | None:
    return _current


def count_start() -> None:
    if _current is not None:
        _current.container_starts.inc()


def count_failure(stage: str) -> None:
    if _current is not None:
        _current.container_failures.labels(stage).inc()


def observe_pull(seconds: float, ok: bool) -> None:
    if _current is not None:
        _current.image_pull.labels("ok" if ok else "error").observe(seconds)
