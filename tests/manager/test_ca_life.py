"""Certificate life in `shoal.manager.ca`, `rotation` and `authz` without a cluster: validity and the
renewal point, the trust a cross-signed chain gives over real TLS, the checks of a given root,
a rotation's finishing transaction, revocation entries, and NodeCredentials followed by a live
gRPC server."""

from __future__ import annotations

import asyncio
import datetime
import ssl
from collections.abc import AsyncIterator

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from helpers.pki import identity

from shoal.lab.registry import free_port
from shoal.manager import authz, ca, rotation
from shoal.manager.store import LocalStore
from shoal.proto import ca_pb2, ca_pb2_grpc, objects_pb2, specs_pb2, types_pb2

NOW = datetime.datetime.now


def _issue(root: ca.RootCA, validity: datetime.timedelta, role: int = types_pb2.WORKER) -> bytes:
    _, key = ca.new_key()
    return root.issue(ca.make_csr(key), "n1", role, "c1", validity)


@pytest.mark.parametrize("validity,back", [
    (datetime.timedelta(minutes=1), datetime.timedelta(minutes=1)),
    (datetime.timedelta(minutes=90), datetime.timedelta(hours=1)),
    (datetime.timedelta(days=90), datetime.timedelta(hours=1)),
])
def test_backdate_issue_time_and_renewal_point(validity, back) -> None:
    root = ca.RootCA.create("c1")
    t0 = NOW(datetime.UTC)
    cert = ca.load_cert(_issue(root, validity))
    assert abs(cert.not_valid_before_utc - (t0 - back)) < datetime.timedelta(seconds=2)
    assert abs(ca.issued_at(cert) - t0) < datetime.timedelta(seconds=2)
    pem = cert.public_bytes(serialization.Encoding.PEM)
    assert abs(ca.lifetime(pem) - validity) < datetime.timedelta(seconds=2)
    for frac in (ca.RENEW_FROM, ca.RENEW_UNTIL):
        assert abs(ca.renewal_time(pem, frac) - (t0 + validity * frac)) < datetime.timedelta(seconds=2)


def test_validity_never_outlives_the_root_and_defaults_to_90_days() -> None:
    assert ca.validity_of(0) == ca.NODE_VALIDITY == datetime.timedelta(days=90)
    assert ca.validity_of(60 * 10**9) == datetime.timedelta(minutes=1)
    root = ca.RootCA.create("c1")
    cert = ca.load_cert(_issue(root, datetime.timedelta(days=365 * 40)))
    assert cert.not_valid_after_utc == ca.load_cert(root.cert_pem).not_valid_after_utc


def test_check_root_pair_names_the_flag() -> None:
    good = ca.RootCA.create("x")
    assert good.key_pem is not None
    assert ca.check_root_pair(good.cert_pem, good.key_pem).digest == good.digest
    node = identity(good, types_pb2.WORKER)
    cases = [
        (b"junk", good.key_pem, "--ca-cert is not a PEM certificate"),
        (good.cert_pem, b"junk", "--ca-key is not an unencrypted PEM private key"),
        (good.cert_pem, ca.new_key()[1], "--ca-key does not belong to --ca-cert (their public keys differ)"),
        (node.cert_pem, node.key_pem, "--ca-cert is not a CA certificate"),
    ]
    for cert, key, match in cases:
        with pytest.raises(ValueError) as e:
            ca.check_root_pair(cert, key)
        assert str(e.value).startswith(match), e.value


def test_cross_signed_chain_is_trusted_by_either_root_over_real_tls() -> None:
    """A server certificate of the new root sent with the cross-signed root: a client trusting only
    the old root accepts it, as does one trusting only the new root; one trusting neither does not.
    And the server (trusting the old root only) accepts a client certificate of the new root."""
    old, new = ca.RootCA.create("c1"), ca.RootCA.create("c1")
    cross = ca.cross_sign(old, new.cert_pem)
    server = identity(new, types_pb2.MANAGER, cluster="c1")
    server = ca.TLSIdentity(server.key_pem, server.cert_pem + cross, old.cert_pem)
    client = identity(new, types_pb2.WORKER, cluster="c1")
    client_chain = client.cert_pem + cross

    class Who(ca_pb2_grpc.CAServicer):
        async def GetRootCACertificate(self, request, context):  # noqa: N802
            p = ca.peer_identity(context)
            return ca_pb2.GetRootCACertificateResponse(certificate=(p.node_id if p else "none").encode())

    async def call(addr: str, trust: bytes) -> str:
        ident = ca.TLSIdentity(client.key_pem, client_chain, trust)
        async with ca.secure_channel(addr, ident) as ch:
            r = await ca_pb2_grpc.CAStub(ch).GetRootCACertificate(ca_pb2.GetRootCACertificateRequest(), timeout=3)
        return r.certificate.decode()

    async def main() -> None:
        s = grpc.aio.server()
        ca_pb2_grpc.add_CAServicer_to_server(Who(), s)
        addr = f"127.0.0.1:{free_port('127.0.0.1')}"
        s.add_secure_port(addr, ca.NodeCredentials(server).server_credentials())
        await s.start()
        try:
            assert await call(addr, old.cert_pem) == client.node_id
            assert await call(addr, new.cert_pem) == client.node_id
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await call(addr, ca.RootCA.create("c1").cert_pem)
            assert e.value.code() == grpc.StatusCode.UNAVAILABLE
        finally:
            await s.stop(None)

    asyncio.run(main())


