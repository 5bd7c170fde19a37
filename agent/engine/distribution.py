"""A blocking OCI distribution (registry v2) client: manifests and blobs, bearer-token and basic auth.

Runs in worker threads (the engine calls it through ``asyncio.to_thread``). One ``RegistryClient`` talks
to one endpoint (a registry or a mirror); it caches the bearer token per scope. Redirects of blob
downloads are followed without the Authorization header when they leave the registry's host (the
storage behind Docker Hub rejects requests carrying it).
"""

from __future__ import annotations

import base64
import binascii
import http.client
import json
import logging
import re
import socket
import ssl
import threading
import urllib.parse
from dataclasses import dataclass
from typing import BinaryIO

from shoal.agent.engine.errors import (
    AuthenticationFailed,
    ImageNotFound,
    RegistryError,
    RegistryUnreachable,
)

log = logging.getLogger(__name__)

MT_DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
MT_DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
MT_DOCKER_SCHEMA1 = "application/vnd.docker.distribution.manifest.v1+prettyjws"
MT_OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MT_OCI_INDEX = "application/vnd.oci.image.index.v1+json"
MANIFEST_TYPES = (MT_DOCKER_MANIFEST, MT_OCI_MANIFEST)
INDEX_TYPES = (MT_DOCKER_LIST, MT_OCI_INDEX)
ACCEPT = ", ".join((MT_OCI_INDEX, MT_DOCKER_LIST, MT_OCI_MANIFEST, MT_DOCKER_MANIFEST))
USER_AGENT = "shoal-engine/0.1"
MAX_MANIFEST = 4 << 20


@dataclass
class RegistryAuth:
    """Credentials for one registry (as ``docker login`` stores them)."""

    username: str = ""
    password: str = ""
    identity_token: str = ""  # an OAuth2 refresh token, used instead of the password when set

    @classmethod
    def from_b64(cls, data: str) -> RegistryAuth | None:
        """Decodes ``ContainerSpec.PullOptions.registry_auth`` (base64 of Docker's JSON AuthConfig)."""
        if not data:
            return None
        try:
            raw = base64.urlsafe_b64decode(data + "=" * (-len(data) % 4))
            doc = json.loads(raw)
        except (binascii.Error, ValueError) as e:
            raise AuthenticationFailed(
                'pull_options.registry_auth is not base64 of a JSON {"username","password"} object; '
                "re-create the service with --with-registry-auth"
            ) from e
        return cls(doc.get("username", ""), doc.get("password", ""), doc.get("identitytoken", ""))

    def __repr__(self) -> str:  # never print the password
        return f"RegistryAuth(username={self.username!r})"


_CHALLENGE_RE = re.compile(r'(\w+)="([^"]*)"|(\w+)=([^,\s]+)')


def parse_challenge(header: str) -> tuple[str, dict[str, str]]:
    """``Bearer realm="...",service="...",scope="..."`` → ("bearer", {...})."""
    scheme, _, rest = header.strip().partition(" ")
    params = {}
    for m in _CHALLENGE_RE.finditer(rest):
        if m.group(1):
            params[m.group(1).lower()] = m.group(2)
        else:
            params[m.group(3).lower()] = m.group(4)
    return scheme.lower(), params


class Response:
    """An open HTTP response whose body is read by the caller; ``close()`` ends its connection."""

    def __init__(self, conn: http.client.HTTPConnection, resp: http.client.HTTPResponse) -> None:
        self.conn, self.resp = conn, resp
        self.status = resp.status

    def header(self, name: str) -> str | None:
        return self.resp.getheader(name)

    def read(self, n: int = -1) -> bytes:
        return self.resp.read(n) if n >= 0 else self.resp.read()

    @property
    def body(self) -> BinaryIO:
        return self.resp  # type: ignore[return-value]

    def close(self) -> None:
        self.conn.close()


