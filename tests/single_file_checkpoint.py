"""Write a diffusers SD 1.x pipeline folder as one `.safetensors` checkpoint in the original Stable
Diffusion (LDM) layout, as single-file checkpoints are distributed: the inverse of the key mapping
diffusers' `from_single_file` applies, built here from the UNet and VAE configs."""

from __future__ import annotations

import json
from pathlib import Path

from safetensors.torch import load_file, save_file

_UNET_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1"}
_UNET_RESNET |= {"norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
_VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def _unet_blocks(config: dict) -> tuple[dict[str, str], set[str]]:
    """diffusers module prefix -> LDM prefix, and which of them are resnets (their inner names differ)."""
    names = {
        "time_embedding.linear_1": "time_embed.0",
        "time_embedding.linear_2": "time_embed.2",
        "conv_in": "input_blocks.0.0",
        "conv_norm_out": "out.0",
        "conv_out": "out.2",
        "mid_block.resnets.0": "middle_block.0",
        "mid_block.attentions.0": "middle_block.1",
        "mid_block.resnets.1": "middle_block.2",
    }
    resnets = {"mid_block.resnets.0", "mid_block.resnets.1"}
    per_level, levels = config["layers_per_block"] + 1, len(config["block_out_channels"])
    for i in range(levels):
        for j in range(per_level - 1):
            names[f"down_blocks.{i}.resnets.{j}"] = f"input_blocks.{1 + i * per_level + j}.0"
            names[f"down_blocks.{i}.attentions.{j}"] = f"input_blocks.{1 + i * per_level + j}.1"
            resnets.add(f"down_blocks.{i}.resnets.{j}")
        for j in range(per_level):
            names[f"up_blocks.{i}.resnets.{j}"] = f"output_blocks.{i * per_level + j}.0"
            names[f"up_blocks.{i}.attentions.{j}"] = f"output_blocks.{i * per_level + j}.1"
            resnets.add(f"up_blocks.{i}.resnets.{j}")
        if i < levels - 1:
            names[f"down_blocks.{i}.downsamplers.0.conv"] = f"input_blocks.{(i + 1) * per_level}.0.op"
            upsampler = 2 if config["up_block_types"][i].startswith("CrossAttn") else 1
            names[f"up_blocks.{i}.upsamplers.0.conv"] = (
                f"output_blocks.{i * per_level + per_level - 1}.{upsampler}.conv"
            )
    return names, resnets


def _rename(key: str, blocks: dict[str, str], inner: dict[str, str], renamed_inside: set[str]) -> str:
    prefix = max((p for p in blocks if key.startswith(p + ".")), key=len)
    rest = key[len(prefix) + 1 :]
    if prefix in renamed_inside:
        head = max((n for n in inner if rest.startswith(n + ".")), key=len, default=None)
        if head is not None:
            rest = inner[head] + rest[len(head) :]
    return f"{blocks[prefix]}.{rest}"


def _vae_blocks(config: dict) -> tuple[dict[str, str], set[str], set[str]]:
    levels = len(config["block_out_channels"])
    names = {"quant_conv": "quant_conv", "post_quant_conv": "post_quant_conv"}
    for part in ("encoder", "decoder"):
        names |= {f"{part}.conv_in": f"{part}.conv_in", f"{part}.conv_out": f"{part}.conv_out"}
        names |= {f"{part}.conv_norm_out": f"{part}.norm_out", f"{part}.mid_block.attentions.0": f"{part}.mid.attn_1"}
        names |= {
            f"{part}.mid_block.resnets.0": f"{part}.mid.block_1",
            f"{part}.mid_block.resnets.1": f"{part}.mid.block_2",
        }
    for i in range(levels):
        for j in range(config["layers_per_block"]):
            names[f"encoder.down_blocks.{i}.resnets.{j}"] = f"encoder.down.{i}.block.{j}"
        for j in range(config["layers_per_block"] + 1):
            names[f"decoder.up_blocks.{i}.resnets.{j}"] = f"decoder.up.{levels - 1 - i}.block.{j}"
        if i < levels - 1:
            names[f"encoder.down_blocks.{i}.downsamplers.0.conv"] = f"encoder.down.{i}.downsample.conv"
            names[f"decoder.up_blocks.{i}.upsamplers.0.conv"] = f"decoder.up.{levels - 1 - i}.upsample.conv"
    attentions = {f"{part}.mid_block.attentions.0" for part in ("encoder", "decoder")}
    resnets = {p for p in names if ".resnets." in p}
    return names, resnets, attentions


def write_sd1_checkpoint(pipeline: Path, checkpoint: Path) -> None:
    """`pipeline`'s UNet, VAE and CLIP text encoder as one original-layout checkpoint."""
    tensors = {}
    unet_config = json.loads((pipeline / "unet" / "config.json").read_text())
    blocks, resnets = _unet_blocks(unet_config)
    for key, value in load_file(pipeline / "unet" / "diffusion_pytorch_model.safetensors").items():
        tensors["model.diffusion_model." + _rename(key, blocks, _UNET_RESNET, resnets)] = value
    vae_config = json.loads((pipeline / "vae" / "config.json").read_text())
    blocks, resnets, attentions = _vae_blocks(vae_config)
    for key, value in load_file(pipeline / "vae" / "diffusion_pytorch_model.safetensors").items():
        prefix = max((p for p in blocks if key.startswith(p + ".")), key=len)
        inner = _VAE_ATTENTION if prefix in attentions else {"conv_shortcut": "nin_shortcut"}
        if prefix in attentions and value.dim() == 2:
            value = value[:, :, None, None]  # the original VAE's attention projections are 1x1 convolutions
        tensors["first_stage_model." + _rename(key, blocks, inner, attentions | resnets)] = value
    for key, value in load_file(pipeline / "text_encoder" / "model.safetensors").items():
        # transformers saves CLIPTextModel without its `text_model.` prefix; the original layout keeps it
        tensors["cond_stage_model.transformer." + ("" if key.startswith("text_model.") else "text_model.") + key] = (
            value
        )
    save_file({k: v.contiguous() for k, v in tensors.items()}, checkpoint)
