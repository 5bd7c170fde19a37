"""The Docker Engine API endpoint: HTTP/1.1 on a unix socket, routed to handlers that translate to the
control API.

    ctx = EngineContext(node=..., control=...)          # what swarmd knows; the control API channel
    server = await serve_unix(path, App(ctx))            # every node: <state dir>/docker.sock (0600)
    ...
    server.close(); await server.wait_closed()

HTTP, the subset the Docker clients use (the `docker` CLI and the docker SDK for Python), as
`asyncio` streams: persistent connections (HTTP/1.1 keep-alive, `Connection: close` honoured),
request bodies by `Content-Length` or `Transfer-Encoding: chunked` (at most MAX_BODY bytes),
`Expect: 100-continue`, `HEAD`. Responses carry `Content-Length`, or are streamed with
`Transfer-Encoding: chunked` (`StreamResponse`: logs, events). A request that does not parse gets a
400 and the connection is closed.

Paths: an optional version prefix `/v1.NN` is stripped (any version up to API_VERSION is served as
API_VERSION; a newer one gets Docker's 400 "client version ... is too new"). Every answer carries
Docker's `Api-Version`, `Docker-Experimental`, `Ostype` and `Server` headers.

Errors, as the Docker clients expect them: a JSON body `{"message": "..."}` with the status code
Docker uses. Handlers raise `APIError(status, message)`, or let a `grpc.aio.AioRpcError` from the
control API through: `rpc_error()` maps it (NOT_FOUND 404, INVALID_ARGUMENT 400, ALREADY_EXISTS
409, FAILED_PRECONDITION 400, a stale version (ABORTED "update out of sequence") 500 in Docker's
words, UNAVAILABLE 503). A route the facade does not have answers 501 naming it; no traceback ever
reaches a client (a handler's bug is logged here and answered 500 with one line).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

import grpc

from shoal.proto import CONTROL_CHANNEL_OPTIONS

log = logging.getLogger("shoal.engineapi")

API_VERSION = "1.41"
MIN_API_VERSION = "1.24"
MAX_BODY = 64 << 20  # a service spec, a secret (≤ 500 KB) or a config: far below
MAX_HEADER_LINE = 64 << 10
MAX_HEADERS = 200
STREAM_EOF_POLL = 0.25  # how often a streamed response looks whether its client went away
SERVER = "Shoal/0.1.0 (linux)"
VERSION_PREFIX = re.compile(r"^/v(\d+)\.(\d+)(/.*)$")

NOT_MANAGER = ("This node is not a swarm manager. Worker nodes can't be used to view or modify cluster "
               "state. Please run this command on a manager node or promote the current node to a manager.")


class APIError(Exception):
    """An answer other than success: Docker's status code and its one-line message."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def not_found(kind: str, ref: str) -> APIError:
    """Docker's 404 for an object: `service nosuch not found`."""
    return APIError(404, f"{kind} {ref} not found")


def rpc_error(e: grpc.aio.AioRpcError) -> APIError:
    """The Docker answer for a control API error (see the module's docstring)."""
    code, details = e.code(), e.details() or ""
    if code == grpc.StatusCode.NOT_FOUND:
        return APIError(404, details)
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        return APIError(400, details)
    if code == grpc.StatusCode.ALREADY_EXISTS:
        return APIError(409, details)
    if code == grpc.StatusCode.ABORTED and details.startswith("update out of sequence"):
        return APIError(500, "rpc error: code = Unknown desc = update out of sequence")
    if code == grpc.StatusCode.FAILED_PRECONDITION:
        return APIError(400, f"rpc error: code = FailedPrecondition desc = {details}")
    if code == grpc.StatusCode.UNAVAILABLE:
        return APIError(503, details or NOT_MANAGER)
    if code == grpc.StatusCode.PERMISSION_DENIED:
        return APIError(403, details)
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return APIError(504, f"the manager did not answer in time: {details}")
    return APIError(500, f"rpc error: code = {code.name.title().replace('_', '')} desc = {details}")


