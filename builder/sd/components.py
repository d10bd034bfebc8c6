"""What each pipeline component is for conversion: its reference model, wrapper, inputs and outputs.

One place knows, per component, how to load the diffusers/transformers reference from a pipeline
folder, how to wrap it for the Swift contract, which fixed inputs exercise it and what the
reference answers. Stages call these; they never special-case a component themselves.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from pydantic import BaseModel, ConfigDict
from torch import nn

from builder.errors import UserError
from builder.sd.ane import rewrite_unet
from builder.sd.modules import TextEncoderModule, TextEncoderXLModule, VaeDecoderModule, VaeEncoderModule

TEXT_SEQUENCE_LENGTH = 77
VAE_SCALE = 8


class ComponentShape(BaseModel):
    """Build-time sizes a component's interface depends on (from the recipe)."""

    model_config = ConfigDict(frozen=True)

    latent_size: tuple[int, int] = (0, 0)
    batch_size: int = 1
    time_ids: int = 6  # SDXL UNets' micro-conditioning length: 6, or 5 for a refiner (see pipeline_time_ids)


def pipeline_time_ids(folder: Path) -> int:
    """Length of an SDXL pipeline's time_ids, as diffusers and Apple's converter decide it.

    (original size, crop corner, target size) = 6 values; refiners (model_index.json
    `requires_aesthetics_score: true`) replace the target size by an aesthetic score = 5 values.
    """
    index = folder / "model_index.json"
    if index.is_file() and json.loads(index.read_text()).get("requires_aesthetics_score"):
        return 5
    return 6


class TensorSpec(BaseModel):
    """One model input as the Swift package feeds it."""

    name: str
    shape: list[int]
    dtype: str  # "float32" or "float16"


@dataclass(frozen=True)
class ComponentKind:
    """Conversion knowledge for one component type."""

    subfolder: str
    output_names: tuple[str, ...]
    load: Callable[[Path, str], nn.Module]
    from_config: Callable[[dict], nn.Module]
    wrap: Callable[[nn.Module, str], nn.Module]  # (reference, attention) -> conversion module
    inputs: Callable[[nn.Module, ComponentShape], list[TensorSpec]]
    reference: Callable[[nn.Module, dict[str, torch.Tensor]], list[torch.Tensor]]


def _attention_free(wrapper: Callable[[nn.Module], nn.Module]) -> Callable[[nn.Module, str], nn.Module]:
    """Components without attention variants ignore the recipe's attention setting."""
    return lambda model, attention: wrapper(model)


def _load_clip(folder: Path, subfolder: str) -> nn.Module:
    from transformers import CLIPTextModel

    # Eager attention adds our additive causal mask exactly as given.
    return CLIPTextModel.from_pretrained(folder, subfolder=subfolder, use_safetensors=True, attn_implementation="eager")


def _load_clip_with_projection(folder: Path, subfolder: str) -> nn.Module:
    from transformers import CLIPTextModelWithProjection

    return CLIPTextModelWithProjection.from_pretrained(
        folder, subfolder=subfolder, use_safetensors=True, attn_implementation="eager"
    )


def _load_unet(folder: Path, subfolder: str) -> nn.Module:
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel.from_pretrained(folder, subfolder=subfolder, use_safetensors=True)


def _load_vae(folder: Path, subfolder: str) -> nn.Module:
    from diffusers import AutoencoderKL

    # A replacement VAE (model.vae) is an AutoencoderKL folder with its config at the root.
    if not (folder / subfolder / "config.json").is_file() and (folder / "config.json").is_file():
        subfolder = ""
    return AutoencoderKL.from_pretrained(folder, subfolder=subfolder or None, use_safetensors=True)


def _clip_from_config(config: dict) -> nn.Module:
    from transformers import CLIPTextConfig, CLIPTextModel

    return CLIPTextModel._from_config(CLIPTextConfig.from_dict(config), attn_implementation="eager")


def _clip_with_projection_from_config(config: dict) -> nn.Module:
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    return CLIPTextModelWithProjection._from_config(CLIPTextConfig.from_dict(config), attn_implementation="eager")


