"""Config merge (Docker's entrypoint/cmd/env rules), user lookup, runtime-spec pieces. No root needed."""

import os

import pytest
from google.protobuf.duration_pb2 import Duration

from shoal.agent.engine.errors import ExecutableNotFound, InvalidSpec, UserNotFound
from shoal.agent.engine.logs import parse_lines
from shoal.agent.engine.spec import (
    DEFAULT_CAPS,
    capabilities,
    file_target,
    find_executable,
    hosts_file,
    merge_config,
    resolv_conf,
    resolve_user,
    resources_spec,
    rlimits,
)
from shoal.proto import types_pb2

IMG = {
    "Entrypoint": ["/entry"],
    "Cmd": ["serve", "--port=80"],
    "Env": ["PATH=/opt/bin:/bin", "A=1", "B=2"],
    "WorkingDir": "/app",
    "User": "app",
    "StopSignal": "SIGQUIT",
    "Labels": {"l": "img"},
}


def cs(**kw):
    return types_pb2.ContainerSpec(image="x", **kw)


def test_image_defaults():
    m = merge_config(cs(), IMG, default_hostname="abc")
    assert m.argv == ["/entry", "serve", "--port=80"]
    assert m.env == ["PATH=/opt/bin:/bin", "HOSTNAME=abc", "A=1", "B=2"]
    assert (m.workdir, m.user, m.stop_signal, m.stop_grace) == ("/app", "app", "SIGQUIT", 10.0)
    assert m.labels == {"l": "img"} and m.health is None


def test_args_replace_cmd_keep_entrypoint():
    assert merge_config(cs(args=["x"]), IMG).argv == ["/entry", "x"]


def test_command_replaces_entrypoint_and_cmd():
    assert merge_config(cs(command=["/bin/sh", "-c"], args=["echo"]), IMG).argv == ["/bin/sh", "-c", "echo"]
    assert merge_config(cs(command=["/bin/true"]), IMG).argv == ["/bin/true"]


def test_env_override_and_default_path():
    m = merge_config(
        cs(
            env=["A=9", "C=3", "EMPTY"],
            hostname="h",
            dir="/w",
            user="0:0",
            stop_signal="TERM",
            stop_grace_period=Duration(seconds=3),
            labels={"l": "svc"},
        ),
        IMG,
    )
    assert m.env == ["PATH=/opt/bin:/bin", "HOSTNAME=h", "A=9", "B=2", "C=3", "EMPTY="]
    assert (m.workdir, m.user, m.stop_signal, m.stop_grace, m.hostname) == ("/w", "0:0", "TERM", 3.0, "h")
    assert m.labels == {"l": "svc"}
    m = merge_config(cs(args=["x"]), {})
    assert m.env[0].startswith("PATH=/usr/local/sbin") and m.workdir == "/"


def test_no_command_and_bad_fields():
    with pytest.raises(InvalidSpec):
        merge_config(cs(), {})
    with pytest.raises(InvalidSpec):
        merge_config(cs(args=["x"], dir="rel"), {})
    with pytest.raises(InvalidSpec):
        merge_config(cs(args=["x"], stop_signal="SIGBOGUS"), {})
    with pytest.raises(InvalidSpec):
        merge_config(cs(args=["x"], env=["=v"]), {})


