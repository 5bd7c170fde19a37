"""Health checks: Docker's HEALTHCHECK semantics, probes run with ``runc exec`` in the container.

Status goes ``starting`` → ``healthy`` on the first passing probe; ``retries`` consecutive failures make
it ``unhealthy`` (a passing probe makes it healthy again). During ``start_period`` failures do not count
(and probes run every ``start_interval``) until the first success. A probe running longer than
``timeout`` is killed and counts as a failure.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from shoal.agent.engine.spec import HealthSpec

log = logging.getLogger(__name__)
MAX_OUTPUT = 4096
KEEP_RESULTS = 5


@dataclass
class ProbeResult:
    start: float
    end: float
    exit_code: int
    output: str


@dataclass
class HealthState:
    status: str = "starting"  # starting | healthy | unhealthy
    failing_streak: int = 0
    log: list[ProbeResult] = field(default_factory=list)

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> HealthState:
        d = json.loads(text)
        return cls(
            d.get("status", "starting"),
            d.get("failing_streak", 0),
            [ProbeResult(**r) for r in d.get("log", [])],
        )


class HealthMonitor:
    """Runs the probes of one container until cancelled or ``alive()`` turns false."""

    def __init__(
        self,
        cid: str,
        spec: HealthSpec,
        exec_argv: Callable[[list[str], str], list[str]],
        state_file: Path,
        started_at: float,
        alive: Callable[[], Awaitable[bool]],
        on_change: Callable[[str, str], None] | None = None,
    ) -> None:
        self.cid, self.spec = cid, spec
        self.exec_argv = exec_argv
        self.state_file = state_file
        self.started_at = started_at
        self.alive = alive
        self.on_change = on_change
        try:
            self.state = HealthState.from_json(state_file.read_text())
        except (OSError, ValueError):
            self.state = HealthState()
        self.task: asyncio.Task | None = None

    def start(self) -> None:
        self.task = asyncio.create_task(self.run(), name=f"health-{self.cid}")

    async def stop(self) -> None:
        if self.task:
            self.task.cancel()
            try:
                await self.task
            except asyncio.CancelledError:
                pass
            self.task = None

    def _in_start_period(self) -> bool:
        return time.time() < self.started_at + self.spec.start_period

    async def run(self) -> None:
        while True:
            starting = self._in_start_period() and self.state.status == "starting"
            await asyncio.sleep(self.spec.start_interval if starting else self.spec.interval)
            if not await self.alive():
                return
            res = await self.probe()
            self.record(res)

    def record(self, res: ProbeResult) -> None:
        st = self.state
        before = st.status
        if res.exit_code == 0:
            st.status, st.failing_streak = "healthy", 0
        elif not (self._in_start_period() and st.status == "starting"):
            st.failing_streak += 1
            if st.failing_streak >= self.spec.retries:
                st.status = "unhealthy"
        st.log = (st.log + [res])[-KEEP_RESULTS:]
        pid = os.getpid()
        tmp = self.state_file.with_name(f".health.{pid}.tmp")
        tmp.write_text(st.to_json())
        os.replace(tmp, self.state_file)
        if st.status != before:
            log.info(
                "container health cid=%s status=%s streak=%d output=%r",
                self.cid,
                st.status,
                st.failing_streak,
                res.output[:200],
            )
            if self.on_change:
                try:
                    self.on_change(self.cid, st.status)
                except Exception:  # a faulty callback must not stop the probes
                    log.exception("health callback failed cid=%s", self.cid)

    async def probe(self) -> ProbeResult:
        start = time.time()
        pidfile = str(self.state_file.with_name(f"probe-{os.urandom(4).hex()}.pid"))
        argv = self.exec_argv(self.spec.argv, pidfile)
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT,
            )
        except OSError as e:
            return ProbeResult(start, time.time(), -1, f"cannot run probe: {e}")
        try:
            out, _ = await asyncio.wait_for(proc.communicate(), self.spec.timeout)
            code = proc.returncode if proc.returncode is not None else -1
            text = out[:MAX_OUTPUT].decode("utf-8", "replace")
        except TimeoutError:
            self._kill_probe(pidfile)
            proc.kill()
            await proc.wait()
            code, text = -1, f"Health check exceeded timeout ({self.spec.timeout:g}s)"
        finally:
            try:
                os.unlink(pidfile)
            except OSError:
                pass
        return ProbeResult(start, time.time(), code, text)

    @staticmethod
    def _kill_probe(pidfile: str) -> None:
        try:
            pid = int(open(pidfile).read().strip())
            os.kill(pid, signal.SIGKILL)
        except (OSError, ValueError):
            pass
