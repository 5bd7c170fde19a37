"""Encryption at rest of the store, and autolock (Docker Swarm's `--autolock`).

Values. Every object value a manager writes to etcd is sealed by `DataKeyCodec` (the store's
`ValueCodec`): AES-256-GCM under the cluster's data key (DEK, 32 random bytes made at `swarmd` init,
the same on every manager since they share etcd's values), stored as
`b"\\x01" + 12-byte random nonce + ciphertext`, with the etcd key as associated data -- a value
copied or moved to another key does not open. etcd's WAL, snapshots and bbolt database therefore
hold object ids and names (in the keys) but no object contents: no secret or config data, no CA key,
no network IPsec or gossip keys.

Keys on disk (`<state dir>/keys/`, mode 0700; files 0600, written atomically: tmp, fsync, rename,
fsync of the directory):

- `dek`: JSON `{"version": 1, "locked": bool, "wrapped": base64}`: the DEK wrapped (AES-256-GCM,
  associated data naming the format and the `locked` flag) by a key-encryption key (KEK);
- `kek`: JSON `{"version": 1, "kek": base64}`, only while the cluster is *not* autolocked: a random
  KEK, so the state dir alone opens the data, as in Docker without autolock;
- `root-ca`: the cluster's root CA (certificate and key) and certificate expiry, sealed with the DEK
  like a store value: a manager whose own certificate expired while it was off signs itself a new
  one from it before its etcd member starts (see `shoal.manager.manager`), since etcd peers refuse
  an expired certificate and the store could not get a quorum back otherwise. It holds nothing the
  store does not (sealed with the same key).

Autolock: the KEK is derived (HKDF-SHA256) from the cluster's unlock key, `SWMKEY-1-` + base64 (no
padding) of 32 random bytes, which the operator keeps and no manager keeps on disk; `dek` says
`"locked": true` and there is no `kek`. A restarted manager then waits for `UnlockCluster` with
that key (see `shoal.node.swarmd`). The unlock key lives in the Cluster object (`unlock_key`),
sealed like every value; each manager follows it (`KeyDir.sync`) and re-wraps its `dek` when
autolock is turned on or off or the key is rotated.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

KEY_BYTES = 32
NONCE_BYTES = 12
VALUE_FORMAT = b"\x01"
FILE_VERSION = 1
UNLOCK_KEY_PREFIX = "SWMKEY-1-"
ROOT_CA_AAD = b"keys/root-ca"
_KDF_SALT = b"shoal autolock"
_KDF_INFO = b"shoal manager key-encryption key v1"


class SealedValueError(ValueError):
    """A value read from etcd that this manager's data key cannot open."""


class KeyFileError(Exception):
    """The keys dir is missing, unreadable or damaged; the message says which file and what to do."""


class InvalidUnlockKey(Exception):
    """An unlock key that is malformed or does not unwrap this manager's data key."""


# ---- values --------------------------------------------------------------------------------------
class DataKeyCodec:
    """The store's `ValueCodec`: AES-256-GCM under the data key, the etcd key as associated data."""

    def __init__(self, dek: bytes) -> None:
        if len(dek) != KEY_BYTES:
            raise ValueError(f"the data key must be {KEY_BYTES} bytes, got {len(dek)}")
        self._aead = AESGCM(dek)

    def seal(self, key: bytes, data: bytes) -> bytes:
        nonce = os.urandom(NONCE_BYTES)
        return VALUE_FORMAT + nonce + self._aead.encrypt(nonce, data, key)

    def open(self, key: bytes, data: bytes) -> bytes:
        where = key.decode(errors="replace")
        if data[:1] != VALUE_FORMAT or len(data) < 1 + NONCE_BYTES + 16:
            raise SealedValueError(
                f"the value of etcd key {where} is not sealed in a format this manager knows "
                "(written unencrypted, or by a newer version)"
            )
        try:
            return self._aead.decrypt(data[1 : 1 + NONCE_BYTES], data[1 + NONCE_BYTES :], key)
        except InvalidTag:
            raise SealedValueError(
                f"the value of etcd key {where} does not open with this manager's data key: it was sealed "
                "for another key (moved or copied there), by another cluster, or was altered"
            ) from None


def new_data_key() -> bytes:
    return os.urandom(KEY_BYTES)


