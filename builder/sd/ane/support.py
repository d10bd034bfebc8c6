"""Which diffusers UNets the Neural Engine rewrite reproduces exactly; everything else is refused.

Each check names the config key to change, so an unsupported model fails before any weights move
instead of converting into a model that silently computes something else.
"""

from __future__ import annotations

from typing import Any

from diffusers.models.attention_processor import Attention, AttnProcessor, AttnProcessor2_0
from diffusers.models.modeling_utils import ModelMixin
from diffusers.models.transformers.transformer_2d import Transformer2DModel

# UNet config values the rewritten UNet's (sample, timestep, encoder_hidden_states) call supports.
_UNET_REQUIRED: dict[str, Any] = {
    "encoder_hid_dim_type": None,  # projects the text states inside the UNet, in the (B, S, C) layout
    # None, or SDXL's "text_time" (text_embeds and time_ids inputs); others need inputs not offered
    "addition_embed_type": (None, "text_time"),
    "class_embed_type": None,  # needs class_labels
    "num_class_embeds": None,  # needs class_labels
    "time_cond_proj_dim": None,  # needs timestep_cond
    "dual_cross_attention": False,  # slices the text states along the token axis
    "cross_attention_norm": None,  # normalises the text states in the (B, S, C) layout
}

# Transformer2DModel config values ConvTransformer2D reproduces.
_TRANSFORMER_REQUIRED: dict[str, Any] = {
    "num_vector_embeds": None,  # discrete (VQ token) input
    "patch_size": None,  # patch-embedded input
    "norm_type": "layer_norm",
    "num_embeds_ada_norm": None,
    "only_cross_attention": False,
    "double_self_attention": False,
    "upcast_attention": False,  # float32 scores in float16 runs; a float16 Core ML model would not honour it
    "attention_type": "default",
    "activation_fn": "geglu",
    "out_channels": None,
}

# Boolean Transformer2DModel settings that diffusers treats as off when a config gives null.
_NONE_MEANS_FALSE = {"upcast_attention", "only_cross_attention", "double_self_attention"}


def _refuse(where: str, key: str, value: Any, expected: Any) -> ValueError:
    return ValueError(
        f"{where}: config {key}={value!r} is not supported by the Neural Engine UNet rewrite (supported: {expected!r})"
    )


def check_unet(unet: ModelMixin) -> None:
    """Refuse UNet-level settings whose inputs or text-state handling the rewrite does not offer."""
    for key, expected in _UNET_REQUIRED.items():
        allowed = expected if isinstance(expected, tuple) else (expected,)
        value = unet.config.get(key, allowed[0])
        if value not in allowed:
            raise _refuse("UNet", key, value, expected)


def check_transformer(name: str, transformer: Transformer2DModel) -> None:
    """Refuse a Transformer2DModel whose configuration or attention processors change the math."""
    config = transformer.config
    for key, expected in _TRANSFORMER_REQUIRED.items():
        value = config.get(key, expected)
        if key in _NONE_MEANS_FALSE and value is None:  # e.g. SDXL's config says upcast_attention: null
            value = False
        if value != expected:
            raise _refuse(name, key, config[key], expected)
    if config["cross_attention_dim"] is None:
        raise _refuse(name, "cross_attention_dim", None, "the text states' channel count")
    for path, module in transformer.named_modules():
        if not isinstance(module, Attention):
            continue
        if module.heads != config["num_attention_heads"]:
            raise _refuse(f"{name}.{path}", "num_attention_heads", module.heads, config["num_attention_heads"])
        if not isinstance(module.processor, (AttnProcessor, AttnProcessor2_0)):
            raise ValueError(
                f"{name}.{path}: attention processor {type(module.processor).__name__} is not supported by the "
                "Neural Engine rewrite (supported: diffusers' default processor); remove adapters that install one"
            )


def check_no_other_attention(unet: ModelMixin, rewritten: set[str]) -> None:
    """Refuse attention outside the transformers being rewritten (e.g. SimpleCrossAttn blocks)."""
    for path, module in unet.named_modules():
        if isinstance(module, Attention) and not any(path.startswith(f"{name}.") for name in rewritten):
            raise ValueError(
                f"{path}: {_block_type(unet, path)} has attention the Neural Engine rewrite does not cover; "
                "use blocks whose attention is a Transformer2DModel (CrossAttn*Block2D, UNetMidBlock2DCrossAttn)"
            )


def _block_type(unet: ModelMixin, path: str) -> str:
    """The config key and value that created the block at `path`."""
    parts = path.split(".")
    if parts[0] in ("down_blocks", "up_blocks"):
        key = f"{parts[0][:-1]}_types"
        return f"config {key}[{parts[1]}]={unet.config[key][int(parts[1])]!r}"
    if parts[0] == "mid_block":
        return f"config mid_block_type={unet.config['mid_block_type']!r}"
    return f"module {parts[0]!r}"
