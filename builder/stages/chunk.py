"""Chunk stage: one of the UNet's two chunks, traced, with the chunk chain checked in torch.

Takes the place of the trace stage for a chunked UNet. Both chunk stages cut the rewrite stage's
module the same way (`builder.sd.chunk.split_unet`) and load only their own chunk's weights. Chunk 1
is traced on the fixed example inputs and hands its outputs (`handover.safetensors`) to chunk 2,
which is traced on them: the two traces are one pass through the UNet, and chunk 2's output is the
chain's, checked against the diffusers reference (the trace floor applies). That the chain equals
the whole module is a property of the cut, tested on the small presets, so no build pays a whole
full-size forward pass for it. Besides `model.pt` (the graph only; its weights are the chunk's share
of the rewrite output) and `check.json` each writes `interface.json` (the chunk's inputs and
outputs, for the convert stage) and `examples.safetensors` (its example inputs, for the verify stage).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from safetensors.torch import load_file, save_file
from torch import nn

from builder.errors import UserError
from builder.sd.chunk import Chunks, split_unet
from builder.sd.psnr import psnr
from builder.stages.params import ChunkParams
from builder.stages.torchscript import save_graph
from builder.stages.trace import load_conversion_module, trace_capturing_outputs

HANDOVER = "handover.safetensors"  # chunk 1's outputs on the example inputs, chunk 2's inputs
EXAMPLES = "examples.safetensors"
INTERFACE = "interface.json"

Part = Literal["first", "second", "whole"]


def _parameter_names(chunk: nn.Module) -> list[str]:
    return [name for name, _ in chunk.named_parameters()]


def split(rewritten: Path, part: Part, attention: str | None = None) -> tuple[Chunks, dict]:
    """The rewrite stage's conversion module cut in two, with only `part`'s weights loaded (the
    other chunk's stay on the meta device) and `attention` as in `load_conversion_module`;
    ValueError names what cannot be chunked."""
    names = [spec["name"] for spec in json.loads((rewritten / "architecture.json").read_text())["inputs"]]

    def wanted(module: nn.Module) -> list[str]:
        if part == "whole":
            return [name for name, _ in module.named_parameters()]
        chunks = split_unet(module, names)
        return _parameter_names(chunks.first if part == "first" else chunks.second)

    module, architecture = load_conversion_module(rewritten, wanted, attention)
    return split_unet(module, names), architecture


def run(inputs: dict[str, Path], params: dict, out: Path) -> dict:
    p = ChunkParams.model_validate(params)
    try:
        chunks, architecture = split(inputs["rewritten"], "first" if p.chunk == 1 else "second")
    except ValueError as refused:
        raise UserError(f"{p.component}: {refused}", hint="set chunk_unet: false for this model") from None
    references = load_file(inputs["rewritten"] / "reference.safetensors")
    example = {spec["name"]: references[f"input.{spec['name']}"] for spec in architecture["inputs"]}
    chunk = chunks.first if p.chunk == 1 else chunks.second
    if p.chunk == 1:
        own = {name: example[name] for name in chunk.input_names}
    else:
        handed = load_file(inputs["first"] / HANDOVER) | example
        own = {name: handed[name].contiguous() for name in chunk.input_names}
    traced, produced = trace_capturing_outputs(chunk, tuple(own.values()))
    check: dict = {
        "chunk": {"index": p.chunk, "boundary": chunks.boundary, "parameter_bytes": list(chunks.parameter_bytes)}
    }
    if p.chunk == 1:
        save_file({n: t.contiguous() for n, t in zip(chunk.output_names, produced, strict=True)}, out / HANDOVER)
        check["psnr_db"] = {}  # chunk 1 alone has no reference; chunk 2's check scores the chain
    else:
        reference = references[f"output.{architecture['outputs'][0]}"]
        check["psnr_db"] = {"noise_pred": round(psnr(produced[0], reference), 2)}
    save_graph(traced, out / "model.pt", inputs["rewritten"] / "weights.safetensors")
    save_file(own, out / EXAMPLES)
    specs = {spec["name"]: spec for spec in architecture["inputs"]}
    interface = {
        "inputs": [specs.get(n) or {"name": n, "shape": list(t.shape), "dtype": "float16"} for n, t in own.items()],
        "outputs": chunk.output_names,
    }
    (out / INTERFACE).write_text(json.dumps(interface, indent=2, sort_keys=True))
    (out / "check.json").write_text(json.dumps(check, indent=2, sort_keys=True))
    score = check["psnr_db"].get("noise_pred")
    if score is not None and score < p.minimum_psnr_db:
        raise UserError(
            f"{p.component}: chunk 1 -> chunk 2 matches the reference at only {score} dB "
            f"(floor {p.minimum_psnr_db} dB)",
            hint="the rewrite changed the model's numbers; try attention: ORIGINAL and report the recipe",
        )
    return check | {"forward_passes": 1}  # of this chunk
