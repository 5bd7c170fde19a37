"""The real `docker` CLI against swarmd's Engine API: `docker service create/ls/ps/inspect/update/
scale/rollback/rm` and `/tasks`, with swarmctl on the same store both ways, errors in Docker's words.
Needs root.

One manager on loopback for the module. Such a node has no overlay data path: tasks attached to an
overlay network (a user network, or the ingress network that an ingress-mode published port needs)
are rejected ("overlay networking is not available"), so those services are checked at the spec and
service level (what the API stores and shows), and services that must run use host-mode ports or none.
`docker service create --network/--secret/--config` resolve names through GET /networks, /secrets
and /configs (the `objects` module); here network, secret and config references are sent by name in
the ServiceSpec, as `docker stack deploy` sends them.
"""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Iterator
from typing import Any
from urllib.parse import quote

import pytest
from engine_helpers import EngineManager, http, running_manager

from shoal.lab.images import busybox_image
from shoal.lab.registry import Registry, free_port, push_image

pytestmark = pytest.mark.integration


def unpinned(image: str) -> str:
    """The image reference without the digest the docker CLI pins (GET /distribution)."""
    return image.split("@", 1)[0]


@pytest.fixture(scope="module")
def mgr(registry: Registry) -> Iterator[EngineManager]:
    """This module's manager (names and directories with the prefix `eas`), and a second tag
    `busybox:v2` of the test image for `service update --image`."""
    push_image(registry.url, "library/busybox", "v2", busybox_image())
    with running_manager(registry, "eas") as m:
        yield m


def api(mgr: EngineManager, method: str, path: str, body: Any = None) -> tuple[int, Any]:
    data = None if body is None else json.dumps(body).encode()
    st, _, raw = http(mgr.docker_sock, method, f"/v1.41{path}", data, {"Content-Type": "application/json"})
    return st, (json.loads(raw) if raw.strip() else None)


def filters(**kw: str | list[str]) -> str:
    doc = {k.replace("_", "-") if k != "_up_to_date" else "_up-to-date": {v: True for v in ([x] if isinstance(x, str)
                                                                                              else x)}
           for k, x in kw.items()}
    return "filters=" + quote(json.dumps(doc))


def spec_version(mgr: EngineManager, name: str) -> int:
    [svc] = json.loads(mgr.ok("service", "inspect", name, "--format", "json"))
    return int(svc["spec_version"])


def wait_until(what: str, check: Any, timeout: float = 60) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        got = check()
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


def table(out: str) -> list[list[str]]:
    return [row.split() for row in out.strip().splitlines()]


