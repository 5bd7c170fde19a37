"""Gossip units without sockets: keyring sealing/rotation, replay checks, config validation."""

from __future__ import annotations

import struct

import pytest

from shoal.netdriver import keyring as kr
from shoal.netdriver.keyring import Keyring, KeyringError, ReplayError
from shoal.netdriver.networkdb import GossipConfig, NetworkDB

KEY1 = bytes(range(32))
KEY2 = bytes(range(100, 132))


def test_keyring_seal_open_rotation_and_rejection():
    a, rx = Keyring([KEY1], sender="a"), Keyring([KEY1], sender="rx")
    blob = a.seal(b"hello", b"udp")
    assert b"hello" not in blob
    assert len(blob) == len(b"hello") + kr.OVERHEAD
    with pytest.raises(KeyringError):
        rx.open(blob, b"tcp")  # label is authenticated
    with pytest.raises(KeyringError):
        Keyring([KEY2]).open(blob, b"udp")  # unknown key id
    tampered = bytearray(blob)
    tampered[-1] ^= 1
    with pytest.raises(KeyringError, match="authentication"):
        rx.open(bytes(tampered), b"udp")
    assert rx.replayed == 0  # a forgery is no replay, and it did not move the window
    assert rx.open(blob, b"udp") == b"hello"
    with pytest.raises(KeyringError):
        rx.open(Keyring().seal(b"plain", b"udp"), b"udp")  # plaintext refused when keys are set
    # rotation: b accepts both and sends with the new primary; rx (old key only) cannot read it
    b = Keyring([KEY1, KEY2], primary=KEY2, sender="b")
    assert b.open(a.seal(b"hello", b"udp"), b"udp") == b"hello"
    new = b.seal(b"x", b"udp")
    with pytest.raises(KeyringError):
        rx.open(new, b"udp")
    rx.add(KEY2)
    assert rx.open(new, b"udp") == b"x"
    with pytest.raises(ValueError, match="16, 24 or 32 bytes"):
        Keyring([b"short"])
    with pytest.raises(ValueError, match="primary"):
        b.remove(KEY2)


