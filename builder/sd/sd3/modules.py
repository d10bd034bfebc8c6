"""SD3's T5 text encoder and MMDiT as the Swift package calls them.

`StableDiffusion3Pipeline.swift` hands both models tensors in the (B, C, 1, S) layout the UNets use:
the text states of CLIP-L and CLIP-G side by side, zero-padded to T5's width, then T5's states
after them on the token axis ([B, 4096, 1, 154] at full size); the pooled states (B, 2048, 1, 1).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from diffusers.models.transformers.transformer_sd3 import SD3Transformer2DModel
    from transformers import T5EncoderModel

T5_SEQUENCE_LENGTH = 77
"""T5 tokens the Swift pipeline keeps (it truncates T5's states to 77): its input length here."""


class TextEncoderT5Module(nn.Module):
    """T5's encoder on float32 token ids, returning its last hidden states as (1, C, 1, S).

    Like diffusers' SD3 pipeline, T5 attends to every position (padding included) with no mask; the
    Swift package also sends an `attention_mask`, which a model without that input ignores.
    """

    def __init__(self, t5: T5EncoderModel):
        super().__init__()
        self.encoder = t5.encoder  # its token embedding is the model's `shared` one: kept once, under this name

    def forward(self, input_ids: torch.Tensor):
        hidden = self.encoder(input_ids=input_ids.to(torch.int64)).last_hidden_state
        return hidden.transpose(1, 2).unsqueeze(2)


class MultiModalDiffusionTransformerModule(nn.Module):
    """diffusers' SD3Transformer2DModel behind the Swift interface.

    Inputs `latent_image_embeddings` (B, 16, h, w), `timestep` (B,) in the scheduler's 0-1000 range,
    `token_level_text_embeddings` (B, C, 1, S) and `pooled_text_embeddings` (B, P, 1, 1); output
    `denoiser_output`, the flow-matching velocity, shaped like the latents.
    """

    def __init__(self, transformer: SD3Transformer2DModel):
        super().__init__()
        self.transformer = transformer

    def forward(
        self,
        latent_image_embeddings: torch.Tensor,
        timestep: torch.Tensor,
        token_level_text_embeddings: torch.Tensor,
        pooled_text_embeddings: torch.Tensor,
    ):
        context = token_level_text_embeddings.squeeze(2).transpose(1, 2)
        pooled = pooled_text_embeddings.flatten(1)
        return self.transformer(
            hidden_states=latent_image_embeddings,
            encoder_hidden_states=context,
            pooled_projections=pooled,
            timestep=timestep,
            return_dict=False,
        )[0]
