"""`swarmctl cluster …` (show, update, unlock, unlock key, backup) and `swarmctl info`."""

from __future__ import annotations

import argparse
import getpass
import os
import sys
import time
from pathlib import Path
from typing import Any

from shoal.cli import output as out
from shoal.cli import query
from shoal.cli.client import Client
from shoal.cli.cmdline import CONN, add_format, add_group, add_leaf
from shoal.cli.errors import CliError, retry_on_conflict
from shoal.cli.flagtypes import BOOL, DURATION, parse_labels, uint
from shoal.compose.units import format_duration
from shoal.proto import control_pb2, objects_pb2, specs_pb2, types_pb2


def register(cmds: Any) -> None:
    sub = add_group(cmds, "cluster", "inspect and update the cluster")
    p = add_leaf(sub, "inspect", cluster_inspect, "show the cluster object")
    p.add_argument("--pretty", action="store_true", help="human-readable output")
    add_format(p)
    p = add_leaf(sub, "update", cluster_update, "change cluster settings")
    p.add_argument("--task-history-limit", type=uint("task history limit"), help="tasks kept per slot")
    p.add_argument("--heartbeat-period", "--dispatcher-heartbeat", dest="heartbeat_period", type=DURATION,
                   help="agents' heartbeat period")
    p.add_argument("--restart-window", type=DURATION, metavar="DURATION",
                   help="how long a node whose swarmd stopped gracefully (an upgrade) keeps its tasks before "
                        "it is marked down (default 60s)")
    p.add_argument("--cert-expiry", type=DURATION, metavar="DURATION",
                   help="validity of node certificates (default 2160h = 90 days, at least 1m); nodes renew "
                        "theirs at a random 50-80%% of it")
    p.add_argument("--network-key-rotation", type=DURATION, metavar="DURATION",
                   help="how often the IPsec keys of encrypted networks and the gossip keys are replaced "
                        "(default 12h, at least 1s)")
    p.add_argument("--default-addr-pool", action="append", help="address pool for networks (CIDR)")
    p.add_argument("--subnet-size", type=uint("subnet size"), help="prefix length of network subnets")
    p.add_argument("--label-add", action="append", help="add a cluster label KEY=VALUE")
    p.add_argument("--label-rm", action="append", help="remove a cluster label")
    p.add_argument("--rotate-worker-token", action="store_true", help="rotate the worker join token")
    p.add_argument("--rotate-manager-token", action="store_true", help="rotate the manager join token")
    p.add_argument("--autolock", type=BOOL, nargs="?", const=True, default=None, metavar="true|false",
                   help="lock restarted managers until `swarmctl cluster unlock` gives them the unlock key")
    p = add_leaf(sub, "ca", cluster_ca, "show the root CA certificate, or rotate the root CA")
    p.add_argument("--rotate", action="store_true",
                   help="rotate to a new root CA (made by the manager, or given with --ca-cert/--ca-key); every node "
                        "gets a certificate of it, then the old root is dropped")
    p.add_argument("--ca-cert", metavar="FILE", help="PEM certificate of the root CA to rotate to (with --ca-key)")
    p.add_argument("--ca-key", metavar="FILE", help="PEM key of that root CA, unencrypted (with --ca-cert)")
    p.add_argument("-d", "--detach", action="store_true", help="return once the rotation has started")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress, only the root CA certificate")
    p = add_leaf(sub, "unlock", cluster_unlock, "unlock a locked manager (reads the unlock key from stdin or a prompt)")
    p = add_leaf(sub, "unlock-key", cluster_unlock_key, "show (or rotate) the managers' unlock key")
    p.add_argument("-q", "--quiet", action="store_true", help="only show the key")
    p.add_argument("--rotate", action="store_true", help="replace the unlock key with a new one")

    p = add_leaf(sub, "backup", cluster_backup, "write a backup of the whole cluster state (for swarmd --restore)")
    p.add_argument("file", metavar="FILE", help="the backup file to write (mode 0600)")
    p.add_argument("--force", action="store_true", help="replace FILE if it exists")


