"""One NetworkDB node as a process, for tests and benchmarks (tests/netdriver/test_gossip.py,
bench/gossip.py). Launch it by its path, so that it works from a clone anywhere::

    python tests/gossipnode.py --node-id N --bind 127.0.0.5 --port 7946 \
        [--join HOST:PORT]... [--key-hex HEX]... [--network NET]... [--put TABLE/NET/KEY=VALUE]... \
        [--events] [--lan-defaults] [--probe-interval S]

It prints ``ready`` once joined and its puts are made; with ``--events`` every table and member
event as a JSON line. SIGTERM/SIGINT: leave the cluster and exit.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from shoal.netdriver.networkdb import GossipConfig, NetworkDB

PATH = str(Path(__file__).resolve())  # argv[1] for sys.executable


async def _run(args: argparse.Namespace) -> None:
    cfg = GossipConfig.memberlist_lan() if args.lan_defaults else GossipConfig()
    if args.probe_interval:
        cfg.probe_interval = args.probe_interval
        cfg.probe_timeout = args.probe_interval / 2
    g = NetworkDB(args.node_id, args.bind, args.advertise or args.bind, port=args.port,
               keys=[bytes.fromhex(k) for k in args.key_hex], config=cfg)
    if args.events:
        def out(**kw) -> None:
            print(json.dumps({"t": time.time(), **kw}), flush=True)

        g.add_listener(lambda ev: out(kind=str(ev.kind), net=ev.network_id, key=ev.key, owner=ev.owner))
        g.add_member_listener(lambda m: out(member=m.node_id, state=m.state_name))
    await g.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        if args.join:
            await g.join(args.join)
        for n in args.network:
            await g.join_network(n)
        for spec in args.put:
            path, _, value = spec.partition("=")
            table, net, key = path.split("/", 2)
            g.put(table, net, key, value.encode())
        print("ready", flush=True)
        await stop.wait()
        await g.leave()
    finally:
        await g.stop()


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="gossipnode.py", description="Run one gossip node.")
    ap.add_argument("--node-id", required=True)
    ap.add_argument("--bind", required=True)
    ap.add_argument("--advertise", default="")
    ap.add_argument("--port", type=int, default=7946)
    ap.add_argument("--join", action="append", default=[])
    ap.add_argument("--key-hex", action="append", default=[])
    ap.add_argument("--network", action="append", default=[])
    ap.add_argument("--put", action="append", default=[], help="TABLE/NETWORK/KEY=VALUE")
    ap.add_argument("--probe-interval", type=float, default=0.0)
    ap.add_argument("--lan-defaults", action="store_true", help="memberlist's LAN timings instead of Shoal's")
    ap.add_argument("--events", action="store_true", help="print table and member events as JSON lines")
    ap.add_argument("--log-level", default="INFO")
    args = ap.parse_args(argv)
    logging.basicConfig(level=args.log_level, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s %(message)s")
    asyncio.run(_run(args))


if __name__ == "__main__":
    main()
