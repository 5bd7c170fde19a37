"""Server-side validation: every bad request is INVALID_ARGUMENT with a sentence naming the field, and
nothing changes in the store. Table-driven, through a real grpc.aio server and client."""

from __future__ import annotations

from collections.abc import Callable

import grpc
import pytest
from helpers.aio import run
from helpers.controlapi import served

from shoal.manager import validation
from shoal.manager.store import InvalidArgument
from shoal.proto import control_pb2, objects_pb2, specs_pb2, types_pb2


def base_spec() -> specs_pb2.ServiceSpec:
    return specs_pb2.ServiceSpec(
        annotations=types_pb2.Annotations(name="web"),
        task=types_pb2.TaskSpec(container=types_pb2.ContainerSpec(image="busybox:latest")),
        replicated=specs_pb2.ReplicatedService(replicas=1),
    )


def c(spec: specs_pb2.ServiceSpec) -> types_pb2.ContainerSpec:
    return spec.task.container


def _set(path: str, value: object) -> Callable[[specs_pb2.ServiceSpec], None]:
    def mut(spec: specs_pb2.ServiceSpec) -> None:
        obj = spec
        parts = path.split(".")
        for p in parts[:-1]:
            obj = getattr(obj, p)
        setattr(obj, parts[-1], value)

    return mut


def _add(path: str, **kw: object) -> Callable[[specs_pb2.ServiceSpec], None]:
    def mut(spec: specs_pb2.ServiceSpec) -> None:
        obj = spec
        for p in path.split("."):
            obj = getattr(obj, p)
        obj.add(**kw)

    return mut


def _append(path: str, *values: str) -> Callable[[specs_pb2.ServiceSpec], None]:
    def mut(spec: specs_pb2.ServiceSpec) -> None:
        obj = spec
        for p in path.split("."):
            obj = getattr(obj, p)
        obj.extend(values)

    return mut


def _global_with_max(spec: specs_pb2.ServiceSpec) -> None:
    getattr(spec, "global").SetInParent()
    spec.task.placement.max_replicas = 2


def _two_ports(spec: specs_pb2.ServiceSpec) -> None:
    spec.endpoint.ports.add(target_port=80, published_port=8080)
    spec.endpoint.ports.add(target_port=81, published_port=8080)


def _dnsrr_ingress(spec: specs_pb2.ServiceSpec) -> None:
    spec.endpoint.mode = types_pb2.EndpointSpec.DNSRR
    spec.endpoint.ports.add(target_port=80, published_port=8080)


def _neg(path: str) -> Callable[[specs_pb2.ServiceSpec], None]:
    def mut(spec: specs_pb2.ServiceSpec) -> None:
        obj = spec
        for p in path.split("."):
            obj = getattr(obj, p)
        obj.seconds = -1

    return mut


def _two_mounts(spec: specs_pb2.ServiceSpec) -> None:
    c(spec).mounts.add(type=types_pb2.Mount.VOLUME, source="v1", target="/data")
    c(spec).mounts.add(type=types_pb2.Mount.VOLUME, source="v2", target="/data")


def _no_container(spec: specs_pb2.ServiceSpec) -> None:
    spec.task.ClearField("container")


def _labels(path: str, key: str) -> Callable[[specs_pb2.ServiceSpec], None]:
    def mut(spec: specs_pb2.ServiceSpec) -> None:
        obj = spec
        for p in path.split("."):
            obj = getattr(obj, p)
        obj[key] = "v"

    return mut


