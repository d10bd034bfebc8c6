"""Mixed-bit analysis and the quality report on the tiny SDXL base: the workload's conditioning against
diffusers, candidates whose PSNR a fresh probe reproduces, a mixed-bit recipe palettized and verified,
and a report.

Stages run in this process (no workers), in graph order, like tests/test_report.py; shared stages
(source, rewrite, probe inputs) run once.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import make_workspace, run_stages_in_process

from builder.engine.spec import Graph
from builder.recipe import load_recipe
from builder.sd.mbp.analysis import Probe, ProbeSettings
from builder.sd.mbp.layers import conversion_layers
from builder.sd.mbp.recipe_file import load_recipe_file
from builder.stages.analyze import analysis_stages
from builder.stages.pipeline import build_graph
from builder.stages.trace import load_conversion_module

pytestmark = pytest.mark.usefixtures("one_torch_thread")

THRESHOLD = 2048  # the analysis' default weight threshold
TARGET_DB = 40.0
REFINER_TARGET_DB = 60.0  # one step: the refiner with every layer at 2 bits still scores about 55 dB
RECIPE = """\
name: tiny-sdxl-mixed
version: 0.1.0
family: sdxl
model:
  synthetic: {preset: tiny-sdxl, seed: 0}
latent_size: [16, 16]
attention: SPLIT_EINSUM
compute_unit: CPU_AND_NE
deployment_target: iOS17
components:
  text_encoder: {}
  text_encoder_2: {}
  unet:
    compression: COMPRESSION
  vae_decoder: {}
"""


@pytest.fixture(scope="module")
def analysed(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """`sdbuild analyze`'s stages on a tiny-sdxl recipe (2-bit only, one target: keeps it fast)."""
    ws = make_workspace(tmp_path_factory.mktemp("sdxl-mbp"))
    recipe = ws.root / "recipes" / "float16.yaml"
    recipe.write_text(RECIPE.replace("COMPRESSION", "{mode: float16}"))
    full = build_graph(load_recipe(recipe, workspace=ws.root))
    stages = analysis_stages(
        rewritten="rewrite:unet",
        model="source",
        description="tiny-sdxl UNet",
        memory_estimate_bytes=1 << 30,
        family="sdxl",
        chunks=1,
        nbits=(2,),
        targets_db=(TARGET_DB,),
    )
    work = ws.root / "work"
    work.mkdir()
    done: dict = {}
    outputs = run_stages_in_process(Graph([full["source"], full["rewrite:unet"], *stages]).order(), done, work)
    return {"ws": ws, "outputs": outputs, "done": done, "work": work}


