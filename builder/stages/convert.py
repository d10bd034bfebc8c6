"""Convert stage: TorchScript to a float16 Core ML ML Program, with the contract's feature names."""

from __future__ import annotations

import json
from pathlib import Path

from pydantic import BaseModel

from builder.coreml.package import normalize_mlpackage, package_size


class ConvertParams(BaseModel):
    component: str
    deployment_target: str
    precision: str = "float16"


def run(inputs: dict[str, Path], params: dict, out: Path) -> dict:
    import coremltools as ct
    import numpy as np
    import torch

    p = ConvertParams.model_validate(params)
    traced = inputs["traced"]
    architecture = json.loads((inputs["rewritten"] / "architecture.json").read_text())
    dtypes = {"float32": np.float32, "float16": np.float16}
    options = {}
    if architecture.get("skipped_passes"):
        options["pass_pipeline"] = ct.PassPipeline.DEFAULT
        options["pass_pipeline"].remove_passes(architecture["skipped_passes"])
    model = ct.convert(
        torch.jit.load(str(traced / "model.pt")),
        inputs=[
            ct.TensorType(name=spec["name"], shape=spec["shape"], dtype=dtypes[spec["dtype"]])
            for spec in architecture["inputs"]
        ],
        outputs=[
            ct.TensorType(name=name, dtype=dtypes[architecture["output_dtype"]]) if "output_dtype" in architecture
            else ct.TensorType(name=name)
            for name in architecture["outputs"]
        ],
        convert_to="mlprogram",
        compute_precision=ct.precision.FLOAT16 if p.precision == "float16" else ct.precision.FLOAT32,
        minimum_deployment_target=getattr(ct.target, p.deployment_target),
        skip_model_load=True,
        **options,
    )
    model.short_description = f"sdbuild {p.component}"
    package = out / "model.mlpackage"
    model.save(str(package))
    normalize_mlpackage(package)
    return {"size_bytes": package_size(package)}
