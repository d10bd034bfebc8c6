"""`sdbuild generate`: PNGs from the built tiny-sd, tiny-sdxl and ControlNet bundles; a float16 bundle's
image against diffusers' pipeline for the same weights, seed and scheduler; image to image; refusals;
the backend dispatch and the Core ML wiring (through a fake at the coremltools boundary).

The bundles are the session builds of conftest (`built`, `sdxl_built`, `controlnet_builds`); the
float16 tiny-sd bundle is built in `built`'s cache, where every stage but the bundle's is cached.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import Workspace, make_workspace
from PIL import Image

from builder.cli import Workspace as CliWorkspace
from builder.cli import main
from builder.errors import UserError
from builder.generate.backend import choose_backend
from builder.generate.built import BuiltBundle, locate
from builder.generate.request import Request
from builder.generate.run import generate
from builder.sd.psnr import psnr
from builder.stages.pipeline import build_graph

PROMPT = "a lighthouse at dawn"
STEPS = "6"
SEED = "3"
GUIDANCE = 7.5


def _generate(ws: Workspace, recipe: str, out: Path, *extra: str) -> int:
    return main(
        [
            "--workspace",
            str(ws.root),
            "--cache-dir",
            str(ws.cache),
            "generate",
            str(ws.root / recipe),
            "--prompt",
            PROMPT,
            "--steps",
            STEPS,
            "--seed",
            SEED,
            "--out",
            str(out),
            *extra,
        ]
    )


def _pixels(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        assert image.format == "PNG"
        return np.asarray(image.convert("RGB"))


def _db(image: np.ndarray, reference: np.ndarray) -> float:
    return psnr(torch.from_numpy(image.astype(np.float64)), torch.from_numpy(reference.astype(np.float64)))


def _located(ws: Workspace, recipe: str) -> BuiltBundle:
    cli = CliWorkspace(ws.root, ws.cache)
    loaded = cli.load(str(ws.root / recipe))
    return locate(loaded, build_graph(loaded), cli.engine(loaded), cli.artifacts)


@pytest.fixture(scope="module")
def float16_sd(built, tmp_path_factory: pytest.TempPathFactory) -> Workspace:
    """tiny-sd with a float16 UNet, published from `built`'s cache (its UNet was converted there already),
    under its own name: the cache's index of `built`'s recipe keeps pointing at `built`'s bundle."""
    shared, _ = built
    ws = make_workspace(tmp_path_factory.mktemp("generate-float16"))
    ws.cache = shared.cache
    recipe = ws.root / "recipes" / "tiny-sd.yaml"
    text = recipe.read_text()
    assert "compression: {mode: palettize, nbits: 6}" in text
    text = text.replace("name: tiny-sd\n", "name: tiny-sd-float16\n", 1)
    recipe.write_text(text.replace("compression: {mode: palettize, nbits: 6}", "compression: {mode: float16}"))
    ws.build_json()
    return ws


@pytest.fixture(scope="module")
def diffusers_pipeline(float16_sd):
    """The diffusers pipeline of the folder the bundle was built from (the same weights and scheduler)."""
    from diffusers import StableDiffusionPipeline

    folder = _located(float16_sd, "recipes/tiny-sd.yaml").pipeline("unet")
    return StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False)


def _diffusers_pixels(pipeline, **arguments) -> np.ndarray:
    images = pipeline(
        PROMPT,
        num_inference_steps=int(STEPS),
        guidance_scale=GUIDANCE,
        generator=torch.Generator().manual_seed(int(SEED)),
        output_type="np",
        **arguments,
    ).images
    return (images[0] * 255).round().astype(np.uint8)  # diffusers' numpy_to_pil


