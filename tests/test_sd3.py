"""SD3 on the tiny preset: the text encoders as diffusers' SD3 pipeline conditions on them, one full
build of recipes/tiny-sd3.yaml read back against the Swift contract (names, shapes, tokenizer files,
per-component PSNR, the palettized MMDiT's read-back), and the sd3 recipe rules."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import Workspace, make_workspace

from builder.coreml.package import describe_mlpackage
from builder.errors import RecipeError, RecipeErrors, UserError
from builder.recipe import load_recipe
from builder.sd.contract import check_models

MODELS = ("TextEncoder", "TextEncoder2", "TextEncoderT5", "MultiModalDiffusionTransformer", "VAEDecoder", "VAEEncoder")


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from builder.sd.presets import get_preset
    from builder.sd.synthetic import write_synthetic_pipeline

    folder = tmp_path_factory.mktemp("sd3-pipeline") / "tiny-sd3"
    write_synthetic_pipeline(get_preset("tiny-sd3"), 0, folder)
    return folder


def _conversion_module(folder: Path, component: str):
    from builder.sd.components import kind

    k = kind(component, "sd3")
    return k.wrap(k.load(folder, k.subfolder).eval(), "ORIGINAL").eval()


def test_the_swift_conditioning_equals_diffusers_sd3_pipeline(pipeline, one_torch_thread):
    """CLIP-L and CLIP-G penultimate states side by side, zero-padded to T5's width, then T5's states on
    the token axis (as StableDiffusion3Pipeline.swift assembles them from the three conversion modules)
    are diffusers' prompt_embeds with 77 T5 tokens; both pooled outputs are its pooled_prompt_embeds.
    The MMDiT module on them equals diffusers' transformer, and every input changes its output."""
    import torch
    from diffusers import StableDiffusion3Pipeline

    pipe = StableDiffusion3Pipeline.from_pretrained(pipeline, use_safetensors=True)
    prompt = "a photo of a cat holding a sign that says hello world"
    with torch.no_grad():
        embeds, _, pooled, _ = pipe.encode_prompt(
            prompt, prompt, prompt, device="cpu", do_classifier_free_guidance=False, max_sequence_length=77
        )
        states, pools = [], []
        for component, tokenizer in (("text_encoder", pipe.tokenizer), ("text_encoder_2", pipe.tokenizer_2)):
            ids = tokenizer(prompt, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
            hidden, pooled_output = _conversion_module(pipeline, component)(ids.float())
            states.append(hidden)
            pools.append(pooled_output)
        t5_ids = pipe.tokenizer_3(prompt, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
        t5 = _conversion_module(pipeline, "text_encoder_3")(t5_ids.input_ids.float())
        clip = torch.cat(states, dim=-1)
        clip = torch.nn.functional.pad(clip, (0, t5.shape[1] - clip.shape[-1]))
        tokens = torch.cat([clip.transpose(1, 2).unsqueeze(2), t5], dim=-1)
        swift_pooled = torch.cat(pools, dim=-1)
    assert t5.shape == (1, 128, 1, 77) and tokens.shape == (1, 128, 1, 154)
    torch.testing.assert_close(tokens.squeeze(2).transpose(1, 2), embeds, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(swift_pooled, pooled, rtol=1e-4, atol=1e-4)

    mmdit = _conversion_module(pipeline, "mmdit")
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 16, 16, 16, generator=generator)
    timestep = torch.tensor([937.5, 937.5])
    inputs = [latents, timestep, tokens.repeat(2, 1, 1, 1), swift_pooled.repeat(2, 1)[..., None, None]]
    with torch.no_grad():
        output = mmdit(*inputs)
        expected = pipe.transformer(
            hidden_states=latents,
            timestep=timestep,
            encoder_hidden_states=embeds.repeat(2, 1, 1),
            pooled_projections=pooled.repeat(2, 1),
        ).sample
        torch.testing.assert_close(output, expected, rtol=1e-4, atol=1e-4)
        for index in range(4):
            changed = list(inputs)
            changed[index] = changed[index] * 0.5 + 0.1
            assert (mmdit(*changed) - output).abs().max() > 1e-5, index


def test_the_t5_tokenizer_loads_as_diffusers_and_the_swift_package_read_it(pipeline):
    """tokenizer_3/ is a T5TokenizerFast with T5's special ids (pad 0, end 1), whose tokenizer.json and
    tokenizer_config.json are what the bundle ships."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(pipeline / "tokenizer_3")
    assert type(tokenizer).__name__.startswith("T5Tokenizer")  # transformers 5 names its fast one T5Tokenizer
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id) == (0, 1)
    ids = tokenizer("A cat, 2 Dogs!").input_ids
    assert ids[-1] == 1 and tokenizer.unk_token_id not in ids
    # the file as written (what the Swift package reads) splits text as transformers does
    from tokenizers import Tokenizer

    written = Tokenizer.from_file(str(pipeline / "tokenizer_3" / "tokenizer.json"))
    assert written.encode("A cat, 2 Dogs!").ids == ids
    assert json.loads((pipeline / "tokenizer_3" / "tokenizer_config.json").read_text())["tokenizer_class"]


# --- one full build of recipes/tiny-sd3.yaml ---------------------------------------------------


@pytest.fixture(scope="module")
def sd3_built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Workspace, dict]:
    ws = make_workspace(tmp_path_factory.mktemp("sd3-built"))
    return ws, ws.build_json("recipes/tiny-sd3.yaml")


def _resources(ws: Workspace) -> Path:
    return ws.root / "artifacts" / "tiny-sd3" / "latest" / "Resources"


def test_tiny_sd3_bundle_satisfies_the_swift_contract(sd3_built):
    ws, _ = sd3_built
    resources = _resources(ws)
    assert sorted(p.name for p in resources.iterdir()) == sorted(
        [f"{m}.mlpackage" for m in MODELS] + ["merges.txt", "vocab.json", "tokenizer.json", "tokenizer_config.json"]
    )
    infos = {m: describe_mlpackage(resources / f"{m}.mlpackage") for m in MODELS}
    assert check_models("sd3", infos, latent_size=(16, 16), batch_size=2) == []
    inputs = {m: {i.name: i.shape for i in info.inputs} for m, info in infos.items()}
    outputs = {m: {o.name: o.shape for o in info.outputs} for m, info in infos.items()}
    assert outputs["TextEncoder"] == {"hidden_embeds": [1, 77, 32], "pooled_outputs": [1, 32]}
    assert outputs["TextEncoder2"] == {"hidden_embeds": [1, 77, 64], "pooled_outputs": [1, 48]}
    assert inputs["TextEncoderT5"] == {"input_ids": [1, 77]}
    assert outputs["TextEncoderT5"] == {"encoder_hidden_states": [1, 128, 1, 77]}
    assert inputs["MultiModalDiffusionTransformer"] == {
        "latent_image_embeddings": [2, 16, 16, 16],
        "timestep": [2],
        "token_level_text_embeddings": [2, 128, 1, 154],
        "pooled_text_embeddings": [2, 32 + 48, 1, 1],
    }
    assert outputs["MultiModalDiffusionTransformer"] == {"denoiser_output": [2, 16, 16, 16]}
    assert inputs["VAEDecoder"] == {"z": [1, 16, 16, 16]} and outputs["VAEEncoder"] == {"latent_dist": [1, 32, 16, 16]}
    # The contract check catches a T5 of the wrong width and an MMDiT pooled input of the wrong width.
    sdxl_text = infos | {"TextEncoderT5": infos["TextEncoder2"]}
    assert any("TextEncoderT5" in p for p in check_models("sd3", sdxl_text, latent_size=(16, 16), batch_size=2))
    wrong = infos | {"TextEncoder2": infos["TextEncoder"]}
    problems = check_models("sd3", wrong, latent_size=(16, 16), batch_size=2)
    assert any("pooled_text_embeddings shape" in p for p in problems), problems
    missing = {m: i for m, i in infos.items() if m != "MultiModalDiffusionTransformer"}
    assert "missing required model MultiModalDiffusionTransformer" in check_models(
        "sd3", missing, latent_size=(16, 16), batch_size=2
    )


def test_tiny_sd3_manifest_records_psnr_precision_and_the_palettized_mmdit(sd3_built):
    ws, _ = sd3_built
    manifest = json.loads((_resources(ws).parent / "manifest.json").read_text())
    assert manifest["family"] == "sd3"
    assert (manifest["latent_scale_factor"], manifest["latent_shift_factor"]) == (1.5305, 0.0609)
    models = manifest["models"]
    assert set(models) == set(MODELS)
    for name, model in models.items():
        assert model["psnr_db"] and min(model["psnr_db"].values()) >= 35, name
    assert {n: m["precision"] for n, m in models.items()} == {n: "float16" for n in MODELS} | {
        "TextEncoderT5": "float32"
    }
    mmdit = models["MultiModalDiffusionTransformer"]
    assert mmdit["component"] == "mmdit"
    assert (mmdit["compression"]["mode"], mmdit["compression"]["nbits"]) == ("palettize", 6)
    # the palettized weights, rebuilt from their tables into the torch module, still give its output
    assert mmdit["read_back_psnr_db"]["denoiser_output"] >= 30, mmdit
    assert 6 <= mmdit["bits_per_weight"] < 16  # the tiny model's small tensors stay float16 (weight_threshold)
    assert models["TextEncoderT5"]["bits_per_weight"] == 32.0


def test_an_unreachable_hub_fails_in_one_line(sd3_built):
    ws, _ = sd3_built
    recipe = "recipes/sd3-medium-macos.yaml"
    done = ws.run("build", recipe, env={"HF_HUB_OFFLINE": "0", "HF_ENDPOINT": "https://hub.invalid"})
    assert done.returncode == 2, done.stderr
    [error, _fix] = [line for line in done.stderr.splitlines() if line.startswith(("error:", "  fix:"))]
    assert "sd3-medium-macos.yaml:8: model.hub.id" in error and "cannot fetch" in error
    assert "Traceback" not in done.stderr


# --- recipe rules ------------------------------------------------------------------------------

SD3 = """\
name: x
version: 0.1.0
family: sd3
model:
  synthetic: {preset: tiny-sd3}
latent_size: [16, 16]
attention: ORIGINAL
compute_unit: CPU_AND_GPU
deployment_target: macOS14
components:
  text_encoder: {}
  text_encoder_2: {}
  mmdit: {}
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


def test_the_sd3_rule_recipe_builds_a_graph_without_t5(tmp_path):
    from builder.stages.pipeline import build_graph

    path = tmp_path / "r.yaml"
    path.write_text(SD3)
    graph = build_graph(load_recipe(path, tmp_path))
    converted = {spec.component for spec in graph if spec.stage == "convert"}
    assert converted == {"text_encoder", "text_encoder_2", "mmdit", "vae_decoder"}


@pytest.mark.parametrize(
    ("edit", "field", "words"),
    [
        (("  mmdit: {}\n", ""), "components.mmdit", "sd3 needs its MMDiT"),
        (("  text_encoder_2: {}\n", ""), "components.text_encoder_2", "CLIP-G"),
        (("  mmdit: {}\n", "  mmdit: {}\n  unet: {}\n"), "components.unet", "not a UNet"),
        (("attention: ORIGINAL", "attention: SPLIT_EINSUM"), "attention", "one attention form"),
        (("deployment_target: macOS14", "deployment_target: macOS13"), "deployment_target", "macOS14"),
        (("components:", "unet_batch_size: 1\ncomponents:"), "unet_batch_size", "batch-2"),
        (("latent_size: [16, 16]", "latent_size: [16, 15]"), "latent_size", "multiple of 2"),
        (("family: sd3", "family: sd"), "components.mmdit", "only sd3"),
    ],
)
def test_sd3_recipe_rules(tmp_path, edit, field, words):
    errors = _errors(tmp_path, SD3.replace(*edit))
    assert field in errors and words in errors[field].message, {f: e.message for f, e in errors.items()}


def test_sd_and_sdxl_still_need_a_unet(tmp_path):
    text = SD3.replace("family: sd3", "family: sdxl").replace("tiny-sd3", "tiny-sdxl").replace("  mmdit: {}\n", "")
    assert "needs its UNet" in _errors(tmp_path, text)["components.unet"].message


def test_compressing_t5_is_refused_with_its_reason(tmp_path):
    from builder.stages.pipeline import build_graph

    path = tmp_path / "r.yaml"
    path.write_text(SD3 + "  text_encoder_3:\n    compression: {mode: palettize, nbits: 6}\n")
    with pytest.raises(RecipeError) as raised:
        build_graph(load_recipe(path, tmp_path))
    assert raised.value.field == "components.text_encoder_3.compression.mode"
    assert "overflows in float16" in str(raised.value)


def test_an_sd3_preset_under_another_family_is_named(tmp_path):
    from builder.stages.pipeline import build_graph

    text = SD3.replace("family: sd3", "family: sdxl").replace("  mmdit: {}\n", "  unet: {}\n")
    path = tmp_path / "r.yaml"
    path.write_text(text)
    with pytest.raises(RecipeError) as raised:
        build_graph(load_recipe(path, tmp_path))
    assert "tiny-sd3" in str(raised.value) and "sd3" in raised.value.hint


def test_t5_needs_a_preset_that_has_it(tmp_path):
    from builder.stages.pipeline import build_graph

    path = tmp_path / "r.yaml"
    path.write_text(SD3.replace("tiny-sd3", "sd3-medium") + "  text_encoder_3: {}\n")
    with pytest.raises(RecipeError) as raised:
        build_graph(load_recipe(path, tmp_path))
    assert raised.value.field == "components.text_encoder_3" and "tiny-sd3" in raised.value.hint


def test_a_hub_snapshot_of_an_sd3_pipeline_needs_the_t5_tokenizer_files(pipeline, tmp_path):
    """The cached-snapshot check knows SD3's T5 tokenizer (no config.json, no weights): complete with
    tokenizer.json and tokenizer_config.json, incomplete without them."""
    import shutil

    from builder.hub.layout import RepoKind, missing_files

    snapshot = tmp_path / "snapshot"
    shutil.copytree(pipeline, snapshot)
    assert missing_files(snapshot, RepoKind.PIPELINE) == []
    (snapshot / "tokenizer_3" / "tokenizer.json").unlink()
    assert missing_files(snapshot, RepoKind.PIPELINE) == ["tokenizer_3/tokenizer.json"]
