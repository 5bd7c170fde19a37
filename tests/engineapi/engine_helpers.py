"""The real `docker` CLI (28.x, /usr/bin/docker) against a real swarmd's Engine API socket.

    mgr = EngineManager(); mgr.start()               # one manager (and its agent, running runc
    mgr.docker("service", "ls")                       # containers), images from a local registry
    mgr.dok("node", "ls")                             # rc 0 asserted, stdout returned
    mgr.dfail("service", "inspect", "nosuch", match="service nosuch not found")
    mgr.image                                         # 127.0.0.1:PORT/library/busybox:latest

Fixtures (module scope): `registry`, `mgr` (started, cleaned up after the module: containers,
mounts, state dir). `http(sock, method, path, body)` sends one raw HTTP/1.1 request and returns
(status, headers, body) for tests below the CLI.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers.registry import local_registry
from helpers.swarmd import Swarmd, remove_containers, remove_task_netns, unmount_under

from shoal.lab.registry import Registry

DOCKER = shutil.which("docker") or "/usr/bin/docker"


class EngineManager(Swarmd):
    """One manager whose agent runs containers; `docker` talks to its docker.sock."""

    ctl_timeout = 180
    fold_case = True

    def __init__(self, registry: Registry | None = None, prefix: str = "ea") -> None:
        self.base = Path(tempfile.mkdtemp(prefix=f"{prefix}{os.getpid() % 10000}-", dir="/var/tmp"))
        extra = ["--insecure-registry", registry.host] if registry is not None else []
        super().__init__(self.base, "m1", extra=extra, hostname=f"{prefix}m1")
        self.image = f"{registry.host}/library/busybox:latest" if registry is not None else "busybox"

    @property
    def docker_sock(self) -> Path:
        return self.dir / "docker.sock"

    def start(self, extra: Any = ()) -> EngineManager:  # type: ignore[override]
        super().start(extra)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.docker_sock.exists() and self.sock.exists():
                r = self.docker("node", "ls", "--format", "{{.Status}}")
                if r.returncode == 0 and "Ready" in r.stdout:
                    return self
            time.sleep(0.2)
        raise AssertionError(f"swarmd did not come up: {self.log.read_text()[-3000:]}")

    def docker(self, *args: str, input: str | None = None, timeout: float = 180,
               sock: Path | None = None) -> subprocess.CompletedProcess[str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("DOCKER_")}
        env["DOCKER_HOST"] = f"unix://{sock or self.docker_sock}"
        env["DOCKER_CONFIG"] = str(self.base / "docker-config")  # no user config, no credential helpers
        return subprocess.run([DOCKER, *args], capture_output=True, text=True, input=input, timeout=timeout, env=env)

    def dok(self, *args: str, **kw: Any) -> str:
        r = self.docker(*args, **kw)
        if r.returncode != 0:
            raise AssertionError(f"docker {' '.join(args)} exited {r.returncode}:\n{r.stdout}\n{r.stderr}\n"
                                 f"swarmctl task ls:\n{self.ctl('task', 'ls', '--no-trunc').stdout}")
        return r.stdout

    def dfail(self, *args: str, match: str, **kw: Any) -> str:
        """docker fails (exit 1) with `match` in its stderr; returns stderr."""
        r = self.docker(*args, **kw)
        assert r.returncode == 1, f"docker {' '.join(args)} exited {r.returncode} (expected 1):\n{r.stdout}\n{r.stderr}"
        assert match in r.stderr, f"docker {' '.join(args)}: {match!r} not in stderr:\n{r.stderr}"
        return r.stderr

    def djson(self, *args: str) -> Any:
        return json.loads(self.dok(*args))

    def cleanup(self) -> None:
        remove_containers(self.dir / "engine")
        unmount_under(self.base)
        shutil.rmtree(self.base, ignore_errors=True)


def http(sock: Path | str, method: str, path: str, body: bytes | None = None,
         headers: dict[str, str] | None = None, timeout: float = 30) -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.1 request on a fresh unix-socket connection (Connection: close)."""
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(timeout)
    s.connect(str(sock))
    try:
        hs = {"Host": "docker", "Connection": "close", **(headers or {})}
        if body is not None:
            hs["Content-Length"] = str(len(body))
        s.sendall((f"{method} {path} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in hs.items()) + "\r\n").encode()
                  + (body or b""))
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    finally:
        s.close()
    head, _, rest = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    out = {k.lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:])}
    if out.get("transfer-encoding") == "chunked":
        body_out = b""
        while rest:
            size, _, rest = rest.partition(b"\r\n")
            n = int(size, 16)
            if n == 0:
                break
            body_out, rest = body_out + rest[:n], rest[n + 2:]
        rest = body_out
    return status, out, rest


@pytest.fixture(scope="module")
def registry() -> Iterator[Registry]:
    if os.geteuid() != 0:
        pytest.fail("Engine API tests need root (or deselect with -m 'not integration')")
    with local_registry() as reg:
        yield reg


@contextlib.contextmanager
def running_manager(registry: Registry | None, prefix: str = "ea") -> Iterator[EngineManager]:
    """A started `EngineManager` (hostname `<prefix>m1`), stopped afterwards and everything it made
    removed: containers, mounts, its tasks' network namespaces, the state dir. Its log's tail goes to
    stderr when the start or the tests failed."""
    m = EngineManager(registry, prefix=prefix)
    try:
        m.start()
        yield m
    except BaseException:
        if m.log.exists():
            sys.stderr.write("---- swarmd log tail\n" + "\n".join(m.log.read_text().splitlines()[-40:]) + "\n")
        raise
    finally:
        m.stop()
        remove_task_netns([m])
        m.cleanup()


@pytest.fixture(scope="module")
def mgr(registry: Registry) -> Iterator[EngineManager]:
    with running_manager(registry) as m:
        yield m
