"""The log broker: `swarmctl service logs` / `task logs` streamed from the agents through the manager.

Two gRPC services on one object (register it for both):

- `Logs.SubscribeLogs` (clients): resolves the selector (service and task ids or names, node ids)
  to the nodes holding those tasks, sends each connected node's agent a subscription, and relays
  what they publish. Without `follow` the stream ends when every node has sent its last line; with
  `follow` it runs until the client goes, and nodes that get a matching task later are subscribed
  too. Nodes that are not connected are named in the trailing metadata key
  `shoal-logs-unavailable-nodes` (comma separated).
- `LogBroker.ListenSubscriptions` / `PublishLogs` (agents, node id from the mTLS certificate).

Only the leader's broker has agents connected. On a follower, `SubscribeLogs` is relayed to the
leader when the manager has TLS credentials (`manager.credentials`) and the leader's address
(`manager.leader_api_addr()`); otherwise it fails with UNAVAILABLE and the leader's address in
`shoal-leader-addr`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import grpc

from shoal.manager.store import NotFound, Store, StoreError, drain, new_id
from shoal.proto import logs_pb2, logs_pb2_grpc

log = logging.getLogger("shoal.logbroker")

LEADER_ADDR_KEY = "shoal-leader-addr"
NODE_ID_KEY = "shoal-node-id"
UNAVAILABLE_NODES_KEY = "shoal-logs-unavailable-nodes"
CHECK_PERIOD = 0.5
# An agent's listener stream checks leadership this seldom: its agent leaves a manager that stopped
# leading with its whole session (the heartbeat is refused), channel and listener included; 0.5 s
# wake-ups of every agent's listener cost a fleet's leader more than its heartbeats.
LISTENER_CHECK_PERIOD = 10.0


@dataclass
class _Subscription:
    msg: logs_pb2.SubscriptionMessage
    queue: asyncio.Queue[tuple[str, list[logs_pb2.LogMessage], bool]] = field(default_factory=asyncio.Queue)
    nodes: set[str] = field(default_factory=set)  # nodes sent this subscription
    pending: set[str] = field(default_factory=set)  # nodes that have not closed yet (non-follow)


class LogBroker(logs_pb2_grpc.LogsServicer, logs_pb2_grpc.LogBrokerServicer):
    def __init__(
        self, store: Store, manager: Any = None, *, insecure_node_id_from_metadata: bool = False
    ) -> None:
        self.store = store
        self.manager = manager
        self.insecure = insecure_node_id_from_metadata
        self._listeners: dict[str, asyncio.Queue[logs_pb2.SubscriptionMessage]] = {}
        self._subs: dict[str, _Subscription] = {}

    # ---- identity ------------------------------------------------------------------------------
    def _peer(self, context: grpc.aio.ServicerContext) -> Any:
        from shoal.manager.ca import peer_identity

        return peer_identity(context)

    async def _node(self, context: grpc.aio.ServicerContext) -> str:
        peer = self._peer(context)
        node_id = peer.node_id if peer is not None else None
        if node_id is None and self.insecure:
            node_id = dict(context.invocation_metadata() or ()).get(NODE_ID_KEY)
        if not node_id:
            await context.abort(
                grpc.StatusCode.UNAUTHENTICATED, "no node identity: connect with the node's TLS certificate"
            )
        return str(node_id)

    def _leader_addr(self) -> str:
        fn = getattr(self.manager, "leader_api_addr", None)
        return (fn() or "") if fn is not None else ""

    async def _not_leader(self, context: grpc.aio.ServicerContext) -> None:
        leader = self._leader_addr()
        await context.abort(
            grpc.StatusCode.UNAVAILABLE,
            f"this manager is not the leader; the leader is at {leader or 'unknown (election under way)'}",
            trailing_metadata=((LEADER_ADDR_KEY, leader),),
        )

    # ---- agents ---------------------------------------------------------------------------------
    async def ListenSubscriptions(  # noqa: N802
        self, request: logs_pb2.ListenSubscriptionsRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[logs_pb2.SubscriptionMessage]:
        if not self.store.is_leader():
            await self._not_leader(context)
        node_id = await self._node(context)
        q: asyncio.Queue[logs_pb2.SubscriptionMessage] = asyncio.Queue()
        old = self._listeners.get(node_id)
        if old is not None:
            old.put_nowait(logs_pb2.SubscriptionMessage(close=True, id=""))  # ends the previous stream
        self._listeners[node_id] = q
        log.info("log listener connected node=%s", node_id)
        # Follow subscriptions already running that want this node (an agent that reconnected).
        for sub in self._subs.values():
            if sub.msg.options.follow and node_id in self._nodes_for(sub.msg.selector):
                sub.nodes.add(node_id)
                q.put_nowait(sub.msg)
        try:
            while True:
                try:
                    msg = await asyncio.wait_for(q.get(), LISTENER_CHECK_PERIOD)
                except TimeoutError:
                    if not self.store.is_leader():
                        await self._not_leader(context)
                    continue
                if msg.close and not msg.id:
                    return
                yield msg
        finally:
            if self._listeners.get(node_id) is q:
                del self._listeners[node_id]
            for sub in self._subs.values():  # nothing more will come from this node
                if node_id in sub.pending:
                    sub.queue.put_nowait((node_id, [], True))
            log.info("log listener disconnected node=%s", node_id)

    async def PublishLogs(  # noqa: N802
        self, request_iterator: AsyncIterator[logs_pb2.PublishLogsMessage], context: grpc.aio.ServicerContext
    ) -> logs_pb2.PublishLogsResponse:
        node_id = await self._node(context)
        async for m in request_iterator:
            sub = self._subs.get(m.subscription_id)
            if sub is None:
                continue  # the client went away; the agent hears `close` on its listener
            for lm in m.messages:
                lm.context.node_id = node_id  # a node speaks only for itself
            sub.queue.put_nowait((node_id, list(m.messages), m.close))
            if m.close:
                break
        return logs_pb2.PublishLogsResponse()

    # ---- clients ---------------------------------------------------------------------------------
    def _resolve(self, sel: logs_pb2.LogSelector) -> logs_pb2.LogSelector:
        out = logs_pb2.LogSelector(node_ids=list(sel.node_ids))
        for ref in sel.service_ids:
            out.service_ids.append(self.store.resolve("service", ref).id)
        for ref in sel.task_ids:
            out.task_ids.append(self.store.resolve("task", ref).id)
        return out

    def _nodes_for(self, sel: logs_pb2.LogSelector) -> set[str]:
        nodes = set(sel.node_ids)
        for sid in sel.service_ids:
            nodes.update(t.node_id for t in self.store.sm.tasks_by_service(sid) if t.node_id)
        for tid in sel.task_ids:
            t = self.store.get("task", tid)
            if t is not None and t.node_id:
                nodes.add(t.node_id)
        return nodes

    async def SubscribeLogs(  # noqa: N802
        self, request: logs_pb2.SubscribeLogsRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[logs_pb2.SubscribeLogsMessage]:
        peer = self._peer(context)
        if peer is not None and not peer.is_manager:
            await context.abort(
                grpc.StatusCode.PERMISSION_DENIED,
                f"node {peer.node_id} is a worker: logs are served to managers and the local control socket only",
            )
        if not self.store.is_leader():
            async for m in self._relay(request, context):
                yield m
            return
        sel = request.selector
        if not (sel.service_ids or sel.task_ids or sel.node_ids):
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, "no logs selected: name a service, task or node"
            )
        try:
            sel = self._resolve(sel)
        except StoreError as e:
            await context.abort(getattr(grpc.StatusCode, e.code, grpc.StatusCode.UNKNOWN), str(e))
        opts = logs_pb2.LogSubscriptionOptions()
        opts.CopyFrom(request.options)
        sub = _Subscription(logs_pb2.SubscriptionMessage(id=new_id(), selector=sel, options=opts))
        self._subs[sub.msg.id] = sub
        unavailable: list[str] = []
        watcher = self.store.watch(("task",)) if opts.follow else None
        try:
            self._subscribe_nodes(sub, self._nodes_for(sel), unavailable)
            log.info(
                "log subscription id=%s nodes=%d unavailable=%d follow=%s",
                sub.msg.id,
                len(sub.nodes),
                len(unavailable),
                opts.follow,
            )
            next_check = time.monotonic() + CHECK_PERIOD
            while opts.follow or sub.pending:
                try:
                    node, msgs, close = await asyncio.wait_for(
                        sub.queue.get(), max(0.0, next_check - time.monotonic())
                    )
                except TimeoutError:
                    msgs, close = [], False
                if msgs:
                    yield logs_pb2.SubscribeLogsMessage(messages=msgs)
                if close:
                    sub.pending.discard(node)
                if time.monotonic() >= next_check:
                    next_check = time.monotonic() + CHECK_PERIOD
                    if not self.store.is_leader():
                        await self._not_leader(context)
                    if watcher is not None and drain(watcher.queue):  # tasks changed: nodes that got a matching task
                        self._subscribe_nodes(sub, self._nodes_for(sel) - sub.nodes, unavailable)
            if unavailable:
                context.set_trailing_metadata(((UNAVAILABLE_NODES_KEY, ",".join(sorted(unavailable))),))
        finally:
            if watcher is not None:
                watcher.close()
            self._subs.pop(sub.msg.id, None)
            for node in sub.nodes:
                q = self._listeners.get(node)
                if q is not None:
                    q.put_nowait(logs_pb2.SubscriptionMessage(id=sub.msg.id, close=True))

    def _subscribe_nodes(self, sub: _Subscription, nodes: set[str], unavailable: list[str]) -> None:
        for node in sorted(nodes):
            q = self._listeners.get(node)
            if q is None:
                if node not in unavailable:
                    unavailable.append(node)
                continue
            sub.nodes.add(node)
            sub.pending.add(node)
            q.put_nowait(sub.msg)

    async def _relay(
        self, request: logs_pb2.SubscribeLogsRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[logs_pb2.SubscribeLogsMessage]:
        creds = getattr(self.manager, "credentials", None)
        identity = creds.current if creds is not None else None
        leader = self._leader_addr()
        if identity is None or not leader:
            await self._not_leader(context)
        from shoal.manager.ca import secure_channel

        async with secure_channel(leader, identity) as channel:
            call = logs_pb2_grpc.LogsStub(channel).SubscribeLogs(request)
            try:
                async for m in call:
                    yield m
            except grpc.aio.AioRpcError as e:
                md = e.trailing_metadata() or ()
                await context.abort(e.code(), e.details() or "", trailing_metadata=tuple(md))
            with contextlib.suppress(Exception):
                md = await call.trailing_metadata()
                if md:
                    context.set_trailing_metadata(tuple(md))


__all__ = ["LogBroker", "NotFound", "UNAVAILABLE_NODES_KEY"]
