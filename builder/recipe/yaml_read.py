"""Read one recipe file into a Document, keeping the line of every key and list item.

PyYAML's safe loader builds plain data and forgets positions, so the node tree is composed with
SafeLoader and converted here; the conversion also refuses duplicate keys, which YAML loaders
otherwise resolve silently (the last one wins)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from ..errors import RecipeError
from .document import Document, FieldPath, Origin, dotted
from .paths import WrittenIn

_MERGE_TAG = "tag:yaml.org,2002:merge"


def read_document(file: Path, shown: str) -> Document:
    """Parse `file` (named `shown` in errors); its top level must be a mapping."""
    try:
        text = file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise RecipeError(
            shown, f"cannot read the recipe: {error}", hint="check that the file is readable UTF-8 text"
        ) from None
    try:
        loader = yaml.SafeLoader(text)
    except yaml.YAMLError as error:  # e.g. a control character the YAML reader refuses
        raise _syntax_error(shown, error) from None
    try:
        return _document(loader, file.parent, shown)
    except yaml.YAMLError as error:
        raise _syntax_error(shown, error) from None
    finally:
        loader.dispose()


def _document(loader: yaml.SafeLoader, folder: Path, shown: str) -> Document:
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
    data = _Converter(loader, folder, shown, origins).value(root, (), ())
    return Document(data, origins)


def _syntax_error(shown: str, error: yaml.YAMLError) -> RecipeError:
    if isinstance(error, yaml.MarkedYAMLError):
        mark = error.problem_mark or error.context_mark
        problem = "; ".join(part for part in (error.context, error.problem) if part)
    else:
        mark, problem = None, str(error)
    return RecipeError(
        shown,
        f"invalid YAML: {problem}" + (f" (column {mark.column + 1})" if mark else ""),
        line=mark.line + 1 if mark else None,
        hint="fix the YAML syntax here: check the indentation, a missing ':' after a key, "
        "or an unclosed quote or bracket",
    )


class _Converter:
    """Turns composed nodes into dicts, lists and scalars, recording each position."""

    def __init__(self, loader: yaml.SafeLoader, folder: Path, shown: str, origins: dict[FieldPath, Origin]):
        self.loader = loader
        self.folder = folder
        self.shown = shown
        self.origins = origins

    def value(self, node: yaml.Node, path: FieldPath, parents: tuple[yaml.Node, ...]) -> Any:
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
        scalar = self.loader.construct_object(node)
        return WrittenIn(scalar, self.folder) if isinstance(scalar, str) else scalar

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
            key = self.loader.construct_object(key_node)
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
