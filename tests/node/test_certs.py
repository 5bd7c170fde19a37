"""Node certificates over a cluster's life: renewal at 50-80 % of their life with a one-minute
`--cert-expiry`, used at once by every server and client of the node (gRPC listeners, the agent's
next session, etcd's peer TLS) without dropping a session; `node inspect` shows issuer and expiry;
an expired worker certificate gets one sentence naming the fix. Real swarmd processes on 127.0.0.x."""

from __future__ import annotations

import datetime
import functools
import signal
import socket
import ssl
import subprocess
import time
from collections.abc import Callable

import grpc
import pytest
from cryptography import x509
from helpers.swarmctl import SWARMCTL
from helpers.swarmd import Swarmd as Daemon
from helpers.waiting import wait_for

from shoal.manager import ca
from shoal.proto import (
    ca_pb2,
    ca_pb2_grpc,
    control_pb2,
    control_pb2_grpc,
    dispatcher_pb2,
    dispatcher_pb2_grpc,
    watch_pb2,
    watch_pb2_grpc,
)

pytestmark = [pytest.mark.integration, pytest.mark.beside]

wait = functools.partial(wait_for, retry_on=(grpc.RpcError,))
LIFE = 60.0  # seconds: --cert-expiry 1m
CHECK = 2.0  # swarmd's ROLE_CHECK_PERIOD: a renewal is asked for at most this long after it is due


def nodes(d: Daemon) -> dict[str, object]:
    return {n.description.hostname: n for n in d.control().ListNodes(control_pb2.ListNodesRequest(), timeout=5).nodes}


def healthy(d: Daemon, n: int) -> bool:
    info = d.info()
    return len(info.members) == n and all(m.reachable for m in info.members) and bool(info.leader_node_id)


def listening(d: Daemon) -> bool:
    host, port = d.api.rsplit(":", 1)
    try:
        socket.create_connection((host, int(port)), timeout=5).close()
    except ConnectionRefusedError:
        return False
    return True


def served_certificate(d: Daemon) -> x509.Certificate:
    """The certificate a manager's remote API serves now (a new TLS handshake, as a joining node makes)."""
    host, port = d.api.rsplit(":", 1)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.set_alpn_protocols(["h2"])
    with socket.create_connection((host, int(port)), timeout=5) as raw, \
            ctx.wrap_socket(raw, server_hostname=ca.JOIN_NAME) as tls:
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der)


def cluster(daemons: Callable[..., Daemon], managers: int, workers: int = 1) -> list[Daemon]:
    """m1..mN and w1..wM on 127.0.0.x, joined one after the other; the workers' sessions open."""
    m1 = daemons("m1", "127.0.0.1").start()
    wait(lambda: m1.sock.exists() and m1.control().ListNodes(control_pb2.ListNodesRequest(), timeout=5).nodes,
         "m1 to create its cluster")
    tokens = m1.control().GetCluster(control_pb2.GetClusterRequest(), timeout=5).cluster.root_ca.join_tokens
    out = [m1]
    for i in range(2, managers + 1):
        d = daemons(f"m{i}", f"127.0.0.{i}", ["--join-addr", m1.api, "--join-token", tokens.manager]).start()
        wait(lambda d=d, i=i: d.sock.exists() and healthy(m1, i), f"m{i} to join", 60)
        out.append(d)
    for i in range(1, workers + 1):
        d = daemons(f"w{i}", f"127.0.0.{managers + i}", ["--join-addr", m1.api, "--join-token", tokens.worker]).start()
        wait(lambda d=d: "shoal.agent: session opened" in d.log_text(), f"w{i} to join and open its session")
        out.append(d)
    wait(lambda: len(nodes(m1)) == managers + workers, "every node on record")
    return out


