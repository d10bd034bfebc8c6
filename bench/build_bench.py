"""Cold, no-op and incremental build times of a recipe, measured in one run.

    .venv/bin/python bench/build_bench.py [--recipe recipes/tiny-sd.yaml] [--jobs 2]

Builds into a fresh temporary workspace and cache: a cold build, a second (no-op) build, then an
incremental build after changing the UNet's palettization bits. Prints wall time, the sum of stage
times, the largest stage peak memory, and the ratios no-op/cold and incremental/cold.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROJECT = Path(__file__).resolve().parents[1]


def build(workspace: Path, recipe: str, jobs: int) -> tuple[float, dict]:
    command = [
        sys.executable,
        "-m",
        "builder.cli",
        "--workspace",
        str(workspace),
        "--cache-dir",
        str(workspace / "cache"),
        "build",
        recipe,
        "--json",
        "--jobs",
        str(jobs),
    ]
    started = time.perf_counter()
    done = subprocess.run(command, cwd=workspace, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        sys.exit(f"build failed:\n{done.stderr}")
    return seconds, json.loads(done.stdout)


def describe(name: str, seconds: float, report: dict) -> str:
    stages = report["stages"]
    built = [s for s in stages if s["status"] == "built"]
    peak = max((s["peak_memory_bytes"] or 0 for s in built), default=0)
    return (
        f"{name:<12} {seconds:8.2f} s wall  {len(built):2d} stage(s) built  "
        f"{sum(s['seconds'] for s in built):8.2f} s in stages  peak {peak / 2**30:.2f} GiB"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="recipes/tiny-sd.yaml")
    parser.add_argument("--jobs", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="sdbuild-bench-") as folder:
        workspace = Path(folder)
        shutil.copytree(PROJECT / "recipes", workspace / "recipes")
        cold = build(workspace, args.recipe, args.jobs)
        noop = build(workspace, args.recipe, args.jobs)
        recipe = workspace / args.recipe
        text = recipe.read_text()
        match = re.search(r"nbits: (\d+)", text)
        if match is None:
            sys.exit(f"{args.recipe} palettizes nothing: no `nbits:` to change for the incremental build")
        changed = "4" if match.group(1) != "4" else "6"
        recipe.write_text(text.replace(match.group(0), f"nbits: {changed}", 1))
        incremental = build(workspace, args.recipe, args.jobs)
    print(f"recipe {args.recipe}, jobs {args.jobs}; incremental = nbits {match.group(1)} -> {changed}")
    print(describe("cold", *cold))
    print(describe("no-op", *noop))
    print(describe("incremental", *incremental))
    print(f"no-op/cold        {noop[0] / cold[0]:.4f}")
    print(f"incremental/cold  {incremental[0] / cold[0]:.4f}")


if __name__ == "__main__":
    main()
