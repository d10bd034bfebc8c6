"""How a component's weights are stored: a union tagged by `mode`, so new modes slot in as new
members without touching the others."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from builder.coreml.options import Nbits

from .base import RecipeModel
from .paths import MixedBitRecipePath
from .strict import ExactNonNegativeInt, ExactPositiveInt, WholeNumber


class Float16(RecipeModel):
    """Plain float16 weights: the Core ML default, no accuracy loss worth measuring."""

    mode: Literal["float16"] = Field(description="Store weights as float16.")


class Palettize(RecipeModel):
    """k-means palettization: each weight becomes an n-bit index into a lookup table."""

    mode: Literal["palettize"] = Field(description="Palettize weights with k-means.")
    nbits: Annotated[Nbits, WholeNumber] = Field(
        description="Bits per weight index (1, 2, 3, 4, 6 or 8); 6 keeps SD quality at ~38% of the float16 size."
    )
    granularity: Literal["per_tensor", "per_grouped_channel"] = Field(
        default="per_tensor",
        description="One lookup table per weight (per_tensor), or one per group of output channels "
        "(per_grouped_channel: more accurate at low bits; needs iOS18/macOS15).",
    )
    group_size: ExactPositiveInt = Field(
        default=32, description="Output channels sharing a lookup table with per_grouped_channel."
    )
    weight_threshold: ExactNonNegativeInt = Field(
        default=2048,
        description="Weights with at most this many elements stay float16 "
        "(their tables would cost more than they save).",
    )


class Quantize(RecipeModel):
    """Linear 8-bit quantization: int8 weights with a float16 scale per output channel."""

    mode: Literal["quantize"] = Field(description="Quantize weights linearly to 8 bits.")
    weight_threshold: ExactNonNegativeInt = Field(
        default=2048, description="Weights with at most this many elements stay float16."
    )


class MixedPalettize(RecipeModel):
    """Mixed-bit palettization: each layer's bit width from a recipe file (see `sdbuild analyze`)."""

    mode: Literal["mixed"] = Field(description="Palettize each layer with the bits a mixed-bit recipe file gives it.")
    recipe: MixedBitRecipePath = Field(
        description="The mixed-bit recipe (YAML, e.g. recipes/mbp/tiny-sd-40db.yaml), relative to this recipe file."
    )
    weight_threshold: ExactNonNegativeInt = Field(
        default=2048, description="Weights with at most this many elements stay float16."
    )


Compression = Annotated[Float16 | Palettize | Quantize | MixedPalettize, Field(discriminator="mode")]
