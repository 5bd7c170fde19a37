"""The demo stack on its own lab (3 managers + 2 workers), through real `swarmctl` processes: a
rolling update of `web` (parallelism 1, start-first) is invisible to the client — no failed request
while and after it runs —, the stack keeps serving while the leader is partitioned, and `stack rm`
leaves no container, network or sandbox behind. Needs root."""

from __future__ import annotations

import json
import os
import re
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers import waiting
from helpers.swarmctl import SWARMCTL

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
NAME = f"ls{os.getpid() % 10000}"
ANSWER = re.compile(r"^(\d\d:\d\d:\d\d) (.*)$")


def wait_for(cond: Callable[[], Any], what: str, timeout: float = 60) -> Any:
    """helpers.waiting.wait_for with the lab's pace: a minute by default, a look every 0.2 s."""
    return waiting.wait_for(cond, what, timeout, interval=0.2)


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(") ", 1)[1][0] != "Z"
    except OSError:
        return False


def ctl(*args: str, sock: str = "", check: bool = True, timeout: float = 180) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "SWARM_SOCKET"}
    if sock:
        env["SWARM_SOCKET"] = sock
    r = subprocess.run([*SWARMCTL, *args], capture_output=True, text=True, timeout=timeout, env=env)
    if check and r.returncode != 0:
        raise AssertionError(f"swarmctl {' '.join(args)} exited {r.returncode}:\n{r.stdout}\n{r.stderr}")
    return r


@pytest.fixture(scope="module")
def sock() -> Iterator[str]:
    if os.geteuid() != 0:
        pytest.fail("the lab tests need root (or deselect them with -m 'not integration')")
    try:
        up = ctl("lab", "up", "--name", NAME)
        yield up.stdout.strip().split("=", 1)[1]
    finally:
        ctl("lab", "down", "--name", NAME, check=False)


def client_lines(sock: str) -> list[tuple[str, str]]:
    """(time, answer) of every request the client made, oldest first."""
    out = ctl("service", "logs", "demo_client", "--raw", sock=sock, check=False).stdout
    return [(m.group(1), m.group(2)) for ln in out.splitlines() if (m := ANSWER.match(ln.strip()))]


def web_tasks(sock: str) -> list[dict]:
    tasks = json.loads(ctl("task", "ls", "--format", "json", sock=sock).stdout)
    return [t for t in tasks if t.get("service_annotations", {}).get("name") == "demo_web"]


def deploy(sock: str) -> None:
    ctl("stack", "deploy", "-f", str(ROOT / "examples" / "demo-stack.yml"), "demo", sock=sock)


def test_rolling_update_is_invisible_to_the_client(sock: str) -> None:
    deploy(sock)
    wait_for(lambda: len(client_lines(sock)) >= 3, "the client's first answers")
    old = {t["id"] for t in web_tasks(sock) if t["desired_state"] == "RUNNING"}
    assert len(old) == 3
    seen_before = len(client_lines(sock))
    # a rolling update (parallelism 1, start-first, from the stack file): a new replica starts
    # before each old one stops
    ctl("service", "update", "--force", "demo_web", sock=sock)
    new = {t["id"] for t in web_tasks(sock) if t["desired_state"] == "RUNNING" and t["status"]["state"] == "RUNNING"}
    assert len(new) == 3 and not new & old
    # ten more requests after the update converged (the old replicas are gone by then)
    wait_for(lambda: len(client_lines(sock)) >= seen_before + 10 + 3, "ten more answers", 60)
    during = client_lines(sock)[seen_before:]
    failed = [ln for ln in during if "says hello from Shoal" not in ln[1]]
    assert failed == [], f"{len(failed)} of {len(during)} requests failed: {failed[:5]}"
    answered_by = set(re.findall(r"container (\w{12})\)", " ".join(a for _, a in during[-6:])))
    assert answered_by <= {t[:12] for t in new}, "answers from replaced replicas"


def lab_status() -> dict[str, dict]:
    return {r["host"]: r for r in json.loads(ctl("lab", "status", "--name", NAME, "--format", "json").stdout)}


def test_stack_keeps_serving_with_the_leader_partitioned(sock: str) -> None:
    # a fresh stack: nothing left over from the update above
    ctl("stack", "rm", "demo", sock=sock, check=False)
    deploy(sock)
    wait_for(lambda: len(client_lines(sock)) >= 1, "the client's answers")
    leader = next(h for h, r in lab_status().items() if r["leader"])
    other = next(h for h, r in lab_status().items() if r["role"] == "manager" and h != leader)
    other_sock = str(Path(sock).parent.parent / other / "swarmd.sock")
    ctl("lab", "partition", leader, "--name", NAME)
    try:
        # a new leader accepts writes (through another manager) ...
        def write() -> bool:
            r = ctl("service", "create", "-d", "--name", "probe", "--replicas", "1", "--init", "busybox",
                    "sleep", "1000", sock=other_sock, check=False, timeout=30)
            return r.returncode == 0 or "already exists" in r.stderr

        wait_for(write, "a write accepted by a new leader", 60)
        # ... and the stack keeps serving: five answers in a row from the web replicas still reachable
        def five_in_a_row() -> bool:
            tail = [a for _, a in client_lines(other_sock)[-5:]]
            return len(tail) == 5 and all("says hello from Shoal" in a for a in tail)

        wait_for(five_in_a_row, "the client to get answers again", 60)
    finally:
        ctl("lab", "heal", leader, "--name", NAME)
        ctl("service", "rm", "probe", sock=other_sock, check=False)
    wait_for(lambda: all(r["state"] == "ready" for r in lab_status().values()), "every host ready after the heal", 60)


def test_stack_rm_leaves_no_container_network_or_sandbox(sock: str) -> None:
    deploy(sock)
    wait_for(lambda: len(client_lines(sock)) >= 1, "the client's answers")
    pids = [int(t["status"].get("container", {}).get("pid", 0)) for t in web_tasks(sock)]
    assert any(pids)
    ctl("stack", "rm", "demo", sock=sock)
    wait_for(lambda: not any(alive(p) for p in pids if p), "every demo container to end", 60)
    nets = json.loads(ctl("network", "ls", "--format", "json", sock=sock).stdout)
    assert [n["spec"]["annotations"]["name"] for n in nets] == ["ingress"]
    # no container or overlay sandbox of the stack left on any host: only the ingress network's
    ingress = nets[0]["id"][:12]
    for h in ("h1", "h2", "h3", "h4", "h5"):
        wait_for(lambda h=h: sandboxes(h, ingress) == [], f"{h}'s demo sandboxes to go", 30)


def sandboxes(host: str, ingress: str) -> list[str]:
    """Network namespaces the node made on a host, except its ingress sandbox and overlay."""
    out = ctl("lab", "exec", host, "--name", NAME, "--", "ip", "netns").stdout
    names = [ln.split()[0] for ln in out.splitlines() if ln.strip()]
    return [n for n in names if not n.endswith("-ingress-sbox") and not n.endswith(f"-ov-{ingress}")]
