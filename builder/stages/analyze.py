"""MBP analysis stages: fixed probe inputs, per-layer sensitivity in cached chunks, candidate recipes.

Each chunk of layers is its own cached stage, so an interrupted analysis resumes at the first chunk
that did not finish. The Stable Diffusion work lives in `builder.sd.mbp`; these only move files.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from pathlib import Path
from typing import cast

from pydantic import BaseModel, ConfigDict, Field

from builder.coreml.options import Nbits
from builder.engine.spec import StageSpec
from builder.sd.mbp.analysis import DEFAULT_TARGETS_DB, NBITS, ProbeSettings
from builder.sd.mbp.layers import DEFAULT_WEIGHT_THRESHOLD
from builder.stages.prompt_encoders import rewritten_text_encoders, text_encoder_inputs

_SENSITIVITY_FILE = "sensitivity.json"
DEFAULT_PROBE = ProbeSettings()


class LayerParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    chunk: int = Field(ge=0)
    chunks: int = Field(ge=1)
    nbits: list[int] = list(NBITS)
    weight_threshold: int = DEFAULT_WEIGHT_THRESHOLD


class CandidateParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str  # description written into each recipe file
    targets_db: list[float] = list(DEFAULT_TARGETS_DB)
    weight_threshold: int = DEFAULT_WEIGHT_THRESHOLD


class ProbeInputsParams(ProbeSettings):
    """The workload's settings and the pipeline family, which decides how prompts condition the UNet.
    (The latent size and the models reach the key through the rewritten UNet and the pipeline folder.)"""

    family: str = "sd"


def probe_stage(
    *,
    rewritten: str,
    model: str | Path,
    memory_estimate_bytes: int,
    family: str,
    component: str = "unet",
    probe: ProbeSettings = DEFAULT_PROBE,
    text_encoders: Mapping[str, str] | None = None,
) -> StageSpec:
    """The fixed workload (latents, prompt conditioning, scheduler) compressions are scored on.
    `text_encoders` (component -> rewrite stage) replace the pipeline folder's: LoRA-fused ones."""
    params = ProbeInputsParams(**probe.model_dump(), family=family)
    return StageSpec(
        id=f"analyze-inputs:{component}",
        stage="analyze-inputs",
        component=component,
        function="builder.stages.analyze:run_inputs",
        params=params.model_dump(mode="json"),
        inputs=({"model": model} if isinstance(model, str) else {})
        | {"rewritten": rewritten}
        | text_encoder_inputs(text_encoders),
        external_inputs={"model": model} if isinstance(model, Path) else {},
        memory_estimate_bytes=memory_estimate_bytes,
    )


def analysis_stages(
    *,
    rewritten: str,
    model: str | Path,
    description: str,
    memory_estimate_bytes: int,
    family: str,
    component: str = "unet",
    chunks: int = 16,
    probe: ProbeSettings = DEFAULT_PROBE,
    nbits: tuple[int, ...] = NBITS,
    targets_db: tuple[float, ...] = DEFAULT_TARGETS_DB,
    text_encoders: Mapping[str, str] | None = None,
) -> list[StageSpec]:
    """Stages of one analysis: `rewritten` is the rewrite stage id of the UNet; `model` the pipeline
    folder (text encoder, tokenizer, scheduler) as the source stage's id or a local folder's path.
    The last stage, `analyze:<component>`, holds `analysis.json` and `recipes/*.yaml`."""
    prepare = probe_stage(
        rewritten=rewritten,
        model=model,
        memory_estimate_bytes=memory_estimate_bytes,
        family=family,
        component=component,
        probe=probe,
        text_encoders=text_encoders,
    )
    layer_stages = [
        StageSpec(
            id=f"analyze-layers:{component}:{chunk}",
            stage="analyze-layers",
            function="builder.stages.analyze:run_layers",
            params=LayerParams(chunk=chunk, chunks=chunks, nbits=list(nbits)).model_dump(),
            inputs={"rewritten": rewritten, "probe": prepare.id},
            component=component,
            memory_estimate_bytes=memory_estimate_bytes,
        )
        for chunk in range(chunks)
    ]
    assemble = StageSpec(
        id=f"analyze:{component}",
        stage="analyze",
        function="builder.stages.analyze:run_candidates",
        params=CandidateParams(model=description, targets_db=list(targets_db)).model_dump(),
        inputs={"rewritten": rewritten, "probe": prepare.id}
        | {f"layers.{s.params['chunk']}": s.id for s in layer_stages},
        component=component,
        memory_estimate_bytes=memory_estimate_bytes,
    )
    return [prepare, *layer_stages, assemble]