def test_create_converges_and_shows_in_ls_ps_inspect(mgr: EngineManager) -> None:
    out = mgr.dok("service", "create", "--name", "web", "--replicas", "3", "--stop-grace-period", "1s",
                  "--env", "A=1", "--label", "tier=front", "--update-parallelism", "3", "--update-monitor", "1s",
                  "--rollback-parallelism", "3", "--rollback-monitor", "1s", mgr.image, "sleep", "600")
    sid = out.splitlines()[0].strip()
    assert "overall progress: 3 out of 3 tasks" in out and f"verify: Service {sid} converged" in out, out
    rows = table(mgr.dok("service", "ls"))
    assert rows[0] == ["ID", "NAME", "MODE", "REPLICAS", "IMAGE", "PORTS"]
    assert [sid[:12], "web", "replicated", "3/3", mgr.image] in rows, rows
    ps = mgr.dok("service", "ps", "web").splitlines()
    assert ps[0].split()[:5] == ["ID", "NAME", "IMAGE", "NODE", "DESIRED"]
    assert sorted(r.split()[1] for r in ps[1:]) == ["web.1", "web.2", "web.3"]
    assert all(r.split()[3:6] == ["easm1", "Running", "Running"] and " ago" in r for r in ps[1:]), ps

    [svc] = mgr.djson("service", "inspect", "web")
    assert svc["ID"] == sid and "PreviousSpec" not in svc and "UpdateStatus" not in svc
    spec = svc["Spec"]
    assert spec["Name"] == "web" and spec["Labels"] == {"tier": "front"} and spec["Mode"] == {"Replicated": {"Replicas": 3}}
    cs = spec["TaskTemplate"]["ContainerSpec"]
    # the CLI pinned the digest /distribution gave it (the local registry's), as against Docker
    assert cs["Image"].startswith(f"{mgr.image}@sha256:") and len(cs["Image"]) == len(mgr.image) + 72
    assert (unpinned(cs["Image"]), cs["Args"], cs["Env"], cs["StopGracePeriod"]) == (
        mgr.image, ["sleep", "600"], ["A=1"], 1_000_000_000)
    # insertDefaults=true (inspect): what Shoal does for the unset restart policy, as Docker shows it
    assert spec["TaskTemplate"]["RestartPolicy"] == {"Condition": "any", "Delay": 5_000_000_000, "MaxAttempts": 0}
    assert spec["UpdateConfig"] == {"Parallelism": 3, "FailureAction": "pause", "Monitor": 1_000_000_000,
                                    "MaxFailureRatio": 0, "Order": "stop-first"}
    assert svc["Endpoint"] == {"Spec": {"Mode": "vip"}}
    st, raw = api(mgr, "GET", "/services/web?insertDefaults=false")
    assert st == 200 and "RestartPolicy" not in raw["Spec"]["TaskTemplate"]
    pretty = mgr.dok("service", "inspect", "--pretty", "web")
    for line in ("Name:\t\tweb", "Service Mode:\tReplicated", " Replicas:\t3", " Args:\t\tsleep 600",
                 " Env:\t\tA=1", "Endpoint Mode:\tvip"):
        assert line in pretty, pretty
    # status=true, as `service ls` asks
    st, listed = api(mgr, "GET", "/services?status=true&" + filters(name="we"))
    assert st == 200 and [s["ServiceStatus"] for s in listed] == [
        {"RunningTasks": 3, "DesiredTasks": 3, "CompletedTasks": 0}]

    for f in (filters(id=sid[:6]), filters(label="tier=front"), filters(label="tier"), filters(mode="replicated")):
        st, listed = api(mgr, "GET", "/services?" + f)
        assert [s["ID"] for s in listed] == [sid], f
        assert "ServiceStatus" not in listed[0]
    for f in (filters(id="zzz"), filters(label="tier=back"), filters(mode="global"), filters(name="x")):
        assert api(mgr, "GET", "/services?" + f) == (200, []), f
    st, err = api(mgr, "GET", "/services?" + filters(mode="replicated-job"))
    assert st == 400 and "mode is replicated or global" in err["message"]

    # swarmctl reads what docker wrote
    [ctl] = json.loads(mgr.ok("service", "inspect", "web", "--format", "json"))
    assert ctl["id"] == sid and ctl["spec"]["task"]["container"]["env"] == ["A=1"]


