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
from torch import nn

from builder.sd.chunk import Chunks
from builder.sd.psnr import psnr
from builder.sd.read_back import ReadBack, read_back
from builder.stages.chunk import split
from builder.stages.trace import load_conversion_module


def run(inputs: dict[str, Path], params: dict, out: Path) -> dict:
    chunk = params.get("chunk")
    if chunk is None:
        module, architecture = load_conversion_module(inputs["rewritten"])
        references = load_file(inputs["rewritten"] / "reference.safetensors")
        example = tuple(references[f"input.{spec['name']}"] for spec in architecture["inputs"])
    else:  # a UNet chunk, on the inputs its chunk stage traced it with
        chunks, _ = split(inputs["rewritten"])
        module = chunks.first if chunk == 1 else chunks.second
        architecture = json.loads((inputs["traced"] / "interface.json").read_text())
        example = tuple(load_file(inputs["traced"] / "examples.safetensors")[name] for name in module.input_names)
    models = read_back(module, inputs["model"] / "model.mlpackage")
    with torch.no_grad():
        expected = models.float16(*example)
        produced = models.compressed(*example)
    expected = expected if isinstance(expected, tuple) else (expected,)
    produced = produced if isinstance(produced, tuple) else (produced,)
    decisions = set(architecture.get("decision_outputs", ()))  # yes/no outputs: PSNR says nothing of them
    scores = {
        name: round(psnr(got, want), 2)
        for name, got, want in zip(architecture["outputs"], produced, expected, strict=False)
        if name not in decisions
    }
    check: dict = {"read_back_psnr_db": scores}
    compressed = [models.compressed]  # read-back weights of the shipped model(s): both chunks for chunk 2
    float16 = models.float16
    if "first" in inputs:  # chunk 2: both compressed chunks in sequence, as the app runs them
        first = read_back(chunks.first, inputs["first"] / "model.mlpackage")  # rounds `whole` to float16 throughout
        check["chain_read_back_psnr_db"] = _chain_check(inputs["rewritten"], chunks, first, models)
        compressed.insert(0, first.compressed)
        float16 = chunks.whole
    if "probe" in inputs:  # mixed-bit: score the read-back weights on the workload the analysis used
        check |= _mixed_bit_check(inputs, float16, compressed)
    (out / "check.json").write_text(json.dumps(check, indent=2, sort_keys=True))
    return check | {"compressed_weights": len(models.compressed_consts)}


def _chain_check(rewritten: Path, chunks: Chunks, first: ReadBack, second: ReadBack) -> dict[str, float]:
    """Compressed chunk 1 -> compressed chunk 2 against the whole module with float16 weights."""
    references = load_file(rewritten / "reference.safetensors")
    example = {name: references[f"input.{name}"] for name in chunks.first.input_names}
    with torch.no_grad():
        expected = chunks.whole(*example.values())
        handed = dict(zip(chunks.first.output_names, first.compressed(*example.values()), strict=False)) | example
        produced = second.compressed(*(handed[name] for name in chunks.second.input_names))[0]
    return {"noise_pred": round(psnr(produced, expected), 2)}


def _mixed_bit_check(inputs: dict[str, Path], float16: nn.Module, compressed: list[nn.Module]) -> dict:
    """The recipe file's target and predicted PSNR beside what the saved package(s) achieve.

    `compressed` holds the read-back weights under `float16`'s parameter names (for chunks, both
    chunks, whose parameters keep the whole module's names).
    """
    from builder.sd.mbp.analysis import Probe
    from builder.sd.mbp.recipe_file import load_recipe_file

    recipe = load_recipe_file(inputs["mbp_recipe"])
    probe = Probe(float16, inputs["probe"], [])
    state = {name: p.detach().clone() for module in compressed for name, p in module.named_parameters()}
    return {
        "mixed_bit": {
            "target_psnr_db": recipe.target_psnr_db,
            "predicted_psnr_db": recipe.psnr_db,
            "achieved_psnr_db": round(probe.psnr_with(state), 2),
        }
    }
