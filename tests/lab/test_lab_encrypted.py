"""An encrypted overlay network end to end on a lab: real swarmd managers and agents, runc containers,
keys from the managers, IPsec ESP between the hosts, rotation and an agent restart under a live
client, nothing left behind.

It needs a kernel with IPsec ESP. This project's machines have none, so `test_lab_encrypted_in_uml`
runs the test inside the User-Mode Linux kernel of tests/uml.py (which also makes runc use cgroup v2
there); on a kernel with ESP it runs directly.
"""

from __future__ import annotations

import json
import os
import re

import pytest
from esp_wire import captured, needs_esp, sniff_between
from test_lab import swarmctl, wait_for

from shoal.netdriver import nft, xfrm
from shoal.netdriver.overlay.model import ESP_MARK, ESP_TABLE

pytestmark = pytest.mark.integration

NAME = f"le{os.getpid() % 10000}"
WEB = "echo hello-encrypted > /tmp/index.html; exec httpd -f -p 80 -h /tmp"
# one line per fetch: a counter and the page, or FAIL (so a lost answer shows in the log)
CLIENT = ("i=0; while true; do i=$((i+1)); echo \"$i $(wget -q -O- http://web/ || echo FAIL)\"; "
          "sleep 0.3; done")


def lab(*args: str, check: bool = True, timeout: float = 180):
    return swarmctl("lab", "--name", NAME, *args, check=check, timeout=timeout)


def client_lines(sock: str, tail: str = "all") -> list[tuple[int, str]]:
    """The client's log: (fetch number, answer)."""
    out = swarmctl("service", "logs", "--raw", "--tail", tail, "client", sock=sock, check=False).stdout
    return [(int(n), rest) for n, _, rest in (ln.strip().partition(" ") for ln in out.splitlines())
            if n.isdigit()]


def last_fetch(sock: str) -> int:
    return max((n for n, _ in client_lines(sock, "3")), default=0)


def answered_after(sock: str, have: int) -> int:
    return sum(1 for n, a in client_lines(sock, "20") if n > have and a == "hello-encrypted")


def fresh_answers(sock: str, n: int = 3) -> None:
    """Wait until the client got n more answers than it had."""
    have = last_fetch(sock)
    try:
        wait_for(lambda: answered_after(sock, have) >= n, f"{n} answers after fetch {have}", 60)
    except AssertionError:  # what the hosts hold, for the report
        for h in ("h1", "h2"):
            print(h, lab("exec", h, "--", "ip", "-s", "xfrm", "state", check=False).stdout)
        print("client:", client_lines(sock, "10"))
        raise


def host_xfrm(host: str) -> tuple[list[xfrm.SA], list[xfrm.Policy]]:
    from shoal.lab.lab import LabState

    st = LabState.load(NAME)
    h = next(h for h in st.hosts if h.name == host)
    with xfrm.Xfrm(h.netns) as x:
        return ([s for s in x.list_sas() if s.reqid & 0xFF000000 == ESP_MARK],
                [p for p in x.list_policies() if p.mark & 0xFF000000 == ESP_MARK])


