"""Quantize stage: linear 8-bit weights (int8 plus float16 scales per tensor, output channel or block)."""

from __future__ import annotations

from pathlib import Path

import coremltools as ct
from coremltools.optimize.coreml import OpLinearQuantizerConfig, OptimizationConfig, linear_quantize_weights

from builder.coreml.package import normalize_mlpackage, package_size
from builder.stages.params import QuantizeParams


def run(inputs: dict[str, Path], params: dict, out: Path) -> dict:
    p = QuantizeParams.model_validate(params)
    model = ct.models.MLModel(str(inputs["model"] / "model.mlpackage"), skip_model_load=True)
    config = OptimizationConfig(
        global_config=OpLinearQuantizerConfig(
            mode="linear_symmetric",
            dtype="int8",
            granularity=p.granularity,
            **({"block_size": p.block_size} if p.granularity == "per_block" else {}),
            weight_threshold=p.weight_threshold,
        ),
        op_type_configs={"gather": None},  # embedding tables stay exact
    )
    package = out / "model.mlpackage"
    linear_quantize_weights(model, config).save(str(package))
    normalize_mlpackage(package)
    return {"size_bytes": package_size(package)}
