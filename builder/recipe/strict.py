"""Numbers and switches read exactly as written: YAML's `true` is not the number 1, `4.0` is not the
whole number 4 and `"16"` is not a size. Pydantic's lax mode coerces all of these, which hides a
mistake (`unet_batch_size: true` would build batch 1), so recipe fields use these types instead."""

from __future__ import annotations

from typing import Annotated, Any

from annotated_types import Ge, Gt, Le
from pydantic import BeforeValidator, Strict
from pydantic_core import PydanticCustomError

MAX_SEED = 2**32 - 1
"""Seeds are bounded by what every random generator a stage may use accepts (numpy's is 32-bit)."""


def _whole_number(value: Any) -> Any:
    """For Literal choices of numbers, whose lax validation takes True for 1 and 4.0 for 4."""
    if isinstance(value, (bool, float)):
        raise PydanticCustomError("whole_number", "Input should be a whole number (no decimals, not true/false)")
    return value


WholeNumber = BeforeValidator(_whole_number)
"""Annotate a Literal of integers with this so only integers written as such match it."""
ExactPositiveInt = Annotated[int, Strict(), Gt(0)]
ExactNonNegativeInt = Annotated[int, Strict(), Ge(0)]
Seed = Annotated[int, Strict(), Ge(0), Le(MAX_SEED)]
StrictFloat = Annotated[float, Strict()]
"""A number as written (`40` or `40.5`); `true` and `"40"` are refused."""