@needs_esp
def test_encrypted_service_across_hosts() -> None:
    from shoal.lab.lab import LabState

    up = lab("up", "--managers", "1", "--workers", "1")
    sock = re.search(r"^export SWARM_SOCKET=(\S+)$", up.stdout, re.M).group(1)
    try:
        st = LabState.load(NAME)
        ul = f"/run/netns/{st.prefix}-ul"
        nodes = json.loads(swarmctl("node", "ls", "--format", "json", sock=sock).stdout)
        assert all("ipsec-esp" in n["description"].get("capabilities", []) for n in nodes), nodes

        swarmctl("network", "create", "--opt", "encrypted", "secure", sock=sock)
        swarmctl("service", "create", "--name", "web", "--network", "secure", "--constraint", "node.hostname==h2",
                 "busybox", "sh", "-c", WEB, sock=sock)
        swarmctl("service", "create", "--name", "client", "--network", "secure", "--constraint",
                 "node.hostname==h1", "busybox", "sh", "-c", CLIENT, sock=sock)
        wait_for(lambda: [a for _, a in client_lines(sock)].count("hello-encrypted") >= 3,
                 "the client's first answers", 60)

        # on the wire between h1 and h2: ESP, and no VXLAN in clear
        sniffer = sniff_between(ul, "198.18.0.1", "198.18.0.2", 3)
        seen = set(captured(sniffer))
        assert (50, 0) in seen and (17, 4789) not in seen, seen
        for h in ("h1", "h2"):
            sas, pols = host_xfrm(h)
            assert len(sas) == 4 and len(pols) == 1, (h, sas, pols)  # 1 out + 3 in, one policy to the other host

        # keys rotate every 2 s: the SAs follow on both hosts and the client never misses an answer
        swarmctl("cluster", "update", "--network-key-rotation", "2s", sock=sock)
        first = swarmctl("network", "inspect", "secure", sock=sock).stdout
        spis = {s.spi for s in host_xfrm("h1")[0]}
        wait_for(lambda: len(spis & {s.spi for s in host_xfrm("h1")[0]}) <= 1, "two rotations", 30)
        assert json.loads(swarmctl("network", "inspect", "secure", sock=sock).stdout)[0]["keys_rotated_at"] != \
            json.loads(first)[0]["keys_rotated_at"]
        swarmctl("cluster", "update", "--network-key-rotation", "0", sock=sock)
        fresh_answers(sock)

        lines = client_lines(sock)
        assert {a for _, a in lines} == {"hello-encrypted"}, [x for x in lines if x[1] != "hello-encrypted"]
        assert [n for n, _ in lines] == list(range(1, len(lines) + 1))  # no fetch missing from the log

        # h2's agent is killed and started again: its containers and SAs stay, it gets the keys again.
        # Meanwhile h1 takes h2's endpoints out of service (as for any network), and h2's web task is
        # replaced once h2 is back; then the answers come again, still encrypted.
        lab("kill", "h2")
        wait_for(lambda: any(
            n["status"]["state"] == "DOWN" for n in json.loads(swarmctl("node", "ls", "--format", "json",
                                                                         sock=sock).stdout)), "h2 down", 60)
        lab("start", "h2")
        wait_for(lambda: all(
            n["status"]["state"] == "READY" for n in json.loads(swarmctl("node", "ls", "--format", "json",
                                                                          sock=sock).stdout)), "h2 ready again", 60)
        fresh_answers(sock)
        assert len(host_xfrm("h2")[0]) == 4
        sniffer = sniff_between(ul, "198.18.0.1", "198.18.0.2", 3)
        seen = set(captured(sniffer))
        assert (50, 0) in seen and (17, 4789) not in seen, seen

        # the services and the network go: so do every SA, policy and the hosts' ipsec tables
        swarmctl("service", "rm", "client", "web", sock=sock)
        wait_for(lambda: not json.loads(
            swarmctl("task", "ls", "--format", "json", sock=sock).stdout), "the tasks to go", 60)
        swarmctl("network", "rm", "secure", sock=sock)
        for h in st.hosts:
            wait_for(lambda h=h: host_xfrm(h.name) == ([], []), f"{h.name} to drop its SAs", 30)
            assert ("ip", ESP_TABLE) not in nft.list_tables(h.netns)
    finally:
        lab("down", check=False)


@pytest.mark.uml
def test_lab_encrypted_in_uml() -> None:
    """Runs the test above inside a User-Mode Linux kernel that has IPsec ESP."""
    if xfrm.esp_supported() or os.environ.get("SHOAL_UML"):
        pytest.skip("this kernel has IPsec ESP: the test above ran directly")
    import uml

    r = uml.pytest([os.path.relpath(__file__, uml.REPO)], mem="3G", timeout=280,
                   env={"SHOAL_LAB_DIR": "/tmp/shoal-lab"})
    tail = "\n".join(r.output.splitlines()[-40:])
    assert r.returncode == 0, f"inside UML:\n{tail}"
    assert re.search(r"\b1 passed\b", r.output), tail
