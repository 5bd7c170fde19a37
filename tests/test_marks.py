"""The ``SLOW`` table of tests/conftest.py names real tests: a slow test renamed or moved would
otherwise drop out of it without a word and run with the ``fast`` set."""

from __future__ import annotations

import ast
import fnmatch
from pathlib import Path

TESTS = Path(__file__).resolve().parent


def _slow_table() -> dict[str, tuple[str, ...]]:
    """``SLOW`` as tests/conftest.py writes it (read from its source: every test folder has a module
    named ``conftest``, so importing it by name finds whichever came first)."""
    tree = ast.parse((TESTS / "conftest.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.AnnAssign | ast.Assign):
            targets = [node.target] if isinstance(node, ast.AnnAssign) else node.targets
            if any(isinstance(t, ast.Name) and t.id == "SLOW" for t in targets) and node.value is not None:
                return ast.literal_eval(node.value)
    raise AssertionError("tests/conftest.py has no SLOW table")


def _test_names(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), str(path))
    return {n.name for n in ast.walk(tree)
            if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef) and n.name.startswith("test")}


def test_every_slow_entry_names_a_test() -> None:
    stale = []
    slow = _slow_table()
    assert slow, "the SLOW table is empty"
    for rel, patterns in slow.items():
        path = TESTS / rel
        if not path.is_file():
            stale.append(f"{rel}: no such test file")
            continue
        names = _test_names(path)
        stale += [f"{rel}: no test matches {p!r}" for p in patterns if not fnmatch.filter(names, p)]
    assert not stale, "SLOW in tests/conftest.py names tests that do not exist:\n" + "\n".join(stale)


def test_every_test_that_boots_uml_is_marked_uml() -> None:
    """A test booting the UML kernel without the ``uml`` mark would run early, while scripts/test's
    background build may still be going, and wait for it inside its own timeout."""
    boots = ("uml.run(", "uml.pytest(", "uml.kernel(")
    # calls uml.kernel() only with a failed build on record: it raises before anything boots
    never_boots = {"test_uml_build_wait.py"}
    unmarked = [rel for p in sorted(TESTS.rglob("test_*.py"))
                if (rel := str(p.relative_to(TESTS))) not in never_boots
                and any(b in p.read_text() for b in boots) and "pytest.mark.uml" not in p.read_text()]
    assert not unmarked, f"these test files boot the UML kernel but carry no pytest.mark.uml: {unmarked}"


def _conftest_constant(name: str) -> object:
    tree = ast.parse((TESTS / "conftest.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == name for t in node.targets):
            return ast.literal_eval(node.value)
    raise AssertionError(f"tests/conftest.py has no {name}")


def test_a_uml_guests_own_deadline_comes_before_pytests_timeout() -> None:
    """A guest past its ``uml.run``/``uml.pytest`` deadline is killed with its last console lines in
    the error; pytest-timeout (``UML_TIMEOUT`` for ``uml`` tests) ending the test first says only
    that it waited. Every literal guest deadline in the tests must be the shorter one."""
    limit = _conftest_constant("UML_TIMEOUT")
    assert isinstance(limit, int)
    too_long = []
    for p in sorted(TESTS.rglob("test_*.py")):
        for node in ast.walk(ast.parse(p.read_text(), str(p))):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and isinstance(node.func.value, ast.Name) and node.func.value.id == "uml"
                    and node.func.attr in ("run", "pytest")):
                for kw in node.keywords:
                    if kw.arg == "timeout" and isinstance(kw.value, ast.Constant) and kw.value.value >= limit - 60:
                        too_long.append(f"{p.relative_to(TESTS)}:{node.lineno}: timeout={kw.value.value}")
    assert not too_long, f"guest deadlines within 60 s of UML_TIMEOUT ({limit} s): {too_long}"
