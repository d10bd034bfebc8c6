"""Convert stage: TorchScript to a float16 Core ML ML Program, with the contract's feature names.

The traced graph is saved without weights; they are attached from the rewrite output (an input here).
"""

from __future__ import annotations

import json
from pathlib import Path

import coremltools as ct
import numpy as np

from builder.coreml.package import normalize_mlpackage, package_size, write_spec
from builder.coreml.speedups import faster_conversion
from builder.errors import UserError
from builder.stages.params import ConvertParams
from builder.stages.torchscript import load_graph


def run(inputs: dict[str, Path], params: dict, out: Path) -> dict:
    p = ConvertParams.model_validate(params)
    traced = inputs["traced"]
    # A UNet chunk carries its own interface; a whole component has the rewrite stage's.
    interface = traced / "interface.json"
    architecture = json.loads(
        (interface if interface.is_file() else inputs["rewritten"] / "architecture.json").read_text()
    )
    dtypes = {"float32": np.float32, "float16": np.float16}

    # A float32 model takes float32 inputs: a float16 input would round the values before the first op.
    def dtype(spec: dict):
        return np.float32 if p.precision == "float32" else dtypes[spec["dtype"]]

    options = {}
    if architecture.get("skipped_passes"):
        options["pass_pipeline"] = ct.PassPipeline.DEFAULT
        options["pass_pipeline"].remove_passes(architecture["skipped_passes"])
    try:
        # The traced graph comes without weights; a chunk's takes only its own share of them.
        graph = load_graph(traced / "model.pt", inputs["rewritten"] / "weights.safetensors")
    except ValueError as mismatch:
        raise UserError(
            f"{p.component}: the traced graph does not fit the rewrite stage's weights: {mismatch}",
            hint="the cache is inconsistent; run `sdbuild verify` and rebuild",
        ) from None
    package = out / "model.mlpackage"
    with faster_conversion() as speedups_off:
        model = ct.convert(
            graph,
            inputs=[
                ct.TensorType(name=spec["name"], shape=spec["shape"], dtype=dtype(spec))
                for spec in architecture["inputs"]
            ],
            outputs=[
                ct.TensorType(name=name, dtype=dtypes[architecture["output_dtype"]])
                if "output_dtype" in architecture
                else ct.TensorType(name=name)
                for name in architecture["outputs"]
            ],
            convert_to="mlprogram",
            compute_precision=ct.precision.FLOAT16 if p.precision == "float16" else ct.precision.FLOAT32,
            minimum_deployment_target=getattr(ct.target, p.deployment_target),
            skip_model_load=True,
            package_dir=str(package),  # written in place: `save` would copy the weights once more
            **options,
        )
    model.short_description = f"sdbuild {p.component}" + (f" chunk {p.chunk}" if p.chunk else "")
    write_spec(package, model.get_spec())
    normalize_mlpackage(package)
    summary = {"size_bytes": package_size(package), "precision": p.precision}
    return summary | ({"speedups_off": speedups_off} if speedups_off else {})
