"""Gossip units without sockets: keyring sealing/rotation, config validation."""

from __future__ import annotations

import pytest

from shoal.netdriver.gossip import Gossip, GossipConfig
from shoal.netdriver.keyring import Keyring, KeyringError

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
        Gossip("x", "127.0.0.1", "127.0.0.1", config=GossipConfig(probe_interval=0.2, probe_timeout=0.3))
    with pytest.raises(ValueError, match="gossip_interval"):
        Gossip("x", "127.0.0.1", "127.0.0.1", config=GossipConfig(gossip_interval=0))