class Clock:
    def __init__(self, t: float = 1_800_000_000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def refused(rx: Keyring, blob: bytes, reason: str, label: bytes = b"udp") -> None:
    before = rx.replay_drops[reason]
    with pytest.raises(ReplayError, match=reason) as e:
        rx.open(blob, label)
    assert e.value.reason == reason and rx.replay_drops[reason] == before + 1


def test_replay_window_in_order_reordered_duplicate_and_too_old():
    clock = Clock()
    tx, rx = Keyring([KEY1], sender="tx", clock=clock), Keyring([KEY1], sender="rx", clock=clock)
    blobs = [tx.seal(b"%d" % i, b"udp") for i in range(kr.WINDOW + 10)]
    counters = [struct.unpack_from("!Q", b, 21)[0] for b in blobs[:3]]
    assert counters == [0, 1, 2]  # the counter sits after version, key id, sender, epoch
    # in order
    assert [rx.open(b, b"udp") for b in blobs[:3]] == [b"0", b"1", b"2"]
    # reordered within the window: 9 before 5..8, then the gap is filled, each once
    assert rx.open(blobs[9], b"udp") == b"9"
    for i in (7, 5, 8, 6):
        assert rx.open(blobs[i], b"udp") == b"%d" % i
    # duplicate (of the highest, and of one below it)
    refused(rx, blobs[9], "duplicate")
    refused(rx, blobs[6], "duplicate")
    # never seen (3, 4) but still inside the window: accepted once
    assert rx.open(blobs[4], b"udp") == b"4"
    refused(rx, blobs[4], "duplicate")
    # the highest moves past the window: 3 was never seen, but is now too old
    assert rx.open(blobs[kr.WINDOW + 5], b"udp") == b"%d" % (kr.WINDOW + 5)
    refused(rx, blobs[3], "too old")
    assert rx.open(blobs[kr.WINDOW + 4], b"udp") == b"%d" % (kr.WINDOW + 4)  # just inside
    # counters and windows are per channel: the tcp counter starts at 0 and lives apart
    t = tx.seal(b"frame", b"tcp")
    assert struct.unpack_from("!Q", t, 21)[0] == 0
    assert rx.open(t, b"tcp") == b"frame"
    refused(rx, t, "duplicate", b"tcp")
    assert rx.replayed == 5 and rx.replay_drops == {"duplicate": 4, "too old": 1}
    # a keyring refuses its own packets sent back to it
    refused(tx, tx.seal(b"me", b"udp"), "reflected")


def test_replay_epochs_and_stale_timestamps_after_receiver_restart():
    clock = Clock()
    old = Keyring([KEY1], sender="n1", epoch=1000, clock=clock)
    rx = Keyring([KEY1], sender="rx", clock=clock)
    a1, a2 = old.seal(b"a1", b"udp"), old.seal(b"a2", b"udp")
    assert rx.open(a1, b"udp") == b"a1"
    # the sender restarts: a newer epoch, counters from 0 again, accepted at once
    new = Keyring([KEY1], sender="n1", epoch=2000, clock=clock)
    b0 = new.seal(b"b0", b"udp")
    assert rx.open(b0, b"udp") == b"b0"
    # its previous life's packets are refused from now on, even one never seen
    refused(rx, a2, "old epoch")
    refused(rx, a1, "old epoch")
    # the receiver restarts (no windows). A capture younger than max_age is accepted (once)...
    clock.t += 30
    rx2 = Keyring([KEY1], sender="rx", clock=clock)
    assert rx2.open(b0, b"udp") == b"b0"
    refused(rx2, b0, "duplicate")
    # ...an older one is refused by its timestamp alone
    clock.t += 31
    rx3 = Keyring([KEY1], sender="rx", clock=clock)
    refused(rx3, b0, "stale")
    # fresh packets of the same sender still pass; one from a clock over max_age ahead does not
    assert rx3.open(new.seal(b"fresh", b"udp"), b"udp") == b"fresh"
    ahead = Keyring([KEY1], sender="n2", clock=Clock(clock.t + 61))
    refused(rx3, ahead.seal(b"future", b"udp"), "stale")
    slightly = Keyring([KEY1], sender="n3", clock=Clock(clock.t + 5))
    assert rx3.open(slightly.seal(b"ok", b"udp"), b"udp") == b"ok"
    # max_age is the receiver's setting
    strict = Keyring([KEY1], sender="rx", clock=clock, max_age=1.0)
    refused(strict, slightly.seal(b"late", b"udp"), "stale")


def test_old_and_unknown_format_versions_are_refused():
    tx, rx = Keyring([KEY1], sender="tx"), Keyring([KEY1], sender="rx")
    blob = tx.seal(b"x", b"udp")
    assert blob[0] == kr.VERSION == 2
    # a version 1 packet (key id | nonce | ciphertext, before replay protection), sealed right
    nonce = bytes(12)
    head = bytes([kr.VERSION_V1]) + kr.key_id(KEY1)
    v1 = head + nonce + kr.AESGCM(KEY1).encrypt(nonce, b"x", head + b"udp")
    with pytest.raises(KeyringError, match="version 1 refused"):
        rx.open(v1, b"udp")
    # the same packet relabelled as version 2 is refused too (the version byte is authenticated)
    with pytest.raises(KeyringError):
        rx.open(bytes([kr.VERSION]) + v1[1:] + bytes(kr.OVERHEAD), b"udp")
    with pytest.raises(KeyringError, match="version 3 refused"):
        rx.open(bytes([3]) + blob[1:], b"udp")
    assert rx.replayed == 0 and rx.open(blob, b"udp") == b"x"


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match="probe_timeout"):
        NetworkDB("x", "127.0.0.1", "127.0.0.1", config=GossipConfig(probe_interval=0.2, probe_timeout=0.3))
    with pytest.raises(ValueError, match="gossip_interval"):
        NetworkDB("x", "127.0.0.1", "127.0.0.1", config=GossipConfig(gossip_interval=0))
    with pytest.raises(ValueError, match="replay_max_age"):
        NetworkDB("x", "127.0.0.1", "127.0.0.1", config=GossipConfig(replay_max_age=0))


def test_bootstrap_keys_primary_is_the_second_oldest():
    from shoal.proto.types_pb2 import EncryptionKey

    k = [bytes([i]) * 16 for i in range(1, 5)]
    g = NetworkDB("x", "127.0.0.1", "127.0.0.1")
    g.set_bootstrap_keys([EncryptionKey(subsystem="networking:gossip", key=k[2], lamport_time=3),
                          EncryptionKey(subsystem="networking:gossip", key=k[0], lamport_time=1),
                          EncryptionKey(subsystem="networking:ipsec", key=k[3], lamport_time=9),
                          EncryptionKey(subsystem="networking:gossip", key=k[1], lamport_time=2)])
    assert g.keyring.primary == k[1] and set(g.keyring.keys) == {k[0], k[1], k[2]}
    # rotation by the managers: k0 dropped, k3 added -> k2 becomes primary
    g.set_bootstrap_keys([EncryptionKey(subsystem="networking:gossip", key=kk, lamport_time=t)
                          for kk, t in ((k[1], 2), (k[2], 3), (k[3], 4))])
    assert g.keyring.primary == k[2] and set(g.keyring.keys) == {k[1], k[2], k[3]}
    with pytest.raises(ValueError, match="networking:gossip"):
        g.set_bootstrap_keys([EncryptionKey(subsystem="networking:ipsec", key=k[0], lamport_time=1)])


def test_lifeguard_suspicion_timeout_shrinks_with_confirmations():
    ml = NetworkDB("x", "127.0.0.1", "127.0.0.1").membership
    lo, hi = 1.5, 4.5
    t = [ml._suspicion_timeout_for(c, 2, lo, hi) for c in range(4)]
    assert t[0] == hi and t[2] == lo and t[3] == lo and lo < t[1] < hi
    assert ml._suspicion_timeout_for(0, 0, lo, hi) == lo  # too few members to wait for confirmations
