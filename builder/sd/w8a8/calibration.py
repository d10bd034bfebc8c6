"""Calibration samples: the UNet inputs of guided denoising trajectories, one per prompt and step.

As Apple's activation quantization records them from its pipeline: each prompt is encoded by the
model's own text encoder(s) (`builder.sd.conditioning`), denoised from seeded latents with the
pipeline's scheduler and classifier-free guidance, and every step's UNet call (batch 2:
unconditional, then conditional) is kept. The UNet is the conversion module with float16 weights,
the float model the quantized one is measured against.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from builder.sd.conditioning import UNET_TEXT_INPUTS, TextConditioning, TextEncoder

GUIDANCE_SCALE = 7.5
SAMPLES_FILE = "calibration.safetensors"
_INPUT_NAMES = ("sample", "timestep", *UNET_TEXT_INPUTS)


@torch.no_grad()
def record_samples(
    unet: nn.Module,
    pipeline: Path,
    family: str,
    latent_size: tuple[int, int],
    prompts: list[str],
    steps: int,
    seed: int,
    encoders: Mapping[str, TextEncoder] | None = None,
) -> dict[str, torch.Tensor]:
    """Every UNet input of the trajectories, stacked: name -> (prompts * steps, 2, ...). `encoders`
    replace the pipeline folder's text encoders (LoRA-fused ones)."""
    import diffusers

    conditioning = TextConditioning(pipeline, family, latent_size, encoders)
    config = json.loads((pipeline / "scheduler" / "scheduler_config.json").read_text())
    scheduler = getattr(diffusers, config["_class_name"]).from_config(config)
    conversion: Any = unet  # the rewrite's UNet conversion module: its diffusers UNet is `.unet`
    channels: int = conversion.unet.config.in_channels
    recorded: dict[str, list[torch.Tensor]] = {name: [] for name in _INPUT_NAMES}
    for prompt in prompts:
        text = conditioning.guided([prompt])
        generator = torch.Generator().manual_seed(seed)  # every prompt from the same noise, as Apple's does
        latents = torch.randn((1, channels, *latent_size), generator=generator)
        scheduler.set_timesteps(steps)
        latents = latents * scheduler.init_noise_sigma
        for t in scheduler.timesteps:
            sample = scheduler.scale_model_input(torch.cat([latents, latents]), t)
            inputs = {"sample": sample, "timestep": torch.full((2,), float(t))} | text
            for name, value in inputs.items():
                recorded[name].append(value)
            noise = unet(*(inputs[name] for name in _INPUT_NAMES if name in inputs))
            unconditional, conditional = noise.chunk(2)
            noise = unconditional + GUIDANCE_SCALE * (conditional - unconditional)
            latents = scheduler.step(noise, t, latents).prev_sample
    return {name: torch.stack(values).contiguous() for name, values in recorded.items() if values}


def save_samples(samples: dict[str, torch.Tensor], out: Path) -> None:
    save_file(samples, out / SAMPLES_FILE)


def load_samples(folder: Path) -> list[tuple[torch.Tensor, ...]]:
    """The samples in recording order, each as the UNet's positional inputs."""
    stacked = load_file(folder / SAMPLES_FILE)
    names = [name for name in _INPUT_NAMES if name in stacked]
    return [tuple(stacked[name][index] for name in names) for index in range(len(stacked["sample"]))]
