"""Checks that read the disk before any stage runs: the local model folders a recipe names hold
what its components need, their configs are sane, and synthetic presets fit the recipe's family.
Each problem is a located error against the recipe field to change."""

from __future__ import annotations

import os
from pathlib import Path

from builder.engine.spec import GIB, Graph
from builder.recipe import LoadedRecipe
from builder.sd.model_checks import ModelFolderProblem, check_config, check_family, check_weights
from builder.sd.presets import PRESETS


def local_folders(loaded: LoadedRecipe) -> list[tuple[str, Path, list[str]]]:
    """(recipe field, folder, components read from it) for every local diffusers folder."""
    recipe = loaded.recipe
    enabled = [c.value for c in recipe.components.enabled() if c.value != "controlnet"]
    vae = [c for c in enabled if c.startswith("vae")]
    found: list[tuple[str, Path, list[str]]] = []
    model = recipe.model
    if model.local is not None and model.local.path.is_dir():
        from_model = [c for c in enabled if c != "unet_refiner" and not (model.vae is not None and c in vae)]
        found.append(("model.local.path", model.local.path, from_model))
    if model.vae is not None and model.vae.local is not None:
        found.append(("model.vae.local.path", model.vae.local.path, vae))
    if model.refiner is not None and model.refiner.local is not None and model.refiner.local.path.is_dir():
        found.append(("model.refiner.local.path", model.refiner.local.path, ["unet_refiner"]))
    for index, controlnet in enumerate(model.controlnets):
        if controlnet.local is not None:
            found.append((f"model.controlnets.{index}.local.path", controlnet.local.path, ["controlnet"]))
    return found


def check_sources(loaded: LoadedRecipe) -> None:
    """Refuse local folders that lack safetensors weights or carry insane configs, and synthetic
    presets of another family, before any stage starts."""
    recipe = loaded.recipe
    presets = [("model.synthetic.preset", recipe.model.synthetic)]
    if recipe.model.refiner is not None:
        presets.append(("model.refiner.synthetic.preset", recipe.model.refiner.synthetic))
    for field, synthetic in presets:
        if synthetic is None or synthetic.preset not in PRESETS:
            continue  # unknown presets are refused with the list of known ones
        family = PRESETS[synthetic.preset].family
        if family != recipe.family.value:
            same = sorted(name for name, preset in PRESETS.items() if preset.family == recipe.family.value)
            raise loaded.error(
                field,
                f"preset '{synthetic.preset}' is a {family} pipeline, "
                f"but the recipe says family: {recipe.family.value}",
                f"set `family: {family}`, or use a {recipe.family.value} preset: {', '.join(same)}",
            )
    for field, folder, components in local_folders(loaded):
        try:
            if field == "model.local.path":
                check_family(folder, recipe.family.value)
            check_weights(folder, components)
            for component in components:
                check_config(folder, component)
        except ModelFolderProblem as problem:
            raise loaded.error(field, problem.message, problem.hint) from None


# Attention heads assumed at the largest attention level: more than SD 1.x (8) and SD 2.x (5) have
# there, as many as SDXL (10), so the estimate errs high.
_HEADS = 10
_FLOAT32 = 4
_REFERENCE_LATENT = {"sd": (64, 64), "sdxl": (128, 128), "sd3": (64, 64)}
"""The size the per-component figures in memory_estimate were measured at."""


