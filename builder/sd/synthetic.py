"""Write a diffusers-format pipeline folder with seeded random weights from a preset.

Weights come from one seeded CPU generator, component by component in a fixed order, so the same
preset and seed give identical tensors on any machine. This is what tests and the default build use
instead of downloading checkpoints.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import torch

from builder.sd.presets import Preset
from builder.sd.tokenizer_files import TokenizerInfo, write_tokenizer_folder

if TYPE_CHECKING:
    from diffusers.models.modeling_utils import ModelMixin
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import PreTrainedModel

Built = TypeVar("Built", bound=torch.nn.Module)

# Normal(0, std) for matrices; norms and biases keep their (deterministic) defaults. A small std
# keeps activations in the range real checkpoints have, so float16 behaves as it would for them.
_WEIGHT_STD = 0.02


def _randomize(module: torch.nn.Module, generator: torch.Generator) -> None:
    with torch.no_grad():
        for name, parameter in module.named_parameters():
            if parameter.dim() >= 2:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * _WEIGHT_STD)
            elif name.endswith("bias"):
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * _WEIGHT_STD)


def _seeded(build: Callable[[], Built], generator: torch.Generator) -> Built:
    """`build()` holding exactly the weights `_randomize` would give it, constructed once.

    The constructors' own initialisation (random draws over every weight of a full-size UNet, then
    thrown away) was most of a synthetic source stage: parameters are created without storage and
    filled straight from `generator` in `_randomize`'s order; norm scales take their initial 1.
    Buffers are built by the constructors as usual. A module with other 1-D parameters is built the
    slow way, since their initial values are the constructors' to choose.
    """
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=False):
        module = build()
    owners: dict[int, list[tuple[torch.nn.Module, str]]] = {}
    for name, parameter in module.named_parameters(remove_duplicate=False):
        path, _, attribute = name.rpartition(".")
        owners.setdefault(id(parameter), []).append((module.get_submodule(path), attribute))
    for name, parameter in module.named_parameters():
        owner = owners[id(parameter)][0][0]
        if parameter.dim() < 2 and not name.endswith("bias") and not isinstance(owner, _UNIT_SCALED):
            module = build()
            _randomize(module, generator)
            return module
    with torch.no_grad():
        for name, parameter in module.named_parameters():
            if parameter.dim() >= 2 or name.endswith("bias"):
                value = torch.randn(parameter.shape, generator=generator) * _WEIGHT_STD
            else:
                value = torch.ones(parameter.shape)
            filled = torch.nn.Parameter(value.to(parameter.dtype), requires_grad=parameter.requires_grad)
            for owner, attribute in owners[id(parameter)]:
                owner._parameters[attribute] = filled
    return module


_UNIT_SCALED = (torch.nn.LayerNorm, torch.nn.GroupNorm)  # their scale starts at 1, their shift is a bias


# A random vision tower maps every image to nearly the same embedding, at cosine distances of about
# 1/sqrt(projection_dim) from random concept embeddings. Thresholds of 2-3 times that flag nothing at
# adjustment 0, so a synthetic pipeline behaves like a real one on ordinary images; a positive
# `adjustment` input (about +0.5 for tiny-sd) makes it flag, which the tests use for the other answer.
_CONCEPT_THRESHOLD_LOW, _CONCEPT_THRESHOLD_HIGH = 2.0, 3.0


def _synthetic_safety_checker(config: dict, generator: torch.Generator) -> StableDiffusionSafetyChecker:
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPConfig

    # Its CLIP vision tower has a 1-D class embedding that `_randomize` leaves at its initial value,
    # drawn from torch's global generator: seed that too, without disturbing the caller's.
    with torch.random.fork_rng():
        torch.manual_seed(generator.initial_seed())
        checker = StableDiffusionSafetyChecker(CLIPConfig(**config)).eval()
    _randomize(checker, generator)
    low, high = (bound / config["projection_dim"] ** 0.5 for bound in (_CONCEPT_THRESHOLD_LOW, _CONCEPT_THRESHOLD_HIGH))
    with torch.no_grad():
        for weights in (checker.concept_embeds_weights, checker.special_care_embeds_weights):
            weights.copy_(low + torch.rand(weights.shape, generator=generator) * (high - low))
    return checker


def _write_feature_extractor(folder: Path, image_size: int) -> None:
    """CLIP's preprocessing (resize, centre crop, normalise) for the safety checker's input."""
    from transformers import CLIPImageProcessor

    CLIPImageProcessor(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    ).save_pretrained(folder)


def write_synthetic_pipeline(preset: Preset, seed: int, folder: Path) -> None:
    """Create `folder` as a diffusers folder its family's pipeline loads (SD, SDXL base or refiner)."""
    from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKL
    from diffusers.models.unets.unet_2d_condition import UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    folder.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(seed)
    if preset.family == "sd3":
        from builder.sd.sd3.synthetic import write_sd3_pipeline

        write_sd3_pipeline(preset, generator, folder, _seeded)
        return
    if preset.unet is None:
        raise ValueError(f"a {preset.family} preset needs a UNet: {preset.description}")
    unet = preset.unet
    tokenizer = write_tokenizer_folder(folder / "tokenizer")

    builders: dict[str, Callable[[], ModelMixin | PreTrainedModel]] = {}
    if (text_config := preset.text_encoder) is not None:
        builders["text_encoder"] = lambda: CLIPTextModel(clip_text_config(text_config, tokenizer))
    if (text_config_2 := preset.text_encoder_2) is not None:
        builders["text_encoder_2"] = lambda: CLIPTextModelWithProjection(clip_text_config(text_config_2, tokenizer))
    builders["unet"] = lambda: UNet2DConditionModel(**unet)
    builders["vae"] = lambda: AutoencoderKL(**preset.vae)
    # One model in memory at a time: a full-size pipeline never holds more than its UNet.
    for name, build in builders.items():
        module = _seeded(build, generator).eval()
        module.save_pretrained(folder / name, safe_serialization=True)
        del module
    if preset.text_encoder_2 is not None:
        write_tokenizer_folder(folder / "tokenizer_2", pad_token="!")
    if preset.safety_checker is not None:  # drawn after the other components, so their weights do not move
        checker = _synthetic_safety_checker(preset.safety_checker, generator)
        checker.save_pretrained(folder / "safety_checker", safe_serialization=True)
        _write_feature_extractor(folder / "feature_extractor", checker.config.vision_config.image_size)
    (folder / "scheduler").mkdir(exist_ok=True)
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(preset.scheduler, indent=2, sort_keys=True))
    (folder / "model_index.json").write_text(json.dumps(model_index(preset), indent=2, sort_keys=True))


