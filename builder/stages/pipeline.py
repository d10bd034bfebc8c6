"""The stage graph of a recipe: which stages run for which component, on what, with which params.

This is the one place that knows the order source -> rewrite -> trace -> convert -> [palettize or
quantize] -> [verify] -> compile -> bundle. Params (typed in `params.py`) hold only what a stage's
output depends on, each with the recipe field it came from, so the engine can say exactly which edit
made a stage stale. A chunked UNet replaces trace with one `chunk` stage per chunk and runs every later
stage per chunk (`<stage>:unet.chunk<k>`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal, NamedTuple

from pydantic import BaseModel

from builder import __version__
from builder.build_info import build_date, environment, recipe_record, sdbuild_info
from builder.engine.spec import GIB, Graph, StageSpec
from builder.errors import UserError
from builder.hub.layout import unread_folders
from builder.recipe import Component, LoadedRecipe
from builder.recipe.compression import Compression, MixedPalettize
from builder.recipe.model import ComponentSettings, ControlNetSettings
from builder.sd.contract import PLAIN_UNET, controlnet_name
from builder.sd.manifest import Precision, ShippedCompression, ShippedMixedPalettize
from builder.sd.settings import CHUNKED_BY_CHUNK_UNET, COMPONENT_SETTINGS
from builder.stages.lora_inputs import lora_inputs
from builder.stages.params import (
    BundleParams,
    ChunkParams,
    CompileParams,
    ConvertParams,
    FusedLora,
    HubControlNet,
    HubLora,
    HubSource,
    MixedPalettizeParams,
    PalettizeOptions,
    QuantizeParams,
    RewriteParams,
    SingleFileSource,
    StageParams,
    SyntheticControlNet,
    SyntheticSource,
    TraceParams,
    VerifyParams,
)
from builder.stages.preflight import check_sources, memory_estimate
from builder.stages.prompt_encoders import fused_text_encoders
from builder.stages.provenance import sources_provenance
from builder.stages.supported import check_supported, component_precision
from builder.stages.tools import compile_unavailable, recorded_tools, xcode_version

# Stages whose work one core does (writing seeded weights or downloading, coremltools' conversion,
# the Core ML compiler, copying files): given one thread, so they run beside the stages that use many.
SINGLE_THREADED = frozenset({"source", "convert", "compile", "bundle"})


class _Source(NamedTuple):
    """Where a component's weights come from: upstream stage outputs, or folders read in place."""

    inputs: dict[str, str]
    external: dict[str, Path]


class _Job(NamedTuple):
    """One model to convert: its stages' component label, the recipe component whose settings key
    it, the conversion kind, its settings, and where its weights come from."""

    label: str
    recipe_component: str
    kind: str
    settings: ComponentSettings
    source: _Source


class _Chain(NamedTuple):
    """What one chunk's (or the whole component's) stages produced, for the next chunk and the bundle."""

    trace: str
    final: str  # the model shipped: converted, compressed
    verify: str | None


def build_graph(loaded: LoadedRecipe) -> Graph:
    """The stage graph for `loaded`, or a RecipeError naming the field this version cannot build."""
    check_supported(loaded)
    check_sources(loaded)
    graph = _GraphBuilder(loaded)
    pipeline = graph.source("source", "model", loaded.recipe.model, pipeline=loaded.recipe.family.value)
    graph.lora_sources()
    for job in graph.jobs(pipeline):
        graph.component(job)
    graph.bundle(pipeline)
    return Graph(graph.stages)


def analysis_graph(loaded: LoadedRecipe, component: str, chunks: int) -> Graph:
    """The stages `sdbuild analyze` runs: the component's rewrite (and what it reads), then the
    mixed-bit analysis in `chunks` cached layer groups, ending in `analyze:<component>`."""
    from builder.stages.analyze import analysis_stages  # imports torch

    full = build_graph(loaded)
    if f"rewrite:{component}" not in full:
        raise UserError(
            f"{loaded.path.name} does not convert {component}",
            hint=f"add components.{component} to the recipe, or analyse another component",
        )
    rewrite = full[f"rewrite:{component}"]
    fused = fused_text_encoders(full) if component == Component.UNET.value else {}
    stages = analysis_stages(
        rewritten=rewrite.id,
        model=rewrite.inputs.get("model") or rewrite.external_inputs["model"],  # the component's pipeline folder
        description=f"{loaded.recipe.name} {component}, {loaded.recipe.attention.value}",
        memory_estimate_bytes=memory_estimate(loaded, component),
        family=loaded.recipe.family.value,
        component=component,
        chunks=chunks,
        text_encoders=fused,
    )
    needed = {rewrite.id, *rewrite.inputs.values()}
    for stage_id in fused.values():
        needed |= {stage_id, *full[stage_id].inputs.values()}
    return Graph([*(spec for spec in full if spec.id in needed), *stages])


