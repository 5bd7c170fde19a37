"""Local volumes: ROOT/volumes/<name>/_data, named or anonymous (``anon-<random>``).

A named volume is made on first use (filled from the image's files at its target unless ``nocopy``)
and stays until `Volumes.remove`; an anonymous one belongs to its container and goes with it.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import shutil
import subprocess
from collections.abc import Iterable
from pathlib import Path

from shoal.agent.engine import spec as specmod
from shoal.agent.engine.errors import InvalidSpec, InvalidState
from shoal.proto import types_pb2

log = logging.getLogger(__name__)

_VOLUME_RE = re.compile(r"^[a-zA-Z0-9][a-zA-Z0-9_.-]+$")


class Volumes:
    def __init__(self, vdir: Path) -> None:
        self.vdir = vdir

    def names(self) -> list[str]:
        """Names of the volumes (anonymous ones included while their container exists)."""
        return sorted(p.name for p in self.vdir.iterdir() if (p / "_data").is_dir())

    async def remove(self, name: str, users: Iterable[tuple[str, list[dict]]]) -> None:
        """Deletes a named volume; InvalidState while one of ``users`` (container id, its OCI mounts)
        mounts it."""
        if not _VOLUME_RE.match(name) or not (self.vdir / name).is_dir():
            raise InvalidSpec(f"no such volume {name!r}")
        data = str(self.vdir / name / "_data")
        for cid, mounts in users:
            if any(x.get("source") == data for x in mounts):
                raise InvalidState(f"volume {name} is in use by container {cid}; remove the container first")
        await asyncio.to_thread(shutil.rmtree, self.vdir / name)
        log.info("volume removed name=%s", name)

    def mount(self, m: types_pb2.Mount, i: int, rootfs: str, anon: list[str]) -> dict:
        """The OCI mount of volume mount ``m`` (``mounts[i]``), making the volume on first use; the name
        of a new anonymous volume is appended to ``anon`` (for the caller to remove on failure)."""
        if m.volume_options.driver_config.name not in ("", "local"):
            raise InvalidSpec(
                f"mounts[{i}]: volume driver {m.volume_options.driver_config.name!r} is not "
                "supported; use the local driver"
            )
        name = m.source
        if not name:
            name = "anon-" + os.urandom(12).hex()
            anon.append(name)
        elif not _VOLUME_RE.match(name):
            raise InvalidSpec(f"mounts[{i}].source {name!r} is not a valid volume name")
        data = self.vdir / name / "_data"
        if not data.exists():
            data.mkdir(parents=True, exist_ok=True)
            src = specmod.resolve_in_root(rootfs, m.target)
            if not m.volume_options.nocopy and os.path.isdir(src):
                subprocess.run(["cp", "-a", f"{src}/.", f"{data}/"], check=False)
            log.info("volume created name=%s", name)
        ro = ["ro"] if m.readonly else []
        return {
            "destination": m.target,
            "type": "bind",
            "source": str(data),
            "options": ["rbind", "rprivate", *ro],
        }

    def drop(self, names: Iterable[str]) -> None:
        """Deletes the (anonymous) volumes ``names``, whatever is left of them."""
        for v in names:
            shutil.rmtree(self.vdir / v, ignore_errors=True)
