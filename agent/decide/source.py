"""YAML with positions: parse one playbook document and remember the line of every value and key.

Every problem a playbook can have names its file, line and field (``steps[1].params.unit``);
the lines come from PyYAML's node marks (``yaml.compose``), so a problem found on the plain
data can be mapped back to where it stands in the file.

Only ``true``/``false`` are booleans here (YAML 1.2 style), so ``mode: off`` is the string
"off" and not YAML 1.1's ``False``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import yaml

from agent.errors import PlaybookError, Problem


class _Loader(yaml.SafeLoader):
    """SafeLoader where only true/false are booleans (``off``, ``yes``, ``on`` stay strings)."""


_Loader.yaml_implicit_resolvers = {
    k: [(tag, rx) for tag, rx in v if tag != "tag:yaml.org,2002:bool"]
    for k, v in yaml.SafeLoader.yaml_implicit_resolvers.copy().items()
}
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:bool",
    re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
    list("tTfF"),
)

# where a value stands in the document: mapping keys and list indexes from the top
FieldPath = tuple[str | int, ...]


@dataclass
class SourceMap:
    """Line of every value (and of every mapping key) in one YAML document."""

    values: dict[FieldPath, int] = field(default_factory=dict)
    keys: dict[FieldPath, int] = field(default_factory=dict)
    duplicates: list[tuple[FieldPath, int]] = field(default_factory=list)

    def line(self, path: Iterable[str | int], *, key: bool = False) -> int | None:
        p = tuple(path)
        if key and p in self.keys:
            return self.keys[p]
        while p:
            if p in self.values:
                return self.values[p]
            p = p[:-1]
        return self.values.get((), None)


def _map_nodes(node: yaml.Node, path: FieldPath, out: SourceMap) -> None:
    out.values[path] = node.start_mark.line + 1
    if isinstance(node, yaml.MappingNode):
        seen: set[str] = set()
        for k, v in node.value:
            name = str(k.value)
            if name in seen:
                out.duplicates.append(((*path, name), k.start_mark.line + 1))
            seen.add(name)
            out.keys[(*path, name)] = k.start_mark.line + 1
            _map_nodes(v, (*path, name), out)
    elif isinstance(node, yaml.SequenceNode):
        for i, v in enumerate(node.value):
            _map_nodes(v, (*path, i), out)


def parse_yaml(text: str, file: str) -> tuple[Any, SourceMap]:
    """Parse one YAML document, returning the data and where each value stands."""
    try:
        loader = _Loader(text)
    except yaml.YAMLError as exc:  # e.g. control characters the YAML reader refuses
        raise PlaybookError([Problem(file, "", f"not valid YAML: {exc}")]) from None
    try:
        node = loader.get_single_node()
        data = loader.construct_document(node) if node is not None else None
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark is not None else None
        raise PlaybookError([Problem(file, "", f"not valid YAML: {exc.problem or exc}", line)]) from None
    except yaml.YAMLError as exc:
        raise PlaybookError([Problem(file, "", f"not valid YAML: {exc}")]) from None
    finally:
        loader.dispose()
    smap = SourceMap()
    if node is not None:
        _map_nodes(node, (), smap)
    return data, smap


def dotted(path: Iterable[str | int]) -> str:
    """A field path as problems name it: ``steps[1].params.unit``."""
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out