def clip_text_config(config: dict, tokenizer: TokenizerInfo):
    """A preset's text encoder config with the special token ids of the tokenizer it is used with."""
    from transformers import CLIPTextConfig

    # Full-size presets keep the real embedding table size; ids past a generated tokenizer's stay unused.
    return CLIPTextConfig(
        **({"vocab_size": tokenizer.vocab_size} | config),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def model_index(preset: Preset, *, with_safety_checker: bool = True) -> dict:
    """The pipeline's model_index.json: which class loads it and which components it has (the safety
    checker only when the preset has one and `with_safety_checker`)."""
    common = {
        "scheduler": ["diffusers", preset.scheduler["_class_name"]],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    if preset.family == "sd":
        has_checker = preset.safety_checker is not None and with_safety_checker
        return common | {
            "_class_name": "StableDiffusionPipeline",
            "feature_extractor": ["transformers", "CLIPImageProcessor"] if has_checker else [None, None],
            "requires_safety_checker": has_checker,
            "safety_checker": ["stable_diffusion", "StableDiffusionSafetyChecker"] if has_checker else [None, None],
            "text_encoder": ["transformers", "CLIPTextModel"],
            "tokenizer": ["transformers", "CLIPTokenizer"],
        }
    has_first = preset.text_encoder is not None
    return common | {
        # diffusers' SDXL refiner checkpoint is an image-to-image pipeline without the first encoder
        "_class_name": "StableDiffusionXLImg2ImgPipeline"
        if preset.requires_aesthetics_score
        else "StableDiffusionXLPipeline",
        "force_zeros_for_empty_prompt": not preset.requires_aesthetics_score,
        **({"requires_aesthetics_score": True} if preset.requires_aesthetics_score else {}),
        "text_encoder": ["transformers", "CLIPTextModel"] if has_first else [None, None],
        "tokenizer": ["transformers", "CLIPTokenizer"] if has_first else [None, None],
        "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
        "tokenizer_2": ["transformers", "CLIPTokenizer"],
    }


def write_synthetic_controlnet(config: dict, seed: int, folder: Path) -> None:
    """Create `folder` as a diffusers ControlNetModel folder with seeded random weights.

    Its zero-initialised output convolutions are randomised too, so its residuals are not all zero.
    """
    from diffusers.models.controlnets.controlnet import ControlNetModel

    controlnet = ControlNetModel(**config).eval()
    _randomize(controlnet, torch.Generator().manual_seed(seed))
    controlnet.save_pretrained(folder, safe_serialization=True)
