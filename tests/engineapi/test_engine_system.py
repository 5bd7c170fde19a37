"""The real `docker` CLI against swarmd's Engine API: version negotiation, `docker version`, `docker
info`, `docker node …`, `docker swarm join-token`, errors as Docker words them, a worker's socket, and
the HTTP server itself (keep-alive, chunked bodies, bad requests). Needs root."""

from __future__ import annotations

import json
import socket
import time

import pytest
from engine_helpers import EngineManager, http
from helpers.swarmd import Swarmd, remove_task_netns

pytestmark = pytest.mark.integration


def test_ping_version_and_info(mgr: EngineManager) -> None:
    st, hs, body = http(mgr.docker_sock, "GET", "/_ping")
    assert (st, body) == (200, b"OK") and hs["api-version"] == "1.41" and hs["swarm"] == "active/manager"
    st, hs, body = http(mgr.docker_sock, "HEAD", "/_ping")
    assert st == 200 and body == b"" and hs["content-length"] == "2"
    out = mgr.dok("version")
    assert "API version:       1.41" in out and "Server: Shoal" in out, out  # "(downgraded from 1.50)" with CLI 28
    info = mgr.djson("info", "--format", "{{json .Swarm}}")
    assert info["LocalNodeState"] == "active" and info["ControlAvailable"] is True
    assert info["Nodes"] == 1 and info["Managers"] == 1
    assert info["NodeID"] == mgr.info().node_id and info["Cluster"]["ID"] == mgr.info().cluster_id
    assert info["RemoteManagers"] == [{"NodeID": info["NodeID"], "Addr": mgr.api}]
    text = mgr.dok("info")
    for line in ("Swarm: active", "Is Manager: true", f"ClusterID: {info['Cluster']['ID']}",
                 "Expiry Duration: 3 months", "Heartbeat Period: 1 second", "Task History Retention Limit: 5"):
        assert line in text, text


def test_node_ls_inspect_update_and_errors(mgr: EngineManager) -> None:
    node_id = mgr.info().node_id
    lines = mgr.dok("node", "ls").splitlines()
    assert lines[0].split() == ["ID", "HOSTNAME", "STATUS", "AVAILABILITY", "MANAGER", "STATUS", "ENGINE", "VERSION"]
    assert lines[1].split() == [node_id, "*", "eam1", "Ready", "Active", "Leader", "shoal-0.1.0"], lines
    [node] = mgr.djson("node", "inspect", "self")
    assert node["ID"] == node_id and node["Spec"] == {"Labels": {}, "Role": "manager", "Availability": "active"}
    assert node["ManagerStatus"] == {"Leader": True, "Reachability": "reachable", "Addr": mgr.api}
    assert node["Description"]["TLSInfo"]["TrustRoot"].startswith("-----BEGIN CERTIFICATE-----")
    assert node["Description"]["TLSInfo"]["CertIssuerSubject"]  # base64 DER of the root's subject
    pretty = mgr.dok("node", "inspect", "--pretty", "eam1")
    assert "Hostname:              \team1" in pretty and "Availability:         \tActive" in pretty, pretty

    # docker writes, swarmctl reads (one store)
    assert mgr.dok("node", "update", "--label-add", "zone=a", "--availability", "drain", "eam1").strip() == "eam1"
    shown = json.loads(mgr.ok("node", "inspect", node_id, "--format", "json"))
    shown = shown[0] if isinstance(shown, list) else shown
    assert shown["spec"]["availability"] == "DRAIN" and shown["spec"]["annotations"]["labels"] == {"zone": "a"}
    mgr.ok("node", "update", "--availability", "active", "--label-rm", "zone", node_id)
    [node] = mgr.djson("node", "inspect", node_id)
    assert node["Spec"] == {"Labels": {}, "Role": "manager", "Availability": "active"}

    # errors, worded as Docker's
    mgr.dfail("node", "inspect", "nosuch", match="Error response from daemon: node nosuch not found")
    mgr.dfail("node", "rm", "nosuch", match="Error response from daemon: node nosuch not found")
    mgr.ok("service", "create", "--name", "onnode", mgr.image, "sleep", "600")
    try:
        rows = [r.split() for r in mgr.dok("node", "ps", "self").splitlines()]
        assert rows[0][:4] == ["ID", "NAME", "IMAGE", "NODE"] and [r[1] for r in rows[1:]] == ["onnode.1"], rows
        assert rows[1][3:6] == ["eam1", "Running", "Running"], rows
    finally:
        mgr.ok("service", "rm", "onnode")
    err = mgr.dfail("node", "rm", "eam1", match="Error response from daemon: rpc error: code = FailedPrecondition desc = ")
    assert "demote" in err or "not down" in err, err
    stale = node["Version"]["Index"] - 1
    st, _, body = http(mgr.docker_sock, "POST", f"/v1.41/nodes/{node_id}/update?version={stale}",
                       json.dumps({"Role": "manager", "Availability": "pause", "Labels": {}}).encode(),
                       {"Content-Type": "application/json"})
    assert (st, json.loads(body)) == (500, {"message": "rpc error: code = Unknown desc = update out of sequence"})
    st, _, body = http(mgr.docker_sock, "POST", f"/v1.41/nodes/{node_id}/update?version={node['Version']['Index']}",
                       json.dumps({"Role": "king", "Availability": "active"}).encode())
    assert st == 400 and "Spec.Role is worker or manager" in json.loads(body)["message"]
    [after] = mgr.djson("node", "inspect", node_id)
    assert after["Spec"]["Availability"] == "active"  # nothing half-applied


