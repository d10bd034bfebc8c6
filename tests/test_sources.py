"""Model sources besides synthetic presets: a local diffusers folder and a single-file checkpoint."""

from __future__ import annotations

from conftest import make_workspace

from builder.sd.presets import get_preset
from builder.sd.synthetic import write_synthetic_pipeline


def _recipe_with_source(ws, name: str, source: str) -> str:
    text = (ws.root / "recipes" / "tiny-sd.yaml").read_text()
    path = ws.root / "recipes" / f"{name}.yaml"
    path.write_text(text.replace("  synthetic: {preset: tiny-sd, seed: 0}", f"  local: {{path: {source}}}"))
    return f"recipes/{name}.yaml"


def test_local_folder_with_the_same_bytes_shares_the_cache(built, tmp_path):
    reference, _ = built
    ws = make_workspace(tmp_path / "ws")
    ws.cache = reference.cache  # read-only use: plan takes no lock and writes no entry
    write_synthetic_pipeline(get_preset("tiny-sd"), 0, ws.root / "models" / "tiny")
    plan = ws.plan_json(_recipe_with_source(ws, "local", "../models/tiny"))
    assert "source" not in plan  # a local folder is read in place, not copied
    for component in ("text_encoder", "unet", "vae_decoder"):
        for stage in ("rewrite", "trace", "convert"):
            assert plan[f"{stage}:{component}"]["status"] == "cached", plan[f"{stage}:{component}"]
    # The bundle differs (the recipe digest names the source), everything it reads is cached.
    assert plan["bundle"]["status"] == "stale" and "recipe_digest" in plan["bundle"]["reason"]


def test_local_folder_edit_makes_its_stages_stale(built, tmp_path):
    reference, _ = built
    ws = make_workspace(tmp_path / "ws")
    ws.cache = reference.cache
    write_synthetic_pipeline(get_preset("tiny-sd"), 0, ws.root / "models" / "tiny")
    config = ws.root / "models" / "tiny" / "vae" / "config.json"
    config.write_text(config.read_text().replace('"scaling_factor": 0.18215', '"scaling_factor": 0.2'))
    plan = ws.plan_json(_recipe_with_source(ws, "local", "../models/tiny"))
    assert plan["rewrite:vae_decoder"]["status"] == "stale"
    assert "input 'model' content changed" in plan["rewrite:vae_decoder"]["reason"]


def test_unreadable_single_file_checkpoint_fails_in_one_located_line(workspace):
    (workspace.root / "models").mkdir()
    (workspace.root / "models" / "model.safetensors").write_bytes(b"not a checkpoint")
    done = workspace.run("build", _recipe_with_source(workspace, "single", "../models/model.safetensors"))
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    lines = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1
    assert "single.yaml:7: model.local.path" in lines[0] and "model.safetensors" in lines[0]
