"""The plan of a ``stack deploy``: what to create, update, leave alone and (with prune) remove.

A redeploy of an unchanged file plans no change at all. Specs are compared after undoing what the
deploying client or the cluster fill in themselves: network and secret/config ids (attachments are
compared by network name), the image digest pinned at the last deploy (when the file's image is the
one recorded in ``com.docker.stack.image``), registry auth and ``force_update``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

from shoal.compose.convert import LABEL_IMAGE, LABEL_NAMESPACE, StackSpec
from shoal.compose.errors import ComposeError
from shoal.proto import objects_pb2, specs_pb2

log = logging.getLogger(__name__)


@dataclass
class ServiceUpdate:
    """An existing service whose spec must change. ``spec`` is what to send (names, not ids)."""

    name: str
    service_id: str
    version: int                 # existing.meta.version, for optimistic concurrency
    spec: specs_pb2.ServiceSpec
    changed: list[str]           # top-level paths that differ, e.g. ["task.container.image", "replicated"]


@dataclass
class ObjectUpdate:
    """An existing secret or config of the stack whose data or labels differ from the file."""

    name: str
    object_id: str
    version: int
    spec: specs_pb2.SecretSpec | specs_pb2.ConfigSpec
    data_changed: bool           # a swarm cannot change the data of a secret/config in place


@dataclass
class Plan:
    stack: str
    create_networks: list[specs_pb2.NetworkSpec] = field(default_factory=list)
    create_secrets: list[specs_pb2.SecretSpec] = field(default_factory=list)
    update_secrets: list[ObjectUpdate] = field(default_factory=list)
    create_configs: list[specs_pb2.ConfigSpec] = field(default_factory=list)
    update_configs: list[ObjectUpdate] = field(default_factory=list)
    create_services: list[specs_pb2.ServiceSpec] = field(default_factory=list)
    update_services: list[ServiceUpdate] = field(default_factory=list)
    unchanged_services: list[str] = field(default_factory=list)
    remove_services: list[objects_pb2.Service] = field(default_factory=list)

    def check_immutable(self) -> None:
        """Raise ComposeError if the file changes the data of an existing secret or config (a swarm
        cannot; the user has to give the new version a new name)."""
        for kind, ups in (("secret", self.update_secrets), ("config", self.update_configs)):
            for u in ups:
                if u.data_changed:
                    raise ComposeError(
                        f'{kind} "{u.name}" already exists with other data, and a swarm {kind} cannot change its '
                        f"data; give the new version a new name (name: under the {kind}) and deploy again")

    @property
    def is_noop(self) -> bool:
        return not (self.create_networks or self.create_secrets or self.update_secrets or self.create_configs
                    or self.update_configs or self.create_services or self.update_services
                    or self.remove_services)


def _normalised(spec: specs_pb2.ServiceSpec, net_names: dict[str, str]) -> specs_pb2.ServiceSpec:
    s = specs_pb2.ServiceSpec()
    s.CopyFrom(spec)
    t = s.task
    t.force_update = 0
    t.container.ClearField("pull_options")
    for n in t.networks:
        n.target = net_names.get(n.target, n.target)
    nets = sorted(t.networks, key=lambda n: n.target)
    copies = [type(n)() for n in nets]
    for c, n in zip(copies, nets, strict=True):
        c.CopyFrom(n)
    del t.networks[:]
    t.networks.extend(copies)
    for ref in t.container.secrets:
        ref.secret_id = ""
    for ref in t.container.configs:
        ref.config_id = ""
    return s


def _diff_paths(a: object, b: object, prefix: str = "") -> list[str]:
    """Top-level-ish field paths where two messages differ (for progress output)."""
    out = []
    for fd in a.DESCRIPTOR.fields:  # type: ignore[attr-defined]
        va, vb = getattr(a, fd.name), getattr(b, fd.name)
        if va == vb:
            continue
        path = f"{prefix}{fd.name}"
        if fd.message_type is not None and not fd.is_repeated and prefix.count(".") < 2:
            sub = _diff_paths(va, vb, path + ".")
            out.extend(sub or [path])
        else:
            out.append(path)
    return out


def plan(
    stack: StackSpec,
    existing_services: Sequence[objects_pb2.Service],
    existing_networks: Sequence[objects_pb2.Network] | None = None,
    existing_secrets: Sequence[objects_pb2.Secret] | None = None,
    existing_configs: Sequence[objects_pb2.Config] | None = None,
    *,
    prune: bool = False,
) -> Plan:
    """Compare a converted stack with what the cluster holds.

    ``existing_services`` may be all services or only the stack's (matched by name; with ``prune``,
    services labelled ``com.docker.stack.namespace=<stack>`` that the file no longer has are removed).
    When ``existing_networks``/``_secrets``/``_configs`` are given, networks, secrets and configs the
    stack needs are created when missing, and external ones that do not exist raise ComposeError;
    when None, they are not checked (and nothing of that kind is planned for creation).
    """
    p = Plan(stack=stack.name)
    nets = list(existing_networks or [])
    net_by_name = {n.spec.annotations.name: n for n in nets}
    net_names = {n.id: n.spec.annotations.name for n in nets}
    if existing_networks is not None:
        for name in stack.external_networks:
            if name not in net_by_name:
                raise ComposeError(f'network "{name}" is declared as external, but could not be found; create it '
                                   "(swarmctl network create --driver overlay) before deploying the stack")
        p.create_networks = [spec for name, spec in stack.networks.items() if name not in net_by_name]
    for kind, existing, wanted, externals, creates, updates in (
        ("secret", existing_secrets, stack.secrets, stack.external_secrets, p.create_secrets, p.update_secrets),
        ("config", existing_configs, stack.configs, stack.external_configs, p.create_configs, p.update_configs),
    ):
        if existing is None:
            continue
        by_name = {o.spec.annotations.name: o for o in existing}
        for name in externals:
            if name not in by_name:
                raise ComposeError(f'{kind} "{name}" is declared as external, but could not be found; create it '
                                   f"(swarmctl {kind} create {name} FILE) before deploying the stack")
        for name, spec in wanted.items():
            have = by_name.get(name)
            if have is None:
                creates.append(spec)
            elif have.spec.data != spec.data or dict(have.spec.annotations.labels) != dict(spec.annotations.labels):
                updates.append(ObjectUpdate(name=name, object_id=have.id, version=have.meta.version, spec=spec,
                                            data_changed=have.spec.data != spec.data))

    by_name = {s.spec.annotations.name: s for s in existing_services}
    for name, spec in stack.services.items():
        have = by_name.get(name)
        if have is None:
            p.create_services.append(spec)
            continue
        owner = have.spec.annotations.labels.get(LABEL_NAMESPACE)
        if owner != stack.name:
            whose = f'stack "{owner}"' if owner else "no stack"
            raise ComposeError(f'service "{name}" already exists and belongs to {whose}; remove it or deploy '
                               "the stack under another name")
        want = specs_pb2.ServiceSpec()
        want.CopyFrom(spec)
        # Keep what the cluster pinned or bumped itself, as docker stack deploy does.
        want.task.force_update = have.spec.task.force_update
        if have.spec.task.container.HasField("pull_options"):
            want.task.container.pull_options.CopyFrom(have.spec.task.container.pull_options)
        if want.task.container.image == have.spec.annotations.labels.get(LABEL_IMAGE):
            want.task.container.image = have.spec.task.container.image
        a, b = _normalised(want, net_names), _normalised(have.spec, net_names)
        if a.SerializeToString(deterministic=True) == b.SerializeToString(deterministic=True):
            p.unchanged_services.append(name)
        else:
            p.update_services.append(ServiceUpdate(name=name, service_id=have.id, version=have.meta.version,
                                                   spec=want, changed=_diff_paths(b, a)))
    if prune:
        for s in sorted(existing_services, key=lambda s: s.spec.annotations.name):
            labels = s.spec.annotations.labels
            if labels.get(LABEL_NAMESPACE) == stack.name and s.spec.annotations.name not in stack.services:
                p.remove_services.append(s)
    log.info("stack plan stack=%s create=%d update=%d unchanged=%d remove=%d networks=%d secrets=%d configs=%d",
             stack.name, len(p.create_services), len(p.update_services), len(p.unchanged_services),
             len(p.remove_services), len(p.create_networks), len(p.create_secrets), len(p.create_configs))
    return p
