"""swarmd for the agent's cluster test: the real daemon, with `start_agent_task` as its agent hook
whenever swarmd's own hook starts no agent (until the lead wires it in node/swarmd.py).

    python tests/agent/run_swarmd.py SWARMD-ARGS...
"""

from __future__ import annotations

import sys

import shoal.node.swarmd as swarmd
from shoal.agent.agent import start_agent_task

_orig = swarmd.start_agent


async def _hook(ctx):  # type: ignore[no-untyped-def]
    task = await _orig(ctx)
    return task if task is not None else start_agent_task(ctx)


swarmd.start_agent = _hook

if __name__ == "__main__":
    swarmd.main(sys.argv[1:])
