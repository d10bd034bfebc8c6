"""Rewrite stage: the reference component wrapped (and, per attention, rewritten) for conversion.

Writes the conversion module's weights and architecture, plus fixed example inputs and the
diffusers/transformers reference outputs on them, which the trace stage checks against.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from builder.errors import UserError
from builder.sd.components import ComponentShape, examples_for, kind, pipeline_time_ids
from builder.sd.model_checks import ModelFolderProblem, check_config
from builder.stages.params import LORA_FILE, RewriteParams


def run(inputs: dict[str, Path], params: dict, out: Path) -> dict:
    p = RewriteParams.model_validate(params)
    try:  # a downloaded config is as untrusted as a local one: refuse absurd sizes before building them
        check_config(inputs["model"], p.component)
    except ModelFolderProblem as problem:
        raise UserError(problem.message, hint=problem.hint) from None
    k = kind(p.component, p.family)
    reference = k.load(inputs["model"], k.subfolder).eval()
    if p.loras:  # fused first: the reference outputs, and everything after, are the fused model's
        from builder.sd.lora import fuse_loras, lora_target

        files = [(_lora_file(inputs[lora.input]), lora.scale) for lora in p.loras]
        fuse_loras(reference, lora_target(p.component), files)
    shape = ComponentShape(
        latent_size=p.latent_size, batch_size=p.batch_size, time_ids=pipeline_time_ids(inputs["model"])
    )
    specs = k.inputs(reference, shape)
    output_names = k.outputs_of(reference)
    examples = examples_for(p.component, inputs["model"], reference, specs)
    with torch.no_grad():
        outputs = k.reference(reference, examples)
    try:
        module = k.wrap(reference, p.attention).eval()  # may rewrite `reference` in place: outputs come first
    except ValueError as refused:  # a config the rewrite cannot honour, named by its key
        raise UserError(
            f"{p.component}: {refused}", hint="this checkpoint's architecture is not supported yet"
        ) from None

    save_file({name: t.contiguous() for name, t in module.state_dict().items()}, out / "weights.safetensors")
    references = {f"input.{n}": t.contiguous() for n, t in examples.items()}
    references |= {f"output.{n}": t.contiguous() for n, t in zip(output_names, outputs, strict=True)}
    save_file(references, out / "reference.safetensors")
    config: Any = reference.config  # diffusers' FrozenDict or transformers' PretrainedConfig
    architecture = {
        "component": p.component,
        "family": p.family,
        "attention": p.attention,
        "config": config.to_dict() if hasattr(config, "to_dict") else dict(config),
        "inputs": [s.model_dump() for s in specs],
        "outputs": list(output_names),
    }
    if k.output_dtype is not None:
        architecture["output_dtype"] = k.output_dtype
    if k.skipped_passes:
        architecture["skipped_passes"] = list(k.skipped_passes)
    if k.decision_outputs:
        architecture["decision_outputs"] = list(k.decision_outputs)
    (out / "architecture.json").write_text(json.dumps(architecture, indent=2, sort_keys=True, default=str))
    return {"parameters": sum(t.numel() for t in module.state_dict().values()), "forward_passes": 1}


def _lora_file(path: Path) -> Path:
    """A LoRA input: the file itself (local), or the hub source stage's folder holding it."""
    return path / LORA_FILE if path.is_dir() else path
