"""A bundle model as Core ML runs it (macOS): `coremltools` `predict` on the shipped package or compiled model.

Inputs are cast to the dtypes the saved model declares, outputs come back as float32 tensors. A
chunked model runs its chunks in turn, the first one's outputs feeding the second, as the Swift
package does. Models load with the bundle's compute unit, as an app configured from the manifest would.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from builder.generate.backend import Model
from builder.generate.built import BuiltBundle
from builder.sd.manifest import ModelEntry

_NUMPY = {"float16": np.float16, "float32": np.float32, "double": np.float64, "int32": np.int32}


def _open(path: Path, compute_unit: str) -> Any:
    import coremltools as ct

    units = ct.ComputeUnit[compute_unit]
    if path.suffix == ".mlmodelc":
        return ct.models.CompiledMLModel(str(path), units)
    return ct.models.MLModel(str(path), compute_units=units)


@dataclass(frozen=True)
class CoreMLModel:
    model: Any  # coremltools MLModel or CompiledMLModel: both `predict` a dict of numpy arrays
    inputs: dict[str, str]  # feature name -> dtype the saved model declares

    def __call__(self, features: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        feed = {name: features[name].detach().numpy().astype(_NUMPY[dtype]) for name, dtype in self.inputs.items()}
        produced = self.model.predict(feed)
        return {name: torch.from_numpy(np.asarray(value, dtype=np.float32)) for name, value in produced.items()}


@dataclass(frozen=True)
class ChunkedModel:
    chunks: tuple[Model, ...]

    def __call__(self, features: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        carried = dict(features)
        produced: dict[str, torch.Tensor] = {}
        for chunk in self.chunks:
            produced = chunk(carried)
            carried |= produced
        return produced


def load_model(bundle: BuiltBundle, parts: list[tuple[str, ModelEntry]]) -> Model:
    compute_unit = bundle.manifest.compute_unit
    models = tuple(
        CoreMLModel(_open(bundle.resource(entry), compute_unit), {i.name: i.dtype for i in entry.inputs})
        for _, entry in parts
    )
    return models[0] if len(models) == 1 else ChunkedModel(models)
