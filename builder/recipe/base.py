"""The pydantic base every recipe mapping shares."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class RecipeModel(BaseModel):
    """Frozen so a validated recipe can be hashed and shared; unknown keys are refused so typos
    surface as errors instead of being silently ignored."""

    model_config = ConfigDict(extra="forbid", frozen=True)
