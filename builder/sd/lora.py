"""Fusing LoRAs into a UNet or text encoder with diffusers' own LoRA loading, before the rewrite.

Each file is read by diffusers' `lora_state_dict` (diffusers and kohya layouts, safetensors only),
loaded as a peft adapter, merged into the base weights at its scale, and its adapter layers removed,
one LoRA after another: what leaves is the plain diffusers/transformers model with fused weights, as
`pipeline.load_lora_weights(...)` + `fuse_lora(...)` computes it. The UNet goes through diffusers'
`load_lora_into_unet`. A text encoder takes the same steps diffusers' `load_lora_into_text_encoder`
takes, except that the adapter is injected with peft itself: diffusers hands it to transformers'
`load_adapter`, which refuses every peft release published so far (it asks for peft >= 0.22).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from builder.errors import UserError

ADAPTER = "sdbuild_lora"
_TEXT_LAYERS = (".q_proj", ".k_proj", ".v_proj", ".out_proj", ".fc1", ".fc2")  # what diffusers ranks in CLIP


def lora_target(component: str) -> str:
    """The component whose LoRA weights a conversion kind takes: a ControlledUnet is the UNet."""
    return "unet" if component in ("unet", "controlled_unet") else component


def fuse_loras(model: torch.nn.Module, target: str, loras: list[tuple[Path, float]]) -> None:
    """Fuse every (file, scale) of `loras`, in order, into `model` in place; `target` is the component
    whose weights the files carry: unet, text_encoder or text_encoder_2."""
    for path, scale in loras:
        try:
            _fuse_one(model, target, path, scale)
        except (ValueError, KeyError, RuntimeError) as problem:  # diffusers' and peft's words for a bad file
            raise UserError(
                f"LoRA {path.name} does not fit {target}: {str(problem).splitlines()[0]}",
                hint="use a LoRA trained for this model's architecture (SD 1.x, 2.x or SDXL, as the recipe's model)",
            ) from None


def _fuse_one(model: Any, target: str, path: Path, scale: float) -> None:
    # The SD and SDXL loader mixins share these classmethods (SDXL's are copies); the UNet's config
    # maps SDXL kohya files' SGM block names.
    from diffusers.loaders import StableDiffusionLoraLoaderMixin as mixin

    state_dict, alphas, metadata = mixin.lora_state_dict(
        str(path.parent),
        weight_name=path.name,
        use_safetensors=True,  # never falls back to a pickle
        local_files_only=True,
        unet_config=model.config if target == "unet" else None,
        return_lora_metadata=True,
    )
    if not any(key.startswith(f"{target}.") for key in state_dict):  # planning routes only files that have some
        raise ValueError(f"the file has no {target} weights")
    if target == "unet":
        mixin.load_lora_into_unet(state_dict, alphas, unet=model, adapter_name=ADAPTER, metadata=metadata)
        model.fuse_lora(lora_scale=scale, adapter_names=[ADAPTER])
        model.unload_lora()
    else:
        _fuse_text_encoder(model, target, state_dict, alphas, metadata, scale)


def _fuse_text_encoder(
    model: Any, prefix: str, state_dict: dict, alphas: dict | None, metadata: dict | None, scale: float
) -> None:
    """diffusers' `_load_lora_into_text_encoder` preparation, the adapter injected with peft, then fused."""
    from diffusers.loaders.lora_base import _remove_text_encoder_monkey_patch, fuse_text_encoder_lora
    from diffusers.utils import convert_state_dict_to_diffusers, convert_state_dict_to_peft
    from diffusers.utils.peft_utils import _create_lora_config
    from peft import inject_adapter_in_model, set_peft_model_state_dict

    state_dict = {k.removeprefix(f"{prefix}."): v for k, v in state_dict.items() if k.startswith(f"{prefix}.")}
    if metadata is not None:
        metadata = {k.removeprefix(f"{prefix}."): v for k, v in metadata.items() if k.startswith(f"{prefix}.")}
    if alphas is not None:
        alphas = {k.removeprefix(f"{prefix}."): v for k, v in alphas.items() if k.split(".")[0] == prefix}
    state_dict = convert_state_dict_to_peft(convert_state_dict_to_diffusers(state_dict))
    if not hasattr(model, "text_model"):  # transformers 5 flattened CLIPTextModel; older LoRAs keep the prefix
        state_dict = {k.removeprefix("text_model."): v for k, v in state_dict.items()}
    rank = {
        f"{name}.lora_B.weight": state_dict[f"{name}.lora_B.weight"].shape[1]
        for name, _ in model.named_modules()
        if name.endswith(_TEXT_LAYERS) and f"{name}.lora_B.weight" in state_dict
    }
    config = _create_lora_config(state_dict, alphas, metadata, rank, is_unet=False)
    inject_adapter_in_model(config, model, ADAPTER)
    loaded: Any = set_peft_model_state_dict(model, state_dict, ADAPTER)  # torch's _IncompatibleKeys
    unexpected = [k for k in loaded.unexpected_keys if "lora" in k]
    if unexpected:
        raise ValueError(f"weights the model has no layer for: {', '.join(unexpected[:3])}")
    fuse_text_encoder_lora(model, lora_scale=scale, adapter_names=[ADAPTER])
    _remove_text_encoder_monkey_patch(model)  # the adapter layers and peft_config: the next LoRA starts clean
