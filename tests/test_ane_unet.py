"""The Neural Engine UNet rewrite: same numbers as diffusers, traceable, reloadable, convertible.

Tiny seeded UNets in two shapes: SD 1.x (convolution projections, one head count) and SD 2.x
(linear projections, per-level head counts) with SDXL-style two-layer transformers.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path

import pytest
import torch
from diffusers import Transformer2DModel, UNet2DConditionModel
from safetensors.torch import load_file, save_file

from builder.recipe.enums import Attention
from builder.sd.ane import rewrite_unet
from builder.sd.ane.support import check_transformer
from builder.sd.ane.transformer import ConvTransformer2D
from builder.sd.ane.unet import conv_transformer
from builder.sd.ane.weights import conv_state_dict
from builder.sd.presets import get_preset
from builder.sd.psnr import psnr
from builder.sd.synthetic import _randomize

pytestmark = pytest.mark.usefixtures("one_torch_thread")

ATTENTIONS = [a.value for a in Attention]
VARIANTS = {
    "sd1": {},
    "sd2": {"use_linear_projection": True, "attention_head_dim": [2, 4, 8, 8], "transformer_layers_per_block": 2},
}
MINIMUM_PSNR_DB = 60.0
# 16x16 latents: no attention sequence reaches 512. 32x32: the first level has 1024 tokens, so
# SPLIT_EINSUM_V2 cuts its queries in two chunks.
LATENTS = [16, 32]


def _unet(overrides: dict | None = None) -> UNet2DConditionModel:
    unet = UNet2DConditionModel(**(get_preset("tiny-sd").unet | (overrides or {}))).eval()
    _randomize(unet, torch.Generator().manual_seed(0))
    return unet


def _inputs(unet: UNet2DConditionModel, latent: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(sample, timestep, text states in the Swift (B, C, 1, 77) layout), batch 2 as with guidance."""
    generator = torch.Generator().manual_seed(1)
    sample = torch.randn(2, unet.config.in_channels, latent, latent, generator=generator)
    text = torch.randn(2, unet.config.cross_attention_dim, 1, 77, generator=generator)
    return sample, torch.tensor([981.0, 981.0]), text


def _reference(unet: UNet2DConditionModel, inputs: tuple[torch.Tensor, ...]) -> torch.Tensor:
    sample, timestep, text = inputs
    with torch.no_grad():
        return unet(sample, timestep, text.squeeze(2).transpose(1, 2)).sample


@pytest.fixture(scope="module")
def references() -> dict[str, UNet2DConditionModel]:
    return {name: _unet(overrides) for name, overrides in VARIANTS.items()}


@pytest.fixture(scope="module")
def traced() -> dict[str, tuple[torch.jit.ScriptModule, tuple[torch.Tensor, ...], torch.Tensor]]:
    """Per attention: the traced SD 1.x rewrite at 32x32 latents, its inputs and eager output."""
    result = {}
    for attention in ATTENTIONS:
        module = rewrite_unet(_unet(), attention).eval()
        inputs = _inputs(module.unet, 32)
        with torch.no_grad():
            result[attention] = (torch.jit.trace(module, inputs, check_trace=False), inputs, module(*inputs))
    return result


@pytest.mark.parametrize("latent", LATENTS)
@pytest.mark.parametrize("attention", ATTENTIONS)
@pytest.mark.parametrize("variant", VARIANTS)
def test_matches_diffusers(references: dict, variant: str, attention: str, latent: int) -> None:
    reference = references[variant]
    inputs = _inputs(reference, latent)
    expected = _reference(reference, inputs)
    module = rewrite_unet(copy.deepcopy(reference), attention).eval()
    with torch.no_grad():
        produced = module(*inputs)
    assert psnr(produced, expected) >= MINIMUM_PSNR_DB


@pytest.mark.parametrize("attention", ATTENTIONS)
def test_traced_matches_eager(traced: dict, attention: str) -> None:
    module, inputs, eager = traced[attention]
    with torch.no_grad():
        assert psnr(module(*inputs), eager) >= MINIMUM_PSNR_DB


@pytest.mark.parametrize("variant", VARIANTS)
def test_weights_round_trip_through_safetensors(references: dict, variant: str, tmp_path: Path) -> None:
    """The trace stage rebuilds the module from the config alone and loads the saved weights."""
    reference = references[variant]
    module = rewrite_unet(copy.deepcopy(reference), "SPLIT_EINSUM").eval()
    save_file({name: t.contiguous() for name, t in module.state_dict().items()}, tmp_path / "weights.safetensors")
    fresh = rewrite_unet(UNet2DConditionModel.from_config(reference.config), "SPLIT_EINSUM").eval()
    fresh.load_state_dict(load_file(tmp_path / "weights.safetensors"), strict=True)
    inputs = _inputs(reference, 16)
    with torch.no_grad():
        assert torch.equal(fresh(*inputs), module(*inputs))


