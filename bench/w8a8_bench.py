"""W8A8 cost on one synthetic UNet: calibration, per-layer sensitivity, conversion, and what it keeps.

    .venv/bin/python bench/w8a8_bench.py [--preset sd-2-1-base] [--latent-size 64] [--sample N]
                                         [--reference] [--threads N] [--json FILE]

The preset's pipeline is written with seeded weights, its UNet rewritten for the Neural Engine
(SPLIT_EINSUM, batch 2) and taken through the W8A8 stages' own functions, in this process, phase by
phase: calibration samples recorded along the calibration prompts' trajectories; every layer
observed once over them (the shared schedule's calibration); each layer scored alone on the
workload; decisions; the cumulative model calibrated, converted to Core ML and checked against
float16 (example inputs and the workload). Per phase: wall seconds and the process's peak resident
memory during it (sampled every 50 ms).

`--sample N` scores only N layers spread over the UNet and extrapolates the sensitivity pass to all
of them; the decisions then cover only those (unmeasured layers count as W8A8), so use it for
timing, never for decisions. `--reference` also runs Apple's schedule (per layer: prepare,
calibrate over every sample, finalize, score) on every layer and compares its decisions and its
UNet forward passes with the shared schedule's; meant for the tiny presets.

`--threads N` sets torch's thread count (default: torch's). The quantized and observed UNets run
thousands of small ops (an observer or a quantize per activation, an einsum per attention head);
when the machine is busier than its cores, each op spread over several threads waits for a
descheduled one, so there one thread can be several times faster than all cores. The figures
record the count and the load average.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import psutil
import torch

PROJECT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(PROJECT))

from builder.recipe.calibration import BUILT_IN_PROMPTS, WORKLOAD_PROMPTS  # noqa: E402
from builder.sd.mbp.analysis import Probe, ProbeSettings, write_probe_inputs  # noqa: E402
from builder.sd.presets import get_preset  # noqa: E402
from builder.sd.psnr import psnr  # noqa: E402
from builder.sd.synthetic import write_synthetic_pipeline  # noqa: E402
from builder.sd.w8a8.calibration import load_samples, record_samples, save_samples  # noqa: E402
from builder.sd.w8a8.convert import convert_quantized  # noqa: E402
from builder.sd.w8a8.decisions import Thresholds, decide, w8a32_layers  # noqa: E402
from builder.sd.w8a8.quantizer import Prepared, cumulative_config, sensitivity_config  # noqa: E402
from builder.sd.w8a8.sensitivity import SharedSchedule, single_layer_scores  # noqa: E402
from builder.stages import rewrite  # noqa: E402
from builder.stages.w8a8 import _unet  # noqa: E402

GIB = 1 << 30


class Phases:
    """Wall seconds and peak resident memory (GiB) of each named phase."""

    def __init__(self) -> None:
        self.figures: dict[str, dict[str, float]] = {}
        self._process = psutil.Process()

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        peak = [self._process.memory_info().rss]
        done = threading.Event()

        def sample() -> None:
            while not done.wait(0.05):
                peak[0] = max(peak[0], self._process.memory_info().rss)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        start = time.perf_counter()
        try:
            yield
        finally:
            seconds = time.perf_counter() - start
            done.set()
            sampler.join()
            self.figures[name] = {"seconds": round(seconds, 2), "peak_gib": round(peak[0] / GIB, 2)}
            print(f"  {name:<24} {seconds:9.1f} s   peak {peak[0] / GIB:6.2f} GiB", flush=True)


def _spread(items: list, count: int | None) -> list:
    return items if count is None or count >= len(items) else items[:: max(1, len(items) // count)][:count]


def _timed_scores(score: Callable[[str], float], names: list[str]) -> tuple[dict[str, float], list[float]]:
    measured, seconds = {}, []
    for name in names:
        start = time.perf_counter()
        measured[name] = round(score(name), 3)
        seconds.append(time.perf_counter() - start)
    return measured, seconds


def _shared_sensitivity(
    phases: Phases, unet, example, samples, probe_inputs: Path, chosen: list
) -> tuple[dict[str, float], list[float], int]:
    """The shared schedule: (layer -> PSNR, seconds per layer, UNet calls of the workload)."""
    layers = unet.layers()
    with phases.phase("ranges (shared)"):
        prepared = Prepared(unet, sensitivity_config([layer.name for layer in layers]), example)
        prepared.calibrate(samples)
        schedule = SharedSchedule(prepared, layers, probe_inputs)
    with phases.phase("sensitivity (shared)"):
        shared, seconds = _timed_scores(lambda n: schedule.scores(n).latent_psnr_db, [x.name for x in chosen])
    return shared, seconds, schedule.probe.evaluations


def bench(args: argparse.Namespace, root: Path) -> dict:
    preset = get_preset(args.preset)
    phases = Phases()
    source, rewritten, probe_inputs, samples_dir = (root / n for n in ("source", "rewritten", "probe", "samples"))
    for folder in (rewritten, probe_inputs, samples_dir):
        folder.mkdir(parents=True)
    size = (args.latent_size, args.latent_size)
    with phases.phase("synthetic + rewrite"):
        write_synthetic_pipeline(preset, 0, source)
        params = {"component": "unet", "family": preset.family, "attention": args.attention}
        rewrite.run({"model": source}, params | {"latent_size": list(size), "batch_size": 2}, rewritten)
        workload = ProbeSettings(prompts=WORKLOAD_PROMPTS[: args.workload_prompts], steps=args.workload_steps)
        write_probe_inputs(source, preset.family, size, preset.unet["in_channels"], workload, probe_inputs)
    module, unet, example, architecture = _unet(rewritten)
    parameters = sum(p.numel() for p in module.parameters())
    prompts = list(BUILT_IN_PROMPTS[: args.calibration_prompts])

    with phases.phase("calibration"):
        save_samples(
            record_samples(module, source, preset.family, size, prompts, args.calibration_steps, 0), samples_dir
        )
    samples = load_samples(samples_dir)

    layers = unet.layers()
    chosen = _spread(layers, args.sample)
    shared, shared_seconds, evaluations = _shared_sensitivity(phases, unet, example, samples, probe_inputs, chosen)
    per_layer = phases.figures["sensitivity (shared)"]["seconds"] / len(chosen)
    del unet, module  # the quantizer prepared them in place
    gc.collect()  # the prepared model is a reference cycle (graph <-> module): else a second UNet stays

    result: dict = {
        "preset": args.preset,
        "torch_threads": torch.get_num_threads(),
        "latent_size": args.latent_size,
        "attention": args.attention,
        "parameters_millions": round(parameters / 1e6, 1),
        "calibration": {"prompts": len(prompts), "steps": args.calibration_steps, "samples": len(samples)},
        "workload": {"prompts": workload.prompts, "steps": workload.steps},
        "layers": len(layers),
        "conv_layers": sum(layer.kind == "conv" for layer in layers),
        "attention_layers": sum(layer.kind == "attention" for layer in layers),
        "measured_layers": len(chosen),
        "sensitivity_seconds_per_layer": {
            "mean": round(per_layer, 2),
            "min": round(min(shared_seconds), 2),
            "max": round(max(shared_seconds), 2),
        },
        "sensitivity_seconds_all_layers": round(per_layer * len(layers), 1),
        "sensitivity_extrapolated": len(chosen) < len(layers),
    }

    decisions = decide(chosen, shared, Thresholds())
    kept = w8a32_layers(decisions)
    result["w8a32_layers"] = kept
    module, unet, example, architecture = _unet(rewritten)
    probe = Probe(module, probe_inputs, [])  # the float16 reference of the workload
    with torch.no_grad():
        expected = module(*example)
    with phases.phase("cumulative calibration"):
        built = Prepared(unet, cumulative_config(kept), example)
        built.calibrate(samples)
        built.freeze()
        quantized = built.finalize()
    with torch.no_grad():
        produced = quantized(*example)
    scores = probe.scores_of(quantized)
    result["psnr_db"] = {
        "example_inputs": round(psnr(produced, expected), 2),
        "workload_latents": round(scores.latent_psnr_db, 2),
        "workload_single_call": round(scores.single_call_psnr_db, 2),
    }
    with phases.phase("conversion"):
        converted = convert_quantized(quantized, example, architecture, "iOS17", root / "model.mlpackage")
    result["package"] = converted

    if args.reference:
        float_probe = Probe(_unet(rewritten)[0], probe_inputs, [])

        def apple(name: str) -> float:
            _, alone, _, _ = _unet(rewritten)
            score = single_layer_scores(alone, name, example, samples, float_probe).latent_psnr_db
            del alone
            gc.collect()  # the layer's prepared UNet is a reference cycle: without this each one stays
            return score

        with phases.phase("sensitivity (reference)"):
            reference, _ = _timed_scores(apple, [x.name for x in chosen])
        theirs = decide(chosen, reference, Thresholds())
        differ = sorted(n for n in decisions if decisions[n].activations != theirs[n].activations)
        passes_shared = len(samples) + evaluations
        passes_reference = len(chosen) * len(samples) + float_probe.evaluations
        result["reference"] = {
            "same_decisions": not differ,
            "differing_layers": differ,
            "largest_psnr_difference_db": round(max(abs(shared[n] - reference[n]) for n in shared), 3),
            "unet_forward_passes": {"shared": passes_shared, "reference": passes_reference},
            "forward_pass_factor": round(passes_reference / passes_shared, 2),
            "seconds": {
                "shared": round(
                    phases.figures["ranges (shared)"]["seconds"] + phases.figures["sensitivity (shared)"]["seconds"], 1
                ),
                "reference": phases.figures["sensitivity (reference)"]["seconds"],
            },
        }
        seconds = result["reference"]["seconds"]
        result["reference"]["time_factor"] = round(seconds["reference"] / seconds["shared"], 2)
    result["phases"] = phases.figures
    result["load_average_at_end"] = [round(load, 1) for load in os.getloadavg()]  # 1, 5, 15 min
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="sd-2-1-base")
    parser.add_argument("--latent-size", type=int, default=64)
    parser.add_argument("--attention", default="SPLIT_EINSUM")
    parser.add_argument("--calibration-prompts", type=int, default=2)
    parser.add_argument("--calibration-steps", type=int, default=4)
    parser.add_argument("--workload-prompts", type=int, default=2)
    parser.add_argument("--workload-steps", type=int, default=2)
    parser.add_argument("--sample", type=int, default=None, help="score only this many layers and extrapolate")
    parser.add_argument("--reference", action="store_true", help="also run Apple's per-layer schedule")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    print(f"w8a8 bench: {args.preset}, latents {args.latent_size}, {torch.get_num_threads()} torch threads", flush=True)
    with tempfile.TemporaryDirectory(prefix="w8a8-bench-") as root:
        result = bench(args, Path(root))
    text = json.dumps(result, indent=1)
    print(text)
    if args.json is not None:
        args.json.write_text(text + "\n")


if __name__ == "__main__":
    main()
