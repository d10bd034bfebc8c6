"""Recipe data as read from YAML, with where each value was written, and the `extends:` merge."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

FieldPath = tuple[str | int, ...]
"""Keys and list indices from the top of a recipe down to one value."""


def dotted(path: FieldPath) -> str:
    return ".".join(str(part) for part in path)


def parse_dotted(field: str) -> FieldPath:
    return tuple(int(part) if part.isdigit() else part for part in field.split(".") if part)


@dataclass(frozen=True)
class Origin:
    """Where a value was written: the file as shown to the user, and the 1-based line."""

    file: str
    line: int

    def __str__(self) -> str:
        return f"{self.file}:{self.line}"


@dataclass(frozen=True)
class Document:
    """Plain data (dicts, lists, scalars) and the origin of every key and list item in it."""

    data: dict[str, Any]
    origins: Mapping[FieldPath, Origin]

    def origin(self, path: FieldPath) -> Origin:
        """Where `path` was written; for a value never written, where its nearest ancestor was."""
        while path not in self.origins:
            path = path[:-1]
        return self.origins[path]

    def without(self, key: str) -> Document:
        """This document minus a top-level key and everything under it."""
        data = {k: v for k, v in self.data.items() if k != key}
        return Document(data, {p: o for p, o in self.origins.items() if p[:1] != (key,)})


def merge(base: Document, child: Document) -> Document:
    """Deep merge for `extends:`: mappings merge key by key, anything else the child writes
    replaces the base's value; each value keeps the origin of the file it came from."""
    data = _merge(base.data, child.data)
    origins = {path: child.origins.get(path) or base.origins[path] for path in _paths(data, ())}
    return Document(data, origins)


def _merge(base: Any, child: Any) -> Any:
    if isinstance(base, dict) and isinstance(child, dict):
        return {**base, **{key: _merge(base.get(key), value) for key, value in child.items()}}
    return child


def _paths(value: Any, path: FieldPath) -> Iterator[FieldPath]:
    yield path
    if isinstance(value, dict):
        for key, item in value.items():
            yield from _paths(item, (*path, key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from _paths(item, (*path, index))
