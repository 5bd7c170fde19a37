"""Encryption at rest and autolock, end to end: real swarmd daemons on 127.0.0.x (etcd members,
their agents), real `swarmctl` processes, a real registry on loopback for the one container.

- a secret's value is nowhere in the bytes of the manager's state dir (etcd's WAL, snapshots and
  database included), in clear or in base64, while reads and a service's container still get it;
- autolock: a restarted manager runs nothing and answers only `cluster unlock`; a wrong key is
  refused, the right one brings everything back; a rotated key replaces the old one; autolock off
  puts `keys/kek` back and a restart needs no key;
- a manager that joined an autolocked cluster restarts locked and unlocks with the cluster's key."""

from __future__ import annotations

import base64
import functools
import json
import os
import secrets
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
from helpers.registry import local_registry
from helpers.swarmd import Swarmd, remove_containers, remove_task_netns, unmount_under
from helpers.waiting import wait_for

from shoal.manager.watchapi import redact
from shoal.proto import control_pb2, objects_pb2, watch_pb2

pytestmark = [pytest.mark.integration, pytest.mark.beside]

LOCKED = "this manager is locked: run `swarmctl cluster unlock` and give it the unlock key"


wait = functools.partial(wait_for, retry_on=(grpc.RpcError,))


class Daemon(Swarmd):
    term_timeout = 60  # a manager stopping while another is gone waits on etcd (<= 10 s)

    def ready(self) -> bool:
        return self.sock.exists() and bool(self.info().leader_node_id)

    def children(self) -> list[int]:
        assert self.proc is not None
        out: list[int] = []
        for t in Path(f"/proc/{self.proc.pid}/task").iterdir():
            out += [int(p) for p in (t / "children").read_text().split()]
        return out


@pytest.fixture(scope="module")
def registry() -> Iterator[object]:
    with local_registry() as reg:
        yield reg


@pytest.fixture
def daemons(daemons: Callable[..., Daemon], registry: object) -> Iterator[Callable[..., Daemon]]:
    """tests/node/conftest.py's daemons, pulling from the local registry, whose containers, task
    namespaces and mounts are removed before the state dirs go."""
    try:
        yield lambda name, ip, extra=None: daemons(
            name, ip, ["--insecure-registry", registry.host, *(extra or [])], kind=Daemon)  # type: ignore[attr-defined]
    finally:
        made = daemons.made  # type: ignore[attr-defined]
        for d in made:
            d.kill()
        _remove_containers(made)
        unmount_under(daemons.base)  # type: ignore[attr-defined]


def _remove_containers(made: list[Daemon]) -> None:
    for d in made:
        remove_containers(d.dir / "engine")
    remove_task_netns(made)


def files_holding(root: Path, needles: list[bytes]) -> list[str]:
    """Every regular file under `root` whose bytes contain one of `needles`."""
    hits = []
    for dirpath, _, names in os.walk(root):
        for n in names:
            p = Path(dirpath) / n
            if not p.is_file() or p.is_symlink():
                continue
            try:
                data = p.read_bytes()
            except OSError:
                continue
            hits += [f"{p} ({needle[:12]!r}...)" for needle in needles if needle in data]
    return hits


def dek_file(d: Daemon) -> dict:
    return json.loads((d.dir / "keys" / "dek").read_text())


def turn_autolock_on(d: Daemon) -> str:
    out = d.ok("cluster", "update", "--autolock=true")
    lines = out.splitlines()
    assert lines[0] == "Swarm updated.", out
    key = next(ln.strip() for ln in lines if ln.strip().startswith("SWMKEY-1-"))
    assert out == (
        "Swarm updated.\nTo unlock a swarm manager after it restarts, run the `swarmctl cluster unlock` command "
        f"and provide the following key:\n\n    {key}\n\nRemember to store this key in a password manager, since "
        "without it you will not be able to restart the manager.\n"
    )
    assert len(key) == len("SWMKEY-1-") + 43
    wait(lambda: dek_file(d)["locked"] and not (d.dir / "keys" / "kek").exists(), "the data key to be locked")
    return key


def restart_locked(d: Daemon) -> None:
    assert d.term() == 0
    d.start()
    wait(lambda: d.sock.exists(), "the locked control socket")
    d.fails("node", "ls", match=LOCKED)
    d.fails("cluster", "unlock-key", match=LOCKED)
    assert d.children() == []  # no etcd member, no container monitor: nothing of the node runs
    with socket.socket() as s:
        assert s.connect_ex((d.ip, int(d.api.rsplit(":", 1)[1]))) != 0  # no remote API either


def unlock(d: Daemon, key: str) -> None:
    d.ok("cluster", "unlock", input=key + "\n")
    wait(d.ready, f"{d.name} to run again after the unlock")


