"""Provenance of the model sources for the manifest: what each one is (hub id and revision, local path
as written, synthetic preset and seed) and, for files, the sha256 of every file the build read.

The digests come from a `provenance:<source>` stage per hub or local source, so multi-gigabyte
weights are hashed once per source content, not at every bundle; its key is the source's content.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, NamedTuple

from builder.engine.hashing import digest_folder, sha256_file, tree_digest
from builder.engine.spec import GIB, StageSpec
from builder.recipe import LoadedRecipe
from builder.sd.contract import controlnet_name
from builder.stages.params import LORA_FILE

# The stage ids that materialise hub sources (builder/stages/pipeline.py); local sources are read in place.
_HUB_SOURCE_STAGES = {"model": "source", "refiner": "source-refiner", "vae": "source-vae"}


class SourcesProvenance(NamedTuple):
    stages: list[StageSpec]
    inputs: dict[str, str]  # bundle input name -> provenance stage id
    params: dict[str, Any]  # the manifest's `sources` as far as the recipe tells it


def run(inputs: dict[str, Path], params: dict, out: Path) -> dict:
    """sha256 of every file of the source (a folder, or one checkpoint file named `params["file"]`)."""
    source = inputs["source"]
    if source.is_file():
        digest = sha256_file(source)
        files = {params["file"]: digest}
    else:
        found = digest_folder(source.resolve(), None, follow_symlinks=True)
        digest = tree_digest(found)
        files = {relative: entry.sha256 for relative, entry in sorted(found.items())}
    (out / "provenance.json").write_text(json.dumps({"digest": digest, "files": files}, indent=2, sort_keys=True))
    return {"files": len(files)}


def sources_provenance(loaded: LoadedRecipe) -> SourcesProvenance:
    """The provenance stages of the recipe's sources, the bundle inputs they feed and the sources'
    manifest entries (without the digests the stages add)."""
    model = loaded.recipe.model
    stages: list[StageSpec] = []
    inputs: dict[str, str] = {}

    def entry(label: str, field: str, source: Any, hub_stage: str) -> dict[str, Any]:
        if getattr(source, "synthetic", None) is not None:
            return {"kind": "synthetic", "preset": source.synthetic.preset, "seed": source.synthetic.seed}
        if source.hub is not None:
            described = {"kind": "hub", "id": source.hub.id, "revision": source.hub.revision}
            upstream, external, params = {"source": hub_stage}, {}, {}
        else:
            path = source.local.path
            described = {"kind": "local", "path": str(_as_written(loaded, f"{field}.local.path"))}
            upstream, external = {}, {"source": path}
            params = {"file": path.name} if path.is_file() else {}
        stage_id = f"provenance:{label}"
        stages.append(
            StageSpec(
                id=stage_id,
                stage="provenance",
                component=label,
                function="builder.stages.provenance:run",
                params=params,
                param_origins={"file": f"{field}.local.path"} if params else {},
                inputs=upstream,
                external_inputs=external,
                memory_estimate_bytes=GIB,
            )
        )
        inputs[f"provenance.{label}"] = stage_id
        return described

    sources: dict[str, Any] = {"model": entry("model", "model", model, _HUB_SOURCE_STAGES["model"])}
    for name in ("refiner", "vae"):
        source = getattr(model, name)
        sources[name] = None if source is None else entry(name, f"model.{name}", source, _HUB_SOURCE_STAGES[name])
    sources["controlnets"] = []
    for index, source in enumerate(model.controlnets):
        name = controlnet_name(source)
        described = entry(f"controlnet.{name}", f"model.controlnets.{index}", source, f"source:controlnet.{name}")
        sources["controlnets"].append(described | {"name": name})
    sources["loras"] = []
    for index, lora in enumerate(model.loras):
        described = entry(f"lora.{index}", f"model.loras.{index}", lora, f"source:lora.{index}")
        hub = {"weight_name": lora.hub.weight_name} if lora.hub is not None else {}
        sources["loras"].append(described | hub | {"scale": lora.scale})
    return SourcesProvenance(stages, inputs, sources)


def _as_written(loaded: LoadedRecipe, field: str) -> object:
    """The value of a dotted recipe field as the recipe file wrote it (a local path before resolving)."""
    value: Any = loaded.document.data
    for part in field.split("."):
        value = value[int(part)] if isinstance(value, list) else value[part]
    return value


def with_digests(sources: dict[str, Any], inputs: dict[str, Path]) -> dict[str, Any]:
    """The bundle's view: each hub or local source entry completed from its provenance stage's output."""

    def complete(label: str, described: dict[str, Any] | None) -> dict[str, Any] | None:
        if described is None or described["kind"] == "synthetic":
            return described
        found = json.loads((inputs[f"provenance.{label}"] / "provenance.json").read_text())
        digest = {"digest": found["digest"]} if described["kind"] == "local" else {}
        return described | digest | {"files": found["files"]}

    return {
        "model": complete("model", sources["model"]),
        "refiner": complete("refiner", sources["refiner"]),
        "vae": complete("vae", sources["vae"]),
        "controlnets": [complete(f"controlnet.{c['name']}", c) for c in sources["controlnets"]],
        "loras": [_lora_files(complete(f"lora.{i}", lora)) for i, lora in enumerate(sources.get("loras", []))],
    }


def _lora_files(described: dict[str, Any] | None) -> dict[str, Any] | None:
    """A hub LoRA's source stage holds its file as LORA_FILE: the manifest names it as the repository does."""
    if described is None or described["kind"] != "hub":
        return described
    return described | {"files": {described["weight_name"]: described["files"][LORA_FILE]}}
