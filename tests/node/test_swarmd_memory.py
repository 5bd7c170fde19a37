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


LONG_COLLECTIONS = """
import gc, logging, sys
from shoal.node import swarmd
logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="%(message)s")
gc.disable()  # only the collections below
swarmd._log_long_collections()
cycles = [[i] for i in range(1000)]
for x in cycles:
    x.append(x)
del cycles, x
swarmd.GC_LOG_AFTER = 0.0
gc.collect(2)
swarmd.GC_LOG_AFTER = 3600
gc.collect(2)  # shorter than the threshold: not logged
"""


def test_a_long_garbage_collection_is_logged_with_its_generation_and_time() -> None:
    """swarmd logs each garbage collection that held the process for GC_LOG_AFTER s or more (a
    large manager's full collections stall its event loop), with its generation, its time and what
    it collected; a shorter one is not logged."""
    lines = run(LONG_COLLECTIONS).splitlines()
    assert len(lines) == 1, lines
    assert re.fullmatch(r"gc: a generation-2 collection took \d+\.\d\d s \(1000 objects collected\)", lines[0]), lines
