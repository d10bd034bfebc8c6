"""ControlNet: naming, the ControlNet and ControlledUnet modules against diffusers, built bundles, refused recipes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import CONTROLNET_RECIPE as RECIPE
from conftest import Workspace

from builder.coreml.package import describe_mlpackage
from builder.recipe.sources import ControlNetSource
from builder.sd.components import KINDS, ComponentShape, examples_for
from builder.sd.contract import check_models, controlnet_name
from builder.sd.presets import get_controlnet_preset, get_preset
from builder.sd.psnr import psnr
from builder.sd.synthetic import write_synthetic_controlnet, write_synthetic_pipeline

NAME = "SyntheticTinySdSeed0"
SHAPE = ComponentShape(latent_size=(16, 16), batch_size=2)


def test_names_follow_the_reference_rule(tmp_path):
    hub = ControlNetSource.model_validate({"hub": {"id": "lllyasviel/sd-controlnet-mlsd", "revision": "a" * 40}})
    assert controlnet_name(hub) == "LllyasvielSdControlnetMlsd"
    (tmp_path / "my_canny-net").mkdir()
    local = ControlNetSource.model_validate({"local": {"path": str(tmp_path / "my_canny-net")}})
    assert controlnet_name(local) == "MyCannyNet"
    synthetic = ControlNetSource.model_validate({"synthetic": {"preset": "tiny-sd", "seed": 3}})
    assert controlnet_name(synthetic) == "SyntheticTinySdSeed3"


@pytest.fixture(scope="module")
def folders(tmp_path_factory, one_torch_thread):
    root = tmp_path_factory.mktemp("controlnet")
    write_synthetic_pipeline(get_preset("tiny-sd"), 0, root / "pipeline")
    write_synthetic_controlnet(get_controlnet_preset("tiny-sd"), 0, root / "controlnet")
    return root / "pipeline", root / "controlnet"


def _run(component: str, folder: Path, attention: str, inputs: dict | None = None):
    kind = KINDS[component]
    reference = kind.load(folder, kind.subfolder).eval()
    specs = kind.inputs(reference, SHAPE)
    inputs = inputs or examples_for(component, folder, reference, specs)
    with torch.no_grad():
        expected = kind.reference(reference, inputs)
        produced = kind.wrap(reference, attention).eval()(*inputs.values())
    produced = produced if isinstance(produced, tuple) else (produced,)
    return specs, inputs, expected, list(produced)


@pytest.mark.parametrize("attention", ["ORIGINAL", "SPLIT_EINSUM"])
def test_controlnet_residuals_feed_the_controlled_unet_as_diffusers_does(folders, attention):
    pipeline, controlnet = folders
    _, control_inputs, expected, residuals = _run("controlnet", controlnet, attention)
    assert all(psnr(got, want) > 60 for got, want in zip(residuals, expected, strict=False))
    # The rewritten ControlNet's residuals, by name, are exactly the controlled UNet's extra inputs.
    specs, unet_inputs, _, _ = _run("controlled_unet", pipeline, attention)
    residual_specs = [s for s in specs if s.name.startswith("additional_residual_")]
    assert [s.name for s in residual_specs] == [f"additional_residual_{i}" for i in range(len(residuals))]
    assert [s.shape for s in residual_specs] == [list(r.shape) for r in residuals]
    fed = {name: unet_inputs[name] for name in ("sample", "timestep", "encoder_hidden_states")}
    fed |= {s.name: r for s, r in zip(residual_specs, residuals, strict=False)}
    _, _, expected_noise, noise = _run("controlled_unet", pipeline, attention, fed)
    assert psnr(noise[0], expected_noise[0]) > 60
    # The residuals matter: without them the noise prediction is another one.
    plain = KINDS["unet"].reference(KINDS["unet"].load(pipeline, "unet").eval(), fed)[0]
    assert psnr(plain, expected_noise[0]) < 40


@pytest.fixture(scope="module")
def controlled_only(controlnet_builds):
    """The SPLIT_EINSUM recipe with `plain_unet: false`, in the same cache, published under its own
    name (the other bundle stays on disk): its build, manifest and Resources."""
    ws, _, _ = controlnet_builds
    recipe = ws.root / "recipes" / "controlled-only.yaml"
    text = RECIPE.replace("attention: ORIGINAL", "attention: SPLIT_EINSUM").replace("name: tiny-sd", "name: only")
    recipe.write_text(text.replace("  controlnet:\n", "  controlnet:\n    plain_unet: false\n"))
    result = ws.build_json("recipes/controlled-only.yaml")
    bundle = ws.root / "artifacts" / "only" / "latest"
    return result, json.loads((bundle / "manifest.json").read_text()), bundle / "Resources"


@pytest.mark.slow
@pytest.mark.parametrize("attention", ["ORIGINAL", "SPLIT_EINSUM"])
def test_bundle_has_controlled_unet_and_controlnet_meeting_the_contract(controlnet_builds, attention):
    ws, _, manifests = controlnet_builds
    manifest = manifests[attention]
    assert manifest["attention"] == attention
    assert set(manifest["models"]) == {"TextEncoder", "ControlledUnet", "Unet", "VAEDecoder", f"controlnet/{NAME}"}
    assert manifest["pipelines"] == ["text-to-image", "controlnet"]
    assert manifest["models"]["Unet"]["component"] == "unet.plain"
    control = manifest["models"][f"controlnet/{NAME}"]
    assert control["path"] == f"controlnet/{NAME}.mlpackage"
    for entry in manifest["models"].values():
        assert min(entry["psnr_db"].values()) >= 35
    assert min(control["read_back_psnr_db"].values()) >= 35
    print(
        attention,
        {name: min(e["psnr_db"].values()) for name, e in manifest["models"].items()},
        "controlnet read-back",
        min(control["read_back_psnr_db"].values()),
    )

    bundle = ws.root / "artifacts" / "tiny-sd" / "0.1.0" / "Resources"
    if attention == "SPLIT_EINSUM":  # the last build is the one on disk
        models = {name: describe_mlpackage(bundle / entry["path"]) for name, entry in manifest["models"].items()}
        assert check_models("sd", models, latent_size=(16, 16), batch_size=2) == []
        unet_residuals = {i.name: i.shape for i in models["ControlledUnet"].inputs if i.name.startswith("additional_")}
        control_outputs = {o.name: o.shape for o in models[f"controlnet/{NAME}"].outputs}
        assert control_outputs == unet_residuals and len(unet_residuals) == 9
        assert {o.dtype for o in models[f"controlnet/{NAME}"].outputs} == {"float32"}
        inputs = {i.name: i.shape for i in models[f"controlnet/{NAME}"].inputs}
        assert inputs == {
            "sample": [2, 4, 16, 16],
            "timestep": [2],
            "encoder_hidden_states": [2, 32, 1, 77],
            "controlnet_cond": [2, 3, 128, 128],
        }
        # The plain UNet: the controlled one's interface without the residuals, for text-to-image.
        plain = {i.name: i.shape for i in models["Unet"].inputs}
        controlled = {i.name: i.shape for i in models["ControlledUnet"].inputs}
        assert plain == {n: s for n, s in controlled.items() if not n.startswith("additional_")}
        assert plain == {"sample": [2, 4, 16, 16], "timestep": [2], "encoder_hidden_states": [2, 32, 1, 77]}
        assert [o.name for o in models["Unet"].outputs] == [o.name for o in models["ControlledUnet"].outputs]
        assert models["Unet"].outputs[0].shape == [2, 4, 16, 16]
        # A plain UNet that took residuals would fail in the Swift package's text-to-image pipeline.
        residual_unet = models["Unet"].model_copy(update={"inputs": models["ControlledUnet"].inputs})
        problems = check_models("sd", models | {"Unet": residual_unet}, latent_size=(16, 16), batch_size=2)
        assert problems == ["Unet: takes additional_residual_<i> inputs; only ControlledUnet may"]


@pytest.mark.slow
def test_plain_unet_false_ships_controlled_unet_alone_without_rebuilding(controlled_only):
    result, manifest, resources = controlled_only
    assert set(manifest["models"]) == {"TextEncoder", "ControlledUnet", "VAEDecoder", f"controlnet/{NAME}"}
    assert manifest["pipelines"] == ["controlnet"]
    assert not (resources / "Unet.mlpackage").exists() and (resources / "ControlledUnet.mlpackage").is_dir()
    assert {s["id"] for s in result["stages"] if s["status"] == "built"} == {"bundle"}
    assert not any(s["id"].endswith(":unet.plain") for s in result["stages"])


@pytest.mark.slow
def test_attention_switch_rebuilds_unet_and_controlnet_only(controlnet_builds):
    _, results, _ = controlnet_builds
    built = {s["id"] for s in results["SPLIT_EINSUM"]["stages"] if s["status"] == "built"}
    components = {stage.split(":", 1)[1] for stage in built if ":" in stage}
    assert components == {"unet", "unet.plain", f"controlnet.{NAME}"}
    assert f"rewrite:controlnet.{NAME}" in built and "rewrite:unet" in built and "rewrite:unet.plain" in built
    assert f"source:controlnet.{NAME}" not in built


def test_contract_check_names_residuals_that_do_not_line_up():
    from builder.coreml.package import FeatureInfo, ModelInfo

    def features(*items):
        return [FeatureInfo(name=n, shape=s, dtype=d) for n, s, d in items]

    unet = ModelInfo(
        inputs=features(
            ("sample", [2, 4, 16, 16], "float16"),
            ("timestep", [2], "float16"),
            ("encoder_hidden_states", [2, 32, 1, 77], "float16"),
            ("additional_residual_0", [2, 32, 16, 16], "float16"),
            ("additional_residual_1", [2, 64, 2, 2], "float16"),
        ),
        outputs=features(("noise_pred", [2, 4, 16, 16], "float16")),
    )
    control = ModelInfo(
        inputs=features(
            ("sample", [2, 4, 16, 16], "float16"),
            ("timestep", [2], "float16"),
            ("encoder_hidden_states", [2, 32, 1, 77], "float16"),
            ("controlnet_cond", [2, 3, 64, 64], "float16"),
        ),
        outputs=features(
            ("additional_residual_0", [2, 32, 16, 16], "float32"), ("additional_residual_1", [2, 64, 4, 4], "float16")
        ),
    )
    problems = check_models("sd", {"ControlledUnet": unet, "controlnet/X": control}, latent_size=(16, 16), batch_size=2)
    text = "; ".join(problems)
    assert "controlnet/X: controlnet_cond shape is [2, 3, 64, 64], the Swift package needs [2, 3, 128, 128]" in text
    assert "controlnet/X: outputs" in text and "do not line up with ControlledUnet" in text
    assert "controlnet/X: outputs additional_residual_1 are not float32" in text
    assert check_models("sd", {"controlnet/X": control}, latent_size=(16, 16), batch_size=2)[-1].startswith(
        "ControlNets controlnet/X need ControlledUnet"
    )


@pytest.mark.parametrize(
    ("edit", "needles"),
    [
        (
            lambda t: (
                t.replace("family: sd", "family: sdxl")
                .replace("macOS13", "macOS14")
                .replace("  text_encoder: {}\n", "  text_encoder: {}\n  text_encoder_2: {}\n")
            ),
            ["bad.yaml:6", "model.controlnets", "sdxl pipeline", "bad.yaml:17", "components.controlnet"],
        ),
        (
            lambda t: t.replace("  controlnets:\n    - synthetic: {preset: tiny-sd, seed: 0}\n", ""),
            ["components.controlnet", "model.controlnets is empty"],
        ),
        (lambda t: t + "unet_batch_size: 1\n", ["bad.yaml:18", "unet_batch_size", "batch-2 UNet"]),
        (
            lambda t: t.replace(
                "    - synthetic: {preset: tiny-sd, seed: 0}\n",
                "    - synthetic: {preset: tiny-sd, seed: 0}\n    - synthetic: {preset: tiny-sd, seed: 0}\n",
            ),
            ["bad.yaml:8", "model.controlnets.1", "would both be controlnet/SyntheticTinySdSeed0"],
        ),
        (
            lambda t: t.replace("{preset: tiny-sd, seed: 0}\nlatent", "{preset: tiny-xl, seed: 0}\nlatent"),
            ["bad.yaml:7", "model.controlnets.0.synthetic.preset", "unknown synthetic ControlNet preset 'tiny-xl'"],
        ),
        (
            lambda t: t.replace("    - synthetic: {preset: tiny-sd, seed: 0}\n", "    - {}\n"),
            ["bad.yaml:7", "model.controlnets.0", "no source given"],
        ),
        (
            lambda t: t.replace(
                "    - synthetic: {preset: tiny-sd, seed: 0}\n", "    - local: {path: ../weights.safetensors}\n"
            ),
            ["bad.yaml:7", "model.controlnets.0.local.path", "diffusers folder"],
        ),
    ],
    ids=["sdxl", "settings-without-controlnets", "batch-1", "duplicate", "unknown-preset", "no-source", "single-file"],
)
def test_bad_controlnet_recipes_are_located_errors(workspace: Workspace, edit, needles):
    (workspace.root / "weights.safetensors").write_bytes(b"")
    (workspace.root / "recipes" / "bad.yaml").write_text(edit(RECIPE))
    done = workspace.run("plan", "recipes/bad.yaml")
    assert done.returncode == 2 and "Traceback" not in done.stderr
    message = " ".join(done.stderr.split())
    assert "fix:" in message
    for needle in needles:
        assert needle in message, (needle, message)


def test_synthetic_controlnet_is_seeded(tmp_path):
    import hashlib

    def digest(folder):
        return hashlib.sha256((folder / "diffusion_pytorch_model.safetensors").read_bytes()).hexdigest()

    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        write_synthetic_controlnet(get_controlnet_preset("tiny-sd"), seed, tmp_path / name)
    assert digest(tmp_path / "a") == digest(tmp_path / "b") != digest(tmp_path / "c")


def test_analysis_and_mixed_bit_refuse_controlled_recipes(workspace: Workspace):
    (workspace.root / "recipes" / "controlled.yaml").write_text(RECIPE)
    done = workspace.run("analyze", "recipes/controlled.yaml")
    assert done.returncode == 2 and "Traceback" not in done.stderr and "ControlledUnet" in done.stderr
    mixed = RECIPE.replace("  unet: {}\n", "  unet:\n    compression: {mode: mixed, recipe: mbp/tiny-sd-40db.yaml}\n")
    (workspace.root / "recipes" / "mixed.yaml").write_text(mixed)
    done = workspace.run("plan", "recipes/mixed.yaml")
    message = " ".join(done.stderr.split())
    assert done.returncode == 2 and "mixed.yaml:15" in message and "components.unet.compression.mode" in message


@pytest.mark.parametrize(("key", "value"), [("global_pool_conditions", True), ("class_embed_type", "timestep")])
def test_unsupported_controlnet_config_is_refused_by_key(key, value):
    from diffusers import ControlNetModel

    from builder.sd.ane.controlnet import rewrite_controlnet

    controlnet = ControlNetModel(**get_controlnet_preset("tiny-sd") | {key: value})
    with pytest.raises(ValueError, match=key):
        rewrite_controlnet(controlnet, "SPLIT_EINSUM")


def test_manifest_pipelines_follow_the_shipped_unets():
    from builder.sd.contract import supported_pipelines

    assert supported_pipelines(["TextEncoder", "Unet", "VAEDecoder"]) == ["text-to-image"]
    assert supported_pipelines(["UnetChunk1", "UnetChunk2", "VAEEncoder"]) == ["text-to-image", "image-to-image"]
    assert supported_pipelines(["ControlledUnet", "Unet", "controlnet/A"]) == ["text-to-image", "controlnet"]
    assert supported_pipelines(["ControlledUnetChunk1", "ControlledUnetChunk2", "VAEEncoder"]) == [
        "image-to-image",
        "controlnet",
    ]
    assert supported_pipelines(["UnetChunk1", "TextEncoder"]) == []  # half a UNet runs nothing


def test_chunked_controlnet_recipe_chunks_both_unets(workspace: Workspace):
    import contextlib
    import io

    from builder.cli import main

    (workspace.root / "recipes" / "chunked.yaml").write_text(
        RECIPE.replace("components:", "chunk_unet: true\ncomponents:")
    )
    with contextlib.chdir(workspace.root), contextlib.redirect_stdout(io.StringIO()) as out:
        code = main(
            [
                "--workspace",
                str(workspace.root),
                "--cache-dir",
                str(workspace.cache),
                "plan",
                "recipes/chunked.yaml",
                "--json",
            ]
        )
    assert code == 0
    ids = {entry["id"] for entry in json.loads(out.getvalue())}
    for label in ("unet", "unet.plain"):
        assert {f"chunk:{label}.chunk1", f"chunk:{label}.chunk2", f"convert:{label}.chunk2"} <= ids
        assert f"trace:{label}" not in ids
    # Both UNets read the one pipeline source; the plain one has its own rewrite.
    assert {"rewrite:unet", "rewrite:unet.plain", "source"} <= ids and "source:unet.plain" not in ids
