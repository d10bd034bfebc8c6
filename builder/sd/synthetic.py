"""Write a diffusers-format pipeline folder with seeded random weights from a preset.

Weights come from one seeded CPU generator, component by component in a fixed order, so the same
preset and seed give identical tensors on any machine. This is what tests and the default build use
instead of downloading checkpoints.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from builder.sd.presets import Preset
from builder.sd.tokenizer_files import clip_vocab_size, write_tokenizer_folder

# Normal(0, std) for matrices; norms and biases keep their (deterministic) defaults. A small std
# keeps activations in the range real checkpoints have, so float16 behaves as it would for them.
_WEIGHT_STD = 0.02


def _randomize(module: torch.nn.Module, generator: torch.Generator) -> None:
    with torch.no_grad():
        for name, parameter in module.named_parameters():
            if parameter.dim() >= 2:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * _WEIGHT_STD)
            elif name.endswith("bias"):
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * _WEIGHT_STD)


def write_synthetic_pipeline(preset: Preset, seed: int, folder: Path) -> None:
    """Create `folder` as a diffusers folder its family's pipeline loads (SD, SDXL base or refiner)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = write_tokenizer_folder(folder / "tokenizer")
    generator = torch.Generator().manual_seed(seed)

    def text_config(config: dict) -> CLIPTextConfig:
        # Full-size presets keep the real embedding table size; ids past our tokenizer's stay unused.
        return CLIPTextConfig(
            **({"vocab_size": clip_vocab_size()} | config),
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )

    models: dict[str, torch.nn.Module] = {}
    if preset.text_encoder is not None:
        models["text_encoder"] = CLIPTextModel(text_config(preset.text_encoder)).eval()
    if preset.text_encoder_2 is not None:
        models["text_encoder_2"] = CLIPTextModelWithProjection(text_config(preset.text_encoder_2)).eval()
    models["unet"] = UNet2DConditionModel(**preset.unet).eval()
    models["vae"] = AutoencoderKL(**preset.vae).eval()
    for module in models.values():
        _randomize(module, generator)
    for name, module in models.items():
        module.save_pretrained(folder / name, safe_serialization=True)
    if preset.text_encoder_2 is not None:
        write_tokenizer_folder(folder / "tokenizer_2", pad_token="!")
    (folder / "scheduler").mkdir(exist_ok=True)
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(preset.scheduler, indent=2, sort_keys=True))
    (folder / "model_index.json").write_text(json.dumps(_model_index(preset), indent=2, sort_keys=True))


def _model_index(preset: Preset) -> dict:
    """The pipeline's model_index.json: which class loads it and which components it has."""
    common = {
        "scheduler": ["diffusers", preset.scheduler["_class_name"]],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    if preset.family == "sd":
        return common | {
            "_class_name": "StableDiffusionPipeline",
            "feature_extractor": [None, None],
            "requires_safety_checker": False,
            "safety_checker": [None, None],
            "text_encoder": ["transformers", "CLIPTextModel"],
            "tokenizer": ["transformers", "CLIPTokenizer"],
        }
    has_first = preset.text_encoder is not None
    return common | {
        # diffusers' SDXL refiner checkpoint is an image-to-image pipeline without the first encoder
        "_class_name": "StableDiffusionXLImg2ImgPipeline" if preset.requires_aesthetics_score else "StableDiffusionXLPipeline",
        "force_zeros_for_empty_prompt": not preset.requires_aesthetics_score,
        **({"requires_aesthetics_score": True} if preset.requires_aesthetics_score else {}),
        "text_encoder": ["transformers", "CLIPTextModel"] if has_first else [None, None],
        "tokenizer": ["transformers", "CLIPTokenizer"] if has_first else [None, None],
        "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
        "tokenizer_2": ["transformers", "CLIPTokenizer"],
    }
