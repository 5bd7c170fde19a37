"""`/networks`, `/secrets`, `/configs` and `/distribution/{image}/json`.

Networks (../shared/docs/docker-cli-api.md §2 "docker network ..."): Shoal has swarm-scope overlay
networks only, so `GET /networks` lists those (Docker would add its local bridge, host and none).
`POST /networks/create` takes Driver overlay, Attachable, Internal, Ingress, IPAM Config
(Subnet, Gateway, IPRange), Options (driver options: `encrypted`) and Labels; a Docker field Shoal does
not have (EnableIPv6, ConfigOnly, ConfigFrom, IPAM options or another IPAM driver, AuxiliaryAddresses,
Scope local) is refused with a 400 when set and accepted when empty. Names are unique in Shoal
(`CheckDuplicate` is always on).

Secrets and configs: list (filters name and id: prefixes, names: exact, label: k or k=v, as dockerd's),
inspect, create (`Data` base64), update (`?version=`; labels only, as Docker allows: the name cannot
change and the data must be absent or the same) and delete. A secret never shows its data; a config
does.

`/distribution/{image}/json`: the image's descriptor and platforms, asked of its registry (the OCI
distribution API: the manifest by tag with the Accept headers of an OCI index, a Docker manifest list
and the single manifests; for a single manifest its config blob gives the platform). Registries
swarmd was given with `--insecure-registry` (and loopback ones, Docker's default) are tried over
HTTPS without verification, then plain HTTP. When the registry cannot be reached or does not know the
image the answer is a JSON error (404 or 500): the CLI then warns that the digest could not be
recorded and goes on with the tag (§4).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import ipaddress
import json
import re
import ssl
import urllib.parse
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import grpc

from shoal.engineapi.convert import (
    label_filter,
    labels,
    lookup,
    meta,
    query_version,
    ts,
    want_labels,
    want_str,
)
from shoal.engineapi.server import APIError, EngineContext, Request, Response, Route, empty, json_response
from shoal.proto import control_pb2, objects_pb2, specs_pb2, types_pb2

VXLAN_OPTION = "com.docker.network.driver.overlay.vxlanid_list"


# ---- filters ----------------------------------------------------------------------------------------
def _matches(value: str, patterns: list[str]) -> bool:
    """Docker's `name` filter: exact, or the value as a regular expression found in the name."""
    for p in patterns:
        if p == value:
            return True
        try:
            if re.search(p, value):
                return True
        except re.error:
            continue
    return False


def _has_labels(have: dict[str, str], want: dict[str, str]) -> bool:
    return all(k in have and (not v or have[k] == v) for k, v in want.items())


def _check_filters(f: dict[str, list[str]], allowed: Iterable[str]) -> None:
    unknown = set(f) - set(allowed)
    if unknown:
        raise APIError(400, f"invalid filter '{sorted(unknown)[0]}' (filters here: {', '.join(sorted(allowed))})")


def _filter_objects(objs: list[Any], f: dict[str, list[str]]) -> list[Any]:
    """Docker's name (exact or regex), id (prefix) and label (k or k=v) filters on stored objects."""
    want_labels_ = label_filter(f.get("label", []))
    out = []
    for o in objs:
        if "name" in f and not _matches(o.spec.annotations.name, f["name"]):
            continue
        if "id" in f and not any(o.id.startswith(p) for p in f["id"]):
            continue
        if not _has_labels(dict(o.spec.annotations.labels), want_labels_):
            continue
        out.append(o)
    return out


def _bool(doc: dict[str, Any], key: str, where: str = "") -> bool:
    v = doc.get(key)
    if v is None:
        return False
    if not isinstance(v, bool):
        raise APIError(400, f"{where}{key} must be true or false, got {v!r}")
    return v


def _refuse(field: str, value: Any, why: str) -> None:
    raise APIError(400, f"{field} {value!r} is not supported by Shoal: {why}")


# ---- networks ---------------------------------------------------------------------------------------
def network_json(n: objects_pb2.Network) -> dict[str, Any]:
    spec = n.spec
    ipam = n.ipam if n.ipam.configs else spec.ipam
    config = []
    for c in ipam.configs:
        entry = {"Subnet": c.subnet}
        if c.range:
            entry["IPRange"] = c.range
        if c.gateway:
            entry["Gateway"] = c.gateway
        config.append(entry)
    options = dict(spec.driver_config.options)
    if n.driver_state.vni:
        options[VXLAN_OPTION] = str(n.driver_state.vni)
    return {
        "Name": spec.annotations.name, "Id": n.id, "Created": ts(n.meta.created_at), "Scope": "swarm",
        "Driver": spec.driver_config.name or "overlay", "EnableIPv6": False,
        "IPAM": {"Driver": "default", "Options": None, "Config": config},
        "Internal": spec.internal, "Attachable": spec.attachable, "Ingress": spec.ingress,
        "ConfigFrom": {"Network": ""}, "ConfigOnly": False, "Containers": None,
        "Options": dict(sorted(options.items())), "Labels": labels(spec.annotations.labels) or None,
    }


