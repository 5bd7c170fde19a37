"""Small helpers around `nft -f -` and /proc/sys, run in a given network namespace.

`netns` arguments are a path (/run/netns/X, /proc/PID/ns/net), a bare name under /run/netns, or None
for the namespace this process is in. Commands go through `nsenter --net=PATH` (no /sys remount).
"""

from __future__ import annotations

import json
import logging
import subprocess

from shoal.netdriver.netns import nsenter

log = logging.getLogger(__name__)


class NftError(RuntimeError):
    pass


def apply(netns: str | None, script: str) -> None:
    """Run an nft script as one atomic transaction in the namespace."""
    r = subprocess.run(nsenter(netns, ["nft", "-f", "-"]), input=script, capture_output=True, text=True)
    if r.returncode != 0:
        raise NftError(f"nft failed in netns {netns or '(own)'}: {r.stderr.strip()}\n--- script ---\n{script}")


def replace_table(netns: str | None, family: str, name: str, body: str) -> None:
    """Atomically replace table `family name` with `body` (the text inside `table … { }`)."""
    apply(netns, f"table {family} {name}\ndelete table {family} {name}\ntable {family} {name} {{\n{body}\n}}\n")


def delete_table(netns: str | None, family: str, name: str) -> None:
    """Delete the table if it exists (atomic: create-if-missing then delete)."""
    apply(netns, f"table {family} {name}\ndelete table {family} {name}\n")


def list_tables(netns: str | None) -> list[tuple[str, str]]:
    r = subprocess.run(nsenter(netns, ["nft", "-j", "list", "tables"]), capture_output=True, text=True,
                       check=True)
    out = []
    for item in json.loads(r.stdout or '{"nftables": []}')["nftables"]:
        if "table" in item:
            out.append((item["table"]["family"], item["table"]["name"]))
    return out


def rule_comments(netns: str | None, family: str, table: str, chain: str) -> list[str]:
    """Comments of the rules of a chain ([] when the table does not exist)."""
    r = subprocess.run(nsenter(netns, ["nft", "-j", "list", "chain", family, table, chain]),
                       capture_output=True, text=True)
    if r.returncode != 0:
        return []
    return [item["rule"]["comment"] for item in json.loads(r.stdout)["nftables"]
            if "rule" in item and item["rule"].get("comment")]


def set_sysctl(netns: str | None, key: str, value: str) -> None:
    """Write /proc/sys/<key with dots as slashes> inside the namespace (net.* keys are per-netns)."""
    path = "/proc/sys/" + key.replace(".", "/")
    if netns is None:
        with open(path, "w") as f:
            f.write(value)
        return
    r = subprocess.run(nsenter(netns, ["sh", "-c", f"echo {value} > {path}"]), capture_output=True, text=True)
    if r.returncode != 0:
        raise OSError(f"cannot set {key}={value} in netns {netns}: {r.stderr.strip()}")
