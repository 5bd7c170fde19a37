"""Root CA, node certificates, join tokens, TLS credentials and the CA gRPC service.

Identity. Every node has a key pair and a certificate signed by the cluster's root CA (EC P-256):
CN = node id, OU = role ("swarm-manager" | "swarm-worker"), O = cluster id. Manager certificates
carry the DNS names "swarm-manager" and "swarm-ca" (what clients check / use to route), worker
certificates "swarm-worker"; all carry the node id.

Join tokens are Swarm's: `SWMTKN-1-<digest>-<secret>`, where digest is the base-36 sha256 of the
root CA certificate (DER) and secret is 25 base-36 characters of randomness. The worker and manager
tokens differ in the secret; rotating one replaces its secret. A joining node checks that the root
CA certificate it is handed has the token's digest before trusting it.

Port 2377 is `shoal.manager.remoteapi.RemoteAPIFront`: it routes a joining node (TLS with SNI
`JOIN_NAME`) to a server-only TLS listener (`join_server_credentials`), any other TLS caller to
mutual TLS (`server_credentials`), and plaintext to the root CA certificate only.

Servicers learn who calls with `peer_identity(context)` (node id, role, cluster id from the verified
client certificate; None on the join/plain listeners and on the local unix control socket).
"""

from __future__ import annotations

import datetime
import functools
import hashlib
import hmac
import ipaddress
import logging
import os
import secrets
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from shoal.manager.store import StoreError
from shoal.proto import ca_pb2, ca_pb2_grpc, objects_pb2, types_pb2

log = logging.getLogger(__name__)

TOKEN_PREFIX = "SWMTKN"
TOKEN_VERSION = "1"
_B36 = "0123456789abcdefghijklmnopqrstuvwxyz"
MANAGER_OU = "swarm-manager"
WORKER_OU = "swarm-worker"
MANAGER_NAME = "swarm-manager"  # DNS name clients verify on a manager's certificate
JOIN_NAME = "swarm-ca"  # SNI of a joining node's TLS connection to 2377
CA_VALIDITY = datetime.timedelta(days=20 * 365)
NODE_VALIDITY = datetime.timedelta(days=90)  # default of `cluster update --cert-expiry`
MIN_NODE_VALIDITY = datetime.timedelta(minutes=1)  # Docker's is 1 hour; shorter is for labs and tests
MAX_BACKDATE = datetime.timedelta(hours=1)  # tolerated clock skew between nodes (Docker's backdate)
# A node renews at a random point between these fractions of its certificate's life (SwarmKit's).
RENEW_FROM, RENEW_UNTIL = 0.5, 0.8
_ROLE_OU = {types_pb2.MANAGER: MANAGER_OU, types_pb2.WORKER: WORKER_OU}
_OU_ROLE = {v: k for k, v in _ROLE_OU.items()}


class JoinError(Exception):
    """A join the CA or the joining node refuses; the message says what to do."""


def invalid_token_message(role: str = "worker") -> str:
    return f"join token is invalid or was rotated: get a current one with `swarmctl swarm join-token {role}`"


# ---- tokens ------------------------------------------------------------------------------------
def base36(data: bytes, width: int) -> str:
    """`data` as a big-endian number in base 36, zero-padded to `width` digits (Swarm's encoding)."""
    n = int.from_bytes(data, "big")
    out = []
    while n:
        n, r = divmod(n, 36)
        out.append(_B36[r])
    return "".join(reversed(out)).rjust(width, "0")


def _pem(data: bytes | str) -> bytes:
    return data.encode() if isinstance(data, str) else data


def ca_digest(ca_cert_pem: bytes | str) -> str:
    """The digest of a root CA certificate as it appears in join tokens: base 36 of sha256 of the DER."""
    der = x509.load_pem_x509_certificate(_pem(ca_cert_pem)).public_bytes(serialization.Encoding.DER)
    return base36(hashlib.sha256(der).digest(), 50)


def generate_join_token(ca_cert_pem: bytes | str) -> str:
    """A new join token `SWMTKN-1-<CA digest>-<secret>` for the cluster whose root CA is `ca_cert_pem`."""
    return f"{TOKEN_PREFIX}-{TOKEN_VERSION}-{ca_digest(ca_cert_pem)}-{base36(secrets.token_bytes(16), 25)}"


