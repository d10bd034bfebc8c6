"""What a diffusers folder must hold before a stage loads it: safetensors weights where a component
is read, and configs within the sizes Stable Diffusion models have.

diffusers and transformers build whatever a config.json asks for, so a config with a million text
encoder layers allocates for minutes before failing, and a folder with only pickled weights fails
deep inside a worker. These checks run at plan time for local folders and in the rewrite stage for
downloaded ones, and say what was found. Torch-free, so planning stays fast.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth", ".pkl", ".pickle")
_CONFIG_BYTES = 1 << 20

# Where each component's weights sit in a pipeline folder; "" is a single-model folder's root.
SUBFOLDERS: dict[str, str] = {
    "text_encoder": "text_encoder",
    "text_encoder_2": "text_encoder_2",
    "text_encoder_3": "text_encoder_3",
    "mmdit": "transformer",
    "unet": "unet",
    "unet_refiner": "unet",
    "controlled_unet": "unet",
    "vae_decoder": "vae",
    "vae_encoder": "vae",
    "safety_checker": "safety_checker",
    "controlnet": "",
}

# Upper bounds of config values, well above every released SD 1.x, 2.x and SDXL model (CLIP-G:
# 32 layers, width 1280; SDXL UNet: 1280 channels, 10 transformer layers per block).
_TEXT_LIMITS = {
    "num_hidden_layers": 64,
    "hidden_size": 4096,
    "num_attention_heads": 64,
    "intermediate_size": 16384,
    "max_position_embeddings": 1024,
    "vocab_size": 1_000_000,
    "projection_dim": 4096,
}
_UNET_LIMITS = {
    "block_out_channels": 4096,
    "layers_per_block": 8,
    "transformer_layers_per_block": 16,
    "cross_attention_dim": 4096,
    "attention_head_dim": 256,
    "num_attention_heads": 64,
    "in_channels": 16,
    "out_channels": 16,
    "norm_num_groups": 64,
    "sample_size": 1024,
    "projection_class_embeddings_input_dim": 8192,
    "addition_time_embed_dim": 1024,
    "conditioning_channels": 16,
}
_VAE_LIMITS = {
    "block_out_channels": 2048,
    "layers_per_block": 8,
    "latent_channels": 16,
    "in_channels": 16,
    "out_channels": 16,
    "norm_num_groups": 64,
    "sample_size": 4096,
}
# SD3's T5-XXL (24 layers, width 4096, 64 heads) and MMDiT (SD3.5 large: 38 layers, 38 heads of 64).
_T5_LIMITS = {
    "num_layers": 64,
    "d_model": 8192,
    "d_kv": 256,
    "d_ff": 32768,
    "num_heads": 128,
    "vocab_size": 1_000_000,
    "relative_attention_num_buckets": 1024,
}
_MMDIT_LIMITS = {
    "num_layers": 64,
    "attention_head_dim": 256,
    "num_attention_heads": 64,
    "joint_attention_dim": 8192,
    "caption_projection_dim": 8192,
    "pooled_projection_dim": 8192,
    "in_channels": 16,
    "out_channels": 16,
    "patch_size": 8,
    "sample_size": 1024,
    "pos_embed_max_size": 1024,
}
_LEVELS = 6  # entries of block_out_channels / block types
_LIMITS = {
    "text_encoder": _TEXT_LIMITS,
    "text_encoder_2": _TEXT_LIMITS,
    "text_encoder_3": _T5_LIMITS,
    "mmdit": _MMDIT_LIMITS,
    "vae": _VAE_LIMITS,
}


class ModelFolderProblem(ValueError):
    """What is wrong with a model folder, and how to fix it."""

    def __init__(self, message: str, hint: str):
        super().__init__(message)
        self.message = message
        self.hint = hint


def _files(folder: Path) -> list[str]:
    return sorted(
        Path(base, name).relative_to(folder).as_posix() for base, _, names in os.walk(folder) for name in names
    )


def _listing(names: list[str], limit: int = 5) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def component_folder(folder: Path, component: str) -> Path:
    """The folder holding `component`'s config and weights: its pipeline subfolder, or the root of a
    single-model folder (a replacement VAE, a ControlNet)."""
    sub = SUBFOLDERS.get(component, component)
    if sub and (folder / sub / "config.json").is_file():
        return folder / sub
    return folder if (folder / "config.json").is_file() else folder / sub


def check_weights(folder: Path, components: list[str]) -> None:
    """Every component read from `folder` has a config and safetensors weights; raises
    ModelFolderProblem naming what the folder holds instead."""
    everything = _files(folder)
    if not everything:
        raise ModelFolderProblem(
            f"{folder} holds no files", "point at a diffusers folder (model_index.json, one folder per component)"
        )
    for component in components:
        where = component_folder(folder, component)
        found = _files(where) if where.is_dir() else []
        relative = where.relative_to(folder).as_posix() if where != folder else "."
        weights = [name for name in found if name.endswith(".safetensors")]
        pickles = [name for name in found if name.endswith(PICKLE_SUFFIXES)]
        if weights and (where / "config.json").is_file():
            continue
        if not found:
            what = f"has no {relative}/ folder" if not where.is_dir() else f"has an empty {relative}/ folder"
        elif pickles and not weights:
            what = f"holds only pickled weights in {relative}/ ({_listing(pickles)}), which sdbuild never loads"
        elif not weights:
            what = f"holds no weights (*.safetensors) in {relative}/; found {_listing(found)}"
        else:
            what = f"has no config.json in {relative}/"
        raise ModelFolderProblem(
            f"{folder.name}/ cannot provide {component}: it {what}",
            "convert the weights to safetensors (e.g. diffusers' save_pretrained(safe_serialization=True)) "
            "and keep each component's config.json beside them",
        )


def check_config(folder: Path, component: str) -> None:
    """`component`'s config.json in `folder` is JSON within the bounds of real SD models."""
    config_file = component_folder(folder, component) / "config.json"
    if not config_file.is_file():
        return  # check_weights (or the loader) reports a missing config
    config = _read_config(config_file, folder)
    kind = "vae" if component.startswith("vae") else component
    limits = _LIMITS.get(kind, _UNET_LIMITS if kind != "safety_checker" else {})
    shown = config_file.relative_to(folder.parent).as_posix()
    for key, limit in limits.items():
        if key not in config or config[key] is None:
            continue
        values = config[key] if isinstance(config[key], list) else [config[key]]
        if isinstance(config[key], list) and len(values) > _LEVELS:
            raise _bad(shown, key, config[key], f"at most {_LEVELS} entries")
        # One level of nesting: e.g. SDXL refiners give transformer_layers_per_block per layer.
        flat = [inner for value in values for inner in (value if isinstance(value, list) else [value])]
        if len(flat) > _LEVELS * _LEVELS or not all(_whole(v) and 0 < v <= limit for v in flat):
            raise _bad(shown, key, config[key], f"whole numbers from 1 to {limit}")
    heads, width = config.get("num_attention_heads"), config.get("hidden_size")
    if kind.startswith("text_encoder") and isinstance(heads, int) and isinstance(width, int) and width % heads:
        raise _bad(shown, "hidden_size", width, f"a multiple of num_attention_heads ({heads})")


