"""MBP analysis cost: UNet evaluations and seconds per layer and in total, on tiny-sd and a mid-size UNet.

    python bench/mbp_bench.py [--sample N]

The mid-size UNet is tiny-sd with wider channels and two layers per block (a local preset override).
`--sample N` measures only every k-th layer (N in all) of each model and extrapolates the per-layer
pass to all layers; the candidate search then runs on the sampled layers.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from builder.sd.mbp.analysis import NBITS, Probe, ProbeSettings, measure_layers, search_candidates, write_probe_inputs
from builder.sd.mbp.layers import palettizable_layers
from builder.sd.presets import get_preset
from builder.sd.synthetic import write_synthetic_pipeline
from builder.stages import rewrite
from builder.stages.trace import load_conversion_module

MID_UNET = {"block_out_channels": [64, 128, 256, 256], "layers_per_block": 2}


def bench(name: str, preset, sample: int | None, root: Path) -> None:
    source, rewritten, probe_inputs = root / "source", root / "rewritten", root / "probe"
    rewritten.mkdir(parents=True)
    write_synthetic_pipeline(preset, 0, source)
    rewrite.run(
        {"model": source},
        {"component": "unet", "attention": "SPLIT_EINSUM", "latent_size": [16, 16], "batch_size": 2},
        rewritten,
    )
    settings = ProbeSettings()
    write_probe_inputs(source, "sd", (16, 16), preset.unet["in_channels"], settings, probe_inputs)
    module, _ = load_conversion_module(rewritten)
    layers = palettizable_layers(module)
    chosen = layers[:: max(1, len(layers) // sample)][:sample] if sample else layers
    parameters = sum(p.numel() for p in module.parameters())

    start = time.perf_counter()
    probe = Probe(module, probe_inputs, layers)
    reference = probe.evaluations
    per_layer_start = time.perf_counter()
    sensitivity = measure_layers(probe, chosen, NBITS)
    per_layer_seconds = time.perf_counter() - per_layer_start
    per_layer_evaluations = probe.evaluations - reference
    search_start = time.perf_counter()
    candidates = search_candidates(probe, chosen, sensitivity)
    search_seconds = time.perf_counter() - search_start
    search_evaluations = probe.evaluations - reference - per_layer_evaluations
    seconds_per_evaluation = per_layer_seconds / per_layer_evaluations

    print(
        f"\n{name}: {parameters / 1e6:.1f} M parameters, {len(layers)} palettizable layers, "
        f"{len(settings.prompts)} prompts x {settings.steps} steps, {len(chosen)} layers measured"
    )
    print(f"  one UNet evaluation: {seconds_per_evaluation * 1000:.0f} ms")
    print(
        f"  per layer ({len(NBITS)} widths): {per_layer_evaluations / len(chosen):.1f} evaluations, "
        f"{per_layer_seconds / len(chosen):.2f} s; all {len(layers)} layers: "
        f"{per_layer_evaluations / len(chosen) * len(layers):.0f} evaluations, "
        f"{per_layer_seconds / len(chosen) * len(layers):.0f} s"
    )
    print(f"  candidate search over {len(chosen)} layers: {search_evaluations} evaluations, {search_seconds:.1f} s")
    print(f"  total measured: {probe.evaluations} evaluations, {time.perf_counter() - start:.1f} s")
    for found in candidates:
        print(
            f"    target {found.target_psnr_db:5.1f} dB -> {found.psnr_db:6.2f} dB, "
            f"{found.bits_per_weight:.2f} bits/weight, {found.size_bytes / 1e6:.2f} MB"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sample", type=int, default=None, help="measure only N layers per model")
    args = parser.parse_args()
    torch.set_num_threads(1)
    tiny = get_preset("tiny-sd")
    mid = tiny.model_copy(update={"unet": tiny.unet | MID_UNET})
    with tempfile.TemporaryDirectory() as folder:
        for name, preset in (("tiny-sd", tiny), ("mid (tiny-sd, channels 64-256, 2 layers per block)", mid)):
            bench(name, preset, args.sample, Path(folder) / name.split()[0])


if __name__ == "__main__":
    main()
