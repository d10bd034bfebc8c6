"""The bundle's UNet weights loaded back into its torch conversion module.

No Core ML runtime exists on Linux, so a compressed model is judged in torch: the conversion module
(`builder.sd.ane`, rebuilt from the pipeline folder the bundle came from) once with its weights
rounded to float16, as a float16 bundle stores them, and once with every weight read back from the
bundle's `Unet.mlpackage` (palettized weights rebuilt from their tables). The two differ only by
what compression did.

coremltools names a weight's const after the torch parameter (`unet.conv_in.weight` becomes
`unet_conv_in_weight_to_fp16`), except where a graph pass folded arithmetic into it: the rewrite's
`to_q(x) * scale` becomes one convolution whose weight (`q_<n>_weight_0_to_fp16`) is the query
weight times the attention's scale. Those are matched by value among the query projections.
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
from builder.sd.ane.transformer import ConvAttention
from builder.sd.components import kind
from builder.sd.manifest import Manifest

_FLOAT16_SUFFIX = "_to_fp16"
_CONSTEXPR_PREFIX = "constexpr_"
# Folded query weights are matched to the query projection they correlate with. Palettization
# keeps that correlation high (1-bit k-means of a Gaussian: ~0.8); unrelated weights score ~0.
_MINIMUM_COSINE = 0.5
_SPEC_PATH = Path("Data/com.apple.CoreML/model.mlmodel")


@dataclass(frozen=True)
class ConstTarget:
    """The torch parameter a Core ML const holds, as `parameter = const / scale`."""

    parameter: str
    scale: float = 1.0


@dataclass(frozen=True)
class ReadBackUnet:
    """The conversion module with float16 weights and with the bundle's weights, and how they map."""

    float16: nn.Module
    compressed: nn.Module
    mapping: dict[str, ConstTarget]  # every const of the package that holds a torch parameter
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


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    norms = np.linalg.norm(a) * np.linalg.norm(b)
    return float(a @ b / norms) if norms else 0.0


def map_consts(consts: dict[str, np.ndarray], module: nn.Module) -> dict[str, ConstTarget]:
    """Which torch parameter each const holds; consts holding none (reshaped norms, buffers) are left out.

    Raises ValueError when two consts claim one parameter or a folded query weight is ambiguous.
    """
    parameters = {name: p.detach().numpy() for name, p in module.named_parameters()}
    by_const_name = {name.replace(".", "_"): name for name in parameters}
    mapping: dict[str, ConstTarget] = {}
    for const, value in consts.items():
        parameter = by_const_name.get(const.removesuffix(_FLOAT16_SUFFIX))
        if parameter is not None and parameters[parameter].shape == value.shape:
            mapping[const] = ConstTarget(parameter)
    claimed = {target.parameter for target in mapping.values()}
    queries = {
        f"{name}.to_q.weight": m.scale
        for name, m in module.named_modules()
        if isinstance(m, ConvAttention) and f"{name}.to_q.weight" not in claimed
    }
    for const, value in consts.items():
        if const in mapping:
            continue
        scores = sorted(
            ((_cosine(value, parameters[q]), q) for q in queries if parameters[q].shape == value.shape), reverse=True
        )
        matches = [q for score, q in scores if score >= _MINIMUM_COSINE]
        if len(matches) > 1:
            raise ValueError(f"{const} matches several query projections: {', '.join(matches)}")
        if matches:
            mapping[const] = ConstTarget(matches[0], queries.pop(matches[0]))
    targets = [target.parameter for target in mapping.values()]
    if len(set(targets)) != len(targets):
        raise ValueError("two consts of the package map onto one torch parameter")
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
    state = {
        target.parameter: torch.from_numpy(consts[const].astype(np.float32) / np.float32(target.scale))
        for const, target in mapping.items()
    }
    compressed.load_state_dict(state, strict=False)
    return ReadBackUnet(float16=float16, compressed=compressed, mapping=mapping, compressed_consts=compressed_consts)