BAD_SERVICE_SPECS: list[tuple[str, Callable[[specs_pb2.ServiceSpec], None], str]] = [
    ("empty image", _set("task.container.image", ""), "image is empty"),
    ("image with spaces", _set("task.container.image", "bad image"), "image reference 'bad image' is invalid"),
    ("uppercase image", _set("task.container.image", "BusyBox"), "lowercase"),
    ("image bad tag", _set("task.container.image", "busybox:la:test"), "is invalid"),
    ("image bad digest", _set("task.container.image", "busybox@sha256:xyz"), "is invalid"),
    ("image trailing slash", _set("task.container.image", "busybox/"), "is invalid"),
    ("no container", _no_container, "no container"),
    ("name with space", _set("annotations.name", "my web"), "service name 'my web"),
    ("name starting with dash", _set("annotations.name", "-web"), "service name '-web"),
    ("name too long", _set("annotations.name", "a" * 64), "at most 63"),
    ("label key with space", _labels("annotations.labels", "bad key"), "service label key 'bad key'"),
    ("empty label key", _labels("annotations.labels", ""), "empty label key"),
    ("container label key", _labels("task.container.labels", "=x"), "container label key"),
    ("env without =", _append("task.container.env", "NOVALUE"), "environment entry 'NOVALUE'"),
    ("env empty key", _append("task.container.env", "=x"), "environment entry '=x'"),
    ("constraint no operator", _append("task.placement.constraints", "node.role"), "no == or != operator"),
    ("constraint unknown key", _append("task.placement.constraints", "node.color==red"), "unknown key 'node.color'"),
    ("constraint bad role", _append("task.placement.constraints", "node.role==boss"), "manager or worker"),
    ("constraint empty value", _append("task.placement.constraints", "node.labels.zone=="), "invalid value"),
    ("constraint bad value", _append("task.placement.constraints", "node.hostname==a;b"), "invalid value"),
    ("constraint two ops", _append("task.placement.constraints", "node.id==a==b"), "more than one operator"),
    ("constraint label no name", _append("task.placement.constraints", "node.labels.==a"), "unknown key"),
    ("preference bad", _add("task.placement.preferences", spread_descriptor="zone"), "spread='zone' is not supported"),
    ("preference empty", _add("task.placement.preferences", spread_descriptor=""), "empty spread descriptor"),
    ("global with max replicas", _global_with_max, "max replicas per node cannot be used with mode global"),
    ("target port 0", _add("endpoint.ports", target_port=0, published_port=80), "target port 0 is out of range"),
    ("target port 70000", _add("endpoint.ports", target_port=70000), "target port 70000 is out of range"),
    ("published port 65536", _add("endpoint.ports", target_port=80, published_port=65536),
     "published port 65536 is out of range"),
    ("duplicate published", _two_ports, "published port 8080/tcp is given twice"),
    ("dnsrr with ingress port", _dnsrr_ingress, "dnsrr"),
    ("bad protocol", _add("endpoint.ports", target_port=80, protocol=9), "port protocol has an unknown value 9"),
    ("bad restart condition", _set("task.restart.condition", 7), "restart condition has an unknown value 7"),
    ("negative restart delay", _neg("task.restart.delay"), "restart delay is negative"),
    ("negative restart window", _neg("task.restart.window"), "restart window is negative"),
    ("failure ratio > 1", _set("update.max_failure_ratio", 1.5), "update config max failure ratio 1.5 is out of range"),
    ("failure ratio < 0", _set("rollback.max_failure_ratio", -0.1), "rollback config max failure ratio"),
    ("bad failure action", _set("update.failure_action", 5), "update config failure action has an unknown value"),
    ("rollback action rollback", _set("rollback.failure_action", types_pb2.UpdateConfig.ROLLBACK),
     "rollback config failure action cannot be rollback"),
    ("bad update order", _set("update.order", 3), "update config order has an unknown value"),
    ("negative update delay", _neg("update.delay"), "update config delay is negative"),
    ("negative monitor", _neg("update.monitor"), "update config monitor is negative"),
    ("negative stop grace", _neg("task.container.stop_grace_period"), "stop grace period is negative"),
    ("bad stop signal", _set("task.container.stop_signal", "SIGFOO"), "stop signal 'SIGFOO' is not a signal"),
    ("cpu too small", _set("task.resources.limits.nano_cpus", 10), "CPU limit"),
    ("negative cpu", _set("task.resources.reservations.nano_cpus", -1), "CPU reservation"),
    ("memory too small", _set("task.resources.limits.memory_bytes", 1024), "memory limit of 1024 bytes is invalid"),
    ("negative pids", _set("task.resources.pids_limit", -1), "pids limit -1 is negative"),
    ("relative workdir", _set("task.container.dir", "app"), "working directory 'app' is not an absolute path"),
    ("bad hostname", _set("task.container.hostname", "bad_host!"), "hostname 'bad_host!' is not a valid host name"),
    ("relative mount target", _add("task.container.mounts", type=types_pb2.Mount.VOLUME, target="data"),
     "mount target 'data' is not an absolute path"),
    ("relative bind source", _add("task.container.mounts", type=types_pb2.Mount.BIND, source="src", target="/s"),
     "bind mount source 'src'"),
    ("tmpfs with source", _add("task.container.mounts", type=types_pb2.Mount.TMPFS, source="x", target="/t"),
     "tmpfs mount /t has a source"),
    ("duplicate mount target", _two_mounts, "mount target '/data' is used twice"),
    ("secret ref without name", _add("task.container.secrets"), "secret reference has neither an id nor a name"),
    ("secret target ..", _add("task.container.secrets", secret_name="s", file=types_pb2.FileTarget(name="../x")),
     "contains '..'"),
    ("config mode too big", _add("task.container.configs", config_name="c", file=types_pb2.FileTarget(name="c", mode=0o1777)),
     "config file mode"),
    ("health test kind", _append("task.container.healthcheck.test", "RUN", "x"), "health check test starts with 'RUN'"),
    ("health CMD empty", _append("task.container.healthcheck.test", "CMD"), "health check CMD has no command"),
    ("health interval tiny", _set("task.container.healthcheck.interval.nanos", 10), "health check interval is too short"),
    ("health retries", _set("task.container.healthcheck.retries", -2), "health check retries"),
    ("extra host", _append("task.container.hosts", "justahost"), "extra host entry"),
    ("extra host ip", _append("task.container.hosts", "300.1.1.1 h"), "extra host address '300.1.1.1'"),
    ("dns server", _append("task.container.dns_config.nameservers", "dns.example"), "DNS nameserver"),
    ("network empty target", _add("task.networks", target=""), "network attachment has no target"),
    ("network alias", _add("task.networks", target="n1", aliases=["bad alias"]), "network alias of 'n1'"),
    ("network twice", lambda s: (_add("task.networks", target="n1")(s), _add("task.networks", target="n1")(s)),
     "attached twice"),
    ("unknown network", _add("task.networks", target="nosuchnet"), "network 'nosuchnet' not found"),
    ("unknown secret", _add("task.container.secrets", secret_name="nosuch"), "secret 'nosuch' not found"),
    ("unknown config", _add("task.container.configs", config_id="nosuch"), "config 'nosuch' not found"),
    ("bad capability", _append("task.container.capability_add", "NET ADMIN"), "capability 'NET ADMIN'"),
    ("reservation over limit", lambda s: (_set("task.resources.limits.memory_bytes", 8 << 20)(s),
                                          _set("task.resources.reservations.memory_bytes", 16 << 20)(s)),
     "memory reservation is larger than the memory limit"),
]


