"""The Engine API on TCP with mutual TLS (`swarmd --engine-api-addr`): `docker --tlsverify` with a
manager's certificate works; no client certificate fails the handshake; a worker's certificate is
refused with a sentence. Needs root."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest
from engine_helpers import DOCKER, EngineManager
from helpers.swarmd import Swarmd

from shoal.lab.registry import free_port

pytestmark = pytest.mark.integration


def cert_path(state_dir: Path, to: Path) -> Path:
    """A DOCKER_CERT_PATH (ca.pem, cert.pem, key.pem) from a node's certificates."""
    to.mkdir(parents=True, exist_ok=True)
    certs = state_dir / "certificates"
    for src, dst in (("swarm-root-ca.crt", "ca.pem"), ("node.crt", "cert.pem"), ("node.key", "key.pem")):
        shutil.copyfile(certs / src, to / dst)
    return to


def tls_docker(host: str, cert_dir: Path | None, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DOCKER_")}
    env.update(DOCKER_HOST=f"tcp://{host}", DOCKER_CONFIG=str(cert_dir or Path("/nonexistent")))
    flags = ["--tlsverify"]
    if cert_dir is not None:
        env["DOCKER_CERT_PATH"] = str(cert_dir)
    else:
        flags += ["--tlscacert", "/dev/null"]
    return subprocess.run([DOCKER, *flags, *args], capture_output=True, text=True, timeout=60, env=env)


def test_tcp_mutual_tls_takes_a_managers_certificate_only(tmp_path: Path) -> None:
    port = free_port("127.0.0.1")
    m = EngineManager(prefix="eat")
    m.extra.append(f"--engine-api-addr=127.0.0.1:{port}")
    w = None
    try:
        m.start()
        addr = f"127.0.0.1:{port}"
        mine = cert_path(m.dir, tmp_path / "manager")
        r = tls_docker(addr, mine, "node", "ls", "--format", "{{.Hostname}} {{.ManagerStatus}}")
        assert r.returncode == 0 and r.stdout.strip() == "eatm1 Leader", r.stderr

        r = tls_docker(addr, None, "node", "ls")  # no client certificate: no TLS session at all
        assert r.returncode != 0 and "eatm1" not in r.stdout

        token = m.dok("swarm", "join-token", "-q", "worker").strip()
        w = Swarmd(m.base, "w1", hostname="eatw1", extra=["--join-addr", m.api, "--join-token", token, "--no-engine-api"])
        w.start()
        deadline = time.monotonic() + 60
        files = [w.dir / "certificates" / f for f in ("node.crt", "node.key", "swarm-root-ca.crt")]
        while not all(f.exists() for f in files) and time.monotonic() < deadline:  # the join writes them one by one
            time.sleep(0.2)
        theirs = cert_path(w.dir, tmp_path / "worker")
        r = tls_docker(addr, theirs, "node", "ls")
        assert r.returncode == 1 and "a worker's: the Engine API takes a manager's certificate" in r.stderr, r.stderr
        assert not (w.dir / "docker.sock").exists()  # --no-engine-api
    finally:
        if w is not None:
            w.stop()
        m.stop()
        m.cleanup()
