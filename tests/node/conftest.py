"""Fixtures of the swarmd end-to-end tests."""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from helpers.swarmd import Swarmd as Daemon


@pytest.fixture
def daemons(tmp_path: Path) -> Iterator[Callable[..., Daemon]]:
    """`daemons(name, ip, extra, kind=Swarmd)`: a swarmd (not started) under a short base dir; every one is killed,
    its log kept next to pytest's tmp_path and the base removed at the end."""
    base = Path(f"/tmp/sd{os.getpid() % 10000}-{time.monotonic_ns() % 100000}")  # short: unix socket paths
    base.mkdir()
    made: list[Daemon] = []

    def make(name: str, ip: str, extra: list[str] | None = None, kind: type[Daemon] = Daemon) -> Daemon:
        d = kind(base, name, ip, extra)
        made.append(d)
        return d

    make.made, make.base = made, base  # type: ignore[attr-defined]  # for fixtures built on this one
    try:
        yield make
    finally:
        for d in made:
            d.kill()
        for d in made:  # a killed swarmd's etcd member gets SIGTERM and stops by itself
            d.wait_etcd_gone()
        for d in made:  # keep the logs of a failed run next to pytest's tmp_path
            if d.log.exists():
                (tmp_path / d.log.name).write_bytes(d.log.read_bytes())
        subprocess.run(["rm", "-rf", str(base)], check=False)
