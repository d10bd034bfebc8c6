"""What the families share: text encoders as conditioning takes them, the UNet choice (plain or with
ControlNets), the starting latents (noise, or an image), decoding."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from builder.errors import UserError
from builder.generate.backend import LazyModels, Model
from builder.generate.built import BuiltBundle
from builder.generate.images import read_image
from builder.generate.request import Request
from builder.generate.sampling import call_in_batches, encode_image, start
from builder.sd.conditioning import TextEncoder
from builder.sd.contract import CONTROLLED_UNET, CONTROLNET_FOLDER, chunk_names


def text_encoder(bundle: BuiltBundle, models: LazyModels, name: str) -> TextEncoder:
    """The bundle's `name` (TextEncoder, TextEncoder2) as (hidden states, pooled state) of token ids."""
    model = models[name]
    hidden, pooled = (output.name for output in bundle.manifest.models[name].outputs)

    def encode(ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        produced = model({"input_ids": ids.to(torch.float32)})
        return produced[hidden], produced[pooled]

    return encode


@dataclass(frozen=True)
class Denoiser:
    """The UNet of one run and the ControlNets feeding it, each ControlNet with its conditioning image."""

    name: str  # the UNet's model name: its sample input gives the latent shape
    unet: Model
    batch_size: int
    controls: tuple[tuple[Model, torch.Tensor], ...] = ()

    def __call__(self, features: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """(2, C, H, W) noise predictions for both guidance halves of `features`."""
        residuals: dict[str, torch.Tensor] = {}
        for controlnet, image in self.controls:  # several ControlNets add their residuals up
            for name, residual in controlnet({**features, "controlnet_cond": torch.cat([image, image])}).items():
                residuals[name] = residuals[name] + residual if name in residuals else residual
        return call_in_batches(self.unet, {**features, **residuals}, self.batch_size)["noise_pred"]


def denoiser(bundle: BuiltBundle, models: LazyModels, request: Request, plain: str = "Unet") -> Denoiser:
    """The plain UNet, or with --control-image the ControlledUnet and the bundle's ControlNets."""
    batch = bundle.manifest.unet_batch_size
    controlnets = [name for name in models if name.startswith(f"{CONTROLNET_FOLDER}/")]
    if request.control_images:
        if CONTROLLED_UNET not in models:
            raise UserError(f"--control-image given, but {bundle.path} has no ControlNet", hint="drop --control-image")
        if len(request.control_images) != len(controlnets):
            raise UserError(
                f"{len(request.control_images)} --control-image for {len(controlnets)} ControlNet(s): "
                + ", ".join(controlnets),
                hint="pass one --control-image per ControlNet, in this order",
            )
        size = bundle.manifest.image_size
        controls = tuple(
            (models[name], read_image(path, size, "control image"))
            for name, path in zip(controlnets, request.control_images, strict=True)
        )
        return Denoiser(CONTROLLED_UNET, models[CONTROLLED_UNET], batch, controls)
    if plain not in models:
        if CONTROLLED_UNET in models:
            raise UserError(
                f"{bundle.path} runs its UNet with ControlNets only ({', '.join(controlnets)})",
                hint="pass --control-image, one per ControlNet",
            )
        raise UserError(f"{bundle.path} has no {plain}", hint="add components.unet to the recipe and build")
    return Denoiser(plain, models[plain], batch)


def starting_point(
    bundle: BuiltBundle, models: LazyModels, request: Request, scheduler, unet: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """(latents, timesteps): from seeded noise, or from --init-image through the bundle's VAE encoder."""
    shipped = bundle.manifest.models
    entry = shipped[unet] if unet in shipped else shipped[chunk_names(unet)[0]]
    shape = next(i.shape for i in entry.inputs if i.name == "sample")
    latent_shape = (1, *shape[1:])
    generator = torch.Generator().manual_seed(request.seed)
    if request.init_image is None:
        return start(scheduler, request.steps, latent_shape, generator)
    latents = image_latents(bundle, models, request, generator)
    return start(scheduler, request.steps, latent_shape, generator, latents, request.strength)


def image_latents(
    bundle: BuiltBundle, models: LazyModels, request: Request, generator: torch.Generator, shift_factor: float = 0.0
) -> torch.Tensor:
    """--init-image as the denoiser's latents, through the bundle's VAE encoder (the generator's first draw)."""
    assert request.init_image is not None
    if "VAEEncoder" not in models:
        raise UserError(
            f"--init-image needs a VAE encoder, and {bundle.path} has none",
            hint="add `vae_encoder: {}` to the recipe's components and build again, or drop --init-image",
        )
    if not 0 < request.strength <= 1:
        raise UserError(f"--strength {request.strength} is outside (0, 1]", hint="pass a strength in (0, 1]")
    image = read_image(request.init_image, bundle.manifest.image_size, "init image")
    scale = bundle.manifest.latent_scale_factor
    return encode_image(models["VAEEncoder"], image, scale, generator, shift_factor)


def decode(bundle: BuiltBundle, models: LazyModels, latents: torch.Tensor) -> torch.Tensor:
    return models["VAEDecoder"]({"z": latents / bundle.manifest.latent_scale_factor})["image"]
