"""Backup files: sealed for the operator's key, refused with one clear sentence otherwise."""

from __future__ import annotations

import pytest

from shoal.manager import backup
from shoal.manager.encryption import format_unlock_key, new_unlock_key
from shoal.proto import objects_pb2, specs_pb2, store_pb2, types_pb2

SECRET = b"the-secret-value-0123456789-abcdefghij"


def snapshot() -> store_pb2.StoreSnapshot:
    snap = store_pb2.StoreSnapshot(version=42)
    snap.objects.add().secret.CopyFrom(objects_pb2.Secret(
        id="s1", spec=specs_pb2.SecretSpec(annotations=types_pb2.Annotations(name="db"), data=SECRET)))
    snap.objects.add().cluster.CopyFrom(objects_pb2.Cluster(id="c1", root_ca=objects_pb2.RootCA(ca_key=b"CAKEY")))
    return snap


def test_round_trip_and_nothing_in_clear() -> None:
    raw = new_unlock_key()
    data = backup.seal(snapshot(), "c1", raw, unlock_key=False)
    assert SECRET not in data and b"CAKEY" not in data and b"db" not in data
    head = backup.read_header(data)
    assert (head.cluster_id, head.version, head.key_kind) == ("c1", 42, store_pb2.ClusterBackup.BACKUP_KEY)
    assert backup.open_backup(data, format_unlock_key(raw)) == snapshot()


def test_wrong_key_malformed_key_and_not_a_backup() -> None:
    data = backup.seal(snapshot(), "c1", new_unlock_key(), unlock_key=True)
    with pytest.raises(backup.BackupError, match="the key does not open the backup: it opens with the cluster's unlock key"):
        backup.open_backup(data, format_unlock_key(new_unlock_key()))
    with pytest.raises(backup.BackupError, match="invalid unlock key"):
        backup.open_backup(data, "SWMKEY-1-short")
    with pytest.raises(backup.BackupError, match="is not a Shoal backup"):
        backup.open_backup(b"hello", "x", "f.bak")
    with pytest.raises(backup.BackupError, match="damaged"):
        backup.read_header(backup.MAGIC + b"\xff\xff\xff")


def test_tampered_clear_header_does_not_open() -> None:
    raw = new_unlock_key()
    data = backup.seal(snapshot(), "c1", raw, unlock_key=False)
    b = backup.read_header(data)
    b.version = 43  # the clear header is bound to the ciphertext
    with pytest.raises(backup.BackupError, match="does not open"):
        backup.open_backup(backup.MAGIC + b.SerializeToString(), format_unlock_key(raw))
