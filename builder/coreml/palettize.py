"""Fast, deterministic k-means palettization of a saved Core ML ML Program.

coremltools' `palettize_weights` loads the whole program into MIL, clusters tensors under 10,000
elements with scikit-learn (whose result changes with the thread count) and re-runs the full
default pass pipeline when it saves: on an SD UNet about half its time is those passes. Here the
saved spec is edited instead. Each eligible float `const` becomes the `constexpr_lut_to_dense` op
coremltools emits for the model's target (same name suffix, LUT and index conventions), every LUT
comes from coremltools' exact weighted 1-D k-means over the weight's distinct values, and the
weight file is rewritten blob by blob. Nothing else in the program changes, and k-means results are
pure functions of their input, so the bytes do not depend on how many workers ran them.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, NonNegativeInt, PositiveInt

from builder.coreml.kmeans import weighted_kmeans_1d
from builder.coreml.package import WEIGHTS_DIR, normalize_mlpackage, package_size

Nbits = Literal[1, 2, 3, 4, 6, 8]

_SPEC_PATH = Path("Data/com.apple.CoreML/model.mlmodel")
_WEIGHT_FILE = "weight.bin"
_SUFFIX = "_palettized"  # coremltools names the replacement op and its output this way
_IOS16_SPEC_VERSION = 7  # first version with constexpr ops
_IOS18_SPEC_VERSION = 9  # constexpr_lut_to_dense takes per-group LUTs and unpacked uintN indices
_FLOAT16_SIGN_ZERO = 0x8000  # bit pattern of -0.0, folded into +0.0 as np.unique would


class PalettizeOptions(BaseModel):
    """What to palettize and with how many bits."""

    model_config = ConfigDict(extra="forbid")

    nbits: Nbits = 6
    granularity: Literal["per_tensor", "per_grouped_channel"] = "per_tensor"
    # Output channels sharing one LUT with per_grouped_channel (iOS18/macOS15 targets only).
    group_size: PositiveInt = 32
    # Weights with more elements than this are palettized (coremltools' rule, strictly greater):
    # below it a LUT costs more than it saves.
    weight_threshold: NonNegativeInt = 2048
    # Per-weight bits by const op name, for mixed-bit recipes; None keeps that weight as stored.
    nbits_by_op: dict[str, Nbits | None] = {}


class WeightReport(BaseModel):
    """One float weight of the source model and what became of it."""

    name: str
    shape: list[int]
    elements: int
    nbits: int | None  # None: kept as stored
    bits_per_weight: float  # stored bits per element: index bits plus its share of the LUTs
    relative_rmse: float  # RMSE of the reconstruction over the RMS of the weight; 0 when kept


class PalettizeReport(BaseModel):
    weights: list[WeightReport]
    palettized_bits_per_weight: float  # index and LUT bits over the palettized weights' elements
    bits_per_weight: float  # the same over every float weight, kept ones at their stored width
    bytes_before: int
    bytes_after: int
    seconds: float


@dataclass(frozen=True)
class _Histogram:
    """Distinct values of one weight group (ascending, float64), their counts and float16 codes."""

    values: np.ndarray
    counts: np.ndarray
    codes: np.ndarray | None  # uint16 bit patterns of float16 values; None for float32


@dataclass
class _Job:
    """One weight to palettize: where its channels split into groups and its pending LUTs."""

    nbits: int
    axis: int | None  # grouped channel axis; None for per-tensor
    groups: int
    histograms: list[_Histogram]
    centroids: list[Future]


def _mil():
    from coremltools.proto import MIL_pb2

    return MIL_pb2


def _read_spec(package: Path):
    from coremltools.proto import Model_pb2

    spec = Model_pb2.Model()
    spec.ParseFromString((package / _SPEC_PATH).read_bytes())
    return spec


def _value_reader(package: Path):
    """Decode any MIL proto value (immediate or in the weight file) with coremltools' own loader."""
    from coremltools.converters.mil.frontend.milproto.load import TranscriptionContext, _load_value

    context = TranscriptionContext(str(package / WEIGHTS_DIR))
    return lambda value: _load_value(context, value)