def test_the_workload_conditions_the_unet_as_diffusers_sdxl_does(analysed, tmp_path):
    """Probe inputs against diffusers' encode_prompt (zeros for the unconditional half, as SDXL base
    sets force_zeros_for_empty_prompt) and _get_add_time_ids for a 128 x 128 image; then the same
    pipeline with force_zeros_for_empty_prompt off, where the empty prompt is encoded."""
    from diffusers import StableDiffusionXLPipeline
    from safetensors.torch import load_file

    from builder.sd.conditioning import TextConditioning

    source, prompts = analysed["outputs"]["source"], list(ProbeSettings().prompts)
    probe = load_file(analysed["outputs"]["analyze-inputs:unet"] / "probe.safetensors")
    folder = tmp_path / "no-zeros"
    shutil.copytree(source, folder)
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps(index | {"force_zeros_for_empty_prompt": False}))
    for pipeline, ours in ((source, probe), (folder, TextConditioning(folder, "sdxl", (16, 16)).guided(prompts))):
        pipe = StableDiffusionXLPipeline.from_pretrained(pipeline, use_safetensors=True)
        with torch.no_grad():
            embeds, negative, pooled, negative_pooled = pipe.encode_prompt(prompts, device="cpu")
        zeros = pipe.config.force_zeros_for_empty_prompt
        assert zeros == (pipeline == source)
        assert bool(negative.abs().sum() == 0) == zeros
        time_ids = pipe._get_add_time_ids(
            (128, 128),
            (0, 0),
            (128, 128),
            torch.float32,
            text_encoder_projection_dim=pipe.text_encoder_2.config.projection_dim,
        )
        hidden = ours["encoder_hidden_states"]
        assert hidden.shape == (4, 96, 1, 77)  # unconditional half first; text_encoder 32 + text_encoder_2 64
        torch.testing.assert_close(
            hidden.squeeze(2).transpose(1, 2), torch.cat([negative, embeds]), rtol=1e-4, atol=1e-4
        )
        torch.testing.assert_close(ours["text_embeds"], torch.cat([negative_pooled, pooled]), rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(ours["time_ids"], time_ids.expand(4, 6))


def test_candidates_measure_real_psnr(analysed):
    outputs = analysed["outputs"]
    analysis = json.loads((outputs["analyze:unet"] / "analysis.json").read_text())
    [found] = analysis["candidates"]
    recipe = load_recipe_file(outputs["analyze:unet"] / "recipes" / f"{TARGET_DB:g}db.yaml")
    widths = set(recipe.layers.values())
    assert widths == {2, None} and found["bits_per_weight"] < 16  # some layers at 2 bits, some kept float16
    assert recipe.psnr_db == found["psnr_db"] >= TARGET_DB

    module, _ = load_conversion_module(outputs["rewrite:unet"])
    layers = conversion_layers(outputs["rewrite:unet"], THRESHOLD)
    fresh = Probe(module, outputs["analyze-inputs:unet"], layers)  # nothing of the search's state
    assert abs(fresh.psnr(recipe.layers) - recipe.psnr_db) < 0.05
    unchanged = fresh.psnr({})  # float16 against itself: only the PSNR formula's epsilon bounds it
    assert unchanged > 150
    # The SDXL inputs reach the UNet: changing text_embeds or time_ids changes the float16 result.
    for index in (1, 2):  # text_embeds, time_ids (after the text states)
        kept = fresh.conditioning[index]
        fresh.conditioning[index] = kept + 1.0
        assert fresh.psnr({}) < 100, index
        fresh.conditioning[index] = kept


@pytest.fixture(scope="module")
def mixed(analysed) -> dict[str, Path]:
    """The bundle of a tiny-sdxl recipe whose UNet uses the analysis' 40 dB recipe file."""
    ws, outputs = analysed["ws"], analysed["outputs"]
    mbp = ws.root / "recipes" / "mbp.yaml"
    shutil.copy(outputs["analyze:unet"] / "recipes" / f"{TARGET_DB:g}db.yaml", mbp)
    recipe = ws.root / "recipes" / "mixed.yaml"
    recipe.write_text(RECIPE.replace("COMPRESSION", "{mode: mixed, recipe: mbp.yaml}"))
    graph = build_graph(load_recipe(recipe, workspace=ws.root))
    assert graph["analyze-inputs:unet"].params["family"] == "sdxl"
    produced = run_stages_in_process(graph.order(), analysed["done"], analysed["work"])
    # The build scores the recipe on the analysis' own probe inputs (same params and inputs), so PSNRs compare.
    assert produced["analyze-inputs:unet"] == outputs["analyze-inputs:unet"]
    return produced


def test_mixed_recipe_palettizes_and_verifies_the_unet(mixed):
    done = mixed
    check = json.loads((done["verify:unet"] / "check.json").read_text())
    mixed = check["mixed_bit"]
    assert (
        mixed["predicted_psnr_db"] >= TARGET_DB and abs(mixed["achieved_psnr_db"] - mixed["predicted_psnr_db"]) <= 0.5
    )
    assert 0 < check["read_back_psnr_db"]["noise_pred"] < 100  # really compressed
    widths = {w["nbits"] for w in json.loads((done["palettize:unet"] / "report.json").read_text())["weights"]}
    assert widths == {2, None}


def test_report_on_the_mixed_sdxl_bundle(analysed, mixed):
    from PIL import Image

    from builder.report import write_report

    bundle = mixed["bundle"]
    report = write_report(
        bundle,
        pipeline=mixed["source"],
        verified=[mixed["verify:unet"]],
        candidates=analysed["outputs"]["analyze:unet"] / "candidates.json",
        prompts=["a red apple"],
        seeds=[0],
        steps=2,
    )
    text = report.read_text()
    for model in ("TextEncoder", "TextEncoder2", "Unet", "VAEDecoder"):
        assert f"| {model} |" in text
    assert "Family sdxl" in text and "images/0-0.png" in text
    with Image.open(bundle / "report" / "images" / "0-0.png") as image:
        assert image.size == (2 * 128, 128)
        left, right = image.crop((0, 0, 128, 128)), image.crop((128, 0, 256, 128))
        assert left.tobytes() != right.tobytes()  # the 2-bit layers change the picture
    with Image.open(bundle / "report" / "psnr_vs_size.png") as plot:
        plot.verify()


@pytest.fixture(scope="module")
def refiner(analysed) -> str:
    """`sdbuild analyze --component unet_refiner`'s stages (2-bit, one target, one prompt, one step) on a
    recipe with a refiner; returns that recipe's text up to its unet_refiner line."""
    ws, outputs = analysed["ws"], analysed["outputs"]
    source = "  refiner:\n    synthetic: {preset: tiny-sdxl-refiner, seed: 0}\n"
    text = RECIPE.replace("COMPRESSION", "{mode: float16}").replace("latent_size:", source + "latent_size:", 1)
    recipe = ws.root / "recipes" / "refiner.yaml"
    recipe.write_text(text + "  unet_refiner: {}\n")
    full = build_graph(load_recipe(recipe, workspace=ws.root))
    stages = analysis_stages(
        rewritten="rewrite:unet_refiner",
        model="source-refiner",
        description="tiny-sdxl refiner",
        memory_estimate_bytes=1 << 30,
        family="sdxl",
        component="unet_refiner",
        chunks=1,
        probe=ProbeSettings(prompts=("a red bicycle",), steps=1),
        nbits=(2,),
        targets_db=(REFINER_TARGET_DB,),
    )
    specs = Graph([full["source-refiner"], full["rewrite:unet_refiner"], *stages]).order()
    outputs.update(run_stages_in_process(specs, analysed["done"], analysed["work"]))
    return text


def test_the_refiner_workload_conditions_as_diffusers_img2img_does(analysed, refiner):
    """The refiner pipeline (text_encoder_2 only, force_zeros_for_empty_prompt off, aesthetic-score
    time_ids) against StableDiffusionXLImg2ImgPipeline's encode_prompt and _get_add_time_ids."""
    from diffusers import StableDiffusionXLImg2ImgPipeline

    from builder.sd.conditioning import TextConditioning

    folder, prompts = analysed["outputs"]["source-refiner"], ["a red bicycle", "a lighthouse"]
    ours = TextConditioning(folder, "sdxl", (16, 16)).guided(prompts)
    pipe = StableDiffusionXLImg2ImgPipeline.from_pretrained(folder, use_safetensors=True)
    assert pipe.text_encoder is None and not pipe.config.force_zeros_for_empty_prompt
    with torch.no_grad():
        embeds, negative, pooled, negative_pooled = pipe.encode_prompt(prompts, device="cpu")
    assert negative.abs().sum() > 0  # the empty prompt, encoded
    size, crop = (128, 128), (0, 0)
    time_ids, negative_time_ids = pipe._get_add_time_ids(
        size,
        crop,
        size,
        6.0,
        2.5,
        size,
        crop,
        size,
        torch.float32,
        text_encoder_projection_dim=pipe.text_encoder_2.config.projection_dim,
    )
    assert ours["encoder_hidden_states"].shape == (4, 64, 1, 77)
    torch.testing.assert_close(
        ours["encoder_hidden_states"].squeeze(2).transpose(1, 2), torch.cat([negative, embeds]), rtol=1e-4, atol=1e-4
    )
    torch.testing.assert_close(ours["text_embeds"], torch.cat([negative_pooled, pooled]), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(ours["time_ids"], torch.cat([negative_time_ids.expand(2, 5), time_ids.expand(2, 5)]))


def test_refiner_candidate_is_real_and_a_mixed_refiner_recipe_is_planned(analysed, refiner):
    """The refiner's candidate reproduced by a fresh probe; a recipe using it palettizes the refiner and
    scores it on the refiner's own workload. (`sdbuild build` of such a recipe is in the README figures.)"""
    ws, outputs = analysed["ws"], analysed["outputs"]
    produced = outputs["analyze:unet_refiner"] / "recipes" / f"{REFINER_TARGET_DB:g}db.yaml"
    found = load_recipe_file(produced)
    assert set(found.layers.values()) == {2, None} and found.psnr_db >= REFINER_TARGET_DB
    module, _ = load_conversion_module(outputs["rewrite:unet_refiner"])
    fresh = Probe(
        module, outputs["analyze-inputs:unet_refiner"], conversion_layers(outputs["rewrite:unet_refiner"], THRESHOLD)
    )
    assert [tuple(c.shape) for c in fresh.conditioning] == [(2, 64, 1, 77), (2, 48), (2, 5)]
    assert abs(fresh.psnr(found.layers) - found.psnr_db) < 0.05

    shutil.copy(produced, ws.root / "recipes" / "refiner-mbp.yaml")
    recipe = ws.root / "recipes" / "refiner-mixed.yaml"
    recipe.write_text(refiner + "  unet_refiner: {compression: {mode: mixed, recipe: refiner-mbp.yaml}}\n")
    graph = build_graph(load_recipe(recipe, workspace=ws.root))
    assert graph["palettize:unet_refiner"].external_inputs["mbp_recipe"] == ws.root / "recipes" / "refiner-mbp.yaml"
    verify, probe = graph["verify:unet_refiner"], graph["analyze-inputs:unet_refiner"]
    assert verify.inputs["probe"] == probe.id and probe.inputs["model"] == "source-refiner"


def test_analysing_a_component_the_recipe_lacks_is_a_user_error(workspace):
    done = workspace.run("analyze", "recipes/tiny-sd.yaml", "--component", "unet_refiner")
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "does not convert unet_refiner" in done.stderr and "components.unet_refiner" in done.stderr
