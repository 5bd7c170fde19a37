"""The fault campaign of bench/faults.py, short: a lab of 3 managers (real swarmd and etcd members in
network namespaces), concurrent clients writing and reading registers through the control API while
leaders are killed, paused and cut off, and the checker of bench/linearizability.py over the
history. Every acknowledged write must survive, no read may be older than a write acknowledged
before it began, and each register's history must be linearizable. Needs root."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
import faults  # noqa: E402
from linearizability import report  # noqa: E402

FAULTS = 8


def test_short_fault_campaign_finds_no_violation() -> None:
    out = faults.run(managers=3, n_faults=FAULTS, clients=5, keys=3, seed=os.getpid(),
                     lab_name=f"fc{os.getpid() % 10000}")
    result = out["result"]
    print(report(result))
    print({k: v for k, v in out.items() if k not in ("camp", "result")})
    for t, kind, what in out["camp"].fault_log:
        print(f"{t:6.1f} s {kind}: {what}")
    assert out["faults"] == FAULTS
    assert len(out["faults_by_kind"]) >= 3, out["faults_by_kind"]  # several kinds of fault, not one
    assert out["ok"] >= 100, "the workload made too little progress to say anything"
    assert not result.lost_writes, report(result)
    assert not result.stale_reads, report(result)
    assert result.ok, report(result)
