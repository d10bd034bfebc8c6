"""Whole real-size builds, end to end: every stage to the bundle, as a user runs them.

    .venv/bin/python bench/full_build_bench.py [--recipe recipes/sd-2-1-base-ios.yaml ...] [--cache DIR]
                                               [--jobs 2] [--reference DIR] [--json artifacts/full_build_bench.json]

Each recipe (default: `sd-2-1-base-ios` and `sdxl-ios`) is copied with its hub sources swapped for
the synthetic preset of the same architecture (same weights' shapes, seeded random values; a hub
replacement VAE is dropped, since synthetic presets bring their own, which for SDXL converts in
float32) and everything else as written, then built cold with `sdbuild build --json` in a fresh
workspace and cache (or `--cache`). Per stage: wall seconds, CPU seconds, threads given, peak
memory, forward passes, and the bundle's models with their sizes and PSNR figures; then the whole
build's wall time and largest process.

`--reference DIR` (an exported apple/ml-stable-diffusion tree, never vendored) also runs the
reference's `torch2coreml` on the same synthetic pipeline folder, right after, with the recipe's
settings (attention, compute unit, latent size, chunking, 6-bit palettization), and prints
same-day ratios: this machine's speed drifts by 20% or more between days, so a fixed reference
column would mislead. Its extra imports (diffusionkit and what it imports, pytest) are installed into a side folder
next to the cache, never into the project's environment; it loads `*.fp16.safetensors` files, so
the pipeline is mirrored with those names linked to the weights.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
import yaml

PROJECT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(PROJECT))

from builder.engine.threads import plan_threads  # noqa: E402
from builder.recipe import load_recipe  # noqa: E402
from builder.stages.pipeline import build_graph  # noqa: E402

GIB = 1 << 30
DEFAULT_RECIPES = ("recipes/sd-2-1-base-ios.yaml", "recipes/sdxl-ios.yaml")
# Hub pipelines and the synthetic preset with their architecture.
PRESETS = {
    "stabilityai/stable-diffusion-2-1-base": "sd-2-1-base",
    "stable-diffusion-v1-5/stable-diffusion-v1-5": "sd-1-5",
    "runwayml/stable-diffusion-v1-5": "sd-1-5",
    "stabilityai/stable-diffusion-xl-base-1.0": "sdxl-base",
    "stabilityai/stable-diffusion-xl-refiner-1.0": "sdxl-refiner",
}
# What torch2coreml imports beyond our environment: diffusionkit 0.4.0 (its SD3 path, imported at
# start-up) and what that imports in turn, installed without their own dependencies.
REFERENCE_DEPENDENCIES = (
    "diffusionkit==0.4.0",
    "argmaxtools==0.1.23",
    "beartype==0.23.1",
    "jaxtyping==0.3.11",
    "wadler_lindig==0.1.8",
    "pytest",
)


def synthetic_recipe(recipe: Path, workspace: Path) -> Path:
    """`recipe` with its hub sources swapped for synthetic presets, written into `workspace/recipes/`."""
    data = yaml.safe_load(recipe.read_text())
    model = data["model"]
    for key in ("model", "refiner"):
        source = model if key == "model" else model.get("refiner")
        if source and "hub" in source:
            repo = source.pop("hub")["id"]
            if repo not in PRESETS:
                sys.exit(f"{recipe}: no synthetic preset for {repo}; known: {', '.join(PRESETS)}")
            source["synthetic"] = {"preset": PRESETS[repo], "seed": 0}
    model.pop("vae", None)
    if model.get("controlnets"):
        sys.exit(f"{recipe}: ControlNet recipes are not benchmarked (no synthetic stand-in for hub ControlNets)")
    data.pop("extends", None)
    data["name"] = f"{data['name']}-synthetic"
    target = workspace / "recipes" / f"{data['name']}.yaml"
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(yaml.safe_dump(data, sort_keys=False))
    return target


class TreePeak:
    """The largest resident set among a process's descendants (and the process itself, with
    `itself`), sampled every 0.2 s while the block runs."""

    def __init__(self, root: psutil.Process, itself: bool = False):
        self.root, self.itself, self.peak = root, itself, 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._watch, daemon=True)

    def __enter__(self) -> TreePeak:
        self.thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stop.set()
        self.thread.join()

    def _watch(self) -> None:
        while not self.stop.is_set():
            try:
                tree = [*([self.root] if self.itself else []), *self.root.children(recursive=True)]
                self.peak = max([self.peak, *(p.memory_info().rss for p in tree)])
            except psutil.Error:
                pass
            self.stop.wait(0.2)


def build(recipe: Path, workspace: Path, cache: Path, jobs: int) -> dict:
    """`sdbuild build --json` in a fresh interpreter, timed; returns its report plus figures from the cache."""
    command = [
        sys.executable, "-m", "builder.cli", "--workspace", str(workspace), "--cache-dir", str(cache),
        "build", str(recipe.relative_to(workspace)), "--json", "--jobs", str(jobs),
    ]  # fmt: skip
    started = time.monotonic()
    done = subprocess.run(command, cwd=workspace, capture_output=True, text=True)
    wall = time.monotonic() - started
    if done.returncode != 0:
        sys.exit(f"{recipe.name}: build failed (exit {done.returncode})\n{done.stderr[-3000:]}")
    report = json.loads(done.stdout)
    report["wall_seconds"] = round(wall, 1)
    graph = build_graph(load_recipe(recipe, workspace))
    threads = plan_threads(graph.order(), os.cpu_count() or 1)
    index = json.loads((cache / "index" / f"{report['recipe']}.json").read_text())
    for stage in report["stages"]:
        key = index.get(stage["id"])  # skipped stages (compile off macOS) have no record
        record = json.loads((cache / "actions" / f"{key}.json").read_text()) if key else {}
        stage["cpu_seconds"] = record.get("cpu_seconds")
        stage["threads"] = threads[stage["id"]]
        stage["forward_passes"] = (record.get("summary") or {}).get("forward_passes")
    manifest = json.loads((Path(report["bundle"]) / "manifest.json").read_text())
    report["models"] = {
        name: {
            "size_bytes": entry["size_bytes"],
            "bits_per_weight": entry["bits_per_weight"],
            "psnr_db": entry["psnr_db"],
            "read_back_psnr_db": entry["read_back_psnr_db"],
            "chain_read_back_psnr_db": (entry.get("chunk") or {}).get("chain_read_back_psnr_db"),
        }
        for name, entry in manifest["models"].items()
    }
    report["source"] = str(
        cache / "objects" / json.loads((cache / "actions" / f"{index['source']}.json").read_text())["output_digest"]
    )
    return report


def print_build(report: dict) -> None:
    print(f"\n## {report['recipe']}  (cold build, {report['wall_seconds']:.1f} s wall)")
    print(f"{'stage':<24} {'status':<8} {'seconds':>8} {'cpu s':>8} {'threads':>7} {'peak GiB':>9} {'passes':>6}")
    for s in report["stages"]:
        peak = f"{s['peak_memory_bytes'] / GIB:9.2f}" if s.get("peak_memory_bytes") else f"{'-':>9}"
        cpu = f"{s['cpu_seconds']:8.1f}" if s.get("cpu_seconds") is not None else f"{'-':>8}"
        passes = f"{s['forward_passes']:>6}" if s.get("forward_passes") is not None else f"{'-':>6}"
        print(f"{s['id']:<24} {s['status']:<8} {s['seconds']:8.1f} {cpu} {s['threads']:>7} {peak} {passes}")
    peaks = [s["peak_memory_bytes"] for s in report["stages"] if s.get("peak_memory_bytes")]
    print(
        f"largest stage: {max(peaks) / GIB:.2f} GiB; largest process sampled: {report['peak_tree_bytes'] / GIB:.2f} GiB"
    )
    print(f"{'model':<16} {'MB':>9} {'bits/w':>7}  PSNR traced | read back | chain read back (dB)")
    for name, m in report["models"].items():
        bits = f"{m['bits_per_weight']:7.2f}" if m["bits_per_weight"] is not None else f"{'-':>7}"
        print(
            f"{name:<16} {m['size_bytes'] / 1e6:9.1f} {bits}  {_figures(m['psnr_db'])} | "
            f"{_figures(m['read_back_psnr_db'])} | {_figures(m['chain_read_back_psnr_db'])}"
        )


def _figures(values: dict | None) -> str:
    return ", ".join(f"{k} {v:.2f}" for k, v in values.items()) if values else "-"


def reference_side_folder(folder: Path) -> Path:
    """The reference's extra imports, installed once beside the cache, never into our venv."""
    marker = folder / ".installed"
    if not marker.exists() or marker.read_text() != "\n".join(REFERENCE_DEPENDENCIES):
        folder.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "install",
                "--quiet",
                "--no-deps",
                "--target",
                str(folder),
                *REFERENCE_DEPENDENCIES,
            ],
            check=True,
        )
        marker.write_text("\n".join(REFERENCE_DEPENDENCIES))
    return folder


