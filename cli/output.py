"""Tables like the docker CLI's, JSON output of protobuf objects, and human times."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterable, Sequence
from typing import IO, Any

from google.protobuf import json_format
from google.protobuf.message import Message

from shoal.proto import types_pb2


def to_dict(msg: Message) -> dict[str, Any]:
    return json_format.MessageToDict(msg, preserving_proto_field_name=True)


def print_json(objs: Sequence[Message] | Message, out: IO[str] | None = None) -> None:
    out = out or sys.stdout
    data: Any = to_dict(objs) if isinstance(objs, Message) else [to_dict(o) for o in objs]
    json.dump(data, out, indent=2, sort_keys=False)
    out.write("\n")


def print_table(headers: Sequence[str], rows: Iterable[Sequence[str]], out: IO[str] | None = None) -> None:
    """Columns padded to their widest cell plus three spaces, as the docker CLI's tabwriter does."""
    out = out or sys.stdout
    rows = [list(map(str, r)) for r in rows]
    widths = [len(h) for h in headers]
    for r in rows:
        for i, cell in enumerate(r):
            widths[i] = max(widths[i], len(cell))
    for r in [list(headers)] + rows:
        line = "".join(cell.ljust(widths[i] + 3) if i < len(r) - 1 else cell for i, cell in enumerate(r))
        out.write(line.rstrip() + "\n")


def short_id(oid: str, no_trunc: bool = False) -> str:
    return oid if no_trunc else oid[:12]


def human_duration(seconds: float) -> str:
    """docker's units.HumanDuration."""
    s = int(seconds)
    if s < 1:
        return "Less than a second"
    if s == 1:
        return "1 second"
    if s < 60:
        return f"{s} seconds"
    m = s // 60
    if m == 1:
        return "About a minute"
    if m < 60:
        return f"{m} minutes"
    h = round(s / 3600)
    if h == 1:
        return "About an hour"
    if h < 48:
        return f"{h} hours"
    if h < 24 * 7 * 2:
        return f"{h // 24} days"
    if h < 24 * 30 * 2:
        return f"{h // (24 * 7)} weeks"
    if h < 24 * 365 * 2:
        return f"{h // (24 * 30)} months"
    return f"{h // (24 * 365)} years"


def ago(ts: Any) -> str:
    """'5 seconds ago' for a protobuf Timestamp (empty when unset)."""
    if ts is None or (ts.seconds == 0 and ts.nanos == 0):
        return ""
    return human_duration(max(0.0, time.time() - ts.seconds - ts.nanos / 1e9)) + " ago"


def state_name(state: int) -> str:
    return types_pb2.TaskState.Name(state).capitalize()


def enum_name(enum_type: Any, value: int) -> str:
    try:
        return enum_type.Name(value).lower()
    except ValueError:
        return str(value)


def truncate(text: str, width: int, no_trunc: bool) -> str:
    if no_trunc or len(text) <= width:
        return text
    return text[: width - 1] + "…"