def test_one_minute_certificates_renew_without_dropping_a_session(daemons) -> None:
    m1, m2, m3, w1 = cluster(daemons, 3)
    cl = m1.control().GetCluster(control_pb2.GetClusterRequest(), timeout=5).cluster
    all_daemons = (m1, m2, m3, w1)

    # The default is 90 days; node inspect shows who issued the certificate and until when.
    n1 = nodes(m1)["m1"]
    left = n1.tls_info.cert_not_after.ToSeconds() - time.time()
    assert 89 * 86400 < left <= 90 * 86400
    assert n1.tls_info.cert_issuer_subject == f"O={cl.id},CN=swarm-ca"
    pretty = m1.ok("node", "inspect", "--pretty", "m1")
    assert f"Issuer Subject:\t{n1.tls_info.cert_issuer_subject}" in pretty
    assert "Certificate Expiry:\t" in pretty and "(in 89d" in pretty or "(in 2159h" in pretty or "(in 2160h" in pretty

    # Bad values: one sentence naming the flag, nothing changed.
    m1.fails("cluster", "update", "--cert-expiry", "0s",
             match="--cert-expiry 0s is too short: give at least 1m (the default is 2160h, 90 days)")
    m1.fails("cluster", "update", "--cert-expiry", "30s", match="--cert-expiry 30s is too short")
    cl2 = m1.control().GetCluster(control_pb2.GetClusterRequest(), timeout=5).cluster
    assert cl2.meta.version == cl.meta.version and not cl2.spec.ca_config.HasField("node_cert_expiry")

    # A minute, with the warning; every node's next role check brings it a one-minute certificate.
    r = m1.ctl("cluster", "update", "--cert-expiry", "1m")
    assert r.returncode == 0, r.stderr
    assert "warning: --cert-expiry 1m is shorter than an hour: every node will renew its certificate every " \
           "30s to 48s" in r.stderr
    wait(lambda: all(n.tls_info.cert_not_after.ToSeconds() - time.time() <= LIFE for n in nodes(m1).values()),
         "every node to hold a one-minute certificate", 15)

    # Each node renews at 50-80 % of each certificate's life; follow every issued certificate.
    seen: dict[str, dict[str, tuple[float, float]]] = {h: {} for h in ("m1", "m2", "m3", "w1")}  # serial -> (start, end)
    first_short_end = max(n.tls_info.cert_not_after.ToSeconds() for n in nodes(m1).values())

    def renewed() -> bool:
        for h, n in nodes(m1).items():
            t = n.tls_info
            seen[h][t.cert_serial] = (t.cert_not_before.ToSeconds(), t.cert_not_after.ToSeconds())
        return all(len(s) >= 2 for s in seen.values())  # the first one-minute certificate and a renewal

    wait(renewed, "every node to renew its one-minute certificate", 2.5 * LIFE, interval=0.5)
    for h, certs in seen.items():
        spans = sorted(certs.values())
        spans = [s for s in spans if s[1] - s[0] <= 2 * LIFE + 1]  # one-minute ones (backdated by a minute)
        for (_, end_a), (_, end_b) in zip(spans, spans[1:], strict=False):
            issued_a, issued_b = end_a - LIFE, end_b - LIFE
            frac = (issued_b - issued_a) / LIFE
            assert 0.5 - 0.05 <= frac <= 0.8 + (CHECK + 1.5) / LIFE, f"{h} renewed at {frac:.0%} of the life"

    # What each node holds on disk is its newest certificate; managers serve it on a new handshake.
    wait(lambda: all(
        f"{ca.load_cert((d.dir / 'certificates' / 'node.crt').read_bytes()).serial_number:x}"
        == nodes(m1)[d.name].tls_info.cert_serial for d in all_daemons), "node.crt to be the newest certificate", 10)
    for d in (m1, m2, m3):
        served = served_certificate(d)
        assert served.not_valid_after_utc > datetime.datetime.now(datetime.UTC)
        assert served.not_valid_after_utc.timestamp() - time.time() <= LIFE + 1

    # The first one-minute certificates have expired: a manager killed and started again reaches its
    # peers' etcd members (new peer handshakes on both sides) and the cluster with renewed certificates.
    wait(lambda: time.time() > first_short_end + 1, "the first one-minute certificates to expire", LIFE)
    leader = m1.info().leader_node_id
    other = next(d for d in (m2, m3) if d.info().node_id != leader)
    other.kill()
    other.wait_etcd_gone()
    other.start([])
    wait(lambda: other.sock.exists() and healthy(other, 3) and healthy(m1, 3) and listening(other),
         "the restarted manager to rejoin", 60)
    m1.control().CreateSecret(control_pb2.CreateSecretRequest(spec={"annotations": {"name": "after-renewals"},
                                                                   "data": b"x"}), timeout=10)
    # swarmctl over mutual TLS with the renewed files of a state dir
    assert "w1" in other.ok("node", "ls", remote=True)

    # Not one agent session dropped on the nodes that kept running.
    for d in (m1, w1):
        assert d.log_text().count("shoal.agent: session opened") == 1, f"{d.name} opened its session again"
    assert "certificate renewed" in w1.log_text()

    # Everything off for longer than a certificate's life: the managers renew their own expired
    # certificates from keys/root-ca and get their quorum back; the worker says what to do.
    for d in all_daemons:
        assert d.term() == 0
    on_disk = [ca.expiry((d.dir / "certificates" / "node.crt").read_bytes()).timestamp() for d in all_daemons]
    wait(lambda: time.time() > max(on_disk) + 1, "every certificate on disk to expire", LIFE + 5)
    for d in (m1, m2, m3):
        d.start([])
    wait(lambda: all(d.sock.exists() and healthy(d, 3) for d in (m1, m2, m3)), "the managers' quorum back", 60)
    wait(lambda: all(listening(d) for d in (m1, m2, m3)), "the managers' remote API", 30)
    for d in (m1, m2, m3):
        assert served_certificate(d).not_valid_after_utc > datetime.datetime.now(datetime.UTC)
        assert "renewed it from the root CA kept in keys/root-ca" in d.log_text()
    wait(lambda: nodes(m1)["m1"].tls_info.cert_not_after.ToSeconds() > time.time(), "m1's new certificate on record")
    code, err = w1.run_to_exit([])
    w1_id = nodes(m1)["w1"].id
    assert code != 0
    assert f"the certificate of node {w1_id} expired at " in err
    assert f"so no manager accepts this node any more: on a manager run `swarmctl node rm --force {w1_id}`, then " \
           f"remove {w1.dir} and join again with a token from `swarmctl swarm join-token worker`" in err