def test_update_image_and_env_rollback_scale(mgr: EngineManager) -> None:
    before = spec_version(mgr, "web")
    # GET and POST back unchanged (`service update` with no flag): Shoal sees no change
    assert mgr.dok("service", "update", "--detach", "web").strip() == "web"
    assert spec_version(mgr, "web") == before
    v2 = mgr.image.replace(":latest", ":v2")
    out = mgr.dok("service", "update", "--env-add", "B=2", "--image", v2, "web")
    assert "verify: Service web converged" in out, out
    [svc] = mgr.djson("service", "inspect", "web")
    env = svc["Spec"]["TaskTemplate"]["ContainerSpec"]["Env"]
    assert sorted(env) == ["A=1", "B=2"]  # the CLI rebuilds the list from a map: either order
    assert unpinned(svc["Spec"]["TaskTemplate"]["ContainerSpec"]["Image"]) == v2
    assert svc["PreviousSpec"]["TaskTemplate"]["ContainerSpec"]["Env"] == ["A=1"]
    assert svc["UpdateStatus"]["State"] == "completed" and svc["UpdateStatus"]["Message"]
    assert spec_version(mgr, "web") == before + 1
    for _ in range(3):  # the CLI posts the environment back in any order: no change, each time
        mgr.dok("service", "update", "--detach", "web")
    assert spec_version(mgr, "web") == before + 1
    assert mgr.djson("service", "inspect", "web")[0]["Spec"]["TaskTemplate"]["ContainerSpec"]["Env"] == env
    running = [r for r in table(mgr.dok("service", "ps", "web")) if r[5:6] == ["Running"] and r[4] == "Running"]
    assert len(running) == 3 and all(r[2] == v2 for r in running), running

    out = mgr.dok("service", "rollback", "web")
    assert "rollback: manually requested rollback" in out and "verify: Service web converged" in out, out
    [svc] = mgr.djson("service", "inspect", "web")
    assert svc["Spec"]["TaskTemplate"]["ContainerSpec"]["Env"] == ["A=1"]
    assert svc["PreviousSpec"]["TaskTemplate"]["ContainerSpec"]["Env"] == env
    assert svc["UpdateStatus"]["State"] == "rollback_completed"
    assert json.loads(mgr.ok("service", "inspect", "web", "--format", "json"))[0]["spec"]["task"]["container"][
        "env"] == ["A=1"]

    out = mgr.dok("service", "scale", "web=5")
    assert "web scaled to 5" in out and "verify: Service web converged" in out, out
    assert [r[3] for r in table(mgr.dok("service", "ls")) if r[1:2] == ["web"]] == ["5/5"]

    # the up-to-date tasks, as the progress loop asks: those made from the current task template (the
    # rolled-back-to tasks of before the update too), none of the v2 update's
    st, tasks = api(mgr, "GET", "/tasks?" + filters(service="web", _up_to_date="true"))
    assert st == 200 and all(unpinned(t["Spec"]["ContainerSpec"]["Image"]) == mgr.image for t in tasks)
    live = [t for t in tasks if t["DesiredState"] == "running"]
    assert sorted(t["Slot"] for t in live) == [1, 2, 3, 4, 5] and all(t["Status"]["State"] == "running" for t in live)
    st, every = api(mgr, "GET", "/tasks?" + filters(service="web"))
    assert any(unpinned(t["Spec"]["ContainerSpec"]["Image"]) == v2 for t in every)  # the history has them


