"""Gossip keyring: authenticated encryption of every gossip datagram and stream frame, with replay protection.

Sealed format, version 2 (both UDP datagrams and TCP frames)::

    version (1) | key id (4) | sender (8) | epoch (8) | counter (8) | time ms (8) | nonce (12) | AES-GCM ciphertext + tag (16)

The key id is the first 4 bytes of SHA-256 of the key; the nonce is random. Everything before the
nonce, plus a channel label such as ``b"udp"``, is authenticated as associated data, so the replay
fields below cannot be changed without the key:

* ``sender``: the first 8 bytes of SHA-256 of the sending node's id;
* ``epoch``: the sender keyring's start time in nanoseconds (wall clock), so it grows across restarts;
* ``counter``: per sender keyring and channel label, +1 for every packet sealed;
* ``time ms``: the sender's wall clock when it sealed the packet.

:meth:`Keyring.open` drops (raises :class:`ReplayError`, counted in :attr:`Keyring.replay_drops` by
reason) a packet that it, or an earlier packet of the same sender and channel, rules out:

* ``reflected``: the sender is this keyring itself;
* ``stale``: its time is more than ``max_age`` seconds (60) off this node's clock, either way. This
  is what still drops old captures after the receiver restarted and lost its windows; it assumes the
  nodes' clocks agree to well within ``max_age`` (NTP);
* ``old epoch``: the sender has since been seen with a newer epoch (it restarted);
* ``too old`` / ``duplicate``: an IPsec-style sliding window (RFC 4303 §3.4.3) of the last
  ``WINDOW`` counters per sender, epoch and channel: a counter above the highest seen is new; below
  it, new only once and only within the window. UDP may reorder, so "not the next one" is no reason
  to drop.

The checks run after the packet authenticated (a forgery is no replay, and moves no window; checking
first would save no work, as a forgery with a known key id costs one decryption anyway). Windows are
kept for the ``MAX_SENDERS`` most recently heard senders.

Version 1 (the format before replay protection) and unknown versions are refused. A keyring without
keys seals with version 0 (plain payload after the 1-byte header), which only a keyring without keys
accepts: a node with keys drops plaintext packets and vice versa. Plaintext has no replay protection
(nothing authenticates it anyway).

Rotation works like memberlist's: :meth:`Keyring.open` accepts any key of the ring, while
:meth:`Keyring.seal` always uses the primary key. Managers distribute a new key, every node
``add``s it, then ``use``s it as primary, then the old one is ``remove``d.

API::

    Keyring(keys: Sequence[bytes] = (), primary: bytes | None = None, *, sender: str | None = None,
            max_age: float = 60.0, epoch: int | None = None, clock: Callable[[], float] = time.time)
    Keyring.add(key) / use(key) / remove(key); .keys -> list[bytes]; .primary -> bytes | None
    Keyring.seal(data, label) -> bytes;  Keyring.open(blob, label) -> bytes  (raises KeyringError)
    Keyring.replay_drops -> Counter[str] (by reason); .replayed -> int
"""

from __future__ import annotations

import hashlib
import os
import struct
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Sequence

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

VERSION_PLAIN = 0
VERSION_V1 = 1          # AES-GCM without replay fields: refused
VERSION = 2             # AES-GCM with sender, epoch, counter, time
_HEAD = struct.Struct("!B4s8sQQQ")
HEADER_LEN = _HEAD.size + 12
OVERHEAD = HEADER_LEN + 16
WINDOW = 1024           # counters remembered below the highest one, per sender and channel
MAX_AGE = 60.0          # seconds a packet's time may be off the receiver's clock
MAX_SENDERS = 4096      # windows kept (least recently heard forgotten first)
_MASK = (1 << WINDOW) - 1


class KeyringError(Exception):
    """A packet could not be authenticated/decrypted with any key of the ring."""


