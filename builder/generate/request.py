"""What one `sdbuild generate` call asks for."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

# Swift's StableDiffusionXLPipeline hands the last 20% of the steps to the refiner by default.
REFINER_START = 0.8

# Called after every denoising step with (steps done, steps in all).
OnStep = Callable[[int, int], None]


@dataclass(frozen=True)
class Request:
    prompt: str
    steps: int
    seed: int
    guidance_scale: float
    init_image: Path | None = None  # image-to-image: start from this image, noised to `strength`
    strength: float = 0.75
    control_images: tuple[Path, ...] = ()  # one per ControlNet of the bundle, in the manifest's order
    refiner_start: float = REFINER_START  # SDXL with a refiner: fraction of the steps the base UNet runs
