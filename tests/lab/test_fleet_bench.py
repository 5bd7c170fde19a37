"""bench/fleet.py, small: 3 real managers (swarmd + etcd on 127.0.0.1-3), 20 simulated nodes with real
sessions, a service of 2 tasks per node, the leader killed and 1 % of the nodes killed. Asserts the
JSON line has every figure's key, that no node was falsely DOWN and no task rescheduled by the
failover, and that the bench left no process or directory behind, also when it is stopped (SIGTERM)
in the middle of a step. No timing is asserted. Needs root."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

BENCH = Path(__file__).resolve().parents[2] / "bench"
sys.path.insert(0, str(BENCH))
import fleet  # noqa: E402


def _cmdlines() -> list[str]:
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/cmdline", "rb") as f:
                    out.append(f.read().replace(b"\0", b" ").decode(errors="replace"))
            except OSError:
                pass
    return out


def _step(tmp_path: Path, stop_when: str = "") -> tuple[int, str, str, str]:
    """Run one 20-node step (SIGTERM once `stop_when` is in its stderr, or after 85 s): its exit code,
    stdout, stderr and state dir. The bench ends what it started when it is stopped."""
    err = tmp_path / "stderr"
    with open(err, "w") as ef:
        p = subprocess.Popen([sys.executable, str(BENCH / "fleet.py"), "--nodes", "20", "--idle", "3",
                              "--tasks-per-node", "2", "--steady", "3"], stdout=subprocess.PIPE, stderr=ef, text=True)
    end = time.monotonic() + 85
    while p.poll() is None and time.monotonic() < end and not (stop_when and stop_when in err.read_text()):
        time.sleep(0.2)
    if p.poll() is None:
        p.send_signal(signal.SIGTERM)
    out, _ = p.communicate(timeout=60)
    text = err.read_text()
    m = re.search(r"^fleet: state under (\S+)$", text, re.M)
    assert m, text[-4000:]
    return p.returncode, out, text, m.group(1)


def _nothing_left(base: str) -> None:
    assert not Path(base).exists(), f"{base} left behind"
    left = [c for c in _cmdlines() if base in c]
    assert not left, f"processes left behind: {left}"


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root (swarmd managers)")
def test_fleet_bench_small_step(tmp_path: Path) -> None:
    code, stdout, stderr, base = _step(tmp_path)
    lines = [ln for ln in stdout.splitlines() if ln.startswith('{"bench": "fleet", ')]
    assert code == 0 and lines, stdout[-2000:] + stderr[-4000:]
    res = json.loads(lines[-1])["results"]
    assert set(fleet.KEYS) <= set(res), set(fleet.KEYS) - set(res)
    assert res["errors"] is None, (res["errors"], stderr[-4000:])
    assert res["nodes"] == 20
    assert res["tasks"] == 40
    assert res["false_down"] == 0
    assert res["steady_s"] == 3 and res["false_down_steady"] == 0
    assert res["rescheduled_on_failover"] == 0
    assert res["killed_nodes"] == 1
    for k in ("joins_per_s", "leader_cpu_idle", "manager_rss_mb", "heartbeat_p99_s", "tasks_running_s",
              "api_p99_s", "leader_cpu_steady", "heartbeat_p99_steady_s", "failover_write_s", "failover_sessions_s", "down_s", "down_moved_s"):
        assert res[k] is not None, k
    _nothing_left(base)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root (swarmd managers)")
def test_fleet_bench_stopped_mid_step_leaves_nothing(tmp_path: Path) -> None:
    """SIGTERM (as Ctrl-C) while the nodes are in session: the managers, their etcd members and the
    fleet processes all end, and the state dir goes."""
    code, _, stderr, base = _step(tmp_path, stop_when="nodes ready")
    assert "nodes ready" in stderr, stderr[-4000:]
    assert code != 0, stderr[-4000:]  # stopped, not finished
    _nothing_left(base)
