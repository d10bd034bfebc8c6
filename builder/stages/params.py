"""Each stage's params, as `pipeline.py` builds them and the stage reads them back in its worker.

One model per stage, importable without torch, so a recipe that cannot make valid params fails when
the graph is built (in `plan`), not minutes later in a worker. Stages call `model_validate` on the dict
the engine hands them (params travel as JSON, and are keyed as JSON).
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from builder.coreml.options import PalettizeOptions
from builder.sd.manifest import Precision, ShippedCompression

# The floor a traced (or chunk-chained) model's PSNR against diffusers must reach.
MINIMUM_PSNR_DB = 35.0


class StageParams(BaseModel):
    """Params travel as JSON: the fields the pipeline set (`model_dump(mode="json", exclude_unset=True)`),
    which is what the engine keys; the worker's `model_validate` fills in the defaults."""

    model_config = ConfigDict(extra="forbid")


class SyntheticSource(StageParams):
    kind: Literal["synthetic"]
    preset: str
    seed: int


class SingleFileSource(StageParams):
    kind: Literal["single_file"]
    family: str  # the checkpoint's pipeline: sd, sdxl or sdxl-refiner


class HubSource(StageParams):
    kind: Literal["hub", "vae_hub"]  # a whole pipeline, or one replacement VAE
    id: str
    revision: str
    unread: list[str] = []  # pipeline folders not fetched: set only when some are, so other keys stay


class SyntheticControlNet(StageParams):
    kind: Literal["controlnet_synthetic"]
    preset: str
    seed: int


class HubControlNet(StageParams):
    kind: Literal["controlnet_hub"]
    id: str
    revision: str


class HubLora(StageParams):
    kind: Literal["lora_hub"]
    id: str
    revision: str
    weight_name: str


LORA_FILE = "lora.safetensors"  # a hub LoRA's source stage output: the file, under this name


SourceParams = Annotated[
    SyntheticSource | SingleFileSource | HubSource | SyntheticControlNet | HubControlNet | HubLora,
    Field(discriminator="kind"),
]


class FusedLora(StageParams):
    """One LoRA a rewrite fuses: its rewrite input (a .safetensors file, or a source stage's folder
    holding LORA_FILE) and scale. The file's digest keys the stage as an input."""

    input: str
    scale: float


class RewriteParams(StageParams):
    """Only the settings the component depends on are given (see `builder.sd.settings`)."""

    component: str  # the conversion kind (controlled_unet for a UNet beside ControlNets)
    family: str = "sd"
    attention: str = "ORIGINAL"
    latent_size: tuple[int, int] = (0, 0)
    batch_size: int = 1
    loras: list[FusedLora] = []  # fused in order before the rewrite (set only when there are any)


class TraceParams(StageParams):
    component: str
    minimum_psnr_db: float = MINIMUM_PSNR_DB


class ChunkParams(StageParams):
    component: str
    chunk: int = Field(ge=1, le=2)
    minimum_psnr_db: float = MINIMUM_PSNR_DB


class ConvertParams(StageParams):
    component: str
    chunk: int | None = None  # a UNet chunk (the traced input says its interface); None: the whole component
    deployment_target: str
    precision: Precision = "float16"


class MixedPalettizeParams(StageParams):
    """Per-layer widths come from the recipe file (an input); the threshold picks the layers."""

    weight_threshold: int = Field(ge=0)
    chunk: int | None = Field(default=None, ge=1, le=2)


class QuantizeParams(StageParams):
    granularity: Literal["per_tensor", "per_channel", "per_block"] = "per_channel"
    block_size: int = Field(default=32, ge=1)  # input channels sharing a scale with per_block (iOS18)
    weight_threshold: int = Field(default=2048, ge=0)


class VerifyParams(StageParams):
    chunk: int | None = Field(default=None, ge=1, le=2)
    minimum_psnr_db: float | None = None  # the recipe's floor for the read-back PSNR (None: record only)


class W8A8CalibrateParams(StageParams):
    """The calibration prompts' trajectories whose UNet inputs set the activation ranges."""

    family: str
    prompts: list[str]
    steps: int = Field(ge=1)
    seed: int


class W8A8LayersParams(StageParams):
    """One of `chunks` interleaved slices of the UNet's layers, each scored alone."""

    chunk: int = Field(ge=0)
    chunks: int = Field(ge=1)


class W8A8Params(StageParams):
    """The per-layer decisions' thresholds and overrides, and what the quantized model converts to."""

    conv_psnr: float
    attention_psnr: float
    quantize_up_convs: bool
    to_out_w8a32: bool
    deployment_target: str
    palettize_nbits: int | None = None


class CompileParams(StageParams):
    pass


class ProvenanceParams(StageParams):
    file: str | None = None  # a single-file checkpoint's name; None for a folder


class BundleParams(StageParams):
    name: str
    version: str
    recipe_digest: str
    family: str
    latent_size: tuple[int, int]
    unet_batch_size: int
    attention: str
    compute_unit: str
    deployment_target: str
    components: dict[str, ShippedCompression]  # component -> its compression, as the manifest records it
    chunked: list[str] = []  # components shipped as two chunks
    precision: dict[str, Precision] = {}  # component -> Core ML compute precision
    tools: dict[str, str]
    sdbuild_version: str
    # provenance (builder/build_info.py, builder/stages/provenance.py)
    recipe: dict
    sdbuild: dict
    sources: dict
    environment: dict
    date: str | None
    variant: dict | None = None  # {name, settings} of a matrix variant; left out of the params otherwise


__all__ = [
    "MINIMUM_PSNR_DB",
    "BundleParams",
    "ChunkParams",
    "CompileParams",
    "ConvertParams",
    "LORA_FILE",
    "FusedLora",
    "HubControlNet",
    "HubLora",
    "HubSource",
    "MixedPalettizeParams",
    "PalettizeOptions",
    "ProvenanceParams",
    "QuantizeParams",
    "RewriteParams",
    "SingleFileSource",
    "SourceParams",
    "StageParams",
    "SyntheticControlNet",
    "SyntheticSource",
    "TraceParams",
    "VerifyParams",
    "W8A8CalibrateParams",
    "W8A8LayersParams",
    "W8A8Params",
]
