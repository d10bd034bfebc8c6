"""A 2 x 2 recipe matrix (ORIGINAL / SPLIT_EINSUM attention x 6 / 4-bit UNet) of a synthetic
pipeline: stages run vs stages in the graph, and wall time against four separate builds.

    .venv/bin/python bench/matrix_bench.py [--preset tiny-sd|mid-sd|sd-2-1-base] [--parts matrix,remote,separate]
    flock /work/heavy.lock nice -n 5 .venv/bin/python bench/matrix_bench.py --preset sd-2-1-base   # full size

Parts, each in fresh temporary workspaces and caches:
- `matrix`: the four variants in one `sdbuild build` (one graph; equal stages run once).
- `separate`: the same four bundles as four plain recipes, built one after another, each with an
  empty cache of its own (what four machines or CI jobs without a shared cache do); with
  `--separate shared`, one after another in one cache instead.
- `remote`: `sdbuild push` of the matrix part's cache to a `file://` remote, then the matrix again in
  a second workspace with an empty local cache and that remote: every stage should be a `remote-hit`.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROJECT = Path(__file__).resolve().parents[1]
LATENTS = {"tiny-sd": 16, "tiny-sd2": 16, "mid-sd": 16, "sd-1-5": 64, "sd-2-1-base": 64}
VARIANTS = [(attention, nbits) for attention in ("ORIGINAL", "SPLIT_EINSUM") for nbits in (6, 4)]


def recipe(name: str, preset: str, settings: str) -> str:
    size = LATENTS[preset]
    return f"""name: {name}
version: 0.1.0
family: sd
model:
  synthetic: {{preset: {preset}, seed: 0}}
latent_size: [{size}, {size}]
compute_unit: CPU_AND_GPU
deployment_target: macOS13
{settings}"""


def matrix_recipe(preset: str) -> str:
    return recipe(
        "bench-matrix",
        preset,
        """components:
  text_encoder: {}
  unet: {compression: {mode: palettize, nbits: 6}}
  vae_decoder: {}
matrix:
  attention: [ORIGINAL, SPLIT_EINSUM]
  components.unet.compression.nbits: [6, 4]
variant_name: "{attention}-{nbits}bit"
""",
    )


def variant_recipe(preset: str, attention: str, nbits: int) -> str:
    return recipe(
        f"bench-{attention.lower().replace('_', '-')}-{nbits}bit",
        preset,
        f"""attention: {attention}
components:
  text_encoder: {{}}
  unet: {{compression: {{mode: palettize, nbits: {nbits}}}}}
  vae_decoder: {{}}