def test_float16_bundle_image_equals_diffusers_pipeline(float16_sd, diffusers_pipeline, built, tmp_path, capsys):
    """The acceptance check: the float16 bundle gives diffusers' image; the palettized one reads back its own."""
    out = tmp_path / "float16.png"
    assert _generate(float16_sd, "recipes/tiny-sd.yaml", out) == 0
    assert "backend torch" in capsys.readouterr().err
    image = _pixels(out)
    assert image.shape == (128, 128, 3)
    reference = _diffusers_pixels(diffusers_pipeline, height=128, width=128)
    db = _db(image, reference)
    print(f"float16 bundle vs diffusers: {db:.2f} dB on pixels")
    assert db >= 30

    compressed = tmp_path / "palettized.png"
    assert _generate(built[0], "recipes/tiny-sd.yaml", compressed) == 0
    assert not np.array_equal(_pixels(compressed), image)  # the 6-bit weights were read back into the UNet


def test_image_to_image_equals_diffusers_pipeline(float16_sd, diffusers_pipeline, tmp_path):
    from diffusers import StableDiffusionImg2ImgPipeline

    start = tmp_path / "start.png"
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (128, 128, 3), dtype=np.uint8)).save(start)
    out = tmp_path / "img2img.png"
    assert _generate(float16_sd, "recipes/tiny-sd.yaml", out, "--init-image", str(start), "--strength", "0.5") == 0
    pipeline = StableDiffusionImg2ImgPipeline(**diffusers_pipeline.components)
    with Image.open(start) as image:
        reference = _diffusers_pixels(pipeline, image=image.convert("RGB"), strength=0.5)
    db = _db(_pixels(out), reference)
    print(f"float16 bundle image-to-image vs diffusers: {db:.2f} dB on pixels")
    assert db >= 30


def test_sdxl_with_refiner_writes_a_png(sdxl_built, tmp_path, one_torch_thread):
    ws, _ = sdxl_built
    refined, base_only = tmp_path / "refined.png", tmp_path / "base.png"
    assert _generate(ws, "recipes/tiny-sdxl.yaml", refined) == 0
    assert _generate(ws, "recipes/tiny-sdxl.yaml", base_only, "--refiner-start", "1") == 0
    assert _pixels(refined).shape == (128, 128, 3)
    assert not np.array_equal(_pixels(refined), _pixels(base_only))  # the refiner ran the last steps


def test_controlnet_bundle_writes_a_png_with_its_residuals(controlnet_builds, tmp_path, one_torch_thread, capsys):
    from builder.generate.backend import LazyModels, load_models
    from builder.generate.families import sd

    ws, _, _ = controlnet_builds
    control = tmp_path / "control.png"
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(control)
    out = tmp_path / "controlled.png"
    assert _generate(ws, "recipes/controlled.yaml", out, "--control-image", str(control)) == 0  # resized to 128
    assert _pixels(out).shape == (128, 128, 3)
    two = ("--control-image", str(control), "--control-image", str(control))
    assert _generate(ws, "recipes/controlled.yaml", tmp_path / "no.png", *two) == 2
    assert "2 --control-image for 1 ControlNet(s): controlnet/SyntheticTinySdSeed0" in capsys.readouterr().err
    assert not (tmp_path / "no.png").exists()

    # The ControlNet's residuals reach the ControlledUnet: zeroing them changes the image. (The
    # synthetic ControlNet's small random weights leave its residuals almost blind to the image itself.)
    bundle = _located(ws, "recipes/controlled.yaml")
    models = load_models(bundle, "torch")

    def silenced(name: str):
        model = models[name]
        if not name.startswith("controlnet/"):
            return model
        return lambda features: {n: torch.zeros_like(r) for n, r in model(features).items()}

    request = Request(prompt=PROMPT, steps=3, seed=1, guidance_scale=GUIDANCE, control_images=(control,))
    image = sd.generate(bundle, models, request, lambda done, total: None)
    without = sd.generate(bundle, LazyModels(list(models), silenced), request, lambda done, total: None)
    assert psnr(without, image) < 60


