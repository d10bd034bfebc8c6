"""Linear quantization read back and verified: every granularity decodes as coremltools itself
decompresses it, and a quantize build records its read-back PSNR and fails below the recipe's floor."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import Workspace
from test_compression_stages import ios18_compression_recipe
from test_palettize import _convert

from builder.coreml.weights import compressed_const_names, read_back_weights
from builder.stages import quantize

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "tiny-sd.yaml"


def _decompressed(package: Path) -> dict[str, np.ndarray]:
    """coremltools' own decompression of every compressed weight, by the const name it replaced."""
    import coremltools as ct
    from coremltools.optimize.coreml import decompress_weights

    program = decompress_weights(ct.models.MLModel(str(package), skip_model_load=True))._mil_program
    return {op.name: op.outputs[0].val for op in program.functions["main"].operations if op.op_type == "const"}


@pytest.mark.parametrize(
    ("target", "granularities"),
    [("macOS13", ("per_tensor", "per_channel")), ("macOS15", ("per_tensor", "per_channel", "per_block"))],
)
def test_quantized_weights_read_back_as_coremltools_decompresses_them(target, granularities, tmp_path):
    converted = tmp_path / "float16"
    _convert(target, converted / "model.mlpackage")
    for granularity in granularities:
        out = tmp_path / granularity
        out.mkdir()
        quantize.run({"model": converted}, {"granularity": granularity, "block_size": 16}, out)
        package = out / "model.mlpackage"
        names = compressed_const_names(package)
        assert len(names) == 3  # the conv and the two linears above the threshold
        ours, theirs = read_back_weights(package), _decompressed(package)
        float16 = read_back_weights(converted / "model.mlpackage")
        for name in names:
            stored = next(value for key, value in theirs.items() if key.startswith(name))  # `<name>_quantized`
            assert np.array_equal(ours[name], stored), (granularity, name)
            assert ours[name].shape == float16[name].shape
            error = np.abs(ours[name].astype(np.float32) - float16[name]).max()
            assert 0 < error <= np.abs(float16[name]).max() / 127  # at most half a step of the coarsest scale


def test_per_block_quantization_needs_ios18(tmp_path):
    loaded = ios18_compression_recipe(tmp_path, "{mode: quantize, granularity: per_block}")
    assert loaded.recipe.components.unet.compression.granularity == "per_block"


@pytest.mark.slow
def test_quantize_build_records_read_back_psnr_and_fails_below_its_floor(built, tmp_path):
    ws, _ = built
    copy = Workspace(root=tmp_path / "ws", cache=ws.cache)
    shutil.copytree(ws.root / "recipes", copy.root / "recipes")
    recipe = copy.root / "recipes" / "tiny-sd.yaml"
    text = recipe.read_text().replace("name: tiny-sd\n", "name: tiny-sd-quantized\n")
    recipe.write_text(text.replace("{mode: palettize, nbits: 6}", "{mode: quantize, minimum_psnr_db: 30}"))
    report = copy.build_json()
    status = {s["id"]: s["status"] for s in report["stages"]}
    assert status["convert:unet"] == "hit" and status["verify:unet"] == "built"
    bundle = copy.root / "artifacts" / "tiny-sd-quantized" / "latest"
    entry = json.loads((bundle / "manifest.json").read_text())["models"]["Unet"]
    achieved = entry["read_back_psnr_db"]["noise_pred"]
    assert 30 < achieved < 90  # int8 weights: lossy, yet close to float16
    assert entry["compression"]["minimum_psnr_db"] == 30

    floor = int(achieved) + 2
    recipe.write_text(recipe.read_text().replace("minimum_psnr_db: 30", f"minimum_psnr_db: {floor}"))
    failed = copy.run("build", "recipes/tiny-sd.yaml")
    assert failed.returncode == 2, failed.stderr
    assert "Traceback" not in failed.stderr
    line = next(n for n, text in enumerate(recipe.read_text().splitlines(), 1) if "minimum_psnr_db" in text)
    assert f"recipes/tiny-sd.yaml:{line}: components.unet.compression.minimum_psnr_db:" in failed.stderr
    assert f"{achieved} dB" in failed.stderr and f"minimum_psnr_db {floor} dB" in failed.stderr
    # Only the verdict changed: every stage before it is still cached.
    plan = copy.plan_json()
    assert plan["quantize:unet"]["status"] == "cached" and plan["verify:unet"]["status"] == "stale"
