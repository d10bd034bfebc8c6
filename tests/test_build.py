"""The default recipe end to end: bundle layout, manifest, contract, PSNR, caching, staleness reasons."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
from conftest import Workspace, resource_bytes

from builder.coreml.package import describe_mlpackage
from builder.sd.contract import check_models

MODELS = ("TextEncoder", "Unet", "VAEDecoder", "VAEEncoder")


def test_cold_build_writes_a_swift_ready_bundle(built):
    ws, report = built
    assert {s["status"] for s in report["stages"]} <= {"built", "skipped"}
    bundle = ws.bundle
    assert bundle.is_symlink() and bundle.resolve().name == "0.1.0"
    resources = bundle / "Resources"
    names = sorted(p.name for p in resources.iterdir())
    assert names == sorted([f"{m}.mlpackage" for m in MODELS] + ["merges.txt", "vocab.json"])
    vocab = json.loads((resources / "vocab.json").read_text())
    assert "<|startoftext|>" in vocab and "<|endoftext|>" in vocab
    assert (resources / "merges.txt").read_text().startswith("#version")


def test_manifest_describes_the_bundle_truthfully(built):
    ws, _ = built
    manifest = json.loads((ws.bundle / "manifest.json").read_text())
    assert manifest["schema_version"] == 2
    assert manifest["family"] == "sd" and manifest["latent_scale_factor"] == 0.18215
    assert manifest["latent_size"] == [16, 16] and manifest["image_size"] == [128, 128]
    assert manifest["unet_batch_size"] == 2 and manifest["compiled"] is False
    assert manifest["models"]["Unet"]["compression"] == {
        "mode": "palettize",
        "nbits": 6,
        "granularity": "per_tensor",
        "group_size": 32,
        "weight_threshold": 2048,
    }
    unet = manifest["models"]["Unet"]
    assert 6 < unet["bits_per_weight"] < 8 and 30 < unet["read_back_psnr_db"]["noise_pred"] < 60
    assert manifest["models"]["TextEncoder"]["read_back_psnr_db"] is None
    assert set(manifest["tools"]) >= {"torch", "coremltools", "diffusers", "transformers", "numpy", "python"}
    resources = ws.bundle / "Resources"
    on_disk = {p.relative_to(resources).as_posix() for p in resources.rglob("*") if p.is_file()}
    assert set(manifest["files"]) == on_disk
    for name, entry in manifest["files"].items():
        data = (resources / name).read_bytes()
        assert entry["size"] == len(data)
        assert entry["sha256"] == hashlib.sha256(data).hexdigest()
    for model in manifest["models"].values():
        shipped = resources / model["path"]
        assert model["size_bytes"] == sum(f.stat().st_size for f in shipped.rglob("*") if f.is_file())


def test_every_model_satisfies_the_swift_contract(built):
    ws, _ = built
    resources = ws.bundle / "Resources"
    infos = {m: describe_mlpackage(resources / f"{m}.mlpackage") for m in MODELS}
    assert check_models("sd", infos, latent_size=(16, 16), batch_size=2) == []
    # Read back independently with coremltools, as an app developer would inspect them.
    import coremltools as ct

    spec = ct.models.MLModel(str(resources / "Unet.mlpackage"), skip_model_load=True).get_spec()
    inputs = {i.name: list(i.type.multiArrayType.shape) for i in spec.description.input}
    assert inputs == {"sample": [2, 4, 16, 16], "timestep": [2], "encoder_hidden_states": [2, 32, 1, 77]}
    assert spec.description.output[0].name == "noise_pred"
    text = ct.models.MLModel(str(resources / "TextEncoder.mlpackage"), skip_model_load=True).get_spec()
    first = text.description.input[0]
    assert first.name == "input_ids" and list(first.type.multiArrayType.shape) == [1, 77]
    assert first.type.multiArrayType.dataType == ct.proto.FeatureTypes_pb2.ArrayFeatureType.FLOAT32
    assert [o.name for o in text.description.output] == ["last_hidden_state", "pooled_outputs"]
    assert infos["VAEDecoder"].outputs[0].shape == [1, 3, 128, 128]
    assert infos["VAEEncoder"].outputs[0].shape == [1, 8, 16, 16]


def test_unet_weights_are_palettized_to_six_bits(built):
    ws, _ = built
    from coremltools.proto import Model_pb2

    spec = Model_pb2.Model()
    spec.ParseFromString((ws.bundle / "Resources/Unet.mlpackage/Data/com.apple.CoreML/model.mlmodel").read_bytes())
    ops = [
        op.type for block in spec.mlProgram.functions["main"].block_specializations.values() for op in block.operations
    ]
    assert ops.count("constexpr_lut_to_dense") > 20
    text = Model_pb2.Model()
    text.ParseFromString(
        (ws.bundle / "Resources/TextEncoder.mlpackage/Data/com.apple.CoreML/model.mlmodel").read_bytes()
    )
    text_ops = [op.type for b in text.mlProgram.functions["main"].block_specializations.values() for op in b.operations]
    assert "constexpr_lut_to_dense" not in text_ops


def test_psnr_against_the_reference_is_recorded_per_model(built):
    ws, _ = built
    manifest = json.loads((ws.bundle / "manifest.json").read_text())
    for name in MODELS:
        scores = manifest["models"][name]["psnr_db"]
        assert scores and min(scores.values()) >= 35, (name, scores)


def test_second_build_runs_nothing(built):
    ws, _ = built
    report = ws.build_json()
    statuses = {s["id"]: s["status"] for s in report["stages"]}
    assert {s for i, s in statuses.items() if not i.startswith("compile:")} == {"hit"}
    assert {s for i, s in statuses.items() if i.startswith("compile:")} == {"skipped"}


def _with_nbits(ws: Workspace, nbits: int) -> None:
    recipe = ws.root / "recipes" / "tiny-sd.yaml"
    text = recipe.read_text()
    assert "nbits: 6" in text
    recipe.write_text(text.replace("nbits: 6", f"nbits: {nbits}"))


def test_nbits_change_makes_only_unet_palettize_and_dependants_stale(built, tmp_path):
    ws, _ = built
    copy = Workspace(root=tmp_path / "ws", cache=ws.cache)
    shutil.copytree(ws.root / "recipes", copy.root / "recipes")
    _with_nbits(copy, 4)
    plan = copy.plan_json()
    stale = {i for i, e in plan.items() if e["status"] == "stale"}
    assert stale == {"palettize:unet", "verify:unet", "bundle"}
    assert {i for i, e in plan.items() if e["status"] == "skipped"} == {i for i in plan if i.startswith("compile:")}
    reason = plan["palettize:unet"]["reason"]
    assert "nbits" in reason and "6 -> 4" in reason and "components.unet.compression.nbits" in reason
    assert "palettize:unet" in plan["bundle"]["reason"] or "model.unet" in plan["bundle"]["reason"]
    for stage in ("rewrite:unet", "trace:unet", "convert:unet"):
        assert plan[stage]["status"] == "cached"


def test_attention_switch_rebuilds_the_unet_only(built, tmp_path):
    ws, _ = built
    copy = Workspace(root=tmp_path / "ws", cache=ws.cache)
    shutil.copytree(ws.root / "recipes", copy.root / "recipes")
    recipe = copy.root / "recipes" / "tiny-sd.yaml"
    recipe.write_text(recipe.read_text().replace("attention: ORIGINAL", "attention: SPLIT_EINSUM"))
    plan = copy.plan_json()
    stale = {i for i, e in plan.items() if e["status"] == "stale"}
    assert stale == {"rewrite:unet", "trace:unet", "convert:unet", "palettize:unet", "verify:unet", "bundle"}
    assert 'params.attention changed "ORIGINAL" -> "SPLIT_EINSUM" (attention)' in plan["rewrite:unet"]["reason"]


def test_explain_shows_current_and_previous_key_inputs(built, tmp_path):
    ws, _ = built
    copy = Workspace(root=tmp_path / "ws", cache=ws.cache)
    shutil.copytree(ws.root / "recipes", copy.root / "recipes")
    _with_nbits(copy, 4)
    explanation = json.loads(copy.run("explain", "recipes/tiny-sd.yaml", "palettize:unet", check=True).stdout)
    assert explanation["status"] == "stale"
    assert explanation["key_inputs"]["params"]["nbits"] == 4
    assert explanation["previous_key_inputs"]["params"]["nbits"] == 6


@pytest.mark.slow
def test_corrupt_cache_entry_is_detected_and_rebuilt(built, tmp_path):
    ws, _ = built
    copy = Workspace(root=tmp_path / "ws", cache=tmp_path / "cache")
    shutil.copytree(ws.root / "recipes", copy.root / "recipes")
    shutil.copytree(ws.cache, copy.cache, symlinks=True)
    reference = resource_bytes(ws.bundle)
    # the shipped UNet's weights: found through the recipe's own stage, since `built`'s cache is shared
    # (other modules build other bundles into it, with larger weights)
    explained = json.loads(copy.run("explain", "recipes/tiny-sd.yaml", "palettize:unet", check=True).stdout)
    (target,) = Path(explained["output"]).rglob("weight.bin")
    assert target.is_relative_to(copy.cache / "objects")
    target.chmod(0o644)
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0xFF
    target.write_bytes(bytes(data))
    plan = copy.plan_json()
    corrupt = [i for i, e in plan.items() if "corrupt" in e["reason"]]
    assert corrupt, plan
    report = copy.build_json()
    rebuilt = {s["id"] for s in report["stages"] if s["status"] == "built"}
    assert set(corrupt) <= rebuilt
    assert resource_bytes(copy.bundle) == reference
