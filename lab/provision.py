"""How a node's swarmd is started and joined: one code path for the lab and for real machines.

`swarmd_argv` builds the swarmd command line; the lab (shoal.lab.lab) starts it inside namespace
hosts, and `python -m shoal.lab.provision` (used by vagrant/provision.sh on VMs and usable on any
Linux host) installs it as a systemd service, creates or joins the cluster, and writes the join
tokens where the other machines can read them.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

SWARM_PORT = 2377


def swarmd_argv(
    state_dir: str,
    addr: str,
    hostname: str,
    role: str,
    *,
    socket: str,
    init: bool = False,
    join_addr: str = "",
    token: str = "",
    addr_pool: str = "",
    registry_mirrors: Sequence[str] = (),
    insecure_registries: Sequence[str] = (),
    egress_subnet: str = "",
    swarmd: str = "",
) -> list[str]:
    """swarmd's command line. Without init or join_addr it resumes from the state dir (or, the very
    first time, creates a cluster with the default pool)."""
    if role not in ("manager", "worker"):
        raise ValueError(f"role must be manager or worker, not {role!r}")
    if init and join_addr:
        raise ValueError("a node either creates the cluster (init) or joins one (join_addr), not both")
    argv = [
        swarmd or _swarmd_path(), "-d", state_dir,
        "--listen-remote-api", f"{addr}:{SWARM_PORT}",
        "--listen-control-api", socket,
        "--hostname", hostname,
    ]
    for m in registry_mirrors:
        argv += ["--registry-mirror", m]
    for r in insecure_registries:
        argv += ["--insecure-registry", r]
    if egress_subnet:
        argv += ["--egress-subnet", egress_subnet]
    if init and addr_pool:
        argv += ["--default-addr-pool", addr_pool]
    if join_addr:
        argv += ["--join-addr", join_addr if ":" in join_addr else f"{join_addr}:{SWARM_PORT}", "--join-token", token]
    if role == "manager":
        argv.append("--manager")
    return argv


def _swarmd_path() -> str:
    cand = Path(sys.executable).parent / "swarmd"
    return str(cand) if cand.exists() else (shutil.which("swarmd") or "swarmd")


def join_tokens(socket: str, timeout: float = 60, poll: float = 0.5) -> dict[str, str]:
    """The cluster's join tokens, asked of the local manager once it answers."""
    import grpc

    from shoal.proto import control_pb2, control_pb2_grpc

    deadline = time.monotonic() + timeout
    while True:
        try:
            with grpc.insecure_channel(f"unix://{socket}") as ch:
                c = control_pb2_grpc.ControlStub(ch).GetCluster(control_pb2.GetClusterRequest(), timeout=5).cluster
            return {"worker": c.root_ca.join_tokens.worker, "manager": c.root_ca.join_tokens.manager}
        except grpc.RpcError:
            if time.monotonic() > deadline:
                raise
            time.sleep(poll)


UNIT_TEMPLATE = Path(__file__).with_name("swarmd.service")


def unit_text(argv: Sequence[str]) -> str:
    """The systemd unit for swarmd with this command line (lab/swarmd.service, shipped with Shoal)."""
    return UNIT_TEMPLATE.read_text().replace("@EXEC_START@", " ".join(argv))


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m shoal.lab.provision",
                                description="install swarmd as a systemd service and create or join the cluster")
    p.add_argument("--role", choices=["manager", "worker"], required=True)
    p.add_argument("--addr", required=True, help="this machine's address on the cluster network")
    p.add_argument("--hostname", required=True)
    p.add_argument("--state-dir", default="/var/lib/shoal")
    p.add_argument("--init", action="store_true", help="create the cluster (first manager)")
    p.add_argument("--join-addr", default="", help="a manager's address to join")
    p.add_argument("--token-dir", required=True, help="where the first manager writes tokens and the others read them")
    p.add_argument("--addr-pool", default="")
    p.add_argument("--wait", type=float, default=600, help="seconds to wait for the tokens")
    a = p.parse_args(argv)
    socket = f"{a.state_dir}/swarmd.sock"
    token = ""
    if not a.init:
        tfile = Path(a.token_dir) / a.role
        deadline = time.monotonic() + a.wait
        while not tfile.exists():
            if time.monotonic() > deadline:
                print(f"Error: no join token appeared in {tfile}: provision the first manager first", file=sys.stderr)
                return 1
            time.sleep(1)
        token = tfile.read_text().strip()
    cmd = swarmd_argv(a.state_dir, a.addr, a.hostname, a.role, socket=socket, init=a.init,
                      join_addr=a.join_addr, token=token, addr_pool=a.addr_pool)
    Path(a.state_dir).mkdir(parents=True, exist_ok=True)
    Path("/etc/systemd/system/swarmd.service").write_text(unit_text(cmd))
    subprocess.run(["systemctl", "daemon-reload"], check=True)
    subprocess.run(["systemctl", "enable", "--now", "swarmd.service"], check=True)
    if a.init:
        tokens = join_tokens(socket)
        Path(a.token_dir).mkdir(parents=True, exist_ok=True)
        for role, tok in tokens.items():
            (Path(a.token_dir) / role).write_text(tok + "\n")
        print(f"cluster created; join tokens written to {a.token_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
