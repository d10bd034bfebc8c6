"""Wall time, CPU time and peak memory of converting the full-size SD 2.1 base pipeline, per stage and component.

    .venv/bin/python bench/convert_bench.py [--cache /tmp/convert-bench] [--rerun rewrite,trace,convert]
                                            [--components unet,text_encoder,vae_decoder]
                                            [--json artifacts/convert_bench.json] [--preset sd3-medium]

Builds a recipe (synthetic preset `sd-2-1-base`, attention SPLIT_EINSUM, latent 64x64, UNet batch 2,
float16, no compression) through the real engine in one build, one stage at a time (`--jobs 1`), so
each stage's peak is its own worker process's resident set and its CPU seconds are its worker's
user + system time (the engine records both), a figure other jobs on the machine disturb less than
wall time. Only source, rewrite, trace and convert run. The source stage stands in for a download
and is reported apart from the conversion total.

On Linux the workers fork from a zygote that imports the stage modules once per build; that
start-up gets its own row and is added once to the all-components total. `SDBUILD_WORKERS=spawn`
in the environment measures fresh interpreters per stage instead (each pays the imports).

With `--cache`, the cache outlives the run: the source stage (about a minute of seeded weight generation, 3.9 GiB)
is reused, and the stages named by `--rerun` run again anyway, because the bench gives them a
run-unique version so their action keys change. Without `--cache`, everything runs cold in a
temporary folder. Prints a table with totals and ratios against the reference converter measured
on the same 2-core machine, the load average, and writes the figures as JSON.

`--preset sd3-medium` measures SD3 medium instead (latent 64x64, batch 2, float16 MMDiT, default
components text_encoder, text_encoder_2, mmdit, vae_decoder; add text_encoder_3 for T5-XXL in
float32). The reference converter delegates SD3 to another package, so there are no ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

PROJECT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(PROJECT))

from builder.engine import Engine, StageFinished, WorkersReady  # noqa: E402
from builder.engine.spec import Graph  # noqa: E402
from builder.recipe import load_recipe  # noqa: E402
from builder.stages.pipeline import build_graph  # noqa: E402

GIB = 1 << 30
CONVERSION_STAGES = ("rewrite", "trace", "convert")
# apple/ml-stable-diffusion torch2coreml on this machine, same shapes: (seconds, peak bytes).
REFERENCE = {
    "unet": (197.5, 8.0 * GIB),
    "text_encoder": (26.0, 3.4 * GIB),
    "vae_decoder": (88.0, 2.1 * GIB),
}
TARGET_TIME_RATIO = 0.5
TARGET_PEAK_BYTES = 5 * GIB

RECIPE = """\
name: convert-bench
version: 0.1.0
family: sd
model:
  synthetic: {{preset: sd-2-1-base, seed: 0}}
latent_size: [64, 64]
attention: SPLIT_EINSUM
compute_unit: CPU_AND_NE
deployment_target: iOS16
unet_batch_size: 2
components:
{components}
"""


SD3_RECIPE = """\
name: convert-bench-sd3
version: 0.1.0
family: sd3
model:
  synthetic: {{preset: sd3-medium, seed: 0}}
latent_size: [64, 64]
attention: ORIGINAL
compute_unit: CPU_AND_GPU
deployment_target: macOS14
components:
{components}
"""
# Per preset: the recipe, the components it must name, and the ones measured by default.
PRESETS = {
    "sd-2-1-base": (RECIPE, ("unet", "text_encoder", "vae_decoder"), "unet,text_encoder,vae_decoder"),
    "sd3-medium": (
        SD3_RECIPE,
        ("text_encoder", "text_encoder_2", "mmdit", "vae_decoder"),
        "text_encoder,text_encoder_2,mmdit,vae_decoder",
    ),
}


def bench_graph(workspace: Path, components: list[str], rerun: set[str], preset: str = "sd-2-1-base") -> Graph:
    """The recipe's source and conversion stages; those in `rerun` get a version no cache holds."""
    recipe = workspace / "convert-bench.yaml"
    template, required, _ = PRESETS[preset]
    # The recipe always names the required components; only the asked-for ones are built.
    listed = [*components, *(c for c in required if c not in components)]
    recipe.write_text(template.format(components="\n".join(f"  {c}: {{}}" for c in listed)))
    graph = build_graph(load_recipe(recipe, workspace))
    run_id = f"bench-{time.time_ns()}"
    return Graph(
        spec.model_copy(update={"version": f"{spec.version}+{run_id}"}) if spec.stage in rerun else spec
        for spec in graph
        if spec.stage == "source" or (spec.stage in CONVERSION_STAGES and spec.component in components)
    )


