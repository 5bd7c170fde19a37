"""Whiteout handling and layer unpacking (no root needed: whiteouts are 0:0 character devices, which
Linux ≥ 5.8 lets anyone create; the opaque marker is a user.* xattr when not root)."""

import io
import os
import stat
import tarfile

import pytest

from shoal.agent.engine.errors import DigestMismatch, InvalidImage
from shoal.agent.engine.layers import classify, unpack_stream
from shoal.lab.images import Entry, opaque, tar_layer, whiteout


@pytest.mark.parametrize(
    "name,expected",
    [
        ("etc/passwd", ("entry", "etc/passwd")),
        ("./etc/passwd", ("entry", "etc/passwd")),
        ("/abs/x", ("entry", "abs/x")),
        ("etc/.wh.hosts", ("whiteout", "etc/hosts")),
        (".wh.top", ("whiteout", "top")),
        ("var/lib/.wh..wh..opq", ("opaque", "var/lib")),
        (".wh..wh..opq", ("opaque", "")),
        ("a/./b/../c", ("entry", "a/c")),
        ("./", ("entry", "")),
    ],
)
def test_classify(name, expected):
    assert classify(name) == expected


@pytest.mark.parametrize("name", ["../x", "a/../../x", "x/.wh.", "x/.wh..."])
def test_classify_rejects(name):
    with pytest.raises(InvalidImage):
        classify(name)


def xattr(path, name):
    try:
        return os.getxattr(path, name)
    except OSError:
        return None


def test_unpack_whiteout_opaque_and_digests(tmp_path):
    layer = tar_layer(
        [
            Entry("etc", "dir"),
            Entry("etc/a", data=b"x", mode=0o640),
            whiteout("etc/gone"),
            Entry("var", "dir"),
            opaque("var"),
            Entry("var/new", data=b"n"),
            Entry("bin", "dir"),
            Entry("bin/sh", "symlink", target="/bin/busybox"),
            Entry("bin/busybox", data=b"#!", mode=0o755),
            Entry("bin/ash", "hardlink", target="bin/busybox"),
        ]
    )
    dest = tmp_path / "l"
    dest.mkdir()
    digest, diff_id = unpack_stream(
        io.BytesIO(layer.gz),
        str(dest),
        compression="gzip",
        expect_digest=layer.digest,
        expect_diff_id=layer.diff_id,
    )
    assert (digest, diff_id) == (layer.digest, layer.diff_id)
    st = os.lstat(dest / "etc/gone")
    assert stat.S_ISCHR(st.st_mode) and st.st_rdev == os.makedev(0, 0)
    assert stat.S_IMODE(os.stat(dest / "etc/a").st_mode) == 0o640
    opq = xattr(dest / "var", "trusted.overlay.opaque" if os.geteuid() == 0 else "user.overlay.opaque")
    assert opq == b"y"
    assert not (dest / "var/.wh..wh..opq").exists() and (dest / "var/new").read_bytes() == b"n"
    assert os.readlink(dest / "bin/sh") == "/bin/busybox"
    assert os.stat(dest / "bin/ash").st_ino == os.stat(dest / "bin/busybox").st_ino


def test_unpack_auto_plain_tar(tmp_path):
    layer = tar_layer([Entry("f", data=b"1")])
    d, i = unpack_stream(
        io.BytesIO(layer.tar),
        str(tmp_path),
        compression="auto",
        expect_digest=None,
        expect_diff_id=layer.diff_id,
    )
    assert d == i == layer.diff_id and (tmp_path / "f").read_bytes() == b"1"


def test_digest_mismatch(tmp_path):
    layer = tar_layer([Entry("f", data=b"1")])
    with pytest.raises(DigestMismatch):
        unpack_stream(
            io.BytesIO(layer.gz),
            str(tmp_path),
            compression="gzip",
            expect_digest="sha256:" + "0" * 64,
            expect_diff_id=None,
        )
    with pytest.raises(DigestMismatch):
        unpack_stream(
            io.BytesIO(layer.gz),
            str(tmp_path),
            compression="gzip",
            expect_digest=None,
            expect_diff_id="sha256:" + "0" * 64,
        )


def test_symlink_escape_rejected(tmp_path):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        ti = tarfile.TarInfo("evil")
        ti.type, ti.linkname = tarfile.SYMTYPE, str(tmp_path / "outside")
        tf.addfile(ti)
        ti = tarfile.TarInfo("evil/file")
        data = b"pwned"
        ti.size = len(data)
        tf.addfile(ti, io.BytesIO(data))
    (tmp_path / "outside").mkdir()
    dest = tmp_path / "l"
    dest.mkdir()
    with pytest.raises(InvalidImage):
        unpack_stream(
            io.BytesIO(buf.getvalue()), str(dest), compression="none", expect_digest=None, expect_diff_id=None
        )
    assert not (tmp_path / "outside" / "file").exists()


def test_not_a_tar(tmp_path):
    with pytest.raises(InvalidImage):
        unpack_stream(
            io.BytesIO(b"\x1f\x8bnot gzip at all"),
            str(tmp_path),
            compression="gzip",
            expect_digest=None,
            expect_diff_id=None,
        )