# ---- unlock keys ---------------------------------------------------------------------------------
def new_unlock_key() -> bytes:
    return os.urandom(KEY_BYTES)


def format_unlock_key(raw: bytes) -> str:
    """`SWMKEY-1-` + base64 without padding, as Docker prints it."""
    return UNLOCK_KEY_PREFIX + base64.b64encode(raw).decode().rstrip("=")


def parse_unlock_key(text: str) -> bytes:
    """The 32 bytes of a `SWMKEY-1-...` key; InvalidUnlockKey if it is not one."""
    text = text.strip()
    if not text.startswith(UNLOCK_KEY_PREFIX):
        raise InvalidUnlockKey("invalid unlock key: it starts with SWMKEY-1- (see `swarmctl cluster unlock-key`)")
    body = text[len(UNLOCK_KEY_PREFIX) :]
    try:
        raw = base64.b64decode(body + "=" * (-len(body) % 4), validate=True)
    except (binascii.Error, ValueError):
        raw = b""
    if len(raw) != KEY_BYTES:
        raise InvalidUnlockKey("invalid unlock key: it is not SWMKEY-1- followed by 43 base64 characters")
    return raw


def kek_from_unlock_key(raw: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=_KDF_SALT, info=_KDF_INFO).derive(raw)


# ---- the keys dir --------------------------------------------------------------------------------
def _aad(locked: bool) -> bytes:
    return b"shoal dek v1 " + (b"locked" if locked else b"unlocked")


def wrap(kek: bytes, dek: bytes, locked: bool) -> bytes:
    nonce = os.urandom(NONCE_BYTES)
    return nonce + AESGCM(kek).encrypt(nonce, dek, _aad(locked))


