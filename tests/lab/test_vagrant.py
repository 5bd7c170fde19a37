"""The Vagrant lab: the file validates, and VMs are provisioned through the lab's own init/join path."""

import subprocess
from pathlib import Path

import pytest

from shoal.lab import lab as lab_mod
from shoal.lab import provision

TOP = Path(__file__).resolve().parents[2]


def test_vagrantfile_validates() -> None:
    for env in ({}, {"MANAGERS": "3", "WORKERS": "4"}):
        r = subprocess.run(["vagrant", "validate", "--ignore-provider"], cwd=TOP / "vagrant",
                           capture_output=True, text=True, timeout=120, env={**_env(), **env})
        assert r.returncode == 0, r.stdout + r.stderr
        assert "validated successfully" in r.stdout


def _env() -> dict[str, str]:
    import os

    return {k: v for k, v in os.environ.items() if not k.startswith("VAGRANT_")}


def test_provisioning_uses_the_lab_code_path(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    script = (TOP / "vagrant" / "provision.sh").read_text()
    assert "-m shoal.lab.provision" in script and "scripts/setup" in script

    calls: list[tuple] = []
    real = provision.swarmd_argv

    def spy(*a, **kw):
        calls.append((a, kw))
        return real(*a, **kw)

    # The lab builds swarmd's command line with provision.swarmd_argv ...
    monkeypatch.setattr(lab_mod, "swarmd_argv", spy)
    host = lab_mod.Host(name="h2", index=2, role="worker", addr="198.18.0.2", netns="/run/netns/x",
                        state_dir=str(tmp_path / "h2"))
    argv = lab_mod.Lab("t").swarmd_argv(host, token="SWMTKN-1-x-y", join="198.18.0.1")
    assert calls and argv[argv.index("--join-addr") + 1] == "198.18.0.1:2377"
    # ... and so does the VM provisioner (its systemd unit is not installed here: stop before systemctl).
    calls.clear()
    monkeypatch.setattr(provision, "swarmd_argv", spy)
    (tmp_path / "tokens").mkdir()
    (tmp_path / "tokens" / "worker").write_text("SWMTKN-1-x-y\n")

    def no_systemd(*a, **kw):
        raise RuntimeError("stop here")

    monkeypatch.setattr(provision.Path, "write_text", no_systemd)
    with pytest.raises(RuntimeError, match="stop here"):
        provision.main(["--role", "worker", "--addr", "192.168.56.101", "--hostname", "worker1",
                        "--state-dir", str(tmp_path / "st"), "--join-addr", "192.168.56.11",
                        "--token-dir", str(tmp_path / "tokens"), "--wait", "1"])
    (a, kw), = calls
    assert kw["join_addr"] == "192.168.56.11" and kw["token"] == "SWMTKN-1-x-y"


def test_swarmd_argv_refuses_init_and_join_together() -> None:
    with pytest.raises(ValueError, match="not both"):
        provision.swarmd_argv("/s", "1.2.3.4", "h", "manager", socket="/s/x", init=True, join_addr="x")
    with pytest.raises(ValueError, match="role"):
        provision.swarmd_argv("/s", "1.2.3.4", "h", "boss", socket="/s/x")


def test_systemd_unit_restarts_always_and_leaves_the_containers_alive(tmp_path: Path) -> None:
    """The unit provisioning installs: systemd's own checker finds nothing wrong in it, it restarts
    swarmd whatever ended it, and stopping it signals swarmd alone (KillMode=process), so the
    containers' monitors live on (what a real systemd does with it: tests/lab/test_systemd_unit.py)."""
    argv = provision.swarmd_argv("/var/lib/shoal", "192.168.56.11", "m1", "manager",
                                 socket="/var/lib/shoal/swarmd.sock", init=True)
    text = provision.unit_text(argv)
    unit = tmp_path / "swarmd.service"
    unit.write_text(text)
    directives = dict(ln.split("=", 1) for ln in text.splitlines() if "=" in ln and not ln.startswith("#"))
    assert directives["ExecStart"] == " ".join(argv) and "@" not in directives["ExecStart"]
    assert directives["Restart"] == "always" and directives["KillMode"] == "process"
    r = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stderr.strip() == "", r.stderr
    # the checker does find a mistake (so its silence above means something)
    unit.write_text(text.replace("KillMode=process", "KillMode=bogus"))
    r = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60)
    assert "Failed to parse kill mode" in r.stderr
