"""W8A8 UNets: the traceable twin of the conversion module, the shared sensitivity schedule against
Apple's per-layer one, the decisions, the recipe rules, joint palettization, and builds of
recipes/tiny-sd-w8a8.yaml (killed during its sensitivity analysis, then resumed) and of
recipes/tiny-sdxl-w8a8.yaml."""

from __future__ import annotations

import contextlib
import copy
import importlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import PROJECT, Workspace, make_workspace, run_stages_in_process
from safetensors.torch import load_file

from builder.errors import RecipeError, RecipeErrors, UserError
from builder.recipe import load_recipe
from builder.recipe.calibration import BUILT_IN_PROMPTS
from builder.stages.pipeline import build_graph

W8A8_RECIPE = PROJECT / "recipes" / "tiny-sd-w8a8.yaml"


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from builder.sd.presets import get_preset
    from builder.sd.synthetic import write_synthetic_pipeline

    folder = tmp_path_factory.mktemp("tiny-sd") / "pipeline"
    write_synthetic_pipeline(get_preset("tiny-sd"), 0, folder)
    return folder


def _rewritten(pipeline: Path, attention: str, size: int, work: Path) -> Path:
    from builder.stages import rewrite

    out = work / f"rewrite-{attention}-{size}"
    out.mkdir()
    params = {"component": "unet", "family": "sd", "attention": attention, "latent_size": [size, size], "batch_size": 2}
    rewrite.run({"model": pipeline}, params, out)
    return out


def _module(rewritten: Path):
    from builder.stages.w8a8 import _unet

    module, unet, example, _ = _unet(rewritten)
    return module, unet, example


@pytest.mark.parametrize(("attention", "size"), [("ORIGINAL", 16), ("SPLIT_EINSUM", 16), ("SPLIT_EINSUM_V2", 32)])
def test_the_traceable_unet_computes_what_the_conversion_module_does(
    pipeline, attention, size, tmp_path, one_torch_thread
):
    from builder.sd.w8a8.unet import AttentionCore

    module, unet, example = _module(_rewritten(pipeline, attention, size, tmp_path))
    with torch.no_grad():
        assert torch.equal(unet(*example), module(*example))
    cores = [m for m in unet.modules() if isinstance(m, AttentionCore)]
    layers = unet.layers()
    assert len(cores) == sum(layer.kind == "attention" for layer in layers) > 0
    assert all(layer.name.startswith("unet.") for layer in layers)
    assert "unet.up_blocks.1.attentions.0.transformer_blocks.0.attn1.einsum" in {layer.name for layer in layers}
    if attention == "SPLIT_EINSUM_V2":  # 32 x 32 latents: 1024 queries at the top level, cut in two
        assert {core.chunks for core in cores} == {2, 1}


def test_the_shared_schedule_scores_layers_as_apples_per_layer_schedule_does(pipeline, tmp_path, one_torch_thread):
    """One calibration for every layer, then each layer's fake quantizers alone, gives what preparing,
    calibrating and finalizing a model per layer gives (Apple's schedule), to a fraction of a dB."""
    from builder.sd.mbp.analysis import Probe, ProbeSettings, write_probe_inputs
    from builder.sd.w8a8.calibration import load_samples, record_samples, save_samples
    from builder.sd.w8a8.quantizer import Prepared, sensitivity_config
    from builder.sd.w8a8.sensitivity import SharedSchedule, single_layer_scores

    rewritten = _rewritten(pipeline, "SPLIT_EINSUM", 16, tmp_path)
    module, unet, example = _module(rewritten)
    save_samples(record_samples(module, pipeline, "sd", (16, 16), ["a cat on a sofa"], 2, 0), tmp_path)
    samples = load_samples(tmp_path)
    probe_inputs = tmp_path / "probe"
    write_probe_inputs(pipeline, "sd", (16, 16), 4, ProbeSettings(prompts=("a red bicycle",), steps=1), probe_inputs)
    layers = unet.layers()
    prepared = Prepared(unet, sensitivity_config([layer.name for layer in layers]), example)
    prepared.calibrate(samples)
    schedule = SharedSchedule(prepared, layers, probe_inputs)
    picked = [
        "unet.conv_in",  # the first layer: its input is the model's
        "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_k",  # reads the tensor to_q and to_v read
        "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.einsum",  # an attention core
        "unet.up_blocks.1.resnets.0.conv1",  # reads a skip concatenation
    ]
    _, float_unet, _ = _module(rewritten)
    oracle = Probe(float_unet, probe_inputs, [])
    for name in picked:
        ours = schedule.scores(name).latent_psnr_db
        _, alone, _ = _module(rewritten)
        apple = single_layer_scores(alone, name, example, samples, oracle).latent_psnr_db
        assert abs(ours - apple) < 0.5, (name, ours, apple)
        assert ours < 200  # really quantized: float16 against itself scores far higher