def test_health_merge():
    img = dict(IMG, Healthcheck={"Test": ["CMD", "check"], "Interval": 5_000_000_000, "Retries": 4})
    h = merge_config(cs(), img).health
    assert (h.test, h.interval, h.timeout, h.retries, h.start_period) == (["CMD", "check"], 5.0, 30.0, 4, 0.0)
    assert h.argv == ["check"]
    spec_h = types_pb2.HealthConfig(
        test=["CMD-SHELL", "curl -f localhost"], timeout=Duration(seconds=2), start_period=Duration(seconds=7)
    )
    h = merge_config(cs(healthcheck=spec_h), img).health
    assert (h.test, h.interval, h.timeout, h.retries, h.start_period) == (
        ["CMD-SHELL", "curl -f localhost"],
        5.0,
        2.0,
        4,
        7.0,
    )
    assert h.argv == ["/bin/sh", "-c", "curl -f localhost"]
    h = merge_config(cs(healthcheck=spec_h), dict(img, Shell=["/bin/ash", "-eo"])).health
    assert h.argv == ["/bin/ash", "-eo", "curl -f localhost"]
    assert merge_config(cs(healthcheck=types_pb2.HealthConfig(test=["NONE"])), img).health is None
    with pytest.raises(InvalidSpec):
        merge_config(cs(healthcheck=types_pb2.HealthConfig(test=["WHAT", "x"])), img)


@pytest.fixture
def rootfs(tmp_path):
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc/passwd").write_text(
        "root:x:0:0:root:/root:/bin/sh\napp:x:1000:1001:a:/home/app:/bin/sh\n"
    )
    (tmp_path / "etc/group").write_text("root:x:0:\nwheel:x:10:app,other\napp:x:1001:\ndocker:x:999:\n")
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin/busybox").write_bytes(b"")
    os.chmod(tmp_path / "bin/busybox", 0o755)
    os.symlink("/bin/busybox", tmp_path / "bin/sh")
    os.symlink("../../bin/busybox", tmp_path / "bin/rel")
    (tmp_path / "bin/noexec").write_bytes(b"")
    (tmp_path / "usr").mkdir()
    os.symlink("/bin", tmp_path / "usr/bin")  # absolute link: must resolve inside the rootfs
    return str(tmp_path)


def test_resolve_user(rootfs):
    u = resolve_user(rootfs, "app")
    assert (u.uid, u.gid, u.additional_gids, u.home) == (1000, 1001, [10], "/home/app")
    u = resolve_user(rootfs, "app:docker", ["root"])
    assert (u.uid, u.gid, u.additional_gids) == (1000, 999, [0, 10])
    u = resolve_user(rootfs, "4242:4243")
    assert (u.uid, u.gid, u.home) == (4242, 4243, "/")
    assert resolve_user(rootfs, "").uid == 0 and resolve_user(rootfs, "").home == "/root"
    with pytest.raises(UserNotFound):
        resolve_user(rootfs, "ghost")
    with pytest.raises(UserNotFound):
        resolve_user(rootfs, "app:nogroup")


def test_find_executable(rootfs):
    env = ["PATH=/usr/bin:/sbin"]
    find_executable(rootfs, "sh", env, "/")  # /usr/bin -> /bin (absolute link inside root)
    find_executable(rootfs, "/bin/rel", env, "/")
    find_executable(rootfs, "/mnt/tool", env, "/", mounted=["/mnt"])  # provided by a mount
    for bad in ("nosuch", "/bin/nosuch", "noexec"):
        with pytest.raises(ExecutableNotFound):
            find_executable(rootfs, bad, env, "/")


def test_capabilities():
    assert capabilities([], []) == DEFAULT_CAPS
    c = capabilities(["net_admin", "CAP_SYS_TIME"], ["chown", "CAP_KILL"])
    assert "CAP_NET_ADMIN" in c and "CAP_SYS_TIME" in c and "CAP_CHOWN" not in c and "CAP_KILL" not in c
    assert capabilities(["NET_ADMIN"], ["ALL"]) == ["CAP_NET_ADMIN"]
    assert "CAP_SYS_ADMIN" in capabilities(["ALL"], [])
    with pytest.raises(InvalidSpec):
        capabilities(["FLY"], [])


