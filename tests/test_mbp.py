"""Mixed-bit palettization: layer identities, sensitivity analysis, candidate recipes, recipe files."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from builder.coreml.palettize import palettize_package
from builder.coreml.program import float_weight_ops
from builder.coreml.weights import read_back_weights
from builder.errors import RecipeError
from builder.sd.mbp.analysis import Probe, ProbeSettings, measure_layers, search_candidates, write_probe_inputs
from builder.sd.mbp.layers import conversion_layers, op_names
from builder.sd.mbp.recipe_file import (
    MbpRecipe,
    import_apple_preanalysis,
    load_recipe_file,
    to_palettize_options,
    write_recipe_file,
)
from builder.stages.trace import load_conversion_module

pytestmark = pytest.mark.usefixtures("one_torch_thread")

THRESHOLD = 2048
SETTINGS = ProbeSettings(prompts=("a red bicycle",), steps=1)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, Path]:
    """The tiny pipeline, its rewritten UNet (SPLIT_EINSUM), the converted package and probe inputs."""
    from builder.sd.presets import get_preset
    from builder.sd.synthetic import write_synthetic_pipeline
    from builder.stages import convert, rewrite, trace

    root = tmp_path_factory.mktemp("mbp")
    folders = {name: root / name for name in ("source", "rewritten", "traced", "converted")}
    for folder in folders.values():
        folder.mkdir()
    write_synthetic_pipeline(get_preset("tiny-sd"), 0, folders["source"])
    settings = {"component": "unet", "attention": "SPLIT_EINSUM", "latent_size": [16, 16], "batch_size": 2}
    rewrite.run({"model": folders["source"]}, settings, folders["rewritten"])
    trace.run({"rewritten": folders["rewritten"]}, {"component": "unet"}, folders["traced"])
    convert.run(
        {"traced": folders["traced"], "rewritten": folders["rewritten"]},
        {"component": "unet", "deployment_target": "macOS13"},
        folders["converted"],
    )
    write_probe_inputs(folders["source"], "sd", (16, 16), 4, SETTINGS, root / "probe")
    return folders | {"probe": root / "probe", "package": folders["converted"] / "model.mlpackage"}


def _probe(tiny: dict[str, Path]) -> tuple[Probe, list]:
    module, _ = load_conversion_module(tiny["rewritten"])
    layers = conversion_layers(tiny["rewritten"], THRESHOLD)
    return Probe(module, tiny["probe"], layers), layers


def test_every_layer_maps_to_exactly_one_weight_op_and_back(tiny: dict[str, Path]) -> None:
    layers = conversion_layers(tiny["rewritten"], THRESHOLD)
    mapping = op_names(layers, tiny["package"])
    palettizable_ops = {
        name for name, shape in float_weight_ops(tiny["package"]) if len(shape) > 1 and np.prod(shape) > THRESHOLD
    }
    assert len(layers) > 50 and set(mapping) == {layer.identity for layer in layers}
    assert sorted(mapping.values()) == sorted(palettizable_ops)  # one op per layer, none left over

    # The ops hold exactly those layers' weights, rounded to float16 (nothing folded into them).
    module, _ = load_conversion_module(tiny["rewritten"])
    stored = read_back_weights(tiny["package"])
    for identity, op in mapping.items():
        expected = module.get_parameter(identity).detach().half().numpy()
        np.testing.assert_array_equal(stored[op], expected, err_msg=identity)


def test_a_layer_loses_less_with_more_bits(tiny: dict[str, Path]) -> None:
    probe, layers = _probe(tiny)
    chosen = [layer for layer in layers if layer.identity.endswith(("resnets.0.conv1.weight", "attn2.to_v.weight"))][:3]
    sensitivity = measure_layers(probe, chosen)
    for identity, scores in sensitivity.items():
        widths = sorted(scores)
        assert all(scores[a] < scores[b] for a, b in zip(widths, widths[1:], strict=False)), (identity, scores)
    assert probe.evaluations == 1 + 5 * len(chosen)  # the reference, then one step per configuration


def test_candidates_meet_their_targets_and_cost_fewer_bits_when_lower(tiny: dict[str, Path]) -> None:
    probe, layers = _probe(tiny)
    subset = [layer for layer in layers if ".resnets." in layer.identity][:8]
    sensitivity = measure_layers(probe, subset)
    # Targets between all-8-bit and all-1-bit quality, so every candidate has to trade off.
    best = probe.psnr(dict.fromkeys((layer.identity for layer in subset), 8))
    worst = probe.psnr(dict.fromkeys((layer.identity for layer in subset), 1))
    targets = tuple(round(worst + (best - worst) * fraction, 1) for fraction in (0.8, 0.5, 0.2))
    candidates = search_candidates(probe, subset, sensitivity, targets)
    assert [c.target_psnr_db for c in candidates] == list(targets)
    bits = [c.bits_per_weight for c in candidates]
    assert bits == sorted(bits, reverse=True) and bits[0] < 16 and bits[-1] < bits[0]

    fresh, _ = _probe(tiny)  # a new model, so nothing of the search's state carries over
    for found in candidates:
        assert fresh.psnr(found.layers) >= found.target_psnr_db - 0.5
        assert abs(fresh.psnr(found.layers) - found.psnr_db) < 0.05


def test_recipe_file_round_trip(tmp_path: Path) -> None:
    recipe = MbpRecipe(
        model="tiny-sd UNet",
        target_psnr_db=40,
        psnr_db=40.3,
        default_nbits=6,
        layers={"unet.conv_in.weight": None, "unet.mid_block.resnets.0.conv1.weight": 2},
    )
    write_recipe_file(recipe, tmp_path / "r.yaml")
    assert load_recipe_file(tmp_path / "r.yaml") == recipe


@pytest.mark.parametrize(
    ("text", "line", "field"),
    [
        ("model: m\nlayers:\n  unet.a.weight: 4\n  unet.b.weight: 5\n", 4, "layers.unet.b.weight"),
        ("model: m\ntarget_psnr: 40\nlayers: {}\n", 2, "target_psnr"),
        ("model: m\ndefault_nbits: sixteen\nlayers: {}\n", 2, "default_nbits"),
        ("model: m\n", 1, "layers"),
    ],
)
def test_bad_recipe_file_names_line_and_key(tmp_path: Path, text: str, line: int, field: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(RecipeError) as raised:
        load_recipe_file(path)
    assert (raised.value.file, raised.value.line, raised.value.field) == (str(path), line, field)


def test_recipe_applies_to_the_package_by_op_name(tiny: dict[str, Path], tmp_path: Path) -> None:
    layers = conversion_layers(tiny["rewritten"], THRESHOLD)
    query = next(layer.identity for layer in layers if layer.identity.endswith("attn1.to_q.weight"))
    conv = "unet.mid_block.resnets.0.conv1.weight"
    path = tmp_path / "mixed.yaml"
    write_recipe_file(MbpRecipe(model="m", default_nbits=6, layers={query: 2, conv: None}), path)
    options = to_palettize_options(path, layers, tiny["package"])
    report = palettize_package(tiny["package"], tmp_path / "out.mlpackage", options, workers=1)
    mapping = op_names(layers, tiny["package"])
    widths = {w.name: w.nbits for w in report.weights}
    assert widths[mapping[query]] == 2 and widths[mapping[conv]] is None
    assert {widths[op] for identity, op in mapping.items() if identity not in (query, conv)} == {6}

    write_recipe_file(MbpRecipe(model="m", layers={"unet.nowhere.weight": 4}), path)
    with pytest.raises(RecipeError, match="unet.nowhere.weight"):
        to_palettize_options(path, layers, tiny["package"])


def test_apple_preanalysis_imports_by_module_path(tmp_path: Path) -> None:
    """A hand-made file in the layout mixed_bit_compression_pre_analysis.py writes."""
    names = {
        "down_blocks.2.attentions.0.transformer_blocks.0.ff.net.0.proj": (
            "unet.down_blocks.2.attentions.0.transformer_blocks.0.ff.project_in.weight"
        ),
        "down_blocks.2.attentions.0.transformer_blocks.0.attn1.to_out.0": (
            "unet.down_blocks.2.attentions.0.transformer_blocks.0.attn1.to_out.weight"
        ),
        "mid_block.resnets.0.conv1": "unet.mid_block.resnets.0.conv1.weight",
    }
    single = {"metadata": {"nbits": 1, "out_ngroups": 1, "in_ngroups": 1, "cumulative": False}} | {
        name: [30.1, 29.8] for name in [*names, "add_embedding.linear_1"]
    }
    analysis = {
        "single_layer": {"1": single},
        "cumulative": {
            "1": single | {"metadata": single["metadata"] | {"candidates": list(names), "sizes": [1, 2, 3]}}
        },
        "model_version": "stabilityai/stable-diffusion-2-1-base",
        "baselines": {"original": 80.2, "linear_8bit": 60.1, "recipe_3.50_bit_mixedpalette": 61.4},
        "recipes": {
            "recipe_3.50_bit_mixedpalette": dict(zip(names, (2, 16, 4), strict=False)) | {"add_embedding.linear_1": 6}
        },
    }
    path = tmp_path / "sd21_palettization_recipe.json"
    path.write_text(json.dumps(analysis))
    imported = import_apple_preanalysis(path, names.values())
    recipe = imported.recipes["recipe_3.50_bit_mixedpalette"]
    assert recipe.layers == dict(zip(names.values(), (2, None, 4), strict=False))
    assert (recipe.psnr_db, recipe.bits_per_weight) == (61.4, 3.5)
    assert imported.unmapped == ["add_embedding.linear_1"]

    path.write_text(json.dumps({"single_layer": {}}))
    with pytest.raises(RecipeError, match="not an Apple pre-analysis"):
        import_apple_preanalysis(path, names.values())


@pytest.mark.slow
def test_analysis_graph_builds_and_resumes_from_cache(tmp_path: Path) -> None:
    from builder.engine.engine import Engine
    from builder.engine.spec import Graph, StageSpec
    from builder.stages.analyze import analysis_stages

    source = StageSpec(
        id="source",
        stage="source",
        version="1",
        function="builder.stages.source:run",
        params={"kind": "synthetic", "preset": "tiny-sd", "seed": 0},
    )
    rewrite = StageSpec(
        id="rewrite:unet",
        stage="rewrite",
        version="1",
        function="builder.stages.rewrite:run",
        params={"component": "unet", "attention": "SPLIT_EINSUM", "latent_size": [16, 16], "batch_size": 2},
        inputs={"model": "source"},
    )
    analysis = analysis_stages(
        rewritten="rewrite:unet",
        model="source",
        description="tiny-sd UNet",
        family="sd",
        memory_estimate_bytes=1 << 30,
        chunks=2,
        probe=SETTINGS,
        nbits=(1,),
        targets_db=(50.0,),
    )
    graph = Graph([source, rewrite, *analysis])
    engine = Engine(tmp_path / "cache", "analysis")
    first = {r.id: r for r in engine.build(graph, jobs=2)}
    output = first["analyze:unet"].output
    result = json.loads((output / "analysis.json").read_text())
    assert len(result["sensitivity"]) == len(conversion_layers(first["rewrite:unet"].output, THRESHOLD))
    recipe = load_recipe_file(output / "recipes" / "50db.yaml")
    assert recipe.psnr_db >= 50 and set(recipe.layers.values()) <= {1, None}
    assert {r.status for r in engine.build(graph, jobs=2)} == {"hit"}