def test_calibration_observes_weights_once_and_finalizing_copies_no_weight_with_the_same_results(
    pipeline, tmp_path, one_torch_thread, monkeypatch
):
    """Weights are the same in every sample, so observing them on the first one only leaves every
    range (weights' and activations') exactly as observing everything on every sample does; and
    finalizing without copying the weights gives the model finalizing with torch's copy gives."""
    from builder.sd.w8a8 import quantizer
    from builder.sd.w8a8.calibration import load_samples, record_samples, save_samples
    from builder.sd.w8a8.quantizer import Prepared, cumulative_config

    rewritten = _rewritten(pipeline, "ORIGINAL", 16, tmp_path)
    module, unet, example = _module(rewritten)
    save_samples(record_samples(module, pipeline, "sd", (16, 16), ["a cat on a sofa"], 3, 0), tmp_path)
    samples = load_samples(tmp_path)
    calibrated = Prepared(unet, cumulative_config([]), example)
    assert calibrated.calibrate(samples) == len(samples) > 1
    weights = calibrated.weight_quantizers()
    assert weights and not any(bool(q.observer_enabled[0]) for q in weights.values())
    everything = Prepared(_module(rewritten)[1], cumulative_config([]), example)
    with torch.no_grad():
        for sample in samples:
            everything.model(*sample)
    assert all(bool(q.observer_enabled[0]) for q in everything.weight_quantizers().values())
    calibrated.freeze()  # as every caller does before reading the ranges
    everything.freeze()
    ours, theirs = calibrated.state(), everything.state()
    assert ours.keys() == theirs.keys()
    differ = [key for key in ours if not torch.equal(ours[key], theirs[key])]
    assert not differ, [(k, ours[k], theirs[k]) for k in differ[:3]]

    # finalizing: torch's convert copies the modules with the weights shared, and converts the same
    fx_convert = importlib.import_module("torch.ao.quantization.fx.convert")
    with quantizer.tensors_shared_by_module_copies(calibrated.model):
        copied = fx_convert.copy.deepcopy(dict(calibrated.model.named_modules()))
    assert fx_convert.copy is copy
    conv_in = calibrated.model.get_submodule("unet.conv_in")
    assert copied["unet.conv_in"] is not conv_in and copied["unet.conv_in"].weight is conv_in.weight
    shared = calibrated.finalize()
    monkeypatch.setattr(quantizer, "tensors_shared_by_module_copies", lambda model: contextlib.nullcontext())
    plain = everything.finalize()
    assert shared.code == plain.code
    ours, theirs = shared.state_dict(), plain.state_dict()
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(a, theirs[k]) if isinstance(a, torch.Tensor) else a == theirs[k] for k, a in ours.items())
    with torch.no_grad():
        assert torch.equal(shared(*example), plain(*example))


