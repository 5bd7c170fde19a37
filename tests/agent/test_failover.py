"""Leader failover seen from an agent: 3 managers + 1 worker (swarmd processes on loopback). The
leader is killed with SIGKILL; the worker's agent opens a session with the new leader, its running
tasks are untouched, and new assignments from the new leader reach it. Needs root."""

from __future__ import annotations

import json
import signal
import tempfile
import time
from datetime import datetime
from pathlib import Path

import pytest
from agent_helpers import PREFIX
from cluster_helpers import (
    Node,
    cleanup_cluster,
    ctl,
    dump_logs,
    running_containers,
    sessions,
    wait_until,
)

from shoal.lab.registry import free_port

pytestmark = pytest.mark.integration


def test_agent_follows_the_new_leader_after_the_leader_dies(registry) -> None:
    base = Path(tempfile.mkdtemp(prefix=f"sh{PREFIX}f-", dir="/var/tmp"))
    m1, m2, m3, w1 = (Node(base, n) for n in ("m1", "m2", "m3", "w1"))
    nodes = (m1, m2, m3, w1)
    try:
        m1.start("--listen-raft", f"127.0.0.1:{free_port()}")
        sock1 = m1.dir / "swarmd.sock"
        mtoken = wait_until(
            lambda: (
                sock1.exists() and ctl(sock1, "swarm", "join-token", "manager", "-q", check=False).strip()
            ),
            what="first manager up",
        )
        wtoken = ctl(sock1, "swarm", "join-token", "worker", "-q").strip()
        for m in (m2, m3):
            m.start(
                "--listen-raft",
                f"127.0.0.1:{free_port()}",
                "--manager",
                "--join-addr",
                m1.api,
                "--join-token",
                mtoken,
            )
        w1.start("--join-addr", m1.api, "--join-token", wtoken)

        def node_states(sock: Path) -> dict[str, str]:
            out = ctl(sock, "node", "ls", "--format", "json", check=False)
            if not out.strip():
                return {}
            return {
                n["description"]["hostname"]: n.get("status", {}).get("state", "") for n in json.loads(out)
            }

        wait_until(
            lambda: set(node_states(sock1).values()) == {"READY"} and len(node_states(sock1)) == 4,
            timeout=90,
            what="4 nodes READY",
        )

        def store_members(sock: Path) -> list[str]:
            """The managers whose etcd member is a voter this manager reaches (Leader or Reachable)."""
            out = ctl(sock, "node", "ls", "--format", "json", check=False)
            nodes = json.loads(out) if out.strip() else []
            return [n["description"]["hostname"] for n in nodes
                    if n.get("manager_status", {}).get("reachability") == "REACHABLE"]

        # A manager's Node is READY when the CA admits it; its etcd member joins the store (one learner
        # at a time) a few seconds later. Kill the leader only once all three are voters.
        wait_until(lambda: len(store_members(sock1)) == 3, timeout=90, what="3 managers in the store")
        image = f"{registry.host}/library/busybox:latest"
        ctl(
            sock1,
            "service",
            "create",
            "--name",
            "web",
            "--replicas",
            "2",
            "--constraint",
            "node.hostname==w1",
            "--stop-grace-period",
            "1s",
            image,
            "sleep",
            "600",
        )
        before = running_containers(w1)
        assert len(before) == 2
        wait_until(lambda: len(sessions(base / "w1.log")) >= 1, what="w1 session")
        first = sessions(base / "w1.log")[-1][1]
        assert first == m1.api

        # Kill the leader; the worker must open a session with whichever manager leads next.
        killed_at = datetime.now()
        m1.stop(signal.SIGKILL)
        moved = wait_until(
            lambda: [s for s in sessions(base / "w1.log") if s[0] > killed_at],
            timeout=60,
            what="w1 session with the new leader",
        )
        new_leader = moved[-1][1]
        assert new_leader in (m2.api, m3.api)
        sock = (m2 if new_leader == m2.api else m3).dir / "swarmd.sock"
        print(f"w1 followed the new leader {(moved[-1][0] - killed_at).total_seconds():.2f} s after the kill")

        # The worker stays READY (the new leader gave it a grace period), its tasks kept running,
        # and the new leader's assignments reach it.
        wait_until(
            lambda: node_states(sock).get("w1") == "READY" and node_states(sock).get("m1") == "DOWN",
            timeout=30,
            what="w1 READY, m1 DOWN",
        )
        assert running_containers(w1) == before
        ctl(sock, "service", "scale", "--detach", "web=4")
        wait_until(lambda: len(running_containers(w1)) == 4, timeout=60, what="4 containers on w1")
        assert set(before) <= set(running_containers(w1))
        time.sleep(0.1)
        ctl(sock, "service", "rm", "web")
        wait_until(lambda: running_containers(w1) == [], what="containers stopped on w1")
    except BaseException:
        for m in (m2, m3):
            print(ctl(m.dir / "swarmd.sock", "service", "ps", "web", check=False, timeout=10))
        dump_logs(base, nodes, lines=60)
        raise
    finally:
        cleanup_cluster(base, nodes)
