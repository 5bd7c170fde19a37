"""Session-wide guard: the suite must leave nothing behind on the machine.

Every process the tests start inherits ``SHOAL_TEST_SESSION=<token>`` from this session's environment,
so a process left running is ours exactly when its environment holds our token (swarmd, registries,
lab holders; conmon gets a clean environment from the engine and is matched by start time instead).
Kernel objects carry no owner: under ``CI`` (a machine of our own) the session fails on any network
namespace, root-namespace link, nft table, mount or ``shoal-*`` cgroup that appeared during the session
and is still there at its end; elsewhere (engineers' shared machines, with other labs coming and going)
it only prints them. Names of other engineers' labs (``shoal-<lab>-…`` without this session's
``<pid % 10000>``) are never ours.

It also sorts the tests by speed: ``fast`` marks every test that is neither ``integration`` nor
``slow``; ``slow`` marks the unit tests listed in ``SLOW`` (those that take about half a second or
more on a 2-core machine: real swarmctl processes, property tests, control loops waiting out real
delays). ``-m fast`` is the quick answer (well under a minute), ``-m "not integration"`` all unit tests,
no ``-m`` everything (docs/testing.md).

Tests marked ``uml`` (they boot the User-Mode Linux kernel of tests/uml.py) run last, in their
collection order: scripts/test builds that kernel in the background meanwhile, and before the first
of them the session waits for the build outside the tests' own timeouts (a failed build fails each of
them with the end of the build's log). A whole-suite run of scripts/test runs them in a second
pytest beside the others, and the tests marked ``beside`` (they mostly wait out real timers) in a
third (``-m uml``, ``-m beside`` and ``-m "not uml and not beside"``); in those two
``SHOAL_LEFTOVER_SCOPE=processes`` limits the leftover check to that session's own processes.
"""

from __future__ import annotations

import fnmatch
import glob
import os
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest

MARK = "SHOAL_TEST_SESSION"

# Unit tests that take seconds, by file (relative to tests/) and test function name (fnmatch pattern;
# parametrized cases share their function's name). Measured with `pytest -m "not integration"
# --durations=0`; move a test here when it passes ~0.5 s, out when it gets quick.
SLOW: dict[str, tuple[str, ...]] = {
    "cli/test_stack.py": ("*",),  # real swarmctl processes against a served control API (1-13 s each)
    "cli/test_swarmctl.py": ("*",),  # the same
    "compose/test_compose_plan.py": ("test_redeploy_is_noop_and_updates_converge",),
    "compose/test_compose_properties.py": ("test_mutated_valid_document", "test_random_services",
                                           "test_random_documents"),
    "lab/test_vagrant.py": ("*",),  # `vagrant validate`
    "manager/test_dispatcher.py": ("test_heartbeat_expiry_marks_node_down_and_session_reopens",),
    "manager/test_keymanager.py": ("test_loop_follows_a_shorter_interval_at_once_and_stops_cleanly",),
    "manager/test_orchestrator_property.py": ("test_orchestrator_converges",),
    "manager/test_orchestrator_replicated.py": ("test_restart_delay_keeps_replacement_ready",
                                                "test_rejected_replacements_come_one_restart_delay_apart"),
    "manager/test_scheduler_property.py": ("test_scheduler_respects_every_filter",),
    "netdriver/test_gossip_tables.py": ("test_any_delivery_order_converges",),
    "node/test_swarmd_memory.py": ("*",),  # fresh interpreters importing the node
    "node/test_simnodes.py": ("test_bad_input_exits_2_naming_the_argument",),  # the command, run
    "node/test_metrics_endpoint.py": ("*",),  # the same
}
TESTS = os.path.dirname(os.path.abspath(__file__))
TOKEN = f"{os.getpid() % 10000}"


@dataclass
class Snapshot:
    netns: set[str] = field(default_factory=set)
    links: set[str] = field(default_factory=set)
    nft: set[str] = field(default_factory=set)
    mounts: set[str] = field(default_factory=set)
    cgroups: set[str] = field(default_factory=set)


def _is_slow(item: pytest.Item) -> bool:
    rel = os.path.relpath(str(item.path), TESTS)
    name = getattr(item, "originalname", item.name)
    return any(fnmatch.fnmatchcase(name, pat) for pat in SLOW.get(rel, ()))


UML_TIMEOUT = 1200  # seconds: longer than any test's own uml.run(timeout=…)


@pytest.hookimpl(tryfirst=True)  # before -m deselects by these marks
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark ``slow`` the tests listed in ``SLOW`` (unless ``integration``), and ``fast`` every other
    test that is not ``integration``. A ``uml`` test without a timeout of its own gets
    ``UML_TIMEOUT``: the guest's own deadline (``uml.run(timeout=…)``) ends a stuck guest first and
    says where it was, and beside the other pytests (``nice``d, on 2 cores) a guest runs slower than
    pytest's default 300 s allows."""
    for item in items:
        if item.get_closest_marker("uml") is not None and item.get_closest_marker("timeout") is None:
            item.add_marker(pytest.mark.timeout(UML_TIMEOUT))
        if item.get_closest_marker("integration") is not None:
            continue
        if item.get_closest_marker("slow") is None and _is_slow(item):
            item.add_marker(pytest.mark.slow)
        if item.get_closest_marker("slow") is None:
            item.add_marker(pytest.mark.fast)
    items.sort(key=lambda item: item.get_closest_marker("uml") is not None)  # stable: the UML ones last


