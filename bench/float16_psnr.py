"""How close a conversion module stays to the diffusers reference when it computes in float16.

    .venv/bin/python bench/float16_psnr.py REWRITE_OUTPUT [REWRITE_OUTPUT ...] [--json FILE]

Linux has no Core ML runtime, and the trace stage scores the float32 module: this runs the rewrite
stage's module (its weights and fixed example inputs, from a rewrite output folder in the cache,
e.g. `<cache>/objects/<digest>` of `rewrite:mmdit`) with weights and activations in torch float16 on
the CPU, the precision a float16 Core ML program computes in, and prints the PSNR of every output
against the reference outputs the rewrite stage stored. It decides whether a component can ship in
float16 (the build's floor is 35 dB). Inputs the Swift side sends as float32 (token ids, SD3's
timestep) stay float32.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

PROJECT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(PROJECT))

from safetensors.torch import load_file  # noqa: E402

from builder.sd.psnr import psnr  # noqa: E402
from builder.stages.trace import load_conversion_module  # noqa: E402


def float16_psnr(rewritten: Path) -> dict:
    """The module of `rewritten` in float16 vs its stored reference outputs."""
    module, architecture = load_conversion_module(rewritten)
    references = load_file(rewritten / "reference.safetensors")
    inputs = [
        references[f"input.{spec['name']}"].to(torch.float16 if spec["dtype"] == "float16" else torch.float32)
        for spec in architecture["inputs"]
    ]
    module = module.to(torch.float16)
    started = time.perf_counter()
    with torch.no_grad():
        outputs = module(*inputs)
    outputs = outputs if isinstance(outputs, tuple) else (outputs,)
    scores = {
        name: round(psnr(value.float(), references[f"output.{name}"]), 2)
        for name, value in zip(architecture["outputs"], outputs, strict=True)
    }
    return {
        "component": architecture["component"],
        "psnr_db": scores,
        "seconds": round(time.perf_counter() - started, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("rewritten", type=Path, nargs="+", help="rewrite stage output folders")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    results = []
    for folder in args.rewritten:
        result = float16_psnr(folder)
        results.append(result)
        print(f"{result['component']:<16} float16 {json.dumps(result['psnr_db'])}  ({result['seconds']} s)", flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