def test_tasks_list_filters_and_inspect(mgr: EngineManager) -> None:
    node_id = mgr.info().node_id
    st, tasks = api(mgr, "GET", "/tasks?" + filters(service="web", desired_state="running"))
    assert st == 200 and len(tasks) == 5
    t = tasks[0]
    assert t["NodeID"] == node_id and t["DesiredState"] == "running" and t["Labels"] == {}
    assert t["Status"]["State"] == "running" and t["Status"]["ContainerStatus"]["ContainerID"]
    assert t["Status"]["PortStatus"] == {} and t["Spec"]["ContainerSpec"]["Env"] == ["A=1"]
    assert {"ID", "Version", "CreatedAt", "UpdatedAt", "ServiceID", "Slot"} <= set(t)
    st, one = api(mgr, "GET", f"/tasks/{t['ID']}")
    assert st == 200 and one["ID"] == t["ID"] and one["Slot"] == t["Slot"]
    st, one = api(mgr, "GET", f"/tasks/{t['ID'][:10]}")
    assert st == 200 and one["ID"] == t["ID"]
    # the label filter matches the service's labels
    st, by_label = api(mgr, "GET", "/tasks?" + filters(label="tier=front", desired_state="running"))
    assert {x["ID"] for x in by_label} == {x["ID"] for x in tasks}
    st, by_node = api(mgr, "GET", "/tasks?" + filters(node=node_id, service=t["ServiceID"], desired_state="running"))
    assert len(by_node) == 5
    st, by_id = api(mgr, "GET", "/tasks?" + filters(id=t["ID"][:12]))
    assert [x["ID"] for x in by_id] == [t["ID"]]
    st, by_name = api(mgr, "GET", "/tasks?" + filters(name=f"web.{t['Slot']}", desired_state="running"))
    assert [x["ID"] for x in by_name] == [t["ID"]]
    st, none = api(mgr, "GET", "/tasks?" + filters(label="tier=back"))
    assert (st, none) == (200, [])
    st, err = api(mgr, "GET", "/tasks?" + filters(desired_state="dreaming"))
    assert st == 400 and "desired-state=dreaming" in err["message"]
    st, err = api(mgr, "GET", "/tasks/nosuch")
    assert (st, err) == (404, {"message": "task nosuch not found"})
    # a task no node fits stays pending: no NodeID, no ContainerStatus
    mgr.dok("service", "create", "--detach", "--name", "nowhere", "--constraint", "node.labels.eas==none",
            mgr.image, "sleep", "600")
    [pending] = wait_until("nowhere's task", lambda: api(mgr, "GET", "/tasks?" + filters(service="nowhere"))[1])
    assert pending["Status"]["State"] == "pending" and pending["DesiredState"] == "running", pending["Status"]
    assert "NodeID" not in pending and "ContainerStatus" not in pending["Status"] and pending["Slot"] == 1
    assert [r[3:5] for r in table(mgr.dok("service", "ls")) if r[1:2] == ["nowhere"]] == [["0/1", mgr.image]]
    assert mgr.dok("service", "rm", "nowhere").strip() == "nowhere"
    # node ps reads the same tasks
    ps = table(mgr.dok("node", "ps", "self", "--filter", "desired-state=running"))
    assert sum(1 for r in ps if r[1].startswith("web.")) == 5


def test_global_mode_and_a_host_mode_port(mgr: EngineManager) -> None:
    port = free_port()
    out = mgr.dok("service", "create", "--name", "g", "--mode", "global", "--stop-grace-period", "1s",
                  "--update-monitor", "1s", "--publish", f"mode=host,published={port},target=80", mgr.image,
                  "httpd", "-f", "-p", "80")
    assert "verify: Service" in out and "converged" in out, out
    assert [r[2:4] for r in table(mgr.dok("service", "ls")) if r[1:2] == ["g"]] == [["global", "1/1"]]
    node_id = mgr.info().node_id
    ps = mgr.dok("service", "ps", "g", "--format", "{{.Name}} {{.CurrentState}} {{.Ports}}").split()
    assert ps[0] == f"g.{node_id}" and ps[1] == "Running" and ps[-1] == f"*:{port}->80/tcp", ps
    st, [task] = api(mgr, "GET", "/tasks?" + filters(service="g"))
    assert "Slot" not in task and task["NodeID"] == node_id
    assert task["Status"]["PortStatus"] == {"Ports": [{"Protocol": "tcp", "TargetPort": 80, "PublishedPort": port,
                                                       "PublishMode": "host"}]}
    st, [svc] = api(mgr, "GET", "/services?status=true&" + filters(mode="global"))
    assert svc["Spec"]["Mode"] == {"Global": {}} and svc["ServiceStatus"]["DesiredTasks"] == 1
    assert mgr.dok("service", "rm", "g").strip() == "g"


