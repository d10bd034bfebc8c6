"""Chunk stage: one of the UNet's two chunks, traced, with the chunk chain checked in torch.

Takes the place of the trace stage for a chunked UNet. Both chunk stages cut the rewrite stage's
module the same way (`builder.sd.chunk.split_unet`) and check the same chain on the fixed inputs:
chunk 1 then chunk 2 against the diffusers reference (the trace floor applies) and against the
whole conversion module (recorded). The traced chunk itself is part of the chain it checks. Besides
`model.pt` (the graph only; its weights are the chunk's share of the rewrite output) and
`check.json` it writes `interface.json` (the chunk's inputs and outputs, for the convert stage) and
`examples.safetensors` (its example inputs, for the verify stage).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from pydantic import BaseModel, Field
from safetensors.torch import load_file, save_file

from builder.errors import UserError
from builder.sd.chunk import Chunks, split_unet
from builder.sd.psnr import psnr
from builder.stages.torchscript import save_graph
from builder.stages.trace import load_conversion_module


class ChunkParams(BaseModel):
    component: str
    chunk: int = Field(ge=1, le=2)
    minimum_psnr_db: float = 35.0


def split(rewritten: Path) -> tuple[Chunks, dict]:
    """The rewrite stage's conversion module, cut in two; ValueError names what cannot be chunked."""
    module, architecture = load_conversion_module(rewritten)
    return split_unet(module, [spec["name"] for spec in architecture["inputs"]]), architecture


def chunk_examples(chunks: Chunks, example: dict[str, torch.Tensor], index: int) -> dict[str, torch.Tensor]:
    """Chunk `index`'s inputs on the fixed example: the UNet inputs, or what chunk 1 hands over."""
    if index == 1:
        return {name: example[name] for name in chunks.first.input_names}
    with torch.no_grad():
        handed = dict(zip(chunks.first.output_names, chunks.first(*example.values()), strict=False)) | example
    return {name: handed[name].contiguous() for name in chunks.second.input_names}


def run(inputs: dict[str, Path], params: dict, out: Path) -> dict:
    p = ChunkParams.model_validate(params)
    try:
        chunks, architecture = split(inputs["rewritten"])
    except ValueError as refused:
        raise UserError(f"{p.component}: {refused}", hint="set chunk_unet: false for this model") from None
    references = load_file(inputs["rewritten"] / "reference.safetensors")
    example = {spec["name"]: references[f"input.{spec['name']}"] for spec in architecture["inputs"]}
    chunk = chunks.first if p.chunk == 1 else chunks.second
    own = chunk_examples(chunks, example, p.chunk)
    with torch.no_grad():
        traced = torch.jit.trace(chunk, tuple(own.values()), check_trace=False)
        whole = chunks.whole(*example.values())
        if p.chunk == 1:
            handed = dict(zip(chunk.output_names, traced(*own.values()), strict=False)) | example
            chain = chunks.second(*(handed[name] for name in chunks.second.input_names))[0]
        else:
            chain = traced(*own.values())[0]
    reference = references[f"output.{architecture['outputs'][0]}"]
    check = {
        "psnr_db": {"noise_pred": round(psnr(chain, reference), 2)},
        "chunk": {
            "index": p.chunk,
            "boundary": chunks.boundary,
            "parameter_bytes": list(chunks.parameter_bytes),
            "whole_psnr_db": round(psnr(chain, whole), 2),
            "whole_max_abs_diff": float((chain - whole).abs().max()),
        },
    }
    save_graph(traced, out / "model.pt", inputs["rewritten"] / "weights.safetensors")
    save_file(own, out / "examples.safetensors")
    specs = {spec["name"]: spec for spec in architecture["inputs"]}
    interface = {
        "inputs": [specs.get(n) or {"name": n, "shape": list(t.shape), "dtype": "float16"} for n, t in own.items()],
        "outputs": chunk.output_names,
    }
    (out / "interface.json").write_text(json.dumps(interface, indent=2, sort_keys=True))
    (out / "check.json").write_text(json.dumps(check, indent=2, sort_keys=True))
    score = check["psnr_db"]["noise_pred"]
    if score < p.minimum_psnr_db:
        raise UserError(
            f"{p.component}: chunk 1 -> chunk 2 matches the reference at only {score} dB (floor {p.minimum_psnr_db} dB)",
            hint="the rewrite changed the model's numbers; try attention: ORIGINAL and report the recipe",
        )
    return check
