"""The stage graph of a recipe: which stages run for which component, on what, with which params.

This is the one place that knows the order source -> rewrite -> trace -> convert -> [palettize or
quantize] -> [verify] -> compile -> bundle. Params hold only what a stage's output depends on, each with the recipe field it
came from, so the engine can say exactly which edit made a stage stale.
"""

from __future__ import annotations

import os
from pathlib import Path

from builder import __version__
from builder.engine.spec import Graph, StageSpec
from builder.errors import RecipeError
from builder.recipe import LoadedRecipe
from builder.sd.presets import PRESETS
from builder.sd.settings import COMPONENT_SETTINGS
from builder.stages.tools import compile_unavailable, python_tools, xcode_version

GIB = 1024**3
STAGE_VERSIONS = {
    "source": "2", "rewrite": "2", "trace": "2", "convert": "1", "palettize": "2", "quantize": "1", "verify": "1", "compile": "1",
    "bundle": "4",
}
MINIMUM_PSNR_DB = 35.0


def _field_error(loaded: LoadedRecipe, field: str, message: str, hint: str) -> RecipeError:
    file, _, line = loaded.origin(field).rpartition(":")
    return RecipeError(file, message, line=int(line) if line.isdigit() else None, field=field, hint=hint)


def _check_supported(loaded: LoadedRecipe) -> None:
    """Refuse, with the field to change, what the recipe schema allows but this version cannot build."""
    recipe = loaded.recipe
    if recipe.model.synthetic is not None and recipe.model.synthetic.preset not in PRESETS:
        raise _field_error(
            loaded,
            "model.synthetic.preset",
            f"unknown synthetic preset '{recipe.model.synthetic.preset}'",
            f"use one of: {', '.join(sorted(PRESETS))}",
        )
    refiner = recipe.model.refiner
    if refiner is not None and refiner.synthetic is not None and refiner.synthetic.preset not in PRESETS:
        raise _field_error(
            loaded,
            "model.refiner.synthetic.preset",
            f"unknown synthetic preset '{refiner.synthetic.preset}'",
            f"use one of: {', '.join(sorted(PRESETS))}",
        )
    if recipe.chunk_unet:
        raise _field_error(loaded, "chunk_unet", "UNet chunking cannot be built yet", "set chunk_unet: false")
    for component in recipe.components.enabled():
        if component.value not in COMPONENT_SETTINGS:
            raise _field_error(
                loaded,
                f"components.{component.value}",
                f"component {component.value} cannot be converted yet",
                f"remove it; supported: {', '.join(COMPONENT_SETTINGS)}",
            )
    for component, settings in recipe.components.enabled().items():
        if settings.compression.mode == "mixed" and component.value != "unet":
            raise _field_error(
                loaded,
                f"components.{component.value}.compression.mode",
                "mixed-bit palettization is analysed for the UNet only",
                "use mode: palettize with one nbits for this component",
            )
    unet = recipe.components.unet
    if recipe.family.value != "sd" and unet.compression.mode == "mixed":
        raise _field_error(
            loaded, "components.unet.compression.mode", *_SD_ONLY_ANALYSIS,
        )
    for component in ("vae_decoder", "vae_encoder"):
        settings = getattr(recipe.components, component)
        if settings is not None and vae_precision(loaded) == "float32" and settings.compression.mode != "float16":
            raise _field_error(
                loaded,
                f"components.{component}.compression.mode",
                "the SDXL VAE overflows in float16, so it is converted in float32 and cannot be compressed",
                "use mode: float16 (the VAE then stays float32), or set model.vae to a float16-safe VAE "
                "such as madebyollin/sdxl-vae-fp16-fix",
            )


_SD_ONLY_ANALYSIS = (
    "mixed-bit analysis and quality reports are built for family sd only (their workload has no "
    "SDXL text_embeds/time_ids yet)",
    "palettize the SDXL UNet with one nbits (6 is the safe default), e.g. {mode: palettize, nbits: 6}",
)


def check_sd_workload(loaded: LoadedRecipe) -> None:
    """`sdbuild analyze` and `report` run an SD 1.x/2.x denoising workload; refuse other families."""
    if loaded.recipe.family.value != "sd":
        raise _field_error(loaded, "family", *_SD_ONLY_ANALYSIS)


def vae_precision(loaded: LoadedRecipe) -> str:
    """SDXL's own VAE overflows in float16 and is converted in float32; a replacement VAE
    (model.vae, e.g. a float16-safe one) and SD's VAE are converted in float16."""
    recipe = loaded.recipe
    return "float32" if recipe.family.value == "sdxl" and recipe.model.vae is None else "float16"


