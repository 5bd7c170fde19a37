"""The agent and its worker on the real engine (runc under conmon, images from a real registry),
talking to a real dispatcher over gRPC on loopback. Needs root."""

from __future__ import annotations

import asyncio
import contextlib
import os

import pytest
from agent_helpers import (
    PREFIX,
    add_node,
    make_task,
    manager_side,
    new_engine,
    run,
    set_task,
    task_state,
    wait_for,
)

from shoal.agent.agent import Agent
from shoal.agent.engine import NetworkSetup
from shoal.agent.worker import Worker
from shoal.proto import dispatcher_pb2, logs_pb2, logs_pb2_grpc, objects_pb2, specs_pb2, types_pb2

pytestmark = pytest.mark.integration
S = types_pb2


@contextlib.asynccontextmanager
async def running_agent(node_id: str, addr: str, engine, tmp_path):
    agent = Agent(node_id, tmp_path, [addr], None, engine, hostname=node_id)
    t = asyncio.create_task(agent.run())
    try:
        yield agent
    finally:
        t.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await t


def test_worker_walks_a_task_to_running_then_shutdown_and_remove(engine_root, registry) -> None:
    """The worker alone: every state in order, then desired SHUTDOWN and removal."""

    async def main() -> None:
        engine = new_engine(engine_root, registry)
        seen: list[tuple[int, types_pb2.TaskStatus]] = []
        w = Worker(engine, "n1", lambda tid, st: seen.append((st.state, st)))
        await w.start()
        t = make_task("n1", "sleep", "60", grace_s=5)
        msg = dispatcher_pb2.AssignmentsMessage(type=dispatcher_pb2.AssignmentsMessage.COMPLETE)
        msg.changes.add().assignment.task.CopyFrom(t)
        w.apply(msg)
        await wait_for(lambda: seen and seen[-1][0] == S.RUNNING, what="RUNNING")
        assert [s for s, _ in seen] == [S.ACCEPTED, S.PREPARING, S.READY, S.STARTING, S.RUNNING]
        running = seen[-1][1]
        assert running.container.container_id == t.id and running.container.pid > 0
        info = await engine.inspect(t.id)
        assert info.status == "running" and info.labels["com.docker.swarm.task.id"] == t.id
        assert info.name == t.annotations.name

        down = objects_pb2.Task()
        down.CopyFrom(t)
        down.desired_state = S.SHUTDOWN
        w.update([dispatcher_pb2.AssignmentChange(assignment=dispatcher_pb2.Assignment(task=down))])
        await wait_for(lambda: seen[-1][0] == S.SHUTDOWN, what="SHUTDOWN")
        assert (await engine.inspect(t.id)).status == "exited"  # stopped, kept for logs

        rm = dispatcher_pb2.AssignmentChange(action=dispatcher_pb2.AssignmentChange.REMOVE)
        rm.assignment.task.id = t.id
        w.update([rm])
        await wait_for(lambda: t.id not in w.controllers, what="controller gone")
        assert [c.id for c in await engine.list()] == []
        await w.close()
        await engine.close()

    run(main())


