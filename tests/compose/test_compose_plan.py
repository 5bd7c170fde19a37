"""The deploy plan: idempotent redeploys, updates only where the spec differs, prune, externals."""

from __future__ import annotations

from pathlib import Path

import pytest

from shoal.compose import ComposeError, StackSpec, convert, load, plan
from shoal.proto import objects_pb2, specs_pb2

STACK = """
services:
  web:
    image: nginx:1.25
    ports: ["8080:80"]
    networks: [front, back]
    secrets: [token]
    configs: [conf]
    deploy: {replicas: 2}
  db:
    image: postgres:16
    networks: [back]
  ext:
    image: busybox
    networks: [shared]
    secrets: [outside]
networks:
  front:
  back:
  shared: {external: true}
secrets:
  token: {file: token.txt}
  outside: {external: true}
configs:
  conf: {content: "a=1"}
"""


class Cluster:
    """What the cluster would hold after deploying a StackSpec the way the CLI does it: names resolved
    to ids, the image pinned to a digest, registry auth recorded."""

    def __init__(self) -> None:
        self.services: list[objects_pb2.Service] = []
        self.networks: list[objects_pb2.Network] = [
            objects_pb2.Network(id="n-shared", spec=specs_pb2.NetworkSpec(annotations={"name": "shared"}))]
        self.secrets: list[objects_pb2.Secret] = [
            objects_pb2.Secret(id="s-outside", spec=specs_pb2.SecretSpec(annotations={"name": "outside"}))]
        self.configs: list[objects_pb2.Config] = []
        self.version = 10

    def _id(self, prefix: str) -> str:
        self.version += 1
        return f"{prefix}{self.version}"

    def apply(self, stack: StackSpec, **kw: object) -> None:
        p = plan(stack, self.services, self.networks, self.secrets, self.configs, **kw)
        for spec in p.create_networks:
            self.networks.append(objects_pb2.Network(id=self._id("n"), spec=spec))
        for spec in p.create_secrets:
            self.secrets.append(objects_pb2.Secret(id=self._id("s"), spec=spec))
        for spec in p.create_configs:
            self.configs.append(objects_pb2.Config(id=self._id("c"), spec=spec))
        for spec in p.create_services:
            self.services.append(objects_pb2.Service(id=self._id("svc"), spec=self._resolve(spec)))
        for up in p.update_services:
            svc = next(s for s in self.services if s.id == up.service_id)
            svc.spec.CopyFrom(self._resolve(up.spec))
            self.version += 1
            svc.meta.version = self.version
        for gone in p.remove_services:
            self.services = [s for s in self.services if s.id != gone.id]

    def _resolve(self, spec: specs_pb2.ServiceSpec) -> specs_pb2.ServiceSpec:
        out = specs_pb2.ServiceSpec()
        out.CopyFrom(spec)
        net_ids = {n.spec.annotations.name: n.id for n in self.networks}
        for att in out.task.networks:
            att.target = net_ids[att.target]
        sec_ids = {s.spec.annotations.name: s.id for s in self.secrets}
        for ref in out.task.container.secrets:
            ref.secret_id = sec_ids[ref.secret_name]
        cfg_ids = {c.spec.annotations.name: c.id for c in self.configs}
        for ref in out.task.container.configs:
            ref.config_id = cfg_ids[ref.config_name]
        if "@" not in out.task.container.image:
            out.task.container.image += "@sha256:" + "ab" * 32
        out.task.container.pull_options.registry_auth = "e30="
        return out


@pytest.fixture
def make(write, stackdir: Path):
    (stackdir / "token.txt").write_text("t0ken")

    def _make(text: str = STACK, name: str = "app") -> StackSpec:
        return convert(load([write("stack.yml", text)], environment={}), name)
    return _make


def test_first_deploy_creates_everything(make) -> None:
    cluster = Cluster()
    p = plan(make(), cluster.services, cluster.networks, cluster.secrets, cluster.configs)
    assert [n.annotations.name for n in p.create_networks] == ["app_back", "app_front"]
    assert [s.annotations.name for s in p.create_secrets] == ["app_token"]
    assert [c.annotations.name for c in p.create_configs] == ["app_conf"]
    assert [s.annotations.name for s in p.create_services] == ["app_db", "app_ext", "app_web"]
    assert not p.update_services and not p.unchanged_services and not p.remove_services


