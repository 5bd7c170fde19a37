"""Where a `service create` / `service update` flag becomes a `ServiceSpec`: the flags and the spec, in one place.

    add_create_flags(parser)            # the flags of `service create` (and its IMAGE [COMMAND [ARG...]])
    spec = create_spec(args)            # parsed flags -> a new ServiceSpec (no cluster needed)
    add_update_flags(parser)            # the flags of `service update` (lists as NAME-add / NAME-rm)
    update_spec(spec, args, network_id) # parsed flags applied to the service's current spec, in place

Single-valued flags are applied by `_apply_single`, list flags by `_apply_lists` (on update, removals
first, then additions, as docker does). Flag values are parsed by `shoal.cli.flagtypes` converters,
so a bad value is a usage error before anything is built. Network names are left as the user gave
them: the control API resolves them to ids and names an unknown network in its error; only a
removal (`--network-rm NAME`) needs the id, from `network_id`. A spec error a user can cause is a
CliError sentence.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import shlex
from collections.abc import Callable
from pathlib import Path
from typing import Any

from shoal.cli import units
from shoal.cli.errors import CliError
from shoal.cli.flagtypes import (
    ADD_HOST,
    BYTES,
    CONFIG,
    CPUS,
    DURATION,
    MOUNT,
    PORT,
    PREF,
    RATIO,
    SECRET,
    ULIMIT,
    parse_labels,
    uint,
)
from shoal.proto import specs_pb2, types_pb2

_RESTART = {"none": types_pb2.RestartPolicy.NONE, "on-failure": types_pb2.RestartPolicy.ON_FAILURE,
             "any": types_pb2.RestartPolicy.ANY}
_FAILURE_ACTION = {"pause": types_pb2.UpdateConfig.PAUSE, "continue": types_pb2.UpdateConfig.CONTINUE,
                    "rollback": types_pb2.UpdateConfig.ROLLBACK}
_ORDER = {"stop-first": types_pb2.UpdateConfig.STOP_FIRST, "start-first": types_pb2.UpdateConfig.START_FIRST}


def _add_single_flags(p: argparse.ArgumentParser, update: bool) -> None:
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


def registry_auth(image: str) -> str:
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


def _apply_single(spec: specs_pb2.ServiceSpec, args: argparse.Namespace) -> None:
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
        cs.pull_options.registry_auth = registry_auth(cs.image)


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


def _add_list_flags(p: argparse.ArgumentParser, update: bool) -> None:
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
                 network_id: Callable[[str], str] | None = None) -> None:
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
        target.update(parse_labels(adds(name), name.replace("_", " ")))
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
    if gone_nets and network_id is not None:
        gone_nets |= {network_id(n) for n in gone_nets}
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



# ---- the two commands' flags and specs -----------------------------------------------------------
def add_create_flags(p: argparse.ArgumentParser) -> None:
    """The flags of `service create`: --name, --mode, the single and list flags, IMAGE [COMMAND [ARG...]]."""
    p.add_argument("--name", help="service name (default: a random one)")
    p.add_argument("--mode", choices=("replicated", "global"), default="replicated")
    _add_single_flags(p, update=False)
    _add_list_flags(p, update=False)
    # --image is also defined by the shared flags; the positional one wins when both agree.
    p.set_defaults(image_flag=None)
    for action in p._actions:
        if action.dest == "image":
            action.dest = "image_flag"
    p.add_argument("image", nargs="?", metavar="IMAGE")
    p.add_argument("cmd", nargs=argparse.REMAINDER, metavar="COMMAND [ARG...]")


def create_spec(args: argparse.Namespace) -> specs_pb2.ServiceSpec:
    """The ServiceSpec of `service create` from its parsed flags (see add_create_flags). Raises CliError
    on a spec the flags cannot make (no image, two images, --replicas with global mode, a bad list item)."""
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
    _apply_single(spec, args)
    if args.cmd:
        spec.task.container.args.extend(args.cmd)
    _apply_lists(spec, args, update=False)
    return spec


def add_update_flags(p: argparse.ArgumentParser) -> None:
    """The flags of `service update` that change the spec: single flags, lists as NAME-add / NAME-rm, --force."""
    _add_single_flags(p, update=True)
    _add_list_flags(p, update=True)
    p.add_argument("--force", action="store_true", help="restart the tasks even without a change")


def update_spec(spec: specs_pb2.ServiceSpec, args: argparse.Namespace,
                network_id: Callable[[str], str] | None = None) -> None:
    """Apply `service update`'s parsed flags to `spec` (the service's current spec), in place.
    `network_id(ref)` gives a network's id for `--network-rm NAME` (the spec holds ids)."""
    _apply_single(spec, args)
    _apply_lists(spec, args, update=True, network_id=network_id)
    if args.force:
        spec.task.force_update += 1
