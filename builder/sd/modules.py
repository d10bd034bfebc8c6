"""Torch modules shaped for conversion: the Swift package's feature names, layouts and dtypes.

Each wraps a diffusers/transformers model without changing its weights' meaning. The UNet's wrapper
lives with its Neural Engine rewrite in `builder.sd.ane`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from builder.sd.tokenizer_files import MODEL_MAX_LENGTH

if TYPE_CHECKING:
    from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKL
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

# Additive causal-mask value that stays finite in float16 (the dtype minimum overflows to -inf
# there, and a fully masked row would turn into NaN after softmax).
_FLOAT16_SAFE_MASK = -1e4
# CLIP configs written before transformers fixed eos_token_id say 2; their end-of-text token is then
# the highest id in the sequence, which is where transformers pools them too.
_LEGACY_EOS_TOKEN_ID = 2


def _causal_mask(sequence_length: int) -> torch.Tensor:
    return torch.full((sequence_length, sequence_length), _FLOAT16_SAFE_MASK).triu(1)[None, None]


def token_id(config: CLIPTextConfig, name: str) -> int:
    """The config's `name` (bos_token_id or eos_token_id): transformers allows none or a list there."""
    value = getattr(config, name)
    if not isinstance(value, int):
        raise ValueError(f"text encoder config {name}={value!r}; one token id expected")
    return value


def _eos_positions(ids: torch.Tensor, eos_token_id: int) -> torch.Tensor:
    """Index of the end-of-text token per sequence, chosen as transformers' CLIP pooling does."""
    if eos_token_id == _LEGACY_EOS_TOKEN_ID:
        return ids.to(torch.int32).argmax(dim=-1)
    return (ids == eos_token_id).to(torch.int32).argmax(dim=-1)


class TextEncoderModule(nn.Module):
    """CLIP text encoder taking float32 token ids (as the Swift side sends them).

    Runs the embedding, the encoder with our own float16-safe causal mask, and the final norm, and
    returns the last hidden state and the pooled (first end-of-text token) state.
    """

    def __init__(self, clip: CLIPTextModel, sequence_length: int = MODEL_MAX_LENGTH):
        super().__init__()
        self.clip = clip
        self.eos_token_id = token_id(clip.config, "eos_token_id")
        self.register_buffer("causal_mask", _causal_mask(sequence_length), persistent=False)

    def forward(self, input_ids: torch.Tensor):
        ids = input_ids.to(torch.int64)
        hidden = self.clip.embeddings(input_ids=ids)
        hidden = self.clip.encoder(inputs_embeds=hidden, attention_mask=self.causal_mask).last_hidden_state
        hidden = self.clip.final_layer_norm(hidden)
        pooled = hidden[torch.arange(hidden.shape[0]), _eos_positions(ids, self.eos_token_id)]
        return hidden, pooled


class TextEncoderXLModule(nn.Module):
    """An SDXL text encoder: the penultimate layer's hidden states and the pooled state.

    SDXL's pipeline conditions the UNet on `hidden_states[-2]` (before the last layer and the final
    norm) of both encoders, and on the second encoder's projected pooled state (`text_embeds`).
    `clip` is a CLIPTextModel (pooled = its pooler output) or a CLIPTextModelWithProjection
    (pooled = the projection of it). Same float16-safe causal mask as TextEncoderModule.
    """

    def __init__(self, clip: CLIPTextModel | CLIPTextModelWithProjection, sequence_length: int = MODEL_MAX_LENGTH):
        from transformers import CLIPTextModelWithProjection

        super().__init__()
        self.clip: CLIPTextModel = clip.text_model if isinstance(clip, CLIPTextModelWithProjection) else clip
        self.text_projection = clip.text_projection if isinstance(clip, CLIPTextModelWithProjection) else None
        self.eos_token_id = token_id(self.clip.config, "eos_token_id")
        self.register_buffer("causal_mask", _causal_mask(sequence_length), persistent=False)

    def forward(self, input_ids: torch.Tensor):
        ids = input_ids.to(torch.int64)
        hidden = self.clip.embeddings(input_ids=ids)
        *layers, last = self.clip.encoder.layers
        for layer in layers:
            hidden = layer(hidden, self.causal_mask)
        penultimate = hidden
        hidden = self.clip.final_layer_norm(last(hidden, self.causal_mask))
        pooled = hidden[torch.arange(hidden.shape[0]), _eos_positions(ids, self.eos_token_id)]
        if self.text_projection is not None:
            pooled = self.text_projection(pooled)
        return penultimate, pooled


class VaeDecoderModule(nn.Module):
    """Latents (already divided by the scale factor) to an image in [-1, 1]."""

    def __init__(self, vae: AutoencoderKL):
        super().__init__()
        self.post_quant_conv = vae.post_quant_conv if vae.post_quant_conv is not None else nn.Identity()
        self.decoder = vae.decoder

    def forward(self, z: torch.Tensor):
        return self.decoder(self.post_quant_conv(z))


class VaeEncoderModule(nn.Module):
    """Image in [-1, 1] to the latent distribution's mean and log-variance, stacked on channels."""

    def __init__(self, vae: AutoencoderKL):
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

    def __init__(self, checker: StableDiffusionSafetyChecker):
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
            self._cosine(embeds, c.concept_embeds)
            - c.concept_embeds_weights
            + adjustment
            + special_care * self._SPECIAL_CARE_BOOST
        )
        flagged = (concept_scores > 0).to(embeds.dtype).amax(dim=1)
        filtered = images * (1 - flagged).to(images.dtype)[:, None, None, None]
        return filtered, flagged, concept_scores
