"""Backups of the cluster state, for disaster recovery (`swarmctl cluster backup`, `swarmd --restore`).

A backup is one consistent `StoreSnapshot` -- every object at one store version (etcd revision),
secrets, configs, the root CA key and network keys included -- sealed with AES-256-GCM under a key
derived (HKDF, as the autolock key-encryption key) from a `SWMKEY-1-` key the operator holds:

- autolock on: the cluster's unlock key (the operator has it already);
- autolock off: a key made for this backup, printed once by `swarmctl cluster backup`.

So a backup file alone reveals nothing. The file is `MAGIC` followed by a `ClusterBackup` protobuf;
the cluster id and the version are in clear (they name the backup), everything else is sealed, and
the cluster id and version are bound to the ciphertext as associated data.
"""

from __future__ import annotations

import os
import time

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from google.protobuf.message import DecodeError

from shoal.manager.encryption import NONCE_BYTES, InvalidUnlockKey, kek_from_unlock_key, parse_unlock_key
from shoal.proto import store_pb2

MAGIC = b"SHOAL-BACKUP-1\n"
FORMAT = 1


class BackupError(Exception):
    """A backup that cannot be read or opened; the message says why and what to do."""


def _aad(cluster_id: str, version: int) -> bytes:
    return f"shoal backup {FORMAT} {cluster_id} {version}".encode()


def seal(snapshot: store_pb2.StoreSnapshot, cluster_id: str, raw_key: bytes, unlock_key: bool) -> bytes:
    """The backup file's bytes for `snapshot`, sealed under the SWMKEY key `raw_key` (32 bytes)."""
    nonce = os.urandom(NONCE_BYTES)
    aead = AESGCM(kek_from_unlock_key(raw_key))
    b = store_pb2.ClusterBackup(
        format=FORMAT,
        cluster_id=cluster_id,
        version=snapshot.version,
        created_unix_nano=time.time_ns(),
        key_kind=store_pb2.ClusterBackup.UNLOCK_KEY if unlock_key else store_pb2.ClusterBackup.BACKUP_KEY,
        nonce=nonce,
        ciphertext=aead.encrypt(nonce, snapshot.SerializeToString(), _aad(cluster_id, snapshot.version)),
    )
    return MAGIC + b.SerializeToString()


def read_header(data: bytes, path: str = "the backup") -> store_pb2.ClusterBackup:
    """The backup's clear part (cluster id, version, time, which key); BackupError if it is none."""
    if not data.startswith(MAGIC):
        raise BackupError(f"{path} is not a Shoal backup (made by `swarmctl cluster backup FILE`)")
    try:
        b = store_pb2.ClusterBackup.FromString(data[len(MAGIC):])
    except DecodeError:
        raise BackupError(f"{path} is damaged: it does not parse; use another copy") from None
    if b.format != FORMAT:
        raise BackupError(f"{path} has format {b.format}, which this version cannot read (it reads {FORMAT})")
    return b


def open_backup(data: bytes, key_text: str, path: str = "the backup") -> store_pb2.StoreSnapshot:
    """The snapshot in a backup, opened with the operator's SWMKEY-1- key."""
    b = read_header(data, path)
    which = ("the cluster's unlock key at the time of the backup" if b.key_kind == store_pb2.ClusterBackup.UNLOCK_KEY
             else "the key `swarmctl cluster backup` printed for it")
    try:
        raw = parse_unlock_key(key_text)
    except InvalidUnlockKey as e:
        raise BackupError(f"{e}; {path} opens with {which}") from None
    try:
        plain = AESGCM(kek_from_unlock_key(raw)).decrypt(b.nonce, b.ciphertext, _aad(b.cluster_id, b.version))
    except (InvalidTag, ValueError):
        raise BackupError(f"the key does not open {path}: it opens with {which}") from None
    return store_pb2.StoreSnapshot.FromString(plain)
