"""Several recipes (a folder, a matrix's variants) as one stage graph.

Each recipe's stages keep their own ids under the prefix `<target>/`; nothing is merged here. Stages
of different recipes with equal cache keys (the source, the text encoder and VAE of every variant
that shares their settings) run once, because the engine runs one key once however many ids have it
and lets the others hit.
"""

from __future__ import annotations

from builder.engine.spec import Graph, StageSpec
from builder.errors import RecipeError, RecipeErrors
from builder.recipe import LoadedRecipe
from builder.stages.pipeline import build_graph

SEPARATOR = "/"
"""Between a recipe's target and its stage id; targets never hold it."""


def set_graph(members: list[LoadedRecipe]) -> tuple[Graph, dict[str, Graph]]:
    """The combined graph, and each member's own graph by target (the ids the member's index and
    `plan` use). Every member's problems are reported together."""
    own: dict[str, Graph] = {}
    errors: list[RecipeError] = []
    for loaded in members:
        try:
            own[loaded.target] = build_graph(loaded)
        except RecipeErrors as found:
            errors += found.errors
        except RecipeError as found:
            errors.append(found)
    if errors:
        raise errors[0] if len(errors) == 1 else RecipeErrors(errors)
    combined = Graph(_prefixed(target, spec) for target, graph in own.items() for spec in graph)
    return combined, own


def member_id(target: str, stage_id: str) -> str:
    return f"{target}{SEPARATOR}{stage_id}"


def split_id(combined_id: str) -> tuple[str, str]:
    """(target, the member's own stage id) of a combined id."""
    target, _, stage_id = combined_id.partition(SEPARATOR)
    return target, stage_id


def _prefixed(target: str, spec: StageSpec) -> StageSpec:
    inputs = {name: member_id(target, upstream) for name, upstream in spec.inputs.items()}
    return spec.model_copy(update={"id": member_id(target, spec.id), "inputs": inputs})
