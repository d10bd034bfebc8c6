"""LoRA files as a recipe names them: safetensors only (refused by name otherwise), local ones confined
to the workspace like every other path."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

from pydantic import BeforeValidator, ValidationInfo

from .paths import confined_path
from .violations import Violation, reject

SAFETENSORS = ".safetensors"
# Formats a LoRA is also distributed in that can run code when loaded (pickles): refused by name.
_PICKLED = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def not_safetensors(name: str) -> Violation | None:
    """Why `name` is not loaded, or None for a .safetensors file."""
    if name.endswith(SAFETENSORS):
        return None
    pickled = name.endswith(_PICKLED)
    return Violation(
        "",
        f"'{name}' is {'a pickle' if pickled else 'not a .safetensors file'}; LoRAs are read from safetensors only"
        + (" (loading a pickle can run code)" if pickled else ""),
        "use the .safetensors release of the LoRA (or convert it to safetensors where you trust it)",
    )


def _lora_file(value: object, info: ValidationInfo) -> object:
    if not isinstance(value, (str, Path)):
        return value
    path, folder = confined_path(value, info)
    if not path.is_file():
        reject(
            [
                Violation(
                    "",
                    f"'{value}' is not a file (looked for {path})",
                    f"point to the LoRA's .safetensors file, relative to the recipe's folder {folder}",
                )
            ]
        )
    refused = not_safetensors(path.name)
    if refused is not None:
        reject([refused])
    return path


LoraFilePath = Annotated[Path, BeforeValidator(_lora_file)]
"""A .safetensors LoRA file inside the workspace, resolved (symlinks followed) to an absolute path."""