@pytest.hookimpl(hookwrapper=True, tryfirst=True)  # outermost: before pytest-timeout starts the test's clock
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> Iterator[None]:
    """Before a ``uml`` test, wait for the kernel build scripts/test runs in the background (its
    outcome is the test's: tests/uml.py raises with the log's tail when the build failed)."""
    if item.get_closest_marker("uml") is not None:
        import uml

        uml.await_build()
    yield


def _lines(argv: list[str]) -> set[str]:
    try:
        r = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return set()
    return {ln.strip() for ln in r.stdout.splitlines() if ln.strip()}


def snapshot() -> Snapshot:
    try:
        netns = set(os.listdir("/run/netns"))
    except FileNotFoundError:
        netns = set()
    with open("/proc/self/mountinfo") as f:
        mounts = {ln.split()[4] for ln in f}
    return Snapshot(
        netns=netns,
        links=set(os.listdir("/sys/class/net")),
        nft=_lines(["nft", "list", "tables"]),
        mounts=mounts,
        # v1: one hierarchy per controller (/sys/fs/cgroup/memory/shoal-…); v2: one tree (/sys/fs/cgroup/shoal-…)
        cgroups=set(glob.glob("/sys/fs/cgroup/*/shoal-*")) | set(glob.glob("/sys/fs/cgroup/shoal-*")),
    )


def _foreign(name: str) -> bool:
    """Another engineer's lab (``shoal-<lab>-…``, ``/var/lib/shoal-lab/<lab>/…``) not made by this session."""
    if TOKEN in name:
        return False
    return name.removeprefix("/run/netns/").startswith("shoal-") or "/shoal-lab/" in name


def _cgroup_busy(path: str) -> bool:
    for procs in glob.glob(f"{path}/**/cgroup.procs", recursive=True):
        try:
            if open(procs).read().strip():
                return True
        except OSError:
            pass
    return False


def _boot_time() -> float:
    with open("/proc/stat") as f:
        for ln in f:
            if ln.startswith("btime "):
                return float(ln.split()[1])
    return 0.0


def leftover_processes(token: str, since: float | None) -> list[str]:
    """Processes carrying this session's token and, with ``since`` (epoch seconds), conmon and runc
    processes started since then that belong to no other lab."""
    hz = os.sysconf("SC_CLK_TCK")
    btime = _boot_time()
    out = []
    for d in glob.glob("/proc/[0-9]*"):
        pid = int(d[6:])
        if pid == os.getpid():
            continue
        try:
            with open(f"{d}/stat") as f:
                stat = f.read().rsplit(") ", 1)[1].split()
            if stat[0] == "Z":
                continue
            with open(f"{d}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
            with open(f"{d}/environ", "rb") as f:
                env = f.read().split(b"\0")
        except (OSError, IndexError):
            continue
        ours = f"{MARK}={token}".encode() in env
        if not ours and since is not None:
            started = btime + int(stat[19]) / hz
            exe = os.path.basename(cmd.split(" ", 1)[0]) if cmd else ""
            ours = started >= since and exe in ("conmon", "runc") and not _foreign(cmd)
        if ours:
            out.append(f"pid {pid}: {cmd[:200]}")
    return sorted(out)


def leftovers(before: Snapshot, token: str, since: float | None) -> dict[str, list[str]]:
    """What appeared since ``before`` and is still there; ``since`` None: only this session's processes."""
    if since is None:
        return {k: v for k, v in {"processes": leftover_processes(token, None)}.items() if v}
    after = snapshot()
    found = {
        "network namespaces": sorted(n for n in after.netns - before.netns if not _foreign(n)),
        "links in the root namespace": sorted(n for n in after.links - before.links if not _foreign(n)),
        "nft tables": sorted(t for t in after.nft - before.nft if not _foreign(t)),
        "mounts": sorted(m for m in after.mounts - before.mounts if m != "/run/netns" and not _foreign(m)),
        "cgroups": sorted(c for c in after.cgroups - before.cgroups if not _cgroup_busy(c)),
        "processes": leftover_processes(token, since),
    }
    return {k: v for k, v in found.items() if v}


@pytest.fixture(scope="session", autouse=True)
def no_leftovers(request: pytest.FixtureRequest) -> Iterator[None]:
    """Set first and torn down last: fails the session (or, outside CI, warns) on what it leaves."""
    if os.geteuid() != 0:
        yield  # without root the suite creates no kernel objects nor daemons
        return
    token = uuid.uuid4().hex
    os.environ[MARK] = token
    since = time.time() - 1
    before = snapshot()
    yield
    ci = bool(os.environ.get("CI"))
    # scripts/test's second pytest (the UML tests, beside the others): what appears on the host
    # meanwhile is the other session's; its own processes are what it can leave
    own_only = os.environ.get("SHOAL_LEFTOVER_SCOPE") == "processes"
    found = leftovers(before, token, None if own_only else since)
    if not found:
        return
    report = "the test session left these behind:\n" + "\n".join(
        f"  {kind}:\n" + "\n".join(f"    {x}" for x in items) for kind, items in found.items()
    )
    if ci or leftovers(before, token, None):
        pytest.fail(report, pytrace=False)
    tr = request.config.pluginmanager.get_plugin("terminalreporter")
    if tr is not None:
        tr.write_line("WARNING (not failing outside CI: other labs may own these): " + report, yellow=True)
