"""Trace stage: TorchScript of the conversion module, checked against the reference outputs.

The PSNR of every traced output against the diffusers/transformers reference is recorded; below
the floor the build fails here, before hours are spent converting a wrong graph. `model.pt` holds
the graph only: the weights stay in the rewrite output, where the convert stage reads them
(builder/stages/torchscript.py).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

from builder.errors import UserError
from builder.sd.components import kind
from builder.sd.psnr import psnr
from builder.stages.params import TraceParams
from builder.stages.torchscript import save_graph


def load_conversion_module(
    rewritten: Path, only: Callable[[nn.Module], Iterable[str]] | None = None, attention: str | None = None
) -> tuple[nn.Module, dict]:
    """Rebuild the rewrite stage's module from its architecture and weights.

    Parameters are created without storage and then take the saved tensors themselves: no random
    initialisation (seconds for a full-size UNet) and no second copy of the weights. Buffers the
    state dict does not hold (causal masks, position ids) are still built by the constructors.
    `only`, given the storage-less module, names the parameters to load (a UNet chunk's share); the
    others stay on the meta device, so a chunk of a full-size UNet holds only its own weights.
    `attention` builds another attention form than the rewrite's (all three have the same parameters).
    """
    from accelerate import init_empty_weights

    architecture = json.loads((rewritten / "architecture.json").read_text())
    k = kind(architecture["component"], architecture.get("family", "sd"))
    with init_empty_weights(include_buffers=False):
        module = k.wrap(k.from_config(architecture["config"]), attention or architecture["attention"])
    weights = rewritten / "weights.safetensors"
    if only is None:
        module.load_state_dict(load_file(weights), strict=True, assign=True)
    else:
        with safe_open(weights, "pt") as stored:
            state = {name: stored.get_tensor(name) for name in only(module)}
        module.load_state_dict(state, strict=False, assign=True)
    return module.eval(), architecture


def trace_capturing_outputs(
    module: torch.nn.Module, example: tuple[torch.Tensor, ...]
) -> tuple[torch.jit.ScriptModule, tuple]:
    """Trace `module` on `example` and keep the outputs of the forward pass tracing runs anyway.

    The trace records exactly the ops that produced these outputs, and running the traced graph
    on the same inputs repeats them, so a second forward (a full UNet pass) would only cost time.
    The default trace check re-runs the model too; the PSNR check against the reference is stronger.
    """
    captured: list = []
    hook = module.register_forward_hook(lambda _module, _inputs, outputs: captured.append(outputs))
    try:
        with torch.no_grad():
            traced = torch.jit.trace(module, example, check_trace=False)
    finally:
        hook.remove()
    (produced,) = captured
    return traced, produced if isinstance(produced, tuple) else (produced,)


def run(inputs: dict[str, Path], params: dict, out: Path) -> dict:
    p = TraceParams.model_validate(params)
    module, architecture = load_conversion_module(inputs["rewritten"])
    references = load_file(inputs["rewritten"] / "reference.safetensors")
    example = tuple(references[f"input.{spec['name']}"] for spec in architecture["inputs"])
    traced, produced = trace_capturing_outputs(module, example)
    decisions = set(architecture.get("decision_outputs", ()))
    scores = {
        name: round(psnr(value, references[f"output.{name}"]), 2)
        for name, value in zip(architecture["outputs"], produced, strict=False)
        if name not in decisions
    }
    agreement = {
        name: bool(torch.equal(value, references[f"output.{name}"]))
        for name, value in zip(architecture["outputs"], produced, strict=False)
        if name in decisions
    }
    save_graph(traced, out / "model.pt", inputs["rewritten"] / "weights.safetensors")
    check = {"psnr_db": scores} | ({"decisions_match": agreement} if agreement else {})
    (out / "check.json").write_text(json.dumps(check, indent=2, sort_keys=True))
    disagreeing = sorted(name for name, same in agreement.items() if not same)
    if disagreeing:
        raise UserError(
            f"{p.component}: traced output '{disagreeing[0]}' decides differently from the reference",
            hint="the conversion module changed the model's decision; report the recipe",
        )
    worst = min(scores, key=scores.get)
    if scores[worst] < p.minimum_psnr_db:
        raise UserError(
            f"{p.component}: traced output '{worst}' matches the reference at only {scores[worst]} dB "
            f"(floor {p.minimum_psnr_db} dB)",
            hint="the rewrite changed the model's numbers; try attention: ORIGINAL and report the recipe",
        )
    return check | {"forward_passes": 1}