def test_join_tokens_and_rotation_seen_by_swarmctl(mgr: EngineManager) -> None:
    out = mgr.dok("swarm", "join-token", "worker")
    token = mgr.dok("swarm", "join-token", "-q", "worker").strip()
    assert token.startswith("SWMTKN-1-") and f"docker swarm join --token {token} {mgr.api}" in out, out
    assert mgr.ok("swarm", "join-token", "-q", "worker").strip() == token
    manager_token = mgr.dok("swarm", "join-token", "-q", "manager").strip()
    assert "Successfully rotated worker join token." in mgr.dok("swarm", "join-token", "--rotate", "worker")
    new = mgr.dok("swarm", "join-token", "-q", "worker").strip()
    assert new != token and mgr.ok("swarm", "join-token", "-q", "worker").strip() == new
    assert mgr.dok("swarm", "join-token", "-q", "manager").strip() == manager_token


def test_what_the_engine_api_does_not_do_is_said_plainly(mgr: EngineManager) -> None:
    st, _, body = http(mgr.docker_sock, "GET", "/v1.41/containers/json")
    assert st == 501 and "GET /containers/json is not implemented by Shoal's Docker Engine API" in json.loads(body)["message"]
    mgr.dfail("ps", match="Error response from daemon: GET /containers/json is not implemented")
    st, _, body = http(mgr.docker_sock, "GET", "/v1.99/info")
    assert st == 400 and json.loads(body)["message"] == \
        "client version 1.99 is too new. Maximum supported API version is 1.41"
    mgr.dfail("swarm", "init", match="creating a swarm is swarmd's job in Shoal")
    st, _, body = http(mgr.docker_sock, "POST", f"/v1.41/nodes/{mgr.info().node_id}/update?version=1", b"{nope")
    assert st == 400 and "not valid JSON" in json.loads(body)["message"]
    st, _, body = http(mgr.docker_sock, "PUT", "/v1.41/nodes")
    assert st == 405


