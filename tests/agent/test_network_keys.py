"""Encrypted networks' IPsec keys on the agent: from the dispatcher's assignments to the network agent."""

from __future__ import annotations

from pathlib import Path

from shoal.agent.agent import data_path_capabilities, describe_node
from shoal.agent.network import NetworkAgent, primary_first
from shoal.agent.worker import Worker
from shoal.netdriver import xfrm
from shoal.proto import dispatcher_pb2, types_pb2

D = dispatcher_pb2


def key(k: bytes, t: int, subsystem: str = "networking:ipsec") -> types_pb2.EncryptionKey:
    return types_pb2.EncryptionKey(subsystem=subsystem, key=k, lamport_time=t)


def test_the_second_oldest_key_sends() -> None:
    ks = [key(b"c", 3), key(b"a", 1), key(b"g", 2, "networking:gossip"), key(b"b", 2)]
    assert primary_first(ks, ("networking:ipsec",)) == [b"b", b"a", b"c"]
    assert primary_first([key(b"a", 7)], ("networking:ipsec",)) == [b"a"]
    assert primary_first(ks, ("networking:gossip",)) == [b"g"]


class Recorder:
    """The worker's network hooks, recording the keys it is given."""

    def __init__(self) -> None:
        self.keys: dict[str, list[bytes]] = {}
        self.calls: list[str] = []

    def set_network_keys(self, nid, keys) -> None:
        self.calls.append(f"{'remove' if keys is None else 'set'} {nid}")
        if keys is None:
            self.keys.pop(nid, None)
        else:
            self.keys[nid] = primary_first(keys, ("networking:ipsec",))

    def set_all_network_keys(self, keys) -> None:
        self.calls.append("all " + ",".join(sorted(keys)))
        self.keys = {nid: primary_first(ks, ("networking:ipsec",)) for nid, ks in keys.items()}


def keys_change(nid: str, keys=(), remove: bool = False) -> D.AssignmentChange:
    ch = D.AssignmentChange(action=D.AssignmentChange.REMOVE if remove else D.AssignmentChange.UPDATE)
    ch.assignment.network_keys.network_id = nid
    ch.assignment.network_keys.keys.extend(keys)
    return ch


def test_worker_hands_complete_and_incremental_keys_to_the_network() -> None:
    net = Recorder()
    w = Worker(object(), "n1", lambda tid, st: None, network=net)
    ring = [key(b"1" * 32, 1), key(b"2" * 32, 2), key(b"3" * 32, 3)]
    w.apply(D.AssignmentsMessage(type=D.AssignmentsMessage.COMPLETE,
                                 changes=[keys_change("netA", ring), keys_change("netB", ring[:1])]))
    assert net.keys == {"netA": [b"2" * 32, b"1" * 32, b"3" * 32], "netB": [b"1" * 32]}
    rotated = ring[1:] + [key(b"4" * 32, 4)]
    w.apply(D.AssignmentsMessage(type=D.AssignmentsMessage.INCREMENTAL,
                                 changes=[keys_change("netA", rotated), keys_change("netB", remove=True)]))
    assert net.keys == {"netA": [b"3" * 32, b"2" * 32, b"4" * 32]}
    assert net.calls == ["all netA,netB", "all netA"]  # the whole set each time: what is left out goes


def test_network_agent_keeps_keys_primary_first_and_forgets_networks_left_out(tmp_path: Path) -> None:
    na = NetworkAgent("n1", "198.18.0.9", tmp_path, "tk")
    ring = [key(b"x" * 32, 5), key(b"y" * 32, 6)]
    na.set_all_network_keys({"netA": ring, "netB": ring})
    assert na._net_keys == {"netA": [b"y" * 32, b"x" * 32], "netB": [b"y" * 32, b"x" * 32]}
    na.set_all_network_keys({"netB": ring[:1]})
    assert na._net_keys == {"netB": [b"x" * 32]}
    na.set_network_keys("netB", None)
    assert na._net_keys == {}


def test_node_description_names_the_ipsec_capability_only_with_a_data_path() -> None:
    assert data_path_capabilities("127.0.0.5") == []  # a loopback node has no data path at all
    assert data_path_capabilities("") == []
    expected = ["ipsec-esp"] if xfrm.esp_supported() else []
    assert data_path_capabilities("198.18.0.9") == expected
    d = describe_node("h1", "198.18.0.9", {}, data_path_capabilities("198.18.0.9"))
    assert list(d.capabilities) == expected


def test_sa_derivation_is_per_direction_and_per_key() -> None:
    a, b = "198.18.0.1", "198.18.0.2"
    k1, k2 = b"1" * 32, b"2" * 32
    spi_ab, key_ab = xfrm.derive_sa(k1, a, b)
    spi_ba, key_ba = xfrm.derive_sa(k1, b, a)
    assert (spi_ab, key_ab) == xfrm.derive_sa(k1, a, b)  # both ends compute the same
    assert spi_ab != spi_ba and key_ab != key_ba  # each direction its own key
    assert xfrm.derive_sa(k2, a, b)[0] != spi_ab
    assert len(key_ab) == xfrm.SA_KEY_LEN == 36 and spi_ab >= 0x100
