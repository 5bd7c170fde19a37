"""Docker ServiceSpec JSON <-> Shoal's ServiceSpec (shoal.engineapi.servicespec), no cluster: the
bodies the docker CLI sends (recorded in docs/docker-cli-api.md §5.1, §5.2), round trips both ways,
and the 400s for what Shoal has not."""

from __future__ import annotations

import argparse
import copy
import json

import pytest

from shoal.cli import servicespec as cli_spec
from shoal.engineapi.server import APIError
from shoal.engineapi.servicespec import fill_defaults, spec_from_json, spec_json, task_spec_json
from shoal.proto import specs_pb2, types_pb2

# §5.1: `docker service create --name web --replicas 3 --network net1 -p 8080:80 --env A=1
# --constraint node.role==manager --limit-memory 64m --restart-condition on-failure bb:1 httpd -f -p 80`
CLI_CREATE = {
    "Name": "web", "Labels": {},
    "TaskTemplate": {
        "ContainerSpec": {"Image": "bb:1", "Args": ["httpd", "-f", "-p", "80"], "Env": ["A=1"], "Init": False,
                          "DNSConfig": {}},
        "Resources": {"Limits": {"MemoryBytes": 67108864}, "Reservations": {}},
        "RestartPolicy": {"Condition": "on-failure", "Delay": 5000000000, "MaxAttempts": 0},
        "Placement": {"Constraints": ["node.role==manager"]},
        "Networks": [{"Target": "cj6pdlxs5znnb5v6z4t84jhbz"}],
        "ForceUpdate": 0},
    "Mode": {"Replicated": {"Replicas": 3}},
    "EndpointSpec": {"Mode": "vip",
                     "Ports": [{"Protocol": "tcp", "TargetPort": 80, "PublishedPort": 8080, "PublishMode": "ingress"}]},
}

# §5.2: `docker stack deploy` (service st_web)
STACK_DEPLOY = json.loads("""
{"Name":"st_web","Labels":{"com.docker.stack.image":"bb:1","com.docker.stack.namespace":"st"},
 "TaskTemplate":{"ContainerSpec":{"Image":"bb:1","Labels":{"com.docker.stack.namespace":"st"},
   "Args":["httpd","-f","-p","80"],"Env":["MODE=prod"],
   "Privileges":{"CredentialSpec":null,"SELinuxContext":null,"NoNewPrivileges":false},
   "Healthcheck":{"Test":["CMD","wget","-q","-O","/dev/null","http://127.0.0.1/"],"Interval":5000000000,
                  "Timeout":2000000000,"Retries":3},
   "Secrets":[{"File":{"Name":"s2","UID":"0","GID":"0","Mode":292},"SecretID":"t45v0l5b9r93vqqk3yz7osf2i",
               "SecretName":"st_s2"}],
   "Configs":[{"File":{"Name":"/etc/cfg.txt","UID":"0","GID":"0","Mode":292},"ConfigID":"j1t11amv6hmnc0ue9p9wbo0sh",
               "ConfigName":"st_cfg"}]},
  "Resources":{},"RestartPolicy":{"Condition":"on-failure"},"Placement":{"Constraints":["node.role == manager"]},
  "Networks":[{"Target":"st_appnet","Aliases":["web"]}],"ForceUpdate":0},
 "Mode":{"Replicated":{"Replicas":2}},
 "UpdateConfig":{"Parallelism":1,"Delay":1000000000,"MaxFailureRatio":0,"Order":""},
 "EndpointSpec":{"Ports":[{"Protocol":"tcp","TargetPort":80,"PublishedPort":8081,"PublishMode":"ingress"}]}}
""")