class _GraphBuilder:
    """Collects the stages of one recipe, and what the bundle stage needs to know about them."""

    def __init__(self, loaded: LoadedRecipe):
        self.loaded = loaded
        self.recipe = loaded.recipe
        self.stages: list[StageSpec] = []
        self.bundle_inputs: dict[str, str] = {}
        self.components: dict[str, ShippedCompression] = {}
        self.chunked: list[str] = []
        self.precisions: dict[str, Precision] = {}
        self.loras = lora_inputs(loaded)
        self.unavailable = compile_unavailable()
        self.compile_tools = {} if self.unavailable else {"xcode": xcode_version()}

    def add(
        self,
        stage: str,
        label: str,
        params: BaseModel,
        origins: dict[str, str],
        inputs: dict[str, str],
        *,
        memory: int,
        external: dict[str, Path] | None = None,
        **extra: Any,
    ) -> str:
        """Append one stage (`<stage>:<label>`) and return its id."""
        stage_id = f"{stage}:{label}"
        self.stages.append(
            StageSpec(
                id=stage_id,
                stage=stage,
                component=label,
                function=f"builder.stages.{stage}:run",
                params=params.model_dump(mode="json", exclude_unset=True),
                param_origins=origins,
                inputs=inputs,
                external_inputs=external or {},
                memory_estimate_bytes=memory,
                parallel=stage not in SINGLE_THREADED,
                **extra,
            )
        )
        return stage_id

    def source(
        self, stage_id: str, field: str, source: Any, *, pipeline: str, hub_kind: Literal["hub", "vae_hub"] = "hub"
    ) -> _Source:
        """The stage that materialises one source (`field` names it in the recipe). A local folder is
        read in place; `pipeline` is a single-file checkpoint's pipeline (sd, sdxl, sdxl-refiner);
        `hub_kind` what a hub download fetches."""
        if source.local is not None and source.local.path.is_dir():
            return _Source({}, {"model": source.local.path})
        checkpoint: dict[str, Path] = {}
        params: StageParams
        if getattr(source, "synthetic", None) is not None:
            params = SyntheticSource(kind="synthetic", preset=source.synthetic.preset, seed=source.synthetic.seed)
            origins = {"preset": f"{field}.synthetic.preset", "seed": f"{field}.synthetic.seed"}
        elif source.local is not None:
            params = SingleFileSource(kind="single_file", family=pipeline)
            origins = {"family": f"{field}.local.path"}
            checkpoint = {"checkpoint": source.local.path}
        else:
            params = HubSource(kind=hub_kind, id=source.hub.id, revision=source.hub.revision)
            origins = {"id": f"{field}.hub.id", "revision": f"{field}.hub.revision"}
            unread = unread_folders(c.value for c in self.recipe.components.enabled()) if field == "model" else ()
            if unread:  # T5, the safety checker: not downloaded for a recipe that does not build them
                params.unread = list(unread)
                origins["unread"] = "components"
        self.stages.append(
            StageSpec(
                id=stage_id,
                stage="source",
                function="builder.stages.source:run",
                params=params.model_dump(mode="json", exclude_unset=True),
                param_origins=origins,
                external_inputs=checkpoint,
                memory_estimate_bytes=memory_estimate(self.loaded, None),
                parallel=False,
            )
        )
        return _Source({"model": stage_id}, {})

    def lora_sources(self) -> None:
        """A source stage per hub LoRA (its file taken from the Hugging Face cache); a LoRA that changes
        no component the recipe builds is refused."""
        built = {c.value for c in self.recipe.components.enabled()}
        for lora in self.loras:
            if not built & set(lora.components):
                raise self.loaded.error(
                    lora.field,
                    f"this LoRA has weights for {', '.join(lora.components)} only, which the recipe does not build",
                    f"add components.{lora.components[0]}, or remove the LoRA",
                )
            if lora.hub is not None:
                hub = lora.hub
                params = HubLora(kind="lora_hub", id=hub.id, revision=hub.revision, weight_name=hub.weight_name)
                origins = {name: f"{lora.field}.hub.{name}" for name in ("id", "revision", "weight_name")}
                self.add("source", lora.label, params, origins, {}, memory=GIB)

    def jobs(self, pipeline: _Source) -> list[_Job]:
        """Every model to convert, with its source: the refiner's UNet and a replacement VAE have their own."""
        model = self.recipe.model
        sources = {c.value: pipeline for c in self.recipe.components.enabled()}
        if model.refiner is not None:
            sources["unet_refiner"] = self.source(
                "source-refiner", "model.refiner", model.refiner, pipeline="sdxl-refiner"
            )
        if model.vae is not None:
            vae = self.source("source-vae", "model.vae", model.vae, pipeline="vae", hub_kind="vae_hub")
            sources |= {c: vae for c in ("vae_decoder", "vae_encoder") if c in sources}
        controlled = bool(model.controlnets)  # then the UNet takes the ControlNets' residuals
        jobs = [
            _Job(
                c.value,
                c.value,
                "controlled_unet" if controlled and c is Component.UNET else c.value,
                s,
                sources[c.value],
            )
            for c, s in self.recipe.components.enabled().items()
            if c is not Component.CONTROLNET
        ]
        return jobs + (self._controlnet_jobs() + self._plain_unet_job(sources) if controlled else [])

    def _plain_unet_job(self, sources: dict[str, _Source]) -> list[_Job]:
        """Beside ControlNets, the plain UNet as well (`unet.plain`, shipped as Unet) unless the recipe
        says `plain_unet: false`: same source and settings as ControlledUnet, its own interface."""
        settings = self.recipe.components.controlnet or ControlNetSettings()
        unet = self.recipe.components.unet
        if not settings.plain_unet or unet is None:  # the recipe rules require a UNet beside ControlNets
            return []
        return [_Job(PLAIN_UNET, Component.UNET.value, Component.UNET.value, unet, sources[Component.UNET.value])]

    def _controlnet_jobs(self) -> list[_Job]:
        """A source stage per ControlNet that is not a local folder, and its conversion job."""
        settings = self.recipe.components.controlnet or ControlNetSettings()
        jobs = []
        for index, source in enumerate(self.recipe.model.controlnets):
            label = f"controlnet.{controlnet_name(source)}"
            field = f"model.controlnets.{index}"
            if source.local is not None:
                jobs.append(
                    _Job(label, "controlnet", "controlnet", settings, _Source({}, {"model": source.local.path}))
                )
                continue
            params: StageParams
            if source.synthetic is not None:
                params = SyntheticControlNet(
                    kind="controlnet_synthetic", preset=source.synthetic.preset, seed=source.synthetic.seed
                )
                origins = {"preset": f"{field}.synthetic.preset", "seed": f"{field}.synthetic.seed"}
            else:
                hub = source.hub
                assert hub is not None  # the recipe model takes exactly one of local, synthetic and hub
                params = HubControlNet(kind="controlnet_hub", id=hub.id, revision=hub.revision)
                origins = {"id": f"{field}.hub.id", "revision": f"{field}.hub.revision"}
            memory = memory_estimate(self.loaded, "controlnet")
            stage_id = self.add("source", label, params, origins, {}, memory=memory)
            jobs.append(_Job(label, "controlnet", "controlnet", settings, _Source({"model": stage_id}, {})))
        return jobs

    def component(self, job: _Job) -> None:
        """Rewrite once, then trace (or chunk), convert, compress, verify and compile per chunk."""
        c = job.label
        memory = memory_estimate(self.loaded, job.recipe_component)
        settings = self._settings()
        depends_on = COMPONENT_SETTINGS[job.recipe_component]
        rewrite_params = RewriteParams(component=job.kind, **{name: settings[name][0] for name in depends_on})
        origins = {name: settings[name][1] for name in depends_on}
        inputs, external = dict(job.source.inputs), dict(job.source.external)
        loras = [lora for lora in self.loras if job.recipe_component in lora.components]
        if loras:  # set only then, so recipes without LoRAs keep their keys
            rewrite_params.loras = [FusedLora(input=lora.label, scale=lora.scale) for lora in loras]
            origins["loras"] = "model.loras"
            for lora in loras:
                if lora.hub is not None:
                    inputs[lora.label] = f"source:{lora.label}"
                else:
                    external[lora.label] = lora.file
        rewrite = self.add("rewrite", c, rewrite_params, origins, inputs, memory=memory, external=external)
        self.precisions[c] = component_precision(self.loaded, c)
        compression = job.settings.compression
        if compression.mode == "mixed":
            from builder.stages.analyze import probe_stage  # imports torch: only for mixed-bit recipes

            model = job.source.inputs.get("model") or job.source.external["model"]
            self.stages.append(
                probe_stage(
                    rewritten=rewrite,
                    model=model,
                    memory_estimate_bytes=memory,
                    family=self.recipe.family.value,
                    component=c,
                    text_encoders=self._workload_text_encoders(job.recipe_component),
                )
            )
        chunked = self.recipe.chunk_unet and job.recipe_component in CHUNKED_BY_CHUNK_UNET
        first: _Chain | None = None
        for chunk in (1, 2) if chunked else (None,):
            first = self._chain(c, rewrite, compression, chunk, first, memory)
        if chunked:
            self.chunked.append(c)
        if compression.mode == "mixed":
            written = os.path.relpath(compression.recipe, self.loaded.path.parent)
            self.components[c] = ShippedMixedPalettize(
                mode="mixed",
                recipe=written,
                weight_threshold=compression.weight_threshold,
                minimum_psnr_db=compression.minimum_psnr_db,
            )
        else:
            self.components[c] = compression

    def _workload_text_encoders(self, component: str) -> dict[str, str]:
        """The base UNet's workloads (mixed-bit probe, W8A8 calibration) encode prompts with the text
        encoders the bundle ships: where a LoRA changed one, its rewrite (text encoder jobs come first)."""
        return fused_text_encoders(self.stages) if component == Component.UNET.value else {}

    def _settings(self) -> dict[str, tuple[Any, str]]:
        """Recipe settings a rewrite may depend on: value and the field it came from."""
        recipe = self.recipe
        size_field = "latent_size" if recipe.written_latent_size else "image_size"
        return {
            "family": (recipe.family.value, "family"),
            "attention": (recipe.attention.value, "attention"),
            "latent_size": (tuple(recipe.latent_size), size_field),
            "batch_size": (recipe.unet_batch_size, "unet_batch_size"),
        }

    def _chain(
        self, c: str, rewrite: str, compression: Compression, chunk: int | None, first: _Chain | None, memory: int
    ) -> _Chain:
        """One chunk's stages (or the whole component's, for chunk None). A chunked UNet's rewrite is
        shared; chunk 2's stages read chunk 1's: its trace takes chunk 1's hand-over, its verify chunk 1's."""
        label = f"{c}.chunk{chunk}" if chunk else c
        chunk_origins = {"chunk": "chunk_unet"} if chunk else {}
        if chunk:
            inputs = {"rewritten": rewrite} | ({"first": first.trace} if first else {})
            trace = self.add(
                "chunk", label, ChunkParams(component=c, chunk=chunk), chunk_origins, inputs, memory=memory
            )
        else:
            trace = self.add("trace", label, TraceParams(component=c), {}, {"rewritten": rewrite}, memory=memory)
        convert = ConvertParams(
            component=c,
            chunk=chunk,
            deployment_target=self.recipe.deployment_target.value,
            precision=self.precisions[c],
        )
        origins = {"deployment_target": "deployment_target", "precision": "family"} | chunk_origins
        verified: str | None
        if compression.mode == "w8a8":  # converted from its quantized torch model, not from the trace
            final, verified = self._w8a8(label, compression, rewrite, memory)
        else:
            converted = self.add(
                "convert", label, convert, origins, {"traced": trace, "rewritten": rewrite}, memory=memory
            )
            final, verified = self._compress(label, compression, chunk, rewrite, trace, converted, first, memory)
        compiled = self.add(
            "compile",
            label,
            CompileParams(),
            {},
            {"model": final},
            memory=memory,
            tools=self.compile_tools,
            unavailable=self.unavailable,
            resources={"macos": 1},  # the Core ML compiler comes with Xcode
        )
        self.bundle_inputs |= {f"model.{label}": final, f"compiled.{label}": compiled, f"check.{label}": trace}
        if verified is not None:
            self.bundle_inputs[f"verify.{label}"] = verified
        return _Chain(trace, final, verified)

    def _compress(
        self,
        label: str,
        compression: Compression,
        chunk: int | None,
        rewrite: str,
        trace: str,
        converted: str,
        first: _Chain | None,
        memory: int,
    ) -> tuple[str, str | None]:
        """The compression stage and its verify, if any: (the model shipped, the verify stage)."""
        field = f"components.{label.split('.')[0]}.compression"
        chunk_origins = {"chunk": "chunk_unet"} if chunk else {}
        # A floor for the read-back PSNR, set only when the recipe has one (so other builds keep their keys).
        floor = getattr(compression, "minimum_psnr_db", None)
        floors = {"minimum_psnr_db": floor} if floor is not None else {}
        verify_origins = chunk_origins | ({"minimum_psnr_db": f"{field}.minimum_psnr_db"} if floors else {})
        verify_inputs = {"rewritten": rewrite, "float16": converted} | ({"traced": trace} if chunk else {})
        verify_inputs |= {"handover": first.verify} if first and first.verify else {}
        if compression.mode == "float16":
            return converted, None
        if compression.mode in ("quantize", "palettize"):
            written = compression.model_dump(mode="json", exclude={"mode", "minimum_psnr_db"})
            origins = {name: f"{field}.{name}" for name in written}
            model = QuantizeParams if compression.mode == "quantize" else PalettizeOptions
            final = self.add(
                compression.mode, label, model.model_validate(written), origins, {"model": converted}, memory=memory
            )
            verify = VerifyParams(chunk=chunk, **floors)
            return final, self.add(
                "verify", label, verify, verify_origins, verify_inputs | {"model": final}, memory=memory
            )
        # mixed: per-layer widths from the recipe file; the analysis workload runs the whole UNet, so it
        # is scored unchunked, or at chunk 2 with both chunks.
        assert isinstance(compression, MixedPalettize)  # w8a8 never comes here (see _chain)
        mixed = MixedPalettizeParams(weight_threshold=compression.weight_threshold, chunk=chunk)
        origins = {"mbp_recipe": f"{field}.recipe", "weight_threshold": f"{field}.weight_threshold"} | chunk_origins
        recipe_file = {"mbp_recipe": compression.recipe}
        inputs = {"model": converted, "rewritten": rewrite}
        final = self.add("palettize", label, mixed, origins, inputs, memory=memory, external=recipe_file)
        scored = chunk != 1
        verify_inputs |= {"probe": f"analyze-inputs:{label.split('.')[0]}"} if scored else {}
        verify_inputs |= {"first": first.final} if first else {}
        verify_inputs |= {"model": final}
        external = recipe_file if scored else {}
        verify = VerifyParams(chunk=chunk, **floors)
        verified = self.add("verify", label, verify, verify_origins, verify_inputs, memory=memory, external=external)
        return final, verified

    def _w8a8(self, label: str, compression: Any, rewrite: str, memory: int) -> tuple[str, str]:
        """A W8A8 UNet's stages (builder/stages/w8a8.py): (the model shipped, its verify stage)."""
        from builder.stages.w8a8 import w8a8_stages

        rewritten = next(spec for spec in self.stages if spec.id == rewrite)
        stages, final, verified = w8a8_stages(
            component=label,
            settings=compression,
            family=self.recipe.family.value,
            deployment_target=self.recipe.deployment_target.value,
            rewritten=rewrite,
            model=rewritten.inputs.get("model") or rewritten.external_inputs["model"],  # the pipeline folder
            memory_estimate_bytes=memory,
            text_encoders=self._workload_text_encoders(label),
        )
        self.stages += stages
        return final, verified

    def bundle(self, pipeline: _Source) -> None:
        """Resources and the manifest, from every model, the sources' provenance and the tokenizer."""
        recipe = self.recipe
        provenance = sources_provenance(self.loaded)
        self.stages += provenance.stages
        for described, lora in zip(provenance.params["loras"], self.loras, strict=True):
            described["components"] = [c for c in lora.components if c in self.components]
        params = BundleParams(
            name=recipe.name,
            version=recipe.version,
            recipe_digest=self.loaded.digest,
            family=recipe.family.value,
            latent_size=recipe.latent_size,
            unet_batch_size=recipe.unet_batch_size,
            attention=recipe.attention.value,
            compute_unit=recipe.compute_unit.value,
            deployment_target=recipe.deployment_target.value,
            components=self.components,
            chunked=self.chunked,
            precision=self.precisions,
            tools=recorded_tools() | self.compile_tools,
            sdbuild_version=__version__,
            recipe=recipe_record(self.loaded),
            sdbuild=sdbuild_info(),
            sources=provenance.params,
            environment=environment(),
            date=build_date(),
            variant=vars(self.loaded.variant) if self.loaded.variant is not None else None,
        )
        self.stages.append(
            StageSpec(
                id="bundle",
                stage="bundle",
                function="builder.stages.bundle:run",
                # A bundle outside a matrix keeps the key it had before variants existed.
                params=params.model_dump(mode="json", exclude={"variant"} if params.variant is None else None),
                param_origins={"name": "name", "version": "version", "compute_unit": "compute_unit"},
                inputs=self.bundle_inputs | provenance.inputs | ({"tokenizer": "source"} if pipeline.inputs else {}),
                external_inputs={"tokenizer": pipeline.external["model"]} if pipeline.external else {},
                memory_estimate_bytes=1 * GIB,
                parallel=False,
            )
        )
