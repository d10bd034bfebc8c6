"""A 2 x 2 recipe matrix (ORIGINAL / SPLIT_EINSUM attention x 6 / 4-bit UNet) of a synthetic
pipeline: stages run vs stages in the graph, and wall time against four separate builds.

    .venv/bin/python bench/matrix_bench.py [--preset tiny-sd|mid-sd|sd-2-1-base] [--parts matrix,separate,remote]
    flock /work/heavy.lock nice -n 5 .venv/bin/python bench/matrix_bench.py --preset sd-2-1-base   # full size

Parts, each in fresh temporary workspaces and caches:
- `matrix`: the four variants in one `sdbuild build` (one graph; equal stages run once).
- `separate`: the same four bundles as four plain recipes, built one after another, each with an
  empty cache of its own (what four machines or CI jobs without a shared cache do); with
  `--separate shared`, one after another in one cache instead.
- `remote`: the matrix built with a remote cache (`file://`), then again in a second workspace with an
  empty local cache and the same remote: every stage should come from the remote. It needs the CLI's
  `--remote` option, found by inspecting the CLI's parser; without it this part says so and is not run.
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


def remote_option() -> str | None:
    """Where `--remote` goes on the command line (before or after `build`), or None when this
    version of the CLI has no remote cache."""
    from builder.cli import _parser

    parser = _parser()
    if any("--remote" in action.option_strings for action in parser._actions):
        return "global"
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    if any("--remote" in action.option_strings for action in commands.choices["build"]._actions):
        return "build"
    return None


def build(
    workspace: Path, cache: Path, target: str, jobs: int, remote: tuple[str, str] | None = None
) -> tuple[float, dict]:
    """`sdbuild build TARGET --json` in a fresh interpreter: wall seconds and the JSON report."""
    before = ["--remote", remote[1]] if remote and remote[0] == "global" else []
    after = ["--remote", remote[1]] if remote and remote[0] == "build" else []
    command = [sys.executable, "-m", "builder.cli", "--workspace", str(workspace), "--cache-dir", str(cache)]
    command += [*before, "build", target, "--json", "--jobs", str(jobs), *after]
    before_cpu = _children_cpu()
    started = time.perf_counter()
    done = subprocess.run(command, cwd=workspace, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        sys.exit(f"build of {target} failed:\n{done.stderr}")
    return seconds, _children_cpu() - before_cpu, json.loads(done.stdout)


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
    parser.add_argument("--parts", default="matrix,separate,remote", help="comma-separated: matrix, separate, remote")
    parser.add_argument(
        "--separate", choices=("fresh", "shared"), default="fresh", help="caches of the separate builds"
    )
    parser.add_argument("--jobs", type=int, default=2)
    args = parser.parse_args()
    parts = set(args.parts.split(","))
    unknown = parts - {"matrix", "separate", "remote"}
    if unknown:
        sys.exit(f"unknown part(s): {', '.join(sorted(unknown))}")
    print(f"preset {args.preset}, 2 x 2 matrix (ORIGINAL/SPLIT_EINSUM x 6/4 bits), jobs {args.jobs}")
    with tempfile.TemporaryDirectory(prefix="sdbuild-matrix-bench-") as folder:
        root = Path(folder)
        matrix_seconds = matrix_cpu = None
        if "matrix" in parts:
            ws = root / "matrix"
            (ws / "recipes").mkdir(parents=True)
            (ws / "recipes" / "bench-matrix.yaml").write_text(matrix_recipe(args.preset))
            matrix_seconds, matrix_cpu, report = build(ws, ws / "cache", "recipes/bench-matrix.yaml", args.jobs)
            print(f"matrix      {matrix_seconds:8.1f} s wall {matrix_cpu:8.1f} s CPU  {counts(report)}")
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
                total += seconds
                total_cpu += cpu
                built += sum(s["status"] == "built" for s in report["stages"])
                in_graph += len(report["stages"])
                print(f"  {attention:<12} {nbits} bit {seconds:8.1f} s wall {cpu:8.1f} s CPU  {counts(report)}")
            caches = f"{built} of {in_graph} stages built ({args.separate} caches)"
            print(f"separate    {total:8.1f} s wall {total_cpu:8.1f} s CPU  {caches}")
            if matrix_seconds is not None and matrix_cpu is not None:
                print(f"matrix/separate: wall {matrix_seconds / total:.3f}, CPU {matrix_cpu / total_cpu:.3f}")
        if "remote" in parts:
            where = remote_option()
            if where is None:
                print("remote      not run: this sdbuild has no --remote option (the remote cache is another branch)")
                return
            remote = (where, (root / "remote").as_uri())
            (root / "remote").mkdir()
            for name in ("a", "b"):
                (root / name / "recipes").mkdir(parents=True)
                (root / name / "recipes" / "bench-matrix.yaml").write_text(matrix_recipe(args.preset))
            seconds, cpu, report = build(
                root / "a", root / "a" / "cache", "recipes/bench-matrix.yaml", args.jobs, remote
            )
            print(f"remote, A   {seconds:8.1f} s wall {cpu:8.1f} s CPU  {counts(report)}")
            seconds, cpu, report = build(
                root / "b", root / "b" / "cache", "recipes/bench-matrix.yaml", args.jobs, remote
            )
            size = sum(p.stat().st_size for p in (root / "remote").rglob("*") if p.is_file())
            held = f"remote holds {size / 2**30:.2f} GiB"
            print(f"remote, B   {seconds:8.1f} s wall {cpu:8.1f} s CPU  {counts(report)}; {held}")
            shutil.rmtree(root / "remote")


if __name__ == "__main__":
    main()
