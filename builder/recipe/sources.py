"""Where the weights come from: a pinned hub snapshot, a local checkpoint, or seeded random weights."""

from __future__ import annotations

import math
import re

from pydantic import Field, field_validator, model_validator

from .base import RecipeModel
from .loras import LoraFilePath, not_safetensors
from .paths import LocalModelPath
from .strict import Seed, StrictFloat
from .violations import Violation, reject

_COMMIT = re.compile(r"[0-9a-fA-F]{40}")


class HubSource(RecipeModel):
    """A Hugging Face hub repository at a pinned commit, so a rebuild always reads the same weights."""

    id: str = Field(
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$",
        description="Repository id, owner/name, e.g. stabilityai/stable-diffusion-2-1-base.",
    )
    revision: str = Field(
        description="The full 40-hex commit sha to download; branches and tags move, so they are refused."
    )

    @field_validator("revision")
    @classmethod
    def _pinned(cls, revision: str) -> str:
        if not _COMMIT.fullmatch(revision):
            reject(
                [
                    Violation(
                        "",
                        f"'{revision}' is not a commit sha; a branch or tag can move and silently change the build",
                        "pin the commit: copy the full 40-hex sha from the repository's 'Files and versions' history "
                        "(or `huggingface_hub.model_info(id, revision=...).sha`) into `revision:`",
                    )
                ]
            )
        return revision.lower()


class LocalSource(RecipeModel):
    """A checkpoint already on disk."""

    path: LocalModelPath = Field(
        description="A diffusers folder or a single-file .safetensors checkpoint, relative to the recipe "
        "file that writes it; must stay inside the workspace."
    )


class SyntheticSource(RecipeModel):
    """Seeded random weights in a preset's architecture: tiny, fast models for tests and benchmarks."""

    preset: str = Field(
        pattern=r"^[a-z0-9][a-z0-9-]*$",
        description="Name of a synthetic architecture preset known to sdbuild, e.g. tiny-sd.",
    )
    seed: Seed = Field(default=0, description="Random seed of the weights, 0 to 2**32-1; same seed, same weights.")


class VaeSource(RecipeModel):
    """A replacement VAE, e.g. a float16-safe VAE for SDXL whose own VAE overflows in float16."""

    hub: HubSource | None = Field(
        default=None,
        description="Take the VAE from a hub repository holding an AutoencoderKL (config.json at its root).",
    )
    local: LocalSource | None = Field(
        default=None,
        description="Take the VAE from a local AutoencoderKL folder (config.json at its root, or a vae/ subfolder).",
    )

    @model_validator(mode="after")
    def _exactly_one(self) -> VaeSource:
        violations = _exactly_one(self, ("hub", "local"))
        if self.local is not None and not self.local.path.is_dir():
            violations.append(
                Violation(
                    "local.path",
                    f"'{self.local.path.name}' is a file; "
                    "a replacement VAE is read from a diffusers AutoencoderKL folder",
                    "point to the folder holding the VAE's config.json and diffusion_pytorch_model.safetensors",
                )
            )
        reject(violations)
        return self


class RefinerSource(RecipeModel):
    """Where SDXL's refiner comes from: exactly one of hub, local or synthetic, like the model."""

    hub: HubSource | None = Field(default=None, description="Download the refiner from the hub at a pinned commit.")
    local: LocalSource | None = Field(default=None, description="Read a refiner diffusers folder inside the workspace.")
    synthetic: SyntheticSource | None = Field(default=None, description="Generate a seeded random refiner.")

    @model_validator(mode="after")
    def _exactly_one(self) -> RefinerSource:
        reject(_exactly_one(self, ("hub", "local", "synthetic")))
        return self


class ControlNetSource(RecipeModel):
    """One ControlNet: a diffusers ControlNetModel, from exactly one of hub, local or synthetic."""

    hub: HubSource | None = Field(default=None, description="A ControlNet repository on the hub at a pinned commit.")
    local: LocalSource | None = Field(
        default=None, description="A diffusers ControlNetModel folder inside the workspace."
    )
    synthetic: SyntheticSource | None = Field(
        default=None, description="Seeded random weights in a ControlNet preset matching the synthetic pipeline."
    )

    @model_validator(mode="after")
    def _exactly_one(self) -> ControlNetSource:
        reject(_exactly_one(self, ("hub", "local", "synthetic")))
        return self


