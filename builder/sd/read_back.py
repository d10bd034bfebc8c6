"""Compressed weights read back from a saved Core ML program into the torch module they came from.

No Core ML runtime exists on Linux, so compression is judged in torch: the conversion module once
with its weights rounded to float16 (what a float16 package stores) and once with every compressed
weight read back from the package (palettized weights rebuilt from their tables). The two differ
only by what compression did. The module's weights are swapped in place, so a full-size UNet is
held once, not twice.

Which torch tensor a compressed const holds: coremltools names a weight's const after the torch
parameter (`unet.conv_in.weight` becomes `unet_conv_in_weight_to_fp16`), and the Neural Engine
rewrite scales attention scores rather than a projection, so most consts map by name. The converter
also folds some parameters through shape ops into consts of its own naming: a group norm's shift
over a 2560-channel skip concatenation becomes `reshape_67_to_fp16`, [1, 2560, 1, 1], above the
palettization threshold. Those are found by value: the uncompressed (float16) package's const
equals exactly one module tensor rounded to float16, in the same element order or permuted. A const
that equals no tensor is refused by name and shape. Identical tensors the converter stored once share
one const, which then holds all of them.
"""

from __future__ import annotations

import itertools
import json
import math
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from builder.coreml.program import float_weight_ops
from builder.coreml.weights import compressed_const_names, iter_weights
from builder.sd.mbp.layers import const_name

SOURCES_FILE = "weight_sources.json"  # where the verify stage records the map (`save_sources`)


class UnmappedWeights(ValueError):
    """Compressed consts whose torch tensor cannot be told; the message names each with its shape."""


@dataclass(frozen=True)
class WeightSource:
    """The module tensor (parameter or buffer) a Core ML const holds, and how its elements moved.

    `permutation` lists the torch tensor's dimensions in the order the const stores them; None
    means the same element order (the const is the tensor, possibly reshaped).
    """

    tensor: str
    permutation: tuple[int, ...] | None = None

    def to_torch(self, value: np.ndarray, shape: torch.Size) -> torch.Tensor:
        """A const's dense value laid out as the torch tensor."""
        array = value.astype(np.float32)
        if self.permutation is None:
            return torch.from_numpy(array.reshape(tuple(shape)))
        permuted = tuple(shape[d] for d in self.permutation)
        return torch.from_numpy(np.ascontiguousarray(array.reshape(permuted).transpose(np.argsort(self.permutation))))


def _tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    return dict(module.named_parameters()) | dict(module.named_buffers())


def _tensor(module: nn.Module, name: str) -> torch.Tensor:
    module_path, _, attribute = name.rpartition(".")
    return getattr(module.get_submodule(module_path), attribute)


def _float16(tensor: torch.Tensor) -> np.ndarray:
    return tensor.detach().to(torch.float16).numpy()


def _matches(value: np.ndarray, tensor: torch.Tensor) -> WeightSource | None:
    """How `tensor` rounded to float16 lays out as `value`, if it does (name filled in by the caller)."""
    stored = _float16(tensor)
    flat = value.reshape(-1)
    if np.array_equal(stored.reshape(-1), flat):
        return WeightSource("")
    for permutation in itertools.permutations(range(stored.ndim)):
        if permutation != tuple(range(stored.ndim)) and np.array_equal(stored.transpose(permutation).reshape(-1), flat):
            return WeightSource("", permutation)
    return None


def _describe(names: Iterable[str], shapes: dict[str, tuple[int, ...]]) -> str:
    return ", ".join(f"{name} {list(shapes[name])}" for name in sorted(names))


Sources = dict[str, tuple[WeightSource, ...]]  # compressed const -> the module tensor(s) it holds


