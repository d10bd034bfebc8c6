"""What each pipeline component is for conversion: its reference model, wrapper, inputs and outputs.

One place knows, per component, how to load the diffusers/transformers reference from a pipeline
folder, how to wrap it for the Swift contract, which fixed inputs exercise it and what the
reference answers. Stages call these; they never special-case a component themselves.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Generic, TypeVar, cast

import torch
from pydantic import BaseModel, ConfigDict
from torch import nn

from builder.errors import UserError
from builder.sd.ane import rewrite_unet
from builder.sd.ane.controlnet import (
    controlled_unet_reference,
    controlnet_reference,
    residual_names,
    residual_shapes,
    rewrite_controlled_unet,
    rewrite_controlnet,
)
from builder.sd.contract import SAFETY_CHECKER_IMAGE_SIZE
from builder.sd.modules import (
    SafetyCheckerModule,
    TextEncoderModule,
    TextEncoderXLModule,
    VaeDecoderModule,
    VaeEncoderModule,
    token_id,
)
from builder.sd.sd3.modules import (
    T5_SEQUENCE_LENGTH,
    MultiModalDiffusionTransformerModule,
    TextEncoderT5Module,
)
from builder.sd.tokenizer_files import MODEL_MAX_LENGTH

if TYPE_CHECKING:
    from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKL
    from diffusers.models.controlnets.controlnet import ControlNetModel
    from diffusers.models.transformers.transformer_sd3 import SD3Transformer2DModel
    from diffusers.models.unets.unet_2d_condition import UNet2DConditionModel
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, T5EncoderModel

TEXT_SEQUENCE_LENGTH = MODEL_MAX_LENGTH
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


Model = TypeVar("Model", bound=nn.Module)


@dataclass(frozen=True)
class ComponentKind(Generic[Model]):
    """Conversion knowledge for one component type; `Model` is the reference class its `load` makes."""

    subfolder: str  # "" for a model folder of its own (a ControlNet)
    output_names: tuple[str, ...] | Callable[[Model], tuple[str, ...]]  # fixed, or read off the reference
    load: Callable[[Path, str], Model]
    from_config: Callable[[dict], Model]
    wrap: Callable[[Model, str], nn.Module]  # (reference, attention) -> conversion module
    inputs: Callable[[Model, ComponentShape], list[TensorSpec]]
    reference: Callable[[Model, dict[str, torch.Tensor]], list[torch.Tensor]]
    # (pipeline folder, reference, input specs) -> example inputs, where seeded random tensors would
    # not exercise the component as the pipeline feeds it; None: `example_inputs`
    examples: Callable[[Path, Model, list[TensorSpec]], dict[str, torch.Tensor]] | None = None
    # yes/no outputs (1.0 or 0.0): checked for agreement with the reference, not scored by PSNR
    decision_outputs: tuple[str, ...] = ()
    # outputs' Core ML dtype; None: coremltools' choice (float16 for a float16 program)
    output_dtype: str | None = None
    # coremltools passes to skip: a pass that folds arithmetic into a weight renames it, and the
    # read-back of compressed weights finds each weight by its torch parameter's name
    skipped_passes: tuple[str, ...] = ()

    def outputs_of(self, model: Model) -> tuple[str, ...]:
        """The output names of the conversion module for `model`."""
        return self.output_names(model) if callable(self.output_names) else self.output_names


def _attention_free(wrapper: Callable[[Model], nn.Module]) -> Callable[[Model, str], nn.Module]:
    """Components without attention variants ignore the recipe's attention setting."""
    return lambda model, attention: wrapper(model)


def _load_clip(folder: Path, subfolder: str) -> CLIPTextModel:
    from transformers import CLIPTextModel

    # Eager attention adds our additive causal mask exactly as given.
    return CLIPTextModel.from_pretrained(folder, subfolder=subfolder, use_safetensors=True, attn_implementation="eager")


def _load_clip_with_projection(folder: Path, subfolder: str) -> CLIPTextModelWithProjection:
    from transformers import CLIPTextModelWithProjection

    return CLIPTextModelWithProjection.from_pretrained(
        folder, subfolder=subfolder, use_safetensors=True, attn_implementation="eager"
    )


def _load_unet(folder: Path, subfolder: str) -> UNet2DConditionModel:
    from diffusers.models.unets.unet_2d_condition import UNet2DConditionModel

    return UNet2DConditionModel.from_pretrained(folder, subfolder=subfolder, use_safetensors=True)


