"""Root CA rotation: the leader loop that finishes what `swarmctl cluster ca --rotate` starts.

`ControlServicer.RotateRootCA` starts a rotation: `Cluster.root_ca.root_rotation` holds the new root,
its key, and the new root cross-signed by the current one. While it is there:

- the CA signs every node certificate with the new root and sends the cross-signed root after it
  (`ca.issuing_root`), so a party that still trusts only the old root accepts it -- an etcd member
  reads its trusted roots at start only;
- every CA answer carries both roots (`ca.trust_bundle`), and each node trusts both from its next
  role check (within ~2 s);
- a node whose certificate is of the old root gets one of the new root at its next role check
  (`Manager._renew`), without restarting anything: servers and clients take it at their next
  handshake, open sessions go on.

`RootRotation` (leader only) finishes the rotation once every node in the store holds a certificate
of the new root (`progress`), in one transaction checked against the cluster's version: the new root
and key become the cluster's, `root_rotation` is cleared, the cross-signed root is kept in
`root_ca.cross_signed_ca_cert` (node certificates go on carrying it), and both join tokens get the
new root's digest, their secrets unchanged. From their next role check nodes trust the new root
alone; the old root's key is gone from the store.

Failures. Each step is one transaction, and every state between two steps is one nodes work in, so
a leader killed partway leaves a rotation the next leader finishes. A node that is down holds a
certificate of the old root: the rotation waits for it (`swarmctl cluster ca` shows the count); a
node that will not come back must be removed (`node rm`), as in Docker.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

from shoal.manager import ca
from shoal.manager.store import Store, StoreError, Tx
from shoal.proto import objects_pb2

log = logging.getLogger(__name__)


def progress(cluster: objects_pb2.Cluster, nodes: Iterable[objects_pb2.Node]) -> tuple[int, int]:
    """(nodes holding a certificate of the rotation's new root, all nodes); (0, 0) without a rotation."""
    if not cluster.root_ca.HasField("root_rotation"):
        return 0, 0
    key = ca.issuer_key(cluster.root_ca.root_rotation.ca_cert)
    nodes = list(nodes)
    return sum(n.tls_info.cert_issuer_public_key == key for n in nodes), len(nodes)


def retarget_token(token: str, ca_cert_pem: bytes) -> str:
    """A join token for the root `ca_cert_pem` with the secret of `token` (empty stays empty)."""
    if not token:
        return token
    t = ca.parse_join_token(token)
    return f"{ca.TOKEN_PREFIX}-{ca.TOKEN_VERSION}-{ca.ca_digest(ca_cert_pem)}-{t.secret}"


def finished(cluster: objects_pb2.Cluster) -> objects_pb2.Cluster:
    """`cluster` with its rotation done: the new root is the cluster's."""
    out = objects_pb2.Cluster()
    out.CopyFrom(cluster)
    rot = out.root_ca.root_rotation
    rca = out.root_ca
    rca.ca_cert, rca.ca_key, rca.ca_cert_hash = rot.ca_cert, rot.ca_key, rot.ca_cert_hash
    rca.cross_signed_ca_cert = rot.cross_signed_ca_cert
    rca.join_tokens.worker = retarget_token(rca.join_tokens.worker, rot.ca_cert)
    rca.join_tokens.manager = retarget_token(rca.join_tokens.manager, rot.ca_cert)
    rca.ClearField("root_rotation")
    return out


class RootRotation:
    """Leader loop: finish a root rotation once every node holds a certificate of the new root."""

    def __init__(self, store: Store, manager: Any = None) -> None:
        self.store = store

    async def run(self) -> None:
        watcher = self.store.watch(["cluster", "node"])
        try:
            while True:
                await self.reconcile()
                if await watcher.queue.get() is None:
                    return
        finally:
            watcher.close()

    async def reconcile(self) -> None:
        cluster = self.store.cluster()
        if cluster is None or not cluster.root_ca.HasField("root_rotation"):
            return
        done, total = progress(cluster, self.store.find("node"))
        if done < total:
            return
        want = cluster.root_ca.root_rotation.ca_cert

        def fn(tx: Tx) -> None:
            cur = tx.get("cluster", cluster.id)
            if cur is None or cur.root_ca.root_rotation.ca_cert != want:
                return  # replaced or finished meanwhile: the next event decides
            tx.update(finished(cur))

        try:
            await self.store.update(fn)
        except StoreError as e:
            log.info("finishing the root rotation: %s; trying again at the next change", e)
            return
        log.info("root CA rotation done: every one of %d nodes holds a certificate of root %s; it is the "
                 "cluster's root now and the old root is gone", total, cluster.root_ca.root_rotation.ca_cert_hash[:12])
