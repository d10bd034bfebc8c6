"""MBP recipe files (`recipes/mbp/*.yaml`): the bit width of each UNet layer, by layer identity.

```yaml
model: tiny-sd UNet, SPLIT_EINSUM     # what the recipe was made for (free text)
target_psnr_db: 40                    # optional: what it was chosen for
psnr_db: 40.3                         # optional: what it measured (final latents of the workload)
single_call_psnr_db: 33.1             # optional: the same, for the workload's first UNet call alone
default_nbits: null                   # palettizable layers not listed: bits, or null = float16
layers:
  unet.down_blocks.2.attentions.0.transformer_blocks.0.attn1.to_q.weight: 4
  unet.mid_block.resnets.0.conv1.weight: null
```

Read with the safe YAML reader that keeps lines, so every problem names the file, line and key.
Apple's published pre-analysis JSON imports into the same form (`import_apple_preanalysis`).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Collection
from pathlib import Path
from typing import Any, get_args

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from builder.coreml.options import Nbits, PalettizeOptions
from builder.coreml.program import float_weight_ops
from builder.errors import RecipeError
from builder.sd.mbp.layers import DEFAULT_WEIGHT_THRESHOLD, Layer, const_name, op_names

_APPLE_KEEP = 16  # Apple's recipes write 16 for a layer kept in float16
_APPLE_RECIPE_KEY = re.compile(r"^recipe_(\d+(?:\.\d+)?)_bit_mixedpalette$")


class MbpRecipe(BaseModel):
    """Per-layer palettization widths; None keeps a layer in float16."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str
    target_psnr_db: float | None = None
    psnr_db: float | None = None
    single_call_psnr_db: float | None = None
    bits_per_weight: float | None = None
    default_nbits: Nbits | None = None
    layers: dict[str, Nbits | None]


class AppleImport(BaseModel):
    """Apple's recipes in our form, and the layer names of theirs that name no layer of ours."""

    recipes: dict[str, MbpRecipe]  # by Apple's recipe key, e.g. recipe_4.50_bit_mixedpalette
    unmapped: list[str]


def load_recipe_file(path: Path) -> MbpRecipe:
    """Read and validate an MBP recipe file; problems raise RecipeError at the offending key."""
    from builder.recipe.yaml_read import Limits, read_document

    # One key per palettizable layer: an SDXL UNet has a few thousand.
    limits = Limits(max_bytes=8 << 20, max_depth=16, max_aliases=64, max_values=100_000)
    document = read_document(path, str(path), limits)
    try:
        return MbpRecipe.model_validate(document.data)
    except ValidationError as invalid:
        problem = invalid.errors()[0]
        location = tuple(problem["loc"])
        raise RecipeError(
            path,
            problem["msg"],
            line=document.origin(location).line,
            field=".".join(map(str, location)),
            hint=f"layer widths are one of {', '.join(map(str, get_args(Nbits)))} or null (float16); "
            "allowed keys: " + ", ".join(MbpRecipe.model_fields),
        ) from None


def write_recipe_file(recipe: MbpRecipe, path: Path) -> None:
    path.write_text(yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False, width=200))


def to_palettize_options(
    recipe_path: Path,
    layers: list[Layer],
    package: Path,
    weight_threshold: int = DEFAULT_WEIGHT_THRESHOLD,
    *,
    chunk: bool = False,
) -> PalettizeOptions:
    """Palettizer options applying the recipe file to the converted UNet `package`.

    `layers` are the conversion module's palettizable layers (`conversion_layers`). Every float weight
    above the threshold gets an explicit width, so the options' own `nbits` never applies: the
    recipe's width, else its `default_nbits`; weights that are no layer stay float16. A UNet `chunk`
    holds only some of the layers: the others are neither required nor unknown.
    """
    recipe = load_recipe_file(recipe_path)
    known = {layer.identity for layer in layers}
    unknown = [identity for identity in recipe.layers if identity not in known]
    if unknown:
        raise RecipeError(
            recipe_path,
            f"no layer '{unknown[0]}' in this UNet ({len(unknown)} unknown in all)",
            field=f"layers.{unknown[0]}",
            hint="the recipe was made for another architecture; run `sdbuild analyze` for this model",
        )
    if chunk:
        present = {name for name, _ in float_weight_ops(package)}
        layers = [layer for layer in layers if const_name(layer.identity) in present]
    ops = op_names(layers, package)
    by_op: dict[str, Nbits | None] = {
        name: None
        for name, shape in float_weight_ops(package)
        if len(shape) > 1 and math.prod(shape) > weight_threshold
    }
    for identity, op in ops.items():
        by_op[op] = recipe.layers.get(identity, recipe.default_nbits)
    return PalettizeOptions(weight_threshold=weight_threshold, nbits_by_op=by_op)


def import_apple_preanalysis(json_path: Path, identities: Collection[str]) -> AppleImport:
    """Apple's pre-analysis recipes (mixed_bit_compression_pre_analysis.py output) as MbpRecipes.

    Their layer names are module names of the diffusers UNet; ours are parameter names of the
    rewritten module, so a name maps by the rewrite's renames (`builder.sd.ane.weights`) where the
    module paths agree. `psnr_db` is Apple's end-to-end figure for the recipe (its `baselines`).
    """
    from builder.sd.ane.weights import conv_key

    try:
        analysis = json.loads(json_path.read_text())
        recipes, baselines = analysis["recipes"], analysis.get("baselines", {})
        model = analysis.get("model_version", json_path.stem)
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise RecipeError(
            json_path,
            f"not an Apple pre-analysis file: {type(error).__name__}: {error}",
            hint="use the *_palettization_recipe.json that mixed_bit_compression_pre_analysis.py writes",
        ) from None
    known = set(identities)
    result, unmapped = {}, set()
    for key, layers in recipes.items():
        ours: dict[str, Any] = {}  # bit widths as the file gives them; MbpRecipe validates them
        for name, bits in layers.items():
            identity = "unet." + conv_key(f"{name}.weight")
            if identity not in known:
                unmapped.add(name)
                continue
            ours[identity] = None if bits == _APPLE_KEEP else bits
        average = _APPLE_RECIPE_KEY.match(key)
        try:
            result[key] = MbpRecipe(
                model=f"{model} (Apple pre-analysis, {key})",
                psnr_db=baselines.get(key),
                bits_per_weight=float(average.group(1)) if average else None,
                layers=ours,
            )
        except ValidationError as invalid:
            problem = invalid.errors()[0]
            raise RecipeError(
                json_path,
                problem["msg"],
                field=f"recipes.{key}.{problem['loc'][-1]}",
                hint="Apple's widths are 1, 2, 4, 6, 8 or 16 (float16)",
            ) from None
    return AppleImport(recipes=result, unmapped=sorted(unmapped))