def test_redeploy_is_a_noop(make) -> None:
    cluster = Cluster()
    cluster.apply(make())
    p = plan(make(), cluster.services, cluster.networks, cluster.secrets, cluster.configs, prune=True)
    assert p.is_noop, p
    assert p.unchanged_services == ["app_db", "app_ext", "app_web"]


def test_force_update_is_kept(make) -> None:
    cluster = Cluster()
    cluster.apply(make())
    for s in cluster.services:
        s.spec.task.force_update = 3        # somebody ran `service update --force`
    p = plan(make(), cluster.services, cluster.networks, cluster.secrets, cluster.configs)
    assert p.is_noop


def test_changed_service_is_updated_alone(make) -> None:
    cluster = Cluster()
    cluster.apply(make())
    cluster.services[0].spec.task.force_update = 7
    edited = STACK.replace("deploy: {replicas: 2}", "deploy: {replicas: 4}").replace("postgres:16", "postgres:17")
    p = plan(make(edited), cluster.services, cluster.networks, cluster.secrets, cluster.configs)
    assert p.unchanged_services == ["app_ext"]
    ups = {u.name: u for u in p.update_services}
    assert sorted(ups) == ["app_db", "app_web"]
    assert ups["app_web"].changed == ["replicated.replicas"]
    assert ups["app_web"].spec.replicated.replicas == 4
    assert ups["app_web"].spec.task.container.image.startswith("nginx:1.25@sha256:")   # pinned digest kept
    assert "task.container.image" in ups["app_db"].changed
    assert ups["app_db"].spec.task.container.image == "postgres:17"                       # new image: re-resolve
    assert ups["app_db"].spec.task.force_update == 7
    assert ups["app_db"].service_id == cluster.services[0].id
    assert not p.create_services and not p.create_networks
    cluster.apply(make(edited))
    assert plan(make(edited), cluster.services, cluster.networks, cluster.secrets, cluster.configs).is_noop


def test_prune_removes_only_this_stacks_leftovers(make) -> None:
    cluster = Cluster()
    cluster.apply(make())
    cluster.apply(make(STACK, name="other"))
    smaller = STACK.replace("  db:\n    image: postgres:16\n    networks: [back]\n", "")
    p = plan(make(smaller), cluster.services, cluster.networks, cluster.secrets, cluster.configs)
    assert not p.remove_services                                  # without prune nothing goes
    p = plan(make(smaller), cluster.services, cluster.networks, cluster.secrets, cluster.configs, prune=True)
    assert [s.spec.annotations.name for s in p.remove_services] == ["app_db"]
    assert p.unchanged_services == ["app_ext", "app_web"]


def test_missing_external_objects(make) -> None:
    cluster = Cluster()
    with pytest.raises(ComposeError) as info:
        plan(make(), cluster.services, [], cluster.secrets, cluster.configs)
    assert str(info.value).startswith('network "shared" is declared as external, but could not be found')
    with pytest.raises(ComposeError) as info:
        plan(make(), cluster.services, cluster.networks, [], cluster.configs)
    assert str(info.value).startswith('secret "outside" is declared as external, but could not be found')
    # Not checked when the caller does not pass them.
    p = plan(make(), cluster.services)
    assert not p.create_networks and len(p.create_services) == 3


def test_changed_secret_data(make, stackdir: Path) -> None:
    cluster = Cluster()
    cluster.apply(make())
    (stackdir / "token.txt").write_text("rotated")
    p = plan(make(), cluster.services, cluster.networks, cluster.secrets, cluster.configs)
    assert [(u.name, u.data_changed) for u in p.update_secrets] == [("app_token", True)]
    assert p.update_secrets[0].spec.data == b"rotated"
    with pytest.raises(ComposeError, match='secret "app_token" already exists with other data'):
        p.check_immutable()
    assert p.unchanged_services == ["app_db", "app_ext", "app_web"]


