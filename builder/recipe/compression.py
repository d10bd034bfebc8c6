"""How a component's weights are stored: a union tagged by `mode`, so new modes slot in as new
members without touching the others."""

from __future__ import annotations

from typing import Annotated, Literal

from annotated_types import Ge, Le
from pydantic import Field, StrictBool

from builder.coreml.options import Nbits

from .base import RecipeModel
from .calibration import Calibration, Workload
from .paths import MixedBitRecipePath
from .strict import ExactNonNegativeInt, ExactPositiveInt, StrictFloat, WholeNumber

Decibels = Annotated[StrictFloat, Ge(0), Le(200)]
_FLOOR_DESCRIPTION = (
    "Fail the build when the compressed model's read-back PSNR against float16 (worst output, one call on "
    "the fixed example inputs) is below this many dB; null records the PSNR without a floor."
)


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
    minimum_psnr_db: Decibels | None = Field(default=None, description=_FLOOR_DESCRIPTION)


class Quantize(RecipeModel):
    """Linear 8-bit quantization: int8 weights with float16 scales (per tensor, output channel or block)."""

    mode: Literal["quantize"] = Field(description="Quantize weights linearly to 8 bits.")
    granularity: Literal["per_tensor", "per_channel", "per_block"] = Field(
        default="per_channel",
        description="One scale per weight (per_tensor), per output channel (per_channel), or per block of "
        "block_size input channels within an output channel (per_block: most accurate; needs iOS18/macOS15).",
    )
    block_size: ExactPositiveInt = Field(default=32, description="Input channels sharing a scale with per_block.")
    weight_threshold: ExactNonNegativeInt = Field(
        default=2048, description="Weights with at most this many elements stay float16."
    )
    minimum_psnr_db: Decibels | None = Field(default=None, description=_FLOOR_DESCRIPTION)


class MixedPalettize(RecipeModel):
    """Mixed-bit palettization: each layer's bit width from a recipe file (see `sdbuild analyze`)."""

    mode: Literal["mixed"] = Field(description="Palettize each layer with the bits a mixed-bit recipe file gives it.")
    recipe: MixedBitRecipePath = Field(
        description="The mixed-bit recipe (YAML, e.g. recipes/mbp/tiny-sd-40db.yaml), relative to this recipe file."
    )
    weight_threshold: ExactNonNegativeInt = Field(
        default=2048, description="Weights with at most this many elements stay float16."
    )
    minimum_psnr_db: Decibels | None = Field(default=None, description=_FLOOR_DESCRIPTION)


class JointPalettize(RecipeModel):
    """Palettized int8 weights on top of W8A8: coremltools' joint compression, an int8 lookup table
    per weight scaled per output channel (iOS18/macOS15 programs only)."""

    nbits: Annotated[Literal[1, 2, 3, 4, 6], WholeNumber] = Field(
        description="Bits per weight index (1, 2, 3, 4 or 6) into each weight's int8 lookup table."
    )


class W8A8(RecipeModel):
    """8-bit weights and activations for the int8-int8 compute of the A17 Pro / M4 Neural Engines.

    Layers whose activation quantization alone costs too much (measured per layer on the analysis
    workload) keep float activations (W8A32); everything else runs int8 in and out.
    """

    mode: Literal["w8a8"] = Field(description="Quantize weights and activations to 8 bits (UNet; iOS17/macOS14+).")
    calibration: Calibration = Field(
        default=Calibration(), description="Prompts, steps and seed whose UNet inputs set the activation ranges."
    )
    sensitivity: Workload = Field(
        default=Workload(),
        description="The workload each layer is judged on alone (the default is `sdbuild analyze`'s).",
    )
    conv_psnr: Decibels = Field(
        default=40.0,
        description="A convolution whose W8A8 alone leaves the workload's final latents below this PSNR keeps "
        "float activations (W8A32).",
    )
    attention_psnr: Decibels = Field(
        default=30.0,
        description="The same threshold for the attention cores (scores, softmax and weighted sum).",
    )
    quantize_up_convs: StrictBool = Field(
        default=True,
        description="Quantize the up blocks' resnet conv1s and the upsamplers whatever their PSNR: the slowest "
        "convolutions, so the speed-up needs them.",
    )
    to_out_w8a32: StrictBool = Field(
        default=True,
        description="Keep the attention output projections' activations float: their input concatenates the "
        "heads, whose ranges one shared scale fits badly (a conversion constraint the per-layer analysis misses).",
    )
    palettize: JointPalettize | None = Field(
        default=None,
        description="Also palettize the int8 weights (joint compression; needs iOS18/macOS15).",
    )
    minimum_psnr_db: Decibels | None = Field(
        default=30.0,
        description="Fail the build when the quantized UNet's PSNR against float16 (one call on the fixed example "
        "inputs) is below this many dB; null records it without a floor.",
    )


Compression = Annotated[Float16 | Palettize | Quantize | MixedPalettize | W8A8, Field(discriminator="mode")]
