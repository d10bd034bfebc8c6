"""The quantized UNet traced and converted: Core ML's quantize/dequantize ops around every W8A8 op.

coremltools turns the finalized torch model's `quantize_per_tensor`/`dequantize` pairs into the
program's activation `quantize`/`dequantize` ops (iOS17/macOS14 and later) and its int8 weights into
`constexpr_affine_dequantize` (iOS17) or `constexpr_blockwise_shift_scale` (iOS18) consts named after
the parameter. With `palettize_nbits` the int8 weights are then palettized jointly (iOS18): an int8
lookup table per weight, scaled per output channel, its entries from exact k-means over the weight's
integers (the palettizer's own k-means, `builder.coreml.lut`).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from builder.coreml.package import WEIGHTS_DIR, normalize_mlpackage, package_size, write_spec
from builder.coreml.program import operations, read_spec
from builder.coreml.speedups import faster_conversion

QUANTIZED_GRAPH = "quantized.pt"  # the traced quantized model, kept beside the package for verify


def op_counts(package: Path) -> Counter:
    """How many ops of each type the saved program has."""
    return Counter(op.type for op in operations(read_spec(package).mlProgram))


def convert_quantized(
    quantized: nn.Module,
    example: Sequence[torch.Tensor],
    architecture: dict,
    deployment_target: str,
    package: Path,
    palettize_nbits: int | None = None,
) -> dict:
    """Write `package` from the finalized quantized model (and its trace, `QUANTIZED_GRAPH`, beside it);
    returns its size, bits per weight and op counts."""
    import coremltools as ct

    with torch.no_grad():
        traced = torch.jit.trace(quantized, tuple(example), check_trace=False)
    torch.jit.save(traced, str(package.parent / QUANTIZED_GRAPH))
    dtypes = {"float32": np.float32, "float16": np.float16}
    with faster_conversion():  # the same program, sooner (builder/coreml/speedups.py)
        model = ct.convert(
            traced,
            inputs=[
                ct.TensorType(name=spec["name"], shape=spec["shape"], dtype=dtypes[spec["dtype"]])
                for spec in architecture["inputs"]
            ],
            outputs=[ct.TensorType(name=name) for name in architecture["outputs"]],
            convert_to="mlprogram",
            compute_precision=ct.precision.FLOAT16,
            minimum_deployment_target=getattr(ct.target, deployment_target),
            skip_model_load=True,
        )
    if palettize_nbits is not None:
        model = _palettize_jointly(model, palettize_nbits)
    model.short_description = "sdbuild unet, W8A8" + (
        f" with {palettize_nbits}-bit palettized weights" if palettize_nbits else ""
    )
    model.save(str(package))
    write_spec(package, model.get_spec())
    normalize_mlpackage(package)
    counts = op_counts(package)
    return {
        "size_bytes": package_size(package),
        "bits_per_weight": round(_bits_per_weight(package), 4),
        "activation_quantize_ops": counts["quantize"],
        "activation_dequantize_ops": counts["dequantize"],
    }


def _bits_per_weight(package: Path) -> float:
    """Bits the weight file stores per weight element (int8 data and their scales, float16 ones)."""
    from builder.coreml.weights import iter_weights

    elements = sum(value.size for _, value in iter_weights(package))
    return 8 * package_size(package / WEIGHTS_DIR) / elements


def _int_lut(nbits: int):
    """coremltools' custom LUT function: exact weighted k-means over a weight's integer values,
    centres rounded to integers (the LUT keeps the weight's int8 type)."""
    from builder.coreml import lut as lut_math

    def lut_function(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        flat = values.reshape(-1)
        hist = lut_math.histogram(flat)
        centres = np.unique(np.round(lut_math.centroids(hist.values, hist.counts, 1 << nbits)))
        lut = np.zeros(1 << nbits, values.dtype)
        lut[: len(centres)] = centres
        bounds = (centres[1:] + centres[:-1]) / 2
        return lut, np.searchsorted(bounds, flat).astype(np.uint8)

    return lut_function


def _palettize_jointly(model, nbits: int):
    from coremltools.optimize.coreml import OpPalettizerConfig, OptimizationConfig, palettize_weights

    config = OpPalettizerConfig(mode="custom", lut_function=_int_lut(nbits), weight_threshold=2048)
    return palettize_weights(model, OptimizationConfig(global_config=config), joint_compression=True)