class RegistryClient:
    def __init__(
        self,
        endpoint: str,
        host: str,
        auth: RegistryAuth | None = None,
        *,
        verify_tls: bool = True,
        timeout: float = 30.0,
    ) -> None:
        """``endpoint`` is a base URL (``https://registry-1.docker.io``, ``http://127.0.0.1:5000``);
        ``host`` is the registry name used in messages (``docker.io``)."""
        u = urllib.parse.urlsplit(endpoint)
        if u.scheme not in ("http", "https") or not u.hostname:
            raise RegistryError(f"registry endpoint {endpoint!r} is not an http(s) URL")
        self.endpoint = endpoint.rstrip("/")
        self.scheme, self.netloc, self.base = u.scheme, u.netloc, u.path.rstrip("/")
        self.host = host
        self.auth = auth
        self.verify_tls = verify_tls
        self.timeout = timeout
        self._tokens: dict[str, str] = {}
        self._basic = False
        self._lock = threading.Lock()

    # -- low level ---------------------------------------------------------------------------
    def _connect(self, scheme: str, netloc: str) -> http.client.HTTPConnection:
        if scheme == "https":
            ctx = ssl.create_default_context()
            if not self.verify_tls:
                ctx.check_hostname = False
                ctx.verify_mode = ssl.CERT_NONE
            return http.client.HTTPSConnection(netloc, timeout=self.timeout, context=ctx)
        return http.client.HTTPConnection(netloc, timeout=self.timeout)

    def _raw(self, method: str, url: str, headers: dict[str, str]) -> Response:
        u = urllib.parse.urlsplit(url)
        conn = self._connect(u.scheme, u.netloc)
        path = u.path + ("?" + u.query if u.query else "")
        try:
            conn.request(method, path, headers={"User-Agent": USER_AGENT, **headers})
            return Response(conn, conn.getresponse())
        except (OSError, http.client.HTTPException) as e:
            conn.close()
            raise RegistryUnreachable(
                f"registry {self.host} is unreachable at {self.endpoint}: {_reason(e)}"
            ) from e

    def _auth_headers(self, scope: str) -> dict[str, str]:
        tok = self._tokens.get(scope)
        if tok:
            return {"Authorization": "Bearer " + tok}
        if self._basic and self.auth:
            return {"Authorization": "Basic " + _b64(f"{self.auth.username}:{self.auth.password}")}
        return {}

    def _fetch_token(self, params: dict[str, str], scope: str) -> str:
        realm = params.get("realm")
        if not realm:
            raise RegistryError(f"registry {self.host} sent a bearer challenge without a realm")
        q = {"service": params.get("service", "")} if params.get("service") else {}
        q["scope"] = params.get("scope") or scope
        headers = {}
        if self.auth and self.auth.username:
            headers["Authorization"] = "Basic " + _b64(f"{self.auth.username}:{self.auth.password}")
            q["account"] = self.auth.username
        url = realm + ("&" if "?" in realm else "?") + urllib.parse.urlencode(q)
        r = self._raw("GET", url, headers)
        try:
            body = r.read(1 << 20)
        finally:
            r.close()
        if r.status in (401, 403):
            raise AuthenticationFailed(self._bad_creds())
        if r.status != 200:
            raise RegistryError(f"token server of registry {self.host} answered HTTP {r.status}")
        try:
            doc = json.loads(body)
        except ValueError as e:
            raise RegistryError(f"token server of registry {self.host} sent invalid JSON") from e
        tok = doc.get("token") or doc.get("access_token")
        if not tok:
            raise RegistryError(f"token server of registry {self.host} sent no token")
        return tok

    def _bad_creds(self) -> str:
        if self.auth and self.auth.username:
            return (
                f"registry {self.host} rejected the credentials of user {self.auth.username!r}; "
                "check the registry auth sent with the service"
            )
        return (
            f"registry {self.host} requires authentication; "
            "send credentials with the service (--with-registry-auth)"
        )

    def request(
        self,
        method: str,
        path: str,
        *,
        scope: str,
        headers: dict[str, str] | None = None,
        follow: bool = True,
    ) -> Response:
        """Sends ``method path`` answering one auth challenge; follows redirects; returns the final response
        open (the caller reads and closes it). 401 after authenticating raises AuthenticationFailed."""
        headers = dict(headers or {})
        url = f"{self.scheme}://{self.netloc}{self.base}{path}"
        authed = False
        while True:
            with self._lock:
                ah = self._auth_headers(scope)
            r = self._raw(method, url, {**headers, **ah})
            if r.status == 401 and not authed:
                chal = r.header("WWW-Authenticate") or ""
                r.read(1 << 16)
                r.close()
                kind, params = parse_challenge(chal)
                if kind == "bearer":
                    tok = self._fetch_token(params, scope)
                    with self._lock:
                        self._tokens[scope] = tok
                elif kind == "basic":
                    if not (self.auth and self.auth.username):
                        raise AuthenticationFailed(self._bad_creds())
                    with self._lock:
                        self._basic = True
                else:
                    raise RegistryError(f"registry {self.host} sent an unsupported auth challenge {chal!r}")
                authed = True
                continue
            if r.status == 401:
                r.read(1 << 16)
                r.close()
                if self.auth and self.auth.username:
                    raise AuthenticationFailed(self._bad_creds())
                raise _Denied()
            break
        hops = 0
        while follow and r.status in (301, 302, 303, 307, 308):
            loc = r.header("Location")
            r.read(1 << 16)
            r.close()
            hops += 1
            if not loc or hops > 5:
                raise RegistryError(f"registry {self.host} sent a bad redirect for {path}")
            nxt = urllib.parse.urljoin(url, loc)
            same = urllib.parse.urlsplit(nxt).netloc == urllib.parse.urlsplit(url).netloc
            url = nxt
            r = self._raw("GET" if method == "GET" else method, url, {**headers, **(ah if same else {})})
        return r

    # -- API --------------------------------------------------------------------------------
    def get_manifest(self, repo: str, ref: str, display: str) -> tuple[bytes, str, str | None]:
        """GETs a manifest by tag or digest: (body, media type, Docker-Content-Digest header)."""
        scope = f"repository:{repo}:pull"
        try:
            r = self.request("GET", f"/v2/{repo}/manifests/{ref}", scope=scope, headers={"Accept": ACCEPT})
        except _Denied:
            raise ImageNotFound(
                f"pull access denied for {display}: the repository does not exist or needs "
                f"credentials (registry {self.host})"
            ) from None
        try:
            if r.status == 404:
                raise ImageNotFound(f"image {display} not found: registry {self.host} has no manifest for it")
            if r.status == 403:
                raise AuthenticationFailed(self._bad_creds())
            if r.status != 200:
                raise RegistryError(
                    f"registry {self.host} answered HTTP {r.status} for manifest of {display}"
                )
            body = r.read(MAX_MANIFEST + 1)
            if len(body) > MAX_MANIFEST:
                raise RegistryError(f"manifest of {display} from {self.host} is larger than 4 MiB")
            mt = (r.header("Content-Type") or "").split(";")[0].strip()
            return body, mt, r.header("Docker-Content-Digest")
        except (OSError, http.client.HTTPException) as e:
            raise RegistryUnreachable(
                f"registry {self.host} broke off while sending the manifest of {display}: {_reason(e)}"
            ) from e
        finally:
            r.close()

    def open_blob(self, repo: str, digest: str, display: str) -> Response:
        scope = f"repository:{repo}:pull"
        try:
            r = self.request("GET", f"/v2/{repo}/blobs/{digest}", scope=scope)
        except _Denied:
            raise ImageNotFound(f"pull access denied for {display} (registry {self.host})") from None
        if r.status != 200:
            r.close()
            if r.status == 404:
                raise ImageNotFound(
                    f"image {display} is incomplete: registry {self.host} has no blob {digest}"
                )
            raise RegistryError(
                f"registry {self.host} answered HTTP {r.status} for blob {digest} of {display}"
            )
        return r

    def get_blob(self, repo: str, digest: str, display: str, limit: int = 64 << 20) -> bytes:
        r = self.open_blob(repo, digest, display)
        try:
            data = r.read(limit + 1)
        except (OSError, http.client.HTTPException) as e:
            raise RegistryUnreachable(
                f"registry {self.host} broke off while sending blob {digest}: {_reason(e)}"
            ) from e
        finally:
            r.close()
        if len(data) > limit:
            raise RegistryError(f"blob {digest} of {display} is larger than expected")
        return data


class _Denied(Exception):
    """401 after an anonymous token: Docker reports this as 'repository does not exist or may require login'."""


def _b64(s: str) -> str:
    return base64.b64encode(s.encode()).decode()


def _reason(e: BaseException) -> str:
    if isinstance(e, socket.timeout | TimeoutError):
        return "timed out"
    if isinstance(e, ConnectionRefusedError):
        return "connection refused"
    if isinstance(e, ssl.SSLError):
        return f"TLS error ({e.reason or e})"
    if isinstance(e, socket.gaierror):
        return f"name resolution failed ({e.strerror})"
    return str(e) or type(e).__name__
