"""SDXL base and refiner on the tiny presets: conversion accuracy per attention, the Swift contract of
a full build read back with coremltools, float32/float16 VAE, and the recipe rules."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from conftest import Workspace, make_workspace, rewrite_and_trace

from builder.coreml.package import describe_mlpackage
from builder.errors import RecipeError, RecipeErrors, UserError
from builder.recipe import load_recipe
from builder.sd.contract import check_models

ATTENTIONS = ("ORIGINAL", "SPLIT_EINSUM", "SPLIT_EINSUM_V2")
MODELS = ("TextEncoder", "TextEncoder2", "Unet", "UnetRefiner", "VAEDecoder", "VAEEncoder")


# --- traced modules vs diffusers ---------------------------------------------------------------


@pytest.fixture(scope="module")
def pipelines(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from builder.sd.presets import get_preset
    from builder.sd.synthetic import write_synthetic_pipeline

    root = tmp_path_factory.mktemp("sdxl-pipelines")
    for name in ("tiny-sdxl", "tiny-sdxl-refiner"):
        write_synthetic_pipeline(get_preset(name), 0, root / name)
    return {"base": root / "tiny-sdxl", "refiner": root / "tiny-sdxl-refiner"}


@pytest.mark.parametrize("attention", ATTENTIONS)
def test_sdxl_unets_match_diffusers_for_every_attention(pipelines, attention, tmp_path, one_torch_thread):
    import torch

    from builder.stages.trace import load_conversion_module

    for component, folder, time_ids, width in (("unet", "base", 6, 32 + 64), ("unet_refiner", "refiner", 5, 64)):
        summary, architecture = rewrite_and_trace(pipelines[folder], component, "sdxl", attention, tmp_path)
        assert summary["psnr_db"]["noise_pred"] >= 35, (component, summary)
        shapes = {spec["name"]: spec["shape"] for spec in architecture["inputs"]}
        assert shapes == {
            "sample": [2, 4, 16, 16],
            "timestep": [2],
            "encoder_hidden_states": [2, width, 1, 77],
            "text_embeds": [2, 48],
            "time_ids": [2, time_ids],
        }
        # The extra inputs are really used: changing either changes the prediction.
        module, _ = load_conversion_module(tmp_path / f"rewrite-{component}-{attention}")
        from safetensors.torch import load_file

        reference = load_file(tmp_path / f"rewrite-{component}-{attention}" / "reference.safetensors")
        inputs = [reference[f"input.{spec['name']}"] for spec in architecture["inputs"]]
        with torch.no_grad():
            base = module(*inputs)
            for index in (3, 4):  # text_embeds, time_ids
                changed = list(inputs)
                changed[index] = changed[index] + 1.0
                assert not torch.allclose(module(*changed), base, atol=1e-4), (component, index)


def test_sdxl_text_encoders_and_vae_match_diffusers(pipelines, tmp_path, one_torch_thread):
    expected = {
        "text_encoder": {"hidden_embeds": [1, 77, 32], "pooled_outputs": [1, 32]},
        "text_encoder_2": {"hidden_embeds": [1, 77, 64], "pooled_outputs": [1, 48]},
        "vae_decoder": {"image": [1, 3, 128, 128]},
        "vae_encoder": {"latent_dist": [1, 8, 16, 16]},
    }
    for component, outputs in expected.items():
        summary, architecture = rewrite_and_trace(pipelines["base"], component, "sdxl", "ORIGINAL", tmp_path)
        assert set(summary["psnr_db"]) == set(outputs) and min(summary["psnr_db"].values()) >= 35, summary
        assert architecture["outputs"] == list(outputs)


def test_text_encoders_give_what_the_diffusers_sdxl_pipeline_conditions_on(pipelines, one_torch_thread):
    """hidden_embeds of both encoders side by side are diffusers' prompt_embeds; TextEncoder2's
    pooled_outputs are its pooled_prompt_embeds (the projected pooled state)."""
    import torch
    from diffusers import StableDiffusionXLPipeline

    from builder.sd.components import kind

    pipe = StableDiffusionXLPipeline.from_pretrained(pipelines["base"], use_safetensors=True)
    prompt = "a green frog on a lily pad"
    with torch.no_grad():
        embeds, _, pooled, _ = pipe.encode_prompt(prompt, device="cpu", do_classifier_free_guidance=False)
        hidden = []
        for component, tokenizer in (("text_encoder", pipe.tokenizer), ("text_encoder_2", pipe.tokenizer_2)):
            ids = tokenizer(prompt, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
            k = kind(component, "sdxl")
            module = k.wrap(k.load(pipelines["base"], k.subfolder).eval(), "ORIGINAL").eval()
            hidden_embeds, pooled_outputs = module(ids.float())
            hidden.append(hidden_embeds)
    torch.testing.assert_close(torch.cat(hidden, dim=-1), embeds, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(pooled_outputs, pooled, rtol=1e-4, atol=1e-4)


def test_legacy_eos_token_id_pools_like_transformers(one_torch_thread):
    """Hub CLIP configs with eos_token_id 2 pool at the highest id, as transformers does."""
    import torch
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    from builder.sd.modules import TextEncoderXLModule

    config = CLIPTextConfig(
        vocab_size=100,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        projection_dim=8,
        eos_token_id=2,
        bos_token_id=0,
        pad_token_id=1,
    )
    torch.manual_seed(0)
    clip = CLIPTextModelWithProjection._from_config(config, attn_implementation="eager").eval()
    ids = torch.tensor([[0, 5, 7, 99, 1, 1] + [1] * 71])
    with torch.no_grad():
        reference = clip(input_ids=ids).text_embeds
        _, pooled = TextEncoderXLModule(clip)(ids.float())
    torch.testing.assert_close(pooled, reference, rtol=1e-4, atol=1e-4)


def test_full_size_presets_have_the_real_parameter_counts():
    """Built on the meta device (no memory): SDXL 1.0's published sizes, so benchmarks measure the real thing."""
    import torch
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from builder.sd.presets import get_preset

    def count(module: torch.nn.Module) -> int:
        return sum(p.numel() for p in module.parameters())

    base, refiner = get_preset("sdxl-base"), get_preset("sdxl-refiner")
    with torch.device("meta"):
        assert count(UNet2DConditionModel(**base.unet)) == 2_567_463_684
        assert count(CLIPTextModelWithProjection(CLIPTextConfig(**base.text_encoder_2))) == 694_659_840
        assert count(CLIPTextModel(CLIPTextConfig(**base.text_encoder))) == 123_060_480
        assert count(UNet2DConditionModel(**refiner.unet)) == 2_259_526_660
    assert refiner.text_encoder is None and refiner.requires_aesthetics_score
    assert base.vae["scaling_factor"] == refiner.vae["scaling_factor"] == 0.13025


