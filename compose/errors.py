"""Errors and source locations of the compose loader."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Loc:
    """Where a key or value came from: file name (as given) and 1-based line."""

    file: str
    line: int

    def __str__(self) -> str:
        return f"{self.file}:{self.line}" if self.line else self.file


class ComposeError(Exception):
    """A stack file problem a user can fix; the message names file, line and key path."""

    def __init__(self, message: str, loc: Loc | None = None, path: str = "") -> None:
        # One line, whatever a stack file holds (keys and values may contain newlines).
        message = message.replace("\r", "\\r").replace("\n", "\\n")
        path = path.replace("\r", "\\r").replace("\n", "\\n")
        self.loc = loc
        self.path = path
        self.detail = message
        where = str(loc) if loc is not None else ""
        lead = " ".join(p for p in (where, path) if p)
        super().__init__(f"{lead}: {message}" if lead else message)
