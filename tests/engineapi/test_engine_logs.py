"""Service and task logs through swarmd's Engine API: the stdcopy frames on the wire (details,
timestamps, tail, since, stdout/stderr), `docker service logs` (plain, --tail, --timestamps, --raw,
--no-task-ids, -f ended by the client), and `docker service create`'s /distribution call (a digest from
the local registry; the CLI's warning for an unreachable one). The service is made with swarmctl.
Needs root."""

from __future__ import annotations

import json
import os
import re
import select
import socket
import struct
import subprocess
import time
from collections.abc import Iterator

import pytest
from engine_helpers import DOCKER, EngineManager, http, running_manager
from helpers.waiting import wait_for

from shoal.lab.registry import Registry

pytestmark = pytest.mark.integration
SVC = "eaolog"
SCRIPT = "for i in 0 1 2 3 4; do echo out line $i; echo err line $i >&2; done; exec sleep 3600"
RFC3339NANO = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d{1,9})?Z"


@pytest.fixture(scope="module")
def mgr(registry: Registry) -> Iterator[EngineManager]:
    with running_manager(registry, "eao") as m:
        yield m


def frames(body: bytes) -> list[tuple[int, bytes]]:
    """stdcopy frames: (stream, payload)."""
    out = []
    while body:
        stream, n = struct.unpack(">BxxxI", body[:8])
        out.append((stream, body[8:8 + n]))
        body = body[8 + n:]
    return out


def logs(mgr: EngineManager, path: str) -> tuple[int, dict[str, str], list[tuple[int, bytes]] | bytes]:
    st, hs, body = http(mgr.docker_sock, "GET", f"/v1.41{path}")
    return st, hs, frames(body) if st == 200 else body


@pytest.fixture(scope="module")
def svc(mgr: EngineManager) -> dict[str, str]:
    """The service (swarmctl's), its one task and node, once its 10 lines are in its log."""
    mgr.ok("service", "create", "--name", SVC, "--replicas", "1", mgr.image, "sh", "-c", SCRIPT)

    def ten_lines() -> bool:
        st, _, fr = logs(mgr, f"/services/{SVC}/logs?stdout=1&stderr=1")
        return st == 200 and len(fr) == 10

    wait_for(ten_lines, timeout=60, what=f"the 10 log lines of {SVC}")
    service_id = json.loads(mgr.ok("service", "inspect", SVC, "--format", "json"))
    service_id = (service_id[0] if isinstance(service_id, list) else service_id)["id"]
    tasks = json.loads(mgr.ok("task", "ls", "--format", "json"))
    [task] = [t for t in tasks if t["service_id"] == service_id]
    return {"service": service_id, "task": task["id"], "node": task["node_id"]}


def test_frames_on_the_wire(mgr: EngineManager, svc: dict[str, str]) -> None:
    st, hs, fr = logs(mgr, f"/services/{SVC}/logs?details=1&stderr=1&stdout=1&tail=all")
    assert st == 200 and "content-type" not in hs and hs["transfer-encoding"] == "chunked"
    details = (f"com.docker.swarm.node.id={svc['node']},com.docker.swarm.service.id={svc['service']},"
               f"com.docker.swarm.task.id={svc['task']}")
    assert sorted(fr) == sorted([(1, f"{details} out line {i}\n".encode()) for i in range(5)]
                                + [(2, f"{details} err line {i}\n".encode()) for i in range(5)]), fr
    # tail and timestamps, no details; by the service's id
    st, _, fr = logs(mgr, f"/services/{svc['service']}/logs?stdout=1&stderr=1&tail=2&timestamps=1")
    # (the last two lines of the task's log: conmon reads stdout and stderr apart, so which ones they are
    # across the two streams is the order it read them in)
    assert len(fr) == 2 and all(re.fullmatch(rf"{RFC3339NANO} (out|err) line [34]\n", p.decode()) for _, p in fr), fr
    # one stream only
    st, _, fr = logs(mgr, f"/services/{SVC}/logs?stdout=1")
    assert [p for _, p in fr] == [f"out line {i}\n".encode() for i in range(5)] and {s for s, _ in fr} == {1}
    # a task's logs, by an id prefix; the tail counts the log's lines of both streams, then the
    # streams asked for are kept (as Docker's json-file reader does): the last line is "out line 4"
    # or "err line 4", in the order conmon read them, and only stderr keeps it when it is the latter
    st, _, last = logs(mgr, f"/tasks/{svc['task'][:10]}/logs?stdout=1&stderr=1&tail=1")
    assert last in ([(1, b"out line 4\n")], [(2, b"err line 4\n")]), last
    st, _, fr = logs(mgr, f"/tasks/{svc['task'][:10]}/logs?stderr=1&tail=1")
    assert fr == [f for f in last if f[0] == 2], (fr, last)
    # since: after the lines were written, none
    st, _, fr = logs(mgr, f"/services/{SVC}/logs?stdout=1&stderr=1&since={int(time.time()) + 1}")
    assert st == 200 and fr == []
    # errors
    st, _, body = logs(mgr, "/services/nosuch/logs?stdout=1")
    assert (st, json.loads(body)) == (404, {"message": "service nosuch not found"})
    st, _, body = logs(mgr, "/tasks/nosuch/logs?stdout=1")
    assert (st, json.loads(body)) == (404, {"message": "task nosuch not found"})
    st, _, body = logs(mgr, f"/services/{SVC}/logs")
    assert (st, json.loads(body)) == (400, {"message": "Bad parameters: you must choose at least one stream"})
    st, _, body = logs(mgr, f"/services/{SVC}/logs?stdout=1&tail=some")
    assert st == 400 and "invalid tail 'some'" in json.loads(body)["message"]


