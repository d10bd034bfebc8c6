"""Load a recipe file: read it and the bases it extends, merge, validate, locate every error."""

from __future__ import annotations

import difflib
import hashlib
from dataclasses import dataclass
from pathlib import Path

from pydantic import ValidationError

from ..errors import RecipeError
from .document import Document, merge, parse_dotted
from .model import Recipe
from .paths import UnresolvablePath, confinement, resolve
from .translate import translate
from .yaml_read import read_document

EXTENDS = "extends"


@dataclass(frozen=True)
class LoadedRecipe:
    """A validated recipe and where it came from."""

    recipe: Recipe
    path: Path
    """The recipe file, absolute with symlinks resolved."""
    files: tuple[Path, ...]
    """Every file read: the recipe first, then the bases it extends."""
    digest: str
    """sha256 of the recipe's canonical JSON: formatting and comments do not change it."""
    document: Document
    """The merged data as written, with the origin of every value."""
    workspace: Path
    """The workspace every path it names is confined to, absolute."""

    def origin(self, field_path: str) -> str:
        """`file:line` where the dotted field (e.g. `components.unet.compression`) was written, or
        where its nearest written parent was when the value is a default."""
        return str(self.document.origin(parse_dotted(field_path)))

    def error(self, field_path: str, message: str, hint: str | None = None) -> RecipeError:
        """A RecipeError located where the dotted field (or its nearest written parent) was written."""
        written = self.document.origin(parse_dotted(field_path))
        return RecipeError(written.file, message, line=written.line, field=field_path, hint=hint)


def load_recipe(path: Path, workspace: Path | None = None) -> LoadedRecipe:
    """Load and validate `path`; every local path it names must stay inside `workspace` (default:
    the current directory). Raises RecipeError or RecipeErrors."""
    workspace = (workspace or Path.cwd()).resolve()
    try:
        file = resolve(Path(path))
    except UnresolvablePath as problem:
        raise RecipeError(str(path), str(problem), hint="point at the recipe file itself") from None
    for violation in confinement(path, file, workspace):
        raise RecipeError(_shown(file, workspace), violation.message, hint=violation.hint)
    if not file.is_file():
        raise RecipeError(_shown(file, workspace), "recipe file not found", hint=_available(file))
    document, files = _read_with_bases(file, workspace, ())
    try:
        recipe = Recipe.model_validate(document.data, context={"workspace": workspace})
    except ValidationError as error:
        raise translate(error, document, Recipe) from None
    digest = hashlib.sha256(recipe.canonical_json().encode()).hexdigest()
    return LoadedRecipe(recipe, file, files, digest, document, workspace)


def _read_with_bases(file: Path, workspace: Path, chain: tuple[Path, ...]) -> tuple[Document, tuple[Path, ...]]:
    """The file's document merged over the bases it extends, and the files read, child first."""
    document = read_document(file, _shown(file, workspace))
    if EXTENDS not in document.data:
        return document, (file,)
    base_file = _base_file(document, file, workspace, (*chain, file))
    base, files = _read_with_bases(base_file, workspace, (*chain, file))
    return merge(base, document.without(EXTENDS)), (file, *files)


def _base_file(document: Document, file: Path, workspace: Path, chain: tuple[Path, ...]) -> Path:
    value = document.data[EXTENDS]
    origin = document.origin((EXTENDS,))

    def error(message: str, hint: str) -> RecipeError:
        return RecipeError(origin.file, message, line=origin.line, field=EXTENDS, hint=hint)

    if not isinstance(value, str) or not value:
        raise error(
            "extends takes the file name of one base recipe", "write `extends: base.yaml` (relative to this file)"
        )
    try:
        base = resolve(file.parent / value)
    except UnresolvablePath as problem:
        raise error(str(problem), "write the path of the base recipe file, relative to this file") from None
    for violation in confinement(value, base, workspace):
        raise error(violation.message, violation.hint)
    if base in chain:
        loop = " -> ".join(_shown(f, workspace) for f in (*chain[chain.index(base) :], base))
        raise error(f"recipes extend each other in a loop: {loop}", "remove the `extends:` that closes the loop")
    if not base.is_file():
        raise error(f"base recipe '{value}' not found (looked for {base})", _available(base))
    return base


def _shown(file: Path, workspace: Path) -> str:
    """How a file is named in messages: relative to the workspace when inside it."""
    return str(file.relative_to(workspace)) if file.is_relative_to(workspace) else str(file)


def _available(file: Path) -> str:
    """A fix for a missing recipe: the closest name, and the recipes that exist beside it."""
    folder = file.parent
    if not folder.is_dir():
        return f"the folder {folder} does not exist; check the path"
    names = sorted(p.name for p in folder.iterdir() if p.suffix in (".yaml", ".yml") and p.is_file())
    if not names:
        return f"there are no recipes (*.yaml) in {folder}; check the path"
    stems = {Path(name).stem: name for name in names}
    close = difflib.get_close_matches(file.stem, stems, n=1)
    listing = f"recipes in {folder}: {', '.join(names)}"
    return f"did you mean '{stems[close[0]]}'? {listing}" if close else listing
