"""`GET /services/{x}/logs` and `GET /tasks/{id}/logs`: the tasks' container logs, from the manager's log
broker (the `Logs.SubscribeLogs` stream of the control socket, as `swarmctl service logs` reads it),
written as Docker writes them (../shared/docs/docker-cli-api.md §2 "docker service logs"):

    200, Transfer-Encoding: chunked, no Content-Type; one stdcopy frame per line:
    [1 stdout | 2 stderr, 0, 0, 0, uint32 BE length] + "[<RFC3339Nano> ][<details> ]<line>\\n"

where details (`details=1`) are `com.docker.swarm.node.id=..,com.docker.swarm.service.id=..,
com.docker.swarm.task.id=..`, from which the CLI builds its `web.1.<task12>@<host>    | ` prefix. A
service whose containers have a TTY gets the lines without frames (as moby does; the CLI then reads the
body raw).

Query: `follow`, `tail` (`all` or N lines per task), `since` (unix seconds, `S[.NNNNNNNNN]`),
`timestamps`, `details`, `stdout`, `stderr` (at least one: Docker's 400 otherwise). With `follow` the
stream runs until the client goes away; the subscription is then cancelled (server.StreamResponse's
iterator is closed where it waits).
"""

from __future__ import annotations

import contextlib
import logging
import struct
from collections.abc import AsyncIterator
from typing import Any

import grpc
from google.protobuf import timestamp_pb2

from shoal.engineapi.convert import lookup, ts
from shoal.engineapi.server import APIError, EngineContext, Request, Route, StreamResponse
from shoal.proto import control_pb2, logs_pb2, logs_pb2_grpc

log = logging.getLogger("shoal.engineapi")

STDOUT, STDERR, SYSTEMERR = 1, 2, 3


def frame(stream: int, payload: bytes) -> bytes:
    """One stdcopy frame (moby's pkg/stdcopy)."""
    return struct.pack(">BxxxI", stream, len(payload)) + payload


def log_options(req: Request) -> tuple[logs_pb2.LogSubscriptionOptions, bool, bool]:
    """(subscription options, want stdout, want stderr) from the query; 400 naming the parameter."""
    out, err = req.flag("stdout"), req.flag("stderr")
    if not (out or err):
        raise APIError(400, "Bad parameters: you must choose at least one stream")
    opts = logs_pb2.LogSubscriptionOptions(follow=req.flag("follow"), tail=-1)
    tail = req.query.get("tail", "all") or "all"
    if tail != "all":
        try:
            opts.tail = int(tail)
        except ValueError:
            raise APIError(400, f"invalid tail '{tail}': give a number of lines or all") from None
        if opts.tail < 0:
            opts.tail = -1  # Docker: a negative tail is all
    since = req.query.get("since", "")
    if since and since != "0":
        secs, _, frac = since.partition(".")
        try:
            s, n = int(secs), int((frac + "000000000")[:9]) if frac else 0
        except ValueError:
            raise APIError(400, f"invalid since '{since}': give unix seconds, S or S.NNNNNNNNN") from None
        if s < 0:
            raise APIError(400, f"invalid since '{since}': give unix seconds, S or S.NNNNNNNNN")
        opts.since.CopyFrom(timestamp_pb2.Timestamp(seconds=s, nanos=n))
    return opts, out, err


def render(m: logs_pb2.LogMessage, *, timestamps: bool, details: bool, tty: bool) -> bytes:
    """One log line as Docker sends it (framed unless `tty`)."""
    parts = []
    if timestamps:
        parts.append(ts(m.timestamp).encode())
    if details:
        c = m.context
        parts.append(f"com.docker.swarm.node.id={c.node_id},com.docker.swarm.service.id={c.service_id},"
                     f"com.docker.swarm.task.id={c.task_id}".encode())
    data = m.data if m.data.endswith(b"\n") else m.data + b"\n"
    payload = b" ".join([*parts, data])
    if tty:
        return payload
    return frame(STDERR if m.stream == logs_pb2.LogMessage.STDERR else STDOUT, payload)


def routes(ctx: EngineContext) -> list[Route]:
    def stream(req: Request, what: str, selector: logs_pb2.LogSelector, tty: bool) -> StreamResponse:
        opts, want_out, want_err = log_options(req)
        timestamps, details = req.flag("timestamps"), req.flag("details")

        async def chunks() -> AsyncIterator[bytes]:
            # Its own channel, so that ending this stream ends nothing else.
            channel = grpc.aio.insecure_channel(f"unix://{ctx.control_socket}")
            call: Any = logs_pb2_grpc.LogsStub(channel).SubscribeLogs(
                logs_pb2.SubscribeLogsRequest(selector=selector, options=opts))
            ended = "the client went away: subscription cancelled"
            try:
                async for batch in call:
                    out = []
                    for m in batch.messages:
                        is_err = m.stream == logs_pb2.LogMessage.STDERR
                        if (is_err and want_err) or (not is_err and want_out):
                            out.append(render(m, timestamps=timestamps, details=details, tty=tty))
                    if out:
                        yield b"".join(out)
                ended = "sent to the end"
            except grpc.aio.AioRpcError as e:
                ended = f"the log broker ended it: {e.details()}"
                if e.code() != grpc.StatusCode.CANCELLED:
                    # The 200 is sent: moby ends such a stream with a system-error frame, which the
                    # CLI prints as "error from daemon in stream: ..."
                    yield e.details().encode() if tty else frame(SYSTEMERR, e.details().encode())
            finally:
                call.cancel()
                with contextlib.suppress(Exception):
                    await channel.close()
                log.info("engine API logs of %s (follow=%s): %s", what, opts.follow, ended)

        return StreamResponse(chunks())

    async def service_logs(req: Request) -> StreamResponse:
        ref = req.params["id"]
        svc = (await lookup("service", ref, ctx.control.GetService(
            control_pb2.GetServiceRequest(service_id=ref), timeout=10))).service
        return stream(req, f"service {svc.id}", logs_pb2.LogSelector(service_ids=[svc.id]), svc.spec.task.container.tty)

    async def task_logs(req: Request) -> StreamResponse:
        ref = req.params["id"]
        task = (await lookup("task", ref, ctx.control.GetTask(
            control_pb2.GetTaskRequest(task_id=ref), timeout=10))).task
        return stream(req, f"task {task.id}", logs_pb2.LogSelector(task_ids=[task.id]), task.spec.container.tty)

    return [
        Route("GET", r"/services/(?P<id>[^/]+)/logs", service_logs),
        Route("GET", r"/tasks/(?P<id>[^/]+)/logs", task_logs),
    ]
