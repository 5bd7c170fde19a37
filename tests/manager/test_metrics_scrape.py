"""`swarmd --metrics-addr`: a real single-manager swarmd on loopback (etcd member, control API, scheduler,
dispatcher, its own agent running runc containers, gossip) and a real registry. Scrape /metrics, create a
service with a real swarmctl, scrape again: every series docs/operations.md lists exists and the ones
that count moved. /metrics/etcd relays the etcd member's own metrics. Needs root."""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers.registry import local_registry
from helpers.swarmd import Swarmd, remove_containers, unmount_under
from helpers.waiting import wait_for
from prometheus_client.parser import text_string_to_metric_families

from shoal.lab.registry import Registry, free_port

pytestmark = pytest.mark.integration
PREFIX = f"mt{os.getpid() % 10000}"

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


class Node(Swarmd):
    ctl_timeout = 180

    def __init__(self) -> None:
        self.base = Path(tempfile.mkdtemp(prefix=f"{PREFIX}-", dir="/var/tmp"))
        self.metrics_addr = f"127.0.0.1:{free_port('127.0.0.1')}"
        super().__init__(self.base, "m1", hostname=f"{PREFIX}m1", gossip=True,
                         extra=["--metrics-addr", self.metrics_addr])

    def wait_ready(self) -> None:
        def ready() -> bool:
            if not self.sock.exists():
                return False
            r = self.ctl("node", "ls", "--format", "json")
            return r.returncode == 0 and any(n.get("status", {}).get("state") == "READY" for n in json.loads(r.stdout))

        wait_for(ready, timeout=60, what=f"swarmd ready (log: {self.log})")

    def get(self, path: str) -> tuple[int, str, str]:
        try:
            with urllib.request.urlopen(f"http://{self.metrics_addr}{path}", timeout=10) as r:
                return r.status, r.headers.get("Content-Type", ""), r.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.headers.get("Content-Type", ""), e.read().decode()

    def scrape(self) -> Samples:
        status, ctype, body = self.get("/metrics")
        assert status == 200 and ctype.startswith("text/plain; version=0.0.4"), (status, ctype)
        out: Samples = {}
        for fam in text_string_to_metric_families(body):
            for s in fam.samples:
                out[(s.name, tuple(sorted(s.labels.items())))] = s.value
        return out

    def cleanup(self) -> None:
        remove_containers(self.dir / "engine")
        unmount_under(self.base)
        shutil.rmtree(self.base, ignore_errors=True)


@pytest.fixture(scope="module")
def registry() -> Iterator[Registry]:
    if os.geteuid() != 0:
        pytest.fail("swarmd tests need root (or deselect with -m 'not integration')")
    with local_registry() as reg:
        yield reg


@pytest.fixture(scope="module")
def node(registry: Registry) -> Iterator[Node]:
    n = Node()
    try:
        n.start()
        n.wait_ready()
        yield n
    except BaseException:
        if n.log.exists():
            sys.stderr.write("---- swarmd log tail\n" + "\n".join(n.log.read_text().splitlines()[-40:]) + "\n")
        raise
    finally:
        n.stop()
        n.cleanup()


def v(s: Samples, name: str, **labels: str) -> float:
    return s.get((name, tuple(sorted(labels.items()))), 0.0)