def test_exit_codes_bad_image_and_secrets_through_the_dispatcher(engine_root, registry, tmp_path) -> None:
    async def main() -> None:
        engine = new_engine(engine_root, registry)
        async with manager_side() as (st, _disp, _broker, addr):
            await add_node(st, "n1")
            sec = objects_pb2.Secret(
                id="sec1",
                spec=specs_pb2.SecretSpec(annotations=types_pb2.Annotations(name="pw"), data=b"hunter2"),
            )
            await st.update(lambda tx: tx.create(sec))
            svc = objects_pb2.Service(
                id="svc-id", spec=specs_pb2.ServiceSpec(annotations=types_pb2.Annotations(name="svc"))
            )
            await st.update(lambda tx: tx.create(svc))
            ok = make_task("n1", "sh", "-c", "cat /run/secrets/pw; echo; exit 0", secrets=[sec])
            bad = make_task("n1", "sh", "-c", "exit 3", slot=2)
            noimg = make_task("n1", image=f"{registry.host}/nosuchimage:1", slot=3)
            oom = make_task("n1", "dd", "if=/dev/zero", "of=/dev/null", "bs=128M", "count=1", slot=4)
            oom.spec.resources.limits.memory_bytes = 32 << 20
            for t in (ok, bad, noimg, oom):
                await st.update(lambda tx, t=t: tx.create(t))
            async with running_agent("n1", addr, engine, tmp_path):
                for t in (ok, bad, noimg, oom):
                    await wait_for(
                        lambda t=t: task_state(st, t.id) >= S.COMPLETE, what=f"task {t.id} finished"
                    )
                assert st.get("node", "n1").status.state == types_pb2.NodeStatus.READY
                assert st.get("node", "n1").description.hostname == "n1"
                assert st.get("node", "n1").description.resources.nano_cpus > 0

                s_ok, s_bad, s_noimg = (st.get("task", t.id).status for t in (ok, bad, noimg))
                assert s_ok.state == S.COMPLETE and s_ok.container.exit_code == 0
                assert s_bad.state == S.FAILED and s_bad.container.exit_code == 3
                assert s_bad.err == "task: non-zero exit (3)"
                s_oom = st.get("task", oom.id).status
                assert s_oom.state == S.FAILED and s_oom.container.exit_code == 137
                assert "OOM" in s_oom.err and "out of memory" in s_oom.err
                assert s_noimg.state == S.REJECTED
                assert "nosuchimage" in s_noimg.err and "\n" not in s_noimg.err
                # The secret reached the container (on its tmpfs) and nothing of it is in the engine root.
                lines = [ln.line async for ln in engine.logs(ok.id)]
                assert lines == ["hunter2"]
                # Nothing is left of the rejected task.
                assert {c.id for c in await engine.list()} == {ok.id, bad.id, oom.id}

                # Logs through the broker, like `swarmctl task logs`.
                import grpc

                async with grpc.aio.insecure_channel(addr) as ch:
                    req = logs_pb2.SubscribeLogsRequest(
                        selector=logs_pb2.LogSelector(service_ids=["svc"]),
                        options=logs_pb2.LogSubscriptionOptions(tail=-1),
                    )
                    got = [m async for r in logs_pb2_grpc.LogsStub(ch).SubscribeLogs(req) for m in r.messages]
                assert [(m.context.task_id, m.data) for m in got] == [(ok.id, b"hunter2")]
                assert got[0].context.node_id == "n1" and got[0].timestamp.seconds > 0

                # The reaper deletes finished tasks: their containers go.
                for t in (ok, bad, oom):
                    await st.update(lambda tx, t=t: tx.delete(st.get("task", t.id)))
                await wait_for(lambda: not engine.state.metas(), what="containers removed")
        await engine.close()

    run(main())


def test_agent_restart_readopts_running_containers_without_duplicates(
    engine_root, registry, tmp_path
) -> None:
    async def main() -> None:
        async with manager_side() as (st, _disp, _broker, addr):
            await add_node(st, "n1")
            keep = make_task("n1", "sleep", "600")
            gone = make_task("n1", "sleep", "600", slot=2)
            for t in (keep, gone):
                await st.update(lambda tx, t=t: tx.create(t))
            engine = new_engine(engine_root, registry)
            async with running_agent("n1", addr, engine, tmp_path):
                await wait_for(
                    lambda: all(task_state(st, t.id) == S.RUNNING for t in (keep, gone)), what="RUNNING"
                )
            await engine.close()
            pid = (await new_engine(engine_root, registry).inspect(keep.id)).pid
            assert pid > 0

            # While the agent is away the task `gone` is deleted from the store (e.g. service removed).
            await st.update(lambda tx: tx.delete(st.get("task", gone.id)))

            engine = new_engine(engine_root, registry)
            async with running_agent("n1", addr, engine, tmp_path) as agent:
                await wait_for(agent.connected.is_set, what="session")
                await wait_for(lambda: [c.id for c in engine.state.metas()] == [keep.id], what="orphan removed")
                info = await engine.inspect(keep.id)
                assert info.status == "running" and info.pid == pid  # the same process, not a new one
                assert task_state(st, keep.id) == S.RUNNING

                # Shut down through the store: stopped within its grace period.
                await set_task(st, keep.id, desired_state=S.SHUTDOWN)
                await wait_for(lambda: task_state(st, keep.id) == S.SHUTDOWN, what="SHUTDOWN")
            await engine.close()

    run(main())


def test_unhealthy_container_fails_its_task(engine_root, registry, tmp_path) -> None:
    async def main() -> None:
        engine = new_engine(engine_root, registry)
        async with manager_side() as (st, _disp, _broker, addr):
            await add_node(st, "n1")
            t = make_task("n1", "sleep", "600", image=f"{registry.host}/hc:latest")
            await st.update(lambda tx: tx.create(t))
            async with running_agent("n1", addr, engine, tmp_path):
                await wait_for(lambda: task_state(st, t.id) >= S.FAILED, what="FAILED")
                status = st.get("task", t.id).status
                assert status.state == S.FAILED and status.err == "task: container is unhealthy"
        await engine.close()

    run(main())


