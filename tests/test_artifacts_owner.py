"""artifacts/<name>/<version>/ belongs to the recipe that published it: another recipe with the same
name and version is refused before anything runs (unless --overwrite); the owner, edited, is not."""

from __future__ import annotations

import json
import shutil

import pytest
from conftest import make_workspace

from builder.artifacts import OWNER_FILE


@pytest.fixture
def published(built, tmp_path):
    """A workspace holding the default recipe's published bundle (and sharing its cache, read only)."""
    reference, _ = built
    ws = make_workspace(tmp_path / "ws")
    shutil.copytree(reference.root / "artifacts", ws.root / "artifacts", symlinks=True)
    ws.cache = reference.cache
    return ws


def test_the_published_bundle_records_its_recipe(built):
    ws, _ = built
    owner = json.loads((ws.root / "artifacts" / "tiny-sd" / "0.1.0" / OWNER_FILE).read_text())
    manifest = json.loads((ws.root / "artifacts" / "tiny-sd" / "0.1.0" / "manifest.json").read_text())
    assert owner == {"recipe": "recipes/tiny-sd.yaml", "recipe_digest": manifest["recipe_digest"]}


def test_another_recipe_claiming_the_same_version_is_refused(published):
    recipe = published.root / "recipes" / "other.yaml"
    recipe.write_text((published.root / "recipes" / "tiny-sd.yaml").read_text().replace("nbits: 6", "nbits: 4"))
    for command in ("plan", "build"):
        done = published.run(command, "recipes/other.yaml")
        assert done.returncode == 2 and "Traceback" not in done.stderr
        message = " ".join(done.stderr.split())
        assert "error: recipes/other.yaml:" in message and ": version: " in message
        assert "holds the bundle of recipes/tiny-sd.yaml" in message and "--overwrite" in message
    assert published.run("plan", "recipes/other.yaml", "--overwrite").returncode == 0


def test_the_owner_edited_and_an_identical_copy_may_publish(published):
    tiny = published.root / "recipes" / "tiny-sd.yaml"
    (published.root / "recipes" / "copy.yaml").write_text(tiny.read_text())
    assert published.run("plan", "recipes/copy.yaml").returncode == 0  # same content, same digest
    tiny.write_text(tiny.read_text().replace("nbits: 6", "nbits: 4"))
    assert published.run("plan", "recipes/tiny-sd.yaml").returncode == 0
