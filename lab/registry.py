"""A local OCI registry (Debian's ``docker-registry``) for tests and the lab, and a small pusher.

    with Registry("127.0.0.1") as reg:                 # free port, temp storage, no auth
        push_image(reg.url, "library/busybox", "latest", busybox_image())
    reg = Registry("127.0.0.1", users={"alice": "s3cret"})   # htpasswd (bcrypt) basic auth
    reg.start(); ...; reg.stop()                        # stop() ends exactly the PID it started

The registry serves plain HTTP: clients must list ``reg.host`` as an insecure registry.
"""

from __future__ import annotations

import base64
import http.client
import logging
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.parse
from pathlib import Path

from shoal.lab.images import BuiltImage

log = logging.getLogger(__name__)
REGISTRY_BIN = "/usr/bin/docker-registry"


def free_port(addr: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((addr, 0))
        return s.getsockname()[1]


class Registry:
    """One ``docker-registry serve`` process bound to ``addr:port`` with its own storage dir."""

    def __init__(
        self,
        addr: str = "127.0.0.1",
        port: int = 0,
        *,
        storage: Path | None = None,
        users: dict[str, str] | None = None,
        realm: str = "shoal-registry",
        netns: str | None = None,
        token_auth: dict[str, str] | None = None,
    ) -> None:
        """``netns``: a network namespace path (``/run/netns/NAME``) to serve in (via ``nsenter --net``,
        which execs the registry, so ``proc.pid`` is the registry's own PID). ``token_auth``: bearer-token
        auth instead of htpasswd, keys ``realm``, ``service``, ``issuer``, ``rootcertbundle`` (PEM path)."""
        self.addr = addr
        self.port = port or free_port(addr)
        self.users = dict(users or {})
        self.realm = realm
        self._own_dir = storage is None
        self.dir = Path(tempfile.mkdtemp(prefix="shoal-registry-")) if storage is None else Path(storage)
        self.proc: subprocess.Popen | None = None
        self.netns = netns
        self.token_auth = dict(token_auth or {})

    @property
    def host(self) -> str:
        return f"{self.addr}:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.host}"

    def _config(self) -> str:
        lines = [
            "version: 0.1",
            "log:",
            "  level: warn",
            "  accesslog:",
            "    disabled: true",
            "storage:",
            "  filesystem:",
            f"    rootdirectory: {self.dir / 'data'}",
            "  delete:",
            "    enabled: true",
            "http:",
            f"  addr: {self.host}",
            "  secret: shoal-lab-registry",
        ]
        if self.token_auth:
            lines += ["auth:", "  token:"] + [f"    {k}: {v}" for k, v in sorted(self.token_auth.items())]
        elif self.users:
            lines += [
                "auth:",
                "  htpasswd:",
                f"    realm: {self.realm}",
                f"    path: {self.dir / 'htpasswd'}",
            ]
        return "\n".join(lines) + "\n"

    def _write_htpasswd(self) -> None:
        import bcrypt  # dev dependency; only needed for authenticated registries

        with open(self.dir / "htpasswd", "w") as f:
            for user, pw in self.users.items():
                f.write(f"{user}:{bcrypt.hashpw(pw.encode(), bcrypt.gensalt(rounds=5)).decode()}\n")

    def start(self, timeout: float = 20.0) -> None:
        (self.dir / "data").mkdir(parents=True, exist_ok=True)
        if self.users and not self.token_auth:
            self._write_htpasswd()
        cfg = self.dir / "config.yml"
        cfg.write_text(self._config())
        logf = open(self.dir / "registry.log", "ab")
        try:
            argv = [REGISTRY_BIN, "serve", str(cfg)]
            if self.netns:
                argv = ["nsenter", f"--net={self.netns}", *argv]
            self.proc = subprocess.Popen(
                argv, stdout=logf, stderr=logf, stdin=subprocess.DEVNULL, start_new_session=True
            )
        finally:
            logf.close()
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"docker-registry exited with {self.proc.returncode}: {self.log_tail()}")
            try:
                if self.netns:
                    probe = subprocess.run(
                        [
                            "nsenter",
                            f"--net={self.netns}",
                            "python3",
                            "-c",
                            "import socket,sys; socket.create_connection((sys.argv[1], "
                            "int(sys.argv[2])), 1).close()",
                            self.addr,
                            str(self.port),
                        ],
                        capture_output=True,
                    )
                    if probe.returncode != 0:
                        raise OSError("not yet")
                else:
                    c = http.client.HTTPConnection(self.addr, self.port, timeout=1)
                    c.request("GET", "/v2/")
                    c.getresponse().read()
                    c.close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(
                        f"docker-registry did not answer on {self.url} in {timeout} s"
                    ) from None
                time.sleep(0.05)
        log.info("registry started pid=%d url=%s auth=%s", self.proc.pid, self.url, bool(self.users))

    def log_tail(self, n: int = 2000) -> str:
        try:
            return (self.dir / "registry.log").read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def stop(self) -> None:
        """Ends the registry process this object started (by PID) and removes its temp storage."""
        p, self.proc = self.proc, None
        if p is not None and p.poll() is None:
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(5)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
            log.info("registry stopped pid=%d url=%s", p.pid, self.url)
        if self._own_dir:
            shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> Registry:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class PushError(Exception):
    pass