# --- one full build of recipes/tiny-sdxl.yaml --------------------------------------------------


def _bundle(ws: Workspace, name: str = "tiny-sdxl") -> Path:
    return ws.root / "artifacts" / name / "latest"


def test_tiny_sdxl_bundle_satisfies_the_swift_contract(sdxl_built):
    ws, _ = sdxl_built
    resources = _bundle(ws) / "Resources"
    assert sorted(p.name for p in resources.iterdir()) == sorted(
        [f"{m}.mlpackage" for m in MODELS] + ["merges.txt", "vocab.json"]
    )
    infos = {m: describe_mlpackage(resources / f"{m}.mlpackage") for m in MODELS}
    assert check_models("sdxl", infos, latent_size=(16, 16), batch_size=2) == []
    inputs = {m: {i.name: i.shape for i in info.inputs} for m, info in infos.items()}
    outputs = {m: {o.name: o.shape for o in info.outputs} for m, info in infos.items()}
    assert outputs["TextEncoder"] == {"hidden_embeds": [1, 77, 32], "pooled_outputs": [1, 32]}
    assert outputs["TextEncoder2"] == {"hidden_embeds": [1, 77, 64], "pooled_outputs": [1, 48]}
    assert inputs["Unet"]["encoder_hidden_states"] == [2, 32 + 64, 1, 77]
    assert inputs["Unet"]["text_embeds"] == [2, 48] and inputs["Unet"]["time_ids"] == [2, 6]
    assert inputs["UnetRefiner"]["encoder_hidden_states"] == [2, 64, 1, 77]
    assert inputs["UnetRefiner"]["text_embeds"] == [2, 48] and inputs["UnetRefiner"]["time_ids"] == [2, 5]
    # The contract check would catch a swapped refiner.
    swapped = infos | {"Unet": infos["UnetRefiner"], "UnetRefiner": infos["Unet"]}
    problems = check_models("sdxl", swapped, latent_size=(16, 16), batch_size=2)
    assert any("Unet: time_ids shape" in p for p in problems)
    assert any("UnetRefiner: encoder_hidden_states" in p for p in problems)