def test_decisions_follow_the_thresholds_and_both_overrides():
    from builder.sd.w8a8.decisions import Thresholds, decide, w8a32_layers
    from builder.sd.w8a8.unet import Layer

    layers = [
        Layer("unet.down_blocks.0.resnets.0.conv1", "conv"),
        Layer("unet.up_blocks.1.resnets.0.conv1", "conv"),
        Layer("unet.up_blocks.1.resnets.0.conv2", "conv"),
        Layer("unet.up_blocks.0.upsamplers.0.conv", "conv"),
        Layer("unet.mid_block.attentions.0.transformer_blocks.0.attn1.to_out", "conv"),
        Layer("unet.mid_block.attentions.0.transformer_blocks.0.attn1.einsum", "attention"),
        Layer("unet.mid_block.attentions.0.transformer_blocks.0.attn2.einsum", "attention"),
    ]
    psnr = dict(zip([layer.name for layer in layers], [39.0, 20.0, 35.0, 10.0, 90.0, 29.0, 31.0], strict=True))
    decided = decide(layers, psnr, Thresholds())
    assert w8a32_layers(decided) == sorted(
        [
            "unet.down_blocks.0.resnets.0.conv1",  # below 40 dB
            "unet.up_blocks.1.resnets.0.conv2",  # below 40 dB, and not a conv1
            "unet.mid_block.attentions.0.transformer_blocks.0.attn1.to_out",  # to_out, whatever it measured
            "unet.mid_block.attentions.0.transformer_blocks.0.attn1.einsum",  # below 30 dB
        ]
    )
    assert decided["unet.up_blocks.1.resnets.0.conv1"].why == "quantize_up_convs"
    assert decided["unet.up_blocks.0.upsamplers.0.conv"].activations == "int8"
    plain = decide(layers, psnr, Thresholds(quantize_up_convs=False, to_out_w8a32=False, conv_psnr=30))
    assert w8a32_layers(plain) == sorted(
        [
            "unet.up_blocks.1.resnets.0.conv1",
            "unet.up_blocks.0.upsamplers.0.conv",
            "unet.mid_block.attentions.0.transformer_blocks.0.attn1.einsum",
        ]
    )
    with pytest.raises(ValueError, match="not measured"):
        decide(layers, {}, Thresholds())


