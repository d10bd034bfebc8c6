"""LayerNorm over the channel axis of (B, C, 1, S) tensors."""

from __future__ import annotations

import torch
from torch import nn


class ChannelLayerNorm(nn.Module):
    """`nn.LayerNorm(C)` applied to dim 1, so tokens can stay on the last axis.

    Parameters keep `nn.LayerNorm`'s names, shapes and order (scale, then shift), so diffusers
    weights load unchanged.
    """

    def __init__(self, channels: int, eps: float, elementwise_affine: bool):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(channels)) if elementwise_affine else None
        self.bias = nn.Parameter(torch.zeros(channels)) if elementwise_affine else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        centered = x - x.mean(dim=1, keepdim=True)
        variance = (centered * centered).mean(dim=1, keepdim=True)
        out = centered * torch.rsqrt(variance + self.eps)
        if self.weight is None or self.bias is None:  # both or neither: elementwise_affine
            return out
        return out * self.weight.view(1, -1, 1, 1) + self.bias.view(1, -1, 1, 1)
