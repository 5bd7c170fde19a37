"""`swarmctl lab …`: the one-machine lab (see shoal.lab.lab)."""

from __future__ import annotations

import argparse
import json
import sys
import time

from shoal.lab.lab import Lab, LabError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("lab", help="a multi-host cluster of network-namespace hosts on this machine",
                       description="A Shoal cluster on this machine: hosts are network namespaces on an "
                                   "underlay bridge (198.18.0.0/24), with a local registry. Needs root.")
    p.add_argument("--name", default="lab", help="lab name (default: lab)")
    # --name is also accepted after the command: `swarmctl lab up --name x`
    named = argparse.ArgumentParser(add_help=False)
    named.add_argument("--name", default=argparse.SUPPRESS, help="lab name (default: lab)")
    lsub = p.add_subparsers(dest="lab_cmd", metavar="COMMAND", required=True)

    def cmd(name: str, text: str) -> argparse.ArgumentParser:
        return lsub.add_parser(name, help=text, description=text, parents=[named])

    up = cmd("up", "build the hosts, start swarmd on each, create the cluster and join them")
    up.add_argument("--managers", type=int, default=3, help="number of manager hosts (default 3)")
    up.add_argument("--workers", type=int, default=2, help="number of worker hosts (default 2)")
    up.add_argument("--simulated", type=int, default=0, metavar="N",
                    help="also N simulated worker nodes (real agents and sessions, containers in memory; "
                         "engine label simulated=true), for a large cluster on one machine (default 0)")
    cmd("down", "remove everything the lab made (processes, containers, mounts, namespaces, state)")
    st = cmd("status", "one line per host: name, role, address, state, leader (and one for the simulated nodes)")
    st.add_argument("--format", choices=["table", "json"], default="table")
    cmd("env", "print `export SWARM_SOCKET=…` for eval")
    ex = cmd("exec", "run a command inside a host's namespaces: lab exec h1 -- CMD…")
    ex.add_argument("host")
    ex.add_argument("argv", nargs=argparse.REMAINDER)
    for name, text in (("partition", "cut a host off the underlay"), ("heal", "reconnect a partitioned host"),
                       ("kill", "kill a host's swarmd (containers keep running)"),
                       ("start", "start a killed swarmd again (it re-adopts its containers)")):
        c = cmd(name, text)
        c.add_argument("host", help="host name (h1, h2, …) or underlay address")
        if name == "start":
            c.add_argument("--no-wait", action="store_true",
                           help="return once swarmd runs, without waiting for its session with a leader "
                                "(when no manager can answer yet: managers without quorum, all managers down)")
    p.set_defaults(func=run, no_client=True)  # talks to no manager: run(args), no gRPC loaded


def _progress(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def run(args: argparse.Namespace) -> int:
    if args.lab_cmd == "exec":  # `lab exec HOST --name X -- CMD`: the remainder swallowed --name
        while len(args.argv) >= 2 and args.argv[0] == "--name":
            args.name, args.argv = args.argv[1], args.argv[2:]
    lab = Lab(args.name, progress=_progress)
    try:
        cmd = args.lab_cmd
        if cmd == "up":
            st = lab.up(args.managers, args.workers, simulated=args.simulated)
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
            lab.start(args.host, wait=not args.no_wait)
    except LabError as e:
        print(f"Error: {e}", file=sys.stderr)
        return 1
    return 0