def test_task_with_a_health_check_is_running_once_healthy(engine_root, registry) -> None:
    """As Docker: STARTING until the first passing probe, then RUNNING (a start-first update relies on it)."""

    async def main() -> None:
        engine = new_engine(engine_root, registry)
        events: list[tuple[str, object]] = []
        engine.on_health_change = lambda cid, status: events.append(("health", status))
        w = Worker(engine, "n1", lambda tid, st: events.append(("state", st.state)))
        await w.start()
        t = make_task("n1", "sh", "-c", "touch /tmp/healthy; exec sleep 600", image=f"{registry.host}/hc:latest",
                      grace_s=0)
        msg = dispatcher_pb2.AssignmentsMessage(type=dispatcher_pb2.AssignmentsMessage.COMPLETE)
        msg.changes.add().assignment.task.CopyFrom(t)
        try:
            w.apply(msg)
            await wait_for(lambda: ("state", S.RUNNING) in events, what="RUNNING")
            states = [v for k, v in events if k == "state"]
            assert states == [S.ACCEPTED, S.PREPARING, S.READY, S.STARTING, S.RUNNING], events
            assert events.index(("health", "healthy")) < events.index(("state", S.RUNNING)), events
        finally:
            await w.close()
            for c in await engine.list():
                await engine.remove(c.id)
            await engine.close()

    run(main())


