"""Root CA, node certificates, join tokens, and the 2377 front with real TLS over loopback TCP."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.x509.oid import NameOID
from helpers.pki import identity

from shoal.lab.registry import free_port as _port
from shoal.manager import ca, remoteapi
from shoal.manager.store import new_id
from shoal.proto import ca_pb2, ca_pb2_grpc, types_pb2

TOKEN_RE = re.compile(r"^SWMTKN-1-[0-9a-z]{50}-[0-9a-z]{25}$")


@pytest.fixture(scope="module")
def root() -> ca.RootCA:
    return ca.RootCA.create("clusterid0")


def test_join_token_format_and_digest(root):
    t1, t2 = ca.generate_join_token(root.cert_pem), ca.generate_join_token(root.cert_pem.decode())
    assert TOKEN_RE.match(t1) and TOKEN_RE.match(t2)
    assert t1 != t2 and t1.split("-")[2] == t2.split("-")[2] == root.digest
    assert ca.parse_join_token(t1).secret == t1.split("-")[3]


@pytest.mark.parametrize("bad", ["", "SWMTKN-1-abc-def", "SWMTKN-2-" + "a" * 50 + "-" + "b" * 25, "x" * 80])
def test_malformed_token(bad):
    with pytest.raises(ca.JoinError, match="join token is malformed"):
        ca.parse_join_token(bad)


def test_role_for_token_wrong_rotated_and_other_cluster(root):
    tokens = types_pb2.JoinTokens(
        worker=ca.generate_join_token(root.cert_pem), manager=ca.generate_join_token(root.cert_pem)
    )
    assert ca.role_for_token(tokens.worker, tokens, root.cert_pem) == types_pb2.WORKER
    assert ca.role_for_token(tokens.manager, tokens, root.cert_pem) == types_pb2.MANAGER
    old = tokens.worker
    tokens.worker = ca.generate_join_token(root.cert_pem)  # rotation
    with pytest.raises(ca.JoinError) as e:
        ca.role_for_token(old, tokens, root.cert_pem)
    assert str(e.value) == (
        "join token is invalid or was rotated: get a current one with `swarmctl swarm join-token worker`"
    )
    other = ca.RootCA.create("other")
    with pytest.raises(ca.JoinError, match="belongs to another cluster"):
        ca.role_for_token(ca.generate_join_token(other.cert_pem), tokens, root.cert_pem)


def test_joining_node_checks_root_ca_digest(root):
    token = ca.generate_join_token(root.cert_pem)
    ca.verify_root_ca(token, root.cert_pem)
    with pytest.raises(ca.JoinError, match="does not match the digest in the join token"):
        ca.verify_root_ca(token, ca.RootCA.create("evil").cert_pem)


def test_node_certificate_fields(root, tmp_path: Path):
    ident = identity(root, types_pb2.MANAGER)
    cert = x509.load_pem_x509_certificate(ident.cert_pem)
    subj = {a.oid: a.value for a in cert.subject}
    assert subj[NameOID.ORGANIZATIONAL_UNIT_NAME] == "swarm-manager"
    assert subj[NameOID.ORGANIZATION_NAME] == "clusterid0"
    assert len(subj[NameOID.COMMON_NAME]) == 25
    info = ca.cert_info(ident.cert_pem, root.cert_pem)  # verifies the CA signature
    assert info.role == types_pb2.MANAGER and info.node_id == subj[NameOID.COMMON_NAME]
    worker = identity(root, types_pb2.WORKER)
    assert worker.role == types_pb2.WORKER
    with pytest.raises(Exception):  # noqa: B017 - signed by another CA
        ca.cert_info(worker.cert_pem, ca.RootCA.create("x").cert_pem)
    worker.save(tmp_path / "certs")
    assert (tmp_path / "certs" / "node.key").stat().st_mode & 0o777 == 0o600
    assert ca.TLSIdentity.load(tmp_path / "certs") == worker
    with pytest.raises(ca.JoinError, match="not a PEM CSR"):
        root.issue(b"junk", "n", types_pb2.WORKER, "c")


class _Who(ca_pb2_grpc.CAServicer):
    """Answers with the caller identity the mTLS listener sees."""

    async def GetRootCACertificate(self, request, context):  # noqa: N802
        p = ca.peer_identity(context)
        text = f"{p.node_id} {p.role} {p.cluster_id} local={ca.is_local_caller(context)}" if p else "none"
        return ca_pb2.GetRootCACertificateResponse(certificate=text.encode())


def test_front_join_and_mutual_tls(root, tmp_path: Path):
    async def main() -> None:
        mgr = identity(root, types_pb2.MANAGER)
        tokens = types_pb2.JoinTokens(
            worker=ca.generate_join_token(root.cert_pem), manager=ca.generate_join_token(root.cert_pem)
        )

        async def issue(req, peer):
            role = ca.role_for_token(req.token, tokens, root.cert_pem)
            nid = new_id()
            return ca.IssuedNode(nid, root.issue(req.csr, nid, role, "clusterid0"), role, cluster_id="clusterid0")

        paths = {k: str(tmp_path / f"{k}.sock") for k in ("mtls", "join", "plain")}
        specs = (
            ("mtls", ca.NodeCredentials(mgr).server_credentials(), _Who()),
            ("join", ca.NodeCredentials(mgr).server_credentials(client_auth=False),
             ca.CAServicer(lambda: root.cert_pem, issue, heartbeat_period=lambda: 4.0)),
            ("plain", None, ca.CAServicer(lambda: root.cert_pem, issue, plain=True)),
        )
        servers = []
        addr = f"127.0.0.1:{_port()}"
        front = remoteapi.RemoteAPIFront(addr, paths["mtls"], paths["join"], paths["plain"])
        try:
            for k, creds, svc in specs:
                s = grpc.aio.server()
                ca_pb2_grpc.add_CAServicer_to_server(svc, s)
                if creds is None:
                    s.add_insecure_port("unix:" + paths[k])
                else:
                    s.add_secure_port("unix:" + paths[k], creds)
                await s.start()
                servers.append(s)
            await front.start()

            res = await ca.join_cluster(addr, tokens.worker, hostname="w1")
            assert res.identity.role == types_pb2.WORKER and res.response.cluster_id == "clusterid0"
            assert res.response.heartbeat_period.ToNanoseconds() == 4 * 10**9  # the cluster's period now
            res_m = await ca.join_cluster(addr, tokens.manager, hostname="m2")
            assert res_m.identity.role == types_pb2.MANAGER
            with pytest.raises(ca.JoinError, match="invalid or was rotated"):
                await ca.join_cluster(addr, ca.generate_join_token(root.cert_pem))
            with pytest.raises(ca.JoinError, match="does not match the digest"):
                await ca.join_cluster(addr, ca.generate_join_token(ca.RootCA.create("x").cert_pem))

            # The mTLS listener sees the verified caller.
            async with ca.secure_channel(addr, res.identity) as ch:
                r = await ca_pb2_grpc.CAStub(ch).GetRootCACertificate(ca_pb2.GetRootCACertificateRequest(), timeout=5)
            assert r.certificate.decode() == f"{res.identity.node_id} {types_pb2.WORKER} clusterid0 local=False"
            # Without a client certificate the mTLS route refuses the handshake.
            creds = grpc.ssl_channel_credentials(root.cert_pem)
            async with grpc.aio.secure_channel(addr, creds, options=ca.channel_options()) as ch:
                with pytest.raises(grpc.aio.AioRpcError) as e:
                    await ca_pb2_grpc.CAStub(ch).GetRootCACertificate(
                        ca_pb2.GetRootCACertificateRequest(), timeout=3
                    )
                assert e.value.code() == grpc.StatusCode.UNAVAILABLE
            # Certificates are never issued over plaintext.
            async with grpc.aio.insecure_channel(addr) as ch:
                with pytest.raises(grpc.aio.AioRpcError) as e:
                    await ca_pb2_grpc.CAStub(ch).IssueNodeCertificate(
                        ca_pb2.IssueNodeCertificateRequest(token=tokens.worker), timeout=3
                    )
                assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        finally:
            await front.close()
            for s in servers:
                await s.stop(None)

    asyncio.run(main())
