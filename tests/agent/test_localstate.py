"""What the agent keeps on disk between runs (shoal.agent.localstate): records written whole,
sealed records that open only under their own name and key, damaged files read as absent."""

from __future__ import annotations

import os
from pathlib import Path

from shoal.agent.localstate import LocalState, RecordDir, Sealer, write_record
from shoal.proto import dispatcher_pb2, objects_pb2, types_pb2

GOSSIP_KEY = b"G" * 16
IPSEC_KEY = b"I" * 32


def session() -> dispatcher_pb2.SessionMessage:
    msg = dispatcher_pb2.SessionMessage(session_id="s1")
    msg.managers.add(addr="198.18.0.1:2377")
    msg.network_bootstrap_keys.add(subsystem="networking:gossip", key=GOSSIP_KEY, lamport_time=3)
    return msg


def every_byte(root: Path) -> bytes:
    return b"".join(p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file())


def test_records_round_trip_skip_unchanged_writes_and_damaged_files_read_as_absent(tmp_path: Path) -> None:
    rd: RecordDir[objects_pb2.Task] = RecordDir(tmp_path / "tasks", objects_pb2.Task)
    assert rd.keys() == [] and rd.get("t1") is None
    t = objects_pb2.Task(id="t1", node_id="n1", desired_state=types_pb2.RUNNING)
    rd.put("t1", t)
    f = tmp_path / "tasks" / "t1.pb"
    assert oct(f.stat().st_mode & 0o777) == "0o600" and oct((tmp_path / "tasks").stat().st_mode & 0o777) == "0o700"
    before = f.stat().st_mtime_ns
    os.utime(f, ns=(before - 10**9, before - 10**9))
    rd.put("t1", t)  # the same bytes: not written again
    assert f.stat().st_mtime_ns == before - 10**9
    again: RecordDir[objects_pb2.Task] = RecordDir(tmp_path / "tasks", objects_pb2.Task)
    assert again.get("t1") == t and [k for k, _ in again.items()] == ["t1"]
    f.write_bytes(b"\xff\xff\xff")  # not a Task
    assert again.get("t1") is None
    again.delete("t1")
    assert again.keys() == [] and not f.exists()
    for bad in ("", "../x", ".hidden", "a/b"):
        try:
            rd.put(bad, t)
        except ValueError as e:
            assert "not a plain file name" in str(e)
        else:
            raise AssertionError(f"key {bad!r} accepted")


def test_sealed_records_hold_no_key_in_clear_and_open_only_under_their_name_and_key(tmp_path: Path) -> None:
    st = LocalState(tmp_path / "worker")
    st.save_session(session())
    st.save_network_keys({"netA": [types_pb2.EncryptionKey(subsystem="networking:ipsec", key=IPSEC_KEY, lamport_time=1)]})
    raw = every_byte(tmp_path / "worker")
    assert GOSSIP_KEY not in raw and IPSEC_KEY not in raw and b"198.18.0.1:2377" not in raw
    assert oct((tmp_path / "worker" / "seal.key").stat().st_mode & 0o777) == "0o600"

    reopened = LocalState(tmp_path / "worker")  # a new process: the same key from seal.key
    assert reopened.last_session() == session()
    assert reopened.network_keys()["netA"][0].key == IPSEC_KEY

    # a sealed file moved to another name does not open (its name is associated data)
    sealed = (tmp_path / "worker" / "session.sealed").read_bytes()
    write_record(tmp_path / "worker" / "network-keys.sealed", sealed)
    assert reopened.network_keys() == {}
    # altered: absent, not an exception
    write_record(tmp_path / "worker" / "session.sealed", sealed[:-1] + bytes([sealed[-1] ^ 1]))
    assert reopened.last_session() is None
    # under another key: absent
    other = Sealer(tmp_path / "other.key")
    assert other.open("session.sealed", sealed) is None
    assert Sealer(tmp_path / "worker" / "seal.key").open("session.sealed", sealed) is not None


def test_gossip_peers_are_kept_sorted_once_each(tmp_path: Path) -> None:
    st = LocalState(tmp_path / "w")
    assert st.gossip_peers() == []
    st.save_gossip_peers(["198.18.0.5:7946", "198.18.0.4:7946", "198.18.0.5:7946", ""])
    assert LocalState(tmp_path / "w").gossip_peers() == ["198.18.0.4:7946", "198.18.0.5:7946"]


def test_the_heartbeat_period_is_kept_and_a_damaged_one_reads_as_absent(tmp_path: Path) -> None:
    st = LocalState(tmp_path / "w")
    assert st.heartbeat_period() is None
    st.save_heartbeat_period(4.0)
    assert LocalState(tmp_path / "w").heartbeat_period() == 4.0
    for bad in ("", "four\n", "-1\n", "0\n"):
        (tmp_path / "w" / "heartbeat-period").write_text(bad)
        assert st.heartbeat_period() is None, bad