def full_spec() -> specs_pb2.ServiceSpec:
    """Every field of Shoal's ServiceSpec that Docker's JSON has, set."""
    s = specs_pb2.ServiceSpec()
    s.annotations.name = "full"
    s.annotations.labels.update({"a": "1", "b": ""})
    c = s.task.container
    c.image = "busybox:latest"
    c.labels["cl"] = "x"
    c.command.extend(["sh", "-c"])
    c.args.extend(["echo hi; sleep 9"])
    c.hostname = "h-{{.Task.Slot}}"
    c.env.extend(["A=1", "B=two words"])
    c.dir = "/tmp"
    c.user = "nobody"
    c.groups.extend(["users"])
    c.tty = True
    c.open_stdin = True
    c.read_only = True
    c.mounts.add(type=types_pb2.Mount.TMPFS, target="/t", tmpfs_options=types_pb2.Mount.TmpfsOptions(
        size_bytes=1 << 20, mode=0o1777))
    c.mounts.add(type=types_pb2.Mount.VOLUME, source="vol", target="/v", readonly=True,
                 volume_options=types_pb2.Mount.VolumeOptions(nocopy=True, labels={"l": "v"},
                                                              driver_config=types_pb2.Driver(name="local")))
    c.mounts.add(type=types_pb2.Mount.BIND, source="/srv", target="/b",
                 bind_options=types_pb2.Mount.BindOptions(propagation="rslave"))
    c.stop_grace_period.FromSeconds(3)
    c.stop_signal = "SIGINT"
    c.secrets.add(secret_id="sid", secret_name="s1",
                  file=types_pb2.FileTarget(name="s1", uid="0", gid="0", mode=0o400))
    c.configs.add(config_id="cid", config_name="c1",
                  file=types_pb2.FileTarget(name="/etc/c1", uid="1", gid="2", mode=0o444))
    h = c.healthcheck
    h.test.extend(["CMD-SHELL", "true"])
    h.interval.FromMilliseconds(1500)
    h.timeout.FromSeconds(1)
    h.retries = 2
    h.start_period.FromSeconds(4)
    h.start_interval.FromMilliseconds(200)
    c.hosts.append("10.0.0.1 db")
    c.dns_config.nameservers.append("1.1.1.1")
    c.dns_config.search.append("example.org")
    c.dns_config.options.append("ndots:2")
    c.init = True
    c.sysctls["net.ipv4.ip_forward"] = "1"
    c.capability_add.append("CAP_NET_ADMIN")
    c.capability_drop.append("CAP_MKNOD")
    c.ulimits.add(name="nofile", soft=1024, hard=2048)
    r = s.task.resources
    r.limits.nano_cpus = 500_000_000
    r.limits.memory_bytes = 64 << 20
    r.pids_limit = 100
    r.reservations.memory_bytes = 16 << 20
    r.reservations.generic.add(kind="gpu", value=1)
    s.task.restart.condition = types_pb2.RestartPolicy.ON_FAILURE
    s.task.restart.delay.FromSeconds(2)
    s.task.restart.max_attempts = 3
    s.task.restart.window.FromSeconds(60)
    p = s.task.placement
    p.constraints.append("node.labels.zone==a")
    p.preferences.add(spread_descriptor="node.labels.zone")
    p.max_replicas = 2
    p.platforms.add(architecture="amd64", os="linux")
    s.task.networks.add(target="net1", aliases=["web"], driver_attachment_opts={"k": "v"})
    s.task.log_driver.name = "json-file"
    s.task.log_driver.options["max-size"] = "1m"
    s.task.force_update = 4
    s.replicated.replicas = 5
    s.update.parallelism = 2
    s.update.delay.FromSeconds(1)
    s.update.failure_action = types_pb2.UpdateConfig.ROLLBACK
    s.update.monitor.FromSeconds(7)
    s.update.max_failure_ratio = 0.1
    s.update.order = types_pb2.UpdateConfig.START_FIRST
    s.rollback.parallelism = 0
    s.rollback.failure_action = types_pb2.UpdateConfig.CONTINUE
    s.endpoint.mode = types_pb2.EndpointSpec.DNSRR
    s.endpoint.ports.add(name="http", protocol=types_pb2.PortConfig.UDP, target_port=53, published_port=5353,
                         publish_mode=types_pb2.PortConfig.HOST)
    return s


def wire(doc: object) -> object:
    """Through JSON text, as the CLI would send it back."""
    return json.loads(json.dumps(doc))