def _load_vae(folder: Path, subfolder: str) -> AutoencoderKL:
    from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKL

    # A replacement VAE (model.vae) is an AutoencoderKL folder with its config at the root.
    if not (folder / subfolder / "config.json").is_file() and (folder / "config.json").is_file():
        subfolder = ""
    return AutoencoderKL.from_pretrained(folder, subfolder=subfolder or None, use_safetensors=True)


def _load_safety_checker(folder: Path, subfolder: str) -> StableDiffusionSafetyChecker:
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker

    if not (folder / subfolder / "config.json").is_file():
        raise UserError(
            f"this pipeline has no {subfolder}/ folder to convert",
            hint="remove components.safety_checker (SD 2.x pipelines ship without one), or use a pipeline that has it",
        )
    return StableDiffusionSafetyChecker.from_pretrained(
        folder, subfolder=subfolder, use_safetensors=True, attn_implementation="eager"
    )


def _safety_checker_from_config(config: dict) -> StableDiffusionSafetyChecker:
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPConfig

    return StableDiffusionSafetyChecker._from_config(CLIPConfig.from_dict(config), attn_implementation="eager")


def _load_controlnet(folder: Path, subfolder: str) -> ControlNetModel:
    from diffusers.models.controlnets.controlnet import ControlNetModel

    if not (folder / subfolder / "config.json").is_file():
        raise UserError(
            f"{folder.name} holds no ControlNet (no config.json)",
            hint="point the ControlNet source at a diffusers ControlNetModel folder or repository",
        )
    return ControlNetModel.from_pretrained(folder / subfolder, use_safetensors=True)


def _controlnet_from_config(config: dict) -> ControlNetModel:
    from diffusers.models.controlnets.controlnet import ControlNetModel

    return ControlNetModel.from_config(config)


def _clip_from_config(config: dict) -> CLIPTextModel:
    from transformers import CLIPTextConfig, CLIPTextModel

    return CLIPTextModel._from_config(CLIPTextConfig.from_dict(config), attn_implementation="eager")


def _clip_with_projection_from_config(config: dict) -> CLIPTextModelWithProjection:
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    return CLIPTextModelWithProjection._from_config(CLIPTextConfig.from_dict(config), attn_implementation="eager")


def _unet_from_config(config: dict) -> UNet2DConditionModel:
    from diffusers.models.unets.unet_2d_condition import UNet2DConditionModel

    return UNet2DConditionModel.from_config(config)


def _vae_from_config(config: dict) -> AutoencoderKL:
    from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKL

    return AutoencoderKL.from_config(config)


def _load_t5(folder: Path, subfolder: str) -> T5EncoderModel:
    from transformers import T5EncoderModel

    return T5EncoderModel.from_pretrained(folder, subfolder=subfolder, use_safetensors=True)


def _t5_from_config(config: dict) -> T5EncoderModel:
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(T5Config.from_dict(config))


def _load_mmdit(folder: Path, subfolder: str) -> SD3Transformer2DModel:
    from diffusers.models.transformers.transformer_sd3 import SD3Transformer2DModel

    return SD3Transformer2DModel.from_pretrained(folder, subfolder=subfolder, use_safetensors=True)


def _mmdit_from_config(config: dict) -> SD3Transformer2DModel:
    from diffusers.models.transformers.transformer_sd3 import SD3Transformer2DModel

    return SD3Transformer2DModel.from_config(config)


def _t5_inputs(model: nn.Module, shape: ComponentShape) -> list[TensorSpec]:
    return [TensorSpec(name="input_ids", shape=[1, T5_SEQUENCE_LENGTH], dtype="float32")]


def _t5_examples(folder: Path, model: T5EncoderModel, specs: list[TensorSpec]) -> dict[str, torch.Tensor]:
    """A prompt's ids as the Swift package sends them: tokens, end-of-sequence, then padding."""
    config = model.config
    (spec,) = specs
    ids = torch.randint(3, config.vocab_size, spec.shape, generator=torch.Generator().manual_seed(0))
    length = spec.shape[1] // 2
    ids[:, length] = int(cast(int, config.eos_token_id))
    ids[:, length + 1 :] = int(cast(int, config.pad_token_id))
    return {spec.name: ids.to(torch.float32)}


