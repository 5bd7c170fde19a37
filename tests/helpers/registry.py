"""A local registry for tests that pull images: Debian's docker-registry on 127.0.0.1, seeded with
images built from the host's busybox, stopped on exit."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

from shoal.lab.registry import Registry, seed_busybox

#: image config of the `hc` test image: a health check that passes once /tmp/healthy exists,
#: probed every 0.2 s, failing after 2 tries of 2 s
HEALTHCHECK: dict[str, Any] = {
    "Healthcheck": {
        "Test": ["CMD-SHELL", "test -e /tmp/healthy"],
        "Interval": 200_000_000,
        "Timeout": 2_000_000_000,
        "Retries": 2,
    }
}


@contextlib.contextmanager
def local_registry(seed: Callable[[Registry], object] = lambda reg: seed_busybox(reg.url),
                   **kw: Any) -> Iterator[Registry]:
    """A started ``Registry("127.0.0.1", **kw)`` that ``seed(registry)`` filled (default:
    ``library/busybox:latest``); stopped on exit, also when the seeding fails."""
    reg = Registry("127.0.0.1", **kw)
    reg.start()
    try:
        seed(reg)
        yield reg
    finally:
        reg.stop()
