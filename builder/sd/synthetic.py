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
    """Create `folder` as a StableDiffusionPipeline-loadable diffusers folder."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = write_tokenizer_folder(folder / "tokenizer")
    generator = torch.Generator().manual_seed(seed)

    # Full-size presets keep the real embedding table size; ids past our tokenizer's stay unused.
    text_config = CLIPTextConfig(
        **({"vocab_size": clip_vocab_size()} | preset.text_encoder),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    text_encoder = CLIPTextModel(text_config).eval()
    unet = UNet2DConditionModel(**preset.unet).eval()
    vae = AutoencoderKL(**preset.vae).eval()
    for module in (text_encoder, unet, vae):
        _randomize(module, generator)

    text_encoder.save_pretrained(folder / "text_encoder", safe_serialization=True)
    unet.save_pretrained(folder / "unet", safe_serialization=True)
    vae.save_pretrained(folder / "vae", safe_serialization=True)
    (folder / "scheduler").mkdir(exist_ok=True)
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(preset.scheduler, indent=2, sort_keys=True))
    index = {
        "_class_name": "StableDiffusionPipeline",
        "feature_extractor": [None, None],
        "requires_safety_checker": False,
        "safety_checker": [None, None],
        "scheduler": ["diffusers", preset.scheduler["_class_name"]],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    (folder / "model_index.json").write_text(json.dumps(index, indent=2, sort_keys=True))