def test_tiny_sdxl_manifest(sdxl_built):
    ws, _ = sdxl_built
    manifest = json.loads((_bundle(ws) / "manifest.json").read_text())
    assert manifest["family"] == "sdxl" and manifest["latent_scale_factor"] == 0.13025
    assert manifest["time_ids_length"] == 6 and manifest["refiner"] is True
    models = manifest["models"]
    assert set(models) == set(MODELS)
    for name, model in models.items():
        assert model["psnr_db"] and min(model["psnr_db"].values()) >= 35, name
    assert models["UnetRefiner"]["component"] == "unet_refiner"
    # SDXL's own VAE overflows in float16: without model.vae it is converted in float32.
    assert {n: m["precision"] for n, m in models.items()} == {
        "TextEncoder": "float16",
        "TextEncoder2": "float16",
        "Unet": "float16",
        "UnetRefiner": "float16",
        "VAEDecoder": "float32",
        "VAEEncoder": "float32",
    }
    assert models["VAEDecoder"]["inputs"][0]["dtype"] == "float32"
    assert models["VAEDecoder"]["bits_per_weight"] == 32.0 and models["TextEncoder2"]["bits_per_weight"] == 16.0
    resources = _bundle(ws) / "Resources"
    assert _const_dtypes(resources / "VAEDecoder.mlpackage") & {"FLOAT16"} == set()
    assert "FLOAT16" in _const_dtypes(resources / "UnetRefiner.mlpackage")


def _const_dtypes(package: Path) -> set[str]:
    """Data types of the saved program's constants (weights included)."""
    from coremltools.proto import MIL_pb2, Model_pb2

    spec = Model_pb2.Model()
    spec.ParseFromString((package / "Data" / "com.apple.CoreML" / "model.mlmodel").read_bytes())
    function = spec.mlProgram.functions["main"]
    operations = function.block_specializations[function.opset].operations
    return {MIL_pb2.DataType.Name(o.outputs[0].type.tensorType.dataType) for o in operations if o.type == "const"}


@pytest.mark.slow  # a second (partial) build
def test_a_local_replacement_vae_converts_in_float16_and_rebuilds_only_the_vae(sdxl_built):
    """model.vae (a local AutoencoderKL folder) replaces the VAE, converted in float16; the rest is reused."""
    from diffusers import AutoencoderKL

    from builder.sd.presets import get_preset
    from builder.sd.synthetic import write_synthetic_pipeline

    ws, _ = sdxl_built
    write_synthetic_pipeline(get_preset("tiny-sdxl"), 0, ws.root / "models" / "tiny-sdxl")
    vae = AutoencoderKL.from_pretrained(ws.root / "models" / "tiny-sdxl" / "vae", use_safetensors=True)
    vae.save_pretrained(ws.root / "models" / "vae-fp16", safe_serialization=True)  # config.json at the root
    recipe = (ws.root / "recipes" / "tiny-sdxl.yaml").read_text()
    recipe = recipe.replace("name: tiny-sdxl", "name: tiny-sdxl-vae").replace(
        "  synthetic: {preset: tiny-sdxl, seed: 0}\n",
        "  local: {path: ../models/tiny-sdxl}\n  vae: {local: {path: ../models/vae-fp16}}\n",
    )
    (ws.root / "recipes" / "tiny-sdxl-vae.yaml").write_text(recipe)
    plan = ws.plan_json("recipes/tiny-sdxl-vae.yaml")
    stale = {stage for stage, entry in plan.items() if entry["status"] == "stale"}
    assert stale == {
        "rewrite:vae_decoder",
        "trace:vae_decoder",
        "convert:vae_decoder",
        "rewrite:vae_encoder",
        "trace:vae_encoder",
        "convert:vae_encoder",
        "provenance:model",  # the file digests of the two local sources, for the manifest
        "provenance:vae",
        "bundle",
    }, plan
    ws.build_json("recipes/tiny-sdxl-vae.yaml")
    manifest = json.loads((_bundle(ws, "tiny-sdxl-vae") / "manifest.json").read_text())
    assert manifest["models"]["VAEDecoder"]["precision"] == "float16"
    assert manifest["models"]["VAEEncoder"]["precision"] == "float16"
    assert manifest["models"]["VAEDecoder"]["inputs"][0]["dtype"] == "float16"
    assert manifest["models"]["VAEDecoder"]["bits_per_weight"] == 16.0
    assert "FLOAT16" in _const_dtypes(_bundle(ws, "tiny-sdxl-vae") / "Resources" / "VAEDecoder.mlpackage")


