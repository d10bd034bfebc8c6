"""`manifest.json`: everything an app needs to configure the Swift pipeline that no model file says.

Written by sdbuild next to `Resources/`; the Swift package never reads it, apps and CI do. No
timestamps, so identical builds give identical manifests.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict

from builder.coreml.package import ModelInfo

SCHEMA_VERSION = 2


class FileEntry(BaseModel):
    sha256: str
    size: int


class ChunkEntry(BaseModel):
    """Where a chunked UNet was cut and how the chunk chain compares, measured in torch."""

    index: int  # 1 or 2
    boundary: str  # chunk 2's first step, e.g. "up_blocks.0.resnets.1"
    parameter_bytes: tuple[int, int]  # float32 parameter bytes of chunk 1 and chunk 2 (the cut balances these)
    weight_bytes: int  # this chunk's Core ML weight file(s), as shipped (compressed)
    # chunk 2 of a palettized UNet: both compressed chunks in sequence vs both chunks with float16 weights
    chain_read_back_psnr_db: dict[str, float] | None = None


class ModelEntry(ModelInfo):
    """One model in Resources, with its interface (inputs, outputs) read back from the saved file."""

    component: str
    path: str
    compiled: bool
    compression: dict
    precision: Literal["float16", "float32"] = "float16"  # Core ML compute precision (SDXL's own VAE: float32)
    size_bytes: int
    bits_per_weight: float | None  # average stored bits per weight (index + table share when palettized)
    psnr_db: dict[str, float]  # traced conversion module vs the diffusers/transformers reference
    # yes/no outputs (the safety checker's has_nsfw_concepts): traced module agrees with the reference
    decisions_match: dict[str, bool] | None = None
    # compressed weights read back from the saved program into torch, vs float16 weights (None: not compressed)
    read_back_psnr_db: dict[str, float] | None
    # mixed-bit recipes: the recipe file's target and predicted PSNR, and what the saved weights achieve
    mixed_bit: dict[str, float] | None = None
    # W8A8 UNets: the workload's PSNRs, activation quantize ops in the program, and every layer's
    # decision (its PSNR alone and whether its activations are int8 or float)
    w8a8: dict | None = None
    # UNet chunks: the cut, the compressed chain's read-back and this chunk's weight bytes (psnr_db is the chain's)
    chunk: ChunkEntry | None = None


class Manifest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    schema_version: Literal[2] = SCHEMA_VERSION
    name: str
    version: str
    recipe_digest: str
    sdbuild_version: str
    family: str
    latent_size: tuple[int, int]
    image_size: tuple[int, int]
    unet_batch_size: int
    latent_scale_factor: float
    text_sequence_length: int
    time_ids_length: int | None = None  # SDXL: entries of the base Unet's time_ids (6; 5 for a refiner-only Unet)
    refiner: bool = False  # SDXL: whether UnetRefiner is in Resources
    attention: str
    compute_unit: str
    deployment_target: str
    compiled: bool
    models: dict[str, ModelEntry]
    files: dict[str, FileEntry]
    tools: dict[str, str]
