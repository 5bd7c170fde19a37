"""Running the real ``swarmctl`` and checking how it ended."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Sequence

from helpers.paths import ROOT

_VENV_SWARMCTL = ROOT / ".venv" / "bin" / "swarmctl"
#: argv prefix that runs this checkout's swarmctl.
SWARMCTL = [str(_VENV_SWARMCTL)] if _VENV_SWARMCTL.exists() else [sys.executable, "-m", "shoal.cli.swarmctl"]


def _said(r: subprocess.CompletedProcess[str], args: Sequence[str]) -> str:
    return f"swarmctl {' '.join(args)}: rc {r.returncode}\n{r.stdout}\n{r.stderr}"


def expect_ok(r: subprocess.CompletedProcess[str], args: Sequence[str]) -> str:
    """Its stdout; asserts exit code 0."""
    assert r.returncode == 0, _said(r, args)
    return r.stdout


def expect_error(r: subprocess.CompletedProcess[str], args: Sequence[str], match: str, code: int = 1, *,
                 fold_case: bool = False, one_line: bool = False) -> str:
    """Its stderr; asserts exit code ``code``, stderr starting ``Error: `` and holding ``match`` (any case
    with ``fold_case``), and with ``one_line`` that stderr is a single line."""
    assert r.returncode == code, _said(r, args)
    assert r.stderr.startswith("Error: "), _said(r, args)
    if one_line:
        assert r.stderr.count("\n") == 1, _said(r, args)
    if fold_case:
        assert match.lower() in r.stderr.lower(), _said(r, args)
    else:
        assert match in r.stderr, _said(r, args)
    return r.stderr
