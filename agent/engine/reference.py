"""Image references as Docker parses them: ``[domain[:port]/]path[:tag][@digest]``.

``busybox`` → ``docker.io/library/busybox:latest``; ``alice/app`` → ``docker.io/alice/app:latest``;
``localhost:5000/x`` and ``reg.example/x`` keep their domain (a first component is a domain when it
has a ``.`` or a ``:`` or is ``localhost``); ``index.docker.io`` is ``docker.io``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from shoal.agent.engine.errors import InvalidReference

DEFAULT_DOMAIN = "docker.io"
LEGACY_DOMAIN = "index.docker.io"
OFFICIAL_PREFIX = "library/"

_PATH_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|[-]*)[a-z0-9]+)*"
_DOMAIN_COMPONENT = r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
_DOMAIN = rf"(?:{_DOMAIN_COMPONENT}(?:\.{_DOMAIN_COMPONENT})*|\[[0-9a-fA-F:.]+\])(?::[0-9]+)?"
_PATH_RE = re.compile(rf"^{_PATH_COMPONENT}(?:/{_PATH_COMPONENT})*$")
_DOMAIN_RE = re.compile(rf"^{_DOMAIN}$")
_TAG_RE = re.compile(r"^[\w][\w.-]{0,127}$")
_DIGEST_RE = re.compile(r"^[A-Za-z][A-Za-z0-9]*(?:[-_+.][A-Za-z][A-Za-z0-9]*)*:[0-9a-fA-F]{32,}$")
_ID_RE = re.compile(r"^(?:sha256:)?[0-9a-f]{64}$")


@dataclass(frozen=True)
class Reference:
    domain: str
    path: str
    tag: str | None = None
    digest: str | None = None

    @property
    def repository(self) -> str:
        return f"{self.domain}/{self.path}"

    @property
    def is_docker_hub(self) -> bool:
        return self.domain == DEFAULT_DOMAIN

    def __str__(self) -> str:
        s = self.repository
        if self.tag:
            s += ":" + self.tag
        if self.digest:
            s += "@" + self.digest
        return s

    @property
    def familiar(self) -> str:
        """The short form Docker prints (``busybox:latest``)."""
        name = self.repository
        if self.is_docker_hub:
            name = self.path[len(OFFICIAL_PREFIX) :] if self.path.startswith(OFFICIAL_PREFIX) else self.path
        s = name
        if self.tag:
            s += ":" + self.tag
        if self.digest:
            s += "@" + self.digest
        return s

    def with_tag(self, tag: str | None) -> Reference:
        return Reference(self.domain, self.path, tag, self.digest)

    def with_digest(self, digest: str | None) -> Reference:
        return Reference(self.domain, self.path, self.tag, digest)


def split_domain(name: str) -> tuple[str, str]:
    first, sep, rest = name.partition("/")
    if not sep or ("." not in first and ":" not in first and first != "localhost" and first.lower() == first):
        domain, path = DEFAULT_DOMAIN, name
    else:
        domain, path = first, rest
    if domain == LEGACY_DOMAIN:
        domain = DEFAULT_DOMAIN
    if domain == DEFAULT_DOMAIN and "/" not in path:
        path = OFFICIAL_PREFIX + path
    return domain, path


def parse(ref: str, *, default_tag: bool = True) -> Reference:
    """Parses and normalises ``ref``; adds ``:latest`` when it has neither tag nor digest."""
    if not ref or ref != ref.strip():
        raise InvalidReference(f"invalid image reference {ref!r}: it is empty or has surrounding spaces")
    if _ID_RE.match(ref) and ":" not in ref:
        raise InvalidReference(f"invalid image reference {ref!r}: a 64-hex image id is not a repository name")
    name, digest = ref, None
    if "@" in ref:
        name, _, digest = ref.partition("@")
        if not _DIGEST_RE.match(digest):
            raise InvalidReference(
                f"invalid image reference {ref!r}: bad digest {digest!r} (want sha256:<hex>)"
            )
        if digest.startswith("sha256:") and len(digest) != 71:
            raise InvalidReference(f"invalid image reference {ref!r}: sha256 digest must have 64 hex digits")
    tag = None
    last = name.rsplit("/", 1)[-1]
    if ":" in last:
        name, _, tag = name.rpartition(":")
        if not _TAG_RE.match(tag):
            raise InvalidReference(f"invalid image reference {ref!r}: bad tag {tag!r}")
    domain, path = split_domain(name)
    if not _DOMAIN_RE.match(domain):
        raise InvalidReference(f"invalid image reference {ref!r}: bad registry domain {domain!r}")
    if path.lower() != path:
        raise InvalidReference(f"invalid image reference {ref!r}: repository name must be lowercase")
    if not _PATH_RE.match(path):
        raise InvalidReference(f"invalid image reference {ref!r}: bad repository name {path!r}")
    if len(domain) + 1 + len(path) > 255:
        raise InvalidReference(f"invalid image reference {ref!r}: repository name longer than 255 characters")
    if tag is None and digest is None and default_tag:
        tag = "latest"
    return Reference(domain, path, tag, digest)
