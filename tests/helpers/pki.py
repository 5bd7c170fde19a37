"""Certificates for tests: a stand-alone CA certificate, and node identities from a ``RootCA``."""

from __future__ import annotations

import datetime

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from shoal.manager import ca
from shoal.manager.store import new_id


def ca_cert_pem() -> bytes:
    """PEM of a fresh self-signed CA certificate ("swarm-ca", valid one day) whose key is thrown away:
    enough for what only reads a cluster's root certificate (join tokens, `swarmctl` output)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(x509.oid.NameOID.COMMON_NAME, "swarm-ca")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(1).not_valid_before(now).not_valid_after(now + datetime.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM)


def cluster_of(root: ca.RootCA) -> str:
    """The cluster id a ``RootCA.create(cluster_id)`` wrote into its certificate (the subject's O)."""
    cert = x509.load_pem_x509_certificate(root.cert_pem)
    return str(cert.subject.get_attributes_for_oid(x509.oid.NameOID.ORGANIZATION_NAME)[0].value)


def identity(root: ca.RootCA, role: int, node_id: str | None = None, cluster: str | None = None) -> ca.TLSIdentity:
    """A new key and the certificate ``root`` issues for it: node ``node_id`` (a fresh id when None) with
    ``role`` in ``cluster`` (the root's own cluster when None)."""
    _, key = ca.new_key()
    cert = root.issue(ca.make_csr(key), node_id or new_id(), role, cluster or cluster_of(root))
    return ca.TLSIdentity(key, cert, root.cert_pem)
