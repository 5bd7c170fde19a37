"""What a node's agent keeps on disk between runs, so that a restarted agent serves before it reaches
any manager.

`<state dir>/worker/` (mode 0700):

    tasks/<task id>.pb     every task assigned to this node (`objects_pb2.Task`: its spec, networks,
                           VIPs, and the references -- ids and names -- of its secrets and configs,
                           never their data), with the status this agent last reported for it
    session.sealed         the last session message from a dispatcher (`dispatcher_pb2.SessionMessage`:
                           the managers, this node with its ingress attachment, the gossip keys)
    network-keys.sealed    the IPsec keys of the encrypted networks this node has tasks on
    gossip-peers           the gossip addresses (host:port) of the nodes this one last heard, a line each
    heartbeat-period       the heartbeat period (s) the join answer or the last heartbeat answers said:
                           the next start's first connection sets its keepalive from it
    seal.key               32 random bytes: the key of the `.sealed` files (0600)

Sealed files are AES-256-GCM (`b"\\x01"` + 12-byte nonce + ciphertext, their file name as associated
data) under `seal.key`. It keeps secrets out of copies of the records alone (backups, bug reports);
it does not keep them from root on the host, who can read `seal.key` as it can read the node's TLS
key. A sealed file that does not open (another key, altered, damaged) reads as absent: the agent then
waits for a manager, as it would with no record at all.

Each record is written whole to a temporary file, fsync'd and renamed over the old one, so a crash
leaves the old record or the new one, never a mix; a record that does not parse (a power cut before
the data reached the disk) reads as absent. The manager stays the authority: the first complete
assignment set from a dispatcher replaces everything here.

`RecordDir` is the one place records are written and read (the network agent keeps the tasks it
prepared in one too).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Generic, TypeVar

from google.protobuf.message import DecodeError, Message

from shoal.proto import dispatcher_pb2, objects_pb2, types_pb2

log = logging.getLogger("shoal.agent.localstate")

M = TypeVar("M", bound=Message)

KEY_BYTES = 32
NONCE_BYTES = 12
SEALED_FORMAT = b"\x01"


def write_record(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Replace `path` with `data`: a crash leaves the old content or the new one, whole."""
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


class Sealer:
    """AES-256-GCM under a key kept in `key_path` (made on first use, 0600)."""

    def __init__(self, key_path: Path) -> None:
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM

        try:
            key = key_path.read_bytes()
        except FileNotFoundError:
            key = b""
        if len(key) != KEY_BYTES:
            if key:
                log.warning("%s is not a %d-byte key: a new one replaces it (sealed records are lost)",
                            key_path, KEY_BYTES)
            key = os.urandom(KEY_BYTES)
            write_record(key_path, key)
        self._aead = AESGCM(key)

    def seal(self, name: str, data: bytes) -> bytes:
        nonce = os.urandom(NONCE_BYTES)
        return SEALED_FORMAT + nonce + self._aead.encrypt(nonce, data, name.encode())

    def open(self, name: str, data: bytes) -> bytes | None:
        """The plaintext, or None when `data` is not sealed for `name` under this key."""
        from cryptography.exceptions import InvalidTag

        if data[:1] != SEALED_FORMAT or len(data) < 1 + NONCE_BYTES + 16:
            return None
        try:
            return self._aead.decrypt(data[1:1 + NONCE_BYTES], data[1 + NONCE_BYTES:], name.encode())
        except InvalidTag:
            return None


