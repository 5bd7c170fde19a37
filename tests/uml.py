"""Run commands (and pytest) inside a User-Mode Linux kernel, for kernel features the host lacks.

The kernel is built from Debian's newest linux-source by ``scripts/uml-kernel`` into
``/var/cache/shoal/uml`` (``$SHOAL_UML_CACHE``), with everything the tests need built in (no modules);
``scripts/test`` builds it in the background while the other tests run, and the first use here waits
for that build (:func:`await_build`). It runs as an ordinary host process (as root) with the host's root
filesystem mounted read-only through hostfs, so the guest sees this checkout and its virtualenv at
the same paths and cannot change anything on the host. The guest gets fresh tmpfs mounts on
``/tmp``, ``/run``, ``/var/tmp`` and ``/dev/shm`` (the host's ``/tmp`` is hidden there, except a
checkout under it, mounted again read-only: hand files to the guest elsewhere, or write them from
the command itself), its own devtmpfs ``/dev``, proc, sysfs, cgroup2,
``lo`` up. Nothing but lo: the guest has no network to the host.

Import it as the other shared helpers are imported (``tests/`` is on ``sys.path`` under pytest)::

    import uml

    r = uml.run(["ip", "xfrm", "state"])           # UmlResult(returncode=0, output='...')
    r = uml.pytest(["tests/netdriver/test_x.py", "-k", "esp"], timeout=600)
    assert r.returncode == 0, r.output
"""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import subprocess
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "scripts" / "uml-kernel"
STAMP = Path(os.environ.get("SHOAL_UML_CACHE", "/var/cache/shoal/uml")) / "stamp"
PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# scripts/test builds the kernel in the background while the other tests run: it names the build's
# log here, and writes the build's exit status to ``<log>.rc`` when it ends.
BUILD_LOG = os.environ.get("SHOAL_UML_BUILD_LOG", "")
BUILD_WAIT = 1800.0  # seconds: a cold build is ~6 min on 2 cores alone, longer beside the other tests


class UmlError(RuntimeError):
    """The kernel could not be prepared, or the guest crashed or timed out."""


@dataclass(frozen=True)
class UmlResult:
    returncode: int
    output: str  # what the command wrote (stdout and stderr, interleaved as on a terminal)
    console: str = ""  # the whole console: kernel messages, init, the command's output, the exit line


def inside() -> bool:
    """True in a guest started by :func:`pytest` (no UML inside UML)."""
    return os.environ.get("SHOAL_UML") == "1"


def _stamp() -> dict[str, str]:
    try:
        lines = STAMP.read_text().splitlines()
    except FileNotFoundError:
        return {}
    return dict(ln.split("=", 1) for ln in lines if "=" in ln)


_build_outcome: list[str] = []  # once the background build has ended: "" (it succeeded) or why it failed


def await_build(timeout: float = BUILD_WAIT) -> str:
    """Wait for the kernel build scripts/test started in the background (``SHOAL_UML_BUILD_LOG``) to
    end. Returns "" when it succeeded or none was started, else a message saying why not: it failed
    (with the end of its log) or did not end within ``timeout`` seconds (the build goes on)."""
    if not BUILD_LOG:
        return ""
    if _build_outcome:
        return _build_outcome[0]
    rc_file = Path(BUILD_LOG + ".rc")
    deadline = time.monotonic() + timeout
    while not (rc := _read_rc(rc_file)):  # scripts/test renames it into place; an empty one is not done
        if time.monotonic() > deadline:
            return (f"the UML kernel build scripts/test started in the background has not ended after {timeout:g} s; "
                    f"its log {BUILD_LOG} ends with:\n{_tail(_read(BUILD_LOG))}")
        time.sleep(0.25)
    _build_outcome.append("" if rc == "0" else f"scripts/uml-kernel failed (exit {rc}) in the background; its log "
                                                f"{BUILD_LOG} ends with:\n{_tail(_read(BUILD_LOG))}")
    return _build_outcome[0]


def _read_rc(path: Path) -> str:
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        return ""


def _read(path: str) -> str:
    try:
        return Path(path).read_text(errors="replace")
    except OSError as e:
        return f"(cannot read it: {e})"


def _prepared() -> dict[str, str]:
    failed = await_build()
    if failed:
        raise UmlError(failed)
    info = _stamp()
    if info.get("LINUX") and os.access(info["LINUX"], os.X_OK):
        return info
    r = subprocess.run([str(SCRIPT)], capture_output=True, text=True, timeout=1800)  # a build: minutes
    if r.returncode != 0:
        raise UmlError(f"scripts/uml-kernel failed (exit {r.returncode}): {r.stderr.strip()[-2000:]}")
    info = _stamp()
    if not info.get("LINUX"):
        raise UmlError(f"scripts/uml-kernel wrote no usable {STAMP}")
    return info


def kernel() -> Path:
    """The prepared UML ``linux`` binary (prepares it first when missing: root and network needed)."""
    return Path(_prepared()["LINUX"])


def _repo_mount() -> str:
    """A checkout under one of the guest's fresh tmpfs mounts (CI may clone into /tmp) is hidden by
    it: mount it again there, read-only, from the host."""
    q = shlex.quote
    if not any(REPO == Path(d) or Path(d) in REPO.parents for d in ("/tmp", "/var/tmp", "/run", "/dev/shm")):
        return ""
    return f"mkdir -p {q(str(REPO))}\nmount -r -t hostfs -o {q(str(REPO))} none {q(str(REPO))}\n"


