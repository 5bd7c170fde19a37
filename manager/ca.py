"""Root CA, node certificates and join tokens (work in progress; full module follows)."""

from __future__ import annotations

import hashlib
import secrets

from cryptography import x509

TOKEN_PREFIX = "SWMTKN"
TOKEN_VERSION = "1"
_B36 = "0123456789abcdefghijklmnopqrstuvwxyz"


def base36(data: bytes, width: int) -> str:
    """`data` as a big-endian number in base 36, zero-padded to `width` digits (Swarm's encoding)."""
    n = int.from_bytes(data, "big")
    out = []
    while n:
        n, r = divmod(n, 36)
        out.append(_B36[r])
    return "".join(reversed(out)).rjust(width, "0")


def ca_digest(ca_cert_pem: bytes | str) -> str:
    """The digest of a root CA certificate as it appears in join tokens: base 36 of sha256 of the DER."""
    if isinstance(ca_cert_pem, str):
        ca_cert_pem = ca_cert_pem.encode()
    der = x509.load_pem_x509_certificate(ca_cert_pem).public_bytes(
        __import__("cryptography.hazmat.primitives.serialization", fromlist=["Encoding"]).Encoding.DER
    )
    return base36(hashlib.sha256(der).digest(), 50)


def generate_join_token(ca_cert_pem: bytes | str) -> str:
    """A new join token `SWMTKN-1-<CA digest>-<secret>` for the cluster whose root CA is `ca_cert_pem`."""
    return f"{TOKEN_PREFIX}-{TOKEN_VERSION}-{ca_digest(ca_cert_pem)}-{base36(secrets.token_bytes(16), 25)}"
