"""A control API for swarmctl tests: ControlServicer and WatchServicer (as swarmd serves them) over a
LocalStore on a unix socket.

    python tests/cli/server.py SOCKET [--seed]

`--seed` creates what a fresh single-manager swarm has: the cluster object (with a root CA
certificate and join tokens) and this manager's node (READY, leader), plus a DOWN worker `w1`.
Prints `ready` on stdout once it listens; stops on SIGTERM/SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import signal
import sys

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from shoal.manager.ca import generate_join_token
from shoal.manager.controlapi import ControlServicer, add_to_server
from shoal.manager.store import LocalStore, Tx
from shoal.manager.watchapi import WatchServicer
from shoal.proto import objects_pb2, specs_pb2, types_pb2, watch_pb2_grpc


def ca_cert_pem() -> bytes:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(x509.oid.NameOID.COMMON_NAME, "swarm-ca")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(1).not_valid_before(now).not_valid_after(now + datetime.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM)


def seed(tx: Tx) -> None:
    pem = ca_cert_pem()
    cl = objects_pb2.Cluster(spec=specs_pb2.ClusterSpec(annotations=types_pb2.Annotations(name="default")),
                             root_ca=objects_pb2.RootCA(ca_key=b"KEY", ca_cert=pem))
    cl.root_ca.join_tokens.worker = generate_join_token(pem)
    cl.root_ca.join_tokens.manager = generate_join_token(pem)
    tx.create(cl)
    m = objects_pb2.Node(role=types_pb2.MANAGER)
    m.description.hostname = "m1"
    m.description.platform.os = "linux"
    m.description.platform.architecture = "x86_64"
    m.status.state = types_pb2.NodeStatus.READY
    m.status.addr = "127.0.0.1"
    m.spec.desired_role = types_pb2.MANAGER
    m.spec.membership = specs_pb2.NodeSpec.ACCEPTED
    m.manager_status.leader = True
    m.manager_status.reachability = types_pb2.ManagerStatus.REACHABLE
    m.manager_status.addr = "127.0.0.1:2377"
    tx.create(m)
    w = objects_pb2.Node(role=types_pb2.WORKER)
    w.description.hostname = "w1"
    w.status.state = types_pb2.NodeStatus.DOWN
    w.spec.membership = specs_pb2.NodeSpec.ACCEPTED
    tx.create(w)


async def serve(sock: str, do_seed: bool) -> None:
    store = LocalStore()
    if do_seed:
        await store.update(seed)
    server = grpc.aio.server()
    add_to_server(ControlServicer(store), server)
    watch_pb2_grpc.add_WatchServicer_to_server(WatchServicer(store), server)
    server.add_insecure_port(f"unix://{sock}")
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print("ready", flush=True)
    await stop.wait()
    await server.stop(None)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("socket")
    p.add_argument("--seed", action="store_true")
    a = p.parse_args()
    asyncio.run(serve(a.socket, a.seed))


if __name__ == "__main__":
    sys.exit(main())