def test_http_keep_alive_chunked_bodies_and_bad_requests(mgr: EngineManager) -> None:
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(10)
    s.connect(str(mgr.docker_sock))
    try:
        f = s.makefile("rb")

        def read_response() -> tuple[str, bytes]:
            status = f.readline().decode()
            length = 0
            while (line := f.readline()) not in (b"\r\n", b""):
                k, _, v = line.decode().partition(":")
                if k.lower() == "content-length":
                    length = int(v)
            return status, f.read(length)

        # two requests on one connection, the second with a chunked body and Expect: 100-continue
        s.sendall(b"GET /_ping HTTP/1.1\r\nHost: d\r\n\r\n")
        assert read_response() == ("HTTP/1.1 200 OK\r\n", b"OK")
        node_id = mgr.info().node_id
        [node] = mgr.djson("node", "inspect", node_id)
        body = json.dumps({"Role": "manager", "Availability": "active", "Labels": {"via": "chunked"}}).encode()
        s.sendall(f"POST /v1.41/nodes/{node_id}/update?version={node['Version']['Index']} HTTP/1.1\r\nHost: d\r\n"
                  f"Transfer-Encoding: chunked\r\n\r\n".encode()
                  + b"%x\r\n%s\r\n%x\r\n%s\r\n0\r\n\r\n" % (10, body[:10], len(body) - 10, body[10:]))
        assert read_response()[0] == "HTTP/1.1 200 OK\r\n"
        assert mgr.djson("node", "inspect", node_id)[0]["Spec"]["Labels"] == {"via": "chunked"}
        s.sendall(b"GARBAGE\r\n\r\n")
        status, body = read_response()
        assert status == "HTTP/1.1 400 Bad Request\r\n" and "not an HTTP/1.x request line" in json.loads(body)["message"]
        assert f.read() == b""  # and the server closed the connection
    finally:
        s.close()
    mgr.ok("node", "update", "--label-rm", "via", mgr.info().node_id)


def test_a_workers_socket_answers_info_and_refuses_swarm_calls(mgr: EngineManager) -> None:
    token = mgr.dok("swarm", "join-token", "-q", "worker").strip()
    w = Swarmd(mgr.base, "w1", hostname="eaw1", extra=["--join-addr", mgr.api, "--join-token", token])
    w.start()
    try:
        sock = w.dir / "docker.sock"
        deadline = time.monotonic() + 60
        while not sock.exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        info = json.loads(mgr.dok("info", "--format", "{{json .Swarm}}", sock=sock))
        assert info["LocalNodeState"] == "active" and info["ControlAvailable"] is False and info["NodeID"]
        mgr.dfail("node", "ls", sock=sock, match="Error response from daemon: This node is not a swarm manager. "
                  "Worker nodes can't be used to view or modify cluster state. Please run this command on a manager "
                  "node or promote the current node to a manager.")
        st, hs, _ = http(sock, "GET", "/_ping")
        assert st == 200 and hs["swarm"] == "active/worker"

        # promote and demote through the manager's socket: Docker's words, and the role follows
        wait_ready = time.monotonic() + 60
        while "Ready" not in mgr.dok("node", "ls", "--filter", "name=eaw1", "--format", "{{.Status}}"):
            assert time.monotonic() < wait_ready, "eaw1 never became Ready"
            time.sleep(0.3)
        assert mgr.dok("node", "promote", "eaw1").strip() == "Node eaw1 promoted to a manager in the swarm."
        assert mgr.djson("node", "inspect", "eaw1")[0]["Spec"]["Role"] == "manager"
        deadline = time.monotonic() + 90
        # until its store member joined and the node says so (the manager status is written after the
        # member answers: a demote read before that write is refused as out of sequence, as Docker's is)
        while mgr.docker("node", "ls", "--filter", "role=manager", "--format", "{{.Hostname}}").stdout.split() \
                != ["eam1", "eaw1"] or not (w.dir / "swarmd.sock").exists() \
                or sum(m.reachable for m in mgr.info().members) != 2 \
                or mgr.djson("node", "inspect", "eaw1")[0].get("ManagerStatus", {}).get("Reachability") != "reachable":
            assert time.monotonic() < deadline, "eaw1 never became a manager"
            time.sleep(0.5)
        assert mgr.dok("node", "demote", "eaw1").strip() == "Manager eaw1 demoted in the swarm."
        assert mgr.djson("node", "inspect", "eaw1")[0]["Spec"]["Role"] == "worker"
        deadline = time.monotonic() + 60
        while len(mgr.info().members) != 1:  # its store member has left: stopping it keeps the quorum
            assert time.monotonic() < deadline, "eaw1's store member never left"
            time.sleep(0.3)
    finally:
        w.stop()
        remove_task_netns([w])  # task namespaces a stopped swarmd left behind (a failed run left one)
        mgr.ok("node", "rm", "--force", "eaw1")
