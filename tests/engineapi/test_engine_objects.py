"""The real `docker` CLI against swarmd's Engine API: networks, secrets and configs (create, ls, inspect,
update, rm), both ways with swarmctl, errors in Docker's words, and /distribution against the local
registry and an unreachable one. Needs root."""

from __future__ import annotations

import base64
import json
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from engine_helpers import EngineManager, http, running_manager

from shoal.lab.registry import Registry

pytestmark = pytest.mark.integration
JSON = {"Content-Type": "application/json"}


@pytest.fixture(scope="module")
def mgr(registry: Registry) -> Iterator[EngineManager]:
    with running_manager(registry, "eao") as m:
        yield m


def post(mgr: EngineManager, path: str, doc: object) -> tuple[int, dict]:
    st, _, body = http(mgr.docker_sock, "POST", f"/v1.41{path}", json.dumps(doc).encode(), JSON)
    return st, (json.loads(body) if body else {})


def swarmctl_json(mgr: EngineManager, *args: str) -> dict:
    doc = json.loads(mgr.ok(*args, "--format", "json"))
    return doc[0] if isinstance(doc, list) else doc


def test_network_create_ls_inspect_rm_both_ways(mgr: EngineManager) -> None:
    net_id = mgr.dok("network", "create", "-d", "overlay", "--attachable", "--internal", "--subnet", "10.250.50.0/24",
                     "--gateway", "10.250.50.1", "--label", "a=b", "--opt", "encrypted", "eaonet1").strip()
    assert len(net_id) == 25 and net_id.isalnum(), net_id
    lines = mgr.dok("network", "ls").splitlines()
    assert lines[0].split() == ["NETWORK", "ID", "NAME", "DRIVER", "SCOPE"], lines
    assert [net_id[:12], "eaonet1", "overlay", "swarm"] in [ln.split() for ln in lines[1:]], lines
    assert mgr.dok("network", "ls", "--filter", "label=a=b", "--format", "{{.Name}}").split() == ["eaonet1"]
    assert mgr.dok("network", "ls", "--filter", "label=a=c", "-q").split() == []
    assert mgr.dok("network", "ls", "--filter", "driver=overlay", "--filter", "name=eaonet", "-q").split() == [net_id[:12]]
    [net] = mgr.djson("network", "inspect", "eaonet1")
    assert (net["Id"], net["Name"], net["Driver"], net["Scope"]) == (net_id, "eaonet1", "overlay", "swarm")
    assert (net["Attachable"], net["Internal"], net["Ingress"], net["EnableIPv6"]) == (True, True, False, False)
    assert net["IPAM"]["Config"] == [{"Subnet": "10.250.50.0/24", "Gateway": "10.250.50.1"}]
    assert net["Labels"] == {"a": "b"} and net["Options"]["encrypted"] == ""
    assert int(net["Options"]["com.docker.network.driver.overlay.vxlanid_list"]) > 0
    assert mgr.djson("network", "inspect", net_id[:8])[0]["Id"] == net_id  # an id prefix
    # docker made it, swarmctl sees it
    shown = swarmctl_json(mgr, "network", "inspect", "eaonet1")
    assert shown["id"] == net_id and shown["spec"]["attachable"] and shown["spec"]["internal"]
    assert shown["spec"]["driver_config"]["options"] == {"encrypted": ""}

    # swarmctl made it, docker sees and removes it
    mgr.ok("network", "create", "--label", "by=swarmctl", "eaonet2")
    [net2] = mgr.djson("network", "inspect", "eaonet2")
    assert net2["Labels"] == {"by": "swarmctl"} and net2["Attachable"] is False and net2["IPAM"]["Config"][0]["Subnet"]
    assert mgr.dok("network", "rm", "eaonet2").strip() == "eaonet2"
    assert "eaonet2" not in mgr.ok("network", "ls")
    mgr.dfail("network", "inspect", "eaonet2", match="network eaonet2 not found")

    # errors
    mgr.dfail("network", "rm", "nosuchnet", match="Error response from daemon: network nosuchnet not found")
    mgr.dfail("network", "create", "-d", "bridge", "eaobr", match="Error response from daemon: Driver 'bridge' is not "
              "supported by Shoal")
    mgr.dfail("network", "create", "eaonet1", match="use -d overlay")  # the CLI's default driver is bridge
    mgr.dfail("network", "create", "-d", "overlay", "eaonet1", match="Error response from daemon: network with name eaonet1 already exists")
    st, body = post(mgr, "/networks/create", {"Name": "eaobad", "Driver": "overlay",
                                              "IPAM": {"Config": [{"Subnet": "10.250.300.0/24"}]}})
    assert st == 400 and "IPAM.Config[0].Subnet" in body["message"], body
    st, body = post(mgr, "/networks/create", {"Name": "eaobad", "Driver": "overlay", "ConfigOnly": True})
    assert st == 400 and "ConfigOnly" in body["message"], body
    st, body = post(mgr, "/networks/create", {"Driver": "overlay"})
    assert st == 400 and body["message"].startswith("Name is required"), body
    assert "eaobad" not in mgr.ok("network", "ls")  # nothing half-made

    # in use by a service (made by swarmctl): Docker's FailedPrecondition sentence
    mgr.ok("service", "create", "--name", "eaouse", "--replicas", "0", "--network", "eaonet1", mgr.image)
    mgr.dfail("network", "rm", "eaonet1", match="Error response from daemon: rpc error: code = "
                    "FailedPrecondition desc = network eaonet1 is in use by service 'eaouse'")
    mgr.ok("service", "rm", "eaouse")
    assert mgr.dok("network", "rm", net_id[:10]).strip() == net_id[:10]
    assert mgr.dok("network", "ls", "--format", "{{.Name}} {{.Driver}} {{.Scope}}").splitlines() == [
        "ingress overlay swarm"]  # the cluster's own


