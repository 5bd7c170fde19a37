"""A 1-manager + 2-worker cluster on loopback: real swarmd processes (Raft, mTLS, CA join), real
swarmctl processes, a real registry, real runc containers. A 6-replica busybox service spreads 2/2/2;
a worker's swarmd killed and started again at once, or stopped with SIGTERM and started 30 s later,
keeps its tasks and re-adopts the same containers, never marked DOWN; a worker killed with SIGKILL
and not restarted goes DOWN and its tasks run elsewhere; restarted, its agent re-adopts its
containers and stops them (their tasks were replaced). Needs root."""

from __future__ import annotations

import json
import signal
import tempfile
import time
from collections import Counter
from pathlib import Path

import pytest
from agent_helpers import PREFIX
from cluster_helpers import (
    Node,
    cleanup_cluster,
    ctl,
    dump_logs,
    running_containers,
    running_pids,
    sessions,
    wait_until,
)
from helpers.swarmd import task_netns

from shoal.lab.registry import free_port

pytestmark = pytest.mark.integration


def test_one_manager_two_workers_run_six_replicas_spread_two_each(registry) -> None:
    base = Path(tempfile.mkdtemp(prefix=f"sh{PREFIX}c-", dir="/var/tmp"))
    m1, w1, w2 = (Node(base, n) for n in ("m1", "w1", "w2"))
    nodes = (m1, w1, w2)
    sock = m1.dir / "swarmd.sock"
    try:
        m1.start("--listen-raft", f"127.0.0.1:{free_port()}")
        token = wait_until(
            lambda: sock.exists() and ctl(sock, "swarm", "join-token", "worker", "-q", check=False).strip(),
            what="manager up",
        )
        for w in (w1, w2):
            w.start("--join-addr", m1.api, "--join-token", token)

        def by_name() -> dict[str, dict]:
            return {
                n["description"]["hostname"]: n
                for n in json.loads(ctl(sock, "node", "ls", "--format", "json"))
            }

        def all_ready() -> bool:  # and each described by its agent's session (the join wrote the hostname only)
            ns = by_name()
            return len(ns) == 3 and all(n.get("status", {}).get("state") == "READY"
                                        and n["description"].get("platform") for n in ns.values())

        wait_until(all_ready, what="3 nodes READY, each described by its agent")
        ids = {name: n["id"] for name, n in by_name().items()}
        desc = by_name()["w1"]["description"]
        assert desc["platform"]["os"] == "linux" and int(desc["resources"]["nano_cpus"]) > 0
        assert desc["engine"]["engine_version"]

        image = f"{registry.host}/library/busybox:latest"
        ctl(
            sock,
            "service",
            "create",
            "--name",
            "web",
            "--replicas",
            "6",
            "--stop-grace-period",
            "1s",
            image,
            "sh",
            "-c",
            "echo hello; sleep 600",
        )

        def tasks(state: str = "RUNNING") -> list[dict]:
            ts = json.loads(ctl(sock, "service", "ps", "web", "--format", "json"))
            return [
                t
                for t in ts
                if t.get("status", {}).get("state") == state and t.get("desired_state", "NEW") == "RUNNING"
            ]

        running = wait_until(lambda: len(tasks()) == 6 and tasks(), what="6 tasks RUNNING")
        spread = Counter(t["node_id"] for t in running)
        assert sorted(spread.values()) == [2, 2, 2], spread
        assert set(spread) == set(ids.values())
        for n in nodes:  # each node's engine runs exactly its two tasks
            assert running_containers(n) == sorted(t["id"] for t in running if t["node_id"] == ids[n.name])

        # `swarmctl service logs`: one line from each task, streamed from the three agents.
        want = sorted(
            f"web.{t['slot']}.{t['id'][:12]}@{name}    | hello"
            for t in running
            for name, nid in ids.items()
            if t["node_id"] == nid
        )
        got = wait_until(
            lambda: sorted(ctl(sock, "service", "logs", "web").splitlines()) == want and want,
            timeout=20,
            what="service logs",
        )
        assert len(got) == 6

        # Restarts are not failures (default 1 s heartbeat): SIGKILL w1's swarmd and start it again at
        # once (a crash under systemd), then SIGTERM it (an upgrade) and start it 10 s later (more than
        # three times the 2.8 s after which missed heartbeats mark a node DOWN). Each time
        # its agent re-adopts the same container processes, no task is replaced or duplicated, and the
        # node is never marked DOWN.
        pids = running_pids(w1)
        ids_before = sorted(t["id"] for t in tasks())
        n_sessions = len(sessions(base / "w1.log"))
        w1.stop(signal.SIGKILL)
        w1.start()
        wait_until(lambda: len(sessions(base / "w1.log")) > n_sessions, what="w1 session after a crash")
        wait_until(lambda: "re-adopted" in (base / "w1.log").read_text(), what="w1 re-adoption")
        assert running_pids(w1) == pids
        assert sorted(t["id"] for t in tasks()) == ids_before
        assert by_name()["w1"]["status"]["state"] == "READY"

        n_sessions = len(sessions(base / "w1.log"))
        w1.stop(signal.SIGTERM)
        assert "told the dispatcher this node is restarting" in (base / "w1.log").read_text()
        status = by_name()["w1"]["status"]
        assert status["state"] == "DISCONNECTED" and "back within 60 s" in status["message"], status
        time.sleep(10)
        assert by_name()["w1"]["status"]["state"] == "DISCONNECTED"
        assert sorted(t["id"] for t in tasks()) == ids_before  # nothing replaced meanwhile
        w1.start()
        wait_until(lambda: len(sessions(base / "w1.log")) > n_sessions, what="w1 session after a graceful restart")
        wait_until(lambda: by_name()["w1"]["status"]["state"] == "READY", what="w1 READY again")
        assert running_pids(w1) == pids
        assert sorted(t["id"] for t in tasks()) == ids_before
        assert f"node down node={ids['w1']}" not in (base / "m1.log").read_text()

        # SIGKILL a worker: DOWN, and its tasks run on the two others.
        lost = sorted(running_containers(w2))
        w2.stop(signal.SIGKILL)
        wait_until(lambda: by_name()["w2"]["status"]["state"] == "DOWN", what="w2 DOWN")
        moved = wait_until(
            lambda: len(tasks()) == 6 and all(t["node_id"] != ids["w2"] for t in tasks()) and tasks(),
            what="tasks rescheduled",
        )
        assert sorted(Counter(t["node_id"] for t in moved).values()) == [3, 3]
        assert running_containers(w2) == lost  # the containers outlived their agent

        # Restarted, w2's agent re-adopts them and stops them: their tasks were replaced.
        w2.start()
        wait_until(lambda: by_name()["w2"]["status"]["state"] == "READY", what="w2 READY again")
        wait_until(lambda: running_containers(w2) == [], what="replaced containers stopped on w2")
        assert len(tasks()) == 6

        ctl(sock, "service", "rm", "web")
        for n in nodes:
            wait_until(
                lambda n=n: (
                    not (n.dir / "engine" / "containers").exists()
                    or not any((n.dir / "engine" / "containers").iterdir())
                ),
                what=f"containers removed on {n.name}",
            )
        # ... and their network namespaces (`n<node id[:6]>-c<task id[:12]>`) with them.
        wait_until(lambda: not task_netns(ids.values()), what="task network namespaces removed")
    except BaseException:
        dump_logs(base, nodes)
        raise
    finally:
        cleanup_cluster(base, nodes)
