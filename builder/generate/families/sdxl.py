"""SDXL (`StableDiffusionXLPipeline`): the base UNet, then the refiner for the last steps when the bundle has one.

Conditioning as diffusers' SDXL pipelines make it (`builder.sd.conditioning`): both text encoders'
penultimate states, TextEncoder2's pooled state as text_embeds, time_ids from the image size. The
refiner is conditioned by TextEncoder2 alone with its own pipeline's time_ids (aesthetic scores)
and takes over at `refiner_start` of the steps, as the Swift pipeline switches UNets mid-loop.
"""

from __future__ import annotations

import torch

from builder.errors import UserError
from builder.generate.backend import LazyModels
from builder.generate.built import BuiltBundle
from builder.generate.families.common import decode, denoiser, starting_point, text_encoder
from builder.generate.request import OnStep, Request
from builder.generate.sampling import call_in_batches, denoise, guided_features, load_scheduler
from builder.sd.conditioning import TextConditioning


def generate(bundle: BuiltBundle, models: LazyModels, request: Request, on_step: OnStep) -> torch.Tensor:
    if "TextEncoder" not in models:
        raise UserError(
            f"{bundle.path} is refiner-only (no TextEncoder), which `sdbuild generate` cannot start from",
            hint="add components.text_encoder to the recipe and build again",
        )
    size = bundle.manifest.latent_size
    second = text_encoder(bundle, models, "TextEncoder2")
    encoders = {"text_encoder": text_encoder(bundle, models, "TextEncoder"), "text_encoder_2": second}
    pipeline = bundle.pipeline("unet")
    text = TextConditioning(pipeline, "sdxl", size, encoders).guided([request.prompt])
    unet = denoiser(bundle, models, request)
    scheduler = load_scheduler(pipeline)
    latents, timesteps = starting_point(bundle, models, request, scheduler, unet.name)

    switch = len(timesteps)
    if "UnetRefiner" in models:
        if not 0 <= request.refiner_start <= 1:
            raise UserError(f"--refiner-start {request.refiner_start} is outside [0, 1]", hint="pass a fraction")
        switch = int(len(timesteps) * request.refiner_start)
        refiner_pipeline = bundle.pipeline("unet_refiner")
        refined = TextConditioning(refiner_pipeline, "sdxl", size, {"text_encoder_2": second}).guided([request.prompt])

    def predict(index: int, sample: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if index < switch:
            return unet(guided_features(sample, t) | text)
        features = guided_features(sample, t) | refined
        return call_in_batches(models["UnetRefiner"], features, bundle.manifest.unet_batch_size)["noise_pred"]

    latents = denoise(scheduler, timesteps, latents, predict, request.guidance_scale, on_step)
    return decode(bundle, models, latents)
