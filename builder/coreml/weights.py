"""Dense weights read back from a saved ML Program: float consts as stored, compressed ones rebuilt.

What Core ML will compute from a compressed weight is its `constexpr_*` op evaluated: a palettized
weight's LUT looked up by its indices, a linearly quantized weight's integers shifted and scaled.
Rebuilding that here lets compression be judged (and compared with the float model) without a Core
ML runtime. The ops are decoded as coremltools defines them: `constexpr_lut_to_dense` (iOS16/17
attributes, iOS18 inputs with per-group LUTs), `constexpr_affine_dequantize` (iOS16/17: integers,
zero point and scale, per tensor or along one axis) and `constexpr_blockwise_shift_scale` (iOS18:
per tensor, per channel or per block). A constexpr op may read another's output (joint compression:
an int8 LUT scaled by `constexpr_blockwise_shift_scale`); only the last op of such a chain is a weight.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from builder.coreml import bits
from builder.coreml.program import ValueReader, is_float_blob, op_name, operations, read_spec, value_reader

_CONSTEXPR_PREFIX = "constexpr_"
PALETTIZED_SUFFIX = "_palettized"  # coremltools names a LUT op after the const it replaces, plus this
QUANTIZED_SUFFIX = "_quantized"  # ... and a linear quantization op, plus this
_SUFFIXES = (PALETTIZED_SUFFIX, QUANTIZED_SUFFIX)

Inputs = Callable[[str], np.ndarray]  # an op's parameter, by name, as an array


def _weight_name(op: Any) -> str:
    """The name of the float const a compression op replaced (ops of converted quantized torch
    models are named after the weight itself)."""
    name = op_name(op)
    for suffix in _SUFFIXES:
        if name.endswith(suffix):
            return name.removesuffix(suffix)
    return name


def _lut_weight(op: Any, value: Inputs) -> np.ndarray:
    """Dense weight of a `constexpr_lut_to_dense` op, in either target's form."""
    if "lut" in op.attributes:  # iOS16/17: one LUT, indices packed into bytes, and the shape
        lut, shape = value("lut"), value("shape")
        nbits = int(np.log2(lut.size))
        indices = bits.unpack(value("indices"), nbits, int(np.prod(shape)))
        return lut[indices].reshape(tuple(shape))
    # iOS18: a (groups per axis..., entries, 1) LUT; each axis's groups split it into equal blocks.
    lut, indices = value("lut"), value("indices")
    if lut.shape[-1] != 1:
        raise ValueError(f"{op_name(op)}: vector palettization is not supported")
    groups = [
        (np.arange(size) // (size // count)).reshape([-1 if d == axis else 1 for d in range(indices.ndim)])
        for axis, (size, count) in enumerate(zip(indices.shape, lut.shape[:-2], strict=True))
    ]
    return lut[(*groups, indices.astype(np.intp), 0)]


def _affine_weight(op: Any, value: Inputs) -> np.ndarray:
    """`constexpr_affine_dequantize` (iOS16/17): (data - zero_point) * scale, the zero point and
    scale scalars or vectors along `axis`."""
    data = value("quantized_data").astype(np.float32)
    zero_point, scale = value("zero_point").astype(np.float32), value("scale").astype(np.float32)
    axis = int(value("axis"))
    along = [-1 if d == axis % data.ndim else 1 for d in range(data.ndim)]
    dense = (data - zero_point.reshape(along if zero_point.ndim else ())) * scale.reshape(along if scale.ndim else ())
    return dense.astype(value("scale").dtype)


def _blocks(factor: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """A per-block scale or offset repeated over its blocks to the data's shape."""
    for axis, (size, count) in enumerate(zip(shape, factor.shape, strict=True)):
        factor = np.repeat(factor, size // count, axis=axis)
    return factor


def _shift_scale_weight(op: Any, value: Inputs) -> np.ndarray:
    """`constexpr_blockwise_shift_scale` (iOS18): (data - offset) * scale, with scale (and the
    optional offset) of the data's rank, each axis dividing the data's into equal blocks."""
    data, scale = value("data"), value("scale")
    dense = data.astype(np.float32)
    if "offset" in op.inputs:
        dense = dense - _blocks(value("offset").astype(np.float32), data.shape)
    return (dense * _blocks(scale.astype(np.float32), data.shape)).astype(scale.dtype)


_DECODERS: dict[str, Callable[[Any, Inputs], np.ndarray]] = {
    "constexpr_lut_to_dense": _lut_weight,
    "constexpr_affine_dequantize": _affine_weight,
    "constexpr_blockwise_shift_scale": _shift_scale_weight,
}


def _output(op: Any) -> str:
    return op.outputs[0].name


def _chained(ops: list[Any]) -> set[str]:
    """Outputs of constexpr ops that another constexpr op reads (parts of one weight, not weights)."""
    return {
        argument.name
        for op in ops
        if op.type.startswith(_CONSTEXPR_PREFIX)
        for binding in op.inputs.values()
        for argument in binding.arguments
        if argument.WhichOneof("binding") == "name"
    }


def compressed_const_names(package: Path) -> frozenset[str]:
    """Names of the weights a `constexpr_*` op (or chain of them) decompresses: palettized, quantized, ..."""
    ops = list(operations(read_spec(package).mlProgram))
    chained = _chained(ops)
    return frozenset(
        _weight_name(op) for op in ops if op.type.startswith(_CONSTEXPR_PREFIX) and _output(op) not in chained
    )


def _decode(op: Any, read: ValueReader, chain: dict[str, np.ndarray], consts: dict[str, Any]) -> np.ndarray:
    if op.type not in _DECODERS:
        raise ValueError(f"{op_name(op)}: {op.type} cannot be read back")

    def value(parameter: str) -> np.ndarray:
        if parameter in op.attributes:  # iOS16/17 constexpr ops hold their data as attributes
            return read(op.attributes[parameter])
        (argument,) = op.inputs[parameter].arguments
        if argument.WhichOneof("binding") != "name":
            return read(argument.value)
        if argument.name in chain:  # another constexpr op's output
            return chain[argument.name]
        return read(consts[argument.name].attributes["val"])  # a const op of its own

    return _DECODERS[op.type](op, value)


def iter_weights(package: Path, names: Collection[str] | None = None) -> Iterator[tuple[str, np.ndarray]]:
    """(name, dense array) of every float weight of a saved package, or of those in `names`, one at a
    time so a caller can use each and let it go (a full-size UNet's weights are gigabytes).

    Float consts come as stored; compressed ones are rebuilt from their constexpr ops.
    """
    read = value_reader(package)
    ops = list(operations(read_spec(package).mlProgram))
    chained = _chained(ops)
    chain: dict[str, np.ndarray] = {}  # decoded parts of a weight, until the op that reads them
    consts = {_output(op): op for op in ops if op.type == "const"}
    for op in ops:
        if is_float_blob(op):
            name = op_name(op)
            if names is None or name in names:
                yield name, read(op.attributes["val"])
        elif op.type.startswith(_CONSTEXPR_PREFIX):
            if _output(op) in chained:
                chain[_output(op)] = _decode(op, read, chain, consts)
                continue
            name = _weight_name(op)
            if names is None or name in names:
                yield name, _decode(op, read, chain, consts)


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