def measure(
    cache: Path, workspace: Path, components: list[str], rerun: set[str], preset: str = "sd-2-1-base"
) -> tuple[list[dict], float | None]:
    """Build once, one stage at a time (`--jobs 1`), as `sdbuild build --jobs 1` would.

    Returns a row per stage and the seconds the worker zygote spent importing the stage modules
    (None with spawned workers). That start-up happens once per build, while the first stale stage
    waits for it; its row is reported without it and the start-up gets a row of its own.
    CPU time (user + system of the stage's worker) moves less than wall time when other jobs
    share the machine, so both are reported.
    """
    engine = Engine(cache, target="convert-bench")
    startup: list[float] = []

    def on_event(event) -> None:
        if isinstance(event, WorkersReady):
            startup.append(event.import_seconds)
        elif isinstance(event, StageFinished):
            r = event.result
            print(f"  {r.id}: {r.status} {r.seconds:.1f} s", file=sys.stderr, flush=True)

    results = engine.build(bench_graph(workspace, components, rerun, preset), jobs=1, on_event=on_event)
    import_seconds = startup[0] if startup else None
    rows, waited = [], False
    for result in results:
        seconds = result.seconds
        if result.status == "built" and import_seconds is not None and not waited:
            seconds, waited = max(0.0, seconds - import_seconds), True
        rows.append(
            {
                "stage": result.stage,
                "component": result.component,
                "status": result.status,
                "seconds": round(seconds, 2),
                "cpu_seconds": result.cpu_seconds if result.status == "built" else None,
                "peak_bytes": result.peak_memory_bytes,
                "summary": result.summary,
            }
        )
    return rows, import_seconds


def component_totals(rows: list[dict], reference: dict[str, tuple[float, float]]) -> dict[str, dict]:
    """Per component: conversion seconds (rewrite + trace + convert), largest stage peak, ratios
    against `reference` where it has the component."""
    totals: dict[str, dict] = {}
    for row in rows:
        if row["stage"] not in CONVERSION_STAGES:
            continue
        t = totals.setdefault(row["component"], {"seconds": 0.0, "cpu_seconds": 0.0, "peak_bytes": 0, "fresh": True})
        t["seconds"] = round(t["seconds"] + row["seconds"], 2)
        t["cpu_seconds"] = round(t["cpu_seconds"] + (row["cpu_seconds"] or 0), 2)
        t["peak_bytes"] = max(t["peak_bytes"], row["peak_bytes"] or 0)
        t["fresh"] = t["fresh"] and row["status"] == "built"
    for component, t in totals.items():
        if component not in reference:
            continue
        ref_seconds, ref_peak = reference[component]
        t["time_ratio"] = round(t["seconds"] / ref_seconds, 3)
        t["peak_ratio"] = round(t["peak_bytes"] / ref_peak, 3)
        t["meets_target"] = t["time_ratio"] <= TARGET_TIME_RATIO and t["peak_bytes"] <= TARGET_PEAK_BYTES
    return totals