# ---- requests and responses ---------------------------------------------------------------------
@dataclass
class Request:
    method: str
    path: str  # without the version prefix
    query: dict[str, str]
    headers: dict[str, str]  # names lower-case
    body: bytes = b""
    params: dict[str, str] = field(default_factory=dict)  # the route's named groups (unquoted)
    version: str = API_VERSION  # the API version the client asked for

    def json(self) -> Any:
        """The body as JSON; 400 naming the problem when it is not."""
        if not self.body:
            return {}
        try:
            return json.loads(self.body)
        except ValueError as e:
            raise APIError(400, f"the request body is not valid JSON: {e}") from None

    def flag(self, name: str) -> bool:
        """A boolean query parameter as Docker reads them (1, true, True: set)."""
        return self.query.get(name, "").lower() in ("1", "true", "yes")

    def filters(self) -> dict[str, list[str]]:
        """The `filters` query parameter: JSON `{"key": {"value": true}}` (or the older
        `{"key": ["value"]}`), as key -> values."""
        raw = self.query.get("filters", "")
        if not raw:
            return {}
        try:
            doc = json.loads(raw)
        except ValueError:
            raise APIError(400, f"invalid filter '{raw}': it is not JSON") from None
        if not isinstance(doc, dict):
            raise APIError(400, f"invalid filter '{raw}': it is not a JSON object")
        out: dict[str, list[str]] = {}
        for k, v in doc.items():
            if isinstance(v, dict):
                out[k] = [x for x, on in v.items() if on]
            elif isinstance(v, list):
                out[k] = [str(x) for x in v]
            else:
                raise APIError(400, f"invalid filter '{k}': give its values as an object or a list")
        return out


@dataclass
class Response:
    status: int = 200
    body: bytes = b""
    content_type: str = "application/json"
    headers: dict[str, str] = field(default_factory=dict)


@dataclass
class StreamResponse:
    """A body sent as it comes (chunked): `chunks` yields bytes until it ends."""

    chunks: AsyncIterator[bytes]
    status: int = 200
    content_type: str = ""  # Docker sends none for log streams
    headers: dict[str, str] = field(default_factory=dict)


def json_response(doc: Any, status: int = 200) -> Response:
    return Response(status, json.dumps(doc, separators=(",", ":")).encode() + b"\n")


def empty(status: int = 200) -> Response:
    """No body: Content-Length 0 and no Content-Type, as Docker answers updates and removals."""
    return Response(status, b"", content_type="")


Handler = Callable[[Request], Awaitable[Response | StreamResponse]]


@dataclass(frozen=True)
class Route:
    method: str
    pattern: str  # a regex of the path, with named groups: r"/services/(?P<id>[^/]+)"
    handler: Handler
    manager: bool = True  # needs the control API (a worker answers 503)


# ---- what the handlers know ------------------------------------------------------------------------
@dataclass
class NodeInfo:
    """This node as swarmd knows it (a worker has no control API to ask)."""

    node_id: str
    cluster_id: str
    hostname: str
    addr: str  # the node's address (no port)
    managers: Callable[[], list[str]]  # remote API addresses (host:port) of the managers
    is_manager: Callable[[], bool]  # now: a promotion or demotion changes it
    # registries reached over plain HTTP (swarmd --insecure-registry HOST:PORT, a host or a CIDR)
    insecure_registries: list[str] = field(default_factory=list)