@dataclass(frozen=True)
class JoinToken:
    digest: str
    secret: str
    raw: str


def parse_join_token(token: str) -> JoinToken:
    parts = token.strip().split("-")
    if (
        len(parts) != 4
        or parts[0] != TOKEN_PREFIX
        or parts[1] != TOKEN_VERSION
        or len(parts[2]) != 50
        or len(parts[3]) != 25
        or any(c not in _B36 for c in parts[2] + parts[3])
    ):
        raise JoinError(
            "join token is malformed: expected SWMTKN-1-<50 characters>-<25 characters>; "
            "get one with `swarmctl swarm join-token worker` on a manager"
        )
    return JoinToken(parts[2], parts[3], token.strip())


def role_for_token(token: str, join_tokens: types_pb2.JoinTokens, ca_cert_pem: bytes) -> int:
    """The role (types_pb2.WORKER/MANAGER) a join token grants, or JoinError."""
    t = parse_join_token(token)
    if not hmac.compare_digest(t.digest, ca_digest(ca_cert_pem)):
        raise JoinError(
            "join token's CA digest does not match this cluster's root CA: it belongs to another cluster, or "
            "was made before a root CA rotation; get a current one with `swarmctl swarm join-token worker`"
        )
    if join_tokens.manager and hmac.compare_digest(t.raw, join_tokens.manager):
        return types_pb2.MANAGER
    if join_tokens.worker and hmac.compare_digest(t.raw, join_tokens.worker):
        return types_pb2.WORKER
    raise JoinError(invalid_token_message())


def verify_root_ca(token: str, ca_cert_pem: bytes) -> None:
    """The joining node's check: the root CA it received is the one the token names."""
    t = parse_join_token(token)
    if not hmac.compare_digest(t.digest, ca_digest(ca_cert_pem)):
        raise JoinError(
            "the root CA certificate sent by the manager does not match the digest in the join token: the token "
            "was made before a root CA rotation (get a current one with `swarmctl swarm join-token worker`), the "
            "address is not a manager of the token's cluster, or the connection is being intercepted"
        )


# ---- keys and certificates ---------------------------------------------------------------------
def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def new_key() -> tuple[ec.EllipticCurvePrivateKey, bytes]:
    key = ec.generate_private_key(ec.SECP256R1())
    return key, _key_pem(key)


def make_csr(key_pem: bytes) -> bytes:
    """A certificate request for `key_pem`; the CA decides the subject, so it carries none."""
    key = serialization.load_pem_private_key(key_pem, None)
    csr = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([])).sign(key, hashes.SHA256())  # type: ignore[arg-type]
    return csr.public_bytes(serialization.Encoding.PEM)


@dataclass
class RootCA:
    cert_pem: bytes
    key_pem: bytes | None = None  # only managers hold it (in the replicated store)

    @classmethod
    def create(cls, cluster_id: str) -> RootCA:
        key, key_pem = new_key()
        name = x509.Name(
            [
                x509.NameAttribute(NameOID.COMMON_NAME, "swarm-ca"),
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, cluster_id),
            ]
        )
        now = datetime.datetime.now(datetime.UTC)
        cert = _ca_certificate(name, key.public_key(), name, key, now - MAX_BACKDATE, now + CA_VALIDITY, path_length=1)
        return cls(cert, key_pem)

    @property
    def digest(self) -> str:
        return ca_digest(self.cert_pem)

    def issue(
        self,
        csr_pem: bytes,
        node_id: str,
        role: int,
        cluster_id: str,
        validity: datetime.timedelta = NODE_VALIDITY,
        *,
        ips: Sequence[str] = (),
    ) -> bytes:
        """Sign a node certificate for the public key in `csr_pem` (the CSR's subject is ignored),
        valid for `validity` from now (never past the root's own expiry), backdated by `backdate`.

        `ips` are added as IP address SANs: a manager's peer address, because an etcd peer checks the
        certificate of the member it dials against the host of that member's peer URL. An entry that
        is not an IP address raises JoinError.
        """
        if self.key_pem is None:
            raise JoinError("this node does not hold the root CA key and cannot issue certificates")
        try:
            csr = x509.load_pem_x509_csr(_pem(csr_pem))
        except ValueError as e:
            raise JoinError(f"certificate request is not a PEM CSR: {e}") from None
        if not csr.is_signature_valid:
            raise JoinError("certificate request signature is invalid: send a CSR signed with the node's key")
        ca_key = serialization.load_pem_private_key(self.key_pem, None)
        ca_cert = x509.load_pem_x509_certificate(self.cert_pem)
        names: list[x509.GeneralName] = [x509.DNSName(node_id)]
        if role == types_pb2.MANAGER:
            names += [x509.DNSName(MANAGER_NAME), x509.DNSName(JOIN_NAME)]
        else:
            names.append(x509.DNSName(WORKER_OU))
        for ip in ips:
            try:
                names.append(x509.IPAddress(ipaddress.ip_address(ip)))
            except ValueError:
                raise JoinError(f"certificate IP address {ip!r} is not an IP address") from None
        now = datetime.datetime.now(datetime.UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(
                x509.Name(
                    [
                        x509.NameAttribute(NameOID.COMMON_NAME, node_id),
                        x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, _ROLE_OU[role]),
                        x509.NameAttribute(NameOID.ORGANIZATION_NAME, cluster_id),
                    ]
                )
            )
            .issuer_name(ca_cert.subject)
            .public_key(csr.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - backdate(validity))
            .not_valid_after(min(now + validity, ca_cert.not_valid_after_utc))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(True, False, True, False, False, False, False, False, False), critical=True
            )
            .add_extension(
                x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                critical=False,
            )
            .add_extension(x509.SubjectAlternativeName(names), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_cert.public_key()),  # type: ignore[arg-type]
                critical=False,
            )
            .sign(ca_key, hashes.SHA256())  # type: ignore[arg-type]
        )
        return cert.public_bytes(serialization.Encoding.PEM)


