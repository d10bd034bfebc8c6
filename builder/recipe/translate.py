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

_GROUPED_UNKNOWN = 3
"""More unknown fields than this in one mapping are reported as one error with their count."""
_SHOWN_VALUE = 80
"""Longer values are cut in messages."""
_SHOWN_ERRORS = 20
"""At most this many errors are listed; the rest are counted."""


def translate(error: ValidationError, document: Document, root: type[BaseModel]) -> RecipeError | RecipeErrors:
    """One RecipeError per problem, in file and line order (a single one is returned as is); a
    flood of unknown fields in one mapping is one error with a count."""
    details = error.errors()
    unknown: dict[Loc, list[ErrorDetails]] = {}
    for detail in details:
        if detail["type"] == "extra_forbidden":
            unknown.setdefault(detail["loc"][:-1], []).append(detail)
    flooded = {parent for parent, found in unknown.items() if len(found) > _GROUPED_UNKNOWN}
    errors = [
        found
        for detail in details
        if not (detail["type"] == "extra_forbidden" and detail["loc"][:-1] in flooded)
        for found in _recipe_errors(detail, document, root)
    ]
    errors += [_unknown_fields(unknown[parent], document, root) for parent in flooded]
    errors.sort(key=lambda e: (e.file, e.line or 0))
    if len(errors) > _SHOWN_ERRORS:
        rest = errors[_SHOWN_ERRORS:]
        errors = errors[:_SHOWN_ERRORS] + [
            RecipeError(
                rest[0].file,
                f"and {len(rest)} more problem(s), from line {rest[0].line} on",
                line=rest[0].line,
                hint="fix the ones above first",
            )
        ]
    return errors[0] if len(errors) == 1 else RecipeErrors(errors)


def _unknown_fields(details: list[ErrorDetails], document: Document, root: type[BaseModel]) -> RecipeError:
    """One error for many unknown fields of one mapping, at the first of them."""
    names = [str(detail["loc"][-1]) for detail in details]
    shown = ", ".join(f"'{name}'" for name in names[:_GROUPED_UNKNOWN])
    first = _data_path(document.data, details[0]["loc"], keep_missing=False)
    parent = dotted(first[:-1])
    allowed = field_names(models_at(root, details[0]["loc"][:-1]))
    return _located(
        document,
        first,
        f"{len(names)} unknown fields{' under ' + parent if parent else ''}: {shown} and {len(names) - 3} more",
        f"remove them; allowed here: {', '.join(allowed)}",
    )


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
    if isinstance(value, (dict, list)):
        return detail["msg"]
    shown = repr(value)
    return f"{detail['msg']}, got {shown if len(shown) <= _SHOWN_VALUE else shown[:_SHOWN_VALUE] + '...'}"


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
