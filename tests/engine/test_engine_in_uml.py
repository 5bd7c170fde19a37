"""The engine's tests again, inside the User-Mode Linux kernel of tests/uml.py: there runc runs on
cgroup v2 (memory, cpu.max and pids limits, OOM kills, seccomp, overlayfs on tmpfs, re-adoption,
cleanup), which this project's machines (cgroup v1 hybrid) never exercise otherwise. On a machine
whose own cgroups are v2 the host run of tests/engine covers that too; this one runs anyway: the
guest's kernel is the one the suite pins (scripts/uml-kernel.config).

Inside, the session guard of tests/conftest.py runs with ``CI=1``: the guest is a machine of our
own, so anything the engine leaves behind (a cgroup, a mount, a process) fails the run there."""

from __future__ import annotations

import os
import re
import time

import pytest
import uml

pytestmark = [pytest.mark.integration, pytest.mark.uml]

HERE = os.path.relpath(__file__, uml.REPO)


def test_engine_tests_pass_in_uml_on_cgroup_v2() -> None:
    if uml.inside():
        pytest.skip("already inside a UML guest (this test is --ignore'd there)")
    if os.geteuid() != 0:
        pytest.fail("needs root (the engine's tests run runc; the kernel is prepared as root)")
    t0 = time.monotonic()
    r = uml.pytest([os.path.dirname(HERE), f"--ignore={HERE}", "-rfEs", "--tb=short"],
                   env={"CI": "1"}, mem="2G", timeout=900)
    took = time.monotonic() - t0
    failed = [ln for ln in r.output.splitlines() if re.match(r"(FAILED|ERROR) ", ln)]
    tail = "\n".join(r.output.splitlines()[-60:])
    assert r.returncode == 0, f"inside UML (exit {r.returncode}), failing: {failed}\n{tail}"
    # pytest's last line (the kernel may write to the same console: an OOM kill's report, say)
    summary = next((ln for ln in reversed(r.output.splitlines()) if re.search(r"\d+ passed\b", ln)), "")
    assert re.search(r"\b\d+ passed\b", summary) and not re.search(r"failed|error|skipped", summary), tail
    # the guest's /sys/fs/cgroup, where the engine and runc found their cgroups, is cgroup v2
    assert "cgroup2" in uml.run(["sh", "-c", "stat -f -c %T /sys/fs/cgroup"]).output
    print(f"{summary} inside UML in {took:.1f} s")
