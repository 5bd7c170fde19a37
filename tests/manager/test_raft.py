"""RaftStore with real member processes talking Raft over TCP on 127.0.0.x (no mocks).

Each member is `python -m shoal.manager.raft`, driven by one command per stdin line."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from shoal.proto import store_pb2


def free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class Member:
    def __init__(self, base: Path, idx: int, addr: str, peers: list[str], extra: list[str] | None = None) -> None:
        self.idx = idx
        self.addr = addr
        self.dir = base / f"m{idx}"
        self.peers = peers
        self.extra = extra or []
        self.proc: subprocess.Popen[str] | None = None
        self.lock = threading.Lock()
        self.start()

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "shoal.manager.raft", "--dir", str(self.dir), "--addr", self.addr,
             "--peers", ",".join(self.peers), *self.extra],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=open(self.dir.parent / f"m{self.idx}.log", "a"),  # noqa: SIM115
            text=True,
        )

    def cmd(self, line: str) -> dict:
        assert self.proc is not None and self.proc.stdin and self.proc.stdout
        with self.lock:
            self.proc.stdin.write(line + "\n")
            self.proc.stdin.flush()
            out = self.proc.stdout.readline()
        if not out:
            raise EOFError(f"member {self.idx} is gone")
        return json.loads(out)

    def ok(self, line: str) -> object:
        ans = self.cmd(line)
        assert "ok" in ans, f"{line!r} on member {self.idx}: {ans}"
        return ans["ok"]

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            assert self.proc.stdin
            self.proc.stdin.close()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.kill()


@pytest.fixture
def cluster(tmp_path: Path):
    members: list[Member] = []

    def make(n: int = 3, extra: list[str] | None = None) -> list[Member]:
        addrs = []
        for i in range(n):
            host = f"127.0.0.{i + 1}"
            addrs.append(f"{host}:{free_port(host)}")
        for i, a in enumerate(addrs):
            members.append(Member(tmp_path, i, a, [x for x in addrs if x != a], extra))
        for m in members:
            m.ok("wait-leader")
        return members

    try:
        yield make
    finally:
        for m in members:
            m.kill()


def leader_of(members: list[Member]) -> tuple[Member, list[Member]]:
    for _ in range(500):
        alive = [m for m in members if m.proc and m.proc.poll() is None]
        st = {m.idx: m.ok("status") for m in alive}
        leaders = [m for m in alive if st[m.idx]["is_leader"]]
        if len(leaders) == 1 and all(s["leader"] == leaders[0].addr for s in st.values()):
            return leaders[0], [m for m in alive if m is not leaders[0]]
        time.sleep(0.01)
    raise AssertionError("no single leader")


def wait_count(m: Member, n: int) -> None:
    for _ in range(1000):
        if m.ok("count") >= n:
            return
        time.sleep(0.01)
    raise AssertionError(f"member {m.idx} has {m.ok('count')} secrets, expected {n}")


def test_replication_and_follower_writes(cluster):
    members = cluster(3)
    leader, followers = leader_of(members)
    leader.ok("create from-leader")
    followers[0].ok("create from-follower")
    for m in members:
        m.ok("barrier")
        assert m.ok("names") == ["from-follower", "from-leader"]
    st = leader.ok("status")
    assert st["has_quorum"] and all(st["members"].values()) and len(st["members"]) == 3


def test_conflicts_are_detected_across_replicas(cluster):
    members = cluster(3)
    leader, (f1, f2) = leader_of(members)
    v = f1.ok("create shared")
    for m in members:
        m.ok("barrier")
        assert m.ok("read shared") == v
    # Both followers read version v and write; the second one must be refused on every replica.
    f1.ok(f"update shared {v}")
    ans = f2.cmd(f"update shared {v}")
    assert ans["error"] == "Conflict" and "changed since it was read" in ans["message"]
    # The same name created on two replicas: the second is refused.
    ans = leader.cmd("create shared")
    assert ans["error"] == "AlreadyExists" and "already in use" in ans["message"]
    for m in members:
        m.ok("barrier")
        assert m.ok("read shared") > v
        assert m.ok("count") == 1


def test_quorum_loss_refuses_writes_but_answers_reads(cluster):
    members = cluster(3)
    leader, (f1, f2) = leader_of(members)
    leader.ok("create before")
    for m in members:
        m.ok("barrier")
    leader.kill()
    f2.kill()
    ans = f1.cmd("create after")
    assert ans["error"] == "Unavailable"
    assert ans["message"] == (
        "no quorum: 1 of 3 managers reachable; writes are refused until a majority is back"
    )
    assert f1.ok("names") == ["before"]  # reads still answer from the local replica
    # A majority back: writes are accepted again, and the restarted member caught up.
    f2.start()
    f1.ok("wait-leader 10")
    f1.ok("create after")
    f2.ok("barrier")
    assert f2.ok("names") == ["after", "before"]


def _writer(m: Member, prefix: str, acked: list[str], stop: threading.Event, n: int) -> None:
    for i in range(n):
        if stop.is_set():
            return
        name = f"{prefix}{i}"
        try:
            ans = m.cmd(f"create {name}")
        except (EOFError, BrokenPipeError, OSError):
            return  # this member was killed
        if "ok" in ans:
            acked.append(name)
        else:
            assert ans["error"] in ("Unavailable", "AlreadyExists"), ans


def test_kill_leader_during_writes_loses_no_acknowledged_write(cluster):
    members = cluster(3)
    leader, (f1, f2) = leader_of(members)
    acked_l: list[str] = []
    acked_f: list[str] = []
    stop = threading.Event()
    threads = [
        threading.Thread(target=_writer, args=(leader, "l", acked_l, stop, 100000)),
        threading.Thread(target=_writer, args=(f1, "f", acked_f, stop, 100000)),
    ]
    for t in threads:
        t.start()
    try:
        while len(acked_l) < 200 or len(acked_f) < 100:
            time.sleep(0.01)
        leader.kill()  # kill -9 mid-stream
        n_after = len(acked_f)
        while len(acked_f) < n_after + 100:  # the follower's writes go on with the new leader
            time.sleep(0.01)
    finally:
        stop.set()
        for t in threads:
            t.join()
    acked = set(acked_l) | set(acked_f)
    for m in (f1, f2):
        m.ok("barrier")
        names = set(m.ok("names"))
        assert acked <= names, f"member {m.idx} lost {sorted(acked - names)[:5]}"
    # The killed leader restarts from its journal and catches up.
    leader.start()
    leader.ok("wait-leader 10")
    leader.ok("barrier")
    assert acked <= set(leader.ok("names"))
    assert leader.ok("count") == f1.ok("count")


def test_snapshot_and_restart_from_journal(cluster):
    members = cluster(3, ["--compaction-min-entries", "50"])
    leader, (f1, f2) = leader_of(members)
    for i in range(120):
        f1.ok(f"create s{i}")
    for m in members:
        m.ok("barrier")
    f2.ok("compact")
    snap_file = f2.dir / "raft" / "snapshot.pb"
    for _ in range(500):
        if snap_file.exists():
            break
        time.sleep(0.01)
    snap = store_pb2.RaftSnapshot.FromString(snap_file.read_bytes())  # protobuf, not a pickle
    assert len(snap.store.objects) >= 50 and len(snap.members) == 3
    f2.kill()
    for i in range(120, 150):
        leader.ok(f"create s{i}")
    f2.start()  # snapshot + journal + what it missed from the leader
    f2.ok("wait-leader 10")
    f2.ok("barrier")
    assert f2.ok("count") == 150
    # Every member restarted at once recovers the full state from disk alone.
    for m in members:
        m.kill()
    for m in members:
        m.start()
    for m in members:
        m.ok("wait-leader 10")
        m.ok("barrier")
        assert m.ok("count") == 150


def test_dynamic_membership(tmp_path: Path):
    a_addr = f"127.0.0.1:{free_port('127.0.0.1')}"
    b_addr = f"127.0.0.2:{free_port('127.0.0.2')}"
    a = b = None
    try:
        a = Member(tmp_path, 0, a_addr, [])
        a.ok("wait-leader")
        for i in range(20):
            a.ok(f"create x{i}")
        a.ok("add " + b_addr)
        b = Member(tmp_path, 1, b_addr, [a_addr])
        b.ok("wait-leader 10")
        b.ok("barrier")
        assert b.ok("count") == 20
        b.ok("create from-b")
        st = a.ok("status")
        assert set(st["members"]) == {a_addr, b_addr}
        # Restarted, b remembers the membership (members.json), not just its command line.
        assert json.loads((b.dir / "raft" / "members.json").read_text()) == sorted([a_addr, b_addr])
        a.ok("remove " + b_addr)
        assert set(a.ok("status")["members"]) == {a_addr}
        a.ok("create alone-again")  # a single member is a majority again
    finally:
        for m in (a, b):
            if m is not None:
                m.kill()


def test_kill_follower_restarts_and_catches_up(cluster):
    members = cluster(3)
    leader, (f1, f2) = leader_of(members)
    leader.ok("create one")
    f2.kill()
    for i in range(30):
        leader.ok(f"create more{i}")
    f2.start()
    f2.ok("wait-leader 10")
    f2.ok("barrier")
    assert f2.ok("count") == 31
    assert os.path.getsize(f2.dir / "raft" / "journal.bin") > 0


def test_in_process_api_status_subscribe_and_transfer(tmp_path: Path):
    """The asyncio API of three RaftStores in one process: status, leadership notifications,
    barrier, follower writes and a leadership hand-over."""
    import asyncio

    from shoal.manager.raft import RaftStore
    from shoal.manager.store import Tx
    from shoal.proto import objects_pb2, specs_pb2, types_pb2

    async def main() -> None:
        addrs = [f"127.0.0.{i + 1}:{free_port(f'127.0.0.{i + 1}')}" for i in range(3)]
        stores = [
            RaftStore(tmp_path / f"s{i}", a, [x for x in addrs if x != a], b"k" * 32) for i, a in enumerate(addrs)
        ]
        try:
            q = stores[0].subscribe()
            st = await stores[0].wait_leader(10)
            while not (st.leader_addr and st.total == 3 and st.reachable == 3):
                st = await q.get()
            # Under load an election may still be settling: wait until all three agree on one leader.
            for _ in range(200):
                leader = next((s for s in stores if s.is_leader()), None)
                if leader is not None and all(s.leader_addr() == leader.self_addr for s in stores):
                    break
                await asyncio.sleep(0.05)
            assert leader is not None
            follower = next(s for s in stores if s is not leader)
            assert leader.is_leader() and not follower.is_leader()
            assert follower.leader_addr() == leader.self_addr
            assert {m.addr for m in follower.members()} == set(addrs)

            tx = Tx(follower.sm)
            tx.create(objects_pb2.Config(spec=specs_pb2.ConfigSpec(annotations=types_pb2.Annotations(name="c"), data=b"1")))
            version = await follower.propose(tx.transaction())
            for s in stores:
                assert await s.barrier() >= version
                assert s.sm.get_by_name("config", "c") is not None

            assert await leader.transfer_leadership()
            st = await stores[0].wait_leader(10)
            while st.leader_addr in (None, leader.self_addr):
                st = await q.get()
            assert not leader.is_leader()
            stores[0].unsubscribe(q)
        finally:
            for s in stores:
                s.close()

    asyncio.run(main())
