"""Which components a LoRA file changes, read from its safetensors header alone (no tensor, no torch).

Planning needs this to key only the affected components' stages: a LoRA with UNet weights alone must
not make the text encoders stale. Both layouts diffusers loads are recognised: its own (`unet.…`,
`text_encoder.…`, `text_encoder_2.…`) and kohya's (`lora_unet_…`, `lora_te_…`/`lora_te1_…`, `lora_te2_…`).
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

# Key prefix -> the component it targets; the longer kohya prefixes are tried first.
_PREFIXES: tuple[tuple[str, str], ...] = (
    ("text_encoder_2.", "text_encoder_2"),
    ("text_encoder.", "text_encoder"),
    ("unet.", "unet"),
    ("lora_te2_", "text_encoder_2"),
    ("lora_te1_", "text_encoder"),
    ("lora_te_", "text_encoder"),
    ("lora_unet_", "unet"),
)
LORA_COMPONENTS = ("unet", "text_encoder", "text_encoder_2")
_MAX_HEADER = 100 * 1024 * 1024  # safetensors' own bound on a header


class LoraFileProblem(ValueError):
    """A file that is not a LoRA sdbuild can fuse: the message says what is wrong with it."""


def header_keys(path: Path) -> list[str]:
    """The tensor names of a safetensors file, from its JSON header."""
    with path.open("rb") as f:
        head = f.read(8)
        if len(head) != 8:
            raise LoraFileProblem(f"{path.name} is too short to be a safetensors file")
        (length,) = struct.unpack("<Q", head)
        if length > min(_MAX_HEADER, path.stat().st_size - 8):
            raise LoraFileProblem(f"{path.name} is not a safetensors file (its header length is impossible)")
        try:
            header = json.loads(f.read(length))
        except ValueError:
            raise LoraFileProblem(f"{path.name} is not a safetensors file (its header is not JSON)") from None
    if not isinstance(header, dict):
        raise LoraFileProblem(f"{path.name} is not a safetensors file (its header is not a mapping)")
    return [key for key in header if key != "__metadata__"]


def lora_components(path: Path) -> list[str]:
    """The components (of LORA_COMPONENTS, in that order) `path`'s weights target."""
    keys = header_keys(path)
    if not keys:
        raise LoraFileProblem(f"{path.name} holds no tensors")
    found: set[str] = set()
    for key in keys:
        component = next((c for prefix, c in _PREFIXES if key.startswith(prefix)), None)
        if component is None or "lora" not in key.lower() and not key.endswith(".alpha"):
            raise LoraFileProblem(
                f"{path.name} has a tensor '{key}' that is not a LoRA weight of the UNet or a text encoder "
                "(expected diffusers' unet./text_encoder./text_encoder_2. or kohya's lora_unet_/lora_te*_ names)"
            )
        found.add(component)
    return [c for c in LORA_COMPONENTS if c in found]