def test_an_unreachable_hub_fails_in_one_line(sdxl_built):
    ws, _ = sdxl_built
    done = ws.run("build", "recipes/sdxl-macos.yaml", env={"HF_HUB_OFFLINE": "0", "HF_ENDPOINT": "https://hub.invalid"})
    assert done.returncode == 2
    [error, fix] = [line for line in done.stderr.splitlines() if line.startswith(("error:", "  fix:"))]
    assert "sdxl-macos.yaml:7: model.hub.id" in error and "cannot fetch" in error and "Traceback" not in done.stderr


# --- recipe rules ------------------------------------------------------------------------------

SDXL = """\
name: x
version: 0.1.0
family: sdxl
model:
  synthetic: {preset: tiny-sdxl}
  refiner: {synthetic: {preset: tiny-sdxl-refiner}}
latent_size: [16, 16]
attention: ORIGINAL
compute_unit: CPU_AND_GPU
deployment_target: macOS14
components:
  text_encoder: {}
  text_encoder_2: {}
  unet: {}
  unet_refiner: {}
  vae_decoder: {}
"""


def _errors(tmp_path: Path, text: str) -> dict[str, RecipeError]:
    path = tmp_path / "r.yaml"
    path.write_text(text)
    with pytest.raises(UserError) as raised:
        load_recipe(path, tmp_path)
    error = raised.value
    found = error.errors if isinstance(error, RecipeErrors) else [error]
    assert all(isinstance(e, RecipeError) and e.hint for e in found)
    return {e.field: e for e in found}


def _graph_error(tmp_path: Path, text: str) -> RecipeError:
    from builder.stages.pipeline import build_graph

    path = tmp_path / "r.yaml"
    path.write_text(text)
    with pytest.raises(RecipeError) as raised:
        build_graph(load_recipe(path, tmp_path))
    return raised.value


def test_the_sdxl_rule_recipe_builds_a_graph_with_its_own_refiner_source(tmp_path):
    from builder.stages.pipeline import build_graph

    (tmp_path / "r.yaml").write_text(SDXL)
    graph = build_graph(load_recipe(tmp_path / "r.yaml", tmp_path))
    assert graph["rewrite:unet_refiner"].inputs == {"model": "source-refiner"}
    assert graph["source-refiner"].params["preset"] == "tiny-sdxl-refiner"
    assert graph["convert:vae_decoder"].params["precision"] == "float32"
    assert graph["convert:unet"].params["precision"] == "float16"


def test_refiner_needs_its_unet_and_the_other_way_round(tmp_path):
    found = _errors(tmp_path, SDXL.replace("  unet_refiner: {}\n", ""))
    assert set(found) == {"model.refiner"} and found["model.refiner"].line == 6
    found = _errors(tmp_path, SDXL.replace("  refiner: {synthetic: {preset: tiny-sdxl-refiner}}\n", ""))
    assert set(found) == {"components.unet_refiner"} and found["components.unet_refiner"].line == 14


def test_refiner_is_sdxl_only(tmp_path):
    text = SDXL.replace("family: sdxl", "family: sd").replace("  text_encoder_2: {}\n", "")
    text = text.replace("deployment_target: macOS14", "deployment_target: macOS13")
    found = _errors(tmp_path, text)
    assert set(found) == {"model.refiner", "components.unet_refiner"}


