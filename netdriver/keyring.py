"""Gossip keyring: authenticated encryption of every gossip datagram and stream frame.

Sealed format (both UDP datagrams and TCP frames)::

    version (1 byte) | key id (4 bytes) | nonce (12 bytes) | AES-GCM ciphertext + 16-byte tag

``version`` is 1 for encrypted payloads (key id = first 4 bytes of SHA-256 of the key; the
version byte, key id and a channel label such as ``b"udp"`` are authenticated as associated
data). A keyring without keys seals with version 0 (plain payload after the 1-byte header), which
only a keyring without keys accepts: a node with keys drops plaintext packets and vice versa.

Rotation works like memberlist's: :meth:`Keyring.open` accepts any key of the ring, while
:meth:`Keyring.seal` always uses the primary key. Managers distribute a new key, every node
``add``s it, then ``use``s it as primary, then the old one is ``remove``d.

API::

    Keyring(keys: Sequence[bytes] = (), primary: bytes | None = None)
    Keyring.add(key) / use(key) / remove(key); .keys -> list[bytes]; .primary -> bytes | None
    Keyring.seal(data, label) -> bytes;  Keyring.open(blob, label) -> bytes  (raises KeyringError)
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

VERSION_PLAIN = 0
VERSION_AESGCM = 1
HEADER_LEN = 1 + 4 + 12
OVERHEAD = HEADER_LEN + 16


class KeyringError(Exception):
    """A packet could not be authenticated/decrypted with any key of the ring."""


def key_id(key: bytes) -> bytes:
    return hashlib.sha256(key).digest()[:4]


def _check(key: bytes) -> bytes:
    if not isinstance(key, bytes | bytearray) or len(key) not in (16, 24, 32):
        raise ValueError("gossip key must be 16, 24 or 32 bytes (AES-128/192/256); generate one with os.urandom(32)")
    return bytes(key)


class Keyring:
    def __init__(self, keys: Sequence[bytes] = (), primary: bytes | None = None) -> None:
        self._keys: dict[bytes, tuple[bytes, AESGCM]] = {}
        self._primary: bytes | None = None
        for k in keys:
            self.add(k)
        if primary is not None:
            self.use(primary)

    @property
    def keys(self) -> list[bytes]:
        """All keys, primary first."""
        out = [k for k, _ in self._keys.values()]
        if self._primary is not None:
            p = self._keys[self._primary][0]
            out.remove(p)
            out.insert(0, p)
        return out

    @property
    def primary(self) -> bytes | None:
        return None if self._primary is None else self._keys[self._primary][0]

    @property
    def enabled(self) -> bool:
        return bool(self._keys)

    def add(self, key: bytes) -> None:
        """Accept packets sealed with ``key``; the first key added becomes primary."""
        key = _check(key)
        kid = key_id(key)
        self._keys[kid] = (key, AESGCM(key))
        if self._primary is None:
            self._primary = kid

    def use(self, key: bytes) -> None:
        """Make ``key`` (already in the ring) the key used to send."""
        kid = key_id(_check(key))
        if kid not in self._keys:
            raise ValueError("gossip key to use as primary is not in the keyring; add it first")
        self._primary = kid

    def remove(self, key: bytes) -> None:
        kid = key_id(_check(key))
        if kid == self._primary:
            raise ValueError("cannot remove the primary gossip key; make another key primary first")
        self._keys.pop(kid, None)

    def seal(self, data: bytes, label: bytes) -> bytes:
        if self._primary is None:
            return bytes([VERSION_PLAIN]) + data
        kid = self._primary
        nonce = os.urandom(12)
        head = bytes([VERSION_AESGCM]) + kid
        return head + nonce + self._keys[kid][1].encrypt(nonce, data, head + label)

    def open(self, blob: bytes, label: bytes) -> bytes:
        if not blob:
            raise KeyringError("empty packet")
        version = blob[0]
        if version == VERSION_PLAIN:
            if self._keys:
                raise KeyringError("plaintext packet but encryption is enabled")
            return blob[1:]
        if version != VERSION_AESGCM:
            raise KeyringError(f"unknown packet version {version}")
        if len(blob) < OVERHEAD:
            raise KeyringError("packet too short")
        kid = blob[1:5]
        entry = self._keys.get(kid)
        if entry is None:
            raise KeyringError(f"unknown key id {kid.hex()}")
        try:
            return entry[1].decrypt(blob[5:17], blob[17:], blob[:5] + label)
        except InvalidTag as e:
            raise KeyringError("authentication failed") from e
