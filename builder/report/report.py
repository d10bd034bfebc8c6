"""`bundle/report/`: what a bundle is, what compression cost, and what it looks like.

Core ML cannot run on Linux, so every figure here comes from torch: the bundle's compressed UNet
weights are read back into the torch conversion module and compared with the same module in
float16, on fixed inputs (`verify_read_back`) and on whole text-to-image runs. Outputs depend only
on the bundle, the pipeline folder and the arguments, so the same inputs give the same bytes.
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, cast

import numpy as np
import torch
from PIL import Image
from torch import nn

from builder.report.plot import Candidate, load_candidates, psnr_vs_size_figure, save_png
from builder.report.read_back import ReadBackUnet, load_read_back_unet, unet_entries
from builder.report.sampling import Sampler
from builder.sd.components import ComponentShape, example_inputs, kind
from builder.sd.manifest import Manifest, ModelEntry
from builder.sd.psnr import psnr

if TYPE_CHECKING:
    from diffusers.models.unets.unet_2d_condition import UNet2DConditionModel

DEFAULT_PROMPTS = ("a photo of an astronaut riding a horse on mars", "a watercolor painting of a lighthouse at dawn")
DEFAULT_SEEDS = (0, 1)
DEFAULT_STEPS = 10
GUIDANCE_SCALE = 7.5
_MB = 1e6


def _manifest(bundle: Path) -> Manifest:
    return Manifest.model_validate_json((bundle / "manifest.json").read_text())


def _fixed_inputs(unet: ReadBackUnet, manifest: Manifest) -> tuple[torch.Tensor, ...]:
    k = kind("unet")
    shape = ComponentShape(latent_size=manifest.latent_size, batch_size=manifest.unet_batch_size)
    reference = cast("UNet2DConditionModel", unet.module.unet)  # the module is kind("unet").wrap's
    specs = k.inputs(reference, shape)
    return tuple(example_inputs("unet", reference, specs).values())


def verify_read_back(bundle: Path, pipeline: Path, verified: Sequence[Path]) -> dict[str, float]:
    """PSNR (dB) per model of the bundle's stored weights against float16, run in torch.

    Only the UNet is read back so far: {"Unet": dB}. A float16 UNet scores far above 100 dB.
    `verified` are the UNet's verify stage outputs (see `load_read_back_unet`).
    """
    unet = load_read_back_unet(bundle, pipeline, verified)
    inputs = _fixed_inputs(unet, _manifest(bundle))
    with torch.no_grad():
        expected = unet.module(*inputs)
        unet.compress()
        return {"Unet": round(psnr(unet.module(*inputs), expected), 2)}


def workload_scores(entries: Sequence[ModelEntry]) -> tuple[float | None, float | None]:
    """The UNet's (final latents, single call) PSNRs on the analysis workload, as its verify stage
    recorded them (mixed-bit and W8A8 UNets); None for a bundle that was not scored on it."""
    for entry in entries:
        if entry.mixed_bit is not None:
            return entry.mixed_bit.get("achieved_psnr_db"), entry.mixed_bit.get("achieved_single_call_psnr_db")
        if entry.w8a8 is not None:
            return entry.w8a8.get("latent_psnr_db"), entry.w8a8.get("single_call_psnr_db")
    return None, None


def _compression(entry: ModelEntry) -> str:
    written = entry.compression.model_dump(mode="json")
    settings = ", ".join(f"{key} {value}" for key, value in written.items() if key != "mode")
    return f"{written['mode']} ({settings})" if settings else written["mode"]


def _db(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f} dB"


def _bits(entry: ModelEntry) -> str:
    return "-" if entry.bits_per_weight is None else f"{entry.bits_per_weight:.2f}"


def _models_table(manifest: Manifest) -> list[str]:
    lines = [
        "| model | component | compression | bits per weight | size (MB) | traced vs reference PSNR (dB) |",
        "|---|---|---|---|---|---|",
    ]
    for name, entry in manifest.models.items():
        figures = ", ".join(f"{output} {db:.2f}" for output, db in entry.psnr_db.items())
        lines.append(
            f"| {name} | {entry.component} | {_compression(entry)} | {_bits(entry)} | "
            f"{entry.size_bytes / _MB:.2f} | {figures} |"
        )
    return lines


def _to_uint8(image: torch.Tensor) -> np.ndarray:
    """(1, 3, H, W) in [-1, 1] to (H, W, 3) uint8."""
    return ((image[0].permute(1, 2, 0).double() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).numpy()


def _images(sampler: Sampler, unet: nn.Module, prompts: Sequence[str], seeds: Sequence[int], steps: int) -> list:
    return [sampler.generate(unet, prompt, seed, steps, GUIDANCE_SCALE) for prompt in prompts for seed in seeds]


def _write_images(
    references: list[torch.Tensor],
    compressed: list[torch.Tensor],
    prompts: Sequence[str],
    seeds: Sequence[int],
    folder: Path,
) -> list[str]:
    """Side-by-side PNGs (float16 left, compressed right) and their report rows."""
    folder.mkdir()
    rows = ["| prompt | seed | float16 \\| compressed | image PSNR (dB) |", "|---|---|---|---|"]
    pairs = iter(zip(references, compressed, strict=True))
    for index, prompt in enumerate(prompts):
        for seed in seeds:
            reference, image = next(pairs)
            name = f"{index}-{seed}.png"
            pixels = np.concatenate([_to_uint8(reference), _to_uint8(image)], axis=1)
            Image.fromarray(pixels).save(folder / name, format="PNG")
            rows.append(f"| {prompt} | {seed} | ![{name}](images/{name}) | {psnr(image, reference):.2f} |")
    return rows


def write_report(
    bundle: Path,
    *,
    pipeline: Path,
    verified: Sequence[Path],
    candidates: Path | None = None,
    prompts: Sequence[str] = DEFAULT_PROMPTS,
    seeds: Sequence[int] = DEFAULT_SEEDS,
    steps: int = DEFAULT_STEPS,
) -> Path:
    """Write `bundle/report/` (replacing an old one) and return its `report.md`.

    `pipeline` is the diffusers folder the bundle was built from; `verified` the UNet's verify stage
    outputs (none for a float16 UNet); `candidates` a JSON list of `Candidate`s to plot the bundle
    against. Images are made only when the bundle has a text encoder and a VAE decoder. Everything
    float16 is computed first, then the compressed weights replace the float16 ones in place.
    """
    manifest = _manifest(bundle)
    folder = bundle / "report"
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir()
    unet = load_read_back_unet(bundle, pipeline, verified)
    inputs = _fixed_inputs(unet, manifest)
    sampler = Sampler.load(pipeline, manifest) if {"TextEncoder", "VAEDecoder"} <= set(manifest.models) else None
    with torch.no_grad():
        expected = unet.module(*inputs)
        references = _images(sampler, unet.module, prompts, seeds, steps) if sampler else []
        unet.compress()
        unet_psnr = round(psnr(unet.module(*inputs), expected), 2)
        compressed = _images(sampler, unet.module, prompts, seeds, steps) if sampler else []
    entries = unet_entries(manifest)  # chunks: their bits averaged by the weights each holds
    weights = [entry.chunk.parameter_bytes[entry.chunk.index - 1] if entry.chunk else 1 for entry in entries]
    bits = [entry.bits_per_weight for entry in entries]
    known = [b for b in bits if b is not None]  # the average needs every entry's
    average = sum(b * w for b, w in zip(known, weights, strict=True)) / sum(weights) if known == bits else None
    latent_db, single_call_db = workload_scores(entries)
    chosen = Candidate(
        name=f"{manifest.name} {manifest.version}",
        average_bits=average,
        size_bytes=sum(entry.size_bytes for entry in entries),
        psnr_db=latent_db,
        single_call_psnr_db=single_call_db,
    )
    save_png(
        psnr_vs_size_figure(load_candidates(candidates) if candidates else [], chosen), folder / "psnr_vs_size.png"
    )

    lines = [
        f"# {manifest.name} {manifest.version}",
        "",
        f"Family {manifest.family}, latent size {list(manifest.latent_size)} (image {list(manifest.image_size)}), "
        f"UNet batch {manifest.unet_batch_size}, attention {manifest.attention}, compute unit {manifest.compute_unit}, "
        f"deployment target {manifest.deployment_target}. Recipe digest `{manifest.recipe_digest}`.",
        "",
        "## Models",
        "",
        *_models_table(manifest),
        "",
        "## Compressed UNet read back",
        "",
        f"The UNet weights stored in {' and '.join(f'`{e.path}`' for e in entries)} "
        f"({unet.compressed_weights} of them compressed), loaded into the torch conversion module, against "
        f"the same module with float16 weights on fixed inputs: **{unet_psnr:.2f} dB**.",
        "",
        "## PSNR against size",
        "",
        "![PSNR against size](psnr_vs_size.png)",
        "",
        "Both panels score the analysis workload (seeded latents, its prompts, a few guided steps) against "
        "float16: left the final latents (the mixed-bit targets' metric), right the first UNet call alone. "
        + (
            f"This bundle (star): {_db(latent_db)} and {_db(single_call_db)}, recorded by its verify stage."
            if latent_db is not None or single_call_db is not None
            else "This bundle was not scored on the workload (only mixed-bit and W8A8 UNets are), so it has no star; "
            "its fixed-input read-back is above."
        ),
    ]
    if sampler is not None:
        lines += [
            "",
            "## Images",
            "",
            f"Left: float16 UNet; right: compressed UNet. {steps} steps of the pipeline's scheduler, guidance "
            f"{GUIDANCE_SCALE}, torch text encoder and VAE decoder; PSNR of the right image against the left.",
            "",
            *_write_images(references, compressed, prompts, seeds, folder / "images"),
        ]
    report = folder / "report.md"
    report.write_text("\n".join(lines) + "\n")
    return report
