"""Palettizable layers of the UNet conversion module and the Core ML weight ops that hold them.

A layer's identity is its torch parameter name in the conversion module (the Neural Engine
rewrite, where every linear layer is a 1x1 convolution), e.g.
`unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_k.weight`. After tracing,
ct.convert names that weight's const after the parameter, dots turned into underscores, plus the
float16 cast suffix: `unet_down_blocks_1_..._attn1_to_k_weight_to_fp16`. This holds for every
layer because the rewrite scales attention scores rather than a projection's output (coremltools
folds a scaled convolution output into a new, counter-named weight).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from builder.coreml.program import float_weight_ops

# Weights with more elements than this are palettized: the palettizer's default rule.
DEFAULT_WEIGHT_THRESHOLD = 2048

_CAST_SUFFIX = "_to_fp16"


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
    component = kind(architecture["component"], architecture.get("family", "sd"))
    with torch.device("meta"):
        module = component.wrap(component.from_config(architecture["config"]), architecture["attention"])
    return palettizable_layers(module, weight_threshold)


def const_name(identity: str) -> str:
    """The name ct.convert gives the const holding parameter `identity`."""
    return identity.replace(".", "_") + _CAST_SUFFIX


def op_names(layers: list[Layer], package: Path) -> dict[str, str]:
    """Identity -> weight op name in the converted `package`, for every layer.

    Raises ValueError naming the layers the package has no op of the same shape for (the package
    was converted from another architecture).
    """
    shapes = dict(float_weight_ops(package))
    mapping = {layer.identity: const_name(layer.identity) for layer in layers}
    missing = [layer.identity for layer in layers if shapes.get(mapping[layer.identity]) != layer.shape]
    if missing:
        raise ValueError(f"{package.name} has no weight op of the right shape for: {', '.join(missing)}")
    return mapping
