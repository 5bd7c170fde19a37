"""`swarmctl lab up --simulated N`: a lab with N simulated worker nodes beside its real hosts, driven
through real `swarmctl` processes: the simulated nodes join through the CA and hold real sessions
(READY in `node ls`, their engine label), take tasks (RUNNING in memory) only where a constraint lets
them, go DOWN when their process dies, and `lab down` removes them with the rest. Bad counts are
refused before anything is built. Needs root; beside the others (its lab has a name of its own)."""

from __future__ import annotations

import json
import os
import re
import signal
from collections import Counter
from pathlib import Path

import pytest
from test_lab import snapshot, swarmctl, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.beside]

NAME = f"ls{os.getpid() % 10000}"
SIMULATED = 30


def lab(*args: str, check: bool = True, timeout: float = 180):
    return swarmctl("lab", "--name", NAME, *args, check=check, timeout=timeout)


def test_bad_counts_are_refused_before_anything_is_built() -> None:
    from shoal.lab.lab import BASE

    for n in ("-1", "5001"):
        r = lab("up", "--simulated", n, check=False)
        assert r.returncode == 1, r
        assert r.stderr.strip() == ("Error: --simulated must be between 0 and 5000 (simulated nodes run in one "
                                    "process on this machine)"), r.stderr
        assert not (BASE / NAME).exists()
        assert not snapshot(NAME)["netns"]


def test_simulated_nodes_join_take_tasks_go_down_and_leave_nothing() -> None:
    from shoal.lab.lab import LabState

    sim_pid = 0
    try:
        up = lab("up", "--managers", "1", "--workers", "1", "--simulated", str(SIMULATED))
        assert f"{SIMULATED + 2}/{SIMULATED + 2} nodes ready: h1 h2 and {SIMULATED} simulated" in up.stderr, up.stderr
        assert f"1 manager, 1 worker, {SIMULATED} simulated nodes" in up.stderr, up.stderr
        sock = re.search(r"^export SWARM_SOCKET=(\S+)$", up.stdout, re.M).group(1)  # type: ignore[union-attr]

        rows = {r["host"]: r for r in json.loads(lab("status", "--format", "json").stdout)}
        assert list(rows) == ["h1", "h2", "sim"]
        assert rows["sim"] == {"host": "sim", "role": "worker", "addr": "198.18.0.254",
                               "state": f"{SIMULATED}/{SIMULATED} ready", "leader": ""}
        nodes = json.loads(swarmctl("node", "ls", "--format", "json", sock=sock).stdout)
        sims = {n["id"]: n for n in nodes if n["description"]["hostname"].startswith("sim-")}
        assert sorted(n["description"]["hostname"] for n in sims.values()) == [
            f"sim-{i:05d}" for i in range(1, SIMULATED + 1)]
        for n in sims.values():
            assert n["status"]["state"] == "READY" and n["status"]["addr"] == "198.18.0.254", n
            assert n["description"]["engine"]["labels"] == {"simulated": "true"}, n

        # tasks go where the constraints let them: 2 a simulated node (spread), none on the hosts
        swarmctl("service", "create", "--name", "onsim", "--replicas", str(2 * SIMULATED),
                 "--constraint", "engine.labels.simulated==true", "busybox", "sleep", "600", sock=sock)
        tasks = [t for t in json.loads(swarmctl("task", "ls", "--format", "json", sock=sock).stdout)
                 if t.get("service_annotations", {}).get("name") == "onsim"]
        assert len(tasks) == 2 * SIMULATED and all(t["status"]["state"] == "RUNNING" for t in tasks), tasks
        assert Counter(t["node_id"] for t in tasks) == {i: 2 for i in sims}
        swarmctl("service", "create", "--name", "offsim", "--replicas", "2",
                 "--constraint", "engine.labels.simulated!=true", "busybox", "sleep", "600", sock=sock)
        on = {t["node_id"] for t in json.loads(swarmctl("task", "ls", "--format", "json", sock=sock).stdout)
              if t.get("service_annotations", {}).get("name") == "offsim" and t["status"]["state"] == "RUNNING"}
        assert on and not on & set(sims), on

        # their process dies: every simulated node goes DOWN, the lab says why
        st = LabState.load(NAME)
        assert st.simulated == SIMULATED and st.sim_pid
        sim_pid = st.sim_pid
        os.kill(sim_pid, signal.SIGKILL)

        def all_down() -> bool:
            ns = json.loads(swarmctl("node", "ls", "--format", "json", sock=sock).stdout)
            return all(n["status"]["state"] == "DOWN" for n in ns if n["id"] in sims)

        wait_for(all_down, "every simulated node DOWN", 60)
        rows = {r["host"]: r for r in json.loads(lab("status", "--format", "json").stdout)}
        assert rows["sim"]["state"] == f"0/{SIMULATED} ready (process stopped)", rows
        assert rows["h1"]["state"] == rows["h2"]["state"] == "ready", rows
    finally:
        lab("down", check=False, timeout=120)
    after = snapshot(NAME)
    assert after["netns"] == set() and after["procs"] == set() and after["state"] == set(), after
    assert sim_pid and not Path(f"/proc/{sim_pid}").exists()
