"""swarmctl against 3 real swarmd managers and a worker on loopback: node ls manager status, leader
failover after kill -9, promote and demote, and a majority of managers down (writes refused with the
quorum error, exit 1; reads still answer). Services have 0 replicas: no container runs."""

from __future__ import annotations

import functools
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from helpers.swarmd import Swarmd, unmount_under
from helpers.waiting import wait_for

pytestmark = pytest.mark.integration
PREFIX = f"st{os.getpid() % 10000}"


class Daemon(Swarmd):
    def __init__(self, base: Path, name: str) -> None:
        super().__init__(base, name, hostname=f"{PREFIX}{name}")

    def start(self, *extra: str) -> Daemon:  # type: ignore[override]
        """Start it; arguments given once (a join) are kept for the restarts."""
        if extra:
            self.extra = list(extra)
        super().start()
        return self


wait = functools.partial(wait_for, timeout=60, interval=0.2)


def manager_rows(d: Daemon) -> dict[str, list[str]]:
    """hostname -> [STATUS, AVAILABILITY, MANAGER STATUS] as `node ls` shows them ('' for workers)."""
    r = d.ctl("node", "ls", "--format", "json", timeout=20)
    if r.returncode != 0:
        return {}
    rows = {}
    for n in json.loads(r.stdout):
        ms = n.get("manager_status", {})
        mstatus = ""
        if n.get("role") == "MANAGER":
            mstatus = "Leader" if ms.get("leader") else ms.get("reachability", "UNKNOWN").capitalize()
        rows[n["description"]["hostname"]] = [n.get("status", {}).get("state", "UNKNOWN").capitalize(),
                                              n.get("spec", {}).get("availability", "ACTIVE").capitalize(), mstatus]
    return rows


@pytest.fixture
def cluster() -> Iterator[Callable[[str], Daemon]]:
    base = Path(tempfile.mkdtemp(prefix=f"{PREFIX}m-", dir="/tmp"))  # short: unix socket paths
    made: list[Daemon] = []

    def make(name: str) -> Daemon:
        d = Daemon(base, name)
        made.append(d)
        return d

    try:
        yield make
    except BaseException:
        for d in made:
            if d.log.exists():
                sys.stderr.write(f"---- {d.name}\n" + "\n".join(d.log.read_text().splitlines()[-25:]) + "\n")
        raise
    finally:
        for d in made:
            d.kill()
        unmount_under(base)
        shutil.rmtree(base, ignore_errors=True)


def test_managers_failover_promote_demote_and_quorum_loss(cluster) -> None:
    m1, m2, m3, w1 = (cluster(n) for n in ("m1", "m2", "m3", "w1"))
    m1.start()
    mtok = wait(lambda: (m1.dir / "swarmd.sock").exists() and m1.ctl("swarm", "join-token", "-q", "manager")
                .stdout.strip(), "m1 up")
    wtok = m1.ok("swarm", "join-token", "-q", "worker").strip()
    m2.start("--join-addr", m1.api, "--join-token", str(mtok))
    m3.start("--join-addr", m1.api, "--join-token", str(mtok))
    w1.start("--join-addr", m1.api, "--join-token", wtok)

    def states(d: Daemon) -> dict[str, list[str]]:
        return manager_rows(d)

    def settled(d: Daemon) -> bool:
        rows = states(d)
        if len(rows) != 4 or any(r[0] != "Ready" for r in rows.values()):
            return False
        ms = sorted(r[2] for r in rows.values() if r[2])
        return ms == ["Leader", "Reachable", "Reachable"] and rows[w1.name][2] == ""

    wait(lambda: settled(m1), "3 managers and a worker ready")
    assert states(m1)[m1.name][2] == "Leader"
    m2.ok("service", "create", "-d", "--name", "s1", "--replicas", "0", "busybox")  # written through a follower
    assert "s1" in m3.ok("service", "ls")

    # kill -9 of the leader: another manager leads, swarmctl writes go on, node ls says so.
    m1.kill()
    wait(lambda: (rows := states(m2)) and rows.get(m1.name, ["", "", ""])[2] == "Unreachable"
         and "Leader" in {r[2] for r in rows.values()}, "a new leader, m1 unreachable")
    m3.ok("service", "create", "-d", "--name", "s2", "--replicas", "0", "busybox")
    m1.start()
    wait(lambda: settled(m2), "m1 back as a reachable manager")
    assert [s["spec"]["annotations"]["name"] for s in json.loads(m1.ok("service", "ls", "--format", "json"))] == [
        "s1", "s2"]
    # The table marks the node swarmctl talks to with '*' and shows the leader.
    table = m1.ok("node", "ls").splitlines()
    assert any(line.split()[1:3] == ["*", m1.name] for line in table[1:])
    assert sum(" Leader " in f"{line} " for line in table) == 1

    # promote the worker, demote a manager.
    assert "promoted" in m2.ok("node", "promote", w1.name)
    wait(lambda: states(m2).get(w1.name, ["", "", ""])[2] in ("Reachable", "Leader"), "w1 a reachable manager")
    assert "demoted" in m2.ok("node", "demote", m3.name)
    wait(lambda: states(m2).get(m3.name, ["", "", "x"])[2] == "", "m3 a worker")
    r = m2.ctl("node", "rm", m3.name)
    assert r.returncode == 1 and "is not down and can't be removed" in r.stderr

    # a majority down: writes refused with the quorum error (exit 1), reads still answer.
    wait(lambda: sorted(r[2] for r in states(m2).values() if r[2]) == ["Leader", "Reachable", "Reachable"],
         "3 reachable managers")
    survivors = [m1, m2, w1]
    leader = next(d for d in survivors if states(m2).get(d.name, [""] * 3)[2] == "Leader")
    down = [d for d in survivors if d is not leader][:1] + [leader]
    alive = next(d for d in survivors if d not in down)
    for d in down:
        d.kill()
    for d in down:  # down means their etcd members too (each stops gracefully on its swarmd's death)
        d.wait_etcd_gone()
    r = alive.ctl("service", "create", "-d", "--name", "s3", "--replicas", "0", "busybox", timeout=60)
    assert r.returncode == 1 and r.stderr.startswith("Error: ") and "quorum" in r.stderr, r.stderr
    names = [s["spec"]["annotations"]["name"] for s in json.loads(alive.ok("service", "ls", "--format", "json"))]
    assert names == ["s1", "s2"]
    info = alive.ok("info")
    assert "Is Manager: true" in info
