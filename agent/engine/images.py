"""Content-addressed image store: pull over the OCI distribution protocol, load tarballs, remove, GC.

Layout under ``ROOT/images``::

    blobs/sha256/<hex>        manifests and image configs, verified against their digest
    layers/<hex>/             one unpacked layer per diff id (overlayfs lower dir), unpacked once
    images/<hex>.json         one record per image id (= config digest): layers, config, digests
    refs.json                 {"docker.io/library/busybox:latest": "sha256:…", "…@sha256:…": "sha256:…"}
    tmp/                      layers being unpacked (renamed into layers/ when verified)

All methods here are blocking; the engine calls them through ``asyncio.to_thread``.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import ipaddress
import json
import logging
import os
import platform
import posixpath
import shutil
import tarfile
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

from shoal.agent.engine import reference
from shoal.agent.engine.distribution import (
    INDEX_TYPES,
    MANIFEST_TYPES,
    MT_DOCKER_SCHEMA1,
    RegistryAuth,
    RegistryClient,
)
from shoal.agent.engine.errors import (
    AuthenticationFailed,
    DigestMismatch,
    EngineError,
    ImageInUse,
    ImageNotFound,
    InvalidImage,
    InvalidReference,
    RegistryError,
    RegistryUnreachable,
    UnsupportedPlatform,
)
from shoal.agent.engine.layers import unpack_into
from shoal.agent.engine.reference import Reference

log = logging.getLogger(__name__)
DOCKER_HUB_ENDPOINT = "https://registry-1.docker.io"
GZIP_LAYERS = {
    "application/vnd.oci.image.layer.v1.tar+gzip",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip",
    "application/vnd.docker.image.rootfs.diff.tar.gzip",
    "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip",
}
TAR_LAYERS = {
    "application/vnd.oci.image.layer.v1.tar",
    "application/vnd.oci.image.layer.nondistributable.v1.tar",
    "application/vnd.docker.image.rootfs.diff.tar",
}


def host_arch() -> tuple[str, str]:
    """(GOARCH, variant) of this machine, as used in manifest lists."""
    m = platform.machine()
    return {
        "x86_64": ("amd64", ""),
        "amd64": ("amd64", ""),
        "aarch64": ("arm64", "v8"),
        "arm64": ("arm64", "v8"),
        "armv7l": ("arm", "v7"),
        "armv6l": ("arm", "v6"),
        "i686": ("386", ""),
        "i386": ("386", ""),
        "ppc64le": ("ppc64le", ""),
        "s390x": ("s390x", ""),
        "riscv64": ("riscv64", ""),
    }.get(m, (m, ""))


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _hex(digest: str) -> str:
    algo, _, h = digest.partition(":")
    if algo != "sha256" or len(h) != 64 or any(c not in "0123456789abcdef" for c in h):
        raise InvalidImage(f"unsupported or malformed digest {digest!r} (want sha256:<64 hex>)")
    return h


@dataclass
class Image:
    id: str  # image id = digest of its config blob
    layers: list[str]  # diff ids, bottom layer first
    config: dict  # the image config's "config" section (Env, Cmd, ...)
    architecture: str = ""
    os: str = "linux"
    created: str = ""
    size: int = 0  # bytes of the layers as shipped
    manifest_digest: str = ""  # "" for images loaded from a docker-archive
    refs: list[str] = field(default_factory=list)  # "docker.io/library/busybox:latest"
    repo_digests: list[str] = field(default_factory=list)  # "docker.io/library/busybox@sha256:…"


def choose_platform(doc: dict, display: str) -> dict:
    arch, variant = host_arch()
    cands = [
        m
        for m in doc.get("manifests", [])
        if (m.get("platform") or {}).get("os", "linux") == "linux"
        and (m.get("platform") or {}).get("architecture") == arch
    ]
    if not cands:
        have = sorted(
            {
                f"{(m.get('platform') or {}).get('os')}/{(m.get('platform') or {}).get('architecture')}"
                for m in doc.get("manifests", [])
            }
        )
        raise UnsupportedPlatform(f"image {display} has no linux/{arch} variant (it has {', '.join(have)})")
    if variant:
        exact = [m for m in cands if (m.get("platform") or {}).get("variant") == variant]
        if exact:
            return exact[0]
    return cands[0]


class ImageStore:
    def __init__(
        self, root: Path, *, registry_mirrors: Sequence[str] = (), insecure_registries: Sequence[str] = ()
    ) -> None:
        self.root = Path(root) / "images"
        self.blobs = self.root / "blobs" / "sha256"
        self.layers = self.root / "layers"
        self.records = self.root / "images"
        self.tmp = self.root / "tmp"
        for d in (self.blobs, self.layers, self.records, self.tmp):
            d.mkdir(parents=True, exist_ok=True)
        for p in self.tmp.iterdir():  # leftovers of a crashed unpack (not one running right now)
            with contextlib.suppress(OSError):
                if time.time() - p.stat().st_mtime > 600:
                    shutil.rmtree(p, ignore_errors=True)
        self.mirrors = [m.rstrip("/") for m in registry_mirrors]
        self.insecure = list(insecure_registries)
        self._meta = threading.RLock()
        self._layer_locks: dict[str, threading.Lock] = {}
        self._scheme: dict[str, str] = {}
        self._pinned: dict[str, int] = {}

    # -- metadata ------------------------------------------------------------------------------
    def _refs(self) -> dict[str, str]:
        try:
            return json.loads((self.root / "refs.json").read_text())
        except FileNotFoundError:
            return {}

    def _write_refs(self, refs: dict[str, str]) -> None:
        _atomic_write(self.root / "refs.json", json.dumps(refs, indent=1, sort_keys=True).encode())

    def _record(self, image_id: str) -> Image | None:
        try:
            doc = json.loads((self.records / (_hex(image_id) + ".json")).read_text())
        except (FileNotFoundError, InvalidImage):
            return None
        return Image(**doc)

    def _with_refs(self, img: Image, refs: dict[str, str]) -> Image:
        img.refs = sorted(r for r, i in refs.items() if i == img.id and "@" not in r)
        img.repo_digests = sorted(r for r, i in refs.items() if i == img.id and "@" in r)
        return img

    def get(self, name: str) -> Image | None:
        """An image by reference (``busybox``, ``reg/x:tag``, ``x@sha256:…``) or id (``sha256:…``)."""
        with self._meta:
            refs = self._refs()
            if name.startswith("sha256:"):
                img = self._record(name)
            else:
                try:
                    ref = reference.parse(name)
                except InvalidReference:
                    return None
                iid = refs.get(str(ref))
                if iid is None and ref.digest and ref.tag:
                    iid = refs.get(str(ref.with_tag(None)))
                img = self._record(iid) if iid else None
            return self._with_refs(img, refs) if img else None

    def list(self) -> list[Image]:
        with self._meta:
            refs = self._refs()
            out = []
            for p in sorted(self.records.glob("*.json")):
                img = self._record("sha256:" + p.stem)
                if img:
                    out.append(self._with_refs(img, refs))
            return out

    def layer_dirs(self, img: Image) -> list[str]:
        """The image's layer directories, top layer first (the order of overlayfs' lowerdir)."""
        dirs = [str(self.layers / _hex(d)) for d in reversed(img.layers)]
        for d in dirs:
            if not os.path.isdir(d):
                raise ImageNotFound(
                    f"layer {os.path.basename(d)[:12]} of image {img.id[7:19]} is missing from "
                    "the store; pull the image again"
                )
        return dirs

    def _save(self, img: Image, names: list[str], blobs: dict[str, bytes]) -> Image:
        for digest, data in blobs.items():
            p = self.blobs / _hex(digest)
            if not p.exists():
                _atomic_write(p, data)
        with self._meta:
            rec = asdict(img)
            rec["refs"], rec["repo_digests"] = [], []
            _atomic_write(self.records / (_hex(img.id) + ".json"), json.dumps(rec).encode())
            refs = self._refs()
            for n in names:
                refs[n] = img.id
            self._write_refs(refs)
            return self._with_refs(img, refs)

    @contextlib.contextmanager
    def _pin(self, diff_ids: list[str]) -> Iterator[None]:
        """Keeps GC away from layers a pull or load is assembling (not yet in any image record)."""
        with self._meta:
            for d in diff_ids:
                self._pinned[d] = self._pinned.get(d, 0) + 1
        try:
            yield
        finally:
            with self._meta:
                for d in diff_ids:
                    self._pinned[d] -= 1
                    if not self._pinned[d]:
                        del self._pinned[d]

    def _has_layer(self, diff_id: str) -> bool:
        return (self.layers / _hex(diff_id)).is_dir()

    def _layer_lock(self, diff_id: str) -> threading.Lock:
        with self._meta:
            return self._layer_locks.setdefault(diff_id, threading.Lock())

    # -- pull --------------------------------------------------------------------------------
    def _is_insecure(self, domain: str) -> bool:
        host = domain.rsplit(":", 1)[0] if not domain.endswith("]") else domain
        host = host.strip("[]")
        if domain in self.insecure or host in self.insecure or host == "localhost":
            return True
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            return False
        if ip.is_loopback:
            return True  # Docker's default insecure range 127.0.0.0/8
        for entry in self.insecure:
            try:
                if ip in ipaddress.ip_network(entry, strict=False):
                    return True
            except ValueError:
                continue
        return False

    def _endpoints(self, ref: Reference) -> list[tuple[str, bool, bool]]:
        """(base URL, verify TLS, is mirror) in the order to try."""
        if ref.is_docker_hub:
            return [(m, True, True) for m in self.mirrors] + [(DOCKER_HUB_ENDPOINT, True, False)]
        if self._is_insecure(ref.domain):
            order = ["https", "http"]
            if self._scheme.get(ref.domain) == "http":
                order.reverse()
            return [(f"{s}://{ref.domain}", False, False) for s in order]
        return [(f"https://{ref.domain}", True, False)]

    def pull(self, ref: Reference, auth: RegistryAuth | None = None) -> Image:
        display = ref.familiar
        errors: list[EngineError] = []
        for url, verify, is_mirror in self._endpoints(ref):
            client = RegistryClient(url, ref.domain if not is_mirror else url, auth, verify_tls=verify)
            try:
                img = self._pull_from(client, ref, display)
            except (RegistryUnreachable, RegistryError) as e:
                log.info("pull endpoint failed ref=%s endpoint=%s err=%s", ref, url, e)
                errors.append(e)
                continue
            except (ImageNotFound, AuthenticationFailed) as e:
                if is_mirror:
                    log.info("pull mirror miss ref=%s mirror=%s err=%s", ref, url, e)
                    errors.append(e)
                    continue
                raise
            if not ref.is_docker_hub:
                self._scheme[ref.domain] = url.split(":", 1)[0]
            log.info("pulled image ref=%s id=%s endpoint=%s", ref, img.id[:19], url)
            return img
        mirror_said = [e for e in errors if isinstance(e, ImageNotFound | AuthenticationFailed)]
        if mirror_said and isinstance(errors[-1], RegistryUnreachable):
            raise type(mirror_said[0])(f"{mirror_said[0]}; {errors[-1]}")
        raise errors[-1]

    def _pull_from(self, client: RegistryClient, ref: Reference, display: str) -> Image:
        repo = ref.path
        body, mt, hdr = client.get_manifest(repo, ref.digest or ref.tag or "latest", display)
        digest = top_digest = sha256(body)
        if ref.digest and digest != ref.digest:
            raise DigestMismatch(f"manifest of {display} has digest {digest}, not the {ref.digest} asked for")
        if hdr and hdr.startswith("sha256:") and hdr != digest:
            raise DigestMismatch(f"manifest of {display} has digest {digest} but the registry said {hdr}")
        doc = _json(body, f"manifest of {display}")
        mt = mt if mt in INDEX_TYPES + MANIFEST_TYPES else doc.get("mediaType") or mt
        if mt in INDEX_TYPES or (mt not in MANIFEST_TYPES and "manifests" in doc):
            chosen = choose_platform(doc, display)
            body, mt, _ = client.get_manifest(repo, chosen["digest"], display)
            digest = sha256(body)
            if digest != chosen["digest"]:
                raise DigestMismatch(
                    f"platform manifest of {display} has digest {digest}, "
                    f"the manifest list says {chosen['digest']}"
                )
            doc = _json(body, f"manifest of {display}")
        if mt == MT_DOCKER_SCHEMA1 or doc.get("schemaVersion") == 1:
            raise RegistryError(
                f"image {display} uses Docker schema 1 manifests, which are not supported; "
                "push it again with a current Docker"
            )
        cfg_desc = doc.get("config") or {}
        names = [str(ref.with_tag(None).with_digest(top_digest))]
        if ref.tag and not ref.digest:
            names.append(str(ref.with_digest(None)))
        have = self._record(cfg_desc["digest"]) if cfg_desc.get("digest", "").startswith("sha256:") else None
        if (
            have is not None
            and have.manifest_digest == digest
            and all(self._has_layer(x) for x in have.layers)
        ):
            return self._save(have, names, {})  # up to date: only the names may be new
        cfg_bytes = client.get_blob(repo, cfg_desc.get("digest", ""), display)
        if sha256(cfg_bytes) != cfg_desc.get("digest"):
            raise DigestMismatch(
                f"config of {display} has digest {sha256(cfg_bytes)}, "
                f"the manifest says {cfg_desc.get('digest')}"
            )
        cfg = _json(cfg_bytes, f"config of {display}")
        diff_ids = (cfg.get("rootfs") or {}).get("diff_ids") or []
        layers = doc.get("layers") or []
        if len(diff_ids) != len(layers):
            raise InvalidImage(
                f"image {display} has {len(layers)} layers but its config lists {len(diff_ids)} diff ids"
            )

        def fetch(desc: dict, diff_id: str) -> None:
            mt_l = desc.get("mediaType", "")
            if mt_l in GZIP_LAYERS:
                comp = "gzip"
            elif mt_l in TAR_LAYERS:
                comp = "none"
            else:
                raise InvalidImage(
                    f"image {display} has a layer of unsupported media type {mt_l!r} "
                    "(gzip and plain tar are supported)"
                )
            with self._layer_lock(diff_id):
                if self._has_layer(diff_id):
                    return
                _hex(desc["digest"])
                try:
                    unpack_into(
                        str(self.layers / _hex(diff_id)),
                        str(self.tmp),
                        lambda: client.open_blob(repo, desc["digest"], display),  # type: ignore
                        compression=comp,
                        expect_digest=desc["digest"],
                        expect_diff_id=diff_id,
                        size=desc.get("size"),
                    )
                except (http.client.HTTPException, ConnectionError, TimeoutError) as e:
                    raise RegistryUnreachable(
                        f"registry {client.host} broke off while sending layer "
                        f"{desc['digest'][:19]} of {display}: {e or type(e).__name__}"
                    ) from e
                log.info("layer unpacked diff_id=%s ref=%s", diff_id[:19], display)

        with self._pin(diff_ids):
            todo = [(d, i) for d, i in zip(layers, diff_ids, strict=True) if not self._has_layer(i)]
            if len(todo) <= 1:
                for d, i in todo:
                    fetch(d, i)
            else:
                with ThreadPoolExecutor(max_workers=3, thread_name_prefix="layer") as ex:
                    for f in [ex.submit(fetch, d, i) for d, i in todo]:
                        f.result()
            img = _image(cfg_bytes, cfg, diff_ids, layers, digest)
            return self._save(img, names, {digest: body, img.id: cfg_bytes})

    # -- load --------------------------------------------------------------------------------
    def load(self, tarball: Path) -> list[Image]:
        try:
            tf = tarfile.open(tarball, "r:*")
        except (OSError, tarfile.TarError) as e:
            raise InvalidImage(f"cannot read image tarball {tarball}: {e}") from e
        with tf:
            members = {posixpath.normpath(m.name).lstrip("/"): m for m in tf.getmembers() if m.isfile()}

            def read(name: str, limit: int = 64 << 20) -> bytes:
                m = members.get(name)
                if m is None:
                    raise InvalidImage(f"image tarball {tarball.name} lacks {name}")
                if m.size > limit:
                    raise InvalidImage(f"{name} in image tarball {tarball.name} is too large")
                f = tf.extractfile(m)
                assert f is not None
                return f.read()

            if "index.json" in members:
                return self._load_oci(tf, members, read, tarball.name)
            if "manifest.json" in members:
                return self._load_docker(tf, members, read, tarball.name)
            raise InvalidImage(
                f"{tarball.name} is neither an OCI layout nor a docker-archive tarball "
                "(no index.json or manifest.json)"
            )

    def _load_oci(self, tf: tarfile.TarFile, members: dict, read, tname: str) -> list[Image]:
        def blob(digest: str) -> bytes:
            data = read("blobs/sha256/" + _hex(digest))
            if sha256(data) != digest:
                raise DigestMismatch(f"blob {digest} in {tname} has digest {sha256(data)}")
            return data

        index = _json(read("index.json"), f"index.json of {tname}")
        out = []
        for desc in index.get("manifests", []):
            ann = desc.get("annotations") or {}
            names = []
            for n in (ann.get("io.containerd.image.name"), ann.get("org.opencontainers.image.ref.name")):
                if n and ("/" in n or ":" in n):
                    try:
                        names.append(str(reference.parse(n)))
                        break
                    except InvalidReference:
                        pass
            body = blob(desc["digest"])
            doc = _json(body, f"manifest {desc['digest']} in {tname}")
            mdigest = desc["digest"]
            if desc.get("mediaType") in INDEX_TYPES or "manifests" in doc:
                chosen = choose_platform(doc, names[0] if names else tname)
                mdigest = chosen["digest"]
                body = blob(mdigest)
                doc = _json(body, f"manifest {mdigest} in {tname}")
            cfg_bytes = blob(doc["config"]["digest"])
            cfg = _json(cfg_bytes, f"config in {tname}")
            diff_ids = (cfg.get("rootfs") or {}).get("diff_ids") or []
            layers = doc.get("layers") or []
            if len(diff_ids) != len(layers):
                raise InvalidImage(f"image in {tname} has {len(layers)} layers but {len(diff_ids)} diff ids")
            with self._pin(list(diff_ids)):
                for ld, diff_id in zip(layers, diff_ids, strict=True):
                    with self._layer_lock(diff_id):
                        if self._has_layer(diff_id):
                            continue
                        m = members.get("blobs/sha256/" + _hex(ld["digest"]))
                        if m is None:
                            raise InvalidImage(f"{tname} lacks layer blob {ld['digest']}")
                        unpack_into(
                            str(self.layers / _hex(diff_id)),
                            str(self.tmp),
                            lambda m=m: tf.extractfile(m),
                            compression="auto",
                            expect_digest=ld["digest"],
                            expect_diff_id=diff_id,
                            size=m.size,
                        )
                img = _image(cfg_bytes, cfg, diff_ids, layers, mdigest)
                out.append(self._save(img, names, {mdigest: body, img.id: cfg_bytes}))
            log.info("loaded image id=%s names=%s from=%s", img.id[:19], names, tname)
        return out

    def _load_docker(self, tf: tarfile.TarFile, members: dict, read, tname: str) -> list[Image]:
        manifest = _json(read("manifest.json"), f"manifest.json of {tname}")
        if not isinstance(manifest, list):
            raise InvalidImage(f"manifest.json of {tname} is not a list")
        out = []
        for entry in manifest:
            cfg_name = posixpath.normpath(entry.get("Config", "")).lstrip("/")
            cfg_bytes = read(cfg_name)
            stem = posixpath.basename(cfg_name).removesuffix(".json")
            if len(stem) == 64 and sha256(cfg_bytes) != "sha256:" + stem:
                raise DigestMismatch(f"config {cfg_name} in {tname} has digest {sha256(cfg_bytes)}")
            cfg = _json(cfg_bytes, f"config in {tname}")
            diff_ids = (cfg.get("rootfs") or {}).get("diff_ids") or []
            layer_names = entry.get("Layers") or []
            if len(diff_ids) != len(layer_names):
                raise InvalidImage(
                    f"image in {tname} has {len(layer_names)} layers but {len(diff_ids)} diff ids"
                )
            size = 0
            with self._pin(list(diff_ids)):
                for ln, diff_id in zip(layer_names, diff_ids, strict=True):
                    m = members.get(posixpath.normpath(ln).lstrip("/"))
                    if m is None:
                        raise InvalidImage(f"{tname} lacks layer {ln}")
                    size += m.size
                    with self._layer_lock(diff_id):
                        if self._has_layer(diff_id):
                            continue
                        unpack_into(
                            str(self.layers / _hex(diff_id)),
                            str(self.tmp),
                            lambda m=m: tf.extractfile(m),
                            compression="auto",
                            expect_digest=None,
                            expect_diff_id=diff_id,
                            size=m.size,
                        )
                names = []
                for t in entry.get("RepoTags") or []:
                    try:
                        names.append(str(reference.parse(t)))
                    except InvalidReference:
                        log.warning("ignoring bad tag %r in %s", t, tname)
                img = Image(
                    id=sha256(cfg_bytes),
                    layers=list(diff_ids),
                    config=cfg.get("config") or {},
                    architecture=cfg.get("architecture", ""),
                    os=cfg.get("os", "linux"),
                    created=cfg.get("created", ""),
                    size=size,
                )
                out.append(self._save(img, names, {img.id: cfg_bytes}))
            log.info("loaded image id=%s names=%s from=%s", img.id[:19], names, tname)
        return out

    # -- removal and GC -----------------------------------------------------------------------
    def remove(self, name: str, in_use: dict[str, str], *, force: bool = False) -> list[str]:
        """Removes a reference, or an image by id; deletes the image once it has no names left.

        ``in_use`` maps image id → a container using it. Returns the ids of deleted images.
        """
        with self._meta:
            refs = self._refs()
            deleted = []
            if name.startswith("sha256:"):
                img = self._record(name)
                if img is None:
                    raise ImageNotFound(f"no such image {name}")
                if img.id in in_use:
                    raise ImageInUse(
                        f"image {name[:19]} is used by container {in_use[img.id]}; remove the container first"
                    )
                refs = {r: i for r, i in refs.items() if i != img.id}
                self._write_refs(refs)
                self._delete(img.id)
                deleted.append(img.id)
            else:
                try:
                    key = str(reference.parse(name))
                except InvalidReference as e:
                    raise ImageNotFound(f"no such image {name}") from e
                iid = refs.get(key)
                if iid is None:
                    raise ImageNotFound(f"no such image {name}")
                if iid in in_use and not force:
                    raise ImageInUse(
                        f"image {name} is used by container {in_use[iid]}; remove the container "
                        "first (or force to untag only)"
                    )
                del refs[key]
                if not any(i == iid for r, i in refs.items() if "@" not in r):
                    refs = {r: i for r, i in refs.items() if i != iid}
                    if iid not in in_use:
                        self._delete(iid)
                        deleted.append(iid)
                self._write_refs(refs)
            self._gc()
            return deleted

    def prune(self, in_use: dict[str, str]) -> list[str]:
        """Deletes every image no container uses (``docker image prune -a``); returns their ids."""
        with self._meta:
            ids = [img.id for img in self.list() if img.id not in in_use]
            refs = {r: i for r, i in self._refs().items() if i not in ids}
            self._write_refs(refs)
            for iid in ids:
                self._delete(iid)
            self._gc()
            return ids

    def _delete(self, image_id: str) -> None:
        (self.records / (_hex(image_id) + ".json")).unlink(missing_ok=True)
        log.info("image deleted id=%s", image_id[:19])

    def _gc(self) -> None:
        keep_layers, keep_blobs = set(), set()
        for img in self.list():
            keep_layers.update(_hex(d) for d in img.layers)
            keep_blobs.add(_hex(img.id))
            if img.manifest_digest:
                keep_blobs.add(_hex(img.manifest_digest))
        for p in self.layers.iterdir():
            if p.name not in keep_layers and "sha256:" + p.name not in self._pinned:
                lock = self._layer_lock("sha256:" + p.name)
                if lock.acquire(blocking=False):
                    try:
                        shutil.rmtree(p, ignore_errors=True)
                        log.info("layer deleted diff_id=sha256:%s", p.name[:12])
                    finally:
                        lock.release()
        for p in self.blobs.iterdir():
            if p.name not in keep_blobs:
                p.unlink(missing_ok=True)


def _json(data: bytes, what: str):
    try:
        return json.loads(data)
    except ValueError as e:
        raise InvalidImage(f"{what} is not valid JSON") from e


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _image(cfg_bytes: bytes, cfg: dict, diff_ids: list[str], layers: list[dict], manifest_digest: str) -> Image:
    """The Image record of a pulled or loaded image: its config blob, layers and manifest digest."""
    return Image(
        id=sha256(cfg_bytes),
        layers=list(diff_ids),
        config=cfg.get("config") or {},
        architecture=cfg.get("architecture", ""),
        os=cfg.get("os", "linux"),
        created=cfg.get("created", ""),
        size=sum(int(d.get("size", 0)) for d in layers),
        manifest_digest=manifest_digest,
    )
