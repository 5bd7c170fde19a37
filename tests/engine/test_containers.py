"""Real containers (runc under conmon) on the engine: lifecycle, spec fields, limits, logs, health,
secrets, re-adoption, cleanup. Needs root."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from google.protobuf.duration_pb2 import Duration

from shoal.agent.engine import (
    ContainerConfig,
    Engine,
    ExecutableNotFound,
    InvalidSpec,
    InvalidState,
    NetworkSetup,
    UserNotFound,
)
from shoal.agent.engine.images import host_arch
from shoal.lab.images import Entry, busybox_image, opaque, tar_layer, whiteout, write_oci_tar
from shoal.proto import types_pb2

from .conftest import PREFIX, run

pytestmark = pytest.mark.integration


def spec(*args: str, **kw) -> types_pb2.ContainerSpec:
    s = types_pb2.ContainerSpec(image=kw.pop("image", "busybox"), **kw)
    if args:
        s.args.extend(args)
    return s


def cid(name: str) -> str:
    return f"{PREFIX}-{name}-{os.urandom(3).hex()}"


async def run_to_exit(e: Engine, cfg: ContainerConfig):
    await e.create(cfg)
    await e.start(cfg.id)
    ex = await asyncio.wait_for(e.wait(cfg.id), 60)
    lines = [ln async for ln in e.logs(cfg.id)]
    return ex, lines


def out(lines, stream: str | None = None) -> list[str]:
    return [ln.line for ln in lines if stream is None or ln.stream == stream]


def mounts_under(root: Path) -> list[str]:
    with open("/proc/self/mountinfo") as f:
        return [ln.split()[4] for ln in f if ln.split()[4].startswith(str(root) + "/")]


def runc_ids(runc_root: Path) -> list[str]:
    r = subprocess.run(["runc", "--root", str(runc_root), "list", "-q"], capture_output=True, text=True)
    return r.stdout.split()


def assert_gone(e: Engine, c: str) -> None:
    assert not (e.root / "containers" / c).exists() and not (e.run_dir / c).exists()
    assert c not in runc_ids(e.runc_root)
    assert not [m for m in mounts_under(e.root) + mounts_under(e.run_dir) if f"/{c}/" in m + "/"]
    assert not e._cgroup_dirs(f"/shoal-{e.tag}/{c}")


def test_exit_code_env_args_user_workdir(engine):
    c = cid("basic")
    s = spec(
        "sh",
        "-c",
        'echo "$FOO $BAR"; id -u; id -g; id -G; pwd; echo $HOME; echo oops >&2; exit 7',
        env=["FOO=foo", "BAR=bar"],
        user="app",
        dir="/home/app/work",
    )

    async def main():
        ex, lines = await run_to_exit(engine, ContainerConfig(c, "basic.1", s, labels={"k": "v"}))
        st = await engine.inspect(c)
        return ex, lines, st

    ex, lines, st = run(main())
    assert ex.exit_code == 7 and not ex.oom_killed and ex.reason == "Error"
    assert out(lines, "stdout") == ["foo bar", "1000", "1000", "1000 10", "/home/app/work", "/home/app"]
    assert out(lines, "stderr") == ["oops"]
    assert st.status == "exited" and st.labels == {"k": "v"} and st.exit.exit_code == 7


def test_image_cmd_entrypoint_merge_and_hostname(engine):
    c = cid("merge")
    s = spec(command=["/bin/echo"], hostname="web-1", hosts=["10.1.2.3 db", "cache:10.1.2.4"])

    async def main():
        ex, lines = await run_to_exit(engine, ContainerConfig(c, "m.1", s))
        await engine.remove(c)
        c2 = c + "b"
        s2 = spec(
            hostname="web-1",
            hosts=["10.1.2.3 db", "cache:10.1.2.4"],
            command=[
                "sh",
                "-c",
                "hostname; cat /etc/hostname; grep -E 'db|cache' /etc/hosts; cat /etc/resolv.conf",
            ],
        )
        ex2, lines2 = await run_to_exit(
            engine, ContainerConfig(c2, "m.2", s2, network=NetworkSetup(resolv_conf="nameserver 127.0.0.11\n"))
        )
        return ex, lines, ex2, lines2

    ex, lines, ex2, lines2 = run(main())
    assert ex.exit_code == 0 and out(lines) == [""]  # command replaces the image's Cmd ("sh")
    assert ex2.exit_code == 0
    assert out(lines2) == ["web-1", "web-1", "10.1.2.3 db", "10.1.2.4\tcache", "nameserver 127.0.0.11"]


def test_missing_executable_and_user_leave_nothing(engine):
    async def main():
        errs = []
        for name, s in (
            ("noexec", spec("/no/such/binary")),
            ("nocmd", spec("nosuchcmd")),
            ("nouser", spec("true", user="ghost")),
        ):
            c = cid(name)
            s.secrets.add(secret_id="s", secret_name="s")  # its tmpfs is mounted before the failure
            s.mounts.add(type=types_pb2.Mount.VOLUME, target="/vol")  # an anonymous volume too
            try:
                await engine.create(ContainerConfig(c, name, s, secrets={"s": b"x"}))
            except (ExecutableNotFound, UserNotFound) as e:
                errs.append((c, type(e), str(e)))
        return errs

    errs = run(main())
    assert [t for _, t, _ in errs] == [ExecutableNotFound, ExecutableNotFound, UserNotFound]
    assert "nosuchcmd" in errs[1][2] and "\n" not in errs[1][2]
    for c, _, _ in errs:
        assert_gone(engine, c)
    assert not [v for v in os.listdir(engine.root / "volumes") if v.startswith("anon-")]


def test_stop_signal_grace_and_init(engine):
    a, b = cid("stopinit"), cid("stopnoinit")

    async def main():
        await engine.create(ContainerConfig(a, "a", spec("sleep", "1000", init=True)))
        await engine.start(a)
        # sh as PID 1 without a handler ignores SIGTERM: the grace period ends with SIGKILL
        await engine.create(
            ContainerConfig(
                b,
                "b",
                spec("sh", "-c", "sleep 1000"),
            )
        )
        await engine.start(b)
        assert (await engine.inspect(a)).status == "running"
        await engine.stop(a, timeout=20)
        await engine.stop(b, timeout=0.5)
        return await engine.inspect(a), await engine.inspect(b)

    sa, sb = run(main())
    assert sa.exit.exit_code == 143 and sa.exit.reason == "Error"  # tini forwarded SIGTERM to sleep
    assert sb.exit.exit_code == 137 and not sb.exit.oom_killed


def test_memory_limit_oom_killed(engine):
    c = cid("oom")
    res = types_pb2.ResourceRequirements(limits=types_pb2.Resources(memory_bytes=32 << 20))
    s = spec("dd", "if=/dev/zero", "of=/dev/null", "bs=128M", "count=1")

    async def main():
        ex, _ = await run_to_exit(engine, ContainerConfig(c, "oom.1", s, resources=res))
        return ex, await engine.inspect(c)

    ex, st = run(main())
    assert ex.exit_code == 137 and ex.oom_killed and ex.reason == "OOMKilled"
    assert st.exit.oom_killed


def test_pids_and_cpu_limit(engine):
    c = cid("pids")
    res = types_pb2.ResourceRequirements(pids_limit=8, limits=types_pb2.Resources(nano_cpus=500_000_000))
    s = spec("sh", "-c", "i=0; while [ $i -lt 20 ]; do sleep 30 & i=$((i+1)); done; echo started")

    async def main():
        await engine.create(ContainerConfig(c, "pids.1", s, resources=res))
        await engine.start(c)
        ex = await asyncio.wait_for(engine.wait(c), 60)
        lines = [ln async for ln in engine.logs(c)]
        meta = engine.state.meta(c)
        rel = meta.cgroups_path.lstrip("/")
        if engine.v2:
            quota = Path(f"/sys/fs/cgroup/{rel}/cpu.max").read_text().split()[0]
        else:
            quota = Path(f"/sys/fs/cgroup/cpu/{rel}/cpu.cfs_quota_us").read_text().strip()
        return ex, lines, quota

    ex, lines, quota = run(main())
    assert any("fork" in ln for ln in out(lines, "stderr")), out(lines)
    assert quota == "50000"


def test_logs_tail_follow_since(engine):
    c = cid("logs")
    s = spec("sh", "-c", "for i in 1 2 3 4 5; do echo line$i; done; sleep 1; echo late >&2; echo end")

    async def main():
        await engine.create(ContainerConfig(c, "logs.1", s))
        await engine.start(c)
        followed = [ln async for ln in engine.logs(c, follow=True)]  # ends when the container exits
        tail2 = [ln async for ln in engine.logs(c, tail=2)]
        since = min(x.timestamp for x in followed if x.line in ("late", "end"))
        after = [ln async for ln in engine.logs(c, since=since)]
        return followed, tail2, after

    followed, tail2, after = run(main())
    # conmon reads stdout and stderr separately: order holds within a stream, not across streams
    assert out(followed, "stdout") == ["line1", "line2", "line3", "line4", "line5", "end"]
    assert out(followed, "stderr") == ["late"]
    assert {(x.stream, x.line) for x in tail2} == {("stderr", "late"), ("stdout", "end")}
    assert sorted(out(after)) == ["end", "late"]
    assert all(a.timestamp <= b.timestamp for a, b in zip(followed, followed[1:], strict=False))


def test_health_check_unhealthy_and_healthy(engine, registry):
    bad, good, slow = cid("unhealthy"), cid("healthy"), cid("slowprobe")
    hc_slow = types_pb2.HealthConfig(
        test=["CMD", "sleep", "30"],
        interval=Duration(nanos=200_000_000),
        timeout=Duration(nanos=300_000_000),
        retries=1,
    )
    hc_bad = types_pb2.HealthConfig(
        test=["CMD-SHELL", "echo probing; exit 1"],
        interval=Duration(nanos=200_000_000),
        timeout=Duration(seconds=5),
        retries=2,
    )
    changes: list[tuple[str, str]] = []
    engine.on_health_change = lambda c, s: changes.append((c, s))

    async def main():
        await engine.create(ContainerConfig(bad, "bad.1", spec("sleep", "1000", healthcheck=hc_bad)))
        await engine.start(bad)
        # the image's own HEALTHCHECK (test -e /tmp/healthy, every 0.2 s) passes once the file exists
        await engine.create(
            ContainerConfig(
                good,
                "good.1",
                spec("sh", "-c", "touch /tmp/healthy; sleep 1000", image=f"{registry.host}/hc:latest"),
            )
        )
        await engine.start(good)
        await engine.create(ContainerConfig(slow, "slow.1", spec("sleep", "1000", healthcheck=hc_slow)))
        await engine.start(slow)
        states = {}
        for _ in range(600):  # a deadline (30 s) for a loaded CI machine, not a timing assertion
            states = {x: (await engine.inspect(x)).health for x in (bad, good, slow)}
            if [states[x].status for x in (bad, good, slow)] == ["unhealthy", "healthy", "unhealthy"]:
                break
            await asyncio.sleep(0.05)
        return states

    states = run(main())
    assert states[bad].status == "unhealthy" and states[bad].failing_streak >= 2
    assert states[bad].log[-1].exit_code == 1 and states[bad].log[-1].output == "probing\n"
    assert states[good].status == "healthy" and states[good].failing_streak == 0
    assert (bad, "unhealthy") in changes and (good, "healthy") in changes
    # a probe over its timeout is killed and counts as a failure
    assert states[slow].status == "unhealthy" and "exceeded timeout" in states[slow].log[-1].output


def test_secrets_and_configs_on_tmpfs(engine):
    c = cid("secrets")
    s = spec("sleep", "1000", user="app")
    s.secrets.add(
        secret_id="sid1",
        secret_name="db_password",
        file=types_pb2.FileTarget(name="db_password", uid="1000", gid="1000", mode=0o400),
    )
    s.configs.add(
        config_id="cid1",
        config_name="app_conf",
        file=types_pb2.FileTarget(name="/etc/app.conf", uid="0", gid="0", mode=0o444),
    )

    async def main():
        await engine.create(
            ContainerConfig(c, "sec.1", s, secrets={"sid1": b"hunter2"}, configs={"cid1": b"debug=1\n"})
        )
        await engine.start(c)
        r = {}
        r["stat"] = await engine.exec(
            c, ["stat", "-c", "%a %u %g", "/run/secrets/db_password", "/etc/app.conf"]
        )
        r["cat"] = await engine.exec(c, ["cat", "/run/secrets/db_password", "/etc/app.conf"])
        r["mount"] = await engine.exec(c, ["grep", "/run/secrets/db_password", "/proc/mounts"])
        host_dir = engine.root / "containers" / c / "secrets"
        with open("/proc/self/mountinfo") as f:
            r["host"] = [ln.split(" - ")[1].split()[0] for ln in f if ln.split()[4] == str(host_dir)]
        await engine.remove(c)
        return r

    r = run(main())
    assert r["stat"] == (0, "400 1000 1000\n444 0 0\n")
    assert r["cat"] == (0, "hunter2debug=1\n")
    assert r["mount"][0] == 0 and " tmpfs " in r["mount"][1] and " ro," in r["mount"][1]
    assert r["host"] == ["tmpfs"]  # the files live only on a tmpfs
    assert_gone(engine, c)


def test_read_only_root_tmpfs_bind_and_volume(engine, tmp_path):
    c1, c2 = cid("ro1"), cid("ro2")
    (tmp_path / "in.txt").write_text("from host\n")
    vol = f"{PREFIX}vol{os.urandom(2).hex()}"
    mounts = [
        types_pb2.Mount(
            type=types_pb2.Mount.TMPFS,
            target="/scratch",
            tmpfs_options=types_pb2.Mount.TmpfsOptions(size_bytes=1 << 20),
        ),
        types_pb2.Mount(type=types_pb2.Mount.BIND, source=str(tmp_path), target="/host", readonly=True),
        types_pb2.Mount(type=types_pb2.Mount.VOLUME, source=vol, target="/data"),
    ]
    s1 = spec(
        "sh",
        "-c",
        "touch /x 2>/dev/null && echo rootrw || echo rootro; touch /scratch/y && echo tmpfsrw; "
        "cat /host/in.txt; touch /host/z 2>/dev/null || echo bindro; echo persisted > /data/f",
        read_only=True,
        mounts=mounts,
    )
    s2 = spec("cat", "/data/f", mounts=[mounts[2]])

    async def main():
        ex1, l1 = await run_to_exit(engine, ContainerConfig(c1, "ro.1", s1))
        await engine.remove(c1)
        ex2, l2 = await run_to_exit(engine, ContainerConfig(c2, "ro.2", s2))
        listed = await engine.volumes()
        with pytest.raises(InvalidState):
            await engine.remove_volume(vol)  # c2 still mounts it
        await engine.remove(c2)
        await engine.remove_volume(vol)
        return ex1, l1, ex2, l2, listed, await engine.volumes()

    try:
        ex1, l1, ex2, l2, listed, after = run(main())
    finally:
        import shutil

        shutil.rmtree(engine.root / "volumes" / vol, ignore_errors=True)
    assert ex1.exit_code == 0, out(l1)
    assert out(l1) == ["rootro", "tmpfsrw", "from host", "bindro"]
    assert out(l2) == ["persisted"]
    assert vol in listed and vol not in after


def test_caps_sysctls_ulimits_netns(engine):
    c = cid("caps")
    ns = f"{PREFIX}ns{os.urandom(2).hex()}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        s = spec(
            "sh",
            "-c",
            "grep CapEff /proc/self/status; cat /proc/sys/net/core/somaxconn; ulimit -n; "
            "readlink /proc/self/ns/net",
            capability_drop=["ALL"],
            capability_add=["NET_ADMIN"],
            sysctls={"net.core.somaxconn": "1234"},
            ulimits=[types_pb2.Ulimit(name="nofile", soft=512, hard=1024)],
        )
        net = NetworkSetup(netns_path=f"/run/netns/{ns}")
        ex, lines = run(run_to_exit(engine, ContainerConfig(c, "caps.1", s, network=net)))
        ino = os.stat(f"/run/netns/{ns}").st_ino
    finally:
        subprocess.run(["ip", "netns", "del", ns], check=False)
    assert ex.exit_code == 0, out(lines)
    assert out(lines) == [
        "CapEff:\t0000000000001000",
        "1234",
        "512",
        f"net:[{ino}]",
    ]  # CAP_NET_ADMIN = bit 12


def test_seccomp_blocks_new_namespaces_unless_sys_admin(engine):
    """Without CAP_SYS_ADMIN a container cannot make namespaces (a user namespace needs no capability)."""
    probe = "unshare -U -r true && echo userns || echo no-userns"
    a, b = cid("seccomp"), cid("sysadmin")
    ex_a, la = run(run_to_exit(engine, ContainerConfig(a, a, spec("sh", "-c", probe))))
    s_b = spec("sh", "-c", probe, capability_add=["SYS_ADMIN"])
    ex_b, lb = run(run_to_exit(engine, ContainerConfig(b, b, s_b)))
    assert out(la, "stdout") == ["no-userns"] and "Operation not permitted" in " ".join(out(la, "stderr"))
    assert out(lb, "stdout") == ["userns"]


def test_bad_spec_fields_one_line_errors(engine):
    cases = [
        spec("true", capability_add=["NOT_A_CAP"]),
        spec("true", sysctls={"vm.swappiness": "1"}),
        spec("true", mounts=[types_pb2.Mount(type=types_pb2.Mount.BIND, source="/no/such/dir", target="/x")]),
        spec("true", stop_signal="SIGNOPE"),
    ]

    async def main():
        msgs = []
        for i, s in enumerate(cases):
            c = cid(f"bad{i}")
            with pytest.raises(InvalidSpec) as ei:
                await engine.create(ContainerConfig(c, "bad", s))
            msgs.append(str(ei.value))
            assert_gone(engine, c)
        return msgs

    msgs = run(main())
    assert all("\n" not in m for m in msgs)
    assert "NOT_A_CAP" in msgs[0] and "vm.swappiness" in msgs[1] and "/no/such/dir" in msgs[2]
    assert "SIGNOPE" in msgs[3]


def test_whiteouts_and_opaque_dirs_through_overlay(fresh_engine, tmp_path):
    upper = tar_layer(
        [
            Entry("data", "dir", mode=0o755),
            Entry("data/a", data=b"A"),
            Entry("data/b", data=b"B"),
            Entry("opq", "dir", mode=0o755),
            Entry("opq/old1", data=b"1"),
            Entry("opq/old2", data=b"2"),
        ]
    )
    top = tar_layer(
        [whiteout("data/a"), Entry("opq", "dir", mode=0o755), opaque("opq"), Entry("opq/new", data=b"N")]
    )
    img = busybox_image(
        config={
            "Cmd": ["sh", "-c", "ls /data; ls /opq; grep -c ' /data ' /proc/mounts"],
            "Volumes": {"/data": {}},
        },
        extra_layers=[upper, top],
    )
    tar = tmp_path / "wh.tar"
    write_oci_tar(img, tar, name=f"{PREFIX}/wh:1")
    c = cid("wh")

    async def main():
        (loaded,) = await fresh_engine.load(tar)
        ex, lines = await run_to_exit(fresh_engine, ContainerConfig(c, "wh.1", spec(image=f"{PREFIX}/wh:1")))
        return loaded, ex, lines

    loaded, ex, lines = run(main())
    assert loaded.id == img.id and len(loaded.layers) == 3
    # /data is the image's VOLUME: an anonymous volume, filled from the image, removed with the container
    assert ex.exit_code == 0 and out(lines) == ["b", "new", "1"]
    run(fresh_engine.remove(c))
    assert os.listdir(fresh_engine.root / "volumes") == []


def test_new_engine_readopts_after_agent_killed(shared_root, registry):
    """A process creates and starts a container and is SIGKILLed; a new Engine lists and controls it."""
    c = cid("adopt")
    script = textwrap.dedent(f"""
        import asyncio, os, signal
        from pathlib import Path
        from shoal.agent.engine import Engine, ContainerConfig
        from shoal.proto import types_pb2
        async def main():
            e = Engine(Path({str(shared_root)!r}), registry_mirrors=[{registry.url!r}])
            hc = types_pb2.HealthConfig(test=["CMD", "true"])
            hc.interval.FromMilliseconds(200)
            s = types_pb2.ContainerSpec(image="busybox", args=["sh", "-c", "trap 'exit 42' TERM; "
                                        "while true; do sleep 0.1; done"], healthcheck=hc)
            await e.create(ContainerConfig({c!r}, "adopt.1", s))
            await e.start({c!r})
            await e.create(ContainerConfig({c + "x"!r}, "adopt.2", types_pb2.ContainerSpec(
                image="busybox", args=["sh", "-c", "exit 5"])))
            await e.start({c + "x"!r})
            print("started", flush=True)
            os.kill(os.getpid(), signal.SIGKILL)
        asyncio.run(main())
    """)
    p = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert p.returncode == -9 and "started" in p.stdout, p.stderr
    e = Engine(shared_root, registry_mirrors=[registry.url])

    async def main():
        try:
            listed = [x for x in await e.list() if x.id == c]
            st = None
            for _ in range(600):  # the adopted health monitor probes again (deadline 30 s)
                st = await e.inspect(c)
                if st.health and st.health.status == "healthy":
                    break
                await asyncio.sleep(0.05)
            await e.stop(c, timeout=10)
            exited_meanwhile = await e.wait(c + "x")  # it exited while no engine process was alive
            return listed, st, await e.inspect(c), exited_meanwhile
        finally:
            await e.remove(c)
            await e.remove(c + "x")
            await e.close()

    listed, st, after, exited_meanwhile = run(main())
    assert exited_meanwhile.exit_code == 5 and exited_meanwhile.reason == "Error"
    assert len(listed) == 1 and listed[0].status == "running" and listed[0].pid > 0
    assert st.health.status == "healthy"
    assert after.status == "exited" and after.exit.exit_code == 42
    assert_gone(e, c)


def test_create_start_stop_remove_leaves_nothing(engine):
    c = cid("clean")
    s = spec("sleep", "1000")
    s.secrets.add(secret_id="x", secret_name="x")

    async def main():
        await engine.create(
            ContainerConfig(
                c, "clean.1", s, secrets={"x": b"1"}, resources=types_pb2.ResourceRequirements(pids_limit=50)
            )
        )
        await engine.start(c)
        during = (
            mounts_under(engine.root),
            runc_ids(engine.runc_root),
            engine._cgroup_dirs(f"/shoal-{engine.tag}/{c}"),
        )
        await engine.remove(c)  # kills the running container
        return during

    during = run(main())
    assert any(c in m for m in during[0]) and c in during[1] and during[2]
    assert_gone(engine, c)


def test_platform_choice_from_index(fresh_engine, registry, images):
    img = run(fresh_engine.pull(f"{registry.host}/multi"))
    assert img.architecture == host_arch()[0] and img.id == images["busybox"].id
    assert img.repo_digests[0].startswith(f"{registry.host}/multi@sha256:")


def test_start_latency_is_recorded(engine):
    # not a timing assertion: checks that create+start works back to back for several containers
    ids = [cid(f"many{i}") for i in range(5)]

    async def main():
        t = time.monotonic()
        await asyncio.gather(*(engine.create(ContainerConfig(i, i, spec("sleep", "100"))) for i in ids))
        await asyncio.gather(*(engine.start(i) for i in ids))
        sts = [await engine.inspect(i) for i in ids]
        await asyncio.gather(*(engine.remove(i) for i in ids))
        return sts, time.monotonic() - t

    sts, _ = run(main())
    assert [s.status for s in sts] == ["running"] * 5
    for i in ids:
        assert_gone(engine, i)


def test_cancelled_create_leaves_nothing(engine):
    """A create cancelled at any point (the worker gave up on the task) leaves no trace."""
    ids = [cid(f"cancel{i}") for i in range(5)]

    async def main():
        for i, c in enumerate(ids):
            t = asyncio.create_task(engine.create(ContainerConfig(c, c, spec("sleep", "100"))))
            await asyncio.sleep(0.01 * i)
            t.cancel()
            try:
                await t
            except asyncio.CancelledError:
                pass
            else:  # finished before the cancel: a normal container, removed as usual
                await engine.remove(c)

    run(main())
    for c in ids:
        assert_gone(engine, c)


def test_states_and_wrong_transitions(engine):
    from shoal.agent.engine import ContainerExists, ContainerNotFound, InvalidState

    c = cid("states")

    async def main():
        await engine.create(ContainerConfig(c, c, spec("sleep", "100")))
        with pytest.raises(ContainerExists):
            await engine.create(ContainerConfig(c, c, spec("sleep", "100")))
        created = await engine.inspect(c)
        await engine.stop(c)  # a created container is killed at once
        stopped = await engine.inspect(c)
        with pytest.raises(InvalidState):
            await engine.start(c)
        await engine.remove(c)
        with pytest.raises(ContainerNotFound):
            await engine.inspect(c)
        return created, stopped

    created, stopped = run(main())
    assert created.status == "created" and created.pid > 0 and created.started_at is None
    assert stopped.status == "exited" and stopped.exit.exit_code == 137


def test_run_dir_on_tmpfs(shared_root, registry):
    """Runtime files on a separate (tmpfs) run_dir: the container runs, is re-adopted, and is cleaned."""
    import tempfile

    run_dir = Path(tempfile.mkdtemp(prefix=f"shoal-{PREFIX}-run-", dir="/dev/shm"))
    c = cid("rundir")
    try:
        e1 = Engine(shared_root, registry_mirrors=[registry.url], run_dir=run_dir)

        async def first():
            await e1.create(ContainerConfig(c, c, spec("sleep", "100")))
            await e1.start(c)
            await e1.close()

        run(first())
        assert (run_dir / c / "bundle" / "config.json").exists() and c in runc_ids(run_dir / "runc")
        e2 = Engine(shared_root, registry_mirrors=[registry.url], run_dir=run_dir)

        async def second():
            st = await e2.inspect(c)
            await e2.remove(c)
            return st

        st = run(second())
        assert st.status == "running"
        assert not (run_dir / c).exists() and c not in runc_ids(run_dir / "runc")
        assert_gone(e2, c)
    finally:
        import shutil

        shutil.rmtree(run_dir, ignore_errors=True)


def test_tty(engine):
    c = cid("tty")
    ex, lines = run(run_to_exit(engine, ContainerConfig(c, c, spec("sh", "-c", "tty; exit 4", tty=True))))
    assert ex.exit_code == 4 and out(lines) == ["/dev/pts/0\r"]  # a pty, as `docker run -t` logs it


def test_log_rotation_by_size(shared_root, registry):
    e = Engine(shared_root, registry_mirrors=[registry.url], log_size_max=8192)
    c = cid("rotate")
    s = spec("sh", "-c", "i=0; while [ $i -lt 2000 ]; do echo line$i; i=$((i+1)); done")

    async def main():
        try:
            await e.create(ContainerConfig(c, c, s))
            await e.start(c)
            followed = [x.line async for x in e.logs(c, follow=True)]
            after = [x.line async for x in e.logs(c)]
            size = (e.root / "containers" / c / "ctr.log").stat().st_size
            return followed, after, size
        finally:
            await e.remove(c)
            await e.close()

    followed, after, size = run(main())
    assert size <= 8192 and 0 < len(after) < 2000 and after[-1] == "line1999"
    assert followed[-1] == "line1999"
    nums = [int(x[4:]) for x in followed]
    assert nums == sorted(nums)  # a follower never goes back across a rotation


def test_log_follower_ends_when_container_removed(engine):
    c = cid("follow-rm")

    async def main():
        await engine.create(ContainerConfig(c, c, spec("sh", "-c", "echo one; sleep 1000")))
        await engine.start(c)
        got = []

        async def follow():
            async for x in engine.logs(c, follow=True):
                got.append(x.line)

        t = asyncio.create_task(follow())
        for _ in range(600):
            if got:
                break
            await asyncio.sleep(0.05)
        await engine.remove(c)
        await asyncio.wait_for(t, 30)  # the follower ends by itself
        return got

    assert run(main()) == ["one"]
