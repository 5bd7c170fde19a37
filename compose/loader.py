"""Loading stack files: read, interpolate, validate, merge, cross-check."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from shoal.compose import model as m
from shoal.compose.envfile import read_env_file
from shoal.compose.errors import ComposeError, Loc
from shoal.compose.interpolate import interpolate_tree
from shoal.compose.merge import merge_projects
from shoal.compose.parse import Collector, FileContext, parse_file
from shoal.compose.yamlsrc import parse_yaml

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ComposeSource:
    """A stack file given as text (e.g. read from stdin by the CLI); ``name`` is used in messages."""

    name: str
    text: str


def load(
    files: Sequence[str | os.PathLike[str] | ComposeSource],
    environment: Mapping[str, str] | None = None,
    env_files: Sequence[str | os.PathLike[str]] | None = None,
    working_dir: str | os.PathLike[str] | None = None,
) -> m.Project:
    """Load one or more stack files (later files override earlier ones) into a validated Project.

    ``environment`` is the environment used for interpolation (default: ``os.environ``). Variables
    come from ``env_files`` when given (like ``--env-file``), else from a ``.env`` file beside the
    first stack file; the environment wins over both. ``working_dir`` (default: the first file's
    directory) anchors relative paths: bind mounts, ``env_file:``, secret and config files.
    Warnings for ignored options are in ``project.warnings``. Raises ComposeError.
    """
    if not files:
        raise ComposeError("no stack file given; pass one with -f/--compose-file")
    env_given = dict(os.environ if environment is None else environment)
    first = files[0]
    if working_dir is not None:
        wd = Path(working_dir).absolute()
    elif isinstance(first, ComposeSource):
        wd = Path.cwd()
    else:
        wd = Path(first).absolute().parent
    interp_env: dict[str, str] = {}
    if env_files:
        for ef in env_files:
            vals = read_env_file(Path(ef), {**interp_env, **env_given})
            interp_env.update({k: v for k, v in vals.items() if v is not None})
    elif (wd / ".env").is_file():
        vals = read_env_file(wd / ".env", env_given, shown=str(wd / ".env"))
        interp_env.update({k: v for k, v in vals.items() if v is not None})
    interp_env.update(env_given)

    col = Collector()
    missing: dict[str, tuple[str, Loc]] = {}
    projects = []
    for f in files:
        if isinstance(f, ComposeSource):
            name, text = f.name, f.text
        else:
            name = str(f)
            try:
                text = Path(f).read_text(encoding="utf-8")
            except FileNotFoundError:
                raise ComposeError(f"stack file {name!r} does not exist; check the -f path") from None
            except OSError as e:
                raise ComposeError(f"cannot read stack file {name!r}: {e.strerror or e}") from None
            except UnicodeDecodeError:
                raise ComposeError(f"stack file {name!r} is not UTF-8 text") from None
        doc = parse_yaml(text, name)
        doc = interpolate_tree(doc, interp_env, "", Loc(name, 1),
                               lambda var, path, loc: missing.setdefault(var, (path, loc)))
        ctx = FileContext(filename=name, working_dir=wd, environment=interp_env, col=col)
        projects.append(parse_file(doc, ctx))
    project = merge_projects(projects)
    project.environment = interp_env
    project.working_dir = str(wd)
    check_references(project)
    project.warnings = _warnings(col, missing)
    for w in project.warnings:
        log.info("compose warning files=%s: %s", ",".join(project.files), w.replace("\n", " "))
    return project


def _warnings(col: Collector, missing: Mapping[str, tuple[str, Loc]]) -> list[str]:
    out = []
    for var, (path, loc) in sorted(missing.items(), key=lambda kv: (kv[1][1].file, kv[1][1].line)):
        out.append(f'{loc} {path}: the "{var}" variable is not set. Defaulting to a blank string.')
    if col.unsupported:
        out.append("Ignoring unsupported options: " + ", ".join(sorted(col.unsupported)))
    if col.deprecated:
        lines = sorted(f"{k}: {v}" for k, v in col.deprecated.items())
        out.append("Ignoring deprecated options:\n\n" + "\n\n".join(lines))
    out.extend(dict.fromkeys(col.notes))
    return out


def check_references(p: m.Project) -> None:
    """Every service has an image and names only networks, volumes, secrets and configs that exist."""
    for name, svc in p.services.items():
        path = f"services.{name}"
        if not svc.image:
            if svc.build is not None:
                raise ComposeError(
                    "has no image; `stack deploy` needs an image for every service (build is not supported: "
                    "build and push the image, then set image:)", svc.loc, path)
            raise ComposeError("has no image; set image: (such as nginx:1.25)", svc.loc, path)
        for net, sn in (svc.networks or {}).items():
            if net not in p.networks and net != "default":
                loc = sn.loc if sn is not None else svc.where("networks")
                raise ComposeError(f'network "{net}" is not defined; declare it under the top-level networks:',
                                   loc, f"{path}.networks")
        for vol in svc.volumes:
            if vol.type == "volume" and vol.source and vol.source not in p.volumes:
                raise ComposeError(
                    f'volume "{vol.source}" is not defined; declare it under the top-level volumes: '
                    '(or use a path starting with "/", "./" or "~" for a bind mount)', vol.loc, f"{path}.volumes")
        for kind, refs, table in (("secret", svc.secrets, p.secrets), ("config", svc.configs, p.configs)):
            for ref in refs:
                if ref.source not in table:
                    raise ComposeError(f'{kind} "{ref.source}" is not defined; declare it under the top-level '
                                       f"{kind}s:", ref.loc, f"{path}.{kind}s")
