"""Which recipe settings each convertible component depends on.

Kept free of torch so planning a build (and a no-op rebuild) stays fast: only the settings listed
here key a component's stages, so e.g. switching attention rebuilds the UNet alone.
"""

from __future__ import annotations

COMPONENT_SETTINGS: dict[str, tuple[str, ...]] = {
    "text_encoder": (),
    "unet": ("attention", "latent_size", "batch_size"),
    "vae_decoder": ("latent_size",),
    "vae_encoder": ("latent_size",),
    "controlnet": ("attention", "latent_size", "batch_size"),  # each ControlNet, rewritten like the UNet
    "safety_checker": (),  # its image input is 512 x 512 whatever the latent size (see components.py)
}