@pytest.mark.parametrize("use_linear_projection", [False, True])
def test_key_and_shape_mapping(use_linear_projection: bool) -> None:
    transformer = Transformer2DModel(
        num_attention_heads=2,
        attention_head_dim=8,
        in_channels=16,
        cross_attention_dim=12,
        norm_num_groups=4,
        use_linear_projection=use_linear_projection,
    )
    source = transformer.state_dict()
    mapped = conv_state_dict(source)
    expected = {
        "transformer_blocks.0.attn1.to_q.weight": ("transformer_blocks.0.attn1.to_q.weight", (16, 16, 1, 1)),
        "transformer_blocks.0.attn2.to_k.weight": ("transformer_blocks.0.attn2.to_k.weight", (16, 12, 1, 1)),
        "transformer_blocks.0.attn1.to_out.0.weight": ("transformer_blocks.0.attn1.to_out.weight", (16, 16, 1, 1)),
        "transformer_blocks.0.attn1.to_out.0.bias": ("transformer_blocks.0.attn1.to_out.bias", (16,)),
        "transformer_blocks.0.ff.net.0.proj.weight": ("transformer_blocks.0.ff.project_in.weight", (128, 16, 1, 1)),
        "transformer_blocks.0.ff.net.2.weight": ("transformer_blocks.0.ff.project_out.weight", (16, 64, 1, 1)),
        "transformer_blocks.0.norm3.weight": ("transformer_blocks.0.norm3.weight", (16,)),
        "proj_in.weight": ("proj_in.weight", (16, 16, 1, 1)),
        "proj_out.weight": ("proj_out.weight", (16, 16, 1, 1)),
        "norm.weight": ("norm.weight", (16,)),
    }
    for key, (target, shape) in expected.items():
        assert tuple(mapped[target].shape) == shape
        assert torch.equal(mapped[target].flatten(), source[key].flatten())

    rewritten = conv_transformer(transformer, Attention.ORIGINAL)
    assert {k: v.shape for k, v in mapped.items()} == {k: v.shape for k, v in rewritten.state_dict().items()}
    assert rewritten.proj_in.weight.data_ptr() == transformer.proj_in.weight.data_ptr()  # shared, not copied


SIMPLE_CROSS_ATTENTION_DOWN = ["SimpleCrossAttnDownBlock2D"] + ["CrossAttnDownBlock2D"] * 2 + ["DownBlock2D"]


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        ({"upcast_attention": True}, "upcast_attention"),
        ({"only_cross_attention": True}, "only_cross_attention"),
        ({"attention_type": "gated"}, "attention_type"),
        ({"cross_attention_norm": "layer_norm"}, "cross_attention_norm"),
        ({"dual_cross_attention": True}, "dual_cross_attention"),
        ({"class_embed_type": "timestep"}, "class_embed_type"),
        ({"time_cond_proj_dim": 8}, "time_cond_proj_dim"),
        ({"encoder_hid_dim_type": "text_proj", "encoder_hid_dim": 16}, "encoder_hid_dim_type"),
        ({"addition_embed_type": "text"}, "addition_embed_type"),  # "text_time" (SDXL) is supported
        ({"down_block_types": SIMPLE_CROSS_ATTENTION_DOWN}, "down_block_types[0]"),
    ],
)
def test_unsupported_unet_config_is_refused_by_name(overrides: dict, key: str) -> None:
    unet = _unet(overrides)
    with pytest.raises(ValueError, match=re.escape(f"config {key}=")):
        rewrite_unet(unet, "SPLIT_EINSUM")
    assert not any(isinstance(m, ConvTransformer2D) for m in unet.modules())  # left intact


PATCH_MODE = dict(in_channels=16, patch_size=2, norm_type="ada_norm_zero", num_embeds_ada_norm=10, sample_size=8)


@pytest.mark.parametrize(
    ("mode", "key"),
    [
        ({"num_vector_embeds": 10, "sample_size": 4}, "num_vector_embeds"),
        (PATCH_MODE, "patch_size"),
    ],
)
def test_non_continuous_transformer_is_refused_by_name(mode: dict, key: str) -> None:
    transformer = Transformer2DModel(
        num_attention_heads=2, attention_head_dim=8, cross_attention_dim=12, norm_num_groups=4, **mode
    )
    with pytest.raises(ValueError, match=f"config {key}="):
        check_transformer("transformer", transformer)


def test_custom_attention_processor_is_refused() -> None:
    class ScaledProcessor:
        def __call__(self, attn, hidden_states, *args, **kwargs):
            return hidden_states

    unet = _unet()
    unet.set_attn_processor(ScaledProcessor())
    with pytest.raises(ValueError, match="attention processor ScaledProcessor"):
        rewrite_unet(unet, "ORIGINAL")


def test_split_einsum_v2_refuses_unaligned_long_sequence(references: dict) -> None:
    """48x48 latents give 2304 first-level tokens: 4.5 chunks, which the reference would truncate."""
    module = rewrite_unet(copy.deepcopy(references["sd1"]), "SPLIT_EINSUM_V2").eval()
    with torch.no_grad(), pytest.raises(ValueError, match="2304"):
        module(*_inputs(module.unet, 48))


def test_unknown_attention_is_refused() -> None:
    with pytest.raises(ValueError, match="SPLIT_EINSUM_V3"):
        rewrite_unet(_unet(), "SPLIT_EINSUM_V3")


@pytest.mark.slow
@pytest.mark.parametrize("attention", ATTENTIONS)
def test_converts_to_mlprogram(traced: dict, attention: str) -> None:
    import coremltools as ct

    module, inputs, _ = traced[attention]
    names = ("sample", "timestep", "encoder_hidden_states")
    model = ct.convert(
        module,
        inputs=[ct.TensorType(name=name, shape=tensor.shape) for name, tensor in zip(names, inputs, strict=False)],
        convert_to="mlprogram",
        compute_precision=ct.precision.FLOAT16,
        minimum_deployment_target=ct.target.macOS13,
        skip_model_load=True,
    )
    assert [i.name for i in model.get_spec().description.input] == list(names)