def _conn(url: str) -> tuple[http.client.HTTPConnection, str]:
    u = urllib.parse.urlsplit(url)
    cls = http.client.HTTPSConnection if u.scheme == "https" else http.client.HTTPConnection
    return cls(u.hostname, u.port, timeout=30), u.path.rstrip("/")


def _request(
    url: str, method: str, path: str, body: bytes | None = None, headers: dict[str, str] | None = None
) -> http.client.HTTPResponse:
    c, base = _conn(url)
    c.request(method, path if path.startswith("/v2") else base + path, body=body, headers=headers or {})
    r = c.getresponse()
    r.read()
    c.close()
    return r


def push_blob(url: str, repo: str, digest: str, data: bytes, auth: tuple[str, str] | None = None) -> None:
    h = _auth_header(auth)
    if _request(url, "HEAD", f"/v2/{repo}/blobs/{digest}", headers=h).status == 200:
        return
    r = _request(url, "POST", f"/v2/{repo}/blobs/uploads/", headers=h)
    if r.status != 202:
        raise PushError(f"blob upload start for {repo} failed: HTTP {r.status}")
    loc = r.getheader("Location") or ""
    u = urllib.parse.urlsplit(loc)
    q = u.query + ("&" if u.query else "") + "digest=" + urllib.parse.quote(digest)
    r = _request(
        url,
        "PUT",
        f"{u.path}?{q}",
        body=data,
        headers={**h, "Content-Type": "application/octet-stream", "Content-Length": str(len(data))},
    )
    if r.status != 201:
        raise PushError(f"blob upload of {digest} to {repo} failed: HTTP {r.status}")


def push_manifest(
    url: str, repo: str, ref: str, data: bytes, media_type: str, auth: tuple[str, str] | None = None
) -> None:
    r = _request(
        url,
        "PUT",
        f"/v2/{repo}/manifests/{ref}",
        body=data,
        headers={**_auth_header(auth), "Content-Type": media_type},
    )
    if r.status != 201:
        raise PushError(f"manifest push {repo}:{ref} failed: HTTP {r.status}")


def push_image(url: str, repo: str, tag: str, img: BuiltImage, auth: tuple[str, str] | None = None) -> str:
    """Pushes ``img`` as ``repo:tag`` (e.g. ``library/busybox``, ``latest``); returns the manifest digest."""
    for digest, data in img.blobs.items():
        push_blob(url, repo, digest, data, auth)
    push_manifest(url, repo, tag, img.manifest, img.media_type, auth)
    return img.manifest_digest


def push_index(
    url: str,
    repo: str,
    tag: str,
    entries: list[tuple[BuiltImage, str, str]],
    auth: tuple[str, str] | None = None,
    *,
    docker_media_types: bool = False,
) -> str:
    """Pushes every image of ``entries`` by digest, then a manifest list / OCI index of them as ``tag``."""
    from shoal.lab.images import MT_DOCKER_LIST, MT_OCI_INDEX, index_bytes, sha256

    for img, _, _ in entries:
        for digest, data in img.blobs.items():
            push_blob(url, repo, digest, data, auth)
        push_manifest(url, repo, img.manifest_digest, img.manifest, img.media_type, auth)
    idx = index_bytes(entries, docker_media_types=docker_media_types)
    push_manifest(url, repo, tag, idx, MT_DOCKER_LIST if docker_media_types else MT_OCI_INDEX, auth)
    return sha256(idx)


def _auth_header(auth: tuple[str, str] | None) -> dict[str, str]:
    if not auth:
        return {}
    return {"Authorization": "Basic " + base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode()}


def seed_busybox(url: str, auth: tuple[str, str] | None = None) -> str:
    """Pushes the busybox test image as ``library/busybox:latest``; returns its manifest digest."""
    from shoal.lab.images import busybox_image

    return push_image(url, "library/busybox", "latest", busybox_image(), auth)