def test_secrets_create_ls_inspect_update_rm(mgr: EngineManager, tmp_path: Path) -> None:
    sid = mgr.dok("secret", "create", "eaos1", "-", input="s3cr3t").strip()
    assert len(sid) == 25, sid
    f = tmp_path / "pw.txt"
    f.write_text("from a file\n")
    sid2 = mgr.dok("secret", "create", "--label", "env=prod", "eaos2", str(f)).strip()
    lines = mgr.dok("secret", "ls").splitlines()
    assert lines[0].split() == ["ID", "NAME", "DRIVER", "CREATED", "UPDATED"], lines
    rows = {ln.split()[1]: ln.split()[0] for ln in lines[1:]}
    assert rows == {"eaos1": sid, "eaos2": sid2}, lines
    assert mgr.dok("secret", "ls", "--filter", "label=env=prod", "--format", "{{.Name}}").split() == ["eaos2"]
    assert mgr.dok("secret", "ls", "--filter", "name=eaos1", "-q").split() == [sid]
    assert mgr.dok("secret", "ls", "--filter", "name=eaos", "-q").split() == [sid, sid2]  # a prefix, as dockerd
    st, _, body = http(mgr.docker_sock, "GET", "/v1.41/secrets?filters=" + urllib.parse.quote('{"names":{"eaos":true}}'))
    assert (st, json.loads(body)) == (200, [])  # names: exact
    [sec] = mgr.djson("secret", "inspect", "eaos2")
    assert sec["ID"] == sid2 and sec["Spec"] == {"Name": "eaos2", "Labels": {"env": "prod"}}  # no Data, ever
    assert set(sec) == {"ID", "Version", "CreatedAt", "UpdatedAt", "Spec"}
    st, _, body = http(mgr.docker_sock, "GET", "/v1.41/secrets")
    assert st == 200 and b"Data" not in body and b"czNjcjN0" not in body
    # swarmctl sees docker's, docker sees swarmctl's
    assert swarmctl_json(mgr, "secret", "inspect", "eaos2")["spec"]["annotations"]["labels"] == {"env": "prod"}
    mgr.ok("secret", "create", "-l", "by=swarmctl", "eaos3", "-", input="x")
    [s3] = mgr.djson("secret", "inspect", "eaos3")
    assert s3["Spec"] == {"Name": "eaos3", "Labels": {"by": "swarmctl"}}

    # update as `docker stack deploy` does on a redeploy: the same body (Data included) writes nothing
    version = sec["Version"]["Index"]
    same = {"Name": "eaos2", "Labels": {"env": "prod"}, "Data": base64.b64encode(b"from a file\n").decode()}
    st, _ = post(mgr, f"/secrets/{sid2}/update?version={version}", same)
    assert st == 200
    assert mgr.djson("secret", "inspect", sid2)[0]["Version"]["Index"] == version
    st, _ = post(mgr, f"/secrets/{sid2}/update?version={version}", {**same, "Labels": {"env": "test"}})
    assert st == 200
    assert swarmctl_json(mgr, "secret", "inspect", sid2)["spec"]["annotations"]["labels"] == {"env": "test"}
    st, body = post(mgr, f"/secrets/{sid2}/update?version={version}", same)  # stale
    assert (st, body["message"]) == (500, "rpc error: code = Unknown desc = update out of sequence")
    [cur] = mgr.djson("secret", "inspect", sid2)
    st, body = post(mgr, f"/secrets/{sid2}/update?version={cur['Version']['Index']}",
                    {**same, "Data": base64.b64encode(b"changed").decode()})
    assert st == 400 and body["message"].startswith("rpc error: code = InvalidArgument desc = only updates to "
                                                    "Labels are allowed"), body
    assert mgr.djson("secret", "inspect", sid2)[0]["Version"] == cur["Version"]  # nothing half-applied

    # errors
    mgr.dfail("secret", "inspect", "nosuch", match="secret nosuch not found")
    mgr.dfail("secret", "rm", "nosuch", match="Error response from daemon: secret nosuch not found")
    mgr.dfail("secret", "create", "eaos1", "-", input="again",
              match="Error response from daemon: rpc error: code = AlreadyExists desc = secret eaos1 already exists")
    st, body = post(mgr, "/secrets/create", {"Name": "eaobad", "Data": "not base64!"})
    assert st == 400 and body["message"].startswith("Data is not valid base64"), body
    st, body = post(mgr, "/secrets/create", {"Name": "eaobad", "Data": "eA==", "Driver": {"Name": "vault"}})
    assert st == 400 and "Driver" in body["message"] and "--driver" in body["message"], body
    st, body = post(mgr, "/secrets/create", {"Name": "eaobad", "Data": "eA==", "Driver": None, "Templating": None})
    assert st == 201  # empty Docker fields are accepted
    # in use by a service (swarmctl's): the sentence
    mgr.ok("service", "create", "--name", "eaosec", "--replicas", "0", "--secret", "eaos1", mgr.image)
    mgr.dfail("secret", "rm", "eaos1", match="secret eaos1 is in use by service eaosec")
    mgr.ok("service", "rm", "eaosec")

    assert mgr.dok("secret", "rm", "eaos1", sid2, "eaos3", "eaobad").split() == ["eaos1", sid2, "eaos3", "eaobad"]
    assert mgr.dok("secret", "ls", "-q").split() == []


