"""How a component's weights are stored: a union tagged by `mode`, so new modes slot in as new
members without touching the others."""

from __future__ import annotations

from typing import Annotated, Literal, Union

from pydantic import Field

from .base import RecipeModel


class Float16(RecipeModel):
    """Plain float16 weights: the Core ML default, no accuracy loss worth measuring."""

    mode: Literal["float16"] = Field(description="Store weights as float16.")


class Palettize(RecipeModel):
    """k-means palettization: each weight becomes an n-bit index into a lookup table."""

    mode: Literal["palettize"] = Field(description="Palettize weights with k-means.")
    nbits: Literal[1, 2, 3, 4, 6, 8] = Field(
        description="Bits per weight index (1, 2, 3, 4, 6 or 8); 6 keeps SD quality at ~38% of the float16 size."
    )


Compression = Annotated[Union[Float16, Palettize], Field(discriminator="mode")]