class RecordDir(Generic[M]):
    """A directory of protobuf messages of one type, a file `<key>.pb` each. Writes skip a record
    whose bytes did not change since this object last wrote or read it."""

    def __init__(self, path: Path, cls: type[M]) -> None:
        self.path = Path(path)
        self.cls = cls
        self._known: dict[str, bytes] = {}

    def _file(self, key: str) -> Path:
        if not key or "/" in key or key.startswith("."):
            raise ValueError(f"record key {key!r} is not a plain file name")
        return self.path / f"{key}.pb"

    def put(self, key: str, msg: M) -> None:
        data = msg.SerializeToString()
        if self._known.get(key) == data:
            return
        self.path.mkdir(parents=True, exist_ok=True, mode=0o700)
        write_record(self._file(key), data)
        self._known[key] = data

    def get(self, key: str) -> M | None:
        try:
            data = self._file(key).read_bytes()
            msg = self.cls.FromString(data)
        except FileNotFoundError:
            return None
        except (DecodeError, OSError) as e:
            log.warning("record %s unreadable, ignored: %s", self._file(key), e)
            return None
        self._known[key] = data
        return msg

    def delete(self, key: str) -> None:
        self._known.pop(key, None)
        self._file(key).unlink(missing_ok=True)

    def keys(self) -> list[str]:
        if not self.path.is_dir():
            return []
        return sorted(p.name[:-3] for p in self.path.glob("*.pb"))

    def items(self) -> Iterator[tuple[str, M]]:
        for key in self.keys():
            msg = self.get(key)
            if msg is not None:
                yield key, msg

    def clear(self) -> None:
        for key in self.keys():
            self.delete(key)


class LocalState:
    """`<state dir>/worker/`: the agent's assignments and the last session, for the next run (see the
    module's docstring). Every method is synchronous and fast (a small file, fsync'd): the worker
    calls them as assignments and statuses change."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.tasks: RecordDir[objects_pb2.Task] = RecordDir(self.path / "tasks", objects_pb2.Task)
        self._sealer = Sealer(self.path / "seal.key")

    # ---- sealed records ----------------------------------------------------------------------------
    def _put_sealed(self, name: str, msg: Message) -> None:
        write_record(self.path / name, self._sealer.seal(name, msg.SerializeToString()))

    def _get_sealed(self, name: str, cls: type[M]) -> M | None:
        try:
            data = self._sealer.open(name, (self.path / name).read_bytes())
        except FileNotFoundError:
            return None
        try:
            if data is None:
                raise DecodeError("it does not open with seal.key")
            return cls.FromString(data)
        except DecodeError as e:
            log.warning("%s ignored: %s", self.path / name, e)
            return None

    def save_session(self, msg: dispatcher_pb2.SessionMessage) -> None:
        self._put_sealed("session.sealed", msg)

    def last_session(self) -> dispatcher_pb2.SessionMessage | None:
        return self._get_sealed("session.sealed", dispatcher_pb2.SessionMessage)

    def save_network_keys(self, keys: dict[str, Iterable[types_pb2.EncryptionKey]]) -> None:
        msg = dispatcher_pb2.AssignmentsMessage()
        for nid, ks in sorted(keys.items()):
            msg.changes.add().assignment.network_keys.CopyFrom(
                dispatcher_pb2.NetworkKeys(network_id=nid, keys=list(ks)))
        self._put_sealed("network-keys.sealed", msg)

    def network_keys(self) -> dict[str, list[types_pb2.EncryptionKey]]:
        msg = self._get_sealed("network-keys.sealed", dispatcher_pb2.AssignmentsMessage)
        if msg is None:
            return {}
        return {ch.assignment.network_keys.network_id: list(ch.assignment.network_keys.keys) for ch in msg.changes}

    # ---- gossip peers ------------------------------------------------------------------------------
    def save_gossip_peers(self, addrs: Iterable[str]) -> None:
        text = "".join(f"{a}\n" for a in sorted(set(addrs)) if a)
        path = self.path / "gossip-peers"
        try:
            if path.read_text() == text:
                return
        except FileNotFoundError:
            pass
        write_record(path, text.encode())

    def gossip_peers(self) -> list[str]:
        try:
            return [line.strip() for line in (self.path / "gossip-peers").read_text().splitlines() if line.strip()]
        except FileNotFoundError:
            return []

    # ---- heartbeat period --------------------------------------------------------------------------
    def save_heartbeat_period(self, seconds: float) -> None:
        write_record(self.path / "heartbeat-period", f"{seconds:.3f}\n".encode())

    def heartbeat_period(self) -> float | None:
        """The kept period, or None (none kept, or not a positive number)."""
        try:
            value = float((self.path / "heartbeat-period").read_text())
        except (FileNotFoundError, ValueError):
            return None
        return value if value > 0 else None
