"""MBP sensitivity analysis in torch: how much each layer's palettization costs the denoised output.

The UNet conversion module runs a short, fixed denoising loop (seeded latents, the conditioning of
fixed prompts from the pipeline's own text encoders as its diffusers pipeline makes it, for SDXL with
text_embeds and time_ids; its scheduler; classifier-free guidance). The
reference is that loop with every weight rounded to float16, as the converted model stores them.
A palettized layer's weight is replaced by its LUT reconstruction from the palettizer's own k-means
(`builder.coreml.palettize`), so what is measured here is what the compressed package computes.
Scores are Apple's PSNR of the final latents, per prompt, averaged over prompts. Beside it the
workload's first UNet call is scored on its own (`single_call_psnr_db`: the noise prediction for
the seeded latents, both guidance halves of every prompt, against float16's), the figure a
one-call read-back gives: the trajectory metric averages errors over steps and guidance, and a
layer choice can meet it while single calls lose far more.

Two passes, as in Apple's pre-analysis: each layer alone at each bit width (`measure_layers`), then
a greedy cumulative search (`search_candidates`) that picks per-layer widths for a series of PSNR
targets and measures every configuration it accepts, so each candidate's PSNR is real, not summed.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field
from safetensors.torch import load_file, save_file
from torch import nn

from builder.coreml.lut import palettize_array
from builder.recipe.calibration import WORKLOAD_PROMPTS
from builder.sd.conditioning import UNET_TEXT_INPUTS, TextEncoder
from builder.sd.mbp.layers import Layer
from builder.sd.psnr import psnr

NBITS = (1, 2, 4, 6, 8)  # the widths the Neural Engine accelerates
DEFAULT_TARGETS_DB = (60.0, 50.0, 45.0, 40.0, 35.0, 30.0)
_FLOAT16_BITS = 16
_LUT_ENTRY_BITS = 16  # LUTs are stored in the weight's float16 type
_INPUTS_FILE = "probe.safetensors"
_SCHEDULER_DIR = "scheduler"
_SETTINGS_FILE = "settings.json"

Recipe = dict[str, int | None]  # identity -> bits; None or absent keeps float16


class ProbeSettings(BaseModel):
    """The fixed workload every configuration is scored on; part of the analysis cache key."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    prompts: tuple[str, ...] = WORKLOAD_PROMPTS[:2]
    steps: int = Field(default=2, ge=1)
    seed: int = 0
    guidance_scale: float = 7.5


class Scores(NamedTuple):
    """One configuration on the workload, against float16: the final latents (averaged over
    prompts) and the first UNet call's noise prediction."""

    latent_psnr_db: float
    single_call_psnr_db: float


class Candidate(BaseModel):
    """One per-layer bit-width choice for a PSNR target, with what it measured and what it costs."""

    target_psnr_db: float
    psnr_db: float  # measured with every chosen layer palettized at once (final latents)
    single_call_psnr_db: float  # the same configuration's first UNet call (noise prediction)
    bits_per_weight: float  # index bits plus LUT share, over all palettizable layers
    size_bytes: int  # palettizable weights as stored (indices, LUTs, or float16)
    layers: dict[str, int | None]


def write_probe_inputs(
    pipeline: Path,
    family: str,
    latent_size: tuple[int, int],
    latent_channels: int,
    settings: ProbeSettings,
    out: Path,
    encoders: Mapping[str, TextEncoder] | None = None,
) -> None:
    """Seeded latents and the UNet conditioning of the prompts (unconditional half first) from `pipeline`,
    made as the family's diffusers pipeline makes them (`builder.sd.conditioning`); `encoders`
    replace the folder's text encoders (LoRA-fused ones)."""
    import shutil

    from builder.sd.conditioning import TextConditioning

    conditioning = TextConditioning(pipeline, family, latent_size, encoders).guided(list(settings.prompts))
    generator = torch.Generator().manual_seed(settings.seed)
    latents = torch.randn((len(settings.prompts), latent_channels, *latent_size), generator=generator)
    out.mkdir(parents=True, exist_ok=True)
    save_file(conditioning | {"latents": latents}, out / _INPUTS_FILE)
    shutil.copytree(pipeline / "scheduler", out / _SCHEDULER_DIR)
    (out / _SETTINGS_FILE).write_text(settings.model_dump_json(indent=2))


