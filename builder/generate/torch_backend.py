"""A bundle model as torch runs it: the conversion module the build verified, with the bundle's weights.

The module is rebuilt from its rewrite stage's output (the exact graph that was traced and
converted), its weights rounded to float16 as a float16 package stores them (a float32 model, like
SDXL's own VAE, keeps float32), then every compressed weight of the shipped package is read back
over them with the map its verify stage recorded (`builder.sd.read_back`, as verify and `sdbuild
report` do). So the image shows what the compressed bundle computes, up to Core ML's float16
arithmetic. Modules run the batched attention form whatever the recipe's: the three forms compute
the same function from the same parameters, and the batched one is the fastest on a CPU.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from builder.errors import UserError
from builder.generate.built import BuiltBundle
from builder.sd.manifest import ModelEntry
from builder.sd.read_back import SOURCES_FILE, float16_weights, load_compressed, load_sources
from builder.stages.trace import load_conversion_module
from builder.stages.verify import EVALUATED_ATTENTION

_PACKAGE = "model.mlpackage"


@dataclass(frozen=True)
class TorchModel:
    module: nn.Module
    inputs: tuple[str, ...]  # the module's positional arguments, by feature name
    outputs: tuple[str, ...]

    def __call__(self, features: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            produced = self.module(*(features[name].to(torch.float32) for name in self.inputs))
        produced = produced if isinstance(produced, tuple) else (produced,)
        return dict(zip(self.outputs, produced, strict=True))


def _stage_label(entry: ModelEntry) -> str:
    return f"{entry.component}.chunk{entry.chunk.index}" if entry.chunk is not None else entry.component


def _package(bundle: BuiltBundle, entry: ModelEntry, verify: str) -> Path:
    """The shipped package; for a compiled bundle, the package it was compiled from (same weights)."""
    shipped = bundle.resource(entry)
    if shipped.suffix == ".mlpackage":
        return shipped
    return bundle.outputs[bundle.graph[verify].inputs["model"]] / _PACKAGE


def load_model(bundle: BuiltBundle, parts: list[tuple[str, ModelEntry]]) -> TorchModel:
    """One model (the entries of its chunks, if chunked: one module holds them all)."""
    name, entry = parts[0]
    if entry.compression.mode == "w8a8":
        raise UserError(
            f"{name} is a W8A8 model (int8 activations), which `sdbuild generate` runs through Core ML only",
            hint="generate on a Mac, or from a copy of the recipe with another compression for this component",
        )
    rewritten = bundle.stage_output(f"rewrite:{entry.component}")
    if rewritten is None:
        raise UserError(f"the cache has no rewrite stage output for {name}", hint="run `sdbuild build` on the recipe")
    module, architecture = load_conversion_module(rewritten, attention=EVALUATED_ATTENTION)
    if entry.precision == "float16":
        float16_weights(module)
    module.requires_grad_(False)
    for _, part in parts:
        verify = f"verify:{_stage_label(part)}"
        verified = bundle.stage_output(verify)
        if verified is not None:
            load_compressed(module, _package(bundle, part, verify), load_sources(verified / SOURCES_FILE))
    inputs = tuple(spec["name"] for spec in architecture["inputs"])
    return TorchModel(module, inputs, tuple(architecture["outputs"]))