def mtls(d: Daemon, ident: ca.TLSIdentity) -> grpc.Channel:
    """A channel to a manager's remote API with a node identity (a copy of its certificate files)."""
    creds = grpc.ssl_channel_credentials(ident.ca_pem, ident.key_pem, ident.cert_pem)
    return grpc.secure_channel(d.api, creds, options=ca.channel_options())


def rpc_error(call: Callable[[], object]) -> grpc.RpcError:
    """The error `call` fails with (the test fails if it does not)."""
    with pytest.raises(grpc.RpcError) as e:
        call()
    return e.value


def assert_refused(err: grpc.RpcError, match: str) -> None:
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED, err
    assert match in (err.details() or ""), err.details()


def refused(call: Callable[[], object], match: str) -> None:
    assert_refused(rpc_error(call), match)


def test_removed_node_and_demoted_manager_lose_their_rights_at_once(daemons) -> None:
    m1, m2, w1 = cluster(daemons, 2)
    w1_ident = ca.TLSIdentity.load(w1.dir / "certificates")
    m2_ident = ca.TLSIdentity.load(w1.dir.parent / "m2" / "certificates")
    assert w1_ident is not None and m2_ident is not None
    w1_id, m2_id = w1_ident.node_id, m2_ident.node_id

    # Before: the worker's certificate opens a session and a role check; the manager's the control API.
    with mtls(m1, w1_ident) as ch:
        ca_pb2_grpc.CAStub(ch).IssueNodeCertificate(ca_pb2.IssueNodeCertificateRequest(
            csr=ca.make_csr(w1_ident.key_pem), node_id=w1_id), timeout=10)
    with mtls(m1, m2_ident) as ch:
        assert len(control_pb2_grpc.ControlStub(ch).ListNodes(control_pb2.ListNodesRequest(), timeout=10).nodes) == 3
        # a stream left open across the demotion
        watch = watch_pb2_grpc.WatchStub(ch).Watch(watch_pb2.WatchRequest(kinds=["service"]), timeout=60)

        # Demote m2: its open stream ends and its (still valid) manager certificate opens no manager
        # service any more, on either manager; the CA still answers it (the role check that demotes it).
        m1.ok("node", "demote", "m2")
        refused(lambda: next(iter(watch)), f"node {m2_id} was demoted: its manager rights have ended")
    for d in (m1, m2):
        if d is m2 and not m2.sock.exists():
            continue  # m2 has switched to its worker role already: nothing of a manager listens
        with mtls(d, m2_ident) as ch:
            err = rpc_error(lambda ch=ch: control_pb2_grpc.ControlStub(ch).ListNodes(control_pb2.ListNodesRequest(),
                                                                                    timeout=10))
        # m2's manager may be stopping as we call: its remote port closes before its control socket
        if d is m2 and err.code() == grpc.StatusCode.UNAVAILABLE and "manager stopping" in m2.log_text():
            continue  # nothing of a manager answers there any more
        assert_refused(err, "was demoted: its manager rights have ended")

    # Remove the worker (forced: it still runs): its live session ends at once, and its certificate
    # is refused on every service of the remote API, with the sentence saying why.
    m1.ok("node", "rm", "--force", "w1")
    wait(lambda: "was revoked when the node was removed" in w1.log_text(), "w1's session to be ended", 10)
    revoked = f"the certificate of node {w1_id} was revoked when the node was removed from the swarm (node rm)"
    with mtls(m1, w1_ident) as ch:
        refused(lambda: ca_pb2_grpc.CAStub(ch).IssueNodeCertificate(ca_pb2.IssueNodeCertificateRequest(
            csr=ca.make_csr(w1_ident.key_pem), node_id=w1_id, renew=True), timeout=10), revoked)
        refused(lambda: next(iter(dispatcher_pb2_grpc.DispatcherStub(ch).Session(
            dispatcher_pb2.SessionRequest(), timeout=10))), revoked)
        refused(lambda: dispatcher_pb2_grpc.DispatcherStub(ch).Heartbeat(
            dispatcher_pb2.HeartbeatRequest(session_id="x"), timeout=10), revoked)
        refused(lambda: control_pb2_grpc.ControlStub(ch).ListNodes(control_pb2.ListNodesRequest(), timeout=10), revoked)
    cl = m1.control().GetCluster(control_pb2.GetClusterRequest(), timeout=5).cluster
    entry = next(r for r in cl.root_ca.revoked_nodes if r.node_id == w1_id)
    assert entry.not_after.ToSeconds() == ca.load_cert(w1_ident.cert_pem).not_valid_after_utc.timestamp()
    assert "Error: " not in m1.ok("node", "ls")


