"""(to be written)"""

from __future__ import annotations

from shoal.engineapi.server import EngineContext, Route


def routes(ctx: EngineContext) -> list[Route]:
    return []