async def _expect_invalid(s, call, match: str) -> None:
    before = s.store.sm.snapshot()
    with pytest.raises(grpc.aio.AioRpcError) as ei:
        await call
    assert ei.value.code() == grpc.StatusCode.INVALID_ARGUMENT, ei.value.details()
    assert match.lower() in ei.value.details().lower(), ei.value.details()
    assert s.store.sm.snapshot() == before  # nothing changed


@pytest.mark.parametrize("mutate,match", [(m, x) for _, m, x in BAD_SERVICE_SPECS],
                         ids=[d for d, _, _ in BAD_SERVICE_SPECS])
def test_bad_service_spec_is_refused_on_create_and_update(tmp_path, mutate, match) -> None:
    async def main() -> None:
        async with served(tmp_path) as s:
            ok = (await s.stub.CreateService(control_pb2.CreateServiceRequest(spec=base_spec()))).service
            spec = base_spec()
            mutate(spec)
            await _expect_invalid(s, s.stub.UpdateService(control_pb2.UpdateServiceRequest(
                service_id=ok.id, service_version=ok.meta.version, spec=spec)), match)
            spec.annotations.name = spec.annotations.name.replace("web", "web2") if spec.annotations.name else ""
            await _expect_invalid(s, s.stub.CreateService(control_pb2.CreateServiceRequest(spec=spec)), match)

    run(main())


