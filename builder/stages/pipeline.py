"""The stage graph of a recipe: which stages run for which component, on what, with which params.

This is the one place that knows the order source -> rewrite -> trace -> convert -> [palettize or
quantize] -> [verify] -> compile -> bundle. Params hold only what a stage's output depends on, each with the recipe field it
came from, so the engine can say exactly which edit made a stage stale.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import NamedTuple

from builder import __version__
from builder.engine.spec import Graph, StageSpec
from builder.errors import RecipeError
from builder.recipe import Component, LoadedRecipe
from builder.recipe.model import ComponentSettings
from builder.sd.contract import controlnet_name
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
    if recipe.family.value != "sd":
        raise _field_error(loaded, "family", f"family '{recipe.family.value}' cannot be built yet", "use family: sd")
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
    if recipe.components.safety_checker is not None:
        _check_has_safety_checker(loaded)
    if recipe.model.controlnets:
        _check_controlnets(loaded)
        if recipe.components.unet.compression.mode == "mixed":
            raise _field_error(
                loaded, "components.unet.compression.mode",
                "mixed-bit recipes are analysed on the plain UNet, not the ControlledUnet built with ControlNets",
                "use mode: palettize with one nbits, or remove model.controlnets",
            )
    if recipe.model.vae is not None:
        raise _field_error(loaded, "model.vae", "a replacement VAE cannot be used yet", "remove model.vae")


def _check_controlnets(loaded: LoadedRecipe) -> None:
    """Known synthetic presets, and names that stay apart in Resources/controlnet/."""
    from builder.sd.presets import CONTROLNET_PRESETS

    seen: dict[str, int] = {}
    for index, source in enumerate(loaded.recipe.model.controlnets):
        field = f"model.controlnets.{index}"
        if source.synthetic is not None and source.synthetic.preset not in CONTROLNET_PRESETS:
            raise _field_error(
                loaded, f"{field}.synthetic.preset", f"unknown synthetic ControlNet preset '{source.synthetic.preset}'",
                f"use one of: {', '.join(sorted(CONTROLNET_PRESETS))}",
            )
        name = controlnet_name(source)
        if name in seen:
            raise _field_error(
                loaded, field, f"ControlNets {seen[name]} and {index} would both be controlnet/{name}",
                "list each ControlNet once (a local folder is named after its folder: rename one)",
            )
        seen[name] = index


def _check_has_safety_checker(loaded: LoadedRecipe) -> None:
    """A safety checker must exist in the source; hub pipelines are checked when downloaded."""
    source = loaded.recipe.model
    if source.synthetic is not None and PRESETS[source.synthetic.preset].safety_checker is None:
        missing = f"synthetic preset '{source.synthetic.preset}' has no safety checker"
    elif source.local is not None and source.local.path.is_dir() and not (source.local.path / "safety_checker").is_dir():
        missing = f"{source.local.path} has no safety_checker/ folder"
    else:
        return
    with_checker = sorted(name for name, preset in PRESETS.items() if preset.safety_checker is not None)
    raise _field_error(
        loaded, "components.safety_checker", missing,
        f"remove safety_checker from components (SD 2.x pipelines ship without one); presets with one: {', '.join(with_checker)}",
    )


def _check_mixed_recipe(path: Path) -> None:
    """Validate a mixed-bit recipe file before anything runs (its errors name its own lines)."""
    from builder.sd.mbp.recipe_file import load_recipe_file

    load_recipe_file(path)


def memory_estimate(loaded: LoadedRecipe, component: str | None) -> int:
    """Expected peak of one stage, for the scheduler: tiny presets need little, real UNets a lot."""
    if loaded.recipe.model.synthetic is not None and loaded.recipe.model.synthetic.preset.startswith("tiny"):
        return 1 * GIB
    return 8 * GIB if component == "unet" else 4 * GIB


class _Job(NamedTuple):
    """One model to convert: its stages' component label, the recipe component whose settings key
    it, the conversion kind, its settings, and where its weights come from."""

    label: str
    recipe_component: str
    kind: str
    settings: ComponentSettings
    model_inputs: dict[str, str]  # upstream stage outputs
    model_external: dict[str, Path]  # folders read in place


def _controlnet_jobs(loaded: LoadedRecipe, stages: list[StageSpec], tools: dict[str, str]) -> list[_Job]:
    """A source stage per ControlNet (appended to `stages`) and its conversion job for build_graph."""
    settings = loaded.recipe.components.controlnet or ComponentSettings()
    jobs = []
    for index, source in enumerate(loaded.recipe.model.controlnets):
        label = f"controlnet.{controlnet_name(source)}"
        field = f"model.controlnets.{index}"
        if source.local is not None:
            jobs.append(_Job(label, "controlnet", "controlnet", settings, {}, {"model": source.local.path}))
            continue
        if source.synthetic is not None:
            params = {"kind": "controlnet_synthetic", "preset": source.synthetic.preset, "seed": source.synthetic.seed}
            origins = {"preset": f"{field}.synthetic.preset", "seed": f"{field}.synthetic.seed"}
        else:
            params = {"kind": "controlnet_hub", "id": source.hub.id, "revision": source.hub.revision}
            origins = {"id": f"{field}.hub.id", "revision": f"{field}.hub.revision"}
        stages.append(StageSpec(
            id=f"source:{label}", stage="source", component=label, version=STAGE_VERSIONS["source"],
            function="builder.stages.source:run", params=params, param_origins=origins, tools=tools,
            memory_estimate_bytes=memory_estimate(loaded, "controlnet"),
        ))
        jobs.append(_Job(label, "controlnet", "controlnet", settings, {"model": f"source:{label}"}, {}))
    return jobs


def build_graph(loaded: LoadedRecipe) -> Graph:
    """The stage graph for `loaded`, or a RecipeError naming the field this version cannot build."""
    _check_supported(loaded)
    recipe = loaded.recipe
    tools = python_tools()
    stages: list[StageSpec] = []

    model_inputs: dict[str, str] = {}
    model_external: dict[str, Path] = {}
    source = recipe.model
    if source.local is not None and source.local.path.is_dir():
        model_external = {"model": source.local.path}
    else:
        checkpoint: dict[str, Path] = {}
        if source.synthetic is not None:
            params = {"kind": "synthetic", "preset": source.synthetic.preset, "seed": source.synthetic.seed}
            origins = {"preset": "model.synthetic.preset", "seed": "model.synthetic.seed"}
        elif source.local is not None:
            params = {"kind": "single_file", "family": recipe.family.value}
            origins = {"family": "model.local.path"}
            checkpoint = {"checkpoint": source.local.path}
        else:
            params = {"kind": "hub", "id": source.hub.id, "revision": source.hub.revision}
            origins = {"id": "model.hub.id", "revision": "model.hub.revision"}
        stages.append(StageSpec(
            id="source", stage="source", version=STAGE_VERSIONS["source"], function="builder.stages.source:run",
            params=params, param_origins=origins, external_inputs=checkpoint, tools=tools,
            memory_estimate_bytes=memory_estimate(loaded, None),
        ))
        model_inputs = {"model": "source"}

    pipeline_inputs, pipeline_external = model_inputs, model_external
    settings = {
        "attention": (recipe.attention.value, "attention"),
        "latent_size": (list(recipe.latent_size), "latent_size" if recipe.written_latent_size else "image_size"),
        "batch_size": (recipe.unet_batch_size, "unet_batch_size"),
    }
    unavailable = compile_unavailable()
    compile_tools = tools if unavailable else tools | {"xcode": xcode_version()}
    bundle_inputs: dict[str, str] = {}
    components: dict[str, dict] = {}
    controlled = bool(recipe.model.controlnets)  # then the UNet takes the ControlNets' residuals
    jobs = [
        _Job(c.value, c.value, "controlled_unet" if controlled and c is Component.UNET else c.value, s, model_inputs, model_external)
        for c, s in recipe.components.enabled().items()
        if c is not Component.CONTROLNET
    ]
    if controlled:
        jobs += _controlnet_jobs(loaded, stages, tools)
    for c, recipe_component, conversion_kind, component_settings, model_inputs, model_external in jobs:
        memory = memory_estimate(loaded, recipe_component)
        depends_on = COMPONENT_SETTINGS[recipe_component]
        rewrite_params = {"component": conversion_kind} | {name: settings[name][0] for name in depends_on}
        rewrite_origins = {name: settings[name][1] for name in depends_on}

        def add(stage: str, inputs: dict[str, str], params: dict, origins: dict | None = None, **extra) -> str:
            stage_id = f"{stage}:{c}"
            stages.append(StageSpec(
                id=stage_id, stage=stage, component=c, version=STAGE_VERSIONS[stage],
                function=f"builder.stages.{stage}:run", params=params, param_origins=origins or {},
                inputs=inputs, tools=extra.pop("tools", tools), memory_estimate_bytes=memory, **extra,
            ))
            return stage_id

        rewrite = add("rewrite", model_inputs, rewrite_params, rewrite_origins, external_inputs=model_external)
        trace = add("trace", {"rewritten": rewrite}, {"component": c, "minimum_psnr_db": MINIMUM_PSNR_DB})
        final = add(
            "convert", {"traced": trace, "rewritten": rewrite},
            {"component": c, "deployment_target": recipe.deployment_target.value},
            {"deployment_target": "deployment_target"},
        )
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
                rewritten=rewrite, model=model_inputs.get("model") or model_external["model"], tools=tools,
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
        "tools": compile_tools,
        "sdbuild_version": __version__,
    }
    stages.append(StageSpec(
        id="bundle", stage="bundle", version=STAGE_VERSIONS["bundle"], function="builder.stages.bundle:run",
        params=bundle_params, param_origins={"name": "name", "version": "version", "compute_unit": "compute_unit"},
        inputs=bundle_inputs | ({"tokenizer": "source"} if pipeline_inputs else {}),
        external_inputs={"tokenizer": pipeline_external["model"]} if pipeline_external else {},
        tools=tools, memory_estimate_bytes=1 * GIB,
    ))
    return Graph(stages)
