"""What a palettization is asked for: light enough (pydantic only) for recipes and stage params to use."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, NonNegativeInt, PositiveInt

Nbits = Literal[1, 2, 3, 4, 6, 8]


class PalettizeOptions(BaseModel):
    """What to palettize and with how many bits."""

    model_config = ConfigDict(extra="forbid")

    nbits: Nbits = 6
    granularity: Literal["per_tensor", "per_grouped_channel"] = "per_tensor"
    # Output channels sharing one LUT with per_grouped_channel (iOS18/macOS15 targets only).
    group_size: PositiveInt = 32
    # Weights with more elements than this are palettized (coremltools' rule, strictly greater):
    # below it a LUT costs more than it saves.
    weight_threshold: NonNegativeInt = 2048
    # Per-weight bits by const op name, for mixed-bit recipes; None keeps that weight as stored.
    nbits_by_op: dict[str, Nbits | None] = {}
