"""The UNet conversion module in a form torch.fx can trace, for coremltools' `LinearQuantizer`.

The quantizer inserts its observers by tracing the model symbolically, and the diffusers forward
branches on tensor shapes, which symbolic tracing cannot follow. `QuantizableUnet` runs the same
modules in the same order (the steps of `builder.sd.chunk.unet_steps`): resnets as diffusers modules
(they trace), the Neural Engine transformers, samplers and the attention itself spelled out with
shapes fixed at construction. Numbers are identical to the conversion module's (tested).

Two parts are left to the quantizer as opaque modules, as Apple's activation quantization leaves
them: the time (and SDXL added-condition) embedding, `embed`, and the channel layer norms.
Every attention's core (scores, softmax, weighted sum: einsums per head for SPLIT_EINSUM, batched
matmuls for ORIGINAL) becomes a module of its own, `<attention>.einsum`, the unit Apple's recipe
names "einsum" layers by; projections stay the 1x1 convolutions `to_q`, `to_k`, `to_v`, `to_out`.
Module paths are the conversion module's, so layer names read like mixed-bit recipe keys.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

import torch
import torch.nn.functional as F
from torch import nn

from builder.recipe.enums import Attention
from builder.recipe.rules import SPLIT_EINSUM_V2_CHUNK
from builder.sd.ane.layer_norm import ChannelLayerNorm
from builder.sd.ane.transformer import ConvAttention, ConvTransformer2D, ConvTransformerBlock, GegluFeedForward
from builder.sd.chunk import Step, unet_steps

if TYPE_CHECKING:
    from diffusers.models.unets.unet_2d_condition import UNet2DConditionModel

EMBED = "embed"  # the embedding module's name in QuantizableUnet
CORE = "einsum"  # an attention core's name inside its ConvAttention
# Top-level UNet modules the steps run; the others make up the embedding.
_BODY = ("conv_in", "down_blocks", "mid_block", "up_blocks", "conv_norm_out", "conv_act", "conv_out")


class AttentionCore(nn.Module):
    """`builder.sd.ane.attention.attend` with its shapes fixed: q (B, heads*d, 1, Sq), k and v
    (B, heads*d, 1, Sk) -> (B, heads*d, 1, Sq). SPLIT_EINSUM_V2's query chunks are counted from the
    query length the attention runs at, known from the latent size."""

    def __init__(self, heads: int, head_dim: int, attention: Attention, scale: float, queries: int):
        super().__init__()
        self.heads, self.head_dim, self.attention, self.scale = heads, head_dim, attention, scale
        chunked = attention is Attention.SPLIT_EINSUM_V2 and queries >= SPLIT_EINSUM_V2_CHUNK
        self.chunk = SPLIT_EINSUM_V2_CHUNK if chunked else None
        self.chunks = queries // SPLIT_EINSUM_V2_CHUNK if chunked else 1

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if self.attention is Attention.ORIGINAL:
            return self._batched(q, k, v)
        keys = k.transpose(1, 3)  # (B, Sk, 1, C)
        heads = []
        for head in range(self.heads):
            channels = slice(head * self.head_dim, (head + 1) * self.head_dim)
            q_head, k_head, v_head = q[:, channels], keys[..., channels], v[:, channels]
            if self.chunk is None:
                heads.append(self._one_head(q_head, k_head, v_head))
                continue
            pieces = [q_head[..., i * self.chunk : (i + 1) * self.chunk] for i in range(self.chunks)]
            heads.append(torch.cat([self._one_head(piece, k_head, v_head) for piece in pieces], dim=3))
        return torch.cat(heads, dim=1)

    def _one_head(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        weights = (torch.einsum("bchq,bkhc->bkhq", q, k) * self.scale).softmax(dim=1)
        return torch.einsum("bkhq,bchk->bchq", weights, v)

    def _batched(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        batch = q.shape[0]
        q = q.view(batch, self.heads, self.head_dim, -1).transpose(2, 3)  # (B, h, Sq, d)
        k = k.view(batch, self.heads, self.head_dim, -1)
        v = v.view(batch, self.heads, self.head_dim, -1)
        weights = (torch.matmul(q, k) * self.scale).softmax(dim=-1)
        return torch.matmul(v, weights.transpose(2, 3)).view(batch, self.heads * self.head_dim, 1, -1)


class Embedding(nn.Module):
    """The UNet's time (and added-condition) embedding, run by diffusers' own methods: a leaf the
    quantizer does not trace into, like Apple's `time_proj` and `time_embedding`."""

    def __init__(self, unet: nn.Module):
        super().__init__()
        for name, child in unet.named_children():
            if name not in _BODY and child is not None:
                self.add_module(name, child)
        self.config = unet.config  # the diffusers methods read it off `self`
        self._unet_class = type(unet)

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor,
        text_embeds: torch.Tensor | None,
        time_ids: torch.Tensor | None,
    ) -> torch.Tensor:
        cls: Any = self._unet_class  # diffusers' UNet2DConditionModel: its methods run on this skeleton
        time_embedding: Any = self.time_embedding
        emb = time_embedding(cls.get_time_embed(self, sample=sample, timestep=timestep), None)
        added = None if text_embeds is None else {"text_embeds": text_embeds, "time_ids": time_ids}
        aug = cls.get_aug_embed(self, emb=emb, encoder_hidden_states=None, added_cond_kwargs=added)
        emb = emb + aug if aug is not None else emb
        activation = getattr(self, "time_embed_act", None)
        return activation(emb) if activation is not None else emb


