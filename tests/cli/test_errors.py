"""swarmctl's one retry of a write: on the control API's conflict answer (gRPC ABORTED), by code only."""

from __future__ import annotations

import pytest

from shoal.cli.errors import UPDATE_ATTEMPTS, CliError, retry_on_conflict


def flaky(errors: list[CliError]) -> tuple[list[int], object]:
    runs: list[int] = []

    def fn() -> str:
        runs.append(1)
        if errors:
            raise errors.pop(0)
        return "done"

    return runs, fn


def test_retries_an_aborted_write() -> None:
    runs, fn = flaky([CliError("update out of sequence: ...", "ABORTED")] * 2)
    assert retry_on_conflict(fn) == "done" and len(runs) == 3


def test_gives_up_after_the_last_attempt() -> None:
    runs, fn = flaky([CliError("changed meanwhile", "ABORTED")] * UPDATE_ATTEMPTS)
    with pytest.raises(CliError, match="changed meanwhile"):
        retry_on_conflict(fn)
    assert len(runs) == UPDATE_ATTEMPTS


@pytest.mark.parametrize("err", [CliError("update out of sequence: x", "FAILED_PRECONDITION"),
                                 CliError("service 'x' not found", "NOT_FOUND"), CliError("out of sequence")])
def test_other_errors_are_not_retried(err: CliError) -> None:
    runs, fn = flaky([err])
    with pytest.raises(CliError):
        retry_on_conflict(fn)
    assert len(runs) == 1