def test_values_are_sealed_at_rest_and_still_served(daemons, registry) -> None:
    m1 = daemons("m1", "127.0.0.1").start()
    wait(m1.ready, "m1 to create its cluster")
    keys = m1.dir / "keys"
    assert (keys / "dek").stat().st_mode & 0o777 == 0o600 and (keys / "kek").stat().st_mode & 0o777 == 0o600
    assert dek_file(m1)["locked"] is False and dek_file(m1)["version"] == 1

    value = secrets.token_hex(20)  # 40 random characters, nowhere else
    name = f"sealed-{secrets.token_hex(4)}"
    m1.ok("secret", "create", name, "-", input=value)
    m1.ok("config", "create", f"{name}-cfg", "-", input=value + "-config")
    [sec] = json.loads(m1.ok("secret", "inspect", name))
    assert sec["spec"]["annotations"]["name"] == name and "data" not in sec["spec"]
    assert "unlock_key" not in json.loads(m1.ok("cluster", "inspect"))

    raw = value.encode()
    needles = [raw, base64.b64encode(raw), base64.b64encode(b"\0" + raw)[4:20], base64.b64encode(b"\0\0" + raw)[4:20]]
    time.sleep(0.5)  # etcd's backend commits its database in batches (100 ms)
    assert files_holding(m1.dir, needles) == []
    assert files_holding(m1.dir / "etcd", [name.encode()]), "the scan does not reach etcd's data"

    # A service gets the value (the dispatcher reads it from the cache, the agent puts it on a tmpfs).
    digest = subprocess.run(["sha256sum"], input=raw, capture_output=True, check=True).stdout.split()[0].decode()
    m1.ok("service", "create", "-d", "--name", "reader", "--secret", name, f"{registry.host}/library/busybox:latest",
          "sh", "-c", f"sha256sum /run/secrets/{name}; sleep 600")
    wait(lambda: digest in m1.ok("service", "logs", "reader"), "the container to read the secret", 40)
    assert files_holding(m1.dir / "etcd", needles) == []
    assert m1.term() == 0


def test_autolock_restart_unlock_rotate_and_off(daemons, registry) -> None:
    m1 = daemons("m1", "127.0.0.1").start()
    wait(m1.ready, "m1 to create its cluster")
    m1.fails("cluster", "unlock-key", match="no unlock key is set")
    m1.fails("cluster", "unlock-key", "--rotate", match="cannot rotate because autolock is not turned on")
    m1.fails("cluster", "unlock", input="SWMKEY-1-x\n", match="this manager is not locked")
    m1.ok("secret", "create", "kept", "-", input="kept-value")
    m1.ok("service", "create", "-d", "--name", "idle", "--replicas", "0", f"{registry.host}/library/busybox:latest")

    key = turn_autolock_on(m1)
    assert m1.ok("cluster", "unlock-key", "-q").strip() == key
    assert f"\n\n    {key}\n\n" in m1.ok("cluster", "unlock-key")
    cl = m1.control().GetCluster(control_pb2.GetClusterRequest(), timeout=5).cluster
    assert cl.spec.encryption_config.autolock_managers and not cl.unlock_key
    ev = watch_pb2.WatchEvent(object=objects_pb2.StoreObject(cluster=objects_pb2.Cluster(unlock_key=b"k" * 32)))
    assert not redact(ev).object.cluster.unlock_key
    assert "Autolock:\t\ttrue" in m1.ok("cluster", "inspect", "--pretty")

    # (b) a restart is locked until the right key comes
    restart_locked(m1)
    m1.fails("cluster", "unlock", input="SWMKEY-1-" + base64.b64encode(os.urandom(32)).decode().rstrip("=") + "\n",
             match="invalid unlock key")
    m1.fails("cluster", "unlock", input="not-a-key\n", match="invalid unlock key")
    assert m1.proc is not None and m1.proc.poll() is None  # still waiting for the right key
    unlock(m1, key)
    assert "kept" in m1.ok("secret", "ls")
    assert "idle" in m1.ok("service", "ls")
    assert m1.ok("cluster", "unlock-key", "-q").strip() == key

    # (c) rotation: the old key no longer unlocks after a restart, the new one does
    before = dek_file(m1)["wrapped"]
    out = m1.ok("cluster", "unlock-key", "--rotate")
    assert out.startswith("Successfully rotated manager unlock key.\n\n")
    new_key = m1.ok("cluster", "unlock-key", "-q").strip()
    assert new_key != key and new_key in out
    wait(lambda: dek_file(m1)["wrapped"] != before, "the data key to be re-wrapped with the new key")
    restart_locked(m1)
    assert m1.term() == 0  # SIGTERM while locked: a clean exit
    assert "stopped while locked" in m1.log.read_text()
    m1.start()
    wait(lambda: m1.sock.exists(), "the locked control socket again")
    m1.fails("cluster", "unlock", input=key + "\n", match="invalid unlock key")
    unlock(m1, new_key)
    assert "kept" in m1.ok("secret", "ls")

    # (e) autolock off: keys/kek comes back and a restart needs no key
    assert m1.ok("cluster", "update", "--autolock=false").strip() == "default"
    wait(lambda: (m1.dir / "keys" / "kek").exists() and not dek_file(m1)["locked"], "keys/kek to come back")
    m1.fails("cluster", "unlock-key", match="no unlock key is set")
    assert m1.term() == 0
    m1.start()
    wait(m1.ready, "m1 to restart unlocked")
    assert "kept" in m1.ok("secret", "ls")
    assert m1.term() == 0


