"""The bundle's UNet weights loaded back into its torch conversion module.

No Core ML runtime exists on Linux, so a compressed model is judged in torch: the conversion module
(`builder.sd.ane`, rebuilt from the pipeline folder the bundle came from) once with its weights
rounded to float16, as a float16 bundle stores them, and once with every weight read back from the
bundle's `Unet.mlpackage` (palettized weights rebuilt from their tables). The two differ only by
what compression did.

coremltools names a weight's const after the torch parameter (`unet.conv_in.weight` becomes
`unet_conv_in_weight_to_fp16`); the rewrite applies the attention scale to the scores, not to the
queries, so no weight is folded with arithmetic and the map is by name alone.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from builder.coreml.palettize import read_back_weights
from builder.sd.components import kind
from builder.sd.manifest import Manifest

_FLOAT16_SUFFIX = "_to_fp16"
_CONSTEXPR_PREFIX = "constexpr_"
_SPEC_PATH = Path("Data/com.apple.CoreML/model.mlmodel")


@dataclass(frozen=True)
class ReadBackUnet:
    """The conversion module with float16 weights and with the bundle's weights, and how they map."""

    float16: nn.Module
    compressed: nn.Module
    mapping: dict[str, str]  # const name -> the torch parameter it holds
    compressed_consts: frozenset[str]  # consts stored compressed (a constexpr op rebuilds them)


def _operations(block) -> Iterator:
    for op in block.operations:
        yield op
        for inner in op.blocks:
            yield from _operations(inner)


def compressed_const_names(package: Path) -> frozenset[str]:
    """Names of the weights a `constexpr_*` op decompresses (palettized, quantized, ...)."""
    from coremltools.proto import Model_pb2

    spec = Model_pb2.Model()
    spec.ParseFromString((package / _SPEC_PATH).read_bytes())
    names = set()
    for function in spec.mlProgram.functions.values():
        for block in function.block_specializations.values():
            for op in _operations(block):
                if op.type.startswith(_CONSTEXPR_PREFIX):
                    name = op.attributes["name"].immediateValue.tensor.strings.values[0]
                    names.add(name.rsplit("_", 1)[0])  # coremltools appends `_palettized` and the like
    return frozenset(names)


def map_consts(consts: dict[str, np.ndarray], module: nn.Module) -> dict[str, str]:
    """Which torch parameter each const holds; consts holding none (reshaped norms, buffers) are left out."""
    shapes = {name.replace(".", "_"): (name, tuple(p.shape)) for name, p in module.named_parameters()}
    mapping = {}
    for const, value in consts.items():
        parameter, shape = shapes.get(const.removesuffix(_FLOAT16_SUFFIX), (None, None))
        if parameter is not None and shape == value.shape:
            mapping[const] = parameter
    return mapping


def _conversion_unet(pipeline: Path, attention: str) -> nn.Module:
    k = kind("unet")
    module = k.wrap(k.load(pipeline, k.subfolder), attention).eval()
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.copy_(parameter.half().float())
    return module.requires_grad_(False)


def load_read_back_unet(bundle: Path, pipeline: Path) -> ReadBackUnet:
    """Float16 and compressed torch UNets of `bundle`, built from the `pipeline` folder it was made from.

    Raises ValueError when a compressed weight of the package maps onto no torch parameter (the
    compressed module would silently keep float16 weights) or cannot be read back.
    """
    manifest = Manifest.model_validate_json((bundle / "manifest.json").read_text())
    entry = manifest.models["Unet"]
    package = bundle / "Resources" / entry.path
    consts = read_back_weights(package)
    compressed_consts = compressed_const_names(package)
    unreadable = sorted(compressed_consts - set(consts))
    if unreadable:
        raise ValueError(f"{package.name}: cannot read back {len(unreadable)} compressed weight(s), e.g. {unreadable[0]}")
    float16 = _conversion_unet(pipeline, manifest.attention)
    mapping = map_consts(consts, float16)
    unmapped = sorted(compressed_consts - set(mapping))
    if unmapped:
        raise ValueError(f"{package.name}: compressed weight(s) with no torch parameter: {', '.join(unmapped)}")
    compressed = copy.deepcopy(float16)
    state = {parameter: torch.from_numpy(consts[const].astype(np.float32)) for const, parameter in mapping.items()}
    compressed.load_state_dict(state, strict=False)
    return ReadBackUnet(float16=float16, compressed=compressed, mapping=mapping, compressed_consts=compressed_consts)
