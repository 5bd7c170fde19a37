"""Test images built from host binaries, written as OCI images without any daemon.

The busybox image holds Debian's static ``/bin/busybox`` and one absolute symlink per applet
(``busybox --install -s`` style, paths from ``busybox --list-full``), an ``/etc/passwd`` with root,
daemon, nobody and ``app`` (uid 1000), ``/etc/group`` and the usual empty directories.

    img = busybox_image()                         # BuiltImage, all blobs in memory (~1 MB)
    img = busybox_image(config={"Healthcheck": {...}}, extra_layers=[tar_layer([...])])
    write_oci_layout(img, Path("dir"), tag="latest")
    write_oci_tar(img, Path("x.tar"), name="busybox:latest")
    write_docker_archive(img, Path("y.tar"), repo_tag="busybox:latest")
    shoal.lab.registry.push_image(registry.url, "library/busybox", "latest", img)

Everything is deterministic (mtime 0, sorted entries), so the same host binary gives the same
digests on every run.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import platform
import subprocess
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

BUSYBOX = Path("/bin/busybox")
MT_OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MT_OCI_INDEX = "application/vnd.oci.image.index.v1+json"
MT_OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
MT_OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
MT_DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
MT_DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
MT_DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
MT_DOCKER_LAYER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"

PASSWD = (
    "root:x:0:0:root:/root:/bin/sh\n"
    "daemon:x:1:1:daemon:/usr/sbin:/bin/false\n"
    "app:x:1000:1000:app:/home/app:/bin/sh\n"
    "nobody:x:65534:65534:nobody:/nonexistent:/bin/false\n"
)
GROUP = "root:x:0:\ndaemon:x:1:\nwheel:x:10:app\napp:x:1000:\nnogroup:x:65534:\n"


def go_arch() -> str:
    m = platform.machine()
    return {
        "x86_64": "amd64",
        "aarch64": "arm64",
        "armv7l": "arm",
        "i686": "386",
        "ppc64le": "ppc64le",
        "s390x": "s390x",
        "riscv64": "riscv64",
    }.get(m, m)


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@dataclass
class Entry:
    """One member of a layer tar: kind is file, dir, symlink, hardlink, or whiteout helpers."""

    path: str
    kind: str = "file"  # file | dir | symlink | hardlink
    data: bytes = b""
    target: str = ""  # symlink/hardlink target
    mode: int = 0o644
    uid: int = 0
    gid: int = 0


def whiteout(path: str) -> Entry:
    """A whiteout entry deleting ``path`` from lower layers."""
    d, _, base = path.strip("/").rpartition("/")
    return Entry(f"{d}/.wh.{base}" if d else f".wh.{base}")


def opaque(dir_path: str) -> Entry:
    """Marks ``dir_path`` opaque: lower layers' contents of it are hidden."""
    return Entry(dir_path.strip("/") + "/.wh..wh..opq")