def _blocks(block) -> Iterator:
    yield block
    for op in block.operations:
        for inner in op.blocks:
            yield from _blocks(inner)


def _function_blocks(program) -> Iterator[tuple[str, list]]:
    for name, function in program.functions.items():
        for block in function.block_specializations.values():
            yield name, list(_blocks(block))


def _op_name(op) -> str:
    return op.attributes["name"].immediateValue.tensor.strings.values[0]


def _float_blob(op) -> bool:
    if op.type != "const" or op.attributes["val"].WhichOneof("value") != "blobFileValue":
        return False
    return op.attributes["val"].type.tensorType.dataType in (_mil().FLOAT16, _mil().FLOAT32)


def _shape(op) -> tuple[int, ...]:
    return tuple(d.constant.size for d in op.attributes["val"].type.tensorType.dimensions)


def _consumers(blocks: list) -> dict[str, list]:
    """Var name -> (op, parameter) pairs reading it, over a function's nested blocks."""
    readers: dict[str, list] = {}
    for block in blocks:
        for op in block.operations:
            for parameter, argument in op.inputs.items():
                for binding in argument.arguments:
                    if binding.WhichOneof("binding") == "name":
                        readers.setdefault(binding.name, []).append((op, parameter))
    return readers


def _flag(op, parameter: str, consts: dict, read) -> bool:
    if parameter not in op.inputs:
        return False
    binding = op.inputs[parameter].arguments[0]
    value = binding.value if binding.WhichOneof("binding") == "value" else consts[binding.name].attributes["val"]
    return bool(read(value))


def _output_channel_axis(rank: int, readers: list, consts: dict, read) -> int | None:
    """The axis coremltools groups channels on; None when readers disagree (it then skips too)."""
    outputs, inputs = set(), set()
    for op, parameter in readers:
        output_axis, input_axis = 0, 1
        if op.type == "conv_transpose":
            output_axis, input_axis = 1, 0
        elif op.type == "matmul":
            transposed = _flag(op, f"transpose_{parameter}", consts, read)
            output_axis, input_axis = (-1, -2) if (parameter == "y") != transposed else (-2, -1)
        outputs.add(output_axis % rank)
        inputs.add(input_axis % rank)
    if len(outputs) != 1 or len(inputs) != 1:
        return None
    return outputs.pop()


def _histogram(flat: np.ndarray) -> _Histogram:
    if flat.dtype == np.float16:
        counts = np.bincount(flat.view(np.uint16), minlength=1 << 16)
        counts[0] += counts[_FLOAT16_SIGN_ZERO]
        counts[_FLOAT16_SIGN_ZERO] = 0
        codes = np.flatnonzero(counts).astype(np.uint16)
        values = codes.view(np.float16).astype(np.float64)
        order = np.argsort(values, kind="stable")
        return _Histogram(values[order], counts[codes[order]], codes[order])
    values, counts = np.unique(flat, return_counts=True)
    return _Histogram(values.astype(np.float64), counts, None)


def _centroids(values: np.ndarray, counts: np.ndarray, clusters: int) -> np.ndarray:
    """Optimal weighted 1-D k-means centres (ascending), or the values themselves if few enough."""
    return weighted_kmeans_1d(values, counts, clusters)


def _lut_and_assignment(histogram: _Histogram, centres: np.ndarray, nbits: int, dtype) -> tuple[np.ndarray, np.ndarray]:
    """The stored LUT, and the nearest stored entry for each distinct value.

    Assigning after rounding the centres to the LUT's dtype never does worse than keeping the
    k-means clusters, so the error is at most that of coremltools' LUT from the same centres.
    """
    lut = np.zeros(1 << nbits, dtype)
    lut[: len(centres)] = centres
    if len(histogram.values) <= len(lut):
        return lut, np.arange(len(histogram.values), dtype=np.uint8)
    stored = lut.astype(np.float64)
    return lut, np.searchsorted((stored[1:] + stored[:-1]) / 2, histogram.values).astype(np.uint8)


