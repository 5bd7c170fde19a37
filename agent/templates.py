"""Docker's service templates: `{{.Node.Hostname}}` and friends in a task's container spec.

As `docker service create --hostname "{{.Node.Hostname}}-{{.Task.Slot}}" --env NODE={{.Node.ID}}`:
placeholders in the hostname, environment values and mount sources are replaced on the node, just
before the container is created. An unknown placeholder rejects the task with a sentence naming it.
"""

from __future__ import annotations

import platform
import re

from shoal.proto import objects_pb2

_PLACEHOLDER = re.compile(r"\{\{\s*([^{}]*?)\s*\}\}")
ARCH = {"x86_64": "amd64", "aarch64": "arm64"}


class TemplateError(ValueError):
    """A placeholder Shoal does not know; the message names it and lists the known ones."""


def template_values(task: objects_pb2.Task, node_id: str, node_hostname: str) -> dict[str, str]:
    machine = platform.machine()
    return {
        ".Service.ID": task.service_id,
        ".Service.Name": task.service_annotations.name,
        ".Node.ID": node_id,
        ".Node.Hostname": node_hostname,
        ".Node.Platform.OS": platform.system().lower(),
        ".Node.Platform.Architecture": ARCH.get(machine, machine),
        ".Task.ID": task.id,
        ".Task.Name": task.annotations.name or task.id,
        ".Task.Slot": str(task.slot) if task.slot else node_id,
    }


def expand(text: str, values: dict[str, str], where: str) -> str:
    def one(m: re.Match[str]) -> str:
        key = m.group(1)
        if key not in values:
            raise TemplateError(
                f"{where}: unknown template placeholder {{{{{key}}}}}; "
                f"use one of {', '.join('{{' + k + '}}' for k in values)}"
            )
        return values[key]

    return _PLACEHOLDER.sub(one, text) if "{{" in text else text


def expand_task(task: objects_pb2.Task, node_id: str, node_hostname: str) -> objects_pb2.Task:
    """A copy of `task` whose container hostname, env values and mount sources are expanded."""
    c = task.spec.container
    if "{{" not in c.hostname and not any("{{" in e for e in c.env) and not any("{{" in m.source for m in c.mounts):
        return task
    values = template_values(task, node_id, node_hostname)
    out = objects_pb2.Task()
    out.CopyFrom(task)
    oc = out.spec.container
    oc.hostname = expand(oc.hostname, values, "container hostname")
    for i, e in enumerate(oc.env):
        key, sep, val = e.partition("=")
        oc.env[i] = key + sep + expand(val, values, f"env {key}")
    for m in oc.mounts:
        m.source = expand(m.source, values, f"mount source of {m.target}")
    return out