def test_configs_create_ls_inspect_update_rm(mgr: EngineManager, tmp_path: Path) -> None:
    f = tmp_path / "app.conf"
    f.write_text("hello config\n")
    cid = mgr.dok("config", "create", "--label", "k=v", "eaoc1", str(f)).strip()
    lines = mgr.dok("config", "ls").splitlines()
    assert lines[0].split() == ["ID", "NAME", "CREATED", "UPDATED"], lines
    assert lines[1].split()[:2] == [cid, "eaoc1"], lines
    [cfg] = mgr.djson("config", "inspect", "eaoc1")
    assert cfg["Spec"] == {"Name": "eaoc1", "Labels": {"k": "v"},
                           "Data": base64.b64encode(b"hello config\n").decode()}
    pretty = mgr.dok("config", "inspect", "--pretty", "eaoc1")
    assert "hello config" in pretty and "Name:" in pretty, pretty
    shown = swarmctl_json(mgr, "config", "inspect", "eaoc1")
    assert base64.b64decode(shown["spec"]["data"]) == b"hello config\n"
    mgr.ok("config", "create", "eaoc2", "-", input="from swarmctl")
    [c2] = mgr.djson("config", "inspect", "eaoc2")
    assert base64.b64decode(c2["Spec"]["Data"]) == b"from swarmctl"

    # posted back as read (Data included): no change; then the labels changed
    st, _ = post(mgr, f"/configs/{cid}/update?version={cfg['Version']['Index']}", cfg["Spec"])
    assert st == 200 and mgr.djson("config", "inspect", cid)[0]["Version"] == cfg["Version"]
    st, _ = post(mgr, f"/configs/{cid}/update?version={cfg['Version']['Index']}", {**cfg["Spec"], "Labels": {}})
    assert st == 200
    assert swarmctl_json(mgr, "config", "inspect", cid)["spec"]["annotations"].get("labels", {}) == {}
    [cfg] = mgr.djson("config", "inspect", cid)
    st, body = post(mgr, f"/configs/{cid}/update?version={cfg['Version']['Index']}", {**cfg["Spec"], "Name": "eaox"})
    assert st == 400 and "only updates to Labels are allowed" in body["message"], body

    mgr.dfail("config", "inspect", "nosuch", match="config nosuch not found")
    st, body = post(mgr, "/configs/create", {"Name": "eaoc3", "Labels": {}, "Data": ""})
    assert st == 400 and body["message"].startswith("Data is empty"), body
    assert mgr.dok("config", "rm", "eaoc1", "eaoc2").split() == ["eaoc1", "eaoc2"]
    assert mgr.ok("config", "ls", "-q").split() == []