def leads_loops(d: Daemon) -> bool:
    """Whether the manager holds the leader key now (its log's last word on it), which is not
    always the etcd leader that `Info` names."""
    text = d.log_text()
    text = text[max(0, text.rfind("shoal.swarmd: resuming node")):]  # this process's lines only
    return text.rfind("leads the control loops (fence revision") > text.rfind("lost the leader key")


def rotation_of(d: Daemon) -> object | None:
    cl = d.control().GetCluster(control_pb2.GetClusterRequest(), timeout=5).cluster
    return cl.root_ca.root_rotation if cl.root_ca.HasField("root_rotation") else None


def test_root_rotation_with_managers_down_partway(daemons, tmp_path) -> None:
    m1, m2, m3, w1 = cluster(daemons, 3)
    tokens = m1.control().GetCluster(control_pb2.GetClusterRequest(), timeout=5).cluster.root_ca.join_tokens
    w1_old = ca.TLSIdentity.load(w1.dir / "certificates")
    assert w1_old is not None

    # Bad input: one sentence naming the flag, and no rotation starts.
    other = ca.RootCA.create("other")
    (tmp_path / "ca.crt").write_bytes(other.cert_pem)
    (tmp_path / "ca.key").write_bytes(other.key_pem or b"")
    (tmp_path / "wrong.key").write_bytes(ca.new_key()[1])
    (tmp_path / "node.crt").write_bytes(w1_old.cert_pem)
    (tmp_path / "node.key").write_bytes(w1_old.key_pem)
    for argv, match in (
        (["--ca-cert", str(tmp_path / "ca.crt")], "--ca-cert and --ca-key go together"),
        (["--ca-cert", "/nonexistent/ca.crt", "--ca-key", str(tmp_path / "ca.key")],
         "--ca-cert /nonexistent/ca.crt: cannot read it (No such file or directory)"),
        (["--ca-cert", str(tmp_path / "ca.crt"), "--ca-key", str(tmp_path / "wrong.key")],
         "--ca-key does not belong to --ca-cert (their public keys differ)"),
        (["--ca-cert", str(tmp_path / "node.crt"), "--ca-key", str(tmp_path / "node.key")],
         "--ca-cert is not a CA certificate"),
        (["--ca-cert", str(tmp_path / "ca.key"), "--ca-key", str(tmp_path / "ca.key")],
         "--ca-cert is not a PEM certificate"),
    ):
        m1.fails("cluster", "ca", "--rotate", *argv, match=match)
        assert rotation_of(m1) is None

    # m3 is down when the rotation starts, so it cannot finish; then the leader dies too. A new
    # leader finishes it once m3 is back and has its new certificate.
    m3.kill()
    m3.wait_etcd_gone()
    rot = subprocess.Popen([*SWARMCTL, "--socket", str(m2.sock), "cluster", "ca", "--rotate",
                            "--ca-cert", str(tmp_path / "ca.crt"), "--ca-key", str(tmp_path / "ca.key")],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        new_key = ca.issuer_key(other.cert_pem)
        wait(lambda: sum(n.tls_info.cert_issuer_public_key == new_key for n in nodes(m2).values()) == 3,
             "the 3 running nodes to hold certificates of the new root", 20)
        assert rotation_of(m2) is not None  # waits for m3
        assert "trusted root CAs changed: now 2 root(s)" in w1.log_text()
        leader = m1.info().leader_node_id
        assert leader == nodes(m1)["m1"].id
        m1.kill()  # the leader, partway
        m1.wait_etcd_gone()
        m3.start([])
        out, err = rot.communicate(timeout=90)
    finally:
        if rot.poll() is None:
            rot.kill()
            rot.wait()
    assert rot.returncode == 0, err
    assert f"desired root digest: {other.digest}" in err
    assert "rotated TLS certificates: 2/4 nodes" in err or "rotated TLS certificates: 3/4 nodes" in err
    assert "rotated TLS certificates: 4/4 nodes\nroot CA rotation done: the old root is dropped" in err
    assert out == other.cert_pem.decode()
    m1.start([])
    wait(lambda: m1.sock.exists() and healthy(m2, 3), "m1 back with the rotated cluster", 60)

    after = m2.control().GetCluster(control_pb2.GetClusterRequest(), timeout=5).cluster
    assert after.root_ca.ca_cert == other.cert_pem and after.root_ca.ca_cert_hash == other.digest
    assert not after.root_ca.HasField("root_rotation")
    for role in ("worker", "manager"):
        old_t, new_t = getattr(tokens, role), getattr(after.root_ca.join_tokens, role)
        assert new_t.split("-")[2] == other.digest and new_t.split("-")[3] == old_t.split("-")[3]
    # every node trusts the new root alone, and holds a certificate of it
    wait(lambda: all((d.dir / "certificates" / "swarm-root-ca.crt").read_bytes() == other.cert_pem
                     for d in (m1, m2, m3, w1)), "every node to trust the new root alone", 20)
    assert all(n.tls_info.cert_issuer_public_key == new_key for n in nodes(m2).values())
    # a certificate of the old root opens nothing any more
    with mtls(m2, w1_old) as ch:
        with pytest.raises(grpc.RpcError) as e:
            ca_pb2_grpc.CAStub(ch).IssueNodeCertificate(ca_pb2.IssueNodeCertificateRequest(
                csr=ca.make_csr(w1_old.key_pem)), timeout=5)
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE
    # the old token is refused with the sentence; the new one joins
    w2 = daemons("w2", "127.0.0.5")
    code, err = w2.run_to_exit(["--join-addr", m2.api, "--join-token", tokens.worker])
    assert code != 0 and "does not match the digest in the join token: the token was made before a root CA rotation" in err
    w2.start(["--join-addr", m2.api, "--join-token", after.root_ca.join_tokens.worker])
    wait(lambda: len(nodes(m2)) == 5 and "shoal.agent: session opened" in w2.log_text(), "w2 to join with the new token")
    # the etcd members of the managers not leading the control loops restart to trust the new root alone
    followers = [d for d in (m1, m2, m3) if not leads_loops(d)]
    assert len(followers) == 2
    wait(lambda: all((d.dir / "etcd" / "tls" / "ca.crt").read_bytes() == other.cert_pem for d in followers),
         "the followers' etcd members to trust the new root alone", 60)
    wait(lambda: healthy(m2, 3), "the store healthy after the restarts", 30)


def test_a_renewal_that_finds_no_manager_is_retried_until_one_answers(daemons) -> None:
    m1, w1 = cluster(daemons, 1)
    m1.ok("cluster", "update", "--cert-expiry", "1m")

    # Right after a renewal of w1, the only manager stops answering (SIGSTOP) until 10 s before
    # w1's certificate expires (past 80 % of its life): w1's next renewal fails, and is retried
    # until the manager answers again, in time.
    renewals = w1.log_text().count("certificate renewed")
    wait(lambda: w1.log_text().count("certificate renewed") > renewals, "a renewal of w1", LIFE)
    w1_cert = ca.TLSIdentity.load(w1.dir / "certificates")
    assert w1_cert is not None
    expires = ca.expiry(w1_cert.cert_pem).timestamp()
    offset = w1.log_size()
    assert m1.proc is not None
    m1.proc.send_signal(signal.SIGSTOP)
    try:
        wait(lambda: "certificate renewal failed (no manager answered): retrying" in w1.log_text(offset),
             "w1's renewal to fail", LIFE)
        time.sleep(max(0.0, expires - 10 - time.time()))
    finally:
        m1.proc.send_signal(signal.SIGCONT)
    wait(lambda: "certificate renewed" in w1.log_text(offset), "w1 to renew once the manager answers", 20)
    renewed = ca.TLSIdentity.load(w1.dir / "certificates")
    assert renewed is not None and ca.expiry(renewed.cert_pem).timestamp() > expires
