"""The bundle's UNet, float16 and as compressed, rebuilt in torch from the pipeline it came from."""

from __future__ import annotations

from pathlib import Path

from builder.sd.components import kind
from builder.sd.manifest import Manifest
from builder.sd.read_back import ReadBack, read_back


def load_read_back_unet(bundle: Path, pipeline: Path) -> ReadBack:
    """Float16 and compressed torch UNets of `bundle`, built from the `pipeline` folder it was made from."""
    manifest = Manifest.model_validate_json((bundle / "manifest.json").read_text())
    k = kind("unet")
    module = k.wrap(k.load(pipeline, k.subfolder), manifest.attention).eval()
    return read_back(module, bundle / "Resources" / manifest.models["Unet"].path)