def _indices(flat: np.ndarray, histogram: _Histogram, assignment: np.ndarray) -> np.ndarray:
    if histogram.codes is None:
        return assignment[np.searchsorted(histogram.values.astype(flat.dtype), flat)]
    table = np.zeros(1 << 16, np.uint8)
    table[histogram.codes] = assignment
    table[_FLOAT16_SIGN_ZERO] = table[0]
    return table[flat.view(np.uint16)]


def _squared_error(histogram: _Histogram, lut: np.ndarray, assignment: np.ndarray) -> tuple[float, float]:
    """Sum of squared reconstruction errors and of squared values, from the histogram alone."""
    error = histogram.values - lut.astype(np.float64)[assignment]
    return float(histogram.counts @ error**2), float(histogram.counts @ histogram.values**2)


def _groups(weight: np.ndarray, axis: int | None, groups: int) -> np.ndarray:
    """The weight as (groups, elements per group), channels of a group contiguous along `axis`."""
    if axis is None:
        return weight.reshape(1, -1)
    return np.moveaxis(weight, axis, 0).reshape(groups, -1)


class _BlobCopier:
    """Writes the new weight file, copying each source blob once however often it is referenced."""

    def __init__(self, source: Path, destination: Path):
        from coremltools.libmilstoragepython import _BlobStorageWriter

        self.read = _value_reader(source)
        self.writer = _BlobStorageWriter(str(destination / WEIGHTS_DIR / _WEIGHT_FILE))
        self.copied: dict[tuple[str, int], int] = {}

    def write(self, array: np.ndarray, dtype) -> int:
        """Append `array` as MIL type `dtype`; returns its offset."""
        from coremltools.converters.mil.backend.mil.helper import _get_offset_by_writing_data

        # coremltools' own per-dtype dispatch (including packed sub-byte types) reads only these.
        return _get_offset_by_writing_data(SimpleNamespace(dtype=dtype, val=np.ascontiguousarray(array)), self.writer)

    def close(self) -> None:
        del self.writer  # the writer flushes and closes the weight file when released

    def copy(self, value) -> None:
        if value.WhichOneof("value") != "blobFileValue":
            return
        key = (value.blobFileValue.fileName, value.blobFileValue.offset)
        if key not in self.copied:
            from coremltools.converters.mil.frontend.milproto.helper import proto_to_types

            self.copied[key] = self.write(self.read(value), proto_to_types(value.type).get_primitive())
        value.blobFileValue.fileName = f"@model_path/weights/{_WEIGHT_FILE}"
        value.blobFileValue.offset = self.copied[key]


def _file_or_immediate(array: np.ndarray, dtype, blobs: _BlobCopier):
    """A proto value of MIL type `dtype` as coremltools writes it: in the weight file from 10 elements on."""
    from coremltools.converters.mil.backend.mil import helper

    if array.size < 10:
        return helper.create_tensor_value(array)
    return helper.create_file_value_tensor(
        file_name=f"@model_path/weights/{_WEIGHT_FILE}",
        offset=blobs.write(array, dtype),
        dim=array.shape,
        data_type=helper.types_to_proto_primitive(dtype),
    )


