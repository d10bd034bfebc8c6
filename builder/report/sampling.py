"""Text-to-image in torch with the bundle's settings, to compare two UNets on the same prompts.

The text encoder(s) and VAE decoder are the pipeline folder's torch models wrapped exactly as they are
converted (float16-safe causal mask, latents divided by the scale factor); prompts condition the UNet
as the family's diffusers pipeline does (`builder.sd.conditioning`: for SDXL also text_embeds and
time_ids). The UNet is called as the Swift package calls it: batch `unet_batch_size`, text states in
(B, C, 1, 77). Everything but the UNet is shared, so two images differ only by their UNet's weights.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from builder.sd.components import kind
from builder.sd.conditioning import TextConditioning
from builder.sd.manifest import Manifest
from builder.sd.modules import VaeDecoderModule


@dataclass(frozen=True)
class Sampler:
    """The shared parts of the pipeline: text conditioning, scheduler config, VAE decoder."""

    pipeline: Path
    conditioning: TextConditioning
    vae_decoder: nn.Module
    latent_size: tuple[int, int]
    latent_channels: int
    latent_scale_factor: float
    unet_batch_size: int

    @classmethod
    def load(cls, pipeline: Path, manifest: Manifest) -> Sampler:
        vae = kind("vae_decoder").load(pipeline, "vae").eval()
        return cls(
            pipeline=pipeline,
            conditioning=TextConditioning(pipeline, manifest.family, manifest.latent_size),
            vae_decoder=VaeDecoderModule(vae).eval(),
            latent_size=manifest.latent_size,
            latent_channels=int(vae.config.latent_channels),
            latent_scale_factor=manifest.latent_scale_factor,
            unet_batch_size=manifest.unet_batch_size,
        )

    def _scheduler(self):
        import diffusers

        config = json.loads((self.pipeline / "scheduler" / "scheduler_config.json").read_text())
        return getattr(diffusers, config["_class_name"]).from_config(config)

    def _noise_pred(
        self, unet: nn.Module, latents: torch.Tensor, t: torch.Tensor, conditioning: list[torch.Tensor]
    ) -> torch.Tensor:
        """Unconditional and conditional predictions (2, ...), in calls of the bundle's batch size."""
        sample = torch.cat([latents, latents])
        timestep = t.to(torch.float32).expand(2)
        if self.unet_batch_size == 2:
            return unet(sample, timestep, *conditioning)
        return torch.cat(
            [unet(sample[i : i + 1], timestep[i : i + 1], *(c[i : i + 1] for c in conditioning)) for i in range(2)]
        )

    @torch.no_grad()
    def generate(self, unet: nn.Module, prompt: str, seed: int, steps: int, guidance_scale: float) -> torch.Tensor:
        """A (1, 3, H, W) image in [-1, 1] for `prompt`, starting from seeded noise."""
        conditioning = list(self.conditioning.guided([prompt]).values())  # in the UNet's argument order
        scheduler = self._scheduler()  # fresh: multistep schedulers keep state between steps
        scheduler.set_timesteps(steps)
        generator = torch.Generator().manual_seed(seed)
        latents = torch.randn((1, self.latent_channels, *self.latent_size), generator=generator)
        latents = latents * scheduler.init_noise_sigma
        for t in scheduler.timesteps:
            model_input = scheduler.scale_model_input(latents, t)
            unconditional, conditional = self._noise_pred(unet, model_input, t, conditioning).chunk(2)
            noise = unconditional + guidance_scale * (conditional - unconditional)
            latents = scheduler.step(noise, t, latents).prev_sample
        return self.vae_decoder(latents / self.latent_scale_factor).clamp(-1, 1)