class EngineContext:
    """What every handler is given: the node, and the control API of this node's manager role through
    its local socket (only while the node is a manager; `control` raises Docker's 503 otherwise)."""

    def __init__(self, node: NodeInfo, control_socket: str | os.PathLike[str]) -> None:
        self.node = node
        self.control_socket = str(control_socket)
        self._channel: grpc.aio.Channel | None = None
        self._stubs: dict[str, Any] = {}

    def _stub(self, name: str) -> Any:
        if not self.node.is_manager():
            raise APIError(503, NOT_MANAGER)
        if self._channel is None:
            self._channel = grpc.aio.insecure_channel(f"unix://{self.control_socket}", options=CONTROL_CHANNEL_OPTIONS)
        if name not in self._stubs:
            import importlib

            module = importlib.import_module(f"shoal.proto.{name.lower()}_pb2_grpc")
            self._stubs[name] = getattr(module, f"{name}Stub")(self._channel)
        return self._stubs[name]

    @property
    def control(self) -> Any:
        """A `ControlStub` on the local control socket."""
        return self._stub("Control")

    @property
    def watch(self) -> Any:
        """A `WatchStub` (the store's changes) on the local control socket."""
        return self._stub("Watch")

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close()
            self._channel, self._stubs = None, {}


# ---- the app --------------------------------------------------------------------------------------
class App:
    """Routes requests to the handlers of `routes` (every module's `routes(ctx)`, see
    shoal.engineapi.api)."""

    def __init__(self, routes: Sequence[Route], is_manager: Callable[[], bool]) -> None:
        self._routes = [(r, re.compile(f"^{r.pattern}$")) for r in routes]
        self.is_manager = is_manager

    async def handle(self, req: Request) -> Response | StreamResponse:
        try:
            return await self._dispatch(req)
        except APIError as e:
            return json_response({"message": e.message}, e.status)
        except grpc.aio.AioRpcError as e:
            err = rpc_error(e)
            return json_response({"message": err.message}, err.status)
        except Exception as e:  # a bug: one line to the client, the traceback to the log
            log.exception("engine API %s %s failed", req.method, req.path)
            return json_response({"message": f"internal error in Shoal's engine API: {type(e).__name__}: {e}"}, 500)

    async def _dispatch(self, req: Request) -> Response | StreamResponse:
        m = VERSION_PREFIX.match(req.path)
        if m:
            major, minor, req.path = int(m.group(1)), int(m.group(2)), m.group(3)
            if (major, minor) > tuple(int(x) for x in API_VERSION.split(".")):
                raise APIError(400, f"client version {major}.{minor} is too new. Maximum supported API version is "
                                    f"{API_VERSION}")
            req.version = f"{major}.{minor}"
        method = "GET" if req.method == "HEAD" else req.method
        allowed = []
        for route, rx in self._routes:
            pm = rx.match(req.path)
            if pm is None:
                continue
            if route.method != method:
                allowed.append(route.method)
                continue
            req.params = dict(pm.groupdict())
            if route.manager and not self.is_manager():
                raise APIError(503, NOT_MANAGER)
            return await route.handler(req)
        if allowed:
            raise APIError(405, f"{req.method} is not allowed on {req.path} (use {', '.join(sorted(set(allowed)))})")
        raise APIError(501, f"{req.method} {req.path} is not implemented by Shoal's Docker Engine API "
                            f"({API_VERSION}, swarm endpoints only; see docs/docker-api.md)")


# ---- HTTP/1.1 on asyncio streams ---------------------------------------------------------------------
class _BadRequest(Exception):
    pass


REASONS = {200: "OK", 201: "Created", 204: "No Content", 304: "Not Modified", 400: "Bad Request",
           403: "Forbidden", 404: "Not Found", 405: "Method Not Allowed", 409: "Conflict",
           500: "Internal Server Error", 501: "Not Implemented", 503: "Service Unavailable",
           504: "Gateway Timeout"}


def _common_headers() -> list[tuple[str, str]]:
    return [("Api-Version", API_VERSION), ("Docker-Experimental", "false"), ("Ostype", "linux"),
            ("Server", SERVER)]


async def _read_line(reader: asyncio.StreamReader) -> bytes:
    try:
        line = await reader.readuntil(b"\n")
    except asyncio.LimitOverrunError:
        raise _BadRequest("header line too long") from None
    return line.rstrip(b"\r\n")


