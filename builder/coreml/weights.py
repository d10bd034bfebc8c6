"""Dense weights read back from a saved ML Program: float consts as stored, compressed ones rebuilt.

What Core ML will compute from a palettized weight is its LUT looked up by its indices; rebuilding
that here lets compression be judged (and compared with the float model) without a Core ML runtime.
"""

from __future__ import annotations

from collections.abc import Collection, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from builder.coreml.program import ValueReader, is_float_blob, op_name, operations, read_spec, value_reader

_CONSTEXPR_PREFIX = "constexpr_"
PALETTIZED_SUFFIX = "_palettized"  # coremltools names a LUT op after the const it replaces, plus this


def compressed_const_names(package: Path) -> frozenset[str]:
    """Names of the weights a `constexpr_*` op decompresses (palettized, quantized, ...)."""
    return frozenset(
        op_name(op).rsplit("_", 1)[0]  # coremltools appends `_palettized` and the like
        for op in operations(read_spec(package).mlProgram)
        if op.type.startswith(_CONSTEXPR_PREFIX)
    )


def _lut_weight(op: Any, read: ValueReader) -> np.ndarray:
    """Dense weight of a `constexpr_lut_to_dense` op, in either target's form."""
    if "lut" in op.attributes:  # iOS16/17: one LUT, indices packed into bytes, and the shape
        from coremltools.optimize._utils import restore_elements_from_packed_bits

        lut, shape = read(op.attributes["lut"]), read(op.attributes["shape"])
        nbits = int(np.log2(lut.size))
        packed = restore_elements_from_packed_bits(read(op.attributes["indices"]), nbits, int(np.prod(shape)))
        return lut[packed].reshape(tuple(shape))
    # iOS18: a (groups per axis..., entries, 1) LUT; each axis's groups split it into equal blocks.
    lut, indices = (read(op.inputs[p].arguments[0].value) for p in ("lut", "indices"))
    if lut.shape[-1] != 1:
        raise ValueError(f"{op_name(op)}: vector palettization is not supported")
    groups = [
        (np.arange(size) // (size // count)).reshape([-1 if d == axis else 1 for d in range(indices.ndim)])
        for axis, (size, count) in enumerate(zip(indices.shape, lut.shape[:-2], strict=True))
    ]
    return lut[(*groups, indices.astype(np.intp), 0)]


def iter_weights(package: Path, names: Collection[str] | None = None) -> Iterator[tuple[str, np.ndarray]]:
    """(name, dense array) of every float weight of a saved package, or of those in `names`, one at a
    time so a caller can use each and let it go (a full-size UNet's weights are gigabytes).

    Float consts come as stored; palettized ones are rebuilt from their LUT and indices.
    """
    spec = read_spec(package)
    read = value_reader(package)
    for op in operations(spec.mlProgram):
        if is_float_blob(op):
            name = op_name(op)
            if names is None or name in names:
                yield name, read(op.attributes["val"])
        elif op.type == "constexpr_lut_to_dense":
            name = op_name(op).removesuffix(PALETTIZED_SUFFIX)
            if names is None or name in names:
                yield name, _lut_weight(op, read)


def read_back_weights(package: Path) -> dict[str, np.ndarray]:
    """Every float weight of a saved package as a dense array, keyed by the float weight's name."""
    return dict(iter_weights(package))


def reconstruction_errors(palettized: Path, reference: Path) -> dict[str, float]:
    """Relative RMSE (RMSE over the weight's RMS) of each weight of `palettized` against `reference`."""
    approximations = read_back_weights(palettized)
    errors = {}
    for name, exact in iter_weights(reference):
        exact = exact.astype(np.float64)
        energy = float(np.sum(exact**2))
        error = float(np.sum((approximations[name].astype(np.float64) - exact) ** 2))
        errors[name] = float(np.sqrt(error / energy)) if energy else 0.0
    return errors