def test_scrape_before_and_after_a_service(node: Node, registry: Registry) -> None:
    # The node is READY once its session registered it; the session is counted right after.
    wait_for(lambda: v(node.scrape(), "shoal_dispatcher_sessions") == 1, timeout=10, what="1 dispatcher session")
    before = node.scrape()
    assert v(before, "shoal_store_leader") == 1 and v(before, "shoal_manager_leader") == 1
    assert v(before, "shoal_store_raft_term") >= 1 and v(before, "shoal_store_revision") > 0
    assert v(before, "shoal_dispatcher_sessions") == 1  # its own agent
    assert v(before, "shoal_dispatcher_sessions_opened_total") >= 1
    assert v(before, "process_resident_memory_bytes") > 10e6
    # A node advertising a loopback address has no data path, so no gossip (agent/network.py): the
    # gossip families are declared without samples (tests/netdriver/test_gossip_metrics.py has them).
    body = node.get("/metrics")[2]
    for fam in ("shoal_gossip_members", "shoal_gossip_table_entries", "shoal_gossip_networks"):
        assert f"# TYPE {fam} gauge" in body
        assert not [k for k in before if k[0] == fam]

    image = f"{registry.host}/library/busybox:latest"
    name = f"{PREFIX}web"
    out = node.ok("service", "create", "--name", name, "--replicas", "2", "--stop-grace-period", "1s",
                  image, "sleep", "600")
    assert f"verify: Service {name} converged" in out
    time.sleep(1.5)  # at least one more heartbeat period (1 s)
    after = node.scrape()

    def moved(name: str, by: float = 1, **labels: str) -> None:
        b, a = v(before, name, **labels), v(after, name, **labels)
        assert a - b >= by, f"{name}{labels}: {b} -> {a}"

    moved("shoal_controlapi_requests_total", method="CreateService", code="OK")
    moved("shoal_controlapi_request_duration_seconds_count", method="CreateService")
    moved("shoal_controlapi_requests_total", method="GetService", code="OK")  # swarmctl's progress polling
    # The remote API (mutual TLS, behind the authorizer) is counted too.
    lists = v(after, "shoal_controlapi_requests_total", method="ListNodes", code="OK")
    node.ok("node", "ls", remote=True)
    assert v(node.scrape(), "shoal_controlapi_requests_total", method="ListNodes", code="OK") == lists + 1
    moved("shoal_store_write_duration_seconds_count", by=3)  # service, 2 tasks, assignments, statuses
    moved("shoal_store_watch_latency_seconds_count", by=3)
    assert v(after, "shoal_store_write_duration_seconds_sum") > v(before, "shoal_store_write_duration_seconds_sum")
    moved("shoal_store_revision", by=3)
    assert v(after, "shoal_manager_tasks", state="RUNNING") - v(before, "shoal_manager_tasks", state="RUNNING") == 2
    moved("shoal_scheduler_decisions_total", by=2, result="assigned")
    assert ("shoal_scheduler_pending_tasks", ()) in after and v(after, "shoal_scheduler_pending_tasks") == 0
    moved("shoal_dispatcher_heartbeats_total")
    moved("shoal_agent_container_starts_total", by=2)
    moved("shoal_agent_image_pull_duration_seconds_count", by=1, result="ok")
    assert v(after, "shoal_agent_container_failures_total", stage="create") == v(
        before, "shoal_agent_container_failures_total", stage="create")

    # An unplaceable service: the scheduler's decision is "unplaced" and the task stays pending.
    node.ok("service", "create", "-d", "--name", f"{name}x", "--constraint", "node.labels.nowhere==1", image,
            "sleep", "600")
    wait_for(lambda: v(node.scrape(), "shoal_scheduler_decisions_total", result="unplaced") >= 1, timeout=30,
             what="an unplaced decision")
    wait_for(lambda: v(node.scrape(), "shoal_scheduler_pending_tasks") == 1, timeout=30, what="1 pending task")
    assert v(node.scrape(), "shoal_manager_tasks", state="PENDING") == 1
    node.ok("service", "rm", name, f"{name}x")


def test_pull_and_create_failures_are_counted(node: Node, registry: Registry) -> None:
    before = node.scrape()
    name = f"{PREFIX}bad"
    # An image the registry does not have: the pull fails (result="error").
    node.ok("service", "create", "-d", "--name", f"{name}img", "--restart-max-attempts", "1",
            f"{registry.host}/library/nosuch:latest", "true")
    # A bind mount whose source does not exist: the container cannot be created (stage="create").
    node.ok("service", "create", "-d", "--name", f"{name}mnt", "--restart-max-attempts", "1",
            "--mount", f"type=bind,source=/nonexistent-{PREFIX},target=/x",
            f"{registry.host}/library/busybox:latest", "sleep", "600")
    try:
        wait_for(lambda: v(node.scrape(), "shoal_agent_image_pull_duration_seconds_count", result="error")
                 > v(before, "shoal_agent_image_pull_duration_seconds_count", result="error"),
                 timeout=60, what="a failed pull observed")
        wait_for(lambda: v(node.scrape(), "shoal_agent_container_failures_total", stage="create")
                 > v(before, "shoal_agent_container_failures_total", stage="create"),
                 timeout=60, what="a failed container create counted")
        after = node.scrape()
        assert v(after, "shoal_agent_container_starts_total") == v(before, "shoal_agent_container_starts_total")
    finally:
        node.ok("service", "rm", f"{name}img", f"{name}mnt")


def test_etcd_member_metrics_are_relayed(node: Node) -> None:
    status, ctype, body = node.get("/metrics/etcd")
    assert status == 200 and ctype.startswith("text/plain; version=0.0.4")
    fams = {f.name: f for f in text_string_to_metric_families(body)}
    [has_leader] = fams["etcd_server_has_leader"].samples
    assert has_leader.value == 1
    assert "etcd_disk_wal_fsync_duration_seconds" in fams
    assert node.get("/nope")[0] == 404