def test_node_credentials_serve_the_newest_certificate_at_the_next_handshake(tmp_path) -> None:
    root = ca.RootCA.create("c1")
    creds = ca.NodeCredentials(identity(root, types_pb2.MANAGER, node_id="m1"), tmp_path)
    seen: list[str] = []
    creds.subscribe(lambda i: seen.append(i.node_id))
    client = identity(root, types_pb2.WORKER)

    class Who(ca_pb2_grpc.CAServicer):
        async def GetRootCACertificate(self, request, context):  # noqa: N802
            return ca_pb2.GetRootCACertificateResponse(certificate=b"ok")

    async def served_serial(addr: str) -> int:
        host, port = addr.rsplit(":", 1)
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        ctx.set_alpn_protocols(["h2"])
        reader, writer = await asyncio.open_connection(host, int(port), ssl=ctx, server_hostname="x")
        der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
        writer.close()
        return x509.load_der_x509_certificate(der).serial_number

    async def main() -> None:
        s = grpc.aio.server()
        ca_pb2_grpc.add_CAServicer_to_server(Who(), s)
        addr = f"127.0.0.1:{free_port('127.0.0.1')}"
        s.add_secure_port(addr, creds.server_credentials(client_auth=False))
        await s.start()
        try:
            first = ca.load_cert(creds.current.cert_pem).serial_number
            assert await served_serial(addr) == first
            async with ca.secure_channel(addr, client) as ch:  # a connection open across the change
                stub = ca_pb2_grpc.CAStub(ch)
                await stub.GetRootCACertificate(ca_pb2.GetRootCACertificateRequest(), timeout=3)
                creds.update(identity(root, types_pb2.MANAGER, node_id="m1"))
                await stub.GetRootCACertificate(ca_pb2.GetRootCACertificateRequest(), timeout=3)
            second = ca.load_cert(creds.current.cert_pem).serial_number
            assert second != first and await served_serial(addr) == second
        finally:
            await s.stop(None)

    asyncio.run(main())
    assert seen == ["m1"] and ca.TLSIdentity.load(tmp_path) == creds.current


def _cluster(root: ca.RootCA) -> objects_pb2.Cluster:
    return objects_pb2.Cluster(id="c1", spec=specs_pb2.ClusterSpec(annotations=types_pb2.Annotations(name="default")),
                               root_ca=objects_pb2.RootCA(
                                   ca_cert=root.cert_pem, ca_key=root.key_pem, ca_cert_hash=root.digest,
                                   join_tokens=types_pb2.JoinTokens(worker=ca.generate_join_token(root.cert_pem),
                                                                    manager=ca.generate_join_token(root.cert_pem))))


def test_rotation_trust_issuing_root_progress_and_finish() -> None:
    old, new = ca.RootCA.create("c1"), ca.RootCA.create("c1")
    cl = _cluster(old)
    assert ca.trust_bundle(cl.root_ca) == old.cert_pem and ca.issuing_root(cl.root_ca) == (
        ca.RootCA(old.cert_pem, old.key_pem), b"")
    cross = ca.cross_sign(old, new.cert_pem)
    cl.root_ca.root_rotation.CopyFrom(objects_pb2.RootRotation(
        ca_cert=new.cert_pem, ca_key=new.key_pem, cross_signed_ca_cert=cross, ca_cert_hash=new.digest))
    assert ca.trust_bundle(cl.root_ca) == old.cert_pem + new.cert_pem
    assert ca.ca_digest(ca.trust_bundle(cl.root_ca)) == old.digest  # joining nodes check the first
    root, chain = ca.issuing_root(cl.root_ca)
    assert root.cert_pem == new.cert_pem and chain == cross
    nodes = [objects_pb2.Node(id=f"n{i}") for i in range(3)]
    for n, r in zip(nodes, (new, new, old), strict=True):
        n.tls_info.CopyFrom(ca.tls_info(identity(r, types_pb2.WORKER, cluster="c1").cert_pem,
                                        ca.trust_bundle(cl.root_ca)))
    assert rotation.progress(cl, nodes) == (2, 3)
    done = rotation.finished(cl)
    assert done.root_ca.ca_cert == new.cert_pem and done.root_ca.ca_key == new.key_pem
    assert done.root_ca.ca_cert_hash == new.digest and done.root_ca.cross_signed_ca_cert == cross
    assert not done.root_ca.HasField("root_rotation")
    for role in ("worker", "manager"):
        before, after = getattr(cl.root_ca.join_tokens, role), getattr(done.root_ca.join_tokens, role)
        assert after.split("-")[2] == new.digest and after.split("-")[3] == before.split("-")[3]
    assert ca.role_for_token(done.root_ca.join_tokens.worker, done.root_ca.join_tokens,
                             done.root_ca.ca_cert) == types_pb2.WORKER


