"""Torch modules shaped for conversion: the Swift package's feature names, layouts and dtypes.

Each wraps a diffusers/transformers model without changing its weights' meaning. The UNet's wrapper
lives with its Neural Engine rewrite in `builder.sd.ane`.
"""

from __future__ import annotations

import torch
from torch import nn

# Additive causal-mask value that stays finite in float16 (the dtype minimum overflows to -inf
# there, and a fully masked row would turn into NaN after softmax).
_FLOAT16_SAFE_MASK = -1e4


class TextEncoderModule(nn.Module):
    """CLIP text encoder taking float32 token ids (as the Swift side sends them).

    Runs the embedding, the encoder with our own float16-safe causal mask, and the final norm, and
    returns the last hidden state and the pooled (first end-of-text token) state.
    """

    def __init__(self, clip: nn.Module, sequence_length: int = 77):
        super().__init__()
        self.clip = clip
        self.eos_token_id = int(clip.config.eos_token_id)
        mask = torch.full((sequence_length, sequence_length), _FLOAT16_SAFE_MASK).triu(1)
        self.register_buffer("causal_mask", mask[None, None], persistent=False)

    def forward(self, input_ids: torch.Tensor):
        ids = input_ids.to(torch.int64)
        hidden = self.clip.embeddings(input_ids=ids)
        hidden = self.clip.encoder(inputs_embeds=hidden, attention_mask=self.causal_mask).last_hidden_state
        hidden = self.clip.final_layer_norm(hidden)
        eos_position = (ids == self.eos_token_id).to(torch.int32).argmax(dim=-1)
        pooled = hidden[torch.arange(hidden.shape[0]), eos_position]
        return hidden, pooled


class VaeDecoderModule(nn.Module):
    """Latents (already divided by the scale factor) to an image in [-1, 1]."""

    def __init__(self, vae: nn.Module):
        super().__init__()
        self.post_quant_conv = vae.post_quant_conv if vae.post_quant_conv is not None else nn.Identity()
        self.decoder = vae.decoder

    def forward(self, z: torch.Tensor):
        return self.decoder(self.post_quant_conv(z))


class VaeEncoderModule(nn.Module):
    """Image in [-1, 1] to the latent distribution's mean and log-variance, stacked on channels."""

    def __init__(self, vae: nn.Module):
        super().__init__()
        self.encoder = vae.encoder
        self.quant_conv = vae.quant_conv if vae.quant_conv is not None else nn.Identity()

    def forward(self, sample: torch.Tensor):
        return self.quant_conv(self.encoder(sample))


class SafetyCheckerModule(nn.Module):
    """diffusers' StableDiffusionSafetyChecker as one branch-free graph with the Swift package's features.

    Inputs: `clip_input` (1, 3, S, S) CLIP-normalised pixels, `images` (1, H, W, 3) the decoded images,
    `adjustment` (1,) added to every score (the Swift package sends 0; positive values flag more).
    Outputs: `filtered_images` (the images, zeroed where flagged), `has_nsfw_concepts` (1.0 flagged,
    0.0 not; what the Swift package reads) and `concept_scores` (the scores the flag thresholds at
    zero). With adjustment 0 this is diffusers' `forward_onnx`: a special-care concept above its
    threshold raises every concept score by 0.01, and any concept score above zero flags the image.
    Apple's converter adds `adjustment` to the special-care scores only; here it shifts both, as the
    `adjustment` variable does in diffusers' own forward.
    """

    _SPECIAL_CARE_BOOST = 0.01

    def __init__(self, checker: nn.Module):
        super().__init__()
        self.checker = checker

    @staticmethod
    def _cosine(embeds: torch.Tensor, concepts: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.normalize(embeds, dim=-1) @ torch.nn.functional.normalize(concepts, dim=-1).T

    def forward(self, clip_input: torch.Tensor, images: torch.Tensor, adjustment: torch.Tensor):
        c = self.checker
        embeds = c.visual_projection(c.vision_model(clip_input)[1])
        special = self._cosine(embeds, c.special_care_embeds) - c.special_care_embeds_weights + adjustment
        special_care = (special > 0).to(embeds.dtype).amax(dim=1, keepdim=True)
        concept_scores = (
            self._cosine(embeds, c.concept_embeds) - c.concept_embeds_weights + adjustment
            + special_care * self._SPECIAL_CARE_BOOST
        )
        flagged = (concept_scores > 0).to(embeds.dtype).amax(dim=1)
        filtered = images * (1 - flagged).to(images.dtype)[:, None, None, None]
        return filtered, flagged, concept_scores
