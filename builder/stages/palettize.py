"""Palettize stage: k-means weight palettization of a converted model, embeddings left alone."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel

from builder.coreml.package import normalize_mlpackage


class PalettizeParams(BaseModel):
    nbits: int
    weight_threshold: int = 2048  # elements; smaller tensors cost more in tables than they save


def run(inputs: dict[str, Path], params: dict, out: Path) -> dict:
    import coremltools as ct
    from coremltools.optimize.coreml import OpPalettizerConfig, OptimizationConfig, palettize_weights
    from threadpoolctl import threadpool_limits

    p = PalettizeParams.model_validate(params)
    model = ct.models.MLModel(str(inputs["model"] / "model.mlpackage"), skip_model_load=True)
    config = OptimizationConfig(
        global_config=OpPalettizerConfig(nbits=p.nbits, mode="kmeans", weight_threshold=p.weight_threshold),
        # Token and position embedding tables feed `gather`: keep them exact.
        op_type_configs={"gather": None},
    )
    # scikit-learn's k-means (used for small tensors) changes its result with the thread count;
    # one thread makes the bytes the same on every machine.
    with threadpool_limits(limits=1):
        compressed = palettize_weights(model, config)
    package = out / "model.mlpackage"
    compressed.save(str(package))
    normalize_mlpackage(package)
    return {"nbits": p.nbits, "size_bytes": sum(f.stat().st_size for f in package.rglob("*") if f.is_file())}