def _lut_op(const, indices: np.ndarray, lut: np.ndarray, nbits: int, ios18: bool, blobs: _BlobCopier):
    """The `constexpr_lut_to_dense` op coremltools emits for this target, replacing `const`.

    `indices` has the weight's shape; `lut` is (groups..., 2**nbits, 1) in iOS18 layout.
    """
    from coremltools.converters.mil.backend.mil import helper
    from coremltools.converters.mil.mil import types
    from coremltools.optimize._utils import pack_elements_into_bits

    mil = _mil()
    name = _op_name(const) + _SUFFIX
    op = mil.Operation(type="constexpr_lut_to_dense")
    op.attributes["name"].CopyFrom(helper.create_scalar_value(name))
    lut_dtype = types.numpy_type_to_builtin_type(lut.dtype)
    if ios18:
        index_dtype = types.string_to_builtin(f"uint{nbits}")
        op.inputs["indices"].arguments.add().value.CopyFrom(_file_or_immediate(indices, index_dtype, blobs))
        op.inputs["lut"].arguments.add().value.CopyFrom(_file_or_immediate(lut, lut_dtype, blobs))
    else:
        packed = pack_elements_into_bits(indices.reshape(-1), nbits)
        op.attributes["indices"].CopyFrom(_file_or_immediate(packed, types.uint8, blobs))
        op.attributes["lut"].CopyFrom(_file_or_immediate(lut.reshape(-1), lut_dtype, blobs))
        op.attributes["shape"].CopyFrom(helper.create_tensor_value(np.array(indices.shape, np.uint32)))
    output = op.outputs.add()
    output.CopyFrom(const.outputs[0])
    output.name = name
    return op


def _plan(spec, options: PalettizeOptions, read, pool: ThreadPoolExecutor) -> tuple[dict, list[WeightReport]]:
    """Pick the weights to palettize and start their k-means, in program order."""
    jobs: dict[tuple[str, str], _Job] = {}
    weights: list[WeightReport] = []
    names: set[str] = set()
    for function, blocks in _function_blocks(spec.mlProgram):
        readers = _consumers(blocks)
        consts = {op.outputs[0].name: op for block in blocks for op in block.operations if op.type == "const"}
        for block in blocks:
            for op in block.operations:
                if not _float_blob(op):
                    continue
                name, shape = _op_name(op), _shape(op)
                names.add(name)
                nbits = options.nbits_by_op.get(name, options.nbits)
                job = _job(op, shape, nbits, options, readers.get(op.outputs[0].name, []), consts, read)
                stored_bits = 16 if op.attributes["val"].type.tensorType.dataType == _mil().FLOAT16 else 32
                weights.append(
                    WeightReport(
                        name=name,
                        shape=list(shape),
                        elements=int(np.prod(shape)),
                        nbits=None,
                        bits_per_weight=stored_bits,
                        relative_rmse=0.0,
                    )
                )
                if job is None:
                    continue
                grouped = _groups(read(op.attributes["val"]), job.axis, job.groups)
                for flat in grouped:
                    histogram = _histogram(flat)
                    job.histograms.append(histogram)
                    job.centroids.append(pool.submit(_centroids, histogram.values, histogram.counts, 1 << job.nbits))
                jobs[(function, op.outputs[0].name)] = job
    unknown = sorted(set(options.nbits_by_op) - names)
    if unknown:
        raise ValueError(f"nbits_by_op names no float weight of this model: {', '.join(unknown)}")
    return jobs, weights


