"""Palettizable layers of the UNet conversion module and the Core ML weight ops that hold them.

A layer's identity is its torch parameter name in the conversion module (the Neural Engine
rewrite, where every linear layer is a 1x1 convolution), e.g.
`unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_k.weight`. After tracing,
ct.convert names that weight's const after the parameter, dots turned into underscores, plus the
float16 cast suffix: `unet_down_blocks_1_..._attn1_to_k_weight_to_fp16`.

One exception, checked on converted UNets: the attention scales its queries right after `to_q`,
and coremltools folds that scale into the convolution, so the folded const is named after the
scaled variable (`q_<counter>_weight_0_to_fp16`), with a counter that depends on the whole graph.
It is identified by position instead: the graph keeps the module's call order, so each folded
query weight comes right before the `to_k` weight of the same attention.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

from torch import nn

# Weights with more elements than this are palettized: the palettizer's default rule.
DEFAULT_WEIGHT_THRESHOLD = 2048

_CAST_SUFFIX = "_to_fp16"
_FOLDED_QUERY = re.compile(r"^q_\d+_weight_0" + _CAST_SUFFIX + "$")
_QUERY, _KEY = ".to_q.weight", ".to_k.weight"


@dataclass(frozen=True)
class Layer:
    identity: str  # torch parameter name in the conversion module
    shape: tuple[int, ...]

    @property
    def elements(self) -> int:
        return math.prod(self.shape)


def palettizable_layers(module: nn.Module, weight_threshold: int = DEFAULT_WEIGHT_THRESHOLD) -> list[Layer]:
    """Convolution and linear weights of `module` above the threshold, in registration order."""
    layers = []
    for name, child in module.named_modules():
        if isinstance(child, (nn.Conv2d, nn.Linear)) and child.weight.numel() > weight_threshold:
            layers.append(Layer(f"{name}.weight" if name else "weight", tuple(child.weight.shape)))
    return layers


def conversion_layers(rewritten: Path, weight_threshold: int = DEFAULT_WEIGHT_THRESHOLD) -> list[Layer]:
    """The palettizable layers of a rewrite stage's module, built on the meta device (no weights read)."""
    import torch

    from builder.sd.components import kind

    architecture = json.loads((rewritten / "architecture.json").read_text())
    component = kind(architecture["component"])
    with torch.device("meta"):
        module = component.wrap(component.from_config(architecture["config"]), architecture["attention"])
    return palettizable_layers(module, weight_threshold)


def const_name(identity: str) -> str:
    """The const ct.convert names after a parameter (not the folded query weights; see module doc)."""
    return identity.replace(".", "_") + _CAST_SUFFIX


def float_weight_ops(package: Path) -> list[tuple[str, tuple[int, ...]]]:
    """(op name, shape) of every float const stored in the package's weight file, in program order."""
    from builder.coreml.palettize import _float_blob, _function_blocks, _op_name, _read_spec, _shape

    spec = _read_spec(package)
    return [
        (_op_name(op), _shape(op))
        for _, blocks in _function_blocks(spec.mlProgram)
        for block in blocks
        for op in block.operations
        if _float_blob(op)
    ]


def op_names(layers: list[Layer], package: Path) -> dict[str, str]:
    """Identity -> weight op name in the converted `package`, for every layer.

    Raises ValueError naming the layers the package has no op of the same shape for (the package
    was converted from another architecture).
    """
    ops = float_weight_ops(package)
    shapes = dict(ops)
    folded_query_by_key: dict[str, str] = {}  # to_k const -> the folded query const just before it
    pending: str | None = None
    for name, _ in ops:
        if _FOLDED_QUERY.match(name):
            pending = name
        elif pending is not None and name.endswith(const_name(_KEY)):
            folded_query_by_key[name], pending = pending, None
    mapping: dict[str, str] = {}
    missing = []
    for layer in layers:
        name = const_name(layer.identity)
        if layer.identity.endswith(_QUERY):
            key = const_name(layer.identity.removesuffix(_QUERY) + _KEY)
            name = folded_query_by_key.get(key, name)
        if shapes.get(name) == layer.shape:
            mapping[layer.identity] = name
        else:
            missing.append(layer.identity)
    if missing:
        raise ValueError(f"{package.name} has no weight op of the right shape for: {', '.join(missing)}")
    return mapping
