"""Mid-size presets: the full models' widths in the normal suite, so size-only bugs show here.

`mid-sd` and `mid-sdxl` have the real channel widths, head sizes and text widths with one layer per
block, so their UNets meet every size rule the full models meet, notably the per-channel vectors of
the 2560-channel skip concatenations above the palettization threshold, which the converter folds
into consts of its own naming. Each recipe is built as a user builds it (the CLI, worker processes,
the cache), 6-bit and chunked as for iOS, and every compressed const must be read back into torch.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import Workspace, make_workspace

from builder.coreml.weights import compressed_const_names
from builder.sd.mbp.layers import const_name
from builder.sd.read_back import SOURCES_FILE, load_sources

pytestmark = pytest.mark.slow

RECIPE = """\
name: {name}
version: 0.1.0
family: {family}
model:
  synthetic: {{preset: {preset}, seed: 0}}
latent_size: [16, 16]
attention: {attention}
compute_unit: CPU_AND_NE
deployment_target: iOS17
chunk_unet: {chunked}
components:
{encoders}  unet:
    compression: {{mode: palettize, nbits: 6}}
  vae_decoder: {{}}
"""
BUILDS = {
    "mid-sd-chunked": ("sd", "mid-sd", "SPLIT_EINSUM_V2", "true", "  text_encoder: {}\n"),
    "mid-sd": ("sd", "mid-sd", "SPLIT_EINSUM_V2", "false", "  text_encoder: {}\n"),
    "mid-sdxl-chunked": ("sdxl", "mid-sdxl", "SPLIT_EINSUM", "true", "  text_encoder: {}\n  text_encoder_2: {}\n"),
}


@pytest.fixture(scope="module")
def mid(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Workspace, dict[str, dict]]]:
    """Every build above in one workspace and cache (the two mid-sd builds share their source and
    rewrites); removed afterwards, since it holds several gigabytes."""
    ws = make_workspace(tmp_path_factory.mktemp("mid"))
    reports = {}
    for name, (family, preset, attention, chunked, encoders) in BUILDS.items():
        text = RECIPE.format(
            name=name, family=family, preset=preset, attention=attention, chunked=chunked, encoders=encoders
        )
        (ws.root / "recipes" / f"{name}.yaml").write_text(text)
        reports[name] = ws.build_json(f"recipes/{name}.yaml")
    yield ws, reports
    shutil.rmtree(ws.root)


def _objects(ws: Workspace, report: dict, stage: str) -> dict[str, Path]:
    """Output folders of the build's stages of one kind, by stage id."""
    index = json.loads((ws.cache / "index" / f"{report['recipe']}.json").read_text())
    found = {}
    for stage_id, key in index.items():
        if stage_id.startswith(f"{stage}:"):
            record = json.loads((ws.cache / "actions" / f"{key}.json").read_text())
            found[stage_id] = ws.cache / "objects" / record["output_digest"]
    return found


@pytest.mark.parametrize("name", list(BUILDS))
def test_every_compressed_const_is_read_back(mid, name):
    ws, reports = mid
    verified = _objects(ws, reports[name], "verify")
    palettized = _objects(ws, reports[name], "palettize")
    assert set(verified) == {s.replace("palettize:", "verify:") for s in palettized} and verified
    derived = 0
    for stage_id, folder in verified.items():
        package = palettized[stage_id.replace("verify:", "palettize:")] / "model.mlpackage"
        compressed = compressed_const_names(package)
        sources = load_sources(folder / SOURCES_FILE)
        assert set(sources) == compressed  # every compressed const has its torch tensor
        assert all(len(found) == 1 for found in sources.values())  # real weights: no two tensors alike
        derived += sum(const_name(source.tensor) != const for const, (source,) in sources.items())
    # The converter's own consts (the wide group norms' shifts, folded through a reshape) were among them.
    assert derived > 0


@pytest.mark.parametrize("name", list(BUILDS))
def test_bundle_records_read_back_psnr_per_model_and_chunk(mid, name):
    ws, _ = mid
    manifest = json.loads((ws.root / "artifacts" / name / "0.1.0" / "manifest.json").read_text())
    unets = {model: entry for model, entry in manifest["models"].items() if entry["component"] == "unet"}
    assert set(unets) == ({"UnetChunk1", "UnetChunk2"} if name.endswith("chunked") else {"Unet"})
    for model, entry in unets.items():
        assert entry["psnr_db"]["noise_pred"] >= 35, model  # traced (chained) vs diffusers
        assert 25 < min(entry["read_back_psnr_db"].values()) < 80, model  # really 6-bit, still sound
        assert 5.5 < entry["bits_per_weight"] < 7, model
    if name.endswith("chunked"):
        chain = unets["UnetChunk2"]["chunk"]["chain_read_back_psnr_db"]["noise_pred"]
        assert 25 < chain < 80


def test_chunked_and_whole_builds_share_what_they_can(mid):
    _, reports = mid
    statuses = {s["id"]: s["status"] for s in reports["mid-sd"]["stages"]}
    shared = ("source", "rewrite:unet", "rewrite:text_encoder", "convert:text_encoder", "convert:vae_decoder")
    assert all(statuses[s] == "hit" for s in shared)
    assert statuses["verify:unet"] == "built"
