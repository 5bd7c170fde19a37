"""The runtime processes: conmon, the shim that runs ``runc create`` and outlives the agent, and runc.

`Runtime` knows where this engine's runc state and conmon sockets live. `Runtime.spawn` starts
conmon on a written bundle and returns once runc has created the container (or says, in one
sentence, why it could not); `Runtime.runc` runs one runc command (start, kill, delete);
`Runtime.exec_argv` is the ``runc exec`` command line that health probes and `Engine.exec` use.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

from shoal.agent.engine.errors import EngineError, ExecutableNotFound, RuntimeFailed
from shoal.agent.engine.state import Meta

RUNC = shutil.which("runc", path="/usr/sbin:/usr/bin:/sbin:/bin") or "/usr/sbin/runc"
CONMON = shutil.which("conmon", path="/usr/bin:/usr/libexec/podman:/usr/sbin") or "/usr/bin/conmon"


class Runtime:
    def __init__(self, runc_root: Path, sock_dir: Path, *, log_size_max: int) -> None:
        self.runc_root = runc_root
        self.sock_dir = sock_dir
        self.log_size_max = log_size_max

    async def runc(self, *args: str, check: bool = True) -> tuple[int, str]:
        """(exit code, runc's error line or output); RuntimeFailed on a non-zero exit when ``check``."""
        try:
            p = await asyncio.create_subprocess_exec(
                RUNC,
                "--root",
                str(self.runc_root),
                *args,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
            )
        except FileNotFoundError:
            raise RuntimeFailed(f"{RUNC} is not installed on this node (Debian package runc)") from None
        out, err = await p.communicate()
        rc = p.returncode or 0
        msg = runc_error(err.decode(errors="replace")) or out.decode(errors="replace").strip()
        if check and rc != 0:
            raise RuntimeFailed(f"runc {args[0]} {args[-1]} failed: {msg}")
        return rc, msg

    def exec_argv(self, meta: Meta, argv: list[str], pidfile: str | None = None) -> list[str]:
        """``runc exec`` of ``argv`` in the container, as its user, in its workdir and environment."""
        out = [RUNC, "--root", str(self.runc_root), "exec", "--cwd", meta.exec_cwd, "--user", meta.exec_user]
        for g in meta.exec_groups:
            out += ["--additional-gids", str(g)]
        for e in meta.exec_env:
            out += ["--env", e]
        if pidfile:
            out += ["--pid-file", pidfile]
        return out + [meta.id, *argv]

    async def spawn(self, cid: str, name: str, d: Path, rd: Path, *, tty: bool) -> tuple[int, int]:
        """Starts conmon on the bundle in ``rd``/bundle, logging to ``d``/ctr.log; returns once runc
        created the container: (container pid, conmon pid, 0 when unknown). A cancelled spawn still
        waits for runc create to finish, so that the caller's cleanup can undo it."""
        r, w = os.pipe()
        argv = [
            CONMON,
            "--api-version",
            "1",
            "-c",
            cid,
            "-u",
            cid,
            "-n",
            name,
            "-r",
            RUNC,
            "-b",
            str(rd / "bundle"),
            "-p",
            str(rd / "ctr.pid"),
            "-P",
            str(rd / "conmon.pid"),
            "-l",
            f"k8s-file:{d / 'ctr.log'}",
            "--log-size-max",
            str(self.log_size_max),
            "--exit-dir",
            str(rd / "exit"),
            "-0",
            str(rd / "persist"),
            "--socket-dir-path",
            str(self.sock_dir),
            "--runtime-arg",
            f"--root={self.runc_root}",
            "--log-level",
            "error",
            "--no-sync-log",
        ]
        if tty:
            argv.append("-t")  # conmon allocates the pty (console socket) and logs its output as stdout
        env = {"PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"), "_OCI_SYNCPIPE": str(w)}
        try:
            with open(rd / "conmon.log", "ab") as logf:
                # cwd: conmon writes an "oom" marker into its working directory (besides persist/)
                proc = await asyncio.create_subprocess_exec(
                    *argv,
                    env=env,
                    pass_fds=(w,),
                    stdin=subprocess.DEVNULL,
                    stdout=logf,
                    stderr=logf,
                    start_new_session=True,
                    cwd=str(rd),
                )
        except FileNotFoundError:
            os.close(r)
            raise RuntimeFailed(f"{CONMON} is not installed on this node (Debian package conmon)") from None
        finally:
            os.close(w)
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader()
        transport, _ = await loop.connect_read_pipe(
            lambda: asyncio.StreamReaderProtocol(reader), os.fdopen(r, "rb", 0)
        )

        async def result() -> tuple[int, bytes]:
            rc = await proc.wait()
            return rc, await asyncio.wait_for(reader.readline(), 60)

        done = asyncio.ensure_future(result())
        try:
            rc, line = await asyncio.shield(done)
        except asyncio.CancelledError:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(done, 60)
            raise
        except TimeoutError:
            raise RuntimeFailed(f"runc create of {cid} did not finish in 60 s") from None
        finally:
            transport.close()
        if rc != 0 and not line:
            raise RuntimeFailed(
                f"conmon failed for {cid} (exit {rc}): "
                f"{(rd / 'conmon.log').read_text(errors='replace').strip()[-300:]}"
            )
        try:
            res = json.loads(line)
        except ValueError:
            raise RuntimeFailed(f"conmon sent no create result for {cid}: {line[:200]!r}") from None
        pid = int(res.get("data", -1))
        if pid <= 0:
            raise create_error(res.get("message", ""), cid)
        try:
            conmon_pid = int((rd / "conmon.pid").read_text().strip())
        except (OSError, ValueError):
            conmon_pid = 0
        return pid, conmon_pid


def runc_error(stderr: str) -> str:
    """The msg="..." of runc's last error line, or the stderr text."""
    lines = [ln for ln in stderr.strip().splitlines() if ln.strip()]
    if not lines:
        return ""
    m = re.search(r'msg="((?:[^"\\]|\\.)*)"', lines[-1])
    return (m.group(1).encode().decode("unicode_escape") if m else lines[-1]).strip()


def create_error(message: str, cid: str) -> EngineError:
    msg = runc_error(message) or message.strip() or "unknown error"
    msg = msg.removeprefix("runc create failed: ")
    if "executable file not found" in msg or "no such file or directory" in msg and "exec:" in msg:
        return ExecutableNotFound(msg)
    return RuntimeFailed(f"runc create of {cid} failed: {msg}")
