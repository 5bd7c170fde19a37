"""Shoal's local container engine: OCI images, overlayfs root file systems, conmon + runc.

API (all coroutines run on the caller's event loop; blocking work goes to threads)::

    engine = Engine(Path("/var/lib/shoal/engine"),
                    registry_mirrors=["http://198.18.0.254:5000"],   # tried first for docker.io images
                    insecure_registries=["198.18.0.254:5000"],       # plain HTTP allowed (loopback always is)
                    on_health_change=lambda cid, status: ...)        # optional callback
    img = await engine.pull("busybox", auth=RegistryAuth("alice", "pw"))   # -> Image
    imgs = await engine.load(Path("busybox.tar"))                     # docker-archive or OCI layout
    await engine.create(ContainerConfig(id=task_id, name="web.1." + task_id, spec=container_spec,
                                        resources=resources,
                                        network=NetworkSetup(netns_path="/run/netns/…",
                                                             resolv_conf="nameserver 127.0.0.11\\n"),
                                        secrets={secret_id: b"…"}, configs={config_id: b"…"}))
    await engine.start(task_id)
    st = await engine.inspect(task_id)     # ContainerState: status created|running|exited, pid, exit, health
    ex = await engine.wait(task_id)        # ExitStatus: exit_code, oom_killed, finished_at, reason
    await engine.stop(task_id, timeout=None)   # stop signal, grace period (spec's, default 10 s), SIGKILL
    await engine.remove(task_id)           # kills if needed; unmounts, deletes runc state, cgroup, files
    async for line in engine.logs(task_id, follow=True, tail=10, since=None): ...   # LogLine
    await engine.list()                    # every container under ROOT, also those of an earlier process
    await engine.exec(task_id, ["cat", "/etc/hostname"])   # (exit code, output)
    await engine.remove_image("busybox"); await engine.prune_images()
    await engine.volumes(); await engine.remove_volume("data")   # named local volumes
    await engine.close()                   # stops health probes only; containers keep running
    await engine.destroy()                 # removes every container, leftover mounts, the parent cgroup

``create`` pulls the image if the store lacks it (credentials from ``spec.pull_options.registry_auth``);
``pull`` always asks the registry, and concurrent pulls of one reference share one download.

Errors (``shoal.agent.engine.errors``) all derive from ``EngineError`` and read as one sentence:
InvalidReference, ImageNotFound, RegistryUnreachable, RegistryError, AuthenticationFailed,
DigestMismatch, UnsupportedPlatform, InvalidImage, ImageInUse, ContainerNotFound, ContainerExists,
InvalidSpec (ExecutableNotFound, UserNotFound), RuntimeFailed, InvalidState. A failed ``create``
leaves nothing behind.

On disk under ROOT (everything needed to re-adopt containers after the agent process dies)::

    images/…                      content-addressed store (see images.py)
    containers/<id>/meta.json     what create decided (image, user, env, cgroup path, pids, health spec)
    containers/<id>/state.json    started_at, exit code, OOM flag, reason
    containers/<id>/upper, work/  the container's writable overlay layer
    containers/<id>/ctr.log       conmon's k8s-file log (rotated at log_size_max)
    containers/<id>/health.json   health status and the last probe results
    volumes/<name>/_data          named local volumes
    runc/                         runc --root: this engine's runc state, separate from other engines
    RUN/<id>/bundle/              config.json + rootfs (overlay of the image layers and upper/, work/)
    RUN/<id>/exit/<id>, persist/  conmon's exit file and OOM marker; ctr.pid, conmon.pid
    RUN/<id>/hosts, hostname, resolv.conf   bind-mounted into the container
    RUN/<id>/secrets/             a tmpfs holding secret and config files (never on disk)

RUN is ``ROOT/containers`` unless ``Engine(run_dir=...)`` puts runtime files elsewhere (a tmpfs is
faster; then runc's state goes to RUN/runc too).

Containers get Docker's default capabilities, masked/read-only /proc paths, and a seccomp filter
that denies new namespaces (user namespaces too), keyrings, userfaultfd and kexec unless
``capability_add`` has SYS_ADMIN (Docker's full default seccomp allow-list is not reproduced).

Each container runs under conmon (its shim, in its own session) so it survives the agent; its cgroup
is ``/shoal-<hash of ROOT>/<id>`` (cgroupfs driver, v1 or v2, runc creates and deletes it).
"""

from shoal.agent.engine.container import ContainerConfig, ContainerState, ExitStatus, NetworkSetup
from shoal.agent.engine.distribution import RegistryAuth
from shoal.agent.engine.engine import Engine
from shoal.agent.engine.errors import (
    AuthenticationFailed,
    ContainerExists,
    ContainerNotFound,
    DigestMismatch,
    EngineError,
    ExecutableNotFound,
    ImageInUse,
    ImageNotFound,
    InvalidImage,
    InvalidReference,
    InvalidSpec,
    InvalidState,
    RegistryError,
    RegistryUnreachable,
    RuntimeFailed,
    UnsupportedPlatform,
    UserNotFound,
)
from shoal.agent.engine.health import HealthState, ProbeResult
from shoal.agent.engine.images import Image
from shoal.agent.engine.logs import LogLine

__all__ = [
    "AuthenticationFailed",
    "ContainerConfig",
    "ContainerExists",
    "ContainerNotFound",
    "ContainerState",
    "DigestMismatch",
    "Engine",
    "EngineError",
    "ExecutableNotFound",
    "ExitStatus",
    "HealthState",
    "Image",
    "ImageInUse",
    "ImageNotFound",
    "InvalidImage",
    "InvalidReference",
    "InvalidSpec",
    "InvalidState",
    "LogLine",
    "NetworkSetup",
    "ProbeResult",
    "RegistryAuth",
    "RegistryError",
    "RegistryUnreachable",
    "RuntimeFailed",
    "UnsupportedPlatform",
    "UserNotFound",
]
