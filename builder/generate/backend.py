"""The bundle's models as callables, run by Core ML on macOS and by the verified torch modules elsewhere.

A model takes a mapping of named tensors (extra names are ignored, so one dict can feed a UNet and
its ControlNets) and returns its outputs by name, in the Swift package's layouts. Chunked models
appear whole (`Unet` for `UnetChunk1` + `UnetChunk2`). Models load on first use: an image-to-image
run loads the VAE encoder, a text-to-image run does not.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator, Mapping
from typing import Literal, Protocol

import torch

from builder.errors import UserError
from builder.generate.built import BuiltBundle
from builder.sd.manifest import ModelEntry

Backend = Literal["coreml", "torch"]


class Model(Protocol):
    def __call__(self, features: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]: ...


def choose_backend(requested: str, platform: str = sys.platform) -> Backend:
    """`auto`: Core ML where it can run models (macOS), torch elsewhere."""
    if requested == "coreml" and platform != "darwin":
        raise UserError(
            f"Core ML runs models on macOS only, and this is {platform}",
            hint="use --backend torch (or auto): the verified torch modules with the bundle's compressed weights",
        )
    if requested in ("coreml", "torch"):
        return requested  # type: ignore[return-value]  # checked just above
    return "coreml" if platform == "darwin" else "torch"


def whole_models(bundle: BuiltBundle) -> dict[str, list[tuple[str, ModelEntry]]]:
    """Every model by the name the pipeline calls it, with its Resources entries (a chunked one's in order)."""
    grouped: dict[str, list[tuple[str, ModelEntry]]] = {}
    for name, entry in bundle.manifest.models.items():
        whole = name.removesuffix(f"Chunk{entry.chunk.index}") if entry.chunk is not None else name
        grouped.setdefault(whole, []).append((name, entry))
    return {whole: sorted(parts, key=lambda part: part[0]) for whole, parts in grouped.items()}  # Chunk1 first


class LazyModels(Mapping[str, Model]):
    """The bundle's models by name, each loaded by `load` the first time it is asked for."""

    def __init__(self, names: list[str], load: Callable[[str], Model]):
        self._names = names
        self._load = load
        self._loaded: dict[str, Model] = {}

    def __getitem__(self, name: str) -> Model:
        if name not in self._names:
            raise KeyError(name)
        if name not in self._loaded:
            self._loaded[name] = self._load(name)
        return self._loaded[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)


def load_models(bundle: BuiltBundle, backend: Backend) -> LazyModels:
    if backend == "coreml":
        from builder.generate.coreml_backend import load_model
    else:
        from builder.generate.torch_backend import load_model
    grouped = whole_models(bundle)
    return LazyModels(list(grouped), lambda name: load_model(bundle, grouped[name]))