def test_follow_ends_when_the_client_goes_away(mgr: EngineManager, svc: dict[str, str]) -> None:
    offset = mgr.log_size()
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(20)
    s.connect(str(mgr.docker_sock))
    s.sendall(f"GET /v1.41/services/{SVC}/logs?follow=1&stdout=1&stderr=1&tail=1 HTTP/1.1\r\nHost: d\r\n\r\n".encode())
    data = b""
    while b"line 4\n" not in data:
        data += s.recv(65536)
    assert data.startswith(b"HTTP/1.1 200 OK\r\n")
    s.close()
    wait_for(lambda: f"engine API logs of service {svc['service']} (follow=True): the client went away"
             in mgr.log_text(offset), timeout=10, what="the follow stream to end")
    assert mgr.dok("node", "ls", "-q").strip()  # the API still answers


def test_docker_service_logs(mgr: EngineManager, svc: dict[str, str]) -> None:
    prefix = f"{SVC}.1.{svc['task'][:12]}@eaom1    | "
    r = mgr.docker("service", "logs", SVC)
    assert r.returncode == 0, r.stderr
    assert sorted(r.stdout.splitlines()) == [f"{prefix}out line {i}" for i in range(5)], r.stdout
    assert sorted(r.stderr.splitlines()) == [f"{prefix}err line {i}" for i in range(5)], r.stderr

    r = mgr.docker("service", "logs", "--tail", "2", "--timestamps", SVC)
    lines = r.stdout.splitlines() + r.stderr.splitlines()
    assert len(lines) == 2 and all(re.fullmatch(rf"{RFC3339NANO} {re.escape(prefix)}(out|err) line [34]", ln)
                                   for ln in lines), lines
    r = mgr.docker("service", "logs", "--raw", SVC)
    assert sorted(r.stdout.splitlines()) == [f"out line {i}" for i in range(5)], r.stdout
    r = mgr.docker("service", "logs", "--no-task-ids", SVC)
    assert sorted(r.stdout.splitlines()) == [f"{SVC}.1@eaom1    | out line {i}" for i in range(5)], r.stdout
    r = mgr.docker("service", "logs", svc["task"])  # a task id works too
    assert r.returncode == 0, r.stderr
    assert sorted(r.stdout.splitlines()) == [f"{prefix}out line {i}" for i in range(5)], r.stdout
    mgr.dfail("service", "logs", "nosuch", match="no such task or service: nosuch")  # the CLI's words, as with Docker

    # -f: a few lines, then the process is ended; the stream ends on the server
    offset = mgr.log_size()
    env = {"DOCKER_HOST": f"unix://{mgr.docker_sock}", "DOCKER_CONFIG": str(mgr.base / "docker-config"),
           "PATH": "/usr/bin:/bin"}
    p = subprocess.Popen([DOCKER, "service", "logs", "-f", SVC], stdout=subprocess.PIPE,
                         stderr=subprocess.DEVNULL, env=env, bufsize=0)
    try:
        assert p.stdout is not None
        out = b""
        while out.count(b"\n") < 5:
            ready, _, _ = select.select([p.stdout], [], [], 20)
            assert ready, f"docker service logs -f printed {out!r} in 20 s"
            out += os.read(p.stdout.fileno(), 65536)
        assert sorted(out.decode().splitlines()) == [f"{prefix}out line {i}" for i in range(5)], out
        time.sleep(0.5)
        assert p.poll() is None  # still following
    finally:
        p.terminate()
        p.wait(timeout=10)
    wait_for(lambda: f"engine API logs of service {svc['service']} (follow=True): the client went away"
             in mgr.log_text(offset), timeout=10, what="the follow stream of docker service logs -f to end")


def test_service_create_pins_the_digest_or_warns(mgr: EngineManager, svc: dict[str, str]) -> None:
    r = mgr.docker("service", "create", "-d", "--name", "eaopin", "--replicas", "0", mgr.image)
    assert r.returncode == 0 and "could not be accessed on a registry" not in r.stderr, r.stderr
    image = json.loads(mgr.ok("service", "inspect", "eaopin", "--format", "json"))
    image = (image[0] if isinstance(image, list) else image)["spec"]["task"]["container"]["image"]
    assert image.startswith(f"{mgr.image}@sha256:"), image
    r = mgr.docker("service", "create", "-d", "--name", "eaonopin", "--replicas", "0", "127.0.0.1:9/eao/none:1")
    assert r.returncode == 0, r.stderr
    assert ("image 127.0.0.1:9/eao/none:1 could not be accessed on a registry to record\nits digest. Each node will "
            "access 127.0.0.1:9/eao/none:1 independently,\npossibly leading to different nodes running different\n"
            "versions of the image.") in r.stderr, r.stderr
    mgr.ok("service", "rm", "eaopin", "eaonopin")