def test_resources():
    r = resources_spec(
        types_pb2.ResourceRequirements(
            limits=types_pb2.Resources(nano_cpus=1_500_000_000, memory_bytes=64 << 20),
            reservations=types_pb2.Resources(memory_bytes=32 << 20),
            pids_limit=100,
        ),
        swap_files=True,
    )
    assert r["memory"] == {"limit": 64 << 20, "swap": 64 << 20, "reservation": 32 << 20}
    assert r["cpu"] == {"period": 100000, "quota": 150000} and r["pids"] == {"limit": 100}
    assert (
        "swap"
        not in resources_spec(
            types_pb2.ResourceRequirements(limits=types_pb2.Resources(memory_bytes=64 << 20)),
            swap_files=False,
        )["memory"]
    )
    with pytest.raises(InvalidSpec):
        resources_spec(
            types_pb2.ResourceRequirements(limits=types_pb2.Resources(memory_bytes=1000)), swap_files=False
        )


def test_rlimits_and_file_targets():
    r = {x["type"]: x for x in rlimits([types_pb2.Ulimit(name="nproc", soft=10, hard=20)])}
    assert r["RLIMIT_NPROC"] == {"type": "RLIMIT_NPROC", "soft": 10, "hard": 20} and "RLIMIT_NOFILE" in r
    with pytest.raises(InvalidSpec):
        rlimits([types_pb2.Ulimit(name="bogus", soft=1, hard=1)])
    assert file_target(types_pb2.FileTarget(), "/run/secrets", "pw", "s") == ("/run/secrets/pw", 0, 0, 0o444)
    assert file_target(
        types_pb2.FileTarget(name="/etc/x.conf", uid="5", gid="6", mode=0o600), "/", "c", "c"
    ) == ("/etc/x.conf", 5, 6, 0o600)
    with pytest.raises(InvalidSpec):
        file_target(types_pb2.FileTarget(name="../../x"), "/run/secrets", "x", "s")


def test_hosts_and_resolv(tmp_path):
    h = hosts_file("web", ["10.0.0.5 web web.1", "db:10.0.0.6"])
    assert "127.0.0.1\tlocalhost" in h and "10.0.0.5 web web.1\n" in h and "10.0.0.6\tdb\n" in h
    host = tmp_path / "resolv.conf"
    host.write_text("nameserver 127.0.0.53\nnameserver 192.0.2.1\nsearch corp\n")
    assert resolv_conf(None, None, str(host)) == "nameserver 192.0.2.1\nsearch corp\n"
    dns = types_pb2.DNSConfig(nameservers=["198.51.100.1"], search=["a.b"], options=["ndots:2"])
    assert resolv_conf(None, dns, str(host)) == "nameserver 198.51.100.1\nsearch a.b\noptions ndots:2\n"
    assert resolv_conf("nameserver 127.0.0.11", dns, str(host)) == (
        "nameserver 127.0.0.11\nsearch a.b\noptions ndots:2\n"
    )


def test_log_parse_partial_lines():
    recs = parse_lines(
        [
            "2026-11-24T07:30:24.604499300+00:00 stdout P hel",
            "2026-11-24T07:30:24.604548623+00:00 stderr F err",
            "2026-11-24T07:30:24.704548623+00:00 stdout F lo world",
            "2026-11-24T07:30:25Z stdout F ",
            "garbage",
        ]
    )
    assert [(r.stream, r.line) for r in recs] == [
        ("stderr", "err"),
        ("stdout", "hello world"),
        ("stdout", ""),
    ]
    assert recs[1].timestamp.microsecond == 704548


def test_seccomp_profile():
    from shoal.agent.engine.spec import seccomp_profile

    default = seccomp_profile(DEFAULT_CAPS)
    names = {n for r in default["syscalls"] for n in r["names"]}
    assert default["defaultAction"] == "SCMP_ACT_ALLOW"
    assert {"unshare", "setns", "mount", "keyctl", "clone", "clone3"} <= names
    assert any(r["names"] == ["clone3"] and r["errnoRet"] == 38 for r in default["syscalls"])
    admin = {n for r in seccomp_profile([*DEFAULT_CAPS, "CAP_SYS_ADMIN"])["syscalls"] for n in r["names"]}
    assert "unshare" not in admin and "clone" not in admin and "keyctl" in admin