def network_spec(doc: Any) -> specs_pb2.NetworkSpec:
    """Docker's NetworkCreateRequest as Shoal's NetworkSpec (400 naming the field otherwise)."""
    if not isinstance(doc, dict):
        raise APIError(400, "the body must be a network create request: {\"Name\", \"Driver\": \"overlay\", ...}")
    name = want_str(doc, "Name", "")
    if not name:
        raise APIError(400, "Name is required: give the network a name (docker network create NAME)")
    driver = want_str(doc, "Driver", "") or "overlay"
    if driver != "overlay":
        _refuse("Driver", driver, "Shoal's networks are swarm-scope overlay networks: use -d overlay")
    scope = want_str(doc, "Scope", "")
    if scope not in ("", "swarm"):
        _refuse("Scope", scope, "every Shoal network is swarm-scoped: leave --scope out or give swarm")
    if _bool(doc, "EnableIPv6"):
        _refuse("EnableIPv6", True, "Shoal's overlay networks are IPv4: leave --ipv6 out")
    if _bool(doc, "ConfigOnly"):
        _refuse("ConfigOnly", True, "Shoal has no configuration-only networks: leave --config-only out")
    cfrom = doc.get("ConfigFrom")
    if cfrom not in (None, {}) and (not isinstance(cfrom, dict) or cfrom.get("Network")):
        _refuse("ConfigFrom", cfrom, "Shoal has no configuration-only networks: leave --config-from out")
    spec = specs_pb2.NetworkSpec(annotations=types_pb2.Annotations(name=name,
                                                                    labels=want_labels(doc, "Labels", "")))
    spec.driver_config.name = "overlay"
    spec.driver_config.options.update(want_labels(doc, "Options", ""))
    spec.internal = _bool(doc, "Internal")
    spec.attachable = _bool(doc, "Attachable")
    spec.ingress = _bool(doc, "Ingress")
    ipam = doc.get("IPAM") or {}
    if not isinstance(ipam, dict):
        raise APIError(400, f"IPAM must be an object {{\"Driver\", \"Config\": [...]}}, got {ipam!r}")
    if (ipam.get("Driver") or "default") != "default":
        _refuse("IPAM.Driver", ipam["Driver"], "Shoal allocates subnets itself: leave --ipam-driver out")
    if ipam.get("Options"):
        _refuse("IPAM.Options", ipam["Options"], "the default IPAM driver takes none: leave --ipam-opt out")
    configs = ipam.get("Config") or []
    if not isinstance(configs, list):
        raise APIError(400, f"IPAM.Config must be a list of {{\"Subnet\", \"Gateway\"}}, got {configs!r}")
    for i, c in enumerate(configs):
        where = f"IPAM.Config[{i}]."
        if not isinstance(c, dict):
            raise APIError(400, f"IPAM.Config[{i}] must be an object {{\"Subnet\", \"Gateway\"}}, got {c!r}")
        if c.get("AuxiliaryAddresses"):
            _refuse(f"{where}AuxiliaryAddresses", c["AuxiliaryAddresses"],
                    "Shoal does not reserve auxiliary addresses: leave --aux-address out")
        subnet, gateway, rng = want_str(c, "Subnet", where), want_str(c, "Gateway", where), want_str(c, "IPRange", where)
        for fld, v in (("Subnet", subnet), ("IPRange", rng)):
            if v:
                try:
                    ipaddress.ip_network(v, strict=False)
                except ValueError:
                    raise APIError(400, f"invalid {where}{fld} {v!r}: give a CIDR such as 198.19.50.0/24") from None
        if gateway:
            try:
                ipaddress.ip_address(gateway)
            except ValueError:
                raise APIError(400, f"invalid {where}Gateway {gateway!r}: give an address such as 198.19.50.1") from None
        if not subnet and (gateway or rng):
            raise APIError(400, f"{where}Gateway and IPRange need a Subnet: give --subnet too")
        spec.ipam.configs.add(subnet=subnet, gateway=gateway, range=rng)
    return spec