# ---- root rotation -----------------------------------------------------------------------------
def cross_sign(old: RootCA, new_cert_pem: bytes) -> bytes:
    """The new root's subject and public key in a CA certificate signed by the `old` root: a node
    certificate issued by the new root, sent with this after it, is accepted by a party that trusts
    only the old root (SwarmKit's cross-signing)."""
    if old.key_pem is None:
        raise ValueError("the current root CA key is not available to cross-sign the new root")
    new = load_cert(new_cert_pem)
    old_cert = load_cert(old.cert_pem)
    old_key = serialization.load_pem_private_key(old.key_pem, None)
    return _ca_certificate(new.subject, new.public_key(), old_cert.subject, old_key, new.not_valid_before_utc,
                           min(new.not_valid_after_utc, old_cert.not_valid_after_utc), path_length=0)


def _ca_certificate(subject: x509.Name, public_key: Any, issuer: x509.Name, signing_key: Any,
                    not_before: datetime.datetime, not_after: datetime.datetime, *, path_length: int) -> bytes:
    """PEM of a CA certificate for `public_key`, signed by `signing_key` (the same key: a root)."""
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=path_length), critical=True)
        .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(signing_key.public_key()), critical=False)
        .sign(signing_key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM)


def check_root_pair(cert_pem: bytes, key_pem: bytes) -> RootCA:
    """A root given with `--ca-cert FILE --ca-key FILE`, checked: ValueError with one sentence
    naming the flag otherwise."""
    try:
        cert = load_cert(cert_pem)
    except ValueError as e:
        raise ValueError(f"--ca-cert is not a PEM certificate ({e}): give the root CA certificate in PEM") from None
    try:
        key = serialization.load_pem_private_key(key_pem, None)
    except (ValueError, TypeError) as e:
        raise ValueError(f"--ca-key is not an unencrypted PEM private key ({e}): give the root CA's key in PEM, "
                         "without a passphrase") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
        raise ValueError("--ca-key must be an ECDSA or RSA key")
    try:
        bc = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        bc = None
    if bc is None or not bc.ca:
        raise ValueError("--ca-cert is not a CA certificate (its basic constraints do not say CA:TRUE): "
                         "give a root CA certificate")
    if _spki(key.public_key()) != _spki(cert.public_key()):
        raise ValueError("--ca-key does not belong to --ca-cert (their public keys differ): give the key that "
                         "signs with that certificate")
    now = datetime.datetime.now(datetime.UTC)
    if cert.not_valid_after_utc <= now + datetime.timedelta(days=1):
        raise ValueError(f"--ca-cert expires at {cert.not_valid_after_utc.isoformat()}, within a day: "
                         "give a root CA certificate valid for longer")
    return RootCA(cert.public_bytes(serialization.Encoding.PEM), key_pem)


