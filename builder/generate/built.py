"""The published bundle of a recipe and the cached stage outputs it was made from, only when current.

Generating from a stale bundle would show the previous recipe's images, so every stage of the
recipe's graph must be cached (a stage that cannot run here, like compile on Linux, is skipped) and
the published manifest must be the one the cached bundle stage wrote; otherwise the user is told to
build. The stage outputs give what the bundle alone does not: the pipeline folders (tokenizers,
scheduler config), the rewritten torch modules and the weight maps the verify stages recorded.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from builder.engine import Engine, Graph
from builder.engine.store import UnreadableRecord
from builder.errors import UserError
from builder.recipe import LoadedRecipe
from builder.sd.manifest import Manifest, ModelEntry


@dataclass(frozen=True)
class BuiltBundle:
    path: Path  # artifacts/<name>/<version>
    manifest: Manifest
    graph: Graph
    outputs: dict[str, Path]  # stage id -> its cached output folder (skipped stages have none)

    def resource(self, entry: ModelEntry) -> Path:
        return self.path / "Resources" / entry.path

    def stage_output(self, stage_id: str) -> Path | None:
        return self.outputs.get(stage_id)

    def pipeline(self, component: str) -> Path:
        """The diffusers folder `component` (a stage label: unet, unet_refiner, ...) was converted from."""
        spec = self.graph[f"rewrite:{component}"]
        upstream = spec.inputs.get("model")
        return self.outputs[upstream] if upstream is not None else spec.external_inputs["model"]


def _not_built(loaded: LoadedRecipe, why: str) -> UserError:
    return UserError(
        f"{loaded.path.name}: {why}",
        hint=f"run `sdbuild build {loaded.path.as_posix()}` first; generate runs the bundle as built",
    )


def locate(loaded: LoadedRecipe, graph: Graph, engine: Engine, artifacts: Path) -> BuiltBundle:
    """The bundle `loaded` publishes, or a UserError saying to build it (not built, stale, unpublished)."""
    entries = engine.plan(graph)
    stale = [entry.id for entry in entries if entry.status == "stale"]
    if stale:
        shown = ", ".join(stale[:4]) + (f" and {len(stale) - 4} more" if len(stale) > 4 else "")
        raise _not_built(loaded, f"the bundle is not built or is stale ({len(stale)} stage(s) to run: {shown})")
    outputs: dict[str, Path] = {}
    for entry in entries:
        if entry.status != "cached" or entry.key is None:
            continue
        try:
            record = engine.store.load_record(entry.key)
        except UnreadableRecord:
            record = None
        if record is None:
            raise _not_built(loaded, f"the cache lost stage {entry.id}")
        outputs[entry.id] = engine.output_path(record.output_digest)
    bundle = artifacts / loaded.recipe.name / loaded.recipe.version
    published = bundle / "manifest.json"
    built = outputs["bundle"] / "manifest.json"
    if not published.is_file() or published.read_bytes() != built.read_bytes():
        raise _not_built(loaded, f"{bundle} is not the bundle this recipe builds now")
    return BuiltBundle(bundle, Manifest.model_validate_json(built.read_text()), graph, outputs)
