"""bench/fleet.py, small: 3 real managers (swarmd + etcd on 127.0.0.1-3), 20 simulated nodes with real
sessions, a service of 2 tasks per node, the leader killed and 1 % of the nodes killed. Asserts the
JSON line has every figure's key, that no node was falsely DOWN and no task rescheduled by the
failover, and that the bench left no process or directory behind. No timing is asserted. Needs root."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
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


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root (swarmd managers)")
def test_fleet_bench_small_step() -> None:
    p = subprocess.run([sys.executable, str(BENCH / "fleet.py"), "--nodes", "20", "--idle", "3",
                        "--tasks-per-node", "2"], capture_output=True, text=True, timeout=85)
    m = re.search(r"^fleet: state under (\S+)$", p.stderr, re.M)
    assert m, p.stderr[-4000:]
    base = m.group(1)
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith('{"bench": "fleet", ')]
    assert p.returncode == 0 and lines, p.stdout[-2000:] + p.stderr[-4000:]
    res = json.loads(lines[-1])["results"]
    assert set(fleet.KEYS) <= set(res), set(fleet.KEYS) - set(res)
    assert res["errors"] is None, (res["errors"], p.stderr[-4000:])
    assert res["nodes"] == 20
    assert res["tasks"] == 40
    assert res["false_down"] == 0
    assert res["rescheduled_on_failover"] == 0
    assert res["killed_nodes"] == 1
    for k in ("joins_per_s", "leader_cpu_idle", "manager_rss_mb", "heartbeat_p99_s", "tasks_running_s",
              "api_p99_s", "failover_write_s", "failover_sessions_s", "down_s", "down_moved_s"):
        assert res[k] is not None, k
    assert not Path(base).exists(), f"{base} left behind"
    left = [c for c in _cmdlines() if base in c]
    assert not left, f"processes left behind: {left}"
