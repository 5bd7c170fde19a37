"""The error swarmctl shows the user, and the one retry of a write that lost a race.

No gRPC here: commands that talk to no manager (`--version`, `--help`, `lab`) use this module too.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")

UPDATE_ATTEMPTS = 5


class CliError(Exception):
    """An error shown to the user as `Error: <message>` with exit status 1 (`code`: the gRPC status name)."""

    def __init__(self, message: str, code: str = "") -> None:
        super().__init__(message)
        self.code = code

    @property
    def conflict(self) -> bool:
        """The control API refused a write made against a stale version of the object (gRPC ABORTED):
        reading it again and re-applying the change is the fix."""
        return self.code == "ABORTED"


def retry_on_conflict(fn: Callable[[], T]) -> T:
    """Run a read-modify-write `fn` again when something else changed the object in between (a control
    loop writing status, say): the change is re-applied to what is current. At most UPDATE_ATTEMPTS runs;
    any other error, or the last conflict, is raised."""
    for attempt in range(UPDATE_ATTEMPTS):
        try:
            return fn()
        except CliError as e:
            if not e.conflict or attempt == UPDATE_ATTEMPTS - 1:
                raise
    raise AssertionError("unreachable")
