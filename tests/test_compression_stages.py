"""Compression stages on a small converted model, and the recipe rules that guard them."""

from __future__ import annotations

from pathlib import Path

import pytest
from test_palettize import EMBEDDING, _convert

from builder.errors import RecipeError, RecipeErrors
from builder.recipe import LoadedRecipe, load_recipe
from builder.stages import palettize, quantize

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "tiny-sd.yaml"


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("converted")
    _convert("macOS13", folder / "model.mlpackage")
    return folder


def _op_types(package: Path) -> list[str]:
    from coremltools.proto import Model_pb2

    spec = Model_pb2.Model()
    spec.ParseFromString((package / "Data/com.apple.CoreML/model.mlmodel").read_bytes())
    blocks = spec.mlProgram.functions["main"].block_specializations.values()
    return [op.type for block in blocks for op in block.operations]


def _const_names(package: Path) -> set[str]:
    from coremltools.proto import Model_pb2

    spec = Model_pb2.Model()
    spec.ParseFromString((package / "Data/com.apple.CoreML/model.mlmodel").read_bytes())
    blocks = spec.mlProgram.functions["main"].block_specializations.values()
    return {o.name for block in blocks for op in block.operations if op.type == "const" for o in op.outputs}


def test_palettize_stage_writes_model_and_report(converted, tmp_path):
    summary = palettize.run({"model": converted}, {"nbits": 4}, tmp_path)
    assert (tmp_path / "report.json").is_file()
    assert _op_types(tmp_path / "model.mlpackage").count("constexpr_lut_to_dense") == 3  # conv, lin, lin2
    assert 4 < summary["bits_per_weight"] < 16
    assert EMBEDDING in _const_names(tmp_path / "model.mlpackage")


def test_quantize_stage_stores_int8_weights(converted, tmp_path):
    summary = quantize.run({"model": converted}, {"weight_threshold": 2048}, tmp_path)
    ops = _op_types(tmp_path / "model.mlpackage")
    assert ops.count("constexpr_affine_dequantize") == 3
    assert EMBEDDING in _const_names(tmp_path / "model.mlpackage")
    original = sum(f.stat().st_size for f in (converted / "model.mlpackage").rglob("*") if f.is_file())
    assert summary["size_bytes"] < 0.7 * original


def ios18_compression_recipe(tmp_path: Path, compression: str) -> LoadedRecipe:
    """tiny-sd with the UNet's `compression`: refused at its granularity for macOS13, naming iOS18;
    returns the recipe loaded once its target is macOS15."""
    text = RECIPE.read_text().replace("compression: {mode: palettize, nbits: 6}", f"compression: {compression}")
    recipe = tmp_path / "ios18.yaml"
    recipe.write_text(text)
    with pytest.raises((RecipeError, RecipeErrors)) as raised:
        load_recipe(recipe, workspace=tmp_path)
    message = raised.value.render()
    assert "components.unet.compression.granularity" in message and "iOS18" in message
    recipe.write_text(text.replace("deployment_target: macOS13", "deployment_target: macOS15"))
    return load_recipe(recipe, workspace=tmp_path)


def test_grouped_palettization_needs_ios18(tmp_path):
    loaded = ios18_compression_recipe(
        tmp_path, "{mode: palettize, nbits: 4, granularity: per_grouped_channel, group_size: 16}"
    )
    assert loaded.recipe.components.unet.compression.group_size == 16