def _whole(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _read_config(config_file: Path, folder: Path) -> dict[str, Any]:
    shown = config_file.relative_to(folder.parent).as_posix()
    try:
        if config_file.stat().st_size > _CONFIG_BYTES:
            raise ValueError(f"larger than {_CONFIG_BYTES >> 10} KiB")
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as problem:
        raise ModelFolderProblem(
            f"{shown} is not a readable JSON config ({problem})", "restore the model's config.json"
        ) from None
    if not isinstance(config, dict):
        raise ModelFolderProblem(f"{shown} is not a JSON object", "restore the model's config.json")
    return config


def _bad(shown: str, key: str, value: Any, expected: str) -> ModelFolderProblem:
    text = json.dumps(value)
    text = text if len(text) <= 60 else text[:60] + "..."
    return ModelFolderProblem(
        f"{shown}: {key} is {text}; Stable Diffusion models have {expected}",
        "restore the model's config.json; a config this large would allocate memory without bound",
    )


def check_family(folder: Path, family: str) -> None:
    """A pipeline folder's model_index.json names its pipeline class; an SDXL class under family sd
    (or the reverse) would fail late, at the bundle, with the wrong field blamed."""
    index = folder / "model_index.json"
    if not index.is_file():
        return
    pipeline = _read_config(index, folder).get("_class_name")
    if not isinstance(pipeline, str) or not pipeline.startswith("StableDiffusion"):
        return
    found = (
        "sdxl"
        if pipeline.startswith("StableDiffusionXL")
        else "sd3"
        if pipeline.startswith("StableDiffusion3")
        else "sd"
    )
    if found != family:
        raise ModelFolderProblem(
            f"{folder.name}/model_index.json names a {pipeline} ({found}), but the recipe says family: {family}",
            f"set `family: {found}`, or point at a {family} pipeline folder",
        )
