"""`swarmctl lab …`: the one-machine lab (see shoal.lab.lab)."""

from __future__ import annotations

import argparse
import json
import sys
import time


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("lab", help="a multi-host cluster of network-namespace hosts on this machine")
    p.add_argument("--name", default="lab", help="lab name (default: lab)")
    lsub = p.add_subparsers(dest="lab_cmd", metavar="COMMAND", required=True)
    up = lsub.add_parser("up", help="build the hosts, start swarmd on each and join them")
    up.add_argument("--managers", type=int, default=3)
    up.add_argument("--workers", type=int, default=2)
    lsub.add_parser("down", help="remove everything the lab made")
    st = lsub.add_parser("status", help="one line per host: name, role, address, state, leader")
    st.add_argument("--format", choices=["table", "json"], default="table")
    lsub.add_parser("env", help="print `export SWARM_SOCKET=…` for eval")
    ex = lsub.add_parser("exec", help="run a command inside a host's namespaces: lab exec h1 -- CMD…")
    ex.add_argument("host")
    ex.add_argument("argv", nargs=argparse.REMAINDER)
    for name, text in (("partition", "cut a host off the underlay"), ("heal", "reconnect a partitioned host"),
                       ("kill", "kill a host's swarmd (containers keep running)"), ("start", "start a killed swarmd again")):
        q = lsub.add_parser(name, help=text)
        q.add_argument("host")
    p.set_defaults(func=run)


def _progress(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def run(args: argparse.Namespace) -> int:
    from shoal.lab.lab import Lab, LabError

    lab = Lab(args.name, progress=_progress)
    try:
        cmd = args.lab_cmd
        if cmd == "up":
            st = lab.up(args.managers, args.workers)
            print(f"export SWARM_SOCKET={st.hosts[0].socket}")
        elif cmd == "down":
            lab.down()
        elif cmd == "status":
            rows = lab.status()
            if args.format == "json":
                print(json.dumps(rows, indent=2))
            else:
                for r in rows:
                    print(f"{r['host']:<6} {r['role']:<8} {r['addr']:<15} {r['state']:<12} {r['leader']}".rstrip())
        elif cmd == "env":
            print(lab.env())
        elif cmd == "exec":
            argv = args.argv[1:] if args.argv[:1] == ["--"] else args.argv
            return lab.exec(args.host, argv)
        elif cmd in ("partition", "heal"):
            lab.partition(args.host, cut=cmd == "partition")
        elif cmd == "kill":
            lab.kill(args.host)
        elif cmd == "start":
            lab.start(args.host)
    except LabError as e:
        print(f"Error: {e}", file=sys.stderr)
        return 1
    return 0
