"""swarmd end to end: real daemons on 127.0.0.x, Raft over TCP, joins with tokens over (m)TLS.

One cluster per test function keeps the suite fast: init, 2 manager joins, 1 worker join, refused
tokens, restart with the same state dir, kill -9 of the leader, promotion and demotion, SIGTERM."""

from __future__ import annotations

import functools
import stat

import grpc
import pytest
from helpers.swarmd import Swarmd as Daemon
from helpers.waiting import wait_for

from shoal.proto import control_pb2, specs_pb2, types_pb2

pytestmark = pytest.mark.integration


wait = functools.partial(wait_for, retry_on=(grpc.RpcError,))


def leader_id(d: Daemon) -> str:
    return d.info().leader_node_id


def managers_reachable(d: Daemon, n: int) -> bool:
    info = d.info()
    return len(info.members) == n and all(m.reachable for m in info.members) and bool(info.leader_node_id)


def set_role(d: Daemon, node_id: str, role: int) -> None:
    """Read, change, write; read again when the agent's status updates raced the write."""
    c = d.control()
    for _ in range(50):
        node = c.GetNode(control_pb2.GetNodeRequest(node_id=node_id), timeout=5).node
        spec = specs_pb2.NodeSpec()
        spec.CopyFrom(node.spec)
        spec.desired_role = role
        req = control_pb2.UpdateNodeRequest(node_id=node.id, node_version=node.meta.version, spec=spec)
        try:
            c.UpdateNode(req, timeout=10)
            return
        except grpc.RpcError as e:
            if e.code() != grpc.StatusCode.ABORTED:
                raise
    raise AssertionError("node update kept conflicting")


def create_secret(d: Daemon, name: str) -> None:
    spec = specs_pb2.SecretSpec(annotations=types_pb2.Annotations(name=name), data=b"s3cret")
    d.control().CreateSecret(control_pb2.CreateSecretRequest(spec=spec), timeout=10)


def secret_names(d: Daemon) -> set[str]:
    return {s.spec.annotations.name for s in d.control().ListSecrets(control_pb2.ListSecretsRequest(), timeout=5).secrets}


