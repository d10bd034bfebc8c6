"""The stage graph of a recipe: which stages run for which component, on what, with which params.

This is the one place that knows the order source -> rewrite -> trace -> convert -> [palettize or
quantize] -> [verify] -> compile -> bundle. Params hold only what a stage's output depends on, each with the recipe field it
came from, so the engine can say exactly which edit made a stage stale. A chunked UNet replaces
trace with one `chunk` stage per chunk and runs every later stage per chunk (`<stage>:unet.chunk<k>`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import NamedTuple

from builder import __version__
from builder.build_info import build_date, environment, recipe_record, sdbuild_info
from builder.engine.spec import Graph, StageSpec
from builder.errors import RecipeError
from builder.recipe import Component, LoadedRecipe
from builder.recipe.model import ComponentSettings
from builder.sd.contract import controlnet_name
from builder.sd.presets import PRESETS
from builder.sd.settings import ANALYSED_COMPONENTS, CHUNKED_BY_CHUNK_UNET, COMPONENT_SETTINGS
from builder.stages.preflight import check_sources, size_extra_bytes
from builder.stages.provenance import sources_provenance
from builder.stages.tools import compile_unavailable, python_tools, xcode_version

GIB = 1024**3
STAGE_VERSIONS = {
    "source": "3",
    "rewrite": "2",
    "trace": "3",
    "convert": "2",
    "palettize": "2",
    "quantize": "1",
    "verify": "2",
    "compile": "2",
    "bundle": "9",
    "chunk": "3",
    "provenance": "1",
}
MINIMUM_PSNR_DB = 35.0
# Stages whose work one core does (writing seeded weights or downloading, coremltools' conversion,
# the Core ML compiler, copying files): given one thread, so they run beside the stages that use many.
SINGLE_THREADED = frozenset({"source", "convert", "compile", "bundle"})


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
    for component in recipe.components.enabled():
        if component.value not in COMPONENT_SETTINGS:
            raise _field_error(
                loaded,
                f"components.{component.value}",
                f"component {component.value} cannot be converted yet",
                f"remove it; supported: {', '.join(COMPONENT_SETTINGS)}",
            )
    for component, settings in recipe.components.enabled().items():
        if settings.compression.mode == "mixed" and component.value not in ANALYSED_COMPONENTS:
            raise _field_error(
                loaded,
                f"components.{component.value}.compression.mode",
                "mixed-bit palettization is analysed for the UNets only (unet, unet_refiner)",
                "use mode: palettize with one nbits for this component",
            )
    for component, settings in recipe.components.enabled().items():
        if settings.compression.mode == "w8a8":
            _check_w8a8(loaded, component.value)
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
    if recipe.components.safety_checker is not None:
        _check_has_safety_checker(loaded)
    if recipe.model.controlnets:
        _check_controlnets(loaded)
        if recipe.components.unet.compression.mode == "mixed":
            raise _field_error(
                loaded,
                "components.unet.compression.mode",
                "mixed-bit recipes are analysed on the plain UNet, not the ControlledUnet built with ControlNets",
                "use mode: palettize with one nbits, or remove model.controlnets",
            )


def _check_w8a8(loaded: LoadedRecipe, component: str) -> None:
    """W8A8 quantizes a whole plain UNet in torch (builder/sd/w8a8)."""
    field = f"components.{component}.compression.mode"
    if component not in ANALYSED_COMPONENTS:
        raise _field_error(
            loaded,
            field,
            "w8a8 is calibrated and analysed for the UNets only (unet, unet_refiner)",
            "use mode: quantize",
        )
    if loaded.recipe.chunk_unet:
        raise _field_error(
            loaded,
            field,
            "a w8a8 UNet is quantized and converted whole; chunk_unet cuts the float module",
            "set chunk_unet: false, or use mode: quantize or palettize for a chunked UNet",
        )
    if loaded.recipe.model.controlnets:
        raise _field_error(
            loaded,
            field,
            "w8a8 is analysed on the plain UNet, not the ControlledUnet built with ControlNets",
            "use mode: quantize or palettize, or remove model.controlnets",
        )


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
        id=stage_id,
        stage="source",
        version=STAGE_VERSIONS["source"],
        function="builder.stages.source:run",
        params=params,
        param_origins=origins,
        external_inputs=checkpoint,
        tools=tools,
        memory_estimate_bytes=memory_estimate(loaded, None),
        parallel=False,
    )
    return [stage], {"model": stage_id}, {}


def _check_controlnets(loaded: LoadedRecipe) -> None:
    """Known synthetic presets, and names that stay apart in Resources/controlnet/."""
    from builder.sd.presets import CONTROLNET_PRESETS

    seen: dict[str, int] = {}
    for index, source in enumerate(loaded.recipe.model.controlnets):
        field = f"model.controlnets.{index}"
        if source.synthetic is not None and source.synthetic.preset not in CONTROLNET_PRESETS:
            raise _field_error(
                loaded,
                f"{field}.synthetic.preset",
                f"unknown synthetic ControlNet preset '{source.synthetic.preset}'",
                f"use one of: {', '.join(sorted(CONTROLNET_PRESETS))}",
            )
        name = controlnet_name(source)
        if name in seen:
            raise _field_error(
                loaded,
                field,
                f"ControlNets {seen[name]} and {index} would both be controlnet/{name}",
                "list each ControlNet once (a local folder is named after its folder: rename one)",
            )
        seen[name] = index


def _check_has_safety_checker(loaded: LoadedRecipe) -> None:
    """A safety checker must exist in the source; hub pipelines are checked when downloaded."""
    source = loaded.recipe.model
    if source.synthetic is not None and PRESETS[source.synthetic.preset].safety_checker is None:
        missing = f"synthetic preset '{source.synthetic.preset}' has no safety checker"
    elif (
        source.local is not None and source.local.path.is_dir() and not (source.local.path / "safety_checker").is_dir()
    ):
        missing = f"{source.local.path} has no safety_checker/ folder"
    elif source.local is not None and source.local.path.is_file():
        missing = f"the single-file checkpoint {source.local.path.name} has no safety checker"
    else:
        return
    with_checker = sorted(name for name, preset in PRESETS.items() if preset.safety_checker is not None)
    raise _field_error(
        loaded,
        "components.safety_checker",
        missing,
        f"remove safety_checker from components (SD 2.x pipelines ship without one); presets with one: {', '.join(with_checker)}",
    )


def _check_mixed_recipe(path: Path) -> None:
    """Validate a mixed-bit recipe file before anything runs (its errors name its own lines)."""
    from builder.sd.mbp.recipe_file import load_recipe_file

    load_recipe_file(path)


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
}
_SDXL_UNET_SCALE = 3


def memory_estimate(loaded: LoadedRecipe, component: str | None) -> int:
    """Expected peak of one stage, for the scheduler: tiny presets need little, real UNets a lot;
    sizes above the family's native one add what their attention scores take."""
    extra = size_extra_bytes(loaded, component)
    if loaded.recipe.model.synthetic is not None and loaded.recipe.model.synthetic.preset.startswith("tiny"):
        return 1 * GIB + extra
    estimate = _FULL_SIZE_PEAK_GIB.get(component, 4)
    if component in ("unet", "unet_refiner") and loaded.recipe.family.value == "sdxl":
        estimate *= _SDXL_UNET_SCALE
    return estimate * GIB + extra


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
        stages.append(
            StageSpec(
                id=f"source:{label}",
                stage="source",
                component=label,
                version=STAGE_VERSIONS["source"],
                function="builder.stages.source:run",
                params=params,
                param_origins=origins,
                tools=tools,
                memory_estimate_bytes=memory_estimate(loaded, "controlnet"),
                parallel=False,
            )
        )
        jobs.append(_Job(label, "controlnet", "controlnet", settings, {"model": f"source:{label}"}, {}))
    return jobs


