"""Materialise a pipeline folder: seeded synthetic weights, a single-file checkpoint unpacked, or a
pinned Hugging Face snapshot taken from the Hugging Face cache by hard links (a hub LoRA: its one file)."""

from __future__ import annotations

from pathlib import Path

from builder.errors import UserError, first_line
from builder.hub.cache import HubRef, link_or_copy, link_snapshot, snapshot
from builder.hub.layout import RepoKind
from builder.hub.lora import cached_lora, lora_ref
from builder.sd.presets import get_controlnet_preset, get_preset
from builder.sd.synthetic import write_synthetic_controlnet, write_synthetic_pipeline
from builder.stages.params import (
    LORA_FILE,
    HubControlNet,
    HubLora,
    HubSource,
    SingleFileSource,
    SyntheticControlNet,
    SyntheticSource,
)


def run(inputs: dict[str, Path], params: dict, out: Path) -> dict:
    if params["kind"] == "controlnet_synthetic":
        net = SyntheticControlNet.model_validate(params)
        write_synthetic_controlnet(get_controlnet_preset(net.preset), net.seed, out)
        return {"source": f"synthetic-controlnet:{net.preset}@{net.seed}"}
    if params["kind"] == "controlnet_hub":
        hub_net = HubControlNet.model_validate(params)
        take_snapshot(HubRef(hub_net.id, hub_net.revision, RepoKind.CONTROLNET), out)
        return {"source": f"hub:{hub_net.id}@{hub_net.revision}"}
    if params["kind"] == "lora_hub":
        lora = HubLora.model_validate(params)
        found = cached_lora(lora_ref(lora.id, lora.revision), lora.weight_name)
        link_or_copy(found, out / LORA_FILE)
        return {"source": f"hub:{lora.id}@{lora.revision}:{lora.weight_name}"}
    if params["kind"] == "synthetic":
        synthetic = SyntheticSource.model_validate(params)
        write_synthetic_pipeline(get_preset(synthetic.preset), synthetic.seed, out)
        return {"source": f"synthetic:{synthetic.preset}@{synthetic.seed}"}
    if params["kind"] == "single_file":
        single = SingleFileSource.model_validate(params)
        import_single_file(inputs["checkpoint"], single.family, out)
        return {"source": f"single_file:{inputs['checkpoint'].name}"}
    hub = HubSource.model_validate(params)
    kind = RepoKind.VAE if hub.kind == "vae_hub" else RepoKind.PIPELINE
    take_snapshot(HubRef(hub.id, hub.revision, kind, tuple(hub.unread)), out)
    return {"source": f"hub:{hub.id}@{hub.revision}"}


def take_snapshot(ref: HubRef, out: Path) -> None:
    """The files of `ref` a conversion reads, from the Hugging Face cache (filled first where it lacks
    them and the Hub may be used), hard-linked into `out`: a model in the cache is never downloaded again."""
    link_snapshot(snapshot(ref), ref, out)


def import_single_file(checkpoint: Path, pipeline: str, out: Path) -> None:
    """Unpack a single-file .safetensors checkpoint into a diffusers folder, offline: the component
    configs and tokenizers come from sdbuild's own (builder/sd/single_file.py), not the base model's
    hub repository. `pipeline` is sd, sdxl or sdxl-refiner."""
    import shutil
    import tempfile

    from diffusers import StableDiffusionPipeline, StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline

    from builder.sd.single_file import checkpoint_shapes, preset_for, write_config_folder

    try:
        shapes = checkpoint_shapes(checkpoint)
    except Exception as error:  # not a safetensors file, truncated header
        raise UserError(
            f"cannot read the single-file checkpoint {checkpoint.name} ({first_line(error)})",
            hint="check that it is a Stable Diffusion checkpoint in safetensors format",
        ) from None
    preset = preset_for(shapes, pipeline)
    pipeline_class = {"sdxl": StableDiffusionXLPipeline, "sdxl-refiner": StableDiffusionXLImg2ImgPipeline}.get(
        pipeline, StableDiffusionPipeline
    )
    with tempfile.TemporaryDirectory() as configs:
        write_config_folder(preset, Path(configs))
        try:
            loaded = pipeline_class.from_single_file(
                str(checkpoint), config=configs, local_files_only=True, use_safetensors=True
            )
        except Exception as error:  # missing or misshapen tensors: all end the same way
            raise UserError(
                f"cannot read the single-file checkpoint {checkpoint.name} with the {preset} configs "
                f"({first_line(error)})",
                hint="check that the file is complete; a checkpoint of another size needs a diffusers folder with "
                "its own configs, given as model.local.path",
            ) from None
        loaded.save_pretrained(out, safe_serialization=True)
        # The tokenizer files as written, not as transformers saves them again (tokenizer.json only).
        for tokenizer in sorted(Path(configs).glob("tokenizer*")):
            shutil.rmtree(out / tokenizer.name, ignore_errors=True)
            shutil.copytree(tokenizer, out / tokenizer.name)
