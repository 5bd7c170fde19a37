"""Reading conmon's k8s-file logs: ``<RFC3339Nano time> <stdout|stderr> <F|P> <text>`` per line.

conmon rotates by truncation (``--log-size-max``): it writes a new file and renames it over the old
one, so a follower reopens the path when its inode changes or the file shrinks.
"""

from __future__ import annotations

import asyncio
import os
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass
from datetime import datetime


@dataclass(frozen=True)
class LogLine:
    timestamp: datetime
    stream: str  # "stdout" | "stderr"
    line: str  # without the trailing newline


def parse_time(s: str) -> datetime:
    # Python 3.11's fromisoformat takes any number of fraction digits but not always 9 with an offset.
    head, dot, rest = s.partition(".")
    if dot:
        i = 0
        while i < len(rest) and rest[i].isdigit():
            i += 1
        s = head + "." + rest[:i][:6].ljust(6, "0") + rest[i:]
    return datetime.fromisoformat(s.replace("Z", "+00:00"))


class _Assembler:
    """Joins partial (P) records into whole lines, per stream."""

    def __init__(self) -> None:
        self.partial: dict[str, list[str]] = {}

    def feed(self, raw: str) -> LogLine | None:
        parts = raw.split(" ", 3)
        if len(parts) < 3:
            return None
        ts, stream, tag = parts[0], parts[1], parts[2]
        text = parts[3] if len(parts) > 3 else ""
        if tag.startswith("P"):
            self.partial.setdefault(stream, []).append(text)
            return None
        text = "".join(self.partial.pop(stream, [])) + text
        try:
            t = parse_time(ts)
        except ValueError:
            return None
        return LogLine(t, stream, text)


def parse_lines(lines: Iterable[str]) -> list[LogLine]:
    asm = _Assembler()
    out = []
    for ln in lines:
        rec = asm.feed(ln)
        if rec is not None:
            out.append(rec)
    return out


async def read_log(
    path: str,
    *,
    follow: bool,
    tail: int,
    since: datetime | None,
    running: Callable[[], bool],
    poll: float = 0.1,
) -> AsyncIterator[LogLine]:
    """Yields the log's lines (the last ``tail`` if ``tail >= 0``), then, with ``follow``, new lines until
    ``running()`` is false and the file has no more."""

    def keep(rec: LogLine) -> bool:
        return since is None or rec.timestamp >= since

    asm = _Assembler()
    try:
        f = open(path, "rb")
    except FileNotFoundError:
        f = None
    ino = os.fstat(f.fileno()).st_ino if f else None
    buf = b""
    if f is not None:
        data = f.read()
        *complete, buf = data.split(b"\n")
        recs = [
            r for r in (asm.feed(x.decode("utf-8", "replace")) for x in complete) if r is not None and keep(r)
        ]
        if tail >= 0:
            recs = list(deque(recs, maxlen=tail)) if tail else []
        for r in recs:
            yield r
    if not follow:
        if f:
            f.close()
        return
    try:
        while True:
            alive = running()
            chunk = f.read() if f else b""
            if chunk:
                buf += chunk
                *complete, buf = buf.split(b"\n")
                for x in complete:
                    r = asm.feed(x.decode("utf-8", "replace"))
                    if r is not None and keep(r):
                        yield r
                continue
            # rotated (new inode) or truncated?
            try:
                st = os.stat(path)
            except FileNotFoundError:
                st = None
            if st is not None and (f is None or st.st_ino != ino or st.st_size < f.tell()):
                if f:
                    rest = f.read()
                    buf += rest
                    f.close()
                f = open(path, "rb")
                ino = os.fstat(f.fileno()).st_ino
                continue
            if not alive:
                return
            await asyncio.sleep(poll)
    finally:
        if f:
            f.close()