def _job(op, shape, nbits, options: PalettizeOptions, readers: list, consts: dict, read) -> _Job | None:
    """Whether and how coremltools would palettize this const; None to keep it."""
    if nbits is None or int(np.prod(shape)) <= options.weight_threshold or len(shape) <= 1:
        return None
    if not readers or any(reader.type == "gather" for reader, _ in readers):
        return None  # embedding tables stay exact
    axis = _output_channel_axis(len(shape), readers, consts, read)
    if axis is None:
        return None
    if options.granularity == "per_tensor":
        return _Job(nbits, None, 1, [], [])
    if shape[axis] % options.group_size:
        return None
    return _Job(nbits, axis, shape[axis] // options.group_size, [], [])


def _palettize(const, job: _Job, ios18: bool, blobs: _BlobCopier, report: WeightReport):
    """Encode one planned weight with its finished k-means, fill in its report, return the LUT op."""
    weight = blobs.read(const.attributes["val"])
    grouped = _groups(weight, job.axis, job.groups)
    luts, indices = [], []
    error = energy = 0.0
    for flat, histogram, centres in zip(grouped, job.histograms, job.centroids, strict=False):
        lut, assignment = _lut_and_assignment(histogram, centres.result(), job.nbits, weight.dtype)
        luts.append(lut)
        indices.append(_indices(flat, histogram, assignment))
        group_error, group_energy = _squared_error(histogram, lut, assignment)
        error, energy = error + group_error, energy + group_energy
    dense_indices = np.stack(indices)
    lut_shape = [1] * weight.ndim + [1 << job.nbits, 1]
    if job.axis is None:
        dense_indices = dense_indices.reshape(weight.shape)
    else:
        moved = (weight.shape[job.axis],) + tuple(np.delete(weight.shape, job.axis))
        dense_indices = np.moveaxis(dense_indices.reshape(moved), 0, job.axis)
        lut_shape[job.axis] = job.groups
    report.nbits = job.nbits
    report.bits_per_weight = job.nbits + job.groups * (1 << job.nbits) * weight.dtype.itemsize * 8 / weight.size
    report.relative_rmse = float(np.sqrt(error / energy)) if energy else 0.0
    return _lut_op(const, dense_indices, np.stack(luts).reshape(lut_shape), job.nbits, ios18, blobs)


def _rewrite(spec, jobs: dict, weights: list[WeightReport], ios18: bool, blobs: _BlobCopier) -> None:
    """Replace planned consts by LUT ops, point their readers at them and copy every other blob."""
    reports = iter(weights)
    for function, blocks in _function_blocks(spec.mlProgram):
        renamed: dict[str, str] = {}
        for block in blocks:
            for index, op in enumerate(block.operations):
                for argument in op.inputs.values():
                    for binding in argument.arguments:
                        if binding.WhichOneof("binding") == "name":
                            binding.name = renamed.get(binding.name, binding.name)
                        else:
                            blobs.copy(binding.value)
                report = next(reports) if _float_blob(op) else None
                job = jobs.get((function, op.outputs[0].name)) if op.outputs else None
                if job is not None:
                    replacement = _palettize(op, job, ios18, blobs, report)
                    renamed[op.outputs[0].name] = replacement.outputs[0].name
                    block.operations[index].CopyFrom(replacement)
                    continue
                for value in op.attributes.values():
                    blobs.copy(value)
        for block in blocks:
            block.outputs[:] = [renamed.get(name, name) for name in block.outputs]


def _average_bits(weights: list[WeightReport]) -> float:
    elements = sum(w.elements for w in weights)
    return sum(w.bits_per_weight * w.elements for w in weights) / elements if elements else 0.0


def palettize_package(
    src: Path, dst: Path, options: PalettizeOptions, *, workers: int | None = None
) -> PalettizeReport:
    """Write `src` palettized to `dst` (which must not exist) and report what changed.

    `workers` threads run the k-means (coremltools' k-means releases the GIL); the output bytes are
    the same for any number of them.
    """
    start = time.perf_counter()
    spec = _read_spec(src)
    if spec.WhichOneof("Type") != "mlProgram" or spec.specificationVersion < _IOS16_SPEC_VERSION:
        raise ValueError(f"{src}: palettization needs an ML Program for iOS16/macOS13 or later")
    ios18 = spec.specificationVersion >= _IOS18_SPEC_VERSION
    if options.granularity == "per_grouped_channel" and not ios18:
        raise ValueError("per_grouped_channel palettization needs an iOS18/macOS15 or later target")
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(_WEIGHT_FILE))
    blobs = _BlobCopier(src, dst)
    with ThreadPoolExecutor(max_workers=workers or os.cpu_count() or 1) as pool:
        jobs, weights = _plan(spec, options, blobs.read, pool)
        _rewrite(spec, jobs, weights, ios18, blobs)
    blobs.close()
    (dst / _SPEC_PATH).write_bytes(spec.SerializeToString())
    normalize_mlpackage(dst)
    return PalettizeReport(
        weights=weights,
        palettized_bits_per_weight=_average_bits([w for w in weights if w.nbits is not None]),
        bits_per_weight=_average_bits(weights),
        bytes_before=package_size(src),
        bytes_after=package_size(dst),
        seconds=time.perf_counter() - start,
    )


