"""W8A8 stages: calibration samples, shared ranges, per-layer sensitivity in cached chunks, and the
quantized UNet converted to Core ML.

The graph for a `mode: w8a8` UNet, after its rewrite (`w8a8_stages`):

    w8a8-calibrate  UNet inputs along the calibration prompts' trajectories
    w8a8-ranges     every layer observed once over them (the shared schedule's calibration)
    w8a8-layers:i   chunk i of the layers, each scored alone on the analysis workload
    w8a8            decisions, the quantized model (calibrated again as built), traced and converted
    verify          the quantized model with the package's weights against float16 (verify_w8a8)

Each sensitivity chunk is its own cached stage, so a killed build resumes with every finished chunk.
The Stable Diffusion work lives in `builder.sd.w8a8`; these functions move files.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from builder.engine.spec import StageSpec
from builder.recipe.compression import W8A8
from builder.stages.params import VerifyParams, W8A8CalibrateParams, W8A8LayersParams, W8A8Params
from builder.stages.prompt_encoders import rewritten_text_encoders, text_encoder_inputs

SENSITIVITY_CHUNKS = 4
_RANGES_FILE = "ranges.safetensors"
_LAYERS_FILE = "layers.json"
_SENSITIVITY_FILE = "sensitivity.json"
QUANTIZER_FILE = "quantizer.safetensors"
DECISIONS_FILE = "decisions.json"
_PACKAGE = "model.mlpackage"


def w8a8_stages(
    *,
    component: str,
    settings: W8A8,
    family: str,
    deployment_target: str,
    rewritten: str,
    model: str | Path,
    memory_estimate_bytes: int,
    text_encoders: Mapping[str, str] | None = None,
) -> tuple[list[StageSpec], str, str]:
    """(stages, id of the stage holding model.mlpackage, id of its verify stage) for one UNet.
    `text_encoders` (component -> rewrite stage) replace the pipeline folder's: LoRA-fused ones."""
    from builder.sd.mbp.analysis import ProbeSettings
    from builder.stages.analyze import probe_stage

    path = f"components.{component}.compression"
    workload = ProbeSettings(prompts=_workload_prompts(settings.sensitivity.prompts), steps=settings.sensitivity.steps)
    probe = probe_stage(
        rewritten=rewritten,
        model=model,
        memory_estimate_bytes=memory_estimate_bytes,
        family=family,
        component=component,
        probe=workload,
        text_encoders=text_encoders,
    )
    common: dict[str, Any] = {"component": component, "memory_estimate_bytes": memory_estimate_bytes}
    source = {"model": model} if isinstance(model, str) else {}
    calibration = settings.calibration
    calibrate = StageSpec(
        id=f"w8a8-calibrate:{component}",
        stage="w8a8-calibrate",
        function="builder.stages.w8a8:run_calibrate",
        params=W8A8CalibrateParams(
            family=family, prompts=calibration.prompt_list(), steps=calibration.steps, seed=calibration.seed
        ).model_dump(mode="json"),
        param_origins={name: f"{path}.calibration.{name}" for name in ("prompts", "steps", "seed")},
        inputs=source | {"rewritten": rewritten} | text_encoder_inputs(text_encoders),
        external_inputs={"model": model} if isinstance(model, Path) else {},
        **common,
    )
    ranges = StageSpec(
        id=f"w8a8-ranges:{component}",
        stage="w8a8-ranges",
        function="builder.stages.w8a8:run_ranges",
        inputs={"rewritten": rewritten, "calibration": calibrate.id},
        **common,
    )
    chunks = [
        StageSpec(
            id=f"w8a8-layers:{component}:{chunk}",
            stage="w8a8-layers",
            function="builder.stages.w8a8:run_layers",
            params=W8A8LayersParams(chunk=chunk, chunks=SENSITIVITY_CHUNKS).model_dump(mode="json"),
            inputs={"rewritten": rewritten, "ranges": ranges.id, "probe": probe.id},
            parallel=False,  # the chunks run side by side, a thread each (small layers' ops gain nothing from more)
            **common,
        )
        for chunk in range(SENSITIVITY_CHUNKS)
    ]
    quantize_params = W8A8Params(
        conv_psnr=settings.conv_psnr,
        attention_psnr=settings.attention_psnr,
        quantize_up_convs=settings.quantize_up_convs,
        to_out_w8a32=settings.to_out_w8a32,
        deployment_target=deployment_target,
        palettize_nbits=settings.palettize.nbits if settings.palettize else None,
    )
    origins = {name: f"{path}.{name}" for name in ("conv_psnr", "attention_psnr", "quantize_up_convs", "to_out_w8a32")}
    quantize = StageSpec(
        id=f"w8a8:{component}",
        stage="w8a8",
        function="builder.stages.w8a8:run_quantize",
        params=quantize_params.model_dump(mode="json"),
        param_origins=origins | {"deployment_target": "deployment_target", "palettize_nbits": f"{path}.palettize"},
        inputs={"rewritten": rewritten, "calibration": calibrate.id}
        | {f"layers.{s.params['chunk']}": s.id for s in chunks},
        **common,
    )
    floor = settings.minimum_psnr_db
    verify = StageSpec(
        id=f"verify:{component}",
        stage="verify",
        function="builder.stages.verify_w8a8:run",
        params=VerifyParams(minimum_psnr_db=floor).model_dump(mode="json", exclude_unset=True)
        if floor is not None
        else {},
        param_origins={"minimum_psnr_db": f"{path}.minimum_psnr_db"} if floor is not None else {},
        inputs={"rewritten": rewritten, "model": quantize.id, "probe": probe.id},
        **common,
    )
    return [probe, calibrate, ranges, *chunks, quantize, verify], quantize.id, verify.id