GOOD_IMAGES = ["busybox", "busybox:1.36", "library/busybox:latest", "localhost:5000/app/web:v2",
               "127.0.0.1:5000/bb", "registry.example.com/a/b/c:1.0-rc_1",
               "busybox@sha256:" + "a" * 64, "bb:1@sha256:" + "0" * 64, "a__b/c-d---e.f"]
BAD_IMAGES = ["", "Busybox", "busybox:", ":latest", "bb:1:2", "bb@sha256:12", "/bb", "bb//c", "bb:" + "x" * 129,
              "-bb", "bb_", "a b"]


@pytest.mark.parametrize("image", GOOD_IMAGES)
def test_good_images(image: str) -> None:
    validation.validate_image(image)


@pytest.mark.parametrize("image", BAD_IMAGES)
def test_bad_images(image: str) -> None:
    with pytest.raises(InvalidArgument, match="image"):
        validation.validate_image(image)


@pytest.mark.parametrize("expr,key,equal,value", [
    ("node.role==manager", "node.role", True, "manager"),
    ("node.role == worker", "node.role", True, "worker"),
    ("Node.Hostname!=h1", "node.hostname", False, "h1"),
    ("node.labels.Zone==eu-1", "node.labels.Zone", True, "eu-1"),
    ("engine.labels.os!=windows", "engine.labels.os", False, "windows"),
    ("node.platform.arch==x86_64", "node.platform.arch", True, "x86_64"),
    ("node.id==abc123", "node.id", True, "abc123"),
])
def test_good_constraints(expr: str, key: str, equal: bool, value: str) -> None:
    con = validation.parse_constraint(expr)
    assert (con.key, con.equal, con.value) == (key, equal, value)


def _node_spec(**kw: object) -> specs_pb2.NodeSpec:
    return specs_pb2.NodeSpec(**kw)


BAD_NODE_SPECS = [
    ("availability", _node_spec(availability=9), "node availability has an unknown value 9"),
    ("role", _node_spec(desired_role=5), "node role has an unknown value 5"),
    ("label key", _node_spec(annotations=types_pb2.Annotations(labels={"a b": "c"})), "node label key 'a b'"),
    ("name", _node_spec(annotations=types_pb2.Annotations(name="bad name")), "node name 'bad name'"),
]


@pytest.mark.parametrize("spec,match", [(s, m) for _, s, m in BAD_NODE_SPECS], ids=[d for d, _, _ in BAD_NODE_SPECS])
def test_bad_node_spec(tmp_path, spec, match) -> None:
    async def main() -> None:
        async with served(tmp_path) as s:
            node = await s.store.update(lambda tx: tx.create(objects_pb2.Node(
                description=types_pb2.NodeDescription(hostname="n1"))))
            await _expect_invalid(s, s.stub.UpdateNode(control_pb2.UpdateNodeRequest(
                node_id=node.id, node_version=node.meta.version, spec=spec)), match)

    run(main())


def _net(name: str = "n1", **kw: object) -> specs_pb2.NetworkSpec:
    return specs_pb2.NetworkSpec(annotations=types_pb2.Annotations(name=name), **kw)


def _ipam(**cfg: str) -> types_pb2.IPAMOptions:
    return types_pb2.IPAMOptions(configs=[types_pb2.IPAMConfig(**cfg)])


