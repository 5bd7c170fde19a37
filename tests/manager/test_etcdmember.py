"""EtcdMember with real etcd processes (Debian's etcd-server): unix client socket, peer mutual TLS
on 127.0.0.1, learners, supervision, orphans and stray processes."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import logging
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc
import pytest
from helpers.orphans import end_both, ends_with_its_parent
from helpers.waiting import wait_for_async

from shoal.lab.registry import free_port
from shoal.manager import ca
from shoal.manager.etcdmember import EtcdConfig, EtcdError, EtcdMember, parse_metrics, process_alive
from shoal.proto import etcd_pb2, etcd_pb2_grpc, types_pb2

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(shutil.which("etcd") is None, reason="etcd is not installed (scripts/setup)"),
]
CLUSTER = "clusteretcd"


@pytest.fixture(scope="module")
def root() -> ca.RootCA:
    return ca.RootCA.create(CLUSTER)


@pytest.fixture
def base() -> Iterator[Path]:
    """A short dir under /tmp (pytest's tmp_path can make the socket path too long)."""
    d = Path(tempfile.mkdtemp(prefix="etcd", dir="/tmp"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


def config(root: ca.RootCA, base: Path, name: str, role: int = types_pb2.MANAGER, **kw: object) -> EtcdConfig:
    key = ca.new_key()[1]
    cert = root.issue(ca.make_csr(key), name, role, CLUSTER, ips=["127.0.0.1"])
    kw.setdefault("peer_url", f"https://127.0.0.1:{free_port()}")
    return EtcdConfig(dir=base / name / "etcd", name=name, cert_pem=cert, key_pem=key, ca_pem=root.cert_pem,
                      **kw)  # type: ignore[arg-type]


@contextlib.asynccontextmanager
async def members() -> AsyncIterator[list[EtcdMember]]:
    """Every member appended to the list is stopped on the way out, whatever happened."""
    started: list[EtcdMember] = []
    try:
        yield started
    finally:
        for m in started:
            await m.stop(timeout=5)


async def put(m: EtcdMember, key: bytes, value: bytes) -> None:
    async with grpc.aio.insecure_channel(m.client_target) as ch:
        await etcd_pb2_grpc.KVStub(ch).Put(etcd_pb2.PutRequest(key=key, value=value), timeout=5)


async def get(m: EtcdMember, key: bytes) -> bytes | None:
    async with grpc.aio.insecure_channel(m.client_target) as ch:
        r = await etcd_pb2_grpc.KVStub(ch).Range(etcd_pb2.RangeRequest(key=key), timeout=5)
    return r.kvs[0].value if r.kvs else None


eventually = functools.partial(wait_for_async, timeout=10, interval=0.05)


# ---- (a) one member ------------------------------------------------------------------------------
def test_start_status_put_range_and_root_only_files(root, base):
    async def body() -> None:
        async with members() as ms:
            m = EtcdMember(config(root, base, "node1"))
            ms.append(m)
            assert not m.has_data and m.pid is None
            t0 = time.monotonic()
            await m.start()
            print(f"start() to Status answered: {time.monotonic() - t0:.3f} s")
            st = await m.status()
            assert st.version.startswith("3.4.") and st.leader == st.header.member_id and not st.isLearner
            await put(m, b"/shoal/a", b"1")
            assert await get(m, b"/shoal/a") == b"1"
            assert m.has_data and m.pid is not None
            assert m.client_target == f"unix://{m.socket_path}" and m.socket_path.name == "client.sock:0"
            assert m.socket_path.parent == m.data_dir.parent == Path(os.path.abspath(base / "node1" / "etcd"))
            assert int((m.dir / "etcd.pid").read_text()) == m.pid
            s = os.stat(m.socket_path)
            assert stat.S_ISSOCK(s.st_mode) and s.st_uid == 0 and s.st_mode & 0o077 == 0
            for d in (m.dir, m.data_dir, m.dir / "tls"):
                assert stat.S_IMODE(os.stat(d).st_mode) == 0o700, d
            for f in ("peer.crt", "peer.key", "ca.crt"):
                assert stat.S_IMODE(os.stat(m.dir / "tls" / f).st_mode) == 0o600, f
            assert stat.S_IMODE(os.stat(m.dir / "etcd.log").st_mode) == 0o600
            # the child got no ETCD_* variable and the flags we pass
            with open(f"/proc/{m.pid}/environ", "rb") as f:
                assert not [v for v in f.read().split(b"\0") if v.startswith(b"ETCD_")]
            with open(f"/proc/{m.pid}/cmdline", "rb") as f:
                argv = f.read().decode().split("\0")
            assert "--peer-cert-allowed-hostname=swarm-manager" in argv and "--peer-client-cert-auth=true" in argv
            await m.stop()
            assert m.pid is None and not (m.dir / "etcd.pid").exists()
            t0 = time.monotonic()
            await m.start()  # a restart of a single member with its data
            print(f"restart with data: {time.monotonic() - t0:.3f} s")
            assert await get(m, b"/shoal/a") == b"1"

    os.environ["ETCD_NAME"] = "must-not-reach-etcd"
    try:
        asyncio.run(body())
    finally:
        del os.environ["ETCD_NAME"]


def test_start_error_names_etcd_reason(root, base):
    async def body() -> None:
        with socket.socket() as busy:
            busy.bind(("127.0.0.1", 0))
            busy.listen()
            port = busy.getsockname()[1]
            m = EtcdMember(config(root, base, "node1", peer_url=f"https://127.0.0.1:{port}"))
            with pytest.raises(EtcdError, match=r"(?s)exited with code 1 while starting.*bind: address already in use"):
                await m.start()
            assert m.pid is None and not (m.dir / "etcd.pid").exists()
        long = EtcdMember(config(root, base / ("x" * 100), "node1"))
        with pytest.raises(EtcdError, match=r"more than the 107 .* shorter --state-dir than /tmp/etcd.*/x+/node1"):
            await long.start()
        assert not (base / ("x" * 100)).exists()

    asyncio.run(body())


# ---- (b) a second member joins over mutual TLS ---------------------------------------------------
async def add_learner(first: EtcdMember, cfg: EtcdConfig) -> tuple[int, EtcdConfig]:
    """MemberAdd(learner) on `first`; `cfg` completed with initial_cluster/"existing" from the answer."""
    async with grpc.aio.insecure_channel(first.client_target) as ch:
        r = await etcd_pb2_grpc.ClusterStub(ch).MemberAdd(
            etcd_pb2.MemberAddRequest(peerURLs=[cfg.peer_url], isLearner=True), timeout=5)
    cluster = tuple((m.name or cfg.name, u) for m in r.members for u in m.peerURLs)
    assert (cfg.name, cfg.peer_url) in cluster and len(cluster) == 2
    return r.member.ID, dataclasses.replace(cfg, initial_cluster=cluster, initial_state="existing")


def test_second_member_joins_as_learner_then_voter(root, base):
    async def body() -> None:
        async with members() as ms:
            m1 = EtcdMember(config(root, base, "node1"))
            ms.append(m1)
            await m1.start()
            for i in range(200):
                await put(m1, f"/shoal/k{i:03d}".encode(), b"v%d" % i)
            new_id, cfg2 = await add_learner(m1, config(root, base, "node2"))
            m2 = EtcdMember(cfg2)
            ms.append(m2)
            await m2.start()
            assert (await m2.status()).isLearner

            async def caught_up() -> bool:
                s1, s2 = await m1.status(), await m2.status()
                return s2.raftAppliedIndex >= s1.raftIndex

            await eventually(caught_up)

            async def promote() -> bool:
                async with grpc.aio.insecure_channel(m1.client_target) as ch:
                    try:
                        await etcd_pb2_grpc.ClusterStub(ch).MemberPromote(
                            etcd_pb2.MemberPromoteRequest(ID=new_id), timeout=5)
                        return True
                    except grpc.aio.AioRpcError as e:
                        # etcd's "learner not ready" (ErrGRPCLearnerNotReady) until the leader's own
                        # record of the learner's progress has caught up, which can lag the learner's
                        # applied index read above on a loaded machine
                        assert e.code() == grpc.StatusCode.FAILED_PRECONDITION, e
                        assert "can only promote a learner member which is in sync with leader" in (
                            e.details() or ""), e
                        return False

            await eventually(promote)
            async with grpc.aio.insecure_channel(m1.client_target) as ch:
                ml = await etcd_pb2_grpc.ClusterStub(ch).MemberList(etcd_pb2.MemberListRequest(), timeout=5)
            assert sorted((m.name, m.isLearner) for m in ml.members) == [("node1", False), ("node2", False)]
            assert not (await m2.status()).isLearner
            await put(m2, b"/shoal/from2", b"two")
            assert await get(m1, b"/shoal/from2") == b"two"
            await put(m1, b"/shoal/from1", b"one")
            assert await get(m2, b"/shoal/from1") == b"one"
            assert await get(m2, b"/shoal/k199") == b"v199"
            # the peer link shows in the metrics (what peer reachability will read)
            peers = (await m1.metrics())["etcd_network_active_peers"]
            assert [(labels["Remote"], v) for labels, v in peers] == [(f"{new_id:x}", 1.0)]

    asyncio.run(body())


# ---- (c) a worker certificate of the same CA is refused ------------------------------------------
def test_worker_certificate_cannot_join(root, base):
    async def body() -> None:
        async with members() as ms:
            m1 = EtcdMember(config(root, base, "node1"))
            ms.append(m1)
            await m1.start()
            await put(m1, b"/shoal/secret", b"s")
            learner_id, cfg = await add_learner(m1, config(root, base, "worker1", role=types_pb2.WORKER))
            w = EtcdMember(cfg)
            ms.append(w)
            # the joining member fetches the membership from node1 over peer TLS: node1 refuses it
            # (the joiner sees "tls: bad certificate", or with TLS 1.3 and a loaded machine an EOF or
            # reset: node1's own log below is what says why)
            with pytest.raises(EtcdError, match=r"(?s)exited with code 1 while starting.*failed to get cluster"):
                await w.start(timeout=15)

            async def rejected() -> bool:
                text = m1.log_path.read_text()
                return "rejected connection" in text and "client certificate authentication failed" in text \
                    and "swarm-worker" in text

            await eventually(rejected, timeout=5)
            assert not w.has_data
            async with grpc.aio.insecure_channel(m1.client_target) as ch:
                ml = await etcd_pb2_grpc.ClusterStub(ch).MemberList(etcd_pb2.MemberListRequest(), timeout=5)
            learner = next(m for m in ml.members if m.ID == learner_id)
            assert learner.isLearner and learner.name == ""  # never started: it never published itself

    asyncio.run(body())


# ---- (d) supervision -----------------------------------------------------------------------------
def test_run_restarts_killed_member_with_its_data(root, base, caplog):
    async def body() -> None:
        async with members() as ms:
            m = EtcdMember(config(root, base, "node1"))
            ms.append(m)
            await m.start()
            await put(m, b"/shoal/keep", b"yes")
            sup = asyncio.create_task(m.run())
            first = m.pid
            assert first is not None
            os.kill(first, signal.SIGKILL)

            async def restarted() -> bool:
                return m.pid not in (None, first)

            await eventually(restarted, timeout=5)
            assert await m.wait_ready(timeout=10)
            assert await get(m, b"/shoal/keep") == b"yes"
            assert int((m.dir / "etcd.pid").read_text()) == m.pid
            assert not sup.done()
            await m.stop()
            await asyncio.wait_for(sup, 5)  # run() returns after stop()

    with caplog.at_level(logging.INFO, logger="shoal.manager.etcdmember"):
        asyncio.run(body())
    lines = [r.getMessage() for r in caplog.records if "exited with code" in r.getMessage()]
    assert len(lines) == 1 and lines[0].startswith("etcd member node1 exited with code -9 (killed by SIGKILL): ")
    assert lines[0].endswith("; restarting in 0.5 s")


# ---- (e) orphans: a SIGKILLed swarmd takes its etcd down -----------------------------------------
CHILD = textwrap.dedent(
    """
    import asyncio, sys
    from pathlib import Path
    from shoal.manager.etcdmember import EtcdConfig, EtcdMember

    async def main():
        d = Path(sys.argv[1])
        cfg = EtcdConfig(dir=d / "etcd", name="node1", peer_url=sys.argv[2], cert_pem=(d / "c").read_bytes(),
                         key_pem=(d / "k").read_bytes(), ca_pem=(d / "ca").read_bytes())
        m = EtcdMember(cfg)
        await m.start()
        print(m.pid, flush=True)
        await asyncio.Event().wait()

    asyncio.run(main())
    """
)


def test_killed_parent_takes_etcd_down(root, base):
    cfg = config(root, base, "node1")
    d = base / "node1"
    d.mkdir(parents=True)
    for name, data in (("c", cfg.cert_pem), ("k", cfg.key_pem), ("ca", cfg.ca_pem)):
        (d / name).write_bytes(data)
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(d), cfg.peer_url], stdout=subprocess.PIPE, text=True)
    etcd_pid = 0
    try:
        assert child.stdout is not None
        etcd_pid = int(child.stdout.readline() or 0)
        assert etcd_pid and process_alive(etcd_pid) and int((cfg.dir / "etcd.pid").read_text()) == etcd_pid
        m = EtcdMember(cfg)
        asyncio.run(put(m, b"/shoal/survives", b"yes"))
        assert ends_with_its_parent(child, etcd_pid, 5), "etcd outlived its SIGKILLed parent"
    finally:
        end_both(child, etcd_pid)

    async def again() -> None:
        async with members() as ms:
            m = EtcdMember(cfg)
            ms.append(m)
            await m.start()
            assert await get(m, b"/shoal/survives") == b"yes"

    asyncio.run(again())


# ---- (f) a stray etcd named by etcd.pid is killed on start ---------------------------------------
def test_start_kills_stray_of_same_data_dir_only(root, base):
    async def body() -> None:
        async with members() as ms:
            cfg = config(root, base, "node1")
            stray = EtcdMember(cfg)
            ms.append(stray)
            await stray.start()
            await put(stray, b"/shoal/x", b"kept")
            stray_pid = stray.pid
            assert stray_pid is not None
            fresh = EtcdMember(cfg)  # as swarmd after a crash that left its etcd running
            ms.append(fresh)
            await fresh.start()
            assert not process_alive(stray_pid) and fresh.pid != stray_pid
            assert await get(fresh, b"/shoal/x") == b"kept"
            assert int((cfg.dir / "etcd.pid").read_text()) == fresh.pid
            await fresh.stop()
            # a pidfile naming some other live process: that process is left alone
            other = subprocess.Popen(["sleep", "30"])
            try:
                (cfg.dir / "etcd.pid").write_text(f"{other.pid}\n")
                await fresh.start()
                assert other.poll() is None
            finally:
                other.kill()
                other.wait()

    asyncio.run(body())


# ---- (g) metrics -----------------------------------------------------------------------------------
def test_metrics_has_leader(root, base):
    async def body() -> None:
        async with members() as ms:
            m = EtcdMember(config(root, base, "node1"))
            ms.append(m)
            await m.start()
            metrics = await m.metrics()
            assert metrics["etcd_server_has_leader"] == [({}, 1.0)]
            assert metrics["etcd_server_is_leader"] == [({}, 1.0)]
            assert "etcd_network_active_peers" not in metrics  # a single member has no peers

    asyncio.run(body())


def test_parse_metrics_text_format():
    text = textwrap.dedent(
        """\
        # HELP etcd_network_active_peers The current number of active peer connections.
        # TYPE etcd_network_active_peers gauge
        etcd_network_active_peers{Local="a1",Remote="b2"} 1
        weird{path="a \\"q\\" \\\\ b",x="}{ ,"} 2.5 1700000000000
        up NaN
        big +Inf
        not a metric line
        """
    )
    got = parse_metrics(text)
    assert got["etcd_network_active_peers"] == [({"Local": "a1", "Remote": "b2"}, 1.0)]
    assert got["weird"] == [({"path": 'a "q" \\ b', "x": "}{ ,"}, 2.5)]
    assert got["big"] == [({}, float("inf"))] and got["up"][0][1] != got["up"][0][1]
    assert "not" not in got