def _workload_prompts(count: int) -> tuple[str, ...]:
    from builder.recipe.calibration import WORKLOAD_PROMPTS

    return WORKLOAD_PROMPTS[:count]


def _unet(rewritten: Path):
    """The conversion module with float16 weights, its QuantizableUnet twin and the example inputs."""
    from safetensors.torch import load_file

    from builder.sd.read_back import float16_weights
    from builder.sd.w8a8.unet import QuantizableUnet
    from builder.stages.trace import load_conversion_module

    module, architecture = load_conversion_module(rewritten)
    float16_weights(module)
    references = load_file(rewritten / "reference.safetensors")
    example = tuple(references[f"input.{spec['name']}"] for spec in architecture["inputs"])
    shape = architecture["inputs"][0]["shape"]  # sample: (batch, channels, height, width)
    try:
        unet = QuantizableUnet(module, (shape[2], shape[3])).eval()
    except ValueError as refused:
        from builder.errors import UserError

        raise UserError(f"w8a8: {refused}", hint="use mode: quantize or palettize for this UNet") from None
    return module, unet, example, architecture


def run_calibrate(inputs: dict[str, Path], params: dict, out: Path) -> dict:
    from builder.sd.w8a8.calibration import record_samples, save_samples

    p = W8A8CalibrateParams.model_validate(params)
    module, _, _, architecture = _unet(inputs["rewritten"])
    shape = architecture["inputs"][0]["shape"]
    encoders = rewritten_text_encoders(inputs)
    size = (shape[2], shape[3])
    samples = record_samples(module, inputs["model"], p.family, size, p.prompts, p.steps, p.seed, encoders)
    save_samples(samples, out)
    return {"samples": len(samples["sample"]), "forward_passes": len(samples["sample"])}