def unwrap(kek: bytes, wrapped: bytes, locked: bool) -> bytes | None:
    """The DEK, or None when `kek` is not the key it was wrapped with."""
    try:
        return AESGCM(kek).decrypt(wrapped[:NONCE_BYTES], wrapped[NONCE_BYTES:], _aad(locked))
    except (InvalidTag, ValueError):
        return None


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Replace `path` with `data` so that a crash leaves either the old or the new file, complete."""
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.fchmod(fd, mode)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    _fsync_dir(path.parent)


@dataclass(frozen=True)
class DekFile:
    locked: bool
    wrapped: bytes


class KeyDir:
    """`<state dir>/keys`: the wrapped data key and, unlocked, its key-encryption key."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.dek_path = self.path / "dek"
        self.kek_path = self.path / "kek"

    def exists(self) -> bool:
        return self.dek_path.exists()

    # reading
    def read(self) -> DekFile:
        try:
            doc = json.loads(self.dek_path.read_text())
            if doc.get("version") != FILE_VERSION:
                raise KeyFileError(
                    f"{self.dek_path} has format version {doc.get('version')!r}; this swarmd reads version "
                    f"{FILE_VERSION}: run the swarmd version that wrote it"
                )
            return DekFile(bool(doc["locked"]), base64.b64decode(doc["wrapped"], validate=True))
        except FileNotFoundError:
            raise KeyFileError(
                f"{self.dek_path} is missing: this manager has no data key, so it cannot read the store; "
                "restore the state dir from a backup, or remove it and join the swarm again"
            ) from None
        except (ValueError, KeyError, TypeError, binascii.Error) as e:
            raise KeyFileError(f"{self.dek_path} is damaged ({e}): restore it from a backup") from None

    def _read_kek(self) -> bytes | None:
        try:
            doc = json.loads(self.kek_path.read_text())
            kek = base64.b64decode(doc["kek"], validate=True)
        except FileNotFoundError:
            return None
        except (ValueError, KeyError, TypeError, binascii.Error) as e:
            raise KeyFileError(f"{self.kek_path} is damaged ({e}): restore it from a backup") from None
        if len(kek) != KEY_BYTES:
            raise KeyFileError(f"{self.kek_path} holds a {len(kek)}-byte key, not {KEY_BYTES}: restore it from a backup")
        return kek

    def is_locked(self) -> bool:
        return self.read().locked

    def load(self) -> bytes | None:
        """The data key if this manager is not locked (its KEK is on disk); None if it is locked."""
        f = self.read()
        if f.locked:
            return None
        kek = self._read_kek()
        if kek is None:
            raise KeyFileError(
                f"{self.kek_path} is missing but {self.dek_path} is not locked: the data key cannot be "
                "unwrapped; restore the keys dir from a backup"
            )
        dek = unwrap(kek, f.wrapped, locked=False)
        if dek is None:
            raise KeyFileError(f"{self.kek_path} does not unwrap {self.dek_path}: restore the keys dir from a backup")
        return dek

    def unlock(self, unlock_key: str) -> bytes:
        """The data key unwrapped with `unlock_key` (SWMKEY-1-...); InvalidUnlockKey if it does not."""
        raw = parse_unlock_key(unlock_key)
        f = self.read()
        dek = unwrap(kek_from_unlock_key(raw), f.wrapped, locked=True) if f.locked else None
        if dek is None:
            raise InvalidUnlockKey("invalid unlock key")
        return dek

    # writing
    def _ensure_dir(self) -> None:
        self.path.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(self.path, 0o700)

    def _write_dek(self, locked: bool, wrapped: bytes) -> None:
        doc = {"version": FILE_VERSION, "locked": locked, "wrapped": base64.b64encode(wrapped).decode()}
        write_atomic(self.dek_path, json.dumps(doc).encode() + b"\n")

    def write_unlocked(self, dek: bytes) -> None:
        """Wrap `dek` with a new random KEK kept in `kek` (the `kek` file first: a crash in between
        leaves the old `dek` and a useless new `kek`, or both new)."""
        self._ensure_dir()
        kek = os.urandom(KEY_BYTES)
        write_atomic(self.kek_path, json.dumps({"version": FILE_VERSION, "kek": base64.b64encode(kek).decode()}).encode())
        self._write_dek(False, wrap(kek, dek, locked=False))

    def write_locked(self, dek: bytes, unlock_key: bytes) -> None:
        """Wrap `dek` with the KEK of `unlock_key` and remove `kek` (after the new `dek` is on disk)."""
        self._ensure_dir()
        self._write_dek(True, wrap(kek_from_unlock_key(unlock_key), dek, locked=True))
        self._remove_kek()

    def _remove_kek(self) -> None:
        try:
            self.kek_path.unlink()
        except FileNotFoundError:
            return
        _fsync_dir(self.path)

    def create(self, dek: bytes) -> None:
        """A new manager's keys: `dek` wrapped with a random KEK (autolock is applied once the
        manager follows the cluster object)."""
        self.write_unlocked(dek)

    @property
    def root_ca_path(self) -> Path:
        return self.path / "root-ca"

    def save_root_ca(self, dek: bytes, data: bytes) -> None:
        """Keep `data` (a serialized Cluster holding the root CA) sealed with the data key."""
        self._ensure_dir()
        write_atomic(self.root_ca_path, DataKeyCodec(dek).seal(ROOT_CA_AAD, data))

    def load_root_ca(self, dek: bytes) -> bytes | None:
        """What `save_root_ca` kept, or None when there is none (a manager of an older version)."""
        try:
            sealed = self.root_ca_path.read_bytes()
        except FileNotFoundError:
            return None
        return DataKeyCodec(dek).open(ROOT_CA_AAD, sealed)

    def sync(self, dek: bytes, unlock_key: bytes | None) -> str | None:
        """Make the files match the cluster: wrapped with `unlock_key`'s KEK and no `kek` file
        (autolock on), or with a random KEK in `kek` (off). Returns what changed, or None."""
        try:
            f: DekFile | None = self.read()
        except KeyFileError:
            f = None
        if unlock_key is not None:
            if f is not None and f.locked and unwrap(kek_from_unlock_key(unlock_key), f.wrapped, True) == dek:
                if self.kek_path.exists():
                    self._remove_kek()
                    return "autolock: removed a stale keys/kek"
                return None
            self.write_locked(dek, unlock_key)
            if f is not None and f.locked:
                return "autolock: the unlock key was rotated; data key re-wrapped with the new key"
            return "autolock on: data key wrapped with the cluster's unlock key, keys/kek removed"
        if f is not None and not f.locked:
            try:
                kek = self._read_kek()
            except KeyFileError:
                kek = None
            if kek is not None and unwrap(kek, f.wrapped, False) == dek:
                return None
        self.write_unlocked(dek)
        if f is not None and f.locked:
            return "autolock off: data key wrapped with a new key-encryption key in keys/kek"
        return "data key wrapped with a new key-encryption key in keys/kek"
