"""The UNet's spatial transformer (diffusers' Transformer2DModel) in the (B, C, 1, S) layout.

Same math as diffusers' continuous-input Transformer2DModel with BasicTransformerBlocks
(self-attention, cross-attention, GEGLU feed-forward, pre-LayerNorm), with every linear layer a
1x1 convolution. Projections in and out are 1x1 convolutions whether diffusers used convolutions
(SD 1.x) or linear layers (SD 2.x): both act on each token alone, so they commute with the reshape.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from builder.recipe.enums import Attention
from builder.sd.ane.attention import attend
from builder.sd.ane.layer_norm import ChannelLayerNorm

# diffusers hard-codes this GroupNorm epsilon in Transformer2DModel.
_GROUP_NORM_EPS = 1e-6
_FEED_FORWARD_MULTIPLIER = 4


def _conv1x1(in_channels: int, out_channels: int, bias: bool) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, kernel_size=1, bias=bias)


class ConvAttention(nn.Module):
    """Multi-head attention whose projections are 1x1 convolutions."""

    def __init__(self, query_dim: int, context_dim: int, heads: int, head_dim: int, bias: bool, attention: Attention):
        super().__init__()
        inner = heads * head_dim
        self.heads = heads
        self.scale = head_dim**-0.5
        self.attention = attention
        self.to_q = _conv1x1(query_dim, inner, bias)
        self.to_k = _conv1x1(context_dim, inner, bias)
        self.to_v = _conv1x1(context_dim, inner, bias)
        self.to_out = _conv1x1(inner, query_dim, bias=True)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        q, k, v = self.to_q(x), self.to_k(context), self.to_v(context)
        return self.to_out(attend(q, k, v, self.heads, self.attention, self.scale))


class GegluFeedForward(nn.Module):
    """diffusers' FeedForward with the GEGLU activation, split on the channel axis."""

    def __init__(self, dim: int):
        super().__init__()
        inner = dim * _FEED_FORWARD_MULTIPLIER
        self.project_in = _conv1x1(dim, 2 * inner, bias=True)
        self.project_out = _conv1x1(inner, dim, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden, gate = self.project_in(x).chunk(2, dim=1)
        return self.project_out(hidden * F.gelu(gate))


class ConvTransformerBlock(nn.Module):
    """BasicTransformerBlock with layer_norm norms: self-attention, cross-attention, feed-forward."""

    def __init__(
        self,
        dim: int,
        context_dim: int,
        heads: int,
        head_dim: int,
        attention_bias: bool,
        norm_eps: float,
        norm_elementwise_affine: bool,
        attention: Attention,
    ):
        super().__init__()
        self.norm1 = ChannelLayerNorm(dim, norm_eps, norm_elementwise_affine)
        self.attn1 = ConvAttention(dim, dim, heads, head_dim, attention_bias, attention)
        self.norm2 = ChannelLayerNorm(dim, norm_eps, norm_elementwise_affine)
        self.attn2 = ConvAttention(dim, context_dim, heads, head_dim, attention_bias, attention)
        self.norm3 = ChannelLayerNorm(dim, norm_eps, norm_elementwise_affine)
        self.ff = GegluFeedForward(dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        normed = self.norm1(x)
        x = self.attn1(normed, normed) + x
        x = self.attn2(self.norm2(x), context) + x
        return self.ff(self.norm3(x)) + x


class ConvTransformer2D(nn.Module):
    """Drop-in for a UNet block's Transformer2DModel taking text states as (B, C_text, 1, S_text).

    Image features stay (B, C, H, W) outside, like the ResNets around it; inside, tokens are the
    H*W positions in row-major order, diffusers' token order.
    """

    def __init__(
        self,
        in_channels: int,
        heads: int,
        head_dim: int,
        num_layers: int,
        context_dim: int,
        norm_num_groups: int,
        attention_bias: bool,
        norm_eps: float,
        norm_elementwise_affine: bool,
        attention: Attention,
    ):
        super().__init__()
        inner = heads * head_dim
        self.norm = nn.GroupNorm(norm_num_groups, in_channels, eps=_GROUP_NORM_EPS, affine=True)
        self.proj_in = _conv1x1(in_channels, inner, bias=True)
        self.transformer_blocks = nn.ModuleList(
            ConvTransformerBlock(
                inner, context_dim, heads, head_dim, attention_bias, norm_eps, norm_elementwise_affine, attention
            )
            for _ in range(num_layers)
        )
        self.proj_out = _conv1x1(inner, in_channels, bias=True)

    def forward(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        cross_attention_kwargs: dict | None = None,
        attention_mask: torch.Tensor | None = None,
        encoder_attention_mask: torch.Tensor | None = None,
        return_dict: bool = False,
    ) -> tuple[torch.Tensor]:
        """Called by the diffusers UNet blocks exactly as they call Transformer2DModel."""
        if cross_attention_kwargs or attention_mask is not None or encoder_attention_mask is not None or return_dict:
            raise ValueError(
                "the Neural Engine transformer takes no attention masks, cross_attention_kwargs or return_dict"
            )
        batch, _, height, width = hidden_states.shape
        x = self.proj_in(self.norm(hidden_states))
        x = x.view(batch, x.shape[1], 1, height * width)
        for block in self.transformer_blocks:
            x = block(x, encoder_hidden_states)
        x = x.view(batch, x.shape[1], height, width)
        return (self.proj_out(x) + hidden_states,)