async def _read_request(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> Request | None:
    """The next request on the connection; None at a clean end of the connection."""
    try:
        first = await _read_line(reader)
    except asyncio.IncompleteReadError as e:
        if e.partial.strip():
            raise _BadRequest("the connection ended inside a request line") from None
        return None
    while first == b"":  # tolerated empty lines between requests (RFC 9112 2.2)
        try:
            first = await _read_line(reader)
        except asyncio.IncompleteReadError:
            return None
    parts = first.decode("latin-1").split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
        raise _BadRequest(f"not an HTTP/1.x request line: {first[:80]!r}")
    method, target, _proto = parts
    headers: dict[str, str] = {}
    for _ in range(MAX_HEADERS + 1):
        line = await _read_line(reader)
        if not line:
            break
        name, sep, value = line.decode("latin-1").partition(":")
        if not sep or not name or name != name.strip():
            raise _BadRequest(f"malformed header line {line[:80]!r}")
        key = name.lower()
        headers[key] = f"{headers[key]}, {value.strip()}" if key in headers else value.strip()
    else:
        raise _BadRequest(f"more than {MAX_HEADERS} header lines")
    if headers.get("expect", "").lower() == "100-continue":
        writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
    body = b""
    if "chunked" in headers.get("transfer-encoding", "").lower():
        chunks = []
        size = 0
        while True:
            n = int((await _read_line(reader)).split(b";")[0] or b"0", 16)
            if n == 0:
                while await _read_line(reader):  # trailers
                    pass
                break
            size += n
            if size > MAX_BODY:
                raise _BadRequest(f"request body over {MAX_BODY} bytes")
            chunks.append(await reader.readexactly(n))
            await _read_line(reader)
        body = b"".join(chunks)
    elif "content-length" in headers:
        try:
            n = int(headers["content-length"])
        except ValueError:
            raise _BadRequest("Content-Length is not a number") from None
        if n < 0 or n > MAX_BODY:
            raise _BadRequest(f"request body of {n} bytes (at most {MAX_BODY})")
        body = await reader.readexactly(n)
    url = urlsplit(target)
    query = dict(parse_qsl(url.query, keep_blank_values=True))
    return Request(method.upper(), unquote(url.path), query, headers, body)


async def _client_gone(reader: asyncio.StreamReader) -> None:
    """Returns once the client has closed its end of the connection (seen as EOF on the read side)."""
    while not reader.at_eof():
        await asyncio.sleep(STREAM_EOF_POLL)


async def _pump(writer: asyncio.StreamWriter, reader: asyncio.StreamReader | None, resp: StreamResponse) -> None:
    """Send `resp.chunks` as HTTP chunks until the iterator ends; when the client goes away meanwhile
    (a `docker service logs -f` ended with ^C), the iterator is cancelled where it waits -- so its
    `finally` ends what feeds it -- and ConnectionError is raised."""
    it = resp.chunks.__aiter__()
    gone = asyncio.ensure_future(_client_gone(reader)) if reader is not None else None
    try:
        while True:
            nxt = asyncio.ensure_future(it.__anext__())
            waiting = {nxt} if gone is None else {nxt, gone}
            await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
            if not nxt.done():
                nxt.cancel()
                with contextlib.suppress(asyncio.CancelledError, StopAsyncIteration):
                    await nxt
                raise ConnectionResetError("the client closed the connection during a streamed response")
            try:
                chunk = nxt.result()
            except StopAsyncIteration:
                return
            if chunk:
                writer.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                await writer.drain()
    finally:
        if gone is not None:
            gone.cancel()
        aclose = getattr(it, "aclose", None)
        if aclose is not None:
            with contextlib.suppress(Exception):
                await aclose()


async def _write_response(writer: asyncio.StreamWriter, req: Request, resp: Response | StreamResponse,
                          keep_alive: bool, reader: asyncio.StreamReader | None = None) -> None:
    head = [f"HTTP/1.1 {resp.status} {REASONS.get(resp.status, 'Status')}"]
    headers = _common_headers() + list(resp.headers.items())
    if resp.content_type:
        headers.append(("Content-Type", resp.content_type))
    headers.append(("Date", _http_date()))
    if not keep_alive:
        headers.append(("Connection", "close"))
    if isinstance(resp, StreamResponse):
        headers.append(("Transfer-Encoding", "chunked"))
        writer.write(("\r\n".join(head + [f"{k}: {v}" for k, v in headers]) + "\r\n\r\n").encode("latin-1"))
        await writer.drain()
        if req.method != "HEAD":
            await _pump(writer, reader, resp)
            writer.write(b"0\r\n\r\n")
    else:
        if resp.status != 204:
            headers.append(("Content-Length", str(len(resp.body))))
        writer.write(("\r\n".join(head + [f"{k}: {v}" for k, v in headers]) + "\r\n\r\n").encode("latin-1"))
        if req.method != "HEAD" and resp.status != 204:
            writer.write(resp.body)
    await writer.drain()


def _http_date() -> str:
    from email.utils import formatdate

    return formatdate(usegmt=True)


async def _connection(app: App, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                      authorize: Callable[[bytes], str | None] | None = None) -> None:
    """Serve one connection. `authorize` (TCP with mutual TLS): called with the client certificate's
    DER before each request; a sentence refuses the request with a 403."""
    try:
        while True:
            try:
                req = await _read_request(reader, writer)
            except (_BadRequest, ValueError, asyncio.IncompleteReadError) as e:
                body = json.dumps({"message": str(e) if isinstance(e, _BadRequest) else "malformed request"}).encode()
                writer.write(b"HTTP/1.1 400 Bad Request\r\nContent-Type: application/json\r\nConnection: close\r\n"
                             + b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
                await writer.drain()
                return
            if req is None:
                return
            keep_alive = req.headers.get("connection", "").lower() != "close"
            refusal = None
            if authorize is not None:
                sslobj = writer.get_extra_info("ssl_object")
                der = sslobj.getpeercert(binary_form=True) if sslobj is not None else None
                refusal = authorize(der) if der else "a client certificate is required"
            resp = json_response({"message": refusal}, 403) if refusal else await app.handle(req)
            await _write_response(writer, req, resp, keep_alive, reader)
            if not keep_alive:
                return
    except (ConnectionError, asyncio.IncompleteReadError):
        pass  # the client went away
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()


async def serve_tls(host: str, port: int, app: App, ssl_ctx: ssl.SSLContext,
                    authorize: Callable[[bytes], str | None]) -> asyncio.Server:
    """Listen on TCP with TLS: `ssl_ctx` requires a client certificate (mutual TLS), and `authorize`
    decides for each request from it (see `_connection`)."""
    server = await asyncio.start_server(
        lambda r, w: _connection(app, r, w, authorize), host=host, port=port, ssl=ssl_ctx, limit=MAX_HEADER_LINE,
        ssl_handshake_timeout=10)
    log.info("Docker Engine API %s listening on tcp://%s:%d (mutual TLS)", API_VERSION, host, port)
    return server


async def serve_unix(path: str | os.PathLike[str], app: App, mode: int = 0o600) -> asyncio.Server:
    """Listen on the unix socket `path` (replacing a stale one), mode `mode`."""
    p = Path(path)
    with contextlib.suppress(FileNotFoundError):
        p.unlink()
    server = await asyncio.start_unix_server(
        lambda r, w: _connection(app, r, w), path=str(p), limit=MAX_HEADER_LINE)
    os.chmod(p, mode)
    log.info("Docker Engine API %s listening on unix://%s", API_VERSION, p)
    return server
