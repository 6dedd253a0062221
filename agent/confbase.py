"""YAML loading with line numbers, and typed, key-checked access to one mapping.

Shared by the config file (`agent.config`) and the call flows (`agent.flowconf`), so every
validation error names the file, the line, the dotted key and the reason.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import yaml

from agent.errors import ConfigError


@dataclass(frozen=True)
class Endpoint:
    """A TCP host and port to listen on or connect to."""

    host: str
    port: int

    def __str__(self) -> str:
        return f"{self.host}:{self.port}"


class LineMap(dict[Any, Any]):
    """A YAML mapping that remembers the line it starts on and the line of each key."""

    line: int | None = None
    key_lines: dict[Any, int]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.key_lines = {}


class LineList(list[Any]):
    """A YAML sequence that remembers the line of each item."""

    line: int | None = None
    item_lines: list[int]

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.item_lines = []


class _LineLoader(yaml.SafeLoader):
    """SafeLoader building LineMap/LineList, so errors can point at a line."""


def _construct_map(loader: _LineLoader, node: yaml.MappingNode) -> LineMap:
    loader.flatten_mapping(node)
    result = LineMap()
    result.line = node.start_mark.line + 1
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=True)
        try:
            hash(key)
        except TypeError:
            raise yaml.constructor.ConstructorError(
                "while constructing a mapping", node.start_mark,
                "found unhashable key", key_node.start_mark) from None
        result[key] = loader.construct_object(value_node, deep=True)
        result.key_lines[key] = key_node.start_mark.line + 1
    return result


def _construct_seq(loader: _LineLoader, node: yaml.SequenceNode) -> LineList:
    result = LineList(loader.construct_object(child, deep=True) for child in node.value)
    result.line = node.start_mark.line + 1
    result.item_lines = [child.start_mark.line + 1 for child in node.value]
    return result


_LineLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_map)
_LineLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_SEQUENCE_TAG, _construct_seq)


def load_yaml(path: str, text: str) -> Any:
    """Parse YAML (safe tags only) into LineMap/LineList; ConfigError with the line if bad."""
    try:
        return yaml.load(text, Loader=_LineLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}" if mark is not None else "(file)"
        reason = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(path, where, f"invalid YAML: {reason}",
                          mark.line + 1 if mark is not None else None) from None


def line_of(data: Any, key: Any = None) -> int | None:
    """The line of ``key`` in a LineMap (or of item ``key`` in a LineList), else its start."""
    if isinstance(data, LineMap):
        return data.key_lines.get(key, data.line) if key is not None else data.line
    if isinstance(data, LineList):
        if isinstance(key, int) and 0 <= key < len(data.item_lines):
            return data.item_lines[key]
        return data.line
    return None


def kind_of(value: Any) -> str:
    """A short name of a YAML value's type for error messages."""
    return "nothing" if value is None else type(value).__name__


class Section:
    """Typed, key-checked access to one mapping of a YAML file."""

    def __init__(self, path: str, prefix: str, data: Any, line: int | None = None) -> None:
        self.path = path
        self.prefix = prefix
        if data is None:
            data = {}
        if not isinstance(data, Mapping):
            raise ConfigError(path, prefix or "(top level)",
                              f"must be a mapping, got {kind_of(data)}", line)
        self.data: Mapping[str, Any] = data
        self.line = line_of(data) or line
        self.used: set[str] = set()

    def key(self, name: str) -> str:
        """The dotted key of a field."""
        return f"{self.prefix}.{name}" if self.prefix else name

    def line_of(self, name: str) -> int | None:
        """The line of a field (or of this mapping when the field is absent)."""
        return line_of(self.data, name) or self.line

    def error(self, name: str, reason: str) -> ConfigError:
        """A ConfigError for one field, with its line."""
        return ConfigError(self.path, self.key(name), reason, self.line_of(name))

    def raw(self, name: str, default: Any = None) -> Any:
        """A field's value as parsed (marks it used)."""
        self.used.add(name)
        return self.data.get(name, default)

    def get_str(self, name: str, default: str | None = None, *,
                choices: tuple[str, ...] = ()) -> str:
        """A string (numbers are accepted as text); required when default is None."""
        value = self.raw(name, default)
        if value is None:
            raise self.error(name, "is required")
        if isinstance(value, bool) or not isinstance(value, (str, int, float)):
            raise self.error(name, f"must be a string, got {kind_of(value)}")
        text = str(value).strip()
        if choices and text not in choices:
            raise self.error(name, f"must be one of {', '.join(choices)}, got {text!r}")
        return text

    def text(self, name: str, default: str | None = None) -> str:
        """A non-empty string."""
        value = self.get_str(name, default)
        if not value:
            raise self.error(name, "must not be empty")
        return value

    def get_int(self, name: str, default: int, lo: int, hi: int) -> int:
        """An integer within [lo, hi]."""
        value = self.raw(name, default)
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.error(name, f"must be an integer, got {kind_of(value)}")
        if not lo <= value <= hi:
            raise self.error(name, f"must be between {lo} and {hi}, got {value}")
        return value

    def get_bool(self, name: str, default: bool) -> bool:
        """true or false."""
        value = self.raw(name, default)
        if not isinstance(value, bool):
            raise self.error(name, f"must be true or false, got {kind_of(value)}")
        return value

    def get_float(self, name: str, default: float, lo: float, hi: float) -> float:
        """A number within [lo, hi]."""
        value = self.raw(name, default)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise self.error(name, f"must be a number, got {kind_of(value)}")
        if not lo <= float(value) <= hi:
            raise self.error(name, f"must be between {lo} and {hi}, got {value}")
        return float(value)

    def endpoint(self, name: str, default: Endpoint | None) -> Endpoint | None:
        """host:port (an optional tcp:// prefix is accepted)."""
        value = self.raw(name)
        if value is None:
            return default
        text = str(value).strip()
        if text.startswith("tcp://"):
            text = text[len("tcp://"):]
        host, sep, port = text.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise self.error(name, f"must be host:port with a port 1-65535, got {value!r}")
        return Endpoint(host.strip("[]"), int(port))

    def sub(self, name: str) -> Section:
        """The nested mapping under ``name`` (empty when absent)."""
        return Section(self.path, self.key(name), self.raw(name), self.line_of(name))

    def items(self, name: str) -> list[tuple[str, Any, int | None]]:
        """A list field as (dotted key, item, line) triples; [] when absent."""
        value = self.raw(name, [])
        if not isinstance(value, list):
            raise self.error(name, f"must be a list, got {kind_of(value)}")
        return [(self.key(f"{name}[{i}]"), item, line_of(value, i) or self.line_of(name))
                for i, item in enumerate(value)]

    def strings(self, name: str, *, required: bool = True) -> tuple[str, ...]:
        """A list of non-empty strings (a single string is a list of one)."""
        value = self.raw(name, [])
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not all(isinstance(v, str) and v.strip() for v in value):
            raise self.error(name, "must be a list of non-empty strings")
        if required and not value:
            raise self.error(name, "must list at least one entry")
        return tuple(v.strip() for v in value)

    def check_unknown(self) -> None:
        """Refuse keys no parser asked for (typos)."""
        unknown = sorted(str(k) for k in set(self.data) - self.used)
        if unknown:
            raise self.error(unknown[0], "unknown key")