def test_spec_flags_are_stored_shown_and_round_trip(mgr: EngineManager) -> None:
    # An ingress port needs the overlay data path this loopback node has not: the tasks are rejected,
    # the service and its endpoint are what is checked.
    sid = mgr.dok("service", "create", "--detach", "--name", "big", "--replicas", "1", "--stop-grace-period", "1s",
                  "-p", "8080:80", "--env", "A=1", "--constraint", "node.role==manager", "--placement-pref",
                  "spread=node.labels.zone", "--limit-memory", "64m", "--reserve-memory", "16m",
                  "--restart-condition", "on-failure", "--update-parallelism", "2", "--update-order", "start-first",
                  "--health-cmd", "true", "--health-interval", "1s", "--mount", "type=tmpfs,target=/t",
                  "--mount", "type=volume,source=easvol,target=/v", "--mount", f"type=bind,source={mgr.base},target=/b",
                  mgr.image, "httpd", "-f", "-p", "80").strip()
    row = next(r for r in mgr.dok("service", "ls").splitlines() if r.startswith(sid[:12]))
    assert row.split()[1] == "big" and row.rstrip().endswith("*:8080->80/tcp"), row
    st, svc = api(mgr, "GET", "/services/big?insertDefaults=false")
    t = svc["Spec"]["TaskTemplate"]
    assert t["Resources"] == {"Limits": {"MemoryBytes": 64 << 20}, "Reservations": {"MemoryBytes": 16 << 20}}
    assert t["RestartPolicy"] == {"Condition": "on-failure", "Delay": 5_000_000_000, "MaxAttempts": 0}
    assert t["Placement"] == {"Constraints": ["node.role==manager"],
                              "Preferences": [{"Spread": {"SpreadDescriptor": "node.labels.zone"}}],
                              # what /distribution said the image runs on: the CLI adds it, as with Docker
                              "Platforms": [{"Architecture": "amd64", "OS": "linux"}]}
    assert t["ContainerSpec"]["Healthcheck"] == {"Test": ["CMD-SHELL", "true"], "Interval": 1_000_000_000}
    assert t["ContainerSpec"]["Mounts"] == [{"Type": "tmpfs", "Target": "/t"},
                                            {"Type": "volume", "Source": "easvol", "Target": "/v"},
                                            {"Type": "bind", "Source": str(mgr.base), "Target": "/b"}]
    assert svc["Spec"]["UpdateConfig"]["Parallelism"] == 2 and svc["Spec"]["UpdateConfig"]["Order"] == "start-first"
    assert svc["Endpoint"]["Ports"] == [{"Protocol": "tcp", "TargetPort": 80, "PublishedPort": 8080,
                                         "PublishMode": "ingress"}]
    assert svc["Endpoint"]["VirtualIPs"] and svc["Endpoint"]["VirtualIPs"][0]["Addr"].endswith("/24")
    ctl = json.loads(mgr.ok("service", "inspect", "big", "--format", "json"))[0]["spec"]
    assert ctl["task"]["resources"]["limits"]["memory_bytes"] == str(64 << 20)
    assert ctl["task"]["placement"]["preferences"] == [{"spread_descriptor": "node.labels.zone"}]
    # every one of these comes back unchanged through the CLI's GET-and-POST
    before = spec_version(mgr, "big")
    mgr.dok("service", "update", "--detach", "big")
    assert spec_version(mgr, "big") == before
    assert mgr.dok("service", "rm", "big").strip() == "big"


