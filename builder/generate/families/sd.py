"""SD 1.x / 2.x (`StableDiffusionPipeline`, with ControlNets `--control-image`): text, or an image, to image.

The prompt is encoded by the bundle's TextEncoder with the pipeline's tokenizer, the unconditional
half being the empty prompt (`builder.sd.conditioning`, as diffusers encodes them).
"""

from __future__ import annotations

import torch

from builder.generate.backend import LazyModels
from builder.generate.built import BuiltBundle
from builder.generate.families.common import decode, denoiser, starting_point, text_encoder
from builder.generate.request import OnStep, Request
from builder.generate.sampling import denoise, guided_features, load_scheduler
from builder.sd.conditioning import TextConditioning


def generate(bundle: BuiltBundle, models: LazyModels, request: Request, on_step: OnStep) -> torch.Tensor:
    pipeline = bundle.pipeline("text_encoder")
    encoders = {"text_encoder": text_encoder(bundle, models, "TextEncoder")}
    text = TextConditioning(pipeline, "sd", bundle.manifest.latent_size, encoders).guided([request.prompt])
    unet = denoiser(bundle, models, request)
    scheduler = load_scheduler(pipeline)
    latents, timesteps = starting_point(bundle, models, request, scheduler, unet.name)

    def predict(index: int, sample: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return unet(guided_features(sample, t) | text)

    latents = denoise(scheduler, timesteps, latents, predict, request.guidance_scale, on_step)
    return decode(bundle, models, latents)
