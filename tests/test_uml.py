"""The User-Mode Linux harness (tests/uml.py): a guest kernel of its own, exit codes, ESP inside."""

from __future__ import annotations

import glob
import os
import sys
import tempfile
import uuid

import pytest
import uml

pytestmark = [pytest.mark.integration, pytest.mark.uml]


@pytest.fixture(scope="module", autouse=True)
def prepared() -> None:
    if uml.inside():
        pytest.skip("already inside a UML guest")
    if os.geteuid() != 0:
        pytest.skip("needs root (the kernel is prepared into /var/cache/shoal/uml)")
    uml.kernel()


def test_guest_runs_its_own_kernel() -> None:
    r = uml.run(["uname", "-r"])
    assert r.returncode == 0, r.console
    release = r.output.strip()
    assert release != os.uname().release
    assert int(release.split(".")[0]) >= 7, release


def test_exit_code_output_and_environment() -> None:
    script = 'echo out; echo "$GREETING" >&2; echo "${SHOAL_TEST_SESSION:-none}"; pwd; exit 3'
    r = uml.run(["sh", "-c", script], env={"GREETING": "hello there"})
    assert r.returncode == 3, r.console
    assert r.output.splitlines() == ["out", "hello there", "none", str(uml.REPO)]


def test_esp_sa_with_our_xfrm_client() -> None:
    code = (
        "from shoal.netdriver.xfrm import Xfrm\n"
        "x = Xfrm(None)\n"
        "x.add_sa('127.0.0.1', '127.0.0.2', 0x1234, bytes(36), 7)\n"  # AES-256 key + 4-byte salt
        "print([(s.src, s.dst, s.spi, s.reqid) for s in x.list_sas()])\n"
    )
    r = uml.run([sys.executable, "-c", code])
    assert r.returncode == 0, r.output
    assert r.output.strip() == "[('127.0.0.1', '127.0.0.2', 4660, 7)]"


def test_pytest_inside_sees_shoal_uml() -> None:
    r = uml.pytest(["tests/test_uml.py", "-k", "own_kernel", "-rs"])
    assert r.returncode == 0, r.output
    assert "1 skipped" in r.output and "already inside a UML guest" in r.output, r.output


def _ours(tag: str) -> list[int]:
    """Live host processes whose environment carries ``tag`` (UML's processes inherit ours)."""
    pids = []
    for d in glob.glob("/proc/[0-9]*"):
        try:
            if open(f"{d}/stat").read().rsplit(") ", 1)[1].startswith("Z"):
                continue
            if tag.encode() in open(f"{d}/environ", "rb").read():
                pids.append(int(d[6:]))
        except (OSError, IndexError):
            pass
    return [p for p in pids if p != os.getpid()]


@pytest.mark.parametrize(
    "argv,timeout,message",
    [(["sleep", "600"], 3, "did not finish within 3 s"),
     (["sh", "-c", "echo c >/proc/sysrq-trigger"], 60, "crashed before the command finished")],
    ids=["timeout", "panic"],
)
def test_timeout_and_crash_leave_nothing(monkeypatch: pytest.MonkeyPatch, argv: list[str], timeout: float,
                                         message: str) -> None:
    tag = f"SHOAL_UML_PROBE={uuid.uuid4().hex}"
    monkeypatch.setenv(*tag.split("="))
    before = set(glob.glob(f"{tempfile.gettempdir()}/shoal-uml-*")) | set(os.listdir("/dev/shm"))
    with pytest.raises(uml.UmlError, match=message):
        uml.run(argv, timeout=timeout)
    assert _ours(tag) == []
    assert set(glob.glob(f"{tempfile.gettempdir()}/shoal-uml-*")) | set(os.listdir("/dev/shm")) <= before
