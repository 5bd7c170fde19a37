"""Who may still call the mutual-TLS listener of 2377: the store decides at every call, and keeps
deciding for the calls already open.

A node certificate names the caller (node id, role) and TLS has checked it was issued by the cluster.
The store says whether that still holds:

- **Removed nodes.** `node rm` lists the node in the Cluster's `root_ca.revoked_nodes` in the same
  transaction that deletes it, until the last certificate issued to it has expired. Every call whose
  certificate names a listed node is refused with PERMISSION_DENIED, and every call it still has
  open (its dispatcher session, a log or watch stream) is ended at once with that status.
- **Demoted managers.** A demoted manager keeps its manager certificate until its next role check
  brings it a worker's (about 2 s). Meanwhile the manager-only services (`MANAGER_ONLY`: Control,
  Watch, Logs) refuse it, and its open calls to them end; the rest (its session, the CA) goes on as
  for any worker.

`Authorizer` is a gRPC server interceptor (the mTLS server's only one) plus one loop (`run`): the
interceptor checks each call when it starts and registers the calls that stream responses; the
loop follows the store's node and cluster changes and ends the registered calls that became
refused. The etcd peer port needs none of this: a demoted or removed manager's member has left the
store's membership, and a worker's certificate is refused there by name (see `etcdmember`).
"""

from __future__ import annotations

import asyncio
import datetime
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import grpc

from shoal.manager.ca import NODE_VALIDITY, PeerIdentity, expiry, peer_identity
from shoal.manager.store import Store, Tx, drain
from shoal.proto import objects_pb2, types_pb2

log = logging.getLogger(__name__)

MANAGER_ONLY = ("/shoal.Control/", "/shoal.Watch/", "/shoal.Logs/")


def revoked_message(node_id: str) -> str:
    return (f"the certificate of node {node_id} was revoked when the node was removed from the swarm "
            "(node rm): clear its state dir and join again with a join token")


def demoted_message(node_id: str) -> str:
    return (f"node {node_id} was demoted: its manager rights have ended (its next role check brings it a "
            "worker certificate); use a manager's TLS identity")


def revoke(tx: Tx, node: objects_pb2.Node) -> None:
    """In the transaction that removes `node`: list it in the Cluster's `revoked_nodes` until the last
    certificate issued to it expires (as recorded on the node; 90 days from now if none is), and drop
    the entries whose certificates have all expired."""
    cluster = next(iter(tx.sm.list("cluster")), None)
    if cluster is None:
        return
    c = objects_pb2.Cluster()
    c.CopyFrom(tx.get("cluster", cluster.id))
    now = datetime.datetime.now(datetime.UTC)
    if node.HasField("tls_info"):
        until = node.tls_info.cert_not_after.ToDatetime(datetime.UTC)
    elif node.certificate:
        until = expiry(node.certificate)
    else:
        until = now + NODE_VALIDITY
    keep = [r for r in c.root_ca.revoked_nodes if r.not_after.ToDatetime(datetime.UTC) > now and r.node_id != node.id]
    del c.root_ca.revoked_nodes[:]
    c.root_ca.revoked_nodes.extend(keep)
    entry = c.root_ca.revoked_nodes.add(node_id=node.id)
    entry.not_after.FromDatetime(until)
    tx.update(c)


@dataclass(eq=False)
class _OpenCall:
    peer: PeerIdentity
    method: str
    refused: asyncio.Event = field(default_factory=asyncio.Event)
    why: str = ""