def test_refiner_takes_exactly_one_source(tmp_path):
    text = SDXL.replace("{synthetic: {preset: tiny-sdxl-refiner}}", "{}")
    assert set(_errors(tmp_path, text)) == {"model.refiner"}


def test_unknown_refiner_preset_is_named(tmp_path):
    error = _graph_error(tmp_path, SDXL.replace("preset: tiny-sdxl-refiner", "preset: nope"))
    assert (error.field, error.line) == ("model.refiner.synthetic.preset", 6)


def test_compressing_the_float32_sdxl_vae_is_refused(tmp_path):
    text = SDXL.replace("  vae_decoder: {}", "  vae_decoder: {compression: {mode: palettize, nbits: 8}}")
    error = _graph_error(tmp_path, text)
    assert (error.field, error.line) == ("components.vae_decoder.compression.mode", 16)
    assert "model.vae" in error.hint


def test_a_replacement_vae_must_be_a_folder(tmp_path):
    (tmp_path / "vae.safetensors").write_bytes(b"")
    (tmp_path / "sdxl").mkdir()
    text = SDXL.replace(
        "  synthetic: {preset: tiny-sdxl}\n", "  local: {path: sdxl}\n  vae: {local: {path: vae.safetensors}}\n"
    )
    found = _errors(tmp_path, text)
    assert set(found) == {"model.vae.local.path"} and found["model.vae.local.path"].line == 6


def test_size_rules_follow_the_family_unet_layout(tmp_path):
    base_only = SDXL.replace("  refiner: {synthetic: {preset: tiny-sdxl-refiner}}\n", "").replace(
        "  unet_refiner: {}\n", ""
    )
    # The SDXL base UNet halves the latents twice: multiples of 4 suffice; its refiner needs 8.
    load_recipe(_write(tmp_path, base_only.replace("[16, 16]", "[36, 36]")), tmp_path)
    found = _errors(tmp_path, SDXL.replace("[16, 16]", "[36, 36]"))
    assert "multiples of 8" in found["latent_size"].hint
    # SPLIT_EINSUM_V2: SDXL has no attention at full latent resolution, so level 0 is not checked...
    v2 = base_only.replace("attention: ORIGINAL", "attention: SPLIT_EINSUM_V2")
    load_recipe(_write(tmp_path, v2.replace("[16, 16]", "[40, 40]")), tmp_path)
    # ...but level 1 is: 768x768 pixels = latents 96 -> 48 x 48 = 2304 queries, not a multiple of 512.
    found = _errors(tmp_path, v2.replace("latent_size: [16, 16]", "image_size: [768, 768]"))
    assert "level 1 has length 2304" in found["image_size"].message


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "r.yaml"
    path.write_text(text)
    return path


def test_the_hub_recipes_validate(tmp_path):
    """sdxl-macos plans; sdxl-ios (whose chunk_unet another part of sdbuild provides) validates, and
    plans with chunking off."""
    from builder.stages.pipeline import build_graph

    ws = make_workspace(tmp_path / "ws")
    graph = build_graph(load_recipe(ws.root / "recipes" / "sdxl-macos.yaml", ws.root))
    assert graph["source"].params["revision"] == "462165984030d82259a11f4367a4eed129e94a7b"
    assert graph["convert:vae_decoder"].params["precision"] == "float32"
    loaded = load_recipe(ws.root / "recipes" / "sdxl-ios.yaml", ws.root)
    assert loaded.recipe.model.vae.hub.id == "madebyollin/sdxl-vae-fp16-fix"
    shutil.copy(ws.root / "recipes" / "sdxl-ios.yaml", ws.root / "recipes" / "unchunked.yaml")
    unchunked = ws.root / "recipes" / "unchunked.yaml"
    unchunked.write_text(unchunked.read_text().replace("chunk_unet: true", "chunk_unet: false"))
    graph = build_graph(load_recipe(unchunked, ws.root))
    assert graph["rewrite:vae_decoder"].inputs == {"model": "source-vae"}
    assert graph["source-vae"].params["kind"] == "vae_hub"
    assert graph["convert:vae_decoder"].params["precision"] == "float16"  # the replacement VAE is float16-safe
