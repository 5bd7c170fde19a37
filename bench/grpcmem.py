"""What a manager pays in memory for each agent's connection, apart from Shoal's own state.

    .venv/bin/python bench/grpcmem.py [--connections 1000] [--streams 1,4] [--plaintext]

For each stream count K: a fresh grpc.aio server process (mutual TLS on loopback, the dispatcher's
server options) and a client process opening `--connections` connections (each its own, as agents on
their own hosts) with K bidirectional streams each, every stream answered once and left open (an agent
holds one with its leader, Connect; it held four before: Session, Heartbeats, Assignments,
ListenSubscriptions, which older agents still open). The server's
resident memory before and after, per connection, is the figure; the fleet bench's leader-minus-
follower memory (docs/benchmarks.md, Fleet) is the whole session's cost to compare with. With
`--plaintext`, without TLS (what TLS itself costs, by difference). Prints a table and one JSON line.
Uses only loopback.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from fleet import rss_mb  # (bench/ is on the path of a bench run)

NAME = "swarm-manager"


def self_signed(d: Path) -> tuple[Path, Path]:
    """A CA certificate that is also the server's and the clients' (memory, not trust, is measured)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, NAME)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(1).not_valid_before(now).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(NAME)]), False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
            .sign(key, hashes.SHA256()))
    c, k = d / "cert.pem", d / "key.pem"
    c.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    k.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption()))
    return c, k


async def serve(port: int, cert: bytes, key: bytes, plaintext: bool) -> None:
    from shoal.manager.dispatcher import SERVER_OPTIONS

    async def echo(requests, context):  # noqa: ANN001, ANN202
        async for m in requests:
            yield m

    handler = grpc.method_handlers_generic_handler("bench.Mem", {"S": grpc.stream_stream_rpc_method_handler(echo)})
    server = grpc.aio.server(options=SERVER_OPTIONS)
    server.add_generic_rpc_handlers((handler,))
    if plaintext:
        server.add_insecure_port(f"127.0.0.1:{port}")
    else:
        server.add_secure_port(f"127.0.0.1:{port}", grpc.ssl_server_credentials([(key, cert)], cert, True))
    await server.start()
    print("ready", flush=True)
    await server.wait_for_termination()


async def connect(port: int, cert: bytes, key: bytes, n: int, k: int, plaintext: bool) -> None:
    creds = grpc.ssl_channel_credentials(cert, key, cert)
    options = [("grpc.use_local_subchannel_pool", 1), ("grpc.http2.bdp_probe", 0)]
    held = []
    for _ in range(n):
        target = f"127.0.0.1:{port}"
        ch = (grpc.aio.insecure_channel(target, options=options) if plaintext else
              grpc.aio.secure_channel(target, creds, options=[("grpc.ssl_target_name_override", NAME), *options]))
        for _ in range(k):
            call = ch.stream_stream("/bench.Mem/S")()
            await call.write(b"x" * 100)
            await call.read()
            held.append((ch, call))
    print("open", flush=True)
    await asyncio.sleep(3600)


def step(d: Path, port: int, n: int, k: int, plaintext: bool) -> dict[str, float]:
    me = [sys.executable, __file__, *(["--plaintext"] if plaintext else [])]
    srv = subprocess.Popen([*me, "--serve", str(port), "--dir", str(d)], stdout=subprocess.PIPE, text=True)
    cli = None
    try:
        assert srv.stdout is not None and srv.stdout.readline().strip() == "ready"
        time.sleep(1.0)
        before = rss_mb(srv.pid)
        cli = subprocess.Popen([*me, "--connect", str(port), "--dir", str(d), "--connections", str(n),
                                "--streams", str(k)], stdout=subprocess.PIPE, text=True)
        assert cli.stdout is not None and cli.stdout.readline().strip() == "open", "the client failed"
        time.sleep(3.0)
        after = rss_mb(srv.pid)
    finally:
        for p in (cli, srv):
            if p is not None:
                p.kill()
                p.wait()
    return {"streams": k, "rss_before_mb": round(before, 1), "rss_after_mb": round(after, 1),
            "kb_per_connection": round((after - before) * 1024 / n, 1)}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--connections", type=int, default=1000)
    ap.add_argument("--streams", default="1,4", help="stream counts per connection, one step each")
    ap.add_argument("--serve", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--connect", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--plaintext", action="store_true", help="without TLS")
    ap.add_argument("--dir", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.serve or a.connect:
        d = Path(a.dir)
        cert, key = (d / "cert.pem").read_bytes(), (d / "key.pem").read_bytes()
        if a.serve:
            asyncio.run(serve(a.serve, cert, key, a.plaintext))
        else:
            asyncio.run(connect(a.connect, cert, key, a.connections, int(a.streams), a.plaintext))
        return 0
    from shoal.lab.registry import free_port

    with tempfile.TemporaryDirectory(prefix="grpcmem") as tmp:
        d = Path(tmp)
        self_signed(d)
        rows = [step(d, free_port(), a.connections, int(k), a.plaintext) for k in a.streams.split(",")]
    kind = "plaintext" if a.plaintext else "mutual-TLS"
    print(f"grpc.aio server memory per {kind} connection ({a.connections} connections, grpcio {grpc.__version__})")
    print(f"{'streams':>8} {'RSS before':>11} {'RSS after':>10} {'KB/connection':>14}")
    for r in rows:
        print(f"{r['streams']:>8} {r['rss_before_mb']:>9.1f} MB {r['rss_after_mb']:>7.1f} MB {r['kb_per_connection']:>14.1f}")
    print(json.dumps({"bench": "grpcmem", "connections": a.connections, "tls": not a.plaintext,
                      "grpcio": grpc.__version__, "results": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