def test_networks_secrets_and_configs_by_name_in_the_spec(mgr: EngineManager) -> None:
    net_id = mgr.ok("network", "create", "easnet").strip()
    mgr.ok("secret", "create", "eas_s", "-", input="pw")
    mgr.ok("config", "create", "eas_c", "-", input="cfg")
    try:
        spec = {"Name": "refs", "TaskTemplate": {
            "ContainerSpec": {"Image": mgr.image, "Args": ["sleep", "600"], "StopGracePeriod": 1_000_000_000,
                              "Secrets": [{"SecretName": "eas_s", "File": {"Name": "s", "UID": "0", "GID": "0",
                                                                           "Mode": 0o400}}],
                              "Configs": [{"ConfigName": "eas_c", "File": {"Name": "/etc/c.txt", "UID": "0",
                                                                           "GID": "0", "Mode": 0o444}}]}},
            "Mode": {"Replicated": {}}}
        st, created = api(mgr, "POST", "/services/create", spec)
        assert st == 201 and set(created) == {"ID"}
        wait_until("refs running", lambda: "1/1" in mgr.dok("service", "ls", "--filter", "name=refs"))
        [svc] = mgr.djson("service", "inspect", "refs")
        cs = svc["Spec"]["TaskTemplate"]["ContainerSpec"]
        assert cs["Secrets"][0]["SecretID"] and cs["Secrets"][0]["SecretName"] == "eas_s"
        assert cs["Configs"][0]["ConfigName"] == "eas_c" and cs["Configs"][0]["File"]["Name"] == "/etc/c.txt"
        assert svc["Spec"]["Mode"] == {"Replicated": {"Replicas": 1}}
        assert mgr.dok("service", "rm", "refs").strip() == "refs"

        # a network by name (as stack deploy sends it) is stored by id; no data path here (see above)
        spec = {"Name": "netted", "TaskTemplate": {"ContainerSpec": {"Image": mgr.image, "Args": ["sleep", "600"]},
                                                   "Networks": [{"Target": "easnet", "Aliases": ["n"]}]},
                "Mode": {"Replicated": {"Replicas": 1}}, "EndpointSpec": {}}
        st, created = api(mgr, "POST", "/services/create", spec)
        assert st == 201, created
        svc = wait_until("netted's VIP allocated",
                         lambda: (lambda d: d if d[1]["Endpoint"].get("VirtualIPs") else None)(
                             api(mgr, "GET", "/services/netted?insertDefaults=false")))[1]
        assert svc["Spec"]["TaskTemplate"]["Networks"] == [{"Target": net_id, "Aliases": ["n"]}]
        assert {v["NetworkID"] for v in svc["Endpoint"]["VirtualIPs"]} == {net_id}
        task = wait_until("netted's task attached", lambda: next(
            (t for t in api(mgr, "GET", "/tasks?" + filters(service="netted"))[1] if t.get("NetworksAttachments")),
            None))
        [att] = task["NetworksAttachments"]
        assert att["Network"]["ID"] == net_id and att["Network"]["Spec"]["Name"] == "easnet"
        assert att["Network"]["Spec"]["Scope"] == "swarm" and att["Network"]["DriverState"]["Name"] == "overlay"
        assert att["Network"]["IPAMOptions"]["Configs"][0]["Subnet"] and att["Addresses"][0].count("/") == 1
        before = spec_version(mgr, "netted")
        mgr.dok("service", "update", "--detach", "netted")
        assert spec_version(mgr, "netted") == before
        assert mgr.dok("service", "rm", "netted").strip() == "netted"
    finally:
        for kind, name in (("service", "refs"), ("service", "netted"), ("secret", "eas_s"), ("config", "eas_c")):
            mgr.ctl(kind, "rm", name)
        wait_until("easnet removed", lambda: mgr.ctl("network", "rm", "easnet").returncode == 0)


def test_swarmctl_and_docker_edit_each_others_services(mgr: EngineManager) -> None:
    mgr.ok("service", "create", "-d", "--name", "ctlsvc", "--replicas", "1", "--stop-grace-period", "1s",
           "--update-monitor", "1s", "--env", "X=1", "--label", "from=swarmctl", mgr.image, "sleep", "600")
    wait_until("ctlsvc running", lambda: "1/1" in mgr.dok("service", "ls", "--filter", "name=ctlsvc"))
    [svc] = mgr.djson("service", "inspect", "ctlsvc")
    assert svc["Spec"]["Labels"] == {"from": "swarmctl"}
    assert svc["Spec"]["TaskTemplate"]["ContainerSpec"]["Env"] == ["X=1"]
    before = spec_version(mgr, "ctlsvc")
    mgr.dok("service", "update", "--detach", "ctlsvc")  # a swarmctl spec through Docker's JSON: no change
    assert spec_version(mgr, "ctlsvc") == before
    mgr.dok("service", "update", "--detach", "--env-add", "Y=2", "ctlsvc")
    [ctl] = json.loads(mgr.ok("service", "inspect", "ctlsvc", "--format", "json"))
    assert sorted(ctl["spec"]["task"]["container"]["env"]) == ["X=1", "Y=2"] and int(ctl["spec_version"]) == before + 1
    mgr.ok("service", "update", "-d", "--label-add", "by=swarmctl", "ctlsvc")
    [svc] = mgr.djson("service", "inspect", "ctlsvc")
    assert svc["Spec"]["Labels"] == {"by": "swarmctl", "from": "swarmctl"}
    assert mgr.dok("service", "rm", "ctlsvc").strip() == "ctlsvc"
    assert "ctlsvc" not in mgr.ok("service", "ls")