def _recipe(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "w8a8.yaml"
    path.write_text(text)
    return path


def _refusal(tmp_path: Path, text: str) -> str:
    with pytest.raises((RecipeError, RecipeErrors)) as raised:
        build_graph(load_recipe(_recipe(tmp_path, text), workspace=tmp_path))
    return raised.value.render()


def test_w8a8_recipes_are_checked_before_anything_runs(tmp_path):
    text = W8A8_RECIPE.read_text()
    old = _refusal(tmp_path, text.replace("deployment_target: iOS17", "deployment_target: macOS13"))
    assert "w8a8.yaml:" in old and "deployment_target:" in old and "iOS17 or macOS14" in old
    joint = text.replace(
        "sensitivity: {prompts: 1, steps: 1}", "sensitivity: {prompts: 1, steps: 1}\n      palettize: {nbits: 4}"
    )
    refused = _refusal(tmp_path, joint)
    assert "components.unet.compression.palettize" in refused and "iOS18" in refused
    loaded = load_recipe(_recipe(tmp_path, joint.replace("iOS17", "iOS18")), workspace=tmp_path)
    assert build_graph(loaded)["w8a8:unet"].params["palettize_nbits"] == 4
    chunked = _refusal(tmp_path, text.replace("unet_batch_size: 2", "unet_batch_size: 2\nchunk_unet: true"))
    assert "components.unet.compression.mode" in chunked and "chunk_unet" in chunked
    encoder = text.replace("text_encoder: {}", "text_encoder: {compression: {mode: w8a8}}")
    assert "components.text_encoder.compression.mode" in _refusal(tmp_path, encoder)
    many = text.replace("prompts: 2, steps: 4", "prompts: 99, steps: 4")
    assert "calibration.prompts" in _refusal(tmp_path, many)


def test_the_graph_analyses_in_chunks_and_converts_from_the_quantized_model(tmp_path):
    graph = build_graph(load_recipe(_recipe(tmp_path, W8A8_RECIPE.read_text()), workspace=tmp_path))
    ids = [spec.id for spec in graph]
    assert "convert:unet" not in ids and "palettize:unet" not in ids
    chunks = [spec for spec in graph if spec.stage == "w8a8-layers"]
    assert len(chunks) > 1 and all(spec.inputs["ranges"] == "w8a8-ranges:unet" for spec in chunks)
    assert (
        graph["bundle"].inputs["model.unet"] == "w8a8:unet" and graph["bundle"].inputs["verify.unet"] == "verify:unet"
    )
    assert graph["verify:unet"].function == "builder.stages.verify_w8a8:run"
    assert graph["w8a8-calibrate:unet"].params["prompts"] == list(BUILT_IN_PROMPTS[:2])
    # The thresholds key only the last stage: changing one reuses every measured layer.
    edited = W8A8_RECIPE.read_text().replace("mode: w8a8", "mode: w8a8\n      conv_psnr: 45")
    other = build_graph(load_recipe(_recipe(tmp_path, edited), workspace=tmp_path))
    assert [spec.params for spec in chunks] == [spec.params for spec in other if spec.stage == "w8a8-layers"]
    assert other["w8a8:unet"].params["conv_psnr"] == 45


def test_joint_palettization_reads_back_as_coremltools_decompresses_it(tmp_path):
    import coremltools as ct
    from coremltools.optimize.coreml import decompress_weights
    from coremltools.optimize.torch.quantization import LinearQuantizer, LinearQuantizerConfig

    from builder.coreml.weights import compressed_const_names, read_back_weights
    from builder.sd.w8a8.convert import convert_quantized, op_counts

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(64, 64, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(64, 64, 1))
    x = torch.randn(2, 64, 8, 8)
    config = LinearQuantizerConfig.from_dict(
        {"global_config": {"quantization_scheme": "symmetric", "milestones": [0, 1000, 1000, 0]}}
    )
    quantizer = LinearQuantizer(model.eval(), config)
    prepared = quantizer.prepare(example_inputs=(x,))
    quantizer.step()
    prepared(x)

    architecture = {"inputs": [{"name": "x", "shape": list(x.shape), "dtype": "float16"}], "outputs": ["y"]}
    report = convert_quantized(quantizer.finalize().eval(), (x,), architecture, "iOS18", tmp_path / "m.mlpackage", 4)
    package = tmp_path / "m.mlpackage"
    counts = op_counts(package)
    assert counts["quantize"] == report["activation_quantize_ops"] > 0 and counts["constexpr_lut_to_dense"] == 2
    assert counts["constexpr_blockwise_shift_scale"] == 2  # each int8 table scaled per output channel
    ours = read_back_weights(package)
    program = decompress_weights(ct.models.MLModel(str(package), skip_model_load=True))._mil_program
    theirs = {op.name: op.outputs[0].val for op in program.functions["main"].operations if op.op_type == "const"}
    names = compressed_const_names(package)
    assert len(names) == 2
    for name in names:
        assert np.array_equal(ours[name], theirs[name])
        assert len(np.unique(ours[name][0])) <= 16  # 4-bit indices
    assert 4 < report["bits_per_weight"] < 8


# --- builds ------------------------------------------------------------------------------------


def _finished_chunks(cache: Path) -> dict[str, int]:
    """Finished sensitivity chunks in the cache: stage key -> layers it measured."""
    finished = {}
    for path in (cache / "actions").glob("*.json"):
        record = json.loads(path.read_text())
        if record["key_inputs"]["stage"] == "w8a8-layers":
            finished[record["key"]] = record["summary"]["layers"]
    return finished


@pytest.mark.slow
def test_tiny_sd_w8a8_builds_and_a_killed_analysis_resumes_with_every_finished_layer(built, tmp_path):
    reference, _ = built
    ws = Workspace(root=tmp_path / "ws", cache=tmp_path / "cache")
    shutil.copytree(reference.root / "recipes", ws.root / "recipes")
    shutil.copytree(reference.cache, ws.cache, symlinks=True)  # the source, text encoder and VAE are tiny-sd's
    recipe = ws.root / "recipes" / "tiny-sd-w8a8.yaml"  # ORIGINAL attention: fewer ops to prepare and convert
    recipe.write_text(recipe.read_text().replace("attention: SPLIT_EINSUM", "attention: ORIGINAL"))
    command = [sys.executable, "-m", "builder.cli", "--workspace", str(ws.root), "--cache-dir", str(ws.cache)]
    build = subprocess.Popen(
        [*command, "build", "recipes/tiny-sd-w8a8.yaml"],
        cwd=ws.root,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    # Kill the whole build (workers included) once a sensitivity chunk is recorded and others are not.
    deadline = time.monotonic() + 900
    while not _finished_chunks(ws.cache) and build.poll() is None:
        assert time.monotonic() < deadline, "no sensitivity chunk finished"
        time.sleep(0.2)
    assert build.poll() is None, "the build finished before it could be interrupted"
    os.killpg(build.pid, signal.SIGKILL)
    build.wait()
    before = _finished_chunks(ws.cache)
    graph = build_graph(load_recipe(ws.root / "recipes" / "tiny-sd-w8a8.yaml", workspace=ws.root))
    chunks = [spec for spec in graph if spec.stage == "w8a8-layers"]
    assert 0 < len(before) < len(chunks)

    report = ws.build_json("recipes/tiny-sd-w8a8.yaml")
    status = {s["id"]: s["status"] for s in report["stages"]}
    after = _finished_chunks(ws.cache)
    assert [status[spec.id] for spec in chunks].count("hit") == len(before)
    measured_again = sum(layers for key, layers in after.items() if key not in before)
    bundle = ws.root / "artifacts" / "tiny-sd-w8a8" / "latest"
    entry = json.loads((bundle / "manifest.json").read_text())["models"]["Unet"]
    decisions = entry["w8a8"]["layers"]
    assert measured_again + sum(before.values()) == len(decisions)  # every layer measured once, in all

    # The manifest: every layer's decision, the verify PSNRs, the floor met.
    assert entry["compression"]["mode"] == "w8a8"
    assert {d["activations"] for d in decisions.values()} == {"int8", "float"}
    to_out = [name for name in decisions if name.endswith(".to_out")]
    assert to_out and all(decisions[name]["activations"] == "float" for name in to_out)
    assert entry["w8a8"]["w8a32_layers"] == sum(d["activations"] == "float" for d in decisions.values())
    assert entry["read_back_psnr_db"]["noise_pred"] >= entry["compression"]["minimum_psnr_db"]
    assert entry["w8a8"]["latent_psnr_db"] > 0 and entry["w8a8"]["single_call_psnr_db"] > 0
    assert 8 < entry["bits_per_weight"] < 9

    # The program carries Core ML's activation quantization: read back from the shipped package and counted.
    from builder.coreml.weights import compressed_const_names
    from builder.sd.w8a8.convert import op_counts

    package = bundle / "Resources" / "Unet.mlpackage"
    counts = op_counts(package)
    assert counts["quantize"] == counts["dequantize"] == entry["w8a8"]["activation_quantize_ops"]
    # every W8A8 op's input is quantized: at least one quantize per int8 layer (convs and attention cores)
    assert counts["quantize"] >= sum(d["activations"] == "int8" for d in decisions.values())
    convolutions = sum(d["kind"] == "conv" for d in decisions.values())
    assert counts["constexpr_affine_dequantize"] == len(compressed_const_names(package)) >= convolutions


@pytest.mark.slow
def test_tiny_sdxl_w8a8_builds_and_fails_below_its_floor(tmp_path, one_torch_thread):
    from builder.stages import verify_w8a8

    ws = make_workspace(tmp_path / "ws")
    graph = build_graph(load_recipe(ws.root / "recipes" / "tiny-sdxl-w8a8.yaml", workspace=ws.root))
    work = ws.root / "work"
    work.mkdir()
    produced = run_stages_in_process(graph.order(), {}, work)
    manifest = json.loads((produced["bundle"] / "manifest.json").read_text())
    entry = manifest["models"]["Unet"]
    assert {i["name"] for i in entry["inputs"]} >= {"text_embeds", "time_ids"}
    decisions = entry["w8a8"]["layers"]
    assert len(decisions) > 100 and entry["w8a8"]["activation_quantize_ops"] > 0
    achieved = entry["read_back_psnr_db"]["noise_pred"]
    assert entry["compression"]["minimum_psnr_db"] <= achieved < 90
    # The quantized model reads the package's weights: they are the torch weights quantized to int8.
    stored = load_file(produced["w8a8:unet"] / "quantizer.safetensors")
    assert stored  # the ranges the package was calibrated with
    spec = graph["verify:unet"]
    inputs = {name: produced[upstream] for name, upstream in spec.inputs.items()}
    out = tmp_path / "verify-again"
    out.mkdir()
    with pytest.raises(UserError, match=rf"{achieved} dB .* below the floor minimum_psnr_db {int(achieved) + 1} dB"):
        verify_w8a8.run(inputs, {"minimum_psnr_db": int(achieved) + 1}, out)
