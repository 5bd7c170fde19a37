"""Layer tarballs → overlayfs lower directories.

Each layer is unpacked once into its own directory, keyed by its diff id (sha256 of the uncompressed
tar). Whiteouts are turned into overlayfs' own format so that stacking the directories as
``lowerdir=`` gives the image's file system:

* ``dir/.wh.name``  → a character device 0:0 at ``dir/name`` (overlayfs whiteout);
* ``dir/.wh..wh..opq`` → xattr ``trusted.overlay.opaque=y`` on ``dir`` (``user.overlay.opaque`` when
  not root, which only tests use).

Unpacking is streaming (``tarfile`` ``r|``): the compressed and the uncompressed bytes are hashed on
the way, and the result is renamed into place only when both digests match.
"""

from __future__ import annotations

import errno
import gzip
import hashlib
import os
import posixpath
import shutil
import stat
import tarfile
import zlib
from collections.abc import Callable
from typing import BinaryIO

from shoal.agent.engine.errors import DigestMismatch, InvalidImage

WH_PREFIX = ".wh."
WH_OPAQUE = ".wh..wh..opq"
CHUNK = 1 << 20


def classify(name: str) -> tuple[str, str]:
    """Classifies a tar member name: ("opaque", dir) | ("whiteout", path) | ("entry", path).

    Paths come back normalised and relative ("" is the layer root). Raises InvalidImage on a path
    escaping the layer (``..``) or on a whiteout of the root.
    """
    p = posixpath.normpath(name.lstrip("/") or ".")
    if p == ".." or p.startswith("../"):
        raise InvalidImage(f"layer entry {name!r} points outside the layer")
    if p == ".":
        p = ""
    d, base = posixpath.split(p)
    if base == WH_OPAQUE:
        return "opaque", d
    if base.startswith(WH_PREFIX):
        target = base[len(WH_PREFIX) :]
        if not target or target in (".", ".."):
            raise InvalidImage(f"layer entry {name!r} is an invalid whiteout")
        return "whiteout", posixpath.join(d, target)
    return "entry", p


class HashingReader:
    """A file-like wrapper hashing everything read through it."""

    def __init__(self, raw: BinaryIO, limit: int | None = None) -> None:
        self.raw = raw
        self.h = hashlib.sha256()
        self.n = 0
        self.limit = limit

    def read(self, n: int = -1) -> bytes:
        b = self.raw.read(n) if n is not None and n >= 0 else self.raw.read()
        self.h.update(b)
        self.n += len(b)
        if self.limit is not None and self.n > self.limit:
            raise DigestMismatch(f"layer is larger than its manifest says ({self.limit} bytes)")
        return b

    def drain(self) -> None:
        while self.read(CHUNK):
            pass

    @property
    def digest(self) -> str:
        return "sha256:" + self.h.hexdigest()


def _is_root() -> bool:
    return os.geteuid() == 0


def _remove(path: str) -> None:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if stat.S_ISDIR(st.st_mode):
        shutil.rmtree(path)
    else:
        os.unlink(path)


def _safe_parent(root_real: str, path: str) -> None:
    """Creates the parent dirs of ``path`` and checks no symlink leads them out of the layer."""
    parent = os.path.dirname(path)
    os.makedirs(parent, mode=0o755, exist_ok=True)
    real = os.path.realpath(parent)
    if real != root_real and not real.startswith(root_real + "/"):
        raise InvalidImage(f"layer entry {path[len(root_real) :]!r} goes through a symlink out of the layer")


def make_whiteout(path: str) -> None:
    _remove(path)
    os.mknod(path, stat.S_IFCHR | 0o000, os.makedev(0, 0))


def set_opaque(path: str) -> None:
    name = "trusted.overlay.opaque" if _is_root() else "user.overlay.opaque"
    os.setxattr(path, name, b"y")


