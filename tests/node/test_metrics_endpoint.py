"""swarmd's metrics endpoint (shoal.node.metrics) without a cluster, each check in a fresh interpreter
(metrics are enabled once per process, and the import check must not see this process's imports):

- without --metrics-addr a worker's swarmd never imports prometheus_client (~2.4 MB resident);
- with it, GET /metrics answers the text format 0.0.4 with every package's families; /metrics/etcd is
  404 on a node without a manager role; other paths 404, other methods 405, HEAD has no body;
- a bad --metrics-addr stops swarmd with one sentence before anything is made."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

WORKER_WITHOUT_METRICS = """
import asyncio, sys
from shoal.node import swarmd
swarmd._lazy_pyroute2()
import shoal.agent.agent, shoal.agent.engine, shoal.agent.network, shoal.agent.executor  # a worker's swarmd
d = swarmd.Swarmd(swarmd.parse_args(["-d", sys.argv[1]]), swarmd.NodeIdFilter())
assert asyncio.run(d._start_metrics()) is None
loaded = sorted(m for m in sys.modules if m.startswith("prometheus_client"))
assert not loaded, loaded
print("ok")
"""

SERVED = """
import asyncio, sys
from shoal.node import metrics

async def get(port, request):
    r, w = await asyncio.open_connection("127.0.0.1", port)
    w.write(request.encode())
    await w.drain()
    data = await r.read()
    w.close()
    head, _, body = data.partition(b"\\r\\n\\r\\n")
    return head.decode(), body.decode()

async def main():
    srv = await metrics.start("127.0.0.1:0", metrics.Sources(manager=lambda: None, gossip=lambda: None))
    port = srv.address[1]
    try:
        head, body = await get(port, "GET /metrics HTTP/1.1\\r\\nHost: x\\r\\n\\r\\n")
        assert head.startswith("HTTP/1.1 200 OK") and "Content-Type: text/plain; version=0.0.4" in head, head
        assert f"Content-Length: {len(body.encode())}" in head
        for fam in ("shoal_store_write_duration_seconds histogram", "shoal_controlapi_requests_total counter",
                    "shoal_manager_tasks gauge", "shoal_agent_container_starts_total counter",
                    "shoal_agent_image_pull_duration_seconds histogram", "shoal_gossip_members gauge",
                    "process_resident_memory_bytes gauge", "process_cpu_seconds_total counter",
                    "process_open_fds gauge"):
            assert f"# TYPE {fam}" in body, fam
        assert "\\nshoal_manager_tasks{" not in body  # no manager role: no samples
        assert "_created" not in body
        head, body = await get(port, "GET /metrics/etcd HTTP/1.1\\r\\n\\r\\n")
        assert head.startswith("HTTP/1.1 404") and "no manager role" in body, (head, body)
        head, _ = await get(port, "GET /other HTTP/1.1\\r\\n\\r\\n")
        assert head.startswith("HTTP/1.1 404"), head
        head, _ = await get(port, "POST /metrics HTTP/1.1\\r\\nContent-Length: 0\\r\\n\\r\\n")
        assert head.startswith("HTTP/1.1 405") and "Allow: GET, HEAD" in head, head
        head, body = await get(port, "HEAD /metrics HTTP/1.1\\r\\n\\r\\n")
        assert head.startswith("HTTP/1.1 200") and body == "", (head, body)
        head, _ = await get(port, "nonsense\\r\\n\\r\\n")
        assert head.startswith("HTTP/1.1 400"), head
    finally:
        await srv.stop()
    print("ok")

asyncio.run(main())
"""


def run(code: str, *args: str) -> str:
    p = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    return p.stdout.strip()


def test_worker_without_metrics_addr_never_imports_prometheus_client(tmp_path: Path) -> None:
    assert run(WORKER_WITHOUT_METRICS, str(tmp_path / "state")) == "ok"


def test_metrics_endpoint_serves_the_text_format() -> None:
    assert run(SERVED) == "ok"


def test_bad_metrics_addr_is_refused_before_anything_is_made(tmp_path: Path) -> None:
    state = tmp_path / "state"
    p = subprocess.run([sys.executable, "-m", "shoal.node.swarmd", "-d", str(state), "--metrics-addr", "9323"],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode != 0
    assert "--metrics-addr '9323': give ADDR:PORT, e.g. 127.0.0.1:9323" in p.stderr, p.stderr
    assert not state.exists()
