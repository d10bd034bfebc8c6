"""The bundle's UNet, float16 and as compressed, rebuilt in torch from the pipeline it came from."""

from __future__ import annotations

from pathlib import Path

from builder.sd.components import kind
from builder.sd.manifest import Manifest, ModelEntry
from builder.sd.read_back import ReadBack, read_back


def unet_entries(manifest: Manifest) -> list[ModelEntry]:
    """The bundle's UNet: `Unet`, or `UnetChunk1` and `UnetChunk2`."""
    return [entry for entry in manifest.models.values() if entry.component == "unet"]


def load_read_back_unet(bundle: Path, pipeline: Path) -> ReadBack:
    """Float16 and compressed torch UNets of `bundle`, built from the `pipeline` folder it was made from.

    A chunked UNet is read back from both chunks into the one whole module (chunks keep its names).
    """
    manifest = Manifest.model_validate_json((bundle / "manifest.json").read_text())
    k = kind("unet")
    module = k.wrap(k.load(pipeline, k.subfolder), manifest.attention).eval()
    first, *others = (read_back(module, bundle / "Resources" / entry.path) for entry in unet_entries(manifest))
    mapping, consts = dict(first.mapping), set(first.compressed_consts)
    for other in others:
        state = {name: other.compressed.get_parameter(name) for name in other.mapping.values()}
        first.compressed.load_state_dict(state, strict=False)
        mapping |= other.mapping
        consts |= other.compressed_consts
    return ReadBack(
        float16=first.float16, compressed=first.compressed, mapping=mapping, compressed_consts=frozenset(consts)
    )