def weight_sources(module: nn.Module, package: Path, float16_package: Path) -> Sources:
    """The module tensor(s) of every compressed const of `package`, given the package it was
    compressed from (`float16_package`, the converter's output, which holds every const's values).

    A const holds one tensor, or several when the module has identical tensors the converter stored
    once. Raises UnmappedWeights naming the consts no tensor accounts for, and those that equal the
    same tensors as other consts but were compressed differently (so which one a tensor reads is unknown).
    """
    compressed = compressed_const_names(package)
    shapes = dict(float_weight_ops(float16_package))
    missing = sorted(compressed - set(shapes))
    if missing:
        raise UnmappedWeights(
            f"{package.name}: compressed weight(s) absent from the float16 model: {', '.join(missing)}"
        )
    tensors = _tensors(module)
    named = {
        const_name(name): name
        for name, tensor in tensors.items()
        if const_name(name) in compressed and shapes[const_name(name)] == tuple(tensor.shape)
    }
    claimed = set(named.values())
    by_size: dict[int, list[str]] = defaultdict(list)
    for name, tensor in tensors.items():
        if name not in claimed and tensor.is_floating_point():
            by_size[tensor.numel()].append(name)
    # Values are read for consts no name accounts for, and for named ones an unclaimed tensor could twin.
    to_read = {const for const in compressed if const not in named or by_size.get(math.prod(shapes[const]))}
    found: dict[str, list[WeightSource]] = defaultdict(list)
    for const, value in iter_weights(float16_package, to_read):
        for name in by_size[value.size]:
            match = _matches(value, tensors[name])
            if match is not None:
                found[const].append(WeightSource(name, match.permutation))
    unmatched = sorted(const for const in compressed if const not in named and not found[const])
    if unmatched:
        raise UnmappedWeights(
            f"{package.name}: compressed weight(s) equal to no parameter or buffer of the module: "
            + _describe(unmatched, shapes)
        )
    _check_shared(found, package, shapes)
    return {
        const: tuple([WeightSource(named[const])] if const in named else []) + tuple(found[const])
        for const in sorted(compressed)
    }


def _check_shared(found: dict[str, list[WeightSource]], package: Path, shapes: dict[str, tuple[int, ...]]) -> None:
    """A tensor equal to several consts is fine only when they were compressed alike (then any of
    them gives it the same numbers)."""
    readers: dict[str, list[str]] = defaultdict(list)
    for const, sources in found.items():
        for source in sources:
            readers[source.tensor].append(const)
    shared = {tensor: consts for tensor, consts in readers.items() if len(consts) > 1}
    if not shared:
        return
    values = dict(iter_weights(package, {const for consts in shared.values() for const in consts}))
    for tensor, consts in sorted(shared.items()):
        if any(not np.array_equal(values[consts[0]], values[const]) for const in consts[1:]):
            raise UnmappedWeights(
                f"{package.name}: compressed weight(s) {_describe(consts, shapes)} all equal module tensor {tensor} "
                "but were compressed differently, so which one it stores cannot be told"
            )


def float16_weights(module: nn.Module) -> nn.Module:
    """`module` with its parameters rounded to float16 in place, as a float16 package stores them."""
    with torch.no_grad():
        for parameter in module.parameters():
            if parameter.device.type != "meta":
                parameter.copy_(parameter.half().float())
    return module.requires_grad_(False)


def load_compressed(module: nn.Module, package: Path, sources: Sources) -> int:
    """Overwrite, in place, every tensor of `module` that a compressed const of `package` holds with
    the const's read-back value; returns how many consts. Weights are read one at a time."""
    names = compressed_const_names(package)
    loaded = 0
    with torch.no_grad():
        for const, value in iter_weights(package, names):
            if not sources.get(const):
                raise UnmappedWeights(f"{package.name}: no module tensor is known for compressed weight {const}")
            for source in sources[const]:
                tensor = _tensor(module, source.tensor)
                tensor.copy_(source.to_torch(value, tensor.shape))
            loaded += 1
    if loaded != len(names):
        raise UnmappedWeights(f"{package.name}: {len(names) - loaded} compressed weight(s) cannot be read back")
    return loaded


def save_sources(path: Path, sources: Sources) -> None:
    """Record the map (the verify stage's output), so later readers need not re-derive it."""
    rows = {
        const: [{"tensor": s.tensor, "permutation": s.permutation} for s in found]
        for const, found in sorted(sources.items())
    }
    path.write_text(json.dumps(rows, indent=1, sort_keys=True) + "\n")


def load_sources(path: Path) -> Sources:
    rows = json.loads(path.read_text())
    return {
        const: tuple(
            WeightSource(row["tensor"], None if row["permutation"] is None else tuple(row["permutation"]))
            for row in found
        )
        for const, found in rows.items()
    }
