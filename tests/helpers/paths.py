"""Where things are: the checkout, the ``shared/`` folder beside it, and the ``swarmctl`` to run."""

from __future__ import annotations

from pathlib import Path

#: The checkout (the folder holding pyproject.toml).
ROOT = Path(__file__).resolve().parents[2]


def _shared() -> Path:
    """``shared/`` beside the checkout; in a git worktree, beside the main checkout when not beside this one."""
    here = ROOT.parent / "shared"
    git = ROOT / ".git"
    if here.is_dir() or not git.is_file():
        return here
    # A worktree's .git is a file "gitdir: <main>/.git/worktrees/<name>".
    gitdir = Path(git.read_text().partition("gitdir:")[2].strip())
    main = gitdir.parents[2] if gitdir.parent.name == "worktrees" else None
    return main.parent / "shared" if main is not None and (main.parent / "shared").is_dir() else here


#: The shared compose corpus and docs (CI and every checkout keep a copy of shared/ beside the repository;
#: a git worktree finds it beside its main checkout).
SHARED = _shared()
