"""Typed reading of YAML nodes, so every problem names its file, line and field.

The YAML is composed to nodes (not loaded to dicts) because only nodes keep their marks.
Readers collect problems instead of raising, so one run reports every mistake in a file.
"""
from __future__ import annotations

import enum
from typing import Any, Optional

import yaml
from yaml.constructor import SafeConstructor

from headroom_sidecar.controlplane.policy.schema import Problem

_INT = "tag:yaml.org,2002:int"
_FLOAT = "tag:yaml.org,2002:float"
_BOOL = "tag:yaml.org,2002:bool"
_STR = "tag:yaml.org,2002:str"
_NULL = "tag:yaml.org,2002:null"


def line_of(node: yaml.Node) -> int:
    return node.start_mark.line + 1  # marks count from 0, editors from 1


def compose_file(path: str, display: str, problems: list[Problem]) -> Optional[yaml.Node]:
    """The document's root node, or None with a problem (syntax error, or more than one document)."""
    try:
        with open(path, encoding="utf-8") as f:
            return yaml.compose(f, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        line = mark.line + 1 if mark else 0
        problems.append(Problem(display, line, "", f"YAML syntax error: {e.problem or e}"))
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        problems.append(Problem(display, 0, "", f"cannot read YAML: {e}"))
    return None


def to_python(node: yaml.Node) -> Any:
    """Free-form content (a plan or evidence in a test case) as plain Python values."""
    return SafeConstructor().construct_object(node, deep=True)


class Reader:
    """Reads one mapping node; finish() reports the keys nobody asked for (unknown fields)."""

    def __init__(self, node: yaml.Node, file: str, where: str, problems: list[Problem]):
        self.file, self.where, self.problems = file, where, problems
        self.node = node
        self.entries: dict[str, tuple[yaml.Node, yaml.Node]] = {}
        self.read: set[str] = set()
        if not isinstance(node, yaml.MappingNode):
            self.fail(node, "", f"expected a mapping, got {_kind(node)}")
            return
        for k, v in node.value:
            if k.value in self.entries:
                self.fail(k, k.value, "duplicate key")
            self.entries[str(k.value)] = (k, v)

    @property
    def ok(self) -> bool:
        return isinstance(self.node, yaml.MappingNode)

    def fail(self, node: yaml.Node, field: str, reason: str) -> None:
        path = f"{self.where}.{field}" if field and self.where else (field or self.where)
        self.problems.append(Problem(self.file, line_of(node), path, reason))

    def has(self, key: str) -> bool:
        return key in self.entries

    def value_node(self, key: str, required: bool = False) -> Optional[yaml.Node]:
        self.read.add(key)
        if key not in self.entries:
            if required:
                self.fail(self.node, key, "required field is missing")
            return None
        return self.entries[key][1]

    def scalar(self, key: str, tags: tuple[str, ...], what: str, required: bool = False,
               default: Any = None) -> Any:
        node = self.value_node(key, required)
        if node is None:
            return default
        if not isinstance(node, yaml.ScalarNode) or node.tag not in tags:
            self.fail(node, key, f"expected {what}, got {_kind(node)} {_show(node)}")
            return default
        return to_python(node)

    def string(self, key: str, required: bool = False, default: Optional[str] = None):
        return self.scalar(key, (_STR,), "a string", required, default)

    def integer(self, key: str, required: bool = False, default: Optional[int] = None):
        return self.scalar(key, (_INT,), "an integer", required, default)

    def number(self, key: str, required: bool = False, default: Optional[float] = None):
        v = self.scalar(key, (_INT, _FLOAT), "a number", required, default)
        return None if v is None else float(v)

    def boolean(self, key: str, default: bool = False) -> bool:
        return self.scalar(key, (_BOOL,), "true or false", False, default)

    def choice(self, key: str, cls: type[enum.Enum], required: bool = False, default=None):
        node = self.value_node(key, required)
        if node is None:
            return default
        return self._enum_of(node, key, cls, default)

    def _enum_of(self, node: yaml.Node, key: str, cls: type[enum.Enum], default=None):
        choices = ", ".join(e.value for e in cls)
        if isinstance(node, yaml.ScalarNode):
            try:
                return cls(node.value)
            except ValueError:
                pass
        self.fail(node, key, f"expected one of {choices}, got {_show(node)}")
        return default

    def list_of(self, key: str, tags: tuple[str, ...], what: str, required: bool = False):
        """A list of scalars; None when absent."""
        node = self.value_node(key, required)
        if node is None:
            return None
        if not isinstance(node, yaml.SequenceNode):
            self.fail(node, key, f"expected a list of {what}, got {_kind(node)} {_show(node)}")
            return None
        out = []
        for i, item in enumerate(node.value):
            if not isinstance(item, yaml.ScalarNode) or item.tag not in tags:
                self.fail(item, f"{key}[{i}]", f"expected {what}, got {_kind(item)} {_show(item)}")
            else:
                out.append(to_python(item))
        return tuple(out)

    def str_list(self, key: str, required: bool = False):
        return self.list_of(key, (_STR,), "strings", required)

    def int_list(self, key: str, required: bool = False):
        return self.list_of(key, (_INT,), "integers", required)

    def enum_list(self, key: str, cls: type[enum.Enum], required: bool = False):
        node = self.value_node(key, required)
        if node is None:
            return None
        if not isinstance(node, yaml.SequenceNode):
            self.fail(node, key, f"expected a list, got {_kind(node)} {_show(node)}")
            return None
        items = [self._enum_of(n, f"{key}[{i}]", cls) for i, n in enumerate(node.value)]
        return tuple(i for i in items if i is not None)

    def seq(self, key: str, required: bool = False) -> list[yaml.Node]:
        node = self.value_node(key, required)
        if node is None:
            return []
        if not isinstance(node, yaml.SequenceNode):
            self.fail(node, key, f"expected a list, got {_kind(node)}")
            return []
        return list(node.value)

    def sub(self, key: str, required: bool = False) -> Optional["Reader"]:
        node = self.value_node(key, required)
        if node is None:
            return None
        where = f"{self.where}.{key}" if self.where else key
        return Reader(node, self.file, where, self.problems)

    def finish(self, known_hint: Optional[list[str]] = None) -> None:
        known = ", ".join(sorted(known_hint or self.read))
        for key in sorted(set(self.entries) - self.read):
            self.fail(self.entries[key][0], key, f"unknown field (known here: {known})")


def _kind(node: yaml.Node) -> str:
    if isinstance(node, yaml.MappingNode):
        return "a mapping"
    if isinstance(node, yaml.SequenceNode):
        return "a list"
    return {_INT: "an integer", _FLOAT: "a number", _BOOL: "a bool", _NULL: "null"}.get(
        node.tag, "a string")


def _show(node: yaml.Node) -> str:
    return repr(node.value) if isinstance(node, yaml.ScalarNode) else ""