def print_table(
    rows: list[dict],
    totals: dict[str, dict],
    startup: float | None,
    load: tuple[float, float, float],
    reference: dict[str, tuple[float, float]],
) -> None:
    print(f"{'stage':<9} {'component':<13} {'status':<7} {'seconds':>8} {'cpu s':>8} {'peak GiB':>9}  summary")
    for row in rows:
        peak = f"{row['peak_bytes'] / GIB:9.2f}" if row["peak_bytes"] else f"{'-':>9}"
        cpu = f"{row['cpu_seconds']:8.2f}" if row["cpu_seconds"] is not None else f"{'-':>8}"
        summary = json.dumps(row["summary"], sort_keys=True) if row["summary"] else ""
        print(
            f"{row['stage']:<9} {row['component'] or '-':<13} {row['status']:<7} {row['seconds']:8.2f} {cpu} {peak}  "
            f"{summary[:70]}"
        )
    if startup is not None:
        print(
            f"{'start-up':<9} {'-':<13} {'built':<7} {startup:8.2f} {'-':>8} {'-':>9}  "
            "worker zygote importing the stage modules, once per build"
        )
    print()
    print(
        f"{'component':<13} {'seconds':>8} {'cpu s':>8} {'ref s':>7} {'ratio':>6} {'peak GiB':>9} {'ref GiB':>8}  "
        "target (<= 0.5x time, <= 5 GiB)"
    )
    for component, t in totals.items():
        note = "" if t["fresh"] else "  (includes cached stages: figures from the run that built them)"
        if component not in reference:
            print(
                f"{component:<13} {t['seconds']:8.2f} {t['cpu_seconds']:8.2f} {'-':>7} {'-':>6} "
                f"{t['peak_bytes'] / GIB:9.2f} {'-':>8}  no reference figures{note}"
            )
            continue
        ref_seconds, ref_peak = reference[component]
        verdict = "met" if t["meets_target"] else "NOT met"
        print(
            f"{component:<13} {t['seconds']:8.2f} {t['cpu_seconds']:8.2f} {ref_seconds:7.1f} {t['time_ratio']:6.3f} "
            f"{t['peak_bytes'] / GIB:9.2f} {ref_peak / GIB:8.2f}  {verdict}{note}"
        )
    if len(totals) > 1 and set(totals) <= set(reference):
        ours = sum(t["seconds"] for t in totals.values()) + (startup or 0.0)
        baseline = sum(reference[c][0] for c in totals)
        print(f"{'all, with start-up':<19} {ours:8.2f} s against {baseline:.1f} s: ratio {ours / baseline:.3f}")
    print(
        f"\nload average at the end: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} (1, 5, 15 min) on {os.cpu_count()} cores"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", type=Path, help="cache folder kept between runs (default: a fresh temporary one)")
    parser.add_argument(
        "--rerun",
        default=",".join(CONVERSION_STAGES),
        help="stages run again even when cached (comma-separated; '' to reuse all)",
    )
    parser.add_argument("--preset", choices=sorted(PRESETS), default="sd-2-1-base")
    parser.add_argument("--components", help="comma-separated (default: the preset's)")
    parser.add_argument(
        "--json", type=Path, default=PROJECT / "artifacts" / "convert_bench.json", help="where to write the results"
    )
    args = parser.parse_args()
    components = [c for c in (args.components or PRESETS[args.preset][2]).split(",") if c]
    unknown = sorted(set(components) - set(REFERENCE))
    if unknown and args.preset == "sd-2-1-base":
        sys.exit(f"no reference figures for {', '.join(unknown)}; use some of {', '.join(REFERENCE)}")
    rerun = {s for s in args.rerun.split(",") if s}
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="sdbuild-convert-bench-") as folder:
        workspace = Path(folder)
        started = time.perf_counter()
        rows, startup = measure(args.cache or workspace / "cache", workspace, components, rerun, args.preset)
        wall = time.perf_counter() - started
    load = os.getloadavg()
    reference = REFERENCE if args.preset == "sd-2-1-base" else {}  # measured for SD 2.1 base only
    totals = component_totals(rows, reference)
    print_table(rows, totals, startup, load, reference)
    print(
        f"wall {wall:.1f} s; load average at the start: {load_before[0]:.2f} {load_before[1]:.2f} {load_before[2]:.2f}"
    )
    results = {
        "preset": args.preset,
        "stages": rows,
        "components": totals,
        "startup_seconds": startup,
        "wall_seconds": round(wall, 1),
        "load_average_start": load_before,
        "load_average_end": load,
        "cores": os.cpu_count(),
    }
    args.json.write_text(json.dumps(results, indent=2, sort_keys=True))
    print(f"results written to {args.json}")


if __name__ == "__main__":
    main()
