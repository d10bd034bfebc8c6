"""Per-layer W8A8 / W8A32 decisions from measured sensitivities, as Apple's recipe makes them.

A layer whose W8A8 alone leaves the workload below its kind's threshold (convolutions `conv_psnr`,
attention cores `attention_psnr`) keeps float activations. Two overrides follow, each a recipe
option: the up blocks' resnet conv1s and the upsamplers are quantized whatever they measured (the
slowest convolutions: without them the speed-up is lost), and the attention output projections keep
float activations whatever they measured (their input concatenates the heads, and a scale shared
across heads of different ranges costs quality the per-layer analysis does not see).
"""

from __future__ import annotations

from collections.abc import Sequence

from pydantic import BaseModel

from builder.sd.w8a8.unet import Layer


class Thresholds(BaseModel):
    conv_psnr: float = 40.0
    attention_psnr: float = 30.0
    quantize_up_convs: bool = True
    to_out_w8a32: bool = True


class Decision(BaseModel):
    kind: str  # conv or attention
    psnr_db: float  # the workload's final latents with this layer alone W8A8
    activations: str  # "int8" (W8A8) or "float" (W8A32)
    why: str  # threshold, quantize_up_convs or to_out_w8a32


def _is_up_conv(name: str) -> bool:
    return ("up_blocks" in name and "resnets" in name and name.endswith(".conv1")) or "upsamplers" in name


def decide(layers: Sequence[Layer], sensitivity: dict[str, float], thresholds: Thresholds) -> dict[str, Decision]:
    """Layer name -> its decision; every layer must have been measured."""
    missing = [layer.name for layer in layers if layer.name not in sensitivity]
    if missing:
        raise ValueError(f"{len(missing)} layer(s) were not measured, e.g. {missing[0]}")
    decisions = {}
    for layer in layers:
        db = sensitivity[layer.name]
        floor = thresholds.conv_psnr if layer.kind == "conv" else thresholds.attention_psnr
        quantized, why = db >= floor, "threshold"
        if layer.kind == "conv" and thresholds.quantize_up_convs and _is_up_conv(layer.name) and not quantized:
            quantized, why = True, "quantize_up_convs"
        if layer.kind == "conv" and thresholds.to_out_w8a32 and ".to_out" in layer.name:
            quantized, why = False, "to_out_w8a32"
        decisions[layer.name] = Decision(
            kind=layer.kind, psnr_db=db, activations="int8" if quantized else "float", why=why
        )
    return decisions


def w8a32_layers(decisions: dict[str, Decision]) -> list[str]:
    """The layers built with float activations."""
    return sorted(name for name, decision in decisions.items() if decision.activations == "float")