class ReplayError(KeyringError):
    """A packet ruled out by the replay checks; ``reason`` says which."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"replay check: {reason} ({detail})")
        self.reason = reason


def key_id(key: bytes) -> bytes:
    return hashlib.sha256(key).digest()[:4]


def sender_id(node_id: str) -> bytes:
    return hashlib.sha256(node_id.encode()).digest()[:8]


def _check(key: bytes) -> bytes:
    if not isinstance(key, bytes | bytearray) or len(key) not in (16, 24, 32):
        raise ValueError("gossip key must be 16, 24 or 32 bytes (AES-128/192/256); generate one with os.urandom(32)")
    return bytes(key)


class Keyring:
    def __init__(
        self,
        keys: Sequence[bytes] = (),
        primary: bytes | None = None,
        *,
        sender: str | None = None,
        max_age: float = MAX_AGE,
        epoch: int | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if max_age <= 0:
            raise ValueError("gossip replay max_age must be > 0 seconds")
        self._keys: dict[bytes, tuple[bytes, AESGCM]] = {}
        self._primary: bytes | None = None
        self.sender = os.urandom(8) if sender is None else sender_id(sender)
        self.epoch = time.time_ns() if epoch is None else epoch
        self._max_age_ms = int(max_age * 1000)
        self._clock = clock
        self._counters: dict[bytes, int] = {}  # label -> next counter
        # (sender, label) -> [epoch, highest counter, bitmap: bit i = counter highest - i was seen]
        self._windows: OrderedDict[tuple[bytes, bytes], list[int]] = OrderedDict()
        self.replay_drops: Counter[str] = Counter()
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

    @property
    def replayed(self) -> int:
        """Packets dropped by the replay checks, all reasons."""
        return sum(self.replay_drops.values())

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
        counter = self._counters.get(label, 0)
        self._counters[label] = counter + 1
        head = _HEAD.pack(VERSION, kid, self.sender, self.epoch, counter, int(self._clock() * 1000))
        nonce = os.urandom(12)
        return head + nonce + self._keys[kid][1].encrypt(nonce, data, head + label)

    def open(self, blob: bytes, label: bytes) -> bytes:
        if not blob:
            raise KeyringError("empty packet")
        version = blob[0]
        if version == VERSION_PLAIN:
            if self._keys:
                raise KeyringError("plaintext packet but encryption is enabled")
            return blob[1:]
        if version != VERSION:
            raise KeyringError(f"packet format version {version} refused (this node speaks {VERSION}: "
                               "every node must run a release with the same gossip format)")
        if len(blob) < OVERHEAD:
            raise KeyringError("packet too short")
        _, kid, sender, epoch, counter, ms = _HEAD.unpack_from(blob)
        entry = self._keys.get(kid)
        if entry is None:
            raise KeyringError(f"unknown key id {kid.hex()}")
        n = _HEAD.size
        try:
            data = entry[1].decrypt(blob[n:n + 12], blob[n + 12:], blob[:n] + label)
        except InvalidTag as e:
            raise KeyringError("authentication failed") from e
        # the replay checks, inlined (this runs for every packet)
        where = (sender, label)
        w = self._windows.get(where)
        reason = ""
        if sender == self.sender:
            reason = "reflected"
        elif abs(self._clock() * 1000 - ms) > self._max_age_ms:
            reason = "stale"
        elif w is not None and epoch <= w[0]:
            if epoch < w[0]:
                reason = "old epoch"
            elif counter <= w[1]:
                d = w[1] - counter
                if d >= WINDOW:
                    reason = "too old"
                elif w[2] >> d & 1:
                    reason = "duplicate"
        if reason:
            self.replay_drops[reason] += 1
            raise ReplayError(reason, f"sender {sender.hex()} epoch {epoch} counter {counter} time {ms}")
        # accepted: move the window
        if w is None or epoch > w[0]:
            self._windows[where] = [epoch, counter, 1]
            if len(self._windows) > MAX_SENDERS:
                self._windows.popitem(last=False)
        elif counter > w[1]:
            d = counter - w[1]
            w[2] = ((w[2] << d) | 1) & _MASK if d < WINDOW else 1
            w[1] = counter
            self._windows.move_to_end(where)
        else:
            w[2] |= 1 << (w[1] - counter)
            self._windows.move_to_end(where)
        return data
