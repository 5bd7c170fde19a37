"""Fixtures for engine tests: a real docker-registry on loopback seeded with test images, engines.

Session-scoped: ``registry`` (no auth, free port on 127.0.0.1, holding ``library/busybox:latest``,
``multi:latest`` (an OCI index of linux/arm64 + linux/<host arch>) and ``hc:latest`` (busybox with a
HEALTHCHECK)), ``auth_registry`` (htpasswd basic auth, user ``alice``/``wonderland``), and
``shared_root`` (an engine root with busybox pulled once, shared by the container tests).
Function-scoped: ``engine`` (an Engine on ``shared_root``; every container it made is removed at the
end, even when the test fails) and ``fresh_engine`` (an Engine on a root of its own).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers.aio import run
from helpers.registry import HEALTHCHECK

from shoal.lab.images import busybox_image
from shoal.lab.registry import Registry, push_image, push_index

AUTH_USER, AUTH_PASSWORD = "alice", "wonderland"
PREFIX = f"st{os.getpid() % 10000}"


def _need_root() -> None:
    if os.geteuid() != 0:
        pytest.fail("engine integration tests need root (run as root, or deselect with -m 'not integration')")


@pytest.fixture(scope="session")
def images():
    return {
        "busybox": busybox_image(),
        "arm64": busybox_image(arch="arm64", config={"Cmd": ["echo", "arm64"]}),
        "hc": busybox_image(config=HEALTHCHECK),
    }


@pytest.fixture(scope="session")
def registry(images) -> Iterator[Registry]:
    _need_root()
    reg = Registry("127.0.0.1")
    reg.start()
    try:
        push_image(reg.url, "library/busybox", "latest", images["busybox"])
        push_index(
            reg.url,
            "multi",
            "latest",
            [(images["arm64"], "linux", "arm64"), (images["busybox"], "linux", _host_arch())],
        )
        push_image(reg.url, "hc", "latest", images["hc"])
        yield reg
    finally:
        reg.stop()


@pytest.fixture(scope="session")
def auth_registry(images) -> Iterator[Registry]:
    _need_root()
    reg = Registry("127.0.0.1", users={AUTH_USER: AUTH_PASSWORD})
    reg.start()
    try:
        push_image(reg.url, "private/busybox", "v1", images["busybox"], auth=(AUTH_USER, AUTH_PASSWORD))
        yield reg
    finally:
        reg.stop()


def _host_arch() -> str:
    from shoal.agent.engine.images import host_arch

    return host_arch()[0]


def _new_root(tag: str) -> Path:
    return Path(tempfile.mkdtemp(prefix=f"shoal-{PREFIX}-{tag}-", dir="/var/tmp"))


async def _remove_all(engine) -> None:
    for c in await engine.list():
        try:
            await engine.remove(c.id)
        except Exception:  # keep cleaning the others
            pass
    await engine.close()


def _cleanup_root(root: Path) -> None:
    from shoal.agent.engine import Engine

    run(Engine(root).destroy())  # containers, leftover mounts (a failing test), parent cgroup
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def shared_root(registry) -> Iterator[Path]:
    from shoal.agent.engine import Engine

    root = _new_root("shared")
    try:
        run(Engine(root, registry_mirrors=[registry.url]).pull("busybox"))
        yield root
    finally:
        _cleanup_root(root)


@pytest.fixture
def engine(shared_root, registry):
    from shoal.agent.engine import Engine

    e = Engine(shared_root, registry_mirrors=[registry.url])
    try:
        yield e
    finally:
        run(_remove_all(e))


@pytest.fixture
def fresh_engine(registry):
    from shoal.agent.engine import Engine

    root = _new_root("fresh")
    try:
        yield Engine(root, registry_mirrors=[registry.url])
    finally:
        _cleanup_root(root)


@pytest.fixture(scope="session")
def token_registry(images):
    """A registry with bearer-token auth (Docker Hub's flow) holding ``private/busybox:v1``; yields
    (registry, token server). Seeded through a no-auth instance on the same storage."""
    _need_root()
    from .token_server import TokenServer

    work = Path(tempfile.mkdtemp(prefix="shoal-token-"))
    ts = TokenServer({AUTH_USER: AUTH_PASSWORD}, work)
    ts.start()
    try:
        with Registry("127.0.0.1", storage=work / "reg") as seeder:
            push_image(seeder.url, "private/busybox", "v1", images["busybox"])
        reg = Registry("127.0.0.1", storage=work / "reg", token_auth=ts.registry_config())
        reg.start()
        try:
            yield reg, ts
        finally:
            reg.stop()
    finally:
        ts.stop()
        shutil.rmtree(work, ignore_errors=True)
