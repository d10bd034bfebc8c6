"""Who owns `artifacts/<name>/<version>/`: the recipe file that first published it.

Two recipes that happen to share a name and version would otherwise replace each other's bundle
without a word. Each published folder carries OWNER_FILE (the recipe's workspace-relative path and
digest); another recipe with other content may claim the folder only with `--overwrite`. The same
recipe file, edited, republishes freely: that is the normal edit-and-rebuild loop.
"""

from __future__ import annotations

import json
from pathlib import Path

from builder.recipe import LoadedRecipe

OWNER_FILE = ".sdbuild-owner.json"


def owner_record(loaded: LoadedRecipe, workspace: Path) -> bytes:
    """The bytes of OWNER_FILE for a bundle `loaded` publishes."""
    record = {"recipe": loaded.path.relative_to(workspace).as_posix(), "recipe_digest": loaded.digest}
    return json.dumps(record, indent=1, sort_keys=True).encode()


def _read(path: Path) -> dict:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def check_claim(dest: Path, loaded: LoadedRecipe, workspace: Path, *, overwrite: bool) -> None:
    """Refuse to publish `loaded` over a bundle another recipe with other content published."""
    if overwrite or not (dest / "manifest.json").is_file():
        return
    digest = _read(dest / "manifest.json").get("recipe_digest")
    owner = _read(dest / OWNER_FILE).get("recipe")
    mine = loaded.path.relative_to(workspace).as_posix()
    if digest == loaded.digest or owner is None or owner == mine:
        return  # same content, a bundle from before owners were recorded, or this recipe edited
    raise loaded.error(
        "version",
        f"{dest.relative_to(workspace)}/ holds the bundle of {owner} (recipe digest {str(digest)[:12]}), "
        f"a different recipe with the same name and version",
        hint="give this recipe its own name or version, or pass --overwrite to replace that bundle",
    )


def bundle_folder(artifacts: Path, loaded: LoadedRecipe) -> Path:
    """Where `loaded` is published: artifacts/<name>/<version>/, and a matrix variant in its own
    folder below that."""
    folder = artifacts / loaded.recipe.name / loaded.recipe.version
    return folder if loaded.variant is None else folder / loaded.variant.name
