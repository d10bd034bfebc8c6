"""Every recipe shipped in recipes/ validates and plans, so `make <recipe>` never fails on the recipe itself."""

from __future__ import annotations

from pathlib import Path

import pytest

from builder.recipe import load_recipes
from builder.stages.pipeline import build_graph

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted((ROOT / "recipes").glob("*.yaml"))


def test_the_recipes_exist() -> None:
    assert {"tiny-sd", "sd-1-5", "sd-2-1-base-ios", "sd-2-1-base-macos"} <= {r.stem for r in RECIPES}


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_recipe_plans(path: Path) -> None:
    for loaded in load_recipes(path, workspace=ROOT):  # a matrix recipe: each of its variants
        assert loaded.recipe.name == path.stem, "the Makefile target and the bundle folder share the recipe's name"
        stages = build_graph(loaded).order()
        assert {s.stage for s in stages} >= {"rewrite", "trace", "convert", "bundle"}
        hub = loaded.recipe.model.hub
        if hub is not None:
            assert len(hub.revision) == 40, "shipped hub recipes are pinned to a commit"