def _source_stage(
    loaded: LoadedRecipe, stage_id: str, field: str, source, tools: dict, *, pipeline: str, hub_kind: str = "hub"
) -> tuple[list[StageSpec], dict[str, str], dict[str, Path]]:
    """The stage that materialises one source (`field` names it in the recipe), as (stages, inputs,
    external inputs) for the stages reading it. A local folder is read in place; `pipeline` is the
    single-file checkpoint's pipeline (sd, sdxl, sdxl-refiner); `hub_kind` what a hub download fetches."""
    if source.local is not None and source.local.path.is_dir():
        return [], {}, {"model": source.local.path}
    checkpoint: dict[str, Path] = {}
    if getattr(source, "synthetic", None) is not None:
        params = {"kind": "synthetic", "preset": source.synthetic.preset, "seed": source.synthetic.seed}
        origins = {"preset": f"{field}.synthetic.preset", "seed": f"{field}.synthetic.seed"}
    elif source.local is not None:
        params = {"kind": "single_file", "family": pipeline}
        origins = {"family": f"{field}.local.path"}
        checkpoint = {"checkpoint": source.local.path}
    else:
        params = {"kind": hub_kind, "id": source.hub.id, "revision": source.hub.revision}
        origins = {"id": f"{field}.hub.id", "revision": f"{field}.hub.revision"}
    stage = StageSpec(
        id=stage_id, stage="source", version=STAGE_VERSIONS["source"], function="builder.stages.source:run",
        params=params, param_origins=origins, external_inputs=checkpoint, tools=tools,
        memory_estimate_bytes=memory_estimate(loaded, None),
    )
    return [stage], {"model": stage_id}, {}


def _check_mixed_recipe(path: Path) -> None:
    """Validate a mixed-bit recipe file before anything runs (its errors name its own lines)."""
    from builder.sd.mbp.recipe_file import load_recipe_file

    load_recipe_file(path)


def memory_estimate(loaded: LoadedRecipe, component: str | None) -> int:
    """Expected peak of one stage, for the scheduler: tiny presets need little, real UNets a lot."""
    if loaded.recipe.model.synthetic is not None and loaded.recipe.model.synthetic.preset.startswith("tiny"):
        return 1 * GIB
    if component in ("unet", "unet_refiner"):
        return (16 if loaded.recipe.family.value == "sdxl" else 8) * GIB  # SDXL's UNets: 2.3-2.6B parameters
    return 4 * GIB


