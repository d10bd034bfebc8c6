"""`builder.report`: UNet read-back into torch, read-back PSNR, the report's files, determinism.

Bundles are built once per module by running the real stage functions in this process (no worker
processes, shared stages run once), from the default recipe without the VAE encoder: 6-bit, 8-bit
and float16 UNets.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_workspace, run_stages_in_process
from PIL import Image
from pydantic import ValidationError

from builder.coreml.weights import read_back_weights
from builder.recipe import load_recipe
from builder.report import Candidate, load_candidates, load_read_back_unet, verify_read_back, write_report
from builder.report.plot import psnr_vs_size_figure
from builder.sd.mbp.layers import const_name
from builder.stages.pipeline import build_graph

UNET_COMPRESSION = {
    "6": "compression: {mode: palettize, nbits: 6}",
    "8": "compression: {mode: palettize, nbits: 8}",
    "float16": "compression: {mode: float16}",
}


@pytest.fixture(scope="module")
def bundles(tmp_path_factory: pytest.TempPathFactory, one_torch_thread) -> dict[str, Path]:
    ws = make_workspace(tmp_path_factory.mktemp("report"))
    default = (ws.root / "recipes" / "tiny-sd.yaml").read_text()
    assert UNET_COMPRESSION["6"] in default and "  vae_encoder: {}\n" in default
    outputs: dict = {}
    found = {}
    for variant, compression in UNET_COMPRESSION.items():
        recipe = ws.root / "recipes" / f"report-{variant}.yaml"
        recipe.write_text(default.replace(UNET_COMPRESSION["6"], compression).replace("  vae_encoder: {}\n", ""))
        produced = run_stages_in_process(build_graph(load_recipe(recipe, workspace=ws.root)).order(), outputs, ws.root)
        found[variant] = produced["bundle"]
        found[f"{variant} verified"] = [produced["verify:unet"]] if "verify:unet" in produced else []
        found["pipeline"] = produced["source"]
    return found


def _read_back(bundles: dict, variant: str):
    return load_read_back_unet(bundles[variant], bundles["pipeline"], bundles[f"{variant} verified"])


def test_every_compressed_weight_maps_onto_a_torch_parameter(bundles):
    unet = _read_back(bundles, "6")
    float16 = {name: p.detach().clone() for name, p in unet.module.named_parameters()}
    assert unet.compress() == len(unet.sources) > 0
    # Query projections keep their names: the scale is applied to the scores, not folded in.
    assert any(source.tensor.endswith("to_q.weight") for (source,) in unet.sources.values())
    compressed = dict(unet.module.named_parameters())
    for const, (source,) in unet.sources.items():
        assert len(np.unique(compressed[source.tensor].numpy())) <= 2**6, const
        assert not torch.equal(compressed[source.tensor], float16[source.tensor]), const


def test_float16_bundle_reproduces_the_torch_weights(bundles):
    unet = _read_back(bundles, "float16")
    assert not unet.sources and unet.compress() == 0
    stored = read_back_weights(unet.packages[0])
    kernels = {name: p for name, p in unet.module.named_parameters() if p.dim() >= 2}
    assert kernels
    for name, parameter in kernels.items():  # every matrix and kernel, under its own name
        np.testing.assert_array_equal(stored[const_name(name)], parameter.detach().half().numpy(), err_msg=name)
    assert verify_read_back(bundles["float16"], bundles["pipeline"], [])["Unet"] > 100


def test_read_back_psnr_falls_with_fewer_bits(bundles):
    six = verify_read_back(bundles["6"], bundles["pipeline"], bundles["6 verified"])["Unet"]
    eight = verify_read_back(bundles["8"], bundles["pipeline"], bundles["8 verified"])["Unet"]
    assert math.isfinite(six) and 20 < six < eight


def test_plot_shows_both_metrics_of_the_candidates_and_the_bundle(tmp_path):
    candidates = [
        Candidate(name="4-bit", average_bits=4.1, size_bytes=1_300_000, psnr_db=30.0, single_call_psnr_db=22.0),
        Candidate(name="8-bit", average_bits=8.05, size_bytes=2_500_000, psnr_db=50.0, single_call_psnr_db=41.0),
    ]
    path = tmp_path / "candidates.json"
    path.write_text(json.dumps([c.model_dump() for c in candidates]))
    assert load_candidates(path) == candidates
    chosen = Candidate(name="tiny-sd", average_bits=6.7, size_bytes=1_900_000, psnr_db=37.0, single_call_psnr_db=29.0)
    latents, single_call = psnr_vs_size_figure(candidates, chosen).axes
    points, highlighted = latents.collections
    np.testing.assert_allclose(points.get_offsets(), [[1.3, 30.0], [2.5, 50.0]])
    np.testing.assert_allclose(highlighted.get_offsets(), [[1.9, 37.0]])
    points, highlighted = single_call.collections
    np.testing.assert_allclose(points.get_offsets(), [[1.3, 22.0], [2.5, 41.0]])
    np.testing.assert_allclose(highlighted.get_offsets(), [[1.9, 29.0]])
    # A bundle not scored on the workload gets no star, rather than a figure of another metric.
    unscored = Candidate(name="tiny-sd", average_bits=6.7, size_bytes=1_900_000, psnr_db=None)
    assert [len(axes.collections) for axes in psnr_vs_size_figure(candidates, unscored).axes] == [1, 1]
    path.write_text(json.dumps([{"name": "x", "average_bits": 4, "size_bytes": -1, "psnr_db": 30}]))
    with pytest.raises(ValidationError):
        load_candidates(path)


def test_report_writes_table_plot_and_side_by_side_images_deterministically(bundles, tmp_path):
    candidates = tmp_path / "candidates.json"
    candidates.write_text(json.dumps([{"name": "4-bit", "average_bits": 4.1, "size_bytes": 1_300_000, "psnr_db": 30}]))
    bundle = bundles["6"]
    options = dict(
        pipeline=bundles["pipeline"],
        verified=bundles["6 verified"],
        candidates=candidates,
        prompts=["a red apple"],
        seeds=[0, 1],
        steps=6,
    )

    report = write_report(bundle, **options)
    first = {
        p.relative_to(bundle).as_posix(): p.read_bytes() for p in sorted((bundle / "report").rglob("*")) if p.is_file()
    }
    assert set(first) == {
        "report/report.md",
        "report/psnr_vs_size.png",
        "report/images/0-0.png",
        "report/images/0-1.png",
    }
    text = report.read_text()
    for model in ("TextEncoder", "Unet", "VAEDecoder"):
        assert f"| {model} |" in text
    assert "palettize (nbits 6" in text and "images/0-1.png" in text
    manifest = json.loads((bundle / "manifest.json").read_text())
    height, width = manifest["image_size"]
    for name in ("images/0-0.png", "images/0-1.png"):
        with Image.open(bundle / "report" / name) as image:
            assert image.size == (2 * width, height) and image.mode == "RGB"
    with Image.open(bundle / "report" / "psnr_vs_size.png") as plot:
        plot.verify()

    write_report(bundle, **options)
    again = {
        p.relative_to(bundle).as_posix(): p.read_bytes() for p in sorted((bundle / "report").rglob("*")) if p.is_file()
    }
    assert again == first
