"""Helpers for the compose unit tests: write stack files into a temporary directory and load them."""

from __future__ import annotations

import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest

from shoal.compose import Project, load


@pytest.fixture
def stackdir(tmp_path: Path) -> Path:
    return tmp_path


@pytest.fixture
def write(stackdir: Path) -> Callable[[str, str], Path]:
    def _write(name: str, text: str) -> Path:
        path = stackdir / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text).lstrip("\n"))
        return path
    return _write


@pytest.fixture
def load_text(write: Callable[[str, str], Path]) -> Callable[..., Project]:
    def _load(text: str, name: str = "stack.yml", environment: dict[str, str] | None = None, **kw: object) -> Project:
        path = write(name, text)
        return load([path], environment=environment or {}, **kw)  # type: ignore[arg-type]
    return _load