def register_info(cmds: Any) -> None:
    p = cmds.add_parser("info", help="show the swarm as this manager sees it", parents=[CONN])
    p.set_defaults(func=info_cmd)
    add_format(p)


def cluster_inspect(c: Client, args: argparse.Namespace) -> None:
    cl = c.call("GetCluster", control_pb2.GetClusterRequest()).cluster
    if args.pretty:
        s = cl.spec
        print(f"ID:\t\t\t{cl.id}\nName:\t\t\t{s.annotations.name}")
        print(f"Task history limit:\t{s.orchestration.task_history_retention_limit}")
        hb = s.dispatcher.heartbeat_period
        print(f"Heartbeat period:\t{format_duration(hb.seconds * 10**9 + hb.nanos) if hb.ByteSize() else 'default'}")
        rw = s.dispatcher.restart_window
        print(f"Restart window:\t\t{format_duration(rw.seconds * 10**9 + rw.nanos) if rw.ByteSize() else '60s (default)'}")
        ce = s.ca_config.node_cert_expiry
        print(f"Node cert expiry:\t{format_duration(ce.seconds * 10**9 + ce.nanos) if ce.ByteSize() else 'default'}")
        kr = s.network_encryption.key_rotation_interval
        kr_ns = kr.seconds * 10**9 + kr.nanos
        print(f"Network key rotation:\t{format_duration(kr_ns) if kr_ns else '12h (default)'}")
        print(f"Default address pool:\t{', '.join(s.default_address_pool) or '10.0.0.0/8 (default)'}")
        print(f"Subnet size:\t\t{s.subnet_size or 24}")
        print(f"CA digest:\t\t{cl.root_ca.ca_cert_hash}")
        print(f"Autolock:\t\t{str(s.encryption_config.autolock_managers).lower()}")
    else:
        out.print_json(cl)



def _print_unlock_command(key: str) -> None:
    print("To unlock a swarm manager after it restarts, run the `swarmctl cluster unlock` command and "
          f"provide the following key:\n\n    {key}\n\nRemember to store this key in a password manager, "
          "since without it you will not be able to restart the manager.")


MIN_CERT_EXPIRY_NS = 60 * 10**9  # = shoal.manager.validation's (the manager checks it too)
HOUR_NS = 3600 * 10**9