def _t5_reference(model: T5EncoderModel, inputs: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    hidden = model(input_ids=inputs["input_ids"].long()).last_hidden_state
    return [hidden.transpose(1, 2).unsqueeze(2)]


def _mmdit_inputs(model: SD3Transformer2DModel, shape: ComponentShape) -> list[TensorSpec]:
    """The Swift pipeline's MMDiT inputs: CLIP-L and CLIP-G's 77 tokens, then T5's 77, on the last axis."""
    h, w = shape.latent_size
    b = shape.batch_size
    config = model.config
    return [
        TensorSpec(name="latent_image_embeddings", shape=[b, config["in_channels"], h, w], dtype="float16"),
        # the flow-matching timestep (sigma x 1000) is not a whole number: float16 would round it by up to 0.25
        TensorSpec(name="timestep", shape=[b], dtype="float32"),
        TensorSpec(
            name="token_level_text_embeddings",
            shape=[b, config["joint_attention_dim"], 1, TEXT_SEQUENCE_LENGTH + T5_SEQUENCE_LENGTH],
            dtype="float16",
        ),
        TensorSpec(name="pooled_text_embeddings", shape=[b, config["pooled_projection_dim"], 1, 1], dtype="float16"),
    ]


def _mmdit_reference(model: SD3Transformer2DModel, inputs: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    return [
        model(
            hidden_states=inputs["latent_image_embeddings"],
            encoder_hidden_states=inputs["token_level_text_embeddings"].squeeze(2).transpose(1, 2),
            pooled_projections=inputs["pooled_text_embeddings"].flatten(1),
            timestep=inputs["timestep"],
        ).sample
    ]


def _text_inputs(model: nn.Module, shape: ComponentShape) -> list[TensorSpec]:
    return [TensorSpec(name="input_ids", shape=[1, TEXT_SEQUENCE_LENGTH], dtype="float32")]


def _unet_inputs(model: UNet2DConditionModel | ControlNetModel, shape: ComponentShape) -> list[TensorSpec]:
    h, w = shape.latent_size
    b = shape.batch_size
    specs = [
        TensorSpec(name="sample", shape=[b, model.config["in_channels"], h, w], dtype="float16"),
        TensorSpec(name="timestep", shape=[b], dtype="float16"),
        TensorSpec(
            name="encoder_hidden_states",
            shape=[b, model.config["cross_attention_dim"], 1, TEXT_SEQUENCE_LENGTH],
            dtype="float16",
        ),
    ]
    if model.config.get("addition_embed_type") == "text_time":
        specs += [
            TensorSpec(
                name="text_embeds", shape=[b, _text_embeds_width(model.config, shape.time_ids)], dtype="float16"
            ),
            TensorSpec(name="time_ids", shape=[b, shape.time_ids], dtype="float16"),
        ]
    return specs


def _text_embeds_width(config: dict[str, Any], time_ids: int) -> int:
    """Width of the pooled text input: what the add-embedding takes besides the time_ids' embedding."""
    projection, addition = config["projection_class_embeddings_input_dim"], config["addition_time_embed_dim"]
    width = projection - time_ids * addition
    if width <= 0:
        raise UserError(
            f"unet: config projection_class_embeddings_input_dim={projection} "
            f"leaves no room for the pooled text embedding next to {time_ids} time_ids of "
            f"addition_time_embed_dim={addition}",
            hint="check that the checkpoint is an SDXL base (6 time_ids) or refiner (model_index.json "
            "requires_aesthetics_score: true, 5 time_ids)",
        )
    return width


def _controlled_unet_inputs(model: UNet2DConditionModel, shape: ComponentShape) -> list[TensorSpec]:
    shapes = residual_shapes(model, shape.batch_size, shape.latent_size)
    residuals = [
        TensorSpec(name=n, shape=s, dtype="float16") for n, s in zip(residual_names(len(shapes)), shapes, strict=False)
    ]
    return _unet_inputs(model, shape) + residuals


def _controlnet_inputs(model: ControlNetModel, shape: ComponentShape) -> list[TensorSpec]:
    h, w = shape.latent_size
    b = shape.batch_size
    return _unet_inputs(model, shape) + [
        TensorSpec(
            name="controlnet_cond",
            shape=[b, model.config["conditioning_channels"], VAE_SCALE * h, VAE_SCALE * w],
            dtype="float16",
        )
    ]


def _residual_outputs(model: nn.Module) -> tuple[str, ...]:
    return residual_names(len(residual_shapes(model, 1, (8, 8))))


def _vae_decoder_inputs(model: AutoencoderKL, shape: ComponentShape) -> list[TensorSpec]:
    h, w = shape.latent_size
    return [TensorSpec(name="z", shape=[1, model.config["latent_channels"], h, w], dtype="float16")]


def _vae_encoder_inputs(model: AutoencoderKL, shape: ComponentShape) -> list[TensorSpec]:
    h, w = shape.latent_size
    return [
        TensorSpec(name="sample", shape=[1, model.config["in_channels"], VAE_SCALE * h, VAE_SCALE * w], dtype="float16")
    ]


def _safety_checker_inputs(model: StableDiffusionSafetyChecker, shape: ComponentShape) -> list[TensorSpec]:
    # The Swift package always sends 512 x 512 images, whatever the pipeline's image size (it ignores
    # the filtered images), so that input does not follow the recipe's size.
    side = model.config.vision_config.image_size
    image = SAFETY_CHECKER_IMAGE_SIZE
    return [
        TensorSpec(name="clip_input", shape=[1, 3, side, side], dtype="float32"),
        TensorSpec(name="images", shape=[1, image, image, 3], dtype="float16"),
        TensorSpec(name="adjustment", shape=[1], dtype="float32"),
    ]


def _safety_checker_examples(
    folder: Path, model: StableDiffusionSafetyChecker, specs: list[TensorSpec]
) -> dict[str, torch.Tensor]:
    """A seeded random image, preprocessed by the pipeline's own feature extractor, at adjustment 0."""
    from transformers import CLIPImageProcessor

    if not (folder / "feature_extractor" / "preprocessor_config.json").is_file():
        raise UserError(
            "this pipeline has a safety checker but no feature_extractor/preprocessor_config.json",
            hint="add the pipeline's feature_extractor folder (CLIP's image preprocessing), "
            "or remove components.safety_checker",
        )
    processor = CLIPImageProcessor.from_pretrained(folder / "feature_extractor")
    shapes = {spec.name: spec.shape for spec in specs}
    images = torch.rand(shapes["images"], generator=torch.Generator().manual_seed(0))
    pixels = (images[0].numpy() * 255).round().astype("uint8")
    clip_input = processor(images=[pixels], return_tensors="pt").pixel_values.to(torch.float32)
    return {"clip_input": clip_input, "images": images, "adjustment": torch.zeros(shapes["adjustment"])}


def _safety_checker_reference(
    model: StableDiffusionSafetyChecker, inputs: dict[str, torch.Tensor]
) -> list[torch.Tensor]:
    """diffusers' forward_onnx (adjustment 0 is built into it), plus the concept scores it thresholds."""
    from diffusers.pipelines.stable_diffusion.safety_checker import cosine_distance

    if inputs["adjustment"].abs().max() > 0:
        raise ValueError("diffusers' safety checker reference is defined at adjustment 0 only")
    clip_input = inputs["clip_input"]
    images, flagged = model.forward_onnx(clip_input, inputs["images"].clone())
    embeds = model.visual_projection(model.vision_model(clip_input)[1])
    special = cosine_distance(embeds, model.special_care_embeds) - model.special_care_embeds_weights
    boost = torch.any(special > 0, dim=1).to(embeds.dtype)[:, None] * 0.01
    scores = cosine_distance(embeds, model.concept_embeds) - model.concept_embeds_weights + boost
    return [images, flagged.to(embeds.dtype), scores]


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


def _vae_decoder_reference(model: AutoencoderKL, inputs: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    return [model.decode(inputs["z"]).sample]


def _vae_encoder_reference(model: AutoencoderKL, inputs: dict[str, torch.Tensor]) -> list[torch.Tensor]:
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

KINDS: dict[str, ComponentKind[Any]] = {
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
    "controlled_unet": ComponentKind(
        subfolder="unet",
        output_names=("noise_pred",),
        load=_load_unet,
        from_config=_unet_from_config,
        wrap=rewrite_controlled_unet,
        inputs=_controlled_unet_inputs,
        reference=controlled_unet_reference,
    ),
    "controlnet": ComponentKind(
        subfolder="",
        output_names=_residual_outputs,
        load=_load_controlnet,
        from_config=_controlnet_from_config,
        wrap=rewrite_controlnet,
        inputs=_controlnet_inputs,
        reference=controlnet_reference,
        # SwiftPM's ControlNet.swift sums several ControlNets' outputs reading them as Float32 buffers
        output_dtype="float32",
        # diffusers multiplies every residual by conditioning_scale (1.0), which fuse_conv_scale folds
        # into the zero-convolutions' weights under new names
        skipped_passes=("common::fuse_conv_scale",),
    ),
    "text_encoder_3": ComponentKind(
        subfolder="text_encoder_3",
        output_names=("encoder_hidden_states",),
        load=_load_t5,
        from_config=_t5_from_config,
        wrap=_attention_free(TextEncoderT5Module),
        inputs=_t5_inputs,
        reference=_t5_reference,
        examples=_t5_examples,
    ),
    "mmdit": ComponentKind(
        subfolder="transformer",
        output_names=("denoiser_output",),
        load=_load_mmdit,
        from_config=_mmdit_from_config,
        wrap=_attention_free(MultiModalDiffusionTransformerModule),
        inputs=_mmdit_inputs,
        reference=_mmdit_reference,
    ),
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
    "safety_checker": ComponentKind(
        subfolder="safety_checker",
        output_names=("filtered_images", "has_nsfw_concepts", "concept_scores"),
        load=_load_safety_checker,
        from_config=_safety_checker_from_config,
        wrap=_attention_free(SafetyCheckerModule),
        inputs=_safety_checker_inputs,
        reference=_safety_checker_reference,
        examples=_safety_checker_examples,
        decision_outputs=("has_nsfw_concepts",),
    ),
}


# Components whose interface differs by pipeline family.
FAMILY_KINDS: dict[tuple[str, str], ComponentKind[Any]] = {
    ("sdxl", "text_encoder"): ComponentKind(
        subfolder="text_encoder",
        output_names=("hidden_embeds", "pooled_outputs"),
        load=_load_clip,
        from_config=_clip_from_config,
        wrap=_attention_free(TextEncoderXLModule),
        inputs=_text_inputs,
        reference=_xl_text_reference,
    ),
    # SD3's first encoder is CLIP-L with its projection: penultimate states and the projected pooled state
    ("sd3", "text_encoder"): ComponentKind(
        subfolder="text_encoder",
        output_names=("hidden_embeds", "pooled_outputs"),
        load=_load_clip_with_projection,
        from_config=_clip_with_projection_from_config,
        wrap=_attention_free(TextEncoderXLModule),
        inputs=_text_inputs,
        reference=_xl_text_reference,
    ),
}


def kind(component: str, family: str = "sd") -> ComponentKind[Any]:
    """Conversion knowledge for `component` in `family`, or a clear error for one not supported yet."""
    try:
        return FAMILY_KINDS.get((family, component)) or KINDS[component]
    except KeyError:
        raise UserError(
            f"component '{component}' cannot be converted yet",
            hint=f"remove it from the recipe's components; supported: {', '.join(KINDS)}",
        ) from None


def examples_for(component: str, folder: Path, model: nn.Module, specs: list[TensorSpec]) -> dict[str, torch.Tensor]:
    """The fixed inputs that exercise `component` (read from the pipeline `folder` where it must be)."""
    custom = kind(component).examples
    return custom(folder, model, specs) if custom is not None else example_inputs(component, model, specs)


def example_inputs(component: str, model: nn.Module, specs: list[TensorSpec], seed: int = 0) -> dict[str, torch.Tensor]:
    """Fixed random inputs in the value ranges the pipeline really feeds each feature."""
    generator = torch.Generator().manual_seed(seed)
    inputs: dict[str, torch.Tensor] = {}
    for spec in specs:
        if spec.name == "input_ids":
            config = cast("CLIPTextConfig", model.config)  # only the CLIP text encoders take input_ids
            eos = token_id(config, "eos_token_id")
            ids = torch.randint(0, config.vocab_size, spec.shape, generator=generator)
            ids[ids == eos] = 0
            ids[:, 0] = token_id(config, "bos_token_id")
            ids[:, spec.shape[1] // 2 :] = eos  # prompt, end-of-text, padding
            inputs[spec.name] = ids.to(torch.float32)
        elif spec.name == "timestep":
            inputs[spec.name] = torch.full(spec.shape, 981.0)
        elif spec.name == "time_ids":
            inputs[spec.name] = _time_ids(spec.shape, specs)
        elif component == "vae_encoder":  # an image in [-1, 1]
            inputs[spec.name] = torch.rand(spec.shape, generator=generator) * 2 - 1
        elif spec.name == "controlnet_cond":  # a conditioning image in [0, 1]
            inputs[spec.name] = torch.rand(spec.shape, generator=generator)
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
