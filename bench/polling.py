"""Waiting on a condition over gRPC, for the benchmarks (`from polling import until`)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import grpc


def until(pred: Callable[[], Any], timeout: float, every: float = 0.25) -> Any:
    """pred()'s first truthy value within `timeout` s (gRPC errors count as falsy), else None."""
    end = time.monotonic() + timeout
    while True:
        try:
            got = pred()
        except grpc.RpcError:
            got = None
        if got:
            return got
        if time.monotonic() >= end:
            return None
        time.sleep(every)