def test_init_image_needs_a_vae_encoder(controlnet_builds, tmp_path, capsys):
    ws, _, _ = controlnet_builds
    start = tmp_path / "start.png"
    Image.new("RGB", (128, 128)).save(start)
    arguments = ("--init-image", str(start), "--control-image", str(start))
    assert _generate(ws, "recipes/controlled.yaml", tmp_path / "out.png", *arguments) == 2
    err = capsys.readouterr().err
    assert "--init-image needs a VAE encoder" in err and "vae_encoder: {}" in err
    assert "Traceback" not in err


def test_a_stale_or_unpublished_bundle_is_refused(built, tmp_path, capsys):
    shared, _ = built
    ws = make_workspace(tmp_path / "ws")
    ws.cache = shared.cache  # every stage of recipes/tiny-sd.yaml is cached there, but nothing is published here
    assert _generate(ws, "recipes/tiny-sd.yaml", tmp_path / "a.png") == 2
    err = capsys.readouterr().err
    assert "is not the bundle this recipe builds now" in err
    assert f"sdbuild build {ws.root}/recipes/tiny-sd.yaml" in err

    recipe = ws.root / "recipes" / "tiny-sd.yaml"
    recipe.write_text(recipe.read_text().replace("nbits: 6", "nbits: 4"))
    assert _generate(ws, "recipes/tiny-sd.yaml", tmp_path / "b.png") == 2
    err = capsys.readouterr().err
    assert "the bundle is not built or is stale" in err and "palettize:unet" in err
    assert not list(tmp_path.glob("*.png"))


def test_backend_dispatch_picks_core_ml_on_macos_only():
    assert choose_backend("auto", "darwin") == "coreml"
    assert choose_backend("auto", "linux") == "torch"
    assert choose_backend("torch", "darwin") == "torch"
    with pytest.raises(UserError, match="Core ML runs models on macOS only"):
        choose_backend("coreml", "linux")