def trust_bundle(root_ca: objects_pb2.RootCA) -> bytes:
    """The roots a node trusts now: the cluster's, and during a rotation the new one after it (the
    current root first: a joining node checks the first against its token's digest)."""
    if root_ca.HasField("root_rotation"):
        return root_ca.ca_cert + root_ca.root_rotation.ca_cert
    return root_ca.ca_cert


def issuing_root(root_ca: objects_pb2.RootCA) -> tuple[RootCA, bytes]:
    """The root that signs node certificates now (a rotation's new one while it runs) and the
    cross-signed certificate node certificates carry after their own (empty if none)."""
    if root_ca.HasField("root_rotation"):
        r = root_ca.root_rotation
        return RootCA(r.ca_cert, r.ca_key), r.cross_signed_ca_cert
    return RootCA(root_ca.ca_cert, root_ca.ca_key), root_ca.cross_signed_ca_cert


def issuer_key(cert_pem: bytes | str) -> bytes:
    """DER of a certificate's public key: how `NodeTLSInfo.cert_issuer_public_key` names a root."""
    return _spki(load_cert(cert_pem).public_key())


def _spki(public_key: Any) -> bytes:
    return public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def backdate(validity: datetime.timedelta) -> datetime.timedelta:
    """How far before its issue time a certificate of `validity` starts: an hour (clock skew between
    nodes), but never more than the validity, so that `issued_at` can recover the issue time."""
    return min(MAX_BACKDATE, validity)


def load_cert(cert_pem: bytes | str) -> x509.Certificate:
    """The first certificate of a PEM (a node's leaf, when the PEM is a chain)."""
    return x509.load_pem_x509_certificate(_pem(cert_pem))


def issued_at(cert: x509.Certificate) -> datetime.datetime:
    """When the CA signed `cert`: its start plus the backdate (see `backdate`; the backdate is the
    smaller of an hour and the validity, so it is the smaller of an hour and half the span)."""
    start, end = cert.not_valid_before_utc, cert.not_valid_after_utc
    return start + min(MAX_BACKDATE, (end - start) / 2)


def renewal_time(cert_pem: bytes | str, fraction: float) -> datetime.datetime:
    """When a node renews `cert_pem`: at `fraction` (drawn uniformly from RENEW_FROM..RENEW_UNTIL by
    the caller) of the time between its issue and its expiry."""
    cert = load_cert(cert_pem)
    start = issued_at(cert)
    return start + (cert.not_valid_after_utc - start) * fraction


def lifetime(cert_pem: bytes | str) -> datetime.timedelta:
    """From the certificate's issue (`issued_at`) to its expiry."""
    cert = load_cert(cert_pem)
    return cert.not_valid_after_utc - issued_at(cert)


def expiry(cert_pem: bytes | str) -> datetime.datetime:
    return load_cert(cert_pem).not_valid_after_utc


def tls_info(cert_pem: bytes | str, trust_pem: bytes | str) -> types_pb2.NodeTLSInfo:
    """What `swarmctl node inspect` shows of a node certificate: the root of `trust_pem` (a bundle)
    that issued it, and its validity."""
    cert = load_cert(cert_pem)
    issuer = issuer_in(cert, trust_pem) or load_certs(trust_pem)[0]
    info = types_pb2.NodeTLSInfo(
        cert_issuer_subject=cert.issuer.rfc4514_string(),
        cert_issuer_public_key=_spki(issuer.public_key()),
        cert_serial=f"{cert.serial_number:x}",
    )
    info.cert_not_before.FromDatetime(cert.not_valid_before_utc)
    info.cert_not_after.FromDatetime(cert.not_valid_after_utc)
    return info


def load_certs(pem: bytes | str) -> list[x509.Certificate]:
    """Every certificate of a PEM bundle or chain, in order."""
    return x509.load_pem_x509_certificates(_pem(pem))


def issuer_in(cert: x509.Certificate, trust_pem: bytes | str) -> x509.Certificate | None:
    """The root of the bundle `trust_pem` that signed `cert`, or None."""
    for root in load_certs(trust_pem):
        try:
            cert.verify_directly_issued_by(root)
            return root
        except (ValueError, TypeError, InvalidSignature):
            continue
    return None


