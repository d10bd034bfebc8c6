"""Fast, deterministic k-means palettization of a saved Core ML ML Program.

coremltools' `palettize_weights` loads the whole program into MIL, clusters tensors under 10,000
elements with scikit-learn (whose result changes with the thread count) and re-runs the full
default pass pipeline when it saves: on an SD UNet about half its time is those passes. Here the
saved spec is edited instead. Each eligible float `const` becomes the `constexpr_lut_to_dense` op
coremltools emits for the model's target (same name suffix, LUT and index conventions), every LUT
comes from exact weighted 1-D k-means over the weight's distinct values (`lut.py`), and the weight
file is rewritten blob by blob. Nothing else in the program changes, and k-means results are pure
functions of their input, so the bytes do not depend on how many workers ran them.
"""

from __future__ import annotations

import os
import shutil
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import numpy as np
from pydantic import BaseModel

from builder.coreml import bits
from builder.coreml import lut as lut_math
from builder.coreml.options import PalettizeOptions
from builder.coreml.package import WEIGHTS_DIR, normalize_mlpackage, package_size
from builder.coreml.program import (
    SPEC_PATH,
    WEIGHT_FILE,
    const_shape,
    consumers,
    function_blocks,
    is_float_blob,
    mil_proto,
    op_name,
    read_spec,
    value_reader,
)
from builder.coreml.weights import PALETTIZED_SUFFIX

_IOS16_SPEC_VERSION = 7  # first version with constexpr ops
_IOS18_SPEC_VERSION = 9  # constexpr_lut_to_dense takes per-group LUTs and unpacked uintN indices


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


@dataclass
class _Job:
    """One weight to palettize: where its channels split into groups and its pending LUTs."""

    nbits: int
    axis: int | None  # grouped channel axis; None for per-tensor
    groups: int
    histograms: list[lut_math.Histogram]
    centroids: list[Future]


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


def _groups(weight: np.ndarray, axis: int | None, groups: int) -> np.ndarray:
    """The weight as (groups, elements per group), channels of a group contiguous along `axis`."""
    if axis is None:
        return weight.reshape(1, -1)
    return np.moveaxis(weight, axis, 0).reshape(groups, -1)


class _BlobCopier:
    """Writes the new weight file, copying each source blob once however often it is referenced."""

    def __init__(self, source: Path, destination: Path):
        from coremltools.libmilstoragepython import _BlobStorageWriter

        self.read = value_reader(source)
        self.writer = _BlobStorageWriter(str(destination / WEIGHTS_DIR / WEIGHT_FILE))
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
        value.blobFileValue.fileName = f"@model_path/weights/{WEIGHT_FILE}"
        value.blobFileValue.offset = self.copied[key]


def _file_or_immediate(array: np.ndarray, dtype, blobs: _BlobCopier):
    """A proto value of MIL type `dtype` as coremltools writes it: in the weight file from 10 elements on."""
    from coremltools.converters.mil.backend.mil import helper

    if array.size < 10:
        return helper.create_tensor_value(array)
    return helper.create_file_value_tensor(
        file_name=f"@model_path/weights/{WEIGHT_FILE}",
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

    mil = mil_proto()
    name = op_name(const) + PALETTIZED_SUFFIX
    op = mil.Operation(type="constexpr_lut_to_dense")
    op.attributes["name"].CopyFrom(helper.create_scalar_value(name))
    lut_dtype = types.numpy_type_to_builtin_type(lut.dtype)
    if ios18:
        index_dtype = types.string_to_builtin(f"uint{nbits}")
        op.inputs["indices"].arguments.add().value.CopyFrom(_file_or_immediate(indices, index_dtype, blobs))
        op.inputs["lut"].arguments.add().value.CopyFrom(_file_or_immediate(lut, lut_dtype, blobs))
    else:
        packed = bits.pack(indices, nbits)
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
    for function, blocks in function_blocks(spec.mlProgram):
        readers = consumers(blocks)
        consts = {op.outputs[0].name: op for block in blocks for op in block.operations if op.type == "const"}
        for block in blocks:
            for op in block.operations:
                if not is_float_blob(op):
                    continue
                name, shape = op_name(op), const_shape(op)
                names.add(name)
                nbits = options.nbits_by_op.get(name, options.nbits)
                job = _job(op, shape, nbits, options, readers.get(op.outputs[0].name, []), consts, read)
                stored_bits = 16 if op.attributes["val"].type.tensorType.dataType == mil_proto().FLOAT16 else 32
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
                    histogram = lut_math.histogram(flat)
                    job.histograms.append(histogram)
                    job.centroids.append(
                        pool.submit(lut_math.centroids, histogram.values, histogram.counts, 1 << job.nbits)
                    )
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
        lut, assignment = lut_math.lut_and_assignment(histogram, centres.result(), job.nbits, weight.dtype)
        luts.append(lut)
        indices.append(lut_math.indices(flat, histogram, assignment))
        group_error, group_energy = lut_math.squared_error(histogram, lut, assignment)
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
    for function, blocks in function_blocks(spec.mlProgram):
        renamed: dict[str, str] = {}
        for block in blocks:
            for index, op in enumerate(block.operations):
                for argument in op.inputs.values():
                    for binding in argument.arguments:
                        if binding.WhichOneof("binding") == "name":
                            binding.name = renamed.get(binding.name, binding.name)
                        else:
                            blobs.copy(binding.value)
                report = next(reports) if is_float_blob(op) else None
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
    spec = read_spec(src)
    if spec.WhichOneof("Type") != "mlProgram" or spec.specificationVersion < _IOS16_SPEC_VERSION:
        raise ValueError(f"{src}: palettization needs an ML Program for iOS16/macOS13 or later")
    ios18 = spec.specificationVersion >= _IOS18_SPEC_VERSION
    if options.granularity == "per_grouped_channel" and not ios18:
        raise ValueError("per_grouped_channel palettization needs an iOS18/macOS15 or later target")
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(WEIGHT_FILE))
    blobs = _BlobCopier(src, dst)
    with ThreadPoolExecutor(max_workers=workers or os.cpu_count() or 1) as pool:
        jobs, weights = _plan(spec, options, blobs.read, pool)
        _rewrite(spec, jobs, weights, ios18, blobs)
    blobs.close()
    (dst / SPEC_PATH).write_bytes(spec.SerializeToString())
    normalize_mlpackage(dst)
    return PalettizeReport(
        weights=weights,
        palettized_bits_per_weight=_average_bits([w for w in weights if w.nbits is not None]),
        bits_per_weight=_average_bits(weights),
        bytes_before=package_size(src),
        bytes_after=package_size(dst),
        seconds=time.perf_counter() - start,
    )