def _unet_from_config(config: dict) -> nn.Module:
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel.from_config(config)


def _vae_from_config(config: dict) -> nn.Module:
    from diffusers import AutoencoderKL

    return AutoencoderKL.from_config(config)


def _text_inputs(model: nn.Module, shape: ComponentShape) -> list[TensorSpec]:
    return [TensorSpec(name="input_ids", shape=[1, TEXT_SEQUENCE_LENGTH], dtype="float32")]


def _unet_inputs(model: nn.Module, shape: ComponentShape) -> list[TensorSpec]:
    h, w = shape.latent_size
    b = shape.batch_size
    specs = [
        TensorSpec(name="sample", shape=[b, model.config.in_channels, h, w], dtype="float16"),
        TensorSpec(name="timestep", shape=[b], dtype="float16"),
        TensorSpec(
            name="encoder_hidden_states",
            shape=[b, model.config.cross_attention_dim, 1, TEXT_SEQUENCE_LENGTH],
            dtype="float16",
        ),
    ]
    if model.config.get("addition_embed_type") == "text_time":
        specs += [
            TensorSpec(name="text_embeds", shape=[b, _text_embeds_width(model.config, shape.time_ids)], dtype="float16"),
            TensorSpec(name="time_ids", shape=[b, shape.time_ids], dtype="float16"),
        ]
    return specs


def _text_embeds_width(config: dict, time_ids: int) -> int:
    """Width of the pooled text input: what the add-embedding takes besides the time_ids' embedding."""
    width = config.projection_class_embeddings_input_dim - time_ids * config.addition_time_embed_dim
    if width <= 0:
        raise UserError(
            f"unet: config projection_class_embeddings_input_dim={config.projection_class_embeddings_input_dim} "
            f"leaves no room for the pooled text embedding next to {time_ids} time_ids of "
            f"addition_time_embed_dim={config.addition_time_embed_dim}",
            hint="check that the checkpoint is an SDXL base (6 time_ids) or refiner (model_index.json "
            "requires_aesthetics_score: true, 5 time_ids)",
        )
    return width


def _vae_decoder_inputs(model: nn.Module, shape: ComponentShape) -> list[TensorSpec]:
    h, w = shape.latent_size
    return [TensorSpec(name="z", shape=[1, model.config.latent_channels, h, w], dtype="float16")]


def _vae_encoder_inputs(model: nn.Module, shape: ComponentShape) -> list[TensorSpec]:
    h, w = shape.latent_size
    return [TensorSpec(name="sample", shape=[1, model.config.in_channels, VAE_SCALE * h, VAE_SCALE * w], dtype="float16")]


