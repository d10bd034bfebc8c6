"""Benchmark: our palettizer against coremltools' `palettize_weights` on the full-size SD 2.1 UNet.

Each side runs in its own fresh process, so the times and peak memory are its own. Prints both
times, their ratio, the weight-reconstruction errors against the float16 model, average bits,
sizes, and whether our output is byte-identical with one and two k-means workers.

Usage: .venv/bin/python bench/palettize_bench.py [--model PATH.mlpackage] [--nbits 6]
"""

from __future__ import annotations

import argparse
import hashlib
import resource
import shutil
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

_GIB = 1024**3


def _in_fresh_process(function, *args):
    """Run `function(*args)` in a new interpreter, so its memory and imports are its own."""
    with ProcessPoolExecutor(max_workers=1, mp_context=get_context("spawn")) as pool:
        return pool.submit(function, *args).result()


def _peak_rss_bytes() -> tuple[int, int]:
    """Peak resident memory of this process and of its largest finished child (Linux: KiB)."""
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    return own, children


def _convert_unet(pipeline: Path, work: Path) -> None:
    from builder.stages import convert, rewrite, trace

    rewritten, traced, converted = work / "rewritten", work / "traced", work / "converted.partial"
    for folder in (rewritten, traced, converted):
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
    rewrite.run({"model": pipeline}, {"component": "unet", "latent_size": [64, 64], "batch_size": 2}, rewritten)
    trace.run({"rewritten": rewritten}, {"component": "unet"}, traced)
    convert.run(
        {"traced": traced, "rewritten": rewritten},
        {"component": "unet", "deployment_target": "macOS13"},
        converted,
    )
    converted.rename(work / "converted")
    shutil.rmtree(rewritten)
    shutil.rmtree(traced)


def _write_pipeline(folder: Path) -> None:
    from builder.sd.presets import get_preset
    from builder.sd.synthetic import write_synthetic_pipeline

    write_synthetic_pipeline(get_preset("sd-2-1-base"), 0, folder)


def float16_unet(work: Path, pipeline: Path | None) -> Path:
    """The full-size float16 UNet package, converted once and cached under `work`."""
    package = work / "converted" / "model.mlpackage"
    if package.exists():
        return package
    if pipeline is None:
        pipeline = work / "pipeline"
        if not (pipeline / "model_index.json").exists():
            print(f"writing the synthetic SD 2.1 base pipeline to {pipeline}", flush=True)
            _in_fresh_process(_write_pipeline, pipeline)
    print(f"tracing and converting the UNet of {pipeline} (a few minutes)", flush=True)
    _in_fresh_process(_convert_unet, pipeline, work)
    return package


def _digest(package: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(p for p in package.rglob("*") if p.is_file()):
        digest.update(path.relative_to(package).as_posix().encode())
        with path.open("rb") as file:
            while block := file.read(1 << 24):
                digest.update(block)
    return digest.hexdigest()


def _ours(src: Path, dst: Path, nbits: int, workers: int) -> dict:
    import coremltools  # noqa: F401  (imported before the clock starts, as for the reference)

    from builder.coreml.palettize import PalettizeOptions, palettize_package

    start = time.perf_counter()
    report = palettize_package(src, dst, PalettizeOptions(nbits=nbits), workers=workers)
    own, children = _peak_rss_bytes()
    return {
        "seconds": time.perf_counter() - start,
        "peak_rss": max(own, children),
        "palettized": sum(w.nbits is not None for w in report.weights),
        "palettized_bits_per_weight": report.palettized_bits_per_weight,
        "bits_per_weight": report.bits_per_weight,
        "bytes": report.bytes_after,
        "digest": _digest(dst),
    }


def _reference(src: Path, dst: Path, nbits: int) -> dict:
    """coremltools' palettize_weights as a user calls it (scikit-learn threads unrestricted)."""
    import coremltools as ct
    from coremltools.optimize.coreml import OpPalettizerConfig, OptimizationConfig, palettize_weights

    start = time.perf_counter()
    model = ct.models.MLModel(str(src), skip_model_load=True)
    config = OptimizationConfig(
        global_config=OpPalettizerConfig(nbits=nbits, mode="kmeans", weight_threshold=2048),
        op_type_configs={"gather": None},
    )
    palettize_weights(model, config).save(str(dst))
    own, children = _peak_rss_bytes()
    return {"seconds": time.perf_counter() - start, "peak_rss": max(own, children)}


def _errors(palettized: Path, reference: Path) -> dict:
    import numpy as np

    from builder.coreml.weights import reconstruction_errors

    # Kept weights are exact on both sides; only palettized ones (error > 0) are compared.
    values = np.array([e for e in reconstruction_errors(palettized, reference).values() if e > 0])
    return {"mean": float(values.mean()), "worst": float(values.max()), "count": len(values)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="float16 .mlpackage (default: the full-size SD 2.1 base UNet)")
    parser.add_argument("--nbits", type=int, default=6)
    parser.add_argument("--work", type=Path, default=Path("/tmp/sdbuild-bench"))
    parser.add_argument("--pipeline", type=Path, help="existing diffusers folder to convert the UNet from")
    args = parser.parse_args()

    src = args.model or float16_unet(args.work, args.pipeline)
    out = args.work / "palettized"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    ours_two = _in_fresh_process(_ours, src, out / "ours-2.mlpackage", args.nbits, 2)
    ours_one = _in_fresh_process(_ours, src, out / "ours-1.mlpackage", args.nbits, 1)
    shutil.rmtree(out / "ours-1.mlpackage")
    reference = _in_fresh_process(_reference, src, out / "reference.mlpackage", args.nbits)
    ours_errors = _in_fresh_process(_errors, out / "ours-2.mlpackage", src)
    reference_errors = _in_fresh_process(_errors, out / "reference.mlpackage", src)
    reference_bytes = sum(f.stat().st_size for f in (out / "reference.mlpackage").rglob("*") if f.is_file())

    print(
        f"model: {src} ({sum(f.stat().st_size for f in src.rglob('*') if f.is_file()) / 1e6:.0f} MB), {args.nbits}-bit"
    )
    print(f"{'':24}{'ours (2 workers)':>18}{'ours (1 worker)':>18}{'palettize_weights':>20}")
    print(f"{'seconds':24}{ours_two['seconds']:18.1f}{ours_one['seconds']:18.1f}{reference['seconds']:20.1f}")
    print(
        f"{'peak RSS (GiB)':24}{ours_two['peak_rss'] / _GIB:18.2f}{ours_one['peak_rss'] / _GIB:18.2f}"
        f"{reference['peak_rss'] / _GIB:20.2f}"
    )
    print(
        f"speed-up: {reference['seconds'] / ours_two['seconds']:.2f}x (2 workers), "
        f"{reference['seconds'] / ours_one['seconds']:.2f}x (1 worker)"
    )
    print(
        f"relative RMSE over {ours_errors['count']} palettized weights: ours mean {ours_errors['mean']:.6f} "
        f"worst {ours_errors['worst']:.6f}; palettize_weights mean {reference_errors['mean']:.6f} "
        f"worst {reference_errors['worst']:.6f} ({reference_errors['count']} weights)"
    )
    print(
        f"average bits: {ours_two['palettized_bits_per_weight']:.4f} per palettized weight, "
        f"{ours_two['bits_per_weight']:.4f} over all float weights"
    )
    print(f"size: ours {ours_two['bytes'] / 1e6:.1f} MB, palettize_weights {reference_bytes / 1e6:.1f} MB")
    print(f"our bytes identical with 1 and 2 workers: {ours_one['digest'] == ours_two['digest']}")


if __name__ == "__main__":
    main()