# ---- secrets and configs ---------------------------------------------------------------------------
@dataclass(frozen=True)
class _FileKind:
    """What differs between secrets and configs in the API."""

    kind: str  # secret | config
    spec_cls: Any
    show_data: bool

    @property
    def title(self) -> str:
        return self.kind.title()


SECRET = _FileKind("secret", specs_pb2.SecretSpec, show_data=False)
CONFIG = _FileKind("config", specs_pb2.ConfigSpec, show_data=True)


def file_object_json(fk: _FileKind, o: Any) -> dict[str, Any]:
    out = meta(o)
    spec: dict[str, Any] = {"Name": o.spec.annotations.name, "Labels": labels(o.spec.annotations.labels)}
    if fk.show_data:
        spec["Data"] = base64.b64encode(o.spec.data).decode()
    out["Spec"] = spec
    return out


def file_object_spec(fk: _FileKind, doc: Any, *, need_data: bool) -> Any:
    """Docker's SecretSpec / ConfigSpec as Shoal's (400 naming the field otherwise)."""
    if not isinstance(doc, dict):
        raise APIError(400, f"the body must be a {fk.kind} spec: {{\"Name\", \"Labels\", \"Data\": base64}}")
    name = want_str(doc, "Name", "")
    if not name:
        raise APIError(400, f"Name is required: give the {fk.kind} a name (docker {fk.kind} create NAME FILE)")
    for fld, flag in (("Driver", "--driver"), ("Templating", "--template-driver")):
        v = doc.get(fld)
        if v not in (None, {}) and (not isinstance(v, dict) or v.get("Name") or v.get("Options")):
            _refuse(fld, v, f"Shoal keeps {fk.kind}s in its own store and does not template them: leave {flag} out")
    raw = doc.get("Data")
    data = b""
    if raw:
        if not isinstance(raw, str):
            raise APIError(400, f"Data must be the {fk.kind}'s content in base64, got {type(raw).__name__}")
        try:
            data = base64.b64decode(raw, validate=True)
        except (binascii.Error, ValueError):
            raise APIError(400, f"Data is not valid base64: give the {fk.kind}'s content base64-encoded") from None
    if need_data and not data:
        raise APIError(400, f"Data is empty: a {fk.kind} needs content (1 byte or more), base64-encoded")
    return fk.spec_cls(annotations=types_pb2.Annotations(name=name, labels=want_labels(doc, "Labels", "")),
                       data=data)


# ---- /distribution -----------------------------------------------------------------------------------
MT_OCI_INDEX = "application/vnd.oci.image.index.v1+json"
MT_DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
MT_OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MT_DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
ACCEPT = ", ".join((MT_OCI_INDEX, MT_DOCKER_LIST, MT_OCI_MANIFEST, MT_DOCKER_MANIFEST))
DOCKER_HUB = "docker.io"
DOCKER_HUB_ENDPOINT = "https://registry-1.docker.io"
REGISTRY_TIMEOUT = 10.0
_TAG_RE = re.compile(r"^[\w][\w.-]{0,127}$")
_DIGEST_RE = re.compile(r"^[A-Za-z][A-Za-z0-9]*(?:[-_+.][A-Za-z][A-Za-z0-9]*)*:[0-9a-fA-F]{32,}$")
_PATH_RE = re.compile(r"^[a-z0-9]+(?:(?:[._]|__|[-]*)[a-z0-9]+)*(?:/[a-z0-9]+(?:(?:[._]|__|[-]*)[a-z0-9]+)*)*$")


@dataclass(frozen=True)
class ImageRef:
    domain: str
    path: str
    reference: str  # a tag or a digest

    @classmethod
    def parse(cls, text: str) -> ImageRef:
        """`[domain[:port]/]path[:tag][@digest]`, normalised as Docker does (busybox →
        docker.io/library/busybox:latest); 400 when it is not an image reference."""
        rest, _, digest = text.partition("@")
        if digest and not _DIGEST_RE.match(digest):
            raise APIError(400, f"invalid reference format: {text!r} has a malformed digest")
        first, sep, remainder = rest.partition("/")
        if sep and ("." in first or ":" in first or first == "localhost"):
            domain, path = first, remainder
        else:
            domain, path = DOCKER_HUB, rest
        tag = ""
        if ":" in path.rsplit("/", 1)[-1]:
            path, tag = path.rsplit(":", 1)
            if not _TAG_RE.match(tag):
                raise APIError(400, f"invalid reference format: {text!r} has a malformed tag")
        if domain == "index.docker.io":
            domain = DOCKER_HUB
        if domain == DOCKER_HUB and "/" not in path:
            path = f"library/{path}"
        if not _PATH_RE.match(path):
            raise APIError(400, f"invalid reference format: {text!r} (repository names are lower-case)")
        return cls(domain, path, digest or tag or "latest")


