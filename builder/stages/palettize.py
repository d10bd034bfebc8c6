"""Palettize stage: exact k-means palettization of a converted model, embeddings left alone.

Uses our own palettizer (`builder.coreml.palettize`): it edits the saved program instead of
re-running coremltools' pass pipeline, clusters every weight with exact 1-D k-means, and gives
the same bytes for any thread count. Its per-weight report is kept beside the model.
"""

from __future__ import annotations

from pathlib import Path

from builder.coreml.palettize import PalettizeOptions, palettize_package
from builder.stages.params import MixedPalettizeParams


def run(inputs: dict[str, Path], params: dict, out: Path) -> dict:
    package = inputs["model"] / "model.mlpackage"
    if "mbp_recipe" in inputs:  # mixed-bit: each layer's width from the recipe file
        from builder.sd.mbp.layers import conversion_layers
        from builder.sd.mbp.recipe_file import to_palettize_options

        mixed = MixedPalettizeParams.model_validate(params)
        layers = conversion_layers(inputs["rewritten"], mixed.weight_threshold)
        options = to_palettize_options(
            inputs["mbp_recipe"], layers, package, mixed.weight_threshold, chunk=mixed.chunk is not None
        )
    else:
        options = PalettizeOptions.model_validate(params)
    report = palettize_package(package, out / "model.mlpackage", options)
    (out / "report.json").write_text(report.model_dump_json(indent=2, exclude={"seconds"}) + "\n")
    return {
        "bits_per_weight": round(report.bits_per_weight, 4),
        "size_bytes": report.bytes_after,
        "seconds": round(report.seconds, 2),
    }
