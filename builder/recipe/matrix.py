"""Recipe matrices: `matrix:` maps dotted setting paths to lists of values, and every combination is
one variant, a whole recipe validated like any other and published in its own folder.

A variant is made by writing its values into the merged document, each with the origin of the list
item it came from, so a value the recipe model refuses is reported at that item's line.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass
from typing import Any

from ..errors import RecipeError
from .document import Document, FieldPath, Origin, dotted, parse_dotted
from .paths import WrittenIn

MATRIX = "matrix"
VARIANT_NAME = "variant_name"
MAX_VARIANTS = 64
"""More variants than this is almost certainly a mistake (each is a full build)."""
VARIANT_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
"""A variant names a folder (artifacts/<name>/<version>/<variant>/) and a cache index."""
_PLACEHOLDER = re.compile(r"\{([^{}]*)\}")
_FIXED = ("name", "version", "extends", MATRIX, VARIANT_NAME)
"""Top-level fields every variant shares: they say which bundle family the variants belong to."""


@dataclass(frozen=True)
class Variant:
    """One combination of a matrix: its folder name and the settings it sets (dotted path: value)."""

    name: str
    settings: dict[str, Any]


@dataclass(frozen=True)
class _Axis:
    path: FieldPath
    key_origin: Origin
    values: list[Any]
    item_origins: list[dict[FieldPath, Origin]]
    """Per value: the origin of the item and of everything inside it, by path relative to the item."""


def declares_matrix(document: Document) -> bool:
    return MATRIX in document.data or VARIANT_NAME in document.data


def expand(document: Document) -> list[tuple[Variant, Document]]:
    """Each variant of a matrix recipe, with the recipe document it stands for (matrix removed)."""
    axes = _axes(document)
    template, template_origin = _template(document, axes)
    base = document.without(MATRIX).without(VARIANT_NAME)
    combos = list(itertools.product(*(range(len(axis.values)) for axis in axes)))
    if len(combos) > MAX_VARIANTS:
        origin = document.origin((MATRIX,))
        raise RecipeError(
            origin.file,
            f"the matrix makes {len(combos)} variants, more than {MAX_VARIANTS}",
            line=origin.line,
            field=MATRIX,
            hint="split it into several recipes, or drop values you do not ship",
        )
    variants: list[tuple[Variant, Document]] = []
    seen: dict[str, dict[str, Any]] = {}
    for combo in combos:
        chosen = [(axis, index) for axis, index in zip(axes, combo, strict=True)]
        settings = {dotted(axis.path): _plain(axis.values[index]) for axis, index in chosen}
        name = _render(template, template_origin, axes, settings)
        folded = name.lower()  # macOS file systems ignore case: two names differing only there collide
        if folded in seen:
            raise RecipeError(
                template_origin.file,
                f"variant_name gives two variants the name '{name}' ({_shown(seen[folded])} and {_shown(settings)})",
                line=template_origin.line,
                field=VARIANT_NAME,
                hint="use a placeholder for every matrix setting, e.g. "
                + "-".join("{" + str(axis.path[-1]) + "}" for axis in axes),
            )
        seen[folded] = settings
        variant_document = base
        for axis, index in chosen:
            variant_document = _set(variant_document, axis, index)
        variants.append((Variant(name, settings), variant_document))
    return variants


def _axes(document: Document) -> list[_Axis]:
    matrix = document.data.get(MATRIX)
    origin = document.origin((MATRIX,))

    def error(message: str, hint: str, at: FieldPath = (MATRIX,), field: str = MATRIX) -> RecipeError:
        where = document.origin(at)
        return RecipeError(where.file, message, line=where.line, field=field, hint=hint)

    if matrix is None:
        where = document.origin((VARIANT_NAME,))
        raise RecipeError(
            where.file,
            "variant_name names the variants of a matrix, and the recipe has no `matrix:`",
            line=where.line,
            field=VARIANT_NAME,
            hint="add `matrix:` with the settings to vary, or remove variant_name",
        )
    if not isinstance(matrix, dict) or not matrix:
        raise RecipeError(
            origin.file,
            "matrix maps recipe settings to the values each variant takes",
            line=origin.line,
            field=MATRIX,
            hint="write e.g. `matrix: {attention: [ORIGINAL, SPLIT_EINSUM], chunk_unet: [false, true]}`",
        )
    axes: list[_Axis] = []
    for key, values in matrix.items():
        at = (MATRIX, key)
        field = f"{MATRIX}.{key}"
        path = parse_dotted(key)
        if not path or any(isinstance(part, int) for part in path) or key != dotted(path):
            raise error(
                f"'{key}' is not a dotted path of recipe fields",
                "name a setting like `attention` or `components.unet.compression.nbits` (no list indices)",
                at,
                field,
            )
        if path[0] in _FIXED:
            raise error(
                f"'{key}' cannot vary: every variant shares the recipe's {path[0]}",
                "vary settings such as attention, compute_unit, chunk_unet or components.<c>.compression",
                at,
                field,
            )
        if not isinstance(values, list) or not values:
            raise error(f"{key} needs a list of at least one value", f"write `{key}: [value, ...]`", at, field)
        for other in axes:
            shorter, longer = sorted((other.path, path), key=len)
            if longer[: len(shorter)] == shorter:
                raise error(
                    f"'{key}' overlaps '{dotted(other.path)}': one would overwrite the other",
                    "vary either the setting or the fields inside it, not both",
                    at,
                    field,
                )
        origins = [
            {where[len(at) + 1 :]: o for where, o in document.origins.items() if where[: len(at) + 1] == (*at, index)}
            for index in range(len(values))
        ]
        axes.append(_Axis(path, document.origin(at), values, origins))
    return axes


def _template(document: Document, axes: list[_Axis]) -> tuple[str, Origin]:
    """The variant_name template, checked: text, and every placeholder a matrix setting. Without
    one, the name joins every setting's value."""
    if VARIANT_NAME not in document.data:
        return "-".join("{" + dotted(axis.path) + "}" for axis in axes), document.origin((MATRIX,))
    template = document.data[VARIANT_NAME]
    origin = document.origin((VARIANT_NAME,))
    known = _placeholder_names(axes)

    def error(message: str, hint: str) -> RecipeError:
        return RecipeError(origin.file, message, line=origin.line, field=VARIANT_NAME, hint=hint)

    usable = ", ".join("{" + name + "}" for name in known)
    if not isinstance(template, str) or not template:
        raise error("variant_name is a text template such as '{attention}-{nbits}bit'", f"placeholders: {usable}")
    for name in _PLACEHOLDER.findall(template):
        if name not in known:
            raise error(f"variant_name has the placeholder {{{name}}}, which is no matrix setting", f"use {usable}")
        if known[name] is None:
            raise error(
                f"the placeholder {{{name}}} is ambiguous: several matrix settings end in '{name}'",
                "write the setting's whole dotted path in the braces",
            )
    if "{" in _PLACEHOLDER.sub("", template) or "}" in _PLACEHOLDER.sub("", template):
        raise error("variant_name has an unmatched brace", f"write placeholders as {{name}}; known: {usable}")
    return template, origin