def _core_ml_faked_by_torch(monkeypatch, bundle: BuiltBundle) -> list[str]:
    """Answer Core ML's `predict` with the torch backend's model, checking every feed against the
    interface the saved model declares; returns the names of the models opened."""
    from builder.generate import coreml_backend, torch_backend

    opened: list[str] = []

    class FakeMLModel:
        def __init__(self, path: Path, compute_unit: str):
            assert compute_unit == bundle.manifest.compute_unit
            self.name, self.entry = next(
                (name, entry) for name, entry in bundle.manifest.models.items() if bundle.resource(entry) == path
            )
            self.model = torch_backend.load_model(bundle, [(self.name, self.entry)])
            opened.append(self.name)

        def predict(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
            declared = {i.name: (i.shape, i.dtype) for i in self.entry.inputs}
            assert {name: (list(a.shape), str(a.dtype)) for name, a in feed.items()} == declared
            produced = self.model({name: torch.from_numpy(array) for name, array in feed.items()})
            return {name: value.numpy() for name, value in produced.items()}

    monkeypatch.setattr(coreml_backend, "_open", FakeMLModel)
    return opened


def test_core_ml_backend_wiring(built, monkeypatch, one_torch_thread):
    """The Core ML path feeds every model the features and dtypes its saved interface declares and reads
    its outputs by name. Core ML cannot run here, so `predict` is answered by the torch backend's model."""
    ws, _ = built
    bundle = _located(ws, "recipes/tiny-sd.yaml")
    opened = _core_ml_faked_by_torch(monkeypatch, bundle)
    request = Request(prompt=PROMPT, steps=3, seed=1, guidance_scale=GUIDANCE)
    through_core_ml = generate(bundle, "coreml", request, lambda done, total: None)
    assert sorted(opened) == ["TextEncoder", "Unet", "VAEDecoder"]
    through_torch = generate(bundle, "torch", request, lambda done, total: None)
    assert _db(through_core_ml, through_torch) >= 30  # the same models, fed float16 inputs


# --- SD3 ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sd3_builds(tmp_path_factory: pytest.TempPathFactory) -> tuple[Workspace, Workspace]:
    """tiny-sd3 as shipped (6-bit MMDiT), and with a float16 MMDiT built in the same cache."""
    shipped = make_workspace(tmp_path_factory.mktemp("generate-sd3"))
    shipped.build_json("recipes/tiny-sd3.yaml")
    ws = make_workspace(tmp_path_factory.mktemp("generate-sd3-float16"))
    ws.cache = shipped.cache
    recipe = ws.root / "recipes" / "tiny-sd3.yaml"
    text = recipe.read_text()
    assert "compression: {mode: palettize, nbits: 6}" in text
    text = text.replace("name: tiny-sd\n", "name: tiny-sd-float16\n", 1)
    recipe.write_text(text.replace("compression: {mode: palettize, nbits: 6}", "compression: {mode: float16}"))
    ws.build_json("recipes/tiny-sd3.yaml")
    return shipped, ws


def test_sd3_float16_bundle_image_equals_diffusers_sd3_pipeline(sd3_builds, tmp_path, one_torch_thread):
    """The float16 tiny-sd3 bundle gives diffusers' StableDiffusion3Pipeline image (same weights, seed,
    flow-matching scheduler, T5 kept to 77 tokens as the Swift package does); the shipped 6-bit one
    writes a PNG of its own."""
    from diffusers import StableDiffusion3Pipeline

    shipped, ws = sd3_builds
    out = tmp_path / "sd3.png"
    assert _generate(ws, "recipes/tiny-sd3.yaml", out) == 0
    image = _pixels(out)
    assert image.shape == (128, 128, 3)
    folder = _located(ws, "recipes/tiny-sd3.yaml").pipeline("mmdit")
    pipeline = StableDiffusion3Pipeline.from_pretrained(folder, use_safetensors=True)
    reference = _diffusers_pixels(pipeline, height=128, width=128, max_sequence_length=77)
    db = _db(image, reference)
    print(f"float16 sd3 bundle vs diffusers: {db:.2f} dB on pixels")
    assert db >= 40  # above 30: decoding without the VAE's shift factor still clears 30 dB on this tiny VAE

    palettized = tmp_path / "palettized.png"
    assert _generate(shipped, "recipes/tiny-sd3.yaml", palettized) == 0
    assert _pixels(palettized).shape == (128, 128, 3)
    assert not np.array_equal(_pixels(palettized), image)  # the 6-bit MMDiT weights were read back


def test_sd3_without_t5_conditions_on_zeros_as_diffusers_does(sd3_builds, one_torch_thread):
    """A bundle without TextEncoderT5 puts zeros where T5's 77 token states go (diffusers' SD3 pipeline
    without text_encoder_3), and the CLIP part stays the same."""
    from diffusers import StableDiffusion3Pipeline

    from builder.generate.backend import LazyModels, load_models
    from builder.generate.families.sd3 import T5, PromptEncoder

    _, ws = sd3_builds
    bundle = _located(ws, "recipes/tiny-sd3.yaml")
    models = load_models(bundle, "torch")
    folder = bundle.pipeline("mmdit")
    with_t5 = PromptEncoder(bundle, models, folder)(PROMPT)
    without = PromptEncoder(bundle, LazyModels([n for n in models if n != T5], models.__getitem__), folder)(PROMPT)
    assert without[0].shape == with_t5[0].shape == (1, 128, 1, 154)
    assert torch.equal(without[0][..., 77:], torch.zeros(1, 128, 1, 77))
    assert torch.equal(without[0][..., :77], with_t5[0][..., :77]) and torch.equal(without[1], with_t5[1])

    pipeline = StableDiffusion3Pipeline.from_pretrained(
        folder, use_safetensors=True, text_encoder_3=None, tokenizer_3=None
    )
    with torch.no_grad():
        embeds, _, pooled, _ = pipeline.encode_prompt(
            PROMPT, PROMPT, PROMPT, device="cpu", do_classifier_free_guidance=False, max_sequence_length=77
        )
    # the bundle's float16 text encoders against diffusers' float32 ones
    assert _db(without[0].squeeze(2).transpose(1, 2).numpy(), embeds.numpy()) >= 40
    assert _db(without[1].flatten(1).numpy(), pooled.numpy()) >= 40


def test_sd3_image_to_image_equals_diffusers_sd3_img2img_pipeline(sd3_builds, tmp_path, one_torch_thread):
    """--init-image on an sd3 bundle follows StableDiffusion3Img2ImgPipeline: the VAE encoder's latents
    shifted and scaled, moved along the flow by scale_noise, and strength 0.6 of 6 steps running 4
    steps (the UNet pipelines' rule would run 3: the comparison tells them apart)."""
    from diffusers import StableDiffusion3Img2ImgPipeline

    _, ws = sd3_builds
    start = tmp_path / "start.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (128, 128, 3), dtype=np.uint8)).save(start)
    out = tmp_path / "img2img.png"
    assert _generate(ws, "recipes/tiny-sd3.yaml", out, "--init-image", str(start), "--strength", "0.6") == 0
    folder = _located(ws, "recipes/tiny-sd3.yaml").pipeline("mmdit")
    pipeline = StableDiffusion3Img2ImgPipeline.from_pretrained(folder, use_safetensors=True)
    with Image.open(start) as image:
        reference = _diffusers_pixels(pipeline, image=image.convert("RGB"), strength=0.6, max_sequence_length=77)
    db = _db(_pixels(out), reference)
    print(f"float16 sd3 bundle image-to-image vs diffusers: {db:.2f} dB on pixels")
    assert db >= 40


def test_sd3_core_ml_backend_wiring(sd3_builds, monkeypatch, one_torch_thread):
    """The sd3 pipeline feeds each of its Core ML models exactly the inputs and dtypes it declares."""
    shipped, _ = sd3_builds
    bundle = _located(shipped, "recipes/tiny-sd3.yaml")
    opened = _core_ml_faked_by_torch(monkeypatch, bundle)
    request = Request(prompt=PROMPT, steps=2, seed=1, guidance_scale=GUIDANCE)
    through_core_ml = generate(bundle, "coreml", request, lambda done, total: None)
    expected = ["MultiModalDiffusionTransformer", "TextEncoder", "TextEncoder2", "TextEncoderT5", "VAEDecoder"]
    assert sorted(opened) == expected
    through_torch = generate(bundle, "torch", request, lambda done, total: None)
    assert _db(through_core_ml, through_torch) >= 30  # the same models, fed float16 inputs


def test_sd3_dynamic_shifting_uses_the_image_token_count(tmp_path):
    """A flow-matching scheduler with use_dynamic_shifting shifts by mu, linear in the MMDiT's image
    token count between (base_image_seq_len, base_shift) and (max_image_seq_len, max_shift)."""
    import json

    from diffusers import FlowMatchEulerDiscreteScheduler

    from builder.generate.families.sd3 import _timesteps

    (tmp_path / "transformer").mkdir()
    (tmp_path / "transformer" / "config.json").write_text(json.dumps({"patch_size": 2}))
    config = {"shift": 3.0, "use_dynamic_shifting": True, "base_shift": 0.5, "max_shift": 1.15}
    config |= {"base_image_seq_len": 256, "max_image_seq_len": 4096}
    dynamic = _timesteps(FlowMatchEulerDiscreteScheduler(**config), 4, tmp_path, (1, 16, 128, 64))
    tokens = (128 // 2) * (64 // 2)
    mu = 0.5 + (1.15 - 0.5) * (tokens - 256) / (4096 - 256)
    expected = FlowMatchEulerDiscreteScheduler(**config)
    expected.set_timesteps(4, mu=mu)
    torch.testing.assert_close(dynamic, expected.timesteps)
    static = _timesteps(FlowMatchEulerDiscreteScheduler(shift=3.0), 4, tmp_path, (1, 16, 128, 64))
    assert not torch.allclose(dynamic, static)
