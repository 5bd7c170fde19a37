"""NetworkAgent end to end across namespace hosts, without swarmd.

Each host is a network namespace on an underlay bridge (NsLab); in it runs one NetworkAgent process
(`tests/netnode.py`, driven like swarmd drives it: session messages with the gossip key,
the managers and the node, then prepare/release of Task protobufs built as the allocator builds them).
"Containers" are the namespaces prepare() makes, with busybox processes in them; commands that
resolve names run with the task's resolv.conf bind-mounted over /etc/resolv.conf (a private mount
namespace), as the engine would give it to the container.
"""

from __future__ import annotations

import collections
import concurrent.futures
import os
import subprocess
import time
from pathlib import Path

import pytest
from helpers.waiting import wait_for
from netnode import NetNode, attachment, make_network, make_task, session_message

from shoal.lab.nshosts import NsLab
from shoal.proto import objects_pb2, types_pb2

pytestmark = pytest.mark.integration

GW_SUBNET = "198.19.250.0/24"
OUTSIDE = "198.18.0.254"  # the underlay namespace: the lab's "outside world"
KEY = bytes(range(16))
IFACES = "ip -o -4 addr show; ip -br link show; ip route show"  # a container's interfaces, to compare


class Cluster:
    """n namespace hosts, a NetworkAgent process on each, joined through host 1 (the "manager")."""

    def __init__(self, tmp: Path, n: int) -> None:
        self.tmp = tmp
        self.lab = NsLab(f"sn{os.getpid() % 10000}{next(_seq)}", n)
        self.nodes: list[NetNode | None] = [None] * n
        self.nodes_msg: list[objects_pb2.Node | None] = [None] * n
        self.tasks: dict[
            str, tuple[int, objects_pb2.Task, dict]
        ] = {}  # task id -> (host index, task, prepared)

    def start(self, i: int) -> NetNode:
        h = self.lab.hosts[i]
        node = NetNode(
            h.path,
            f"node{i + 1}",
            h.addr,
            str(self.tmp / f"state{i + 1}"),
            f"{self.lab.prefix}n{i + 1}",
            gw_subnet=GW_SUBNET,
            upstream_dns=[OUTSIDE],
            events=True,
            log_file=str(self.tmp / f"node{i + 1}.log"),
        )
        self.nodes[i] = node
        node.session(session_message([KEY], [f"{self.lab.hosts[0].addr}:2377"], self.nodes_msg[i]))
        return node

    def start_all(self) -> None:
        for i in range(len(self.lab.hosts)):
            self.start(i)
        want = {f"node{i + 1}" for i in range(len(self.nodes))}
        wait_for(
            lambda: all(
                {m for m, s in self.node(i).state()["members"].items() if s == "alive"} == want
                for i in range(len(self.nodes))
            ),
            "every agent sees every other alive",
        )

    def node(self, i: int) -> NetNode:
        n = self.nodes[i]
        assert n is not None
        return n

    def prepare(self, i: int, task: objects_pb2.Task) -> dict:
        got = self.node(i).prepare(task)
        rc = self.tmp / f"resolv-{task.id}"
        rc.write_text(got["resolv_conf"] or "")
        got["resolv_file"] = str(rc)
        self.tasks[task.id] = (i, task, got)
        return got

    def release(self, task_id: str) -> None:
        i, _, _ = self.tasks.pop(task_id)
        self.node(i).release(task_id)

    def netns(self, task_id: str) -> str:
        return self.tasks[task_id][2]["netns_path"]

    # ---- in a "container" ----
    def sh(
        self, task_id: str, script: str, *, check: bool = True, timeout: float = 60
    ) -> subprocess.CompletedProcess:
        """A shell script in the task's netns, with its resolv.conf as /etc/resolv.conf."""
        rc = self.tasks[task_id][2]["resolv_file"]
        argv = [
            "nsenter",
            f"--net={self.netns(task_id)}",
            "unshare",
            "-m",
            "sh",
            "-c",
            'mount --bind "$0" /etc/resolv.conf && exec sh -c "$1"',
            rc,
            script,
        ]
        r = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
        if check and r.returncode != 0:
            raise AssertionError(f"in {task_id}: {script!r} exited {r.returncode}: {r.stdout}{r.stderr}")
        return r

    def httpd(self, task_id: str, tag: str, port: int = 8080) -> None:
        www = self.tmp / f"www-{task_id}"
        www.mkdir(exist_ok=True)
        (www / "index.html").write_text(tag + "\n")
        self.lab.spawn(self.netns(task_id), ["busybox", "httpd", "-f", "-p", str(port), "-h", str(www)])
        wait_for(
            lambda: (
                self.sh(
                    task_id, f"timeout 5 busybox wget -q -O- http://127.0.0.1:{port}/", check=False
                ).stdout
                == tag + "\n"
            ),
            f"httpd in {task_id}",
        )

    def fetch(self, task_id: str, url: str, n: int = 1) -> collections.Counter:
        """n HTTP GETs of url from the task's container: tags seen."""
        out = self.sh(
            task_id, f"for i in $(seq {n}); do timeout 5 busybox wget -q -O- {url} || echo FAILED; done"
        ).stdout
        return collections.Counter(out.split())

    def lookup(self, task_id: str, name: str) -> list[str]:
        """A records of name from the container's resolver (127.0.0.11)."""
        r = self.sh(task_id, f"busybox nslookup -type=a {name} 127.0.0.11", check=False)
        lines = r.stdout.split("Name:", 1)[1].splitlines() if "Name:" in r.stdout else []
        return sorted(line.split()[-1] for line in lines if line.startswith("Address"))

    def neigh_ips(self, i: int, network_id: str) -> set[str]:
        got = self.node(i).peers(network_id)
        fdb = {tuple(e) for e in got["fdb"]}
        # an endpoint counts as programmed when both its neighbour and its FDB entry are there
        return {ip for ip, mac in got["neigh"] if any(m == mac for m, _ in fdb)}

    def host_state(self, i: int) -> tuple[list[str], str]:
        path = self.lab.hosts[i].path
        links = subprocess.run(
            ["nsenter", f"--net={path}", "ip", "-o", "link", "show"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        names = sorted(line.split(":")[1].strip().split("@")[0] for line in links.splitlines())
        rules = subprocess.run(
            ["nsenter", f"--net={path}", "nft", "list", "ruleset"], capture_output=True, text=True, check=True
        ).stdout
        return names, rules

    def our_netns(self) -> list[str]:
        lab_own = {f"{self.lab.prefix}-ul"} | {h.name for h in self.lab.hosts}
        return sorted(
            n for n in os.listdir("/run/netns") if n.startswith(self.lab.prefix) and n not in lab_own
        )

    def close(self) -> None:
        errors = []
        for n in self.nodes:
            if n is not None and n.proc.poll() is None:
                try:
                    n.call("cleanup")
                except Exception as e:
                    errors.append(e)
                n.stop()
        self.lab.close()  # our processes in containers first (by PID), then the lab's namespaces
        for name in self.our_netns():  # what an agent that failed to clean up left behind
            subprocess.run(["ip", "netns", "delete", name], check=False)
        if errors:
            raise errors[0]


_seq = iter(range(1000))


@pytest.fixture
def cluster(tmp_path):
    if os.geteuid() != 0:
        pytest.fail("NetworkAgent integration tests need root (network namespaces)")
    made: list[Cluster] = []

    def make(n: int) -> Cluster:
        c = Cluster(tmp_path, n)
        made.append(c)
        return c

    yield make
    for c in made:
        c.close()


def tcp_port(target: int, published: int = 0, mode=types_pb2.PortConfig.INGRESS) -> types_pb2.PortConfig:
    return types_pb2.PortConfig(
        protocol=types_pb2.PortConfig.TCP, target_port=target, published_port=published, publish_mode=mode
    )


def test_discovery_vip_release_and_cleanup(cluster):
    """3 hosts: ping/TCP by IP, service name (VIP), tasks.<service>, alias and stack short name; VIP
    balancing over 3 tasks on 3 hosts; a released task's peer entries and backend go; release +
    cleanup leave the hosts as they were."""
    c = cluster(3)
    c.start_all()
    before = [c.host_state(i) for i in range(3)]
    net = make_network("frontnet00000000000000001", "demo_front", 4201, "198.19.10.0/24")
    vip = {net.id: "198.19.10.2/24"}
    webs = {}
    for i in range(3):
        tid = f"web{i + 1}task0000000000{i}"
        webs[tid] = f"198.19.10.{11 + i}"
        c.prepare(
            i,
            make_task(
                tid,
                "demo_web",
                "svcweb",
                f"node{i + 1}",
                [attachment(net, webs[tid], ["webalias"])],
                vips=vip,
                stack="demo",
                slot=i + 1,
            ),
        )
    client = "clienttask000000000001"
    got = c.prepare(
        0,
        make_task(
            client,
            "demo_client",
            "svcclient",
            "node1",
            [attachment(net, "198.19.10.21")],
            vips={net.id: "198.19.10.20/24"},
            stack="demo",
        ),
    )
    assert got["addresses"][0] == "198.19.10.21/24" and got["addresses"][1].startswith("198.19.250.")
    for tid in webs:
        c.httpd(tid, tid[:4])

    # every host programs every remote endpoint (FDB + neighbour), and nothing of its own
    ips = set(webs.values()) | {"198.19.10.21"}
    local = [
        {webs[t] for t in webs if c.tasks[t][0] == i} | ({"198.19.10.21"} if i == 0 else set())
        for i in range(3)
    ]
    for i in range(3):
        wait_for(lambda i=i: c.neigh_ips(i, net.id) == ips - local[i], f"host {i + 1} peers")

    # by IP, across hosts: ICMP and TCP
    c.sh(client, "busybox ping -c 2 -i 0.2 -W 2 198.19.10.12 && busybox ping -c 1 -W 2 198.19.10.13")
    assert c.fetch(client, "http://198.19.10.13:8080/") == {"web3": 1}
    c.sh("web2task00000000001", "busybox ping -c 1 -W 2 198.19.10.13")

    # names, from the container's resolver (127.0.0.11)
    assert c.lookup(client, "demo_web") == ["198.19.10.2"]
    assert c.lookup(client, "web") == ["198.19.10.2"]  # stack short name
    assert c.lookup(client, "webalias") == ["198.19.10.2"]
    assert c.lookup(client, "tasks.demo_web") == sorted(webs.values())
    assert c.lookup(client, "tasks.web") == sorted(webs.values())
    assert c.lookup(client, "tasks.webalias") == sorted(webs.values())
    assert c.lookup(client, "demo_client") == ["198.19.10.20"]
    assert c.lookup(client, "nosuchservice") == []
    c.sh(client, "busybox ping -c 1 -W 2 tasks.web && busybox ping -c 1 -W 2 webalias")
    assert set(c.fetch(client, "http://web:8080/", 3)) <= {"web1", "web2", "web3"}
    assert set(c.fetch(client, "http://webalias:8080/", 3)) <= {"web1", "web2", "web3"}

    # the VIP spreads connections over the 3 tasks on the 3 hosts (round robin), from hosts 1 and 3
    seen = c.fetch(client, "http://demo_web:8080/", 30)
    assert set(seen) == {"web1", "web2", "web3"} and min(seen.values()) >= 8, seen
    seen = c.fetch("web3task00000000002", "http://198.19.10.2:8080/", 9)
    assert set(seen) == {"web1", "web2", "web3"}, seen

    # a task deactivated (as before its container is stopped): out of the VIP and the service names
    # everywhere, still reachable by IP and task name; activated again: back
    c.node(1).call("deactivate", task_id="web2task00000000001")
    wait_for(lambda: c.lookup(client, "tasks.web") == ["198.19.10.11", "198.19.10.13"], "web2 out of tasks.web")
    wait_for(lambda: set(c.fetch(client, "http://demo_web:8080/", 6)) == {"web1", "web3"}, "VIP without web2")
    assert set(c.fetch("web3task00000000002", "http://web:8080/", 6)) == {"web1", "web3"}
    assert c.lookup(client, "web2task00000000001") == ["198.19.10.12"]
    assert c.fetch(client, "http://198.19.10.12:8080/") == {"web2": 1}
    c.node(1).call("activate", task_id="web2task00000000001")
    wait_for(lambda: c.lookup(client, "tasks.web") == sorted(webs.values()), "web2 back in tasks.web")
    wait_for(lambda: set(c.fetch(client, "http://demo_web:8080/", 6)) == {"web1", "web2", "web3"}, "VIP with web2")

    # a task released on host 3: its entries go from hosts 1 and 2, the VIP stops sending to it
    t0 = time.monotonic()
    c.release("web3task00000000002")
    gone = ips - {"198.19.10.13"}
    for i in (0, 1):
        wait_for(lambda i=i: c.neigh_ips(i, net.id) == gone - local[i], f"web3 gone from host {i + 1}")
    print(f"released task's peer entries gone from hosts 1, 2 after {time.monotonic() - t0:.3f} s")
    wait_for(lambda: c.lookup(client, "tasks.web") == ["198.19.10.11", "198.19.10.12"], "web3 out of DNS")
    seen = c.fetch(client, "http://demo_web:8080/", 12)
    assert set(seen) == {"web1", "web2"}, seen
    # host 3 has no task on the network left: its sandbox is gone
    assert not any("-ov-" in n and n.startswith(f"{c.lab.prefix}n3") for n in c.our_netns())

    # release everything, then cleanup: hosts as before, no namespace of ours left
    for tid in list(c.tasks):
        c.release(tid)
    for i in range(3):
        c.node(i).call("cleanup")
    assert c.our_netns() == []
    after = [c.host_state(i) for i in range(3)]
    assert after == before


def test_internal_network_and_ingress(cluster):
    """2 hosts: an internal network connects its tasks but has no egress; a port published in ingress
    mode is reachable on the host that runs no task of the service (the routing mesh), also from a
    container through its own node; a port published in host mode only on its task's node."""
    c = cluster(2)
    ingress = make_network("ingressnet000000000000001", "ingress", 4096, "198.19.12.0/24", ingress=True)
    for i in range(2):  # the node's ingress attachment, as the allocator gives it (swarmd: session.node)
        node = objects_pb2.Node(id=f"node{i + 1}")
        node.attachments.append(attachment(ingress, f"198.19.12.{201 + i}"))
        c.nodes_msg[i] = node
    c.start_all()
    for i in range(2):
        wait_for(lambda i=i: c.node(i).state()["ingress"] == ingress.id, f"host {i + 1} ingress sandbox")
    before_netns = c.our_netns()  # the routing-mesh sandboxes and the ingress network's
    internal = make_network("backnet0000000000000000001", "back", 4202, "198.19.11.0/24", internal=True)
    front = make_network("frontnet00000000000000002", "front", 4203, "198.19.13.0/24")

    # a service publishing 30080 -> 8080 in ingress mode, one task on host 1
    pub = "pubtask0000000000000001"
    c.prepare(
        0,
        make_task(
            pub,
            "pub",
            "svcpub",
            "node1",
            [attachment(ingress, "198.19.12.11"), attachment(front, "198.19.13.11")],
            vips={ingress.id: "198.19.12.2/24", front.id: "198.19.13.2/24"},
            ports=[tcp_port(8080, 30080)],
        ),
    )
    c.httpd(pub, "pub")
    # a service publishing 30081 -> 8080 in host mode, its task on host 2
    hostmode = "hosttask000000000000001"
    c.prepare(1, make_task(hostmode, "hostmode", "svchost", "node2", [attachment(front, "198.19.13.12")],
                           vips={front.id: "198.19.13.3/24"},
                           ports=[tcp_port(8080, 30081, types_pb2.PortConfig.HOST)]))
    c.httpd(hostmode, "hostmode")
    # internal-only tasks on both hosts
    c.prepare(
        0,
        make_task(
            "int1task000000000000001",
            "back",
            "svcback",
            "node1",
            [attachment(internal, "198.19.11.11")],
            vips={internal.id: "198.19.11.2/24"},
        ),
    )
    got = c.prepare(
        1,
        make_task(
            "int2task000000000000002",
            "back",
            "svcback",
            "node2",
            [attachment(internal, "198.19.11.12")],
            vips={internal.id: "198.19.11.2/24"},
            slot=2,
        ),
    )
    assert got["addresses"] == ["198.19.11.12/24"]  # no gateway-bridge interface

    wait_for(lambda: c.neigh_ips(1, internal.id) == {"198.19.11.11"}, "internal peers on host 2")
    wait_for(
        lambda: c.neigh_ips(1, ingress.id) >= {"198.19.12.11", "198.19.12.201"}, "ingress peers on host 2"
    )

    # internal network: tasks reach each other (and resolve each other), nothing outside
    c.sh("int2task000000000000002", "busybox ping -c 1 -W 2 198.19.11.11")
    assert c.lookup("int2task000000000000002", "tasks.back") == ["198.19.11.11", "198.19.11.12"]
    r = c.sh("int2task000000000000002", f"busybox ping -c 1 -W 2 {OUTSIDE}", check=False)
    assert r.returncode != 0 and "unreachable" in (r.stdout + r.stderr).lower(), r.stdout + r.stderr
    r = c.sh("int1task000000000000001", f"busybox ping -c 1 -W 2 {OUTSIDE}", check=False)
    assert r.returncode != 0
    # ... while a task on a normal network has egress (masqueraded through its host)
    c.sh(pub, f"busybox ping -c 1 -W 2 {OUTSIDE}")

    # ingress: from outside, the published port on host 2 (no task there) and on host 1
    outside = c.lab.underlay.path  # type: ignore[union-attr]

    def get(addr: str, port: int = 30080) -> str:
        r = subprocess.run(
            [
                "nsenter",
                f"--net={outside}",
                "timeout",
                "5",
                "busybox",
                "wget",
                "-q",
                "-O-",
                f"http://{addr}:{port}/",
            ],
            capture_output=True,
            text=True,
            timeout=30,
        )
        return r.stdout.strip()

    wait_for(lambda: get(c.lab.hosts[1].addr) == "pub", "published port 30080 routed from host 2")
    assert get(c.lab.hosts[0].addr) == "pub"
    # a container on host 2 through its own node's published ingress port (hairpin), and by service name
    assert c.fetch(hostmode, f"http://{c.lab.hosts[1].addr}:30080/") == {"pub": 1}
    assert c.fetch(hostmode, "http://pub:8080/") == {"pub": 1}
    # host mode: only on the node that runs the task
    assert get(c.lab.hosts[1].addr, 30081) == "hostmode"
    assert get(c.lab.hosts[0].addr, 30081) == ""
    # from a container on host 2 through its own node's published port (hairpin)
    assert c.fetch("int2task000000000000002", f"http://{c.lab.hosts[1].addr}:30080/") == {
        "FAILED": 1
    }  # internal
    # the task goes: the mesh stops routing it
    c.release(pub)
    wait_for(lambda: get(c.lab.hosts[1].addr) == "", "published port withdrawn on host 2")
    for tid in list(c.tasks):
        c.release(tid)
    assert c.our_netns() == before_netns
    for i in range(2):
        c.node(i).call("cleanup")
    assert c.our_netns() == []


def test_agent_killed_then_restarted(cluster):
    """3 hosts: an agent SIGKILLed → its endpoints purged on the others (peers, VIP); a new agent
    process on the same host prepare()s its running task again → records, DNS and peers come back
    and the container's interfaces are the ones it had."""
    c = cluster(3)
    c.start_all()
    net = make_network("appnet000000000000000001", "app", 4204, "198.19.14.0/24")
    vip = {net.id: "198.19.14.2/24"}
    tids = [f"app{i + 1}task00000000000{i}" for i in range(3)]
    ips = [f"198.19.14.{11 + i}" for i in range(3)]
    tasks = [
        make_task(t, "app", "svcapp", f"node{i + 1}", [attachment(net, ips[i])], vips=vip, slot=i + 1)
        for i, t in enumerate(tids)
    ]
    for i, t in enumerate(tasks):
        c.prepare(i, t)
        c.httpd(t.id, f"app{i + 1}")
    for i in range(3):
        wait_for(lambda i=i: c.neigh_ips(i, net.id) == set(ips) - {ips[i]}, f"host {i + 1} peers")
    assert set(c.fetch(tids[0], "http://app:8080/", 9)) == {"app1", "app2", "app3"}
    links_before = c.sh(tids[2], IFACES).stdout

    # host 3's agent crashes: hosts 1 and 2 purge its endpoint (SWIM declares it dead)
    c.node(2).kill()
    t0 = time.monotonic()
    for i in (0, 1):
        wait_for(
            lambda i=i: c.neigh_ips(i, net.id) == set(ips[:2]) - {ips[i]}, f"app3 purged on host {i + 1}"
        )
    print(f"killed agent's endpoint purged on hosts 1, 2 after {time.monotonic() - t0:.2f} s")
    wait_for(lambda: c.lookup(tids[0], "tasks.app") == ips[:2], "app3 out of DNS on host 1")
    assert set(c.fetch(tids[0], "http://app:8080/", 6)) == {"app1", "app2"}
    # the container on host 3 still runs, with its interfaces, but its DNS server went with the agent
    assert c.sh(tids[2], IFACES).stdout == links_before
    assert c.lookup(tids[2], "tasks.app") == []

    # while it is down, host 2 replaces app2 by app4: host 3's kernel keeps app2's (now stale) entries
    c.release(tids[1])
    t4 = make_task(
        "app4task000000000003", "app", "svcapp", "node2", [attachment(net, "198.19.14.14")], vips=vip, slot=2
    )
    c.prepare(1, t4)
    c.httpd(t4.id, "app4")
    live = [ips[0], ips[2], "198.19.14.14"]

    # a new agent process on host 3 (same namespaces, same state dir): the worker prepares its task again
    c.start(2)
    wait_for(lambda: c.node(2).state()["members"].get("node1") == "alive", "restarted agent joined")
    # it announced its running task again from its state dir before joining, DNS included
    st = c.node(2).state()
    assert st["tasks"] == [tids[2]] and st["dns"] == [tids[2]], st
    assert c.lookup(tids[2], tids[2]) == [ips[2]]
    got = c.node(2).prepare(tasks[2])
    assert got["netns_path"] == c.netns(tids[2]) and got["addresses"][0] == f"{ips[2]}/24"
    assert c.sh(tids[2], IFACES).stdout == links_before
    want = [{ips[2], "198.19.14.14"}, {ips[0], ips[2]}, {ips[0], "198.19.14.14"}]  # remote live endpoints
    for i in range(3):  # host 3 drops app2's stale entries: the table no longer has it
        wait_for(lambda i=i: c.neigh_ips(i, net.id) == want[i], f"host {i + 1} peers after the restart")
    assert c.lookup(tids[2], "tasks.app") == sorted(live)
    assert c.lookup(tids[0], "tasks.app") == sorted(live)
    c.sh(
        tids[2],
        "busybox ping -c 1 -W 2 198.19.14.11 && busybox ping -c 1 -W 2 198.19.14.14 && busybox ping -c 1 -W 2 app",
    )
    wait_for(
        lambda: set(c.fetch(tids[0], "http://app:8080/", 6)) == {"app1", "app3", "app4"},
        "VIP on host 1 balances to app3 again",
    )
    wait_for(
        lambda: set(c.fetch(tids[2], "http://app:8080/", 6)) == {"app1", "app3", "app4"},
        "VIP on host 3 follows the table (app2 gone, app4 new)",
    )

    for tid in list(c.tasks):
        c.release(tid)
    for i in range(3):
        c.node(i).call("cleanup")
    assert c.our_netns() == []


def test_prepares_of_one_task_at_once_wait_for_each_other(cluster):
    """The worker's prepare() of a task can meet another for the same task: after an agent restart,
    start() prepares the running tasks again from its state dir while the worker re-adopts the same
    containers. Such calls wait for each other: the task keeps one namespace, its interfaces and its
    DNS server. (A second call used to find the namespace missing or 127.0.0.11 taken, fail, and
    its clean-up removed what the first had made.)"""
    c = cluster(1)
    c.start_all()
    net = make_network("racenet00000000000000001", "race", 4207, "198.19.17.0/24")
    task = make_task("race1task00000000000", "race", "svcrace", "node1", [attachment(net, "198.19.17.11")],
                     vips={net.id: "198.19.17.2/24"}, slot=1)

    def at_once() -> dict:
        with concurrent.futures.ThreadPoolExecutor(3) as pool:
            got = list(pool.map(lambda _: c.node(0).prepare(task), range(3)))
        assert {g["netns_path"] for g in got} == {got[0]["netns_path"]}, got
        return got[0]

    got = at_once()
    c.tasks[task.id] = (0, task, {**got, "resolv_file": str(c.tmp / "resolv")})
    (c.tmp / "resolv").write_text(got["resolv_conf"])
    links_before = c.sh(task.id, IFACES).stdout
    assert c.lookup(task.id, task.id) == ["198.19.17.11"]
    c.node(0).kill()
    c.start(0)  # its start() restores the task while the worker re-adopts it
    assert at_once()["netns_path"] == got["netns_path"] and os.path.exists(got["netns_path"])
    st = c.node(0).state()
    assert st["tasks"] == [task.id] and st["dns"] == [task.id], st
    assert c.sh(task.id, IFACES).stdout == links_before
    assert c.lookup(task.id, task.id) == ["198.19.17.11"]
    c.release(task.id)
    c.node(0).call("cleanup")
    assert c.our_netns() == []