def _placeholder_names(axes: list[_Axis]) -> dict[str, _Axis | None]:
    """Each axis by its whole dotted path and by its last field name (None where two share it)."""
    names: dict[str, _Axis | None] = {dotted(axis.path): axis for axis in axes}
    by_last: dict[str, list[_Axis]] = {}
    for axis in axes:
        by_last.setdefault(str(axis.path[-1]), []).append(axis)
    for last, group in by_last.items():
        names.setdefault(last, group[0] if len(group) == 1 else None)
    return names


def _render(template: str, origin: Origin, axes: list[_Axis], settings: dict[str, Any]) -> str:
    """The variant's name: the template with each placeholder replaced by its setting's value."""
    known = _placeholder_names(axes)

    def value(match: re.Match[str]) -> str:
        axis = known[match.group(1)]
        assert axis is not None  # _template refused ambiguous names
        return _word(settings[dotted(axis.path)])

    name = _PLACEHOLDER.sub(value, template)
    if not VARIANT_PATTERN.match(name):
        raise RecipeError(
            origin.file,
            f"variant_name gives the variant name {name!r}, which cannot be a folder name",
            line=origin.line,
            field=VARIANT_NAME,
            hint="variant names are 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit",
        )
    return name


def _word(value: Any) -> str:
    """A setting's value as part of a folder name: a mapping or list by its values joined with '-'
    (`{mode: palettize, nbits: 4}` is `palettize-4`)."""
    if isinstance(value, dict):
        return "-".join(_word(item) for item in value.values())
    if isinstance(value, list):
        return "-".join(_word(item) for item in value)
    return str(value).lower() if isinstance(value, bool) else str(value)


def _set(document: Document, axis: _Axis, index: int) -> Document:
    """`document` with the axis's `index`-th value at its path; missing mappings on the way are
    created, and every value written keeps the origin of the matrix item it came from."""
    data = _copy(document.data)
    parent: Any = data
    for depth, part in enumerate(axis.path[:-1]):
        child = parent.get(part)
        if child is None:
            child = parent[part] = {}
        if not isinstance(child, dict):
            where = axis.key_origin
            raise RecipeError(
                where.file,
                f"'{dotted(axis.path[: depth + 1])}' is not a mapping, so '{dotted(axis.path)}' cannot be set",
                line=where.line,
                field=f"{MATRIX}.{dotted(axis.path)}",
                hint="vary a setting the recipe model has (`sdbuild schema`)",
            )
        parent = child
    parent[axis.path[-1]] = axis.values[index]
    origins = {path: origin for path, origin in document.origins.items() if path[: len(axis.path)] != axis.path}
    for depth in range(1, len(axis.path)):
        origins.setdefault(axis.path[:depth], axis.key_origin)
    for inside, origin in axis.item_origins[index].items():
        origins[(*axis.path, *inside)] = origin
    return Document(data, origins)


def _copy(value: Any) -> Any:
    if isinstance(value, dict):
        return {key: _copy(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_copy(item) for item in value]
    return value


def _plain(value: Any) -> Any:
    """A setting as plain JSON data for the manifest (recipe text carries the folder it came from)."""
    if isinstance(value, WrittenIn):
        return str(value)
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_plain(item) for item in value]
    return value


def _shown(settings: dict[str, Any]) -> str:
    return ", ".join(f"{key}={value}" for key, value in settings.items())
