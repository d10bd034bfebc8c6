"""Materialise a pipeline folder: seeded synthetic weights, or a pinned Hugging Face snapshot."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel

from builder.errors import UserError
from builder.sd.presets import get_controlnet_preset, get_preset
from builder.sd.synthetic import write_synthetic_controlnet, write_synthetic_pipeline

# Only what conversion needs, and never pickled weights: safetensors, configs and tokenizer files.
_HUB_PATTERNS = [
    "model_index.json",
    "*/config.json",
    "*/*.safetensors",
    "scheduler/*.json",
    "tokenizer*/*",
    "feature_extractor/*.json",
]
# Reduced-precision variants (SDXL's repositories hold float16 copies of every model) are never loaded.
_HUB_EXCLUDED = ["*.bin", "*.ckpt", "*.pt", "*.pth", "*.msgpack", "*.onnx", "*.h5", "*.fp16.safetensors"]
# A replacement VAE repository: one AutoencoderKL at the root (some also hold single-file copies).
_VAE_HUB_PATTERNS = [
    "config.json",
    "diffusion_pytorch_model*.safetensors",
    "diffusion_pytorch_model.safetensors.index.json",
]


class SyntheticSourceParams(BaseModel):
    kind: Literal["synthetic"]
    preset: str
    seed: int


class SingleFileSourceParams(BaseModel):
    kind: Literal["single_file"]
    family: str


class HubSourceParams(BaseModel):
    kind: Literal["hub", "vae_hub"]  # a whole pipeline, or one replacement VAE
    id: str
    revision: str


class SyntheticControlNetParams(BaseModel):
    kind: Literal["controlnet_synthetic"]
    preset: str
    seed: int


class HubControlNetParams(BaseModel):
    kind: Literal["controlnet_hub"]
    id: str
    revision: str


# A ControlNet repository holds one diffusers model at its root.
_CONTROLNET_HUB_PATTERNS = ["config.json", "*.safetensors"]


def run(inputs: dict[str, Path], params: dict, out: Path) -> dict:
    if params["kind"] == "controlnet_synthetic":
        synthetic = SyntheticControlNetParams.model_validate(params)
        write_synthetic_controlnet(get_controlnet_preset(synthetic.preset), synthetic.seed, out)
        return {"source": f"synthetic-controlnet:{synthetic.preset}@{synthetic.seed}"}
    if params["kind"] == "controlnet_hub":
        hub = HubControlNetParams.model_validate(params)
        download_snapshot(hub.id, hub.revision, out, _CONTROLNET_HUB_PATTERNS)
        return {"source": f"hub:{hub.id}@{hub.revision}"}
    if params["kind"] == "synthetic":
        synthetic = SyntheticSourceParams.model_validate(params)
        write_synthetic_pipeline(get_preset(synthetic.preset), synthetic.seed, out)
        return {"source": f"synthetic:{synthetic.preset}@{synthetic.seed}"}
    if params["kind"] == "single_file":
        single = SingleFileSourceParams.model_validate(params)
        import_single_file(inputs["checkpoint"], single.family, out)
        return {"source": f"single_file:{inputs['checkpoint'].name}"}
    hub = HubSourceParams.model_validate(params)
    download_snapshot(hub.id, hub.revision, out, _VAE_HUB_PATTERNS if hub.kind == "vae_hub" else _HUB_PATTERNS)
    return {"source": f"hub:{hub.id}@{hub.revision}"}


def download_snapshot(repo_id: str, revision: str, out: Path, patterns: list[str] = _HUB_PATTERNS) -> None:
    """Download the convertible files of `repo_id` at `revision` into `out`, or fail in one line."""
    from huggingface_hub import constants, snapshot_download

    if not constants.HF_HUB_OFFLINE:
        _check_reachable(constants.ENDPOINT, repo_id, revision)
    try:
        snapshot_download(
            repo_id,
            revision=revision,
            local_dir=out,
            allow_patterns=patterns,
            ignore_patterns=_HUB_EXCLUDED,
        )
    except Exception as error:  # network, auth, missing repo: all end the same way for the user
        raise _cannot_fetch(repo_id, revision, _first_line(error)) from None
    # The hub client leaves its own bookkeeping folder; it is not part of the model.
    cache_meta = out / ".cache"
    if cache_meta.exists():
        import shutil

        shutil.rmtree(cache_meta)


def _first_line(error: Exception) -> str:
    """The error's type and the first line of its message: one line for the user, not a trace."""
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0][:200]}" if lines else type(error).__name__


def _cannot_fetch(repo_id: str, revision: str, why: str) -> UserError:
    return UserError(
        f"cannot fetch the weights of {repo_id}@{revision[:12]} from the Hugging Face Hub ({why})",
        hint="check the network and the id/revision, log in with `hf auth login` for gated models, "
        "or download it once and give that folder as the source's `local: {path: ...}` instead of `hub:`",
    )


def _check_reachable(endpoint: str, repo_id: str, revision: str) -> None:
    """Fail in a second, not after the hub client's minute of retries, when the hub's host is unknown."""
    import socket
    from urllib.parse import urlparse

    url = urlparse(endpoint)
    try:
        socket.getaddrinfo(url.hostname, url.port or 443)
    except OSError as error:
        raise _cannot_fetch(repo_id, revision, f"{url.hostname} is unreachable: {error.strerror or error}") from None


def import_single_file(checkpoint: Path, family: str, out: Path) -> None:
    """Unpack a single-file .safetensors checkpoint into a diffusers folder.

    diffusers recognises the architecture from the weights but takes the component configs from the
    base model's hub repository, so this needs the hub (or its local cache) once.
    """
    from diffusers import StableDiffusionPipeline, StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline

    pipeline_class = {"sdxl": StableDiffusionXLPipeline, "sdxl-refiner": StableDiffusionXLImg2ImgPipeline}.get(
        family, StableDiffusionPipeline
    )
    try:
        pipeline = pipeline_class.from_single_file(str(checkpoint), use_safetensors=True)
    except Exception as error:  # offline, unknown architecture, corrupt file: all end the same way
        raise UserError(
            f"cannot read the single-file checkpoint {checkpoint.name} ({_first_line(error)})",
            hint="check that it is a Stable Diffusion checkpoint in safetensors format; diffusers also needs the base "
            "model's config files from the Hugging Face Hub once, so connect, or convert the checkpoint to a "
            "diffusers folder elsewhere and point model.local.path at that folder",
        ) from None
    pipeline.save_pretrained(out, safe_serialization=True)