def run_inputs(inputs: dict[str, Path], params: dict, out: Path) -> dict:
    from builder.sd.mbp.analysis import write_probe_inputs

    p = ProbeInputsParams.model_validate(params)
    architecture = json.loads((inputs["rewritten"] / "architecture.json").read_text())
    sample = architecture["inputs"][0]["shape"]  # (batch, channels, height, width)
    settings = ProbeSettings(**p.model_dump(exclude={"family"}))
    encoders = rewritten_text_encoders(inputs)
    write_probe_inputs(inputs["model"], p.family, (sample[2], sample[3]), sample[1], settings, out, encoders)
    return {}


def _probe(inputs: dict[str, Path], weight_threshold: int):
    from builder.sd.mbp.analysis import Probe
    from builder.sd.mbp.layers import palettizable_layers
    from builder.stages.trace import load_conversion_module

    module, _ = load_conversion_module(inputs["rewritten"])
    layers = palettizable_layers(module, weight_threshold)
    return Probe(module, inputs["probe"], layers), layers


def run_layers(inputs: dict[str, Path], params: dict, out: Path) -> dict:
    from builder.sd.mbp.analysis import measure_layers

    p = LayerParams.model_validate(params)
    start = time.perf_counter()
    probe, layers = _probe(inputs, p.weight_threshold)
    mine = layers[p.chunk :: p.chunks]
    sensitivity = measure_layers(probe, mine, p.nbits)
    seconds = time.perf_counter() - start
    (out / _SENSITIVITY_FILE).write_text(json.dumps(sensitivity, indent=1))
    return {"layers": len(mine), "unet_evaluations": probe.evaluations, "seconds": round(seconds, 2)}


def run_candidates(inputs: dict[str, Path], params: dict, out: Path) -> dict:
    from builder.sd.mbp.analysis import search_candidates
    from builder.sd.mbp.recipe_file import MbpRecipe, write_recipe_file

    p = CandidateParams.model_validate(params)
    start = time.perf_counter()
    sensitivity: dict[str, dict[int, float]] = {}
    for name, folder in inputs.items():
        if name.startswith("layers."):
            chunk = json.loads((folder / _SENSITIVITY_FILE).read_text())
            sensitivity |= {
                identity: {int(bits): db for bits, db in scores.items()} for identity, scores in chunk.items()
            }
    probe, layers = _probe(inputs, p.weight_threshold)
    candidates = search_candidates(probe, layers, sensitivity, p.targets_db)
    (out / "recipes").mkdir()
    for found in candidates:
        recipe = MbpRecipe(
            model=p.model,
            target_psnr_db=found.target_psnr_db,
            psnr_db=found.psnr_db,
            single_call_psnr_db=found.single_call_psnr_db,
            bits_per_weight=found.bits_per_weight,
            layers=cast(dict[str, Nbits | None], found.layers),  # the search picks widths from NBITS only
        )
        write_recipe_file(recipe, out / "recipes" / f"{found.target_psnr_db:g}db.yaml")
    seconds = time.perf_counter() - start
    analysis = {
        "sensitivity": sensitivity,
        "candidates": [c.model_dump(exclude={"layers"}) for c in candidates],
        "unet_evaluations": probe.evaluations,
    }
    (out / "analysis.json").write_text(json.dumps(analysis, indent=1))
    # The same candidates in the form `sdbuild report --candidates` plots.
    plotted = [
        {
            "name": f"{c.target_psnr_db:g}db",
            "average_bits": c.bits_per_weight,
            "size_bytes": c.size_bytes,
            "psnr_db": c.psnr_db,
            "single_call_psnr_db": c.single_call_psnr_db,
        }
        for c in candidates
    ]
    (out / "candidates.json").write_text(json.dumps(plotted, indent=1))
    return {"candidates": len(candidates), "unet_evaluations": probe.evaluations, "seconds": round(seconds, 2)}
