"""Property tests: whatever a stack file holds, the loader answers with a result or a ComposeError —
never another exception (no traceback for a user's mistake)."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shoal.compose import ComposeError, ComposeSource, convert, load, plan
from shoal.compose.interpolate import InterpolationError, substitute
from shoal.compose.yamlsrc import parse_yaml

KEYS = [
    "services", "networks", "volumes", "secrets", "configs", "version", "name", "x-ext",
    "web", "db", "front", "data", "s1",
    "image", "command", "entrypoint", "environment", "env_file", "user", "working_dir", "hostname", "healthcheck",
    "stop_grace_period", "stop_signal", "tmpfs", "cap_add", "cap_drop", "sysctls", "ulimits", "dns", "dns_search",
    "dns_opt", "extra_hosts", "group_add", "init", "read_only", "labels", "logging", "ports", "deploy",
    "depends_on", "build", "restart", "mem_limit", "container_name", "expose",
    "mode", "replicas", "endpoint_mode", "placement", "resources", "restart_policy", "update_config",
    "rollback_config", "constraints", "preferences", "spread", "max_replicas_per_node", "limits", "reservations",
    "cpus", "memory", "pids", "generic_resources", "discrete_resource_spec", "kind", "value", "condition", "delay",
    "max_attempts", "window", "parallelism", "failure_action", "monitor", "max_failure_ratio", "order",
    "test", "interval", "timeout", "retries", "start_period", "disable", "driver", "options", "driver_opts",
    "external", "internal", "attachable", "ipam", "config", "subnet", "file", "content", "target", "source",
    "published", "protocol", "type", "read_only", "bind", "propagation", "tmpfs", "size", "aliases", "soft",
    "hard", "uid", "gid", "path", "required",
]
SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(2**40), max_value=2**40),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from(["", "nginx", "3", "three", "10s", "1m30s", "512m", "0.5", "80:80", "8080:80/udp", "data:/d",
                     "./x:/x:ro", "global", "replicated", "vip", "dnsrr", "any", "host", "volume", "tmpfs",
                     "node.role==worker", "CMD", "CMD-SHELL", "$", "$$", "${A}", "${B:?no}", "${A:-x}", "0440",
                     "web", "db", "front", "data", "s1", "true", "x=1", "bad name"]),
    st.text(max_size=12),
)
DOCS = st.recursive(
    SCALARS,
    lambda children: st.one_of(
        st.lists(children, max_size=4),
        st.dictionaries(st.one_of(st.sampled_from(KEYS), st.text(max_size=6)), children, max_size=5),
    ),
    max_leaves=30,
)
GOOD: dict[str, Any] = {
    "services": {
        "web": {
            "image": "nginx:1.25", "ports": ["8080:80", {"target": 443, "published": 8443}],
            "volumes": ["data:/d", "./c:/c:ro"], "networks": {"front": {"aliases": ["w"]}},
            "environment": {"A": "${A}"}, "secrets": ["s1"], "healthcheck": {"test": "true", "interval": "5s"},
            "deploy": {"replicas": 2, "resources": {"limits": {"cpus": "0.5", "memory": "64m"}},
                       "placement": {"constraints": ["node.role==worker"]},
                       "update_config": {"parallelism": 1, "order": "start-first"}},
        },
        "db": {"image": "postgres", "deploy": {"mode": "global"}},
    },
    "networks": {"front": {"driver": "overlay"}},
    "volumes": {"data": None},
    "secrets": {"s1": {"content": "x"}},
    "configs": {"c1": {"content": "y"}},
}
# "content" is only allowed for configs; make the secret valid through the environment.
GOOD["secrets"] = {"s1": {"environment": "A"}}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("props")


def _check(text: str, workdir: Path) -> None:
    try:
        project = load([ComposeSource("stack.yml", text)], environment={"A": "a"}, working_dir=workdir)
        stack = convert(project, "st")
        plan(stack, [], [], [], [], prune=True)
    except ComposeError as e:
        msg = str(e)
        assert msg and "\n" not in msg


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(doc=DOCS)
def test_random_documents(doc: Any, workdir: Path) -> None:
    _check(yaml.safe_dump(doc), workdir)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(doc=st.dictionaries(st.sampled_from(["services"]), st.dictionaries(st.sampled_from(["web", "db"]), DOCS,
                                                                          max_size=2), min_size=1))
def test_random_services(doc: Any, workdir: Path) -> None:
    _check(yaml.safe_dump(doc), workdir)


def _paths(node: Any, prefix: tuple = ()) -> list[tuple]:
    out = [prefix]
    if isinstance(node, dict):
        for k, v in node.items():
            out.extend(_paths(v, prefix + (k,)))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            out.extend(_paths(v, prefix + (i,)))
    return out


ALL_PATHS = [p for p in _paths(GOOD) if p]


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(path=st.sampled_from(ALL_PATHS), value=DOCS)
def test_mutated_valid_document(path: tuple, value: Any, workdir: Path) -> None:
    doc = copy.deepcopy(GOOD)
    node = doc
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    _check(yaml.safe_dump(doc), workdir)


def test_the_unmutated_document_is_valid(workdir: Path) -> None:
    project = load([ComposeSource("stack.yml", yaml.safe_dump(GOOD))], environment={"A": "a"}, working_dir=workdir)
    assert sorted(convert(project, "st").services) == ["st_db", "st_web"]


@settings(max_examples=300, deadline=None)
@given(text=st.text(alphabet=st.sampled_from(list("ab:-[]{}&*!|>'\"#%@`,?\n \t$<=~0123456789")), max_size=60))
def test_random_yaml_text(text: str) -> None:
    try:
        parse_yaml(text, "stack.yml")
    except ComposeError:
        pass


@settings(max_examples=300, deadline=None)
@given(text=st.text(alphabet=st.sampled_from(list("${}:-?+_AB x")), max_size=30))
def test_random_interpolation(text: str) -> None:
    try:
        out = substitute(text, {"A": "1", "B": ""})
    except InterpolationError:
        return
    assert isinstance(out, str)
