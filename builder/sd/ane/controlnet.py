"""ControlNet for the Swift package: the ControlNet model itself and the UNet that takes its residuals.

diffusers' ControlNetModel repeats the UNet's down half: its Transformer2DModels get the same Neural
Engine rewrite (and the same support checks) as the UNet's. It returns one residual per skip
connection of the UNet's down half, then one for the mid block; the Swift package feeds them by name,
`additional_residual_0..N`, to `ControlledUnet`, which adds them where diffusers adds
`down_block_additional_residuals` and `mid_block_additional_residual`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Protocol, cast

import torch
from torch import nn

from builder.sd.ane.unet import rewrite_transformers, rewrite_unet

if TYPE_CHECKING:
    from diffusers.models.controlnets.controlnet import ControlNetModel
    from diffusers.models.unets.unet_2d_condition import UNet2DConditionModel

RESIDUAL_PREFIX = "additional_residual_"


class _Layer(Protocol):
    out_channels: int


class _Block(Protocol):
    resnets: Sequence[_Layer]
    downsamplers: Sequence[_Layer] | None


class _DownHalf(Protocol):
    """What a diffusers UNet2DConditionModel and the ControlNetModel built from it share."""

    conv_in: nn.Conv2d
    down_blocks: Sequence[_Block]
    mid_block: _Block


def residual_names(count: int) -> tuple[str, ...]:
    return tuple(f"{RESIDUAL_PREFIX}{i}" for i in range(count))


def residual_shapes(model: nn.Module, batch: int, latent_size: tuple[int, int]) -> list[list[int]]:
    """(B, C, H, W) of each residual, in order: conv_in's output, every down-block resnet and
    downsampler output, then the mid block's. Read off the module, so it holds for a UNet and the
    ControlNet built from it alike."""
    h, w = latent_size
    half = cast(_DownHalf, model)  # either model: the same down half under the same names
    shapes = [[batch, half.conv_in.out_channels, h, w]]
    for block in half.down_blocks:
        shapes += [[batch, resnet.out_channels, h, w] for resnet in block.resnets]
        for downsampler in block.downsamplers or ():
            h, w = -(-h // 2), -(-w // 2)  # stride-2 convolution, padding 1
            shapes.append([batch, downsampler.out_channels, h, w])
    shapes.append([batch, half.mid_block.resnets[-1].out_channels, h, w])
    return shapes


class ControlNetModule(nn.Module):
    """ControlNet called as the Swift package calls it; returns the residuals as separate outputs."""

    def __init__(self, controlnet: nn.Module):
        super().__init__()
        self.controlnet = controlnet

    def forward(self, sample, timestep, encoder_hidden_states, controlnet_cond):
        down, mid = self.controlnet(sample, timestep, encoder_hidden_states, controlnet_cond, return_dict=False)
        return (*down, mid)


class ControlledUnetModule(nn.Module):
    """The rewritten UNet with ControlNet residuals added to its skip connections and mid block."""

    def __init__(self, unet: UNet2DConditionModel):
        super().__init__()
        self.unet = unet

    def forward(self, sample, timestep, encoder_hidden_states, *residuals):
        return self.unet(
            sample,
            timestep,
            encoder_hidden_states,
            down_block_additional_residuals=residuals[:-1],
            mid_block_additional_residual=residuals[-1],
            return_dict=False,
        )[0]


def rewrite_controlled_unet(unet: UNet2DConditionModel, attention: str) -> nn.Module:
    """`rewrite_unet`, wrapped to take the ControlNet residuals as extra inputs."""
    return ControlledUnetModule(rewrite_unet(unet, attention).unet)


def rewrite_controlnet(controlnet: ControlNetModel, attention: str) -> nn.Module:
    """Rewrite `controlnet`'s transformers in place, as `rewrite_unet` does the UNet's, and wrap it.

    Everything is checked first; an unsupported model raises ValueError naming the config key.
    """
    if controlnet.config.get("global_pool_conditions", False):
        raise ValueError(
            "ControlNet: config global_pool_conditions=True is not supported (its residuals are pooled to 1 x 1, "
            "which the Swift package's ControlledUnet inputs do not take; supported: False)"
        )
    rewrite_transformers(controlnet, attention)
    return ControlNetModule(controlnet)


def controlnet_reference(controlnet: nn.Module, inputs: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    """diffusers' ControlNet on the Swift-layout inputs (text states back to (B, 77, C))."""
    text = inputs["encoder_hidden_states"].squeeze(2).transpose(1, 2)
    down, mid = controlnet(inputs["sample"], inputs["timestep"], text, inputs["controlnet_cond"], return_dict=False)
    return [*down, mid]


def controlled_unet_reference(unet: nn.Module, inputs: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    """diffusers' UNet with the residuals given as down_block/mid_block additional residuals."""
    text = inputs["encoder_hidden_states"].squeeze(2).transpose(1, 2)
    residuals = [value for name, value in inputs.items() if name.startswith(RESIDUAL_PREFIX)]
    out = unet(
        inputs["sample"],
        inputs["timestep"],
        text,
        down_block_additional_residuals=tuple(residuals[:-1]),
        mid_block_additional_residual=residuals[-1],
    )
    return [out.sample]
