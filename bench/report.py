"""How every benchmark prints its figures: a title naming the machine and the date, a table, then one
JSON line (`{"bench": NAME, "results": {...}}`) for tools. Import it as `from report import report`
(a benchmark runs as `python bench/NAME.py`, so this folder is on its path)."""

from __future__ import annotations

import json
import os
import platform
import time


def report(bench: str, title: str, res: dict[str, object]) -> None:
    print(f"\n{title}, {platform.node()}, {os.cpu_count()} cores, {time.strftime('%Y-%m-%d')}")
    width = max((len(k) for k in res), default=0) + 2
    for k, v in res.items():
        print(f"{k:<{width}}{v!s:>12}")
    print(json.dumps({"bench": bench, "results": res}))
