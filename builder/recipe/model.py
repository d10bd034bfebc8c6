"""The recipe as validated data: what to convert, at which size, for which OS and hardware."""

from __future__ import annotations

import json
from typing import Annotated, Literal

from pydantic import Field, StrictBool, model_validator

from .base import RecipeModel
from .compression import Compression, Float16
from .enums import Attention, Component, ComputeUnit, DeploymentTarget, Family
from .rules import recipe_violations
from .sources import ModelSource
from .strict import ExactPositiveInt, WholeNumber
from .violations import reject

Size = tuple[ExactPositiveInt, ExactPositiveInt]
NAME_LENGTH = 64
"""Longest name and version: each names a folder, and the cache keeps a file per name."""


class ComponentSettings(RecipeModel):
    """How one component is built; `{}` takes every default."""

    compression: Compression = Field(
        default=Float16(mode="float16"),
        description="Weight storage: {mode: float16} (default) or {mode: palettize, nbits: 1|2|3|4|6|8}.",
    )


class ControlNetSettings(ComponentSettings):
    """How every ControlNet is built, and whether the bundle also runs without one."""

    plain_unet: StrictBool = Field(
        default=True,
        description="Also ship the plain Unet (chunked like ControlledUnet) so the bundle runs text-to-image "
        "without a ControlNet; false ships ControlledUnet alone.",
    )


class Components(RecipeModel):
    """The components to build; a component absent or null is not built."""

    text_encoder: ComponentSettings | None = Field(
        default=None, description="CLIP text encoder (TextEncoder.mlmodelc); required for sd, optional for sdxl."
    )
    text_encoder_2: ComponentSettings | None = Field(
        default=None,
        description="The second text encoder, CLIP-G (TextEncoder2.mlmodelc); sdxl and sd3 only, required there.",
    )
    text_encoder_3: ComponentSettings | None = Field(
        default=None,
        description="SD3's T5 text encoder (TextEncoderT5.mlmodelc and its tokenizer); sd3 only, optional.",
    )
    unet: ComponentSettings | None = Field(
        default=None,
        description="The denoising UNet (Unet.mlmodelc or UnetChunk1/2.mlmodelc); required for sd and sdxl.",
    )
    mmdit: ComponentSettings | None = Field(
        default=None,
        description="SD3's denoising transformer (MultiModalDiffusionTransformer.mlmodelc); sd3 only, required there.",
    )
    unet_refiner: ComponentSettings | None = Field(
        default=None,
        description="SDXL's refiner UNet (UnetRefiner.mlmodelc), converted from model.refiner; sdxl only.",
    )
    vae_decoder: ComponentSettings = Field(description="VAE decoder, latents to image (VAEDecoder.mlmodelc).")
    vae_encoder: ComponentSettings | None = Field(
        default=None, description="VAE encoder for image-to-image (VAEEncoder.mlmodelc)."
    )
    safety_checker: ComponentSettings | None = Field(
        default=None, description="Safety checker (SafetyChecker.mlmodelc); sd only."
    )
    controlnet: ControlNetSettings | None = Field(
        default=None,
        description="How every ControlNet of model.controlnets is built (controlnet/<Name>.mlmodelc); "
        "defaults to float16 when model.controlnets is given.",
    )

    def enabled(self) -> dict[Component, ComponentSettings]:
        """The components to build, with their settings."""
        return {c: s for c in Component if (s := getattr(self, c.value)) is not None}


class Recipe(RecipeModel):
    """One Core ML bundle for Apple's Swift StableDiffusion package."""

    name: str = Field(
        pattern=r"^[a-z0-9][a-z0-9-]*$",
        max_length=NAME_LENGTH,
        description="Bundle name: lowercase letters, digits and '-', starting with a letter or digit (at most 64).",
    )
    version: str = Field(
        pattern=r"^(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)(-[0-9A-Za-z-]+(\.[0-9A-Za-z-]+)*)?$",
        max_length=NAME_LENGTH,
        description="Semantic version of the bundle, MAJOR.MINOR.PATCH with an optional -prerelease (at most 64).",
    )
    family: Family = Field(description="Pipeline family: sd (SD 1.x/2.x), sdxl or sd3.")
    model: ModelSource = Field(description="The checkpoint to convert: exactly one of hub, local or synthetic.")
    written_latent_size: Size | None = Field(
        default=None,
        alias="latent_size",
        description="[height, width] of the latents, multiples of 8 (the image is 8x larger); give this or image_size.",
    )
    written_image_size: Size | None = Field(
        default=None,
        alias="image_size",
        description="[height, width] of the image in pixels, multiples of 64; give this or latent_size.",
    )
    attention: Attention = Field(
        description="Attention implementation: ORIGINAL for the GPU, "
        "SPLIT_EINSUM or SPLIT_EINSUM_V2 for the Neural Engine."
    )
    compute_unit: ComputeUnit = Field(description="Core ML compute units the bundle is tuned for.")
    deployment_target: DeploymentTarget = Field(
        description="Oldest OS the models load on; sdxl needs iOS17 or macOS14 or newer."
    )
    unet_batch_size: Annotated[Literal[1, 2], WholeNumber] = Field(
        default=2, description="UNet batch: 2 runs classifier-free guidance in one call (required for sdxl)."
    )
    chunk_unet: StrictBool = Field(
        default=False, description="Split the UNet into UnetChunk1/2 so each half fits iOS memory limits."
    )
    components: Components = Field(description="The components to build and how to compress each.")

    @model_validator(mode="after")
    def _rules(self) -> Recipe:
        reject(recipe_violations(self))
        return self

    @property
    def latent_size(self) -> tuple[int, int]:
        """[height, width] in latents, whichever of latent_size / image_size was written."""
        if self.written_latent_size is not None:
            return self.written_latent_size
        if self.written_image_size is None:
            raise ValueError("a recipe needs latent_size or image_size; validation rejects one with neither")
        height, width = self.written_image_size
        return height // 8, width // 8

    @property
    def image_size(self) -> tuple[int, int]:
        """[height, width] in pixels."""
        height, width = self.latent_size
        return height * 8, width * 8

    def canonical_json(self) -> str:
        """The recipe's meaning as stable JSON: the size always in latents, keys sorted, every
        default spelled out, so equivalent recipes serialise alike."""
        data = self.model_dump(mode="json", by_alias=True, exclude={"written_image_size"})
        data["latent_size"] = list(self.latent_size)
        return json.dumps(data, sort_keys=True, separators=(",", ":"))
