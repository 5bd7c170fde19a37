"""The generated protobuf modules must match the .proto sources."""

import filecmp
import shutil
import subprocess
import sys
from pathlib import Path

TOP = Path(__file__).resolve().parents[1]


def test_generated_modules_are_fresh(tmp_path: Path) -> None:
    work = tmp_path / "repo"
    (work / "proto").mkdir(parents=True)
    (work / "scripts").mkdir()
    for src in (TOP / "proto").glob("*.proto"):
        shutil.copy(src, work / "proto")
    shutil.copy(TOP / "scripts" / "genproto", work / "scripts")
    subprocess.run([str(work / "scripts" / "genproto")], check=True, env={"PYTHON": sys.executable, "PATH": "/usr/bin:/bin"})
    generated = sorted(p.name for p in (work / "proto").iterdir() if p.suffix != ".proto")
    committed = sorted(p.name for p in (TOP / "proto").iterdir() if "_pb2" in p.name)
    assert generated == committed, "scripts/genproto makes a different set of modules: run it and commit"
    stale = [n for n in generated if not filecmp.cmp(work / "proto" / n, TOP / "proto" / n, shallow=False)]
    assert not stale, f"stale generated modules {stale}: run scripts/genproto and commit"
