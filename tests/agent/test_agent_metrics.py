"""The agent's metrics hooks in `EngineAdapter` (shoal.agent.executor) over a real ContainerEngine in a
temporary root: a container that cannot be started counts as a failure of stage "start" and not as a
start; nothing counts while metrics are off. (Create failures and starts: tests/manager/test_metrics_scrape.py.)"""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers.aio import run
from prometheus_client import CollectorRegistry

from shoal.agent import metrics
from shoal.agent.engine import Engine
from shoal.agent.engine.errors import EngineError
from shoal.agent.executor import EngineAdapter


def test_start_failure_counted_by_stage(tmp_path: Path) -> None:
    engine = Engine(tmp_path / "engine")
    adapter = EngineAdapter(engine)
    reg = CollectorRegistry()
    metrics.enable(reg)
    try:
        with pytest.raises(EngineError):
            run(adapter.start("nosuch"))  # no such container: `runc start` is never reached
        assert reg.get_sample_value("shoal_agent_container_failures_total", {"stage": "start"}) == 1
        assert reg.get_sample_value("shoal_agent_container_starts_total") == 0
    finally:
        metrics.disable()
    with pytest.raises(EngineError):
        run(adapter.start("nosuch"))  # off: not counted anywhere, nothing raised but the engine's error
    assert reg.get_sample_value("shoal_agent_container_failures_total", {"stage": "start"}) == 1
