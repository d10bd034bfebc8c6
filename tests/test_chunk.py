"""The chunked UNet: the torch cut, its balance, the chunk stages, the bundle and the contract."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from conftest import PROJECT, Workspace
from diffusers import UNet2DConditionModel

from builder.coreml.package import WEIGHTS_DIR, FeatureInfo, ModelInfo, describe_mlpackage, package_size
from builder.coreml.weights import compressed_const_names
from builder.recipe import load_recipe
from builder.sd.ane import rewrite_unet
from builder.sd.ane.controlnet import residual_names, residual_shapes, rewrite_controlled_unet
from builder.sd.chunk import balanced_boundary, parameter_bytes, split_unet, unet_steps
from builder.sd.components import ComponentShape, example_inputs, kind
from builder.sd.contract import check_models
from builder.sd.presets import get_preset
from builder.sd.synthetic import _randomize
from builder.stages.pipeline import build_graph

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _module(attention: str) -> torch.nn.Module:
    unet = UNet2DConditionModel(**get_preset("tiny-sd").unet).eval()
    _randomize(unet, torch.Generator().manual_seed(0))
    return rewrite_unet(unet, attention).eval()


UNET_INPUTS = ["sample", "timestep", "encoder_hidden_states"]


def _inputs() -> tuple[torch.Tensor, ...]:
    generator = torch.Generator().manual_seed(1)
    return (
        torch.randn(2, 4, 16, 16, generator=generator),
        torch.tensor([981.0, 981.0]),
        torch.randn(2, 32, 1, 77, generator=generator),
    )


@pytest.mark.parametrize("attention", ["ORIGINAL", "SPLIT_EINSUM"])
def test_chunk_chain_equals_the_whole_module(attention):
    module = _module(attention)
    chunks = split_unet(module, UNET_INPUTS)
    with torch.no_grad():
        whole = module(*_inputs())
        chained = chunks.chain(*_inputs())
    assert len(chained) == 1 and chained[0].shape == whole.shape
    torch.testing.assert_close(chained[0], whole, rtol=0, atol=1e-6)
    # Chunk 2 needs the text states (it holds attention) but not the sample or timestep.
    assert chunks.second.input_names[-1] == "encoder_hidden_states"
    assert not {"sample", "timestep"} & set(chunks.second.input_names)
    assert set(chunks.second.input_names) <= set(chunks.first.output_names) | set(chunks.first.input_names)


@pytest.mark.parametrize("preset", ["tiny-sdxl", "tiny-sdxl-refiner"])
def test_sdxl_chunk_chain_equals_the_whole_module(preset):
    """SDXL's added conditioning (text_embeds, time_ids) is consumed by chunk 1's time embedding."""
    unet = UNet2DConditionModel(**get_preset(preset).unet).eval()
    _randomize(unet, torch.Generator().manual_seed(0))
    unet_kind = kind("unet")
    specs = unet_kind.inputs(unet, ComponentShape(latent_size=(16, 16), batch_size=2))
    example = example_inputs("unet", unet, specs)
    module = rewrite_unet(unet, "SPLIT_EINSUM").eval()
    chunks = split_unet(module, [spec.name for spec in specs])
    inputs = [example[spec.name] for spec in specs]
    with torch.no_grad():
        whole = module(*inputs)
        chained = chunks.chain(*inputs)
    torch.testing.assert_close(chained[0], whole, rtol=0, atol=1e-6)
    assert {"text_embeds", "time_ids"} <= set(chunks.first.input_names)
    assert not {"text_embeds", "time_ids"} & set(chunks.second.input_names)


def test_controlled_unet_chunk_chain_adds_the_controlnet_residuals():
    """A chunked ControlledUnet adds every additional_residual_<i> where the whole one does."""
    unet = UNet2DConditionModel(**get_preset("tiny-sd").unet).eval()
    _randomize(unet, torch.Generator().manual_seed(0))
    shapes = residual_shapes(unet, 2, (16, 16))
    names = list(residual_names(len(shapes)))
    generator = torch.Generator().manual_seed(2)
    residuals = [torch.randn(shape, generator=generator) for shape in shapes]
    module = rewrite_controlled_unet(unet, "SPLIT_EINSUM").eval()
    chunks = split_unet(module, UNET_INPUTS + names)
    with torch.no_grad():
        whole = module(*_inputs(), *residuals)
        plain = module(*_inputs(), *(torch.zeros_like(r) for r in residuals))
        chained = chunks.chain(*_inputs(), *residuals)
    torch.testing.assert_close(chained[0], whole, rtol=0, atol=1e-6)
    assert not torch.allclose(whole, plain), "the residuals must change the prediction for this test to mean anything"
    taken = set(chunks.first.input_names[3:]) | {n for n in chunks.second.input_names if n in names}
    assert taken == set(names)


def test_chunks_split_the_parameters_under_their_original_names():
    module = _module("ORIGINAL")
    chunks = split_unet(module, UNET_INPUTS)
    whole = dict(module.named_parameters())
    first, second = dict(chunks.first.named_parameters()), dict(chunks.second.named_parameters())
    assert not set(first) & set(second)
    assert set(first) | set(second) == set(whole)
    assert all(first[name] is whole[name] for name in first)  # shared, not copied
    assert "unet.time_embedding.linear_1.weight" in first and "unet.conv_out.weight" in second
    with torch.no_grad():
        traced = torch.jit.trace(chunks.first, _inputs(), check_trace=False)
    assert set(dict(traced.named_parameters())) == set(first)  # no weight baked in as a constant


def test_cut_balances_parameter_bytes():
    unet = _module("ORIGINAL").unet
    steps = unet_steps(unet)
    sizes = [parameter_bytes(unet, step) for step in steps]
    assert sum(sizes) == sum(p.numel() * p.element_size() for p in unet.parameters())
    boundary = balanced_boundary(unet, steps)
    imbalance = [abs(sum(sizes[k:]) - sum(sizes[:k])) for k in range(2, len(steps))]
    assert abs(sum(sizes[boundary:]) - sum(sizes[:boundary])) == min(imbalance)
    first, second = split_unet(_module("ORIGINAL"), UNET_INPUTS).parameter_bytes
    assert 0.45 < first / (first + second) < 0.55


def test_blocks_the_steps_do_not_reproduce_are_refused():
    config = get_preset("tiny-sd").unet | {
        "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["ResnetDownsampleBlock2D"]
    }
    with torch.device("meta"):
        unet = UNet2DConditionModel(**config)
    with pytest.raises(ValueError, match=r"down_block_types\[3\]='ResnetDownsampleBlock2D' cannot be chunked"):
        unet_steps(unet)


def _info(inputs, outputs):
    return ModelInfo(
        inputs=[FeatureInfo(name=n, shape=s, dtype="float16") for n, s in inputs],
        outputs=[FeatureInfo(name=n, shape=s, dtype="float16") for n, s in outputs],
    )


def test_contract_checks_chunks():
    unet_inputs = [("sample", [2, 4, 8, 8]), ("timestep", [2]), ("encoder_hidden_states", [2, 32, 1, 77])]
    models = {
        "TextEncoder": ModelInfo(
            inputs=[FeatureInfo(name="input_ids", shape=[1, 77], dtype="float32")],
            outputs=[FeatureInfo(name="last_hidden_state", shape=[1, 77, 32], dtype="float16")],
        ),
        "VAEDecoder": _info([("z", [1, 4, 8, 8])], [("image", [1, 3, 64, 64])]),
        "UnetChunk1": _info(unet_inputs, [("hidden_states", [2, 64, 2, 2]), ("skip_0", [2, 32, 8, 8])]),
        "UnetChunk2": _info(
            [("hidden_states", [2, 64, 2, 2]), ("skip_0", [2, 32, 8, 8]), ("encoder_hidden_states", [2, 32, 1, 77])],
            [("noise_pred", [2, 4, 8, 8])],
        ),
    }
    assert check_models("sd", models, latent_size=(8, 8), batch_size=2) == []
    wrong = dict(models)
    wrong["UnetChunk2"] = _info(
        [("hidden_states", [2, 64, 4, 4]), ("skip_9", [2, 32, 8, 8])], [("noise_pred", [2, 4, 4, 4])]
    )
    problems = check_models("sd", wrong, latent_size=(8, 8), batch_size=2)
    assert any("UnetChunk2: input hidden_states has shape [2, 64, 4, 4]" in p for p in problems)
    assert any("UnetChunk2: input skip_9 is neither" in p for p in problems)
    assert any("noise prediction" in p for p in problems)
    both = models | {"Unet": _info(unet_inputs, [("noise_pred", [2, 4, 8, 8])])}
    assert any(
        "ship the whole UNet or its chunks" in p for p in check_models("sd", both, latent_size=(8, 8), batch_size=2)
    )
    alone = {k: v for k, v in models.items() if k != "UnetChunk2"}
    problems = check_models("sd", alone, latent_size=(8, 8), batch_size=2)
    assert "missing required model Unet" in problems and any("must ship together" in p for p in problems)


def test_chunked_graph_runs_each_unet_stage_after_rewrite_per_chunk(tmp_path):
    shutil.copytree(PROJECT / "recipes", tmp_path / "recipes")
    recipe = tmp_path / "recipes" / "tiny-sd-mbp.yaml"
    recipe.write_text(recipe.read_text().replace("unet_batch_size: 2", "unet_batch_size: 2\nchunk_unet: true"))
    graph = {spec.id: spec for spec in build_graph(load_recipe(recipe, workspace=tmp_path))}
    unet = {
        i
        for i in graph
        if i.startswith(
            (
                "rewrite:unet",
                "trace:unet",
                "chunk:unet",
                "convert:unet",
                "palettize:unet",
                "verify:unet",
                "compile:unet",
            )
        )
    }
    per_chunk = {f"{s}:unet.chunk{k}" for s in ("chunk", "convert", "palettize", "verify", "compile") for k in (1, 2)}
    assert unet == per_chunk | {"rewrite:unet"}
    assert graph["verify:unet.chunk2"].inputs == {
        "rewritten": "rewrite:unet",
        "traced": "chunk:unet.chunk2",
        "float16": "convert:unet.chunk2",
        "handover": "verify:unet.chunk1",  # chunk 1's float16 and compressed outputs
        "first": "palettize:unet.chunk1",  # the mixed-bit workload runs both compressed chunks
        "model": "palettize:unet.chunk2",
        "probe": "analyze-inputs:unet",
    }
    assert "probe" not in graph["verify:unet.chunk1"].inputs and "handover" not in graph["verify:unet.chunk1"].inputs
    assert graph["chunk:unet.chunk2"].inputs == {"rewritten": "rewrite:unet", "first": "chunk:unet.chunk1"}
    assert {k for k in graph["bundle"].inputs if "unet" in k} == {
        f"{kind}.unet.chunk{k}" for kind in ("model", "compiled", "check", "verify") for k in (1, 2)
    }
    assert graph["bundle"].params["chunked"] == ["unet"]


def _chunked(ws: Workspace, on: bool) -> None:
    recipe = ws.root / "recipes" / "tiny-sd.yaml"
    text = recipe.read_text().replace("\nchunk_unet: true", "")
    recipe.write_text(text.replace("unet_batch_size: 2", "unet_batch_size: 2\nchunk_unet: true") if on else text)


@pytest.mark.slow
def test_chunked_build_ships_palettized_chunks_and_toggles_cheaply(built, tmp_path):
    ws, _ = built
    copy = Workspace(root=tmp_path / "ws", cache=ws.cache)
    shutil.copytree(ws.root / "recipes", copy.root / "recipes")
    _chunked(copy, True)
    plan = copy.plan_json()
    per_chunk = {f"{stage}:unet.chunk{k}" for stage in ("chunk", "convert", "palettize", "verify") for k in (1, 2)}
    assert {i for i, e in plan.items() if e["status"] == "stale"} == per_chunk | {"bundle"}
    assert plan["rewrite:unet"]["status"] == "cached"

    report = copy.build_json()
    assert {s["id"] for s in report["stages"] if s["status"] == "built"} == per_chunk | {"bundle"}
    resources = copy.bundle / "Resources"
    names = {p.name for p in resources.iterdir()}
    assert {"UnetChunk1.mlpackage", "UnetChunk2.mlpackage"} <= names and "Unet.mlpackage" not in names
    infos = {p.name.removesuffix(".mlpackage"): describe_mlpackage(p) for p in resources.glob("*.mlpackage")}
    assert check_models("sd", infos, latent_size=(16, 16), batch_size=2) == []
    assert infos["UnetChunk1"].inputs == describe_mlpackage(ws.bundle / "Resources" / "Unet.mlpackage").inputs

    manifest = json.loads((copy.bundle / "manifest.json").read_text())
    whole = json.loads((ws.bundle / "manifest.json").read_text())["models"]["Unet"]
    chunk_weights = 0
    for name in ("UnetChunk1", "UnetChunk2"):
        entry = manifest["models"][name]
        package = resources / f"{name}.mlpackage"
        assert len(compressed_const_names(package)) > 0  # the chunk itself is palettized
        assert 6 < entry["bits_per_weight"] < 8 and entry["compression"]["nbits"] == 6
        assert min(entry["read_back_psnr_db"].values()) > 25
        assert entry["psnr_db"]["noise_pred"] >= 35
        # The chain is the whole UNet cut in two: it scores what the unchunked trace scored.
        assert entry["psnr_db"] == whole["psnr_db"]
        assert entry["chunk"]["weight_bytes"] == package_size(package / WEIGHTS_DIR)
        chunk_weights += entry["chunk"]["weight_bytes"]
    first, second = (manifest["models"][n]["chunk"]["weight_bytes"] for n in ("UnetChunk1", "UnetChunk2"))
    assert 0.4 < first / (first + second) < 0.6
    # Each chunk carries only its own weights: together they weigh what the whole UNet does.
    whole_weights = package_size(ws.bundle / "Resources" / "Unet.mlpackage" / WEIGHTS_DIR)
    assert abs(chunk_weights - whole_weights) < 0.02 * whole_weights
    assert whole["chunk"] is None
    # Palettized chunk by chunk, the weights are those of the palettized whole UNet: same end-to-end PSNR.
    chain = manifest["models"]["UnetChunk2"]["chunk"]["chain_read_back_psnr_db"]["noise_pred"]
    assert chain == whole["read_back_psnr_db"]["noise_pred"]
    assert manifest["models"]["UnetChunk1"]["chunk"]["chain_read_back_psnr_db"] is None

    _chunked(copy, False)  # back to the whole UNet: everything is still cached
    assert {e["status"] for e in copy.plan_json().values()} <= {"cached", "skipped"}


@pytest.mark.slow
def test_chunked_mixed_bit_unet_meets_the_recipe_files_prediction(built, tmp_path):
    ws, _ = built
    copy = Workspace(root=tmp_path / "ws", cache=ws.cache)
    shutil.copytree(ws.root / "recipes", copy.root / "recipes")
    recipe = copy.root / "recipes" / "tiny-sd-mbp.yaml"
    recipe.write_text(recipe.read_text().replace("unet_batch_size: 2", "unet_batch_size: 2\nchunk_unet: true"))
    report = copy.build_json("recipes/tiny-sd-mbp.yaml")
    status = {s["id"]: s["status"] for s in report["stages"]}
    assert status["rewrite:unet"] == "hit" and "palettize:unet" not in status
    manifest = json.loads((copy.root / "artifacts" / "tiny-sd-mbp" / "latest" / "manifest.json").read_text())
    first, second = manifest["models"]["UnetChunk1"], manifest["models"]["UnetChunk2"]
    for name in ("UnetChunk1", "UnetChunk2"):
        package = copy.root / "artifacts" / "tiny-sd-mbp" / "latest" / "Resources" / f"{name}.mlpackage"
        assert len(compressed_const_names(package)) > 0
    # Scored once, with both chunks' read-back weights in the whole UNet, on the analysis workload.
    assert first["mixed_bit"] is None
    mixed = second["mixed_bit"]
    assert mixed["achieved_psnr_db"] >= mixed["target_psnr_db"] - 0.5
    assert abs(mixed["achieved_psnr_db"] - mixed["predicted_psnr_db"]) <= 0.5
