"""shoal.node.simnodes without a cluster: the in-memory engine's container life (what a simulated
node's agent drives), and the command's refusals of bad input. The nodes joining a real cluster are
tested in tests/lab/test_lab_simulated.py and by the fleet bench's test."""

from __future__ import annotations

import asyncio
import subprocess
import sys

import pytest

from shoal.agent.engine import ContainerConfig, ContainerNotFound
from shoal.node.simnodes import MemEngine
from shoal.proto import types_pb2


def test_mem_engine_runs_a_container_from_start_until_stop_and_forgets_it_on_remove() -> None:
    async def main() -> None:
        eng = MemEngine()
        img = await eng.pull("busybox:latest")
        assert img.id.startswith("sha256:") and img == await eng.image("busybox:latest")
        spec = types_pb2.ContainerSpec(image="busybox:latest")
        await eng.create(ContainerConfig(id="c1", name="t.1", spec=spec, labels={"k": "v"}))
        assert (await eng.inspect("c1")).status == "created"
        await eng.start("c1")
        st = await eng.inspect("c1")
        assert st.status == "running" and st.pid > 0 and st.labels == {"k": "v"}
        waiter = asyncio.create_task(eng.wait("c1"))
        await asyncio.sleep(0)
        assert not waiter.done()  # runs until stopped
        await eng.stop("c1")
        assert (await waiter).exit_code == 137
        assert (await eng.inspect("c1")).status == "exited"
        assert [c.id for c in await eng.list()] == ["c1"]
        assert [line async for line in eng.logs("c1")] == []  # no logs
        await eng.remove("c1")
        assert await eng.list() == []
        with pytest.raises(ContainerNotFound):
            await eng.inspect("c1")

    asyncio.run(main())


@pytest.mark.parametrize(("args", "stdin", "message"), [
    (["--count", "0"], "TOKEN\n", "--count must be at least 1"),
    (["--count", "2", "--label", "simulated"], "TOKEN\n", "--label takes KEY=VALUE"),
    (["--count", "2"], "", "give the worker join token on stdin"),
])
def test_bad_input_exits_2_naming_the_argument(args: list[str], stdin: str, message: str) -> None:
    r = subprocess.run([sys.executable, "-m", "shoal.node.simnodes", "--managers", "127.0.0.1:1",
                        "--addr", "127.0.0.1", *args], input=stdin, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2, r
    assert r.stderr.strip().endswith(f"error: {message}"), r.stderr
