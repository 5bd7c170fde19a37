"""The docker SDK for Python (`docker` 7.x on PyPI) against swarmd's Engine API: what Swarm tooling
written with it calls (client.swarm, nodes, services with their options, networks, secrets, configs,
a service's tasks, logs, scale, update, removal). Needs root."""

from __future__ import annotations

import time

import docker
import pytest
from docker.types import (
    ConfigReference,
    EndpointSpec,
    Mount,
    Resources,
    RestartPolicy,
    SecretReference,
    ServiceMode,
    UpdateConfig,
)
from engine_helpers import EngineManager

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def client(mgr: EngineManager) -> docker.DockerClient:
    c = docker.DockerClient(base_url=f"unix://{mgr.docker_sock}", timeout=60)
    yield c
    c.close()


def wait(cond, what: str, timeout: float = 60):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        got = cond()
        if got:
            return got
        time.sleep(0.2)
    raise AssertionError(f"gave up waiting {timeout:g} s for {what}")


def test_swarm_and_nodes(client: docker.DockerClient, mgr: EngineManager) -> None:
    assert client.version()["ApiVersion"] == "1.41"
    attrs = client.swarm.attrs
    assert attrs["ID"] == mgr.info().cluster_id and attrs["JoinTokens"]["Worker"].startswith("SWMTKN-1-")
    [node] = client.nodes.list()
    assert node.id == mgr.info().node_id and client.nodes.get(node.id).attrs["Spec"]["Role"] == "manager"
    assert node.update({"Availability": "active", "Role": "manager", "Labels": {"sdk": "yes"}})
    node.reload()
    assert node.attrs["Spec"]["Labels"] == {"sdk": "yes"}
    assert node.update({"Availability": "active", "Role": "manager", "Labels": {}})
    assert client.info()["Swarm"]["ControlAvailable"] is True


def test_services_networks_secrets_and_configs(client: docker.DockerClient, mgr: EngineManager) -> None:
    net = client.networks.create("sdknet", driver="overlay", attachable=True, labels={"by": "sdk"})
    secret = client.secrets.create(name="sdksecret", data=b"s3cret", labels={"by": "sdk"})
    config = client.configs.create(name="sdkconfig", data=b"conf")
    svc = None
    try:
        assert client.networks.get(net.id).attrs["Attachable"] is True
        assert "Data" not in client.secrets.get(secret.id).attrs["Spec"]
        assert client.configs.get(config.id).attrs["Spec"]["Data"]  # configs keep their data visible
        assert [s.name for s in client.secrets.list(filters={"name": "sdksecret"})] == ["sdksecret"]
        svc = client.services.create(
            mgr.image, ["sh", "-c", "echo sdk-hello; cat /run/secrets/sdksecret; echo; sleep 600"], name="sdkweb",
            # (a loopback manager has no data path: no overlay network nor ingress port for running tasks,
            # and its one node can hold one host-mode port: tests/engineapi/test_engine_services has ports)
            mode=ServiceMode("replicated", replicas=2), endpoint_spec=EndpointSpec(mode="dnsrr"),
            secrets=[SecretReference(secret.id, "sdksecret")], configs=[ConfigReference(config.id, "sdkconfig")],
            mounts=[Mount("/scratch", None, type="tmpfs")],
            resources=Resources(mem_limit=64 * 1024 * 1024), restart_policy=RestartPolicy(condition="on-failure"),
            update_config=UpdateConfig(parallelism=1, order="start-first"), stop_grace_period=1_000_000_000,
            labels={"by": "sdk"})
        got = client.services.get(svc.id)
        spec = got.attrs["Spec"]
        assert spec["Name"] == "sdkweb" and spec["Mode"] == {"Replicated": {"Replicas": 2}}
        assert spec["TaskTemplate"]["Resources"]["Limits"]["MemoryBytes"] == 64 * 1024 * 1024
        assert spec["UpdateConfig"]["Order"] == "start-first"
        assert spec["EndpointSpec"] == {"Mode": "dnsrr"}
        assert [s.name for s in client.services.list(filters={"label": "by=sdk"})] == ["sdkweb"]
        wait(lambda: len([t for t in got.tasks() if t["Status"]["State"] == "running"]) == 2, "2 running tasks")
        logs = wait(lambda: b"sdk-hello" in b"".join(got.logs(stdout=True, stderr=True)) and
                    b"".join(got.logs(stdout=True, stderr=True)), "the service's logs")
        assert b"s3cret" in logs
        got.reload()  # the allocator's VIPs made a new Version since the create (as in Docker)
        assert got.scale(3)
        wait(lambda: len([t for t in got.tasks(filters={"desired-state": "running"})
                          if t["Status"]["State"] == "running"]) == 3, "3 running tasks")
        # Shoal's updater marks even a scale as an update (UpdateStatus updating, then completed after
        # the monitor period: a new Version); swarmkit's finds no dirty slot and sets none. Update once settled.
        wait(lambda: (got.reload() or True) and got.attrs.get("UpdateStatus", {}).get("State") != "updating",
             "the scale's update status to settle", 30)
        assert got.update(env=["SDK=1"])
        got.reload()
        assert got.attrs["Spec"]["TaskTemplate"]["ContainerSpec"]["Env"] == ["SDK=1"]
        # swarmctl sees the service docker made, with its options
        assert "sdkweb" in mgr.ok("service", "ls")
        # `networks=` by name: stored as the network's id (its tasks
        # cannot run on this loopback manager, which has no data path: only the spec is checked)
        netted = client.services.create(mgr.image, ["sleep", "600"], name="sdknetted", networks=["sdknet"])
        try:
            assert client.services.get(netted.id).attrs["Spec"]["TaskTemplate"]["Networks"][0]["Target"] == net.id
        finally:
            netted.remove()
    finally:
        if svc is not None:
            svc.remove()
            wait(lambda: not client.services.list(filters={"name": "sdkweb"}), "the service to go")
            wait(lambda: not mgr.ok("task", "ls", "--format", "json").count("sdkweb"), "its tasks to go", 60)
        for obj in (secret, config, net):
            try:
                obj.remove()
            except docker.errors.APIError:
                time.sleep(2)
                obj.remove()
    assert client.networks.list(names=["sdknet"]) == []
    with pytest.raises(docker.errors.NotFound):
        client.services.get("sdkweb")