class Probe:
    """The conversion module on the fixed workload, with chosen layers swapped for palettized weights.

    Counts UNet evaluations (one batched forward pass per denoising step).
    """

    def __init__(self, module: nn.Module, inputs: Path, layers: Sequence[Layer]):
        import diffusers

        self.module = module.eval()
        with torch.no_grad():
            for parameter in module.parameters():
                parameter.copy_(parameter.half().float())  # the float16 model the package holds
        tensors = load_file(inputs / _INPUTS_FILE)
        # text states, and for SDXL text_embeds and time_ids, in the module's argument order
        self.conditioning = [tensors[name] for name in UNET_TEXT_INPUTS if name in tensors]
        self.latents = tensors["latents"]
        config = json.loads((inputs / _SCHEDULER_DIR / "scheduler_config.json").read_text())
        self.scheduler = getattr(diffusers, config["_class_name"]).from_config(config)
        self.settings = ProbeSettings.model_validate_json((inputs / _SETTINGS_FILE).read_text())
        self.originals = {
            layer.identity: module.get_parameter(layer.identity).detach().half().numpy().copy() for layer in layers
        }
        self.applied: Recipe = {}
        self.evaluations = 0
        self.reference, self.first_call = self._denoise(self.module)

    def psnr(self, recipe: Recipe) -> float:
        """Average PSNR over prompts of the final latents with `recipe` applied, against float16."""
        return self.scores(recipe).latent_psnr_db

    def scores(self, recipe: Recipe) -> Scores:
        """Both metrics with `recipe` applied, against float16."""
        self._apply(recipe)
        return self.scores_of(self.module)

    def scores_of(self, module: nn.Module) -> Scores:
        """Both metrics for `module` as it is now (the probe's own with a package's compressed weights
        loaded in place, or another model of the same UNet, e.g. a quantized one), against float16."""
        produced, first_call = self._denoise(module)
        latent = sum(psnr(p, r) for p, r in zip(produced, self.reference, strict=True)) / len(self.reference)
        return Scores(latent, psnr(first_call, self.first_call))

    def _apply(self, recipe: Recipe) -> None:
        wanted: Recipe = {identity: bits for identity, bits in recipe.items() if bits is not None}
        for identity in set(self.applied) | set(wanted):
            if self.applied.get(identity) == wanted.get(identity):
                continue
            original = self.originals[identity]
            bits = wanted.get(identity)
            weight = original if bits is None else palettize_array(original, bits)
            with torch.no_grad():
                self.module.get_parameter(identity).copy_(torch.from_numpy(weight.astype(np.float32)))
        self.applied = wanted

    def _denoise(self, module: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        """The final latents, and the first call's noise prediction."""
        self.scheduler.set_timesteps(self.settings.steps)
        latents = self.latents * self.scheduler.init_noise_sigma
        first_call = None
        with torch.no_grad():
            for t in self.scheduler.timesteps:
                doubled = self.scheduler.scale_model_input(torch.cat([latents, latents]), t)
                timestep = torch.full((doubled.shape[0],), float(t))
                noise = module(doubled, timestep, *self.conditioning)
                self.evaluations += 1
                first_call = noise if first_call is None else first_call
                unconditional, conditional = noise.chunk(2)
                noise = unconditional + self.settings.guidance_scale * (conditional - unconditional)
                latents = self.scheduler.step(noise, t, latents).prev_sample
        if first_call is None:
            raise ValueError("the workload has no denoising steps")
        return latents, first_call


def measure_layers(probe: Probe, layers: Iterable[Layer], nbits: Sequence[int] = NBITS) -> dict[str, dict[int, float]]:
    """PSNR with each layer alone palettized at each width: identity -> {bits: dB}."""
    return {layer.identity: {bits: probe.psnr({layer.identity: bits}) for bits in nbits} for layer in layers}


def stored_bits(layer: Layer, bits: int | None) -> int:
    """Bits a layer takes in the package: n-bit indices plus a float16 LUT, or float16 values."""
    if bits is None:
        return layer.elements * _FLOAT16_BITS
    return layer.elements * bits + (1 << bits) * _LUT_ENTRY_BITS


def candidate(target_db: float, scores: Scores, layers: Sequence[Layer], recipe: Recipe) -> Candidate:
    bits = sum(stored_bits(layer, recipe.get(layer.identity)) for layer in layers)
    return Candidate(
        target_psnr_db=target_db,
        psnr_db=round(scores.latent_psnr_db, 2),
        single_call_psnr_db=round(scores.single_call_psnr_db, 2),
        bits_per_weight=round(bits / sum(layer.elements for layer in layers), 4),
        size_bytes=math.ceil(bits / 8),
        layers={layer.identity: recipe.get(layer.identity) for layer in layers},
    )


def search_candidates(
    probe: Probe,
    layers: Sequence[Layer],
    sensitivity: dict[str, dict[int, float]],
    targets_db: Sequence[float] = DEFAULT_TARGETS_DB,
) -> list[Candidate]:
    """One measured candidate per target, from the highest target down.

    Each target starts from the previous one's recipe and only lowers widths, so lower targets never
    cost more bits. For each width from the widest down, the layers still above it are ordered by
    their own PSNR at that width (least sensitive first; a layer that alone misses the target is
    left out) and the longest prefix that keeps the measured cumulative PSNR at or above the target
    is found by bisection, so only configurations that were measured are accepted.
    """
    widths = sorted({bits for scores in sensitivity.values() for bits in scores}, reverse=True)
    order = {layer.identity: index for index, layer in enumerate(layers)}
    recipe: Recipe = {}
    score = probe.scores(recipe)
    candidates = []
    for target in sorted(targets_db, reverse=True):
        for bits in widths:
            eligible = sorted(
                (
                    identity
                    for identity in order
                    if (recipe.get(identity) or _FLOAT16_BITS) > bits and sensitivity[identity][bits] >= target
                ),
                key=lambda identity: (-sensitivity[identity][bits], order[identity]),
            )
            low, high = 0, len(eligible)
            while low < high:
                middle = (low + high + 1) // 2
                trial = probe.scores(recipe | dict.fromkeys(eligible[:middle], bits))
                if trial.latent_psnr_db >= target:
                    low, score = middle, trial
                else:
                    high = middle - 1
            recipe |= dict.fromkeys(eligible[:low], bits)
        candidates.append(candidate(target, score, layers, recipe))
    return candidates
