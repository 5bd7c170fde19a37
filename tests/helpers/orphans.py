"""A child process that must end with its parent (PR_SET_PDEATHSIG): kill the parent, watch the child."""

from __future__ import annotations

import os
import signal
import subprocess
import time

from shoal.manager.etcdmember import process_alive


def ends_with_its_parent(parent: subprocess.Popen[str], child_pid: int, timeout: float) -> bool:
    """SIGKILL `parent` (no cleanup of its own runs), then whether process `child_pid` ended (gone
    or a zombie) within `timeout` s."""
    os.kill(parent.pid, signal.SIGKILL)
    parent.wait(5)
    deadline = time.monotonic() + timeout
    while process_alive(child_pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    return not process_alive(child_pid)


def end_both(parent: subprocess.Popen[str], child_pid: int) -> None:
    """Whatever a failed test left: the parent, and the child by its pid (0: none was started)."""
    if parent.poll() is None:
        parent.kill()
        parent.wait()
    if child_pid and process_alive(child_pid):
        os.kill(child_pid, signal.SIGKILL)