class Authorizer(grpc.aio.ServerInterceptor):
    """The mTLS listener's interceptor: `refusal` at each call's start, and `run` (one loop) ends
    open response streams whose caller became refused. Plaintext and local callers (no certificate)
    pass: their listeners serve nothing a certificate would authorize."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self._open: dict[str, set[_OpenCall]] = {}  # by the caller's node id

    def refusal(self, peer: PeerIdentity, method: str) -> str | None:
        """Why the store refuses `peer` calling `method` now, or None."""
        cluster = self.store.cluster()
        if cluster is not None and any(r.node_id == peer.node_id for r in cluster.root_ca.revoked_nodes):
            return revoked_message(peer.node_id)
        if peer.is_manager and method.startswith(MANAGER_ONLY):
            node = self.store.get("node", peer.node_id)
            if node is not None and node.spec.desired_role != types_pb2.MANAGER:
                return demoted_message(peer.node_id)
        return None

    async def run(self) -> None:
        """End the open calls the store's changes refuse (a node removed, a manager demoted)."""
        watcher = self.store.watch(["node", "cluster"])
        try:
            closed = False
            while not closed:
                # The calls of the nodes that changed; all of them when the cluster did (a revocation).
                # Every message queued is taken now: a fleet's node changes come in thousands.
                msgs = [await watcher.queue.get(), *drain(watcher.queue)]
                if None in msgs:  # the watch was closed: what came before still counts
                    closed = True
                    msgs = msgs[: msgs.index(None)]
                nodes: set[str] = set()
                everyone = False
                for m in msgs:
                    for ev in m.events:
                        if ev.object.WhichOneof("object") == "node":
                            nodes.add(ev.object.node.id)
                        else:
                            everyone = True
                # (a fleet's thousands of open calls are not read for each node that changed)
                ids = list(self._open) if everyone else [n for n in nodes if n in self._open]
                for call in [c for n in ids for c in self._open.get(n, ())]:
                    why = self.refusal(call.peer, call.method)
                    if why and not call.refused.is_set():
                        log.info("ending %s of node %s: %s", call.method, call.peer.node_id, why)
                        call.why = why
                        call.refused.set()
        finally:
            watcher.close()

    # ---- the interceptor -------------------------------------------------------------------------
    async def intercept_service(
        self, continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None:
            return handler
        method = details.method
        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(
                self._unary(handler.unary_unary, method), handler.request_deserializer, handler.response_serializer)
        if handler.stream_unary:
            return grpc.stream_unary_rpc_method_handler(
                self._unary(handler.stream_unary, method), handler.request_deserializer, handler.response_serializer)
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(
                self._stream(handler.unary_stream, method), handler.request_deserializer, handler.response_serializer)
        return grpc.stream_stream_rpc_method_handler(
            self._stream(handler.stream_stream, method), handler.request_deserializer, handler.response_serializer)

    async def _check(self, context: grpc.aio.ServicerContext, method: str) -> PeerIdentity | None:
        peer = peer_identity(context)
        if peer is None:
            return None
        why = self.refusal(peer, method)
        if why:
            log.warning("refused %s of node %s: %s", method, peer.node_id, why)
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, why)
        return peer

    def _unary(self, inner: Callable[..., Awaitable[Any]], method: str) -> Callable[..., Awaitable[Any]]:
        async def behavior(request: Any, context: grpc.aio.ServicerContext) -> Any:
            await self._check(context, method)
            return await inner(request, context)

        return behavior

    def _stream(self, inner: Callable[..., AsyncIterator[Any]], method: str) -> Callable[..., AsyncIterator[Any]]:
        async def behavior(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            peer = await self._check(context, method)
            responses = inner(request, context)
            if peer is None:
                async for msg in responses:
                    yield msg
                return
            call = _OpenCall(peer, method)
            self._open.setdefault(peer.node_id, set()).add(call)
            refused = asyncio.ensure_future(call.refused.wait())
            step: asyncio.Future[Any] | None = None
            try:
                while True:
                    step = asyncio.ensure_future(anext(responses))
                    await asyncio.wait({step, refused}, return_when=asyncio.FIRST_COMPLETED)
                    if not step.done():
                        await context.abort(grpc.StatusCode.PERMISSION_DENIED, call.why)
                    try:
                        msg = step.result()
                    except StopAsyncIteration:
                        return
                    yield msg
            finally:
                calls = self._open.get(peer.node_id)
                if calls is not None:
                    calls.discard(call)
                    if not calls:
                        del self._open[peer.node_id]
                refused.cancel()
                if step is not None:
                    if not step.done():
                        step.cancel()
                        await asyncio.gather(step, return_exceptions=True)
                    elif not step.cancelled():
                        # read here, as no one else will: the step that saw the responses end (or
                        # fail) just as this call was cancelled (a leader's sessions ending at once)
                        step.exception()
                await responses.aclose()

        return behavior
