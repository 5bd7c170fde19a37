"""The OCI bundle of a container: its root file system, its files, its config.json.

`Bundles.build` is the blocking part of `Engine.create` (run it on a thread): the overlay mount of
the image's layers under the container's writable layer, the user and executable looked up in
that rootfs, the mounts (binds, tmpfs, volumes, the image's VOLUMEs as anonymous volumes), a tmpfs
holding the secret and config files, /etc/hostname, hosts and resolv.conf from the container's
`NetworkSetup`, and config.json; it returns the `Meta` to keep. `Bundles.unmount` undoes its mounts.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
from dataclasses import asdict
from pathlib import Path

from shoal.agent.engine import spec as specmod
from shoal.agent.engine.container import ContainerConfig
from shoal.agent.engine.errors import InvalidImage, InvalidSpec
from shoal.agent.engine.images import Image, ImageStore
from shoal.agent.engine.state import Meta, StateDir, now
from shoal.agent.engine.volumes import Volumes
from shoal.proto import types_pb2

TINI = next(
    (
        p
        for p in ("/usr/bin/tini-static", "/usr/bin/catatonit", "/usr/libexec/podman/catatonit")
        if os.path.exists(p)
    ),
    "/usr/bin/tini-static",
)
MS_NOSUID, MS_NODEV, MS_NOEXEC = 2, 4, 8
MNT_DETACH = 2
_libc = ctypes.CDLL(None, use_errno=True)
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]


def mount(source: str, target: str, fstype: str, flags: int, data: str) -> None:
    if _libc.mount(source.encode(), target.encode(), fstype.encode(), flags, data.encode()) != 0:
        e = ctypes.get_errno()
        raise OSError(e, f"mount {fstype} on {target}: {os.strerror(e)}")


def umount(target: str) -> None:
    """Lazy unmount; a target that is not (or no longer) a mount point is not an error."""
    if _libc.umount2(target.encode(), MNT_DETACH) != 0:
        e = ctypes.get_errno()
        if e not in (errno.EINVAL, errno.ENOENT):
            raise OSError(e, f"umount {target}: {os.strerror(e)}")


def is_mountpoint(path: str) -> bool:
    try:
        with open("/proc/self/mountinfo") as f:
            return any(ln.split()[4] == path for ln in f)
    except OSError:
        return False


class Bundles:
    def __init__(
        self,
        state: StateDir,
        images: ImageStore,
        volumes: Volumes,
        empty_layer: Path,
        *,
        cgroup_parent: str,
        v2: bool,
        swap_files: bool,
    ) -> None:
        self.state = state
        self.images = images
        self.volumes = volumes
        self.empty_layer = empty_layer
        self.cgroup_parent = cgroup_parent
        self.v2 = v2
        self.swap_files = swap_files

    def unmount(self, cid: str) -> None:
        """Unmounts what build() mounted for ``cid`` (its secrets tmpfs and its rootfs), if mounted."""
        rd = self.state.rdir(cid)
        for mp in (rd / "secrets", rd / "bundle" / "rootfs"):
            if mp.exists() and is_mountpoint(str(mp)):
                umount(str(mp))

    def mounts_of(self, cid: str) -> list[dict]:
        """The OCI mounts in ``cid``'s config.json ([] when it has none, or no readable one)."""
        try:
            doc = json.loads((self.state.rdir(cid) / "bundle" / "config.json").read_text())
        except (OSError, ValueError):
            return []
        return list(doc.get("mounts", []))

    def build(self, cfg: ContainerConfig, img: Image, anon: list[str]) -> Meta:
        """Writes ``cfg``'s bundle from image ``img`` and meta.json; the names of anonymous volumes it
        made are appended to ``anon`` (also when it fails half-way). Raises InvalidSpec (or a subclass)
        for a spec field it cannot honour, InvalidImage for an image it cannot mount."""
        s = cfg.spec
        d, rd = self.state.dir(cfg.id), self.state.rdir(cfg.id)
        bundle, rootfs = rd / "bundle", rd / "bundle" / "rootfs"
        for p in (d / "upper", d / "work", rootfs, rd / "exit", rd / "persist"):
            p.mkdir(parents=True, exist_ok=p.parent == rd)
        lowers = self.images.layer_dirs(img) or [str(self.empty_layer)]
        opts = f"lowerdir={':'.join(lowers)},upperdir={d / 'upper'},workdir={d / 'work'}"
        if len(opts) > 4000:
            raise InvalidImage(f"image {s.image} has too many layers ({len(lowers)}) for one overlay mount")
        mount("overlay", str(rootfs), "overlay", 0, opts)
        merged = specmod.merge_config(s, img.config, default_hostname=cfg.id[:12])
        user = specmod.resolve_user(str(rootfs), merged.user, list(s.groups))
        env = list(merged.env)
        if not any(e.startswith("HOME=") for e in env):
            env.append(f"HOME={user.home}")
        mounts: list[dict] = []
        for i, m in enumerate(s.mounts):
            mounts.append(self._mount_spec(m, i, str(rootfs), anon))
        covered = {m["destination"].rstrip("/") or "/" for m in mounts}
        for path in sorted(img.config.get("Volumes") or {}):
            # the image's VOLUMEs not given a mount become anonymous volumes, removed with the container
            if path.startswith("/") and (path.rstrip("/") or "/") not in covered:
                mounts.append(
                    self._mount_spec(
                        types_pb2.Mount(type=types_pb2.Mount.VOLUME, target=path),
                        len(mounts),
                        str(rootfs),
                        anon,
                    )
                )
        mounts += self._secret_files(cfg, rd / "secrets")
        net = cfg.network
        hostname = merged.hostname
        (rd / "hostname").write_text(hostname + "\n")
        (rd / "hosts").write_text(specmod.hosts_file(hostname, list(s.hosts) + list(net.extra_hosts)))
        (rd / "resolv.conf").write_text(
            specmod.resolv_conf(net.resolv_conf, s.dns_config if s.HasField("dns_config") else None)
        )
        targets = {m["destination"] for m in mounts}
        for name in ("hostname", "hosts", "resolv.conf"):
            if f"/etc/{name}" not in targets:
                mounts.append(
                    {
                        "destination": f"/etc/{name}",
                        "type": "bind",
                        "source": str(rd / name),
                        "options": ["rbind", "rprivate"],
                    }
                )
        argv = list(merged.argv)
        specmod.find_executable(str(rootfs), argv[0], env, merged.workdir, [m["destination"] for m in mounts])
        init = s.init if s.HasField("init") else False
        if init:
            if not os.path.exists(TINI):
                raise InvalidSpec("init is set but no static tini/catatonit is installed on this node")
            mounts.append(
                {
                    "destination": specmod.INIT_PATH,
                    "type": "bind",
                    "source": TINI,
                    "options": ["rbind", "rprivate", "ro"],
                }
            )
            argv = [specmod.INIT_PATH, "--", *argv]
        wd = specmod.resolve_in_root(str(rootfs), merged.workdir)
        if not os.path.isdir(wd):
            if os.path.lexists(wd):
                raise InvalidSpec(f"dir {merged.workdir} exists in the image but is not a directory")
            os.makedirs(wd, 0o755)
        specmod.check_sysctls(dict(s.sysctls), net.netns_path is None)
        cgroups_path = f"{self.cgroup_parent}/{cfg.id}"
        doc = specmod.base_spec(
            args=argv,
            env=env,
            cwd=merged.workdir,
            user=user,
            hostname=hostname,
            readonly=s.read_only,
            netns_path=net.netns_path,
            caps=specmod.capabilities(list(s.capability_add), list(s.capability_drop)),
            sysctls=dict(s.sysctls),
            rlimit_list=specmod.rlimits(list(s.ulimits)),
            resources=specmod.resources_spec(cfg.resources, swap_files=self.swap_files),
            cgroups_path=cgroups_path,
            mounts=mounts,
            cgroup_v2=self.v2,
            terminal=s.tty,
        )
        (bundle / "config.json").write_text(json.dumps(doc))
        meta = Meta(
            id=cfg.id,
            name=cfg.name,
            image=s.image,
            image_id=img.id,
            labels={**merged.labels, **cfg.labels},
            created=now(),
            hostname=hostname,
            stop_signal=merged.stop_signal,
            stop_grace=merged.stop_grace,
            health=asdict(merged.health) if merged.health else None,
            exec_env=env,
            exec_cwd=merged.workdir,
            exec_user=f"{user.uid}:{user.gid}",
            exec_groups=user.additional_gids,
            cgroups_path=cgroups_path,
            anon_volumes=anon,
        )
        self.state.save_meta(meta)
        return meta

    def _secret_files(self, cfg: ContainerConfig, sec_dir: Path) -> list[dict]:
        """The secret and config files of ``cfg`` on a tmpfs at ``sec_dir`` (never on disk), and the
        read-only bind mounts that put them at their targets."""
        s = cfg.spec
        files: list[tuple[str, bytes, int, int, int]] = []
        for ref in s.secrets:
            path, uid, gid, mode = specmod.file_target(
                ref.file, "/run/secrets", ref.secret_name, f"secrets[{ref.secret_name}]"
            )
            files.append((path, cfg.secrets[ref.secret_id], uid, gid, mode))
        for ref in s.configs:
            path, uid, gid, mode = specmod.file_target(
                ref.file, "/", ref.config_name, f"configs[{ref.config_name}]"
            )
            files.append((path, cfg.configs[ref.config_id], uid, gid, mode))
        if not files:
            return []
        sec_dir.mkdir()
        size = sum(len(f[1]) + 4096 for f in files) + 65536
        mount("shoal-secrets", str(sec_dir), "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, f"size={size},mode=0700")
        mounts = []
        for i, (path, data, uid, gid, mode) in enumerate(files):
            src = sec_dir / f"{i}"
            fd = os.open(src, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                os.write(fd, data)
                os.fchown(fd, uid, gid)
                os.fchmod(fd, mode)
            finally:
                os.close(fd)
            mounts.append(
                {"destination": path, "type": "bind", "source": str(src), "options": ["rbind", "rprivate", "ro"]}
            )
        return mounts

    def _mount_spec(self, m: types_pb2.Mount, i: int, rootfs: str, anon: list[str]) -> dict:
        target = m.target
        if not target.startswith("/"):
            raise InvalidSpec(f"mounts[{i}].target {target!r} must be an absolute path")
        ro = ["ro"] if m.readonly else []
        if m.type == types_pb2.Mount.BIND:
            if not m.source.startswith("/") or not os.path.exists(m.source):
                raise InvalidSpec(f"mounts[{i}]: bind source path does not exist on this node: {m.source}")
            prop = m.bind_options.propagation or "rprivate"
            if prop not in ("private", "rprivate", "shared", "rshared", "slave", "rslave"):
                raise InvalidSpec(f"mounts[{i}].bind_options.propagation {prop!r} is not a propagation mode")
            return {
                "destination": target,
                "type": "bind",
                "source": m.source,
                "options": ["rbind", prop, *ro],
            }
        if m.type == types_pb2.Mount.TMPFS:
            opts = ["nosuid", "nodev"]
            if m.tmpfs_options.size_bytes:
                opts.append(f"size={m.tmpfs_options.size_bytes}")
            if m.tmpfs_options.mode:
                opts.append(f"mode={m.tmpfs_options.mode:o}")
            return {"destination": target, "type": "tmpfs", "source": "tmpfs", "options": opts + ro}
        if m.type == types_pb2.Mount.VOLUME:
            return self.volumes.mount(m, i, rootfs, anon)
        raise InvalidSpec(f"mounts[{i}].type {m.type} is not supported")