def verify_issued(cert: x509.Certificate, trust_pem: bytes | str) -> None:
    """`cert` was signed by one of the roots in `trust_pem` (a bundle); ValueError if by none."""
    if issuer_in(cert, trust_pem) is None:
        raise ValueError(f"certificate {cert.serial_number:x} was not issued by a root this node trusts")


def validity_of(spec_expiry_ns: int) -> datetime.timedelta:
    """The node certificate validity a cluster asks for (`ca_config.node_cert_expiry`, 0 = default)."""
    return datetime.timedelta(microseconds=spec_expiry_ns // 1000) if spec_expiry_ns > 0 else NODE_VALIDITY


@dataclass(frozen=True)
class CertInfo:
    node_id: str
    role: int  # types_pb2.WORKER | MANAGER
    cluster_id: str


def cert_info(cert_pem: bytes | str, ca_cert_pem: bytes | None = None) -> CertInfo:
    """Node id, role and cluster id of a node certificate (checked to be issued by a root of the
    trust bundle `ca_cert_pem` if given: ValueError otherwise)."""
    cert = x509.load_pem_x509_certificate(_pem(cert_pem))
    if ca_cert_pem is not None:
        verify_issued(cert, ca_cert_pem)

    def attr(oid: x509.ObjectIdentifier) -> str:
        vals = cert.subject.get_attributes_for_oid(oid)
        return str(vals[0].value) if vals else ""

    ou = attr(NameOID.ORGANIZATIONAL_UNIT_NAME)
    if ou not in _OU_ROLE:
        raise ValueError(f"certificate OU {ou!r} is not a node role")
    return CertInfo(attr(NameOID.COMMON_NAME), _OU_ROLE[ou], attr(NameOID.ORGANIZATION_NAME))


# ---- a node's TLS identity on disk -------------------------------------------------------------
@dataclass
class TLSIdentity:
    """A node's key, certificate and the root CA certificate, kept in `<state dir>/certificates`."""

    key_pem: bytes
    cert_pem: bytes
    ca_pem: bytes

    @property
    def info(self) -> CertInfo:
        return cert_info(self.cert_pem)

    @property
    def node_id(self) -> str:
        return self.info.node_id

    @property
    def role(self) -> int:
        return self.info.role

    def save(self, directory: str | os.PathLike[str]) -> None:
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True, mode=0o700)
        for name, data, mode in (
            ("node.key", self.key_pem, 0o600),
            ("node.crt", self.cert_pem, 0o644),
            ("swarm-root-ca.crt", self.ca_pem, 0o644),
        ):
            tmp = d / (name + ".tmp")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, d / name)

    @classmethod
    def load(cls, directory: str | os.PathLike[str]) -> TLSIdentity | None:
        d = Path(directory)
        try:
            return cls(
                (d / "node.key").read_bytes(), (d / "node.crt").read_bytes(), (d / "swarm-root-ca.crt").read_bytes()
            )
        except FileNotFoundError:
            return None


class NodeCredentials:
    """A node's TLS identity as it changes (renewal, role change): the one place every server and
    client of the node reads it, so that the next TLS handshake of each uses the newest certificate
    with nothing restarted. Connections already open keep the certificate they were opened with (TLS
    checks a certificate once, at the handshake), so a renewal drops no session.

    `update` saves the identity to `directory` (if given) first, then calls every `subscribe`d
    function with it (the etcd member rewrites its peer files). `server_credentials` are dynamic:
    gRPC asks them for the current certificate at each new handshake."""

    def __init__(self, identity: TLSIdentity, directory: str | os.PathLike[str] | None = None) -> None:
        self._identity = identity
        self._dir = Path(directory) if directory is not None else None
        self._generation = 0
        self._listeners: list[Callable[[TLSIdentity], None]] = []

    @property
    def current(self) -> TLSIdentity:
        return self._identity

    @property
    def generation(self) -> int:
        """Bumped by every `update`."""
        return self._generation

    def update(self, identity: TLSIdentity) -> None:
        if self._dir is not None:
            identity.save(self._dir)
        self._identity = identity
        self._generation += 1
        for fn in list(self._listeners):
            fn(identity)

    def subscribe(self, fn: Callable[[TLSIdentity], None]) -> None:
        self._listeners.append(fn)

    def unsubscribe(self, fn: Callable[[TLSIdentity], None]) -> None:
        if fn in self._listeners:
            self._listeners.remove(fn)

    def server_credentials(self, *, client_auth: bool = True) -> grpc.ServerCredentials:
        """TLS server credentials that follow `update`: mutual TLS against the node's trusted roots
        (`client_auth`), or server-only TLS (the join listener)."""
        served = [-1]

        def config() -> grpc.ServerCertificateConfiguration:
            ident = self._identity
            return grpc.ssl_server_certificate_configuration(
                [(ident.key_pem, ident.cert_pem)], root_certificates=ident.ca_pem if client_auth else None
            )

        def fetch() -> grpc.ServerCertificateConfiguration | None:  # gRPC: None = unchanged
            if served[0] == self._generation:
                return None
            served[0] = self._generation
            return config()

        served[0] = self._generation
        return grpc.dynamic_ssl_server_credentials(config(), fetch, require_client_authentication=client_auth)

    def channel_credentials(self) -> grpc.ChannelCredentials:
        """Client credentials of the current identity: build them for each new channel (a channel
        keeps the credentials it was made with)."""
        return channel_credentials(self._identity)