BAD_NETWORK_SPECS = [
    ("empty name", _net(""), "network name is empty"),
    ("bad name", _net("a/b"), "network name 'a/b' is invalid"),
    ("driver", _net(driver_config=types_pb2.Driver(name="bridge")), "network driver 'bridge' is not supported"),
    ("ingress attachable", _net(ingress=True, attachable=True), "ingress network cannot be attachable"),
    ("ingress encrypted", _net(ingress=True, driver_config=types_pb2.Driver(options={"encrypted": ""})),
     "network driver option encrypted cannot be used on the ingress network"),
    ("subnet", _net(ipam=_ipam(subnet="10.1.2.3/24")), "subnet '10.1.2.3/24' is not an IPv4 network"),
    ("subnet garbage", _net(ipam=_ipam(subnet="banana")), "subnet 'banana'"),
    ("subnet small", _net(ipam=_ipam(subnet="10.1.2.0/30")), "too small"),
    ("gateway outside", _net(ipam=_ipam(subnet="10.1.2.0/24", gateway="10.1.3.1")), "gateway 10.1.3.1 is not inside"),
    ("gateway no subnet", _net(ipam=_ipam(gateway="10.1.3.1")), "needs a subnet"),
    ("range outside", _net(ipam=_ipam(subnet="10.1.2.0/24", range="10.1.0.0/25")), "range 10.1.0.0/25 is not inside"),
    ("two configs", _net(ipam=types_pb2.IPAMOptions(configs=[types_pb2.IPAMConfig(subnet="10.1.0.0/24"),
                                                             types_pb2.IPAMConfig(subnet="10.2.0.0/24")])),
     "one IPAM config"),
    ("outside pool", _net(ipam=_ipam(subnet="192.168.0.0/24")), "outside the cluster's address pool"),
]


@pytest.mark.parametrize("spec,match", [(s, m) for _, s, m in BAD_NETWORK_SPECS],
                         ids=[d for d, _, _ in BAD_NETWORK_SPECS])
def test_bad_network_spec(tmp_path, spec, match) -> None:
    async def main() -> None:
        async with served(tmp_path) as s:
            await _expect_invalid(s, s.stub.CreateNetwork(control_pb2.CreateNetworkRequest(spec=spec)), match)

    run(main())


BAD_SECRET_SPECS = [
    ("empty data", b"", "s1", "secret data is 0 bytes"),
    ("too big", b"x" * (500 * 1024 + 1), "s1", "secret data is 512001 bytes: give between 1 byte and 500 KB"),
    ("no name", b"x", "", "secret name is empty"),
    ("bad name", b"x", "s 1", "secret name 's 1' is invalid"),
]


@pytest.mark.parametrize("data,name,match", [(d, n, m) for _, d, n, m in BAD_SECRET_SPECS],
                         ids=[x[0] for x in BAD_SECRET_SPECS])
def test_bad_secret_and_config_spec(tmp_path, data, name, match) -> None:
    async def main() -> None:
        async with served(tmp_path) as s:
            ann = types_pb2.Annotations(name=name)
            await _expect_invalid(s, s.stub.CreateSecret(control_pb2.CreateSecretRequest(
                spec=specs_pb2.SecretSpec(annotations=ann, data=data))), match)
            if len(data) <= 500 * 1024 + 1 and len(data) > 1000:
                return  # a 500 KB config is fine
            await _expect_invalid(s, s.stub.CreateConfig(control_pb2.CreateConfigRequest(
                spec=specs_pb2.ConfigSpec(annotations=ann, data=data))), match.replace("secret", "config")
                .replace("500 KB", "1000 KB"))

    run(main())


def _cl(**kw: object) -> specs_pb2.ClusterSpec:
    return specs_pb2.ClusterSpec(**kw)