def fp16_mirror(pipeline: Path, mirror: Path) -> Path:
    """The pipeline folder with every weight file also linked as its `.fp16.safetensors` variant."""
    for path in pipeline.rglob("*"):
        target = mirror / path.relative_to(pipeline)
        if path.is_dir():
            target.mkdir(parents=True, exist_ok=True)
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        target.symlink_to(path)
        if path.suffix == ".safetensors":
            target.with_name(path.name.replace(".safetensors", ".fp16.safetensors")).symlink_to(path)
    return mirror


def reference_arguments(recipe: Path, workspace: Path) -> list[str]:
    """torch2coreml's flags for what the recipe builds."""
    r = load_recipe(recipe, workspace).recipe
    arguments = [
        "--attention-implementation", r.attention.value,
        "--compute-unit", r.compute_unit.value,
        "--latent-h", str(r.latent_size[0]), "--latent-w", str(r.latent_size[1]),
        "--min-deployment-target", r.deployment_target.value,
    ]  # fmt: skip
    components = r.components
    arguments += ["--convert-text-encoder"] if components.text_encoder is not None else []
    arguments += ["--convert-unet"] if components.unet is not None else []
    arguments += ["--convert-vae-decoder"] if components.vae_decoder is not None else []
    arguments += ["--convert-vae-encoder"] if components.vae_encoder is not None else []
    arguments += ["--xl-version"] if r.family.value == "sdxl" else []
    arguments += ["--chunk-unet"] if r.chunk_unet else []
    arguments += ["--unet-batch-one"] if r.unet_batch_size == 1 else []
    compression = components.unet.compression if components.unet is not None else None
    if compression is not None and compression.mode == "palettize":
        arguments += ["--quantize-nbits", str(compression.nbits)]
    return arguments


