"""LoRA fusion: small LoRAs made here with peft (diffusers and kohya layouts), fused as diffusers fuses
them, keyed per component, recorded in the manifest; refused inputs are located errors."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from conftest import Workspace, make_workspace
from safetensors.torch import load_file, save_file

from builder.sd.components import KINDS
from builder.sd.presets import get_preset
from builder.sd.psnr import psnr
from builder.sd.synthetic import write_synthetic_pipeline

RECIPE = """\
name: tiny-lora
version: 0.1.0
family: sd
model:
  local: {path: ../models/tiny-sd}
  loras:
    - local: {path: ../models/loras/unet.safetensors}
      scale: 0.8
latent_size: [16, 16]
attention: ORIGINAL
compute_unit: CPU_AND_GPU
deployment_target: macOS13
components:
  text_encoder: {}
  unet: {}
  vae_decoder: {}
"""
UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
TEXT_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]


KOHYA_ALPHA = 2.0  # kohya files carry alpha; with rank 4 their LoRA counts half (alpha / rank)


def _lora_layers(model, targets: list[str], seed: int) -> dict[str, torch.Tensor]:
    """A rank-4 LoRA with random (non-zero; doubled, so it plainly changes the output) A and B on
    `targets`, in diffusers' key layout as its training scripts save theirs (peft adapter -> state dict
    -> diffusers names)."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig, inject_adapter_in_model
    from peft.utils import get_peft_model_state_dict

    torch.manual_seed(seed)
    config = LoraConfig(r=4, lora_alpha=4, target_modules=targets, init_lora_weights=False)
    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(inject_adapter_in_model(config, model)))
    return {name: tensor.detach().clone() * 2 for name, tensor in layers.items()}


_LORA_KEY = re.compile(r"(?P<module>.+)\.(lora_linear_layer\.|lora[._])(?P<part>A|B|down|up)\.weight")


def _parts(layers: dict[str, torch.Tensor], prefix: str) -> dict[str, dict[str, torch.Tensor]]:
    """Module path -> {"down": A, "up": B} of the keys starting with `prefix` (e.g. "unet.", or "" for
    all) of a diffusers-layout LoRA (peft's A/B, diffusers' down/up or lora_linear_layer names)."""
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for name, tensor in layers.items():
        if not name.startswith(prefix):
            continue
        found = _LORA_KEY.fullmatch(name.removeprefix(prefix))
        assert found, name
        part = "down" if found["part"] in ("A", "down") else "up"
        parts.setdefault(found["module"], {})[part] = tensor
    return parts


