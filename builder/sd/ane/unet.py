"""rewrite_unet: a diffusers UNet with its transformers rewritten for the Neural Engine.

Only the attention parts change: each Transformer2DModel becomes a ConvTransformer2D holding the
same weights as 1x1 convolutions. ResNets, up/down sampling and the time embedding are already
convolutions (or tiny) and stay diffusers modules in the (B, C, H, W) layout. The result's
structure depends only on the UNet config and the attention implementation, so the trace stage
can rebuild it from `UNet2DConditionModel.from_config(config)` and load saved weights into it.
"""

from __future__ import annotations

import torch
from diffusers.models.modeling_utils import ModelMixin
from diffusers.models.transformers.transformer_2d import Transformer2DModel
from diffusers.models.unets.unet_2d_condition import UNet2DConditionModel
from torch import nn

from builder.recipe.enums import Attention
from builder.sd.ane.support import check_no_other_attention, check_transformer, check_unet
from builder.sd.ane.transformer import ConvTransformer2D
from builder.sd.ane.weights import conv_state_dict


class NeuralEngineUnetModule(nn.Module):
    """UNet called as the Swift package calls it: text states (B, C, 1, S) in, noise prediction out.

    The diffusers UNet only forwards the text states to its transformers, which take them in this
    layout, so they reach the attention without a transpose. SDXL UNets (addition_embed_type
    "text_time") also take the pooled text embedding `text_embeds` and the micro-conditioning
    `time_ids`, which diffusers reads from added_cond_kwargs.
    """

    def __init__(self, unet: UNet2DConditionModel):
        super().__init__()
        self.unet = unet

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        text_embeds: torch.Tensor | None = None,
        time_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        added = None if text_embeds is None else {"text_embeds": text_embeds, "time_ids": time_ids}
        return self.unet(sample, timestep, encoder_hidden_states, added_cond_kwargs=added, return_dict=False)[0]


def rewrite_unet(unet: UNet2DConditionModel, attention: str) -> NeuralEngineUnetModule:
    """Rewrite `unet` in place for the Neural Engine and wrap it for conversion.

    `attention` is ORIGINAL, SPLIT_EINSUM or SPLIT_EINSUM_V2. Everything is checked before anything
    changes: an unsupported model raises ValueError naming the config key and is left intact. The
    rewritten transformers share the original weights' memory (no copy of the UNet is made).
    """
    rewrite_transformers(unet, attention)
    return NeuralEngineUnetModule(unet)


def rewrite_transformers(model: ModelMixin, attention: str) -> None:
    """Swap every Transformer2DModel of a UNet-like `model` (a UNet or a ControlNet) for a
    ConvTransformer2D with `attention`, after checking all of them: nothing changes if one is refused."""
    implementation = _implementation(attention)
    check_unet(model)
    transformers = {name: m for name, m in model.named_modules() if isinstance(m, Transformer2DModel)}
    for name, transformer in transformers.items():
        check_transformer(name, transformer)
    check_no_other_attention(model, set(transformers))
    for name, transformer in transformers.items():
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, conv_transformer(transformer, implementation))


def conv_transformer(transformer: Transformer2DModel, attention: Attention) -> ConvTransformer2D:
    """A ConvTransformer2D holding `transformer`'s weights (checked by `check_transformer`)."""
    config = transformer.config
    # Built without storage, then given views of the diffusers weights: no initialisation, no copy.
    with torch.device("meta"):
        rewritten = ConvTransformer2D(
            in_channels=config["in_channels"],
            heads=config["num_attention_heads"],
            head_dim=config["attention_head_dim"],
            num_layers=config["num_layers"],
            context_dim=config["cross_attention_dim"],
            norm_num_groups=config["norm_num_groups"],
            attention_bias=config["attention_bias"],
            norm_eps=config["norm_eps"],
            norm_elementwise_affine=config["norm_elementwise_affine"],
            attention=attention,
        )
    rewritten.load_state_dict(conv_state_dict(transformer.state_dict()), strict=True, assign=True)
    return rewritten.train(transformer.training)


def _implementation(attention: str) -> Attention:
    try:
        return Attention(attention)
    except ValueError:
        choices = ", ".join(a.value for a in Attention)
        raise ValueError(f"unknown attention implementation {attention!r}; choose one of {choices}") from None
