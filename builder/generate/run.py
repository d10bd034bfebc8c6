"""One image from a located bundle: its family's pipeline on the chosen backend's models."""

from __future__ import annotations

import numpy as np

from builder.errors import UserError
from builder.generate.backend import Backend, load_models
from builder.generate.built import BuiltBundle
from builder.generate.families import family
from builder.generate.images import to_pixels
from builder.generate.request import OnStep, Request


def generate(bundle: BuiltBundle, backend: Backend, request: Request, on_step: OnStep) -> np.ndarray:
    """The (H, W, 3) uint8 image `request` asks of `bundle`."""
    if request.steps < 1:
        raise UserError(f"--steps {request.steps}: at least one step is needed", hint="pass --steps 1 or more")
    pipeline = family(bundle.manifest.family)
    return to_pixels(pipeline.generate(bundle, load_models(bundle, backend), request, on_step))
