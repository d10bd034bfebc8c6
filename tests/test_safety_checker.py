"""The safety checker: its conversion module against diffusers, a built bundle, and refused recipes."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import Workspace

from builder.coreml.package import describe_mlpackage
from builder.sd.components import KINDS, ComponentShape, examples_for
from builder.sd.contract import check_models
from builder.sd.presets import get_preset
from builder.sd.psnr import psnr
from builder.sd.synthetic import write_synthetic_pipeline

RECIPE = """\
name: tiny-sd
version: 0.1.0
family: sd
model:
  synthetic: {preset: tiny-sd, seed: 0}
latent_size: [16, 16]
attention: ORIGINAL
compute_unit: CPU_AND_GPU
deployment_target: macOS13
components:
  text_encoder: {}
  unet: {}
  vae_decoder: {}
  safety_checker:
    compression: {mode: palettize, nbits: 8}
"""


@pytest.fixture(scope="module")
def checker(tmp_path_factory, one_torch_thread):
    folder = tmp_path_factory.mktemp("tiny") / "pipeline"
    write_synthetic_pipeline(get_preset("tiny-sd"), 0, folder)
    kind = KINDS["safety_checker"]
    reference = kind.load(folder, kind.subfolder).eval()
    specs = kind.inputs(reference, ComponentShape())
    return folder, reference, specs


def test_synthetic_pipeline_has_a_loadable_safety_checker(checker):
    from diffusers import StableDiffusionPipeline

    folder, _, _ = checker
    pipe = StableDiffusionPipeline.from_pretrained(folder, use_safetensors=True)
    assert type(pipe.safety_checker).__name__ == "StableDiffusionSafetyChecker"
    assert pipe.feature_extractor.crop_size == {"height": 224, "width": 224}


def test_module_decides_as_diffusers_does(checker):
    folder, reference, specs = checker
    kind = KINDS["safety_checker"]
    inputs = examples_for("safety_checker", folder, reference, specs)
    assert inputs["clip_input"].shape == (1, 3, 224, 224) and inputs["images"].shape == (1, 512, 512, 3)
    with torch.no_grad():
        expected = kind.reference(reference, inputs)
        module = kind.wrap(reference, "ORIGINAL").eval()
        filtered, flagged, scores = module(*inputs.values())
        # diffusers' own (numpy, per image) forward gives the same answer as its forward_onnx
        _, diffusers_flags = reference(inputs["clip_input"], inputs["images"].clone())
    assert psnr(scores, expected[2]) > 100
    assert flagged.tolist() == expected[1].tolist() == [float(diffusers_flags[0])] == [0.0]
    assert torch.equal(filtered, inputs["images"])


def test_adjustment_raises_scores_and_flagged_images_are_blacked_out(checker):
    folder, reference, specs = checker
    module = KINDS["safety_checker"].wrap(reference, "ORIGINAL").eval()
    inputs = examples_for("safety_checker", folder, reference, specs)
    with torch.no_grad():
        _, _, base = module(*inputs.values())
        filtered, flagged, scores = module(inputs["clip_input"], inputs["images"], torch.tensor([1.0]))
    assert flagged.tolist() == [1.0]
    assert torch.all(filtered == 0)
    assert torch.allclose(scores, base + 1.0 + 0.01, atol=1e-5)  # +1 everywhere, and the special-care boost


@pytest.mark.slow
def test_bundle_ships_a_contract_safe_safety_checker(workspace: Workspace):
    (workspace.root / "recipes" / "checked.yaml").write_text(RECIPE)
    workspace.build_json("recipes/checked.yaml")
    bundle = workspace.bundle
    manifest = json.loads((bundle / "manifest.json").read_text())
    entry = manifest["models"]["SafetyChecker"]
    assert entry["path"] == "SafetyChecker.mlpackage" and entry["component"] == "safety_checker"
    assert entry["decisions_match"] == {"has_nsfw_concepts": True}
    assert set(entry["psnr_db"]) == {"filtered_images", "concept_scores"}
    assert min(entry["psnr_db"].values()) >= 35
    print("safety checker psnr_db", entry["psnr_db"], "read_back_psnr_db", entry["read_back_psnr_db"])
    assert entry["read_back_psnr_db"]["concept_scores"] >= 35
    assert "has_nsfw_concepts" not in entry["read_back_psnr_db"]
    assert entry["bits_per_weight"] < 16  # 8-bit indices plus the tables of these small weights

    interface = describe_mlpackage(bundle / "Resources" / "SafetyChecker.mlpackage")
    inputs = {i.name: (i.shape, i.dtype) for i in interface.inputs}
    assert inputs == {
        "clip_input": ([1, 3, 224, 224], "float32"),
        "images": ([1, 512, 512, 3], "float16"),
        "adjustment": ([1], "float32"),
    }
    assert {o.name for o in interface.outputs} >= {"has_nsfw_concepts"}
    models = {name: describe_mlpackage(bundle / "Resources" / m["path"]) for name, m in manifest["models"].items()}
    assert check_models("sd", models, latent_size=(16, 16), batch_size=2) == []


def test_contract_check_names_a_wrong_images_shape():
    from builder.coreml.package import FeatureInfo, ModelInfo

    bad = ModelInfo(
        inputs=[
            FeatureInfo(name="clip_input", shape=[1, 3, 224, 224], dtype="float32"),
            FeatureInfo(name="images", shape=[1, 128, 128, 3], dtype="float16"),
            FeatureInfo(name="adjustment", shape=[1], dtype="float32"),
        ],
        outputs=[FeatureInfo(name="concept_scores", shape=[1, 17], dtype="float16")],
    )
    problems = check_models("sd", {"SafetyChecker": bad}, latent_size=(16, 16), batch_size=2)
    assert "SafetyChecker: images shape is [1, 128, 128, 3], the Swift package needs [1, 512, 512, 3]" in problems
    assert "SafetyChecker: no output named has_nsfw_concepts" in problems


def test_preset_without_a_safety_checker_is_a_located_error(workspace: Workspace):
    text = RECIPE.replace("preset: tiny-sd", "preset: sd-2-1-base")
    (workspace.root / "recipes" / "bad.yaml").write_text(text)
    done = workspace.run("plan", "recipes/bad.yaml")
    assert done.returncode == 2 and "Traceback" not in done.stderr
    message = " ".join(done.stderr.split())
    assert "bad.yaml:14" in message and "components.safety_checker" in message
    assert "synthetic preset 'sd-2-1-base' has no safety checker" in message and "fix:" in message


def test_missing_feature_extractor_is_a_user_error(checker, tmp_path):
    import shutil

    from builder.errors import UserError

    folder, reference, specs = checker
    shutil.copytree(folder, tmp_path / "pipeline")
    shutil.rmtree(tmp_path / "pipeline" / "feature_extractor")
    with pytest.raises(UserError, match="feature_extractor"):
        examples_for("safety_checker", tmp_path / "pipeline", reference, specs)