def test_rotation_loop_finishes_only_when_every_node_holds_a_new_certificate() -> None:
    old, new = ca.RootCA.create("c1"), ca.RootCA.create("c1")
    st = LocalStore()

    async def main() -> None:
        cl = _cluster(old)
        cl.root_ca.root_rotation.CopyFrom(objects_pb2.RootRotation(
            ca_cert=new.cert_pem, ca_key=new.key_pem, cross_signed_ca_cert=ca.cross_sign(old, new.cert_pem),
            ca_cert_hash=new.digest))
        await st.update(lambda tx: tx.create(cl))
        for i, r in enumerate((new, old)):
            n = objects_pb2.Node(id=f"n{i}", tls_info=ca.tls_info(
                identity(r, types_pb2.WORKER, cluster="c1").cert_pem, ca.trust_bundle(cl.root_ca)))
            await st.update(lambda tx, n=n: tx.create(n))
        loop = rotation.RootRotation(st)
        await loop.reconcile()
        assert st.cluster().root_ca.HasField("root_rotation")
        n1 = objects_pb2.Node()
        n1.CopyFrom(st.get("node", "n1"))
        n1.tls_info.CopyFrom(ca.tls_info(identity(new, types_pb2.WORKER, cluster="c1").cert_pem, new.cert_pem))
        await st.update(lambda tx: tx.update(n1))
        await loop.reconcile()
        got = st.cluster()
        assert not got.root_ca.HasField("root_rotation") and got.root_ca.ca_cert == new.cert_pem

    asyncio.run(main())


def test_revoke_keeps_an_entry_until_the_last_certificate_expires() -> None:
    root = ca.RootCA.create("c1")
    st = LocalStore()

    async def main() -> None:
        cl = _cluster(root)
        gone = cl.root_ca.revoked_nodes.add(node_id="long-gone")
        gone.not_after.FromDatetime(NOW(datetime.UTC) - datetime.timedelta(seconds=1))
        await st.update(lambda tx: tx.create(cl))
        w = identity(root, types_pb2.WORKER, node_id="w1", cluster="c1")
        node = objects_pb2.Node(id="w1", certificate=w.cert_pem, tls_info=ca.tls_info(w.cert_pem, root.cert_pem))
        await st.update(lambda tx: tx.create(node))

        def rm(tx):
            n = tx.get("node", "w1")
            tx.delete(n)
            authz.revoke(tx, n)

        await st.update(rm)
        entries = list(st.cluster().root_ca.revoked_nodes)
        assert [e.node_id for e in entries] == ["w1"]  # the expired entry is dropped
        assert entries[0].not_after.ToDatetime(datetime.UTC) == ca.expiry(w.cert_pem)
        a = authz.Authorizer(st)
        peer = ca.PeerIdentity("w1", types_pb2.WORKER, "c1")
        assert a.refusal(peer, "/shoal.Dispatcher/Session") == authz.revoked_message("w1")
        assert a.refusal(ca.PeerIdentity("w2", types_pb2.WORKER, "c1"), "/shoal.Dispatcher/Session") is None

    asyncio.run(main())


def test_a_stream_cancelled_as_its_responses_end_leaves_no_error_unread(monkeypatch) -> None:
    """A registered response stream whose caller goes away just as its responses end (a leader's
    thousands of sessions ending at once): the step that read the end is read in the cleanup, so
    asyncio logs no "Task exception was never retrieved" (StopAsyncIteration) for it."""
    import gc

    monkeypatch.setattr(authz, "peer_identity", lambda context: ca.PeerIdentity("w1", types_pb2.WORKER, "c1"))
    a = authz.Authorizer(LocalStore())
    unread: list[dict] = []

    async def main() -> None:
        asyncio.get_running_loop().set_exception_handler(lambda loop, ctx: unread.append(ctx))
        outer: list[asyncio.Task] = []

        async def responses(request, context):  # noqa: ANN001, ANN202
            yield "first"
            outer[0].cancel()  # the caller goes away in the same turn as the stream ends

        stream = a._stream(responses, "/shoal.Dispatcher/Session")(None, None)
        got: list[str] = []

        async def consume(stream: AsyncIterator[str]) -> None:
            async for msg in stream:
                got.append(msg)

        outer.append(asyncio.create_task(consume(stream)))
        with pytest.raises(asyncio.CancelledError):
            await outer[0]
        assert got == ["first"]
        assert a._open == {}  # deregistered
        outer.clear()
        del stream
        gc.collect()
        await asyncio.sleep(0)

    asyncio.run(main())
    gc.collect()
    assert unread == [], unread