def _text_reference(model: nn.Module, inputs: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    out = model(input_ids=inputs["input_ids"].long())
    return [out.last_hidden_state, out.pooler_output]


def _xl_text_reference(model: nn.Module, inputs: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    out = model(input_ids=inputs["input_ids"].long(), output_hidden_states=True)
    pooled = out.text_embeds if hasattr(out, "text_embeds") else out.pooler_output
    return [out.hidden_states[-2], pooled]


def _unet_reference(model: nn.Module, inputs: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    text = inputs["encoder_hidden_states"].squeeze(2).transpose(1, 2)
    added = {name: inputs[name] for name in ("text_embeds", "time_ids") if name in inputs}
    return [model(inputs["sample"], inputs["timestep"], text, added_cond_kwargs=added or None).sample]


def _vae_decoder_reference(model: nn.Module, inputs: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    return [model.decode(inputs["z"]).sample]


def _vae_encoder_reference(model: nn.Module, inputs: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    return [model.encode(inputs["sample"]).latent_dist.parameters]


_UNET = ComponentKind(
    subfolder="unet",
    output_names=("noise_pred",),
    load=_load_unet,
    from_config=_unet_from_config,
    wrap=rewrite_unet,
    inputs=_unet_inputs,
    reference=_unet_reference,
)

KINDS: dict[str, ComponentKind] = {
    "text_encoder": ComponentKind(
        subfolder="text_encoder",
        output_names=("last_hidden_state", "pooled_outputs"),
        load=_load_clip,
        from_config=_clip_from_config,
        wrap=_attention_free(TextEncoderModule),
        inputs=_text_inputs,
        reference=_text_reference,
    ),
    "text_encoder_2": ComponentKind(
        subfolder="text_encoder_2",
        output_names=("hidden_embeds", "pooled_outputs"),
        load=_load_clip_with_projection,
        from_config=_clip_with_projection_from_config,
        wrap=_attention_free(TextEncoderXLModule),
        inputs=_text_inputs,
        reference=_xl_text_reference,
    ),
    "unet": _UNET,
    "unet_refiner": _UNET,  # loaded from the refiner's own pipeline folder
    "vae_decoder": ComponentKind(
        subfolder="vae",
        output_names=("image",),
        load=_load_vae,
        from_config=_vae_from_config,
        wrap=_attention_free(VaeDecoderModule),
        inputs=_vae_decoder_inputs,
        reference=_vae_decoder_reference,
    ),
    "vae_encoder": ComponentKind(
        subfolder="vae",
        output_names=("latent_dist",),
        load=_load_vae,
        from_config=_vae_from_config,
        wrap=_attention_free(VaeEncoderModule),
        inputs=_vae_encoder_inputs,
        reference=_vae_encoder_reference,
    ),
}


# Components whose interface differs by pipeline family.
FAMILY_KINDS: dict[tuple[str, str], ComponentKind] = {
    ("sdxl", "text_encoder"): ComponentKind(
        subfolder="text_encoder",
        output_names=("hidden_embeds", "pooled_outputs"),
        load=_load_clip,
        from_config=_clip_from_config,
        wrap=_attention_free(TextEncoderXLModule),
        inputs=_text_inputs,
        reference=_xl_text_reference,
    ),
}


def kind(component: str, family: str = "sd") -> ComponentKind:
    """Conversion knowledge for `component` in `family`, or a clear error for one not supported yet."""
    try:
        return FAMILY_KINDS.get((family, component)) or KINDS[component]
    except KeyError:
        raise UserError(
            f"component '{component}' cannot be converted yet",
            hint=f"remove it from the recipe's components; supported: {', '.join(KINDS)}",
        ) from None


def example_inputs(component: str, model: nn.Module, specs: list[TensorSpec], seed: int = 0) -> dict[str, torch.Tensor]:
    """Fixed random inputs in the value ranges the pipeline really feeds each feature."""
    generator = torch.Generator().manual_seed(seed)
    inputs: dict[str, torch.Tensor] = {}
    for spec in specs:
        if spec.name == "input_ids":
            config = model.config
            ids = torch.randint(0, config.vocab_size, spec.shape, generator=generator)
            ids[ids == config.eos_token_id] = 0
            ids[:, 0] = config.bos_token_id
            ids[:, spec.shape[1] // 2 :] = config.eos_token_id  # prompt, end-of-text, padding
            inputs[spec.name] = ids.to(torch.float32)
        elif spec.name == "timestep":
            inputs[spec.name] = torch.full(spec.shape, 981.0)
        elif spec.name == "time_ids":
            inputs[spec.name] = _time_ids(spec.shape, specs)
        elif component == "vae_encoder":
            inputs[spec.name] = torch.rand(spec.shape, generator=generator) * 2 - 1
        else:
            inputs[spec.name] = torch.randn(spec.shape, generator=generator)
    return inputs


def _time_ids(shape: list[int], specs: list[TensorSpec]) -> torch.Tensor:
    """What the SDXL pipelines feed: (height, width, crop top, crop left) then the target size (base)
    or an aesthetic score, 2.5 for the unconditional half and 6.0 for the prompt (refiner)."""
    batch, length = shape
    sample = next(s for s in specs if s.name == "sample")
    height, width = VAE_SCALE * sample.shape[2], VAE_SCALE * sample.shape[3]
    rows = []
    for row in range(batch):
        tail = [height, width] if length == 6 else [2.5 if row % 2 == 0 else 6.0]
        rows.append([height, width, 0, 0, *tail])
    return torch.tensor(rows, dtype=torch.float32)
