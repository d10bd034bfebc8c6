"""TorchScript graphs saved without the weights that the rewrite stage's `weights.safetensors` holds.

`torch.jit.save` writes every parameter into the archive, so a traced full-size model stored its
float32 weights a second time next to the rewrite output (1.4 GB for the SD 2.1 text encoder, most
of the trace stage's time) and the convert stage read them back from there. Instead the trace stage
swaps each tensor that `weights.safetensors` names for an empty placeholder of the same dtype before
saving and records the names and shapes in the archive; the convert stage, whose cache key already
covers the rewrite output, loads the graph and puts the weights back. The code, constants and the
tensors the weights file does not hold (causal masks, position ids) are saved as before, so the
module handed to the converter is the same.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import torch

# The archive's extra file listing the stripped tensors: {name: shape}.
PLACEHOLDERS = "sdbuild/placeholders.json"

_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


def save_graph(script: torch.jit.ScriptModule, path: Path, weights: Path) -> dict[str, list[int]]:
    """Save `script` with every tensor that `weights` names replaced by a placeholder; returns {name: shape}.

    The module is restored before returning, so it can still be run.
    """
    names = set(_tensor_entries(weights))
    held = {name: t for name, t in script.state_dict(keep_vars=True).items() if name in names}
    shapes = {name: list(t.shape) for name, t in held.items()}
    try:
        for name, tensor in held.items():
            _assign(script, name, torch.empty(0, dtype=tensor.dtype).requires_grad_(tensor.requires_grad))
        torch.jit.save(script, str(path), _extra_files={PLACEHOLDERS: json.dumps(shapes, sort_keys=True)})
    finally:
        for name, tensor in held.items():
            _assign(script, name, tensor)
    return shapes


def load_graph(path: Path, weights: Path) -> torch.jit.ScriptModule:
    """The graph `save_graph` wrote, with its placeholders given the tensors of `weights`.

    ValueError when the archive has no placeholder list, or a placeholder's tensor is missing from
    `weights` or differs in shape or dtype: converting a placeholder would silently produce a wrong model.
    """
    extra = {PLACEHOLDERS: ""}
    script = torch.jit.load(str(path), _extra_files=extra)
    if not extra[PLACEHOLDERS]:
        raise ValueError(f"{path} has no '{PLACEHOLDERS}': it was not saved by save_graph")
    shapes: dict[str, list[int]] = json.loads(extra[PLACEHOLDERS])
    tensors = read_tensors(weights, shapes)
    for name, shape in shapes.items():
        placeholder, tensor = _lookup(script, name), tensors.pop(name)
        if list(tensor.shape) != shape or tensor.dtype != placeholder.dtype:
            raise ValueError(
                f"weight '{name}' of {weights} is {tensor.dtype} {list(tensor.shape)}, "
                f"but {path} was traced with {placeholder.dtype} {shape}"
            )
        _assign(script, name, tensor.requires_grad_(placeholder.requires_grad))
    return script


def read_tensors(path: Path, names: Iterable[str]) -> dict[str, torch.Tensor]:
    """The named tensors of a safetensors file, each read into its own allocation.

    safetensors' loaders map the file and keep it resident until the last tensor taken from it is
    freed; the converter frees each weight as soon as it has been copied into its program
    (builder/coreml/speedups.py), which only lowers the peak when every weight owns its storage.
    """
    entries = _tensor_entries(path)
    missing = sorted(set(names) - set(entries))
    if missing:
        raise ValueError(
            f"{path} holds no weight '{missing[0]}'" + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
        )
    tensors = {}
    with open(path, "rb") as file:
        for name in names:
            entry = entries[name]
            if entry["dtype"] not in _DTYPES:
                raise ValueError(f"weight '{name}' of {path} has unsupported dtype {entry['dtype']}")
            tensor = torch.empty(entry["shape"], dtype=_DTYPES[entry["dtype"]])
            start, end = entry["data_offsets"]
            size = tensor.numel() * tensor.element_size()
            if end - start != size:
                raise ValueError(f"weight '{name}' of {path} spans {end - start} bytes, its shape needs {size}")
            if size:
                file.seek(entry["base"] + start)
                if file.readinto(tensor.reshape(-1).view(torch.uint8).numpy().data) != size:
                    raise ValueError(f"{path} ends inside weight '{name}'")
            tensors[name] = tensor
    return tensors


def _tensor_entries(path: Path) -> dict[str, dict]:
    """The safetensors header: {name: {dtype, shape, data_offsets, base}} (offsets count from base)."""
    with open(path, "rb") as file:
        length = int.from_bytes(file.read(8), "little")
        header = json.loads(file.read(length))
    header.pop("__metadata__", None)
    return {name: entry | {"base": 8 + length} for name, entry in header.items()}


def _lookup(script: torch.jit.ScriptModule, name: str) -> torch.Tensor:
    module, attribute = _owner(script, name)
    return getattr(module, attribute)


def _assign(script: torch.jit.ScriptModule, name: str, tensor: torch.Tensor) -> None:
    """Set a parameter or buffer slot of the compiled module (it stays a parameter or buffer)."""
    module, attribute = _owner(script, name)
    module._c.setattr(attribute, tensor)


def _owner(script: torch.jit.ScriptModule, name: str) -> tuple[torch.jit.ScriptModule, str]:
    """The submodule holding tensor `name` and the tensor's attribute (ScriptModules lack get_submodule)."""
    *path, attribute = name.split(".")
    module = script
    for part in path:
        module = getattr(module, part)
    return module, attribute
