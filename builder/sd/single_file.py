"""Single-file `.safetensors` checkpoints without the network: which architecture a checkpoint holds,
and the diffusers config folder `from_single_file(config=...)` reads instead of the base model's hub
repository (model_index.json, scheduler, tokenizer(s), each component's config.json).

The configs are the presets' (`presets.py`: the real SD 1.5, SD 2.1 base, SDXL base and refiner
configs, and their tiny counterparts); a full-size one gets OpenAI's CLIP tokenizer (shipped in
`data/`), which real checkpoints were trained with, a tiny one the generated tokenizer its
embedding table is sized for. A single file carries no safety checker.
"""

from __future__ import annotations

import json
from pathlib import Path

from builder.errors import UserError
from builder.sd.presets import PRESETS, Preset
from builder.sd.synthetic import clip_text_config, model_index
from builder.sd.tokenizer_files import (
    CLIP_VOCAB_SIZE,
    EOS_TOKEN,
    write_openai_clip_tokenizer_folder,
    write_tokenizer_folder,
)

# Keys (original Stable Diffusion layout) that tell the architectures apart whatever their size:
# the text encoders' position embeddings, whose last dimension is each encoder's width.
_TEXT_KEYS = {
    "sdxl": (
        "conditioner.embedders.0.transformer.text_model.embeddings.position_embedding.weight",
        "conditioner.embedders.1.model.positional_embedding",
    ),
    "sdxl-refiner": ("conditioner.embedders.0.model.positional_embedding",),
    "sd-2": ("cond_stage_model.model.positional_embedding",),
    "sd-1": ("cond_stage_model.transformer.text_model.embeddings.position_embedding.weight",),
}
_NAMES = {"sd-1": "SD 1.x", "sd-2": "SD 2.x", "sdxl": "SDXL base", "sdxl-refiner": "SDXL refiner"}
# Presets with each architecture's configs, full size first.
_CANDIDATES = {
    "sd-1": ("sd-1-5", "tiny-sd"),
    "sd-2": ("sd-2-1-base", "tiny-sd2"),
    "sdxl": ("sdxl-base", "tiny-sdxl"),
    "sdxl-refiner": ("sdxl-refiner", "tiny-sdxl-refiner"),
}
# What each pipeline of the recipe (source stage param `family`) accepts.
_ACCEPTED = {"sd": ("sd-1", "sd-2"), "sdxl": ("sdxl",), "sdxl-refiner": ("sdxl-refiner",)}
_CONV_IN = "model.diffusion_model.input_blocks.0.0.weight"
# The real SD 2.x repositories pad their (OpenCLIP) tokenizer's output with "!", as SDXL's tokenizer_2
# does; CLIP's tokenizers pad with end-of-text.
_FIRST_TOKENIZER_PAD = {"sd-2-1-base": "!"}


def checkpoint_shapes(checkpoint: Path) -> dict[str, tuple[int, ...]]:
    """Every tensor's shape, read from the safetensors header alone."""
    from safetensors import safe_open

    with safe_open(str(checkpoint), framework="pt") as tensors:
        return {key: tuple(tensors.get_slice(key).get_shape()) for key in tensors.keys()}


def architecture(shapes: dict[str, tuple[int, ...]]) -> str:
    """sd-1, sd-2, sdxl or sdxl-refiner, from which text encoder keys the checkpoint has."""
    for kind, keys in _TEXT_KEYS.items():
        if all(key in shapes for key in keys):
            return kind
    raise UserError(
        "the checkpoint holds no Stable Diffusion text encoder sdbuild knows (SD 1.x, SD 2.x, SDXL base or refiner)",
        hint="use a full single-file checkpoint in the original Stable Diffusion layout, or a diffusers folder",
    )


