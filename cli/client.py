"""swarmctl's connection to a manager: the local unix socket, or host:2377 with the node's TLS identity.

The TLS identity is what swarmd keeps in `<state dir>/certificates/`: `node.key`, `node.crt` and
`swarm-root-ca.crt`. Managers are dialled by address and their certificates carry the DNS name
"swarm-manager", which the channel checks. The remote control API answers manager identities only.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import grpc

from shoal.cli.errors import CliError
from shoal.proto import CONTROL_CHANNEL_OPTIONS, control_pb2_grpc

# Trailing metadata of a read answered without a quorum (shoal.manager.controlapi.STALE_KEY).
STALE_KEY = "x-shoal-stale"

DEFAULT_SOCKET = "/var/run/shoal/swarmd.sock"
# swarmd's socket is STATE_DIR/swarmd.sock; /var/lib/shoal is the state dir the VM provisioning uses.
FALLBACK_SOCKETS = ("/var/lib/shoal/swarmd.sock",)
MANAGER_NAME = "swarm-manager"
DEFAULT_RPC_TIMEOUT = 30.0


def tls_files(tls_dir: str) -> tuple[Path, Path, Path]:
    d = Path(tls_dir)
    if (d / "certificates").is_dir():
        d = d / "certificates"
    files = (d / "swarm-root-ca.crt", d / "node.key", d / "node.crt")
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise CliError(
            f"TLS identity not found in {tls_dir} (missing {', '.join(missing)}): give --tls-dir the state "
            "directory of a manager node (or its certificates folder)"
        )
    return files


class Client:
    """A Control stub whose calls turn gRPC errors into CliError sentences."""

    def __init__(self, socket: str | None = None, host: str | None = None, tls_dir: str | None = None,
                 timeout: float = DEFAULT_RPC_TIMEOUT) -> None:
        self.timeout = timeout
        self._warned_stale = False
        if host:
            if ":" not in host:
                host = f"{host}:2377"
            if not tls_dir:
                raise CliError("--host needs the node's TLS identity: give --tls-dir STATE_DIR (or SWARM_TLS_DIR)")
            ca, key, cert = tls_files(tls_dir)
            creds = grpc.ssl_channel_credentials(ca.read_bytes(), key.read_bytes(), cert.read_bytes())
            options = [("grpc.ssl_target_name_override", MANAGER_NAME), ("grpc.default_authority", MANAGER_NAME),
                       *CONTROL_CHANNEL_OPTIONS]
            self.target = host
            self.channel = grpc.secure_channel(host, creds, options=options)
        else:
            path = socket or os.environ.get("SWARM_SOCKET")
            if not path:
                path = next((p for p in (DEFAULT_SOCKET, *FALLBACK_SOCKETS) if os.path.exists(p)), DEFAULT_SOCKET)
            self.target = f"unix://{path}"
            if not os.path.exists(path):
                raise CliError(
                    f"cannot reach the manager: the socket {path} does not exist; is swarmd running? "
                    "Point swarmctl at it with --socket PATH (STATE_DIR/swarmd.sock), SWARM_SOCKET or "
                    "--host ADDR:2377 --tls-dir STATE_DIR"
                )
            self.channel = grpc.insecure_channel(self.target, options=CONTROL_CHANNEL_OPTIONS)
        self.stub = control_pb2_grpc.ControlStub(self.channel)

    def call(self, method: str, request: Any, timeout: float | None = None) -> Any:
        try:
            resp, call = getattr(self.stub, method).with_call(request, timeout=timeout or self.timeout)
        except grpc.RpcError as e:
            raise CliError(self._message(e, timeout or self.timeout), e.code().name) from None
        for key, value in call.trailing_metadata() or ():
            if key == STALE_KEY and not self._warned_stale:
                self._warned_stale = True  # once per command
                print(f"warning: {value}", file=sys.stderr)
        return resp

    def _message(self, e: Any, timeout: float) -> str:
        code, details = e.code(), e.details() or ""
        if code == grpc.StatusCode.UNAVAILABLE and (
            "failed to connect" in details or "onnect" in details and "rror" in details or not details
        ):
            return f"cannot reach the manager at {self.target} ({details.strip()}): is swarmd running there?"
        if code == grpc.StatusCode.DEADLINE_EXCEEDED:
            return f"the manager at {self.target} did not answer within {timeout:g}s: it may have lost quorum"
        if code == grpc.StatusCode.UNIMPLEMENTED:
            return f"the node at {self.target} does not serve the control API: use a manager's socket or address"
        return details or code.name.lower().replace("_", " ")

    def close(self) -> None:
        self.channel.close()