""",
    )


def sdbuild(workspace: Path, cache: Path, *arguments: str) -> tuple[float, float, str]:
    """`sdbuild ARGUMENTS` in a fresh interpreter: wall seconds, CPU seconds and stdout."""
    command = [sys.executable, "-m", "builder.cli", "--workspace", str(workspace), "--cache-dir", str(cache)]
    before_cpu = _children_cpu()
    started = time.perf_counter()
    done = subprocess.run([*command, *arguments], cwd=workspace, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        sys.exit(f"sdbuild {' '.join(arguments)} failed:\n{done.stderr}")
    return seconds, _children_cpu() - before_cpu, done.stdout


def build(workspace: Path, cache: Path, target: str, jobs: int, *extra: str) -> tuple[float, float, dict]:
    """`sdbuild build TARGET --json`: wall and CPU seconds and the JSON report."""
    seconds, cpu, out = sdbuild(workspace, cache, "build", target, "--json", "--jobs", str(jobs), *extra)
    return seconds, cpu, json.loads(out)


def _size(folder: Path) -> float:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) / 2**30


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def counts(report: dict) -> str:
    stages = report["stages"]
    statuses = {status: sum(s["status"] == status for s in stages) for status in sorted({s["status"] for s in stages})}
    built = [s for s in stages if s["status"] == "built"]
    peak = max((s["peak_memory_bytes"] or 0 for s in built), default=0)
    shown = ", ".join(f"{n} {status}" for status, n in statuses.items())
    work = sum(s["seconds"] for s in built)
    return f"{len(stages)} stages in the graph: {shown}; {work:.1f} s in stages, peak {peak / 2**30:.2f} GiB"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny-sd", choices=sorted(LATENTS))
    parser.add_argument("--parts", default="matrix,remote,separate", help="comma-separated: matrix, remote, separate")
    parser.add_argument(
        "--separate", choices=("fresh", "shared"), default="fresh", help="caches of the separate builds"
    )
    parser.add_argument("--jobs", type=int, default=2)
    args = parser.parse_args()
    parts = set(args.parts.split(","))
    unknown = parts - {"matrix", "separate", "remote"}
    if unknown:
        sys.exit(f"unknown part(s): {', '.join(sorted(unknown))}")
    if "remote" in parts and "matrix" not in parts:
        sys.exit("the remote part pushes the matrix part's cache: add matrix to --parts")
    print(f"preset {args.preset}, 2 x 2 matrix (ORIGINAL/SPLIT_EINSUM x 6/4 bits), jobs {args.jobs}")
    with tempfile.TemporaryDirectory(prefix="sdbuild-matrix-bench-") as folder:
        root = Path(folder)
        matrix_seconds = matrix_cpu = None
        if "matrix" in parts:
            ws = root / "matrix"
            (ws / "recipes").mkdir(parents=True)
            (ws / "recipes" / "bench-matrix.yaml").write_text(matrix_recipe(args.preset))
            matrix_seconds, matrix_cpu, report = build(ws, ws / "cache", "recipes/bench-matrix.yaml", args.jobs)
            print(f"matrix      {matrix_seconds:8.1f} s wall {matrix_cpu:8.1f} s CPU  {counts(report)}", flush=True)
        if "remote" in parts:
            remote = (root / "remote").as_uri()
            (root / "remote").mkdir()
            seconds, cpu, _ = sdbuild(root / "matrix", root / "matrix" / "cache", "push", "--remote", remote)
            print(f"push        {seconds:8.1f} s wall {cpu:8.1f} s CPU  remote holds {_size(root / 'remote'):.2f} GiB")
            ws = root / "empty"
            (ws / "recipes").mkdir(parents=True)
            (ws / "recipes" / "bench-matrix.yaml").write_text(matrix_recipe(args.preset))
            seconds, cpu, report = build(ws, ws / "cache", "recipes/bench-matrix.yaml", args.jobs, "--remote", remote)
            print(f"warm remote {seconds:8.1f} s wall {cpu:8.1f} s CPU  {counts(report)}", flush=True)
            shutil.rmtree(ws)
            shutil.rmtree(root / "remote")
        if "matrix" in parts:
            shutil.rmtree(root / "matrix")
        if "separate" in parts:
            ws = root / "separate"
            (ws / "recipes").mkdir(parents=True)
            total = total_cpu = 0.0
            built = in_graph = 0
            for index, (attention, nbits) in enumerate(VARIANTS):
                file = ws / "recipes" / f"v{index}.yaml"
                file.write_text(variant_recipe(args.preset, attention, nbits))
                cache = ws / ("cache" if args.separate == "shared" else f"cache-{index}")
                seconds, cpu, report = build(ws, cache, str(file.relative_to(ws)), args.jobs)
                if args.separate == "fresh":
                    shutil.rmtree(cache)
                total += seconds
                total_cpu += cpu
                built += sum(s["status"] == "built" for s in report["stages"])
                in_graph += len(report["stages"])
                row = f"{seconds:8.1f} s wall {cpu:8.1f} s CPU  {counts(report)}"
                print(f"  {attention:<12} {nbits} bit {row}", flush=True)
            caches = f"{built} of {in_graph} stages built ({args.separate} caches)"
            print(f"separate    {total:8.1f} s wall {total_cpu:8.1f} s CPU  {caches}")
            if matrix_seconds is not None and matrix_cpu is not None:
                print(f"matrix/separate: wall {matrix_seconds / total:.3f}, CPU {matrix_cpu / total_cpu:.3f}")


if __name__ == "__main__":
    main()