def test_errors_in_dockers_words_and_nothing_half_applied(mgr: EngineManager) -> None:
    mgr.dfail("service", "rm", "nosuch", match="Error response from daemon: service nosuch not found")
    mgr.dfail("service", "inspect", "nosuch", match="no such service: nosuch")
    st, body = api(mgr, "GET", "/services/nosuch")
    assert (st, body) == (404, {"message": "service nosuch not found"})
    [svc] = mgr.djson("service", "inspect", "web")
    version = svc["Version"]["Index"]
    st, body = api(mgr, "POST", f"/services/{svc['ID']}/update?version={version - 1}", svc["Spec"])
    assert (st, body) == (500, {"message": "rpc error: code = Unknown desc = update out of sequence"})
    st, plain = api(mgr, "GET", "/services/web?insertDefaults=false")  # what the CLI posts back
    st, body = api(mgr, "POST", f"/services/{svc['ID']}/update?version={version}", plain["Spec"])
    assert (st, body) == (200, {"Warnings": None})
    [svc] = mgr.djson("service", "inspect", "web")
    assert svc["Version"]["Index"] == version  # the same spec: no change, not even a new version
    spec = dict(svc["Spec"], Name="renamed")
    st, body = api(mgr, "POST", f"/services/{svc['ID']}/update?version={version}", spec)
    assert st == 400 and "renaming services is not supported" in body["message"]
    spec = dict(svc["Spec"], Mode={"ReplicatedJob": {"MaxConcurrent": 1}})
    st, body = api(mgr, "POST", f"/services/{svc['ID']}/update?version={version}", spec)
    assert st == 400 and body["message"].startswith("Spec.Mode.ReplicatedJob is not supported by Shoal")
    before = mgr.dok("service", "ls", "-q")
    mgr.dfail("service", "create", "--detach", "--name", "bad", "--constraint", "node.colour==x", mgr.image,
              match="Error response from daemon: placement constraint 'node.colour==x' has an unknown key")
    st, body = api(mgr, "POST", "/services/create", {"Name": "bad", "TaskTemplate": {
        "ContainerSpec": {"Image": mgr.image, "Privileges": {"SELinuxContext": {"Disable": True}}}}})
    assert st == 400 and "Spec.TaskTemplate.ContainerSpec.Privileges.SELinuxContext is not supported" in body["message"]
    st, body = api(mgr, "POST", "/services/create", {"Name": "bad", "TaskTemplate": {"ContainerSpec": {}}})
    assert st == 400 and "image is empty" in body["message"]
    assert mgr.dok("service", "ls", "-q") == before
    [after] = mgr.djson("service", "inspect", "web")
    assert after["Version"] == svc["Version"]  # nothing half-applied


