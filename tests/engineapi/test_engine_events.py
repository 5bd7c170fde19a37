"""`docker events --filter scope=swarm` against swarmd's Engine API: the swarm's changes as Docker's
events (create/update/remove of secrets, nodes, services...), filters, and `--until` ending the
stream. Needs root."""

from __future__ import annotations

import json
import os
import subprocess
import time

import pytest
from engine_helpers import DOCKER, EngineManager

pytestmark = pytest.mark.integration


def follow(mgr: EngineManager, *args: str, seconds: float) -> subprocess.Popen[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DOCKER_")}
    env.update(DOCKER_HOST=f"unix://{mgr.docker_sock}", DOCKER_CONFIG=str(mgr.base / "docker-config"))
    until = f"{time.time() + seconds:.3f}"
    return subprocess.Popen([DOCKER, "events", "--until", until, *args], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def test_swarm_events_stream_with_filters_and_until(mgr: EngineManager) -> None:
    node = mgr.info().node_id
    every = follow(mgr, "--filter", "scope=swarm", "--format", "{{json .}}", seconds=6)
    secrets_only = follow(mgr, "--filter", "type=secret", seconds=6)
    time.sleep(1)  # both streams open
    mgr.ok("secret", "create", "evs1", "-", input="x")
    mgr.ok("node", "update", "--availability", "pause", node)
    mgr.ok("secret", "rm", "evs1")
    mgr.ok("node", "update", "--availability", "active", node)
    out, err = every.communicate(timeout=30)
    assert every.returncode == 0, err
    events = [json.loads(line) for line in out.splitlines()]
    seen = [(e["Type"], e["Action"], e["Actor"]["Attributes"].get("name")) for e in events]
    assert ("secret", "create", "evs1") in seen and ("secret", "remove", "evs1") in seen, seen
    pause = next(e for e in events if e["Type"] == "node" and e["Actor"]["Attributes"].get("availability.new") == "pause")
    assert pause["Actor"]["ID"] == node and pause["Actor"]["Attributes"]["availability.old"] == "active"
    assert all(e["scope"] == "swarm" and e["timeNano"] // 10**9 == e["time"] for e in events)
    assert not any(e["Type"] == "task" for e in events)  # Docker has no swarm task events
    out, err = secrets_only.communicate(timeout=30)
    assert secrets_only.returncode == 0, err
    lines = out.splitlines()
    assert len(lines) == 2 and " secret create " in lines[0] and "(name=evs1)" in lines[0], lines
    assert " secret remove " in lines[1], lines
