"""What a worker swarmd loads (issue #7, agent idle RSS): not the manager role, not pyroute2's
whole package; and nothing a caller asks pyroute2 for goes missing. Each check runs in a fresh
interpreter so that this test process's own imports do not count."""

from __future__ import annotations

import re
import subprocess
import sys

WORKER_IMPORTS = """
import sys
from shoal.node import swarmd
swarmd._lazy_pyroute2()
import shoal.agent.agent, shoal.agent.engine, shoal.agent.network  # what a worker's swarmd runs
heavy = sorted(m for m in sys.modules if m.startswith(("shoal.manager.manager", "shoal.manager.etcdstore",
               "shoal.manager.etcdmember", "pyroute2.ndb", "pyroute2.ipdb", "pyroute2.nftables", "sqlite3")))
assert not heavy, heavy
from pyroute2 import IPRoute, NetlinkError, netns
import pyroute2.iproute.linux, pyroute2.netlink.exceptions
assert IPRoute is pyroute2.iproute.linux.IPRoute and NetlinkError is pyroute2.netlink.exceptions.NetlinkError
from pyroute2 import NDB  # any other name loads the whole package on first use
import pyroute2
assert pyroute2.NDB is NDB and netns.listnetns is not None
print("ok")
"""

MANAGER_ON_DEMAND = """
import sys
from shoal.node import swarmd
assert "shoal.manager.manager" not in sys.modules
from shoal.manager.manager import Manager, ManagerConfig
print("ok")
"""


def run(code: str) -> str:
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    return p.stdout.strip()


def test_worker_loads_no_manager_role_and_no_whole_pyroute2() -> None:
    assert run(WORKER_IMPORTS) == "ok"


def test_manager_role_is_imported_on_demand() -> None:
    assert run(MANAGER_ON_DEMAND) == "ok"


COLLECTIONS = """
import gc, logging, sys
from shoal.node import swarmd
logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="%(message)s")
gc.disable()  # only the collections below
swarmd._watch_collections()
def cycles(n):
    c = [[i] for i in range(n)]
    for x in c:
        x.append(x)
    return c
old = cycles(500)  # alive at the first full collection: frozen by it
junk = cycles(1000)
del junk
swarmd.GC_LOG_AFTER = 0.0
gc.collect(2)
print("frozen", gc.get_freeze_count() >= 500)
del old  # garbage among frozen objects
new = cycles(200)
del new
gc.collect(2)  # walks only what came after the freeze
swarmd.GC_REFREEZE = 0.0
gc.collect(2)  # walks everything again first
swarmd.GC_LOG_AFTER = 3600
gc.collect(2)  # shorter than the threshold: not logged
print("end")
"""


def test_full_collections_walk_what_came_since_the_last_and_long_ones_are_logged() -> None:
    """swarmd logs each garbage collection that held the process for GC_LOG_AFTER s or more, with
    its generation, its time and what it collected. Objects alive after a full collection are
    frozen: the next full collection walks (and frees) only newer ones, and once GC_REFREEZE s
    passed one walks everything again, freeing garbage among the old objects too."""
    lines = run(COLLECTIONS).splitlines()
    pattern = r"gc: a generation-2 collection took \d+\.\d\d s \((\d+) objects collected\)"
    got = [m.group(1) if (m := re.fullmatch(pattern, ln)) else ln for ln in lines]
    assert got == ["1000", "frozen True", "200", "500", "end"], lines


CENSUS = """
import asyncio, logging, os, signal, sys
from shoal.node import swarmd
logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="%(message)s")
os.environ["SWARMD_MEMDEBUG"] = "1"

class Kept:
    pass

async def waiting_for_the_census(done):
    await done.wait()

async def main():
    swarmd._memdebug_install()
    kept = [Kept() for _ in range(50_000)]
    done = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGUSR2, lambda: (swarmd._memory_census(), done.set()))
    waiters = [asyncio.create_task(waiting_for_the_census(done)) for _ in range(3)]
    os.kill(os.getpid(), signal.SIGUSR2)
    await asyncio.gather(*waiters)
    print("kept", len(kept))

asyncio.run(main())
"""


def test_the_memory_census_names_the_objects_the_tasks_and_the_lines_that_allocated() -> None:
    """SIGUSR2 logs where swarmd's memory is: resident size before and after malloc gave its free
    memory back, the tracked Python objects by type, the asyncio tasks by coroutine and, with
    SWARMD_MEMDEBUG, the lines that allocated the most."""
    out = run(CENSUS)
    assert re.search(r"SIGUSR2 memory: VmRSS \d+ kB \(\d+ kB after malloc_trim\), \d+ tracked objects", out), out
    assert re.search(r"\n +50000 +\d+\.\d MB  Kept\n", out), out
    assert re.search(r"\d+ asyncio tasks, by coroutine:\n(.*\n)*? +3  waiting_for_the_census\n", out), out
    assert re.search(r"tracemalloc: \d+\.\d MB traced; by line:\n +\d+\.\d MB +\d+  <string>:\d+", out), out
    assert out.endswith("kept 50000"), out
