"""YAML parsed into a tree that remembers the line of every value.

PyYAML's composer already knows where each node starts; this keeps that
position on every mapping, sequence and scalar so that validation can say
`file:line: what is wrong`. Only plain data is accepted: strings, integers,
booleans and null, in mappings with unique scalar keys and sequences.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import yaml

from harness.expr import MAX_NUMBER_TEXT
from harness.schema import CaseError

_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)

_SCALAR_TAGS = {
    "tag:yaml.org,2002:str",
    "tag:yaml.org,2002:int",
    "tag:yaml.org,2002:bool",
    "tag:yaml.org,2002:null",
}


@dataclass(frozen=True)
class Node:
    line: int  # 1-based

    @property
    def kind(self) -> str:
        raise NotImplementedError


@dataclass(frozen=True)
class Scalar(Node):
    value: str | int | bool | None

    @property
    def kind(self) -> str:
        if self.value is None:
            return "null"
        if isinstance(self.value, bool):
            return "a boolean"
        if isinstance(self.value, int):
            return "a number"
        return "a string"


@dataclass(frozen=True)
class Seq(Node):
    items: tuple[Node, ...]

    @property
    def kind(self) -> str:
        return "a list"


@dataclass(frozen=True)
class Map(Node):
    entries: tuple[tuple[Scalar, Node], ...]

    @property
    def kind(self) -> str:
        return "a mapping"

    def keys(self) -> list[str]:
        return [str(key.value) for key, _ in self.entries]

    def get(self, key: str) -> Node | None:
        for k, value in self.entries:
            if k.value == key:
                return value
        return None

    def items(self) -> Iterator[tuple[Scalar, Node]]:
        return iter(self.entries)


def parse(text: str, path: str | Path) -> Node:
    """Parse one YAML document into located nodes, or raise CaseError."""
    try:
        if "*" in text:
            _refuse_aliases(text, path)
        root = yaml.compose(text, Loader=_Loader)
    except yaml.MarkedYAMLError as error:
        mark = error.problem_mark or error.context_mark
        line = mark.line + 1 if mark is not None else 1
        problem = error.problem or error.context or "malformed YAML"
        lines = text.splitlines()
        if "${" in (lines[line - 1] if 0 < line <= len(lines) else ""):
            problem += " (inside [...] or {...}, quote text that holds ${...})"
        raise CaseError(path, line, f"YAML syntax error: {problem}") from None
    except yaml.YAMLError as error:
        raise CaseError(path, 1, f"YAML error: {error}") from None
    if root is None:
        raise CaseError(path, 1, "the case file is empty")
    return _convert(root, path)


def _refuse_aliases(text: str, path: str | Path) -> None:
    # Aliases would make a case a graph: one that refers to itself never
    # finishes converting, and nested ones expand exponentially.
    for event in yaml.parse(text, Loader=_Loader):
        if isinstance(event, yaml.AliasEvent):
            raise CaseError(path, event.start_mark.line + 1,
                            "YAML aliases are not supported (use blocks: and use: to "
                            "repeat steps)")


_constructor = yaml.constructor.SafeConstructor()


def _convert(node: yaml.Node, path: str | Path) -> Node:
    line = node.start_mark.line + 1
    if isinstance(node, yaml.ScalarNode):
        if node.tag not in _SCALAR_TAGS:
            raise CaseError(path, line, f"unsupported YAML value {node.value!r} "
                                        "(use strings, integers, booleans or null)")
        if node.tag == "tag:yaml.org,2002:int" and len(node.value) > MAX_NUMBER_TEXT:
            raise CaseError(path, line, f"number {node.value[:20]}... is too large")
        return Scalar(line, _constructor.construct_object(node))
    if isinstance(node, yaml.SequenceNode):
        return Seq(line, tuple(_convert(item, path) for item in node.value))
    if isinstance(node, yaml.MappingNode):
        entries: list[tuple[Scalar, Node]] = []
        seen: dict[object, int] = {}
        for key_node, value_node in node.value:
            key = _convert(key_node, path)
            if not isinstance(key, Scalar) or isinstance(key.value, bool) or key.value is None:
                raise CaseError(path, key.line, "mapping keys must be plain names")
            if key.value in seen:
                raise CaseError(path, key.line, f"duplicate key {str(key.value)!r} "
                                                f"(first at line {seen[key.value]})")
            seen[key.value] = key.line
            entries.append((key, _convert(value_node, path)))
        return Map(line, tuple(entries))
    raise CaseError(path, line, "unsupported YAML node")