def tar_bytes(entries: list[Entry]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for e in entries:
            ti = tarfile.TarInfo(e.path.strip("/") or ".")
            ti.mtime = 0
            ti.uid, ti.gid = e.uid, e.gid
            ti.mode = e.mode
            if e.kind == "dir":
                ti.type = tarfile.DIRTYPE
                tf.addfile(ti)
            elif e.kind == "symlink":
                ti.type = tarfile.SYMTYPE
                ti.linkname = e.target
                ti.mode = 0o777
                tf.addfile(ti)
            elif e.kind == "hardlink":
                ti.type = tarfile.LNKTYPE
                ti.linkname = e.target.strip("/")
                tf.addfile(ti)
            else:
                ti.size = len(e.data)
                tf.addfile(ti, io.BytesIO(e.data))
    return buf.getvalue()


def gzip_bytes(data: bytes) -> bytes:
    return gzip.compress(data, compresslevel=6, mtime=0)


@dataclass
class Layer:
    tar: bytes  # uncompressed
    gz: bytes  # gzip-compressed

    @property
    def diff_id(self) -> str:
        return sha256(self.tar)

    @property
    def digest(self) -> str:
        return sha256(self.gz)


def tar_layer(entries: list[Entry]) -> Layer:
    raw = tar_bytes(entries)
    return Layer(raw, gzip_bytes(raw))


def busybox_entries(busybox: Path = BUSYBOX) -> list[Entry]:
    out = subprocess.run([str(busybox), "--list-full"], check=True, capture_output=True, text=True).stdout
    dirs = {
        "bin",
        "sbin",
        "usr",
        "usr/bin",
        "usr/sbin",
        "etc",
        "tmp",
        "root",
        "home",
        "home/app",
        "proc",
        "sys",
        "dev",
        "run",
        "var",
        "var/log",
        "var/tmp",
    }
    links: dict[str, str] = {}
    for line in out.split():
        p = line.strip("/")
        if not p or p == "bin/busybox":
            continue
        dirs.add(os.path.dirname(p))
        links[p] = "/bin/busybox"
    entries: list[Entry] = []
    for d in sorted(x for x in dirs if x):
        mode = 0o1777 if d in ("tmp", "var/tmp") else (0o700 if d == "root" else 0o755)
        uid = 1000 if d == "home/app" else 0
        entries.append(Entry(d, "dir", mode=mode, uid=uid, gid=uid))
    entries.append(Entry("bin/busybox", data=busybox.read_bytes(), mode=0o755))
    for p in sorted(links):
        entries.append(Entry(p, "symlink", target=links[p]))
    entries += [
        Entry("etc/passwd", data=PASSWD.encode()),
        Entry("etc/group", data=GROUP.encode()),
        Entry("etc/hostname", data=b"busybox\n"),
        Entry("etc/hosts", data=b"127.0.0.1 localhost\n"),
        Entry("etc/resolv.conf", data=b""),
    ]
    return entries


@dataclass
class BuiltImage:
    layers: list[Layer]
    config: bytes
    manifest: bytes
    media_type: str = MT_OCI_MANIFEST
    blobs: dict[str, bytes] = field(default_factory=dict)  # digest -> bytes (config + gz layers)

    @property
    def config_digest(self) -> str:
        return sha256(self.config)

    @property
    def manifest_digest(self) -> str:
        return sha256(self.manifest)

    @property
    def id(self) -> str:
        return self.config_digest


def build_image(
    layers: list[Layer],
    config: dict | None = None,
    *,
    arch: str | None = None,
    docker_media_types: bool = False,
) -> BuiltImage:
    """An image of ``layers`` (bottom first) with an image config whose ``config`` section is ``config``."""
    cfg = {
        "architecture": arch or go_arch(),
        "os": "linux",
        "created": "1970-01-01T00:00:00Z",
        "config": {
            "Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
            "Cmd": ["sh"],
            **(config or {}),
        },
        "rootfs": {"type": "layers", "diff_ids": [ly.diff_id for ly in layers]},
        "history": [{"created": "1970-01-01T00:00:00Z", "created_by": "shoal.lab.images"} for _ in layers],
    }
    config_bytes = json.dumps(cfg, sort_keys=True, separators=(",", ":")).encode()
    mt_manifest = MT_DOCKER_MANIFEST if docker_media_types else MT_OCI_MANIFEST
    mt_config = MT_DOCKER_CONFIG if docker_media_types else MT_OCI_CONFIG
    mt_layer = MT_DOCKER_LAYER_GZIP if docker_media_types else MT_OCI_LAYER_GZIP
    manifest = {
        "schemaVersion": 2,
        "mediaType": mt_manifest,
        "config": {"mediaType": mt_config, "digest": sha256(config_bytes), "size": len(config_bytes)},
        "layers": [{"mediaType": mt_layer, "digest": ly.digest, "size": len(ly.gz)} for ly in layers],
    }
    manifest_bytes = json.dumps(manifest, sort_keys=True, indent=2).encode()
    blobs = {sha256(config_bytes): config_bytes}
    for ly in layers:
        blobs[ly.digest] = ly.gz
    return BuiltImage(layers, config_bytes, manifest_bytes, mt_manifest, blobs)


_BUSYBOX_LAYER: Layer | None = None


def busybox_layer() -> Layer:
    global _BUSYBOX_LAYER
    if _BUSYBOX_LAYER is None:
        _BUSYBOX_LAYER = tar_layer(busybox_entries())
    return _BUSYBOX_LAYER


def busybox_image(
    config: dict | None = None,
    extra_layers: list[Layer] | tuple = (),
    *,
    arch: str | None = None,
    docker_media_types: bool = False,
) -> BuiltImage:
    return build_image(
        [busybox_layer(), *extra_layers], config, arch=arch, docker_media_types=docker_media_types
    )


def index_bytes(entries: list[tuple[BuiltImage, str, str]], *, docker_media_types: bool = False) -> bytes:
    """A manifest list / OCI index of (image, os, architecture) entries."""
    doc = {
        "schemaVersion": 2,
        "mediaType": MT_DOCKER_LIST if docker_media_types else MT_OCI_INDEX,
        "manifests": [
            {
                "mediaType": img.media_type,
                "digest": img.manifest_digest,
                "size": len(img.manifest),
                "platform": {"os": os_, "architecture": arch},
            }
            for img, os_, arch in entries
        ],
    }
    return json.dumps(doc, sort_keys=True, indent=2).encode()


def write_oci_layout(img: BuiltImage, layout: Path, tag: str = "latest", name: str | None = None) -> None:
    """An OCI image layout directory (oci-layout, index.json, blobs/sha256/...)."""
    blobdir = layout / "blobs" / "sha256"
    blobdir.mkdir(parents=True, exist_ok=True)
    for digest, data in {**img.blobs, img.manifest_digest: img.manifest}.items():
        (blobdir / digest.split(":", 1)[1]).write_bytes(data)
    (layout / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')
    ann = {"org.opencontainers.image.ref.name": tag}
    if name:
        ann["io.containerd.image.name"] = name
    index = {
        "schemaVersion": 2,
        "mediaType": MT_OCI_INDEX,
        "manifests": [
            {
                "mediaType": img.media_type,
                "digest": img.manifest_digest,
                "size": len(img.manifest),
                "annotations": ann,
            }
        ],
    }
    (layout / "index.json").write_text(json.dumps(index))


def _add(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    ti = tarfile.TarInfo(name)
    ti.size, ti.mtime, ti.mode = len(data), 0, 0o644
    tf.addfile(ti, io.BytesIO(data))


def write_oci_tar(img: BuiltImage, path: Path, name: str = "busybox:latest") -> None:
    """An OCI-layout tarball (as `docker save` of Docker ≥ 25 or `skopeo copy oci-archive:`)."""
    tag = name.rsplit(":", 1)[1] if ":" in name.rsplit("/", 1)[-1] else "latest"
    index = {
        "schemaVersion": 2,
        "mediaType": MT_OCI_INDEX,
        "manifests": [
            {
                "mediaType": img.media_type,
                "digest": img.manifest_digest,
                "size": len(img.manifest),
                "annotations": {"org.opencontainers.image.ref.name": tag, "io.containerd.image.name": name},
            }
        ],
    }
    with tarfile.open(path, "w") as tf:
        _add(tf, "oci-layout", b'{"imageLayoutVersion":"1.0.0"}')
        _add(tf, "index.json", json.dumps(index).encode())
        for digest, data in sorted({**img.blobs, img.manifest_digest: img.manifest}.items()):
            _add(tf, "blobs/sha256/" + digest.split(":", 1)[1], data)


def write_docker_archive(img: BuiltImage, path: Path, repo_tag: str = "busybox:latest") -> None:
    """A docker-archive tarball (as `docker save` of Docker < 25): manifest.json, config, layer.tar files."""
    cfg_name = img.config_digest.split(":", 1)[1] + ".json"
    layer_names = [ly.diff_id.split(":", 1)[1] + "/layer.tar" for ly in img.layers]
    manifest = [{"Config": cfg_name, "RepoTags": [repo_tag], "Layers": layer_names}]
    with tarfile.open(path, "w") as tf:
        _add(tf, "manifest.json", json.dumps(manifest).encode())
        _add(tf, cfg_name, img.config)
        for ly, n in zip(img.layers, layer_names, strict=True):
            _add(tf, n, ly.tar)
