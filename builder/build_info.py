"""What made a bundle, for its manifest: the recipe files as written, the sdbuild code, the Python
environment, and a date only when the builder asks for one (`SOURCE_DATE_EPOCH`).

Everything here is read in the building process and becomes part of the bundle stage's params, so
a change to any of it rebuilds the manifest, and equal inputs give byte-identical manifests.
"""

from __future__ import annotations

import os
import platform
import subprocess
from datetime import UTC, datetime
from functools import cache
from pathlib import Path

from builder import __version__
from builder.errors import UserError
from builder.recipe import LoadedRecipe

DISTRIBUTION = "sdbuild"


def recipe_record(loaded: LoadedRecipe) -> dict:
    """The recipe as written, the bases it extends and the other files it reads (mixed-bit recipe
    files), each with its path relative to the workspace: enough to rebuild it from the manifest."""
    recipe, *bases = loaded.files
    includes = sorted(
        {
            settings.compression.recipe
            for settings in loaded.recipe.components.enabled().values()
            if settings.compression.mode == "mixed"
        }
    )
    return {
        "path": _relative(recipe, loaded.workspace),
        "digest": loaded.digest,
        "text": recipe.read_text(encoding="utf-8"),
        "extends": [_file(base, loaded.workspace) for base in bases],
        "includes": [_file(path, loaded.workspace) for path in includes],
    }


def _relative(path: Path, workspace: Path) -> str:
    return Path(os.path.relpath(path, workspace)).as_posix()


def _file(path: Path, workspace: Path) -> dict:
    return {"path": _relative(path, workspace), "text": path.read_text(encoding="utf-8")}


@cache
def sdbuild_info() -> dict:
    """The package version, and the git commit of the checkout it runs from (None when installed
    from a package). The commit is the same in every clone of it; `dirty` says tracked files differ
    from it (untracked files such as caches and artifacts do not count)."""
    root = Path(__file__).resolve().parents[1]
    commit, dirty = None, False
    if (root / ".git").exists():
        head = _git(root, "rev-parse", "HEAD")
        if head is not None and len(head) == 40:
            commit = head
            dirty = bool(_git(root, "status", "--porcelain", "--untracked-files=no"))
    return {"version": __version__, "commit": commit, "dirty": dirty}


def _git(root: Path, *args: str) -> str | None:
    try:
        done = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, check=False)
    except OSError:  # no git on this machine
        return None
    return done.stdout.strip() if done.returncode == 0 else None


@cache
def environment() -> dict:
    """The Python version and the exact installed version of every distribution sdbuild depends on,
    transitively (its declared runtime requirements, markers evaluated, no extras).

    Not the whole environment: test and lint tools, or anything else installed beside, neither shape
    a bundle nor should make two otherwise identical manifests differ.
    """
    from importlib import metadata

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    copies = list(metadata.distributions(name=DISTRIBUTION))
    if not copies:
        raise UserError(
            "sdbuild runs without being installed, so its dependencies cannot be listed in the manifest",
            hint="install it: `make setup` (or `pip install -e .` in the checkout)",
        )
    if len({tuple(sorted(copy.requires or ())) for copy in copies}) > 1:
        # which one is read depends on the import path (the checkout is on it under pytest or
        # `python -m`), so the manifest, and the bundle's key, would too
        where = ", ".join(sorted(str(copy.locate_file("")) for copy in copies))
        raise UserError(
            f"sdbuild's package metadata is found {len(copies)} times on the import path ({where}), "
            "declaring different dependencies",
            hint="remove the stale copy, usually a `sdbuild.egg-info` folder an older install left in the "
            "checkout (`rm -rf sdbuild.egg-info`), then run `make setup`",
        )
    packages: dict[str, str] = {}
    pending = [DISTRIBUTION]
    while pending:
        name = canonicalize_name(pending.pop())
        if name in packages:
            continue
        try:
            found = metadata.distribution(name).metadata  # parsed once: it is most of this function's time
        except metadata.PackageNotFoundError:
            continue  # a requirement this platform's markers need but nothing installed provides
        packages[name] = found["Version"]
        for line in found.get_all("Requires-Dist") or []:
            requirement = Requirement(line)
            if requirement.marker is None or requirement.marker.evaluate({"extra": ""}):
                pending.append(requirement.name)
    del packages[DISTRIBUTION]  # its version is the manifest's sdbuild.version
    return {"python": platform.python_version(), "packages": dict(sorted(packages.items()))}


def build_date() -> str | None:
    """`SOURCE_DATE_EPOCH` as an ISO 8601 UTC time, or None: manifests carry no date unless asked."""
    value = os.environ.get("SOURCE_DATE_EPOCH")
    if value is None or value == "":
        return None
    try:
        moment = datetime.fromtimestamp(int(value), UTC)
    except (ValueError, OverflowError, OSError):
        raise UserError(
            f"SOURCE_DATE_EPOCH={value!r} is not a number of seconds since 1970-01-01 UTC",
            hint="set it to an integer, e.g. `export SOURCE_DATE_EPOCH=$(git log -1 --format=%ct)`, or unset it",
        ) from None
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")