def build_graph(loaded: LoadedRecipe) -> Graph:
    """The stage graph for `loaded`, or a RecipeError naming the field this version cannot build."""
    _check_supported(loaded)
    recipe = loaded.recipe
    tools = python_tools()
    stages: list[StageSpec] = []

    source_stages, model_inputs, model_external = _source_stage(
        loaded, "source", "model", recipe.model, tools, pipeline=recipe.family.value
    )
    stages += source_stages
    # Per component: the source it converts from (the refiner's UNet and a replacement VAE have their own).
    sources = {c.value: (model_inputs, model_external) for c in recipe.components.enabled()}
    if recipe.model.refiner is not None:
        refiner_stages, *refiner = _source_stage(
            loaded, "source-refiner", "model.refiner", recipe.model.refiner, tools, pipeline="sdxl-refiner"
        )
        stages += refiner_stages
        sources["unet_refiner"] = tuple(refiner)
    if recipe.model.vae is not None:
        vae_stages, *vae = _source_stage(
            loaded, "source-vae", "model.vae", recipe.model.vae, tools, pipeline="vae", hub_kind="vae_hub"
        )
        stages += vae_stages
        sources |= {c: tuple(vae) for c in ("vae_decoder", "vae_encoder") if c in sources}

    settings = {
        "family": (recipe.family.value, "family"),
        "attention": (recipe.attention.value, "attention"),
        "latent_size": (list(recipe.latent_size), "latent_size" if recipe.written_latent_size else "image_size"),
        "batch_size": (recipe.unet_batch_size, "unet_batch_size"),
    }
    unavailable = compile_unavailable()
    compile_tools = tools if unavailable else tools | {"xcode": xcode_version()}
    bundle_inputs: dict[str, str] = {}
    components: dict[str, dict] = {}
    precisions: dict[str, str] = {}
    for component, component_settings in recipe.components.enabled().items():
        c = component.value
        component_inputs, component_external = sources[c]
        precision = vae_precision(loaded) if c in ("vae_decoder", "vae_encoder") else "float16"
        memory = memory_estimate(loaded, c)
        depends_on = COMPONENT_SETTINGS[c]
        rewrite_params = {"component": c} | {name: settings[name][0] for name in depends_on}
        rewrite_origins = {name: settings[name][1] for name in depends_on}

        def add(stage: str, inputs: dict[str, str], params: dict, origins: dict | None = None, **extra) -> str:
            stage_id = f"{stage}:{c}"
            stages.append(StageSpec(
                id=stage_id, stage=stage, component=c, version=STAGE_VERSIONS[stage],
                function=f"builder.stages.{stage}:run", params=params, param_origins=origins or {},
                inputs=inputs, tools=extra.pop("tools", tools), memory_estimate_bytes=memory, **extra,
            ))
            return stage_id

        rewrite = add("rewrite", component_inputs, rewrite_params, rewrite_origins, external_inputs=component_external)
        trace = add("trace", {"rewritten": rewrite}, {"component": c, "minimum_psnr_db": MINIMUM_PSNR_DB})
        convert_params = {"component": c, "deployment_target": recipe.deployment_target.value}
        convert_origins = {"deployment_target": "deployment_target"}
        if precision != "float16":  # float16 is the default, so float16 components keep their keys
            convert_params["precision"] = precision
            convert_origins["precision"] = "family"
        final = add("convert", {"traced": trace, "rewritten": rewrite}, convert_params, convert_origins)
        precisions[c] = precision
        compression = component_settings.compression
        if compression.mode == "mixed":
            settings_path = f"components.{c}.compression"
            _check_mixed_recipe(compression.recipe)
            final = add(
                "palettize", {"model": final, "rewritten": rewrite}, {"weight_threshold": compression.weight_threshold},
                {"mbp_recipe": f"{settings_path}.recipe", "weight_threshold": f"{settings_path}.weight_threshold"},
                external_inputs={"mbp_recipe": compression.recipe},
            )
            from builder.stages.analyze import probe_stage  # imports torch: only for mixed-bit recipes

            stages.append(probe_stage(
                rewritten=rewrite, model=component_inputs.get("model") or component_external["model"], tools=tools,
                memory_estimate_bytes=memory, component=c,
            ))
            bundle_inputs[f"verify.{c}"] = add(
                "verify", {"rewritten": rewrite, "model": final, "probe": f"analyze-inputs:{c}"}, {},
                external_inputs={"mbp_recipe": compression.recipe},
            )
        elif compression.mode in ("palettize", "quantize"):
            settings_path = f"components.{c}.compression"
            params = compression.model_dump(mode="json", exclude={"mode"})
            final = add(
                compression.mode, {"model": final}, params, {name: f"{settings_path}.{name}" for name in params}
            )
            if compression.mode == "palettize":
                bundle_inputs[f"verify.{c}"] = add("verify", {"rewritten": rewrite, "model": final}, {})
        compiled = add("compile", {"model": final}, {}, tools=compile_tools, unavailable=unavailable)
        bundle_inputs |= {f"model.{c}": final, f"compiled.{c}": compiled, f"check.{c}": trace}
        components[c] = compression.model_dump(mode="json")
        if compression.mode == "mixed":  # as written, so the manifest does not depend on where the workspace is
            components[c]["recipe"] = os.path.relpath(compression.recipe, loaded.path.parent)

    bundle_params = {
        "name": recipe.name,
        "version": recipe.version,
        "recipe_digest": loaded.digest,
        "family": recipe.family.value,
        "latent_size": list(recipe.latent_size),
        "unet_batch_size": recipe.unet_batch_size,
        "attention": recipe.attention.value,
        "compute_unit": recipe.compute_unit.value,
        "deployment_target": recipe.deployment_target.value,
        "components": components,
        "precision": precisions,
        "tools": compile_tools,
        "sdbuild_version": __version__,
    }
    stages.append(StageSpec(
        id="bundle", stage="bundle", version=STAGE_VERSIONS["bundle"], function="builder.stages.bundle:run",
        params=bundle_params, param_origins={"name": "name", "version": "version", "compute_unit": "compute_unit"},
        inputs=bundle_inputs | ({"tokenizer": "source"} if model_inputs else {}),
        external_inputs={"tokenizer": model_external["model"]} if model_external else {},
        tools=tools, memory_estimate_bytes=1 * GIB,
    ))
    return Graph(stages)
