"""`manifest.json`: everything an app needs to configure the Swift pipeline that no model file says.

Written by sdbuild next to `Resources/`; the Swift package never reads it, apps and CI do. It also
says what made the bundle (recipe files as written, sources with file digests, sdbuild's version and
commit, every dependency's version), so a shipped bundle can be traced and rebuilt. No timestamps
unless `SOURCE_DATE_EPOCH` is set, so identical builds give identical manifests.
"""

from __future__ import annotations

from typing import Annotated, Any, Final, Literal

from pydantic import BaseModel, ConfigDict, Field, field_serializer

from builder.coreml.package import ModelInfo
from builder.recipe.base import RecipeModel
from builder.recipe.compression import W8A8, Float16, Palettize, Quantize
from builder.sd.contract import Pipeline

SCHEMA_VERSION: Final = 2
Precision = Literal["float16", "float32"]  # Core ML compute precision (SDXL's own VAE: float32)


class ShippedMixedPalettize(RecipeModel):
    """Mixed-bit palettization as shipped: its recipe file named as the recipe wrote it (relative to
    the recipe), so the manifest does not depend on where the workspace is."""

    mode: Literal["mixed"]
    recipe: str
    weight_threshold: int
    minimum_psnr_db: float | None = None


# A model's compression as its recipe set it, defaults filled in: the recipe's own types.
ShippedCompression = Annotated[
    Float16 | Palettize | Quantize | ShippedMixedPalettize | W8A8, Field(discriminator="mode")
]


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
    compression: ShippedCompression
    precision: Precision = "float16"
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

    @field_serializer("compression")
    def _compression_as_set(self, compression: BaseModel) -> dict[str, Any]:
        """An unset read-back floor is left out, so manifests read as they did before floors existed."""
        written = compression.model_dump(mode="json")
        if written.get("minimum_psnr_db") is None:
            written.pop("minimum_psnr_db", None)
        return written


class RecipeFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    path: str = Field(description="Relative to the workspace, posix separators.")
    text: str = Field(description="The file's text, as written.")


class RecipeRecord(RecipeFile):
    """The recipe as written: with its bases and included files, enough to rebuild it from the manifest."""

    digest: str = Field(description="sha256 of the recipe's canonical JSON (recipe_digest), what the build keys on.")
    extends: list[RecipeFile] = Field(description="Every base recipe pulled in by `extends:`, nearest first.")
    includes: list[RecipeFile] = Field(description="Other files the recipe reads: mixed-bit recipe files.")


class SdbuildInfo(BaseModel):
    model_config = ConfigDict(extra="forbid")

    version: str = Field(description="The sdbuild package version.")
    commit: str | None = Field(description="git commit of the checkout sdbuild ran from; null when installed.")
    dirty: bool = Field(description="Tracked files of that checkout differed from the commit.")


class Environment(BaseModel):
    model_config = ConfigDict(extra="forbid")

    python: str
    packages: dict[str, str] = Field(description="sdbuild's runtime dependencies, transitively, as installed.")


Sha256 = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]


class HubSourceEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")

    kind: Literal["hub"]
    id: str
    revision: str = Field(pattern=r"^[0-9a-f]{40}$")
    files: dict[str, Sha256] = Field(description="sha256 of every file the build read from the repository.")


class LocalSourceEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")

    kind: Literal["local"]
    path: str = Field(description="As written in the recipe, relative to the recipe file that writes it.")
    digest: Sha256 = Field(description="sha256 of a single file, or the folder's tree digest (as the cache keys it).")
    files: dict[str, Sha256] = Field(description="sha256 of every file read (a single file: its name).")


class SyntheticSourceEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")

    kind: Literal["synthetic"]
    preset: str
    seed: int


SourceEntry = Annotated[HubSourceEntry | LocalSourceEntry | SyntheticSourceEntry, Field(discriminator="kind")]


class _Named(BaseModel):
    name: str = Field(description="The ControlNet's name in Resources/controlnet/.")


class HubControlNetEntry(HubSourceEntry, _Named):
    pass


class LocalControlNetEntry(LocalSourceEntry, _Named):
    pass


class SyntheticControlNetEntry(SyntheticSourceEntry, _Named):
    pass


ControlNetEntry = Annotated[
    HubControlNetEntry | LocalControlNetEntry | SyntheticControlNetEntry, Field(discriminator="kind")
]


class _Fused(BaseModel):
    scale: float = Field(description="The scale the LoRA was fused at.")
    components: list[str] = Field(description="The components it was fused into (those it has weights for).")


class HubLoraEntry(HubSourceEntry, _Fused):
    weight_name: str = Field(description="The LoRA's file in the repository.")


class LocalLoraEntry(LocalSourceEntry, _Fused):
    pass


LoraEntry = Annotated[HubLoraEntry | LocalLoraEntry, Field(discriminator="kind")]


class Sources(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: SourceEntry
    refiner: SourceEntry | None
    vae: SourceEntry | None
    controlnets: list[ControlNetEntry]
    loras: list[LoraEntry] = Field(default_factory=list, description="LoRAs fused before conversion, in order.")


class VariantRecord(BaseModel):
    """Which variant of a recipe matrix a bundle is (absent for a recipe without `matrix:`)."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(description="The variant's folder: artifacts/<name>/<version>/<variant>/.")
    settings: dict[str, Any] = Field(description="The settings the matrix gave it, by dotted recipe path.")


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
    latent_shift_factor: float | None = None  # SD3: the decoder takes latents / scale + shift
    text_sequence_length: int
    time_ids_length: int | None = None  # SDXL: entries of the base Unet's time_ids (6; 5 for a refiner-only Unet)
    refiner: bool = False  # SDXL: whether UnetRefiner is in Resources
    pipelines: list[Pipeline] = Field(
        default_factory=list,
        description="What the Swift package can run with this bundle: text-to-image (Unet), image-to-image "
        "(a UNet and VAEEncoder), controlnet (ControlledUnet). Empty in manifests written before it existed.",
    )
    attention: str
    compute_unit: str
    deployment_target: str
    compiled: bool
    models: dict[str, ModelEntry]
    files: dict[str, FileEntry]
    tools: dict[str, str]
    recipe: RecipeRecord
    sdbuild: SdbuildInfo
    sources: Sources
    environment: Environment
    date: str | None = Field(description="SOURCE_DATE_EPOCH as YYYY-MM-DDTHH:MM:SSZ when it was set, else null.")
    variant: VariantRecord | None = Field(default=None, description="The matrix variant; absent outside a matrix.")


def manifest_json_schema() -> dict:
    """The JSON Schema every manifest.json validates against (`sdbuild schema --manifest`)."""
    schema = Manifest.model_json_schema(mode="serialization")
    return {"$schema": "https://json-schema.org/draft/2020-12/schema"} | schema | {"title": "sdbuild manifest.json"}