def _is_insecure(domain: str, insecure: Iterable[str]) -> bool:
    """Docker's rule: the registries given with --insecure-registry (HOST:PORT, host or CIDR), and
    loopback (127.0.0.0/8, localhost)."""
    insecure = list(insecure)
    host = domain.rsplit(":", 1)[0] if not domain.endswith("]") else domain
    host = host.strip("[]")
    if domain in insecure or host in insecure or host == "localhost":
        return True
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return False
    if ip.is_loopback:
        return True
    for entry in insecure:
        try:
            if ip in ipaddress.ip_network(entry, strict=False):
                return True
        except ValueError:
            continue
    return False


class _RegistryError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def _auth_header(registry_auth: str) -> dict[str, str]:
    """X-Registry-Auth (base64url JSON {username, password} or {identitytoken}) as credentials."""
    if not registry_auth:
        return {}
    try:
        pad = "=" * (-len(registry_auth) % 4)
        doc = json.loads(base64.urlsafe_b64decode(registry_auth + pad))
    except (ValueError, binascii.Error):
        return {}
    if not isinstance(doc, dict):
        return {}
    return {k: str(v) for k, v in doc.items() if k in ("username", "password", "identitytoken") and v}


class _Registry:
    """Just enough of the OCI distribution API to read manifests (blocking; run in a thread)."""

    def __init__(self, base: str, verify: bool, creds: dict[str, str]) -> None:
        self.base = base
        self.creds = creds
        self.token = ""
        self.ssl = None
        if base.startswith("https://") and not verify:
            self.ssl = ssl.create_default_context()
            self.ssl.check_hostname = False
            self.ssl.verify_mode = ssl.CERT_NONE

    def _open(self, method: str, url: str, headers: dict[str, str]) -> tuple[int, dict[str, str], bytes]:
        import urllib.error  # here: a worker's swarmd, which never asks a registry, does not load them
        import urllib.request

        req = urllib.request.Request(url, method=method, headers=headers)
        handlers: list[Any] = [urllib.request.HTTPSHandler(context=self.ssl)] if self.ssl else []
        opener = urllib.request.build_opener(*handlers)
        try:
            with opener.open(req, timeout=REGISTRY_TIMEOUT) as r:
                return r.status, {k.lower(): v for k, v in r.headers.items()}, r.read(4 << 20)
        except urllib.error.HTTPError as e:
            return e.code, {k.lower(): v for k, v in e.headers.items()}, e.read(64 << 10)
        except (urllib.error.URLError, OSError, ssl.SSLError) as e:
            reason = getattr(e, "reason", e)
            raise _RegistryError(500, f"{method.title()} \"{url}\": {reason}") from None

    def _bearer(self, challenge: str, scope: str) -> None:
        params = dict(re.findall(r'(\w+)="([^"]*)"', challenge))
        realm = params.get("realm")
        if not realm:
            raise _RegistryError(500, f"the registry at {self.base} asks for a token without a realm")
        q = {"service": params.get("service", ""), "scope": params.get("scope", scope)}
        headers = {}
        if self.creds.get("username"):
            raw = f"{self.creds['username']}:{self.creds.get('password', '')}".encode()
            headers["Authorization"] = "Basic " + base64.b64encode(raw).decode()
        status, _, body = self._open("GET", f"{realm}?{urllib.parse.urlencode(q)}", headers)
        if status != 200:
            raise _RegistryError(500, f"the registry's token service {realm} answered {status}")
        doc = json.loads(body)
        self.token = doc.get("token") or doc.get("access_token") or ""

    def get(self, path: str, scope: str, accept: str = "") -> tuple[int, dict[str, str], bytes]:
        url = self.base + path
        for _ in range(2):
            headers = {"Accept": accept} if accept else {}
            if self.token:
                headers["Authorization"] = f"Bearer {self.token}"
            elif self.creds.get("username"):
                raw = f"{self.creds['username']}:{self.creds.get('password', '')}".encode()
                headers["Authorization"] = "Basic " + base64.b64encode(raw).decode()
            status, hs, body = self._open("GET", url, headers)
            challenge = hs.get("www-authenticate", "")
            if status == 401 and challenge.lower().startswith("bearer") and not self.token:
                self._bearer(challenge, scope)
                continue
            return status, hs, body
        return status, hs, body


