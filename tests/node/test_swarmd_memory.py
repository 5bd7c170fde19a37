"""What a worker swarmd loads (issue #7, agent idle RSS): not the manager role, not pyroute2's
whole package; and nothing a caller asks pyroute2 for goes missing. Each check runs in a fresh
interpreter so that this test process's own imports do not count."""

from __future__ import annotations

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
