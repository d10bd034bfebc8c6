"""Checks of what one recipe needs from this machine: disk, memory, and its hub inputs in the HF cache."""

from __future__ import annotations

import shutil
from pathlib import Path

from builder.doctor import Check
from builder.engine.memory import available_memory_bytes
from builder.recipe import LoadedRecipe

GIB = 1024**3
# Parameters, in millions, of each component at full size, counted on the real configs the
# synthetic presets carry (the larger of SD 1.5 and SD 2.1 base for `sd`; SDXL base and refiner).
_FULL_SIZE_PARAMETERS_M = {
    "sd": {
        "text_encoder": 341,
        "unet": 866,
        "vae_decoder": 50,
        "vae_encoder": 35,
        "safety_checker": 304,
        "controlnet": 361,  # each
    },
    "sdxl": {
        "text_encoder": 124,
        "text_encoder_2": 695,
        "unet": 2568,
        "unet_refiner": 2260,
        "vae_decoder": 50,
        "vae_encoder": 35,
    },
}
# Bytes per parameter a cold build keeps: the source (float32) and rewrite (float32) weights, the
# float16 package, its compressed copy, the bundle and the published artifacts (2 bytes each).
_BYTES_PER_PARAMETER = 16
_TINY_BYTES = 1 * GIB  # the tiny presets' whole build, with room to spare


def disk_estimate_bytes(loaded: LoadedRecipe) -> int:
    """Disk a cold build of the recipe fills in the cache and artifacts (an upper bound)."""
    recipe = loaded.recipe
    if recipe.model.synthetic is not None and recipe.model.synthetic.preset.startswith("tiny"):
        return _TINY_BYTES
    sizes = _FULL_SIZE_PARAMETERS_M[recipe.family.value]
    parameters = 0
    for component in recipe.components.enabled():
        count = len(recipe.model.controlnets) if component.value == "controlnet" else 1
        parameters += count * sizes.get(component.value, 0) * 1_000_000
    return parameters * _BYTES_PER_PARAMETER


def _existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def disk_check(loaded: LoadedRecipe, cache: Path) -> Check:
    needed = disk_estimate_bytes(loaded)
    free = shutil.disk_usage(_existing(cache)).free
    detail = (
        f"{free / GIB:.1f} GiB free for {cache}, a cold build of {loaded.path.name} needs up to {needed / GIB:.1f} GiB"
    )
    if free < needed:
        return Check("disk", "fail", detail, "free space, or point --cache-dir / SDBUILD_CACHE_DIR at a larger disk")
    return Check("disk", "ok", detail)


def memory_check(loaded: LoadedRecipe) -> Check:
    from builder.stages.pipeline import build_graph

    largest = max(build_graph(loaded), key=lambda spec: spec.memory_estimate_bytes)
    available = available_memory_bytes()
    detail = (
        f"{available / GIB:.1f} GiB available, the largest stage ({largest.id}) "
        f"needs about {largest.memory_estimate_bytes / GIB:.1f} GiB"
    )
    if available < largest.memory_estimate_bytes:
        return Check("memory", "fail", detail, "close other programs, or build on a machine with more memory")
    return Check("memory", "ok", detail)


def hub_inputs(loaded: LoadedRecipe) -> list[tuple[str, str, str, str]]:
    """(recipe field, repo id, revision, the file its snapshot must hold: a config, or a LoRA's weights)
    of every hub input."""
    model = loaded.recipe.model
    found = []
    for field, source, marker in (
        ("model", model, "model_index.json"),
        ("model.refiner", model.refiner, "model_index.json"),
        ("model.vae", model.vae, "config.json"),
        *((f"model.controlnets.{i}", c, "config.json") for i, c in enumerate(model.controlnets)),
    ):
        if source is not None and source.hub is not None:
            found.append((field, source.hub.id, source.hub.revision, marker))
    for index, lora in enumerate(model.loras):  # a LoRA repository: only its one file is read
        if lora.hub is not None:
            found.append((f"model.loras.{index}", lora.hub.id, lora.hub.revision, lora.hub.weight_name))
    return found


def hub_cache_checks(loaded: LoadedRecipe | None, recipe_argument: str | None) -> list[Check]:
    """Where the HF cache is, and for a recipe, whether each pinned hub snapshot is in it (coarsely: its
    model_index.json or config.json and some safetensors; `sdbuild fetch` completes a partial one)."""
    from huggingface_hub import constants, scan_cache_dir
    from huggingface_hub.errors import CacheNotFound

    cache = Path(constants.HF_HUB_CACHE)
    offline = constants.HF_HUB_OFFLINE
    checks = [Check("hf cache", "ok", f"{cache}{' (HF_HUB_OFFLINE: no downloads)' if offline else ''}")]
    inputs = hub_inputs(loaded) if loaded is not None else []
    if not inputs:
        return checks
    try:
        repos = {(r.repo_type, r.repo_id): r for r in scan_cache_dir(cache).repos}
    except CacheNotFound:
        repos = {}
    fetch = f"sdbuild fetch {recipe_argument}"
    for field, repo_id, revision, marker in inputs:
        name = f"hub {field}"
        repo = repos.get(("model", repo_id))
        snapshot = next((r for r in repo.revisions if r.commit_hash == revision), None) if repo else None
        files = (
            {f.file_path.relative_to(snapshot.snapshot_path).as_posix() for f in snapshot.files} if snapshot else set()
        )
        weights = [f for f in files if f.endswith(".safetensors")]
        if snapshot is not None and marker in files and weights:
            size = snapshot.size_on_disk / GIB
            checks.append(
                Check(name, "ok", f"{repo_id}@{revision[:12]} in the cache ({len(files)} files, {size:.2f} GiB)")
            )
        elif offline:
            checks.append(
                Check(
                    name,
                    "fail",
                    f"{repo_id}@{revision[:12]} is not (completely) in the cache and HF_HUB_OFFLINE is set",
                    f"{fetch} while online",
                )
            )
        else:
            checks.append(
                Check(
                    name,
                    "note",
                    f"{repo_id}@{revision[:12]} is not (completely) in the cache: the build downloads it",
                    f"{fetch} now to build offline later",
                )
            )
    return checks