def _platform(p: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {"architecture": p.get("architecture", ""), "os": p.get("os", "")}
    for k in ("os.version", "os.features", "variant", "features"):
        if p.get(k):
            out[k] = p[k]
    return out


def inspect_distribution(ref: ImageRef, insecure: list[str], registry_auth: str) -> dict[str, Any]:
    """{"Descriptor": {...}, "Platforms": [...]} of `ref`, asked of its registry (blocking)."""
    if ref.domain == DOCKER_HUB:
        endpoints = [(DOCKER_HUB_ENDPOINT, True)]
    elif _is_insecure(ref.domain, insecure):
        endpoints = [(f"https://{ref.domain}", False), (f"http://{ref.domain}", False)]
    else:
        endpoints = [(f"https://{ref.domain}", True)]
    scope = f"repository:{ref.path}:pull"
    creds = _auth_header(registry_auth)
    last: _RegistryError | None = None
    for base, verify in endpoints:
        reg = _Registry(base, verify, creds)
        try:
            status, hs, body = reg.get(f"/v2/{ref.path}/manifests/{ref.reference}", scope, ACCEPT)
        except _RegistryError as e:
            last = e
            continue
        name = f"{ref.domain}/{ref.path}:{ref.reference}"
        if status == 404:
            raise _RegistryError(404, f"manifest for {name} not found: manifest unknown")
        if status in (401, 403):
            raise _RegistryError(403, f"pull access denied for {ref.domain}/{ref.path}, repository does not exist "
                                      "or may require 'docker login'")
        if status != 200:
            raise _RegistryError(500, f"the registry at {base} answered {status} for {name}")

        media_type = hs.get("content-type", "").split(";")[0].strip()
        doc = json.loads(body)
        media_type = doc.get("mediaType") or media_type
        digest = hs.get("docker-content-digest") or "sha256:" + hashlib.sha256(body).hexdigest()
        descriptor = {"mediaType": media_type, "digest": digest, "size": len(body)}
        if media_type in (MT_OCI_INDEX, MT_DOCKER_LIST) or "manifests" in doc:
            platforms = [_platform(m.get("platform") or {}) for m in doc.get("manifests", [])
                         if (m.get("platform") or {}).get("architecture") != "unknown"]
        else:
            cfg = doc.get("config") or {}
            st, _, cbody = reg.get(f"/v2/{ref.path}/blobs/{cfg.get('digest', '')}", scope)
            platforms = [_platform(json.loads(cbody))] if st == 200 else []
        return {"Descriptor": descriptor, "Platforms": platforms}
    assert last is not None
    raise last


# ---- routes ------------------------------------------------------------------------------------------
def routes(ctx: EngineContext) -> list[Route]:
    def c() -> Any:
        return ctx.control

    # networks
    async def get_network(ref: str) -> objects_pb2.Network:
        return (await lookup("network", ref, c().GetNetwork(control_pb2.GetNetworkRequest(network_id=ref),
                                                             timeout=10))).network

    async def list_networks(req: Request) -> Response:
        f = req.filters()
        _check_filters(f, ("name", "id", "label", "driver", "scope", "type", "dangling"))
        nets = list((await c().ListNetworks(control_pb2.ListNetworksRequest(), timeout=10)).networks)
        nets = _filter_objects(nets, f)
        if "driver" in f:
            nets = [n for n in nets if (n.spec.driver_config.name or "overlay") in f["driver"]]
        if "scope" in f and "swarm" not in f["scope"]:
            nets = []
        if "type" in f and "custom" not in f["type"]:
            nets = []  # every Shoal network is user-defined ("custom"); none is "builtin"
        dangling = {v.lower() in ("1", "true") for v in f.get("dangling", [])}
        if len(dangling) == 1:  # networks no service uses (dangling=true), or the used ones
            want = dangling.pop()
            used: set[str] = set()
            for s in (await c().ListServices(control_pb2.ListServicesRequest(), timeout=10)).services:
                used.update(a.target for a in s.spec.task.networks)
                used.update(v.network_id for v in s.endpoint.virtual_ips)
            nets = [n for n in nets if (n.id not in used) == want]
        nets.sort(key=lambda n: n.spec.annotations.name)
        return json_response([network_json(n) for n in nets])

    async def inspect_network(req: Request) -> Response:
        ref = req.params["id"]
        if req.query.get("scope", "") not in ("", "swarm"):
            raise APIError(404, f"network {ref} not found")
        return json_response(network_json(await get_network(ref)))

    async def create_network(req: Request) -> Response:
        spec = network_spec(req.json())
        try:
            net = (await c().CreateNetwork(control_pb2.CreateNetworkRequest(spec=spec), timeout=30)).network
        except grpc.aio.AioRpcError as e:
            if e.code() == grpc.StatusCode.ALREADY_EXISTS and "name" in (e.details() or ""):
                raise APIError(409, f"network with name {spec.annotations.name} already exists") from None
            raise
        return json_response({"Id": net.id, "Warning": ""}, 201)

    async def remove_network(req: Request) -> Response:
        net = await get_network(req.params["id"])
        await c().RemoveNetwork(control_pb2.RemoveNetworkRequest(network_id=net.id), timeout=30)
        return empty(204)

    # secrets and configs
    def file_routes(fk: _FileKind) -> list[Route]:
        k, t = fk.kind, fk.title
        base = f"/{k}s"

        def rpc(verb: str, **kw: Any) -> Any:
            name = f"{verb}{t}s" if verb == "List" else f"{verb}{t}"
            return getattr(c(), name)(getattr(control_pb2, f"{name}Request")(**kw), timeout=30)

        async def get(ref: str) -> Any:
            return getattr(await lookup(k, ref, rpc("Get", **{f"{k}_id": ref})), k)

        async def list_(req: Request) -> Response:
            # As dockerd maps them (daemon/cluster/filters.go): name and id are prefixes, names exact.
            f = req.filters()
            _check_filters(f, ("name", "id", "label", "names"))
            lf = control_pb2.ListFilters(names=f.get("names", []), name_prefixes=f.get("name", []),
                                         id_prefixes=f.get("id", []))
            lf.labels.update(label_filter(f.get("label", [])))
            objs = getattr(await rpc("List", filters=lf), f"{k}s")
            return json_response([file_object_json(fk, o) for o in objs])

        async def inspect(req: Request) -> Response:
            return json_response(file_object_json(fk, await get(req.params["id"])))

        async def create(req: Request) -> Response:
            spec = file_object_spec(fk, req.json(), need_data=True)
            try:
                obj = getattr(await rpc("Create", spec=spec), k)
            except grpc.aio.AioRpcError as e:
                if e.code() == grpc.StatusCode.ALREADY_EXISTS:
                    raise APIError(409, f"rpc error: code = AlreadyExists desc = {k} {spec.annotations.name} "
                                        "already exists") from None
                raise
            return json_response({"ID": obj.id}, 201)

        async def update(req: Request) -> Response:
            version = query_version(req)
            obj = await get(req.params["id"])
            spec = file_object_spec(fk, req.json(), need_data=False)
            try:
                await rpc("Update", **{f"{k}_id": obj.id, f"{k}_version": version, "spec": spec})
            except grpc.aio.AioRpcError as e:
                if e.code() == grpc.StatusCode.INVALID_ARGUMENT:
                    raise APIError(400, f"rpc error: code = InvalidArgument desc = {e.details()}") from None
                raise
            return empty()

        async def remove(req: Request) -> Response:
            obj = await get(req.params["id"])
            await rpc("Remove", **{f"{k}_id": obj.id})
            return empty(204)

        return [
            Route("GET", base, list_),
            Route("POST", f"{base}/create", create),
            Route("GET", rf"{base}/(?P<id>[^/]+)", inspect),
            Route("POST", rf"{base}/(?P<id>[^/]+)/update", update),
            Route("DELETE", rf"{base}/(?P<id>[^/]+)", remove),
        ]

    # distribution
    async def distribution(req: Request) -> Response:
        ref = ImageRef.parse(req.params["name"])
        try:
            doc = await asyncio.to_thread(inspect_distribution, ref, list(ctx.node.insecure_registries),
                                          req.headers.get("x-registry-auth", ""))
        except _RegistryError as e:
            raise APIError(e.status, str(e)) from None
        return json_response(doc)

    return [
        Route("GET", r"/networks", list_networks),
        Route("POST", r"/networks/create", create_network),
        Route("GET", r"/networks/(?P<id>[^/]+)", inspect_network),
        Route("DELETE", r"/networks/(?P<id>[^/]+)", remove_network),
        *file_routes(SECRET),
        *file_routes(CONFIG),
        Route("GET", r"/distribution/(?P<name>.+)/json", distribution, manager=False),
    ]