# ---- gRPC credentials and caller identity ------------------------------------------------------
def channel_credentials(identity: TLSIdentity) -> grpc.ChannelCredentials:
    """Client side of mutual TLS to a manager. Use with `channel_options()` (server name check)."""
    return grpc.ssl_channel_credentials(identity.ca_pem, identity.key_pem, identity.cert_pem)


def channel_options(server_name: str = MANAGER_NAME) -> list[tuple[str, str]]:
    """Channel options that make a TLS channel check (and send as SNI) the managers' common name:
    managers are dialled by IP address, their certificates name "swarm-manager"."""
    return [("grpc.ssl_target_name_override", server_name), ("grpc.default_authority", server_name)]


def secure_channel(addr: str, identity: TLSIdentity) -> grpc.aio.Channel:
    """An mTLS grpc.aio channel to a manager's remote API (host:2377)."""
    return grpc.aio.secure_channel(addr, channel_credentials(identity), options=channel_options())


@dataclass(frozen=True)
class PeerIdentity:
    node_id: str
    role: int  # types_pb2.WORKER | MANAGER
    cluster_id: str

    @property
    def is_manager(self) -> bool:
        return self.role == types_pb2.MANAGER


def peer_identity(context: grpc.ServicerContext | grpc.aio.ServicerContext) -> PeerIdentity | None:
    """The verified node identity of the caller (mTLS listener), None for unauthenticated callers:
    the local unix control socket (root on this host: full access) and the join listeners."""
    auth = context.auth_context()
    pems = auth.get("x509_pem_cert") or []
    if not pems:
        return None
    return _peer_of_pem(pems[0])


@functools.lru_cache(maxsize=16384)
def _peer_of_pem(pem: bytes) -> PeerIdentity | None:
    """The identity in a verified client certificate, parsed once per certificate (every RPC of a
    node brings the same one: a heartbeat must not parse X.509)."""
    try:
        info = cert_info(pem)
    except ValueError:
        return None
    return PeerIdentity(info.node_id, info.role, info.cluster_id)


def is_local_caller(context: grpc.ServicerContext | grpc.aio.ServicerContext) -> bool:
    """True on the local unix control socket: no transport security (the socket is mode 0600, root
    only). Callers on the remote port always come with TLS."""
    kinds = context.auth_context().get("transport_security_type") or []
    return not kinds or kinds[0] != b"ssl"


# ---- the CA service ----------------------------------------------------------------------------
@dataclass
class IssuedNode:
    """What `CAServicer`'s issue hook returns: the new node's id and, for managers, the etcd members
    to start with and the store's data key."""

    node_id: str
    certificate: bytes
    role: int
    raft_peers: tuple[str, ...] = ()
    cluster_id: str = ""
    data_key: bytes = b""  # managers only: the store's data key (see shoal.manager.encryption)


# (csr, token, hostname, advertise_addr, raft_addr, authenticated caller or None) -> IssuedNode
IssueHook = Callable[[ca_pb2.IssueNodeCertificateRequest, PeerIdentity | None], Awaitable[IssuedNode]]


