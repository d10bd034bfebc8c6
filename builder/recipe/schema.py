"""The JSON Schema of recipe files, for editors to validate and complete recipes as they are typed."""

from __future__ import annotations

from typing import Any

from .load import EXTENDS
from .model import Recipe


def recipe_json_schema() -> dict[str, Any]:
    """The Recipe model's schema plus `extends:`; a recipe that extends a base may leave out any
    top-level field, since the base provides it."""
    schema = Recipe.model_json_schema(by_alias=True)
    schema["properties"] = {
        EXTENDS: {
            "type": "string",
            "title": "Extends",
            "description": "A base recipe to inherit from, relative to this file: mappings merge key by key, "
            "any other value written here replaces the base's.",
        },
        **schema["properties"],
    }
    schema["if"] = {"required": [EXTENDS]}
    schema["else"] = {"required": schema.pop("required")}
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", **schema}