@dataclass(frozen=True)
class Layer:
    """A unit the sensitivity analysis quantizes alone: a convolution or an attention core."""

    name: str  # module path, e.g. unet.up_blocks.1.resnets.0.conv1
    kind: str  # "conv" or "attention"


class QuantizableUnet(nn.Module):
    """The conversion module's UNet (shared, not copied) with a forward torch.fx traces.

    `latent_size` is the (height, width) the module was built for: SPLIT_EINSUM_V2 cuts each
    attention's queries by it. Raises ValueError naming a UNet part this forward does not cover.
    """

    def __init__(self, module: nn.Module, latent_size: tuple[int, int]):
        super().__init__()
        self.unet = cast("UNet2DConditionModel", module.unet)  # the conversion module's diffusers UNet
        self.steps: list[Step] = unet_steps(self.unet)
        self.embed = Embedding(self.unet)
        _check_samplers(self.unet)
        for path, attention in self.unet.named_modules():
            if isinstance(attention, ConvAttention):
                queries = _queries(path, latent_size, len(self.unet.down_blocks))
                head_dim = attention.to_q.out_channels // attention.heads
                core = AttentionCore(attention.heads, head_dim, attention.attention, attention.scale, queries)
                attention.add_module(CORE, core)

    def layers(self) -> list[Layer]:
        """Every convolution of the UNet body and every attention core, in registration order."""
        return [
            Layer(f"unet.{path}" if path else "unet", "conv" if type(child) is nn.Conv2d else "attention")
            for path, child in self.unet.named_modules()
            if type(child) is nn.Conv2d or isinstance(child, AttentionCore)
        ]

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        text_embeds: torch.Tensor | None = None,
        time_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        emb = self.embed(sample, timestep, text_embeds, time_ids)
        skips: list[torch.Tensor] = []
        hidden = sample
        for step in self.steps:
            if step.kind in ("embed", "mid_residual"):
                continue
            modules: list[Any] = [self.unet.get_submodule(path) for path in step.modules]  # by step kind, below
            if step.kind == "conv_in":
                hidden = self.unet.conv_in(hidden)
            elif step.kind == "resnet":
                if step.pop:
                    hidden = torch.cat([hidden, skips.pop()], dim=1)
                hidden = modules[0](hidden, emb)
            elif step.kind == "attention":
                hidden = _transformer(modules[0], hidden, encoder_hidden_states)
            elif step.kind == "downsampler":
                if modules[0].padding == 0:
                    hidden = F.pad(hidden, (0, 1, 0, 1), mode="constant", value=0)
                hidden = modules[0].conv(hidden)
            elif step.kind == "upsampler":
                hidden = modules[0].conv(F.interpolate(hidden, scale_factor=2.0, mode="nearest"))
            else:  # the output head
                for head in modules:
                    hidden = head(hidden)
            if step.push:
                skips.append(hidden)
        return hidden


def _queries(path: str, latent_size: tuple[int, int], levels: int) -> int:
    """Tokens an attention sees: the latent positions at its block's resolution (halved per level)."""
    parts = path.split(".")
    if parts[0] == "down_blocks":
        level = int(parts[1])
    elif parts[0] == "up_blocks":
        level = levels - 1 - int(parts[1])
    else:  # mid_block: the lowest resolution
        level = levels - 1
    return (latent_size[0] >> level) * (latent_size[1] >> level)


def _check_samplers(unet: nn.Module) -> None:
    """The plain convolution samplers SD and SDXL use (nearest x2 then conv; strided conv)."""
    for path, child in unet.named_modules():
        kind = type(child).__name__
        if kind not in ("Upsample2D", "Downsample2D"):
            continue
        plain = child.use_conv and child.norm is None
        if kind == "Upsample2D":
            plain = plain and child.name == "conv" and child.interpolate and not child.use_conv_transpose
        if not plain:
            raise ValueError(f"{path}: this {kind} (norm, transposed or named convolution) cannot be quantized yet")


def _transformer(transformer: ConvTransformer2D, hidden_states: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
    """ConvTransformer2D.forward with the token reshapes written without unpacking shapes."""
    x = transformer.proj_in(transformer.norm(hidden_states))
    batch, channels = x.shape[0], x.shape[1]
    x = x.view(batch, channels, 1, -1)
    for module in transformer.transformer_blocks:
        block = cast(ConvTransformerBlock, module)  # the only block ConvTransformer2D builds
        normed = block.norm1(x)
        x = _attention(block.attn1, normed, normed) + x
        x = _attention(block.attn2, block.norm2(x), context) + x
        x = _feed_forward(block.ff, block.norm3(x)) + x
    x = x.view(batch, channels, hidden_states.shape[2], hidden_states.shape[3])
    return transformer.proj_out(x) + hidden_states


def _attention(attention: ConvAttention, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
    core = getattr(attention, CORE)
    return attention.to_out(core(attention.to_q(x), attention.to_k(context), attention.to_v(context)))


def _feed_forward(ff: GegluFeedForward, x: torch.Tensor) -> torch.Tensor:
    halves = ff.project_in(x).chunk(2, dim=1)
    return ff.project_out(halves[0] * F.gelu(halves[1]))


def opaque_modules(model: QuantizableUnet) -> list[str]:
    """Modules the quantizer treats as leaves: the embedding and every channel layer norm."""
    return [EMBED] + [path for path, child in model.named_modules() if isinstance(child, ChannelLayerNorm)]
