"""Images in and out: input images read and sized for the bundle, the result written as a PNG atomically."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from builder.engine.files import write_bytes_atomic
from builder.errors import UserError


def read_image(path: Path, size: tuple[int, int], what: str) -> torch.Tensor:
    """`path` as (1, 3, H, W) RGB in [0, 1] at the bundle's image `size` (height, width), resized if needed."""
    height, width = size
    try:
        with Image.open(path) as image:
            rgb = image.convert("RGB")
    except (OSError, UnidentifiedImageError) as problem:
        raise UserError(f"cannot read the {what} {path}: {problem}", hint="pass a PNG or JPEG file") from None
    if rgb.size != (width, height):
        rgb = rgb.resize((width, height), Image.Resampling.LANCZOS)
    return torch.from_numpy(np.asarray(rgb, dtype=np.float32) / 255).permute(2, 0, 1)[None]


def to_pixels(image: torch.Tensor) -> np.ndarray:
    """A decoded (1, 3, H, W) image in [-1, 1] as (H, W, 3) uint8, rounded as diffusers' postprocessing does."""
    scaled = (image[0].to(torch.float32) / 2 + 0.5).clamp(0, 1).permute(1, 2, 0).numpy()
    return (scaled * 255).round().astype(np.uint8)


def write_png(path: Path, pixels: np.ndarray) -> None:
    """Write through a temporary file and rename, so an interrupted run never leaves half an image."""
    encoded = io.BytesIO()
    Image.fromarray(pixels).save(encoded, format="PNG")
    write_bytes_atomic(path, encoded.getvalue())