def unpack_tar(tf: tarfile.TarFile, dest: str) -> None:
    """Extracts a layer tar stream into ``dest`` (an empty dir), converting whiteouts for overlayfs."""
    root = os.path.realpath(dest)
    root_user = _is_root()
    dirs: list[tuple[str, tarfile.TarInfo]] = []
    opaque: set[str] = set()
    for m in tf:
        kind, rel = classify(m.name)
        if kind == "opaque":
            opaque.add(rel)
            continue
        path = os.path.join(root, rel) if rel else root
        if kind == "whiteout":
            _safe_parent(root, path)
            make_whiteout(path)
            continue
        if rel:
            _safe_parent(root, path)
        if m.isdir():
            if not rel:
                dirs.append((root, m))
                continue
            if os.path.lexists(path) and not os.path.isdir(path) or os.path.islink(path):
                _remove(path)
            os.makedirs(path, mode=0o755, exist_ok=True)
            dirs.append((path, m))
            continue
        if not rel:
            continue
        _remove(path)
        if m.isreg():
            src = tf.extractfile(m)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
            with os.fdopen(fd, "wb") as out:
                assert src is not None
                shutil.copyfileobj(src, out, CHUNK)
        elif m.issym():
            os.symlink(m.linkname, path)
        elif m.islnk():
            _kind, target = classify(m.linkname)
            tpath = os.path.join(root, target)
            if not target or not os.path.lexists(tpath):
                raise InvalidImage(f"layer hard link {m.name!r} points to {m.linkname!r}, not in the layer")
            os.link(tpath, path, follow_symlinks=False)
            continue  # shares the target's inode and attributes
        elif m.ischr() or m.isblk():
            if not root_user:
                continue
            mode = (stat.S_IFCHR if m.ischr() else stat.S_IFBLK) | (m.mode & 0o7777)
            os.mknod(path, mode, os.makedev(m.devmajor, m.devminor))
        elif m.isfifo():
            os.mkfifo(path, m.mode & 0o7777)
        else:
            continue
        _attrs(path, m, root_user)
    for d in opaque:
        path = os.path.join(root, d) if d else root
        _safe_parent(root, os.path.join(path, "x"))
        set_opaque(path)
    for path, m in reversed(dirs):
        _attrs(path, m, root_user)


def _attrs(path: str, m: tarfile.TarInfo, root_user: bool) -> None:
    link = m.issym()
    if root_user:
        os.chown(path, m.uid, m.gid, follow_symlinks=False)
    if not link:
        os.chmod(path, m.mode & 0o7777)
    for k, v in (m.pax_headers or {}).items():
        if k.startswith("SCHILY.xattr."):
            try:
                os.setxattr(
                    path,
                    k[len("SCHILY.xattr.") :],
                    v.encode("utf-8", "surrogateescape"),
                    follow_symlinks=False,
                )
            except OSError:
                pass
    try:
        os.utime(path, (m.mtime, m.mtime), follow_symlinks=False)
    except OSError:
        pass


def unpack_stream(
    raw: BinaryIO,
    dest: str,
    *,
    compression: str,
    expect_digest: str | None,
    expect_diff_id: str | None,
    size: int | None = None,
) -> tuple[str, str]:
    """Unpacks a (possibly gzip-compressed) layer stream into ``dest``; verifies both digests.

    Returns (compressed digest, diff id). ``compression`` is "gzip", "none" or "auto" (sniff magic).
    """
    outer = HashingReader(raw, size)
    src: BinaryIO = outer  # type: ignore[assignment]
    if compression == "auto":
        head = outer.read(2)
        src = _Prefixed(head, outer)  # type: ignore[assignment]
        compression = "gzip" if head == b"\x1f\x8b" else "none"
    gz = gzip.GzipFile(fileobj=src, mode="rb") if compression == "gzip" else None
    inner = HashingReader(gz) if gz is not None else None  # type: ignore[arg-type]
    stream = inner if inner is not None else src
    try:
        with tarfile.open(fileobj=stream, mode="r|", errorlevel=1) as tf:  # type: ignore[arg-type]
            unpack_tar(tf, dest)
        if inner is not None:
            inner.drain()
        outer.drain()
    except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile) as e:
        raise InvalidImage(f"layer is not a valid {'gzip ' if gz else ''}tar stream: {e}") from e
    digest = outer.digest
    diff_id = inner.digest if inner is not None else digest
    if expect_digest and digest != expect_digest:
        raise DigestMismatch(f"layer digest mismatch: expected {expect_digest}, got {digest}")
    if expect_diff_id and diff_id != expect_diff_id:
        raise DigestMismatch(
            f"layer diff id mismatch: the image config says {expect_diff_id}, "
            f"the layer's content is {diff_id}"
        )
    return digest, diff_id


class _Prefixed:
    def __init__(self, head: bytes, rest: HashingReader) -> None:
        self.head, self.rest = head, rest

    def read(self, n: int = -1) -> bytes:
        if self.head:
            if n is None or n < 0:
                b, self.head = self.head + self.rest.read(), b""
                return b
            b, self.head = self.head[:n], self.head[n:]
            if len(b) < n:
                b += self.rest.read(n - len(b))
            return b
        return self.rest.read(n)


def unpack_into(
    dest_final: str, tmp_dir: str, opener: Callable[[], BinaryIO], **kw: object
) -> tuple[str, str]:
    """Unpacks into a fresh temp dir under ``tmp_dir`` and renames it to ``dest_final``."""
    os.makedirs(tmp_dir, exist_ok=True)
    work = os.path.join(tmp_dir, "layer-" + os.urandom(6).hex())
    os.mkdir(work, 0o755)
    try:
        raw = opener()
        try:
            res = unpack_stream(raw, work, **kw)  # type: ignore[arg-type]
        finally:
            close = getattr(raw, "close", None)
            if close:
                close()
        try:
            os.rename(work, dest_final)
        except OSError as e:
            if e.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                raise
            shutil.rmtree(work, ignore_errors=True)  # another puller won
        return res
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
