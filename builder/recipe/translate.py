"""Turn pydantic's ValidationError into recipe errors that name the file, line, field and a fix."""

from __future__ import annotations

import difflib
from typing import Any

from pydantic import BaseModel, ValidationError
from pydantic_core import ErrorDetails

from ..errors import RecipeError, RecipeErrors
from .document import Document, FieldPath, dotted, parse_dotted
from .fields import Loc, described, field_names, literals, models_at
from .violations import RULE_ERROR


def translate(error: ValidationError, document: Document, root: type[BaseModel]) -> RecipeError | RecipeErrors:
    """One RecipeError per problem, in file and line order (a single one is returned as is)."""
    errors = [found for detail in error.errors() for found in _recipe_errors(detail, document, root)]
    errors.sort(key=lambda e: (e.file, e.line or 0))
    return errors[0] if len(errors) == 1 else RecipeErrors(errors)


def _recipe_errors(detail: ErrorDetails, document: Document, root: type[BaseModel]) -> list[RecipeError]:
    loc = detail["loc"]
    path = _data_path(document.data, loc, keep_missing=detail["type"] == "missing")
    if detail["type"] == RULE_ERROR:
        return [
            _located(document, (*path, *parse_dotted(v.field)), v.message, v.hint) for v in detail["ctx"]["violations"]
        ]
    return [_located(document, path, _message(detail), _hint(detail, path, root))]


def _located(document: Document, path: FieldPath, message: str, hint: str | None) -> RecipeError:
    origin = document.origin(path)
    return RecipeError(origin.file, message, line=origin.line, field=dotted(path) or None, hint=hint)


def _data_path(data: Any, loc: Loc, keep_missing: bool) -> FieldPath:
    """The keys and indices of `loc` that exist in the data; the others are union tags pydantic
    adds to locations, except the last one of a missing field."""
    path: list[str | int] = []
    for position, part in enumerate(loc):
        if isinstance(data, dict) and part in data:
            data = data[part]
        elif isinstance(data, list) and isinstance(part, int) and 0 <= part < len(data):
            data = data[part]
        elif not (keep_missing and position == len(loc) - 1):
            continue
        path.append(part)
    return tuple(path)


def _message(detail: ErrorDetails) -> str:
    name = detail["loc"][-1] if detail["loc"] else ""
    if detail["type"] == "missing":
        return f"required field '{name}' is missing"
    if detail["type"] == "extra_forbidden":
        return f"unknown field '{name}'"
    value = detail["input"]
    return detail["msg"] if isinstance(value, (dict, list)) else f"{detail['msg']}, got {value!r}"


def _hint(detail: ErrorDetails, path: FieldPath, root: type[BaseModel]) -> str | None:
    kind, loc, ctx = detail["type"], detail["loc"], detail.get("ctx", {})
    name = loc[-1] if loc else ""
    if kind == "extra_forbidden":
        allowed = field_names(models_at(root, loc[:-1]))
        close = difflib.get_close_matches(str(name), allowed, n=1)
        return f"remove it; did you mean '{close[0]}'?" if close else f"remove it; allowed here: {', '.join(allowed)}"
    if kind in ("enum", "literal_error"):
        return f"{name} must be one of: {ctx['expected']}"
    if kind == "union_tag_invalid":
        return f"set {ctx['discriminator']} to one of: {ctx['expected_tags']}"
    if kind == "union_tag_not_found":
        key = ctx["discriminator"].strip("'")
        tags = ", ".join(repr(t) for model in models_at(root, loc) for t in literals(model, key))
        return f"add `{key}:` with one of: {tags}"
    if kind == "string_type" and isinstance(detail["input"], (int, float, bool)):
        return f"quote the value so YAML reads it as text: {name}: '...'"
    field = described(root, loc)
    if kind == "missing":
        where = f"under `{dotted(path[:-1])}`" if len(path) > 1 else "at the top level"
        return f"add `{name}:` {where}" + (f": {field[1]}" if field else "")
    return f"{field[0]}: {field[1]}" if field else None