def test_registry_credentials_from_the_header_are_kept_on_update(mgr: EngineManager) -> None:
    auth = base64.urlsafe_b64encode(json.dumps({"username": "u", "password": "p"}).encode()).decode()
    st, _, raw = http(mgr.docker_sock, "POST", "/v1.41/services/create", json.dumps(
        {"Name": "authd", "TaskTemplate": {"ContainerSpec": {"Image": mgr.image}},
         "Mode": {"Replicated": {"Replicas": 0}}}).encode(), {"X-Registry-Auth": auth})
    assert st == 201, raw
    [ctl] = json.loads(mgr.ok("service", "inspect", "authd", "--format", "json"))
    assert ctl["spec"]["task"]["container"]["pull_options"] == {"registry_auth": auth}
    st, svc = api(mgr, "GET", "/services/authd")
    assert auth not in json.dumps(svc)  # never shown, as Docker does not
    before = spec_version(mgr, "authd")
    mgr.dok("service", "update", "--detach", "authd")  # registryAuthFrom=spec: the stored ones stay
    [ctl] = json.loads(mgr.ok("service", "inspect", "authd", "--format", "json"))
    assert int(ctl["spec_version"]) == before and ctl["spec"]["task"]["container"]["pull_options"] == {
        "registry_auth": auth}
    st, _, raw = http(mgr.docker_sock, "POST", "/v1.41/services/create", b'{"Name":"x"}', {"X-Registry-Auth": "%%%"})
    assert st == 400 and "X-Registry-Auth is not base64 of a JSON object" in json.loads(raw)["message"]
    assert mgr.dok("service", "rm", "authd").strip() == "authd"


def test_create_without_name_and_remove(mgr: EngineManager) -> None:
    st, created = api(mgr, "POST", "/services/create", {"TaskTemplate": {"ContainerSpec": {
        "Image": mgr.image, "Args": ["sleep", "600"], "StopGracePeriod": 1_000_000_000}}, "Mode": {"Replicated": {
            "Replicas": 0}}})
    assert st == 201
    st, svc = api(mgr, "GET", f"/services/{created['ID']}")
    assert svc["Spec"]["Name"] and svc["Spec"]["Mode"] == {"Replicated": {"Replicas": 0}}
    st, body = api(mgr, "DELETE", f"/services/{created['ID'][:8]}")
    assert (st, body) == (200, None)
    assert mgr.dok("service", "rm", "web").strip() == "web"
    assert mgr.dok("service", "ls", "-q").strip() == ""


def test_cli_secret_config_and_network_flags(mgr: EngineManager) -> None:
    """`docker service create --secret --config --network`: the CLI resolves the names through the Engine
    API (GET /secrets, /configs, /networks) and sends ids; Shoal stores and shows them."""
    sid = mgr.dok("secret", "create", "easflag-s", "-", input="pw").strip()
    cid = mgr.dok("config", "create", "easflag-c", "-", input="cfg").strip()
    nid = mgr.dok("network", "create", "-d", "overlay", "easflag-n").strip()
    try:
        svc = mgr.dok("service", "create", "--detach", "--name", "flags", "--secret", "easflag-s",
                      "--config", "source=easflag-c,target=/etc/c.txt", "--network", "easflag-n",
                      mgr.image, "sleep", "600").strip()
        [s] = mgr.djson("service", "inspect", svc)
        cs = s["Spec"]["TaskTemplate"]["ContainerSpec"]
        assert [(x["SecretID"], x["SecretName"], x["File"]["Name"]) for x in cs["Secrets"]] == [(sid, "easflag-s", "easflag-s")]
        assert [(x["ConfigID"], x["ConfigName"], x["File"]["Name"]) for x in cs["Configs"]] == [(cid, "easflag-c", "/etc/c.txt")]
        assert [n["Target"] for n in s["Spec"]["TaskTemplate"]["Networks"]] == [nid]
        shown = mgr.ok("service", "inspect", "flags")
        assert sid in shown and cid in shown and nid in shown  # swarmctl sees the same references
    finally:
        mgr.docker("service", "rm", "flags")
        for kind, name in (("secret", "easflag-s"), ("config", "easflag-c"), ("network", "easflag-n")):
            deadline = time.monotonic() + 30
            while mgr.docker(kind, "rm", name).returncode != 0 and time.monotonic() < deadline:
                time.sleep(0.5)  # in use until the service's tasks are gone
