"""Pulls over the real distribution protocol from docker-registry, loads, removal and GC. Needs root
(the registry fixture is shared with the container tests)."""

from __future__ import annotations

import asyncio
import json
import os
import tarfile

import pytest

from shoal.agent.engine import (
    AuthenticationFailed,
    ContainerConfig,
    DigestMismatch,
    Engine,
    ImageInUse,
    ImageNotFound,
    RegistryAuth,
    RegistryUnreachable,
)
from shoal.lab.images import busybox_image, write_docker_archive, write_oci_tar
from shoal.lab.registry import Registry, push_image
from shoal.proto import types_pb2

from .conftest import AUTH_PASSWORD, AUTH_USER, PREFIX, run

pytestmark = pytest.mark.integration


def test_pull_through_mirror(fresh_engine, images):
    img = run(fresh_engine.pull("busybox"))
    assert img.id == images["busybox"].id
    assert img.refs == ["docker.io/library/busybox:latest"]
    assert img.repo_digests == [f"docker.io/library/busybox@{images['busybox'].manifest_digest}"]
    layer = fresh_engine.root / "images" / "layers" / img.layers[0].split(":")[1]
    assert (layer / "bin" / "busybox").is_file() and os.readlink(layer / "bin" / "sh") == "/bin/busybox"
    # by digest too
    img2 = run(fresh_engine.pull(f"busybox@{images['busybox'].manifest_digest}"))
    assert img2.id == img.id


def test_concurrent_pulls_share_one_download(fresh_engine):
    calls = []
    real = fresh_engine.images.pull

    def counting(ref, auth=None):
        calls.append(str(ref))
        return real(ref, auth)

    fresh_engine.images.pull = counting

    async def main():
        return await asyncio.gather(
            *(fresh_engine.pull("busybox:latest") for _ in range(8)),
            fresh_engine.pull("docker.io/library/busybox"),
        )

    imgs = run(main())
    assert len({i.id for i in imgs}) == 1 and calls == ["docker.io/library/busybox:latest"]


def test_pull_with_basic_auth(fresh_engine, auth_registry, images):
    ref = f"{auth_registry.host}/private/busybox:v1"
    img = run(fresh_engine.pull(ref, RegistryAuth(AUTH_USER, AUTH_PASSWORD)))
    assert img.id == images["busybox"].id and img.refs == [ref]
    with pytest.raises(AuthenticationFailed) as e:
        run(fresh_engine.pull(ref, RegistryAuth(AUTH_USER, "wrong")))
    assert AUTH_USER in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(AuthenticationFailed):
        run(fresh_engine.pull(ref))


def test_create_pulls_with_spec_registry_auth(fresh_engine, auth_registry):
    import base64

    auth = base64.b64encode(json.dumps({"username": AUTH_USER, "password": AUTH_PASSWORD}).encode()).decode()
    spec = types_pb2.ContainerSpec(
        image=f"{auth_registry.host}/private/busybox:v1",
        args=["true"],
        pull_options=types_pb2.ContainerSpec.PullOptions(registry_auth=auth),
    )
    c = f"{PREFIX}-authpull"

    async def main():
        await fresh_engine.create(ContainerConfig(c, c, spec))
        await fresh_engine.start(c)
        return await fresh_engine.wait(c)

    assert run(main()).exit_code == 0


def test_unknown_image(fresh_engine, registry):
    with pytest.raises(ImageNotFound) as e:
        run(fresh_engine.pull(f"{registry.host}/nosuch/image:1"))
    assert "nosuch/image" in str(e.value)
    with pytest.raises(ImageNotFound):  # via the docker.io mirror (Docker Hub is not reachable)
        run(fresh_engine.pull("nosuchimage"))
    with pytest.raises(ImageNotFound):
        run(fresh_engine.pull(f"{registry.host}/library/busybox:nosuchtag"))
    assert run(fresh_engine.list_images()) == []


def test_registry_stopped(fresh_engine):
    reg = Registry("127.0.0.1")
    reg.start()
    try:
        push_image(reg.url, "x", "1", busybox_image())
    finally:
        reg.stop()
    with pytest.raises(RegistryUnreachable) as e:
        run(fresh_engine.pull(f"{reg.host}/x:1"))
    assert reg.host in str(e.value) and "\n" not in str(e.value)


def test_load_docker_archive_and_oci(fresh_engine, tmp_path):
    a = busybox_image(config={"Cmd": ["echo", "docker-archive"]})
    b = busybox_image(config={"Cmd": ["echo", "oci"]})
    write_docker_archive(a, tmp_path / "a.tar", repo_tag=f"{PREFIX}/a:1")
    write_oci_tar(b, tmp_path / "b.tar", name=f"{PREFIX}/b:2")
    (ia,) = run(fresh_engine.load(tmp_path / "a.tar"))
    (ib,) = run(fresh_engine.load(tmp_path / "b.tar"))
    assert (ia.id, ia.refs) == (a.id, [f"docker.io/{PREFIX}/a:1"])
    assert (ib.id, ib.refs) == (b.id, [f"docker.io/{PREFIX}/b:2"])
    assert ia.layers == ib.layers  # one shared layer, unpacked once
    assert len(os.listdir(fresh_engine.root / "images" / "layers")) == 1

    async def main():
        await fresh_engine.create(
            ContainerConfig(f"{PREFIX}-ld", "ld", types_pb2.ContainerSpec(image=f"{PREFIX}/b:2"))
        )
        await fresh_engine.start(f"{PREFIX}-ld")
        await fresh_engine.wait(f"{PREFIX}-ld")
        return [x.line async for x in fresh_engine.logs(f"{PREFIX}-ld")]

    assert run(main()) == ["oci"]


