"""Logs from real containers through agent → log broker → client: `service logs` / `task logs` of
`shoal.cli.logs` (tail, timestamps, prefixes) and a follow stream. Needs root."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import re

import grpc
import pytest
from agent_helpers import add_node, make_task, manager_side, new_engine, run, task_state, wait_for

from shoal.agent.agent import Agent
from shoal.cli import logs as cli_logs
from shoal.cli.client import Client
from shoal.manager.controlapi import ControlServicer, add_to_server
from shoal.proto import logs_pb2, logs_pb2_grpc, objects_pb2, specs_pb2, types_pb2

pytestmark = pytest.mark.integration
S = types_pb2


def parse(argv: list[str]) -> argparse.Namespace:
    root = argparse.ArgumentParser()
    groups = root.add_subparsers(dest="command")
    for kind in ("service", "task"):
        sub = groups.add_parser(kind).add_subparsers(dest="sub")
        cli_logs.register(sub, kind)
    return root.parse_args(argv)


def test_service_and_task_logs_with_tail_timestamps_and_follow(
    engine_root, registry, tmp_path, capsys
) -> None:
    async def main() -> None:
        engine = new_engine(engine_root, registry)
        async with manager_side() as (st, _disp, broker, addr):
            # swarmctl's local socket: Control API (names) + Logs.
            sock = str(tmp_path / "ctl.sock")
            local = grpc.aio.server()
            add_to_server(ControlServicer(st), local)
            logs_pb2_grpc.add_LogsServicer_to_server(broker, local)
            local.add_insecure_port(f"unix:{sock}")
            await local.start()
            await add_node(st, "n1", hostname="node-1")
            svc = objects_pb2.Service(
                id="web-id", spec=specs_pb2.ServiceSpec(annotations=types_pb2.Annotations(name="web"))
            )
            await st.update(lambda tx: tx.create(svc))
            script = "for i in 1 2 3; do echo line$i; done; echo oops >&2; sleep 600"
            tasks = [make_task("n1", "sh", "-c", script, service="web", slot=i) for i in (1, 2)]
            follow = make_task(
                "n1",
                "sh",
                "-c",
                "i=0; while true; do i=$((i+1)); echo tick$i; sleep 0.1; done",
                service="ticker",
                slot=1,
            )
            for t in [*tasks, follow]:
                await st.update(lambda tx, t=t: tx.create(t))
            agent = Agent("n1", tmp_path, [addr], None, engine, hostname="node-1")
            runner = asyncio.create_task(agent.run())
            client = Client(socket=sock)
            try:
                await wait_for(lambda: all(task_state(st, t.id) == S.RUNNING for t in [*tasks, follow]))
                for t in tasks:  # the scripts print at once: wait until conmon wrote all four lines
                    for _ in range(200):
                        if len([ln async for ln in engine.logs(t.id)]) >= 4:
                            break
                        await asyncio.sleep(0.05)

                args = parse(["service", "logs", "web", "--tail", "2"])
                await asyncio.to_thread(args.func, client, args)
                out, err = capsys.readouterr()
                lines = sorted(out.splitlines())
                want = sorted(
                    f"web.{i}.{t.id[:12]}@node-1    | line3" for i, t in ((1, tasks[0]), (2, tasks[1]))
                )
                assert lines == want, out
                assert sorted(err.splitlines()) == sorted(
                    f"web.{i}.{t.id[:12]}@node-1    | oops" for i, t in ((1, tasks[0]), (2, tasks[1]))
                )

                args = parse(["task", "logs", tasks[0].id[:10], "--timestamps", "--no-trunc"])
                await asyncio.to_thread(args.func, client, args)
                out, _ = capsys.readouterr()
                ts = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{9}Z"
                for n, line in enumerate(out.splitlines(), 1):
                    assert re.fullmatch(rf"{ts} web\.1\.{tasks[0].id}@node-1    \| line{n}", line), line

                # Follow: lines written after the subscription keep coming until the client leaves.
                async with grpc.aio.insecure_channel(addr) as ch:
                    call = logs_pb2_grpc.LogsStub(ch).SubscribeLogs(
                        logs_pb2.SubscribeLogsRequest(
                            selector=logs_pb2.LogSelector(task_ids=[follow.id]),
                            options=logs_pb2.LogSubscriptionOptions(follow=True, tail=1),
                        )
                    )
                    seen: list[int] = []
                    async for batch in call:
                        seen += [int(m.data.decode().removeprefix("tick")) for m in batch.messages]
                        if len(seen) >= 8:
                            break
                    call.cancel()
                assert seen == list(range(seen[0], seen[0] + len(seen)))
                await wait_for(lambda: not agent._subs and not broker._subs, what="subscriptions closed")
            finally:
                client.close()
                runner.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await runner
                await local.stop(0)
        await engine.close()

    run(main())


def test_follow_picks_up_new_nodes_and_missing_nodes_are_named(engine_root, registry, tmp_path) -> None:
    import tempfile
    from pathlib import Path

    from agent_helpers import _remove_all

    root2 = Path(tempfile.mkdtemp(prefix="shoal-agent2-", dir="/var/tmp"))

    async def main() -> None:
        e1, e2 = new_engine(engine_root, registry), new_engine(root2, registry)
        async with manager_side() as (st, _disp, _broker, addr):
            for n in ("n1", "n2", "n3"):
                await add_node(st, n)
            svc = objects_pb2.Service(
                id="tick-id", spec=specs_pb2.ServiceSpec(annotations=types_pb2.Annotations(name="tick"))
            )
            await st.update(lambda tx: tx.create(svc))
            loop = "while true; do echo $0; sleep 0.1; done"
            t1 = make_task("n1", "sh", "-c", loop, "one", service="tick", slot=1)
            await st.update(lambda tx: tx.create(t1))
            a1 = Agent("n1", tmp_path / "a1", [addr], None, e1)
            a2 = Agent("n2", tmp_path / "a2", [addr], None, e2)
            runners = [asyncio.create_task(a.run()) for a in (a1, a2)]
            try:
                await wait_for(lambda: task_state(st, t1.id) == S.RUNNING)
                async with grpc.aio.insecure_channel(addr) as ch:
                    stub = logs_pb2_grpc.LogsStub(ch)
                    call = stub.SubscribeLogs(
                        logs_pb2.SubscribeLogsRequest(
                            selector=logs_pb2.LogSelector(service_ids=["tick"]),
                            options=logs_pb2.LogSubscriptionOptions(follow=True, tail=0),
                        )
                    )
                    got: set[tuple[str, bytes]] = set()
                    added = False
                    async for batch in call:
                        got |= {(m.context.node_id, m.data) for m in batch.messages}
                        if not added and ("n1", b"one") in got:
                            # A second task of the service lands on another node while we follow.
                            t2 = make_task("n2", "sh", "-c", loop, "two", service="tick", slot=2)
                            await st.update(lambda tx, t2=t2: tx.create(t2))
                            added = True
                        if ("n2", b"two") in got:
                            break
                    call.cancel()

                    # A task on a node with no agent: the others' logs, and that node named.
                    t3 = make_task("n3", "true", service="tick", slot=3)
                    t3.status.state = S.RUNNING
                    await st.update(lambda tx: tx.create(t3))
                    call = stub.SubscribeLogs(
                        logs_pb2.SubscribeLogsRequest(
                            selector=logs_pb2.LogSelector(service_ids=["tick"]),
                            options=logs_pb2.LogSubscriptionOptions(tail=1),
                        )
                    )
                    nodes = {m.context.node_id async for batch in call for m in batch.messages}
                    assert nodes == {"n1", "n2"}
                    md = dict(await call.trailing_metadata())
                    assert md[cli_logs.UNAVAILABLE_NODES_KEY] == "n3"
            finally:
                for r in runners:
                    r.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await r
        await e1.close()
        await e2.close()

    try:
        run(main())
    finally:
        run(_remove_all(root2))
        import shutil

        shutil.rmtree(root2, ignore_errors=True)