def run_ranges(inputs: dict[str, Path], params: dict, out: Path) -> dict:
    from safetensors.torch import save_file

    from builder.sd.w8a8.calibration import load_samples
    from builder.sd.w8a8.quantizer import Prepared, sensitivity_config

    start = time.perf_counter()
    _, unet, example, _ = _unet(inputs["rewritten"])
    layers = unet.layers()
    prepared = Prepared(unet, sensitivity_config([layer.name for layer in layers]), example)
    samples = prepared.calibrate(load_samples(inputs["calibration"]))
    prepared.freeze()
    save_file(prepared.state(), out / _RANGES_FILE)
    (out / _LAYERS_FILE).write_text(json.dumps([[layer.name, layer.kind] for layer in layers], indent=1))
    seconds = time.perf_counter() - start
    return {"layers": len(layers), "forward_passes": samples, "seconds": round(seconds, 2)}


def _layers(ranges: Path):
    from builder.sd.w8a8.unet import Layer

    return [Layer(name, kind) for name, kind in json.loads((ranges / _LAYERS_FILE).read_text())]


def run_layers(inputs: dict[str, Path], params: dict, out: Path) -> dict:
    from safetensors.torch import load_file

    from builder.sd.w8a8.quantizer import Prepared, sensitivity_config
    from builder.sd.w8a8.sensitivity import SharedSchedule, measure

    p = W8A8LayersParams.model_validate(params)
    start = time.perf_counter()
    _, unet, example, _ = _unet(inputs["rewritten"])
    layers = _layers(inputs["ranges"])
    if [(layer.name, layer.kind) for layer in layers] != [(layer.name, layer.kind) for layer in unet.layers()]:
        raise ValueError("the recorded ranges were made for another UNet")
    prepared = Prepared(unet, sensitivity_config([layer.name for layer in layers]), example)
    prepared.load_state(load_file(inputs["ranges"] / _RANGES_FILE))
    schedule = SharedSchedule(prepared, layers, inputs["probe"])
    mine = layers[p.chunk :: p.chunks]
    measured = measure(schedule, mine)
    (out / _SENSITIVITY_FILE).write_text(json.dumps(measured, indent=1))
    seconds = time.perf_counter() - start
    return {"layers": len(mine), "unet_evaluations": schedule.probe.evaluations, "seconds": round(seconds, 2)}


def sensitivities(inputs: dict[str, Path]) -> dict[str, float]:
    """Every measured layer's PSNR, from the `layers.<i>` inputs."""
    measured: dict[str, float] = {}
    for name, folder in sorted(inputs.items()):
        if name.startswith("layers."):
            measured |= json.loads((folder / _SENSITIVITY_FILE).read_text())
    return measured


def run_quantize(inputs: dict[str, Path], params: dict, out: Path) -> dict:
    from safetensors.torch import save_file

    from builder.sd.w8a8.calibration import load_samples
    from builder.sd.w8a8.convert import convert_quantized
    from builder.sd.w8a8.decisions import Thresholds, decide, w8a32_layers
    from builder.sd.w8a8.quantizer import Prepared, cumulative_config

    p = W8A8Params.model_validate(params)
    _, unet, example, architecture = _unet(inputs["rewritten"])
    decisions = decide(unet.layers(), sensitivities(inputs), Thresholds.model_validate(p.model_dump()))
    kept = w8a32_layers(decisions)
    prepared = Prepared(unet, cumulative_config(kept), example)
    samples = prepared.calibrate(load_samples(inputs["calibration"]))
    prepared.freeze()
    save_file(prepared.state(), out / QUANTIZER_FILE)
    (out / DECISIONS_FILE).write_text(
        json.dumps({name: d.model_dump() for name, d in decisions.items()}, indent=1, sort_keys=True) + "\n"
    )
    report = convert_quantized(
        prepared.finalize(), example, architecture, p.deployment_target, out / _PACKAGE, p.palettize_nbits
    )
    report["palettize_nbits"] = p.palettize_nbits
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    return report | {"w8a32_layers": len(kept), "layers": len(decisions), "forward_passes": samples}