def _init_script(argv: list[str], env: dict[str, str], mark: str) -> str:
    q = shlex.quote
    cmd_env = {"PATH": PATH, "HOME": "/root", "LANG": "C.UTF-8", "TERM": "dumb", "PYTHONDONTWRITEBYTECODE": "1", **env}
    assignments = " ".join(q(f"{k}={v}") for k, v in cmd_env.items())
    return f"""#!/bin/sh
# PID 1 of a UML guest, generated by tests/uml.py. The shell holds this file open: mounting over
# its directory below does not stop it from reading on.
export PATH={q(PATH)}
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t cgroup2 cgroup2 /sys/fs/cgroup 2>/dev/null
mount -t tmpfs -o mode=1777 tmpfs /tmp
mount -t tmpfs -o mode=1777 tmpfs /var/tmp
mount -t tmpfs -o mode=0755 tmpfs /run
mkdir -p /dev/shm /dev/pts /dev/mqueue
mount -t tmpfs -o mode=1777 tmpfs /dev/shm
mount -t devpts -o newinstance,ptmxmode=0666 devpts /dev/pts
mount -t mqueue mqueue /dev/mqueue 2>/dev/null
ln -sf /proc/self/fd /dev/fd
ln -sf /proc/self/fd/0 /dev/stdin
ln -sf /proc/self/fd/1 /dev/stdout
ln -sf /proc/self/fd/2 /dev/stderr
{_repo_mount()}ip link set lo up
hostname shoal-uml
cd {q(str(REPO))} || echo "cannot cd to {REPO}"
echo {q(mark)} start
env -i {assignments} {" ".join(q(a) for a in argv)} </dev/null 2>&1
echo {q(mark)} "exit=$?"
halt -f 2>/dev/null || echo o >/proc/sysrq-trigger
"""


def _shm_dir() -> str | None:
    """/dev/shm when it is a tmpfs."""
    try:
        with open("/proc/self/mountinfo") as f:
            if any(ln.split()[4] == "/dev/shm" and " - tmpfs " in ln for ln in f):
                return "/dev/shm"
    except OSError:
        pass
    return None


def _tail(text: str, n: int = 30) -> str:
    return "\n".join(text.splitlines()[-n:])


def run(argv: list[str], *, env: dict[str, str] | None = None, timeout: float = 300, mem: str = "1G") -> UmlResult:
    """Boot the UML kernel, run ``argv`` as root in this checkout (cwd) and halt.

    ``env`` is the command's whole environment on top of PATH, HOME=/root (read-only, as all but
    the tmpfs mounts), LANG=C.UTF-8, TERM=dumb (no colours) and PYTHONDONTWRITEBYTECODE=1: the host's
    environment does not leak in. stdin is /dev/null; stdout and stderr go to the guest's console. Raises :class:`UmlError`
    when the guest dies before the command's exit line or does not halt within ``timeout`` seconds
    (boot included); the UML process group is killed in every case.
    """
    if inside():
        raise UmlError("already inside a UML guest")
    info = _prepared()
    mark = f"SHOAL-UML-{uuid.uuid4().hex}"
    rundir = tempfile.mkdtemp(prefix="shoal-uml-")  # seen at the same path by the guest's hostfs root
    try:
        init = Path(rundir) / "init"
        init.write_text(_init_script(list(argv), dict(env or {}), mark))
        init.chmod(0o755)
        cmdline = [info["LINUX"], f"mem={mem}", "root=/dev/root", "rootfstype=hostfs", "rootflags=/", "ro",
                   "quiet", f"init={init}", "con=null", "con0=fd:0,fd:1"]
        # UML backs the guest's memory with an unnamed file (O_TMPFILE) in $TMPDIR: keep it in RAM.
        console = _boot(cmdline, {**os.environ, "TMPDIR": _shm_dir() or rundir}, timeout)
    finally:
        shutil.rmtree(rundir, ignore_errors=True)
    start, end = f"{mark} start\n", f"{mark} exit="
    i = console.find(end)
    if i < 0:
        raise UmlError(f"the UML guest crashed before the command finished; its last console lines:\n{_tail(console)}")
    j = console.find(start)
    output = console[j + len(start):i] if 0 <= j < i else ""
    code = console[i + len(end):].split("\n", 1)[0].strip()
    return UmlResult(int(code), output, console)


def _boot(cmdline: list[str], host_env: dict[str, str], timeout: float) -> str:
    proc = subprocess.Popen(cmdline, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            env=host_env, start_new_session=True)
    chunks: list[bytes] = []
    reader = threading.Thread(target=lambda: chunks.extend(iter(lambda: proc.stdout.read1(65536), b"")), daemon=True)
    reader.start()
    deadline = time.monotonic() + timeout
    timed_out = False
    try:
        # Wait without reaping: while the leader is a zombie its process group id cannot be reused,
        # so the group kill below reaches only UML's own processes.
        while os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is None:
            if time.monotonic() > deadline:
                timed_out = True
                break
            time.sleep(0.02)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()
        reader.join(10)
        proc.stdout.close()
    console = b"".join(chunks).decode(errors="replace").replace("\r\n", "\n").replace("\r", "\n")
    if timed_out:
        raise UmlError(f"the UML guest did not finish within {timeout:g} s (killed); its last console lines:\n"
                       f"{_tail(console)}")
    return console


def pytest(args: list[str], *, env: dict[str, str] | None = None, timeout: float = 300, mem: str = "1G") -> UmlResult:
    """``.venv/bin/python -m pytest -p no:cacheprovider -q ARGS`` in a guest, with SHOAL_UML=1 (and the
    host's CI, when set, so that the guest's leftover guard is as strict as the host's)."""
    base = {"SHOAL_UML": "1"}
    if os.environ.get("CI"):
        base["CI"] = os.environ["CI"]
    argv = [str(REPO / ".venv" / "bin" / "python"), "-m", "pytest", "-p", "no:cacheprovider", "-q", *args]
    return run(argv, env={**base, **(env or {})}, timeout=timeout, mem=mem)