def preset_for(shapes: dict[str, tuple[int, ...]], pipeline: str) -> str:
    """The preset whose configs describe this checkpoint, for the recipe's pipeline (sd, sdxl, sdxl-refiner)."""
    kind = architecture(shapes)
    if kind not in _ACCEPTED[pipeline]:
        wanted = " or ".join(_NAMES[k] for k in _ACCEPTED[pipeline])
        raise UserError(
            f"the checkpoint is an {_NAMES[kind]} checkpoint, but this source needs {wanted}",
            hint="set `family:` to match the checkpoint (sd for SD 1.x and 2.x, sdxl for SDXL), and give an SDXL "
            "refiner checkpoint as model.refiner",
        )
    conv_in = shapes.get(_CONV_IN)
    if conv_in is not None and conv_in[1] != 4:
        raise UserError(
            f"the checkpoint's UNet takes {conv_in[1]} input channels (an inpainting or other variant); "
            "sdbuild converts text-to-image UNets with 4",
            hint="use the base text-to-image checkpoint",
        )
    widths = tuple(shapes[key][-1] for key in _TEXT_KEYS[kind])
    for name in _CANDIDATES[kind]:
        preset = PRESETS[name]
        if conv_in == (_unet_width(preset), 4, 3, 3) and widths == _text_widths(preset):
            return name
    sizes = ", ".join(
        f"{name} (UNet width {_unet_width(PRESETS[name])}, text {_text_widths(PRESETS[name])})"
        for name in _CANDIDATES[kind]
    )
    raise UserError(
        f"the {_NAMES[kind]} checkpoint (UNet width {conv_in[0] if conv_in else '?'}, text {widths}) matches none of "
        f"the configs sdbuild ships: {sizes}",
        hint="convert it to a diffusers folder with its own configs and give that folder as model.local.path",
    )


def _unet_width(preset: Preset) -> int:
    return (preset.unet or {}).get("block_out_channels", [0])[0]


def _text_widths(preset: Preset) -> tuple[int, ...]:
    encoders = [c for c in (preset.text_encoder, preset.text_encoder_2) if c is not None]
    return tuple(c["hidden_size"] for c in encoders)


def write_config_folder(name: str, folder: Path) -> None:
    """The diffusers folder of preset `name` without weights, for `from_single_file(config=folder)`."""
    import diffusers

    preset = PRESETS[name]
    folder.mkdir(parents=True, exist_ok=True)
    real = any((c or {}).get("vocab_size") == CLIP_VOCAB_SIZE for c in (preset.text_encoder, preset.text_encoder_2))
    if preset.text_encoder is not None:
        tokenizer = _tokenizer(folder / "tokenizer", real, _FIRST_TOKENIZER_PAD.get(name, EOS_TOKEN))
        clip_text_config(preset.text_encoder, tokenizer).save_pretrained(folder / "text_encoder")
    if preset.text_encoder_2 is not None:
        tokenizer = _tokenizer(folder / "tokenizer_2", real, "!")
        clip_text_config(preset.text_encoder_2, tokenizer).save_pretrained(folder / "text_encoder_2")
    for component, class_name, config in (
        ("unet", "UNet2DConditionModel", preset.unet or {}),
        ("vae", "AutoencoderKL", preset.vae),
    ):
        (folder / component).mkdir(exist_ok=True)
        written = {"_class_name": class_name, "_diffusers_version": diffusers.__version__} | config
        (folder / component / "config.json").write_text(json.dumps(written, indent=2, sort_keys=True))
    (folder / "scheduler").mkdir(exist_ok=True)
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(preset.scheduler, indent=2, sort_keys=True))
    index = model_index(preset, with_safety_checker=False)
    if preset.family == "sd":
        index["requires_safety_checker"] = False
    (folder / "model_index.json").write_text(json.dumps(index, indent=2, sort_keys=True))


def _tokenizer(folder: Path, real: bool, pad_token: str):
    if real:
        return write_openai_clip_tokenizer_folder(folder, pad_token=pad_token)
    return write_tokenizer_folder(folder, pad_token=pad_token)