def test_cluster_init_join_restart_failover_and_roles(daemons):
    m1 = daemons("m1", "127.0.0.1").start()
    wait(lambda: m1.sock.exists() and m1.control().ListNodes(control_pb2.ListNodesRequest(), timeout=5).nodes,
         "m1 to create its cluster")
    assert stat.S_IMODE(m1.sock.stat().st_mode) == 0o600
    m1_id = m1.info().node_id
    cluster = m1.control().GetCluster(control_pb2.GetClusterRequest(), timeout=5).cluster
    assert cluster.spec.default_address_pool == ["10.0.0.0/8"] and cluster.spec.subnet_size == 24
    assert cluster.spec.orchestration.task_history_retention_limit == 5
    assert cluster.spec.dispatcher.heartbeat_period.seconds == 1
    tokens = cluster.root_ca.join_tokens
    assert tokens.worker.startswith("SWMTKN-1-") and tokens.manager != tokens.worker

    m2 = daemons("m2", "127.0.0.2", ["--join-addr", m1.api, "--join-token", tokens.manager]).start()
    m3 = daemons("m3", "127.0.0.3", ["--join-addr", m1.api, "--join-token", tokens.manager]).start()
    w1 = daemons("w1", "127.0.0.4", ["--join-addr", m1.api, "--join-token", tokens.worker]).start()
    wait(lambda: managers_reachable(m1, 3), "3 reachable managers")
    wait(lambda: m2.sock.exists() and leader_id(m2) == m1_id, "m2 to follow m1")
    wait(lambda: (w1.dir / "node.json").exists(), "w1 to join")
    nodes = {n.description.hostname: n for n in m1.control().ListNodes(control_pb2.ListNodesRequest(), timeout=5).nodes}
    assert {h: n.role for h, n in nodes.items()} == {
        "m1": types_pb2.MANAGER, "m2": types_pb2.MANAGER, "m3": types_pb2.MANAGER, "w1": types_pb2.WORKER
    }
    assert not w1.sock.exists()  # workers serve no control API
    # The join answer told the heartbeat period (1 s: 4 nodes), kept for the agent's first connection.
    assert (w1.dir / "worker" / "heartbeat-period").read_text() == "1.000\n"

    # A wrong token and a rotated one are refused with the clear message; nothing is left joined.
    bad = daemons("bad", "127.0.0.5")
    code, err = bad.run_to_exit(["--join-addr", m1.api, "--join-token", tokens.worker[:-5] + "aaaaa"])
    assert code != 0
    assert "join token is invalid or was rotated: get a current one with `swarmctl swarm join-token worker`" in err
    c = m1.control()
    cl = c.GetCluster(control_pb2.GetClusterRequest(), timeout=5).cluster
    c.UpdateCluster(
        control_pb2.UpdateClusterRequest(cluster_version=cl.meta.version, spec=cl.spec, rotate_worker_token=True),
        timeout=10,
    )
    code, err = bad.run_to_exit(["--join-addr", m1.api, "--join-token", tokens.worker])
    assert code != 0 and "invalid or was rotated" in err
    assert len(m1.control().ListNodes(control_pb2.ListNodesRequest(), timeout=5).nodes) == 4

    # Replicated writes; SIGTERM is a clean exit, and the same -d resumes the same identity.
    create_secret(m2, "written-on-follower")
    m3_id = m3.info().node_id
    assert m3.term() == 0
    assert "swarmd stopped" in m3.log.read_text()
    create_secret(m1, "while-m3-was-down")
    m3.start([])
    wait(lambda: m3.sock.exists() and m3.info().node_id == m3_id, "m3 to resume")
    wait(lambda: secret_names(m3) >= {"written-on-follower", "while-m3-was-down"}, "m3 to catch up")
    assert len(m1.control().ListNodes(control_pb2.ListNodesRequest(), timeout=5).nodes) == 4

    # kill -9 of the leader: another manager leads, writes go on, the old leader catches up.
    wait(lambda: managers_reachable(m1, 3), "3 reachable managers again")
    m1.kill()
    new_leader = wait(lambda: leader_id(m2) not in ("", m1_id) and leader_id(m2), "a new leader")
    create_secret(m3, "after-failover")
    m1.start([])
    wait(lambda: m1.sock.exists() and leader_id(m1) == new_leader, "m1 to follow the new leader")
    wait(lambda: "after-failover" in secret_names(m1), "m1 to catch up")

    # Promote the worker, demote a manager (the role manager reconciles Raft membership).
    w1_id = {n.description.hostname: n.id for n in m2.control().ListNodes(control_pb2.ListNodesRequest(), timeout=5).nodes}["w1"]
    set_role(m2, w1_id, types_pb2.MANAGER)
    wait(lambda: w1.sock.exists() and managers_reachable(m2, 4), "w1 to become the 4th manager")
    set_role(m2, m3_id, types_pb2.WORKER)
    wait(lambda: managers_reachable(m2, 3) and not (m3.dir / "etcd").exists(), "m3 to be demoted")
    assert {m.node_id for m in m2.info().members} == {m1_id, m2.info().node_id, w1_id}
    create_secret(w1, "from-promoted-w1")

    # A majority of managers down: writes are refused with the quorum error, reads still answer.
    wait(lambda: managers_reachable(m2, 3), "3 reachable managers before the quorum loss")
    m1.kill()
    w1.kill()
    with pytest.raises(grpc.RpcError) as e:
        create_secret(m2, "no-quorum")
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "no quorum: 1 of 3 managers reachable; writes are refused until a majority is back" in e.value.details()
    assert "from-promoted-w1" in secret_names(m2)
    for d in (m2, m3):
        assert d.term() == 0


def test_demoting_the_last_manager_is_refused(daemons):
    m1 = daemons("solo", "127.0.0.1").start()
    wait(lambda: m1.sock.exists() and m1.control().ListNodes(control_pb2.ListNodesRequest(), timeout=5).nodes,
         "solo to create its cluster")
    with pytest.raises(grpc.RpcError) as e:
        set_role(m1, m1.info().node_id, types_pb2.WORKER)
    assert "last manager" in e.value.details()
    assert m1.term() == 0