def _attention_bytes(loaded: LoadedRecipe, component: str | None, latent: tuple[int, int]) -> int:
    """The largest single tensor converting `component` at `latent` holds: the attention scores of
    its highest-resolution attention level (float32, the reference and traced forward passes)."""
    recipe = loaded.recipe
    height, width = latent
    if component in ("unet", "unet_refiner", "controlnet"):
        level = 1 if recipe.family.value == "sdxl" and component == "unet" else 0
        length = (height >> level) * (width >> level)
        batch = recipe.unet_batch_size
        attention = recipe.attention.value
        if attention == "ORIGINAL":
            return batch * _HEADS * length * length * _FLOAT32
        queries = min(length, 512) if attention == "SPLIT_EINSUM_V2" else length
        return 2 * batch * queries * length * _FLOAT32  # one head's scores and their softmax
    if component == "mmdit":  # joint attention over the 2 x 2 patches and the 154 text tokens
        length = (height // 2) * (width // 2) + 154
        return recipe.unet_batch_size * _HEADS * length * length * _FLOAT32
    if component in ("vae_decoder", "vae_encoder"):
        length = height * width  # the VAE's mid-block attention, one head, at latent resolution
        return length * length * _FLOAT32
    return 0


def size_extra_bytes(loaded: LoadedRecipe, component: str | None) -> int:
    """Memory a stage needs beyond its figure at the family's native size, for larger sizes."""
    reference = _REFERENCE_LATENT[loaded.recipe.family.value]
    now = _attention_bytes(loaded, component, loaded.recipe.latent_size)
    return max(0, now - _attention_bytes(loaded, component, reference))


def machine_memory_bytes() -> int:
    """Physical memory: the most any one stage can have, however idle the machine."""
    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def check_memory(loaded: LoadedRecipe, graph: Graph, *, force: bool) -> None:
    """Refuse a build whose largest stage is estimated to need more memory than the machine has,
    before the first stage runs (`--force` tries anyway)."""
    if force:
        return
    biggest = max(graph, key=lambda spec: spec.memory_estimate_bytes, default=None)
    have = machine_memory_bytes()
    if biggest is None or biggest.memory_estimate_bytes <= have:
        return
    component = (biggest.component or "").split(".")[0] or None
    by_size = size_extra_bytes(loaded, component) > biggest.memory_estimate_bytes / 2
    field = ("latent_size" if loaded.recipe.written_latent_size else "image_size") if by_size else "model"
    raise loaded.error(
        field,
        f"stage {biggest.id} needs an estimated {biggest.memory_estimate_bytes / GIB:.1f} GiB of memory; "
        f"this machine has {have / GIB:.1f} GiB",
        ("use a smaller size, or attention SPLIT_EINSUM_V2 (it computes attention in chunks); " if by_size else "")
        + "or pass --force to try anyway",
    )


# Largest stage peak per component at full size, rounded up: SD 2.1 base, bench/convert_bench.py
# (UNet 5.6 GiB converting, when float32 and float16 weights coexist; text encoder 2.5 GiB; VAE
# decoder 1.8 GiB; the synthetic source 5.6 GiB). Peaks grow with the weights: SDXL's UNet has 3x.
_FULL_SIZE_PEAK_GIB = {
    None: 6,
    "unet": 6,
    "unet_refiner": 6,
    "text_encoder": 3,
    "text_encoder_2": 3,
    "vae_decoder": 2,
    "vae_encoder": 2,
    # SD3 medium (bench/convert_bench.py --preset sd3-medium): the 2B MMDiT's stages peak at 8.4 GiB.
    # T5-XXL is not measured (no synthetic preset has it at full size): 4.7B parameters in float32 are
    # 19 GB, which the rewrite stage holds with its reference output.
    "mmdit": 9,
    "text_encoder_3": 20,
}
_SD3_SOURCE_PEAK_GIB = 9  # writing the seeded sd3-medium pipeline peaked at 8.2 GiB (the MMDiT in float32)
_SDXL_UNET_SCALE = 3


def memory_estimate(loaded: LoadedRecipe, component: str | None) -> int:
    """Expected peak of one stage, for the scheduler: tiny presets need little, real UNets a lot;
    sizes above the family's native one add what their attention scores take."""
    extra = size_extra_bytes(loaded, component)
    if loaded.recipe.model.synthetic is not None and loaded.recipe.model.synthetic.preset.startswith("tiny"):
        return 1 * GIB + extra
    estimate = _FULL_SIZE_PEAK_GIB.get(component, 4)
    if component is None and loaded.recipe.family.value == "sd3":
        estimate = _SD3_SOURCE_PEAK_GIB
    if component in ("unet", "unet_refiner") and loaded.recipe.family.value == "sdxl":
        estimate *= _SDXL_UNET_SCALE
    return estimate * GIB + extra
