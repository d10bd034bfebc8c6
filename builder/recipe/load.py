"""Load a recipe file: read it and the bases it extends, merge, validate, locate every error."""

from __future__ import annotations

import difflib
import hashlib
from dataclasses import dataclass
from pathlib import Path

from pydantic import ValidationError

from ..errors import RecipeError, RecipeErrors
from .document import Document, merge, parse_dotted
from .matrix import MATRIX, VARIANT_NAME, Variant, declares_matrix, expand
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
    variant: Variant | None = None
    """The matrix variant this recipe is, when its file declares a matrix."""

    @property
    def target(self) -> str:
        """The name its cache index goes by: the recipe's name, `<name>.<variant>` for a variant
        (names have no '.', so the two never collide)."""
        return self.recipe.name if self.variant is None else f"{self.recipe.name}.{self.variant.name}"

    @property
    def label(self) -> str:
        """How it is named to the user: `<name>` or `<name>/<variant>`."""
        return self.recipe.name if self.variant is None else f"{self.recipe.name}/{self.variant.name}"

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
    the current directory). Raises RecipeError or RecipeErrors; a matrix recipe is refused here
    (`load_recipes` expands it), since the commands taking one recipe build one bundle."""
    workspace = (workspace or Path.cwd()).resolve()
    file, document, files = _read(path, workspace)
    if declares_matrix(document):
        field = MATRIX if MATRIX in document.data else VARIANT_NAME
        origin = document.origin((field,))
        raise RecipeError(
            origin.file,
            "this recipe declares a matrix of variants, and this command takes a single bundle",
            line=origin.line,
            field=field,
            hint=f"build its variants with `sdbuild build {path}`, see them with `sdbuild status {path}`",
        )
    return _validated(document, file, files, workspace, None)


def load_recipes(path: Path, workspace: Path | None = None) -> list[LoadedRecipe]:
    """Every recipe `path` stands for: a folder's `*.yaml` files (not its subfolders, which hold
    other files such as mixed-bit recipes), each file as itself or, with a matrix, as its
    variants. Problems in several files are reported together."""
    workspace = (workspace or Path.cwd()).resolve()
    path = Path(path)
    files = sorted(p for p in path.iterdir() if p.suffix in (".yaml", ".yml") and p.is_file()) if path.is_dir() else []
    if path.is_dir() and not files:
        raise RecipeError(
            str(path), "the folder holds no recipes (*.yaml)", hint="name a recipe file or a folder of them"
        )
    loaded: list[LoadedRecipe] = []
    errors: list[RecipeError] = []
    for each in files or [path]:
        try:
            loaded += _load_variants(each, workspace)
        except RecipeErrors as found:
            errors += found.errors
        except RecipeError as found:
            errors.append(found)
    if errors:
        raise errors[0] if len(errors) == 1 else RecipeErrors(errors)
    return loaded


def _load_variants(path: Path, workspace: Path) -> list[LoadedRecipe]:
    """The recipe in `path`, or every variant of its matrix; a problem shared by several variants
    (one bad list item) is reported once."""
    file, document, files = _read(path, workspace)
    if not declares_matrix(document):
        return [_validated(document, file, files, workspace, None)]
    loaded: list[LoadedRecipe] = []
    errors: dict[tuple[str, int | None, str | None, str], RecipeError] = {}
    for variant, variant_document in expand(document):
        try:
            loaded.append(_validated(variant_document, file, files, workspace, variant))
        except (RecipeError, RecipeErrors) as found:
            for error in found.errors if isinstance(found, RecipeErrors) else [found]:
                errors.setdefault((error.file, error.line, error.field, error.message), error)
    if errors:
        found_errors = sorted(errors.values(), key=lambda e: (e.file, e.line or 0))
        raise found_errors[0] if len(found_errors) == 1 else RecipeErrors(found_errors)
    return loaded


def _read(path: Path, workspace: Path) -> tuple[Path, Document, tuple[Path, ...]]:
    """The recipe file (resolved, inside the workspace), its document merged over its bases, and
    the files read."""
    try:
        file = resolve(Path(path))
    except UnresolvablePath as problem:
        raise RecipeError(str(path), str(problem), hint="point at the recipe file itself") from None
    for violation in confinement(path, file, workspace):
        raise RecipeError(_shown(file, workspace), violation.message, hint=violation.hint)
    if not file.is_file():
        raise RecipeError(_shown(file, workspace), "recipe file not found", hint=_available(file))
    document, files = _read_with_bases(file, workspace, ())
    return file, document, files


def _validated(
    document: Document, file: Path, files: tuple[Path, ...], workspace: Path, variant: Variant | None
) -> LoadedRecipe:
    try:
        recipe = Recipe.model_validate(document.data, context={"workspace": workspace})
    except ValidationError as error:
        raise translate(error, document, Recipe) from None
    digest = hashlib.sha256(recipe.canonical_json().encode()).hexdigest()
    return LoadedRecipe(recipe, file, files, digest, document, workspace, variant)


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
