"""Registry client pieces that need no network: auth challenges, credentials, endpoint choice,
platform choice. No root needed."""

import base64
import json

import pytest

from shoal.agent.engine import reference
from shoal.agent.engine.distribution import RegistryAuth, parse_challenge
from shoal.agent.engine.errors import AuthenticationFailed, UnsupportedPlatform
from shoal.agent.engine.images import ImageStore, choose_platform, host_arch


def test_parse_challenge():
    kind, p = parse_challenge(
        'Bearer realm="https://auth.docker.io/token",service="registry.docker.io",'
        'scope="repository:library/busybox:pull"'
    )
    assert kind == "bearer"
    assert p == {
        "realm": "https://auth.docker.io/token",
        "service": "registry.docker.io",
        "scope": "repository:library/busybox:pull",
    }
    assert parse_challenge('Basic realm="x"') == ("basic", {"realm": "x"})


def test_registry_auth_from_b64():
    raw = (
        base64.urlsafe_b64encode(json.dumps({"username": "u", "password": "p"}).encode()).decode().rstrip("=")
    )
    a = RegistryAuth.from_b64(raw)
    assert (a.username, a.password) == ("u", "p") and "p" not in repr(a)
    assert RegistryAuth.from_b64("") is None
    with pytest.raises(AuthenticationFailed):
        RegistryAuth.from_b64("not base64 json!")


def test_endpoints(tmp_path):
    st = ImageStore(
        tmp_path,
        registry_mirrors=["http://198.18.0.254:5000/"],
        insecure_registries=["198.18.0.254:5000", "10.9.0.0/16"],
    )
    assert st._endpoints(reference.parse("busybox")) == [
        ("http://198.18.0.254:5000", True, True),
        ("https://registry-1.docker.io", True, False),
    ]
    assert st._endpoints(reference.parse("reg.example.com/x")) == [("https://reg.example.com", True, False)]
    for insecure in ("198.18.0.254:5000/x", "127.0.0.1:5000/x", "localhost:5000/x", "10.9.1.2:80/x"):
        eps = st._endpoints(reference.parse(insecure))
        assert [e[0].split(":")[0] for e in eps] == ["https", "http"] and not eps[0][1]
    assert st._endpoints(reference.parse("10.10.1.2:80/x")) == [("https://10.10.1.2:80", True, False)]


def test_choose_platform():
    arch = host_arch()[0]
    idx = {
        "manifests": [
            {"digest": "sha256:w", "platform": {"os": "windows", "architecture": arch}},
            {
                "digest": "sha256:o",
                "platform": {"os": "linux", "architecture": "s390x" if arch != "s390x" else "ppc64le"},
            },
            {"digest": "sha256:l", "platform": {"os": "linux", "architecture": arch}},
        ]
    }
    assert choose_platform(idx, "x")["digest"] == "sha256:l"
    with pytest.raises(UnsupportedPlatform) as e:
        choose_platform({"manifests": idx["manifests"][:2]}, "x")
    assert f"linux/{arch}" in str(e.value)
