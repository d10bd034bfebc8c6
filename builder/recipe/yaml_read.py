"""Read one recipe file into a Document, keeping the line of every key and list item.

PyYAML's safe loader builds plain data and forgets positions, so the node tree is composed with
SafeLoader and converted here; the conversion also refuses duplicate keys, which YAML loaders
otherwise resolve silently (the last one wins).

A recipe may come from anyone, so reading it is bounded (`Limits`): the file's size, the nesting
depth (the composer recurses per level), the number of aliases and the number of values once
aliases are expanded (nine lines of nested aliases expand to a billion values)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from ..errors import RecipeError
from .document import Document, FieldPath, Origin, dotted
from .paths import WrittenIn

_MERGE_TAG = "tag:yaml.org,2002:merge"
_COLLECTION_TAGS = ("tag:yaml.org,2002:map", "tag:yaml.org,2002:seq")


@dataclass(frozen=True)
class Limits:
    """Bounds on one YAML file, far above what a real file of its kind needs."""

    max_bytes: int
    max_depth: int
    max_aliases: int
    max_values: int
    """Keys, list items and scalars counted with every alias expanded."""


RECIPE_LIMITS = Limits(max_bytes=256 << 10, max_depth=16, max_aliases=64, max_values=2_000)
"""A recipe has about fifty values, nested four deep."""


def read_document(file: Path, shown: str, limits: Limits = RECIPE_LIMITS) -> Document:
    """Parse `file` (named `shown` in errors); its top level must be a mapping."""
    try:
        with open(file, "rb") as handle:
            raw = handle.read(limits.max_bytes + 1)
        if len(raw) > limits.max_bytes:
            raise RecipeError(
                shown,
                f"the file is larger than {limits.max_bytes // 1024} KiB, far more than this kind of file needs",
                line=1,
                hint="check that this is the file you meant; split generated content out of it",
            )
        text = raw.decode("utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise RecipeError(
            shown, f"cannot read the recipe: {error}", hint="check that the file is readable UTF-8 text"
        ) from None
    try:
        loader = _BoundedLoader(text, shown, limits)
    except yaml.YAMLError as error:  # e.g. a control character the YAML reader refuses
        raise _syntax_error(shown, error, text) from None
    try:
        return _document(loader, file.parent, shown, limits)
    except yaml.YAMLError as error:
        raise _syntax_error(shown, error, text) from None
    finally:
        loader.dispose()


class _BoundedLoader(yaml.SafeLoader):
    """SafeLoader whose composer refuses nesting deeper than the limit (before Python's recursion
    limit is reached) and more aliases than the limit."""

    def __init__(self, text: str, shown: str, limits: Limits):
        super().__init__(text)
        self.shown = shown
        self.limits = limits
        self.depth = 0
        self.aliases = 0

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node | None:
        if self.check_event(yaml.AliasEvent):
            self.aliases += 1
            if self.aliases > self.limits.max_aliases:
                raise RecipeError(
                    self.shown,
                    f"more than {self.limits.max_aliases} YAML aliases (*name)",
                    line=self.peek_event().start_mark.line + 1,
                    hint="write the values out; aliases that repeat aliases multiply the document's size",
                )
        self.depth += 1
        if self.depth > self.limits.max_depth:
            raise RecipeError(
                self.shown,
                f"values are nested more than {self.limits.max_depth} levels deep",
                line=self.peek_event().start_mark.line + 1,
                hint="check the brackets and indentation here; no field is nested that deep",
            )
        try:
            return super().compose_node(parent, index)
        finally:
            self.depth -= 1


def _document(loader: _BoundedLoader, folder: Path, shown: str, limits: Limits) -> Document:
    root = loader.get_single_node()
    if root is None:
        raise RecipeError(shown, "the recipe is empty", line=1, hint="write the recipe's fields, starting with `name:`")
    if not isinstance(root, yaml.MappingNode):
        raise RecipeError(
            shown,
            "the top level of a recipe must be a mapping of field: value",
            line=root.start_mark.line + 1,
            hint="start the file with `name: <recipe name>`",
        )
    origins: dict[FieldPath, Origin] = {(): Origin(shown, root.start_mark.line + 1)}
    data = _Converter(loader, folder, shown, origins, limits).value(root, (), ())
    return Document(data, origins)


def _syntax_error(shown: str, error: yaml.YAMLError, text: str) -> RecipeError:
    line = None
    if isinstance(error, yaml.MarkedYAMLError):
        mark = error.problem_mark or error.context_mark
        problem = "; ".join(part for part in (error.context, error.problem) if part)
        line = mark.line + 1 if mark else None
    elif isinstance(error, yaml.reader.ReaderError):  # a character YAML refuses, by its position
        mark, problem = None, f"character {error.character!r} is not allowed in YAML"
        line = text.count("\n", 0, error.position) + 1
    else:
        mark, problem = None, str(error)
    return RecipeError(
        shown,
        f"invalid YAML: {problem}" + (f" (column {mark.column + 1})" if mark else ""),
        line=line,
        hint="fix the YAML syntax here: check the indentation, a missing ':' after a key, "
        "or an unclosed quote or bracket",
    )


class _Converter:
    """Turns composed nodes into dicts, lists and scalars, recording each position."""

    def __init__(
        self, loader: yaml.SafeLoader, folder: Path, shown: str, origins: dict[FieldPath, Origin], limits: Limits
    ):
        self.loader = loader
        self.folder = folder
        self.shown = shown
        self.origins = origins
        self.limits = limits
        self.values = 0

    def value(self, node: yaml.Node, path: FieldPath, parents: tuple[yaml.Node, ...]) -> Any:
        self.values += 1
        if self.values > self.limits.max_values:
            raise self._error(
                node,
                path,
                f"the document holds more than {self.limits.max_values} values (aliases expanded)",
                "write only the fields the file needs; aliases that repeat aliases multiply its size",
            )
        if len(path) > self.limits.max_depth:  # aliases can nest deeper than the text does
            raise self._error(
                node,
                path,
                f"values are nested more than {self.limits.max_depth} levels deep (aliases expanded)",
                "write the values out instead of nesting aliases",
            )
        if isinstance(node, (yaml.MappingNode, yaml.SequenceNode)) and node.tag not in _COLLECTION_TAGS:
            raise self._error(
                node,
                path,
                f"the YAML tag {node.tag} is not supported",
                "remove the tag: recipes hold plain mappings, lists and values",
            )
        if node in parents:
            raise self._error(
                node,
                path,
                "a YAML alias refers to a value containing itself",
                "write the value out instead of referring to itself",
            )
        if isinstance(node, yaml.MappingNode):
            return self._mapping(node, path, (*parents, node))
        if isinstance(node, yaml.SequenceNode):
            items = []
            for index, item in enumerate(node.value):
                self.origins[(*path, index)] = Origin(self.shown, item.start_mark.line + 1)
                items.append(self.value(item, (*path, index), (*parents, node)))
            return items
        scalar = self._construct(node, path)
        return WrittenIn(scalar, self.folder) if isinstance(scalar, str) else scalar

    def _construct(self, node: yaml.Node, path: FieldPath) -> Any:
        """A scalar's value; one YAML resolves but Python cannot hold (an integer of thousands of
        digits, a date like 2024-13-45) is a located error."""
        try:
            return self.loader.construct_object(node)
        except ValueError as problem:
            reason = str(problem).split(";")[0]
            raise self._error(
                node, path, f"cannot read this value: {reason}", "write a value of the field's type (`sdbuild schema`)"
            ) from None

    def _mapping(self, node: yaml.MappingNode, path: FieldPath, parents: tuple[yaml.Node, ...]) -> dict[str, Any]:
        result: dict[str, Any] = {}
        for key_node, value_node in node.value:
            if key_node.tag == _MERGE_TAG:
                raise self._error(
                    key_node,
                    path,
                    "YAML merge keys (<<) are not supported",
                    "use `extends: <base recipe>.yaml` to inherit from another recipe",
                )
            key = self._construct(key_node, path)
            if not isinstance(key, str):
                raise self._error(
                    key_node,
                    path,
                    f"keys must be text, not {key!r}",
                    "use a field name from the recipe schema (`sdbuild schema`)",
                )
            key_path = (*path, key)
            if key in result:
                first = self.origins[key_path].line
                raise self._error(
                    key_node,
                    key_path,
                    f"duplicate key '{key}' (first written at line {first})",
                    f"keep a single `{key}:` in this mapping",
                )
            self.origins[key_path] = Origin(self.shown, key_node.start_mark.line + 1)
            result[key] = self.value(value_node, key_path, parents)
        return result

    def _error(self, node: yaml.Node, path: FieldPath, message: str, hint: str) -> RecipeError:
        return RecipeError(self.shown, message, line=node.start_mark.line + 1, field=dotted(path) or None, hint=hint)