def test_the_cli_create_body_is_accepted_and_mapped() -> None:
    s = spec_from_json(copy.deepcopy(CLI_CREATE))
    assert s.annotations.name == "web" and s.replicated.replicas == 3
    c = s.task.container
    assert (c.image, list(c.args), list(c.command), list(c.env)) == ("bb:1", ["httpd", "-f", "-p", "80"], [], ["A=1"])
    assert c.HasField("init") and c.init is False and c.HasField("dns_config")
    assert s.task.resources.limits.memory_bytes == 64 << 20 and s.task.resources.HasField("reservations")
    assert s.task.restart.condition == types_pb2.RestartPolicy.ON_FAILURE and s.task.restart.delay.seconds == 5
    assert list(s.task.placement.constraints) == ["node.role==manager"]
    assert [n.target for n in s.task.networks] == ["cj6pdlxs5znnb5v6z4t84jhbz"]
    [port] = s.endpoint.ports
    assert (port.target_port, port.published_port, port.publish_mode) == (80, 8080, types_pb2.PortConfig.INGRESS)
    # what the server shows: the sent body plus Isolation and Runtime (§5.3), nothing else
    want = copy.deepcopy(CLI_CREATE)
    want["TaskTemplate"]["ContainerSpec"]["Isolation"] = "default"
    want["TaskTemplate"]["Runtime"] = "container"
    assert spec_json(s) == want
    # ... and what the CLI posts back from that is the same spec
    assert spec_from_json(wire(spec_json(s))) == s


def test_the_stack_deploy_body_is_accepted() -> None:
    s = spec_from_json(copy.deepcopy(STACK_DEPLOY))
    c = s.task.container
    assert c.labels["com.docker.stack.namespace"] == "st" and c.healthcheck.retries == 3
    assert c.healthcheck.interval.seconds == 5 and c.healthcheck.timeout.seconds == 2
    assert (c.secrets[0].secret_name, c.secrets[0].file.name, c.secrets[0].file.mode) == ("st_s2", "s2", 0o444)
    assert (c.configs[0].config_id, c.configs[0].file.name) == ("j1t11amv6hmnc0ue9p9wbo0sh", "/etc/cfg.txt")
    assert s.task.networks[0].target == "st_appnet" and list(s.task.networks[0].aliases) == ["web"]
    assert s.update.parallelism == 1 and s.update.delay.seconds == 1 and s.update.order == types_pb2.UpdateConfig.STOP_FIRST
    assert s.endpoint.mode == types_pb2.EndpointSpec.VIP and s.endpoint.ports[0].published_port == 8081
    assert s.task.HasField("resources") and not s.task.resources.HasField("limits")
    assert not s.task.restart.HasField("delay")
    assert spec_from_json(wire(spec_json(s))) == s


def test_round_trip_of_every_field_both_ways() -> None:
    s = full_spec()
    doc = spec_json(s)
    assert spec_from_json(wire(doc)) == s
    assert spec_json(spec_from_json(wire(doc))) == doc
    c = doc["TaskTemplate"]["ContainerSpec"]
    assert c["Mounts"][0] == {"Type": "tmpfs", "Target": "/t", "TmpfsOptions": {"SizeBytes": 1 << 20, "Mode": 0o1777}}
    assert c["Secrets"][0] == {"File": {"Name": "s1", "UID": "0", "GID": "0", "Mode": 0o400}, "SecretID": "sid",
                               "SecretName": "s1"}
    assert doc["TaskTemplate"]["Resources"] == {"Limits": {"NanoCPUs": 500_000_000, "MemoryBytes": 64 << 20, "Pids": 100},
                                                "Reservations": {"MemoryBytes": 16 << 20, "GenericResources": [
                                                    {"DiscreteResourceSpec": {"Kind": "gpu", "Value": 1}}]}}
    assert doc["TaskTemplate"]["Placement"] == {"Constraints": ["node.labels.zone==a"], "Preferences": [
        {"Spread": {"SpreadDescriptor": "node.labels.zone"}}], "MaxReplicas": 2,
        "Platforms": [{"Architecture": "amd64", "OS": "linux"}]}
    assert doc["UpdateConfig"] == {"Parallelism": 2, "Delay": 1_000_000_000, "FailureAction": "rollback",
                                   "Monitor": 7_000_000_000, "MaxFailureRatio": 0.1, "Order": "start-first"}
    assert doc["RollbackConfig"] == {"Parallelism": 0, "FailureAction": "continue", "MaxFailureRatio": 0,
                                     "Order": "stop-first"}
    assert doc["EndpointSpec"] == {"Mode": "dnsrr", "Ports": [{"Name": "http", "Protocol": "udp", "TargetPort": 53,
                                                               "PublishedPort": 5353, "PublishMode": "host"}]}
    g = specs_pb2.ServiceSpec()
    g.CopyFrom(s)
    getattr(g, "global").SetInParent()
    assert spec_json(g)["Mode"] == {"Global": {}} and spec_from_json(wire(spec_json(g))) == g


