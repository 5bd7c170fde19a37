"""swarmctl: the command line of a Shoal cluster (talks to a manager's control API over gRPC).

    swarmctl [--socket PATH | --host ADDR:2377 --tls-dir DIR] COMMAND ...

Errors print `Error: <sentence>` on stderr and exit 1; usage errors exit 2.
"""

from __future__ import annotations

import argparse
import base64
import getpass
import json
import os
import shlex
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

from shoal.cli import output as out
from shoal.cli import units
from shoal.cli.client import Client, CliError
from shoal.cli.progress import Snapshot, Waiter, measure
from shoal.compose import units as sizes
from shoal.proto import control_pb2, objects_pb2, specs_pb2, types_pb2

DEFAULT_WAIT_TIMEOUT = 300.0


# ---- argparse plumbing ---------------------------------------------------------------------------
class Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        sys.stderr.write(f"Error: {message}\nSee '{self.prog} --help'.\n")
        sys.exit(2)


def typed(fn: Callable[[str], Any], what: str | None = None) -> Callable[[str], Any]:
    def conv(text: str) -> Any:
        try:
            return fn(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    conv.__name__ = what or fn.__name__
    return conv


def uint(what: str) -> Callable[[str], int]:
    return typed(lambda t: units.parse_uint(t, what), what)


DURATION = typed(sizes.parse_duration, "duration")
BYTES = typed(sizes.parse_bytes, "size")
CPUS = typed(sizes.parse_cpus, "cpus")
RATIO = typed(units.parse_ratio, "ratio")
PORT = typed(units.parse_port, "port")
MOUNT = typed(units.parse_mount, "mount")
PREF = typed(units.parse_placement_pref, "placement preference")
ULIMIT = typed(units.parse_ulimit, "ulimit")
ADD_HOST = typed(units.parse_add_host, "host")
SECRET = typed(lambda t: units.parse_file_ref(t, "secret"), "secret")
CONFIG = typed(lambda t: units.parse_file_ref(t, "config"), "config")


def _conn_parent() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("connection")
    g.add_argument("--socket", default=argparse.SUPPRESS,
                   help="the manager's local control socket (default $SWARM_SOCKET or /var/run/shoal/swarmd.sock)")
    g.add_argument("--host", default=argparse.SUPPRESS, help="a manager's remote API, ADDR:2377 (needs --tls-dir)")
    g.add_argument("--tls-dir", default=argparse.SUPPRESS,
                   help="state dir (or its certificates folder) of the node whose TLS identity to use")
    return p


CONN = _conn_parent()


def _fmt(p: argparse.ArgumentParser) -> None:
    p.add_argument("--format", choices=("table", "json"), default="table", help="output format")


def _quiet(p: argparse.ArgumentParser) -> None:
    p.add_argument("-q", "--quiet", action="store_true", help="only show ids")


# ---- helpers -------------------------------------------------------------------------------------
def _info(c: Client) -> control_pb2.InfoResponse:
    return c.call("Info", control_pb2.InfoRequest())


def _node_ref(c: Client, ref: str) -> str:
    if ref == "self":
        node_id = _info(c).node_id
        if not node_id:
            raise CliError("this manager does not know its own node id: name the node by id or hostname")
        return node_id
    return ref


def _get(c: Client, kind: str, ref: str) -> Any:
    title = kind.capitalize()
    req = getattr(control_pb2, f"Get{title}Request")(**{f"{kind}_id": ref})
    return getattr(c.call(f"Get{title}", req), kind)


def _list(c: Client, kind: str, filters: control_pb2.ListFilters | None = None) -> list[Any]:
    plural = kind + "s"
    title = plural.capitalize()
    req = getattr(control_pb2, f"List{title}Request")(filters=filters)
    return list(getattr(c.call(f"List{title}", req), plural))


def _filters(items: Sequence[str] | None, kind: str) -> control_pb2.ListFilters:
    f = control_pb2.ListFilters()
    for item in items or ():
        key, eq, value = item.partition("=")
        if not eq:
            raise CliError(f"filter {item!r} is not KEY=VALUE: use e.g. --filter name=web")
        key = key.lower()
        if key == "name":
            f.names.append(value)
        elif key in ("name-prefix", "name_prefix"):
            f.name_prefixes.append(value)
        elif key == "id":
            f.id_prefixes.append(value)
        elif key == "label":
            k, _, v = value.partition("=")
            f.labels[k] = v
        elif key == "service" and kind == "task":
            f.service_ids.append(value)
        elif key == "node" and kind == "task":
            f.node_ids.append(value)
        elif key in ("desired-state", "desired_state") and kind == "task":
            try:
                f.desired_states.append(types_pb2.TaskState.Value(value.upper()))
            except ValueError:
                raise CliError(f"desired-state {value!r} is not a task state: use e.g. running, shutdown") from None
        elif key == "role" and kind == "node":
            if value.lower() not in ("manager", "worker"):
                raise CliError(f"role {value!r} is not a node role: use manager or worker")
            f.roles.append(types_pb2.NodeRole.Value(value.upper()))
        else:
            raise CliError(f"unknown {kind} filter {key!r}: use name, name-prefix, id or label"
                           + (", service, node or desired-state" if kind == "task" else "")
                           + (" or role" if kind == "node" else ""))
    return f


def _print_list(args: argparse.Namespace, objs: Sequence[Any], headers: Sequence[str],
                row: Callable[[Any], Sequence[str]]) -> None:
    if getattr(args, "format", "table") == "json":
        out.print_json(objs)
    elif getattr(args, "quiet", False):
        for o in objs:
            print(o.id)
    else:
        out.print_table(headers, [row(o) for o in objs])


def _inspect(args: argparse.Namespace, c: Client, kind: str, refs: Sequence[str],
             pretty: Callable[[Any], None] | None = None) -> None:
    objs = [_get(c, kind, _node_ref(c, r) if kind == "node" else r) for r in refs]
    if pretty is not None and getattr(args, "pretty", False):
        for i, o in enumerate(objs):
            if i:
                print()
            pretty(o)
    else:
        out.print_json(objs)


def _labels(items: Sequence[str] | None, what: str = "label") -> dict[str, str]:
    result: dict[str, str] = {}
    for item in items or ():
        try:
            k, v = units.parse_kv(item, what)
        except ValueError as e:
            raise CliError(str(e)) from None
        result[k] = v
    return result


def _read_data(path: str | None, kind: str) -> bytes:
    if path is None:
        raise CliError(f"no {kind} data given: give a file, or - to read it from standard input")
    if path == "-":
        return sys.stdin.buffer.read()
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise CliError(f"cannot read {kind} data from {path}: {e.strerror}") from None


def _waiter(args: argparse.Namespace, c: Client) -> Waiter | None:
    if getattr(args, "detach", False):
        return None
    sink = open(os.devnull, "w") if getattr(args, "quiet", False) else sys.stdout  # noqa: SIM115
    return Waiter(c, out=sink, timeout=args.timeout)


# ---- cluster -------------------------------------------------------------------------------------
def cluster_inspect(c: Client, args: argparse.Namespace) -> None:
    cl = c.call("GetCluster", control_pb2.GetClusterRequest()).cluster
    if args.pretty:
        s = cl.spec
        print(f"ID:\t\t\t{cl.id}\nName:\t\t\t{s.annotations.name}")
        print(f"Task history limit:\t{s.orchestration.task_history_retention_limit}")
        hb = s.dispatcher.heartbeat_period
        print(f"Heartbeat period:\t{sizes.format_duration(hb.seconds * 10**9 + hb.nanos) if hb.ByteSize() else 'default'}")
        ce = s.ca_config.node_cert_expiry
        print(f"Node cert expiry:\t{sizes.format_duration(ce.seconds * 10**9 + ce.nanos) if ce.ByteSize() else 'default'}")
        kr = s.network_encryption.key_rotation_interval
        kr_ns = kr.seconds * 10**9 + kr.nanos
        print(f"Network key rotation:\t{sizes.format_duration(kr_ns) if kr_ns else '12h (default)'}")
        print(f"Default address pool:\t{', '.join(s.default_address_pool) or '10.0.0.0/8 (default)'}")
        print(f"Subnet size:\t\t{s.subnet_size or 24}")
        print(f"CA digest:\t\t{cl.root_ca.ca_cert_hash}")
        print(f"Autolock:\t\t{str(s.encryption_config.autolock_managers).lower()}")
    else:
        out.print_json(cl)


def _bool(text: str) -> bool:
    t = text.strip().lower()
    if t in ("true", "1", "yes", "on"):
        return True
    if t in ("false", "0", "no", "off"):
        return False
    raise ValueError(f"{text!r} is not a boolean: give true or false")


BOOL = typed(_bool, "boolean")


def _print_unlock_command(key: str) -> None:
    print("To unlock a swarm manager after it restarts, run the `swarmctl cluster unlock` command and "
          f"provide the following key:\n\n    {key}\n\nRemember to store this key in a password manager, "
          "since without it you will not be able to restart the manager.")


def cluster_update(c: Client, args: argparse.Namespace) -> None:
    autolock_was: list[bool] = []
    cl = _retrying(lambda: _cluster_update_once(c, args, autolock_was))
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
    if args.cert_expiry is not None:
        spec.ca_config.node_cert_expiry.FromNanoseconds(args.cert_expiry)
    if args.network_key_rotation is not None:
        spec.network_encryption.key_rotation_interval.FromNanoseconds(args.network_key_rotation)
    if args.default_addr_pool:
        del spec.default_address_pool[:]
        spec.default_address_pool.extend(args.default_addr_pool)
    if args.subnet_size is not None:
        spec.subnet_size = args.subnet_size
    spec.annotations.labels.update(_labels(args.label_add))
    for k in args.label_rm or ():
        spec.annotations.labels.pop(k, None)
    return c.call("UpdateCluster", control_pb2.UpdateClusterRequest(
        cluster_version=cl.meta.version, spec=spec, rotate_worker_token=args.rotate_worker_token,
        rotate_manager_token=args.rotate_manager_token)).cluster


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

        _retrying(rotate)
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


def swarm_join_token(c: Client, args: argparse.Namespace) -> None:
    cl = c.call("GetCluster", control_pb2.GetClusterRequest()).cluster
    if args.rotate:
        def rotate() -> objects_pb2.Cluster:
            cur = c.call("GetCluster", control_pb2.GetClusterRequest()).cluster
            req = control_pb2.UpdateClusterRequest(cluster_version=cur.meta.version, spec=cur.spec)
            setattr(req, f"rotate_{args.role}_token", True)
            return c.call("UpdateCluster", req).cluster

        cl = _retrying(rotate)
        if not args.quiet:
            print(f"Successfully rotated {args.role} join token.\n")
    token = getattr(cl.root_ca.join_tokens, args.role)
    if args.quiet:
        print(token)
        return
    addr = ""
    try:
        info = _info(c)
        node = _get(c, "node", info.node_id) if info.node_id else None
        if node is not None and node.manager_status.api_addr:
            addr = node.manager_status.api_addr
        elif node is not None and (node.status.addr or node.description.addr):
            addr = f"{node.status.addr or node.description.addr}:2377"
    except CliError:
        pass
    print(f"To add a {args.role} to this swarm, run the following command:\n")
    print(f"    swarmd -d STATE_DIR --join-token {token} --join-addr {addr or 'MANAGER_ADDR:2377'}\n")


def info_cmd(c: Client, args: argparse.Namespace) -> None:
    info = _info(c)
    if args.format == "json":
        out.print_json(info)
        return
    nodes = _list(c, "node")
    managers = [n for n in nodes if n.role == types_pb2.MANAGER]
    print(f"Swarm: active\n NodeID: {info.node_id}\n Is Manager: {str(info.is_manager).lower()}")
    print(f" ClusterID: {info.cluster_id}\n Leader: {info.leader_node_id or '(none: no quorum?)'}")
    print(f" Managers: {len(managers)}\n Nodes: {len(nodes)}\n Store version: {info.store_version}")
    if info.members:
        print(" Raft members:")
        for m in info.members:
            state = "leader" if m.leader else ("reachable" if m.reachable else "unreachable")
            print(f"  {m.node_id}  {m.addr}  {state}")


# ---- nodes ---------------------------------------------------------------------------------------
def _manager_status(n: objects_pb2.Node) -> str:
    if n.role != types_pb2.MANAGER and not n.HasField("manager_status"):
        return ""
    if n.manager_status.leader:
        return "Leader"
    r = n.manager_status.reachability
    return {types_pb2.ManagerStatus.REACHABLE: "Reachable",
            types_pb2.ManagerStatus.UNREACHABLE: "Unreachable"}.get(r, "Unknown")


def node_ls(c: Client, args: argparse.Namespace) -> None:
    nodes = _list(c, "node", _filters(args.filter, "node"))
    self_id = ""
    if args.format == "table" and not args.quiet:
        try:
            self_id = _info(c).node_id
        except CliError:
            pass

    def row(n: objects_pb2.Node) -> list[str]:
        return [n.id + (" *" if n.id == self_id else ""), n.description.hostname,
                types_pb2.NodeStatus.State.Name(n.status.state).capitalize(),
                types_pb2.NodeAvailability.Name(n.spec.availability).capitalize(), _manager_status(n),
                n.description.engine.engine_version]

    _print_list(args, nodes, ["ID", "HOSTNAME", "STATUS", "AVAILABILITY", "MANAGER STATUS", "ENGINE VERSION"], row)


def _node_pretty(n: objects_pb2.Node) -> None:
    d = n.description
    print(f"ID:\t\t\t{n.id}\nHostname:\t\t{d.hostname}\nJoined at:\t\t{n.meta.created_at.ToJsonString()}")
    print(f"Status:\n State:\t\t\t{types_pb2.NodeStatus.State.Name(n.status.state).capitalize()}")
    print(f" Availability:\t\t{types_pb2.NodeAvailability.Name(n.spec.availability).capitalize()}")
    print(f" Address:\t\t{n.status.addr or d.addr}")
    if n.role == types_pb2.MANAGER:
        print(f"Manager Status:\n Address:\t\t{n.manager_status.addr}\n Raft Status:\t\t{_manager_status(n)}")
        print(f" Leader:\t\t{'Yes' if n.manager_status.leader else 'No'}")
    if n.spec.annotations.labels:
        print("Labels:")
        for k, v in sorted(n.spec.annotations.labels.items()):
            print(f" - {k}={v}")
    print(f"Platform:\n Operating System:\t{d.platform.os}\n Architecture:\t\t{d.platform.architecture}")
    print(f"Resources:\n CPUs:\t\t\t{d.resources.nano_cpus / 1e9:g}\n Memory:\t\t"
          f"{units.format_bytes(d.resources.memory_bytes)}")
    print(f"Engine Version:\t\t{d.engine.engine_version}")
    if d.capabilities:
        print(f"Capabilities:\t\t{', '.join(d.capabilities)}")


def node_inspect(c: Client, args: argparse.Namespace) -> None:
    _inspect(args, c, "node", args.nodes, _node_pretty)


UPDATE_ATTEMPTS = 5


def _retrying(fn: Callable[[], Any]) -> Any:
    """Run a read-modify-write again when something else changed the object in between (a control
    loop writing status, say): the change is re-applied to what is current."""
    for attempt in range(UPDATE_ATTEMPTS):
        try:
            return fn()
        except CliError as e:
            if not e.conflict or attempt == UPDATE_ATTEMPTS - 1:
                raise
    raise AssertionError("unreachable")


def _update_node(c: Client, ref: str, change: Callable[[specs_pb2.NodeSpec], None]) -> objects_pb2.Node:
    def once() -> objects_pb2.Node:
        node = _get(c, "node", _node_ref(c, ref))
        spec = specs_pb2.NodeSpec()
        spec.CopyFrom(node.spec)
        change(spec)
        return c.call("UpdateNode", control_pb2.UpdateNodeRequest(
            node_id=node.id, node_version=node.meta.version, spec=spec)).node

    return _retrying(once)


def node_update(c: Client, args: argparse.Namespace) -> None:
    def change(spec: specs_pb2.NodeSpec) -> None:
        if args.availability:
            spec.availability = types_pb2.NodeAvailability.Value(args.availability.upper())
        if args.role:
            spec.desired_role = types_pb2.NodeRole.Value(args.role.upper())
        spec.annotations.labels.update(_labels(args.label_add))
        for k in args.label_rm or ():
            if k not in spec.annotations.labels:
                raise CliError(f"node has no label {k!r} to remove")
            del spec.annotations.labels[k]

    _update_node(c, args.node, change)
    print(args.node)


def _node_set(attr: str, value: int, message: str) -> Callable[[Client, argparse.Namespace], None]:
    def cmd(c: Client, args: argparse.Namespace) -> None:
        for ref in args.nodes:
            _update_node(c, ref, lambda spec: setattr(spec, attr, value))
            print(message.format(ref))

    return cmd


def node_rm(c: Client, args: argparse.Namespace) -> None:
    for ref in args.nodes:
        c.call("RemoveNode", control_pb2.RemoveNodeRequest(node_id=_node_ref(c, ref), force=args.force))
        print(ref)


# ---- services: building specs --------------------------------------------------------------------
_RESTART = {"none": types_pb2.RestartPolicy.NONE, "on-failure": types_pb2.RestartPolicy.ON_FAILURE,
            "any": types_pb2.RestartPolicy.ANY}
_FAILURE_ACTION = {"pause": types_pb2.UpdateConfig.PAUSE, "continue": types_pb2.UpdateConfig.CONTINUE,
                   "rollback": types_pb2.UpdateConfig.ROLLBACK}
_ORDER = {"stop-first": types_pb2.UpdateConfig.STOP_FIRST, "start-first": types_pb2.UpdateConfig.START_FIRST}


def _service_flags(p: argparse.ArgumentParser, update: bool) -> None:
    """Flags shared by `service create` and `service update` (single values; lists differ)."""
    a = p.add_argument
    a("--image", help="image reference (also the first positional argument of create)")
    a("--replicas", type=uint("replicas"), help="number of tasks (replicated mode)")
    a("--replicas-max-per-node", type=uint("max replicas per node"), help="at most this many tasks per node")
    a("--hostname", help="container hostname (Go templates such as {{.Task.Slot}} allowed)")
    a("-u", "--user", help="user[:group] in the container")
    a("-w", "--workdir", help="working directory in the container")
    a("--command", "--entrypoint", dest="command", help="override the image's entrypoint (shell words)")
    a("--args", help="the command's arguments (shell words)")
    a("--memory-limit", "--limit-memory", dest="memory_limit", type=BYTES, help="memory limit, e.g. 64m")
    a("--cpu-limit", "--limit-cpu", dest="cpu_limit", type=CPUS, help="CPU limit, e.g. 0.5")
    a("--memory-reservation", "--reserve-memory", dest="memory_reservation", type=BYTES, help="memory reservation")
    a("--cpu-reservation", "--reserve-cpu", dest="cpu_reservation", type=CPUS, help="CPU reservation")
    a("--pids-limit", "--limit-pids", dest="pids_limit", type=uint("pids limit"), help="max processes (0 = none)")
    a("--restart-condition", choices=sorted(_RESTART), help="when to restart tasks")
    a("--restart-delay", type=DURATION, help="delay between restarts, e.g. 5s")
    a("--restart-max-attempts", type=uint("restart max attempts"), help="give up after this many restarts")
    a("--restart-window", type=DURATION, help="window in which restarts are counted")
    for which in ("update", "rollback"):
        a(f"--{which}-parallelism", type=uint(f"{which} parallelism"), help=f"tasks {which}d at once (0 = all)")
        a(f"--{which}-delay", type=DURATION, help=f"delay between {which} batches")
        choices = sorted(_FAILURE_ACTION) if which == "update" else ["continue", "pause"]
        a(f"--{which}-failure-action", choices=choices, help=f"what to do when a task {which} fails")
        a(f"--{which}-monitor", type=DURATION, help="how long to watch each task for failure")
        a(f"--{which}-max-failure-ratio", type=RATIO, help="tolerated failure ratio, 0 to 1")
        a(f"--{which}-order", choices=sorted(_ORDER), help="stop-first or start-first")
    a("--health-cmd", help="command to check health (run by the shell)")
    a("--health-interval", type=DURATION, help="time between health checks")
    a("--health-timeout", type=DURATION, help="time a health check may take")
    a("--health-retries", type=uint("health retries"), help="failures before unhealthy")
    a("--health-start-period", type=DURATION, help="grace period before failures count")
    a("--no-healthcheck", action="store_true", help="disable the image's health check")
    init = p.add_mutually_exclusive_group()
    init.add_argument("--init", dest="init", action="store_true", default=None, help="run an init as PID 1")
    if update:
        init.add_argument("--no-init", dest="init", action="store_false", help="do not run an init")
    a("--read-only", action="store_true", default=None, help="mount the root filesystem read-only")
    a("-t", "--tty", action="store_true", default=None, help="allocate a terminal")
    a("--stop-grace-period", type=DURATION, help="time to wait before killing a container")
    a("--stop-signal", help="signal to stop the container")
    a("--endpoint-mode", choices=("vip", "dnsrr"), help="service discovery: virtual IP or DNS round robin")
    a("--log-driver", help="logging driver")
    a("--with-registry-auth", action="store_true", help="send registry credentials to the agents")
    a("-d", "--detach", action="store_true", help="return at once instead of waiting for convergence")
    a("-q", "--quiet", action="store_true", help="suppress progress output")
    a("--timeout", type=typed(lambda t: sizes.parse_duration(t) / 1e9, "duration"), default=DEFAULT_WAIT_TIMEOUT,
      help="give up waiting for convergence after this long (default 5m)")


def _set_update_config(cfg: types_pb2.UpdateConfig, args: argparse.Namespace, which: str) -> None:
    v = getattr(args, f"{which}_parallelism")
    if v is not None:
        cfg.parallelism = v
    if (v := getattr(args, f"{which}_delay")) is not None:
        cfg.delay.FromNanoseconds(v)
    if (v := getattr(args, f"{which}_failure_action")) is not None:
        cfg.failure_action = _FAILURE_ACTION[v]
    if (v := getattr(args, f"{which}_monitor")) is not None:
        cfg.monitor.FromNanoseconds(v)
    if (v := getattr(args, f"{which}_max_failure_ratio")) is not None:
        cfg.max_failure_ratio = v
    if (v := getattr(args, f"{which}_order")) is not None:
        cfg.order = _ORDER[v]


def _registry_auth(image: str) -> str:
    """Docker's X-Registry-Auth for the image's registry, from ~/.docker/config.json (or `{}`)."""
    first = image.split("/")[0]
    registry = first if "/" in image and ("." in first or ":" in first or first == "localhost") else "docker.io"
    cfg_dir = os.environ.get("DOCKER_CONFIG") or os.path.expanduser("~/.docker")
    creds: dict[str, str] = {}
    try:
        auths = json.loads(Path(cfg_dir, "config.json").read_text()).get("auths", {})
    except (OSError, ValueError):
        auths = {}
    for key in (registry, f"https://{registry}", "https://index.docker.io/v1/" if registry == "docker.io" else ""):
        entry = auths.get(key)
        if entry and entry.get("auth"):
            user, _, pw = base64.b64decode(entry["auth"]).decode().partition(":")
            creds = {"username": user, "password": pw, "serveraddress": registry}
            break
    return base64.urlsafe_b64encode(json.dumps(creds).encode()).decode()


def _apply_common(spec: specs_pb2.ServiceSpec, args: argparse.Namespace) -> None:
    """Single-valued flags of create and update onto `spec`."""
    t = spec.task
    cs = t.container
    if args.image:
        cs.image = args.image
    if args.replicas is not None:
        if spec.WhichOneof("mode") == "global":
            raise CliError("--replicas can only be used with replicated mode")
        spec.replicated.replicas = args.replicas
    if args.replicas_max_per_node is not None:
        t.placement.max_replicas = args.replicas_max_per_node
    for field, value in (("hostname", args.hostname), ("user", args.user), ("dir", args.workdir),
                         ("stop_signal", args.stop_signal)):
        if value is not None:
            setattr(cs, field, value)
    if args.command is not None:
        del cs.command[:]
        cs.command.extend(shlex.split(args.command))
    if args.args is not None:
        del cs.args[:]
        cs.args.extend(shlex.split(args.args))
    res = t.resources
    for target, value in ((res.limits, args.memory_limit), (res.reservations, args.memory_reservation)):
        if value is not None:
            target.memory_bytes = value
    for target, value in ((res.limits, args.cpu_limit), (res.reservations, args.cpu_reservation)):
        if value is not None:
            target.nano_cpus = value
    if args.pids_limit is not None:
        res.pids_limit = args.pids_limit
    if args.restart_condition is not None:
        t.restart.condition = _RESTART[args.restart_condition]
    if args.restart_delay is not None:
        t.restart.delay.FromNanoseconds(args.restart_delay)
    if args.restart_max_attempts is not None:
        t.restart.max_attempts = args.restart_max_attempts
    if args.restart_window is not None:
        t.restart.window.FromNanoseconds(args.restart_window)
    _set_update_config(spec.update, args, "update")
    _set_update_config(spec.rollback, args, "rollback")
    hc = cs.healthcheck
    if args.no_healthcheck:
        cs.healthcheck.CopyFrom(types_pb2.HealthConfig(test=["NONE"]))
    elif args.health_cmd is not None:
        del hc.test[:]
        hc.test.extend(["CMD-SHELL", args.health_cmd])
    for field in ("interval", "timeout", "start_period"):
        v = getattr(args, f"health_{field}")
        if v is not None:
            getattr(hc, field).FromNanoseconds(v)
    if args.health_retries is not None:
        hc.retries = args.health_retries
    if args.init is not None:
        cs.init = args.init
    if args.read_only is not None:
        cs.read_only = args.read_only
    if args.tty is not None:
        cs.tty = args.tty
    if args.stop_grace_period is not None:
        cs.stop_grace_period.FromNanoseconds(args.stop_grace_period)
    if args.endpoint_mode is not None:
        spec.endpoint.mode = types_pb2.EndpointSpec.ResolutionMode.Value(args.endpoint_mode.upper())
    if args.log_driver is not None:
        t.log_driver.name = args.log_driver
    if args.with_registry_auth and cs.image:
        cs.pull_options.registry_auth = _registry_auth(cs.image)


def _network_attachment(text: str) -> types_pb2.NetworkAttachmentConfig:
    if "=" not in text:
        return types_pb2.NetworkAttachmentConfig(target=text)
    att = types_pb2.NetworkAttachmentConfig()
    for k, v in units.parse_csv_opts(text):
        if k in ("name", "target"):
            att.target = v
        elif k == "alias":
            att.aliases.append(v)
        elif k == "driver-opt":
            dk, dv = units.parse_kv(v, "driver option")
            att.driver_attachment_opts[dk] = dv
        else:
            raise CliError(f"unknown network option {k!r} in {text!r}: use name, alias and driver-opt")
    return att


def _list_flags(p: argparse.ArgumentParser, update: bool) -> None:
    """List flags: plain on create, NAME-add / NAME-rm on update (as docker's)."""
    items = [
        ("env", "-e", None, "environment variable KEY=VALUE"),
        ("label", "-l", None, "service label KEY=VALUE"),
        ("container-label", None, None, "container label KEY=VALUE"),
        ("constraint", None, None, "placement constraint, e.g. node.role==worker"),
        ("placement-pref", None, PREF, "placement preference, e.g. spread=node.labels.zone"),
        ("publish", "-p", PORT, "publish a port: [PUBLISHED:]TARGET[/PROTO] or published=,target=,protocol=,mode="),
        ("network", None, None, "attach to a network (name or id, or name=NET,alias=A)"),
        ("secret", None, SECRET, "give the service a secret: NAME or source=NAME,target=FILE,mode=0400"),
        ("config", None, CONFIG, "give the service a config: NAME or source=NAME,target=/PATH"),
        ("mount", None, MOUNT, "mount: type=bind|volume|tmpfs,source=,target=[,readonly]"),
        ("add-host", None, ADD_HOST, "extra /etc/hosts entry HOST:IP"),
        ("dns", None, None, "DNS server"),
        ("dns-search", None, None, "DNS search domain"),
        ("dns-option", None, None, "DNS option"),
        ("group", None, None, "additional group for the user"),
        ("cap-add", None, None, "add a Linux capability"),
        ("cap-drop", None, None, "drop a Linux capability"),
        ("sysctl", None, None, "namespaced kernel parameter KEY=VALUE"),
        ("ulimit", None, ULIMIT, "ulimit NAME=SOFT[:HARD]"),
        ("log-opt", None, None, "logging driver option KEY=VALUE"),
    ]
    for name, short, conv, help_text in items:
        dest = name.replace("-", "_")
        if update:
            p.add_argument(f"--{name}-add", dest=f"{dest}_add", action="append", type=conv, help=f"add: {help_text}")
            p.add_argument(f"--{name}-rm", dest=f"{dest}_rm", action="append", help=f"remove ({name})")
        else:
            flags = [f"--{name}"] + ([short] if short else [])
            if name == "publish":
                flags.append("--ports")
            p.add_argument(*flags, dest=dest, action="append", type=conv, help=help_text)


def _apply_lists(spec: specs_pb2.ServiceSpec, args: argparse.Namespace, update: bool,
                 resolve_network: Callable[[str], str] | None = None) -> None:
    """Apply list flags; on update, `-rm` removals first, then `-add` additions (docker's order)."""
    t, cs = spec.task, spec.task.container

    def adds(name: str) -> list[Any]:
        return list(getattr(args, f"{name}_add" if update else name) or [])

    def rms(name: str) -> list[str]:
        return list(getattr(args, f"{name}_rm", None) or []) if update else []

    # env: removal by KEY
    env_rm = set(rms("env"))
    kept = [e for e in cs.env if e.partition("=")[0] not in env_rm]
    new_env = [units.parse_env(e) for e in adds("env")]
    new_keys = {e.partition("=")[0] for e in new_env}
    kept = [e for e in kept if e.partition("=")[0] not in new_keys]
    del cs.env[:]
    cs.env.extend(kept + new_env)
    for name, target in (("label", spec.annotations.labels), ("container_label", cs.labels),
                         ("sysctl", cs.sysctls), ("log_opt", t.log_driver.options)):
        for k in rms(name):
            target.pop(k, None)
        target.update(_labels(adds(name), name.replace("_", " ")))
    for name, field in (("constraint", t.placement.constraints), ("dns", cs.dns_config.nameservers),
                        ("dns_search", cs.dns_config.search), ("dns_option", cs.dns_config.options),
                        ("group", cs.groups), ("cap_add", cs.capability_add), ("cap_drop", cs.capability_drop),
                        ("add_host", cs.hosts)):
        gone = set(rms(name))
        kept_items = [x for x in field if x not in gone]
        if name == "add_host" and gone:  # removal by host name
            kept_items = [x for x in kept_items if not set(x.split()[1:]) & gone]
        del field[:]
        field.extend(kept_items + [x for x in adds(name) if x not in kept_items])
    prefs = [p for p in t.placement.preferences if p.spread_descriptor not in
             {r.partition("=")[2] or r for r in rms("placement_pref")}]
    del t.placement.preferences[:]
    t.placement.preferences.extend(prefs + adds("placement_pref"))
    # ports: removal by TARGET[/PROTO] or PUBLISHED:TARGET
    gone_ports = set()
    for r in rms("publish"):
        try:
            gone_ports.update((p.target_port, p.protocol) for p in units.parse_port(r))
        except ValueError as e:
            raise CliError(f"--publish-rm: {e}") from None
    ports = [p for p in spec.endpoint.ports if (p.target_port, p.protocol) not in gone_ports
             and (p.published_port, p.protocol) not in gone_ports]
    for group in adds("publish"):
        ports.extend(group)
    del spec.endpoint.ports[:]
    spec.endpoint.ports.extend(ports)
    # networks: removal by name or id (the spec holds ids)
    gone_nets = set(rms("network"))
    if gone_nets and resolve_network is not None:
        gone_nets |= {resolve_network(n) for n in gone_nets}
    nets = [n for n in t.networks if n.target not in gone_nets]
    nets += [_network_attachment(x) for x in adds("network")]
    del t.networks[:]
    t.networks.extend(nets)
    # secrets / configs: removal by name
    for kind, field in (("secret", cs.secrets), ("config", cs.configs)):
        gone = set(rms(kind))
        kept_refs = [r for r in field if getattr(r, f"{kind}_name") not in gone and getattr(r, f"{kind}_id") not in gone]
        del field[:]
        field.extend(kept_refs + adds(kind))
    # mounts: removal by target
    gone_m = set(rms("mount"))
    mounts = [m for m in cs.mounts if m.target not in gone_m] + adds("mount")
    del cs.mounts[:]
    cs.mounts.extend(mounts)
    ulimits = {u.name: u for u in cs.ulimits if u.name not in set(rms("ulimit"))}
    for u in adds("ulimit"):
        ulimits[u.name] = u
    del cs.ulimits[:]
    cs.ulimits.extend(ulimits.values())


def _network_id(c: Client, ref: str) -> str:
    try:
        return _get(c, "network", ref).id
    except CliError:
        return ref


def _resolve_networks(c: Client, spec: specs_pb2.ServiceSpec) -> None:
    """Network names to ids, as docker's CLI does (the server accepts both and checks them)."""
    for att in spec.task.networks:
        try:
            att.target = _get(c, "network", att.target).id
        except CliError:
            pass  # the server says what is wrong with it


# ---- services: commands --------------------------------------------------------------------------
def service_create(c: Client, args: argparse.Namespace) -> None:
    if args.image and args.image_flag and args.image != args.image_flag:
        raise CliError(f"two images given ({args.image_flag} and {args.image}): give the image once")
    image = args.image or args.image_flag
    if not image:
        raise CliError("no image given: use swarmctl service create [FLAGS] IMAGE [COMMAND [ARG...]] or --image")
    spec = specs_pb2.ServiceSpec()
    spec.annotations.name = args.name or ""
    if args.mode == "global":
        if args.replicas is not None:
            raise CliError("--replicas can only be used with replicated mode")
        getattr(spec, "global").SetInParent()
    else:
        spec.replicated.replicas = 1
    args.image = image
    _apply_common(spec, args)
    if args.cmd:
        spec.task.container.args.extend(args.cmd)
    _apply_lists(spec, args, update=False)
    _resolve_networks(c, spec)
    svc = c.call("CreateService", control_pb2.CreateServiceRequest(spec=spec)).service
    print(svc.id)
    w = _waiter(args, c)
    if w is not None:
        w.converge(svc.id, svc.spec.annotations.name)


def _service_update_request(c: Client, ref: str, change: Callable[[specs_pb2.ServiceSpec], None],
                            rollback: bool = False) -> objects_pb2.Service:
    def once() -> objects_pb2.Service:
        svc = _get(c, "service", ref)
        spec = specs_pb2.ServiceSpec()
        spec.CopyFrom(svc.spec)
        change(spec)
        req = control_pb2.UpdateServiceRequest(service_id=svc.id, service_version=svc.meta.version, spec=spec)
        if rollback:
            req.rollback = control_pb2.UpdateServiceRequest.PREVIOUS
        return c.call("UpdateService", req).service

    return _retrying(once)


def service_update(c: Client, args: argparse.Namespace) -> None:
    def change(spec: specs_pb2.ServiceSpec) -> None:
        _apply_common(spec, args)
        _apply_lists(spec, args, update=True, resolve_network=lambda ref: _network_id(c, ref))
        _resolve_networks(c, spec)
        if args.force:
            spec.task.force_update += 1

    svc = _service_update_request(c, args.service, change, rollback=args.rollback)
    print(args.service)
    w = _waiter(args, c)
    if w is not None:
        w.converge(svc.id, svc.spec.annotations.name)


def service_rollback(c: Client, args: argparse.Namespace) -> None:
    svc = _service_update_request(c, args.service, lambda spec: None, rollback=True)
    print(args.service)
    w = _waiter(args, c)
    if w is not None:
        w.converge(svc.id, svc.spec.annotations.name)


def service_scale(c: Client, args: argparse.Namespace) -> None:
    targets = []
    for item in args.scales:
        name, eq, n = item.rpartition("=")
        if not eq or not name:
            raise CliError(f"invalid scale specifier {item!r}: use SERVICE=REPLICAS")
        try:
            targets.append((name, units.parse_uint(n, "replicas")))
        except ValueError as e:
            raise CliError(str(e)) from None
    done = []
    for name, n in targets:
        def change(spec: specs_pb2.ServiceSpec, n: int = n, name: str = name) -> None:
            if spec.WhichOneof("mode") != "replicated":
                raise CliError(f"service {name} is not in replicated mode: only replicated services can be scaled")
            spec.replicated.replicas = n

        svc = _service_update_request(c, name, change)
        print(f"{name} scaled to {n}")
        done.append(svc)
    w = _waiter(args, c)
    if w is not None:
        for svc in done:
            w.converge(svc.id, svc.spec.annotations.name)


def service_rm(c: Client, args: argparse.Namespace) -> None:
    removed = []
    errors = []
    for ref in args.services:
        try:
            svc = _get(c, "service", ref)
            c.call("RemoveService", control_pb2.RemoveServiceRequest(service_id=svc.id))
        except CliError as e:
            errors.append(str(e))
            continue
        print(ref)
        removed.append(svc)
    w = _waiter(args, c)
    if w is not None:
        for svc in removed:
            w.removed(svc.id, svc.spec.annotations.name)
    if errors:
        raise CliError("; ".join(errors))


def _mode(svc: objects_pb2.Service) -> str:
    return "global" if svc.spec.WhichOneof("mode") == "global" else "replicated"


def service_ls(c: Client, args: argparse.Namespace) -> None:
    services = _list(c, "service", _filters(args.filter, "service"))
    if args.format == "json" or args.quiet:
        _print_list(args, services, [], lambda s: [])
        return
    tasks = _list(c, "task") if services else []
    nodes = _list(c, "node") if services else []
    by_service: dict[str, list[objects_pb2.Task]] = {}
    for t in tasks:
        by_service.setdefault(t.service_id, []).append(t)

    def row(s: objects_pb2.Service) -> list[str]:
        prog = measure(s, Snapshot(s, by_service.get(s.id, []), nodes))
        desired = prog.desired if _mode(s) == "global" else s.spec.replicated.replicas
        replicas = f"{prog.running}/{desired}"
        if s.spec.task.placement.max_replicas:
            replicas += f" (max {s.spec.task.placement.max_replicas} per node)"
        ports = s.endpoint.ports or s.spec.endpoint.ports
        image = s.spec.task.container.image.split("@")[0]
        return [s.id[:12], s.spec.annotations.name, _mode(s), replicas, image,
                ", ".join(units.format_port(p) for p in ports if p.publish_mode == types_pb2.PortConfig.INGRESS)]

    out.print_table(["ID", "NAME", "MODE", "REPLICAS", "IMAGE", "PORTS"], [row(s) for s in services])


def _service_pretty(s: objects_pb2.Service) -> None:
    spec = s.spec
    cs = spec.task.container
    print(f"ID:\t\t{s.id}\nName:\t\t{spec.annotations.name}")
    if spec.annotations.labels:
        print("Labels:")
        for k, v in sorted(spec.annotations.labels.items()):
            print(f" {k}={v}")
    print("Service Mode:\t" + ("Global" if _mode(s) == "global" else f"Replicated\n Replicas:\t{spec.replicated.replicas}"))
    if s.update_status.state:
        print(f"UpdateStatus:\n State:\t\t{types_pb2.UpdateStatus.State.Name(s.update_status.state).lower()}")
        print(f" Message:\t{s.update_status.message}")
    if spec.task.placement.constraints:
        print(f"Placement:\n Constraints:\t{list(spec.task.placement.constraints)}")
    print(f"ContainerSpec:\n Image:\t\t{cs.image}")
    if cs.command:
        print(f" Command:\t{shlex.join(cs.command)}")
    if cs.args:
        print(f" Args:\t\t{shlex.join(cs.args)}")
    if cs.env:
        print(" Env:\t\t" + " ".join(cs.env))
    r = spec.task.resources
    if r.limits.nano_cpus or r.limits.memory_bytes:
        print("Resources:\n Limits:")
        if r.limits.nano_cpus:
            print(f"  CPU:\t\t{r.limits.nano_cpus / 1e9:g}")
        if r.limits.memory_bytes:
            print(f"  Memory:\t{units.format_bytes(r.limits.memory_bytes)}")
    if spec.task.networks:
        print("Networks:\t" + " ".join(n.target for n in spec.task.networks))
    print(f"Endpoint Mode:\t{types_pb2.EndpointSpec.ResolutionMode.Name(spec.endpoint.mode).lower()}")
    ports = s.endpoint.ports or spec.endpoint.ports
    if ports:
        print("Ports:")
        for p in ports:
            print(f" PublishedPort = {p.published_port}\n  Protocol = "
                  f"{types_pb2.PortConfig.Protocol.Name(p.protocol).lower()}\n  TargetPort = {p.target_port}\n"
                  f"  PublishMode = {types_pb2.PortConfig.PublishMode.Name(p.publish_mode).lower()}")


def service_inspect(c: Client, args: argparse.Namespace) -> None:
    _inspect(args, c, "service", args.services, _service_pretty)


def _task_rows(c: Client, tasks: list[objects_pb2.Task], no_trunc: bool) -> list[list[str]]:
    nodes = {n.id: n for n in _list(c, "node")} if tasks else {}
    services: dict[str, str] = {}
    for t in tasks:
        if t.service_id not in services:
            services[t.service_id] = t.service_annotations.name or t.service_id[:12]

    def group(t: objects_pb2.Task) -> tuple[str, Any]:
        return (t.service_id, t.slot if t.slot else t.node_id)

    tasks = sorted(tasks, key=lambda t: (services[t.service_id], group(t)[1],
                                         -t.meta.created_at.ToNanoseconds()))
    rows = []
    prev = None
    for t in tasks:
        base = f"{services[t.service_id]}.{t.slot if t.slot else t.node_id}"
        name = base if group(t) != prev else f" \\_ {base}"
        prev = group(t)
        node = nodes.get(t.node_id)
        state = out.state_name(t.status.state)
        when = out.ago(t.status.timestamp) or out.ago(t.meta.updated_at)
        ports = ", ".join(units.format_port(p) for p in t.status.port_status.ports)
        # Like docker: the error, or why a task waits (e.g. "no suitable node (...)") while it is pending.
        why = t.status.err or (t.status.message if t.status.state == types_pb2.PENDING
                               and t.status.message.startswith("no suitable node") else "")
        err = f'"{out.truncate(why, 30, no_trunc)}"' if why else ""
        rows.append([out.short_id(t.id, no_trunc), name, t.spec.container.image.split("@")[0],
                     node.description.hostname if node else "", out.state_name(t.desired_state),
                     f"{state} {when}".strip(), err, ports])
    return rows


TASK_HEADERS = ["ID", "NAME", "IMAGE", "NODE", "DESIRED STATE", "CURRENT STATE", "ERROR", "PORTS"]


def _print_tasks(c: Client, args: argparse.Namespace, tasks: list[objects_pb2.Task]) -> None:
    if args.format == "json" or args.quiet:
        _print_list(args, tasks, [], lambda t: [])
    else:
        out.print_table(TASK_HEADERS, _task_rows(c, tasks, args.no_trunc))


def service_ps(c: Client, args: argparse.Namespace) -> None:
    tasks: list[objects_pb2.Task] = []
    for ref in args.services:
        svc = _get(c, "service", ref)
        f = _filters(args.filter, "task")
        f.service_ids.append(svc.id)
        tasks += _list(c, "task", f)
    _print_tasks(c, args, tasks)


def node_ps(c: Client, args: argparse.Namespace) -> None:
    tasks: list[objects_pb2.Task] = []
    for ref in args.nodes or ["self"]:
        node = _get(c, "node", _node_ref(c, ref))
        f = _filters(args.filter, "task")
        f.node_ids.append(node.id)
        tasks += _list(c, "task", f)
    _print_tasks(c, args, tasks)


def task_ls(c: Client, args: argparse.Namespace) -> None:
    _print_tasks(c, args, _list(c, "task", _filters(args.filter, "task")))


def task_inspect(c: Client, args: argparse.Namespace) -> None:
    _inspect(args, c, "task", args.tasks)


# ---- networks, secrets, configs ------------------------------------------------------------------
def network_create(c: Client, args: argparse.Namespace) -> None:
    spec = specs_pb2.NetworkSpec(annotations=types_pb2.Annotations(name=args.name, labels=_labels(args.label)),
                                 internal=args.internal, attachable=args.attachable, ingress=args.ingress)
    spec.driver_config.name = args.driver
    spec.driver_config.options.update(_labels(args.opt, "driver option"))
    if args.subnet or args.gateway or args.ip_range:
        spec.ipam.configs.add(subnet=args.subnet or "", gateway=args.gateway or "", range=args.ip_range or "")
    net = c.call("CreateNetwork", control_pb2.CreateNetworkRequest(spec=spec)).network
    print(net.id)


def _network_pretty(n: objects_pb2.Network) -> None:
    s = n.spec
    cfg = n.ipam.configs[0] if n.ipam.configs else None
    print(f"ID:\t\t{n.id}\nName:\t\t{s.annotations.name}\nDriver:\t\t{s.driver_config.name or 'overlay'}")
    print(f"Scope:\t\tswarm\nVXLAN ID:\t{n.driver_state.vni}")
    print(f"Subnet:\t\t{cfg.subnet if cfg else ''}\nGateway:\t{cfg.gateway if cfg else ''}")
    for label, flag in (("Attachable", s.attachable), ("Internal", s.internal), ("Ingress", s.ingress)):
        print(f"{label}:\t{'true' if flag else 'false'}")
    if "encrypted" in s.driver_config.options:
        when = (f"keys rotated {out.ago(n.keys_rotated_at).lower()} ({n.keys_rotated_at.ToJsonString()})"
                if n.HasField("keys_rotated_at") else "keys not made yet")
        print(f"Encrypted:\ttrue (IPsec ESP between nodes; {when})")
    else:
        print("Encrypted:\tfalse")
    if s.driver_config.options:
        print("Options:")
        for k, v in sorted(s.driver_config.options.items()):
            print(f" - {k}={v}" if v else f" - {k}")
    if s.annotations.labels:
        print("Labels:")
        for k, v in sorted(s.annotations.labels.items()):
            print(f" - {k}={v}")


def network_inspect(c: Client, args: argparse.Namespace) -> None:
    nets = [_get(c, "network", r) for r in args.refs]
    for n in nets:
        n.ClearField("encryption_keys")  # the manager never sends them; never print them either
    if args.pretty:
        for i, n in enumerate(nets):
            if i:
                print()
            _network_pretty(n)
    else:
        out.print_json(nets)


def network_ls(c: Client, args: argparse.Namespace) -> None:
    nets = _list(c, "network", _filters(args.filter, "network"))

    def row(n: objects_pb2.Network) -> list[str]:
        subnet = n.ipam.configs[0].subnet if n.ipam.configs else ""
        return [n.id[:12], n.spec.annotations.name, n.spec.driver_config.name or "overlay", "swarm", subnet]

    _print_list(args, nets, ["NETWORK ID", "NAME", "DRIVER", "SCOPE", "SUBNET"], row)


def _simple_rm(kind: str) -> Callable[[Client, argparse.Namespace], None]:
    def cmd(c: Client, args: argparse.Namespace) -> None:
        title = kind.capitalize()
        errors = []
        for ref in args.refs:
            try:
                c.call(f"Remove{title}", getattr(control_pb2, f"Remove{title}Request")(**{f"{kind}_id": ref}))
                print(ref)
            except CliError as e:
                errors.append(str(e))
        if errors:
            raise CliError("; ".join(errors))

    return cmd


def _simple_inspect(kind: str) -> Callable[[Client, argparse.Namespace], None]:
    def cmd(c: Client, args: argparse.Namespace) -> None:
        _inspect(args, c, kind, args.refs)

    return cmd


def _file_create(kind: str) -> Callable[[Client, argparse.Namespace], None]:
    def cmd(c: Client, args: argparse.Namespace) -> None:
        if args.file and args.file_flag:
            raise CliError(f"{kind} data given twice (argument and --file): give it once")
        data = _read_data(args.file or args.file_flag, kind)
        cls = specs_pb2.SecretSpec if kind == "secret" else specs_pb2.ConfigSpec
        spec = cls(annotations=types_pb2.Annotations(name=args.name, labels=_labels(args.label)), data=data)
        title = kind.capitalize()
        obj = getattr(c.call(f"Create{title}", getattr(control_pb2, f"Create{title}Request")(spec=spec)), kind)
        print(obj.id)

    return cmd


def _file_ls(kind: str) -> Callable[[Client, argparse.Namespace], None]:
    def cmd(c: Client, args: argparse.Namespace) -> None:
        objs = _list(c, kind, _filters(args.filter, kind))

        def row(o: Any) -> list[str]:
            return [o.id[:12] if not args.no_trunc else o.id, o.spec.annotations.name,
                    out.ago(o.meta.created_at), out.ago(o.meta.updated_at)]

        _print_list(args, objs, ["ID", "NAME", "CREATED", "UPDATED"], row)

    return cmd


# ---- the parser ----------------------------------------------------------------------------------
def build_parser() -> Parser:
    # Command modules that build on this one (stack uses its waiters and tables): imported here.
    from shoal.cli import events, labcmd, logs, stack

    root = Parser(prog="swarmctl", parents=[CONN], description="Control a Shoal swarm.")
    cmds = root.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)

    def group(name: str, help_text: str) -> Any:
        p = cmds.add_parser(name, help=help_text, parents=[CONN])
        p.set_defaults(func=None, parser=p)
        return p.add_subparsers(dest="sub", metavar="SUBCOMMAND", parser_class=Parser)

    def leaf(sub: Any, name: str, func: Callable[[Client, argparse.Namespace], None], help_text: str,
             aliases: Sequence[str] = ()) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text, parents=[CONN], aliases=list(aliases))
        p.set_defaults(func=func)
        return p

    # cluster
    sub = group("cluster", "inspect and update the cluster")
    p = leaf(sub, "inspect", cluster_inspect, "show the cluster object")
    p.add_argument("--pretty", action="store_true", help="human-readable output")
    _fmt(p)
    p = leaf(sub, "update", cluster_update, "change cluster settings")
    p.add_argument("--task-history-limit", type=uint("task history limit"), help="tasks kept per slot")
    p.add_argument("--heartbeat-period", "--dispatcher-heartbeat", dest="heartbeat_period", type=DURATION,
                   help="agents' heartbeat period")
    p.add_argument("--cert-expiry", type=DURATION, help="node certificate validity")
    p.add_argument("--network-key-rotation", type=DURATION, metavar="DURATION",
                   help="how often the IPsec keys of encrypted networks are replaced (default 12h, at least 1s)")
    p.add_argument("--default-addr-pool", action="append", help="address pool for networks (CIDR)")
    p.add_argument("--subnet-size", type=uint("subnet size"), help="prefix length of network subnets")
    p.add_argument("--label-add", action="append", help="add a cluster label KEY=VALUE")
    p.add_argument("--label-rm", action="append", help="remove a cluster label")
    p.add_argument("--rotate-worker-token", action="store_true", help="rotate the worker join token")
    p.add_argument("--rotate-manager-token", action="store_true", help="rotate the manager join token")
    p.add_argument("--autolock", type=BOOL, nargs="?", const=True, default=None, metavar="true|false",
                   help="lock restarted managers until `swarmctl cluster unlock` gives them the unlock key")
    p = leaf(sub, "unlock", cluster_unlock, "unlock a locked manager (reads the unlock key from stdin or a prompt)")
    p = leaf(sub, "unlock-key", cluster_unlock_key, "show (or rotate) the managers' unlock key")
    p.add_argument("-q", "--quiet", action="store_true", help="only show the key")
    p.add_argument("--rotate", action="store_true", help="replace the unlock key with a new one")

    p = leaf(sub, "backup", cluster_backup, "write a backup of the whole cluster state (for swarmd --restore)")
    p.add_argument("file", metavar="FILE", help="the backup file to write (mode 0600)")
    p.add_argument("--force", action="store_true", help="replace FILE if it exists")

    # swarm
    sub = group("swarm", "swarm-wide commands")
    p = leaf(sub, "join-token", swarm_join_token, "show (or rotate) a join token")
    p.add_argument("role", choices=("worker", "manager"))
    p.add_argument("--rotate", action="store_true", help="replace the token with a new one")
    p.add_argument("-q", "--quiet", action="store_true", help="only show the token")

    p = cmds.add_parser("info", help="show the swarm as this manager sees it", parents=[CONN])
    p.set_defaults(func=info_cmd)
    _fmt(p)

    # nodes
    sub = group("node", "manage nodes")
    p = leaf(sub, "ls", node_ls, "list nodes", aliases=["list"])
    p.add_argument("-f", "--filter", action="append", help="name=, id=, label=, role=manager|worker")
    _quiet(p)
    _fmt(p)
    p = leaf(sub, "inspect", node_inspect, "show nodes in detail")
    p.add_argument("nodes", nargs="+", metavar="NODE", help="id, id prefix, hostname or self")
    p.add_argument("--pretty", action="store_true", help="human-readable output")
    p.add_argument("--format", choices=("json",), default="json")
    p = leaf(sub, "update", node_update, "update a node")
    p.add_argument("node", metavar="NODE")
    p.add_argument("--availability", choices=("active", "pause", "drain"))
    p.add_argument("--role", choices=("worker", "manager"))
    p.add_argument("--label-add", action="append", help="add a node label KEY=VALUE")
    p.add_argument("--label-rm", action="append", help="remove a node label")
    for name, attr, value, msg in (
        ("promote", "desired_role", types_pb2.MANAGER, "Node {} promoted to a manager in the swarm."),
        ("demote", "desired_role", types_pb2.WORKER, "Manager {} demoted in the swarm."),
        ("drain", "availability", types_pb2.DRAIN, "{}"),
        ("activate", "availability", types_pb2.ACTIVE, "{}"),
        ("pause", "availability", types_pb2.PAUSE, "{}"),
    ):
        p = leaf(sub, name, _node_set(attr, value, msg), f"{name} nodes")
        p.add_argument("nodes", nargs="+", metavar="NODE")
    p = leaf(sub, "ps", node_ps, "list the tasks on nodes (default: this node)")
    p.add_argument("nodes", nargs="*", metavar="NODE")
    p.add_argument("-f", "--filter", action="append", help="desired-state=, service=, id=, name=")
    p.add_argument("--no-trunc", action="store_true")
    _quiet(p)
    _fmt(p)
    p = leaf(sub, "rm", node_rm, "remove nodes from the swarm", aliases=["remove"])
    p.add_argument("nodes", nargs="+", metavar="NODE")
    p.add_argument("-f", "--force", action="store_true", help="remove a node that is not down")

    # services
    sub = group("service", "manage services")
    p = leaf(sub, "create", service_create, "create a service")
    p.add_argument("--name", help="service name (default: a random one)")
    p.add_argument("--mode", choices=("replicated", "global"), default="replicated")
    _service_flags(p, update=False)
    _list_flags(p, update=False)
    # --image is also defined by the shared flags; the positional one wins when both agree.
    p.set_defaults(image_flag=None)
    for action in p._actions:
        if action.dest == "image":
            action.dest = "image_flag"
    p.add_argument("image", nargs="?", metavar="IMAGE")
    p.add_argument("cmd", nargs=argparse.REMAINDER, metavar="COMMAND [ARG...]")
    p = leaf(sub, "update", service_update, "update a service")
    _service_flags(p, update=True)
    _list_flags(p, update=True)
    p.add_argument("--force", action="store_true", help="restart the tasks even without a change")
    p.add_argument("--rollback", action="store_true", help="roll back to the previous spec")
    p.add_argument("service", metavar="SERVICE")
    p = leaf(sub, "ls", service_ls, "list services", aliases=["list"])
    p.add_argument("-f", "--filter", action="append", help="name=, name-prefix=, id=, label=")
    _quiet(p)
    _fmt(p)
    p = leaf(sub, "inspect", service_inspect, "show services in detail")
    p.add_argument("services", nargs="+", metavar="SERVICE")
    p.add_argument("--pretty", action="store_true", help="human-readable output")
    p.add_argument("--format", choices=("json",), default="json")
    for name, func, help_text in (("rm", service_rm, "remove services"),
                                  ("rollback", service_rollback, "roll a service back to its previous spec"),
                                  ("scale", service_scale, "scale replicated services")):
        p = leaf(sub, name, func, help_text, aliases=["remove"] if name == "rm" else [])
        if name == "rm":
            p.add_argument("services", nargs="+", metavar="SERVICE")
        elif name == "scale":
            p.add_argument("scales", nargs="+", metavar="SERVICE=REPLICAS")
        else:
            p.add_argument("service", metavar="SERVICE")
        p.add_argument("-d", "--detach", action="store_true", help="do not wait")
        p.add_argument("-q", "--quiet", action="store_true", help="suppress progress output")
        p.add_argument("--timeout", type=typed(lambda t: sizes.parse_duration(t) / 1e9, "duration"),
                       default=DEFAULT_WAIT_TIMEOUT, help="give up waiting after this long (default 5m)")
    logs.register(sub, "service", parents=[CONN])
    p = leaf(sub, "ps", service_ps, "list the tasks of services")
    p.add_argument("services", nargs="+", metavar="SERVICE")
    p.add_argument("-f", "--filter", action="append", help="desired-state=, node=, id=, name=")
    p.add_argument("--no-trunc", action="store_true")
    _quiet(p)
    _fmt(p)

    # tasks
    sub = group("task", "list and inspect tasks")
    p = leaf(sub, "ls", task_ls, "list tasks", aliases=["list"])
    p.add_argument("-f", "--filter", action="append", help="service=, node=, desired-state=, label=, id=")
    p.add_argument("--no-trunc", action="store_true")
    _quiet(p)
    _fmt(p)
    p = leaf(sub, "inspect", task_inspect, "show tasks in detail")
    p.add_argument("tasks", nargs="+", metavar="TASK")
    p.add_argument("--format", choices=("json",), default="json")
    logs.register(sub, "task", parents=[CONN])

    # networks
    sub = group("network", "manage networks")
    p = leaf(sub, "create", network_create, "create an overlay network")
    p.add_argument("name", metavar="NAME")
    p.add_argument("-d", "--driver", default="overlay")
    p.add_argument("--subnet")
    p.add_argument("--gateway")
    p.add_argument("--ip-range")
    p.add_argument("--attachable", action="store_true")
    p.add_argument("--internal", action="store_true")
    p.add_argument("--ingress", action="store_true")
    p.add_argument("--label", action="append")
    p.add_argument("-o", "--opt", action="append", help="driver option KEY=VALUE (e.g. encrypted)")
    for kind, create, ls in (("network", None, network_ls), ("secret", _file_create("secret"), _file_ls("secret")),
                             ("config", _file_create("config"), _file_ls("config"))):
        if kind != "network":
            sub = group(kind, f"manage {kind}s")
            assert create is not None
            p = leaf(sub, "create", create, f"create a {kind} from a file or standard input")
            p.add_argument("name", metavar="NAME")
            p.add_argument("file", nargs="?", metavar="FILE|-")
            p.add_argument("--file", dest="file_flag", help="read the data from this file (- for stdin)")
            p.add_argument("-l", "--label", action="append")
        p = leaf(sub, "ls", ls, f"list {kind}s", aliases=["list"])
        p.add_argument("-f", "--filter", action="append", help="name=, name-prefix=, id=, label=")
        p.add_argument("--no-trunc", action="store_true")
        _quiet(p)
        _fmt(p)
        p = leaf(sub, "inspect", network_inspect if kind == "network" else _simple_inspect(kind),
                 f"show {kind}s in detail")
        p.add_argument("refs", nargs="+", metavar=kind.upper())
        p.add_argument("--format", choices=("json",), default="json")
        if kind == "network":
            p.add_argument("--pretty", action="store_true", help="human-readable output")
        p = leaf(sub, "rm", _simple_rm(kind), f"remove {kind}s", aliases=["remove"])
        p.add_argument("refs", nargs="+", metavar=kind.upper())

    # Command groups other modules provide: stacks (compose files) and the one-machine lab.
    stack.register(cmds, parents=[CONN])
    events.register(cmds, parents=[CONN])

    labcmd.register(cmds)
    cmds.choices["lab"].set_defaults(no_client=True)
    return root


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    func = getattr(args, "func", None)
    if func is None:
        (getattr(args, "parser", None) or parser).print_help(sys.stderr)
        return 2
    if getattr(args, "no_client", False):  # local commands (the lab) talk to no manager
        try:
            return int(func(args) or 0)
        except KeyboardInterrupt:
            return 130
    client = None
    try:
        client = Client(socket=getattr(args, "socket", None),
                        host=getattr(args, "host", None) or os.environ.get("SWARM_HOST"),
                        tls_dir=getattr(args, "tls_dir", None) or os.environ.get("SWARM_TLS_DIR"))
        func(client, args)
        return 0
    except CliError as e:
        sys.stdout.flush()
        sys.stderr.write(f"Error: {e}\n")
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return 0
    finally:
        if client is not None:
            client.close()


if __name__ == "__main__":
    sys.exit(main())
