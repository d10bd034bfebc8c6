"""Verify stage: a compressed model's weights read back into torch and measured against float16.

No Core ML runtime exists on Linux, so the palettized program is judged by rebuilding its dense
weights from the saved tables and indices, loading them into the conversion module, and comparing
its outputs with the float16-weight module on the rewrite stage's fixed inputs.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from builder.sd.psnr import psnr
from builder.sd.read_back import read_back
from builder.stages.trace import load_conversion_module


def run(inputs: dict[str, Path], params: dict, out: Path) -> dict:
    module, architecture = load_conversion_module(inputs["rewritten"])
    references = load_file(inputs["rewritten"] / "reference.safetensors")
    example = tuple(references[f"input.{spec['name']}"] for spec in architecture["inputs"])
    models = read_back(module, inputs["model"] / "model.mlpackage")
    with torch.no_grad():
        expected = models.float16(*example)
        produced = models.compressed(*example)
    expected = expected if isinstance(expected, tuple) else (expected,)
    produced = produced if isinstance(produced, tuple) else (produced,)
    decisions = set(architecture.get("decision_outputs", ()))  # yes/no outputs: PSNR says nothing of them
    scores = {
        name: round(psnr(got, want), 2)
        for name, got, want in zip(architecture["outputs"], produced, expected)
        if name not in decisions
    }
    check: dict = {"read_back_psnr_db": scores}
    if "probe" in inputs:  # mixed-bit: score the read-back weights on the workload the analysis used
        check |= _mixed_bit_check(inputs, models)
    (out / "check.json").write_text(json.dumps(check, indent=2, sort_keys=True))
    return check | {"compressed_weights": len(models.compressed_consts)}


def _mixed_bit_check(inputs: dict[str, Path], models) -> dict:
    """The recipe file's target and predicted PSNR beside what the saved package achieves."""
    from builder.sd.mbp.analysis import Probe
    from builder.sd.mbp.recipe_file import load_recipe_file

    recipe = load_recipe_file(inputs["mbp_recipe"])
    probe = Probe(models.float16, inputs["probe"], [])
    state = {name: p.detach().clone() for name, p in models.compressed.named_parameters()}
    return {
        "mixed_bit": {
            "target_psnr_db": recipe.target_psnr_db,
            "predicted_psnr_db": recipe.psnr_db,
            "achieved_psnr_db": round(probe.psnr_with(state), 2),
        }
    }
