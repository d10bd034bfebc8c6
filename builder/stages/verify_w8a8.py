"""Verify stage of a W8A8 UNet: the quantized model, with the package's weights, against float16.

No Core ML runtime exists here, so the package is judged through the torch model it was converted
from: the traced quantized model (the quantizer's own quantize/dequantize of every activation, with
the ranges calibration recorded) gets every compressed weight the package stores, rebuilt from its
constexpr ops, in place of its own, then runs the fixed example inputs and the analysis workload.
Before that, each stored weight is checked against the torch weight it came from (within half a
quantization step, plus the palettization's error when the weights are palettized jointly), and
the program must hold activation quantize/dequantize ops: a package without them is not W8A8.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from builder.coreml.weights import compressed_const_names, iter_weights
from builder.errors import UserError
from builder.sd.mbp.analysis import Probe
from builder.sd.psnr import psnr
from builder.sd.read_back import float16_weights
from builder.sd.w8a8.convert import QUANTIZED_GRAPH, op_counts
from builder.stages.params import VerifyParams
from builder.stages.trace import load_conversion_module
from builder.stages.verify import check_floor
from builder.stages.w8a8 import DECISIONS_FILE

_PACKAGE = "model.mlpackage"
_CONST_SUFFIXES = ("_cast_fp16", "_to_fp16")


def _parameter(const: str, parameters: dict[str, str]) -> str:
    """The torch parameter a weight const holds: ct.convert names it after the parameter, dots as underscores."""
    stem = next((const.removesuffix(s) for s in _CONST_SUFFIXES if const.endswith(s)), const)
    if stem not in parameters:
        raise UserError(
            f"the W8A8 package's weight {const} names no parameter of the quantized model",
            hint="the cache is inconsistent; run `sdbuild verify` and rebuild",
        )
    return parameters[stem]


@torch.no_grad()
def load_package_weights(quantized: torch.jit.ScriptModule, package: Path, palettized: bool) -> int:
    """Write every compressed weight of `package` over the quantized model's own; returns how many.

    Each must be its torch weight quantized to int8 (within half a step of the output channel's
    scale), unless the weights were palettized as well.
    """
    tensors = dict(quantized.named_parameters())
    parameters = {name.replace(".", "_"): name for name in tensors}
    written = 0
    for const, value in iter_weights(package, compressed_const_names(package)):
        tensor = tensors[_parameter(const, parameters)]
        stored = torch.from_numpy(value.astype(np.float32)).reshape(tensor.shape)
        if not palettized:
            flat = tensor.detach().reshape(len(tensor), -1)
            step = flat.abs().amax(dim=1) / 127  # symmetric int8, per output channel
            error = (stored.reshape(len(tensor), -1) - flat).abs().amax(dim=1)
            if bool((error > step * 0.5 + flat.abs().amax(dim=1) * 2e-3 + 1e-6).any()):
                raise UserError(
                    f"the W8A8 package's weight {const} is not its torch weight quantized to int8",
                    hint="the converter changed a weight; report the recipe",
                )
        tensor.copy_(stored)
        written += 1
    return written


def run(inputs: dict[str, Path], params: dict, out: Path) -> dict:
    p = VerifyParams.model_validate(params)
    package = inputs["model"] / _PACKAGE
    counts = op_counts(package)
    if not counts["quantize"] or not counts["dequantize"]:
        raise UserError(
            "the W8A8 package has no activation quantize/dequantize ops", hint="report the recipe; this is a bug"
        )
    module, architecture = load_conversion_module(inputs["rewritten"])
    float16_weights(module)
    references = load_file(inputs["rewritten"] / "reference.safetensors")
    example = [references[f"input.{spec['name']}"] for spec in architecture["inputs"]]
    with torch.no_grad():
        expected = module(*example)
    probe = Probe(module, inputs["probe"], [])  # the workload's float16 reference
    quantized = torch.jit.load(str(inputs["model"] / QUANTIZED_GRAPH)).eval()
    report = json.loads((inputs["model"] / "report.json").read_text())
    written = load_package_weights(quantized, package, palettized=report.get("palettize_nbits") is not None)
    with torch.no_grad():
        produced = quantized(*example)
    workload = probe.scores_of(quantized)
    decisions = json.loads((inputs["model"] / DECISIONS_FILE).read_text())
    check = {
        "read_back_psnr_db": {architecture["outputs"][0]: round(psnr(produced, expected), 2)},
        "w8a8": {
            "latent_psnr_db": round(workload.latent_psnr_db, 2),
            "single_call_psnr_db": round(workload.single_call_psnr_db, 2),
            "activation_quantize_ops": counts["quantize"],
            "w8a32_layers": sum(d["activations"] == "float" for d in decisions.values()),
            "layers": decisions,
        },
    }
    (out / "check.json").write_text(json.dumps(check, indent=2, sort_keys=True))
    check_floor(check, p.minimum_psnr_db)
    return {
        "read_back_psnr_db": check["read_back_psnr_db"],
        "latent_psnr_db": check["w8a8"]["latent_psnr_db"],
        "compressed_weights": written,
        "forward_passes": 1 + probe.evaluations,
    }
