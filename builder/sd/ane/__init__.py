"""Neural Engine rewrites of diffusers modules: the same weights in layouts and ops the ANE runs well.

Transformer blocks work on (B, C, 1, S) tensors (tokens on the last axis), linear layers become 1x1
convolutions and LayerNorm normalises the channel axis, as Apple's ml-stable-diffusion does.
"""

from builder.sd.ane.unet import rewrite_unet

__all__ = ["rewrite_unet"]