BAD_CLUSTER_SPECS = [
    ("history", _cl(orchestration=specs_pb2.ClusterSpec.Orchestration(task_history_retention_limit=-1)),
     "task history retention limit -1 is negative"),
    ("heartbeat tiny", _cl(dispatcher=specs_pb2.ClusterSpec.Dispatcher(heartbeat_period={"nanos": 1000})),
     "dispatcher heartbeat period is out of range"),
    ("heartbeat huge", _cl(dispatcher=specs_pb2.ClusterSpec.Dispatcher(heartbeat_period={"seconds": 7200})),
     "dispatcher heartbeat period is out of range"),
    ("restart window tiny", _cl(dispatcher=specs_pb2.ClusterSpec.Dispatcher(restart_window={"nanos": 500_000_000})),
     "dispatcher restart window is out of range: give 0 (the default, 60s) or a duration from 1s to 24h"),
    ("restart window negative", _cl(dispatcher=specs_pb2.ClusterSpec.Dispatcher(restart_window={"seconds": -1})),
     "dispatcher restart window is out of range"),
    ("cert expiry", _cl(ca_config=specs_pb2.ClusterSpec.CAConfig(node_cert_expiry={"seconds": 59})),
     "node certificate expiry is too short"),
    ("subnet size", _cl(subnet_size=31), "subnet size /31 is out of range"),
    ("key rotation tiny", _cl(network_encryption=specs_pb2.ClusterSpec.NetworkEncryption(
        key_rotation_interval={"nanos": 500_000_000})), "network key rotation interval of 500ms is too short"),
    ("key rotation negative", _cl(network_encryption=specs_pb2.ClusterSpec.NetworkEncryption(
        key_rotation_interval={"seconds": -5})), "network key rotation interval is negative"),
    ("pool", _cl(default_address_pool=["10.0.0.1/8"]), "default address pool '10.0.0.1/8'"),
    ("pool small", _cl(default_address_pool=["10.0.0.0/26"]), "smaller than the subnet size"),
    ("pools overlap", _cl(default_address_pool=["10.0.0.0/8", "10.1.0.0/16"]), "overlap"),
]


@pytest.mark.parametrize("spec,match", [(s, m) for _, s, m in BAD_CLUSTER_SPECS],
                         ids=[d for d, _, _ in BAD_CLUSTER_SPECS])
def test_bad_cluster_spec(tmp_path, spec, match) -> None:
    async def main() -> None:
        async with served(tmp_path) as s:
            cl = await s.store.update(lambda tx: tx.create(objects_pb2.Cluster(
                spec=specs_pb2.ClusterSpec(annotations=types_pb2.Annotations(name="default")))))
            await _expect_invalid(s, s.stub.UpdateCluster(control_pb2.UpdateClusterRequest(
                cluster_version=cl.meta.version, spec=spec)), match)

    run(main())


def test_good_full_service_spec_is_accepted(tmp_path) -> None:
    async def main() -> None:
        async with served(tmp_path) as s:
            spec = base_spec()
            cs = c(spec)
            cs.env.extend(["A=1", "B=", "PATH=/bin:/usr/bin"])
            cs.command.extend(["sh", "-c"])
            cs.args.append("sleep 1")
            cs.hostname = "{{.Service.Name}}-{{.Task.Slot}}"
            cs.dir = "/app"
            cs.stop_signal = "TERM"
            cs.stop_grace_period.seconds = 3
            cs.mounts.add(type=types_pb2.Mount.TMPFS, target="/tmp", tmpfs_options=types_pb2.Mount.TmpfsOptions(
                size_bytes=1 << 20))
            cs.mounts.add(type=types_pb2.Mount.BIND, source="/srv", target="/srv", readonly=True)
            cs.healthcheck.test.extend(["CMD-SHELL", "true"])
            cs.healthcheck.interval.seconds = 5
            spec.task.placement.constraints.extend(["node.role==worker", "node.labels.zone!=b"])
            spec.task.placement.preferences.add(spread_descriptor="node.labels.zone")
            spec.task.resources.limits.nano_cpus = 500_000_000
            spec.task.resources.limits.memory_bytes = 64 << 20
            spec.task.restart.condition = types_pb2.RestartPolicy.ON_FAILURE
            spec.update.parallelism = 2
            spec.update.max_failure_ratio = 0.25
            spec.endpoint.ports.add(target_port=80, published_port=8080)
            spec.endpoint.ports.add(target_port=80, published_port=8080, protocol=types_pb2.PortConfig.UDP)
            spec.endpoint.ports.add(target_port=53, publish_mode=types_pb2.PortConfig.HOST)
            svc = (await s.stub.CreateService(control_pb2.CreateServiceRequest(spec=spec))).service
            assert svc.spec == spec

    run(main())
