"""One module per pipeline family, each with `generate(bundle, models, request, on_step)` returning the
decoded (1, 3, H, W) image in [-1, 1]. A new family plugs in by adding its module and a line here."""

from __future__ import annotations

import importlib
from typing import Protocol

import torch

from builder.errors import UserError
from builder.generate.backend import LazyModels
from builder.generate.built import BuiltBundle
from builder.generate.request import OnStep, Request

FAMILIES = {
    "sd": "builder.generate.families.sd",
    "sdxl": "builder.generate.families.sdxl",
    "sd3": "builder.generate.families.sd3",
}


class Family(Protocol):
    def generate(self, bundle: BuiltBundle, models: LazyModels, request: Request, on_step: OnStep) -> torch.Tensor: ...


def family(name: str) -> Family:
    if name not in FAMILIES:
        raise UserError(
            f"`sdbuild generate` cannot run {name} bundles yet", hint=f"it runs: {', '.join(sorted(FAMILIES))}"
        )
    module: Family = importlib.import_module(FAMILIES[name])  # a family module has `generate`
    return module
