"""YAML reading that remembers the line of every key and list item.

Mappings become :class:`CMap` (a dict with ``locs`` per key), sequences :class:`CList` (a list with
``locs`` per item). Anchors, aliases and merge keys (``<<``) work as in YAML; scalars follow YAML
1.2's core schema as Compose (Go yaml.v3) does: ``80:80`` is a string, ``yes`` is a string,
``true``/``false`` are booleans, ``0644`` is octal.
"""

from __future__ import annotations

import re
from typing import Any

import yaml

from shoal.compose.errors import ComposeError, Loc

_SURROGATE = re.compile("[\ud800-\udfff]")


class CMap(dict):
    """A mapping read from YAML; ``loc`` is where it starts, ``locs[key]`` where each key is."""

    def __init__(self, *args: Any, loc: Loc | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.loc = loc
        self.locs: dict[Any, Loc] = {}


class CList(list):
    """A sequence read from YAML; ``locs[i]`` is where item i is."""

    def __init__(self, *args: Any, loc: Loc | None = None) -> None:
        super().__init__(*args)
        self.loc = loc
        self.locs: list[Loc] = []


def _loader_class(filename: str) -> type[yaml.SafeLoader]:
    class Loader(yaml.SafeLoader):
        pass

    Loader.yaml_implicit_resolvers = {}

    def add(tag: str, regexp: str, first: str) -> None:
        Loader.add_implicit_resolver(tag, re.compile(regexp, re.X), list(first))

    add("tag:yaml.org,2002:bool", r"^(?:true|True|TRUE|false|False|FALSE)$", "tTfF")
    add(
        "tag:yaml.org,2002:int",
        r"^(?:[-+]?0b[0-1_]+|[-+]?0o?[0-7_]+|[-+]?(?:0|[1-9][0-9_]*)|[-+]?0x[0-9a-fA-F_]+)$",
        "-+0123456789",
    )
    add(
        "tag:yaml.org,2002:float",
        r"^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?|[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)"
        r"|\.[0-9_]+(?:[eE][-+][0-9]+)?|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$",
        "-+0123456789.",
    )
    add("tag:yaml.org,2002:merge", r"^(?:<<)$", "<")
    add("tag:yaml.org,2002:null", r"^(?: ~ |null|Null|NULL| )$", ["~", "n", "N", ""])  # type: ignore[arg-type]

    def loc_of(node: yaml.Node) -> Loc:
        return Loc(filename, node.start_mark.line + 1)

    def construct_int(loader: yaml.SafeLoader, node: yaml.ScalarNode) -> int:
        text = str(loader.construct_scalar(node)).replace("_", "")
        sign = -1 if text.startswith("-") else 1
        text = text.lstrip("+-")
        if text.startswith("0x"):
            return sign * int(text[2:], 16)
        if text.startswith("0b"):
            return sign * int(text[2:], 2)
        if text.startswith("0o"):
            return sign * int(text[2:], 8)
        if len(text) > 1 and text.startswith("0"):
            return sign * int(text, 8)
        return sign * int(text)

    def construct_map(loader: yaml.SafeLoader, node: yaml.MappingNode):  # type: ignore[no-untyped-def]
        result = CMap(loc=loc_of(node))
        yield result
        seen: set[str] = set()
        for key_node, _ in node.value:
            if isinstance(key_node, yaml.ScalarNode) and key_node.tag != "tag:yaml.org,2002:merge":
                if key_node.value in seen:
                    raise ComposeError(f'mapping key "{key_node.value}" is given twice', loc_of(key_node))
                seen.add(key_node.value)
        loader.flatten_mapping(node)
        for key_node, value_node in node.value:
            key = loader.construct_object(key_node, deep=True)
            try:
                hash(key)
            except TypeError:
                raise ComposeError("a mapping key must be a string", loc_of(key_node)) from None
            result[key] = loader.construct_object(value_node, deep=True)
            result.locs[key] = loc_of(key_node)

    def construct_seq(loader: yaml.SafeLoader, node: yaml.SequenceNode):  # type: ignore[no-untyped-def]
        result = CList(loc=loc_of(node))
        yield result
        for item in node.value:
            result.append(loader.construct_object(item, deep=True))
            result.locs.append(loc_of(item))

    def construct_str(loader: yaml.SafeLoader, node: yaml.ScalarNode) -> str:
        value = loader.construct_scalar(node)
        if _SURROGATE.search(value):
            raise ComposeError("the text holds an invalid character (a lone UTF-16 surrogate such as \\ud800)",
                               loc_of(node))
        return value

    Loader.add_constructor("tag:yaml.org,2002:str", construct_str)
    Loader.add_constructor("tag:yaml.org,2002:map", construct_map)
    Loader.add_constructor("tag:yaml.org,2002:seq", construct_seq)
    Loader.add_constructor("tag:yaml.org,2002:int", construct_int)
    # Timestamps and binary stay strings/bytes as yaml.v3 would not turn them into dates.
    Loader.add_constructor("tag:yaml.org,2002:timestamp", construct_str)
    Loader.add_constructor("tag:yaml.org,2002:set", construct_map)
    Loader.add_constructor("tag:yaml.org,2002:omap", construct_seq)
    Loader.add_constructor("tag:yaml.org,2002:pairs", construct_seq)
    return Loader


def parse_yaml(text: str, filename: str) -> Any:
    """Parse one YAML document; syntax errors become ComposeError with the line."""
    loader = _loader_class(filename)(text)
    try:
        docs = []
        while loader.check_node():
            docs.append(loader.get_node())
        if len(docs) > 1:
            raise ComposeError("a stack file holds one YAML document; found several (---)", Loc(filename, 0))
        if not docs:
            return None
        return loader.construct_document(docs[0])
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        line = mark.line + 1 if mark is not None else 0
        problem = e.problem or e.context or "invalid YAML"
        raise ComposeError(f"invalid YAML: {problem}", Loc(filename, line)) from None
    except yaml.YAMLError as e:
        raise ComposeError(f"invalid YAML: {e}", Loc(filename, 0)) from None
    except RecursionError:
        raise ComposeError("invalid YAML: nesting too deep", Loc(filename, 0)) from None
    finally:
        loader.dispose()