def test_round_trip_of_specs_swarmctl_builds() -> None:
    p = argparse.ArgumentParser()
    cli_spec.add_create_flags(p)
    for argv in (["--name", "a", "busybox", "sleep", "9"],
                 ["--name", "b", "--mode", "global", "--env", "X=1", "--limit-memory", "32m", "--restart-condition",
                  "none", "--update-parallelism", "2", "--update-order", "start-first", "--publish", "8080:80",
                  "--mount", "type=tmpfs,target=/t", "--health-cmd", "true", "--health-interval", "2s",
                  "--constraint", "node.role==manager", "--placement-pref", "spread=node.labels.z",
                  "--stop-grace-period", "1s", "busybox"]):
        s = cli_spec.create_spec(p.parse_args(argv))
        assert spec_from_json(wire(spec_json(s))) == s, argv


def test_missing_mode_or_replicas_is_one_replica() -> None:
    for mode in (None, {}, {"Replicated": {}}, {"Replicated": None}):
        doc = {"TaskTemplate": {"ContainerSpec": {"Image": "bb"}}}
        if mode is not None:
            doc["Mode"] = mode
        s = spec_from_json(doc)
        assert s.WhichOneof("mode") == "replicated" and s.replicated.replicas == 1 and s.annotations.name == ""
    assert spec_from_json({"TaskTemplate": {"ContainerSpec": {"Image": "bb"}},
                           "Mode": {"Replicated": {"Replicas": 0}}}).replicated.replicas == 0


def test_empty_docker_only_fields_are_accepted() -> None:
    doc = copy.deepcopy(CLI_CREATE)
    cs = doc["TaskTemplate"]["ContainerSpec"]
    cs.update({"Privileges": {"CredentialSpec": None, "SELinuxContext": None, "NoNewPrivileges": False},
               "Isolation": "default", "OomScoreAdj": 0, "Mounts": [{"Type": "bind", "Source": "/a", "Target": "/b",
                                                                    "Consistency": "", "BindOptions": {
                                                                        "NonRecursive": False}}]})
    doc["TaskTemplate"].update({"Runtime": "container", "PluginSpec": None, "NetworkAttachmentSpec": None})
    doc["Networks"] = []
    doc["Mode"]["ReplicatedJob"] = None
    s = spec_from_json(doc)
    assert s.task.container.mounts[0].HasField("bind_options")


