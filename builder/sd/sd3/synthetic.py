"""A diffusers StableDiffusion3Pipeline folder with seeded random weights, from a preset."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from builder.sd.presets import Preset
from builder.sd.sd3.modules import T5_SEQUENCE_LENGTH
from builder.sd.sd3.t5_tokenizer import write_t5_tokenizer
from builder.sd.tokenizer_files import write_tokenizer_folder

if TYPE_CHECKING:
    from diffusers.models.modeling_utils import ModelMixin
    from transformers import PreTrainedModel


def write_sd3_pipeline(
    preset: Preset,
    generator: torch.Generator,
    folder: Path,
    seeded: Callable[[Callable[[], Any], torch.Generator], torch.nn.Module],
) -> None:
    """Write every SD3 component of `preset` into `folder`, drawing weights from `generator` in a fixed
    order (`seeded` is the SD writer's storage-free seeded construction) with one model in memory at a time."""
    from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKL
    from diffusers.models.transformers.transformer_sd3 import SD3Transformer2DModel
    from transformers import CLIPTextModelWithProjection, T5Config, T5EncoderModel

    from builder.sd.synthetic import clip_text_config

    if preset.text_encoder is None or preset.text_encoder_2 is None or preset.transformer is None:
        raise ValueError(f"an sd3 preset needs both CLIP encoders and a transformer: {preset.description}")
    first, second, transformer = preset.text_encoder, preset.text_encoder_2, preset.transformer
    tokenizer = write_tokenizer_folder(folder / "tokenizer")
    tokenizer_2 = write_tokenizer_folder(folder / "tokenizer_2", pad_token="!")
    builders: dict[str, Callable[[], ModelMixin | PreTrainedModel]] = {
        "text_encoder": lambda: CLIPTextModelWithProjection(clip_text_config(first, tokenizer)),
        "text_encoder_2": lambda: CLIPTextModelWithProjection(clip_text_config(second, tokenizer_2)),
    }
    if (t5 := preset.text_encoder_3) is not None:
        vocabulary = write_t5_tokenizer(folder / "tokenizer_3", T5_SEQUENCE_LENGTH)
        config = T5Config(**({"vocab_size": vocabulary, "pad_token_id": 0, "eos_token_id": 1} | t5))
        builders["text_encoder_3"] = lambda: T5EncoderModel(config)
    builders["transformer"] = lambda: SD3Transformer2DModel(**transformer)
    builders["vae"] = lambda: AutoencoderKL(**preset.vae)
    for name, build in builders.items():
        module: Any = seeded(build, generator).eval()
        module.save_pretrained(folder / name, safe_serialization=True)
        del module
    (folder / "scheduler").mkdir(exist_ok=True)
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(preset.scheduler, indent=2, sort_keys=True))
    (folder / "model_index.json").write_text(json.dumps(sd3_model_index(preset), indent=2, sort_keys=True))


def sd3_model_index(preset: Preset) -> dict:
    """model_index.json of a StableDiffusion3Pipeline (T5 and its tokenizer only when the preset has them)."""
    t5 = preset.text_encoder_3 is not None
    return {
        "_class_name": "StableDiffusion3Pipeline",
        "scheduler": ["diffusers", preset.scheduler["_class_name"]],
        "text_encoder": ["transformers", "CLIPTextModelWithProjection"],
        "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
        "text_encoder_3": ["transformers", "T5EncoderModel"] if t5 else [None, None],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "tokenizer_2": ["transformers", "CLIPTokenizer"],
        "tokenizer_3": ["transformers", "T5TokenizerFast"] if t5 else [None, None],
        "transformer": ["diffusers", "SD3Transformer2DModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
