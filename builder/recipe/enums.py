"""The closed vocabularies a recipe chooses from."""

from __future__ import annotations

from enum import Enum


class Family(str, Enum):
    """Pipeline family: decides which components exist and which Swift pipeline loads the bundle."""

    SD = "sd"
    SDXL = "sdxl"
    SD3 = "sd3"


class Attention(str, Enum):
    """Attention implementation baked into the UNet: ORIGINAL suits the GPU, SPLIT_EINSUM* the
    Neural Engine."""

    ORIGINAL = "ORIGINAL"
    SPLIT_EINSUM = "SPLIT_EINSUM"
    SPLIT_EINSUM_V2 = "SPLIT_EINSUM_V2"


class ComputeUnit(str, Enum):
    """Core ML compute units the bundle is tuned for."""

    ALL = "ALL"
    CPU_ONLY = "CPU_ONLY"
    CPU_AND_GPU = "CPU_AND_GPU"
    CPU_AND_NE = "CPU_AND_NE"


class DeploymentTarget(str, Enum):
    """Oldest OS the Core ML models must load on; newer targets unlock newer Core ML ops."""

    IOS16 = "iOS16"
    IOS17 = "iOS17"
    IOS18 = "iOS18"
    MACOS13 = "macOS13"
    MACOS14 = "macOS14"
    MACOS15 = "macOS15"

    @property
    def platform(self) -> str:
        return "iOS" if self.value.startswith("iOS") else "macOS"

    @property
    def major(self) -> int:
        return int(self.value.removeprefix(self.platform))


class Component(str, Enum):
    """A model of the pipeline that sdbuild converts to its own Core ML package."""

    TEXT_ENCODER = "text_encoder"
    TEXT_ENCODER_2 = "text_encoder_2"
    TEXT_ENCODER_3 = "text_encoder_3"
    UNET = "unet"
    UNET_REFINER = "unet_refiner"
    MMDIT = "mmdit"
    VAE_DECODER = "vae_decoder"
    VAE_ENCODER = "vae_encoder"
    SAFETY_CHECKER = "safety_checker"
    CONTROLNET = "controlnet"