@pytest.mark.parametrize(("edit", "sentence"), [
    (lambda d: d.update(Mode={"ReplicatedJob": {"MaxConcurrent": 1}}),
     "Spec.Mode.ReplicatedJob is not supported by Shoal"),
    (lambda d: d["TaskTemplate"]["ContainerSpec"].update(Privileges={"SELinuxContext": {"User": "u"}}),
     "Spec.TaskTemplate.ContainerSpec.Privileges.SELinuxContext is not supported by Shoal"),
    (lambda d: d["TaskTemplate"]["ContainerSpec"].update(Isolation="hyperv"),
     "Spec.TaskTemplate.ContainerSpec.Isolation 'hyperv' is not supported by Shoal: use default"),
    (lambda d: d["TaskTemplate"].update(Runtime="plugin"), "Spec.TaskTemplate.Runtime 'plugin' is not supported"),
    (lambda d: d["TaskTemplate"].update(PluginSpec={"Name": "p"}), "Spec.TaskTemplate.PluginSpec is not supported"),
    (lambda d: d.update(Networks=[{"Target": "n"}]), "Spec.Networks is not supported by Shoal"),
    (lambda d: d["TaskTemplate"]["ContainerSpec"].update(OomScoreAdj=5),
     "Spec.TaskTemplate.ContainerSpec.OomScoreAdj is not a field Shoal knows"),
    (lambda d: d["TaskTemplate"]["RestartPolicy"].update(Condition="sometimes"),
     "Spec.TaskTemplate.RestartPolicy.Condition 'sometimes' is invalid: use one of any, none, on-failure"),
    (lambda d: d["Mode"]["Replicated"].update(Replicas=-1),
     "Spec.Mode.Replicated.Replicas must be a non-negative integer, got -1"),
    (lambda d: d["TaskTemplate"]["ContainerSpec"].update(Env="A=1"),
     "Spec.TaskTemplate.ContainerSpec.Env must be a list of strings"),
    (lambda d: d["TaskTemplate"]["RestartPolicy"].update(Delay="5s"),
     "Spec.TaskTemplate.RestartPolicy.Delay must be a non-negative integer of nanoseconds"),
    (lambda d: d["EndpointSpec"]["Ports"][0].update(PublishMode="magic"),
     "Spec.EndpointSpec.Ports[0].PublishMode 'magic' is invalid: use one of host, ingress"),
    (lambda d: d["EndpointSpec"]["Ports"][0].update(TargetPort=70000),
     "Spec.EndpointSpec.Ports[0].TargetPort must be a port number of at most 65535"),
    (lambda d: d.update(Mode={"Replicated": {"Replicas": 1}, "Global": {}}), "Spec.Mode has both Replicated and Global"),
    (lambda d: d["TaskTemplate"]["Resources"]["Reservations"].update(
        GenericResources=[{"NamedResourceSpec": {"Kind": "gpu", "Value": "g0"}}]),
     "Spec.TaskTemplate.Resources.Reservations.GenericResources[0].NamedResourceSpec is not supported"),
    (lambda d: d.update(UpdateConfig={"MaxFailureRatio": 2}), "Spec.UpdateConfig.MaxFailureRatio must be between 0 and 1"),
    (lambda d: d.update(RollbackConfig={"FailureAction": "rollback"}),
     "Spec.RollbackConfig.FailureAction 'rollback' is invalid: use one of continue, pause"),
])
def test_what_shoal_has_not_is_a_400_naming_the_field(edit, sentence) -> None:  # type: ignore[no-untyped-def]
    doc = copy.deepcopy(CLI_CREATE)
    edit(doc)
    with pytest.raises(APIError) as e:
        spec_from_json(doc)
    assert e.value.status == 400 and sentence in e.value.message, e.value.message


def test_a_body_that_is_not_an_object_is_a_400() -> None:
    with pytest.raises(APIError, match="Spec must be a JSON object"):
        spec_from_json([1])
    with pytest.raises(APIError, match="Spec.TaskTemplate must be a JSON object"):
        spec_from_json({"TaskTemplate": "x"})


def test_insert_defaults_fills_what_shoal_does_when_unset() -> None:
    doc = fill_defaults(spec_json(spec_from_json(copy.deepcopy(STACK_DEPLOY))))
    assert doc["RollbackConfig"] == {"Parallelism": 1, "FailureAction": "pause", "Monitor": 5_000_000_000,
                                     "MaxFailureRatio": 0, "Order": "stop-first"}
    assert doc["UpdateConfig"] == {"Parallelism": 1, "Delay": 1_000_000_000, "FailureAction": "pause",
                                   "Monitor": 5_000_000_000, "MaxFailureRatio": 0, "Order": "stop-first"}
    assert doc["TaskTemplate"]["ContainerSpec"]["StopGracePeriod"] == 10_000_000_000
    assert doc["TaskTemplate"]["RestartPolicy"] == {"Condition": "on-failure", "Delay": 5_000_000_000, "MaxAttempts": 0}
    assert task_spec_json(spec_from_json(copy.deepcopy(CLI_CREATE)).task)["Runtime"] == "container"


def test_an_update_that_only_reorders_mounts_or_env_keeps_the_stored_order() -> None:
    from shoal.engineapi.services import keep_list_order

    cur = full_spec().task.container
    new = types_pb2.ContainerSpec()
    new.CopyFrom(cur)
    new.mounts.reverse()
    new.env.reverse()
    keep_list_order(new, cur)
    assert new == cur
    # a real change, or a duplicated variable (whose order decides its value), stays as sent
    new.env[:] = ["A=1", "A=2"]
    dup = types_pb2.ContainerSpec(env=["A=2", "A=1"])
    keep_list_order(new, dup)
    assert list(new.env) == ["A=1", "A=2"]
    del new.mounts[0]
    keep_list_order(new, cur)
    assert len(new.mounts) == len(cur.mounts) - 1
