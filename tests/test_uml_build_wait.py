"""tests/uml.py waiting for the kernel build scripts/test runs in the background: the build's outcome,
read from ``<log>.rc``, becomes the UML tests' (a failure names the log and shows its end)."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
import uml


@pytest.fixture
def build_log(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    log = tmp_path / "build-1.log"
    monkeypatch.setattr(uml, "BUILD_LOG", str(log))
    monkeypatch.setattr(uml, "_build_outcome", [])
    return log


def test_no_background_build_means_nothing_to_wait_for(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(uml, "BUILD_LOG", "")
    assert uml.await_build(timeout=0) == ""


def test_waits_for_the_exit_status_and_a_success_says_nothing(build_log: Path) -> None:
    build_log.write_text("uml-kernel: building\n")
    threading.Timer(0.5, lambda: Path(f"{build_log}.rc").write_text("0\n")).start()
    t0 = time.monotonic()
    assert uml.await_build(timeout=10) == ""
    assert time.monotonic() - t0 >= 0.5


def test_a_failed_build_names_its_log_and_shows_its_end(build_log: Path) -> None:
    build_log.write_text("".join(f"line {i}\n" for i in range(100)) + "uml-kernel: building the kernel failed\n")
    Path(f"{build_log}.rc").write_text("1\n")
    msg = uml.await_build(timeout=10)
    assert msg.startswith(f"scripts/uml-kernel failed (exit 1) in the background; its log {build_log} ends with:")
    assert msg.endswith("line 99\numl-kernel: building the kernel failed")
    assert "line 69\n" not in msg  # only the end of the log
    with pytest.raises(uml.UmlError, match="failed \\(exit 1\\) in the background"):
        uml.kernel()


def test_a_build_still_going_at_the_timeout_is_reported_as_such(build_log: Path) -> None:
    build_log.write_text("uml-kernel: building a UML kernel\n")
    msg = uml.await_build(timeout=0.2)
    assert "has not ended after 0.2 s" in msg and str(build_log) in msg and "building a UML kernel" in msg
