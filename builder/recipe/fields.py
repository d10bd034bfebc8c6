"""Find the model fields behind an error location, so hints can name allowed fields and values."""

from __future__ import annotations

from typing import Any, Literal, get_args, get_origin

from pydantic import BaseModel
from pydantic.fields import FieldInfo

Loc = tuple[str | int, ...]
"""A pydantic error location: field names, list indices and union tags."""


def _fields(model: type[BaseModel]) -> dict[str, FieldInfo]:
    """A model's fields by the name written in recipes."""
    return {info.alias or name: info for name, info in model.model_fields.items()}


def field_names(models: list[type[BaseModel]]) -> list[str]:
    """The names a recipe may write in a mapping validated by one of `models`."""
    return sorted({name for model in models for name in _fields(model)})


def literals(model: type[BaseModel], field: str) -> tuple[Any, ...]:
    """The values a Literal field accepts (a union member's tag), else nothing."""
    info = model.model_fields.get(field)
    return get_args(info.annotation) if info is not None and get_origin(info.annotation) is Literal else ()


def _models_in(annotation: Any) -> list[type[BaseModel]]:
    """The model classes a field annotation may hold, through Optional, unions and Annotated."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [model for arg in get_args(annotation) for model in _models_in(arg)]


def models_at(root: type[BaseModel], loc: Loc) -> list[type[BaseModel]]:
    """The model classes that validate the value at `loc` (the members of a union until a tag in
    the location picks one)."""
    models = [root]
    for part in loc:
        tagged = [m for m in models if any(part in literals(m, name) for name in m.model_fields)]
        if len(models) > 1 and tagged:
            models = tagged
            continue
        infos = [info for model in models if isinstance(part, str) and (info := _fields(model).get(part)) is not None]
        models = [model for info in infos for model in _models_in(info.annotation)]
    return models


def described(root: type[BaseModel], loc: Loc) -> tuple[str | int, str] | None:
    """Name and description of the field at `loc`, or of its nearest described ancestor (for a
    list item)."""
    for end in range(len(loc), 0, -1):
        name = loc[end - 1]
        for model in models_at(root, loc[: end - 1]):
            if isinstance(name, str) and (info := _fields(model).get(name)) is not None and info.description:
                return name, info.description
    return None
