"""Stable Diffusion knowledge in isolation: seeded pipelines, wrappers against references, PSNR, contract."""

from __future__ import annotations

import hashlib

import pytest
import torch

from builder.coreml.package import FeatureInfo, ModelInfo
from builder.sd.components import KINDS, ComponentShape, example_inputs, examples_for
from builder.sd.contract import check_models
from builder.sd.presets import get_preset
from builder.sd.psnr import psnr
from builder.sd.synthetic import write_synthetic_pipeline


def _digests(folder):
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny") / "pipeline"
    write_synthetic_pipeline(get_preset("tiny-sd"), 0, folder)
    return folder


def test_same_seed_same_bytes_other_seed_other_weights(pipeline, tmp_path):
    write_synthetic_pipeline(get_preset("tiny-sd"), 0, tmp_path / "again")
    write_synthetic_pipeline(get_preset("tiny-sd"), 1, tmp_path / "other")
    assert _digests(tmp_path / "again") == _digests(pipeline)
    other = _digests(tmp_path / "other")
    assert (
        other["unet/diffusion_pytorch_model.safetensors"]
        != _digests(pipeline)["unet/diffusion_pytorch_model.safetensors"]
    )
    assert other["tokenizer/vocab.json"] == _digests(pipeline)["tokenizer/vocab.json"]


def test_pipeline_loads_with_diffusers(pipeline):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(pipeline, use_safetensors=True, safety_checker=None)
    ids = pipe.tokenizer("a photo of an astronaut riding a horse", padding="max_length", max_length=77).input_ids
    assert len(ids) == 77 and ids[0] == pipe.tokenizer.bos_token_id


# SDXL's are tested in test_sdxl.py, SD3's in test_sd3.py; a ControlNet is a model of its own: test_controlnet.py
@pytest.mark.parametrize(
    "component", sorted(set(KINDS) - {"text_encoder_2", "unet_refiner", "controlnet", "mmdit", "text_encoder_3"})
)
def test_wrapper_matches_reference(pipeline, component):
    kind = KINDS[component]
    reference = kind.load(pipeline, kind.subfolder).eval()
    specs = kind.inputs(reference, ComponentShape(latent_size=(16, 16), batch_size=2))
    inputs = examples_for(component, pipeline, reference, specs)
    with torch.no_grad():
        expected = kind.reference(reference, inputs)
        produced = kind.wrap(reference, "ORIGINAL")(*inputs.values())
    produced = produced if isinstance(produced, tuple) else (produced,)
    assert len(produced) == len(kind.outputs_of(reference))
    for name, got, want in zip(kind.outputs_of(reference), produced, expected, strict=False):
        if name in kind.decision_outputs:
            assert torch.equal(got, want)
        else:
            assert psnr(got, want) > 100


def test_text_encoder_mask_stays_finite_in_float16(pipeline):
    kind = KINDS["text_encoder"]
    module = kind.wrap(kind.load(pipeline, kind.subfolder), "ORIGINAL").eval()
    assert torch.isfinite(module.causal_mask.half()).all()
    inputs = example_inputs("text_encoder", module.clip, kind.inputs(module.clip, ComponentShape()))
    with torch.no_grad():
        hidden, pooled = module.half()(inputs["input_ids"])
    assert torch.isfinite(hidden).all() and torch.isfinite(pooled).all()


def test_psnr_follows_apples_formula():
    reference = torch.tensor([1.0, -2.0, 0.5, 0.0])
    assert psnr(reference.clone(), reference) > 150
    noisy = reference + torch.tensor([0.1, -0.1, 0.1, -0.1])
    # peak 2, RMS error 0.1 -> 20 log10(20) = 26.02 dB
    assert psnr(noisy, reference) == pytest.approx(26.0206, abs=1e-3)


def _info(inputs, outputs):
    return ModelInfo(
        inputs=[FeatureInfo(name=n, shape=s, dtype=d) for n, s, d in inputs],
        outputs=[FeatureInfo(name=n, shape=s, dtype="float16") for n, s in outputs],
    )


def test_contract_check_names_each_violation():
    good = {
        "TextEncoder": _info([("input_ids", [1, 77], "float32")], [("last_hidden_state", [1, 77, 32])]),
        "Unet": _info(
            [
                ("sample", [2, 4, 8, 8], "float16"),
                ("timestep", [2], "float16"),
                ("encoder_hidden_states", [2, 32, 1, 77], "float16"),
            ],
            [("noise_pred", [2, 4, 8, 8])],
        ),
        "VAEDecoder": _info([("z", [1, 4, 8, 8], "float16")], [("image", [1, 3, 64, 64])]),
    }
    assert check_models("sd", good, latent_size=(8, 8), batch_size=2) == []
    bad = dict(good)
    bad["Unet"] = _info(
        [
            ("sample", [2, 4, 8, 8], "float16"),
            ("timestep", [2], "float16"),
            ("encoder_hidden_states", [2, 77, 32], "float16"),
        ],
        [("noise_pred", [2, 4, 8, 8])],
    )
    del bad["VAEDecoder"]
    problems = check_models("sd", bad, latent_size=(8, 8), batch_size=2)
    assert any("VAEDecoder" in p for p in problems)
    assert any("encoder_hidden_states" in p for p in problems)


def test_every_convertible_component_declares_its_settings():
    from builder.sd.settings import COMPONENT_SETTINGS

    # controlled_unet is the UNet's conversion kind when the recipe has ControlNets: the unet's settings key it
    assert set(COMPONENT_SETTINGS) == set(KINDS) - {"controlled_unet"}


def test_planning_does_not_import_torch():
    """A no-op rebuild must not pay for importing torch, diffusers or coremltools."""
    import subprocess
    import sys

    code = (
        "import sys, builder.cli, builder.stages.pipeline; "
        "print(sorted(m for m in ('torch', 'diffusers', 'coremltools') if m in sys.modules))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"
