"""swarmctl's flag parsers, and the duration/size/CPU parser it shares with stack files."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from shoal.cli import units
from shoal.compose import units as shared
from shoal.proto import types_pb2


@pytest.mark.parametrize("text,ns", [
    ("0", 0), ("1s", 10**9), ("500ms", 5 * 10**8), ("1m30s", 90 * 10**9), ("2h", 7200 * 10**9),
    ("1.5s", 1_500_000_000), ("10us", 10_000), ("3ns", 3), ("1h1m1s", 3661 * 10**9),
])
def test_durations(text: str, ns: int) -> None:
    assert shared.parse_duration(text) == ns


@pytest.mark.parametrize("text", ["", "5", "5x", "s", "-1s", "1s2", "1 s", "abc"])
def test_bad_durations(text: str) -> None:
    with pytest.raises(ValueError, match="invalid duration"):
        shared.parse_duration(text)


@pytest.mark.parametrize("ns,text", [(0, "0s"), (90 * 10**9, "1m30s"), (5 * 10**8, "500ms"), (7200 * 10**9, "2h")])
def test_format_duration(ns: int, text: str) -> None:
    assert shared.format_duration(ns) == text


@pytest.mark.parametrize("text,n", [
    ("1024", 1024), ("64m", 64 << 20), ("64M", 64 << 20), ("64MiB", 64 << 20), ("64mb", 64 << 20),
    ("1.5g", int(1.5 * (1 << 30))), ("512k", 512 << 10), ("10b", 10), ("2 GB", 2 << 30), ("1t", 1 << 40),
])
def test_bytes(text: str, n: int) -> None:
    assert shared.parse_bytes(text) == n


@pytest.mark.parametrize("text", ["", "10q", "m", "-1m", "1.2.3m", "5ib"])
def test_bad_bytes(text: str) -> None:
    with pytest.raises(ValueError, match="invalid size"):
        shared.parse_bytes(text)


# Where swarmctl's own parser (floats) and the stack files' parser (decimals) disagreed before they
# became one (shoal.compose.units): each row is what both flag and stack file now give.
@pytest.mark.parametrize("text,ns", [
    ("9007199254740993ns", 9007199254740993),   # float: ...992
    ("0.0000000015s", 1),                       # cut off as Go does; the CLI rounded to 2
    ("1.9999999999999999ns", 1),                # float: 2
    ("+1s", 10**9),                             # Go takes a sign; compose refused it
    ("1\u03bcs", 1000),                         # Greek mu as Go takes it; the CLI refused it
    ("1\u00b5s", 1000),
])
def test_duration_edges(text: str, ns: int) -> None:
    assert shared.parse_duration(text) == ns


@pytest.mark.parametrize("text,n", [
    ("1.9999999999999999k", 2047),              # float: 2048
    ("0.1k", 102),
    (2048, 2048),
])
def test_bytes_edges(text: str | int, n: int) -> None:
    assert shared.parse_bytes(text) == n


@pytest.mark.parametrize("parse,text", [(shared.parse_bytes, "5ib"), (shared.parse_bytes, "1i"),
                                        (shared.parse_duration, "-1s")])
def test_refused_by_both(parse: Callable[[str], int], text: str) -> None:
    with pytest.raises(ValueError, match="invalid"):  # compose took "1i" and "5ib" as 1 and 5 bytes
        parse(text)


def test_cpus_edges() -> None:
    # the CLI truncated these to 0 and 123456789; docker (and compose) refuse them
    for text in ("0.0000000001", "0.1234567891"):
        with pytest.raises(ValueError, match="too precise"):
            shared.parse_cpus(text)
    assert shared.parse_cpus("0.123456789") == 123456789
    assert shared.parse_cpus(1e-05) == 10_000


@pytest.mark.parametrize("ns,text", [(1, "1ns"), (1500, "1.5us"), (500_000, "500us"), (1_500_000, "1.5ms"),
                                     (10**9 + 1, "1.000000001s"), (3723 * 10**9 + 5 * 10**8, "1h2m3.5s")])
def test_format_duration_exact(ns: int, text: str) -> None:
    # the CLI printed 1e-06ms for 1ns and 1s for 1.000000001s
    assert shared.format_duration(ns) == text
    assert shared.parse_duration(text) == ns


def test_cpus_and_uint() -> None:
    assert shared.parse_cpus("0.5") == 500_000_000 and shared.parse_cpus("2") == 2_000_000_000
    for bad in ("", "x", "-1", "nan", "inf"):
        with pytest.raises(ValueError, match="CPU"):
            shared.parse_cpus(bad)
    assert units.parse_uint("7", "replicas") == 7
    for bad in ("-1", "1.5", "", "x", str(1 << 64)):
        with pytest.raises(ValueError, match="replicas"):
            units.parse_uint(bad, "replicas")


P = types_pb2.PortConfig


@pytest.mark.parametrize("text,want", [
    ("80", [P(target_port=80)]),
    ("8080:80", [P(target_port=80, published_port=8080)]),
    ("53:53/udp", [P(target_port=53, published_port=53, protocol=P.UDP)]),
    ("8080-8081:80-81", [P(target_port=80, published_port=8080), P(target_port=81, published_port=8081)]),
    ("published=8080,target=80,mode=host,protocol=sctp",
     [P(target_port=80, published_port=8080, publish_mode=P.HOST, protocol=P.SCTP)]),
    ("target=80", [P(target_port=80)]),
])
def test_ports(text: str, want: list[types_pb2.PortConfig]) -> None:
    assert units.parse_port(text) == want


@pytest.mark.parametrize("text,match", [
    ("http", "target port"), ("1:2:3", "invalid port"), ("80/xtp", "protocol"), ("8080-8082:80-81", "differ"),
    ("published=80", "no target"), ("target=80,mode=bridge", "publish mode"), ("target=80,colour=red", "unknown"),
    ("-1", "target port"),
])
def test_bad_ports(text: str, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        units.parse_port(text)


def test_format_port() -> None:
    assert units.format_port(P(target_port=80, published_port=8080)) == "*:8080->80/tcp"


def test_mounts() -> None:
    m = units.parse_mount("type=bind,source=/srv,target=/data,readonly,bind-propagation=rprivate")
    assert (m.type, m.source, m.target, m.readonly, m.bind_options.propagation) == (
        types_pb2.Mount.BIND, "/srv", "/data", True, "rprivate")
    m = units.parse_mount("type=tmpfs,dst=/t,tmpfs-size=1m,tmpfs-mode=1777")
    assert m.tmpfs_options.size_bytes == 1 << 20 and m.tmpfs_options.mode == 0o1777
    m = units.parse_mount("vol:/data:ro")
    assert (m.type, m.source, m.target, m.readonly) == (types_pb2.Mount.VOLUME, "vol", "/data", True)
    assert units.parse_mount("/a:/b").type == types_pb2.Mount.BIND
    m = units.parse_mount("source=v,target=/v,volume-label=a=b,volume-nocopy=true")
    assert m.volume_options.labels == {"a": "b"} and m.volume_options.nocopy
    for bad, match in (("type=nfs,target=/x", "mount type"), ("source=a", "no target"), ("a", "invalid mount"),
                       ("target=/x,foo=1", "unknown mount option"), ("target=/x,readonly=maybe", "readonly"),
                       ("type=tmpfs,target=/t,tmpfs-mode=9z", "tmpfs-mode")):
        with pytest.raises(ValueError, match=match):
            units.parse_mount(bad)


def test_file_refs_and_misc() -> None:
    r = units.parse_file_ref("source=s1,target=pw,uid=1,gid=2,mode=0400", "secret")
    assert (r.secret_name, r.file.name, r.file.uid, r.file.gid, r.file.mode) == ("s1", "pw", "1", "2", 0o400)
    assert units.parse_file_ref("c1", "config").config_name == "c1"
    with pytest.raises(ValueError, match="no source"):
        units.parse_file_ref("target=x", "secret")
    with pytest.raises(ValueError, match="unknown config option"):
        units.parse_file_ref("source=c,owner=me", "config")
    assert units.parse_placement_pref("spread=node.labels.zone").spread_descriptor == "node.labels.zone"
    with pytest.raises(ValueError, match="spread="):
        units.parse_placement_pref("pack=node.labels.zone")
    assert units.parse_ulimit("nofile=1024:2048") == types_pb2.Ulimit(name="nofile", soft=1024, hard=2048)
    assert units.parse_add_host("db:10.0.0.5") == "10.0.0.5 db"
    with pytest.raises(ValueError):
        units.parse_add_host("db")


def test_env_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SHOAL_TEST_VAR", "v1")
    assert units.parse_env("SHOAL_TEST_VAR") == "SHOAL_TEST_VAR=v1"
    assert units.parse_env("A=1") == "A=1"