def run_reference(reference: Path, side: Path, pipeline: Path, recipe: Path, workspace: Path) -> dict:
    with tempfile.TemporaryDirectory(prefix="sdbuild-reference-") as folder:
        mirror = fp16_mirror(pipeline, Path(folder) / "pipeline")
        out = Path(folder) / "out"
        command = [
            sys.executable, "-m", "python_coreml_stable_diffusion.torch2coreml",
            "--model-version", str(mirror), "-o", str(out), *reference_arguments(recipe, workspace),
        ]  # fmt: skip
        env = os.environ | {"PYTHONPATH": os.pathsep.join([str(reference), str(side)]), "HF_HUB_OFFLINE": "1"}
        started = time.monotonic()
        with open(Path(folder) / "log.txt", "w") as log:
            process = subprocess.Popen(command, cwd=folder, stdout=log, stderr=subprocess.STDOUT, env=env)
            with TreePeak(psutil.Process(process.pid), itself=True) as memory:
                returncode = process.wait()
        wall = time.monotonic() - started
        if returncode != 0:
            tail = (Path(folder) / "log.txt").read_text()[-3000:]
            return {"failed": f"exit {returncode}", "log_tail": tail, "wall_seconds": round(wall, 1)}
        sizes = {p.name: sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) for p in out.glob("*.mlpackage")}
        return {
            "wall_seconds": round(wall, 1),
            "peak_tree_bytes": memory.peak,
            "packages": sizes,
            "arguments": command[3:],
        }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", action="append", type=Path, help="recipe to build (repeatable)")
    parser.add_argument("--cache", type=Path, help="cache folder (default: a fresh temporary one per recipe)")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--reference", type=Path, help="an exported apple/ml-stable-diffusion tree to compare with")
    parser.add_argument("--json", type=Path, default=PROJECT / "artifacts" / "full_build_bench.json")
    args = parser.parse_args()
    recipes = [PROJECT / r if not r.is_absolute() else r for r in (args.recipe or map(Path, DEFAULT_RECIPES))]
    results = {"cores": os.cpu_count(), "load_average_start": os.getloadavg(), "builds": {}}
    with tempfile.TemporaryDirectory(prefix="sdbuild-full-bench-") as folder:
        for original in recipes:
            workspace = Path(folder) / original.stem
            recipe = synthetic_recipe(original, workspace)
            cache = args.cache or workspace / "cache"
            with TreePeak(psutil.Process()) as memory:
                report = build(recipe, workspace, cache, args.jobs)
            report["peak_tree_bytes"] = memory.peak
            print_build(report)
            entry = {"ours": report}
            if args.reference is not None:
                side = reference_side_folder(Path(folder).parent / "sdbuild-reference-deps")
                theirs = run_reference(args.reference.resolve(), side, Path(report["source"]), recipe, workspace)
                entry["reference"] = theirs
                if "failed" in theirs:
                    print(f"reference: {theirs['failed']}\n{theirs['log_tail']}")
                else:
                    print(
                        f"reference torch2coreml: {theirs['wall_seconds']:.1f} s, "
                        f"{theirs['peak_tree_bytes'] / GIB:.2f} GiB; "
                        f"ours / reference: time {report['wall_seconds'] / theirs['wall_seconds']:.3f}, "
                        f"memory {report['peak_tree_bytes'] / theirs['peak_tree_bytes']:.3f}"
                    )
            results["builds"][original.stem] = entry
            if args.cache is None:
                shutil.rmtree(workspace / "cache", ignore_errors=True)
    results["load_average_end"] = os.getloadavg()
    load = results["load_average_end"]
    print(
        f"\nload average at the end: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} (1, 5, 15 min) on {os.cpu_count()} cores"
    )
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=2, sort_keys=True))
    print(f"results written to {args.json}")


if __name__ == "__main__":
    main()
