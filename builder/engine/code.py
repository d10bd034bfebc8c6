"""What a stage's code is, for its cache key: every project module its function can reach through
imports, each by a digest of its normalised source, and the versions of the third-party
distributions those modules import.

Hand-kept stage versions depended on people remembering to bump them when a helper module changed;
this follows the imports instead. Imports are read from the source (every `import` statement,
function-level ones included, since stages import heavy libraries lazily), so nothing is executed.
A module's digest is of its syntax tree without docstrings, so comments, docstrings and formatting
do not count and any change to what the code does does. Third-party code is keyed by version, and
only what the stage's modules import directly: the lock pins the rest.
"""

from __future__ import annotations

import ast
import hashlib
import importlib.util
import sys
from dataclasses import dataclass
from functools import cache
from importlib import metadata
from pathlib import Path

_PROJECT_PACKAGES = ("builder",)  # besides the stage function's own top-level package or module


@dataclass(frozen=True)
class Code:
    modules: dict[str, str]  # project module -> digest of its normalised source
    packages: dict[str, str]  # third-party distribution -> version


def _strip_docstrings(tree: ast.AST) -> ast.AST:
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
                if isinstance(body[0].value.value, str):
                    node.body = body[1:] or [ast.Pass()]
    return tree


@cache
def _root(top: str) -> Path | None:
    """The folder holding a top-level package or module (found without importing it)."""
    try:
        spec = importlib.util.find_spec(top)
    except (ImportError, ValueError):
        return None
    if spec is None or spec.origin is None or not spec.origin.endswith(".py"):
        return None
    origin = Path(spec.origin)
    return origin.parent.parent if origin.name == "__init__.py" else origin.parent


def read_source(module: str) -> tuple[Path, str] | None:
    """(file, source) of a project module, found by path (finding it through the import system would
    import its parent packages), or None when it has no Python source."""
    root = _root(module.partition(".")[0])
    if root is None:
        return None
    base = root.joinpath(*module.split("."))
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path, path.read_text()
    return None


def _imported(tree: ast.AST, module: str, is_package: bool) -> set[str]:
    """Absolute names of every module an import statement in `tree` may load (for `from a import b`,
    both a and a.b, which may be a module)."""
    names: set[str] = set()
    package = module if is_package else module.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                anchor = ".".join(parts[: len(parts) - node.level + 1])
                base = f"{anchor}.{base}" if base else anchor
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return names


def _parents(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts) + 1)]


@cache
def _module(name: str) -> tuple[str, frozenset[str]] | None:
    """A project module's normalised digest and the modules its imports may load; None without source."""
    found = read_source(name)
    if found is None:
        return None
    path, source = found
    tree = ast.parse(source)
    imported = frozenset(_imported(tree, name, path.name == "__init__.py"))
    digest = hashlib.sha256(ast.dump(_strip_docstrings(tree), include_attributes=False).encode()).hexdigest()
    return digest, imported


def forget() -> None:
    """Read the code again at the next key: each build and plan takes the code as it is when it starts."""
    for remembered in (_root, _module, _project_closure, stage_code):
        remembered.cache_clear()


def module_digests(module: str) -> dict[str, str]:
    """Digests of the project modules `module` reaches, read once per process and then remembered:
    a process that imported them (the zygote, before forking workers) keeps the code it runs."""
    return _project_closure(module)[0]


def changed_since(expected: dict[str, str], function: str) -> list[str]:
    """Modules whose code differs from `expected` (what a stage's key was computed with) in this process."""
    now = stage_code(function).modules
    return sorted(name for name in set(expected) | set(now) if expected.get(name) != now.get(name))


@cache
def _project_closure(module: str) -> tuple[dict[str, str], frozenset[str]]:
    """Project modules reachable from `module` (by digest) and the top-level names of everything
    else they import."""
    own = (module.partition(".")[0], *_PROJECT_PACKAGES)
    digests: dict[str, str] = {}
    outside: set[str] = set()
    pending = [module]
    while pending:
        name = pending.pop()
        if name in digests:
            continue
        found = _module(name)
        if found is None:
            continue
        digests[name], imported = found
        for other in imported:
            top = other.partition(".")[0]
            if top in own:
                pending.extend(p for p in _parents(other) if p not in digests)
            elif top and top not in sys.stdlib_module_names:
                outside.add(top)
    return digests, frozenset(outside)


@cache
def _distributions() -> dict[str, list[str]]:
    return metadata.packages_distributions()


def _version(distribution: str) -> str:
    """The installed version without a local label (torch's Linux "2.13.0+cpu" is macOS's "2.13.0"),
    so one cache serves both machines of a release."""
    try:
        return metadata.version(distribution).partition("+")[0]
    except metadata.PackageNotFoundError:
        return "absent"


@cache
def stage_code(function: str) -> Code:
    """The code behind a stage function ("module:function")."""
    digests, outside = _project_closure(function.partition(":")[0])
    owners = _distributions()
    packages = {distribution: _version(distribution) for top in outside for distribution in owners.get(top, [top])}
    return Code(modules=dict(sorted(digests.items())), packages=dict(sorted(packages.items())))
