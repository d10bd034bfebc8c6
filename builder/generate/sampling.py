"""The denoising loop every family shares: the pipeline's scheduler, seeded start, guidance, image-to-image.

Random draws follow diffusers' pipelines on the CPU (one `torch.Generator` seeded once: the
starting noise; for image-to-image first the VAE encoder's latent sample, then the noise), so the
same seed gives the same trajectory as diffusers with the same weights and scheduler.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from builder.errors import UserError
from builder.generate.backend import Model
from builder.generate.request import OnStep

# Called per step with (step index, scaled latents (1, C, H, W), timestep): the (2, C, H, W) noise
# predictions, unconditional first.
Predict = Callable[[int, torch.Tensor, torch.Tensor], torch.Tensor]
_LOGVAR_RANGE = (-30.0, 20.0)  # diffusers' DiagonalGaussianDistribution clamps the log-variance to this


def load_scheduler(pipeline: Path) -> Any:
    """A fresh scheduler (multistep ones keep state) of the class and config in the pipeline folder.

    The class name comes from a file, so it must name one of diffusers' schedulers, nothing else.
    """
    import diffusers
    from diffusers.schedulers.scheduling_utils import SchedulerMixin

    path = pipeline / "scheduler" / "scheduler_config.json"
    if not path.is_file():
        raise UserError(f"{pipeline} has no scheduler/scheduler_config.json", hint="use a complete diffusers pipeline")
    config = json.loads(path.read_text())
    name = str(config.get("_class_name"))
    scheduler: Any = getattr(diffusers, name, None)
    if not (isinstance(scheduler, type) and issubclass(scheduler, SchedulerMixin)):
        raise UserError(
            f"{path}: _class_name {name!r} is not a diffusers scheduler",
            hint="name a scheduler class of diffusers, e.g. EulerDiscreteScheduler",
        )
    factory: Any = scheduler  # from_config is ConfigMixin's, which every diffusers scheduler mixes in
    return factory.from_config(config)


def encode_image(
    encoder: Model, image: torch.Tensor, scale_factor: float, generator: torch.Generator, shift_factor: float = 0.0
) -> torch.Tensor:
    """A (1, 3, H, W) image in [0, 1] to the denoiser's latents: a sample of the VAE encoder's
    distribution, shifted (SD3's VAE) and scaled."""
    distribution = encoder({"sample": image * 2 - 1})["latent_dist"]
    mean, logvar = distribution.chunk(2, dim=1)
    std = torch.exp(0.5 * logvar.clamp(*_LOGVAR_RANGE))
    return (mean + std * torch.randn(mean.shape, generator=generator) - shift_factor) * scale_factor


def start(
    scheduler: Any,
    steps: int,
    shape: tuple[int, ...],
    generator: torch.Generator,
    init_latents: torch.Tensor | None = None,
    strength: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(starting latents, timesteps to run): seeded noise over every step, or, image to image, the
    image's latents noised to the step `strength` of the way from the end (diffusers' rule)."""
    scheduler.set_timesteps(steps)
    timesteps = scheduler.timesteps
    if init_latents is None:
        return torch.randn(shape, generator=generator) * scheduler.init_noise_sigma, timesteps
    skipped = (steps - min(int(steps * strength), steps)) * scheduler.order
    timesteps = timesteps[skipped:]
    if len(timesteps) == 0:
        raise UserError(
            f"--strength {strength} with {steps} steps leaves no step to run",
            hint="raise --strength or --steps (strength x steps must be at least 1)",
        )
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(skipped)
    noise = torch.randn(shape, generator=generator)
    return scheduler.add_noise(init_latents, noise, timesteps[:1]), timesteps


def denoise(
    scheduler: Any,
    timesteps: torch.Tensor,
    latents: torch.Tensor,
    predict: Predict,
    guidance_scale: float,
    on_step: OnStep,
) -> torch.Tensor:
    """Classifier-free guided denoising from `latents` over `timesteps`."""
    for index, t in enumerate(timesteps):
        unconditional, conditional = predict(index, scheduler.scale_model_input(latents, t), t).chunk(2)
        noise = unconditional + guidance_scale * (conditional - unconditional)
        latents = scheduler.step(noise, t, latents).prev_sample
        on_step(index + 1, len(timesteps))
    return latents


def guided_features(latents: torch.Tensor, t: torch.Tensor) -> dict[str, torch.Tensor]:
    """A UNet's sample and timestep for both guidance halves, as the Swift package feeds them."""
    return {"sample": torch.cat([latents, latents]), "timestep": t.to(torch.float32).expand(2)}


def call_in_batches(model: Model, features: Mapping[str, torch.Tensor], batch_size: int) -> dict[str, torch.Tensor]:
    """Run a model on both guidance halves: in one call (batch 2), or one call per half (batch 1)."""
    if batch_size == 2:
        return model(features)
    halves = [model({name: value[i : i + 1] for name, value in features.items()}) for i in range(2)]
    return {name: torch.cat([half[name] for half in halves]) for name in halves[0]}
