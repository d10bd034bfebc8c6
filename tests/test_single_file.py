"""Single-file .safetensors checkpoints convert offline: sdbuild ships the configs and tokenizers
`from_single_file` would otherwise fetch from the base model's hub repository."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
from conftest import make_workspace, resource_bytes
from hf_cache import LoopbackHub
from single_file_checkpoint import write_sd1_checkpoint

from builder.errors import UserError
from builder.sd.presets import PRESETS, get_preset
from builder.sd.single_file import preset_for, write_config_folder
from builder.sd.synthetic import write_synthetic_pipeline

ASTRONAUT = [49406, 320, 1125, 539, 550, 18376, 6765, 320, 4558, 525, 7496, 49407]  # CLIP's ids for the prompt


@pytest.mark.slow
def test_single_file_checkpoint_converts_offline_to_the_same_bundle(built, tmp_path):
    reference, _ = built  # tiny-sd, seed 0: the weights the checkpoint is made of
    ws = make_workspace(tmp_path / "ws")
    shutil.copytree(reference.cache, ws.cache, symlinks=True)
    write_synthetic_pipeline(get_preset("tiny-sd"), 0, tmp_path / "pipeline")
    checkpoint = ws.root / "models" / "tiny-sd.safetensors"
    checkpoint.parent.mkdir()
    write_sd1_checkpoint(tmp_path / "pipeline", checkpoint)
    recipe = ws.root / "recipes" / "single.yaml"
    text = (ws.root / "recipes" / "tiny-sd.yaml").read_text()
    recipe.write_text(
        text.replace("  synthetic: {preset: tiny-sd, seed: 0}", "  local: {path: ../models/tiny-sd.safetensors}")
    )

    hub = LoopbackHub()
    try:
        env = {"HF_HUB_OFFLINE": "1", "HF_ENDPOINT": hub.endpoint, "HF_HUB_CACHE": str(tmp_path / "empty-hf-cache")}
        report = json.loads(ws.run("build", "recipes/single.yaml", "--json", env=env, check=True).stdout)
        assert hub.attempts() == 0
    finally:
        hub.close()
    statuses = {s["id"]: s["status"] for s in report["stages"]}
    assert statuses["source"] == "built" and statuses["provenance:model"] == "built"
    assert resource_bytes(Path(report["bundle"])) == resource_bytes(reference.bundle)
    source = json.loads((Path(report["bundle"]) / "manifest.json").read_text())["sources"]["model"]
    digest = hashlib.sha256(checkpoint.read_bytes()).hexdigest()
    assert source == {
        "kind": "local",
        "path": "../models/tiny-sd.safetensors",
        "digest": digest,
        "files": {"tiny-sd.safetensors": digest},
    }


@pytest.mark.parametrize(
    ("name", "pads"),
    [
        ("sd-1-5", {"tokenizer": "<|endoftext|>"}),
        ("sd-2-1-base", {"tokenizer": "!"}),
        ("sdxl-base", {"tokenizer": "<|endoftext|>", "tokenizer_2": "!"}),
        ("sdxl-refiner", {"tokenizer_2": "!"}),
    ],
)
def test_shipped_configs_load_as_the_real_pipelines(name, pads, tmp_path):
    from diffusers import AutoencoderKL, DiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTokenizer

    write_config_folder(name, tmp_path)
    preset = PRESETS[name]
    index = DiffusionPipeline.load_config(tmp_path)
    assert index["_class_name"] == ("StableDiffusionPipeline" if preset.family == "sd" else index["_class_name"])
    assert index.get("safety_checker", [None])[0] is None  # a single file has none
    assert (
        UNet2DConditionModel.load_config(tmp_path, subfolder="unet")["block_out_channels"]
        == preset.unet["block_out_channels"]
    )
    assert AutoencoderKL.load_config(tmp_path, subfolder="vae")["scaling_factor"] == preset.vae["scaling_factor"]
    for folder, pad in pads.items():
        tokenizer = CLIPTokenizer.from_pretrained(tmp_path / folder)
        assert len(tokenizer) == 49408 and tokenizer.pad_token == pad
        assert tokenizer("a photo of an astronaut riding a horse on mars").input_ids == ASTRONAUT
        encoder = "text_encoder" + folder.removeprefix("tokenizer")
        config = CLIPTextConfig.from_pretrained(tmp_path / encoder)
        assert config.vocab_size == 49408 and config.eos_token_id == 49407
        assert (
            config.hidden_size
            == (preset.text_encoder_2 if encoder.endswith("_2") else preset.text_encoder)["hidden_size"]
        )


def _shapes(unet_width: int, in_channels: int = 4, **text: int) -> dict[str, tuple[int, ...]]:
    keys = {
        "clip": "cond_stage_model.transformer.text_model.embeddings.position_embedding.weight",
        "open_clip": "cond_stage_model.model.positional_embedding",
        "xl_clip": "conditioner.embedders.0.transformer.text_model.embeddings.position_embedding.weight",
        "xl_open_clip": "conditioner.embedders.1.model.positional_embedding",
        "refiner_open_clip": "conditioner.embedders.0.model.positional_embedding",
    }
    shapes = {keys[name]: (77, width) for name, width in text.items()}
    return shapes | {"model.diffusion_model.input_blocks.0.0.weight": (unet_width, in_channels, 3, 3)}


def test_checkpoints_are_recognised_by_their_keys_and_sizes():
    assert preset_for(_shapes(320, clip=768), "sd") == "sd-1-5"
    assert preset_for(_shapes(32, clip=32), "sd") == "tiny-sd"
    assert preset_for(_shapes(320, open_clip=1024), "sd") == "sd-2-1-base"
    assert preset_for(_shapes(320, xl_clip=768, xl_open_clip=1280), "sdxl") == "sdxl-base"
    assert preset_for(_shapes(384, refiner_open_clip=1280), "sdxl-refiner") == "sdxl-refiner"
    with pytest.raises(UserError, match="SDXL base checkpoint, but this source needs SD 1.x or SD 2.x"):
        preset_for(_shapes(320, xl_clip=768, xl_open_clip=1280), "sd")
    with pytest.raises(UserError, match="9 input channels"):
        preset_for(_shapes(320, 9, clip=768), "sd")
    with pytest.raises(UserError, match="matches none of the configs"):
        preset_for(_shapes(640, clip=768), "sd")
    with pytest.raises(UserError, match="no Stable Diffusion text encoder"):
        preset_for(_shapes(320), "sd")


def test_a_single_file_has_no_safety_checker(tmp_path):
    ws = make_workspace(tmp_path / "ws")
    (ws.root / "models").mkdir()
    (ws.root / "models" / "model.safetensors").write_bytes(b"{}")
    text = (ws.root / "recipes" / "tiny-sd.yaml").read_text()
    text = text.replace("  synthetic: {preset: tiny-sd, seed: 0}", "  local: {path: ../models/model.safetensors}")
    (ws.root / "recipes" / "single.yaml").write_text(text + "  safety_checker: {}\n")
    done = ws.run("plan", "recipes/single.yaml")
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert (
        "components.safety_checker: the single-file checkpoint model.safetensors has no safety checker" in done.stderr
    )
