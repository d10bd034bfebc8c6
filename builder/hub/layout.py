"""Which files of a hub repository a conversion reads, and whether a snapshot holds all of them.

Only safetensors, configs and tokenizer files are ever fetched: never pickled weights, never the
reduced-precision copies (`*.fp16.safetensors`) some repositories carry beside the full ones.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from enum import Enum
from pathlib import Path

_EXCLUDED = [
    "*.bin",
    "*.ckpt",
    "*.pt",
    "*.pth",
    "*.msgpack",
    "*.onnx",
    "*.h5",
    "*.fp16.safetensors",
    "*.fp16.safetensors.index.json",
]


class RepoKind(str, Enum):
    """What a repository holds: a whole diffusers pipeline, or one model at its root."""

    PIPELINE = "pipeline"  # model_index.json and one folder per component
    VAE = "vae"  # one AutoencoderKL (some repositories also hold single-file copies, not fetched)
    CONTROLNET = "controlnet"  # one ControlNetModel
    LORA = "lora"  # one LoRA file, named by the recipe (builder/hub/lora.py)


_PATTERNS = {
    RepoKind.PIPELINE: [
        "model_index.json",
        "*/config.json",
        "*/*.safetensors",
        "*/*.safetensors.index.json",
        "scheduler/*.json",
        "tokenizer*/*",
        "feature_extractor/*.json",
    ],
    RepoKind.VAE: [
        "config.json",
        "diffusion_pytorch_model*.safetensors",
        "diffusion_pytorch_model.safetensors.index.json",
    ],
    RepoKind.CONTROLNET: ["config.json", "*.safetensors", "*.safetensors.index.json"],
    RepoKind.LORA: [],  # the recipe's weight_name alone
}


# Pipeline folders that only one recipe component reads (T5-XXL alone is about 9 GB in float16):
# not fetched for a recipe that does not build it.
_OPTIONAL_FOLDERS = {
    "text_encoder_3": ("text_encoder_3", "tokenizer_3"),
    "safety_checker": ("safety_checker", "feature_extractor"),
}


def unread_folders(built: Iterable[str]) -> tuple[str, ...]:
    """The pipeline folders a recipe building the components `built` never reads."""
    components = set(built)
    return tuple(sorted(f for c, folders in _OPTIONAL_FOLDERS.items() if c not in components for f in folders))


def allow_patterns(kind: RepoKind) -> list[str]:
    return list(_PATTERNS[kind])


def ignore_patterns(unread: Iterable[str] = ()) -> list[str]:
    return [*_EXCLUDED, *(f"{folder}/*" for folder in unread)]


def wanted(relative: str, kind: RepoKind, unread: Iterable[str] = ()) -> bool:
    """Whether a file of the repository (posix path) is one a conversion reads."""
    from huggingface_hub.utils import filter_repo_objects

    ignored = ignore_patterns(unread)
    return bool(list(filter_repo_objects([relative], allow_patterns=_PATTERNS[kind], ignore_patterns=ignored)))


# model_index.json classes that are not weight-carrying models, and the files each needs.
_TOKENIZER_FILES = ("vocab.json", "merges.txt")
_NON_MODEL_FILES = {
    "CLIPTokenizer": _TOKENIZER_FILES,
    "CLIPTokenizerFast": _TOKENIZER_FILES,
    "CLIPImageProcessor": ("preprocessor_config.json",),
    "CLIPFeatureExtractor": ("preprocessor_config.json",),
    "T5TokenizerFast": ("tokenizer.json", "tokenizer_config.json"),  # SD3's tokenizer_3, as the bundle ships it
}


def missing_files(folder: Path, kind: RepoKind, unread: Iterable[str] = ()) -> list[str]:
    """Files a conversion needs that `folder` (a snapshot, or a copy of one) lacks, as repository
    paths; empty when it is complete. A cached snapshot can be partial (an interrupted download,
    or a download of other files of the same commit), and the hub client cannot always tell.
    Folders in `unread` are not needed."""
    if kind is not RepoKind.PIPELINE:
        return _missing_model(folder, "")
    index = folder / "model_index.json"
    if not index.is_file():
        return ["model_index.json"]
    try:
        components = json.loads(index.read_text())
    except ValueError:
        return ["model_index.json (unreadable)"]
    missing: list[str] = []
    skipped = set(unread)
    for name, value in sorted(components.items()):
        if name.startswith("_") or not isinstance(value, list) or len(value) != 2 or value[0] is None:
            continue
        if name in skipped:
            continue
        class_name = value[1] or ""
        if class_name in _NON_MODEL_FILES:
            needed = _NON_MODEL_FILES[class_name]
        elif class_name.endswith("Scheduler"):
            needed = ("scheduler_config.json",)
        else:
            missing += _missing_model(folder / name, f"{name}/")
            continue
        missing += [f"{name}/{file}" for file in needed if not (folder / name / file).is_file()]
    return missing


def _missing_model(folder: Path, prefix: str) -> list[str]:
    """A model folder needs its config and safetensors weights (every shard an index lists)."""
    missing = [] if (folder / "config.json").is_file() else [f"{prefix}config.json"]
    indexes = [p for p in folder.glob("*.safetensors.index.json") if ".fp16." not in p.name]
    shards: set[str] = set()
    for index in indexes:
        try:
            shards |= set(json.loads(index.read_text())["weight_map"].values())
        except (ValueError, KeyError, TypeError):
            missing.append(f"{prefix}{index.name} (unreadable)")
    if shards:
        missing += [f"{prefix}{shard}" for shard in sorted(shards) if not (folder / shard).is_file()]
    elif not any(".fp16." not in p.name for p in folder.glob("*.safetensors")):
        missing.append(f"{prefix}*.safetensors")
    return missing