def test_distribution_local_registry_and_unreachable(mgr: EngineManager, registry: Registry) -> None:
    st, _, body = http(mgr.docker_sock, "GET", f"/v1.41/distribution/{mgr.image}/json")
    assert st == 200, body
    doc = json.loads(body)
    # the digest the registry itself gives for the tag
    host, _, rest = mgr.image.partition("/")
    repo, _, tag = rest.partition(":")
    req = urllib.request.Request(f"http://{host}/v2/{repo}/manifests/{tag}", method="HEAD", headers={
        "Accept": "application/vnd.oci.image.index.v1+json, application/vnd.docker.distribution.manifest.list.v2+json, "
                  "application/vnd.oci.image.manifest.v1+json, application/vnd.docker.distribution.manifest.v2+json"})
    with urllib.request.urlopen(req, timeout=10) as r:
        digest = r.headers["Docker-Content-Digest"]
    assert doc["Descriptor"]["digest"] == digest and digest.startswith("sha256:")
    assert doc["Descriptor"]["mediaType"].startswith("application/vnd.")
    assert {"architecture": "amd64", "os": "linux"} in [
        {k: p[k] for k in ("architecture", "os")} for p in doc["Platforms"]], doc
    # by digest too
    st, _, body = http(mgr.docker_sock, "GET", f"/v1.41/distribution/{host}/{repo}@{digest}/json")
    assert st == 200 and json.loads(body)["Descriptor"]["digest"] == digest
    # an unknown tag: 404; an unreachable registry: 500 naming it; a bad reference: 400
    st, _, body = http(mgr.docker_sock, "GET", f"/v1.41/distribution/{host}/{repo}:nosuchtag/json")
    assert st == 404 and "manifest unknown" in json.loads(body)["message"], body
    st, _, body = http(mgr.docker_sock, "GET", "/v1.41/distribution/127.0.0.1:9/eao/x:1/json")
    assert st == 500 and "127.0.0.1:9" in json.loads(body)["message"], body
    st, _, body = http(mgr.docker_sock, "GET", "/v1.41/distribution/UPPER/x/json")
    assert st == 400 and "invalid reference format" in json.loads(body)["message"], body
