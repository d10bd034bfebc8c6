"""What the user wrote: recipe models, YAML loading with located errors, and the JSON Schema."""

from .compression import W8A8, Compression, Float16, MixedPalettize, Palettize, Quantize
from .enums import Attention, Component, ComputeUnit, DeploymentTarget, Family
from .load import LoadedRecipe, load_recipe, load_recipes
from .matrix import Variant
from .model import Components, ComponentSettings, Recipe
from .schema import recipe_json_schema
from .sources import HubSource, LocalSource, ModelSource, SyntheticSource, VaeSource

__all__ = [
    "Attention",
    "Component",
    "ComponentSettings",
    "Components",
    "Compression",
    "ComputeUnit",
    "DeploymentTarget",
    "Family",
    "Float16",
    "HubSource",
    "LoadedRecipe",
    "LocalSource",
    "MixedPalettize",
    "ModelSource",
    "Palettize",
    "Quantize",
    "Recipe",
    "SyntheticSource",
    "VaeSource",
    "Variant",
    "W8A8",
    "load_recipe",
    "load_recipes",
    "recipe_json_schema",
]