class HubLora(HubSource):
    """One LoRA file of a hub repository at a pinned commit, read from the Hugging Face cache."""

    weight_name: str = Field(
        pattern=r"^[A-Za-z0-9_.-]+(/[A-Za-z0-9_.-]+)*$",
        description="The LoRA's .safetensors file in the repository, e.g. pytorch_lora_weights.safetensors.",
    )

    @field_validator("weight_name")
    @classmethod
    def _safetensors(cls, weight_name: str) -> str:
        if ".." in weight_name.split("/"):
            reject([Violation("", f"'{weight_name}' leaves the repository", "name a file inside the repository")])
        refused = not_safetensors(weight_name)
        if refused is not None:
            reject([refused])
        return weight_name


class LocalLora(RecipeModel):
    """A LoRA file already on disk."""

    path: LoraFilePath = Field(
        description="The LoRA's .safetensors file (diffusers or kohya format), relative to the recipe file; "
        "must stay inside the workspace."
    )


class LoraSource(RecipeModel):
    """One LoRA (diffusers or kohya format), fused into the UNet and the text encoders it has weights for."""

    hub: HubLora | None = Field(default=None, description="A LoRA file in a hub repository at a pinned commit.")
    local: LocalLora | None = Field(default=None, description="A LoRA file inside the workspace.")
    scale: StrictFloat = Field(
        default=1.0, description="How strongly the LoRA is fused: 1.0 as trained, 0 not at all, negative inverts it."
    )

    @field_validator("scale")
    @classmethod
    def _finite(cls, scale: float) -> float:
        if not math.isfinite(scale):
            reject([Violation("", f"scale {scale} is not a finite number", "write a number such as 0.8")])
        return scale

    @model_validator(mode="after")
    def _exactly_one(self) -> LoraSource:
        given = [name for name in ("hub", "local") if getattr(self, name) is not None]
        if len(given) != 1:
            reject(
                [
                    Violation(
                        "" if not given else "local",
                        "give exactly one of `hub:` and `local:`" + (f"; found {' and '.join(given)}" if given else ""),
                        "write `hub: {id, revision, weight_name}` or `local: {path}`, and `scale:`",
                    )
                ]
            )
        return self


class ModelSource(RecipeModel):
    """The checkpoint to convert: exactly one of hub, local or synthetic."""

    hub: HubSource | None = Field(default=None, description="Download from the Hugging Face hub at a pinned commit.")
    local: LocalSource | None = Field(default=None, description="Read a checkpoint inside the workspace.")
    synthetic: SyntheticSource | None = Field(default=None, description="Generate seeded random weights.")
    vae: VaeSource | None = Field(default=None, description="Replace the checkpoint's VAE (hub or local models only).")
    refiner: RefinerSource | None = Field(
        default=None, description="SDXL's refiner pipeline, converted as components.unet_refiner (sdxl only)."
    )
    controlnets: list[ControlNetSource] = Field(
        default_factory=list,
        description="ControlNets for this pipeline (sd only); "
        "each becomes controlnet/<Name> and the UNet ControlledUnet.",
    )

    loras: list[LoraSource] = Field(
        default_factory=list,
        description="LoRAs fused, in order, into the UNet and the text encoders they have weights for, "
        "before conversion: each {hub: {id, revision, weight_name}} or {local: {path}}, with scale.",
    )

    @model_validator(mode="after")
    def _consistent(self) -> ModelSource:
        violations = _exactly_one(self, ("hub", "local", "synthetic"))
        for index, controlnet in enumerate(self.controlnets):
            if controlnet.local is not None and not controlnet.local.path.is_dir():
                violations.append(
                    Violation(
                        f"controlnets.{index}.local.path",
                        "a ControlNet is read from a diffusers folder, "
                        f"not the single file {controlnet.local.path.name}",
                        "point to a folder holding the ControlNet's config.json "
                        "and diffusion_pytorch_model.safetensors",
                    )
                )
        if self.synthetic is not None and self.vae is not None:
            violations.append(
                Violation(
                    "vae",
                    "a replacement VAE applies to hub or local models, not synthetic ones",
                    "remove `vae:`; synthetic presets bring their own VAE",
                )
            )
        reject(violations)
        return self


def _exactly_one(model: RecipeModel, names: tuple[str, ...]) -> list[Violation]:
    given = [name for name in names if getattr(model, name) is not None]
    if len(given) == 1:
        return []
    choices = ", ".join(f"`{name}:`" for name in names)
    if not given:
        return [Violation("", f"no source given; expected one of {choices}", f"add one of {choices}")]
    return [
        Violation(
            given[1],
            f"give exactly one source; found {' and '.join(given)}",
            f"keep one of {', '.join(f'`{name}:`' for name in given)} and remove the others",
        )
    ]
