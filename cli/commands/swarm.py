"""`swarmctl swarm join-token`: show or rotate the tokens that join nodes to the swarm."""

from __future__ import annotations

import argparse
from typing import Any

from shoal.cli import query
from shoal.cli.client import Client
from shoal.cli.cmdline import add_group, add_leaf
from shoal.cli.errors import CliError, retry_on_conflict
from shoal.proto import control_pb2, objects_pb2


def register(cmds: Any) -> None:
    sub = add_group(cmds, "swarm", "swarm-wide commands")
    p = add_leaf(sub, "join-token", swarm_join_token, "show (or rotate) a join token")
    p.add_argument("role", choices=("worker", "manager"))
    p.add_argument("--rotate", action="store_true", help="replace the token with a new one")
    p.add_argument("-q", "--quiet", action="store_true", help="only show the token")


def swarm_join_token(c: Client, args: argparse.Namespace) -> None:
    cl = c.call("GetCluster", control_pb2.GetClusterRequest()).cluster
    if args.rotate:
        def rotate() -> objects_pb2.Cluster:
            cur = c.call("GetCluster", control_pb2.GetClusterRequest()).cluster
            req = control_pb2.UpdateClusterRequest(cluster_version=cur.meta.version, spec=cur.spec)
            setattr(req, f"rotate_{args.role}_token", True)
            return c.call("UpdateCluster", req).cluster

        cl = retry_on_conflict(rotate)
        if not args.quiet:
            print(f"Successfully rotated {args.role} join token.\n")
    token = getattr(cl.root_ca.join_tokens, args.role)
    if args.quiet:
        print(token)
        return
    addr = ""
    try:
        info = query.info(c)
        node = query.get(c, "node", info.node_id) if info.node_id else None
        if node is not None and node.manager_status.api_addr:
            addr = node.manager_status.api_addr
        elif node is not None and (node.status.addr or node.description.addr):
            addr = f"{node.status.addr or node.description.addr}:2377"
    except CliError:
        pass
    print(f"To add a {args.role} to this swarm, run the following command:\n")
    print(f"    swarmd -d STATE_DIR --join-token {token} --join-addr {addr or 'MANAGER_ADDR:2377'}\n")