def test_network_order_and_ids_do_not_matter(make) -> None:
    cluster = Cluster()
    cluster.apply(make())
    web = next(s for s in cluster.services if s.spec.annotations.name == "app_web")
    nets = list(web.spec.task.networks)
    del web.spec.task.networks[:]
    web.spec.task.networks.extend(reversed(nets))
    assert plan(make(), cluster.services, cluster.networks, cluster.secrets, cluster.configs).is_noop


def test_foreign_service_with_the_same_name(make) -> None:
    cluster = Cluster()
    foreign = objects_pb2.Service(id="x1", spec=specs_pb2.ServiceSpec(annotations={"name": "app_web"}))
    with pytest.raises(ComposeError) as info:
        plan(make(), [foreign], cluster.networks, cluster.secrets, cluster.configs)
    assert str(info.value) == ('service "app_web" already exists and belongs to no stack; remove it or deploy the '
                               "stack under another name")


# ---------------------------------------------------------------- property: deploy twice is a no-op

from hypothesis import HealthCheck, assume, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from shoal.compose import ComposeSource  # noqa: E402

_NAMES = st.sampled_from(["web", "api", "db", "cache", "worker"])
_SERVICE = st.fixed_dictionaries(
    {"image": st.sampled_from(["nginx:1.25", "redis", "busybox:1.36", "registry.local:5000/app:v2"])},
    optional={
        "ports": st.lists(st.sampled_from(["80", "8080:80", "53:53/udp", "9000-9001:9000-9001"]), max_size=2,
                          unique=True),
        "environment": st.dictionaries(st.from_regex(r"[A-Z]{1,4}", fullmatch=True), st.text(max_size=5),
                                       max_size=3),
        "labels": st.dictionaries(st.sampled_from(["a", "b.c"]), st.sampled_from(["1", "x"]), max_size=2),
        "command": st.lists(st.sampled_from(["run", "--x", "1"]), max_size=3),
        "networks": st.lists(st.sampled_from(["front", "back", "shared"]), unique=True, max_size=3),
        "secrets": st.lists(st.sampled_from(["token", "outside"]), unique=True, max_size=2),
        "configs": st.lists(st.sampled_from(["conf"]), unique=True, max_size=1),
        "deploy": st.one_of(
            st.fixed_dictionaries({"replicas": st.integers(0, 5)}),
            st.just({"mode": "global"}),
            st.fixed_dictionaries({"update_config": st.fixed_dictionaries({"parallelism": st.integers(0, 3)}),
                                   "resources": st.just({"limits": {"cpus": "0.5", "memory": "64m"}})}),
        ),
        "healthcheck": st.just({"test": ["CMD", "true"], "interval": "5s"}),
    },
)
_STACKS = st.dictionaries(_NAMES, _SERVICE, min_size=1, max_size=3)
_TOP = {"networks": {"front": None, "back": None, "shared": {"external": True}},
        "secrets": {"token": {"file": "token.txt"}, "outside": {"external": True}},
        "configs": {"conf": {"content": "a=1"}}}


@pytest.fixture(scope="module")
def propdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("planprops")
    (d / "token.txt").write_text("t0ken")
    return d


def _stack(services: dict, d: Path) -> StackSpec:
    import yaml

    text = yaml.safe_dump({"services": services, **_TOP})
    try:
        return convert(load([ComposeSource("stack.yml", text)], environment={}, working_dir=d), "app")
    except ComposeError:
        assume(False)
        raise


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(first=_STACKS, second=_STACKS)
def test_redeploy_is_noop_and_updates_converge(first: dict, second: dict, propdir: Path) -> None:
    a, b = _stack(first, propdir), _stack(second, propdir)
    cluster = Cluster()
    cluster.apply(a)
    assert plan(a, cluster.services, cluster.networks, cluster.secrets, cluster.configs, prune=True).is_noop
    cluster.apply(b, prune=True)
    again = plan(b, cluster.services, cluster.networks, cluster.secrets, cluster.configs, prune=True)
    assert again.is_noop, again
    assert sorted(s.spec.annotations.name for s in cluster.services) == sorted(b.services)
