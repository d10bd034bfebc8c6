"""Rule violations found by model validators, carried through pydantic to the error translator.

A validator can raise only one error, yet a recipe may break several rules at once and each rule
concerns its own field: the violations travel together in the error's context, each naming the
field (relative to the model that found it) and a fix."""

from __future__ import annotations

from dataclasses import dataclass

from pydantic_core import PydanticCustomError

RULE_ERROR = "recipe_rule"


@dataclass(frozen=True)
class Violation:
    field: str
    """Dotted path relative to the validated model; empty for the model itself."""
    message: str
    hint: str


def reject(violations: list[Violation]) -> None:
    """Raise the violations as one pydantic error, or return when there are none."""
    if violations:
        summary = "; ".join(v.message for v in violations)
        raise PydanticCustomError(RULE_ERROR, "{summary}", {"summary": summary, "violations": tuple(violations)})
