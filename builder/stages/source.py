"""Materialise a pipeline folder: seeded synthetic weights, or a pinned Hugging Face snapshot."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel

from builder.errors import UserError
from builder.sd.presets import get_preset
from builder.sd.synthetic import write_synthetic_pipeline

# Only what conversion needs, and never pickled weights: safetensors, configs and tokenizer files.
_HUB_PATTERNS = ["model_index.json", "*/config.json", "*/*.safetensors", "scheduler/*.json", "tokenizer*/*"]
_HUB_EXCLUDED = ["*.bin", "*.ckpt", "*.pt", "*.pth", "*.msgpack", "*.onnx", "*.h5"]


class SyntheticSourceParams(BaseModel):
    kind: Literal["synthetic"]
    preset: str
    seed: int


class HubSourceParams(BaseModel):
    kind: Literal["hub"]
    id: str
    revision: str


def run(inputs: dict[str, Path], params: dict, out: Path) -> dict:
    if params["kind"] == "synthetic":
        synthetic = SyntheticSourceParams.model_validate(params)
        write_synthetic_pipeline(get_preset(synthetic.preset), synthetic.seed, out)
        return {"source": f"synthetic:{synthetic.preset}@{synthetic.seed}"}
    hub = HubSourceParams.model_validate(params)
    download_snapshot(hub.id, hub.revision, out)
    return {"source": f"hub:{hub.id}@{hub.revision}"}


def download_snapshot(repo_id: str, revision: str, out: Path) -> None:
    """Download the convertible files of `repo_id` at `revision` into `out`, or fail in one line."""
    from huggingface_hub import snapshot_download

    try:
        snapshot_download(
            repo_id,
            revision=revision,
            local_dir=out,
            allow_patterns=_HUB_PATTERNS,
            ignore_patterns=_HUB_EXCLUDED,
        )
    except Exception as error:  # network, auth, missing repo: all end the same way for the user
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise UserError(
            f"cannot fetch the weights of {repo_id}@{revision} from the Hugging Face Hub ({type(error).__name__}: {reason[:200]})",
            hint="check the network and the id/revision, log in with `hf auth login` for gated models, "
            "or download the model once and point model.local.path at the folder",
        ) from None
    # The hub client leaves its own bookkeeping folder; it is not part of the model.
    cache_meta = out / ".cache"
    if cache_meta.exists():
        import shutil

        shutil.rmtree(cache_meta)
