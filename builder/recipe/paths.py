"""Local paths in a recipe: resolved against the file that wrote them, confined to the workspace."""

from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import Annotated

from pydantic import BeforeValidator, ValidationInfo

from .local_folder import folder_violations
from .violations import Violation, reject


class WrittenIn(str):
    """A string read from a recipe file that remembers the file's folder, so a relative path
    written in a base recipe still resolves against the base when another recipe extends it."""

    folder: Path

    def __new__(cls, value: str, folder: Path) -> WrittenIn:
        text = super().__new__(cls, value)
        text.folder = folder
        return text


class UnresolvablePath(ValueError):
    """A path that cannot be followed to a file: a symlink loop, a name too long, no permission."""


def resolve(path: Path) -> Path:
    """`path` absolute with every symlink followed; a missing path resolves as far as it exists.

    Path.resolve raises RuntimeError for a symlink loop and lets the file system's errors through,
    so this says what went wrong in a form the callers report against the recipe line.
    """
    try:
        real = Path(os.path.realpath(path))
        os.stat(real)
    except FileNotFoundError:
        return real
    except OSError as problem:
        if problem.errno == errno.ENOTDIR:
            return real
        what: dict[int | None, str] = {
            errno.ELOOP: "symlinks point at each other in a loop",
            errno.ENAMETOOLONG: "the name is too long",
        }
        raise UnresolvablePath(
            f"'{path}' cannot be followed: {what.get(problem.errno, problem.strerror or str(problem))}"
        ) from None
    except (RuntimeError, ValueError) as problem:  # a NUL byte in the name, a loop on older Pythons
        raise UnresolvablePath(f"'{path}' cannot be followed: {problem}") from None
    return real


def resolve_written(value: str | Path, folder: Path) -> Path:
    """A path as written in a recipe, resolved against the folder of the file that wrote it; the
    empty string, which would silently name that folder, is refused."""
    if str(value).strip() == "":
        raise UnresolvablePath("the path is empty (it would name the folder of the recipe itself)")
    try:
        return resolve(folder / value)
    except UnresolvablePath as problem:
        raise UnresolvablePath(str(problem)) from None


def _unresolvable(problem: UnresolvablePath, folder: Path) -> Violation:
    return Violation(
        "",
        str(problem),
        f"write the path of an existing file or folder, relative to the recipe's folder ({folder}), "
        "without symlink loops",
    )


def confinement(value: str | Path, path: Path, workspace: Path | None) -> list[Violation]:
    """Why `path` (the resolved `value`) may not be used: builds only read what the workspace holds."""
    if workspace is None or path.is_relative_to(workspace):
        return []
    return [
        Violation(
            "",
            f"'{value}' resolves to {path}, outside the workspace {workspace} (symlinks are followed)",
            "move the files under the workspace and refer to them relative to the recipe file, "
            "or run sdbuild from a workspace that contains them",
        )
    ]


def confined_path(value: str | Path, info: ValidationInfo) -> tuple[Path, Path]:
    """A path as written in a recipe, resolved against the folder of the recipe that writes it, and
    that folder; rejected when it cannot be resolved or leads outside the workspace."""
    folder = value.folder if isinstance(value, WrittenIn) else Path.cwd()
    try:
        path = resolve_written(value, folder)
    except UnresolvablePath as problem:
        reject([_unresolvable(problem, folder)])
    reject(confinement(value, path, (info.context or {}).get("workspace")))
    return path, folder


def _local_model_path(value: object, info: ValidationInfo) -> object:
    if not isinstance(value, (str, Path)):
        return value  # pydantic's own Path validation reports the wrong type
    path, folder = confined_path(value, info)
    workspace = (info.context or {}).get("workspace")
    if not path.exists():
        reject(
            [
                Violation(
                    "",
                    f"'{value}' does not exist (looked for {path})",
                    "fix the path; a relative path is resolved against the folder of the recipe that writes it "
                    f"({folder})",
                )
            ]
        )
    if path.is_file() and path.suffix != ".safetensors":
        reject(
            [
                Violation(
                    "",
                    f"'{path.name}' is neither a diffusers folder nor a .safetensors file",
                    "point to a diffusers folder or a single-file .safetensors checkpoint "
                    "(pickled .ckpt files are not loaded)",
                )
            ]
        )
    if path.is_dir():
        reject(folder_violations(path, workspace))
    return path


LocalModelPath = Annotated[Path, BeforeValidator(_local_model_path)]
"""A diffusers folder or .safetensors file, stored as a resolved absolute path. Inside the
workspace given in the validation context as `workspace` (the loader always gives it)."""


def _recipe_file_path(value: object, info: ValidationInfo) -> object:
    if not isinstance(value, (str, Path)):
        return value
    path, folder = confined_path(value, info)
    if path.suffix not in (".yaml", ".yml") or not path.is_file():
        reject(
            [
                Violation(
                    "",
                    f"'{value}' is not a YAML file (looked for {path})",
                    f"point to a mixed-bit recipe file such as recipes/mbp/<name>.yaml, relative to {folder}",
                )
            ]
        )
    return path


MixedBitRecipePath = Annotated[Path, BeforeValidator(_recipe_file_path)]
"""A mixed-bit palettization recipe (YAML), resolved like LocalModelPath and confined to the workspace."""
