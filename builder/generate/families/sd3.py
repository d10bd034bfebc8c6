"""Stable Diffusion 3 (`StableDiffusion3Pipeline`): text, or an image, to image through the bundle's MMDiT.

The prompt is encoded as `StableDiffusion3Pipeline.swift` assembles it from the bundle's models:
CLIP-L's and CLIP-G's hidden states side by side, zero-padded to T5's width, then T5's 77 token
states after them on the token axis (zeros when the bundle ships no TextEncoderT5, as diffusers does
without T5); the pooled state is CLIP-L's pooled state followed by CLIP-G's. The unconditional half
is the empty prompt encoded the same way. The flow-matching scheduler is the pipeline folder's (with
its shift), its timesteps (0-1000) are the MMDiT's `timestep` input as the bundle declares it, and
the decoder takes latents / scale + shift (the manifest's factors).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from builder.errors import UserError
from builder.generate.backend import LazyModels
from builder.generate.built import BuiltBundle
from builder.generate.families.common import image_latents, text_encoder
from builder.generate.request import OnStep, Request
from builder.generate.sampling import call_in_batches, load_scheduler
from builder.sd.components import TEXT_SEQUENCE_LENGTH
from builder.sd.sd3.modules import T5_SEQUENCE_LENGTH

MMDIT = "MultiModalDiffusionTransformer"
T5 = "TextEncoderT5"


def _refuse_unsupported(bundle: BuiltBundle, request: Request) -> None:
    if request.control_images:
        raise UserError(
            f"--control-image given, but {bundle.path} (sd3) has no ControlNet", hint="drop --control-image"
        )


class PromptEncoder:
    """A prompt to (token-level states (1, C, 1, S), pooled states (1, P, 1, 1)) as the MMDiT takes them."""

    def __init__(self, bundle: BuiltBundle, models: LazyModels, pipeline: Path):
        from transformers import AutoTokenizer, CLIPTokenizer

        self.clip = [
            (CLIPTokenizer.from_pretrained(pipeline / folder), text_encoder(bundle, models, name))
            for name, folder in (("TextEncoder", "tokenizer"), ("TextEncoder2", "tokenizer_2"))
        ]
        self.t5 = (AutoTokenizer.from_pretrained(pipeline / "tokenizer_3"), models[T5]) if T5 in models else None
        tokens = next(i.shape for i in bundle.manifest.models[MMDIT].inputs if i.name == "token_level_text_embeddings")
        self.width, self.length = tokens[1], tokens[3]  # T5's width; CLIP's 77 tokens + T5's

    def __call__(self, prompt: str) -> tuple[torch.Tensor, torch.Tensor]:
        hidden, pooled = [], []
        for tokenizer, encode in self.clip:
            ids = tokenizer(
                prompt, padding="max_length", max_length=TEXT_SEQUENCE_LENGTH, truncation=True, return_tensors="pt"
            ).input_ids
            states, pool = encode(ids)
            hidden.append(states)
            pooled.append(pool)
        clip = torch.cat(hidden, dim=-1)  # (1, 77, C_L + C_G)
        clip = torch.nn.functional.pad(clip, (0, self.width - clip.shape[-1])).transpose(1, 2).unsqueeze(2)
        if self.t5 is None:
            t5 = torch.zeros(1, self.width, 1, self.length - clip.shape[-1])
        else:
            tokenizer, model = self.t5
            ids = tokenizer(
                prompt, padding="max_length", max_length=T5_SEQUENCE_LENGTH, truncation=True, return_tensors="pt"
            ).input_ids
            t5 = model({"input_ids": ids.to(torch.float32)})["encoder_hidden_states"]
        return torch.cat([clip, t5], dim=-1), torch.cat(pooled, dim=-1)[..., None, None]


def _timesteps(scheduler: Any, steps: int, pipeline: Path, latent_shape: tuple[int, ...]) -> torch.Tensor:
    """The scheduler's timesteps for `steps`; with dynamic shifting, its shift for this image's token
    count as diffusers' SD3 pipeline computes it."""
    if not scheduler.config.get("use_dynamic_shifting", False):
        scheduler.set_timesteps(steps)
        return scheduler.timesteps
    from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import calculate_shift

    patch = int(json.loads((pipeline / "transformer" / "config.json").read_text())["patch_size"])
    config = scheduler.config
    mu = calculate_shift(
        (latent_shape[-2] // patch) * (latent_shape[-1] // patch),
        config.get("base_image_seq_len", 256),
        config.get("max_image_seq_len", 4096),
        config.get("base_shift", 0.5),
        config.get("max_shift", 1.16),
    )
    scheduler.set_timesteps(steps, mu=mu)
    return scheduler.timesteps


def _from_image(
    bundle: BuiltBundle,
    models: LazyModels,
    request: Request,
    scheduler: Any,
    timesteps: torch.Tensor,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Image to image as diffusers' SD3 pipeline does it: the image's shifted and scaled latents, moved
    along the flow to the first of the last `strength` share of the steps (rounded up, unlike the
    UNet pipelines' rule)."""
    shift = bundle.manifest.latent_shift_factor or 0.0
    latents = image_latents(bundle, models, request, generator, shift)
    skipped = int(max(len(timesteps) - len(timesteps) * request.strength, 0)) * scheduler.order
    timesteps = timesteps[skipped:]  # never empty: strength is in (0, 1]
    scheduler.set_begin_index(skipped)
    noise = torch.randn(latents.shape, generator=generator)
    return scheduler.scale_noise(latents, timesteps[:1], noise), timesteps


def generate(bundle: BuiltBundle, models: LazyModels, request: Request, on_step: OnStep) -> torch.Tensor:
    _refuse_unsupported(bundle, request)
    pipeline = bundle.pipeline("mmdit")
    encode = PromptEncoder(bundle, models, pipeline)
    (states, pooled), (empty_states, empty_pooled) = encode(request.prompt), encode("")
    text = {
        "token_level_text_embeddings": torch.cat([empty_states, states]),  # unconditional first
        "pooled_text_embeddings": torch.cat([empty_pooled, pooled]),
    }
    shape = next(i.shape for i in bundle.manifest.models[MMDIT].inputs if i.name == "latent_image_embeddings")
    latent_shape = (1, *shape[1:])
    scheduler = load_scheduler(pipeline)
    timesteps = _timesteps(scheduler, request.steps, pipeline, latent_shape)
    generator = torch.Generator().manual_seed(request.seed)
    if request.init_image is None:
        latents = torch.randn(latent_shape, generator=generator)
    else:
        latents, timesteps = _from_image(bundle, models, request, scheduler, timesteps, generator)
    mmdit, batch = models[MMDIT], bundle.manifest.unet_batch_size
    for index, t in enumerate(timesteps):
        features = text | {
            "latent_image_embeddings": torch.cat([latents, latents]),
            "timestep": t.to(torch.float32).expand(2),
        }
        unconditional, conditional = call_in_batches(mmdit, features, batch)["denoiser_output"].chunk(2)
        velocity = unconditional + request.guidance_scale * (conditional - unconditional)
        latents = scheduler.step(velocity, t, latents).prev_sample
        on_step(index + 1, len(timesteps))
    shift = bundle.manifest.latent_shift_factor or 0.0
    return models["VAEDecoder"]({"z": latents / bundle.manifest.latent_scale_factor + shift})["image"]
