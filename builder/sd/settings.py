"""Which recipe settings each convertible component depends on.

Kept free of torch so planning a build (and a no-op rebuild) stays fast: only the settings listed
here key a component's stages, so e.g. switching attention rebuilds the UNet alone.
"""

from __future__ import annotations

COMPONENT_SETTINGS: dict[str, tuple[str, ...]] = {
    "text_encoder": ("family",),  # SDXL's returns the penultimate hidden states (hidden_embeds)
    "text_encoder_2": ("family",),
    "text_encoder_3": (),  # SD3's T5: 77 tokens whatever the recipe
    "unet": ("attention", "latent_size", "batch_size"),
    "unet_refiner": ("attention", "latent_size", "batch_size"),
    "mmdit": ("latent_size", "batch_size"),  # SD3's denoiser: one attention form (see builder/sd/sd3)
    "vae_decoder": ("latent_size",),
    "vae_encoder": ("latent_size",),
    "controlnet": ("attention", "latent_size", "batch_size"),  # each ControlNet, rewritten like the UNet
    "safety_checker": (),  # its image input is 512 x 512 whatever the latent size (see components.py)
}

# Components `chunk_unet: true` ships as two chunks (builder/sd/chunk.py): every UNet the recipe builds.
CHUNKED_BY_CHUNK_UNET: tuple[str, ...] = ("unet", "unet_refiner")

# Components `sdbuild analyze` analyses and `mode: mixed` compresses: the UNets, whose workload
# (builder/sd/conditioning.py) is a guided denoising loop.
ANALYSED_COMPONENTS: tuple[str, ...] = ("unet", "unet_refiner")
