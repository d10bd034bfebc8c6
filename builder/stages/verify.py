"""Verify stage: a compressed model's weights read back into torch and measured against float16.

No Core ML runtime exists on Linux, so the compressed program is judged by rebuilding its dense
weights from the saved tables and indices, loading them into the conversion module, and comparing
its outputs with the float16-weight module on the fixed inputs. The module is held once: it runs
with float16 weights first, then the compressed weights are written over them in place. It is
evaluated with the batched attention form whatever the recipe's (see EVALUATED_ATTENTION): what is
judged is the weights.

A chunked UNet is verified per chunk, as the app runs it: chunk 1 hands its float16 and compressed
outputs to chunk 2's verify (`handover.safetensors`), which scores chunk 2 on the float16 hand-over
and the whole chain (compressed chunk 1 -> compressed chunk 2) against the float16 chain, without
running the whole UNet again. Every stage records which module tensor each compressed const holds
(`weight_sources.json`), which the report reads instead of deriving it again.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from builder.errors import UserError
from builder.sd.chunk import UnetChunk
from builder.sd.psnr import psnr
from builder.sd.read_back import (
    SOURCES_FILE,
    Sources,
    UnmappedWeights,
    float16_weights,
    load_compressed,
    load_sources,
    save_sources,
    weight_sources,
)
from builder.stages.chunk import EXAMPLES, split
from builder.stages.params import VerifyParams
from builder.stages.trace import load_conversion_module

HANDOVER = "handover.safetensors"
# The attention form the module is evaluated with. The three forms compute the same function from the
# same parameters (the trace stage checks the recipe's own against diffusers), and the batched one runs
# several times faster on a CPU than one small einsum per head: most of a full-size verify was those.
EVALUATED_ATTENTION = "ORIGINAL"
_PACKAGE = "model.mlpackage"


class _Runner:
    """Calls a module without gradients and counts the calls (the stage reports its forward passes,
    the mixed-bit workload's denoising steps aside)."""

    calls = 0

    def __call__(self, module: nn.Module, example: Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        self.calls += 1
        with torch.no_grad():
            produced = module(*example)
        return produced if isinstance(produced, tuple) else (produced,)


_run = _Runner()


def _scores(names: Sequence[str], produced: Sequence[torch.Tensor], expected: Sequence[torch.Tensor], skip=()) -> dict:
    return {
        name: round(psnr(got, want), 2)
        for name, got, want in zip(names, produced, expected, strict=True)
        if name not in skip
    }


def _sources(module: nn.Module, inputs: dict[str, Path]) -> Sources:
    try:
        return weight_sources(module, inputs["model"] / _PACKAGE, inputs["float16"] / _PACKAGE)
    except UnmappedWeights as problem:
        raise UserError(
            str(problem),
            hint="this model's converter output folds a weight in a way read-back cannot follow; "
            "report the recipe, or raise the component's compression.weight_threshold above that weight's size",
        ) from None


def run(inputs: dict[str, Path], params: dict, out: Path) -> dict:
    p = VerifyParams.model_validate(params)
    chunk = p.chunk
    _run.calls = 0
    if chunk is None:
        module, architecture = load_conversion_module(inputs["rewritten"], attention=EVALUATED_ATTENTION)
        references = load_file(inputs["rewritten"] / "reference.safetensors")
        example = [references[f"input.{spec['name']}"] for spec in architecture["inputs"]]
        check, sources = _verify(module, architecture, example, inputs, out)
    elif chunk == 1:
        chunks, _ = split(inputs["rewritten"], "first", EVALUATED_ATTENTION)
        examples = load_file(inputs["traced"] / EXAMPLES)
        example = [examples[name] for name in chunks.first.input_names]
        check, sources = _verify_first_chunk(chunks.first, example, inputs, out)
    else:
        check, sources = _verify_second_chunk(inputs, out)
    save_sources(out / SOURCES_FILE, sources)
    (out / "check.json").write_text(json.dumps(check, indent=2, sort_keys=True))
    check_floor(check, p.minimum_psnr_db)
    return check | {"compressed_weights": len(sources), "forward_passes": _run.calls}


def check_floor(check: dict, floor: float | None) -> None:
    """Fail when a read-back PSNR (a chunk's own, or its chain's) is below the recipe's floor."""
    scores = {
        f"{output} ({'chain' if key.startswith('chain') else 'read-back'})": db
        for key in ("read_back_psnr_db", "chain_read_back_psnr_db")
        for output, db in check.get(key, {}).items()
    }
    if floor is None or not scores:
        return
    worst = min(scores, key=lambda name: scores[name])
    if scores[worst] < floor:
        raise UserError(
            f"compressed model reaches {scores[worst]} dB on {worst} against float16, "
            f"below the floor minimum_psnr_db {floor:g} dB",
            hint="compress less (more bits, a finer granularity, or a higher-PSNR mixed-bit recipe), "
            "or lower minimum_psnr_db to accept it",
        )


def _verify(
    module: nn.Module, architecture: dict, example: list[torch.Tensor], inputs: dict[str, Path], out: Path
) -> tuple[dict, Sources]:
    float16_weights(module)
    expected = _run(module, example)
    probe = _probe(module, inputs) if "probe" in inputs else None
    sources = _sources(module, inputs)
    load_compressed(module, inputs["model"] / _PACKAGE, sources)
    produced = _run(module, example)
    decisions = set(architecture.get("decision_outputs", ()))  # yes/no outputs: PSNR says nothing of them
    check: dict = {"read_back_psnr_db": _scores(architecture["outputs"], produced, expected, decisions)}
    if probe is not None:
        check |= _mixed_bit_check(inputs, probe)
    return check, sources


def _verify_first_chunk(
    first: UnetChunk, example: list[torch.Tensor], inputs: dict[str, Path], out: Path
) -> tuple[dict, Sources]:
    float16_weights(first)
    expected = _run(first, example)
    sources = _sources(first, inputs)
    load_compressed(first, inputs["model"] / _PACKAGE, sources)
    produced = _run(first, example)
    handover = {f"float16.{n}": t for n, t in zip(first.output_names, expected, strict=True)}
    handover |= {f"compressed.{n}": t for n, t in zip(first.output_names, produced, strict=True)}
    save_file({name: t.contiguous() for name, t in handover.items()}, out / HANDOVER)
    return {"read_back_psnr_db": _scores(first.output_names, produced, expected)}, sources


def _verify_second_chunk(inputs: dict[str, Path], out: Path) -> tuple[dict, Sources]:
    """Chunk 2 on chunk 1's float16 hand-over (its own read-back) and the compressed chain."""
    scored = "probe" in inputs  # mixed-bit: the workload runs the whole UNet, so both chunks are loaded
    chunks, _ = split(inputs["rewritten"], "whole" if scored else "second", EVALUATED_ATTENTION)
    second = chunks.second
    handover = load_file(inputs["handover"] / HANDOVER)
    originals = load_file(inputs["traced"] / EXAMPLES)
    float16 = [handover.get(f"float16.{name}", originals[name]) for name in second.input_names]
    compressed = [handover.get(f"compressed.{name}", originals[name]) for name in second.input_names]
    float16_weights(chunks.whole if scored else second)
    expected = _run(second, float16)
    probe = _probe(chunks.whole, inputs) if scored else None
    sources = _sources(second, inputs)
    load_compressed(second, inputs["model"] / _PACKAGE, sources)
    check: dict = {
        "read_back_psnr_db": _scores(second.output_names, _run(second, float16), expected),
        "chain_read_back_psnr_db": _scores(second.output_names, _run(second, compressed), expected),
    }
    if probe is not None:
        first_sources = load_sources(inputs["handover"] / SOURCES_FILE)
        load_compressed(chunks.whole, inputs["first"] / _PACKAGE, first_sources)
        check |= _mixed_bit_check(inputs, probe)
    return check, sources


def _probe(module: nn.Module, inputs: dict[str, Path]):
    """The mixed-bit analysis workload on `module`'s float16 weights (its reference is run now)."""
    from builder.sd.mbp.analysis import Probe

    return Probe(module, inputs["probe"], [])


def _mixed_bit_check(inputs: dict[str, Path], probe) -> dict:
    """The recipe file's target and predicted PSNR beside what the module's current (read-back) weights
    achieve, in both of the workload's metrics (final latents, and its first UNet call alone)."""
    from builder.sd.mbp.recipe_file import load_recipe_file

    recipe = load_recipe_file(inputs["mbp_recipe"])
    achieved = probe.scores_of(probe.module)
    figures = {
        "target_psnr_db": recipe.target_psnr_db,
        "predicted_psnr_db": recipe.psnr_db,
        "achieved_psnr_db": round(achieved.latent_psnr_db, 2),
        "predicted_single_call_psnr_db": recipe.single_call_psnr_db,
        "achieved_single_call_psnr_db": round(achieved.single_call_psnr_db, 2),
    }
    return {"mixed_bit": {name: value for name, value in figures.items() if value is not None}}