class CAServicer(ca_pb2_grpc.CAServicer):
    """The CA gRPC service. Root CA from `get_root_ca()`; issuing (store writes, Raft membership)
    is the manager's `issue` hook; JoinError becomes INVALID_ARGUMENT/PERMISSION_DENIED."""

    def __init__(
        self,
        get_root_ca: Callable[[], bytes],
        issue: IssueHook,
        *,
        plain: bool = False,
        heartbeat_period: Callable[[], float] | None = None,
    ) -> None:
        """`heartbeat_period`: the cluster's heartbeat period now (s), told to each node issued a
        certificate (its agent's first connection sets its keepalive from it)."""
        self._get_root_ca = get_root_ca
        self._issue = issue
        self._plain = plain  # the plaintext listener: root CA only
        self._heartbeat_period = heartbeat_period

    async def GetRootCACertificate(self, request, context):  # noqa: N802
        return ca_pb2.GetRootCACertificateResponse(certificate=self._get_root_ca())

    async def IssueNodeCertificate(self, request, context):  # noqa: N802
        if self._plain:
            await context.abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                "certificates are issued over TLS only: connect with TLS after checking the root CA",
            )
        try:
            issued = await self._issue(request, peer_identity(context))
        except JoinError as e:
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, str(e))
        except StoreError as e:  # e.g. no quorum: the join cannot be recorded now
            await context.abort(getattr(grpc.StatusCode, e.code, grpc.StatusCode.UNKNOWN), str(e))
        resp = ca_pb2.IssueNodeCertificateResponse(
            node_id=issued.node_id,
            certificate=issued.certificate,
            root_ca=self._get_root_ca(),
            role=issued.role,
            raft_peers=list(issued.raft_peers),
            cluster_id=issued.cluster_id,
            data_key=issued.data_key if issued.role == types_pb2.MANAGER else b"",
        )
        if self._heartbeat_period is not None:
            resp.heartbeat_period.FromNanoseconds(int(self._heartbeat_period() * 1e9))
        return resp


# ---- the joining side --------------------------------------------------------------------------
@dataclass
class JoinResult:
    identity: TLSIdentity
    response: ca_pb2.IssueNodeCertificateResponse


async def join_cluster(
    addr: str,
    token: str,
    *,
    hostname: str = "",
    advertise_addr: str = "",
    raft_addr: str = "",
    timeout: float = 15.0,
    issue_timeout: float = 90.0,  # a manager may wait for the store to take a new member (one at a time)
) -> JoinResult:
    """Join through the manager at `addr` (host:2377): fetch the root CA over plaintext, check it
    against the token's digest, then send a CSR and the token over TLS (server verified against
    that CA). Raises JoinError with a clear message."""
    parse_join_token(token)
    try:
        async with grpc.aio.insecure_channel(addr) as ch:
            resp = await ca_pb2_grpc.CAStub(ch).GetRootCACertificate(
                ca_pb2.GetRootCACertificateRequest(), timeout=timeout, wait_for_ready=True
            )
    except grpc.aio.AioRpcError as e:
        raise JoinError(f"cannot reach a manager at {addr}: {e.details()}") from None
    ca_pem = resp.certificate
    verify_root_ca(token, ca_pem)
    _, key_pem = new_key()
    req = ca_pb2.IssueNodeCertificateRequest(
        csr=make_csr(key_pem),
        token=token,
        hostname=hostname,
        advertise_addr=advertise_addr,
        raft_addr=raft_addr,
    )
    creds = grpc.ssl_channel_credentials(ca_pem)
    try:
        async with grpc.aio.secure_channel(addr, creds, options=channel_options(JOIN_NAME)) as ch:
            issued = await ca_pb2_grpc.CAStub(ch).IssueNodeCertificate(req, timeout=issue_timeout, wait_for_ready=True)
    except grpc.aio.AioRpcError as e:
        if e.code() in (grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.INVALID_ARGUMENT):
            raise JoinError(e.details()) from None
        raise JoinError(f"join through {addr} failed: {e.details()}") from None
    if issued.root_ca != ca_pem:
        raise JoinError("the manager changed its root CA during the join; retry")
    ident = TLSIdentity(key_pem, issued.certificate, ca_pem)
    info = cert_info(ident.cert_pem, ca_pem)
    if info.node_id != issued.node_id or info.role != issued.role:
        raise JoinError("the issued certificate does not match the node id and role the manager sent")
    return JoinResult(ident, issued)