def _deltas(layers: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """Module path -> up @ down, the weight change at scale 1 of a diffusers-layout LoRA (alpha = rank)."""
    return {module: p["up"] @ p["down"] for module, p in _parts(layers, prefix).items()}


def _kohya(layers: dict[str, torch.Tensor], prefix: str, kohya_prefix: str) -> dict[str, torch.Tensor]:
    """The same weights as kohya's trainers name them: <prefix><module_path>.lora_down/.lora_up/.alpha."""
    converted: dict[str, torch.Tensor] = {}
    for module, part in _parts(layers, prefix).items():
        if kohya_prefix == "lora_te_" and not module.startswith("text_model."):
            module = f"text_model.{module}"  # kohya names CLIP's modules under text_model
        key = kohya_prefix + module.replace(".", "_")
        converted |= {f"{key}.lora_down.weight": part["down"], f"{key}.lora_up.weight": part["up"]}
        converted[f"{key}.alpha"] = torch.tensor(KOHYA_ALPHA)
    return converted


@pytest.fixture(scope="module")
def models(tmp_path_factory, one_torch_thread) -> Path:
    """models/tiny-sd (synthetic pipeline) and models/loras/{unet,both,kohya}.safetensors."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    root = tmp_path_factory.mktemp("lora") / "models"
    pipeline = root / "tiny-sd"
    write_synthetic_pipeline(get_preset("tiny-sd"), 0, pipeline)
    unet = _lora_layers(UNet2DConditionModel.from_pretrained(pipeline / "unet"), UNET_TARGETS, seed=1)
    text = _lora_layers(CLIPTextModel.from_pretrained(pipeline / "text_encoder"), TEXT_TARGETS, seed=2)
    loras = root / "loras"
    StableDiffusionPipeline.save_lora_weights(loras, unet_lora_layers=unet, weight_name="unet.safetensors")
    StableDiffusionPipeline.save_lora_weights(
        loras, unet_lora_layers=unet, text_encoder_lora_layers=text, weight_name="both.safetensors"
    )
    save_file(_kohya(unet, "", "lora_unet_") | _kohya(text, "", "lora_te_"), loras / "kohya.safetensors")
    return root


def _rewrite(folder: Path, component: str, out: Path, loras: list[tuple[Path, float]]) -> dict[str, torch.Tensor]:
    """Run the rewrite stage in this process (what a build runs), fusing `loras`; its reference outputs."""
    from builder.stages import rewrite

    out.mkdir()
    inputs = {"model": folder} | {f"lora.{i}": path for i, (path, _) in enumerate(loras)}
    params: dict = {"component": component, "family": "sd", "latent_size": [16, 16], "batch_size": 2}
    if loras:
        params["loras"] = [{"input": f"lora.{i}", "scale": scale} for i, (_, scale) in enumerate(loras)]
    rewrite.run(inputs, params, out)
    return load_file(out / "reference.safetensors")


def _examples(out: Path, produced: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    architecture = json.loads((out / "architecture.json").read_text())
    return {s["name"]: produced[f"input.{s['name']}"] for s in architecture["inputs"]}, architecture["outputs"]


@pytest.mark.parametrize(("file", "factor"), [("both", 1.0), ("kohya", KOHYA_ALPHA / 4)])
@pytest.mark.parametrize("component", ["unet", "text_encoder"])
def test_fused_weights_are_base_plus_scaled_lora(models, file, factor, component):
    """Both layouts, both targets: every LoRA layer's weight becomes W + scale * alpha/rank * up @ down."""
    from builder.sd.lora import fuse_loras

    pipeline, lora = models / "tiny-sd", models / "loras" / f"{file}.safetensors"
    kind = KINDS[component]
    base = kind.load(pipeline, kind.subfolder).state_dict()
    model = kind.load(pipeline, kind.subfolder)
    fuse_loras(model, component, [(lora, 0.8)])
    fused = model.state_dict()
    assert set(fused) == set(base)  # no adapter left behind
    deltas = _deltas(load_file(models / "loras" / "both.safetensors"), f"{component}.")
    assert deltas
    for module, delta in deltas.items():
        name = next(n for n in fused if n.endswith(f"{module.removeprefix('text_model.')}.weight"))
        torch.testing.assert_close(fused[name], base[name] + 0.8 * factor * delta, rtol=1e-5, atol=1e-6)
    changed = {n for n in fused if not torch.equal(fused[n], base[n])}
    assert len(changed) == len(deltas)  # and nothing else moved


def test_fused_unet_equals_diffusers_fused_pipeline(models, tmp_path):
    """The rewrite stage's reference (what the trace is checked against) is diffusers' fused UNet."""
    from diffusers import StableDiffusionPipeline

    pipeline, loras = models / "tiny-sd", models / "loras"
    produced = _rewrite(pipeline, "unet", tmp_path / "lora", [(loras / "unet.safetensors", 0.8)])
    base = _rewrite(pipeline, "unet", tmp_path / "base", [])
    pipe = StableDiffusionPipeline.from_pretrained(pipeline, safety_checker=None, requires_safety_checker=False)
    pipe.load_lora_weights(loras, weight_name="unet.safetensors")
    pipe.fuse_lora(lora_scale=0.8)
    pipe.unload_lora_weights()
    examples, outputs = _examples(tmp_path / "lora", produced)
    with torch.no_grad():
        expected = KINDS["unet"].reference(pipe.unet.eval(), examples)
    got = produced[f"output.{outputs[0]}"]
    print("fused vs diffusers", psnr(got, expected[0]), "fused vs base", psnr(got, base[f"output.{outputs[0]}"]))
    assert psnr(got, expected[0]) > 60
    assert psnr(got, base[f"output.{outputs[0]}"]) < 45  # the LoRA changed the output


def test_two_loras_fuse_in_order_at_their_scales(models, tmp_path):
    from builder.sd.lora import fuse_loras

    pipeline, loras = models / "tiny-sd", models / "loras"
    kind = KINDS["text_encoder"]
    one = kind.load(pipeline, kind.subfolder)
    fuse_loras(one, "text_encoder", [(loras / "both.safetensors", 0.5), (loras / "kohya.safetensors", -0.3)])
    base = kind.load(pipeline, kind.subfolder).state_dict()
    deltas = _deltas(load_file(loras / "both.safetensors"), "text_encoder.")
    fused = one.state_dict()
    for module, delta in deltas.items():
        name = next(n for n in fused if n.endswith(f"{module.removeprefix('text_model.')}.weight"))
        want = base[name] + (0.5 - 0.3 * KOHYA_ALPHA / 4) * delta
        torch.testing.assert_close(fused[name], want, rtol=1e-5, atol=1e-6)


def test_sdxl_lora_fuses_into_the_unet_and_both_text_encoders(tmp_path, one_torch_thread):
    """SDXL: text_encoder_2 (CLIP-G with projection) takes the file's text_encoder_2 weights, and
    planning routes the file to all three components."""
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    from builder.sd.components import kind
    from builder.sd.lora import fuse_loras
    from builder.sd.lora_targets import lora_components

    pipeline = tmp_path / "tiny-sdxl"
    write_synthetic_pipeline(get_preset("tiny-sdxl"), 0, pipeline)
    layers = {
        "unet_lora_layers": _lora_layers(UNet2DConditionModel.from_pretrained(pipeline / "unet"), UNET_TARGETS, seed=1),
        "text_encoder_lora_layers": _lora_layers(
            CLIPTextModel.from_pretrained(pipeline / "text_encoder"), TEXT_TARGETS, seed=2
        ),
        "text_encoder_2_lora_layers": _lora_layers(
            CLIPTextModelWithProjection.from_pretrained(pipeline / "text_encoder_2"), TEXT_TARGETS, seed=3
        ),
    }
    StableDiffusionXLPipeline.save_lora_weights(tmp_path, weight_name="xl.safetensors", **layers)
    lora = tmp_path / "xl.safetensors"
    assert lora_components(lora) == ["unet", "text_encoder", "text_encoder_2"]
    saved = load_file(lora)
    for component in ("unet", "text_encoder", "text_encoder_2"):
        k = kind(component, "sdxl")
        base = k.load(pipeline, k.subfolder).state_dict()
        model = k.load(pipeline, k.subfolder)
        fuse_loras(model, component, [(lora, 0.7)])
        fused = model.state_dict()
        deltas = _deltas(saved, f"{component}.")
        assert deltas and set(fused) == set(base)
        for module, delta in deltas.items():
            name = next(n for n in fused if n.endswith(f"{module.removeprefix('text_model.')}.weight"))
            torch.testing.assert_close(fused[name], base[name] + 0.7 * delta, rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="module")
def lora_build(models, tmp_path_factory) -> tuple[Workspace, dict, dict]:
    ws = make_workspace(tmp_path_factory.mktemp("lora-build"))
    import shutil

    shutil.copytree(models, ws.root / "models")
    (ws.root / "recipes" / "lora.yaml").write_text(RECIPE)
    result = ws.build_json("recipes/lora.yaml")
    manifest = json.loads((ws.root / "artifacts" / "tiny-lora" / "latest" / "manifest.json").read_text())
    return ws, result, manifest


@pytest.mark.slow
def test_a_recipe_with_a_lora_builds_and_records_it(lora_build, models):
    import hashlib

    ws, result, manifest = lora_build
    (entry,) = manifest["sources"]["loras"]
    digest = hashlib.sha256((models / "loras" / "unet.safetensors").read_bytes()).hexdigest()
    assert entry == {
        "kind": "local",
        "path": "../models/loras/unet.safetensors",
        "digest": digest,
        "files": {"unet.safetensors": digest},
        "scale": 0.8,
        "components": ["unet"],
    }
    for model in manifest["models"].values():
        assert min(model["psnr_db"].values()) >= 35  # traced against the fused reference
    rewrite = next(s for s in result["stages"] if s["id"] == "rewrite:unet")
    assert rewrite["status"] == "built"


@pytest.mark.slow
def test_editing_a_scale_makes_only_the_affected_components_stale(lora_build):
    ws, _, _ = lora_build
    recipe = ws.root / "recipes" / "lora.yaml"
    assert "stale" not in {e["status"] for e in ws.plan_json("recipes/lora.yaml").values()}

    recipe.write_text(RECIPE.replace("scale: 0.8", "scale: 0.5"))
    stale = {i for i, e in ws.plan_json("recipes/lora.yaml").items() if e["status"] == "stale"}
    assert "rewrite:unet" in stale and "bundle" in stale
    assert {i.split(":", 1)[1] for i in stale if ":" in i} == {"unet"}  # not text_encoder, not vae_decoder
    reason = ws.plan_json("recipes/lora.yaml")["rewrite:unet"]["reason"]
    assert "model.loras" in reason, reason

    # Another file, which also has text encoder weights: the text encoder's stages go stale too (and
    # the new file's provenance digest).
    recipe.write_text(RECIPE.replace("unet.safetensors", "both.safetensors"))
    stale = {i for i, e in ws.plan_json("recipes/lora.yaml").items() if e["status"] == "stale"}
    assert {i.split(":", 1)[1] for i in stale if ":" in i} == {"unet", "text_encoder", "lora.0"}
    assert "provenance:lora.0" in stale

    recipe.write_text(RECIPE)  # back as built: nothing to do
    assert "stale" not in {e["status"] for e in ws.plan_json("recipes/lora.yaml").values()}


@pytest.fixture(scope="module")
def models_workspace(models, tmp_path_factory) -> Workspace:
    """A workspace holding the models (and a pickle, and a LoRA outside it) for recipes that fail."""
    import shutil

    ws = make_workspace(tmp_path_factory.mktemp("lora-errors") / "ws")
    shutil.copytree(models, ws.root / "models")
    (ws.root / "models" / "loras" / "style.ckpt").write_bytes(b"not loaded")
    (ws.root.parent / "outside.safetensors").write_bytes(b"")
    return ws


def test_hub_lora_is_read_from_the_hugging_face_cache_offline(models, workspace: Workspace, tmp_path, monkeypatch):
    from hf_cache import write_hf_cache

    revision = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "repo"
    (repo / "weights").mkdir(parents=True)
    (repo / "weights" / "style.safetensors").write_bytes((models / "loras" / "both.safetensors").read_bytes())
    write_hf_cache(tmp_path / "hf", "someone/style-lora", revision, repo)
    import shutil

    shutil.copytree(models, workspace.root / "models")
    hub = f"hub: {{id: someone/style-lora, revision: {revision}, weight_name: weights/style.safetensors}}"
    (workspace.root / "recipes" / "hub.yaml").write_text(
        RECIPE.replace("local: {path: ../models/loras/unet.safetensors}", hub)
    )
    env = {"HF_HUB_CACHE": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}
    plan = json.loads(workspace.run("plan", "recipes/hub.yaml", "--json", env=env, check=True).stdout)
    ids = {e["id"] for e in plan}
    assert "source:lora.0" in ids
    fetched = json.loads(workspace.run("fetch", "recipes/hub.yaml", "--json", env=env, check=True).stdout)
    assert [i["field"] for i in fetched["inputs"]] == ["model.loras.0.hub"]

    # The source stage takes the file out of the cache; the rewrite fuses it from that folder.
    from huggingface_hub import constants

    from builder.stages import source

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    spec = next(e for e in plan if e["id"] == "source:lora.0")
    assert spec["status"] == "stale"
    params = {"kind": "lora_hub", "id": "someone/style-lora", "revision": revision}
    (tmp_path / "taken").mkdir()
    source.run({}, params | {"weight_name": "weights/style.safetensors"}, tmp_path / "taken")
    taken = tmp_path / "taken" / "lora.safetensors"
    assert taken.read_bytes() == (models / "loras" / "both.safetensors").read_bytes()
    fused = _rewrite(models / "tiny-sd", "text_encoder", tmp_path / "fused", [(tmp_path / "taken", 0.8)])
    local = _rewrite(models / "tiny-sd", "text_encoder", tmp_path / "local", [(taken, 0.8)])
    assert all(torch.equal(fused[name], local[name]) for name in local)

    # Not in the cache: one located line naming `sdbuild fetch`, no traceback.
    done = workspace.run("plan", "recipes/hub.yaml", env=env | {"HF_HUB_CACHE": str(tmp_path / "empty")})
    message = " ".join(done.stderr.split())
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "hub.yaml:7" in message and "model.loras.0.hub.weight_name" in message and "sdbuild fetch" in message


@pytest.mark.parametrize(
    ("lora", "needles"),
    [
        ("local: {path: ../models/loras/style.ckpt}", ["model.loras.0.local.path", "pickle"]),
        ("local: {path: ../../outside.safetensors}", ["model.loras.0.local.path", "outside the workspace"]),
        (
            "hub: {id: a/b, revision: main, weight_name: x.safetensors}",
            ["model.loras.0.hub.revision", "not a commit"],
        ),
        (
            f"hub: {{id: a/b, revision: {'a' * 40}, weight_name: lora.bin}}",
            ["model.loras.0.hub.weight_name", "pickle"],
        ),
        ("local: {path: ../models/tiny-sd/unet/diffusion_pytorch_model.safetensors}", ["not a LoRA weight"]),
        ("local: {path: ../models/loras/both.safetensors, scale: 0.5}", ["model.loras.0.local.scale", "scale"]),
    ],
    ids=["pickle", "escape", "branch", "hub-pickle", "not-a-lora", "scale-misplaced"],
)
def test_bad_loras_are_located_errors(models_workspace: Workspace, lora, needles, request):
    import contextlib
    import io

    from builder.cli import main

    ws = models_workspace
    name = f"bad-{request.node.callspec.id}.yaml"
    (ws.root / "recipes" / name).write_text(RECIPE.replace("local: {path: ../models/loras/unet.safetensors}", lora))
    with contextlib.chdir(ws.root), contextlib.redirect_stderr(io.StringIO()) as err:
        code = main(["--workspace", str(ws.root), "--cache-dir", str(ws.cache), "plan", f"recipes/{name}"])
    message = " ".join(err.getvalue().split())
    assert code == 2 and "Traceback" not in message and "fix:" in message, message
    assert f"{name}:7" in message or f"{name}:8" in message, message
    for needle in needles:
        assert needle in message, (needle, message)


def test_fetch_downloads_only_the_lora_file_once(models, workspace: Workspace, tmp_path):
    from hf_cache import FakeHub

    revision = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "repo"
    (repo / "weights").mkdir(parents=True)
    (repo / "weights" / "style.safetensors").write_bytes((models / "loras" / "unet.safetensors").read_bytes())
    (repo / "other.safetensors").write_bytes((models / "loras" / "both.safetensors").read_bytes())
    hub = f"hub: {{id: someone/style-lora, revision: {revision}, weight_name: weights/style.safetensors}}"
    recipe = RECIPE.replace("local: {path: ../models/loras/unet.safetensors}", hub)
    (workspace.root / "recipes" / "hub.yaml").write_text(
        recipe.replace("local: {path: ../models/tiny-sd}", "synthetic: {preset: tiny-sd}")
    )
    with FakeHub("someone/style-lora", revision, repo) as fake:
        env = {"HF_HUB_CACHE": str(tmp_path / "hf"), "HF_HOME": str(tmp_path / "hf-home"), "HF_ENDPOINT": fake.endpoint}
        env |= {"HF_HUB_OFFLINE": "0"}
        report = json.loads(workspace.run("fetch", "recipes/hub.yaml", "--json", env=env, check=True).stdout)
        size = (repo / "weights" / "style.safetensors").stat().st_size
        assert report["downloaded_bytes"] == size == report["size_bytes"]
        assert [p.split(f"/resolve/{revision}/")[1] for p in fake.downloads()] == ["weights/style.safetensors"]
        fake.requests.clear()
        again = json.loads(workspace.run("fetch", "recipes/hub.yaml", "--json", env=env, check=True).stdout)
        assert again["downloaded_bytes"] == 0 and fake.downloads() == []
    # Offline now, the plan reads the LoRA's header from the cache.
    offline = env | {"HF_HUB_OFFLINE": "1"}
    plan = json.loads(workspace.run("plan", "recipes/hub.yaml", "--json", env=offline, check=True).stdout)
    assert {e["id"] for e in plan} >= {"source:lora.0", "rewrite:unet"}


def test_compression_workloads_condition_on_the_fused_text_encoder(models, tmp_path):
    """A LoRA fused into the text encoder changes the prompts' conditioning the bundle runs with, so the
    mixed-bit probe and W8A8 calibration read the fused rewrite (an input of theirs, keyed by it), and
    their conditioning is the text encoder with W + scale * up @ down, not the pipeline folder's."""
    import shutil

    from builder.recipe import load_recipe
    from builder.sd.conditioning import TextConditioning
    from builder.stages import analyze
    from builder.stages.pipeline import analysis_graph, build_graph

    pipeline, loras = models / "tiny-sd", models / "loras"
    ws = make_workspace(tmp_path / "ws")
    shutil.copytree(models, ws.root / "models")
    w8a8 = "{mode: w8a8, calibration: {prompts: 1, steps: 1}, sensitivity: {prompts: 1, steps: 1}}"
    text = RECIPE.replace("unet: {}", f"unet: {{compression: {w8a8}}}").replace("macOS13", "macOS14")
    for name, lora in (("both", "both.safetensors"), ("unet-only", "unet.safetensors")):
        (ws.root / "recipes" / f"{name}.yaml").write_text(text.replace("unet.safetensors", lora))

    def load(name: str):
        return load_recipe(ws.root / "recipes" / f"{name}.yaml", ws.root)

    graph = build_graph(load("both"))
    for stage in ("analyze-inputs:unet", "w8a8-calibrate:unet"):
        assert graph[stage].inputs["text_encoder.text_encoder"] == "rewrite:text_encoder"
    assert "rewrite:text_encoder" in analysis_graph(load("both"), "unet", 2)
    unet_only = build_graph(load("unet-only"))
    assert not any(name.startswith("text_encoder.") for name in unet_only["w8a8-calibrate:unet"].inputs)

    fused_rewrite, unet_rewrite = tmp_path / "fused", tmp_path / "unet"
    _rewrite(pipeline, "text_encoder", fused_rewrite, [(loras / "both.safetensors", 0.8)])
    _rewrite(pipeline, "unet", unet_rewrite, [])
    params = {"prompts": ["a lighthouse at dawn"], "steps": 1, "seed": 0, "family": "sd"}
    inputs = {"model": pipeline, "rewritten": unet_rewrite}
    (tmp_path / "base-probe").mkdir()
    analyze.run_inputs(inputs, params, tmp_path / "base-probe")
    (tmp_path / "probe").mkdir()
    analyze.run_inputs(inputs | {"text_encoder.text_encoder": fused_rewrite}, params, tmp_path / "probe")

    kind = KINDS["text_encoder"]
    model = kind.load(pipeline, kind.subfolder).eval()
    weights = model.state_dict()
    with torch.no_grad():  # fused by hand from the file, independently of builder.sd.lora
        for module, delta in _deltas(load_file(loras / "both.safetensors"), "text_encoder.").items():
            name = next(n for n in weights if n.endswith(f"{module.removeprefix('text_model.')}.weight"))
            weights[name] += 0.8 * delta
    model.load_state_dict(weights)
    expected = TextConditioning(pipeline, "sd", (16, 16), {"text_encoder": kind.wrap(model, "ORIGINAL").eval()})
    with torch.no_grad():
        want = expected.guided(params["prompts"])["encoder_hidden_states"]
    got = load_file(tmp_path / "probe" / "probe.safetensors")["encoder_hidden_states"]
    base = load_file(tmp_path / "base-probe" / "probe.safetensors")["encoder_hidden_states"]
    print("probe vs hand-fused", psnr(got, want), "probe vs base", psnr(got, base))
    assert psnr(got, want) > 100
    assert psnr(got, base) < 60  # the LoRA changed the conditioning