def _check_cert_expiry(ns: int | None) -> None:
    """`--cert-expiry`: at least a minute; below an hour (Docker's minimum) only with a warning."""
    if ns is None:
        return
    if ns < MIN_CERT_EXPIRY_NS:
        raise CliError(f"--cert-expiry {format_duration(ns)} is too short: give at least 1m "
                       "(the default is 2160h, 90 days)")
    if ns < HOUR_NS:
        lo, hi = format_duration(ns // 2), format_duration(ns * 4 // 5)
        print(f"warning: --cert-expiry {format_duration(ns)} is shorter than an hour: every node will renew "
              f"its certificate every {lo} to {hi}; use this for labs and tests", file=sys.stderr)


def cluster_update(c: Client, args: argparse.Namespace) -> None:
    _check_cert_expiry(args.cert_expiry)
    autolock_was: list[bool] = []
    cl = retry_on_conflict(lambda: _cluster_update_once(c, args, autolock_was))
    if cl.spec.encryption_config.autolock_managers and autolock_was and not autolock_was[-1]:
        key = c.call("GetUnlockKey", control_pb2.GetUnlockKeyRequest()).unlock_key
        print("Swarm updated.")
        _print_unlock_command(key)
        return
    print(cl.spec.annotations.name or cl.id)


def _cluster_update_once(c: Client, args: argparse.Namespace, autolock_was: list[bool]) -> objects_pb2.Cluster:
    cl = c.call("GetCluster", control_pb2.GetClusterRequest()).cluster
    autolock_was.append(cl.spec.encryption_config.autolock_managers)
    spec = specs_pb2.ClusterSpec()
    spec.CopyFrom(cl.spec)
    if args.autolock is not None:
        spec.encryption_config.autolock_managers = args.autolock
    if args.task_history_limit is not None:
        spec.orchestration.task_history_retention_limit = args.task_history_limit
    if args.heartbeat_period is not None:
        spec.dispatcher.heartbeat_period.FromNanoseconds(args.heartbeat_period)
    if args.restart_window is not None:
        spec.dispatcher.restart_window.FromNanoseconds(args.restart_window)
    if args.cert_expiry is not None:
        spec.ca_config.node_cert_expiry.FromNanoseconds(args.cert_expiry)
    if args.network_key_rotation is not None:
        spec.network_encryption.key_rotation_interval.FromNanoseconds(args.network_key_rotation)
    if args.default_addr_pool:
        del spec.default_address_pool[:]
        spec.default_address_pool.extend(args.default_addr_pool)
    if args.subnet_size is not None:
        spec.subnet_size = args.subnet_size
    spec.annotations.labels.update(parse_labels(args.label_add))
    for k in args.label_rm or ():
        spec.annotations.labels.pop(k, None)
    return c.call("UpdateCluster", control_pb2.UpdateClusterRequest(
        cluster_version=cl.meta.version, spec=spec, rotate_worker_token=args.rotate_worker_token,
        rotate_manager_token=args.rotate_manager_token)).cluster


def _read_pem(flag: str, path: str | None) -> bytes:
    if not path:
        return b""
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise CliError(f"{flag} {path}: cannot read it ({e.strerror or e}): give a readable PEM file") from None


def cluster_ca(c: Client, args: argparse.Namespace) -> None:
    """`cluster ca`: the root CA certificate; with --rotate (or --ca-cert/--ca-key) a root rotation,
    followed until every node holds a certificate of the new root and it is the cluster's."""
    if bool(args.ca_cert) != bool(args.ca_key):
        raise CliError("--ca-cert and --ca-key go together: give both, or neither for a new root made by the manager")
    if not (args.rotate or args.ca_cert):
        sys.stdout.write(c.call("GetCluster", control_pb2.GetClusterRequest()).cluster.root_ca.ca_cert.decode())
        return
    cert, key = _read_pem("--ca-cert", args.ca_cert), _read_pem("--ca-key", args.ca_key)
    target = c.call("RotateRootCA", control_pb2.RotateRootCARequest(ca_cert=cert, ca_key=key)).ca_cert_hash
    if not args.quiet:
        print(f"desired root digest: {target}", file=sys.stderr)
    if not args.detach:
        _follow_rotation(c, target, quiet=args.quiet)
    sys.stdout.write(c.call("GetCluster", control_pb2.GetClusterRequest()).cluster.root_ca.ca_cert.decode())


ROTATION_POLL = 0.5
ROTATION_HINT_AFTER = 30.0  # seconds without progress before naming the nodes the rotation waits for


def _follow_rotation(c: Client, target: str, *, quiet: bool) -> None:
    """Until the cluster's root is `target`: `rotated TLS certificates: N/M nodes` at every change,
    and after a while without progress the nodes still holding a certificate of the old root."""
    last, since, hinted = (-1, -1), time.monotonic(), False
    while True:
        cl = c.call("GetCluster", control_pb2.GetClusterRequest()).cluster
        rot = cl.root_ca.root_rotation if cl.root_ca.HasField("root_rotation") else None
        if rot is None and cl.root_ca.ca_cert_hash == target:
            break
        if rot is None or rot.ca_cert_hash != target:
            now = cl.root_ca.root_rotation.ca_cert_hash if rot is not None else cl.root_ca.ca_cert_hash
            raise CliError(f"the rotation to root {target[:12]} was replaced by another one (to root {now[:12]}): "
                           "follow that one with `swarmctl cluster ca`")
        nodes = query.list_objects(c, "node")
        new_key = _cert_key(rot.ca_cert)
        waiting = [n for n in nodes if n.tls_info.cert_issuer_public_key != new_key]
        count = (len(nodes) - len(waiting), len(nodes))
        if count != last:
            last, since, hinted = count, time.monotonic(), False
            if not quiet:
                print(f"rotated TLS certificates: {count[0]}/{count[1]} nodes", file=sys.stderr)
        elif not hinted and time.monotonic() - since > ROTATION_HINT_AFTER and not quiet:
            hinted = True
            names = ", ".join(f"{n.description.hostname or n.id} "
                              f"({types_pb2.NodeStatus.State.Name(n.status.state).lower()})" for n in waiting)
            print(f"waiting for {names}: a node gets its new certificate when it is up; remove one that will not "
                  "come back with `swarmctl node rm`", file=sys.stderr)
        time.sleep(ROTATION_POLL)
    if not quiet:
        n = len(query.list_objects(c, "node"))
        print(f"rotated TLS certificates: {n}/{n} nodes\nroot CA rotation done: the old root is dropped",
              file=sys.stderr)


def _cert_key(cert_pem: bytes) -> bytes:
    """DER of a certificate's public key (what NodeTLSInfo.cert_issuer_public_key holds)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    return x509.load_pem_x509_certificate(cert_pem).public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def cluster_unlock(c: Client, args: argparse.Namespace) -> None:
    if sys.stdin.isatty():
        key = getpass.getpass("Please enter unlock key: ")
    else:
        key = sys.stdin.readline()
    key = key.strip()
    if not key:
        raise CliError("no unlock key given: type it at the prompt or pipe it on stdin "
                       "(`swarmctl cluster unlock-key` on an unlocked manager shows it)")
    c.call("UnlockCluster", control_pb2.UnlockClusterRequest(unlock_key=key))


def cluster_unlock_key(c: Client, args: argparse.Namespace) -> None:
    if args.rotate:
        def rotate() -> objects_pb2.Cluster:
            cur = c.call("GetCluster", control_pb2.GetClusterRequest()).cluster
            if not cur.spec.encryption_config.autolock_managers:
                raise CliError("cannot rotate because autolock is not turned on: "
                               "run `swarmctl cluster update --autolock=true`")
            req = control_pb2.UpdateClusterRequest(cluster_version=cur.meta.version, spec=cur.spec,
                                                   rotate_unlock_key=True)
            return c.call("UpdateCluster", req).cluster

        retry_on_conflict(rotate)
        if not args.quiet:
            print("Successfully rotated manager unlock key.\n")
    key = c.call("GetUnlockKey", control_pb2.GetUnlockKeyRequest()).unlock_key
    if not key:
        raise CliError("no unlock key is set: autolock is off (turn it on with `swarmctl cluster update --autolock=true`)")
    if args.quiet:
        print(key)
        return
    _print_unlock_command(key)


def cluster_backup(c: Client, args: argparse.Namespace) -> None:
    path = Path(args.file)
    if path.exists() and not args.force:
        raise CliError(f"{path} exists: give another file name, or --force to replace it")
    resp = c.call("BackupCluster", control_pb2.BackupClusterRequest(), timeout=max(c.timeout, 60))
    if resp.stale:
        print(f"warning: {resp.stale}", file=sys.stderr)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(resp.backup)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    print(f"Backup of cluster {resp.cluster_id} at store version {resp.version} written to {path}.")
    if resp.key:
        print("It opens with this key, shown only now; keep it apart from the file:\n\n"
              f"    {resp.key}\n\n"
              f"Restore with:  echo KEY | swarmd -d NEW_STATE_DIR --restore {path}")
    else:
        print("Autolock is on: it opens with the cluster's unlock key (`swarmctl cluster unlock-key`) of now.\n"
              f"Restore with:  echo UNLOCK_KEY | swarmd -d NEW_STATE_DIR --restore {path}")



def info_cmd(c: Client, args: argparse.Namespace) -> None:
    info = query.info(c)
    if args.format == "json":
        out.print_json(info)
        return
    nodes = query.list_objects(c, "node")
    managers = [n for n in nodes if n.role == types_pb2.MANAGER]
    print(f"Swarm: active\n NodeID: {info.node_id}\n Is Manager: {str(info.is_manager).lower()}")
    print(f" ClusterID: {info.cluster_id}\n Leader: {info.leader_node_id or '(none: no quorum?)'}")
    print(f" Managers: {len(managers)}\n Nodes: {len(nodes)}\n Store version: {info.store_version}")
    if info.members:
        print(" Raft members:")
        for m in info.members:
            state = "leader" if m.leader else ("reachable" if m.reachable else "unreachable")
            print(f"  {m.node_id}  {m.addr}  {state}")


