"""Every SD family and attention implementation on the small presets: each component's rewritten,
traced module against the diffusers/transformers reference (35 dB floor), as the build records it.

SDXL's components are covered the same way in test_sdxl.py; this file covers SD 1.x (tiny-sd,
text width 32, convolutional projections) and SD 2.x (tiny-sd2: linear projections, per-level head
counts, gelu text encoder).
"""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import rewrite_and_trace

ATTENTIONS = ("ORIGINAL", "SPLIT_EINSUM", "SPLIT_EINSUM_V2")
PRESETS = ("tiny-sd", "tiny-sd2")

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def pipelines(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from builder.sd.presets import get_preset
    from builder.sd.synthetic import write_synthetic_pipeline

    root = tmp_path_factory.mktemp("sd-pipelines")
    for name in PRESETS:
        write_synthetic_pipeline(get_preset(name), 0, root / name)
    return {name: root / name for name in PRESETS}


@pytest.mark.parametrize("attention", ATTENTIONS)
@pytest.mark.parametrize("preset", PRESETS)
def test_unet_matches_diffusers(pipelines, preset, attention, tmp_path):
    summary, architecture = rewrite_and_trace(pipelines[preset], "unet", "sd", attention, tmp_path)
    assert summary["psnr_db"]["noise_pred"] >= 35, summary
    width = 32 if preset == "tiny-sd" else 48
    assert {s["name"]: s["shape"] for s in architecture["inputs"]} == {
        "sample": [2, 4, 16, 16],
        "timestep": [2],
        "encoder_hidden_states": [2, width, 1, 77],
    }
    assert architecture["config"]["use_linear_projection"] is (preset == "tiny-sd2")


@pytest.mark.parametrize("component", ["text_encoder", "vae_decoder", "vae_encoder"])
@pytest.mark.parametrize("preset", PRESETS)
def test_other_components_match_their_reference(pipelines, preset, component, tmp_path):
    summary, architecture = rewrite_and_trace(pipelines[preset], component, "sd", "ORIGINAL", tmp_path)
    assert min(summary["psnr_db"].values()) >= 35, summary
    if component == "text_encoder":
        assert architecture["outputs"][0] == "last_hidden_state"
