"""A minimal Docker registry token server (the bearer-token flow Docker Hub uses), for tests.

It signs ES256 JWTs with a self-signed certificate that the registry trusts (``rootcertbundle``), the
certificate riding in the token header (``x5c``). ``GET /token?service=…&scope=repository:NAME:pull``
with Basic credentials of a known user grants the asked actions; anonymous requests get a token
granting nothing; wrong credentials get 401.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.x509.oid import NameOID


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


class TokenServer:
    def __init__(
        self,
        users: dict[str, str],
        workdir: Path,
        service: str = "shoal-test-registry",
        issuer: str = "shoal-test-issuer",
    ) -> None:
        self.users, self.service, self.issuer = users, service, issuer
        self.key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "shoal test token issuer")])
        now = dt.datetime.now(dt.UTC)
        self.cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(hours=1))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(self.key, hashes.SHA256())
        )
        self.cert_path = workdir / "token-cert.pem"
        self.cert_path.write_bytes(self.cert.public_bytes(serialization.Encoding.PEM))
        self.requests: list[tuple[str | None, str]] = []  # (user, scope) per token request
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a: object) -> None:
                pass

            def do_GET(self) -> None:
                q = urllib.parse.parse_qs(urllib.parse.urlsplit(self.path).query)
                user = None
                h = self.headers.get("Authorization", "")
                if h.startswith("Basic "):
                    u, _, pw = base64.b64decode(h[6:]).decode().partition(":")
                    if outer.users.get(u) != pw:
                        self.send_response(401)
                        self.end_headers()
                        return
                    user = u
                scopes = q.get("scope", [])
                outer.requests.append((user, " ".join(scopes)))
                access = []
                if user:
                    for sc in scopes:
                        typ, name, actions = sc.split(":", 2) if sc.count(":") >= 2 else (sc, "", "")
                        access.append({"type": typ, "name": name, "actions": actions.split(",")})
                tok = outer.token(user or "", access)
                body = json.dumps({"token": tok, "access_token": tok, "expires_in": 300}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def realm(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/token"

    def registry_config(self) -> dict[str, str]:
        return {
            "realm": self.realm,
            "service": self.service,
            "issuer": self.issuer,
            "rootcertbundle": str(self.cert_path),
        }

    def token(self, sub: str, access: list[dict]) -> str:
        now = int(time.time())
        header = {
            "typ": "JWT",
            "alg": "ES256",
            "x5c": [base64.b64encode(self.cert.public_bytes(serialization.Encoding.DER)).decode()],
        }
        claims = {
            "iss": self.issuer,
            "sub": sub,
            "aud": self.service,
            "exp": now + 300,
            "nbf": now - 10,
            "iat": now,
            "jti": _b64(threading.get_ident().to_bytes(8, "little") + now.to_bytes(8, "little")),
            "access": access,
        }
        signing = f"{_b64(json.dumps(header).encode())}.{_b64(json.dumps(claims).encode())}"
        r, s = decode_dss_signature(self.key.sign(signing.encode(), ec.ECDSA(hashes.SHA256())))
        return f"{signing}.{_b64(r.to_bytes(32, 'big') + s.to_bytes(32, 'big'))}"

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(5)
