"""The recipe's LoRAs as the stage graph needs them, resolved when the graph is built: each one's file
(local, or in the Hugging Face cache), scale and the components it changes (from the file's header),
so only those components' rewrites take it and are keyed by its digest and scale."""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

from builder.errors import UserError
from builder.recipe import LoadedRecipe
from builder.recipe.sources import HubLora
from builder.sd.lora_targets import LoraFileProblem, lora_components


class LoraInput(NamedTuple):
    label: str  # lora.<index>: the rewrite input name and the hub source stage's component
    field: str  # model.loras.<index>
    file: Path  # the local file, or the Hugging Face cache's
    scale: float
    components: list[str]  # unet, text_encoder, text_encoder_2: what its weights target
    hub: HubLora | None  # the recipe's hub entry, for the source stage that takes the file from the cache


def lora_inputs(loaded: LoadedRecipe) -> list[LoraInput]:
    """Every LoRA of the recipe; a located error for one that cannot be found or is not a LoRA."""
    found = []
    for index, lora in enumerate(loaded.recipe.model.loras):
        field = f"model.loras.{index}"
        if lora.hub is not None:
            from builder.hub.lora import cached_lora, lora_ref  # the hub client: only for hub LoRAs

            try:
                file = cached_lora(lora_ref(lora.hub.id, lora.hub.revision), lora.hub.weight_name)
            except UserError as problem:
                raise loaded.error(f"{field}.hub.weight_name", problem.message, problem.hint) from None
            where = f"{field}.hub.weight_name"
        else:
            assert lora.local is not None  # validation requires exactly one of hub and local
            file, where = lora.local.path, f"{field}.local.path"
        try:
            components = lora_components(file)
        except LoraFileProblem as problem:
            raise loaded.error(
                where,
                str(problem),
                "give a LoRA in diffusers' or kohya's safetensors layout for this model's UNet or text encoders",
            ) from None
        found.append(LoraInput(f"lora.{index}", field, file, lora.scale, components, lora.hub))
    return found