def build_graph(loaded: LoadedRecipe) -> Graph:
    """The stage graph for `loaded`, or a RecipeError naming the field this version cannot build."""
    _check_supported(loaded)
    check_sources(loaded)
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

    pipeline_inputs, pipeline_external = model_inputs, model_external
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
    chunked_components: list[str] = []
    precisions: dict[str, str] = {}
    controlled = bool(recipe.model.controlnets)  # then the UNet takes the ControlNets' residuals
    jobs = [
        _Job(
            c.value, c.value, "controlled_unet" if controlled and c is Component.UNET else c.value, s, *sources[c.value]
        )
        for c, s in recipe.components.enabled().items()
        if c is not Component.CONTROLNET
    ]
    if controlled:
        jobs += _controlnet_jobs(loaded, stages, tools)
    for c, recipe_component, conversion_kind, component_settings, component_inputs, component_external in jobs:
        precision = vae_precision(loaded) if c in ("vae_decoder", "vae_encoder") else "float16"
        memory = memory_estimate(loaded, recipe_component)
        depends_on = COMPONENT_SETTINGS[recipe_component]
        rewrite_params = {"component": conversion_kind} | {name: settings[name][0] for name in depends_on}
        rewrite_origins = {name: settings[name][1] for name in depends_on}

        def add(
            stage: str, inputs: dict[str, str], params: dict, origins: dict | None = None, part: str = "", **extra
        ) -> str:
            stage_id = f"{stage}:{c}{part}"
            stages.append(
                StageSpec(
                    id=stage_id,
                    stage=stage,
                    component=f"{c}{part}",
                    version=STAGE_VERSIONS[stage],
                    function=f"builder.stages.{stage}:run",
                    params=params,
                    param_origins=origins or {},
                    inputs=inputs,
                    tools=extra.pop("tools", tools),
                    memory_estimate_bytes=memory,
                    parallel=stage not in SINGLE_THREADED,
                    **extra,
                )
            )
            return stage_id

        rewrite = add("rewrite", component_inputs, rewrite_params, rewrite_origins, external_inputs=component_external)
        precisions[c] = precision
        compression = component_settings.compression
        if compression.mode == "mixed":
            _check_mixed_recipe(compression.recipe)
            from builder.stages.analyze import probe_stage  # imports torch: only for mixed-bit recipes

            stages.append(
                probe_stage(
                    rewritten=rewrite,
                    model=component_inputs.get("model") or component_external["model"],
                    tools=tools,
                    memory_estimate_bytes=memory,
                    family=recipe.family.value,
                    component=c,
                )
            )
        chunked = recipe.chunk_unet and c in CHUNKED_BY_CHUNK_UNET
        # A chunked UNet runs everything after rewrite once per chunk; the rewrite is shared. Chunk 2's
        # stages read chunk 1's: its trace takes chunk 1's hand-over, its verify chunk 1's read-back.
        first: dict[str, str] = {}
        for chunk in (1, 2) if chunked else (None,):
            part = f".chunk{chunk}" if chunk else ""
            chunk_params = {"chunk": chunk} if chunk else {}
            chunk_origins = {"chunk": "chunk_unet"} if chunk else {}
            if chunk:
                trace = add(
                    "chunk",
                    {"rewritten": rewrite} | ({"first": first["trace"]} if chunk == 2 else {}),
                    {"component": c, "minimum_psnr_db": MINIMUM_PSNR_DB} | chunk_params,
                    chunk_origins,
                    part=part,
                )
            else:
                trace = add("trace", {"rewritten": rewrite}, {"component": c, "minimum_psnr_db": MINIMUM_PSNR_DB})
            convert_params = {"component": c, "deployment_target": recipe.deployment_target.value} | chunk_params
            convert_origins = {"deployment_target": "deployment_target"} | chunk_origins
            if precision != "float16":  # float16 is the default, so float16 components keep their keys
                convert_params["precision"] = precision
                convert_origins["precision"] = "family"
            converted = (
                add("convert", {"traced": trace, "rewritten": rewrite}, convert_params, convert_origins, part=part)
                if compression.mode != "w8a8"
                else ""
            )  # a W8A8 UNet is converted from its quantized model
            final = converted
            settings_path = f"components.{c}.compression"
            # A floor the read-back PSNR must reach (first, so a failure is told at its recipe line).
            floor = getattr(compression, "minimum_psnr_db", None)
            verify_params = ({"minimum_psnr_db": floor} if floor is not None else {}) | chunk_params
            verify_origins = {"minimum_psnr_db": f"{settings_path}.minimum_psnr_db"} if floor is not None else {}
            verify_origins |= chunk_origins
            verify_inputs = {"rewritten": rewrite, "float16": converted} | ({"traced": trace} if chunk else {})
            verify_inputs |= {"handover": first["verify"]} if chunk == 2 else {}
            verified = None
            if compression.mode == "mixed":
                final = add(
                    "palettize",
                    {"model": final, "rewritten": rewrite},
                    {"weight_threshold": compression.weight_threshold} | chunk_params,
                    {"mbp_recipe": f"{settings_path}.recipe", "weight_threshold": f"{settings_path}.weight_threshold"}
                    | chunk_origins,
                    external_inputs={"mbp_recipe": compression.recipe},
                    part=part,
                )
                # The analysis workload runs the whole UNet: scored unchunked, or at chunk 2 with both chunks.
                scored = chunk != 1
                verify_inputs |= {"probe": f"analyze-inputs:{c}"} if scored else {}
                verify_inputs |= {"first": first["final"]} if chunk == 2 else {}
                verified = add(
                    "verify",
                    verify_inputs | {"model": final},
                    verify_params,
                    verify_origins,
                    external_inputs={"mbp_recipe": compression.recipe} if scored else {},
                    part=part,
                )
            elif compression.mode in ("palettize", "quantize"):
                params = compression.model_dump(mode="json", exclude={"mode", "minimum_psnr_db"})
                final = add(
                    compression.mode,
                    {"model": final},
                    params,
                    {name: f"{settings_path}.{name}" for name in params},
                    part=part,
                )
                verified = add("verify", verify_inputs | {"model": final}, verify_params, verify_origins, part=part)
            elif compression.mode == "w8a8":
                from builder.stages.w8a8 import w8a8_stages  # imports torch: only for w8a8 recipes

                quantized, final, verified = w8a8_stages(
                    component=c,
                    settings=compression,
                    family=recipe.family.value,
                    deployment_target=recipe.deployment_target,
                    rewritten=rewrite,
                    model=component_inputs.get("model") or component_external["model"],
                    tools=tools,
                    memory_estimate_bytes=memory,
                )
                stages += quantized
            if verified is not None:
                bundle_inputs[f"verify.{c}{part}"] = verified
            first = {"trace": trace, "final": final, "verify": verified or ""}
            compiled = add("compile", {"model": final}, {}, tools=compile_tools, unavailable=unavailable, part=part)
            bundle_inputs |= {f"model.{c}{part}": final, f"compiled.{c}{part}": compiled, f"check.{c}{part}": trace}
        if chunked:
            chunked_components.append(c)
        components[c] = compression.model_dump(mode="json")
        if compression.mode == "mixed":  # as written, so the manifest does not depend on where the workspace is
            components[c]["recipe"] = os.path.relpath(compression.recipe, loaded.path.parent)

    provenance = sources_provenance(loaded, STAGE_VERSIONS["provenance"])
    stages += provenance.stages
    bundle_inputs |= provenance.inputs
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
        "chunked": chunked_components,
        "precision": precisions,
        "tools": compile_tools,
        "sdbuild_version": __version__,
        "recipe": recipe_record(loaded),
        "sdbuild": sdbuild_info(),
        "sources": provenance.params,
        "environment": environment(),
        "date": build_date(),
    }
    stages.append(
        StageSpec(
            id="bundle",
            stage="bundle",
            version=STAGE_VERSIONS["bundle"],
            function="builder.stages.bundle:run",
            params=bundle_params,
            param_origins={"name": "name", "version": "version", "compute_unit": "compute_unit"},
            inputs=bundle_inputs | ({"tokenizer": "source"} if pipeline_inputs else {}),
            external_inputs={"tokenizer": pipeline_external["model"]} if pipeline_external else {},
            tools=tools,
            memory_estimate_bytes=1 * GIB,
            parallel=False,
        )
    )
    return Graph(stages)