def test_load_tampered_tarball_is_rejected(fresh_engine, tmp_path):
    img = busybox_image(config={"Cmd": ["echo", "tampered"]})
    write_oci_tar(img, tmp_path / "good.tar", name=f"{PREFIX}/t:1")
    bad = tmp_path / "bad.tar"
    with tarfile.open(tmp_path / "good.tar") as src, tarfile.open(bad, "w") as dst:
        for m in src.getmembers():
            data = src.extractfile(m).read()
            if m.name.endswith(img.config_digest.split(":")[1]):
                data = data.replace(b"tampered", b"tampere!")
            m.size = len(data)
            import io

            dst.addfile(m, io.BytesIO(data))
    with pytest.raises(DigestMismatch):
        run(fresh_engine.load(bad))
    assert run(fresh_engine.image(f"{PREFIX}/t:1")) is None


def test_remove_image_in_use_and_gc(fresh_engine):
    c = f"{PREFIX}-gc"

    async def main():
        img = await fresh_engine.pull("busybox")
        await fresh_engine.create(
            ContainerConfig(c, c, types_pb2.ContainerSpec(image="busybox", args=["true"]))
        )
        with pytest.raises(ImageInUse):
            await fresh_engine.remove_image("busybox")
        assert await fresh_engine.prune_images() == []
        await fresh_engine.remove(c)
        removed = await fresh_engine.remove_image("busybox")
        return img, removed

    img, removed = run(main())
    assert removed == [img.id]
    assert os.listdir(fresh_engine.root / "images" / "layers") == []
    assert os.listdir(fresh_engine.root / "images" / "blobs" / "sha256") == []
    assert run(fresh_engine.list_images()) == []


def test_prune(fresh_engine, registry):
    async def main():
        await fresh_engine.pull("busybox")
        await fresh_engine.pull(f"{registry.host}/hc")
        return await fresh_engine.prune_images(), await fresh_engine.list_images()

    pruned, left = run(main())
    assert len(pruned) == 2 and left == []


def test_engines_on_separate_roots_do_not_see_each_other(fresh_engine, engine):
    async def main():
        c = f"{PREFIX}-sep"
        await engine.create(ContainerConfig(c, c, types_pb2.ContainerSpec(image="busybox", args=["true"])))
        try:
            return [x.id for x in await fresh_engine.list()], [x.id for x in await engine.list()]
        finally:
            await engine.remove(c)

    other, mine = run(main())
    assert other == [] and f"{PREFIX}-sep" in mine
    assert isinstance(engine, Engine)


def test_pull_with_bearer_token(fresh_engine, token_registry, images):
    reg, ts = token_registry
    ref = f"{reg.host}/private/busybox:v1"
    img = run(fresh_engine.pull(ref, RegistryAuth(AUTH_USER, AUTH_PASSWORD)))
    assert img.id == images["busybox"].id
    assert (AUTH_USER, "repository:private/busybox:pull") in ts.requests
    with pytest.raises(AuthenticationFailed):
        run(fresh_engine.pull(ref, RegistryAuth(AUTH_USER, "wrong")))
    with pytest.raises(ImageNotFound) as e:  # anonymous token grants nothing: "pull access denied"
        run(fresh_engine.pull(ref))
    assert "pull access denied" in str(e.value)


def test_corrupted_registry_storage_is_detected(fresh_engine, tmp_path):
    """A registry serving bytes that do not match their digests (its storage corrupted on disk)."""
    from shoal.lab.images import Entry, tar_layer

    img = busybox_image(config={"Cmd": ["echo", "corrupt"]})
    small = busybox_image(
        config={"Cmd": ["echo", "small"]}, extra_layers=[tar_layer([Entry("f", data=b"1")])]
    )
    with Registry("127.0.0.1", storage=tmp_path / "reg") as reg:
        push_image(reg.url, "cfg", "1", img)
        push_image(reg.url, "layer", "1", small)
        blobs = tmp_path / "reg" / "data" / "docker" / "registry" / "v2" / "blobs" / "sha256"

        def blob(digest: str) -> os.PathLike:
            h = digest.split(":")[1]
            return blobs / h[:2] / h / "data"

        # same length, different bytes: the config no longer matches its digest
        p = blob(img.config_digest)
        p.write_bytes(p.read_bytes().replace(b"corrupt", b"CORRUPT"))
        with pytest.raises(DigestMismatch) as e:
            run(fresh_engine.pull(f"{reg.host}/cfg:1"))
        assert "config" in str(e.value)
        # a valid gzip tar, but not the layer the manifest names
        other = tar_layer([Entry("g", data=b"2")])
        blob(small.layers[1].digest).write_bytes(other.gz)
        with pytest.raises(DigestMismatch):
            run(fresh_engine.pull(f"{reg.host}/layer:1"))
    layers = os.listdir(fresh_engine.root / "images" / "layers")
    assert (
        small.layers[1].diff_id.split(":")[1] not in layers
        and os.listdir(fresh_engine.root / "images" / "tmp") == []
    )
