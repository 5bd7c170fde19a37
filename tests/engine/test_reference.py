"""Image reference parsing and normalisation (Docker's rules). No root needed."""

import pytest

from shoal.agent.engine.errors import InvalidReference
from shoal.agent.engine.reference import parse

D = "sha256:" + "a" * 64


@pytest.mark.parametrize(
    "ref,domain,path,tag,digest",
    [
        ("busybox", "docker.io", "library/busybox", "latest", None),
        ("busybox:1.36", "docker.io", "library/busybox", "1.36", None),
        ("alice/app", "docker.io", "alice/app", "latest", None),
        ("docker.io/busybox", "docker.io", "library/busybox", "latest", None),
        ("index.docker.io/library/busybox:x", "docker.io", "library/busybox", "x", None),
        ("localhost/app", "localhost", "app", "latest", None),
        ("localhost:5000/a/b/c:v1", "localhost:5000", "a/b/c", "v1", None),
        ("127.0.0.1:5000/busybox", "127.0.0.1:5000", "busybox", "latest", None),
        ("reg.example.com/team/app@" + D, "reg.example.com", "team/app", None, D),
        ("reg.example.com/team/app:v2@" + D, "reg.example.com", "team/app", "v2", D),
        ("my-registry:443/x_y.z__w-v", "my-registry:443", "x_y.z__w-v", "latest", None),
    ],
)
def test_parse(ref, domain, path, tag, digest):
    r = parse(ref)
    assert (r.domain, r.path, r.tag, r.digest) == (domain, path, tag, digest)


def test_str_and_familiar():
    r = parse("busybox")
    assert str(r) == "docker.io/library/busybox:latest"
    assert r.familiar == "busybox:latest"
    assert parse("alice/app:1").familiar == "alice/app:1"
    assert parse("127.0.0.1:5000/x").familiar == "127.0.0.1:5000/x:latest"
    assert str(parse("x@" + D)) == "docker.io/library/x@" + D


@pytest.mark.parametrize(
    "bad",
    [
        "",
        " busybox",
        "Busybox",
        "alice/App",
        "busybox:",
        "busybox:-x",
        "busybox@sha256:abc",
        "busybox@md5",
        "a//b",
        "a/b/",
        "x:" + "t" * 129,
        "a" * 64,
        "bad_domain.com:port/x",
    ],
)
def test_invalid(bad):
    with pytest.raises(InvalidReference) as e:
        parse(bad)
    assert "\n" not in str(e.value)


def test_uppercase_domain_component_is_a_domain():
    # like Docker: an uppercase first component can only be a domain
    assert parse("Example/app").domain == "Example"