class NetnsHooks:
    """A minimal real network hook: a named netns per task holding one veth pair."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []

    def name(self, task_id: str) -> str:
        return f"{PREFIX}-{task_id[:8]}"

    async def prepare(self, task: objects_pb2.Task, *, active: bool = True) -> NetworkSetup:
        from pyroute2 import NetNS, netns

        self.calls.append(("prepare" if active else "prepare-inactive", task.id))
        name = self.name(task.id)

        def make() -> None:  # pyroute2 is synchronous: keep it off the event loop
            if not os.path.exists(f"/run/netns/{name}"):
                netns.create(name)
                with NetNS(name) as ns:
                    ns.link("add", ifname="stdummy0", kind="veth", peer="stdummy1")

        await asyncio.to_thread(make)
        return NetworkSetup(netns_path=f"/run/netns/{name}", extra_hosts=["198.19.0.9 peer.example"])

    def set_network_keys(self, network_id: str, keys) -> None:
        self.calls.append(("keys", network_id))

    def set_all_network_keys(self, keys: dict) -> None:
        for nid in sorted(keys):
            self.calls.append(("keys", nid))

    async def activate(self, task_id: str) -> None:
        self.calls.append(("activate", task_id))

    async def deactivate(self, task_id: str) -> None:
        self.calls.append(("deactivate", task_id))

    async def release(self, task_id: str) -> None:
        from pyroute2 import netns

        self.calls.append(("release", task_id))
        if os.path.exists(f"/run/netns/{self.name(task_id)}"):
            await asyncio.to_thread(netns.remove, self.name(task_id))


def test_network_hooks_around_the_container_life(engine_root, registry) -> None:
    async def main() -> None:
        net = NetnsHooks()
        t = make_task("n1", "sh", "-c", "cat /proc/net/dev; grep peer /etc/hosts; sleep 600", grace_s=0)
        try:
            engine = new_engine(engine_root, registry)
            seen: list[int] = []
            w = Worker(engine, "n1", lambda tid, st: seen.append(st.state), network=net)
            await w.start()
            msg = dispatcher_pb2.AssignmentsMessage(type=dispatcher_pb2.AssignmentsMessage.COMPLETE)
            msg.changes.add().assignment.task.CopyFrom(t)
            w.apply(msg)
            await wait_for(lambda: seen and seen[-1] >= S.RUNNING, what="RUNNING")
            assert seen[-1] == S.RUNNING
            for _ in range(100):
                lines = [ln.line async for ln in engine.logs(t.id)]
                if any("peer.example" in ln for ln in lines):
                    break
                await asyncio.sleep(0.05)
            assert any("stdummy0" in ln for ln in lines), lines  # the container joined the hook's netns
            assert any("198.19.0.9" in ln and "peer.example" in ln for ln in lines)
            # Created without serving its service; it serves once it runs (no health check here).
            await wait_for(lambda: len(net.calls) == 2, what="activate once running")
            assert net.calls == [("prepare-inactive", t.id), ("activate", t.id)]

            # A new worker (agent restart) re-adopts the container and prepares its networking again.
            await w.close()
            await engine.close()
            engine = new_engine(engine_root, registry)
            w = Worker(engine, "n1", lambda tid, st: seen.append(st.state), network=net)
            await w.start()
            w.apply(msg)
            await wait_for(lambda: len(net.calls) == 3, what="prepare on re-adoption")
            assert net.calls[2] == ("prepare", t.id)  # a running container kept serving

            # Removal: out of the service first, then the container, then the networking.
            rm = dispatcher_pb2.AssignmentChange(action=dispatcher_pb2.AssignmentChange.REMOVE)
            rm.assignment.task.id = t.id
            w.update([rm])
            await wait_for(lambda: t.id not in w.controllers, what="controller gone")
            assert net.calls[3:] == [("deactivate", t.id), ("release", t.id)]
            assert not os.path.exists(f"/run/netns/{net.name(t.id)}")
            assert await engine.list() == []
            await w.close()
            await engine.close()
        finally:
            await net.release(t.id)

    run(main())


def test_a_restarted_worker_resumes_its_tasks_from_disk_before_any_manager(engine_root, registry, tmp_path) -> None:
    """Issue 16: assignments on disk. A worker with a LocalState keeps its tasks (with their last
    reported status), never a secret's data nor a network key in clear; a new worker on the same
    state resumes the task of every running container at start(), before any assignment arrives:
    same container, same process, networking prepared again. A task with no container waits for a
    manager, and the first complete set is the authority (what it leaves out is stopped)."""
    from shoal.agent.localstate import LocalState

    async def main() -> None:
        net = NetnsHooks()
        sec = objects_pb2.Secret(id="sec1")
        sec.spec.annotations.name = "pw"
        sec.spec.data = b"the-secret-payload-in-clear"
        keep = make_task("n1", "sleep", "600", secrets=[sec], grace_s=0)
        ipsec = types_pb2.EncryptionKey(subsystem="networking:ipsec", key=b"K" * 32, lamport_time=1)
        msg = dispatcher_pb2.AssignmentsMessage(type=dispatcher_pb2.AssignmentsMessage.COMPLETE)
        msg.changes.add().assignment.task.CopyFrom(keep)
        msg.changes.add().assignment.secret.CopyFrom(sec)
        msg.changes.add().assignment.network_keys.CopyFrom(dispatcher_pb2.NetworkKeys(network_id="netX", keys=[ipsec]))
        state_dir = tmp_path / "worker"
        try:
            engine = new_engine(engine_root, registry)
            seen: list[tuple[str, int]] = []
            w = Worker(engine, "n1", lambda tid, st: seen.append((tid, st.state)), network=net,
                       state=LocalState(state_dir))
            await w.start()
            w.apply(msg)
            await wait_for(lambda: (keep.id, S.RUNNING) in seen, what="RUNNING")
            pid = (await engine.inspect(keep.id)).pid
            on_disk = b"".join(p.read_bytes() for p in state_dir.rglob("*") if p.is_file())
            assert b"the-secret-payload-in-clear" not in on_disk and b"K" * 32 not in on_disk
            # a task that never got a container (assigned while the agent went away)
            late = make_task("n1", "sleep", "600", slot=2)
            LocalState(state_dir).tasks.put(late.id, late)
            await w.close()
            await engine.close()

            # The restart: no assignment is ever applied until the checks below are done.
            seen.clear()
            net.calls.clear()
            engine = new_engine(engine_root, registry)
            state = LocalState(state_dir)
            assert state.tasks.get(keep.id).status.state == S.RUNNING  # the status it last reported
            w = Worker(engine, "n1", lambda tid, st: seen.append((tid, st.state)), network=net, state=state)
            await w.start()
            assert list(w.controllers) == [keep.id]  # resumed at once; `late` waits for a manager
            assert ("keys", "netX") in net.calls  # encrypted networks' keys back before any prepare
            await wait_for(lambda: ("prepare", keep.id) in net.calls, what="networking prepared again")
            await wait_for(lambda: (keep.id, S.RUNNING) in seen, what="RUNNING reported again")
            info = await engine.inspect(keep.id)
            assert info.status == "running" and info.pid == pid  # the same process

            # A manager answers: its complete set no longer lists `keep` -> stopped and removed.
            w.apply(dispatcher_pb2.AssignmentsMessage(type=dispatcher_pb2.AssignmentsMessage.COMPLETE))
            await wait_for(lambda: not w.controllers, what="controller gone")
            assert await engine.list() == []
            assert state.tasks.keys() == [] and state.network_keys() == {}
            await w.close()
            await engine.close()
        finally:
            await net.release(keep.id)

    run(main())