def _lut_op_weight(op, read) -> np.ndarray:
    """Dense weight of a `constexpr_lut_to_dense` op, in either target's form."""
    if "lut" in op.attributes:  # iOS16/17: one LUT, indices packed into bytes, and the shape
        from coremltools.optimize._utils import restore_elements_from_packed_bits

        lut, shape = read(op.attributes["lut"]), read(op.attributes["shape"])
        nbits = int(np.log2(lut.size))
        indices = restore_elements_from_packed_bits(read(op.attributes["indices"]), nbits, int(np.prod(shape)))
        return lut[indices].reshape(tuple(shape))
    # iOS18: a (groups per axis..., entries, 1) LUT; each axis's groups split it into equal blocks.
    lut, indices = (read(op.inputs[p].arguments[0].value) for p in ("lut", "indices"))
    if lut.shape[-1] != 1:
        raise ValueError(f"{_op_name(op)}: vector palettization is not supported")
    groups = [
        (np.arange(size) // (size // count)).reshape([-1 if d == axis else 1 for d in range(indices.ndim)])
        for axis, (size, count) in enumerate(zip(indices.shape, lut.shape[:-2], strict=False))
    ]
    return lut[(*groups, indices.astype(np.intp), 0)]


def read_back_weights(package: Path) -> dict[str, np.ndarray]:
    """Every float weight of a saved package as a dense array, keyed by the float weight's name.

    Palettized weights are rebuilt from their stored LUT and indices (what Core ML will compute),
    so they can be compared with the float model or loaded into torch.
    """
    spec = _read_spec(package)
    read = _value_reader(package)
    weights = {}
    for _, blocks in _function_blocks(spec.mlProgram):
        for block in blocks:
            for op in block.operations:
                if _float_blob(op):
                    weights[_op_name(op)] = read(op.attributes["val"])
                elif op.type == "constexpr_lut_to_dense":
                    weights[_op_name(op).removesuffix(_SUFFIX)] = _lut_op_weight(op, read)
    return weights


def reconstruction_errors(palettized: Path, reference: Path) -> dict[str, float]:
    """Relative RMSE (RMSE over the weight's RMS) of each weight of `palettized` against `reference`."""
    approximations = read_back_weights(palettized)
    errors = {}
    for name, exact in read_back_weights(reference).items():
        exact = exact.astype(np.float64)
        energy = float(np.sum(exact**2))
        error = float(np.sum((approximations[name].astype(np.float64) - exact) ** 2))
        errors[name] = float(np.sqrt(error / energy)) if energy else 0.0
    return errors


def palettize_array(weight: np.ndarray, nbits: int) -> np.ndarray:
    """`weight` as this palettizer stores it per tensor (its k-means table looked up by index).

    Used to predict compression in torch with exactly the clustering the real palettization uses.
    """
    flat = np.ascontiguousarray(weight, dtype=np.float16).reshape(-1)
    histogram = _histogram(flat)
    centres = _centroids(histogram.values, histogram.counts, 1 << nbits)
    lut, assignment = _lut_and_assignment(histogram, centres, nbits, np.float16)
    return lut[_indices(flat, histogram, assignment)].reshape(weight.shape)


def float_weight_ops(package: Path) -> list[tuple[str, tuple[int, ...]]]:
    """(op name, shape) of every float const stored in the package's weight file, in program order."""
    spec = _read_spec(package)
    return [
        (_op_name(op), _shape(op))
        for _, blocks in _function_blocks(spec.mlProgram)
        for block in blocks
        for op in block.operations
        if _float_blob(op)
    ]
