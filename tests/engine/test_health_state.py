"""Docker's health state machine (start period, retries, recovery), fed with probe results. No root."""

import time

from shoal.agent.engine.health import HealthMonitor, ProbeResult
from shoal.agent.engine.spec import HealthSpec


def monitor(tmp_path, start_period=0.0):
    async def alive():
        return True

    changes = []
    m = HealthMonitor(
        "c",
        HealthSpec(["CMD", "x"], retries=3, start_period=start_period),
        lambda a, p: a,
        tmp_path / "health.json",
        time.time(),
        alive,
        lambda c, s: changes.append(s),
    )
    return m, changes


def res(code):
    return ProbeResult(0, 0, code, "out")


def test_retries_then_unhealthy_then_recovers(tmp_path):
    m, changes = monitor(tmp_path)
    m.record(res(1))
    m.record(res(1))
    assert m.state.status == "starting" and m.state.failing_streak == 2
    m.record(res(1))
    assert m.state.status == "unhealthy"
    m.record(res(0))
    assert m.state.status == "healthy" and m.state.failing_streak == 0
    assert changes == ["unhealthy", "healthy"]
    assert len(m.state.log) == 4 and (tmp_path / "health.json").exists()


def test_start_period_failures_do_not_count(tmp_path):
    m, _ = monitor(tmp_path, start_period=3600)
    for _ in range(5):
        m.record(res(1))
    assert m.state.status == "starting" and m.state.failing_streak == 0
    m.record(res(0))
    m.record(res(1))  # once healthy, failures count even inside the start period
    assert m.state.failing_streak == 1


def test_state_survives_a_new_monitor(tmp_path):
    m, _ = monitor(tmp_path)
    m.record(res(0))
    m2, _ = monitor(tmp_path)
    assert m2.state.status == "healthy" and len(m2.state.log) == 1
