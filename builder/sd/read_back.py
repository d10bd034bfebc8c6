"""Compressed weights read back from a saved Core ML program into the torch module they came from.

No Core ML runtime exists on Linux, so compression is judged in torch: the conversion module once
with its weights rounded to float16 (what a float16 package stores) and once with every weight
read back from the compressed package (palettized weights rebuilt from their tables). The two
differ only by what compression did.

coremltools names a weight's const after the torch parameter (`unet.conv_in.weight` becomes
`unet_conv_in_weight_to_fp16`); the Neural Engine rewrite applies the attention scale to the
scores, not to the queries, so no weight is folded with arithmetic and the map is by name alone.
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
from builder.sd.mbp.layers import const_name

_CONSTEXPR_PREFIX = "constexpr_"
_SPEC_PATH = Path("Data/com.apple.CoreML/model.mlmodel")


@dataclass(frozen=True)
class ReadBack:
    """A module with float16 weights and the same module with a package's weights."""

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
    shapes = {const_name(name): (name, tuple(p.shape)) for name, p in module.named_parameters()}
    mapping = {}
    for const, value in consts.items():
        parameter, shape = shapes.get(const, (None, None))
        if parameter is not None and shape == value.shape:
            mapping[const] = parameter
    return mapping


def float16_weights(module: nn.Module) -> nn.Module:
    """`module` with its parameters rounded to float16 in place, as a float16 package stores them."""
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.copy_(parameter.half().float())
    return module.requires_grad_(False)


def read_back(module: nn.Module, package: Path) -> ReadBack:
    """`module` in float16 beside a copy holding the weights of the compressed `package`.

    Raises ValueError when a compressed weight cannot be read back or maps onto no torch parameter
    (the copy would silently keep float16 weights).
    """
    consts = read_back_weights(package)
    compressed_consts = compressed_const_names(package)
    unreadable = sorted(compressed_consts - set(consts))
    if unreadable:
        raise ValueError(
            f"{package.name}: cannot read back {len(unreadable)} compressed weight(s), e.g. {unreadable[0]}"
        )
    float16 = float16_weights(module)
    mapping = map_consts(consts, float16)
    unmapped = sorted(compressed_consts - set(mapping))
    if unmapped:
        raise ValueError(f"{package.name}: compressed weight(s) with no torch parameter: {', '.join(unmapped)}")
    compressed = copy.deepcopy(float16)
    state = {parameter: torch.from_numpy(consts[const].astype(np.float32)) for const, parameter in mapping.items()}
    compressed.load_state_dict(state, strict=False)
    return ReadBack(float16=float16, compressed=compressed, mapping=mapping, compressed_consts=compressed_consts)