def test_joined_manager_restarts_locked_and_unlocks_with_the_cluster_key(daemons) -> None:
    m1 = daemons("m1", "127.0.0.1").start()
    wait(m1.ready, "m1 to create its cluster")
    key = turn_autolock_on(m1)
    token = m1.ok("swarm", "join-token", "-q", "manager").strip()
    m2 = daemons("m2", "127.0.0.2", ["--join-addr", m1.api, "--join-token", token]).start()
    m3 = daemons("m3", "127.0.0.3", ["--join-addr", m1.api, "--join-token", token]).start()

    def three() -> bool:
        info = m1.info()
        return len(info.members) == 3 and all(m.reachable for m in info.members)

    wait(three, "3 reachable managers", 45)
    for d in (m2, m3):  # a joined manager wraps the data key with the cluster's unlock key
        wait(lambda d=d: (d.dir / "keys" / "dek").exists() and dek_file(d)["locked"]
             and not (d.dir / "keys" / "kek").exists(), f"{d.name}'s data key to be locked")
    m1.ok("secret", "create", "before-restart", "-", input="x")
    restart_locked(m2)
    m1.ok("secret", "create", "while-locked", "-", input="y")
    unlock(m2, key)
    wait(lambda: {"before-restart", "while-locked"} <= set(m2.ok("secret", "ls").split()), "m2 to catch up")
    wait(three, "m2 back as a reachable manager")
    for d in (m3, m2, m1):
        assert d.term() == 0


def test_backup_is_sealed_and_restores_a_one_manager_cluster(daemons, registry) -> None:
    """`cluster backup` writes everything, sealed for a key it prints once; `swarmd --restore` with
    that key starts a new one-manager cluster holding it all; a wrong key or a used state dir is
    refused with one sentence and leaves nothing behind."""
    m1 = daemons("m1", "127.0.0.1").start()
    wait(m1.ready, "m1 to create its cluster")
    value = secrets.token_hex(20)
    m1.ok("secret", "create", "db-password", "-", input=value)
    m1.ok("config", "create", "app-config", "-", input="debug=1")
    m1.ok("network", "create", "--driver", "overlay", "backend")
    m1.ok("service", "create", "-d", "--name", "api", "--replicas", "0", "--label", "tier=front",
          f"{registry.host}/library/busybox:latest")
    before = {k: set(m1.ok(k, "ls", "-q").split()) for k in ("secret", "config", "network", "service")}
    assert all(before.values())

    bak = m1.dir.parent / "cluster.bak"
    out = m1.ok("cluster", "backup", str(bak))
    key = next(w for w in out.split() if w.startswith("SWMKEY-1-"))
    assert bak.stat().st_mode & 0o777 == 0o600
    data = bak.read_bytes()
    for needle in (value.encode(), base64.b64encode(value.encode()), b"db-password", b"debug=1", b"tier"):
        assert needle not in data
    m1.fails("cluster", "backup", str(bak), match=f"{bak} exists: give another file name, or --force")
    assert m1.term() == 0  # the old cluster is gone for good

    # A wrong key: refused, and the new state dir holds no node.
    m2 = daemons("m2", "127.0.0.2")
    wrong = subprocess.run(m2.argv(["--restore", str(bak)]), input="SWMKEY-1-" + "A" * 43 + "\n",
                           capture_output=True, text=True, timeout=60)
    assert wrong.returncode != 0 and "the key does not open" in wrong.stderr, wrong.stderr
    assert not (m2.dir / "node.json").exists() and not (m2.dir / "keys").exists()

    m2.start(["--restore", str(bak)], stdin=key + "\n")
    wait(m2.ready, "the restored manager")
    after = {k: set(m2.ok(k, "ls", "-q").split()) for k in ("secret", "config", "network", "service")}
    assert after == before
    [svc] = json.loads(m2.ok("service", "inspect", "api"))
    assert svc["spec"]["annotations"]["labels"] == {"tier": "front"}
    nodes = m2.ok("node", "ls")
    assert "m1" in nodes and "m2" in nodes  # the old manager is listed until it is removed
    m2.ok("secret", "create", "after-restore", "-", input="x")  # it takes writes
    # A used state dir is refused.
    again = subprocess.run(m2.argv(["--restore", str(bak)]), input=key + "\n", capture_output=True, text=True,
                           timeout=60)
    assert again.returncode != 0 and "give a new, empty state dir" in again.stderr, again.stderr
    assert m2.term() == 0
