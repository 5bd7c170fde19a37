"""Gossip units without sockets: keyring sealing/rotation, config validation."""

from __future__ import annotations

import pytest

from shoal.netdriver.keyring import Keyring, KeyringError
from shoal.netdriver.networkdb import GossipConfig, NetworkDB

KEY1 = bytes(range(32))
KEY2 = bytes(range(100, 132))


def test_keyring_seal_open_rotation_and_rejection():
    a = Keyring([KEY1])
    blob = a.seal(b"hello", b"udp")
    assert b"hello" not in blob
    assert a.open(blob, b"udp") == b"hello"
    with pytest.raises(KeyringError):
        a.open(blob, b"tcp")  # label is authenticated
    with pytest.raises(KeyringError):
        Keyring([KEY2]).open(blob, b"udp")  # unknown key id
    tampered = bytearray(blob)
    tampered[-1] ^= 1
    with pytest.raises(KeyringError):
        a.open(bytes(tampered), b"udp")
    with pytest.raises(KeyringError):
        a.open(Keyring().seal(b"plain", b"udp"), b"udp")  # plaintext refused when keys are set
    # rotation: b accepts both and sends with the new primary; a (old key only) cannot read it
    b = Keyring([KEY1, KEY2], primary=KEY2)
    assert b.open(blob, b"udp") == b"hello"
    new = b.seal(b"x", b"udp")
    with pytest.raises(KeyringError):
        a.open(new, b"udp")
    a.add(KEY2)
    assert a.open(new, b"udp") == b"x"
    with pytest.raises(ValueError, match="16, 24 or 32 bytes"):
        Keyring([b"short"])
    with pytest.raises(ValueError, match="primary"):
        b.remove(KEY2)


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match="probe_timeout"):
        NetworkDB("x", "127.0.0.1", "127.0.0.1", config=GossipConfig(probe_interval=0.2, probe_timeout=0.3))
    with pytest.raises(ValueError, match="gossip_interval"):
        NetworkDB("x", "127.0.0.1", "127.0.0.1", config=GossipConfig(gossip_interval=0))


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
