"""The UNet's text and micro-conditioning inputs for a denoising loop, as the diffusers pipelines make them.

Used by the workloads that run the conversion module itself (mixed-bit analysis, quality report), so
the inputs come out in the Neural-Engine layout that module takes: text states (B, C, 1, 77), and for
SDXL `text_embeds` (B, P) and `time_ids` (B, 6; 5 for a refiner). Prompts are encoded by the project's own text encoder
modules (`kind(...).wrap`), the ones that are converted:

- SD 1.x/2.x: the last hidden state of `text_encoder`; the unconditional half is the empty prompt.
- SDXL: the penultimate hidden states of the pipeline's encoders side by side (`text_encoder` and
  `text_encoder_2`; a refiner has only the second), and `text_encoder_2`'s projected pooled state as
  `text_embeds` (diffusers' `encode_prompt`). The unconditional half is zeros when the pipeline's
  model_index.json says `force_zeros_for_empty_prompt` (diffusers' default; SDXL base sets it, the
  refiner does not), else the empty prompt encoded the same way. `time_ids` as diffusers'
  `_get_add_time_ids` makes them with its defaults, sizes being the image size (latent size x 8):
  base (original size, crop top-left (0, 0), target size) for both halves; refiner (its
  `requires_aesthetics_score`) (original size, crop top-left, aesthetic score 6.0, or 2.5 for the
  unconditional half). The refiner's workload, like the base's, denoises from seeded noise.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from builder.errors import UserError
from builder.sd.components import TEXT_SEQUENCE_LENGTH, VAE_SCALE, kind, pipeline_time_ids

if TYPE_CHECKING:
    from transformers import CLIPTokenizer

# (encoder, tokenizer) folders per family, in the order diffusers concatenates their hidden states
_ENCODERS = {
    "sd": (("text_encoder", "tokenizer"),),
    "sdxl": (("text_encoder", "tokenizer"), ("text_encoder_2", "tokenizer_2")),
}
# float32 token ids (1, 77) -> (hidden states, pooled state): a text encoder conversion module, or a
# bundle's text encoder model as `sdbuild generate` runs it
TextEncoder = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
# diffusers' StableDiffusionXLImg2ImgPipeline defaults for a refiner's time_ids
AESTHETIC_SCORE, NEGATIVE_AESTHETIC_SCORE = 6.0, 2.5


class TextConditioning:
    """Prompt -> UNet conditioning inputs for one pipeline folder, family and latent size."""

    def __init__(
        self,
        pipeline: Path,
        family: str,
        latent_size: tuple[int, int],
        encoders: Mapping[str, TextEncoder] | None = None,
    ):
        """`encoders` (by component) replace the pipeline folder's own, e.g. a bundle's models as
        `sdbuild generate` runs them, or LoRA-fused ones; the tokenizers are always the folder's."""
        from transformers import CLIPTokenizer

        if family not in _ENCODERS:
            raise UserError(f"no denoising workload for family {family}", hint=f"use one of: {', '.join(_ENCODERS)}")
        self.family = family
        self.latent_size = latent_size
        self.time_ids_length = pipeline_time_ids(pipeline)  # 6, or 5 for a refiner
        # A refiner pipeline has no text_encoder (diffusers then uses text_encoder_2 alone).
        folders = [pair for pair in _ENCODERS[family] if family == "sd" or (pipeline / pair[0]).is_dir()]
        if family == "sdxl" and folders[-1][0] != "text_encoder_2":
            raise UserError(
                f"{pipeline} has no text_encoder_2, which gives SDXL's pooled text_embeds",
                hint="point the recipe's model at a complete SDXL pipeline folder",
            )
        self.encoders: list[tuple[CLIPTokenizer, TextEncoder]] = []
        for component, tokenizer in folders:
            if encoders is not None and component in encoders:
                module = encoders[component]
            else:
                k = kind(component, family)
                module = k.wrap(k.load(pipeline, k.subfolder).eval(), "ORIGINAL").eval()
            self.encoders.append((CLIPTokenizer.from_pretrained(pipeline / tokenizer), module))
        index = pipeline / "model_index.json"
        config = json.loads(index.read_text()) if index.is_file() else {}
        self.zeros_for_empty_prompt = family == "sdxl" and config.get("force_zeros_for_empty_prompt", True)

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        """The conditional inputs for `prompts`, one row each (no unconditional half)."""
        hidden, pooled = [], None
        for tokenizer, module in self.encoders:
            ids = tokenizer(
                prompts, padding="max_length", max_length=TEXT_SEQUENCE_LENGTH, truncation=True, return_tensors="pt"
            ).input_ids
            states, pooled = module(ids.to(torch.float32))
            hidden.append(states)
        inputs = {"encoder_hidden_states": torch.cat(hidden, dim=-1).transpose(1, 2).unsqueeze(2).contiguous()}
        if self.family == "sdxl":
            if pooled is None:
                raise ValueError("SDXL conditioning needs text_encoder_2, which gives text_embeds")
            inputs["text_embeds"] = pooled  # text_encoder_2's projected pooled state
            inputs["time_ids"] = self.time_ids(len(prompts), unconditional=False)
        return inputs

    def time_ids(self, rows: int, unconditional: bool) -> torch.Tensor:
        """(rows, 6 or 5): original size and crop top-left, then the target size (base) or the aesthetic
        score (refiner, lower for the unconditional half); sizes in pixels (height, width)."""
        height, width = (VAE_SCALE * side for side in self.latent_size)
        score = NEGATIVE_AESTHETIC_SCORE if unconditional else AESTHETIC_SCORE
        tail = [height, width] if self.time_ids_length == 6 else [score]
        row = [height, width, 0, 0, *tail]
        return torch.tensor([row], dtype=torch.float32).expand(rows, len(row)).clone()

    def unconditional(self, conditional: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The classifier-free guidance half for a batch of `conditional` rows: zeros in place of the text
        (SDXL's force_zeros_for_empty_prompt) or the empty prompt encoded."""
        rows = len(conditional["encoder_hidden_states"])
        if not self.zeros_for_empty_prompt:
            empty = self.encode([""] * rows)
        else:
            empty = {name: torch.zeros_like(value) for name, value in conditional.items()}
        if self.family == "sdxl":
            empty["time_ids"] = self.time_ids(rows, unconditional=True)
        return empty

    def guided(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        """Unconditional rows first, then the prompts' rows: the batch one guided UNet call takes."""
        positive = self.encode(prompts)
        negative = self.unconditional(positive)
        return {name: torch.cat([negative[name], positive[name]]) for name in UNET_TEXT_INPUTS if name in positive}


# The conditioning inputs in the conversion module's argument order (after sample and timestep).
UNET_TEXT_INPUTS = ("encoder_hidden_states", "text_embeds", "time_ids")
