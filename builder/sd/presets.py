"""Synthetic pipeline presets: the real Stable Diffusion architectures, optionally scaled down.

A preset is only configuration; `synthetic.py` turns it into weights. Small presets keep every
architectural feature the converter must handle (cross-attention at three levels, three
downsamplings, CLIP causal text encoder, VAE with the real 8x factor) while converting in seconds.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict

from builder.errors import UserError


class Preset(BaseModel):
    """Configs of one synthetic pipeline, in diffusers/transformers keyword form."""

    model_config = ConfigDict(frozen=True)

    family: str
    description: str
    text_encoder: dict[str, Any] | None  # CLIPTextModel (CLIPTextModelWithProjection in sd3); None in SDXL refiners
    unet: dict[str, Any] | None  # None in sd3, which denoises with `transformer`
    vae: dict[str, Any]
    scheduler: dict[str, Any]
    transformer: dict[str, Any] | None = None  # sd3: SD3Transformer2DModel (the MMDiT)
    text_encoder_3: dict[str, Any] | None = None  # sd3: T5EncoderModel
    text_encoder_2: dict[str, Any] | None = None  # SDXL's CLIPTextModelWithProjection
    requires_aesthetics_score: bool = False  # SDXL refiner: time_ids end with an aesthetic score (5, not 6)
    # StableDiffusionSafetyChecker's CLIPConfig (text_config, vision_config, projection_dim); None: the
    # pipeline ships without one, as SD 2.x does
    safety_checker: dict[str, Any] | None = None


_SD_SCHEDULER = {
    "_class_name": "PNDMScheduler",
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "clip_sample": False,
}

_SD_VAE = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [128, 256, 512, 512],
    "layers_per_block": 2,
    "latent_channels": 4,
    "norm_num_groups": 32,
    "sample_size": 512,
    "scaling_factor": 0.18215,
}
_SD_UNET = {
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
    "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
    "block_out_channels": [320, 640, 1280, 1280],
    "layers_per_block": 2,
    "norm_num_groups": 32,
}

# diffusers' SDXL 1.0 configs (stabilityai/stable-diffusion-xl-base-1.0 and -refiner-1.0).
_SDXL_SCHEDULER = {
    "_class_name": "EulerDiscreteScheduler",
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "interpolation_type": "linear",
    "prediction_type": "epsilon",
    "sample_max_value": 1.0,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "use_karras_sigmas": False,
    "clip_sample": False,
}
# Same architecture as SD's VAE; it overflows in float16 (hence force_upcast), and a smaller scale.
_SDXL_VAE = _SD_VAE | {"sample_size": 1024, "scaling_factor": 0.13025, "force_upcast": True}
_SDXL_TEXT_ENCODER = {  # CLIP ViT-L/14
    "vocab_size": 49408,
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
    "projection_dim": 768,
}
_SDXL_TEXT_ENCODER_2 = {  # OpenCLIP ViT-bigG/14, with its text projection
    "vocab_size": 49408,
    "hidden_size": 1280,
    "intermediate_size": 5120,
    "num_hidden_layers": 32,
    "num_attention_heads": 20,
    "max_position_embeddings": 77,
    "hidden_act": "gelu",
    "projection_dim": 1280,
}
# text_time conditioning: projection_class_embeddings_input_dim = pooled text width (text_encoder_2's
# projection_dim) + len(time_ids) * addition_time_embed_dim; time_ids has 6 entries (base) or 5 (refiner).
_SDXL_UNET_COMMON = {
    "sample_size": 128,
    "in_channels": 4,
    "out_channels": 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "use_linear_projection": True,
    "upcast_attention": None,
    "addition_embed_type": "text_time",
    "addition_embed_type_num_heads": 64,
    "addition_time_embed_dim": 256,
}
_TINY_TEXT_ENCODER_2 = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "max_position_embeddings": 77,
    "hidden_act": "gelu",
    "projection_dim": 48,  # differs from hidden_size so the pooled width is checked to come from the projection
}
_TINY_VAE = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [16, 16, 32, 32],
    "layers_per_block": 1,
    "latent_channels": 4,
    "norm_num_groups": 8,
    "sample_size": 128,
}
# The safety checker's CLIP text tower is never run (only the vision tower, its projection and the
# concept embeddings are), but its config is part of the saved CLIPConfig.
_SD_SAFETY_CHECKER = {
    "text_config": {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12},
    "vision_config": {
        "hidden_size": 1024,
        "intermediate_size": 4096,
        "num_hidden_layers": 24,
        "num_attention_heads": 16,
        "image_size": 224,
        "patch_size": 14,
    },
    "projection_dim": 768,
}

# Mid-size presets: the full models' channel widths, head sizes and text widths (so every size rule
# the full model meets is met: per-channel vectors of the 2560- and 1920-channel skip concatenations
# above the palettization threshold, 1280-wide attention, 1024/2048-wide cross-attention), with one
# layer per block and per text encoder, so a whole build with compression and verify fits in the tests.
_MID_VAE = _SD_VAE | {"layers_per_block": 1}

PRESETS: dict[str, Preset] = {
    "tiny-sd": Preset(
        family="sd",
        description="SD 1.x architecture scaled down (4 UNet levels, 2-layer CLIP, 8x VAE); converts in seconds",
        text_encoder={
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "max_position_embeddings": 77,
            "hidden_act": "quick_gelu",
            "projection_dim": 32,
        },
        unet={
            "sample_size": 16,
            "in_channels": 4,
            "out_channels": 4,
            "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
            "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
            "block_out_channels": [32, 32, 64, 64],
            "layers_per_block": 1,
            "cross_attention_dim": 32,
            "attention_head_dim": 4,
            "norm_num_groups": 8,
        },
        vae=_TINY_VAE | {"scaling_factor": 0.18215},
        scheduler=_SD_SCHEDULER,
        # 224-pixel input as the Swift package expects, in 32-pixel patches (50 tokens) to stay small
        safety_checker={
            "text_config": {
                "hidden_size": 32,
                "intermediate_size": 64,
                "num_hidden_layers": 1,
                "num_attention_heads": 4,
            },
            "vision_config": {
                "hidden_size": 32,
                "intermediate_size": 64,
                "num_hidden_layers": 2,
                "num_attention_heads": 4,
                "image_size": 224,
                "patch_size": 32,
            },
            "projection_dim": 32,
        },
    ),
    "sd-1-5": Preset(
        family="sd",
        description="Full-size SD 1.5 architecture (CLIP ViT-L/14 text encoder, 860M-parameter UNet)",
        text_encoder={
            "vocab_size": 49408,
            "hidden_size": 768,
            "intermediate_size": 3072,
            "num_hidden_layers": 12,
            "num_attention_heads": 12,
            "max_position_embeddings": 77,
            "hidden_act": "quick_gelu",
            "projection_dim": 768,
        },
        unet=_SD_UNET | {"cross_attention_dim": 768, "attention_head_dim": 8},
        vae=_SD_VAE,
        scheduler=_SD_SCHEDULER,
        safety_checker=_SD_SAFETY_CHECKER,
    ),
    "sd-2-1-base": Preset(
        family="sd",
        description="Full-size SD 2.1 base architecture (OpenCLIP ViT-H text encoder, linear projections)",
        text_encoder={
            "vocab_size": 49408,
            "hidden_size": 1024,
            "intermediate_size": 4096,
            "num_hidden_layers": 23,
            "num_attention_heads": 16,
            "max_position_embeddings": 77,
            "hidden_act": "gelu",
            "projection_dim": 512,
        },
        unet=_SD_UNET
        | {"cross_attention_dim": 1024, "attention_head_dim": [5, 10, 20, 20], "use_linear_projection": True},
        vae=_SD_VAE,
        scheduler=_SD_SCHEDULER,
    ),
    "tiny-sd2": Preset(
        family="sd",
        description="SD 2.x architecture scaled down (linear projections, per-level head counts, gelu CLIP); "
        "converts in seconds",
        text_encoder={
            "hidden_size": 48,
            "intermediate_size": 96,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "max_position_embeddings": 77,
            "hidden_act": "gelu",
            "projection_dim": 32,
        },
        unet={
            "sample_size": 16,
            "in_channels": 4,
            "out_channels": 4,
            "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
            "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
            "block_out_channels": [32, 32, 64, 64],
            "layers_per_block": 1,
            "cross_attention_dim": 48,
            "attention_head_dim": [2, 4, 8, 8],  # SD 2.x configs give head counts per level here
            "use_linear_projection": True,
            "norm_num_groups": 8,
        },
        vae=_TINY_VAE | {"scaling_factor": 0.18215},
        scheduler=_SD_SCHEDULER,
    ),
    "tiny-sdxl": Preset(
        family="sdxl",
        description="SDXL base architecture scaled down (two CLIP encoders, 3-level UNet with text_time "
        "conditioning, attention on the lower two levels, 2-layer transformers at the bottom); converts in seconds",
        text_encoder={
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 3,
            "num_attention_heads": 4,
            "max_position_embeddings": 77,
            "hidden_act": "quick_gelu",
            "projection_dim": 32,
        },
        text_encoder_2=_TINY_TEXT_ENCODER_2,
        unet={
            "sample_size": 16,
            "in_channels": 4,
            "out_channels": 4,
            "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
            "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
            "block_out_channels": [32, 64, 64],
            "layers_per_block": 1,
            "transformer_layers_per_block": [1, 1, 2],
            "attention_head_dim": [2, 4, 4],
            "cross_attention_dim": 32 + 64,
            "norm_num_groups": 8,
            "use_linear_projection": True,
            "upcast_attention": None,
            "addition_embed_type": "text_time",
            "addition_time_embed_dim": 8,
            "projection_class_embeddings_input_dim": 48 + 6 * 8,
        },
        vae=_TINY_VAE | {"scaling_factor": 0.13025, "force_upcast": True},
        scheduler=_SDXL_SCHEDULER,
    ),
    "tiny-sdxl-refiner": Preset(
        family="sdxl",
        description="SDXL refiner architecture scaled down (second CLIP encoder only, 4-level UNet, "
        "time_ids with an aesthetic score); converts in seconds",
        text_encoder=None,
        text_encoder_2=_TINY_TEXT_ENCODER_2,
        unet={
            "sample_size": 16,
            "in_channels": 4,
            "out_channels": 4,
            "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
            "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
            "block_out_channels": [32, 64, 64, 64],
            "layers_per_block": 1,
            "transformer_layers_per_block": 2,
            "attention_head_dim": [2, 4, 4, 4],
            "cross_attention_dim": 64,
            "norm_num_groups": 8,
            "use_linear_projection": True,
            "upcast_attention": None,
            "addition_embed_type": "text_time",
            "addition_time_embed_dim": 8,
            "projection_class_embeddings_input_dim": 48 + 5 * 8,
        },
        vae=_TINY_VAE | {"scaling_factor": 0.13025, "force_upcast": True},
        scheduler=_SDXL_SCHEDULER,
        requires_aesthetics_score=True,
    ),
    "sdxl-base": Preset(
        family="sdxl",
        description="Full-size SDXL 1.0 base architecture (CLIP ViT-L + OpenCLIP ViT-bigG, 2.6B-parameter UNet)",
        text_encoder=_SDXL_TEXT_ENCODER,
        text_encoder_2=_SDXL_TEXT_ENCODER_2,
        unet=_SDXL_UNET_COMMON
        | {
            "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
            "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
            "block_out_channels": [320, 640, 1280],
            "transformer_layers_per_block": [1, 2, 10],
            "attention_head_dim": [5, 10, 20],
            "cross_attention_dim": 2048,
            "projection_class_embeddings_input_dim": 2816,
        },
        vae=_SDXL_VAE,
        scheduler=_SDXL_SCHEDULER,
    ),
    "mid-sd": Preset(
        family="sd",
        description="SD 2.1 base widths (320/640/1280 UNet, 1024-wide OpenCLIP text, 512-wide VAE) with one "
        "layer per block and one text layer: meets every size rule of the full model at a fraction of its size",
        text_encoder={
            "vocab_size": 49408,
            "hidden_size": 1024,
            "intermediate_size": 4096,
            "num_hidden_layers": 1,
            "num_attention_heads": 16,
            "max_position_embeddings": 77,
            "hidden_act": "gelu",
            "projection_dim": 512,
        },
        unet=_SD_UNET
        | {
            "layers_per_block": 1,
            "cross_attention_dim": 1024,
            "attention_head_dim": [5, 10, 20, 20],
            "use_linear_projection": True,
        },
        vae=_MID_VAE,
        scheduler=_SD_SCHEDULER,
    ),
    "mid-sdxl": Preset(
        family="sdxl",
        description="SDXL base widths (320/640/1280 UNet, CLIP-L + OpenCLIP-bigG text widths) with one layer per "
        "block, one transformer per attention and one text layer per encoder",
        text_encoder=_SDXL_TEXT_ENCODER | {"num_hidden_layers": 1},
        text_encoder_2=_SDXL_TEXT_ENCODER_2 | {"num_hidden_layers": 1},
        unet=_SDXL_UNET_COMMON
        | {
            "layers_per_block": 1,
            "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
            "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
            "block_out_channels": [320, 640, 1280],
            "transformer_layers_per_block": 1,
            "attention_head_dim": [5, 10, 20],
            "cross_attention_dim": 2048,
            "projection_class_embeddings_input_dim": 2816,
        },
        vae=_SDXL_VAE | {"layers_per_block": 1},
        scheduler=_SDXL_SCHEDULER,
    ),
    "sdxl-refiner": Preset(
        family="sdxl",
        description="Full-size SDXL 1.0 refiner architecture (OpenCLIP ViT-bigG only, 4-level UNet)",
        text_encoder=None,
        text_encoder_2=_SDXL_TEXT_ENCODER_2,
        unet=_SDXL_UNET_COMMON
        | {
            "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
            "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
            "block_out_channels": [384, 768, 1536, 1536],
            "transformer_layers_per_block": 4,
            "attention_head_dim": [6, 12, 24, 24],
            "cross_attention_dim": 1280,
            "projection_class_embeddings_input_dim": 2560,
        },
        vae=_SDXL_VAE,
        scheduler=_SDXL_SCHEDULER,
        requires_aesthetics_score=True,
    ),
}


# SD3 (stabilityai/stable-diffusion-3-medium-diffusers): CLIP-L and CLIP-G with projections, T5-XXL,
# the MMDiT (SD3Transformer2DModel) and a 16-channel VAE without quant convolutions, flow-matching scheduler.
_SD3_SCHEDULER = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0}
_SD3_VAE = _SD_VAE | {
    "latent_channels": 16,
    "sample_size": 1024,
    "scaling_factor": 1.5305,
    "shift_factor": 0.0609,
    "use_quant_conv": False,
    "use_post_quant_conv": False,
}
# The MMDiT's text width (joint_attention_dim) is T5's; the CLIP hidden states are zero-padded to it.
_TINY_SD3_TEXT_WIDTH = 128
SD3_PRESETS: dict[str, Preset] = {
    "tiny-sd3": Preset(
        family="sd3",
        description="SD3 architecture scaled down (two CLIP encoders with projections, 2-layer T5, 2-block "
        "MMDiT, 16-channel VAE); converts in seconds",
        text_encoder={
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "max_position_embeddings": 77,
            "hidden_act": "quick_gelu",
            "projection_dim": 32,
        },
        text_encoder_2=_TINY_TEXT_ENCODER_2,
        text_encoder_3={
            "d_model": _TINY_SD3_TEXT_WIDTH,
            "d_kv": 16,
            "d_ff": 256,
            "num_layers": 2,
            "num_heads": 4,
            "relative_attention_num_buckets": 32,
            "relative_attention_max_distance": 128,
            "feed_forward_proj": "gated-gelu",
            "layer_norm_epsilon": 1e-6,
        },
        unet=None,
        transformer={
            "sample_size": 16,
            "patch_size": 2,
            "in_channels": 16,
            "out_channels": 16,
            "num_layers": 2,
            "attention_head_dim": 8,
            "num_attention_heads": 4,
            "joint_attention_dim": _TINY_SD3_TEXT_WIDTH,
            "caption_projection_dim": 32,  # = heads x head size: text and image tokens attend jointly
            "pooled_projection_dim": 32 + 48,  # both encoders' projections
            "pos_embed_max_size": 32,
        },
        vae=_TINY_VAE
        | {"latent_channels": 16, "scaling_factor": 1.5305, "shift_factor": 0.0609}
        | {"use_quant_conv": False, "use_post_quant_conv": False},
        scheduler=_SD3_SCHEDULER,
    ),
    "sd3-medium": Preset(
        family="sd3",
        description="Full-size SD3 medium architecture (CLIP-L + CLIP-G, 2B-parameter MMDiT, 16-channel VAE) "
        "without T5, as the Swift pipeline allows: seeded T5-XXL weights alone would take 19 GB",
        text_encoder=_SDXL_TEXT_ENCODER,
        text_encoder_2=_SDXL_TEXT_ENCODER_2,
        unet=None,
        transformer={
            "sample_size": 128,
            "patch_size": 2,
            "in_channels": 16,
            "out_channels": 16,
            "num_layers": 24,
            "attention_head_dim": 64,
            "num_attention_heads": 24,
            "joint_attention_dim": 4096,
            "caption_projection_dim": 1536,
            "pooled_projection_dim": 2048,
            "pos_embed_max_size": 192,
        },
        vae=_SD3_VAE,
        scheduler=_SD3_SCHEDULER,
    ),
}

PRESETS |= SD3_PRESETS


def get_preset(name: str) -> Preset:
    """Look a preset up by name, failing with the list of known ones."""
    try:
        return PRESETS[name]
    except KeyError:
        raise UserError(
            f"unknown synthetic preset '{name}'", hint=f"use one of: {', '.join(sorted(PRESETS))}"
        ) from None


# ControlNetModel configs for the synthetic pipelines' UNets: the UNet's down half and mid block, plus
# the conditioning image encoder (its 4 widths mean 3 stride-2 steps: the image's 8x down to latents).
_CONTROLNET_KEYS = (
    "in_channels",
    "down_block_types",
    "block_out_channels",
    "layers_per_block",
    "cross_attention_dim",
    "attention_head_dim",
    "norm_num_groups",
    "use_linear_projection",
)
CONTROLNET_PRESETS: dict[str, dict[str, Any]] = {
    "tiny-sd": {k: v for k, v in (PRESETS["tiny-sd"].unet or {}).items() if k in _CONTROLNET_KEYS}
    | {"conditioning_embedding_out_channels": [8, 8, 16, 16]},
    "sd-1-5": {k: v for k, v in (PRESETS["sd-1-5"].unet or {}).items() if k in _CONTROLNET_KEYS}
    | {"conditioning_embedding_out_channels": [16, 32, 96, 256]},
}
"""Synthetic ControlNets, named after the synthetic pipeline whose UNet each one fits."""


def get_controlnet_preset(name: str) -> dict[str, Any]:
    """A ControlNet preset by name, failing with the list of known ones."""
    try:
        return CONTROLNET_PRESETS[name]
    except KeyError:
        raise UserError(
            f"unknown synthetic ControlNet preset '{name}'", hint=f"use one of: {', '.join(sorted(CONTROLNET_PRESETS))}"
        ) from None
